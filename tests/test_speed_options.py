"""The Solver's speed options (resnetc.solver.speed: amp bf16/fp16, channels_last, torch.compile) keep a short
training run within tolerance of the float32 eager run, on the CPU, for a small conv + BatchNorm net.

Compared: the loss of every iteration, the trained weights (as the relative error of the whole update
``w_final - w_init``) and BatchNorm's running statistics. The tolerances are checked to be meaningful: a float32
run whose learning rate is 10 % off fails them.
"""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

NET = '''name: "cbn"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } shape { dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "sc2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
'''

# the smallest net for torch.compile (its CPU backend compiles C++ per kernel: each layer costs seconds)
NET_COMPILE = '''name: "cbn_small"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
'''

# tolerances: loss of every iteration (relative), whole update (relative L2), BatchNorm statistics (relative max)
EXACT = {"loss": 1e-5, "update": 1e-5, "stats": 1e-5}  # float32 arithmetic in another order
FP16 = {"loss": 3e-3, "update": 5e-3, "stats": 3e-3}  # 11 significant bits (measured: 4e-4, 7e-4, 2e-4)
BF16 = {"loss": 1e-2, "update": 4e-2, "stats": 1e-2}  # 8 significant bits (measured: 3e-3, 1.1e-2, 1.8e-3)

SOLVER = ('type: "SGD" base_lr: {lr} momentum: 0.9 weight_decay: 1e-4 lr_policy: "fixed" max_iter: {iters} '
          'random_seed: 5 snapshot_after_train: false ')


def _batches(n, c, hw, classes, count=3):
    """Learnable batches: the class shows as a brighter input channel."""
    rs = np.random.RandomState(0)
    out = []
    for _ in range(count):
        label = rs.randint(0, classes, n)
        x = rs.randn(n, c, hw, hw).astype(np.float32)
        x[np.arange(n), label % c] += 1.5
        out.append({"data": torch.from_numpy(x), "label": torch.from_numpy(label.astype(np.float32))})
    return out


def _train(tmp_path, speed="", *, lr=0.1, iters=6, net=NET, batches=None, before_solve=None):
    """Train in this process; returns (losses per iteration, initial and final params, the solver)."""
    from resnetc.prototxt import parse_solver_text
    from resnetc.solver import Solver

    class Recording(Solver):
        losses: list

        def _forward_backward(self):
            loss = super()._forward_backward()
            self.losses.append(loss)
            return loss

    path = tmp_path / "net.prototxt"
    path.write_text(net)
    batches = batches or _batches(8, 3, 8, 4)

    def factory(graph, phase, index, seed, device):
        it = iter(range(10 ** 9))
        return lambda: batches[next(it) % len(batches)]

    text = f'net: "{path}" ' + SOLVER.format(lr=lr, iters=iters) + (f"resnetc {{ {speed} }}" if speed else "")
    s = Recording(parse_solver_text(text, "s.prototxt"), feed_factory=factory)
    s.losses = []
    init = _params(s)
    if before_solve:
        before_solve(s)
    s.solve()
    return np.array(s.losses), init, _params(s), s


def _params(s) -> dict:
    return {f"{name}/{j}": p.detach().to(torch.float32).contiguous().clone()
            for name, ps in s.net.params.items() for j, p in enumerate(ps)}


def _stat_keys(s) -> set:
    """BatchNorm's three blobs (mean, variance, scale factor): statistics, not trained weights."""
    return {f"{layer.name}/{j}" for layer in s.net.graph.layers if layer.type == "BatchNorm" for j in range(3)}


def _update_error(ref, run) -> float:
    """|Δ_run − Δ_ref| / |Δ_ref| over all trained weights together (Δ = final − initial)."""
    (_, init, final, s), (_, _, final2, _) = ref, run
    keys = sorted(set(init) - _stat_keys(s))
    d_ref = torch.cat([(final[k] - init[k]).reshape(-1) for k in keys])
    d_run = torch.cat([(final2[k] - init[k]).reshape(-1) for k in keys])
    return float((d_run - d_ref).norm() / d_ref.norm())


def _stats_error(ref, run) -> float:
    (_, _, final, s), (_, _, final2, _) = ref, run
    return max(float((final2[k] - final[k]).abs().max() / final[k].abs().max().clamp_min(1e-12))
               for k in _stat_keys(s))


def _loss_error(ref, run) -> float:
    return float(np.max(np.abs(run[0] - ref[0]) / np.abs(ref[0])))


def _errors(ref, run) -> dict:
    return {"loss": _loss_error(ref, run), "update": _update_error(ref, run), "stats": _stats_error(ref, run)}


def _within(ref, run, tol: dict) -> None:
    err = _errors(ref, run)
    assert all(err[k] < tol[k] for k in tol), f"errors {err} exceed {tol}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("fp32"))


def test_reference_run_learns_and_tolerances_are_meaningful(reference, tmp_path):
    losses, init, final, s = reference
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert losses[-3:].mean() < losses[:3].mean()  # training does something the options must reproduce
    assert s.iter == 6 and not s.speed.enabled
    # a float32 run with a 10 % different learning rate is outside every tolerance used below, even bf16's
    # (measured: loss 2.9e-2, update 8.5e-2, statistics 3.0e-2)
    err = _errors(reference, _train(tmp_path, lr=0.11))
    assert all(err[k] > BF16[k] for k in BF16), err


def test_channels_last_matches_float32(reference, tmp_path):
    run = _train(tmp_path, "channels_last: true")
    s = run[3]
    assert s.speed.channels_last
    assert s.net.params["conv1"][0].is_contiguous(memory_format=torch.channels_last)
    _within(reference, run, EXACT)  # the same float32 arithmetic in another memory order


def test_amp_bf16_matches_float32_loosely(reference, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="resnetc.solver"):
        run = _train(tmp_path, 'amp: "bf16"')
    assert "Speed options: amp=bf16" in caplog.text
    s = run[3]
    assert all(p.dtype == torch.float32 for p in s.net.parameters())  # weights and the update stay float32
    _within(reference, run, BF16)


def test_amp_fp16_matches_float32(reference, tmp_path, caplog):
    """fp16 with loss scaling. The default initial scale (2^16) overflows on the first iteration of this net
    (see the next test); starting at 2^8 no update is skipped, so the runs compare step by step."""
    def low_scale(s):
        s.speed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    with caplog.at_level(logging.INFO, logger="resnetc.solver"):
        run = _train(tmp_path, 'amp: "fp16"', before_solve=low_scale)
    assert "update skipped" not in caplog.text
    assert all(p.dtype == torch.float32 for p in run[3].net.parameters())
    _within(reference, run, FP16)


def test_amp_fp16_overflow_skips_the_update_but_counts_the_iteration(tmp_path, caplog):
    seen = {}

    def watch(s):
        apply = s.apply_update

        def recording(display=False):
            seen.setdefault("first_update_at", s.iter)
            apply(display)

        s.apply_update = recording

    with caplog.at_level(logging.WARNING, logger="resnetc.solver"):
        losses, init, final, s = _train(tmp_path, 'amp: "fp16"', iters=1, before_solve=watch)
    assert "fp16 gradients overflowed at loss scale 65536: update skipped, loss scale now 32768" in caplog.text
    assert s.iter == 1 and "first_update_at" not in seen
    for k in init:
        assert torch.equal(final[k], init[k]) or k.startswith("bn"), k  # only BatchNorm's statistics moved
    assert all(torch.count_nonzero(h) == 0 for h in s.rule.history)  # momentum untouched


def _compile_unavailable() -> str:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python"
    except Exception as e:  # pragma: no cover - depends on the installation
        return f"torch._dynamo cannot be imported: {e}"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler on this machine: torch.compile's CPU backend (inductor) needs one"
    return ""


def test_compile_matches_float32(tmp_path, monkeypatch):
    why = _compile_unavailable()
    if why:
        pytest.skip(why)
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no pool of compiler processes on 2 cores
    batches = _batches(4, 3, 6, 3, count=2)
    ref = _train(tmp_path, net=NET_COMPILE, batches=batches, iters=3)
    try:
        run = _train(tmp_path, "compile: true", net=NET_COMPILE, batches=batches, iters=3)
    except Exception as e:  # the C++ toolchain is there but cannot build inductor's kernels here
        if "Compiler" in type(e).__name__ or "CppCompileError" in repr(e):
            pytest.skip(f"torch.compile cannot build its CPU kernels here: {str(e).splitlines()[0][:200]}")
        raise
    assert run[3].speed.compile
    _within(ref, run, EXACT)
