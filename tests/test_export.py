"""ONNX export: every corpus net resnetc supports exports, passes onnx.checker and matches PyTorch in
onnxruntime (export_onnx verifies before writing); bad input is one clear line with nothing left behind."""
import gzip
import json
import os
import re

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
MTCNN = "mtcnn-kpzhang93/code/codes/MTCNNv2/model/"
REAL_WEIGHTS = {
    **{f"{MTCNN}det{i}.prototxt": f"{MTCNN}det{i}.caffemodel" for i in (1, 2, 3, 4)},
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
    lenet_w = os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "lenet_iter_10000.caffemodel")
    r = run_cli("classify", net, img, "--weights", lenet_w)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "decode" in lines[-1] and lines[-1].startswith("resnetc: error:")
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------------------
# --fp16

LRN_NET = """name: "lrn16"
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "constant" value: 0.1 } } }
layer { name: "norm1" type: "LRN" bottom: "conv" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "norm2" type: "LRN" bottom: "norm1" top: "norm2" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "pool" type: "Pooling" bottom: "norm2" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def _float_types(model):
    from onnx import TensorProto

    kinds = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
    return ({kinds.get(t.data_type) for t in model.graph.initializer if t.data_type in kinds},
            [kinds.get(v.type.tensor_type.elem_type) for v in model.graph.input],
            [kinds.get(v.type.tensor_type.elem_type) for v in model.graph.output])


def test_fp16_export_runs_on_the_cpu_verified_against_float32(run_cli, tmp_path):
    """--fp16 converts the float32 export (weights, activations, inputs, outputs) and checks it in onnxruntime's
    CPU provider against the float32 PyTorch net with the float16 tolerance (1e-2 of max(1, |output|))."""
    require_shared()
    import torch

    import resnetc

    net = os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "mnist_deploy.prototxt")
    w = os.path.join(CORPUS, "ahmdtaha-mnist-deploy", "lenet_iter_10000.caffemodel")
    out16, out32 = tmp_path / "lenet16.onnx", tmp_path / "lenet32.onnx"
    r = run_cli("export", "--onnx", net, "--weights", w, "-o", out16, "--fp16")
    assert r.returncode == 0, r.stderr
    assert "float16" in r.stdout and "vs PyTorch float32" in r.stdout and "tolerance 0.01" in r.stdout
    diff = float(re.search(r"max rel diff ([\d.e+-]+)", r.stdout).group(1))
    assert diff < 1e-2
    export_onnx(net, str(out32), weights=w)
    model = onnx.load(str(out16))
    assert _float_types(model) == ({"float16"}, ["float16"], ["float16"])
    assert os.path.getsize(out16) < 0.6 * os.path.getsize(out32)
    # float32 arrays go in (the session casts them); float16 comes out, close to PyTorch float32
    x = np.random.RandomState(5).rand(6, 1, 28, 28).astype(np.float32)
    got = InferenceSession(str(out16), device="cpu")(data=x)["loss"]
    assert got.dtype == np.float16 and got.shape == (6, 10)
    with torch.no_grad():
        ref = resnetc.load_net(net, weights=w)(data=torch.from_numpy(x))["loss"].numpy()
    assert np.abs(got.astype(np.float32) - ref).max() < 1e-2
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_fp16_lrn_nets_export_and_overflow_is_one_clear_line(tmp_path):
    """LRN nets export in float16 although PyTorch's CPU has no float16 LRN (the conversion never runs torch in
    half precision); a value float16 cannot hold fails verification, or names its layer, and writes nothing."""
    spec = tmp_path / "lrn.prototxt"
    spec.write_text(LRN_NET)
    out = tmp_path / "lrn16.onnx"
    report = export_onnx(str(spec), str(out), fp16=True)
    assert out.exists() and report.fp16 and report.max_rel < 1e-2
    assert _float_types(onnx.load(str(out)))[1:] == (["float16"], ["float16"])
    # activations beyond 65504: verification fails, nothing is written
    big = tmp_path / "big.prototxt"
    big.write_text('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 512 } } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { '
                   'num_output: 4 weight_filler { type: "constant" value: 1000 } } }\n')
    with pytest.raises(ResnetcError, match="float16 overflows") as e:
        export_onnx(str(big), str(tmp_path / "big16.onnx"), fp16=True)
    assert "\n" not in str(e.value) and not (tmp_path / "big16.onnx").exists()
    export_onnx(str(big), str(tmp_path / "big32.onnx"))  # float32 holds it
    # a constant beyond 65504: the layer is named
    power = tmp_path / "power.prototxt"
    power.write_text('layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }\n'
                     'layer { name: "pow" type: "Power" bottom: "data" top: "y" power_param { scale: 100000 } }\n')
    with pytest.raises(ResnetcError, match="layer 'pow'.*beyond float16's range"):
        export_onnx(str(power), str(tmp_path / "pow16.onnx"), fp16=True)
    assert not (tmp_path / "pow16.onnx").exists()
