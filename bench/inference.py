"""ResNet-50 inference on the CPU, four engines side by side in one run, same weights, same input.

Engines:

* ``torch``: PyTorch eager, ``resnetc.load_net`` (CaffeNet) in eval mode under ``torch.no_grad()``;
* ``onnxruntime``: the model ``resnetc.export.export_onnx`` writes, run by ``resnetc.export.InferenceSession``
  with its defaults;
* ``onnxruntime --fold-bn``: the same with BatchNorm+Scale folded into the convolutions at export;
* ``opencv``: OpenCV's Caffe importer, ``cv2.dnn.readNetFromCaffe`` on the same prototxt and .caffemodel
  (skipped, with the reason printed, when cv2 or its dnn module is missing).

Weights: ``specs/resnet50_deploy.prototxt`` has no fillers of its own (Caffe's default is constant 0), so the
weights come from the fillers of the same layers in the train_val ``specs/resnet50.prototxt`` (msra, seed 1);
its BatchNorm statistics are set by one TRAIN-phase forward on a random batch (Caffe's running averages after one
step), so activations keep a sane range and the engines' outputs can be compared meaningfully. They are written
to a temporary .caffemodel with ``resnetc.weights.save_caffemodel`` and every engine reads that file.

Timing: every engine uses the same number of threads (default: the usable cores). The machine may be shared, so
the engines take turns: each round times every engine (in an order rotated per round, after a pause and one
untimed call, so that no engine's idle threads still spin in the next one's time) at batch 1 and batch 8,
and one large fp32 ``torch.matmul`` (3 runs) before and after, whose best run is the GEMM peak. Engine figures are
medians over all timed calls ("min ms": the fastest call, the least disturbed by other processes). Throughput is
images/s at the median; "% peak" = images/s x 2 x multiply-adds per image
(``resnetc.summary``) / the measured GEMM FLOP/s.

usage: python bench/inference.py [--iterations N] [--rounds R] [--threads T] [--quick] [--spinning-row]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEPLOY = os.path.join(REPO, "specs", "resnet50_deploy.prototxt")
TRAIN_VAL = os.path.join(REPO, "specs", "resnet50.prototxt")
BATCHES = (1, 8)


def make_weights(path: str, seed: int = 1) -> None:
    """Filler weights of the train_val (msra), BatchNorm statistics from one TRAIN forward, saved as .caffemodel."""
    import resnetc
    from resnetc.weights import save_caffemodel

    n = 4
    net = resnetc.load_net(TRAIN_VAL, phase="TRAIN", input_shapes={"data": [n, 3, 224, 224], "label": [n]},
                           seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 224, 224, generator=g) * 255.0 - 128.0
    with torch.no_grad():
        net(data=x, label=torch.zeros(n))
    save_caffemodel(net, path)


def gemm_gflops(n: int, reps: int = 3) -> list:
    a = torch.rand(n, n)
    b = torch.rand(n, n)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        out.append(2.0 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return out


class Engine:
    def __init__(self, name, run, note=""):
        self.name = name
        self.run = run  # numpy NCHW float32 -> numpy probabilities
        self.note = note
        self.times = {b: [] for b in BATCHES}


def build_engines(tmp: str, weights: str, threads: int, spinning_row: bool) -> tuple:
    import resnetc
    from resnetc.export import InferenceSession, export_onnx

    engines = []
    skipped = []
    net = resnetc.load_net(DEPLOY, weights=weights, phase="TEST").eval()
    out = net.outputs[0]

    def torch_run(x):
        with torch.no_grad():
            return net(data=torch.from_numpy(x))[out].numpy()

    engines.append(Engine("PyTorch eager (CaffeNet)", torch_run, f"{torch.get_num_threads()} threads"))
    for fold in (False, True):
        path = os.path.join(tmp, f"resnet50{'_fold' if fold else ''}.onnx")
        t = time.perf_counter()
        rep = export_onnx(DEPLOY, path, weights=weights, fold_bn=fold)
        print(f"export{' --fold-bn' if fold else ''}: {time.perf_counter() - t:.1f} s, onnxruntime vs PyTorch max abs "
              f"diff {rep.max_abs:.2g}" + (f", {len(rep.folded)} BatchNorm layers folded" if fold else ""))
        variants = [(False, "")] + ([(True, ", spinning")] if spinning_row and not fold else [])
        for spin, tag in variants:
            sess = InferenceSession(path, device="cpu", threads=threads, spinning=spin)
            engines.append(Engine(f"onnxruntime{' --fold-bn' if fold else ''}{tag}",
                                  (lambda s: lambda x: s(data=x)[s.outputs[0]])(sess),
                                  f"{sess.threads} threads, spinning {'on' if sess.spinning else 'off'}"))
    try:
        import cv2

        if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
            raise ImportError(f"this OpenCV ({cv2.__version__}) has no dnn.readNetFromCaffe")
    except ImportError as e:
        skipped.append(f"OpenCV dnn: skipped ({e})")
    else:
        cv2.setNumThreads(threads)
        cvnet = cv2.dnn.readNetFromCaffe(DEPLOY, weights)
        cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        cvnet.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def cv_run(x):
            cvnet.setInput(x)
            return cvnet.forward()

        engines.append(Engine("OpenCV dnn (readNetFromCaffe)", cv_run, f"OpenCV {cv2.__version__}, "
                              f"{cv2.getNumThreads()} threads"))
    return engines, skipped, net


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=8, help="timed calls per engine and batch size (default 8)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds the timed calls are spread over (default 8: "
                    "one call per engine and batch size per round)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine (default: usable cores)")
    ap.add_argument("--gemm-n", type=int, default=2048, help="size of the square matmul measuring the peak")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 1 call: a smoke run (figures are rough)")
    ap.add_argument("--spinning-row", action="store_true",
                    help="also time onnxruntime with spinning worker threads (the InferenceSession default is off)")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.rounds, args.gemm_n = 2, 2, 1024
    if args.iterations < 1 or args.rounds < 1:
        ap.error("--iterations and --rounds must be >= 1")
    rounds = min(args.rounds, args.iterations)
    per_round = [args.iterations // rounds + (1 if r < args.iterations % rounds else 0) for r in range(rounds)]

    import resnetc
    from resnetc.export import usable_cpus
    from resnetc.summary import summarize

    logging.getLogger("resnetc").setLevel(logging.ERROR)
    threads = args.threads or usable_cpus()
    torch.set_num_threads(threads)
    macs = summarize(resnetc.load_net(DEPLOY).graph).macs  # per image (the deploy's batch is 1)
    print(f"ResNet-50 ({os.path.relpath(DEPLOY, REPO)}): {macs / 1e9:.3f} G multiply-adds per image = "
          f"{2 * macs / 1e9:.3f} GFLOP; {threads} threads per engine on {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "resnet50.caffemodel")
        t = time.perf_counter()
        make_weights(weights)
        print(f"weights: train_val fillers + BatchNorm statistics of one TRAIN forward -> "
              f"{os.path.getsize(weights) / 1e6:.0f} MB .caffemodel ({time.perf_counter() - t:.1f} s)")
        with contextlib.redirect_stderr(io.StringIO()):
            engines, skipped, _ = build_engines(tmp, weights, threads, args.spinning_row)
        for line in skipped:
            print(line)

        rs = np.random.RandomState(0)
        x8 = (rs.rand(8, 3, 224, 224) * 255.0 - 128.0).astype(np.float32)
        inputs = {8: x8, 1: np.ascontiguousarray(x8[:1])}
        # same input, same answer: every engine against PyTorch, at batch 8 (also the warm-up)
        ref = engines[0].run(inputs[8]).reshape(8, -1)
        for e in engines:
            e.run(inputs[1])
            got = e.run(inputs[8]).reshape(8, -1)
            same_top1 = int((got.argmax(1) == ref.argmax(1)).sum())
            print(f"  {e.name:<34} max |prob - PyTorch| = {float(np.abs(got - ref).max()):.2e}, top-1 equal on "
                  f"{same_top1}/8 ({e.note})")

        gemm = []
        gemm_gflops(args.gemm_n)
        t_start = time.perf_counter()
        for r in range(rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            gemm += gemm_gflops(args.gemm_n)
            for e in order:
                time.sleep(0.3)  # the previous engine's worker threads stop spinning and go to sleep
                e.run(inputs[1])  # untimed
                for b in BATCHES:
                    for _ in range(per_round[r]):
                        t = time.perf_counter()
                        e.run(inputs[b])
                        e.times[b].append(time.perf_counter() - t)
            gemm += gemm_gflops(args.gemm_n)
        wall = time.perf_counter() - t_start

    peak = max(gemm)
    print(f"\nfp32 GEMM peak (torch.matmul {args.gemm_n}x{args.gemm_n}, {threads} threads): best {peak:.1f} GFLOP/s "
          f"(median {statistics.median(gemm):.1f}, min {min(gemm):.1f}; {len(gemm)} runs interleaved with the engines)")
    print(f"{args.iterations} timed calls per engine and batch over {rounds} rounds, {wall:.0f} s; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    head = f"{'engine':<34}" + "".join(f"{f'batch {b}: img/s':>16}{'ms':>9}{'min ms':>9}{'% peak':>8}" for b in BATCHES)
    print(head)
    print("-" * len(head))
    ips = {}
    for e in engines:
        cells = ""
        for b in BATCHES:
            med = statistics.median(e.times[b])
            ips[e.name, b] = b / med
            frac = ips[e.name, b] * 2 * macs / (peak * 1e9)
            cells += f"{ips[e.name, b]:>16.2f}{med * 1000:>9.1f}{min(e.times[b]) * 1000:>9.1f}{100 * frac:>7.1f}%"
        print(f"{e.name:<34}{cells}")
    print()
    names = [e.name for e in engines]
    ort = "onnxruntime"
    for b in BATCHES:
        parts = [f"{ort} / {other.split(' (')[0]} = {ips[ort, b] / ips[other, b]:.2f}x"
                 for other in names if other != ort]
        print(f"batch {b}: " + "; ".join(parts))
    best = {b: max(names, key=lambda n: ips[n, b]) for b in BATCHES}
    for b in BATCHES:
        print(f"batch {b}: fastest is {best[b]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
