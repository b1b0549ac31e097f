"""Cost of the lowered CaffeNet vs the same ResNet written by hand in PyTorch (bench/handwritten.py: same layer
order, same fusions and in-place ops, same weights), measured side by side in one run. Prints time ratios
resnetc / hand-written (target <= 1.03) for two CaffeNets: ``keep_blobs=False`` (keeps only its outputs, like the
hand-written module: the cost of the lowering itself) and the default ``keep_blobs=True`` (keeps every blob
``net.blobs``/pycaffe can name after the forward, as Caffe does: that memory is not reused within the forward).

Cases: eval forward (TEST net, no grad); eval forward+backward; train forward+backward (TRAIN net with its loss,
BatchNorm on batch statistics and updating its running statistics); the same in channels_last; with
``--compile`` also torch.compile'd eval forward and train forward+backward.

Each program lives in its own worker process, so that one program's heap does not shape the other's. On CPU,
glibc by default hands freed activations back to the OS and page-faults them in again, and how often depends
on the whole process's allocation history: the same program measured 1k or 19k page faults per ResNet-20
forward (55 or 85 ms) from one process to the next. So the workers run with glibc's trim and mmap thresholds
fixed at 1 GiB (``GLIBC_TUNABLES``; memory stays in the process, no faults after the warm-up) unless
``--system-malloc``. The parent runs them one at a time, in turn, round by round (the order
rotates and reverses every round, after a warm-up of each), and reports the medians and the median of the
per-round ratios, so drift of a shared machine hits all of them. ``--threads`` pins the intra-op threads (on a
shared machine one thread is far steadier than two).

usage: python bench/overhead.py [--net resnet50|resnet20] [--batch N] [--rounds R] [--threads T]
                                [--cases eval,evalbw,train,cl,cltrain] [--compile] [--device cpu|cuda]
                                [--system-malloc] [--noise-floor]
  --noise-floor: the middle program is a second copy of the hand-written one (its ratio is the noise floor)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import handwritten  # noqa: E402
import resnetc  # noqa: E402

NETS = {  # name: (deploy spec, train spec, input C/H/W, hand-written factory, default batch)
    "resnet50": ("resnet50_deploy.prototxt", "resnet50.prototxt", (3, 224, 224), handwritten.resnet50_caffe, 4),
    "resnet20": ("resnet20_deploy.prototxt", "resnet20.prototxt", (3, 32, 32), handwritten.resnet_cifar, 64),
}
ALL_CASES = ("eval", "evalbw", "train", "cl", "cltrain")
PROGRAMS = ("resnetc", "resnetc keep_blobs=True", "hand-written")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def sane_statistics(net) -> None:
    """Random but sane weights and BN statistics so that activations stay finite (deterministic)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, blobs in net.params.items():
            t = net.graph.layer(name).type
            if t == "BatchNorm":
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g) * 0.1)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=g) + 0.5)
                blobs[2].fill_(1.0)
            elif t == "Scale":
                blobs[0].copy_(torch.rand(blobs[0].shape, generator=g) + 0.5)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=g) * 0.1)
            elif t in ("Convolution", "InnerProduct"):
                fan_in = blobs[0][0].numel()
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=g) * 0.01)


class Program:
    """One of the three programs, with its eval and train models, in a worker process."""

    def __init__(self, which: int, net: str, batch: int, device: str):
        deploy, train, chw, factory, _ = NETS[net]
        self.device = torch.device(device)
        shape = (batch,) + chw

        def build(spec, phase):
            shapes = {"data": shape, "label": (batch,)} if phase == "TRAIN" else {"data": shape}
            return resnetc.load_net(os.path.join(REPO, "specs", spec), phase=phase, seed=1, input_shapes=shapes)

        net_e, net_t = build(deploy, "TEST"), build(train, "TRAIN")
        sane_statistics(net_e)
        sane_statistics(net_t)
        self.is_net = which < 2
        if self.is_net:
            net_e.keep_blobs = net_t.keep_blobs = which == 1
            self.eval_model, self.train_model = net_e, net_t
            self.out_name = net_e.outputs[0]
            self.steps = (len(net_e.execution_plan(False)), len(net_e._plan), len(net_t.execution_plan(True)),
                          len(net_t._plan))
        else:
            self.eval_model, self.train_model = factory(), factory()
            handwritten.copy_from_caffenet(self.eval_model, net_e)
            handwritten.copy_from_caffenet(self.train_model, net_t)
            self.eval_model.eval()
            self.train_model.train()
            self.steps = None
        self.soft = "prob" in net_e.outputs[0]
        del net_e, net_t
        self.eval_model.to(self.device)
        self.train_model.to(self.device)
        self.x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(self.device)
        self.label = torch.randint(0, 10 if net == "resnet20" else 1000, (batch,),
                                   generator=torch.Generator().manual_seed(2)).to(self.device)
        self.xin = self.x
        self.compiled = {}
        self.fns = {}

    def _call(self, model, train: bool, compiled: bool):
        key = (id(model), compiled)
        if compiled and key not in self.compiled:
            self.compiled[key] = torch.compile(model)
        return self.compiled[key] if compiled else model

    def output(self, train: bool) -> np.ndarray:
        with torch.no_grad():
            if train:
                if self.is_net:
                    return self.train_model(data=self.x, label=self.label)["loss"].cpu().numpy()
                return F.cross_entropy(self.train_model(self.x), self.label).cpu().numpy()
            if self.is_net:
                return self.eval_model(data=self.x)[self.out_name].cpu().numpy()
            y = self.eval_model(self.x)
            return (torch.softmax(y, 1) if self.soft else y).cpu().numpy()

    def layout(self, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.eval_model.to(memory_format=fmt)
        self.train_model.to(memory_format=fmt)
        self.xin = self.x.contiguous(memory_format=fmt)

    def run(self, case: str) -> float:
        compiled = case.startswith("compiled")
        kind = case.split()[-1]
        sync(self.device)
        t = time.perf_counter()
        if kind == "eval":
            model = self._call(self.eval_model, False, compiled)
            with torch.no_grad():  # the deploy net ends in a Softmax layer: so does the hand-written forward here
                if self.is_net:
                    model(data=self.xin)
                else:
                    y = model(self.xin)
                    torch.softmax(y, 1) if self.soft else y
        elif kind == "evalbw":
            model = self.eval_model
            for p in model.parameters():
                p.grad = None
            if self.is_net:
                out = model(data=self.xin)[self.out_name]
            else:
                out = model(self.xin)
                out = torch.softmax(out, 1) if self.soft else out
            out.sum().backward()
        else:  # train
            model = self.train_model
            call = self._call(model, True, compiled)
            for p in model.parameters():
                p.grad = None
            if self.is_net:
                call(data=self.xin, label=self.label)
                loss = model.total_loss()
            else:
                loss = F.cross_entropy(call(self.xin), self.label)
            loss.backward()
        sync(self.device)
        return time.perf_counter() - t


def worker(conn, which, args):
    torch.set_num_threads(args["threads"])
    prog = Program(which, args["net"], args["batch"], args["device"])
    conn.send(("ready", prog.steps))
    while True:
        msg = conn.recv()
        if msg[0] == "quit":
            break
        if msg[0] == "run":
            conn.send(prog.run(msg[1]))
        elif msg[0] == "layout":
            prog.layout(msg[1])
            conn.send(None)
        elif msg[0] == "output":
            conn.send(prog.output(msg[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", choices=sorted(NETS), default="resnet50")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=8, help="timed runs of each program per case")
    ap.add_argument("--cases", default=",".join(ALL_CASES))
    ap.add_argument("--compile", action="store_true", help="also torch.compile'd eval forward and train step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads per program")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default trim/mmap thresholds")
    ap.add_argument("--noise-floor", action="store_true", help="time a second hand-written copy instead of "
                    "resnetc keep_blobs=True")
    args = ap.parse_args()
    if not args.system_malloc:
        fixed = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.mmap_threshold=1073741824"
        old = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = f"{old}:{fixed}" if old else fixed  # read by the spawned workers
    batch = args.batch or NETS[args.net][4]
    cases = [c for c in args.cases.split(",") if c]
    ctx = mp.get_context("spawn")
    conf = dict(net=args.net, batch=batch, device=args.device, threads=args.threads)
    conns, procs = [], []
    middle = "hand-written #2" if args.noise_floor else "keep_blobs=True"
    for which in ((0, 2, 2) if args.noise_floor else range(3)):
        a, b = ctx.Pipe()
        p = ctx.Process(target=worker, args=(b, which, conf), daemon=True)
        p.start()
        conns.append(a)
        procs.append(p)
    steps = [c.recv()[1] for c in conns][0]

    def ask(i, *msg):
        conns[i].send(msg)
        return conns[i].recv()

    print(f"{args.net} batch {batch} on {args.device} ({args.threads} threads per program"
          f"{', system malloc' if args.system_malloc else ', malloc thresholds fixed'}), torch {torch.__version__}; "
          f"resnetc execution plan: {steps[0]} steps for {steps[1]} layers (eval), {steps[2]} for {steps[3]} (train)")
    outs = [ask(i, "output", False) for i in range(3)]
    print(f"check: max |resnetc - hand-written| eval output = {float(np.abs(outs[0] - outs[2]).max()):.2e}, "
          f"{middle} {float(np.abs(outs[1] - outs[2]).max()):.2e}")
    losses = [float(ask(i, "output", True)) for i in range(3)]
    print(f"check: train loss resnetc {losses[0]:.6f} ({middle} {losses[1]:.6f}) hand-written {losses[2]:.6f}")
    a, b = ("hand-", "written #2") if args.noise_floor else ("keep_blobs", "=True (ms)")
    print(f"{'':37s}{'resnetc':>10s}{a:>12s}{'hand-':>10s}   ratio to hand-written")
    print(f"{'':37s}{'(ms)':>10s}{b:>12s}{'written':>10s}   resnetc  {middle}")
    rows = []

    def case(title, name):
        for i in range(3):
            ask(i, "run", name)  # warm-up (and compilation)
        times = [[], [], []]
        for r in range(args.rounds):
            order = [(i + r // 2) % 3 for i in range(3)]
            for i in (order if r % 2 == 0 else order[::-1]):
                times[i].append(ask(i, "run", name))
        med = [statistics.median(t) for t in times]
        ratios = [statistics.median([a / b for a, b in zip(t, times[2])]) for t in times[:2]]
        rows.append((title, ratios))
        print(f"{title:37s}{med[0] * 1000:10.1f}{med[1] * 1000:12.1f}{med[2] * 1000:10.1f}   {ratios[0]:7.3f}  "
              f"{ratios[1]:7.3f}", flush=True)

    titles = {"eval": "eval forward", "evalbw": "eval forward+backward", "train": "train forward+backward"}
    for c in ("eval", "evalbw", "train"):
        if c in cases:
            case(titles[c], c)
    if "cl" in cases or "cltrain" in cases:
        for i in range(3):
            ask(i, "layout", True)
        if "cl" in cases:
            case("channels_last eval forward", "eval")
        if "cltrain" in cases:
            case("channels_last train forward+backward", "train")
        for i in range(3):
            ask(i, "layout", False)
    if args.compile:
        case("compiled eval forward", "compiled eval")
        case("compiled train forward+backward", "compiled train")
    for c in conns:
        c.send(("quit",))
    for p in procs:
        p.join()
    print("ratios resnetc / hand-written: " + ", ".join(f"{t} {r[0]:.3f}" for t, r in rows))
    print(f"{middle + ':':31s}" + ", ".join(f"{t} {r[1]:.3f}" for t, r in rows))


if __name__ == "__main__":
    main()
