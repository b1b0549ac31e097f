"""draw / plot / parse-log: Caffe's draw_net.py, plot_training_log and parse_log workflows."""
import csv
import json
import os
import shutil

import pytest

from conftest import CORPUS, ORACLE, require_shared

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _runs():
    path = os.path.join(ORACLE, "solver", "trajectories.json")
    return sorted(json.load(open(path))) if os.path.exists(path) else ["<no oracle>"]


@pytest.mark.parametrize("run", _runs())
def test_parse_log_rows_equal_the_caffe_log_numbers(run, run_cli, tmp_path):
    require_shared()
    traj = json.load(open(os.path.join(ORACLE, "solver", "trajectories.json")))[run]
    log = os.path.join(ORACLE, "solver", "logs", f"{run}.log.gz")
    r = run_cli("parse-log", log, "-o", tmp_path)
    assert r.returncode == 0, r.stderr
    train = list(csv.DictReader(open(tmp_path / f"{run}.log.train")))
    test = list(csv.DictReader(open(tmp_path / f"{run}.log.test")))
    assert len(train) == len(traj["iters"]) + 1  # + Caffe's extra forward after the last update
    for row, it in zip(train, traj["iters"]):
        assert int(row["NumIters"]) == it["iter"]
        assert float(row["LearningRate"]) == pytest.approx(it["lr"], rel=1e-6)
        for k, v in it["train_outputs"].items():
            assert float(row[k]) == pytest.approx(v, rel=1e-6)
    assert [int(r["NumIters"]) for r in test] == [t["iter"] for t in traj["tests"]]
    for row, t in zip(test, traj["tests"]):
        assert float(row["accuracy"]) == pytest.approx(t["accuracy"], rel=1e-6)
        assert float(row["loss"]) == pytest.approx(t["loss"], rel=1e-6)


def test_plot_real_caffe_logs_makes_a_png(run_cli, tmp_path):
    require_shared()
    out = tmp_path / "curves.png"
    logs = [os.path.join(ORACLE, "solver", "logs", f"{r}.log.gz") for r in ("sgd", "adam")]
    r = run_cli("plot", *logs, "-o", out)
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_log_without_iterations_is_one_clear_line(run_cli, tmp_path):
    log = tmp_path / "empty.log"
    log.write_text("I1124 10:00:00.000000 1 caffe.cpp:1] Use CPU.\n")
    r = run_cli("plot", log, "-o", tmp_path / "x.png")
    assert r.returncode == 2
    assert "no training iterations" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def _need_dot():
    if shutil.which("dot"):
        return
    if os.environ.get("RESNETC_REQUIRE_SHARED") == "1":
        pytest.fail("Graphviz `dot` is missing on the CI machine (.ci/run installs the Debian package graphviz)")
    pytest.skip("Graphviz `dot` not installed (Debian package graphviz)")


def test_draw_resnet50_png(run_cli, tmp_path):
    require_shared()
    _need_dot()
    out = tmp_path / "resnet50.png"
    net = os.path.join(CORPUS, "kaiminghe-resnet", "prototxt", "ResNet-50-deploy.prototxt")
    r = run_cli("draw", net, out, "--rankdir", "TB")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 100_000
    import struct

    width, height = struct.unpack(">II", data[16:24])
    assert height > 5 * width  # a tall chain of 200+ layers drawn top to bottom


def test_draw_without_dot_names_the_package(run_cli, tmp_path):
    require_shared()
    net = os.path.join(CORPUS, "bvlc-caffe", "examples", "mnist", "lenet.prototxt")
    r = run_cli("draw", net, tmp_path / "x.png", env={"PATH": os.path.dirname(shutil.which("resnetc") or "/nonexistent")})
    assert r.returncode == 2
    assert "graphviz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("draw", net, tmp_path / "x.dot")
    assert r.returncode == 0 and (tmp_path / "x.dot").read_text().startswith("digraph")
