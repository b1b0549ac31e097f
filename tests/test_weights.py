"""Weights I/O against real Caffe files: every corpus .caffemodel loads into its prototxt and reproduces real
Caffe's outputs (oracle/real_weights) or OpenCV's importer; Caffe-written files round-trip byte for byte;
bad files give one clear line and leave the net untouched."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import resnetc
from resnetc.errors import ResnetcError
from resnetc.graph import build_graph
from resnetc.proto import caffe_pb2
from resnetc import weights as W

MTCNN = "mtcnn-kpzhang93/code/codes/MTCNNv2/model"
# (prototxt, caffemodel) inside ../shared/corpus; the oracle keys its outputs by the prototxt
REAL = [(f"{MTCNN}/det{i}.prototxt", f"{MTCNN}/det{i}.caffemodel") for i in (1, 2, 3, 4)] + [
    ("ahmdtaha-mnist-deploy/mnist_deploy.prototxt", "ahmdtaha-mnist-deploy/lenet_iter_10000.caffemodel")]
# legacy V1 file with num/channels/height/width blob dims, loaded into BVLC's deploy net of the same model
CIFAR_QUICK = ("bvlc-caffe/examples/cifar10/cifar10_quick.prototxt",
               "ikkichung-prediction-example/examples/cifar10/cifar10_quick_iter_5000.caffemodel")
LENET_W = "lenet/lenet_weights.caffemodel"


def _snapshot(net) -> dict:
    return {(name, i): p.detach().clone() for name, ps in net.params.items() for i, p in enumerate(ps)}


def _same_params(net, snap) -> bool:
    return all(torch.equal(net.params[name][i], v) for (name, i), v in snap.items())


def _lenet(oracle, phase="TRAIN"):
    return resnetc.load_net(os.path.join(oracle, "lenet", "lenet_ref.prototxt"), phase=phase, seed=1)


# ---------------------------------------------------------------------------------------------------------
# every corpus caffemodel: manifest coverage, loading, outputs


def test_every_corpus_caffemodel_is_covered(corpus):
    from conftest import corpus_manifest

    listed = {row["local_path"] for row in corpus_manifest() if row["kind"] == "weights"}
    assert listed == {w for _, w in REAL} | {CIFAR_QUICK[1]}


@pytest.mark.parametrize("proto,model", REAL, ids=[w.split("/")[-1] for _, w in REAL])
def test_real_weights_reproduce_caffe(corpus, oracle, proto, model):
    ref = json.load(open(os.path.join(oracle, "real_weights", "outputs.json")))[proto]
    net = resnetc.load_net(os.path.join(corpus, proto), weights=os.path.join(corpus, model))
    with torch.no_grad():
        outs = net(**{k: torch.tensor(np.array(v, dtype=np.float32)) for k, v in ref["ins"].items()})
    assert set(outs) == set(ref["outs"]), model
    for k, v in ref["outs"].items():
        want = np.array(v, dtype=np.float32)
        got = outs[k].numpy().reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{model} output {k}")


@pytest.mark.parametrize("proto,model", REAL, ids=[w.split("/")[-1] for _, w in REAL])
def test_real_weights_match_opencv(corpus, oracle, proto, model):
    """OpenCV's Caffe importer is an implementation independent of ours and of the oracle's."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Caffe importer (removed in 5.0; the test extra pins <5)")
    ins = json.load(open(os.path.join(oracle, "real_weights", "outputs.json")))[proto]["ins"]
    x = {k: np.array(v, dtype=np.float32) for k, v in ins.items()}
    ref_net = cv2.dnn.readNetFromCaffe(os.path.join(corpus, proto), os.path.join(corpus, model))
    net = resnetc.load_net(os.path.join(corpus, proto), weights=os.path.join(corpus, model))
    with torch.no_grad():
        outs = net(**{k: torch.from_numpy(v) for k, v in x.items()})
    for k, v in x.items():
        ref_net.setInput(v, k)
    names = sorted(outs)
    for name, want in zip(names, ref_net.forward(names)):
        got = outs[name].numpy()
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5, err_msg=f"{model} {name}")


def test_legacy_v1_caffemodel_matches_opencv(corpus):
    cv2 = pytest.importorskip("cv2")
    proto, model = (os.path.join(corpus, p) for p in CIFAR_QUICK)
    x = np.random.RandomState(0).rand(1, 3, 32, 32).astype(np.float32)
    if not hasattr(cv2.dnn, "readNetFromCaffe"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Caffe importer (removed in 5.0; the test extra pins <5)")
    ref_net = cv2.dnn.readNetFromCaffe(proto, model)
    ref_net.setInput(x, "data")
    want = ref_net.forward("prob")
    net = resnetc.load_net(proto, weights=model)
    # legacy dims: ip1's weight is stored as 1x1x64x1024 and lands in a 64x1024 parameter
    assert tuple(net.params["ip1"][0].shape) == (64, 1024)
    with torch.no_grad():
        got = net(data=torch.from_numpy(x))["prob"].numpy()
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-6)


def test_load_reports_copied_ignored_and_missing(corpus, caplog):
    """det1's file comes from the TRAIN net: its data/loss layers are ignored; a net layer the file lacks
    keeps its fillers and is named in one log line."""
    text = open(os.path.join(corpus, REAL[0][0])).read()
    text += ('layer { name: "extra" type: "Convolution" bottom: "conv4-2" top: "extra" '
             'convolution_param { num_output: 2 kernel_size: 1 } }\n')
    path = os.path.join(os.path.dirname(os.path.join(corpus, REAL[0][0])), "det1.prototxt")
    net = resnetc.load_net(resnetc.prototxt.parse_net_text(text, path))
    with caplog.at_level("INFO", logger="resnetc.weights"):
        result = resnetc.load_caffemodel(net, os.path.join(corpus, REAL[0][1]))
    copied, skipped = result
    assert copied == ["conv1", "PReLU1", "conv2", "PReLU2", "conv3", "PReLU3", "conv4-1", "conv4-2"]
    assert "data12" in skipped and "loss1" in skipped and "Ignoring source layer data12" in caplog.text
    assert result.missing == ["extra"]
    assert sum("keep their initial" in r.message and "extra" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------------------------------------------------
# round trips


def test_lenet_weights_round_trip_byte_for_byte(oracle, tmp_path):
    """Caffe saved this file from the TRAIN net of lenet_ref.prototxt: ToProto gives the same bytes
    (phase filled, loss_weight: 1 on the loss layer, no force_backward / input fields)."""
    src = os.path.join(oracle, LENET_W)
    net = _lenet(oracle)
    resnetc.load_caffemodel(net, src)
    out = tmp_path / "out.caffemodel"
    resnetc.save_caffemodel(net, out)
    assert out.read_bytes() == open(src, "rb").read()
    assert W.net_to_proto(net).SerializeToString() == open(src, "rb").read()


def test_solver_init_round_trip_byte_for_byte(oracle, tmp_path):
    """init.caffemodel: pycaffe's net.save of the TRAIN net of train_val.prototxt (Data layer included)."""
    src = os.path.join(oracle, "solver", "init.caffemodel")
    graph = build_graph(os.path.join(oracle, "solver", "train_val.prototxt"), "TRAIN",
                        input_shapes={"data": (32, 1, 28, 28), "label": (32,)})
    params = W.fresh_params(graph, seed=3)
    W.load_weights(graph, params, W.read_weights(src))
    out = tmp_path / "init.caffemodel"
    W.save_graph_caffemodel(graph, params, out)
    assert out.read_bytes() == open(src, "rb").read()


def _blobs_by_layer(path) -> dict:
    return {l.name: [(b.natural_shape(), b.data) for b in l.blobs] for l in W.read_weights(path).layers if l.blobs}


@pytest.mark.parametrize("proto,model", REAL + [CIFAR_QUICK], ids=[w.split("/")[-1] for _, w in REAL + [CIFAR_QUICK]])
def test_corpus_round_trip_keeps_every_blob(corpus, tmp_path, proto, model):
    """caffemodel -> CaffeNet -> caffemodel: same layers with blobs, same values; shapes are the net's
    (a legacy 1x1xNxK blob comes back as NxK, as Caffe's ToProto writes it)."""
    net = resnetc.load_net(os.path.join(corpus, proto), weights=os.path.join(corpus, model))
    out = tmp_path / "rt.caffemodel"
    resnetc.save_caffemodel(net, out)
    before, after = _blobs_by_layer(os.path.join(corpus, model)), _blobs_by_layer(out)
    # the files come from TRAIN nets: a train-only layer (det2/det3's conv5-3 ...) is not in the deploy net
    assert sorted(after) == sorted(n for n in before if n in net.params) == sorted(net.params)
    for name, blobs in after.items():
        for i, ((shape0, v0), (shape1, v1)) in enumerate(zip(before[name], blobs)):
            assert shape1 == tuple(net.params[name][i].shape)
            assert np.prod(shape0) == np.prod(shape1)
            assert np.array_equal(v0, v1), f"{model} {name}/{i}"


def test_convert_caffemodel_pt_safetensors_h5_and_back(corpus, tmp_path, run_cli):
    proto, model = (os.path.join(corpus, p) for p in CIFAR_QUICK)
    pt, st, h5 = tmp_path / "w.pt", tmp_path / "w.safetensors", tmp_path / "w.caffemodel.h5"
    back = tmp_path / "back.caffemodel"
    for args in [(model, pt), (pt, st), (st, h5, "--net", proto), (h5, back, "--net", proto)]:
        r = run_cli("convert", *args)
        assert r.returncode == 0, r.stderr
    sd = torch.load(pt, weights_only=True)
    assert tuple(sd["ip1/0"].shape) == (1, 1, 64, 1024)  # no net: the file's own (legacy 4-D) shape
    before, after = _blobs_by_layer(model), _blobs_by_layer(back)
    assert sorted(before) == sorted(after)
    for name in before:
        for (_, v0), (_, v1) in zip(before[name], after[name]):
            assert np.array_equal(v0, v1)
    # the written caffemodel is what ToProto of the net gives
    net = resnetc.load_net(proto, weights=str(back))
    assert W.net_to_proto(net).SerializeToString() == back.read_bytes()


def test_v1_caffemodel_converts_to_v2_without_a_net(corpus, tmp_path):
    model = os.path.join(corpus, CIFAR_QUICK[1])
    out = tmp_path / "v2.caffemodel"
    W.convert(model, out)
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString(out.read_bytes())
    assert not len(msg.layers) and [l.type for l in msg.layer][:3] == ["Data", "Convolution", "Pooling"]
    conv1 = msg.layer[1]
    assert list(conv1.blobs[0].shape.dim) == [32, 3, 5, 5] and not conv1.blobs[0].HasField("num")
    assert [p.lr_mult for p in conv1.param] == [1, 2]  # blobs_lr upgraded to param specs


def test_hdf5_round_trip_owner_params_only(oracle, tmp_path):
    h5py = pytest.importorskip("h5py")
    text = open(os.path.join(oracle, "lenet", "lenet_ref.prototxt")).read()
    # a second layer shares ip2's weight (param name "w2")
    text = text.replace('top: "ip2"\n  param { lr_mult: 1 }', 'top: "ip2"\n  param { name: "w2" lr_mult: 1 }', 1)
    text += ('layer { name: "ip2b" type: "InnerProduct" bottom: "ip1" top: "ip2b" param { name: "w2" } '
             'inner_product_param { num_output: 10 bias_term: false } }\n')
    net = resnetc.load_net(resnetc.prototxt.parse_net_text(text, "lenet_shared.prototxt"), phase="TRAIN", seed=1)
    assert net.params["ip2b"][0] is net.params["ip2"][0]
    out = tmp_path / "w.caffemodel.h5"
    resnetc.weights.save_caffemodel_h5(net, out)
    with h5py.File(out, "r") as f:
        assert sorted(f["data"]) == sorted(l.name for l in net.graph.layers)  # a group per layer
        assert list(f["data/conv1"]) == ["0", "1"] and f["data/ip1/0"].shape == (500, 800)
        assert list(f["data/ip2b"]) == [] and list(f["data/relu1"]) == []  # shared blobs: owner only
    net2 = resnetc.load_net(resnetc.prototxt.parse_net_text(text, "lenet_shared.prototxt"), phase="TRAIN", seed=2)
    resnetc.load_caffemodel(net2, out)  # detected by content, not by name
    for name, ps in net.params.items():
        for a, b in zip(ps, net2.params[name]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear line, nothing half-loaded


def _corrupt_copies(src, tmp_path):
    data = open(src, "rb").read()
    cases = {
        "truncated_half": data[: len(data) // 2],
        "truncated_last_byte": data[:-1],
        "truncated_header": data[:3],
        "empty": b"",
        # after the 7-byte name field: the first layer's 2-byte tag, then its length varint (one byte)
        "bitflip_layer_length": data[:9] + bytes([data[9] ^ 0x80]) + data[10:],
        "bitflip_tag": data[:7] + bytes([data[7] ^ 0x04]) + data[8:],
        "text_prototxt": b'name: "LeNet"\nlayer { name: "x" }\n',
    }
    paths = {}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.caffemodel"
        p.write_bytes(blob)
        paths[name] = p
    return paths


def test_corrupt_files_give_one_line_and_leave_the_net_untouched(oracle, tmp_path):
    net = _lenet(oracle)
    snap = _snapshot(net)
    for name, path in _corrupt_copies(os.path.join(oracle, LENET_W), tmp_path).items():
        with pytest.raises(ResnetcError) as e:
            resnetc.load_caffemodel(net, path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg, name
        assert _same_params(net, snap), f"{name}: net changed"


def test_every_single_bit_flip_in_the_layer_headers_is_an_error_or_a_clean_load(oracle, tmp_path):
    """A flip inside float values cannot be detected (the format has no checksum, Caffe neither); a flip
    in the structure must never give a traceback or a partly loaded net."""
    data = open(os.path.join(oracle, LENET_W), "rb").read()
    net = _lenet(oracle)
    path = tmp_path / "flip.caffemodel"
    outcomes = {"error": 0, "loaded": 0}
    for pos in range(130):  # the net's name, the two Input layers and conv1's header
        for bit in (0, 3, 7):
            path.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:])
            snap = _snapshot(net)
            try:
                resnetc.load_caffemodel(net, path)
                outcomes["loaded"] += 1
            except ResnetcError as e:
                assert "\n" not in str(e)
                assert _same_params(net, snap), f"byte {pos} bit {bit}: partly loaded"
                outcomes["error"] += 1
    assert outcomes["error"] > 100


def test_shape_mismatch_names_file_layer_blob_and_both_shapes(oracle, tmp_path):
    text = open(os.path.join(oracle, "lenet", "lenet_ref.prototxt")).read().replace("num_output: 500",
                                                                                     "num_output: 400")
    net = resnetc.load_net(resnetc.prototxt.parse_net_text(text, "lenet400.prototxt"), phase="TRAIN", seed=1)
    snap = _snapshot(net)
    src = os.path.join(oracle, LENET_W)
    with pytest.raises(ResnetcError) as e:
        resnetc.load_caffemodel(net, src)
    msg = str(e.value)
    assert src in msg and "layer 'ip1'" in msg and "blob 0" in msg
    assert "500x800" in msg and "400x800" in msg and "rename the layer" in msg
    assert _same_params(net, snap)  # conv1 and conv2 (before ip1 in the file) were not copied either
    # strict_shapes=False does not make different counts fit
    with pytest.raises(ResnetcError):
        resnetc.load_caffemodel(net, src, strict_shapes=False)


def test_blob_count_mismatch(oracle, tmp_path):
    text = open(os.path.join(oracle, "lenet", "lenet_ref.prototxt")).read()
    text = text.replace("param { lr_mult: 1 } param { lr_mult: 2 }\n  inner_product_param { num_output: 10",
                        "inner_product_param { num_output: 10 bias_term: false", 1)
    net = resnetc.load_net(resnetc.prototxt.parse_net_text(text, "nobias.prototxt"), phase="TRAIN", seed=1)
    with pytest.raises(ResnetcError, match=r"layer 'ip2'.*the file has 2, the net's layer has 1"):
        resnetc.load_caffemodel(net, os.path.join(oracle, LENET_W))


def test_file_matching_no_layer_is_an_error(oracle, tmp_path):
    """Caffe would ignore every layer and run on fillers; a file none of whose weights fits is an error."""
    msg = caffe_pb2.NetParameter(name="other")
    for name in ("fc_a", "fc_b"):
        bp = msg.layer.add(name=name, type="InnerProduct").blobs.add()
        bp.shape.dim.append(3)
        bp.data.extend([1.0, 2.0, 3.0])
    path = tmp_path / "other.caffemodel"
    path.write_bytes(msg.SerializeToString())
    net = _lenet(oracle)
    snap = _snapshot(net)
    with pytest.raises(ResnetcError, match=r"no layer with weights in the file matches.*fc_a, fc_b.*conv1"):
        resnetc.load_caffemodel(net, path)
    assert _same_params(net, snap)


def test_cli_bad_inputs_exit_2_with_one_line(oracle, corpus, tmp_path, run_cli):
    proto = os.path.join(oracle, "lenet", "lenet_ref.prototxt")
    bad = _corrupt_copies(os.path.join(oracle, LENET_W), tmp_path)
    torch.save({"conv1/0": torch.zeros(20, 1, 5, 5), "conv1/1": torch.zeros(20), "nosuchlayer/0": torch.zeros(3)}, tmp_path / "unknown.pt")
    torch.save({"conv1/0": torch.zeros(20, 1, 3, 3), "conv1/1": torch.zeros(20)}, tmp_path / "shape.pt")
    cases = [
        ((bad["truncated_half"], tmp_path / "o.pt"), "truncated"),
        ((bad["bitflip_layer_length"], tmp_path / "o.pt"), "not a valid binary NetParameter"),
        ((tmp_path / "unknown.pt", tmp_path / "o.caffemodel", "--net", proto, "--phase", "TRAIN"), "nosuchlayer"),
        ((tmp_path / "shape.pt", tmp_path / "o.caffemodel", "--net", proto, "--phase", "TRAIN"), "20x1x3x3"),
        ((tmp_path / "shape.pt", tmp_path / "o.caffemodel"), "--net"),
    ]
    for args, expect in cases:
        r = run_cli("-q", "convert", *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("resnetc: error:") and expect in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "o.caffemodel").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_missing_h5py_is_a_clear_error(oracle, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    net = _lenet(oracle)
    with pytest.raises(ResnetcError, match="needs the h5py package"):
        resnetc.weights.save_caffemodel_h5(net, tmp_path / "x.caffemodel.h5")


def test_prototxt_blobs_are_checked_with_the_same_rule():
    bp = caffe_pb2.BlobProto(num=1, channels=1, height=4, width=3)
    bp.data.extend(range(12))
    W.check_blob_shape(bp, torch.zeros(4, 3), "ip", 0, "n.prototxt")  # legacy 4-D vs 2-D target: fits
    assert W.blobproto_to_array(bp).shape == (1, 1, 4, 3)
    with pytest.raises(ResnetcError, match=r"n.prototxt: layer 'ip': cannot copy blob 0.*1x1x4x3.*3x4"):
        W.check_blob_shape(bp, torch.zeros(3, 4), "ip", 0, "n.prototxt")
    bp2 = caffe_pb2.BlobProto()
    bp2.shape.dim.extend([4, 3])
    bp2.data.extend(range(11))
    with pytest.raises(ResnetcError, match="11 values"):
        W.check_blob_shape(bp2, torch.zeros(4, 3), "ip", 0, "n.prototxt")
