"""`resnetc finetune` (resnetc.finetune): Caffe's flickr_style workflow on a tiny net and the shipped digits.

A base net is trained here for a few iterations on digits 0-2; the command then writes the fine-tuning files
for digits 3-5 from its train_val and from a deploy. Checked: `resnetc check` accepts what is written (both
phases, and the deploy), the classifier is renamed and resized with lr_mult 10/20, frozen layers get lr_mult 0
and BatchNorm stored statistics, the others the backbone multiplier, the solver points at the weights and carries
the early-stop fields; `resnetc train` on the written solver leaves the frozen layers bit-identical; bad input is
one line and writes nothing.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from resnetc.errors import ResnetcError
from resnetc.finetune import FinetuneOptions, SolverOptions, Transform, plan_finetune
from resnetc.prototxt import parse_net_text, read_net, read_solver
from resnetc.weights import read_caffemodel

TINY = """name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.0625 } data_param { source: "%(train)s" batch_size: 16 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.0625 } data_param { source: "%(test)s" batch_size: 20 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "conv2" top: "conv2" }
layer { name: "scale2" type: "Scale" bottom: "conv2" top: "conv2" scale_param { bias_term: true } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc3" type: "InnerProduct" bottom: "pool" top: "fc3"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc3" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc3" bottom: "label" top: "accuracy" include { phase: TEST } }
"""

BASE_SOLVER = """net: "%(net)s"
test_iter: 1
test_interval: 1000
test_initialization: false
base_lr: 0.05
lr_policy: "fixed"
momentum: 0.9
max_iter: 4
display: 0
snapshot: 0
snapshot_prefix: "%(prefix)s"
random_seed: 5
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Digits 0-2 and 3-5 (8x8, labels 0..2) and the tiny net trained 4 iterations on 0-2."""
    from resnetc.data.digits import write_digits
    from resnetc.solver import Solver

    root = tmp_path_factory.mktemp("finetune")
    write_digits(str(root / "d02"), "0-2", True, 8)
    write_digits(str(root / "d35"), "3-5", True, 8)
    net = root / "tiny.prototxt"
    net.write_text(TINY % {"train": root / "d02" / "digits_train_lmdb", "test": root / "d02" / "digits_test_lmdb"})
    solver = root / "tiny_solver.prototxt"
    solver.write_text(BASE_SOLVER % {"net": net, "prefix": root / "tiny"})
    s = Solver(str(solver))
    try:
        s.solve()
    finally:
        s.close()
    weights = root / "tiny_iter_4.caffemodel"
    assert weights.exists()
    return {"root": root, "net": str(net), "weights": str(weights),
            "data": (str(root / "d35" / "digits_train_lmdb"), str(root / "d35" / "digits_test_lmdb"))}


def _opts(base, **kw):
    kw.setdefault("num_classes", 3)
    kw.setdefault("weights", base["weights"])
    kw.setdefault("data", base["data"])
    return FinetuneOptions(**kw)


def _layers(net, name):
    return [lp for lp in net.layer if lp.name == name]


def _specs(lp):
    return [(s.lr_mult if s.HasField("lr_mult") else None, s.decay_mult if s.HasField("decay_mult") else None)
            for s in lp.param]


# ---------------------------------------------------------------------------------------------------------
# the plan, in process


def test_plan_train_val_base(base, tmp_path):
    plan = plan_finetune(base["net"], _opts(base, freeze_until="scale1", lr_mult_backbone=0.1,
                                            solver=SolverOptions(early_stop="accuracy:3")), str(tmp_path))
    tv = plan.train_val
    assert plan.classifiers == [("fc3", "fc3_ft")] and not plan.base_is_deploy
    (fc,) = _layers(tv, "fc3_ft")
    assert not _layers(tv, "fc3") and list(fc.top) == ["fc3_ft"]
    assert fc.inner_product_param.num_output == 3 and fc.inner_product_param.weight_filler.type == "xavier"
    assert _specs(fc) == [(10, 1), (20, 0)]
    assert [list(lp.bottom) for lp in tv.layer if lp.type in ("SoftmaxWithLoss", "Accuracy")] == \
        [["fc3_ft", "label"]] * 2
    # frozen: conv1, bn1 (stored statistics, no deprecated param specs), scale1
    assert plan.frozen == ["conv1", "bn1", "scale1"]
    assert _specs(_layers(tv, "conv1")[0]) == [(0, 0)]
    assert _specs(_layers(tv, "scale1")[0]) == [(0, 0), (0, 0)]
    (bn1,) = _layers(tv, "bn1")
    assert bn1.batch_norm_param.use_global_stats and not bn1.param
    # the backbone: x0.1, BatchNorm statistics untouched
    assert plan.scaled == ["conv2", "scale2"]
    assert [s[0] for s in _specs(_layers(tv, "conv2")[0])] == pytest.approx([0.1, 0.1])
    (bn2,) = _layers(tv, "bn2")
    assert not bn2.param and not bn2.HasField("batch_norm_param")
    # data: the new LMDBs, the base's transform and batch sizes
    data = [lp for lp in tv.layer if lp.type == "Data"]
    assert [lp.data_param.source for lp in data] == list(base["data"])
    assert [lp.data_param.batch_size for lp in data] == [16, 20]
    assert all(lp.transform_param.scale == 0.0625 for lp in data)
    # solver
    s = plan.solver
    assert s.net == os.path.join(str(tmp_path), "train_val.prototxt") and list(s.weights) == [base["weights"]]
    assert s.snapshot_prefix == os.path.join(str(tmp_path), "finetune")
    assert s.base_lr == pytest.approx(0.001) and s.lr_policy == "step" and s.stepsize == 20000
    assert s.resnetc.early_stop_output == "accuracy" and s.resnetc.early_stop_patience == 3
    assert s.resnetc.early_stop_mode == "max"
    # deploy: Input -> prob over the new classifier, no learning rates
    dep = plan.deploy
    assert [lp.type for lp in dep.layer][0] == "Input" and dep.layer[-1].type == "Softmax"
    assert list(dep.layer[-1].bottom) == ["fc3_ft"] and not any(lp.param for lp in dep.layer)
    assert list(dep.layer[0].input_param.shape[0].dim) == [1, 1, 8, 8]


def test_test_iter_counts_the_test_lmdb(base):
    from resnetc.data.db import DBReader

    with DBReader(base["data"][1]) as db:
        n = len(db)
    plan = plan_finetune(base["net"], _opts(base, test_batch_size=7), "o")
    assert list(plan.solver.test_iter) == [math.ceil(n / 7)]


def test_plan_deploy_base(base, tmp_path):
    """A deploy BASE: Input -> TRAIN/TEST Data layers with the transform given; Softmax -> loss + accuracy;
    BatchNorm's use_global_stats dropped where not frozen."""
    first = plan_finetune(base["net"], _opts(base), str(tmp_path / "a"))
    deploy = tmp_path / "deploy.prototxt"
    from resnetc.prototxt import to_text

    dep = first.deploy
    for lp in dep.layer:
        if lp.type == "BatchNorm":
            lp.batch_norm_param.use_global_stats = True  # as released deploys have it
    deploy.write_text(to_text(dep))
    plan = plan_finetune(str(deploy), _opts(base, num_classes=2, freeze_until="conv1", classifier_name="fc_new",
                                            transform=Transform(scale=0.5, mean_value=(3.0,), mirror=True),
                                            batch_size=8, test_batch_size=4), str(tmp_path / "b"))
    tv = plan.train_val
    assert plan.base_is_deploy and plan.classifiers == [("fc3_ft", "fc_new")]
    data = [lp for lp in tv.layer if lp.type == "Data"]
    assert [(lp.include[0].phase, lp.data_param.batch_size, lp.transform_param.mirror) for lp in data] == \
        [(0, 8, True), (1, 4, False)]
    assert all(list(lp.transform_param.mean_value) == [3.0] and lp.transform_param.scale == 0.5 for lp in data)
    assert [lp.type for lp in tv.layer[-2:]] == ["SoftmaxWithLoss", "Accuracy"]
    assert not any(lp.type == "Softmax" or lp.type == "Input" for lp in tv.layer)
    bns = {lp.name: lp for lp in tv.layer if lp.type == "BatchNorm"}
    assert not bns["bn1"].HasField("batch_norm_param") and not bns["bn2"].HasField("batch_norm_param")
    assert _layers(tv, "fc_new")[0].inner_product_param.num_output == 2
    # its deploy keeps the base's form with the new classifier
    assert [lp.name for lp in plan.deploy.layer][-2:] == ["fc_new", "prob"]
    assert plan.deploy.layer[0].input_param.shape[0].dim[:] == [1, 1, 8, 8]


def test_classifier_through_parameter_free_layers(base, tmp_path):
    """SqueezeNet's form: a Convolution classifier, then ReLU and global pooling, then the loss."""
    text = TINY % {"train": base["data"][0], "test": base["data"][1]}
    head = text[text.index('layer { name: "pool"'):text.index('layer { name: "loss"')]
    text = text.replace(head, """layer { name: "conv10" type: "Convolution" bottom: "conv2" top: "conv10"
  convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "relu10" type: "ReLU" bottom: "conv10" top: "conv10" }
layer { name: "pool10" type: "Pooling" bottom: "conv10" top: "fc3"
  pooling_param { pool: AVE global_pooling: true } }
""")
    net = tmp_path / "sq.prototxt"
    net.write_text(text)
    plan = plan_finetune(str(net), _opts(base, num_classes=4), str(tmp_path / "o"))
    assert plan.classifiers == [("conv10", "conv10_ft")]
    conv = _layers(plan.train_val, "conv10_ft")[0]
    assert conv.convolution_param.num_output == 4 and conv.convolution_param.weight_filler.type == "gaussian"
    assert conv.convolution_param.weight_filler.std == pytest.approx(0.01)
    assert [list(lp.bottom) + list(lp.top) for lp in plan.train_val.layer if lp.name == "relu10"] == \
        [["conv10_ft", "conv10_ft"]]


def test_auxiliary_classifiers_are_replaced_too(base, tmp_path):
    """GoogLeNet's form: an auxiliary loss of weight 0.3 on its own classifier; both get N outputs."""
    text = TINY % {"train": base["data"][0], "test": base["data"][1]}
    text = text.replace('''layer { name: "conv2" ''', '''layer { name: "aux_pool" type: "Pooling"
  bottom: "conv1" top: "aux_pool"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "aux/classifier" type: "InnerProduct" bottom: "aux_pool" top: "aux/classifier"
  inner_product_param { num_output: 3 } }
layer { name: "aux_loss" type: "SoftmaxWithLoss" bottom: "aux/classifier" bottom: "label" top: "aux_loss"
  loss_weight: 0.3 }
layer { name: "conv2" ''')
    net = tmp_path / "aux.prototxt"
    net.write_text(text)
    read_net(str(net))
    plan = plan_finetune(str(net), _opts(base, num_classes=2, freeze_until="conv2"), str(tmp_path / "o"))
    assert plan.classifiers == [("fc3", "fc3_ft"), ("aux/classifier", "aux/classifier_ft")]
    aux = _layers(plan.train_val, "aux/classifier_ft")[0]
    assert aux.inner_product_param.num_output == 2 and _specs(aux) == [(10, 1), (20, 0)]
    assert "aux/classifier_ft" not in plan.frozen and "conv2" in plan.frozen


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, nothing written


@pytest.mark.parametrize("kw, message", [
    (dict(freeze_until="conv9"), "no layer 'conv9' in BASE (did you mean 'conv"),
    (dict(freeze_until="fc3"), "names the classifier, which is replaced by the new 'fc3_ft'"),
    (dict(freeze_until="loss"), "comes at or after the classifier 'fc3_ft'"),
    (dict(weights="missing.caffemodel"), "missing.caffemodel: --weights: no such file"),
    (dict(solver=SolverOptions(early_stop="acc:3")), "'acc' is not an output of the TEST net"),
    (dict(solver=SolverOptions(early_stop="accuracy")), "--early-stop wants OUTPUT:PATIENCE"),
    (dict(classifier_name="conv2"), "the new classifier name 'conv2' is already a layer or blob"),
])
def test_bad_options(base, tmp_path, kw, message):
    with pytest.raises(ResnetcError) as e:
        plan_finetune(base["net"], _opts(base, **kw), str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_no_classifier(base, tmp_path):
    text = TINY % {"train": base["data"][0], "test": base["data"][1]}
    for bad, why in [(text.replace('bottom: "fc3" bottom: "label" top: "loss"',
                                   'bottom: "pool" bottom: "label" top: "loss"'),
                      "its input comes from 'scale2' (Scale), not from an InnerProduct or Convolution"),
                     (text.replace('type: "SoftmaxWithLoss" bottom: "fc3" bottom: "label"',
                                   'type: "EuclideanLoss" bottom: "fc3" bottom: "fc3"'), "is a EuclideanLoss")]:
        net = tmp_path / "bad.prototxt"
        net.write_text(bad)
        with pytest.raises(ResnetcError) as e:
            plan_finetune(str(net), _opts(base), str(tmp_path / "o"))
        assert "no classifier found" in str(e.value) and why in str(e.value), str(e.value)


def test_weights_that_do_not_fit_the_new_data(base, tmp_path):
    """3-channel images for a net pretrained on 1-channel ones: caught when the files are written."""
    from resnetc.data.datum import array_to_datum
    from resnetc.data.db import write_db

    for name in ("train", "test"):
        with write_db(str(tmp_path / name)) as db:
            for i in range(2):
                db.put(b"%08d" % i, array_to_datum(np.zeros((3, 8, 8), np.uint8), i).SerializeToString())
    with pytest.raises(ResnetcError) as e:
        plan_finetune(base["net"], _opts(base, data=(str(tmp_path / "train"), str(tmp_path / "test"))),
                      str(tmp_path / "o"))
    assert "layer 'conv1'" in str(e.value) and "shape mismatch" in str(e.value) and "4x1x3x3" in str(e.value)


def test_lmdbs_not_there_yet(base, tmp_path):
    """--data may name LMDBs made later: test_iter falls back to 100, the deploy takes --input-shape (the batch
    axis of the train_val's graphs stays each Data layer's own)."""
    with pytest.raises(ResnetcError, match="give --input-shape data=N,C,H,W"):
        plan_finetune(base["net"], _opts(base, data=("later_train", "later_test")), str(tmp_path))
    plan = plan_finetune(base["net"], _opts(base, data=("later_train", "later_test"),
                                            input_shapes={"data": (1, 1, 8, 8)}), str(tmp_path))
    assert list(plan.solver.test_iter) == [100]
    assert list(plan.deploy.layer[0].input_param.shape[0].dim) == [1, 1, 8, 8]


def test_deploy_base_needs_data(base, tmp_path):
    plan = plan_finetune(base["net"], _opts(base), str(tmp_path / "a"))
    from resnetc.prototxt import to_text

    (tmp_path / "deploy.prototxt").write_text(to_text(plan.deploy))
    with pytest.raises(ResnetcError, match="BASE is a deploy net .*give --data"):
        plan_finetune(str(tmp_path / "deploy.prototxt"), _opts(base, data=None), str(tmp_path / "b"))


# ---------------------------------------------------------------------------------------------------------
# the command line, end to end


def test_cli_finetune_check_train_frozen_bit_identical(base, tmp_path, run_cli):
    out = tmp_path / "ft"
    r = run_cli("finetune", base["net"], "--weights", base["weights"], "--num-classes", 3, "--data",
                f"lmdb:{base['data'][0]},{base['data'][1]}", "--freeze-until", "scale1", "--lr-mult-backbone", 0.5,
                "--base-lr", 0.05, "--max-iter", 3, "--test-interval", 3, "--snapshot", 0, "--seed", 2,
                "--early-stop", "accuracy:2", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / f) for f in ("train_val.prototxt", "solver.prototxt", "deploy.prototxt")]
    for f in ("train_val.prototxt", "deploy.prototxt"):
        c = run_cli("check", out / f)
        assert c.returncode == 0 and c.stdout.rstrip().endswith("OK"), c.stderr
        assert "TRAIN" in c.stdout and "TEST" in c.stdout
    solver = read_solver(str(out / "solver.prototxt"))
    assert list(solver.weights) == [base["weights"]] and solver.resnetc.early_stop_output == "accuracy"
    t = run_cli("train", out / "solver.prototxt")
    assert t.returncode == 0, t.stderr
    assert "Finetuning from" in t.stderr and "Ignoring source layer fc3" in t.stderr
    before = {l.name: l for l in read_caffemodel(base["weights"]).layers if l.blobs}
    after = {l.name: l for l in read_caffemodel(str(out / "finetune_iter_3.caffemodel")).layers if l.blobs}
    for name in ("conv1", "bn1", "scale1"):
        assert len(after[name].blobs) == len(before[name].blobs)
        for a, b in zip(before[name].blobs, after[name].blobs):
            assert a.data.tobytes() == b.data.tobytes(), name
    for name in ("conv2", "scale2", "bn2"):  # learning (BatchNorm: its moving averages)
        assert any(not np.array_equal(a.data, b.data) for a, b in zip(before[name].blobs, after[name].blobs)), name
    assert "fc3" not in after and after["fc3_ft"].blobs[0].data.reshape(3, -1).shape == (3, 8)


def test_early_stop_fields_drive_the_solver(base, tmp_path):
    """The solver written with --early-stop stops training (resnetc.solver.early_stop): with every rate 0 the
    accuracy never improves, so patience 2 ends the run at the second test after the first."""
    from resnetc.data.db import DBReader
    from resnetc.finetune import finetune
    from resnetc.solver import Solver

    with DBReader(base["data"][1]) as db:
        n = len(db)  # one batch of the whole test set: every test pass sees the same images
    solver = SolverOptions(base_lr=0.01, max_iter=20, test_interval=1, snapshot=0, seed=3, early_stop="accuracy:2")
    plan = finetune(base["net"], _opts(base, freeze_until="pool", lr_mult_head=0, test_batch_size=n, solver=solver),
                    str(tmp_path))
    assert plan.frozen == ["conv1", "bn1", "scale1", "conv2", "bn2", "scale2"]
    s = Solver(plan.paths["solver"])
    try:
        s.solve()
    finally:
        s.close()
    assert s.stopped_early and s.iter == 2
    assert (tmp_path / "finetune_iter_2.caffemodel").exists()


def test_cli_errors_one_line_nothing_written(base, tmp_path, run_cli):
    data = f"lmdb:{base['data'][0]},{base['data'][1]}"
    cases = [
        (["--weights", base["weights"], "--freeze-until", "nope"], "no layer 'nope' in BASE"),
        (["--weights", str(tmp_path / "none.caffemodel")], "--weights: no such file"),
        (["--weights", base["weights"], "--early-stop", "accuracy:0"], "patience must be >= 1"),
    ]
    for extra, message in cases:
        out = tmp_path / "o"
        r = run_cli("finetune", base["net"], "--num-classes", 3, "--data", data, *extra, "-o", out)
        assert r.returncode == 2, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("resnetc: error:")]
        assert len(errors) == 1 and message in errors[0] and r.stderr.splitlines()[-1] == errors[0], r.stderr
        assert not out.exists()


def test_written_files_parse_as_caffe_text(base, tmp_path):
    """Everything written is plain Caffe text (no resnetc-only field in the nets)."""
    plan = plan_finetune(base["net"], _opts(base, freeze_until="conv2"), str(tmp_path))
    for path, text in plan.texts().items():
        assert text.startswith("# Fine-tuning")
        if not path.endswith("solver.prototxt"):
            assert "resnetc" not in text.split("\n", 1)[1]
            parse_net_text(text, path)
