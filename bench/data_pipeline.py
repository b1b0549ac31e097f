"""Throughput of the Data layer pipeline (LMDB read + JPEG decode + DataTransformer, 2 worker threads) for
3x256x256 JPEG Datums cropped to 224 with mirror and mean values (TRAIN), and its ratio to the time of one
ResNet-50 training step (forward + backward) on this machine, per image.

    .venv/bin/python bench/data_pipeline.py [--images 256] [--batch 32] [--batches 40] [--workers 2]

The ResNet-50 step time is measured with resnetc when ``resnetc.load_net`` can build the oracle's
ResNet-50 deploy net, and is always also taken from real Caffe's ``caffe time`` on this machine type
(../shared/oracle/timing, ``resnet50_b8_t2_fb``). The pipeline is not the bottleneck when its images/s is
well above the step's images/s (ratio > 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE_TIMING = os.path.join(os.path.dirname(REPO), "shared", "oracle", "timing")


def make_db(path: str, n: int) -> None:
    import cv2

    from resnetc.data.datum import encoded_datum
    from resnetc.data.db import write_db

    rs = np.random.RandomState(0)
    with write_db(path) as db:
        for i in range(n):
            # smooth random images (JPEG sizes like photos': ~20-40 KB), not white noise
            small = rs.randint(0, 256, size=(16, 16, 3)).astype(np.uint8)
            img = cv2.resize(small, (256, 256), interpolation=cv2.INTER_CUBIC)
            img = cv2.add(img, rs.randint(0, 24, size=img.shape).astype(np.uint8))
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            db.put(b"%08d" % i, encoded_datum(buf.tobytes(), i % 1000).SerializeToString())


def pipeline_rate(db: str, batch: int, batches: int, workers: int) -> float:
    from resnetc.data import make_pipeline
    from resnetc.graph import build_graph
    from resnetc.prototxt import parse_net_text

    text = f"""layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
      transform_param {{ crop_size: 224 mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }}
      data_param {{ source: "{db}" batch_size: {batch} backend: LMDB }} }}"""
    g = build_graph(parse_net_text(text), "TRAIN")
    with make_pipeline(g.layer("data"), workers=workers, seed=1) as p:
        for _ in range(2):  # warm-up (threads, page cache)
            p.next_batch()
        t0 = time.perf_counter()
        for _ in range(batches):
            b = p.next_batch()
        dt = time.perf_counter() - t0
    assert tuple(b["data"].shape) == (batch, 3, 224, 224)
    return batch * batches / dt


def caffe_resnet50_ms_per_image() -> float | None:
    path = os.path.join(ORACLE_TIMING, "timing.json")
    if not os.path.exists(path):
        return None
    run = json.load(open(path))["resnet50_b8_t2_fb"]
    steady = run["per_iteration_fwd_bwd_ms"][1:] or run["per_iteration_fwd_bwd_ms"]
    return float(np.mean(steady)) / 8


def resnetc_resnet50_ms_per_image(batch: int = 8) -> float | None:
    try:
        import torch

        import resnetc

        net = resnetc.load_net(os.path.join(ORACLE_TIMING, "ResNet-50-deploy.prototxt"), phase="TRAIN")
        x = torch.randn(batch, 3, 224, 224)
        name = net.graph.inputs[0]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = net(**{name: x})
            sum(v.float().sum() for v in out.values()).backward()
            times.append(time.perf_counter() - t0)
        return min(times[1:]) * 1000 / batch
    except Exception as e:  # the lowering may not be there yet
        print(f"(resnetc ResNet-50 step not measured: {type(e).__name__}: {str(e)[:160]})")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "jpeg_lmdb")
        make_db(db, args.images)
        size = sum(os.path.getsize(os.path.join(db, f)) for f in os.listdir(db))
        print(f"{args.images} JPEG datums 3x256x256, {size / args.images / 1024:.1f} KiB each")
        rate1 = pipeline_rate(db, args.batch, args.batches, 0)
        rate = pipeline_rate(db, args.batch, args.batches, args.workers)
    print(f"Data pipeline (decode + crop 224 + mirror + mean, batch {args.batch}): "
          f"{rate:.0f} images/s with {args.workers} workers ({rate1:.0f} images/s on the reader thread alone, "
          f"x{rate / rate1:.2f})")
    for who, ms in (("Caffe (oracle timing, batch 8, 2 threads)", caffe_resnet50_ms_per_image()),
                    ("resnetc (this run, batch 8)", resnetc_resnet50_ms_per_image())):
        if ms is None:
            continue
        step_rate = 1000 / ms
        print(f"ResNet-50 training step, {who}: {ms:.0f} ms/image = {step_rate:.2f} images/s; "
              f"pipeline/step throughput ratio = {rate / step_rate:.0f}x "
              f"({'pipeline is not the bottleneck' if rate > step_rate else 'PIPELINE IS THE BOTTLENECK'})")


if __name__ == "__main__":
    main()
