"""The README's main job: the shipped UCI digits → LMDB → ResNet-20 (specs/digits) trains and is scored,
through the same commands the README gives (fewer iterations here; the README run takes minutes)."""
import os
import re
import shutil

from conftest import REPO


def _readme_block(tag):
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- %s -->\s*```[a-z]*\n(.*?)```" % tag, text, re.S)
    assert m, f"README has no {tag} block"
    return m.group(1).strip()


def test_readme_main_command_is_the_digits_job():
    cmd = _readme_block("main-command")
    assert "resnetc data digits data/digits --size 16" in cmd
    assert "resnetc train specs/digits/resnet20_solver.prototxt" in cmd
    for part in re.findall(r"specs/\S+\.prototxt", cmd):
        assert os.path.exists(os.path.join(REPO, part)), part


def test_digits_resnet20_trains_and_scores(tmp_path, run_cli):
    shutil.copytree(os.path.join(REPO, "specs", "digits"), tmp_path / "specs" / "digits")
    r = run_cli("data", "digits", "data/digits", "--size", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "specs/digits/resnet20_solver.prototxt", "--max-iter", "50", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first = float(re.search(r"Iteration 0 \([^)]*\), loss = (\S+)", r.stderr).group(1))
    last = float(re.search(r"Iteration 50, loss = (\S+)", r.stderr).group(1))  # Caffe's line after the loop
    assert first > 2.0 and last < 0.5 * first, (first, last)  # ln(10) = 2.3 at the start; it learns
    snap = tmp_path / "data" / "digits" / "resnet20_iter_50.caffemodel"
    assert snap.exists() and (tmp_path / "data" / "digits" / "resnet20_iter_50.solverstate").exists()
    r = run_cli("test", "specs/digits/resnet20.prototxt", "--weights", snap, "--iterations", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # caffe test prints per-batch scores, then the means: "accuracy = X" after "Loss: Y"
    # (50 iterations are too few for a good score: BatchNorm's TEST statistics are Caffe's running averages with
    # moving_average_fraction 0.999, i.e. near-uniform over every batch since the start; the README's 500 do it)
    assert len(re.findall(r"Batch \d+, accuracy = ", r.stderr)) == 4
    acc = float(re.findall(r"accuracy = (\S+)", r.stderr)[-1])
    assert 0.0 <= acc <= 1.0, acc
