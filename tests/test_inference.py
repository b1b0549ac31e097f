"""Inference: `resnetc classify` (prototxt + weights and the exported .onnx give the same top-k, as an independent
engine does), `resnetc time` (Caffe's `caffe time` lines for the torch engine, latency and throughput for
onnxruntime) and the InferenceSession API (providers, Caffe blob names, one-line errors)."""
import gzip
import os
import re

import numpy as np
import pytest

from conftest import CORPUS, ORACLE, require_shared

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from resnetc.errors import ResnetcError  # noqa: E402
from resnetc.export import InferenceSession, choose_providers, export_onnx, usable_cpus  # noqa: E402

LENET = os.path.join("ahmdtaha-mnist-deploy", "mnist_deploy.prototxt")
LENET_W = os.path.join("ahmdtaha-mnist-deploy", "lenet_iter_10000.caffemodel")
DET1 = os.path.join("mtcnn-kpzhang93", "code", "codes", "MTCNNv2", "model", "det1.prototxt")
DET1_W = os.path.join("mtcnn-kpzhang93", "code", "codes", "MTCNNv2", "model", "det1.caffemodel")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MNIST_SCALE = "0.00390625"  # the LeNet was trained on pixels / 256


def _lenet():
    require_shared()
    return os.path.join(CORPUS, LENET), os.path.join(CORPUS, LENET_W)


def _digit_images(folder) -> tuple:
    """The first image of each digit of the shipped UCI digits, drawn as MNIST draws digits: 20x20 in a 28x28
    black frame, white ink; written as PNG. Returns (paths, true digits)."""
    cv2 = pytest.importorskip("cv2")
    from resnetc.data.digits import load_digits

    images, labels = load_digits()
    paths, digits = [], []
    for d in range(10):
        i = int(np.flatnonzero(labels == d)[0])
        pix = ((images[i].astype(np.uint16) * 255 + 8) // 16).astype(np.uint8)
        frame = np.zeros((28, 28), np.uint8)
        frame[4:24, 4:24] = cv2.resize(pix, (20, 20), interpolation=cv2.INTER_LINEAR)
        path = os.path.join(str(folder), f"digit{d}.png")
        assert cv2.imwrite(path, frame)
        paths.append(path)
        digits.append(d)
    return paths, digits


def _parse_classify(text: str) -> dict:
    out, cur = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            cur = line[:-1]
            out[cur] = []
            continue
        m = re.fullmatch(r"\s+(\d+)\. ([\d.]+)  (.+)  \(class (\d+)\)", line)
        assert m and cur is not None, f"unexpected classify line: {line!r}"
        assert int(m.group(1)) == len(out[cur]) + 1
        out[cur].append((int(m.group(4)), float(m.group(2)), m.group(3)))
    return out


# ------------------------------------------------------------------------------------------------------------
# classify


def test_classify_prototxt_and_onnx_give_the_same_top_k(run_cli, tmp_path):
    net, weights = _lenet()
    paths, digits = _digit_images(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(NAMES) + "\n")
    onnx_path = tmp_path / "lenet.onnx"
    export_onnx(net, str(onnx_path), weights=weights)
    common = ["--labels", labels, "--top-k", "3", "--scale", MNIST_SCALE] + paths
    r_proto = run_cli("classify", net, "--weights", weights, *common)
    r_onnx = run_cli("classify", onnx_path, *common)
    assert r_proto.returncode == 0, r_proto.stderr
    assert r_onnx.returncode == 0, r_onnx.stderr
    a, b = _parse_classify(r_proto.stdout), _parse_classify(r_onnx.stdout)
    assert list(a) == list(b) == paths
    for p in paths:
        assert len(a[p]) == len(b[p]) == 3
        assert [(i, n) for i, _, n in a[p]] == [(i, n) for i, _, n in b[p]]
        assert all(n == NAMES[i] for i, _, n in a[p])  # --labels names the classes
        assert [q for _, q, _ in a[p]] == sorted((q for _, q, _ in a[p]), reverse=True)
        assert np.allclose([q for _, q, _ in a[p]], [q for _, q, _ in b[p]], atol=2e-4)
    # a real net on real digits: most are read right (8 of these 10; a 0..16-level 8x8 scan is not MNIST)
    right = sum(a[p][0][0] == d for p, d in zip(paths, digits))
    assert right >= 7, r_proto.stdout
    # OpenCV's Caffe importer, an independent engine, gives the same probabilities for the same files
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "dnn"):
        return
    cvnet = cv2.dnn.readNetFromCaffe(net, weights)
    grey = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in paths]
    cvnet.setInput(cv2.dnn.blobFromImages(grey, scalefactor=float(MNIST_SCALE)))
    probs = cvnet.forward().reshape(len(paths), -1)
    for p, row in zip(paths, probs):
        assert [i for i, _, _ in a[p]] == list(np.argsort(-row, kind="stable")[:3])
        assert np.allclose([q for _, q, _ in a[p]], np.sort(row)[::-1][:3], atol=2e-4)


def test_classify_api_batches_fixed_batch_models_and_checks_its_arguments(tmp_path, caplog):
    from resnetc.classify import classify_images

    net, weights = _lenet()
    paths, _ = _digit_images(tmp_path)
    paths = paths[:3]
    fixed = tmp_path / "lenet_b2.onnx"
    export_onnx(net, str(fixed), weights=weights, batch=2)
    ref = classify_images(net, paths, weights=weights, scale=float(MNIST_SCALE), top_k=2)
    got = classify_images(str(fixed), paths, scale=float(MNIST_SCALE), top_k=2)  # 3 images through batch 2
    assert [p for p, _ in got] == paths
    for (_, r), (_, g) in zip(ref, got):
        assert [i for i, _, _ in r] == [i for i, _, _ in g]
        assert np.allclose([q for _, q, _ in r], [q for _, q, _ in g], atol=1e-5)
    assert all(name == str(i) for _, ranked in got for i, _, name in ranked)  # no --labels: the class index
    with pytest.raises(ResnetcError, match="carries its weights"):
        classify_images(str(fixed), paths, weights=weights)
    with pytest.raises(ResnetcError, match="needs its trained weights"):
        classify_images(net, paths)
    with pytest.raises(ResnetcError, match="top-k"):
        classify_images(str(fixed), paths, top_k=0)
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with caplog.at_level("WARNING", logger="resnetc"):
        out = classify_images(str(fixed), paths[:1], labels=str(short), top_k=10)
    assert "2 labels for 10 classes" in caplog.text
    assert len(out[0][1]) == 10


# ------------------------------------------------------------------------------------------------------------
# time

_GLOG = re.compile(r"^[IWEF]\d{4,8} [\d:.]+ +\d+ caffe\.cpp:\d+\] ")


def _template(line: str) -> str:
    """A `caffe time` line with its numbers replaced by '#'."""
    line = re.sub(r"Iteration: \d+ ", "Iteration: # ", line)
    line = re.sub(r"Testing for \d+ ", "Testing for # ", line)
    return re.sub(r"(: )-?[\d.]+(?:e[-+]?\d+)?( ms\.|$)", r"\1#\2", line)


def _benchmark_lines(lines) -> list:
    """From 'Performing Forward' to '*** Benchmark ends ***', templated, one line for a run of Iteration lines."""
    lines = [ln.rstrip("\n") for ln in lines]
    start = next(i for i, ln in enumerate(lines) if ln.endswith("Performing Forward"))
    end = next(i for i, ln in enumerate(lines) if ln.endswith("*** Benchmark ends ***"))
    out = []
    for ln in lines[start:end + 1]:
        t = _template(ln)
        if not (out and t == out[-1] and t.startswith("Iteration: ")):
            out.append(t)
    return out


def test_time_torch_prints_caffe_time_lines(run_cli):
    require_shared()
    spec = os.path.join(ORACLE, "timing", "resnet20_cifar_b1.prototxt")
    r = run_cli("time", spec, "--iterations", "1", "--engine", "torch")
    assert r.returncode == 0, r.stderr
    with gzip.open(os.path.join(ORACLE, "timing", "logs", "resnet20_b1_t2.log.gz"), "rt") as f:
        caffe = [_GLOG.sub("", ln) for ln in f if "caffe.cpp:" in ln]
    ours = r.stdout.splitlines()
    # the same lines in the same order (per layer, Split layers included, right-aligned names), numbers aside
    assert _benchmark_lines(ours) == _benchmark_lines(caffe)
    vals = {}
    for key in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward", "Total Time"):
        m = [re.fullmatch(rf"{key}: ([\d.e+-]+) ms\.", ln) for ln in ours]
        vals[key] = float(next(x for x in m if x).group(1))
    layer_f = [float(m.group(1)) for m in (re.fullmatch(r" *\S+\tforward: ([\d.e+-]+) ms\.", ln) for ln in ours) if m]
    layer_b = [float(m.group(1)) for m in (re.fullmatch(r" *\S+\tbackward: ([\d.e+-]+) ms\.", ln) for ln in ours) if m]
    iters = [float(m.group(1)) for m in (re.fullmatch(r"Iteration: \d+ forward-backward time: ([\d.e+-]+) ms\.", ln)
                                         for ln in ours) if m]
    assert len(iters) == 1 and "Testing for 1 iterations." in ours
    assert vals["Average Forward pass"] == pytest.approx(sum(layer_f), rel=1e-3, abs=1e-3)
    assert vals["Average Backward pass"] == pytest.approx(sum(layer_b), rel=1e-3, abs=1e-3)
    fwd_bwd = vals["Average Forward pass"] + vals["Average Backward pass"]
    assert vals["Average Forward-Backward"] == pytest.approx(fwd_bwd, rel=1e-3)
    assert vals["Total Time"] == pytest.approx(sum(iters), rel=1e-3)
    assert vals["Average Forward-Backward"] == pytest.approx(vals["Total Time"], rel=1e-3)
    assert any(ln.startswith("Whole net forward-backward (autograd): ") and "images/s (batch 1)" in ln for ln in ours)


def test_time_onnxruntime_prints_latency_and_throughput(run_cli, tmp_path):
    net, weights = _lenet()
    r = run_cli("time", net, "--weights", weights, "--engine", "onnxruntime", "--iterations", "5", "--batch", "3")
    assert r.returncode == 0, r.stderr
    lat = re.search(r"^Latency: median ([\d.e+-]+) ms, min ([\d.e+-]+) ms$", r.stdout, re.M)
    thr = re.search(r"^Throughput: ([\d.e+-]+) images/s$", r.stdout, re.M)
    assert lat and thr, r.stdout
    assert "batch 3, 5 iterations" in r.stdout and "CPUExecutionProvider" in r.stdout
    assert float(thr.group(1)) == pytest.approx(3000.0 / float(lat.group(1)), rel=2e-3)
    assert float(lat.group(2)) <= float(lat.group(1))
    # an .onnx file is timed as it is (time_onnxruntime); a batch its fixed input cannot take is one line, exit 2
    fixed = tmp_path / "lenet_b1.onnx"
    export_onnx(net, str(fixed), weights=weights, batch=1)
    r = run_cli("time", fixed, "--engine", "onnxruntime", "--batch", "4")
    assert r.returncode == 2 and "fixed batch of 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------------------------------------------------
# InferenceSession


def test_inference_session_names_providers_and_errors(tmp_path):
    require_shared()
    import torch

    import resnetc

    net, w = os.path.join(CORPUS, DET1), os.path.join(CORPUS, DET1_W)
    path = tmp_path / "det1.onnx"
    export_onnx(net, str(path), weights=w)
    sess = InferenceSession(str(path))
    caffe_net = resnetc.load_net(net, weights=w)
    # inputs and outputs are the Caffe blob names, in the net's order
    assert sess.inputs == caffe_net.inputs == ["data"]
    assert sess.outputs == caffe_net.outputs == ["conv4-2", "prob1"]
    # this machine's onnxruntime has no CUDA provider: CPU, with one intra-op thread per usable core
    expected = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
        if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
    assert sess.providers[:len(expected)] == expected
    assert sess.threads == usable_cpus() and sess.spinning is False
    x = np.random.RandomState(0).rand(2, 3, 12, 12).astype(np.float32)
    got = sess(data=x)
    with torch.no_grad():
        ref = caffe_net(data=torch.from_numpy(x))
    for name in sess.outputs:
        assert np.abs(got[name] - ref[name].numpy()).max() < 1e-5
    with pytest.raises(ResnetcError, match="missing input"):
        sess(image=x)
    with pytest.raises(ResnetcError, match="cannot run the model") as e:
        sess(data=np.zeros((1, 1, 12, 12), np.float32))
    assert "\n" not in str(e.value)
    with pytest.raises(ResnetcError, match="optimisation level"):
        InferenceSession(str(path), optimization="fast")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ResnetcError, match="cannot load") as e:
        InferenceSession(str(bad))
    assert "\n" not in str(e.value)


def test_providers_cuda_first_when_onnxruntime_gpu_is_installed(monkeypatch, tmp_path):
    """With onnxruntime-gpu (CUDA provider available), sessions ask for CUDA then CPU; device='cpu' asks for CPU."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(ResnetcError, match="unknown device"):
        choose_providers("tpu")
    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):
            seen["providers"] = providers
            seen["threads"] = sess_options.intra_op_num_threads
            seen["level"] = sess_options.graph_optimization_level

        def get_providers(self):
            return seen["providers"]

        def get_inputs(self):
            return []

        def get_outputs(self):
            return []

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    s = InferenceSession(str(tmp_path / "m.onnx"), threads=3)
    assert seen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"] and s.on_gpu
    assert seen["threads"] == 3 and seen["level"] == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = InferenceSession(str(tmp_path / "m.onnx"), device="cpu")
    assert seen["providers"] == ["CPUExecutionProvider"] and not s.on_gpu
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert choose_providers() == ["CPUExecutionProvider"]
