"""Property tests for the output-size rules of Pooling, Convolution and Deconvolution.

Each rule is checked three ways: the registry's shape rule (what resnetc builds graphs with), a direct
transcription of Caffe's formula, and an independent enumeration of the windows Caffe's loops visit. For
pooling the lowered module's actual output size is checked too."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resnetc.graph import Layer
from resnetc.layers import registry
from resnetc.layers.vision import PoolGeometry, PoolOp, pooled_size
from resnetc.proto import caffe_pb2

SETTINGS = settings(max_examples=150, deadline=None)


def caffe_pooled(h, k, s, p, ceil, any_pad):
    """pooling_layer.cpp Reshape, transcribed (float division then ceil/floor, then the pad correction)."""
    f = math.ceil if ceil else math.floor
    out = int(f(float(h + 2 * p - k) / s)) + 1
    if any_pad and (out - 1) * s >= h + p:
        out -= 1
    return out


def enumerate_pool_windows(h, k, s, p, ceil, any_pad):
    """Count windows one at a time: CEIL keeps adding windows while the previous one did not reach the end
    of the padded extent [−p, h+p); FLOOR only takes windows that fit inside it; with padding (on either
    axis) a window must also start inside the image itself."""
    n = 0
    while True:
        start = n * s - p
        if ceil:
            ok = n == 0 or (start - s) + k < h + p
        else:
            ok = start + k <= h + p
        if any_pad and start >= h:
            ok = False
        if not ok:
            return n
        n += 1


@st.composite
def pool_cases(draw):
    k = draw(st.integers(1, 7))
    p = draw(st.integers(0, k - 1))
    s = draw(st.integers(1, 5))
    h = draw(st.integers(max(1, k - 2 * p), 24))
    other_pad = draw(st.booleans())
    return h, k, s, p, draw(st.booleans()), p > 0 or other_pad


@SETTINGS
@given(pool_cases())
def test_pooled_size_rule(case):
    h, k, s, p, ceil, any_pad = case
    expect = enumerate_pool_windows(h, k, s, p, ceil, any_pad)
    assert caffe_pooled(h, k, s, p, ceil, any_pad) == expect
    assert pooled_size(h, k, s, p, ceil, any_pad) == expect


def _layer(text, shapes):
    lp = caffe_pb2.LayerParameter()
    from google.protobuf import text_format

    text_format.Parse(text, lp)
    spec = registry.get(lp.type)
    layer = Layer(name=lp.name, type=lp.type, param=lp, bottoms=list(lp.bottom), tops=list(lp.top),
                  caffe_bottoms=list(lp.bottom), caffe_tops=list(lp.top), phase="TEST", spec=spec,
                  bottom_shapes=[tuple(s) for s in shapes])
    spec.check(layer)
    layer.top_shapes = spec.shape(layer, layer.bottom_shapes)
    return layer


@settings(max_examples=60, deadline=None)
@given(pool_cases(), pool_cases(), st.sampled_from(["MAX", "AVE"]))
def test_pooling_layer_and_module_sizes(a, b, method):
    (h, kh, sh, ph, ceil, _), (w, kw, sw, pw, _, _) = a, b
    mode = "CEIL" if ceil else "FLOOR"
    layer = _layer(f'name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ pool: {method} '
                   f'kernel_h: {kh} kernel_w: {kw} stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} '
                   f'round_mode: {mode} }}', [(1, 2, h, w)])
    any_pad = ph > 0 or pw > 0
    expect = (enumerate_pool_windows(h, kh, sh, ph, ceil, any_pad), enumerate_pool_windows(w, kw, sw, pw, ceil, any_pad))
    assert layer.top_shapes == [(1, 2) + expect]
    g = PoolGeometry(0 if method == "MAX" else 1, (kh, kw), (sh, sw), (ph, pw), ceil=ceil)
    for native in (True, False):
        y = PoolOp(g, (h, w), allow_native=native)(torch.zeros(1, 2, h, w))
        assert tuple(y.shape[2:]) == expect


def enumerate_conv_positions(i, k, s, p, d):
    """Output positions whose dilated window [q·s − p, q·s − p + d(k−1)] lies inside the padded input."""
    n = 0
    while n * s - p + d * (k - 1) <= i + p - 1:
        n += 1
    return n


def enumerate_deconv_extent(i, k, s, p, d):
    """Deconvolution scatters input q to q·s + j·d (j < k); the output is that span minus p on each side."""
    last = max(q * s + j * d for q in range(i) for j in range(k))
    return last + 1 - 2 * p


@st.composite
def conv_cases(draw):
    k, d, s = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    p = draw(st.integers(0, 4))
    ext = d * (k - 1) + 1
    i = draw(st.integers(max(1, ext - 2 * p), 20))
    return i, k, s, p, d


@SETTINGS
@given(conv_cases())
def test_convolution_size_rule(case):
    i, k, s, p, d = case
    layer = _layer(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {{ num_output: 2 '
                   f'kernel_size: {k} stride: {s} pad: {p} dilation: {d} }}', [(1, 1, i)])
    ext = d * (k - 1) + 1
    caffe = int((i + 2 * p - ext) / s) + 1  # C integer division of a non-negative numerator
    assert layer.top_shapes == [(1, 2, caffe)]
    assert caffe == enumerate_conv_positions(i, k, s, p, d)


@SETTINGS
@given(conv_cases())
def test_deconvolution_size_rule(case):
    i, k, s, p, d = case
    expect = enumerate_deconv_extent(i, k, s, p, d)
    if expect < 1:
        return
    layer = _layer(f'name: "d" type: "Deconvolution" bottom: "x" top: "y" convolution_param {{ num_output: 2 '
                   f'kernel_size: {k} stride: {s} pad: {p} dilation: {d} }}', [(1, 1, i, 3)])
    assert layer.top_shapes[0][2] == s * (i - 1) + d * (k - 1) + 1 - 2 * p == expect
    # the convolution with the same parameters maps a deconvolution's output back to its input size
    back = _layer(f'name: "c" type: "Convolution" bottom: "x" top: "y" convolution_param {{ num_output: 2 '
                  f'kernel_size: {k} stride: {s} pad: {p} dilation: {d} }}', [(1, 1, expect)])
    assert back.top_shapes[0][2] == i
