"""The legacy upgrade stage against Caffe's own upgrade tools (oracle/upgrade) and its source rules
(CAFFE_SEMANTICS.md §3), plus the `resnetc upgrade` command."""
from __future__ import annotations

import csv
import gzip
import logging
import os
import re
import struct

import pytest
from google.protobuf import text_format

from conftest import CORPUS, ORACLE, require_shared
from resnetc import prototxt, upgrade
from resnetc.errors import ResnetcError
from resnetc.proto import caffe_pb2

UPGRADE_ORACLE = os.path.join(ORACLE, "upgrade")


def _index_rows() -> list:
    path = os.path.join(UPGRADE_ORACLE, "index.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


ROWS = _index_rows()
UPGRADED_ROWS = [r for r in ROWS if r["exit_status"] == "0" and r["output"] != "-"]
PARSED_ROWS = [r for r in ROWS if r["exit_status"] == "0"]
FAILED_ROWS = [r for r in ROWS if r["exit_status"] != "0"]


def _ids(rows):
    return [r["source"] for r in rows] or None


# --------------------------------------------------------------------------------------------------
# comparing protos: field by field, floats as float32, messages naming where they differ

def _f32(x: float) -> bytes:
    return struct.pack("<f", x)


def _same_scalar(fd, a, b) -> bool:
    if fd.type == fd.TYPE_FLOAT:
        return _f32(a) == _f32(b)
    return a == b


def _is_repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def proto_diff(ours, caffe, path: str = "", limit: int = 8) -> list:
    """Differences between two messages of one type as 'path: ours X, Caffe Y' lines (float fields
    compared as float32, which is what Caffe stores)."""
    out: list = []
    fields = {fd.name: fd for fd, _ in ours.ListFields()}
    fields.update({fd.name: fd for fd, _ in caffe.ListFields()})
    for name in sorted(fields, key=lambda n: fields[n].number):
        fd = fields[name]
        a, b = getattr(ours, name), getattr(caffe, name)
        where = f"{path}.{name}" if path else name
        if _is_repeated(fd):
            if len(a) != len(b):
                shown = (lambda v: [text_format.MessageToString(m, as_one_line=True) for m in v]) \
                    if fd.message_type is not None else list
                out.append(f"{where}: ours has {len(a)} entries {shown(a)[:4]}, Caffe {len(b)} {shown(b)[:4]}")
                continue
            for i, (x, y) in enumerate(zip(a, b)):
                if fd.message_type is not None:
                    out.extend(proto_diff(x, y, f"{where}[{i}]", limit))
                elif not _same_scalar(fd, x, y):
                    out.append(f"{where}[{i}]: ours {x!r}, Caffe {y!r}")
        elif fd.message_type is not None:
            if ours.HasField(name) != caffe.HasField(name):
                out.append(f"{where}: present in {'ours' if ours.HasField(name) else 'Caffe'} only")
            else:
                out.extend(proto_diff(a, b, where, limit))
        elif ours.HasField(name) != caffe.HasField(name) or not _same_scalar(fd, a, b):
            out.append(f"{where}: ours {a!r} (set={ours.HasField(name)}), Caffe {b!r} (set={caffe.HasField(name)})")
        if len(out) >= limit:
            break
    return out[:limit]


def assert_same_net(ours, caffe, file: str) -> None:
    """Top-level fields, then layer by layer, naming the file and the first layer that differs."""
    assert len(ours.layer) == len(caffe.layer), (
        f"{file}: {len(ours.layer)} layers after upgrade, Caffe has {len(caffe.layer)}: "
        f"ours {[l.name for l in ours.layer][:8]}, Caffe {[l.name for l in caffe.layer][:8]}")
    top_a, top_b = type(ours)(), type(caffe)()
    top_a.CopyFrom(ours)
    top_b.CopyFrom(caffe)
    top_a.ClearField("layer")
    top_b.ClearField("layer")
    diff = proto_diff(top_a, top_b)
    assert not diff, f"{file}: net-level fields differ from Caffe's upgrade: " + "; ".join(diff)
    for i, (a, b) in enumerate(zip(ours.layer, caffe.layer)):
        diff = proto_diff(a, b)
        assert not diff, f"{file}: layer {i} '{b.name}' ({b.type}) differs from Caffe's upgrade: " + "; ".join(diff)


def _read_oracle_output(rel: str, cls):
    path = os.path.join(UPGRADE_ORACLE, rel)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return text_format.Parse(f.read(), cls())


# --------------------------------------------------------------------------------------------------
# the oracle: every file Caffe's tools wrote

@pytest.mark.parametrize("row", UPGRADED_ROWS, ids=_ids(UPGRADED_ROWS))
def test_upgrade_matches_caffe(row):
    require_shared()
    src = upgrade.read_legacy_file(os.path.join(CORPUS, row["source"]))
    assert src.kind == ("solver" if "solver" in row["tool"] else "net"), f"{row['source']}: detected as {src.kind}"
    report = upgrade.upgrade_legacy(src)
    assert report.success, f"{row['source']}: {report.lines}"
    assert report.upgraded == (row["caffe_needs_upgrade"] == "yes"), row["source"]
    expected = _read_oracle_output(row["output"], type(src.param))
    if src.kind == "net":
        assert_same_net(src.param, expected, row["source"])
    else:
        diff = proto_diff(src.param, expected)
        assert not diff, f"{row['source']}: solver differs from Caffe's upgrade: " + "; ".join(diff)


@pytest.mark.parametrize("row", PARSED_ROWS, ids=_ids(PARSED_ROWS))
def test_needs_upgrade_agrees_with_caffe(row):
    """Caffe's NetNeedsUpgrade / SolverNeedsTypeUpgrade verdict on every corpus file it parsed; files
    already current come out unchanged."""
    require_shared()
    src = upgrade.read_legacy_file(os.path.join(CORPUS, row["source"]))
    needs = (upgrade.net_needs_upgrade if src.kind == "net" else upgrade.solver_needs_upgrade)(src.param)
    assert needs == (row["caffe_needs_upgrade"] == "yes"), row["source"]
    if not needs:
        before = src.param.SerializeToString()
        assert upgrade.upgrade_legacy(src).lines == []
        assert src.param.SerializeToString() == before, row["source"]


@pytest.mark.parametrize("row", FAILED_ROWS, ids=_ids(FAILED_ROWS))
def test_files_caffe_cannot_parse_are_one_line_errors(row):
    require_shared()
    path = os.path.join(CORPUS, row["source"])
    with pytest.raises(ResnetcError) as exc:
        upgrade.read_legacy_file(path)
    msg = str(exc.value)
    assert "\n" not in msg and path in msg
    # the line and field Caffe's parser stopped at ('...caffe.SolverParameter: 18:10: ... no field named "x"')
    m = re.search(r"text-format caffe\.(\w+): (\d+):\d+: .*has no field named \"(\w+)\"", row["log"])
    assert m, row["log"]
    message_type, line, field = m.groups()
    assert f"{path}:{line}:" in msg and f"cannot parse {message_type}" in msg and f'"{field}"' in msg, msg


# --------------------------------------------------------------------------------------------------
# rules from upgrade_proto.cpp, one by one

def _net(text: str):
    return text_format.Parse(text, caffe_pb2.NetParameter())


V0_NET = """
name: "v0"
input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 blobs_lr: 1 blobs_lr: 2
                 weight_decay: 1 weight_decay: 0 biasterm: false } bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "relu1" type: "relu" } bottom: "pool1" top: "pool1" }
"""


def test_v0_padding_layer_folds_into_conv():
    net = _net(V0_NET)
    report = upgrade.upgrade_net_as_needed(net, "v0.prototxt")
    assert report.success and report.upgraded
    assert [l.name for l in net.layer] == ["input", "conv1", "pool1", "relu1"]
    conv = net.layer[1]
    assert conv.type == "Convolution" and list(conv.bottom) == ["data"]
    assert list(conv.convolution_param.pad) == [2]
    assert list(conv.convolution_param.kernel_size) == [3] and list(conv.convolution_param.stride) == [2]
    assert conv.convolution_param.num_output == 4 and conv.convolution_param.bias_term is False
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    pool = net.layer[2]
    assert pool.type == "Pooling" and pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert pool.pooling_param.kernel_size == 2 and not pool.pooling_param.HasField("pad")
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]
    assert not net.input and not net.input_dim and not net.layers


def test_v0_padding_into_other_layer_type_is_an_error():
    net = _net("""layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "x" top: "p" }
                  layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }
                  input: "x" """)
    with pytest.raises(ResnetcError, match=r"old\.prototxt: layer 'r' \(relu\): Padding layer input to "
                                           r"non-convolutional"):
        upgrade.upgrade_net(net, "old.prototxt")


def test_unknown_v0_type_names_file_line_and_layer():
    text = 'input: "x"\nlayers {\n  layer { name: "odd" type: "warp" }\n  bottom: "x" top: "y"\n}\n'
    src = prototxt.parse_net_text(text, "old.prototxt", upgrade=False)
    with pytest.raises(ResnetcError) as exc:
        upgrade.upgrade_net(src.param, "old.prototxt", lines=src.lines)
    assert str(exc.value).startswith("old.prototxt:2: layer 'odd' (warp): Unknown layer name: warp")


def test_v0_field_on_wrong_type_is_logged_and_dropped_like_caffe():
    net = _net('input: "x" layers { layer { name: "r" type: "relu" num_output: 3 shuffle_images: true } '
               'bottom: "x" top: "x" }')
    report = upgrade.upgrade_net_as_needed(net, "old.prototxt")
    assert not report.success
    errors = [m for lvl, m in report.records if lvl == logging.ERROR]
    assert errors[:2] == ["Unknown parameter num_output for layer type relu",
                          "Unknown parameter shuffle for layer type relu"]
    assert errors[2].startswith("Warning: had one or more problems upgrading V0NetParameter")
    assert net.layer[0].type == "ReLU" and not net.layer[0].HasField("convolution_param")


def test_v0_net_keeps_only_caffes_net_fields():
    net = _net('name: "n" force_backward: true debug_info: true state { phase: TEST } '
               'layers { layer { name: "d" type: "data" source: "db" batchsize: 4 scale: 0.5 cropsize: 3 } '
               'top: "data" }')
    upgrade.upgrade_net(net, "old.prototxt")
    assert net.name == "n" and net.force_backward and not net.HasField("debug_info")
    assert not net.HasField("state")
    d = net.layer[0]
    assert d.type == "Data" and d.data_param.source == "db" and d.data_param.batch_size == 4
    assert d.transform_param.scale == 0.5 and d.transform_param.crop_size == 3


def test_data_transformation_fields_move_to_transform_param():
    net = _net('layers { name: "d" type: DATA top: "data" data_param { source: "db" mean_file: "m" mirror: true } }'
               'layers { name: "i" type: IMAGE_DATA top: "img" }')
    report = upgrade.upgrade_net_as_needed(net, "v1.prototxt")
    assert report.lines[0] == ("Attempting to upgrade input file specified using deprecated transformation "
                               "parameters: v1.prototxt")
    d, i = net.layer
    assert d.transform_param.mean_file == "m" and d.transform_param.mirror
    assert not d.data_param.HasField("mean_file") and not d.data_param.HasField("mirror")
    # Caffe's mutable_*() leaves both sub-messages present on every data layer it visits
    assert i.HasField("image_data_param") and i.HasField("transform_param")


def test_v1_param_lists_become_param_specs():
    net = _net('layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" param: "w" param: "" '
               'blob_share_mode: PERMISSIVE blobs_lr: 1 blobs_lr: 2 weight_decay: 1 loss_weight: 0.5 '
               'inner_product_param { num_output: 3 } include { phase: TRAIN } }')
    upgrade.upgrade_net(net, "v1.prototxt")
    (ip,) = net.layer
    assert ip.type == "InnerProduct" and ip.inner_product_param.num_output == 3
    assert [(p.name, p.share_mode, p.lr_mult, p.decay_mult) for p in ip.param] == [
        ("w", caffe_pb2.ParamSpec.PERMISSIVE, 1, 1), ("", caffe_pb2.ParamSpec.STRICT, 2, 1)]
    assert ip.param[1].HasField("name") and not ip.param[1].HasField("share_mode")
    assert not ip.param[1].HasField("decay_mult")
    assert list(ip.loss_weight) == [0.5] and ip.include[0].phase == caffe_pb2.TRAIN


def test_every_v1_enum_has_a_type_string():
    names = set(caffe_pb2.V1LayerParameter.LayerType.values())
    assert names == set(upgrade.V1_LAYER_TYPES)


def test_layer_and_layers_together_is_an_error():
    net = _net('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    with pytest.raises(ResnetcError, match=r"^n\.prototxt: Refusing to upgrade inconsistent NetParameter"):
        upgrade.upgrade_net(net, "n.prototxt")


def test_input_shape_wins_and_input_layer_goes_first():
    net = _net('input: "a" input: "b" input_shape { dim: 1 dim: 2 } input_shape { dim: 5 } '
               'input_dim: 9 input_dim: 9 input_dim: 9 input_dim: 9 layer { name: "r" type: "ReLU" bottom: "a" top: "a" }')
    upgrade.upgrade_net(net, "n.prototxt")
    inp = net.layer[0]
    assert (inp.name, inp.type, list(inp.top)) == ("input", "Input", ["a", "b"])
    assert [list(s.dim) for s in inp.input_param.shape] == [[1, 2], [5]]
    assert net.layer[1].name == "r" and not net.input and not net.input_shape and not net.input_dim


def test_input_names_without_shapes_are_only_cleared():
    net = _net('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "data" }')
    upgrade.upgrade_net(net, "old.caffemodel")
    assert [l.name for l in net.layer] == ["r"] and not net.input


def test_too_few_input_dims_is_an_error():
    net = _net('input: "a" input: "b" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4')
    with pytest.raises(ResnetcError, match="2 net inputs need 8 input_dim values"):
        upgrade.upgrade_net(net, "n.prototxt")


def test_batchnorm_three_param_specs_are_frozen_not_removed():
    net = _net('layer { name: "bn3" type: "BatchNorm" param { name: "m" lr_mult: 1 } param { lr_mult: 1 } '
               'param { lr_mult: 1 decay_mult: 5 } } '
               'layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } }')
    lines = upgrade.upgrade_net(net, "bn.prototxt")
    assert lines == ["Attempting to upgrade batch norm layers using deprecated params: bn.prototxt",
                     "Successfully upgraded batch norm layers using deprecated params."]
    bn3, bn2 = net.layer
    assert [(p.name, p.lr_mult, p.decay_mult) for p in bn3.param] == [("m", 0, 0), ("", 0, 0), ("", 0, 0)]
    assert [p.lr_mult for p in bn2.param] == [1, 1]


def test_logs_use_caffes_wording(caplog):
    net = _net('layers { name: "r" type: RELU bottom: "x" top: "x" }')
    with caplog.at_level(logging.INFO, logger="resnetc.upgrade"):
        lines = upgrade.upgrade_net(net, "old.prototxt")
    assert lines == ["Attempting to upgrade input file specified using deprecated V1LayerParameter: old.prototxt",
                     "Successfully upgraded file specified using deprecated V1LayerParameter"]
    assert [r.getMessage() for r in caplog.records if r.name == "resnetc.upgrade"] == lines


def test_solver_type_enum_becomes_type_string():
    for enum, name in [("SGD", "SGD"), ("NESTEROV", "Nesterov"), ("ADAGRAD", "AdaGrad"),
                       ("RMSPROP", "RMSProp"), ("ADADELTA", "AdaDelta"), ("ADAM", "Adam")]:
        s = text_format.Parse(f"base_lr: 0.1 solver_type: {enum}", caffe_pb2.SolverParameter())
        lines = upgrade.upgrade_solver(s, "s.prototxt")
        assert s.type == name and not s.HasField("solver_type")
        assert lines[0] == ("Attempting to upgrade input file specified using deprecated 'solver_type' field "
                            "(enum)': s.prototxt")


def test_solver_type_and_type_together_is_an_error():
    s = text_format.Parse('solver_type: ADAM type: "Adam"', caffe_pb2.SolverParameter())
    with pytest.raises(ResnetcError, match=r"^s\.prototxt: Failed to upgrade solver: old solver_type field"):
        upgrade.upgrade_solver(s, "s.prototxt")


def test_solver_upgrade_leaves_embedded_nets_alone():
    s = text_format.Parse('net_param { layers { name: "r" type: RELU } } solver_type: SGD',
                          caffe_pb2.SolverParameter())
    upgrade.upgrade_solver(s, "s.prototxt")
    assert len(s.net_param.layers) == 1  # as upgrade_solver_proto_text: only solver_type


def test_snapshot_prefix_rule(tmp_path):
    s = caffe_pb2.SolverParameter()
    upgrade.upgrade_snapshot_prefix(s, str(tmp_path / "lenet_solver.prototxt"))
    assert s.snapshot_prefix == str(tmp_path / "lenet_solver")
    s = caffe_pb2.SolverParameter(snapshot_prefix=str(tmp_path))
    upgrade.upgrade_snapshot_prefix(s, "x/lenet_solver.prototxt")
    assert s.snapshot_prefix == str(tmp_path / "lenet_solver")
    s = caffe_pb2.SolverParameter(snapshot_prefix="snap/lenet")
    assert upgrade.upgrade_snapshot_prefix(s, "x/lenet_solver.prototxt") == [] and s.snapshot_prefix == "snap/lenet"


# --------------------------------------------------------------------------------------------------
# files: detection, binary, and the reader used by everything else

def test_detection_of_net_or_solver(tmp_path):
    (tmp_path / "my_solver.prototxt").write_text("# nothing but a comment\ndebug_info: true\n")
    (tmp_path / "deploy.prototxt").write_text("debug_info: true\n")
    assert upgrade.read_legacy_file(tmp_path / "my_solver.prototxt").kind == "solver"
    assert upgrade.read_legacy_file(tmp_path / "deploy.prototxt").kind == "net"
    bad_net = tmp_path / "solver_like_name.prototxt"
    bad_net.write_text('name: "n"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bogus: 1\n}\n')
    with pytest.raises(ResnetcError, match=r"solver_like_name\.prototxt:5:\d+: cannot parse NetParameter"):
        upgrade.read_legacy_file(bad_net)
    bad_solver = tmp_path / "s.prototxt"
    bad_solver.write_text('base_lr: 0.1\nmax_iter: 10\nbogus: 3\n')
    with pytest.raises(ResnetcError, match=r"s\.prototxt:3:\d+: cannot parse SolverParameter"):
        upgrade.read_legacy_file(bad_solver)


def test_binary_v1_net_upgrades_like_its_text(tmp_path):
    require_shared()
    text_path = os.path.join(CORPUS, "bvlc-caffe/history-v1-2015-02/examples/mnist/lenet_train_test.prototxt")
    text_src = upgrade.read_legacy_file(text_path)
    binary_path = tmp_path / "lenet.caffemodel"
    binary_path.write_bytes(text_src.param.SerializeToString())
    upgrade.upgrade_legacy(text_src)
    bin_src = upgrade.read_legacy_file(binary_path)
    assert bin_src.binary and bin_src.kind == "net"
    assert upgrade.upgrade_legacy(bin_src).upgraded
    assert_same_net(bin_src.param, text_src.param, str(binary_path))


def test_v1_caffemodel_keeps_its_blobs():
    require_shared()
    path = os.path.join(CORPUS, "ikkichung-prediction-example/examples/cifar10/cifar10_quick_iter_5000.caffemodel")
    src = upgrade.read_legacy_file(path)
    v1_blobs = {l.name: [b.SerializeToString() for b in l.blobs] for l in src.param.layers}
    report = upgrade.upgrade_legacy(src)
    assert report.success and not src.param.layers
    assert {l.name: [b.SerializeToString() for b in l.blobs] for l in src.param.layer} == v1_blobs
    assert [l.type for l in src.param.layer][:3] == ["Data", "Convolution", "Pooling"]


def test_read_net_upgrades_text_and_binary():
    require_shared()
    src = prototxt.read_net(os.path.join(CORPUS, "bvlc-caffe/history-v0-2014-03/examples/lenet/lenet.prototxt"))
    assert src.param.layer[0].type == "Input" and not src.param.layers
    assert any("V0LayerParameter" in line for line in src.upgrade_log)
    src = prototxt.read_net(os.path.join(
        CORPUS, "ikkichung-prediction-example/examples/cifar10/cifar10_quick_iter_5000.caffemodel"))
    assert src.binary and src.param.layer and not src.param.layers


# --------------------------------------------------------------------------------------------------
# the command (a few subprocesses only)

def test_cli_broken_file_exits_2_with_one_line(tmp_path, run_cli):
    bad = tmp_path / "broken.prototxt"
    bad.write_text('name: "n"\nlayer {\n  name: "a"\n  type: "ReLU"\n')
    out = tmp_path / "out.prototxt"
    p = run_cli("upgrade", bad, out)
    assert p.returncode == 2
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnetc: error: ") and str(bad) in lines[0], lines
    assert not out.exists()


def test_cli_solver_and_binary_and_current_files(tmp_path, run_cli):
    require_shared()
    solver_in = os.path.join(CORPUS, "bvlc-caffe/history-solver-type-enum-2016/examples/mnist/"
                                     "lenet_solver_adam.prototxt")
    p = run_cli("upgrade", solver_in, tmp_path / "s.prototxt")
    assert p.returncode == 0, p.stderr
    s = text_format.Parse((tmp_path / "s.prototxt").read_text(), caffe_pb2.SolverParameter())
    assert s.type == "Adam" and not s.HasField("solver_type")
    assert "deprecated 'solver_type' field (enum)': " + solver_in in p.stderr

    model_in = os.path.join(CORPUS, "ikkichung-prediction-example/examples/cifar10/cifar10_quick_iter_5000.caffemodel")
    p = run_cli("upgrade", model_in, tmp_path / "q.caffemodel")
    assert p.returncode == 0, p.stderr
    net = caffe_pb2.NetParameter.FromString((tmp_path / "q.caffemodel").read_bytes())
    assert len(net.layer) == 13 and not net.layers
    assert "Wrote upgraded NetParameter binary proto to" in p.stderr

    current = os.path.join(CORPUS, "bvlc-caffe/examples/mnist/lenet.prototxt")
    p = run_cli("upgrade", current, tmp_path / "l.prototxt")
    assert p.returncode == 0 and f"File already in latest proto format: {current}" in p.stderr
    again = text_format.Parse((tmp_path / "l.prototxt").read_text(), caffe_pb2.NetParameter())
    assert again == prototxt.read_net(current).param
