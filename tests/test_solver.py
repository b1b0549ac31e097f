"""Solver parity with real BVLC Caffe (../shared/oracle/solver): every run's per-iteration loss, lr, test
outputs, clip logs and final weights; plus lr policies, number formatting, fine-tuning and frozen params."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ORACLE, shared_available

SOLVER_DIR = os.path.join(ORACLE, "solver")
RUNS = sorted(json.load(open(os.path.join(SOLVER_DIR, "trajectories.json")))) if shared_available() else []


def _traj():
    with open(os.path.join(SOLVER_DIR, "trajectories.json")) as f:
        return json.load(f)


def _have_layers(*types) -> bool:
    from resnetc.layers import registry

    return all(registry.get(t) is not None for t in types)


needs_net_layers = pytest.mark.skipif(
    not _have_layers("Convolution", "Pooling", "InnerProduct", "ReLU", "SoftmaxWithLoss", "Accuracy", "Data"),
    reason="the TinyLeNet layers (Convolution/Pooling/InnerProduct) are not registered yet")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch copy of oracle/solver with the LMDBs made by the oracle's own make_lmdb.py."""
    if not shared_available():
        pytest.skip("../shared absent")
    d = tmp_path_factory.mktemp("solver")
    for f in os.listdir(SOLVER_DIR):
        if f.endswith((".prototxt", ".caffemodel")):
            shutil.copy(os.path.join(SOLVER_DIR, f), d)
    subprocess.run([sys.executable, os.path.join(ORACLE, "scripts", "make_lmdb.py"), "."], cwd=d, check=True,
                   capture_output=True)
    (d / "out").mkdir()
    return d


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(workdir, run, monkeypatch, **overrides):
    from resnetc.prototxt import read_solver
    from resnetc.solver import Solver

    monkeypatch.chdir(workdir)
    param = read_solver(f"solver_{run}.prototxt")
    for k, v in overrides.items():
        setattr(param, k, v)
    h = _Lines()
    lg = logging.getLogger("resnetc.solver")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.INFO)
    try:
        s = Solver(param, solver_file=f"solver_{run}.prototxt", weights=["init.caffemodel"])
        s.solve()
        s.close()
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    return s, h.lines


# ---------------------------------------------------------------------------------------------------------
# independent of the layer library


@pytest.mark.parametrize("run", RUNS)
def test_lr_policy_matches_caffe(run, oracle):
    """The rate Caffe logged for every one of the 60 updates (step/inv/poly policies)."""
    from resnetc.prototxt import read_solver
    from resnetc.solver.lr_policy import learning_rate
    from resnetc.solver.numfmt import g

    param = read_solver(os.path.join(SOLVER_DIR, f"solver_{run}.prototxt"))
    step = 0
    for it in _traj()[run]["iters"]:
        rate, step, _ = learning_rate(param, it["iter"], step)
        assert g(rate) == g(it["lr"]), (run, it["iter"])


def test_lr_policies_formulas():
    from resnetc.proto import caffe_pb2
    from resnetc.solver.lr_policy import learning_rate

    p = caffe_pb2.SolverParameter(base_lr=0.1, gamma=0.5, stepsize=10, power=2, max_iter=100)
    p.lr_policy = "multistep"
    p.stepvalue.extend([2, 3])
    # an `if`, not a `while`: at iteration 5 it steps once per call
    steps = []
    cs = 0
    for it in (5, 5, 5):
        _, cs, _ = learning_rate(p, it, cs)
        steps.append(cs)
    assert steps == [1, 2, 2]
    p.lr_policy = "exp"
    assert learning_rate(p, 3, 0)[0] == np.float32(0.1 * 0.125)
    p.lr_policy = "sigmoid"
    assert abs(learning_rate(p, 10, 0)[0] - 0.05) < 1e-8
    p.lr_policy = "poly"
    assert abs(learning_rate(p, 50, 0)[0] - 0.025) < 1e-8


def test_number_format_like_cpp_streams():
    from resnetc.solver.numfmt import g

    assert [g(0.09375), g(2.3362434), g(1e-5), g(1.0), g(100000), g(1234567), g(float("inf"))] == \
        ["0.09375", "2.33624", "1e-05", "1", "100000", "1.23457e+06", "inf"]


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "Adam", "AdaGrad", "AdaDelta", "RMSProp"])
def test_first_step_formulas(kind, oracle):
    """Step 1 of each rule from init.caffemodel + Caffe's raw gradient (grad_iter0.npz), against the
    formulas written out in float64 (oracle README)."""
    import torch

    from resnetc.proto import caffe_pb2
    from resnetc.solver.rules import RULES
    from resnetc.weights import read_caffemodel

    z = np.load(os.path.join(SOLVER_DIR, "grad_iter0.npz"))
    wf = read_caffemodel(os.path.join(SOLVER_DIR, "init.caffemodel"))
    init = {l.name: l for l in wf.layers}
    p = caffe_pb2.SolverParameter(type=kind, base_lr=0.01, momentum=0.9 if kind in ("SGD", "Nesterov", "Adam")
                                  else (0.95 if kind == "AdaDelta" else 0), delta=1e-6 if kind == "AdaDelta" else 1e-8)
    lr, wd = 0.01, 5e-4
    keys = [k for k in z.files if k.startswith("param_diff/")]
    params = [torch.from_numpy(z[k].astype(np.float32)) for k in keys]
    rule = RULES[kind](p, params)
    for i, k in enumerate(keys):
        _, layer, bi = k.split("/")
        w = np.asarray(init[layer].blobs[int(bi)].data, np.float64).reshape(z[k].shape)
        gr = z[k].astype(np.float64) + wd * w
        got = rule.step(i, torch.from_numpy(gr.astype(np.float32)), lr, 0).numpy()
        m, d = p.momentum, p.delta
        if kind == "SGD":
            want = lr * gr
        elif kind == "Nesterov":
            want = (1 + m) * lr * gr
        elif kind == "Adam":
            mh, vh = (1 - m) * gr, (1 - 0.999) * gr * gr
            want = lr * np.sqrt(1 - 0.999) / (1 - m) * mh / (np.sqrt(vh) + d)
        elif kind == "AdaGrad":
            want = lr * gr / (np.sqrt(gr * gr) + d)
        elif kind == "RMSProp":
            want = lr * gr / (np.sqrt((1 - 0.99) * gr * gr) + d)
        else:
            hg = (1 - m) * gr * gr
            u = gr * np.sqrt(d / (hg + d))
            want = lr * u
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-8, err_msg=f"{kind} {k}")


def test_bad_solvers_fail_before_training(tmp_path):
    from resnetc.errors import ResnetcError
    from resnetc.prototxt import parse_solver_text
    from resnetc.solver import Solver

    net = tmp_path / "n.prototxt"
    net.write_text('name: "x" layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }\n')
    cases = {
        'base_lr: 0.1 lr_policy: "fixed"': "names no net",
        f'net: "{net}" base_lr: 0.1 lr_policy: "nope"': "unknown lr_policy 'nope'",
        f'net: "{net}" base_lr: 0.1': "no lr_policy",
        f'net: "{net}" lr_policy: "fixed" type: "Lion"': "unknown solver type 'Lion'",
        f'net: "{net}" lr_policy: "fixed" test_iter: -1 test_interval: 1': "test_iter #0 must be > 0",
        f'train_net: "{net}" test_net: "{net}" lr_policy: "fixed" test_interval: 1': "1 test nets but 0 test_iter",
        f'net: "{net}" lr_policy: "fixed" test_iter: 2': "no test_interval",
        f'net: "{net}" lr_policy: "fixed" type: "AdaGrad" momentum: 0.9': "AdaGrad has no momentum",
        f'net: "{net}" lr_policy: "step" stepsize: 0': "stepsize > 0",
    }
    for text, msg in cases.items():
        with pytest.raises(ResnetcError, match=re.escape(msg)):
            Solver(parse_solver_text(text, "s.prototxt"), solver_file=None)


# ---------------------------------------------------------------------------------------------------------
# full runs against real Caffe


@needs_net_layers
@pytest.mark.parametrize("run", RUNS)
def test_trajectory_matches_caffe(run, workdir, monkeypatch):
    from resnetc.weights import read_caffemodel

    ref = _traj()[run]
    s, lines = _train(workdir, run, monkeypatch, snapshot_prefix=str(workdir / "out" / run))
    disp = {}
    for ln in lines:
        m = re.match(r"Iteration (\d+) \(.*\), loss = (\S+)$", ln)
        if m:
            disp[int(m.group(1))] = float(m.group(2))
    lrs = {int(m.group(1)): float(m.group(2)) for m in (re.match(r"Iteration (\d+), lr = (\S+)$", ln) for ln in lines)
           if m}
    for it in ref["iters"]:
        i = it["iter"]
        assert abs(disp[i] - it["loss"]) <= 1e-4 * abs(it["loss"]) + 5e-6, (run, i, disp[i], it["loss"])
        assert lrs[i] == pytest.approx(it["lr"], rel=1e-6), (run, i)
    final = [ln for ln in lines if re.match(r"Iteration 60, loss = ", ln)]
    assert final and float(final[0].split("= ")[1]) == pytest.approx(ref["final_loss"]["loss"], rel=1e-4)
    # test outputs at 0/20/40/60
    tests = [ln for ln in lines if "Test net output" in ln]
    acc = [float(ln.split("= ")[1]) for ln in tests if "accuracy" in ln]
    assert acc == pytest.approx([t["accuracy"] for t in ref["tests"]], abs=1e-6)
    tl = [float(ln.split("= ")[1].split()[0]) for ln in tests if ": loss = " in ln]
    assert tl == pytest.approx([t["loss"] for t in ref["tests"]], rel=1e-4)
    assert all(ln.endswith("loss)") for ln in tests if ": loss = " in ln)
    clips = [ln for ln in lines if ln.startswith("Gradient clipping")]
    assert len(clips) == len(ref["clip"])
    for ln, c in zip(clips, ref["clip"]):
        l2 = float(re.search(r"L2 norm (\S+) >", ln).group(1))
        assert l2 == pytest.approx(c["l2norm"], rel=1e-4)
    # final weights vs Caffe's snapshot
    mine = read_caffemodel(str(workdir / "out" / f"{run}_iter_60.caffemodel"))
    theirs = read_caffemodel(os.path.join(SOLVER_DIR, "final", f"{run}_iter_60.caffemodel"))
    a = {l.name: l for l in mine.layers}
    for layer in theirs.layers:
        for j, b in enumerate(layer.blobs):
            want = np.asarray(b.data, np.float32)
            got = np.asarray(a[layer.name].blobs[j].data, np.float32)
            np.testing.assert_allclose(got.reshape(-1), want.reshape(-1), rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                       err_msg=f"{run} {layer.name}/{j}")


@needs_net_layers
def test_exact_losses_iter_size_1(workdir, monkeypatch):
    """The float32 loss of each iteration (pycaffe replay) for the sgd run, to 1e-4 relative."""
    ref = _traj()["sgd"]
    s, lines = _train(workdir, "sgd", monkeypatch, snapshot_prefix=str(workdir / "out" / "x"))
    disp = [float(m.group(1)) for m in (re.match(r"    Train net output #0: loss = (\S+)", ln) for ln in lines) if m]
    np.testing.assert_allclose(disp, ref["exact_loss"], rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# the whole loop on a net made of layers that need no vision kernels (PReLU + EuclideanLoss)

_TINY = '''name: "tiny"
layer { name: "in" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 3 } } }
layer { name: "p1" type: "PReLU" bottom: "data" top: "p1" param { lr_mult: %s } }
layer { name: "p2" type: "PReLU" bottom: "p1" top: "p2" }
layer { name: "loss" type: "EuclideanLoss" bottom: "p2" bottom: "target" top: "loss" }
'''


def _tiny_solver(tmp_path, text, lr_mult="1", **kw):
    import torch

    from resnetc.prototxt import parse_solver_text
    from resnetc.solver import Solver

    net = tmp_path / "tiny.prototxt"
    net.write_text(_TINY % lr_mult)
    rs = np.random.RandomState(0)
    batches = [{"data": torch.from_numpy(rs.randn(8, 3).astype(np.float32)),
                "target": torch.from_numpy(rs.randn(8, 3).astype(np.float32))} for _ in range(4)]

    def factory(graph, phase, index, seed, device):
        it = iter(range(10 ** 9))
        return lambda: batches[next(it) % len(batches)]

    param = parse_solver_text(f'net: "{net}" snapshot_prefix: "{tmp_path}/snap" ' + text, "s.prototxt")
    return Solver(param, feed_factory=factory, **kw)


def test_frozen_params_and_resume_bit_identical(tmp_path):
    import torch

    text = 'type: "Adam" base_lr: 0.05 momentum: 0.9 lr_policy: "step" gamma: 0.5 stepsize: 3 weight_decay: 0.01 ' \
           'max_iter: 8 snapshot: 4 display: 1'
    a = _tiny_solver(tmp_path, text, lr_mult="0")
    frozen = a.net.params["p1"][0].detach().clone()
    a.solve()
    assert torch.equal(a.net.params["p1"][0], frozen)  # lr_mult 0: bit-identical
    assert not torch.equal(a.net.params["p2"][0], frozen)
    assert os.path.exists(tmp_path / "snap_iter_4.solverstate") and os.path.exists(tmp_path / "snap_iter_8.caffemodel")
    b = _tiny_solver(tmp_path, text, lr_mult="0")
    b.solve(str(tmp_path / "snap_iter_4.solverstate"))
    assert b.iter == 8
    assert torch.equal(b.net.params["p2"][0], a.net.params["p2"][0])
    for x, y in zip(a.rule.history, b.rule.history):
        assert torch.equal(x, y)


def test_divergence_is_one_clear_error(tmp_path):
    from resnetc.errors import ResnetcError

    s = _tiny_solver(tmp_path, 'base_lr: 1e30 lr_policy: "fixed" max_iter: 50 snapshot: 1 momentum: 0.9')
    with pytest.raises(ResnetcError, match=r"training diverged at iteration \d+: loss = (nan|inf).*last finite loss"):
        s.solve()
    left = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert not left


def test_clip_and_iter_size_order(tmp_path):
    """clip sees the summed sub-batch gradient, then ÷ iter_size (Caffe's order)."""
    import torch

    s = _tiny_solver(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" max_iter: 1 iter_size: 2 clip_gradients: 1e-3 '
                               'snapshot_after_train: false')
    w0 = s.net.params["p2"][0].detach().clone()
    s.solve()
    step = (w0 - s.net.params["p2"][0]).norm().item()
    # the global norm after clipping is 1e-3 (over both params), halved by iter_size, times lr 0.1
    assert step <= 0.1 * 1e-3 / 2 * 1.0001
