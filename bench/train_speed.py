"""Training speed, images/s: resnetc's Solver vs the same network hand-written in PyTorch with torch.optim.SGD,
side by side in one run, eager and torch.compile'd; printed as ratios.

* ResNet-20 CIFAR, batch 128: ``resnetc.solver.Solver`` over specs/resnet20.prototxt vs
  ``handwritten.resnet_cifar(3)``;
* ResNet-50, batch 32: specs/resnet50.prototxt vs ``handwritten.resnet50_caffe()``.

Both get the same in-memory batches (a feed standing in for the spec's Data layers, already on the device), the
same initial weights, SGD with momentum 0.9 and weight decay 1e-4, and read the loss every iteration (the Solver
needs it for Caffe's smoothed loss; the hand-written loop calls ``loss.item()`` too). Programs are run in
blocks of ``--iters`` iterations, in turn, for ``--rounds`` rounds (the order reverses every round); each
program's figure is its median block. The compiled programs are timed after their compilation (reported apart)
and a warm-up. On a CUDA machine the same script runs on the GPU (``--device``); here CPU.

On CPU the script re-executes itself with glibc's trim and mmap thresholds fixed at 1 GiB (``GLIBC_TUNABLES``)
unless ``--system-malloc``: otherwise freed activations go back to the OS and are page-faulted in again, as
often as the process's heap layout happens to dictate, which swamps the comparison (see bench/overhead.py).

usage: python bench/train_speed.py [--nets resnet20,resnet50] [--quick] [--no-compile] [--rounds R] [--iters N]
                                   [--threads T] [--device cpu|cuda] [--system-malloc] [--keep-blobs auto|true|false]
  --quick: ResNet-20 with fewer rounds, ResNet-50 eager only, one iteration per block
  ResNet-50 compiled is left out on CPU unless --compile-resnet50 (its compilation alone takes minutes there).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import handwritten  # noqa: E402
from resnetc.prototxt import parse_solver_text  # noqa: E402
from resnetc.solver import Solver  # noqa: E402

NETS = {  # name: (train spec, batch, input C/H/W, classes, hand-written factory)
    "resnet20": ("resnet20.prototxt", 128, (3, 32, 32), 10, lambda: handwritten.resnet_cifar(3)),
    "resnet50": ("resnet50.prototxt", 32, (3, 224, 224), 1000, handwritten.resnet50_caffe),
}
LR, MOMENTUM, DECAY = 0.01, 0.9, 1e-4


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class MemoryFeed:
    """In-memory batches for the Data layers' tops ('data', 'label'), cycled; the Solver's feed interface."""

    def __init__(self, batches):
        self.batches = batches
        self.i = 0

    def __call__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def top_shapes(self) -> dict:
        return {k: tuple(v.shape) for k, v in self.batches[0].items()}


def make_batches(batch, chw, classes, device, n=2):
    g = torch.Generator().manual_seed(0)
    return [{"data": torch.randn((batch,) + chw, generator=g).to(device),
             "label": torch.randint(0, classes, (batch,), generator=g).to(device)} for _ in range(n)]


def resnetc_program(spec, batches, device, compiled, tmp, keep_blobs=None):
    text = (f'net: "{os.path.join(REPO, "specs", spec)}" base_lr: {LR} momentum: {MOMENTUM} weight_decay: {DECAY} '
            f'lr_policy: "fixed" max_iter: 1000000 display: 0 snapshot_after_train: false random_seed: 1 '
            f'snapshot_prefix: "{os.path.join(tmp, "snap")}"' + (" resnetc { compile: true }" if compiled else ""))
    feed = MemoryFeed(batches)
    solver = Solver(parse_solver_text(text, "train_speed_solver.prototxt"), device=device,
                    feed_factory=lambda graph, phase, index, seed, dev: feed)
    if keep_blobs is not None:
        solver.net.keep_blobs = keep_blobs
    return solver, (lambda n: solver.step(n))


def hand_program(factory, solver, batches, device, compiled):
    model = factory()
    handwritten.copy_from_caffenet(model, solver.net)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    call = torch.compile(model) if compiled else model
    state = {"i": 0}

    def run(n):
        for _ in range(n):
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(call(b["data"]), b["label"])
            loss.backward()
            loss.item()
            opt.step()
    return model, run


def bench_net(name, args, device, tmp):
    spec, batch, chw, classes, factory = NETS[name]
    batches = make_batches(batch, chw, classes, device)
    modes = [False]
    if not args.no_compile and (name != "resnet50" or device.type == "cuda" or args.compile_resnet50) and \
            not (args.quick and name == "resnet50"):
        modes.append(True)
    quick50 = args.quick or name == "resnet50"
    rounds = args.rounds or (2 if args.quick else 3 if name == "resnet50" else 5)
    iters = args.iters or (1 if quick50 else 2)
    print(f"\n{name}, batch {batch}, {device}: {rounds} rounds of {iters} iteration(s) per program", flush=True)
    results = {}
    for compiled in modes:
        label = "compiled" if compiled else "eager"
        solver, run_r = resnetc_program(spec, batches, device, compiled, tmp, args.keep_blobs)
        model, run_h = hand_program(factory, solver, batches, device, compiled)
        if not compiled:  # same weights, same batch: same loss before any step
            with torch.no_grad():
                lr_ = float(solver.net(**batches[0])["loss"])
                lh = float(F.cross_entropy(model(batches[0]["data"]), batches[0]["label"]))
            print(f"  check: initial loss resnetc {lr_:.5f}  hand-written {lh:.5f}")
        progs = [("resnetc", run_r), ("hand-written", run_h)]
        for pname, run in progs:  # warm-up (compilation included)
            sync(device)
            t = time.perf_counter()
            run(1 if not compiled else 2)
            sync(device)
            if compiled:
                print(f"  {pname} {label}: compilation and 2 warm-up iterations took {time.perf_counter() - t:.1f} s",
                      flush=True)
        times = {p: [] for p, _ in progs}
        for r in range(rounds):
            for pname, run in (progs if r % 2 == 0 else progs[::-1]):
                sync(device)
                t = time.perf_counter()
                run(iters)
                sync(device)
                times[pname].append((time.perf_counter() - t) / iters)
        for pname in times:
            results[(pname, label)] = statistics.median(times[pname])
        r, h = results[("resnetc", label)], results[("hand-written", label)]
        print(f"  {label:8s} resnetc {batch / r:8.1f} images/s   hand-written {batch / h:8.1f} images/s   "
              f"time ratio resnetc/hand-written {r / h:.3f}", flush=True)
        del solver, model
    if len(modes) == 2:
        for pname in ("resnetc", "hand-written"):
            print(f"  torch.compile speed-up, {pname}: {results[(pname, 'eager')] / results[(pname, 'compiled')]:.3f}x")
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="resnet20,resnet50")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-resnet50", action="store_true", help="also compile ResNet-50 on CPU (slow)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="iterations per timed block")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default trim/mmap thresholds")
    ap.add_argument("--keep-blobs", choices=("auto", "true", "false"), default="auto",
                    help="keep_blobs of the Solver's train net (default auto: Caffe's blobs kept in eager steps)")
    args = ap.parse_args()
    args.keep_blobs = {"auto": None, "true": True, "false": False}[args.keep_blobs]
    fixed = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=1073741824"
    if args.device == "cpu" and not args.system_malloc and fixed not in os.environ.get("GLIBC_TUNABLES", ""):
        old = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = f"{old}:{fixed}" if old else fixed
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable] + sys.argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("resnetc").setLevel(logging.WARNING)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads, "
             f"{'system malloc' if args.system_malloc else 'malloc thresholds fixed'})"))
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.nets.split(",") if n]:
            res = bench_net(name, args, device, tmp)
            for label in ("eager", "compiled"):
                if ("resnetc", label) in res:
                    summary.append(f"{name} {label} {res[('resnetc', label)] / res[('hand-written', label)]:.3f}")
    print("\ntime ratios resnetc / hand-written: " + ", ".join(summary))


if __name__ == "__main__":
    main()
