"""`caffe time` for resnetc: average forward, backward and forward-backward per layer and in total (torch),
and latency / throughput in onnxruntime.

The torch report prints the lines `caffe time` prints (CAFFE_SEMANTICS.md §8), with the same wording and number
format, so log parsers written for Caffe read it: ``Iteration: <j> forward-backward time: <ms> ms.``, then per
layer ``<name right-aligned in 10>\\tforward: <ms> ms.`` / ``\\tbackward: <ms> ms.``, then ``Average Forward pass``,
``Average Backward pass``, ``Average Forward-Backward``, ``Total Time``. Differences from Caffe: one untimed
warm-up iteration comes first (Caffe's averages include its cold first iteration), and every layer's backward
computes its bottom diffs as well as its parameter diffs (Caffe's deploy nets skip the bottom diffs: its
``force_backward: true`` runs compare). One resnetc line follows the benchmark: the whole net's forward-backward
through autograd, as training runs it, and the throughput that gives.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("resnetc.timing")


@dataclasses.dataclass
class LayerTime:
    name: str
    type: str
    forward_ms: float
    backward_ms: float


@dataclasses.dataclass
class TorchTiming:
    iterations: int
    batch: int
    forward_ms: float  # average per iteration, summed over the layers
    backward_ms: float
    fwd_bwd_ms: float  # forward_ms + backward_ms
    per_iteration_ms: list
    layers: list
    autograd_ms: float = float("nan")  # median whole-net forward + autograd backward
    initial_loss: float = 0.0

    @property
    def total_ms(self) -> float:
        return float(sum(self.per_iteration_ms))

    def format(self) -> str:
        lines = ["Performing Forward", f"Initial loss: {self.initial_loss:g}", "Performing Backward",
                 "*** Benchmark begins ***", f"Testing for {self.iterations} iterations."]
        lines += [f"Iteration: {j} forward-backward time: {ms:g} ms."
                  for j, ms in enumerate(self.per_iteration_ms, 1)]
        lines.append("Average time per layer: ")
        for row in self.layers:
            lines.append(f"{row.name:>10}\tforward: {row.forward_ms:g} ms.")
            lines.append(f"{row.name:>10}\tbackward: {row.backward_ms:g} ms.")
        lines += [f"Average Forward pass: {self.forward_ms:g} ms.",
                  f"Average Backward pass: {self.backward_ms:g} ms.",
                  f"Average Forward-Backward: {self.fwd_bwd_ms:g} ms.",
                  f"Total Time: {self.total_ms:g} ms.",
                  "*** Benchmark ends ***",
                  f"Whole net forward-backward (autograd): {self.autograd_ms:g} ms; throughput "
                  f"{1000.0 * self.batch / self.autograd_ms:.4g} images/s (batch {self.batch})"]
        return "\n".join(lines)


def _sync(device):
    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _random_inputs(net, device, batch=None) -> dict:
    g = torch.Generator().manual_seed(0)
    feeds = {}
    for name in net.inputs:
        shape = list(net.graph.shape(name))
        if batch is not None and shape:
            shape[0] = batch
        feeds[name] = torch.rand(*shape, generator=g).to(device)
    return feeds


def _as_list(out, n_tops):
    if n_tops == 1 and not isinstance(out, (tuple, list)):
        return [out]
    return list(out)


def time_torch(net, iterations: int = 50, *, device=None, batch=None) -> TorchTiming:
    """Caffe's `time`: per iteration, every layer's forward (in order) then every layer's backward (in reverse
    order), each timed alone; then the whole forward-backward as autograd runs it (median of up to 10).

    A layer's backward is timed as autograd's backward of that layer alone: the layer is run again (untimed) on
    detached copies of its bottoms, then its tops' diffs (ones) are propagated to its bottoms and parameters."""
    feeds = _random_inputs(net, device, batch)
    plan = list(net._plan)
    keys = net._module_keys
    rows = []  # one per graph layer, in Caffe's order; Input layers have no plan entry and time 0
    plan_of_row = []
    k = 0
    for layer in net.graph.layers:
        rows.append(LayerTime(layer.name, layer.type, 0.0, 0.0))
        if layer.name in keys:
            plan_of_row.append(k)
            k += 1
        else:
            plan_of_row.append(None)
    fwd = np.zeros(len(plan))
    bwd = np.zeros(len(plan))
    per_iter = []
    initial_loss = 0.0
    nbatch = next(iter(feeds.values())).shape[0] if feeds else 1
    for it in range(iterations + 1):  # iteration 0 warms up (not counted; Caffe counts its cold one)
        t_fwd = t_bwd = 0.0
        env = {n: v.detach().requires_grad_(v.is_floating_point()) for n, v in feeds.items()}
        for i, (mod, bottoms, tops, _) in enumerate(plan):
            args = [env[b] for b in bottoms]
            _sync(device)
            t = time.perf_counter()
            out = mod(*args)
            _sync(device)
            dt = time.perf_counter() - t
            t_fwd += dt
            if it:
                fwd[i] += dt
            for name, v in zip(tops, _as_list(out, len(tops))):
                env[name] = v
        if it == 0:
            initial_loss = float(sum(float(env[ssa].detach().sum()) * w for ssa, w in net._loss_terms))
        for i in range(len(plan) - 1, -1, -1):
            mod, bottoms, tops, _ = plan[i]
            args = [env[b].detach().requires_grad_(env[b].is_floating_point()) for b in bottoms]
            outs = _as_list(mod(*args), len(tops))
            ys = [o for o in outs if torch.is_tensor(o) and o.requires_grad]
            if not ys:
                continue
            grads = [torch.ones_like(o) for o in ys]
            _sync(device)
            t = time.perf_counter()
            torch.autograd.backward(ys, grads)
            _sync(device)
            dt = time.perf_counter() - t
            t_bwd += dt
            if it:
                bwd[i] += dt
        if it:
            per_iter.append((t_fwd + t_bwd) * 1000.0)
    for p in net.parameters():
        p.grad = None
    fb = []
    for _ in range(max(1, min(iterations, 10))):
        _sync(device)
        t = time.perf_counter()
        outs = net(**feeds)
        loss = net.total_loss() if net.has_loss else sum(o.float().sum() for o in outs.values() if o.requires_grad)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        _sync(device)
        fb.append((time.perf_counter() - t) * 1000.0)
    for p in net.parameters():
        p.grad = None
    n = float(iterations)
    for row, k in zip(rows, plan_of_row):
        if k is not None:
            row.forward_ms = fwd[k] * 1000.0 / n
            row.backward_ms = bwd[k] * 1000.0 / n
    f_ms, b_ms = float(fwd.sum() * 1000.0 / n), float(bwd.sum() * 1000.0 / n)
    return TorchTiming(iterations, nbatch, f_ms, b_ms, f_ms + b_ms, per_iter, rows, float(np.median(fb)),
                       initial_loss)


def timing_net(net_path, weights=None, *, phase: str = "TEST", batch: Optional[int] = None,
               input_shapes: Optional[dict] = None):
    """The deploy form of ``net_path`` built in ``phase`` (TRAIN: BatchNorm without ``use_global_stats`` uses
    batch statistics, Dropout drops), with ``weights`` loaded; the module in train/eval mode to match."""
    from .deploy import to_deploy
    from .graph import build_graph
    from .net import CaffeNet
    from .prototxt import read_net

    phase = phase.upper()
    graph = build_graph(to_deploy(read_net(os.fspath(net_path)), batch=batch, input_shapes=input_shapes), phase,
                        input_shapes=input_shapes)
    net = CaffeNet(graph)
    if weights:
        from .weights import load_caffemodel

        load_caffemodel(net, weights)
    net.train(phase == "TRAIN")
    return net


@dataclasses.dataclass
class OrtTiming:
    iterations: int
    batch: int
    latency_ms: float  # median
    throughput: float  # images/s at the median latency
    providers: list
    threads: int = 0
    min_ms: float = float("nan")

    def format(self) -> str:
        threads = f", {self.threads} intra-op threads" if self.threads and "CPU" in self.providers[0] else ""
        return (f"onnxruntime ({self.providers[0]}{threads}): batch {self.batch}, {self.iterations} iterations\n"
                f"Latency: median {self.latency_ms:.4g} ms, min {self.min_ms:.4g} ms\n"
                f"Throughput: {self.throughput:.4g} images/s")


def time_onnxruntime(model_path: str, iterations: int = 50, *, batch=None, device=None,
                     threads: Optional[int] = None) -> OrtTiming:
    """Median latency of ``iterations`` runs of an .onnx model (after one untimed run) on random inputs."""
    from .errors import ResnetcError
    from .export import InferenceSession

    sess = InferenceSession(model_path, device=device, threads=threads)
    rng = np.random.RandomState(0)
    feeds = {}
    nb = 1
    for name in sess.inputs:
        shape = list(sess.input_shapes[name])
        if shape and batch is not None:
            if isinstance(shape[0], int) and shape[0] != batch:
                raise ResnetcError(f"the model's input '{name}' has a fixed batch of {shape[0]}, not {batch} (export "
                                   f"it with --batch dynamic)", file=os.fspath(model_path))
            shape[0] = batch
        if any(not isinstance(d, int) for d in shape[1:]):
            raise ResnetcError(f"input '{name}' has symbolic dimensions {shape}: cannot make a random input",
                               file=os.fspath(model_path))
        shape = [d if isinstance(d, int) else 1 for d in shape]
        nb = shape[0] if shape else 1
        feeds[name] = rng.rand(*shape).astype(np.float32)
    sess(**feeds)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        sess(**feeds)
        times.append((time.perf_counter() - t) * 1000.0)
    lat = float(np.median(times))
    return OrtTiming(iterations, nb, lat, 1000.0 * nb / lat, sess.providers, sess.threads, float(min(times)))


def time_onnxruntime_for_net(net_path, weights=None, iterations=50, *, batch=None, device=None, fold_bn=False,
                             input_shapes=None, threads: Optional[int] = None) -> OrtTiming:
    """Export the deploy form of ``net_path`` (verified, to a temporary file), then time it; the batch is the
    spec's unless ``batch`` is given."""
    from .export import export_onnx, prepare_deploy_net

    net, _ = prepare_deploy_net(net_path, weights, batch=batch, input_shapes=input_shapes, fold_bn=fold_bn)
    if batch is None and net.inputs:
        batch = int(net.graph.shape(net.inputs[0])[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(net, path)
        return time_onnxruntime(path, iterations, batch=batch, device=device, threads=threads)
