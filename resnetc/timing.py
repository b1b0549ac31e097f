"""`caffe time` for resnetc: average forward, backward and forward-backward per layer and in total (torch),
and latency / throughput in onnxruntime."""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time

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
    forward_ms: float
    backward_ms: float
    fwd_bwd_ms: float
    per_iteration_ms: list
    layers: list

    def format(self) -> str:
        lines = ["Average time per layer: "]
        for l in self.layers:
            lines.append(f"{l.name:>10}\tforward: {l.forward_ms:.5g} ms.")
            lines.append(f"{l.name:>10}\tbackward: {l.backward_ms:.5g} ms.")
        lines += [f"Average Forward pass: {self.forward_ms:.5g} ms.",
                  f"Average Backward pass: {self.backward_ms:.5g} ms.",
                  f"Average Forward-Backward: {self.fwd_bwd_ms:.5g} ms.",
                  f"Total Time: {sum(self.per_iteration_ms):.5g} ms.",
                  f"Throughput: {1000.0 * self.batch / self.fwd_bwd_ms:.4g} images/s (forward-backward, batch "
                  f"{self.batch})"]
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


def time_torch(net, iterations: int = 50, *, device=None, batch=None) -> TorchTiming:
    """Caffe's `time`: per iteration, every layer's forward (in order) then every layer's backward (in reverse
    order), timed one by one; plus the whole forward-backward as autograd runs it."""
    feeds = _random_inputs(net, device, batch)
    plan = list(net._plan)
    layers = [l for l in net.graph.layers if l.name in net._module_keys]
    fwd = np.zeros(len(plan))
    bwd = np.zeros(len(plan))
    per_iter = []
    nbatch = next(iter(feeds.values())).shape[0] if feeds else 1
    for it in range(iterations + 1):  # iteration 0 warms up (not counted; Caffe counts its cold one)
        t_iter = time.perf_counter()
        env = {k: v.requires_grad_(v.is_floating_point()) for k, v in feeds.items()}
        tops_of = []
        for i, (mod, bottoms, tops, detach) in enumerate(plan):
            args = [env[b] for b in bottoms]
            _sync(device)
            t = time.perf_counter()
            out = mod(*args)
            _sync(device)
            if it:
                fwd[i] += time.perf_counter() - t
            outs = [out] if len(tops) == 1 and not isinstance(out, (tuple, list)) else list(out)
            for name, v in zip(tops, outs):
                env[name] = v
            tops_of.append(outs)
        # backward, layer by layer in reverse: re-run the layer on detached inputs and backprop a random diff
        for i in range(len(plan) - 1, -1, -1):
            mod, bottoms, tops, _ = plan[i]
            args = [env[b].detach().requires_grad_(env[b].is_floating_point()) for b in bottoms]
            out = mod(*args)
            outs = [out] if not isinstance(out, (tuple, list)) else list(out)
            ys = [o for o in outs if torch.is_tensor(o) and o.requires_grad]
            if not ys:
                continue
            grads = [torch.ones_like(o) for o in ys]
            _sync(device)
            t = time.perf_counter()
            torch.autograd.backward(ys, grads)
            _sync(device)
            if it:
                bwd[i] += time.perf_counter() - t
        if it:
            per_iter.append((time.perf_counter() - t_iter) * 1000.0)
    # whole forward-backward, as training runs it
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
    n = float(iterations)
    rows = [LayerTime(l.name, l.type, fwd[i] * 1000 / n, bwd[i] * 1000 / n) for i, l in enumerate(layers)]
    return TorchTiming(iterations, nbatch, float(fwd.sum() * 1000 / n), float(bwd.sum() * 1000 / n),
                       float(np.median(fb)), per_iter, rows)


@dataclasses.dataclass
class OrtTiming:
    iterations: int
    batch: int
    latency_ms: float
    throughput: float
    providers: list

    def format(self) -> str:
        return (f"onnxruntime ({self.providers[0]}): batch {self.batch}, median latency {self.latency_ms:.4g} ms over "
                f"{self.iterations} iterations, throughput {self.throughput:.4g} images/s")


def time_onnxruntime(model_path: str, iterations: int = 50, *, batch=None, device=None) -> OrtTiming:
    from .export import InferenceSession

    sess = InferenceSession(model_path, device=device)
    rng = np.random.RandomState(0)
    feeds = {}
    nb = 1
    for name in sess.inputs:
        shape = [d if isinstance(d, int) else (batch or 1) for d in sess.input_shapes[name]]
        if batch is not None and shape:
            shape[0] = batch
        nb = shape[0] if shape else 1
        feeds[name] = rng.rand(*shape).astype(np.float32)
    sess(**feeds)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        sess(**feeds)
        times.append((time.perf_counter() - t) * 1000.0)
    lat = float(np.median(times))
    return OrtTiming(iterations, nb, lat, 1000.0 * nb / lat, sess.providers)


def time_onnxruntime_for_net(net_path, weights=None, iterations=50, *, batch=None, device=None, fold_bn=False,
                             input_shapes=None) -> OrtTiming:
    from .export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(net_path, path, weights=weights, fold_bn=fold_bn, input_shapes=input_shapes)
        return time_onnxruntime(path, iterations, batch=batch, device=device)
