"""Neuron layers (resnetc/layers/neuron.py) against real Caffe (oracle probes), plus the behaviours the probes
cannot show (read from BVLC ``src/caffe/layers/*_layer.cpp``): gradients at the kinks, Threshold's strict
test, Clip's inclusive bounds, Power's constant case, Dropout in TRAIN, PReLU's default slope, ONNX export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from resnetc.errors import ResnetcError

from .test_common import graph_from, inp, net_from, onnx_matches_torch, probes_for, replay_probe, shape_error

NEURON_PROBES = probes_for("relu", "prelu", "elu", "sigmoid.", "tanh", "absval", "bnll", "power", "exp", "log",
                           "threshold", "swish", "clip", "dropout")


def test_probes_found(oracle):
    assert len(NEURON_PROBES) >= 21, NEURON_PROBES


@pytest.mark.parametrize("name", NEURON_PROBES)
def test_probe(name, oracle):
    replay_probe(name)


def one(tmp_path, type_, param="", shape=(5,), phase="TEST"):
    """A net of one neuron layer ``y = f(x)``."""
    return net_from(inp("x", *shape) + f'layer {{ name: "n" type: "{type_}" bottom: "x" top: "y" {param} }}',
                    tmp_path, phase=phase)


def grad(net, x, **extra):
    x = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    y = net(x=x, **extra)["y"]
    if y.requires_grad:
        y.sum().backward()
    return y.detach(), x.grad


def test_relu_gradient_at_zero_is_the_slope(tmp_path):
    y, g = grad(one(tmp_path, "ReLU", "relu_param { negative_slope: 0.1 }", (3,)), [-2.0, 0.0, 3.0])
    assert torch.allclose(y, torch.tensor([-0.2, 0.0, 3.0]))
    assert torch.allclose(g, torch.tensor([0.1, 0.1, 1.0]))
    _, g = grad(one(tmp_path, "ReLU", "", (3,)), [-2.0, 0.0, 3.0])
    assert g.tolist() == [0.0, 0.0, 1.0]


def test_prelu_params(tmp_path):
    g = graph_from(inp("x", 2, 3, 4) + 'layer { name: "p" type: "PReLU" bottom: "x" top: "y" }', tmp_path)
    blob = g.layer("p").blobs[0]
    assert blob.shape == (3,) and blob.filler.type == "constant" and blob.filler.value == pytest.approx(0.25)
    g = graph_from(inp("x", 2, 3) + 'layer { name: "p" type: "PReLU" bottom: "x" top: "y" '
                   'prelu_param { channel_shared: true } }', tmp_path)
    assert g.layer("p").blobs[0].shape == ()
    shape_error(inp("x", 3) + 'layer { name: "p" type: "PReLU" bottom: "x" top: "y" }', tmp_path, "at least 2 axes")
    net = net_from(inp("x", 1, 2) + 'layer { name: "p" type: "PReLU" bottom: "x" top: "y" '
                   'prelu_param { channel_shared: true } }', tmp_path)
    y, gx = grad(net, [[-4.0, 2.0]])
    assert y.tolist() == [[-1.0, 2.0]]
    assert net.params["p"][0].grad.shape == () and float(net.params["p"][0].grad) == -4.0


def test_elu_and_bnll_gradients_at_zero(tmp_path):
    _, g = grad(one(tmp_path, "ELU", "elu_param { alpha: 0.5 }", (3,)), [-1.0, 0.0, 1.0])
    assert g[1] == pytest.approx(0.5) and g[2] == 1.0 and g[0] == pytest.approx(0.5 * np.exp(-1.0))
    y, g = grad(one(tmp_path, "BNLL", "", (4,)), [0.0, 60.0, -60.0, 2.0])
    assert g[0] == 0.5 and g[1] == 1.0 and g[3] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert y[1] == 60.0 and 0.0 <= y[2] < 1e-25
    assert np.isfinite(g.numpy()).all()


def test_threshold_is_strict_and_has_no_gradient(tmp_path):
    net = one(tmp_path, "Threshold", "threshold_param { threshold: 0.5 }", (3,))
    x = torch.tensor([0.5, 0.6, -1.0], requires_grad=True)
    y = net(x=x)["y"]
    assert y.tolist() == [0.0, 1.0, 0.0] and not y.requires_grad


def test_clip_gradient_inclusive_at_bounds(tmp_path):
    y, g = grad(one(tmp_path, "Clip", "clip_param { min: -1 max: 2 }", (5,)), [-3.0, -1.0, 0.5, 2.0, 3.0])
    assert y.tolist() == [-1.0, -1.0, 0.5, 2.0, 2.0]
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    y, g = grad(one(tmp_path, "Clip", "clip_param { min: 2 max: 1 }", (3,)), [0.0, 1.5, 3.0])
    assert y.tolist() == [2.0, 2.0, 2.0] and g.tolist() == [0.0, 0.0, 0.0]  # Caffe's max(min, min(x, max))


def test_power_constant_cases(tmp_path):
    y, g = grad(one(tmp_path, "Power", "power_param { power: 0 scale: 3 shift: 2 }", (2,)), [1.0, 5.0])
    assert y.tolist() == [1.0, 1.0] and (g is None or g.abs().sum() == 0)
    y, _ = grad(one(tmp_path, "Power", "power_param { power: 3 scale: 0 shift: 2 }", (2,)), [1.0, 5.0])
    assert y.tolist() == [8.0, 8.0]
    y, g = grad(one(tmp_path, "Power", "power_param { power: 2 scale: 0.5 shift: 1 }", (2,)), [2.0, -2.0])
    assert y.tolist() == [4.0, 0.0] and g.tolist() == [2.0, 0.0]


def test_exp_log_bases(tmp_path):
    y, _ = grad(one(tmp_path, "Exp", "exp_param { base: 2 scale: 3 shift: 1 }", (2,)), [0.0, 1.0])
    assert torch.allclose(y, torch.tensor([2.0, 16.0]))
    y, _ = grad(one(tmp_path, "Log", "log_param { base: 10 scale: 10 }", (2,)), [1.0, 10.0])
    assert torch.allclose(y, torch.tensor([1.0, 2.0]))
    shape_error(inp("x", 2) + 'layer { name: "e" type: "Exp" bottom: "x" top: "y" exp_param { base: 0 } }',
                tmp_path, "strictly positive")


def test_dropout_phase_comes_from_the_layer(tmp_path):
    x = torch.ones(20000)
    test = one(tmp_path, "Dropout", "dropout_param { dropout_ratio: 0.25 }", (20000,))
    assert test(x=x)["y"] is x
    train = one(tmp_path, "Dropout", "phase: TRAIN dropout_param { dropout_ratio: 0.25 }", (20000,))
    torch.manual_seed(0)
    y = train(x=x)["y"]
    kept = y != 0
    assert torch.allclose(y[kept], torch.tensor(1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    train.eval()  # nn.Module modes do not change Caffe's phase
    assert (train(x=x)["y"] == 0).any()
    shape_error(inp("x", 2) + 'layer { name: "d" type: "Dropout" bottom: "x" top: "y" '
                'dropout_param { dropout_ratio: 1 } }', tmp_path, r"\[0, 1\)")


def test_in_place_neuron_keeps_caffe_blob_names(tmp_path):
    net = net_from(inp("x", 3) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x" }', tmp_path)
    out = net(x=torch.tensor([-1.0, 0.0, 2.0]))
    assert out["x"].tolist() == [0.0, 0.0, 2.0] and net.blobs["x"].tolist() == [0.0, 0.0, 2.0]


def test_onnx_export_of_neurons(tmp_path):
    layers = [("ReLU", "relu_param { negative_slope: 0.1 }"), ("PReLU", ""), ("ELU", ""), ("Sigmoid", ""),
              ("TanH", ""), ("AbsVal", ""), ("BNLL", ""), ("Power", "power_param { power: 2 shift: 1 }"),
              ("Exp", "exp_param { base: 2 scale: 0.1 }"), ("Log", "log_param { shift: 10 }"),
              ("Threshold", ""), ("Swish", ""), ("Clip", "clip_param { min: -1 max: 1 }"), ("Dropout", "")]
    text = inp("x", 2, 3, 4)  # every layer reads x (so Caffe's Split is exported too)
    for i, (t, p) in enumerate(layers):
        text += f'layer {{ name: "l{i}" type: "{t}" bottom: "x" top: "b{i}" {p} }}\n'
    net = net_from(text, tmp_path)
    assert len(net.outputs) == len(layers)
    onnx_matches_torch(net, {"x": torch.randn(5, 3, 4)}, tmp_path)


def test_log_base_must_be_positive(tmp_path):
    with pytest.raises(ResnetcError):
        graph_from(inp("x", 2) + 'layer { name: "l" type: "Log" bottom: "x" top: "y" log_param { base: -2 } }',
                   tmp_path)
