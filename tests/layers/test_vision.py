"""Vision layers against real Caffe (oracle probes) and against numpy transcriptions of Caffe's loops
(``pooling_layer.cpp`` forward/backward, ``im2col.cpp`` convolution, ``lrn_layer.cpp``, ``spp_layer.cpp``)."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import resnetc
from resnetc.graph import Layer
from resnetc.layers import registry
from resnetc.layers.registry import ShapeError
from resnetc.layers.vision import FLT_MAX, PoolGeometry, PoolOp, pooled_size
from resnetc.proto import caffe_pb2

from conftest import ORACLE

PROBES = os.path.join(ORACLE, "probes")
VISION_PREFIXES = ("pool_", "conv_", "deconv_", "lrn_", "innerproduct_")


def probe_files(prefixes):
    return sorted(p for p in glob.glob(os.path.join(PROBES, "*.npz")) if os.path.basename(p).startswith(prefixes))


def rel_err(got, exp) -> float:
    got, exp = np.asarray(got, np.float64), np.asarray(exp, np.float64)
    if exp.size == 0:
        return 0.0
    return float(np.max(np.abs(got - exp)) / max(np.max(np.abs(exp)), 1e-30))


def replay_probe(npz, fwd_tol=1e-5, grad_tol=1e-4):
    """Run one oracle probe through load_net: outputs, running statistics, input and parameter gradients."""
    d = np.load(npz, allow_pickle=False)
    phase = str(d["phase"]) if "phase" in d.files else "TEST"
    net = resnetc.load_net(npz[:-4] + ".prototxt", phase=phase)
    with torch.no_grad():
        for k in d.files:
            if k.startswith("param/"):
                _, layer, i = k.split("/")
                net.params[layer][int(i)].copy_(torch.from_numpy(d[k]))
    backward = any(k.startswith("top_diff/") for k in d.files)
    if backward:  # force_backward: Caffe gives every parameter a diff (BatchNorm's statistics get zeros)
        for blobs in net.params.values():
            for p in blobs:
                p.requires_grad_(True)
    inputs = {k[3:]: torch.from_numpy(d[k]).requires_grad_(backward) for k in d.files if k.startswith("in/")}
    net(**inputs)
    for k in d.files:
        if k.startswith("out/"):
            got = net.blobs[k[4:]].detach().numpy()
            assert got.shape == d[k].shape, f"{k}: shape {got.shape} != Caffe's {d[k].shape}"
            assert rel_err(got, d[k]) <= fwd_tol, f"{k}: rel err {rel_err(got, d[k]):.2e}"
        if k.startswith("param_after/"):
            _, layer, i = k.split("/")
            got = net.params[layer][int(i)].detach().numpy()
            assert rel_err(got, d[k]) <= fwd_tol, f"{k} (running statistics): rel err {rel_err(got, d[k]):.2e}"
    if not backward:
        return
    tops = [k for k in d.files if k.startswith("top_diff/")]
    torch.autograd.backward([net.blobs[k[9:]] for k in tops], [torch.from_numpy(d[k]) for k in tops])
    for k in d.files:
        if k.startswith("in_diff/"):
            got = inputs[k[8:]].grad.numpy()
            assert rel_err(got, d[k]) <= grad_tol, f"{k}: rel err {rel_err(got, d[k]):.2e}"
        if k.startswith("param_diff/"):
            _, layer, i = k.split("/")
            g = net.params[layer][int(i)].grad
            assert g is not None, f"{k}: no gradient"
            if not np.any(d[k]):
                assert not torch.any(g), f"{k}: Caffe's diff is zero, ours is not"
            else:
                assert rel_err(g.numpy(), d[k]) <= grad_tol, f"{k}: rel err {rel_err(g.numpy(), d[k]):.2e}"


@pytest.mark.parametrize("npz", probe_files(VISION_PREFIXES), ids=os.path.basename)
def test_oracle_probe(oracle, npz):
    replay_probe(npz)


def test_probe_groups_present(oracle):
    names = {os.path.basename(p) for p in probe_files(VISION_PREFIXES)}
    assert len([n for n in names if n.startswith("pool_")]) >= 16
    assert {"conv_dilation2_k3_p2.npz", "deconv_k4_s2_p1_nobias.npz", "lrn_within_s3_a0.5.npz",
            "innerproduct_transpose.npz"} <= names


# ----------------------------------------------------------------------------------------------------------
# helpers


def make(text, shapes, phase="TEST"):
    """(Layer, lowered module with blobs filled with seeded random values) of one layer."""
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    spec = registry.get(lp.type)
    shapes = [tuple(s) for s in shapes]
    layer = Layer(name=lp.name, type=lp.type, param=lp, bottoms=list(lp.bottom), tops=list(lp.top),
                  caffe_bottoms=list(lp.bottom), caffe_tops=list(lp.top), phase=phase, spec=spec,
                  bottom_shapes=shapes)
    if spec.check:
        spec.check(layer)
    layer.top_shapes = spec.shape(layer, shapes)
    layer.blobs = spec.params(layer, shapes) if spec.params else []
    rng = np.random.RandomState(3)
    blobs = [torch.nn.Parameter(torch.from_numpy(rng.uniform(-1, 1, b.shape).astype(np.float32)))
             for b in layer.blobs]
    return layer, spec.lower(layer, blobs)


def shape_of(text, shapes):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    spec = registry.get(lp.type)
    layer = Layer(name=lp.name, type=lp.type, param=lp, bottoms=list(lp.bottom), tops=list(lp.top),
                  caffe_bottoms=list(lp.bottom), caffe_tops=list(lp.top), phase="TEST", spec=spec)
    if spec.check:
        spec.check(layer)
    return spec.shape(layer, [tuple(s) for s in shapes])


def caffe_pool(x, method, kh, kw, sh, sw, ph, pw, oh, ow, top_diff):
    """Transcription of PoolingLayer::Forward_cpu / Backward_cpu (MAX, AVE) for one (N, C, H, W) array."""
    n, c, h, w = x.shape
    y = np.zeros((n, c, oh, ow), np.float64)
    mask = np.full((n, c, oh, ow), -1, np.int64)
    dx = np.zeros_like(x, dtype=np.float64)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * sh - ph, j * sw - pw
                    if method == "MAX":
                        he, we = min(hs + kh, h), min(ws + kw, w)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, arg = -FLT_MAX, -1
                        for yy in range(hs, he):
                            for xx in range(ws, we):
                                if x[b, ch, yy, xx] > best:
                                    best, arg = x[b, ch, yy, xx], yy * w + xx
                        y[b, ch, i, j], mask[b, ch, i, j] = best, arg
                        if arg >= 0:
                            dx[b, ch, arg // w, arg % w] += top_diff[b, ch, i, j]
                    else:
                        he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                        total = x[b, ch, hs:he, ws:we].astype(np.float64).sum()
                        with np.errstate(invalid="ignore", divide="ignore"):
                            y[b, ch, i, j] = np.float64(total) / size if size else np.nan
                        if size:
                            dx[b, ch, hs:he, ws:we] += top_diff[b, ch, i, j] / size
    return y, mask, dx


POOL_CASES = [
    # (H, W, kh, kw, sh, sw, ph, pw, round mode)
    (7, 7, 3, 3, 2, 2, 1, 1, "CEIL"),
    (6, 6, 3, 3, 2, 2, 0, 0, "CEIL"),
    (6, 6, 3, 3, 2, 2, 0, 0, "FLOOR"),
    (5, 5, 2, 2, 2, 2, 1, 1, "FLOOR"),
    (8, 5, 3, 2, 3, 2, 2, 1, "CEIL"),   # pad > kernel/2: torch refuses implicit padding
    (5, 4, 1, 1, 3, 3, 0, 0, "CEIL"),   # stride > kernel, no pad: last windows start outside the image
    (4, 6, 3, 2, 2, 1, 1, 0, "CEIL"),   # pad on one axis only: Caffe's correction applies to both
    (9, 9, 4, 4, 3, 3, 3, 3, "CEIL"),
]


@pytest.mark.parametrize("native", [True, False], ids=["torch-pooling", "explicit-pad"])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_pooling_matches_caffe_loops(case, method, native):
    h, w, kh, kw, sh, sw, ph, pw, mode = case
    g = PoolGeometry({"MAX": 0, "AVE": 1}[method], (kh, kw), (sh, sw), (ph, pw), ceil=mode == "CEIL")
    oh, ow = g.output_hw(h, w)
    rng = np.random.RandomState(h * 100 + kh)
    x = np.round(rng.uniform(-3, 3, (2, 3, h, w)), 1).astype(np.float32)  # rounding makes ties
    td = rng.uniform(-1, 1, (2, 3, oh, ow)).astype(np.float32)
    ey, emask, edx = caffe_pool(x, method, kh, kw, sh, sw, ph, pw, oh, ow, td)
    op = PoolOp(g, (h, w), mask=method == "MAX", allow_native=native)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = op(xt)
    y = out[0] if method == "MAX" else out
    assert tuple(y.shape) == (2, 3, oh, ow)
    np.testing.assert_allclose(y.detach().numpy(), ey, rtol=1e-6, atol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(out[1].numpy(), emask.astype(np.float32))
    finite = np.isfinite(ey)
    y.backward(torch.from_numpy(np.where(finite, td, 0).astype(np.float32)))
    if finite.all():
        np.testing.assert_allclose(xt.grad.numpy(), edx, rtol=1e-5, atol=1e-6)


def test_ave_pool_empty_window_is_caffes_nan():
    # H = 4, k1 s2 p0 CEIL: windows start at 0, 2, 4; the last has Caffe's pool_size 0 => 0/0
    g = PoolGeometry(1, (1, 1), (2, 2), (0, 0))
    assert g.output_hw(4, 4) == (3, 3)
    y = PoolOp(g, (4, 4))(torch.ones(1, 1, 4, 4))
    assert torch.isnan(y[0, 0, 2]).all() and torch.isnan(y[0, 0, :, 2]).all()
    assert torch.all(y[0, 0, :2, :2] == 1)


def test_global_pooling_non_square():
    x = torch.randn(2, 3, 5, 7)
    _, mod = make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE global_pooling: true }',
                  [(2, 3, 5, 7)])
    torch.testing.assert_close(mod(x), x.mean((2, 3), keepdim=True))
    _, mod = make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX global_pooling: true }',
                  [(2, 3, 5, 7)])
    torch.testing.assert_close(mod(x), x.amax((2, 3), keepdim=True))


def test_pooling_follows_a_new_input_size():
    _, mod = make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE kernel_size: 3 '
                  'stride: 2 pad: 2 }', [(1, 1, 6, 6)])
    assert mod(torch.ones(1, 1, 6, 6)).shape[-2:] == (4, 4)
    assert mod(torch.ones(1, 1, 9, 9)).shape[-2:] == (pooled_size(9, 3, 2, 2),) * 2


@pytest.mark.parametrize("text, message", [
    ('pool: MAX kernel_size: 3 pad: 3', "smaller than the kernel"),
    ('pool: MAX kernel_size: 3 kernel_h: 3 kernel_w: 3', "not both"),
    ('pool: MAX kernel_h: 3', "kernel_h and kernel_w"),
    ('pool: MAX', "kernel_size"),
    ('pool: MAX global_pooling: true kernel_size: 2', "global_pooling"),
    ('pool: AVE global_pooling: true stride: 2', "stride = 1"),
    ('pool: STOCHASTIC kernel_size: 3 pad: 1', "Padding implemented only"),
    ('pool: MAX kernel_size: 3 pad_h: 1', "pad_h and pad_w"),
])
def test_pooling_parameter_errors(text, message):
    with pytest.raises(ShapeError, match=message):
        shape_of(f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ {text} }}', [(1, 1, 8, 8)])


def test_pooling_mask_top_only_for_max():
    with pytest.raises(ShapeError, match="only MAX"):
        shape_of('name: "p" type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param { pool: AVE kernel_size: 2 }',
                 [(1, 1, 4, 4)])
    with pytest.raises(ShapeError, match="4 axes"):
        shape_of('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX kernel_size: 2 }',
                 [(1, 4, 4)])


def test_stochastic_pooling_test_phase_is_caffes_gpu_formula():
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 1, (1, 2, 6, 6)).astype(np.float32)
    _, mod = make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 3 '
                  'stride: 2 }', [x.shape])
    y = mod(torch.from_numpy(x)).numpy()
    assert y.shape == (1, 2, 3, 3)  # CEIL: windows at 0, 2, 4 (the last one clipped to rows 4..5)
    for i in range(3):
        for j in range(3):
            win = x[0, :, 2 * i:min(2 * i + 3, 6), 2 * j:min(2 * j + 3, 6)].reshape(2, -1).astype(np.float64)
            exp = (win ** 2).sum(1) / (np.finfo(np.float32).tiny + win.sum(1))
            np.testing.assert_allclose(y[0, :, i, j], exp, rtol=1e-5)


def test_stochastic_pooling_train_samples_in_proportion():
    torch.manual_seed(0)
    n = 20000
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(n, 1, 2, 2).contiguous().requires_grad_(True)
    _, mod = make('name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: STOCHASTIC kernel_size: 2 }',
                  [(n, 1, 2, 2)], phase="TRAIN")
    y = mod(x)
    freq = np.array([(y == v).float().mean().item() for v in (1, 2, 3, 4)])
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    y.sum().backward()  # the gradient goes to the sampled element only
    assert torch.all(x.grad.sum((1, 2, 3)) == 1)
    assert torch.all((x.grad.reshape(n, 4).argmax(1) + 1).float() == y.reshape(n).detach())


# ----------------------------------------------------------------------------------------------------------
# SPP


def test_spp_levels_and_values():
    x = torch.randn(2, 3, 7, 9)
    layer, mod = make('name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 3 pool: MAX }',
                      [tuple(x.shape)])
    y = mod(x)
    parts = []
    for lvl in range(3):
        bins = 2 ** lvl
        kh, kw = -(-7 // bins), -(-9 // bins)
        ph, pw = (kh * bins - 7 + 1) // 2, (kw * bins - 9 + 1) // 2
        g = PoolGeometry(0, (kh, kw), (kh, kw), (ph, pw))
        parts.append(PoolOp(g, (7, 9), allow_native=False)(x).flatten(1))
    expect = torch.cat(parts, 1)
    assert layer.top_shapes == [tuple(expect.shape)] and tuple(y.shape) == tuple(expect.shape)
    torch.testing.assert_close(y, expect)
    assert shape_of('name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 1 }', [(2, 3, 7, 5)]) \
        == [(2, 3, 1, 1)]


def test_spp_refuses_pad_not_below_kernel():
    # H = 5 at 4 bins: kernel 2, pad 2 (Caffe's pooling aborts)
    with pytest.raises(ShapeError, match="pad"):
        shape_of('name: "s" type: "SPP" bottom: "x" top: "y" spp_param { pyramid_height: 3 }', [(1, 1, 5, 5)])


# ----------------------------------------------------------------------------------------------------------
# Convolution / Deconvolution / Im2col


def caffe_conv(x, w, b, stride, pad, dil, group):
    """Direct loop convolution over N-D spatial axes with Caffe's C-division output size (zero padding)."""
    n, c = x.shape[:2]
    o = w.shape[0]
    sp_in = x.shape[2:]
    k = w.shape[2:]
    ext = [d * (kk - 1) + 1 for d, kk in zip(dil, k)]
    out = [int((i + 2 * p - e) / s) + 1 for i, p, e, s in zip(sp_in, pad, ext, stride)]
    y = np.zeros((n, o) + tuple(out), np.float64)
    cg, og = c // group, o // group
    for oc in range(o):
        gi = oc // og
        for pos in np.ndindex(*out):
            acc = np.zeros(n)
            for ic in range(cg):
                for kk in np.ndindex(*k):
                    src = [q * s - p + kd * d for q, s, p, kd, d in zip(pos, stride, pad, kk, dil)]
                    if all(0 <= sidx < lim for sidx, lim in zip(src, sp_in)):
                        acc += x[(slice(None), gi * cg + ic) + tuple(src)] * w[(oc, ic) + kk]
            y[(slice(None), oc) + pos] = acc + (b[oc] if b is not None else 0)
    return y


@pytest.mark.parametrize("text, shape", [
    ("num_output: 4 kernel_size: 3 kernel_size: 2 kernel_size: 2 stride: 2 pad: 1 pad: 0 pad: 1", (2, 2, 5, 4, 4)),
    ("num_output: 2 kernel_size: 3 dilation: 2 group: 2 pad: 1", (1, 4, 7)),
    ("num_output: 3 kernel_size: 5 pad: 1 stride: 2", (1, 2, 2, 2)),  # (2 + 2 − 5)/2 truncates to 0: one output
])
def test_convolution_nd_and_caffe_sizes(text, shape):
    layer, mod = make(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {{ {text} }}', [shape])
    x = np.random.RandomState(1).uniform(-1, 1, shape).astype(np.float32)
    y = mod(torch.from_numpy(x)).detach().numpy()
    p = layer.param.convolution_param
    n = len(shape) - 2
    rep = lambda v, d: list(v) * n if len(v) == 1 else (list(v) or [d] * n)
    ref = caffe_conv(x, mod.blobs[0].detach().numpy(), mod.blobs[1].detach().numpy(), rep(p.stride, 1),
                     rep(p.pad, 0), rep(p.dilation, 1), p.group)
    assert tuple(layer.top_shapes[0]) == ref.shape == y.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_convolution_axis_and_shared_weights_over_bottoms():
    layer, mod = make('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "ya" top: "yb" '
                      'convolution_param { num_output: 2 kernel_size: 3 axis: 2 }', [(2, 3, 4, 6, 6)] * 2)
    assert layer.top_shapes == [(2, 3, 2, 4, 4)] * 2
    a, b = torch.randn(2, 3, 4, 6, 6), torch.randn(2, 3, 4, 6, 6)
    ya, yb = mod(a, b)
    ref = torch.nn.functional.conv2d(b.reshape(6, 4, 6, 6), mod.blobs[0], mod.blobs[1]).reshape(2, 3, 2, 4, 4)
    torch.testing.assert_close(yb, ref)
    assert ya.shape == yb.shape


def test_deconvolution_shape_params_flops():
    text = ('name: "d" type: "Deconvolution" bottom: "x" top: "y" convolution_param { num_output: 4 group: 2 '
            'kernel_size: 3 stride: 2 pad: 1 dilation: 2 }')
    layer, mod = make(text, [(1, 6, 5, 5)])
    assert [b.shape for b in layer.blobs] == [(6, 2, 3, 3), (4,)]
    out = 2 * (5 - 1) + 2 * (3 - 1) + 1 - 2
    assert layer.top_shapes == [(1, 4, out, out)]
    assert mod(torch.randn(1, 6, 5, 5)).shape == (1, 4, out, out)
    assert layer.spec.flops(layer, [(1, 6, 5, 5)], layer.top_shapes) == 6 * 25 * 2 * 9


def test_convolution_params_and_flops():
    layer, _ = make('name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 8 group: 2 '
                    'kernel_h: 3 kernel_w: 1 weight_filler { type: "xavier" } }', [(2, 4, 6, 6)])
    w, b = layer.blobs
    assert w.shape == (8, 2, 3, 1) and w.filler.type == "xavier"
    assert b.shape == (8,) and b.filler.type == "constant" and b.filler.value == 0
    assert layer.top_shapes == [(2, 8, 4, 6)]
    assert layer.spec.flops(layer, layer.bottom_shapes, layer.top_shapes) == 2 * 8 * 4 * 6 * (2 * 3 * 1)


@pytest.mark.parametrize("text, message", [
    ("num_output: 3 kernel_size: 3 group: 2", "multiple of group"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3", "once per spatial"),
    ("num_output: 4 kernel_size: 0", "nonzero"),
    ("num_output: 0 kernel_size: 3", "num_output"),
    ("num_output: 4", "kernel"),
])
def test_convolution_parameter_errors(text, message):
    with pytest.raises(ShapeError, match=message):
        shape_of(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {{ {text} }}', [(1, 4, 8, 8)])


def test_convolution_refuses_mismatched_bottoms_and_tops():
    with pytest.raises(ShapeError, match="mismatch"):
        shape_of('name: "c" type: "Convolution" bottom: "a" bottom: "b" top: "y" top: "z" '
                 'convolution_param { num_output: 2 kernel_size: 1 }', [(1, 2, 4, 4), (1, 2, 5, 4)])
    with pytest.raises(ShapeError, match="one top per bottom"):
        shape_of('name: "c" type: "Convolution" bottom: "a" top: "y" top: "z" '
                 'convolution_param { num_output: 2 kernel_size: 1 }', [(1, 2, 4, 4)])


def test_im2col_matches_convolution_patches():
    layer, mod = make('name: "i" type: "Im2col" bottom: "x" top: "y" convolution_param { kernel_size: 3 stride: 2 '
                      'pad: 1 }', [(2, 3, 7, 6)])
    assert layer.top_shapes == [(2, 27, 4, 3)]
    x = torch.randn(2, 3, 7, 6)
    y = mod(x)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    # column (c, ki, kj) at output (i, j) is x[c, 2i + ki − 1, 2j + kj − 1]
    assert torch.equal(y[:, 1 * 9 + 2 * 3 + 0, 2, 1], xp[:, 1, 4 + 2, 2 + 0])


# ----------------------------------------------------------------------------------------------------------
# LRN / InnerProduct


def test_lrn_within_channel_ignores_k():
    x = torch.randn(1, 2, 5, 5)
    _, a = make('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { norm_region: WITHIN_CHANNEL local_size: 3 '
                'alpha: 0.5 k: 7 }', [tuple(x.shape)])
    xp = torch.nn.functional.pad(x * x, (1, 1, 1, 1))
    avg = sum(xp[:, :, i:i + 5, j:j + 5] for i in range(3) for j in range(3)) / 9
    torch.testing.assert_close(a(x), x * (1 + 0.5 * avg) ** -0.75)
    with pytest.raises(ShapeError, match="odd"):
        shape_of('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 4 }', [(1, 2, 5, 5)])


def test_lrn_across_channels_zero_padded():
    x = torch.randn(2, 6, 3, 3)
    _, mod = make('name: "l" type: "LRN" bottom: "x" top: "y" lrn_param { local_size: 5 alpha: 0.3 beta: 0.6 k: 2 }',
                  [tuple(x.shape)])
    sq = torch.nn.functional.pad(x * x, (0, 0, 0, 0, 2, 2))
    s = sum(sq[:, c:c + 6] for c in range(5))
    torch.testing.assert_close(mod(x), x * (2 + 0.3 / 5 * s) ** -0.6)


def test_inner_product_axis_transpose_params_flops():
    text = 'name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 5 axis: -2 '
    layer, mod = make(text + '}', [(2, 3, 4, 6)])
    assert layer.top_shapes == [(2, 3, 5)]
    assert [b.shape for b in layer.blobs] == [(5, 24), (5,)]
    assert layer.spec.flops(layer, layer.bottom_shapes, layer.top_shapes) == 6 * 24 * 5
    layer, mod = make(text + 'transpose: true bias_term: false }', [(2, 3, 4, 6)])
    assert [b.shape for b in layer.blobs] == [(24, 5)]
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(mod(x), x.reshape(2, 3, 24) @ mod.blobs[0])


# ----------------------------------------------------------------------------------------------------------
# compile / export


NET = """
name: "vision_export"
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 11 dim: 11 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "lrn" type: "LRN" bottom: "conv" top: "lrn" lrn_param { local_size: 3 } }
layer { name: "pool" type: "Pooling" bottom: "lrn" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "apool" type: "Pooling" bottom: "pool" top: "apool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "deconv" type: "Deconvolution" bottom: "apool" top: "up"
        convolution_param { num_output: 2 kernel_size: 4 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "ip" type: "InnerProduct" bottom: "up" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
"""


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision") / "net.prototxt"
    path.write_text(NET)
    net = resnetc.load_net(str(path), seed=1).eval()
    with torch.no_grad():
        net.params["bn"][0].copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]) * 2)
        net.params["bn"][1].copy_(torch.tensor([1.0, 0.5, 2.0, 0.1]) * 2)
        net.params["bn"][2].fill_(2.0)
    return net


def test_torch_compile_full_graph(small_net):
    x = torch.randn(2, 3, 11, 11)
    ref = small_net(data=x)["ip"]
    compiled = torch.compile(small_net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(data=x)["ip"], ref)


def test_onnx_export_matches(small_net, tmp_path):
    ort = pytest.importorskip("onnxruntime")

    class Wrap(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, data):
            return self.net(data=data)["ip"]

    x = torch.randn(2, 3, 11, 11)
    path = str(tmp_path / "v.onnx")
    torch.onnx.export(Wrap(small_net), (x,), path, input_names=["data"], output_names=["ip"], dynamo=False)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})[0]
    np.testing.assert_allclose(got, small_net(data=x)["ip"].detach().numpy(), rtol=1e-4, atol=1e-5)


NET2 = """
name: "vision_export_2"
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 10 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" top: "mask"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "sto" type: "Pooling" bottom: "data" top: "sto" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 3 } }
layer { name: "spp" type: "SPP" bottom: "data" top: "spp" spp_param { pyramid_height: 2 pool: AVE } }
layer { name: "mvn" type: "MVN" bottom: "pool" top: "mvn" }
layer { name: "i2c" type: "Im2col" bottom: "data" top: "i2c" convolution_param { kernel_size: 2 } }
"""


def test_onnx_export_more_layers(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "net.prototxt"
    path.write_text(NET2)
    net = resnetc.load_net(str(path)).eval()
    names = ["mask", "mvn", "spp", "sto", "i2c"]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, data):
            out = self.net(data=data)
            return tuple(out[n] for n in names)

    x = torch.rand(2, 3, 9, 10) + 0.1
    onnx_path = str(tmp_path / "v2.onnx")
    torch.onnx.export(Wrap(), (x,), onnx_path, input_names=["data"], output_names=names, dynamo=False)
    got = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"data": x.numpy()})
    ref = net(data=x)
    for n, g in zip(names, got):
        np.testing.assert_allclose(g, ref[n].numpy(), rtol=1e-4, atol=1e-5, err_msg=n)
