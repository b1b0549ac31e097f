"""`resnetc check` / `resnetc summary` as a user runs them: exit codes, one-line errors, the figures."""
import os
import re

import pytest

from conftest import CORPUS, require_shared

# figures derived by hand (see the closing note of the foundation issue for the arithmetic)
FIGURES = {
    # path: (learnable params, multiply-adds over Convolution/InnerProduct for the file's batch, extra checks)
    "kaiminghe-resnet/prototxt/ResNet-50-deploy.prototxt": (25_557_096, 3_857_973_248,
                                                           {"fc1000": "1x1000", "pool5": "1x2048x1x1"}),
    "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt": (60_965_224, 7_244_068_160, {"fc8": "10x1000"}),
    "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt": (6_998_552, 15_826_718_720, {"loss3/classifier": "10x1000"}),
    "deepscale-squeezenet/SqueezeNet_v1.0/deploy.prototxt": (1_248_424, 8_613_399_360, {"pool10": "10x1000x1x1"}),
    "deepscale-squeezenet/SqueezeNet_v1.1/deploy.prototxt": (1_235_496, 3_877_475_200, {"pool10": "10x1000x1x1"}),
    "bvlc-caffe/examples/mnist/lenet.prototxt": (431_080, 146_752_000, {"ip2": "64x10", "pool2": "64x50x4x4"}),
    "bvlc-caffe/examples/cifar10/cifar10_quick.prototxt": (145_578, 12_354_176, {"pool1": "1x32x16x16", "ip2": "1x10"}),
}


def _number(label, text):
    m = re.search(label + r"[^:]*: ([\d,]+)", text)
    assert m, f"no '{label}' line in:\n{text[-500:]}"
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("rel", sorted(FIGURES))
def test_summary_figures(rel, run_cli):
    require_shared()
    params, macs, tops = FIGURES[rel]
    r = run_cli("-q", "summary", os.path.join(CORPUS, rel))
    assert r.returncode == 0, r.stderr
    assert _number("learnable parameters", r.stdout) == params
    assert _number("multiply-adds per forward", r.stdout) == macs
    for layer, shape in tops.items():
        assert re.search(rf"^{re.escape(layer)}\s+\S+\s+{shape}\s", r.stdout, re.M), f"{layer} should be {shape}"


def test_resnet50_batchnorm_statistics_reported_apart(run_cli):
    require_shared()
    r = run_cli("-q", "summary", os.path.join(CORPUS, "kaiminghe-resnet/prototxt/ResNet-50-deploy.prototxt"))
    assert "BatchNorm statistics (not learnable): 53,173 values in 53 layers" in r.stdout


def test_check_with_absent_data_source_passes_with_a_note(run_cli):
    require_shared()
    r = run_cli("check", os.path.join(CORPUS, "bvlc-caffe/models/bvlc_alexnet/train_val.prototxt"))
    assert r.returncode == 0, r.stderr
    assert "unknown" in r.stdout and "not available" in r.stdout and r.stdout.rstrip().endswith("OK")


def test_check_fills_sizes_from_the_command_line(run_cli):
    require_shared()
    r = run_cli("check", os.path.join(CORPUS, "bvlc-caffe/models/bvlc_alexnet/train_val.prototxt"),
                "--phase", "TEST", "--input-shape", "data=50,3,227,227", "--input-shape", "label=50")
    assert r.returncode == 0, r.stderr
    assert "accuracy scalar" in r.stdout and "loss scalar" in r.stdout


@pytest.mark.parametrize("text", [
    'name: "x"\nlayer {\n  name: "a"\n  type: "Input"\n  top: "data"\n  input_param { shape { dim: 1 dim',
    'layer { name: "c" type: "Convolution" bottom: "nothing" top: "c" }',
    'layer { name: "i" type: "Input" top: "d" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }\n'
    'layer { name: "p" type: "Pooling" bottom: "d" top: "p" pooling_param { kernel_size: 9 } }',
    'layer { name: "i" type: "Input" top: "d" input_param { shape { dim: 1 dim: 3 } } }\n'
    'layer { name: "x" type: "PriorBox" bottom: "d" top: "x" }',
    '\x00\x01\x02garbage\xff',
])
def test_bad_input_is_one_line_exit_2(text, run_cli, tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_bytes(text.encode("latin-1"))
    r = run_cli("check", p)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert err[0].startswith(f"resnetc: error: {p}")
