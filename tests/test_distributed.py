"""Multi-process training through the user's entry (``python -m resnetc train ... --nproc 2``, gloo on the CPU).

* parity: 2 ranks × batch B for N iterations give the weights of 1 process × batch 2B (Caffe's multi-GPU
  meaning: sharded records, gradients averaged over ranks), and both ranks end with identical weights;
* failure: killing one rank stops the others within a bounded time with one clear line naming the rank and
  the snapshot to resume from; resuming from it (on another number of processes) finishes the run.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from resnetc.data.datum import array_to_datum
from resnetc.data.db import write_db
from resnetc.distributed import RankEnv, describe_exit, latest_snapshot
from resnetc.errors import ResnetcError
from resnetc.weights import read_caffemodel

N_RECORDS = 48

NET = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "%(db)s" backend: LMDB batch_size: %(batch)d }
        transform_param { scale: 0.00390625 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """net: "%(net)s"
base_lr: 0.1 momentum: 0.9 weight_decay: 0.0005 lr_policy: "step" gamma: 0.5 stepsize: 3
max_iter: %(iters)d display: 1 random_seed: 7 iter_size: %(iter_size)d
snapshot: %(snapshot)d snapshot_prefix: "%(prefix)s"
"""


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("db") / "train_lmdb")
    rs = np.random.RandomState(0)
    with write_db(path) as db:
        for i in range(N_RECORDS):
            img = rs.randint(0, 256, size=(3, 4, 4)).astype(np.uint8)
            db.put(f"{i:08d}", array_to_datum(img, int(rs.randint(0, 3))).SerializeToString())
    return path


def _write(tmp, name, batch, iters, db, iter_size=1, snapshot=0):
    d = tmp / name
    d.mkdir()
    (d / "net.prototxt").write_text(NET % dict(db=db, batch=batch))
    (d / "solver.prototxt").write_text(SOLVER % dict(net=d / "net.prototxt", iters=iters, iter_size=iter_size,
                                                     snapshot=snapshot, prefix=d / "snap"))
    return d


def _train(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "resnetc", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _weights(path):
    return {(l.name, i): np.asarray(b.data) for l in read_caffemodel(str(path)).layers for i, b in enumerate(l.blobs)}


def _solve(solver_path, resume=None):
    """The single-process reference, in this process (the same Solver the CLI runs)."""
    from resnetc.solver import Solver

    s = Solver(str(solver_path))
    try:
        s.solve(resume)
    finally:
        s.close()
    return s


@pytest.mark.parametrize("iter_size", [1, 2])
def test_two_ranks_match_one_process_with_double_batch(tmp_path, lmdb_path, iter_size):
    iters = 5
    two = _write(tmp_path, "two", 3, iters, lmdb_path, iter_size)
    one = _write(tmp_path, "one", 6, iters, lmdb_path, iter_size)
    r2 = _train(two / "solver.prototxt", "--nproc", 2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "All 2 processes hold the same weights after iteration 5" in r2.stderr
    assert r2.stderr.count("Iteration 5, loss") == 1  # only rank 0 logs
    from resnetc.solver import Solver

    start = {(name, i): p.detach().numpy().reshape(-1).copy() for name, ps in
             Solver(str(one / "solver.prototxt")).net.params.items() for i, p in enumerate(ps)}
    _solve(one / "solver.prototxt")
    w2, w1 = _weights(two / f"snap_iter_{iters}.caffemodel"), _weights(one / f"snap_iter_{iters}.caffemodel")
    assert w2.keys() == w1.keys() == start.keys()
    for k in w1:
        assert np.abs(w1[k] - start[k]).max() > 1e-3, f"{k} did not train"  # the comparison means something
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=str(k))


def test_killed_rank_stops_the_others_and_the_run_resumes(tmp_path, lmdb_path):
    d = _write(tmp_path, "kill", 3, 100000, lmdb_path, snapshot=20)
    log = tmp_path / "launcher.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        launcher = subprocess.Popen([sys.executable, "-m", "resnetc", "train", str(d / "solver.prototxt"),
                                     "--nproc", "2"], stderr=f, stdout=f, text=True, env=env)
    try:
        pid = _wait_for(lambda: _rank_pid(log, 1) if latest_snapshot(str(d / "snap")) else None, 60)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        launcher.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert launcher.returncode == 2, text[-3000:]
    assert took < 20
    last = text.strip().splitlines()[-1]
    m = re.fullmatch(r"resnetc: error: rank 1 of 2 was killed by SIGKILL: the other processes were stopped; "
                     r"resume with --snapshot (\S+_iter_(\d+)\.solverstate)", last)
    assert m, last
    # resume on one process and on two: both continue from the snapshot's iteration to max_iter
    state, at = m.group(1), int(m.group(2))
    assert at >= 20
    for nproc in (2, 1):
        sol = d / f"resume{nproc}.prototxt"
        sol.write_text((d / "solver.prototxt").read_text().replace("max_iter: 100000", f"max_iter: {at + 4}")
                       .replace('snap"', f'resumed{nproc}"'))
        if nproc == 2:
            r = _train(sol, "--snapshot", state, "--nproc", nproc)
            assert r.returncode == 0, r.stderr[-3000:]
            assert f"Iteration {at + 3} (" in r.stderr and f"Iteration {at - 1} (" not in r.stderr
        else:
            assert _solve(sol, state).iter == at + 4
        assert (d / f"resumed{nproc}_iter_{at + 4}.caffemodel").exists()
    w2, w1 = _weights(d / f"resumed2_iter_{at + 4}.caffemodel"), _weights(d / f"resumed1_iter_{at + 4}.caffemodel")
    assert all(np.isfinite(w).all() for w in w2.values()) and w2.keys() == w1.keys()


def _rank_pid(log, rank):
    m = re.search(rf"rank {rank}: pid (\d+)", log.read_text())
    return int(m.group(1)) if m else None


def _wait_for(fn, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_rank_environment_and_exit_descriptions(tmp_path):
    assert RankEnv.from_environ({}) is None
    e = RankEnv.from_environ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world, e.local_rank, e.master_port, e.is_root) == (1, 4, 1, 1234, False)
    with pytest.raises(ResnetcError, match="RANK=4 is not in"):
        RankEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4"})
    assert describe_exit(-9) == "was killed by SIGKILL" and describe_exit(2) == "exited with status 2"
    for n in (2, 10, 4):
        (tmp_path / f"s_iter_{n}.solverstate").write_bytes(b"")
    assert latest_snapshot(str(tmp_path / "s")).endswith("s_iter_10.solverstate")
    assert latest_snapshot(str(tmp_path / "none")) is None
