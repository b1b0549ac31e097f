"""pycaffe compatibility (``from resnetc.compat import caffe``): classic pycaffe scripts, unchanged but for the
import line, against real Caffe's numbers (../shared/oracle) and against resnetc's own net API."""
from __future__ import annotations

import os
import runpy
import shutil

import numpy as np
import pytest
import torch

from resnetc.compat import caffe

cv2 = pytest.importorskip("cv2")

LENET_DEPLOY = "ahmdtaha-mnist-deploy/mnist_deploy.prototxt"
LENET_WEIGHTS = "ahmdtaha-mnist-deploy/lenet_iter_10000.caffemodel"
CIFAR_DEPLOY = "bvlc-caffe/examples/cifar10/cifar10_quick.prototxt"
CIFAR_WEIGHTS = "ikkichung-prediction-example/examples/cifar10/cifar10_quick_iter_5000.caffemodel"


# ---- the oracle's own pycaffe script --------------------------------------------------------------------------


def test_oracle_lenet_script_runs_unchanged(oracle, tmp_path, monkeypatch):
    """oracle/scripts/lenet_ref.py is the pycaffe script that made oracle/lenet with real Caffe: run it with only
    its import line changed; every blob, blob diff (in-place ReLU included) and param diff it saves matches."""
    src = open(os.path.join(oracle, "scripts", "lenet_ref.py")).read()
    assert "\nimport caffe\n" in src
    (tmp_path / "lenet_ref.py").write_text(src.replace("\nimport caffe\n", "\nfrom resnetc.compat import caffe\n"))
    shutil.copy(os.path.join(oracle, "lenet", "lenet_ref.prototxt"), tmp_path)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "lenet_ref.py"), run_name="__main__")
    for name in ("lenet_forward.npz", "lenet_backward.npz"):
        ours, ref = np.load(tmp_path / name), np.load(os.path.join(oracle, "lenet", name))
        assert sorted(ours.files) == sorted(ref.files), name
        for key in ref.files:
            if ref[key].dtype.kind in "US":
                assert list(ours[key]) == list(ref[key]), key
            else:
                np.testing.assert_allclose(ours[key], ref[key], rtol=1e-5, atol=2e-6, err_msg=f"{name}: {key}")


# ---- net surgery ------------------------------------------------------------------------------------------------

FULLY_CONV_LENET = """name: "LeNetFullConv"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 36 dim: 36 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 stride: 1 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1-conv" type: "Convolution" bottom: "pool2" top: "ip1-conv"
  convolution_param { num_output: 500 kernel_size: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1-conv" top: "ip1-conv" }
layer { name: "ip2-conv" type: "Convolution" bottom: "ip1-conv" top: "ip2-conv"
  convolution_param { num_output: 10 kernel_size: 1 } }
layer { name: "prob" type: "Softmax" bottom: "ip2-conv" top: "prob" }
"""


def test_net_surgery(corpus, tmp_path):
    """examples/net_surgery.ipynb's flows on the real trained LeNet: edit params in numpy, save, reload; cast the
    InnerProduct layers into convolutions of a fully-convolutional net."""
    model, weights = os.path.join(corpus, LENET_DEPLOY), os.path.join(corpus, LENET_WEIGHTS)
    rs = np.random.RandomState(0)
    digits = rs.rand(1, 1, 36, 36).astype(np.float32)

    # -- the script, as written for pycaffe
    net = caffe.Net(model, weights, caffe.TEST)
    before = net.forward(data=digits[:, :, :28, :28])["loss"].copy()
    net.params["conv1"][0].data[0] = 0                    # zero the first filter
    net.params["ip2"][1].data[...] += 1.5                 # and shift a bias
    net.forward(data=digits[:, :, :28, :28])
    conv1_map0 = net.blobs["conv1"].data[0, 0].copy()
    after = net.blobs["loss"].data.copy()
    net.save(str(tmp_path / "edited.caffemodel"))
    reloaded = caffe.Net(model, caffe.TEST, weights=str(tmp_path / "edited.caffemodel"))
    again = reloaded.forward(data=digits[:, :, :28, :28])["loss"].copy()

    net_full_conv = caffe.Net(str(_write(tmp_path / "full_conv.prototxt", FULLY_CONV_LENET)),
                              str(tmp_path / "edited.caffemodel"), caffe.TEST)
    params = ["ip1", "ip2"]
    params_full_conv = ["ip1-conv", "ip2-conv"]
    fc_params = {pr: (net.params[pr][0].data, net.params[pr][1].data) for pr in params}
    conv_params = {pr: (net_full_conv.params[pr][0].data, net_full_conv.params[pr][1].data) for pr in params_full_conv}
    for pr, pr_conv in zip(params, params_full_conv):
        conv_params[pr_conv][0].flat = fc_params[pr][0].flat   # flat unrolled arrays
        conv_params[pr_conv][1][...] = fc_params[pr][1]
    net_full_conv.save(str(tmp_path / "full_conv.caffemodel"))
    net_full_conv.blobs["data"].data[...] = digits
    out = net_full_conv.forward()
    # -- checks
    assert np.all(conv1_map0 == net.params["conv1"][1].data[0])          # a zero filter gives its bias everywhere
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(again, after)
    for name in net.params:
        for i in range(2):
            np.testing.assert_array_equal(reloaded.params[name][i].data, net.params[name][i].data)
    assert out["prob"].shape == (1, 10, 3, 3)
    for i, j in [(0, 0), (1, 2), (2, 1)]:  # output (i, j) sees the 28x28 window at (4i, 4j): the classifier's answer
        window = digits[:, :, 4 * i:4 * i + 28, 4 * j:4 * j + 28]
        np.testing.assert_allclose(out["prob"][0, :, i, j], net.forward(data=window)["loss"][0], rtol=1e-4, atol=1e-6)
    fresh = caffe.Net(str(tmp_path / "full_conv.prototxt"), str(tmp_path / "full_conv.caffemodel"), caffe.TEST)
    np.testing.assert_array_equal(fresh.params["ip1-conv"][0].data.reshape(500, -1), net.params["ip1"][0].data)


def test_net_structure_follows_pycaffe(oracle):
    net = caffe.Net(os.path.join(oracle, "lenet", "lenet_ref.prototxt"), caffe.TRAIN)
    assert net.inputs == ["data", "label"] and net.outputs == ["loss"]
    assert list(net.blobs) == ["data", "label", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "loss"]
    assert list(net.params) == ["conv1", "conv2", "ip1", "ip2"]
    assert [l.type for l in net.layers][:3] == ["Input", "Input", "Convolution"]
    assert list(net._layer_names) == list(np.load(os.path.join(oracle, "lenet", "lenet_forward.npz"))[
        "layer_order_train"])
    assert net.top_names["relu1"] == ["ip1"] and net.bottom_names["loss"] == ["ip2", "label"]
    assert net.blob_loss_weights["loss"] == 1.0 and net.blob_loss_weights["ip2"] == 0.0
    assert net.blobs["data"].num == 4 and net.blobs["data"].channels == 1 and net.blobs["label"].shape == (4,)
    with pytest.raises(ValueError, match="do not match net inputs"):
        net.forward(data=np.zeros((4, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="not batch sized"):
        net.forward(data=np.zeros((2, 1, 28, 28), np.float32), label=np.zeros(2, np.float32))
    net.blobs["data"].reshape(2, 1, 28, 28)
    net.blobs["label"].reshape(2)
    out = net.forward(data=np.zeros((2, 1, 28, 28), np.float32), label=np.zeros(2, np.float32))
    assert net.blobs["ip2"].data.shape == (2, 10) and out["loss"].shape == ()


# ---- classification -----------------------------------------------------------------------------------------------


def test_classification_flow(corpus, tmp_path):
    """examples/00-classification.ipynb's flow on the real CIFAR-10 quick model: Transformer + load_image + forward
    + top-5; the input and the scores equal a hand-made BGR-minus-mean array run through resnetc itself."""
    import resnetc

    model, weights = os.path.join(corpus, CIFAR_DEPLOY), os.path.join(corpus, CIFAR_WEIGHTS)
    rs = np.random.RandomState(3)
    bgr = rs.randint(0, 256, size=(32, 32, 3)).astype(np.uint8)
    bgr[8:24, 8:24] = (20, 200, 60)
    image_path = str(tmp_path / "image.png")
    cv2.imwrite(image_path, bgr)

    # -- the script, as written for pycaffe
    caffe.set_mode_cpu()
    net = caffe.Net(model, weights, caffe.TEST)
    mu = np.array([104.0, 117.0, 123.0])  # BGR mean pixel
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))     # move image channels to outermost dimension
    transformer.set_mean("data", mu)                 # subtract the dataset-mean value in each channel
    transformer.set_raw_scale("data", 255)           # rescale from [0, 1] to [0, 255]
    transformer.set_channel_swap("data", (2, 1, 0))  # swap channels from RGB to BGR
    net.blobs["data"].reshape(2, 3, 32, 32)
    image = caffe.io.load_image(image_path)
    transformed_image = transformer.preprocess("data", image)
    net.blobs["data"].data[...] = transformed_image
    output = net.forward()
    output_prob = output["prob"][0]
    top_inds = output_prob.argsort()[::-1][:5]
    # -- checks
    assert image.shape == (32, 32, 3) and image.dtype == np.float32 and image.max() <= 1.0
    np.testing.assert_allclose(image, bgr[:, :, ::-1] / 255.0, atol=1e-7)
    expected_in = (bgr.astype(np.float32) - mu.astype(np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(transformed_image, expected_in, atol=1e-4)
    assert output["prob"].shape == (2, 10)
    np.testing.assert_array_equal(output["prob"][0], output["prob"][1])
    ref = resnetc.load_net(model, weights=weights)
    with torch.no_grad():
        ref_prob = ref(data=torch.from_numpy(expected_in[None].copy()))["prob"][0].numpy()
    np.testing.assert_allclose(output_prob, ref_prob, rtol=1e-4, atol=1e-6)
    assert list(top_inds) == list(np.argsort(-ref_prob, kind="stable")[:5])
    back = transformer.deprocess("data", transformed_image)
    np.testing.assert_allclose(back, image, atol=1e-6)


def test_transformer_checks_and_mean_shapes():
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    with pytest.raises(Exception, match="Transpose order"):
        t.set_transpose("data", (2, 0))
    with pytest.raises(Exception, match="Channel swap"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="Mean shape incompatible"):
        t.set_mean("data", np.zeros((3, 2, 2)))
    with pytest.raises(Exception, match="not one of the net inputs"):
        t.preprocess("label", np.zeros((4, 5, 3)))
    t.set_transpose("data", (2, 0, 1))
    t.set_mean("data", np.arange(60, dtype=np.float64).reshape(3, 4, 5) / 7)  # elementwise mean, float64
    img = np.random.RandomState(0).rand(4, 5, 3).astype(np.float32)
    keep = img.copy()
    out = t.preprocess("data", img)
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(img, keep)  # the caller's image is not modified
    np.testing.assert_array_equal(out, (img.transpose(2, 0, 1) - np.arange(60).reshape(3, 4, 5) / 7).astype(np.float32))
    blob = caffe.io.array_to_blobproto(np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), np.arange(6).reshape(1, 2, 3))
    d = caffe.io.array_to_datum(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), label=7)
    np.testing.assert_array_equal(caffe.io.datum_to_array(d), np.arange(24).reshape(2, 3, 4))
    assert d.label == 7


def test_load_image_grey_and_colour(tmp_path):
    grey = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    assert caffe.io.load_image(str(tmp_path / "g.png")).shape == (3, 4, 3)
    g = caffe.io.load_image(str(tmp_path / "g.png"), color=False)
    assert g.shape == (3, 4, 1)
    np.testing.assert_allclose(g[:, :, 0], grey / 255.0, atol=1e-7)
    from resnetc.errors import ResnetcError

    with pytest.raises(ResnetcError, match="cannot read"):
        caffe.io.load_image(str(tmp_path / "missing.png"))


# ---- solver stepping ------------------------------------------------------------------------------------------------

TOY_NET = """name: "Toy"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "train_lmdb" backend: LMDB batch_size: 16 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "test_lmdb" backend: LMDB batch_size: 32 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "score" type: "InnerProduct" bottom: "pool" top: "score"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""

TOY_SOLVER = """net: "toy.prototxt"
test_iter: 2
test_interval: 1000
base_lr: 0.05
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
display: 0
max_iter: 40
snapshot: 0
snapshot_after_train: false
random_seed: 1
solver_mode: CPU
"""


def _toy_lmdb(path, n, seed):
    """8x8 grey images: class 0 bright in the top half, class 1 in the bottom half, plus noise."""
    from resnetc.data.datum import array_to_datum
    from resnetc.data.db import write_db

    rs = np.random.RandomState(seed)
    with write_db(str(path)) as db:
        for k in range(n):
            label = k % 2
            img = rs.randint(0, 90, size=(1, 8, 8))
            img[0, 4 * label:4 * label + 4] += 140
            db.put(f"{k:08d}", array_to_datum(img.astype(np.uint8), label).SerializeToString())


@pytest.fixture
def toy_solver_dir(tmp_path, monkeypatch):
    _toy_lmdb(tmp_path / "train_lmdb", 64, 0)
    _toy_lmdb(tmp_path / "test_lmdb", 64, 1)
    _write(tmp_path / "toy.prototxt", TOY_NET)
    _write(tmp_path / "solver.prototxt", TOY_SOLVER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_solver_stepping_flow(toy_solver_dir):
    """examples/01-learning-lenet.ipynb's loop: step(1), read the loss blob, run a test batch."""
    solver = caffe.SGDSolver("solver.prototxt")
    assert [(k, v.data.shape) for k, v in solver.net.blobs.items()][:2] == [("data", (16, 1, 8, 8)), ("label", (16,))]
    assert list(solver.net.params) == ["conv", "score"] and len(solver.test_nets) == 1

    losses, batch_check = [], None
    niter = 25
    for it in range(niter):
        w = {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()}
        solver.step(1)  # SGD by Caffe
        losses.append(solver.net.blobs["loss"].data.copy())
        if it == 3:  # the loss blob is the loss of that step: the batch in the data blobs, the weights before it
            batch_check = (w, solver.net.blobs["data"].data.copy(), solver.net.blobs["label"].data.copy(),
                           losses[-1])
    solver.test_nets[0].forward()  # test net (there can be more than one)
    accuracy = float(solver.test_nets[0].blobs["accuracy"].data)

    assert solver.iter == niter
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    assert accuracy >= 0.9
    for name, blobs in solver.net.params.items():  # the test net shares the trained weights (since the first test)
        for a, b in zip(blobs, solver.test_nets[0].params[name]):
            np.testing.assert_array_equal(a.data, b.data)
    w, data, label, loss = batch_check
    np.testing.assert_allclose(_toy_loss(w, data, label), loss, rtol=1e-5)


def _toy_loss(w, data, label):
    """TOY_NET's loss with numpy/torch from scratch."""
    import torch.nn.functional as F

    x = torch.from_numpy(data)
    conv = F.relu(F.conv2d(x, torch.from_numpy(w["conv"][0]), torch.from_numpy(w["conv"][1])))
    pool = F.max_pool2d(conv, 2, 2, ceil_mode=True)
    score = pool.reshape(len(x), -1) @ torch.from_numpy(w["score"][0]).T + torch.from_numpy(w["score"][1])
    return float(F.cross_entropy(score, torch.from_numpy(label).long()))


def test_net_with_data_layers_reads_batches(toy_solver_dir):
    """caffe.Net on a train_val net: each forward() reads the next batch of its Data layer, as in Caffe."""
    net = caffe.Net("toy.prototxt", caffe.TEST)
    assert net.inputs == [] and net.outputs == ["accuracy", "loss"]
    out = net.forward()
    assert set(out) == {"accuracy", "loss"} and net.blobs["data"].data.shape == (32, 1, 8, 8)
    np.testing.assert_array_equal(net.blobs["label"].data, np.arange(32) % 2)
    first = net.blobs["data"].data.copy()
    net.forward()
    assert not np.array_equal(net.blobs["data"].data, first)  # records 32..63
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, first)  # wrapped around


def test_solver_types_and_input_blobs(toy_solver_dir):
    """caffe.AdamSolver(file) is Adam whatever the file says; get_solver follows the file; a train net with Input
    layers trains on what the script writes into its input blobs."""
    assert caffe.AdamSolver("solver.prototxt").param.type == "Adam"
    assert caffe.get_solver("solver.prototxt").param.type == "SGD"
    net = TOY_NET.split('layer { name: "conv"')[1]
    _write(toy_solver_dir / "toy_input.prototxt",
           'layer { name: "data" type: "Input" top: "data" top: "label" input_param { shape { dim: 16 dim: 1 dim: 8 '
           'dim: 8 } shape { dim: 16 } } }\nlayer { name: "conv"' + net.replace("include { phase: TEST }", ""))
    _write(toy_solver_dir / "solver_input.prototxt",
           TOY_SOLVER.replace("toy.prototxt", "toy_input.prototxt").replace("test_iter: 2\ntest_interval: 1000\n", ""))
    solver = caffe.SGDSolver("solver_input.prototxt")
    rs = np.random.RandomState(5)
    losses = []
    for it in range(20):
        label = rs.randint(0, 2, size=16)
        data = rs.rand(16, 1, 8, 8).astype(np.float32) * 0.3
        for k, c in enumerate(label):
            data[k, 0, 4 * c:4 * c + 4] += 0.6
        solver.net.blobs["data"].data[...] = data
        solver.net.blobs["label"].data[...] = label
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
        np.testing.assert_array_equal(solver.net.blobs["data"].data, data)
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:3]), losses


# ---- NetSpec, unsupported calls --------------------------------------------------------------------------------------


def test_netspec_through_caffe_names(tmp_path):
    """examples/01-learning-lenet.ipynb writes its net with caffe.NetSpec / caffe.layers / caffe.params."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 12, 12]))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=4, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool1, num_output=10, weight_filler=dict(type="xavier"))
    n.prob = L.Softmax(n.ip1)
    path = _write(tmp_path / "spec.prototxt", str(n.to_proto()))
    assert isinstance(n.to_proto(), caffe.proto.caffe_pb2.NetParameter)
    net = caffe.Net(str(path), caffe.TEST)
    assert list(net.params) == ["conv1", "ip1"] and net.outputs == ["prob"]
    assert net.forward(data=np.zeros((2, 1, 12, 12), np.float32))["prob"].shape == (2, 10)


def test_unsupported_calls_name_the_closest_supported(oracle):
    net = caffe.Net(os.path.join(oracle, "lenet", "lenet_ref.prototxt"), caffe.TEST)
    with pytest.raises(NotImplementedError, match=r"Net.forward\(start=..., end=...\).*closest supported call is "
                                                  r"Net.forward\(\*\*inputs\)"):
        net.forward(start="conv1")
    with pytest.raises(NotImplementedError, match=r"Net.backward\(\*\*top_diffs\)"):
        net.backward(end="conv1")
    with pytest.raises(NotImplementedError, match=r"Net.forward_backward_all.*Net.forward_all"):
        net.forward_backward_all(data=np.zeros((4, 1, 28, 28)))
    with pytest.raises(NotImplementedError, match=r"caffe.Classifier.*caffe.Net \+ caffe.io.Transformer"):
        caffe.Classifier("deploy.prototxt", "weights.caffemodel")
    with pytest.raises(NotImplementedError, match=r"Blob.reshape.*net.blobs\[<input>\].reshape"):
        net.blobs["conv1"].reshape(1, 2, 3, 4)
    assert not hasattr(caffe, "Detector") and not hasattr(net, "after_forward")
    with pytest.raises(AttributeError, match="did you mean Net.forward"):
        net.forwrd()
    with pytest.raises(TypeError, match="needs a phase"):
        caffe.Net(os.path.join(oracle, "lenet", "lenet_ref.prototxt"))


# ---- helpers -----------------------------------------------------------------------------------------------


def _write(path, text):
    path.write_text(text)
    return path
