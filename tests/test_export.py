"""ONNX export: every corpus net resnetc supports exports, passes onnx.checker and matches PyTorch in
onnxruntime (export_onnx verifies before writing); bad input is one clear line with nothing left behind."""
import gzip
import json
import os

import numpy as np
import pytest

from conftest import CORPUS, ORACLE, require_shared

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from resnetc.errors import ResnetcError  # noqa: E402
from resnetc.export import InferenceSession, export_onnx  # noqa: E402


def _shapes():
    path = os.path.join(ORACLE, "shapes", "shapes.json.gz")
    return json.load(gzip.open(path)) if os.path.exists(path) else {}


SHAPES = _shapes()
REAL_WEIGHTS = {
    "mtcnn-kpzhang93/det1.prototxt": "mtcnn-kpzhang93/det1.caffemodel",
    "ahmdtaha-mnist-deploy/mnist_deploy.prototxt": "ahmdtaha-mnist-deploy/lenet_iter_10000.caffemodel",
}
# nets with data-dependent layers that have no static ONNX form are listed here with the reason
NOT_EXPORTABLE = {}


@pytest.mark.parametrize("key", sorted(k for k in SHAPES if "@" not in k) or ["<no oracle>"])
def test_corpus_net_exports_and_matches(key, tmp_path):
    require_shared()
    if key in NOT_EXPORTABLE:
        pytest.skip(NOT_EXPORTABLE[key])
    v = SHAPES[key]
    replaced = v.get("inputs_replaced") or {}
    shapes = {top: [1] + s[1:] for layer in replaced.values() for top, s in layer["tops"].items()}
    weights = REAL_WEIGHTS.get(key)
    out = tmp_path / "m.onnx"
    report = export_onnx(os.path.join(CORPUS, key), str(out), batch=1, input_shapes=shapes or None,
                         weights=os.path.join(CORPUS, weights) if weights else None)
    assert out.exists() and report.max_rel <= 1e-4
    onnx.checker.check_model(onnx.load(str(out)))
    assert set(report.outputs) <= set(v["blobs"]) | {"prob"}


def test_dynamic_batch_and_real_weights(tmp_path):
    require_shared()
    net = os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "mnist_deploy.prototxt")
    w = os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "lenet_iter_10000.caffemodel")
    out = tmp_path / "lenet.onnx"
    x = np.random.RandomState(3).rand(5, 1, 28, 28).astype(np.float32)
    report = export_onnx(net, str(out), weights=w, inputs={"data": x})
    sess = InferenceSession(str(out), device="cpu")
    assert sess.inputs == ["data"] and report.outputs == sess.outputs
    got = sess(data=x)[sess.outputs[0]]
    assert got.shape[0] == 5
    import resnetc
    import torch

    ref = resnetc.load_net(net, weights=w)(data=torch.from_numpy(x))[sess.outputs[0]].detach().numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_train_val_becomes_deploy_and_fold_bn(tmp_path):
    require_shared()
    net = os.path.join(CORPUS, "bvlc-caffe", "examples", "cifar10", "cifar10_full_sigmoid_train_test_bn.prototxt")
    out = tmp_path / "bn.onnx"
    report = export_onnx(net, str(out), input_shapes={"data": [2, 3, 32, 32]}, fold_bn=True)
    assert report.inputs == ["data"] and "prob" in report.outputs
    # conv2 -> bn2 and conv3 -> bn3 fold; bn1 follows pool1 and has nothing to fold into
    assert [f[:2] for f in report.folded] == [("conv2", "bn2"), ("conv3", "bn3")]
    types = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert types.count("BatchNormalization") == 1


def test_bad_inputs_are_one_line_and_leave_nothing(run_cli, tmp_path):
    require_shared()
    net = os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "mnist_deploy.prototxt")
    # weights that do not fit
    wrong = os.path.join(CORPUS, "mtcnn-kpzhang93", "det1.caffemodel")
    out = tmp_path / "x.onnx"
    for args in (["--weights", wrong], ["-o", "/nonexistent-dir/x.onnx"]):
        cmd = ["export", "--onnx", net] + (args if "-o" in args else args + ["-o", out])
        r = run_cli(*cmd)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
    # an unsupported (fork) layer is named
    ssd = os.path.join(CORPUS, "weiliu89-caffe-ssd")
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "in" type: "Input" top: "d" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n'
                   'layer { name: "pb" type: "PriorBox" bottom: "d" top: "p" }\n')
    r = run_cli("export", "--onnx", bad, "-o", out)
    assert r.returncode == 2 and "'pb'" in r.stderr and "PriorBox" in r.stderr
    # an image that cannot be decoded
    img = tmp_path / "broken.jpg"
    img.write_bytes(b"\xff\xd8not really a jpeg")
    r = run_cli("classify", net, img, "--weights", os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "lenet_iter_10000.caffemodel"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "decode" in lines[-1] and lines[-1].startswith("resnetc: error:")
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in r.stderr
