"""Peak memory of loading a ResNet-152-sized .caffemodel (~230 MB) into a net, resnetc vs a whole-file parse.

Writes a synthetic caffemodel for specs/resnet152_deploy.prototxt (random values, Caffe's ToProto layout),
then, each in a fresh process holding the net's parameters already, measures the peak resident memory a load
adds on top of the net (Linux VmHWM, reset through /proc/self/clear_refs just before the load):

* ``resnetc``: ``resnetc.weights`` (one top-level layer parsed at a time, one float32 array per blob, all
  checked before anything is copied, arrays released as they are copied);
* ``whole``: what a naive loader does: read the file into one bytes object, parse one NetParameter, convert
  each blob and copy it.

Prints the added peak in MB and as a multiple of the file size (the net itself is not counted).
Usage: python bench/weights_memory.py [--spec specs/resnet152_deploy.prototxt]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _zero_params(graph) -> dict:
    import torch

    params = {}
    for layer in graph.layers:
        if layer.blobs:
            params[layer.name] = [torch.zeros(tuple(b.shape)) for b in layer.blobs]
    return params


def _graph(spec):
    from resnetc.graph import build_graph

    return build_graph(spec, "TEST")


def child(method: str, spec: str, model: str) -> None:
    import numpy as np
    import torch

    graph = _graph(spec)
    params = _zero_params(graph)
    net_bytes = sum(t.numel() * 4 for ps in params.values() for t in ps)
    import resnetc.weights as W
    from resnetc.proto import caffe_pb2

    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if method == "resnetc":
        W.load_weights(graph, params, W.read_weights(model))
    else:
        with open(model, "rb") as f:
            data = f.read()
        msg = caffe_pb2.NetParameter()
        msg.ParseFromString(data)
        with torch.no_grad():
            for lp in msg.layer:
                for i, bp in enumerate(lp.blobs):
                    dst = params[lp.name][i]
                    dst.copy_(torch.from_numpy(np.array(bp.data, dtype=np.float32)).reshape(dst.shape))
        del msg, data
    peak = _status("VmHWM")
    check = float(params["fc1000"][1].sum())
    print(json.dumps({"base": base, "peak": peak, "net": net_bytes, "check": check}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=os.path.join(REPO, "specs", "resnet152_deploy.prototxt"))
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.spec, args.child[1])
        return
    import numpy as np
    import torch

    import resnetc.weights as W

    graph = _graph(args.spec)
    rs = np.random.RandomState(0)
    params = {name: [torch.from_numpy(rs.standard_normal(tuple(t.shape)).astype(np.float32)) for t in ps]
              for name, ps in _zero_params(graph).items()}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "resnet152.caffemodel")
        W.save_graph_caffemodel(graph, params, model)
        expect = float(params["fc1000"][1].sum())
        del params
        size = os.path.getsize(model)
        print(f"synthetic ResNet-152 caffemodel: {size / 1e6:.1f} MB ({len(graph.layers)} layers)")
        res = {}
        for method in ("resnetc", "whole"):
            out = subprocess.run([sys.executable, __file__, "--spec", args.spec, "--child", method, model],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert abs(r["check"] - expect) < 1e-3, (method, r["check"], expect)
            res[method] = r
            extra = r["peak"] - r["base"]
            print(f"{method:8s}: net params {r['net'] / 1e6:.1f} MB; load adds peak {extra / 1e6:.1f} MB "
                  f"= {extra / size:.2f} x the file")
        ratio = (res["resnetc"]["peak"] - res["resnetc"]["base"]) / max(1, res["whole"]["peak"] - res["whole"]["base"])
        print(f"ratio resnetc / whole-file parse (added peak): {ratio:.2f}")


if __name__ == "__main__":
    main()
