"""``resnetc train`` end to end, as a user runs it (the installed CLI in a subprocess), on a tiny LMDB-fed net
the tests make themselves: resume after SIGKILL, fine-tuning, frozen layers, one-line errors, divergence and
early stopping. Plus the early-stopping rule itself (resnetc.solver.early_stop) at the Python level."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import resnetc_cmd

N_TRAIN, N_TEST, BATCH = 12, 8, 4  # 3 train batches per epoch; a test pass of 2 batches reads the whole test set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/test LMDBs of 1x8x8 uint8 images, 3 classes, each class a bright horizontal bar (easy to learn)."""
    from resnetc.data.datum import array_to_datum
    from resnetc.data.db import write_db

    d = tmp_path_factory.mktemp("lmdb")
    rs = np.random.RandomState(0)
    for name, n in (("train_lmdb", N_TRAIN), ("test_lmdb", N_TEST)):
        with write_db(str(d / name)) as w:
            for i in range(n):
                label = i % 3
                img = rs.randint(0, 64, (1, 8, 8)).astype(np.uint8)
                img[0, 2 * label:2 * label + 2, :] += 150
                w.put(f"{i:08d}", array_to_datum(img, label).SerializeToString())
    return d


def _data_layer(data, phase):
    lmdb = "train_lmdb" if phase == "TRAIN" else "test_lmdb"
    return f'''layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: {phase} }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{data}/{lmdb}" backend: LMDB batch_size: {BATCH} }} }}
'''


def _net(data, *, ip2="ip2", conv_lr=None):
    """conv1 4@3x3 → ReLU → MAX 2/2 → ip1 8 → ReLU → ip2 3 → SoftmaxWithLoss (+ Accuracy in TEST)."""
    conv_params = f"param {{ lr_mult: {conv_lr} }} param {{ lr_mult: {conv_lr} }}" if conv_lr is not None else ""
    return f'''name: "tiny"
{_data_layer(data, "TRAIN")}{_data_layer(data, "TEST")}layer {{ name: "conv1" type: "Convolution" bottom: "data"
  top: "conv1" {conv_params}
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  inner_product_param {{ num_output: 8 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "{ip2}" type: "InnerProduct" bottom: "ip1" top: "{ip2}"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "{ip2}" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{ip2}" bottom: "label" top: "loss" }}
'''


SOLVER = '''net: "net.prototxt"
test_iter: 2 test_interval: 3
type: "SGD" base_lr: 0.05 momentum: 0.9 weight_decay: 0.0005 lr_policy: "step" gamma: 0.5 stepsize: 4
display: 1 max_iter: {max_iter} snapshot: {snapshot} snapshot_prefix: "snap/run" random_seed: {seed}
'''


def _setup(d, data, max_iter=9, snapshot=3, seed=7, **net_kw):
    d.mkdir(parents=True, exist_ok=True)
    (d / "snap").mkdir(exist_ok=True)
    (d / "net.prototxt").write_text(_net(data, **net_kw))
    (d / "solver.prototxt").write_text(SOLVER.format(max_iter=max_iter, snapshot=snapshot, seed=seed))
    return d


def _ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def _displayed(log: str) -> dict:
    """{iteration: loss text} of the `Iteration N (...), loss = X` lines and the final `Iteration N, loss = X`."""
    out = {}
    for m in re.finditer(r"\] Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)$", log, re.M):
        out[int(m.group(1))] = m.group(2)
    return out


def _tests(log: str) -> list:
    return re.findall(r"\] Iteration (\d+), Testing net \(#0\)\n(?:.*\n)*?.*Test net output #0: accuracy = (\S+)\n"
                      r".*Test net output #1: loss = (\S+)", log)


def _arrays(path) -> dict:
    from resnetc.weights import read_caffemodel

    return {(layer.name, j): np.asarray(b.data, np.float32).copy()
            for layer in read_caffemodel(str(path)).layers for j, b in enumerate(layer.blobs)}


def _snapshots(d) -> list:
    return sorted(f for f in os.listdir(d) if "_iter_" in f or f.endswith(".tmp"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run: 9 iterations, snapshots at 3, 6, 9. Returns (directory, log)."""
    d = _setup(tmp_path_factory.mktemp("reference"), data)
    r = subprocess.run(resnetc_cmd() + ["train", "solver.prototxt"], cwd=d, capture_output=True, text=True,
                       timeout=300)
    return d, _ok(r)


# ---------------------------------------------------------------------------------------------------------
# resume


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, data, reference, run_cli):
    full, ref = reference
    killed = _setup(tmp_path / "killed", data)

    # the same run with a huge max_iter (the step policy does not depend on it), killed once iter 3 is saved
    state3 = killed / "snap" / "run_iter_3.solverstate"
    with open(tmp_path / "killed.log", "w") as err:
        p = subprocess.Popen(resnetc_cmd() + ["train", "solver.prototxt", "--iterations", "1000000"], cwd=killed,
                             stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not state3.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert state3.exists(), (tmp_path / "killed.log").read_text()[-2000:]
            os.kill(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    for f in os.listdir(killed / "snap"):  # keep only iteration 3: every later file must come from the resume
        if not f.startswith("run_iter_3."):
            os.remove(killed / "snap" / f)

    log = _ok(run_cli("train", "solver.prototxt", "--snapshot", "snap/run_iter_3.solverstate", cwd=killed))
    assert "Resuming from snap/run_iter_3.solverstate" in log
    assert "SGDSolver: restoring history" in log
    want = {i: v for i, v in _displayed(ref).items() if i >= 3}
    got = _displayed(log)
    assert sorted(got) == list(range(3, 10)) and got == want
    lr = r"\] Iteration (\d+), lr = (\S+)"
    assert re.findall(lr, log) == [x for x in re.findall(lr, ref) if int(x[0]) >= 3]
    assert _tests(log) == [t for t in _tests(ref) if int(t[0]) >= 3] and len(_tests(log)) == 3
    # bit for bit: the weights and the solver state after iterations 6 and 9
    for name in ("run_iter_6.caffemodel", "run_iter_6.solverstate", "run_iter_9.caffemodel",
                 "run_iter_9.solverstate"):
        assert (killed / "snap" / name).read_bytes() == (full / "snap" / name).read_bytes(), name
    assert _snapshots(killed / "snap") == _snapshots(full / "snap")


# ---------------------------------------------------------------------------------------------------------
# fine-tuning and frozen layers


@pytest.fixture(scope="module")
def trained(reference):
    """A.caffemodel: the tiny net after 6 iterations (the reference run's snapshot)."""
    return reference[0] / "snap" / "run_iter_6.caffemodel"


def _filler_values(d, monkeypatch) -> dict:
    """The train net's initial values for the solver in ``d`` (built in this process, same random_seed)."""
    from resnetc.solver import Solver

    monkeypatch.chdir(d)
    s = Solver("solver.prototxt")
    try:
        return {(name, j): p.detach().numpy().reshape(-1).copy()
                for name, ps in s.net.params.items() for j, p in enumerate(ps)}
    finally:
        s.close()


def test_finetune_renamed_classifier_is_reinitialised_only(tmp_path, data, trained, run_cli, monkeypatch):
    a = _arrays(trained)
    # iteration 0 of the fine-tune net (ip2 renamed ip2new) with --weights; and without, same random_seed
    ft = _setup(tmp_path / "ft", data, max_iter=0, snapshot=0, seed=3, ip2="ip2new")
    log = _ok(run_cli("-v", "train", "solver.prototxt", "--weights", trained, cwd=ft))
    init = _filler_values(ft, monkeypatch)
    assert f"Finetuning from {trained}" in log
    assert "Ignoring source layer ip2\n" in log
    assert re.search(r"1 layer\(s\) with parameters are not in .* keep their initial \(filler\) values: ip2new", log)
    assert re.search(r"Copied weights of 2 layer\(s\) from ", log)  # conv1, ip1 (the parameter-free ones add 0)
    b0 = _arrays(ft / "snap" / "run_iter_0.caffemodel")
    for key in [("conv1", 0), ("conv1", 1), ("ip1", 0), ("ip1", 1)]:
        assert np.array_equal(b0[key], a[key]), key  # copied from A
    for j in (0, 1):
        assert np.array_equal(b0[("ip2new", j)], init[("ip2new", j)])  # exactly the filler's values
    assert not np.array_equal(b0[("ip2new", 0)], a[("ip2", 0)])
    assert not np.array_equal(init[("conv1", 0)], a[("conv1", 0)])  # (so the copies above mean something)


def test_lr_mult_zero_layers_are_bit_identical_after_training(tmp_path, data, trained, run_cli):
    d = _setup(tmp_path / "frozen", data, max_iter=6, snapshot=0, seed=3, ip2="ip2new", conv_lr=0)
    log = _ok(run_cli("train", "solver.prototxt", "--weights", trained, cwd=d))
    assert "Iteration 5, lr = " in log
    a, b = _arrays(trained), _arrays(d / "snap" / "run_iter_6.caffemodel")
    assert np.array_equal(a[("conv1", 0)].view(np.uint32), b[("conv1", 0)].view(np.uint32))
    assert np.array_equal(a[("conv1", 1)].view(np.uint32), b[("conv1", 1)].view(np.uint32))
    assert not np.array_equal(a[("ip1", 0)], b[("ip1", 0)])  # the others did train


# ---------------------------------------------------------------------------------------------------------
# bad input: one line `resnetc: error: ...`, exit 2, nothing written

BAD = {
    "no_net": ('base_lr: 0.1 lr_policy: "fixed" max_iter: 2 snapshot: 1', [], "the solver names no net"),
    "test_net_without_test_iter": ('train_net: "net.prototxt" test_net: "net.prototxt" base_lr: 0.1 '
                                   'lr_policy: "fixed" max_iter: 2 test_interval: 1', [],
                                   "1 test nets but 0 test_iter values"),
    "negative_test_iter": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 2 test_interval: 1 '
                           'test_iter: -2', [], "test_iter #0 must be > 0 (got -2)"),
    "unknown_lr_policy": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "cosine" max_iter: 2', [],
                          "unknown lr_policy 'cosine'"),
    "unknown_type": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" type: "Lion" max_iter: 2', [],
                     "unknown solver type 'Lion'"),
    "early_stop_unknown_output": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 2 test_iter: 2 '
                                  'test_interval: 1', ["--early-stop", "acc:2"],
                                  "'acc' is not an output of test net #0 (its outputs: accuracy, loss)"),
    "early_stop_bad_flag": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 2',
                            ["--early-stop", "accuracy"], "--early-stop: expected OUTPUT:PATIENCE[:min|max]"),
    "snapshot_and_weights": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 2',
                             ["--snapshot", "x.solverstate", "--weights", "x.caffemodel"], "not both"),
    "missing_solverstate": ('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 2',
                            ["--snapshot", "nope.solverstate"], "nope.solverstate: no such solver state file"),
}


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("resnetc: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_solver_is_one_line_exit_2_nothing_written(case, tmp_path, data, run_cli):
    text, flags, msg = BAD[case]
    (tmp_path / "net.prototxt").write_text(_net(data))
    (tmp_path / "solver.prototxt").write_text(text + "\n")
    r = run_cli("train", "solver.prototxt", *flags, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert msg in _one_error_line(r.stderr)
    assert _snapshots(tmp_path) == []


def test_divergence_stops_naming_iteration_and_last_finite_loss(tmp_path, data, run_cli):
    """A huge base_lr on a linear net with a Euclidean loss: the loss grows to inf within a few iterations."""
    (tmp_path / "snap").mkdir()
    (tmp_path / "net.prototxt").write_text(f'''name: "lin"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{data}/train_lmdb" backend: LMDB batch_size: 4 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 1 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }}
''')
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 1e6 lr_policy: "fixed" max_iter: 100 '
                                              'display: 1 snapshot: 1 snapshot_prefix: "snap/x" random_seed: 1\n')
    r = run_cli("train", "solver.prototxt", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_error_line(r.stderr)
    m = re.search(r"training diverged at iteration (\d+): loss = (inf|nan|-nan); the last finite loss was (\S+) at "
                  r"iteration (\d+); the last snapshot \((\S+)\) is kept", line)
    assert m, line
    n, last, last_it, snap = int(m.group(1)), m.group(3), int(m.group(4)), m.group(5)
    assert 1 <= n < 100 and last_it == n - 1
    assert _displayed(r.stderr)[last_it] == last  # the loss the log showed for that iteration
    assert snap == f"snap/x_iter_{n}.solverstate"
    # every snapshot up to the divergence is kept (the last one holds the weights that gave the inf); none after
    assert _snapshots(tmp_path / "snap") == sorted(f"x_iter_{i}.{e}" for i in range(1, n + 1)
                                                   for e in ("caffemodel", "solverstate"))
    assert _arrays(tmp_path / "snap" / f"x_iter_{n}.caffemodel")


# ---------------------------------------------------------------------------------------------------------
# early stopping


def test_early_stop_flag_stops_and_snapshots(tmp_path, data, run_cli):
    d = _setup(tmp_path / "es", data, max_iter=600, snapshot=0)
    log = _ok(run_cli("train", "solver.prototxt", "--early-stop", "accuracy:2", cwd=d))
    m = re.search(r"\] Early stopping at iteration (\d+): accuracy has not improved for 2 tests \(best (\S+) at "
                  r"iteration (\d+)\)$", log, re.M)
    assert m, log[-3000:]
    n, best, best_it = int(m.group(1)), float(m.group(2)), int(m.group(3))
    tests = {int(i): float(acc) for i, acc, _ in _tests(log)}
    assert max(tests) == n and n < 600 and n == best_it + 2 * 3  # two test passes (test_interval 3) after the best
    assert tests[best_it] == best == max(v for i, v in tests.items() if i <= best_it)
    assert all(tests[i] <= best for i in tests if i > best_it)
    assert "Optimization stopped early." in log
    assert _snapshots(d / "snap") == [f"run_iter_{n}.caffemodel", f"run_iter_{n}.solverstate"]
    assert f"Iteration {n}, loss = " not in log  # no extra forward, no final test: Caffe's early-exit path
    assert not re.search(rf"\] Iteration {n} \(", log)  # stopped at the test, before iteration n's forward


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _solve_here(d, monkeypatch) -> list:
    """Run the solver in ``d`` in this process; its log lines."""
    from resnetc.solver import Solver

    monkeypatch.chdir(d)
    h, lg = _Log(), logging.getLogger("resnetc.solver")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.INFO)
    try:
        s = Solver("solver.prototxt")
        try:
            s.solve()
        finally:
            s.close()
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    return h.lines


def test_early_stop_from_the_solver_min_mode(tmp_path, data, monkeypatch):
    """The solver's own resnetc { early_stop_* } fields, 'loss' in min mode: with a tiny lr the test loss keeps
    falling, so training runs to max_iter and ends the usual way."""
    d = _setup(tmp_path / "es", data, max_iter=9, snapshot=0)
    text = (d / "solver.prototxt").read_text().replace("base_lr: 0.05", "base_lr: 0.001")
    (d / "solver.prototxt").write_text(text + 'resnetc { early_stop_output: "loss" early_stop_patience: 1 '
                                              'early_stop_mode: "min" }\n')
    lines = _solve_here(d, monkeypatch)
    assert not [ln for ln in lines if "Early stopping" in ln or "stopped early" in ln]
    losses = [float(ln.split("= ")[1].split()[0]) for ln in lines if "Test net output #1: loss" in ln]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:]))
    assert "Iteration 9, loss = " in "\n".join(lines)
    assert sorted(os.listdir(d / "snap")) == ["run_iter_9.caffemodel", "run_iter_9.solverstate"]


class _Param:
    """A SolverParameter with test nets and the early-stop fields."""

    def __new__(cls, text):
        from resnetc.prototxt import parse_solver_text

        return parse_solver_text('net: "n" test_iter: 1 test_interval: 1 ' + text, "s.prototxt")


def test_early_stopping_rule():
    from resnetc.solver.early_stop import EarlyStopping

    assert EarlyStopping.from_solver(_Param("")) is None
    rule = EarlyStopping.from_solver(_Param('resnetc { early_stop_output: "accuracy" early_stop_patience: 2 }'),
                                     output_names=["accuracy", "loss"])
    seq = [0.5, 0.7, 0.7, 0.8, 0.6, float("nan")]
    stops = [rule.update([("accuracy", np.float32(v)), ("loss", 1.0)], i * 10) for i, v in enumerate(seq)]
    assert stops == [False, False, False, False, False, True]  # ties and NaN do not improve
    assert rule.best == pytest.approx(0.8) and rule.best_iter == 30 and rule.bad == 2

    low = EarlyStopping("loss", 1, "min")
    assert not low.update([("loss", 3.0)], 0) and not low.update([("loss", 2.0)], 1) and low.update([("loss", 2.5)], 2)


def test_early_stopping_log_line(caplog):
    from resnetc.solver.early_stop import EarlyStopping

    rule = EarlyStopping("accuracy", 1)
    lg = logging.getLogger("resnetc.solver")
    with caplog.at_level(logging.INFO, logger="resnetc.solver"):
        rule.update([("accuracy", np.float32(0.90625))], 100, lg)
        assert rule.update([("accuracy", np.float32(0.875))], 200, lg)
    assert caplog.messages[-1] == ("Early stopping at iteration 200: accuracy has not improved for 1 tests "
                                   "(best 0.90625 at iteration 100)")


@pytest.mark.parametrize("text, msg", [
    ('resnetc { early_stop_output: "accuracy" }', "early_stop_patience must be > 0"),
    ('resnetc { early_stop_output: "accuracy" early_stop_patience: 2 early_stop_mode: "up" }', "early_stop_mode"),
    ('resnetc { early_stop_patience: 2 }', "early_stop_output is not"),
])
def test_early_stopping_settings_are_checked(text, msg):
    from resnetc.errors import ResnetcError
    from resnetc.solver.early_stop import EarlyStopping

    with pytest.raises(ResnetcError, match=re.escape(msg)):
        EarlyStopping.from_solver(_Param(text))


def test_early_stopping_needs_a_test_net():
    from resnetc.errors import ResnetcError
    from resnetc.prototxt import parse_solver_text
    from resnetc.solver.early_stop import EarlyStopping

    param = parse_solver_text('net: "n" resnetc { early_stop_output: "accuracy" early_stop_patience: 2 }', "s")
    with pytest.raises(ResnetcError, match="needs a test net: set test_iter and test_interval"):
        EarlyStopping.from_solver(param)


def test_early_stopping_output_checked_at_the_test_too():
    """Where the output names are not known beforehand, the first test pass names the problem."""
    from resnetc.errors import ResnetcError
    from resnetc.solver.early_stop import EarlyStopping

    rule = EarlyStopping("acc", 3)
    with pytest.raises(ResnetcError, match=r"'acc' is not an output of test net #0 \(its outputs: accuracy, loss\)"):
        rule.update([("accuracy", 1.0), ("loss", 0.5)], 0)
    with pytest.raises(ResnetcError, match="has 3 values"):
        EarlyStopping("per_class", 3).update([("per_class", 1.0)] * 3, 0)
