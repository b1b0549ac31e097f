"""Per-iteration overhead of resnetc's Solver over a bare PyTorch loop with the same net, the same update
math (Caffe's SGD: v = m·v + lr·(g + wd·w), w -= v) and the same batches. Prints the time ratio.

usage: python bench/solver_overhead.py [NET.prototxt] [--iters N]
Without NET it uses a layer stack that needs no vision kernels (PReLU ×4 + EuclideanLoss, 256×4096 inputs).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

NET = '''name: "bench"
layer { name: "in" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 256 dim: 4096 } shape { dim: 256 dim: 4096 } } }
layer { name: "p1" type: "PReLU" bottom: "data" top: "p1" }
layer { name: "p2" type: "PReLU" bottom: "p1" top: "p2" }
layer { name: "p3" type: "PReLU" bottom: "p2" top: "p3" }
layer { name: "p4" type: "PReLU" bottom: "p3" top: "p4" }
layer { name: "loss" type: "EuclideanLoss" bottom: "p4" bottom: "target" top: "loss" }
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("net", nargs="?")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    from resnetc.prototxt import parse_solver_text
    from resnetc.solver import Solver

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    logging.getLogger("resnetc").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp()
    net_path = args.net or os.path.join(tmp, "bench.prototxt")
    if not args.net:
        open(net_path, "w").write(NET)
    rs = np.random.RandomState(0)
    batches = [{"data": torch.from_numpy(rs.randn(256, 4096).astype(np.float32)),
                "target": torch.from_numpy(rs.randn(256, 4096).astype(np.float32))} for _ in range(4)]

    def factory(graph, phase, index, seed, device):
        it = iter(range(10 ** 9))
        return lambda: batches[next(it) % 4]

    text = (f'net: "{net_path}" base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "step" gamma: 0.1 '
            f'stepsize: 100000 max_iter: {args.iters} display: 100 snapshot_after_train: false')
    solver = Solver(parse_solver_text(text, "bench_solver.prototxt"), feed_factory=factory)
    net = solver.net

    # bare loop: same net object, same math, same data
    params = [(p, float(np.float32(lr)), float(np.float32(np.float32(0.0005) * np.float32(dm))))
              for _, _, p, lr, dm in net.learnable_params() if lr != 0]
    hist = [torch.zeros_like(p) for p, _, _ in params]

    def bare(n):
        for i in range(n):
            for p, _, _ in params:
                p.grad = None
            net(**batches[i % 4])
            loss = net.total_loss()
            loss.backward()
            loss.item()
            with torch.no_grad():
                for (p, lr, wd), h in zip(params, hist):
                    g = p.grad.add_(p, alpha=wd)
                    h.mul_(0.9).add_(g, alpha=0.01 * lr)
                    p.sub_(h)

    bare(10)
    solver.step(10)
    best_bare, best_solver = float("inf"), float("inf")
    for _ in range(7):  # alternate, keep the best of each (the machine is shared)
        t = time.perf_counter()
        bare(args.iters)
        best_bare = min(best_bare, time.perf_counter() - t)
        t = time.perf_counter()
        solver.step(args.iters)
        best_solver = min(best_solver, time.perf_counter() - t)
    ratio = best_solver / best_bare
    print(f"bare loop: {1000 * best_bare / args.iters:.3f} ms/iter; Solver: {1000 * best_solver / args.iters:.3f} "
          f"ms/iter; ratio {ratio:.4f} (overhead {100 * (ratio - 1):+.2f}%, target <= +3%)")
    sys.exit(0)


if __name__ == "__main__":
    main()
