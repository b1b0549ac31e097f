"""Normalisation layers (BatchNorm, Scale, Bias, MVN) against real Caffe (oracle probes) and against numpy
transcriptions of Caffe's ``batch_norm_layer.cpp``, ``scale_layer.cpp``, ``bias_layer.cpp``, ``mvn_layer.cpp``."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from resnetc.layers.registry import ShapeError

from .test_vision import make, probe_files, replay_probe, shape_of

NORM_PREFIXES = ("batchnorm_", "scale_", "bias_")


@pytest.mark.parametrize("npz", probe_files(NORM_PREFIXES), ids=os.path.basename)
def test_oracle_probe(oracle, npz):
    replay_probe(npz)


def test_probe_groups_present(oracle):
    names = {os.path.basename(p) for p in probe_files(NORM_PREFIXES)}
    assert {"batchnorm_train_default_phase_stats.npz", "batchnorm_global_eps1e-3_sf0.npz",
            "scale_two_bottoms_axis1.npz", "bias_two_bottoms.npz"} <= names


# ----------------------------------------------------------------------------------------------------------
# BatchNorm


def test_batchnorm_params_are_statistics():
    layer, _ = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', [(2, 5, 3, 3)])
    assert [(b.shape, b.learnable, b.filler) for b in layer.blobs] == [((5,), False, None), ((5,), False, None),
                                                                      ((1,), False, None)]
    layer, _ = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', [(7,)])
    assert layer.blobs[0].shape == (1,)  # a 1-axis bottom has one channel


def test_batchnorm_phase_decides_use_global_stats():
    assert make('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', [(2, 3)], phase="TEST")[1].global_stats
    assert not make('name: "bn" type: "BatchNorm" bottom: "x" top: "y"', [(2, 3)], phase="TRAIN")[1].global_stats
    assert make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { use_global_stats: true }',
                [(2, 3)], phase="TRAIN")[1].global_stats


def caffe_bn_train(x, blobs, maf, eps):
    """Transcription of BatchNormLayer::Forward_cpu without use_global_stats (float64)."""
    n, c = x.shape[:2]
    xr = x.reshape(n, c, -1).astype(np.float64)
    mean = xr.mean((0, 2))
    var = ((xr - mean[None, :, None]) ** 2).mean((0, 2))
    m = xr.size // c
    new = [maf * blobs[0] + mean, maf * blobs[1] + var * (m / (m - 1) if m > 1 else 1), maf * blobs[2] + 1]
    y = (xr - mean[None, :, None]) / np.sqrt(var + eps)[None, :, None]
    return y.reshape(x.shape), new


def test_batchnorm_train_forward_updates_statistics_twice():
    rng = np.random.RandomState(5)
    _, mod = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { '
                  'moving_average_fraction: 0.9 eps: 0.01 }', [(4, 3, 2, 5)], phase="TRAIN")
    with torch.no_grad():
        for b in mod.blobs:
            b.zero_()
    state = [np.zeros(3), np.zeros(3), np.zeros(1)]
    for _ in range(2):
        x = rng.normal(1, 2, (4, 3, 2, 5)).astype(np.float32)
        y = mod(torch.from_numpy(x))
        ey, state = caffe_bn_train(x, state, 0.9, 0.01)
        np.testing.assert_allclose(y.detach().numpy(), ey, rtol=1e-5, atol=1e-5)
        for b, e in zip(mod.blobs, state):
            np.testing.assert_allclose(b.detach().numpy(), e, rtol=1e-5)


def test_batchnorm_global_zero_scale_factor():
    _, mod = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { use_global_stats: true '
                  'eps: 0.25 }', [(2, 3)])
    with torch.no_grad():
        mod.blobs[0].fill_(4.0)
        mod.blobs[1].fill_(9.0)
        mod.blobs[2].zero_()
    x = torch.randn(2, 3)
    torch.testing.assert_close(mod(x), x / 0.5)  # s == 0 => mean = var = 0 => x / sqrt(eps)


def test_batchnorm_global_gradient_treats_statistics_as_constants():
    _, mod = make('name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { use_global_stats: true }',
                  [(2, 3, 4)])
    with torch.no_grad():
        mod.blobs[0].copy_(torch.tensor([0.2, 0.4, 0.6]))
        mod.blobs[1].copy_(torch.tensor([2.0, 4.0, 8.0]))
        mod.blobs[2].fill_(2.0)
    x = torch.randn(2, 3, 4, requires_grad=True)
    mod(x).sum().backward()
    torch.testing.assert_close(x.grad, (1 / torch.sqrt(torch.tensor([1.0, 2.0, 4.0]) + 1e-5))[None, :, None]
                               .expand(2, 3, 4))


# ----------------------------------------------------------------------------------------------------------
# Scale / Bias


@pytest.mark.parametrize("text, bottoms, shapes", [
    ("scale_param { }", [(2, 3, 4, 5)], [(3,)]),
    ("scale_param { axis: -2 num_axes: 2 bias_term: true }", [(2, 3, 4, 5)], [(4, 5), (4, 5)]),
    ("scale_param { num_axes: 0 }", [(2, 3, 4, 5)], [()]),
    ("scale_param { axis: 0 num_axes: -1 }", [(2, 3)], [(2, 3)]),
    ("scale_param { bias_term: true }", [(2, 3, 4, 5), (3, 4)], [(3, 4)]),
])
def test_scale_param_shapes_and_fillers(text, bottoms, shapes):
    names = "".join(f'bottom: "b{i}" ' for i in range(len(bottoms)))
    layer, _ = make(f'name: "s" type: "Scale" {names}top: "y" {text}', bottoms)
    assert [b.shape for b in layer.blobs] == [tuple(s) for s in shapes]
    if len(bottoms) == 1:
        assert layer.blobs[0].filler.type == "constant" and layer.blobs[0].filler.value == 1
    if len(layer.blobs) > len(bottoms) - 1 and "bias_term" in text:
        assert layer.blobs[-1].filler.value == 0


def test_scale_forward_broadcasts_and_second_bottom_gets_gradient():
    layer, mod = make('name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y" scale_param { axis: 1 bias_term: '
                      'true }', [(2, 3, 4, 5), (3, 4)])
    x = torch.randn(2, 3, 4, 5)
    s = torch.randn(3, 4, requires_grad=True)
    y = mod(x, s)
    torch.testing.assert_close(y, x * s[:, :, None] + mod.blobs[0][:, :, None])
    y.sum().backward()
    torch.testing.assert_close(s.grad, x.sum((0, 3)))
    # a 0-axis second bottom scales everything
    _, mod = make('name: "s" type: "Scale" bottom: "x" bottom: "s" top: "y"', [(2, 3), ()])
    torch.testing.assert_close(mod(x[:, :, 0, 0], torch.tensor(3.0)), 3 * x[:, :, 0, 0])


def test_bias_one_and_two_bottoms():
    layer, mod = make('name: "b" type: "Bias" bottom: "x" top: "y" bias_param { axis: 2 num_axes: -1 }',
                      [(2, 3, 4, 5)])
    assert [b.shape for b in layer.blobs] == [(4, 5)] and layer.blobs[0].filler.value == 0
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(mod(x), x + mod.blobs[0])
    layer, mod = make('name: "b" type: "Bias" bottom: "x" bottom: "c" top: "y"', [(2, 3, 4, 5), (3,)])
    assert layer.blobs == []
    c = torch.randn(3)
    torch.testing.assert_close(mod(x, c), x + c[:, None, None])


@pytest.mark.parametrize("type_, text, bottoms, message", [
    ("Scale", "scale_param { axis: 1 num_axes: 4 }", [(2, 3, 4)], "extends past"),
    ("Scale", "scale_param { num_axes: -2 }", [(2, 3, 4)], "non-negative"),
    ("Scale", "scale_param { axis: 1 }", [(2, 3, 4), (4,)], "mismatch"),
    ("Bias", "bias_param { axis: 5 }", [(2, 3, 4)], "out of range"),
    ("Bias", "", [(2, 3, 4), (3, 4, 5)], "does not fit"),
])
def test_scale_bias_shape_errors(type_, text, bottoms, message):
    names = "".join(f'bottom: "b{i}" ' for i in range(len(bottoms)))
    with pytest.raises(ShapeError, match=message):
        shape_of(f'name: "s" type: "{type_}" {names}top: "y" {text}', bottoms)


# ----------------------------------------------------------------------------------------------------------
# MVN


def caffe_mvn(x, dy, across, normalize, eps):
    """Transcription of MVNLayer::Forward_cpu / Backward_cpu (float64) on a 4-D array."""
    n, c = x.shape[:2]
    groups = n if across else n * c
    xr = x.reshape(groups, -1).astype(np.float64)
    dyr = dy.reshape(groups, -1).astype(np.float64)
    dim = xr.shape[1]
    t = xr - xr.mean(1, keepdims=True)
    if not normalize:
        return t.reshape(x.shape), (dyr - dyr.mean(1, keepdims=True)).reshape(x.shape)
    d = np.sqrt((t ** 2).mean(1, keepdims=True)) + eps
    y = t / d
    dx = dyr - ((y * dyr).sum(1, keepdims=True) * y + dyr.sum(1, keepdims=True)) / dim
    return y.reshape(x.shape), (dx / d).reshape(x.shape)


@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_mvn_forward_and_caffes_backward(across, normalize):
    rng = np.random.RandomState(2)
    x = rng.normal(0.5, 2, (2, 3, 4, 5)).astype(np.float32)
    x[1, 2] = 0.75  # a constant group: Caffe's gradient is finite there
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    text = (f'name: "m" type: "MVN" bottom: "x" top: "y" mvn_param {{ across_channels: {str(across).lower()} '
            f'normalize_variance: {str(normalize).lower()} eps: 0.001 }}')
    _, mod = make(text, [x.shape])
    xt = torch.from_numpy(x).requires_grad_(True)
    y = mod(xt)
    y.backward(torch.from_numpy(dy))
    ey, edx = caffe_mvn(x, dy, across, normalize, 1e-3)
    np.testing.assert_allclose(y.detach().numpy(), ey, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xt.grad.numpy(), edx, rtol=1e-4, atol=1e-5)


def test_mvn_top_is_forced_4d():
    layer, mod = make('name: "m" type: "MVN" bottom: "x" top: "y" mvn_param { across_channels: true }', [(3, 6)])
    assert layer.top_shapes == [(3, 6, 1, 1)]
    x = torch.randn(3, 6)
    y = mod(x)
    assert y.shape == (3, 6, 1, 1)
    torch.testing.assert_close(y.sum((1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(ShapeError, match="4 axes"):
        shape_of('name: "m" type: "MVN" bottom: "x" top: "y"', [(1, 2, 3, 4, 5)])
