"""RNN / LSTM / LSTMUnit against torch.nn.LSTM (gates reordered), numpy transcriptions of Caffe's unrolled
nets and LSTMUnit C++ loops (``lstm_unit_layer.cpp``), and Caffe's state-carrying rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from resnetc.graph import Layer
from resnetc.layers import registry
from resnetc.layers.recurrent import lstm_unit
from resnetc.layers.registry import ShapeError
from resnetc.proto import caffe_pb2


def make(text, shapes, *, seed=0, dtype=torch.float32, scale=0.5):
    """Layer + lowered module with parameters ~ U(-scale, scale) (Caffe's blob order and shapes)."""
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    spec = registry.get(lp.type)
    shapes = [tuple(s) for s in shapes]
    layer = Layer(name=lp.name, type=lp.type, param=lp, bottoms=list(lp.bottom), tops=list(lp.top),
                  caffe_bottoms=list(lp.bottom), caffe_tops=list(lp.top), phase="TEST", spec=spec,
                  bottom_shapes=shapes)
    if spec.check:
        spec.check(layer)
    layer.top_shapes = spec.shape(layer, shapes)
    layer.blobs = spec.params(layer, shapes) if spec.params else []
    rs = np.random.RandomState(seed)
    params = [torch.nn.Parameter(torch.tensor(rs.uniform(-scale, scale, b.shape), dtype=dtype)) for b in layer.blobs]
    return layer, spec.lower(layer, params)


def lstm_text(h, *, bottoms=("x", "cont"), tops=("h",), expose=False):
    b = " ".join(f'bottom:"{x}"' for x in bottoms)
    t = " ".join(f'top:"{x}"' for x in tops)
    return f'name:"lstm" type:"LSTM" {b} {t} recurrent_param {{ num_output: {h} expose_hidden: {str(expose).lower()} }}'


def torch_lstm_from(mod, d, h):
    """torch.nn.LSTM with Caffe's weights: blocks (i, f, o, g) -> (i, f, g, o), b_c in one bias."""
    ref = torch.nn.LSTM(d, h).to(mod.blobs[0].dtype)

    def reorder(w):
        i, f, o, g = w.detach().chunk(4, 0)
        return torch.cat([i, f, g, o], 0)

    with torch.no_grad():
        ref.weight_ih_l0.copy_(reorder(mod.blobs[0]))
        ref.bias_ih_l0.copy_(reorder(mod.blobs[1]))
        ref.weight_hh_l0.copy_(reorder(mod.blobs[-1]))
        ref.bias_hh_l0.zero_()
    return ref, reorder


# ----------------------------------------------------------------------------------------------------------
# LSTM


def test_lstm_params_shapes_order_and_fillers():
    text = ('name:"lstm" type:"LSTM" bottom:"x" bottom:"cont" bottom:"s" top:"h" recurrent_param { num_output: 5 '
            'weight_filler { type: "uniform" min: -0.1 max: 0.1 } }')
    layer, _ = make(text, [(4, 2, 3, 2), (4, 2), (2, 7)])
    assert [b.shape for b in layer.blobs] == [(20, 6), (20,), (20, 7), (20, 5)]
    assert [b.role for b in layer.blobs] == ["W_xc", "b_c", "W_xc_static", "W_hc"]
    assert [b.filler.type for b in layer.blobs] == ["uniform", "constant", "uniform", "uniform"]
    assert layer.blobs[1].filler.value == 0
    assert layer.top_shapes == [(4, 2, 5)]


def test_lstm_matches_torch_lstm_forward_and_gradients():
    t_steps, n, d, h = 6, 3, 4, 5
    _, mod = make(lstm_text(h), [(t_steps, n, d), (t_steps, n)])
    ref, reorder = torch_lstm_from(mod, d, h)
    x = torch.randn(t_steps, n, d, generator=torch.Generator().manual_seed(1))
    cont = torch.ones(t_steps, n)
    cont[0] = 0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = mod(xa, cont)
    yr, _ = ref(xb)
    assert y.shape == (t_steps, n, h)
    assert torch.allclose(y, yr, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    assert torch.allclose(reorder(mod.blobs[0].grad), ref.weight_ih_l0.grad, atol=1e-5)
    assert torch.allclose(reorder(mod.blobs[1].grad), ref.bias_ih_l0.grad, atol=1e-5)
    assert torch.allclose(reorder(mod.blobs[2].grad), ref.weight_hh_l0.grad, atol=1e-5)


def test_lstm_reset_with_cont_zero():
    """cont_t = 0 at t = 3 for stream 1 only: from there that stream equals a fresh LSTM on x[3:]."""
    t_steps, n, d, h = 6, 2, 3, 4
    _, mod = make(lstm_text(h), [(t_steps, n, d), (t_steps, n)], seed=3)
    ref, _ = torch_lstm_from(mod, d, h)
    x = torch.randn(t_steps, n, d, generator=torch.Generator().manual_seed(4))
    cont = torch.ones(t_steps, n)
    cont[0] = 0
    cont[3, 1] = 0
    with torch.no_grad():
        y = mod(x, cont)
        full, _ = ref(x)
        fresh, _ = ref(x[3:, 1:2])
    assert torch.allclose(y[:, 0], full[:, 0], atol=1e-6)  # stream 0 never reset
    assert torch.allclose(y[:3, 1], full[:3, 1], atol=1e-6)
    assert torch.allclose(y[3:, 1], fresh[:, 0], atol=1e-6)
    assert not torch.allclose(y[3:, 1], full[3:, 1], atol=1e-3)


def test_lstm_carries_state_across_forwards_without_gradient():
    t_steps, n, d, h = 4, 2, 3, 4
    _, whole = make(lstm_text(h), [(2 * t_steps, n, d), (2 * t_steps, n)], seed=5)
    _, half = make(lstm_text(h), [(t_steps, n, d), (t_steps, n)], seed=5)
    x = torch.randn(2 * t_steps, n, d, generator=torch.Generator().manual_seed(6))
    cont = torch.ones(2 * t_steps, n)
    y = whole(x, cont)
    y1 = half(x[:t_steps], cont[:t_steps])
    x2 = x[t_steps:].clone().requires_grad_()
    y2 = half(x2, cont[t_steps:])
    assert torch.allclose(torch.cat([y1, y2]), y, atol=1e-6)
    y2.sum().backward()
    assert half.blobs[0].grad is not None
    # the carried state is detached: the second forward's graph does not reach the first call's inputs
    assert not half._state0.requires_grad and not half._state1.requires_grad
    # cont_1 = 0 masks the carried state; N shrinking keeps the first streams' state (as Caffe's copy does)
    half.reset_state()
    with torch.no_grad():
        half(x[:t_steps], cont[:t_steps])
        y_small = half(x[t_steps:, :1], cont[t_steps:, :1])
        masked = half(x[t_steps:, :1], torch.zeros(t_steps, 1))
        _, fresh = make(lstm_text(h), [(t_steps, 1, d), (t_steps, 1)], seed=5)
        y_fresh = fresh(x[t_steps:, :1], torch.zeros(t_steps, 1))
    assert torch.allclose(y_small, y[t_steps:, :1], atol=1e-6)
    assert torch.allclose(masked, y_fresh, atol=1e-6)


def test_lstm_expose_hidden():
    t_steps, n, d, h = 3, 2, 3, 4
    text = lstm_text(h, bottoms=("x", "cont", "h0", "c0"), tops=("h", "hT", "cT"), expose=True)
    layer, mod = make(text, [(t_steps, n, d), (t_steps, n), (1, n, h), (1, n, h)], seed=7)
    assert layer.top_shapes == [(t_steps, n, h), (1, n, h), (1, n, h)]
    assert len(layer.blobs) == 3  # exposed states are not a static input (no W_xc_static)
    ref, _ = torch_lstm_from(mod, d, h)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(t_steps, n, d, generator=g)
    h0 = torch.randn(1, n, h, generator=g).requires_grad_()
    c0 = torch.randn(1, n, h, generator=g).requires_grad_()
    cont = torch.ones(t_steps, n)
    y, h_t, c_t = mod(x, cont, h0, c0)
    yr, (hr, cr) = ref(x, (h0.detach(), c0.detach()))
    assert torch.allclose(y, yr, atol=1e-6)
    assert torch.allclose(h_t, hr, atol=1e-6) and torch.allclose(c_t, cr, atol=1e-6)
    assert not h_t.requires_grad and not c_t.requires_grad  # Caffe drops diffs of h_T / c_T
    y.sum().backward()
    assert h0.grad is None and c0.grad is None  # and gives none to h_0 / c_0
    # exposed: each forward starts from the given states, nothing is carried
    y_again, _, _ = mod(x, cont, h0, c0)
    assert torch.allclose(y_again, y)
    # cont_1 = 0 ignores the given initial state
    cont0 = cont.clone()
    cont0[0] = 0
    y0, _, _ = mod(x, cont0, h0, c0)
    yz, _ = ref(x)
    assert torch.allclose(y0, yz, atol=1e-6)


def test_lstm_static_input_equals_concatenated_input():
    """W_xc x_t + W_xc_static s == [W_xc | W_xc_static] [x_t ; s]."""
    t_steps, n, d, ds, h = 4, 2, 3, 2, 3
    text = lstm_text(h, bottoms=("x", "cont", "s"))
    layer, mod = make(text, [(t_steps, n, d), (t_steps, n), (n, ds)], seed=9)
    assert [b.role for b in layer.blobs] == ["W_xc", "b_c", "W_xc_static", "W_hc"]
    _, cat = make(lstm_text(h), [(t_steps, n, d + ds), (t_steps, n)], seed=9)
    with torch.no_grad():
        cat.blobs[0].copy_(torch.cat([mod.blobs[0], mod.blobs[2]], 1))
        cat.blobs[1].copy_(mod.blobs[1])
        cat.blobs[2].copy_(mod.blobs[3])
    g = torch.Generator().manual_seed(10)
    x, s = torch.randn(t_steps, n, d, generator=g), torch.randn(n, ds, generator=g)
    cont = torch.ones(t_steps, n)
    with torch.no_grad():
        y = mod(x, cont, s)
        yc = cat(torch.cat([x, s.unsqueeze(0).expand(t_steps, n, ds)], 2), cont)
    assert torch.allclose(y, yc, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# LSTMUnit: numpy transcription of lstm_unit_layer.cpp Forward_cpu / Backward_cpu


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm_unit_np(c_prev, x, cont, c_diff, h_diff):
    hd = c_prev.shape[-1]
    c_prev, x = c_prev.reshape(-1, hd), x.reshape(-1, 4 * hd)
    cont, c_diff, h_diff = cont.reshape(-1), c_diff.reshape(-1, hd), h_diff.reshape(-1, hd)
    n = c_prev.shape[0]
    c, h = np.zeros_like(c_prev), np.zeros_like(c_prev)
    dc_prev, dx = np.zeros_like(c_prev), np.zeros_like(x)
    for k in range(n):
        for d in range(hd):
            i = _sig(x[k, d])
            f = 0.0 if cont[k] == 0 else cont[k] * _sig(x[k, hd + d])
            o = _sig(x[k, 2 * hd + d])
            g = 2 * _sig(2 * x[k, 3 * hd + d]) - 1
            c[k, d] = f * c_prev[k, d] + i * g
            tanh_c = 2 * _sig(2 * c[k, d]) - 1
            h[k, d] = o * tanh_c
            c_term = c_diff[k, d] + h_diff[k, d] * o * (1 - tanh_c * tanh_c)
            dc_prev[k, d] = c_term * f
            dx[k, d] = c_term * g * i * (1 - i)
            dx[k, hd + d] = c_term * c_prev[k, d] * f * (1 - f)
            dx[k, 2 * hd + d] = h_diff[k, d] * tanh_c * o * (1 - o)
            dx[k, 3 * hd + d] = c_term * i * (1 - g * g)
    return c, h, dc_prev, dx


def test_lstm_unit_layer_matches_caffe_loops():
    n, hd = 3, 4
    layer, mod = make('name:"u" type:"LSTMUnit" bottom:"c0" bottom:"x" bottom:"cont" top:"c" top:"h"',
                      [(1, n, hd), (1, n, 4 * hd), (1, n)])
    assert layer.top_shapes == [(1, n, hd), (1, n, hd)]
    rs = np.random.RandomState(11)
    c_prev, x = rs.randn(1, n, hd), rs.randn(1, n, 4 * hd) * 2
    cont = np.array([[1.0, 0.0, 1.0]])
    c_diff, h_diff = rs.randn(1, n, hd), rs.randn(1, n, hd)
    tc, tx = torch.tensor(c_prev, requires_grad=True), torch.tensor(x, requires_grad=True)
    tcont = torch.tensor(cont, requires_grad=True)
    c, h = mod(tc, tx, tcont)
    torch.autograd.backward([c, h], [torch.tensor(c_diff), torch.tensor(h_diff)])
    ec, eh, edc, edx = lstm_unit_np(c_prev, x, cont, c_diff, h_diff)
    np.testing.assert_allclose(c.detach().numpy().reshape(n, hd), ec, atol=1e-12)
    np.testing.assert_allclose(h.detach().numpy().reshape(n, hd), eh, atol=1e-12)
    np.testing.assert_allclose(tc.grad.numpy().reshape(n, hd), edc, atol=1e-12)
    np.testing.assert_allclose(tx.grad.numpy().reshape(n, 4 * hd), edx, atol=1e-12)
    assert tcont.grad is None
    with pytest.raises(ShapeError, match="4 x 4"):
        make('name:"u" type:"LSTMUnit" bottom:"c0" bottom:"x" bottom:"cont" top:"c" top:"h"',
             [(1, n, hd), (1, n, 3 * hd), (1, n)])


# ----------------------------------------------------------------------------------------------------------
# RNN: numpy transcription of the unrolled net (rnn_layer.cpp FillUnrolledNet)


def rnn_np(x, cont, w_xh, b_h, w_hh, w_ho, b_o, h0, w_s=None, s=None):
    t_steps, n = x.shape[:2]
    xw = x.reshape(t_steps, n, -1) @ w_xh.T + b_h
    if s is not None:
        xw = xw + (s.reshape(n, -1) @ w_s.T)[None]
    h = h0
    hs = []
    for t in range(t_steps):
        h = np.tanh((cont[t][:, None] * h) @ w_hh.T + xw[t])
        hs.append(h)
    return np.tanh(np.stack(hs) @ w_ho.T + b_o), h


def test_rnn_params_and_forward_with_static_input():
    t_steps, n, d, ds, h = 5, 3, 4, 2, 3
    text = ('name:"rnn" type:"RNN" bottom:"x" bottom:"cont" bottom:"s" top:"o" '
            'recurrent_param { num_output: 3 bias_filler { type: "constant" value: 0.5 } }')
    layer, mod = make(text, [(t_steps, n, d), (t_steps, n), (n, ds)], seed=12, dtype=torch.float64)
    assert [b.shape for b in layer.blobs] == [(3, 4), (3,), (3, 2), (3, 3), (3, 3), (3,)]
    assert [b.role for b in layer.blobs] == ["W_xh", "b_h", "W_xh_static", "W_hh", "W_ho", "b_o"]
    assert [b.filler.value for b in layer.blobs if b.role.startswith("b_")] == [0.5, 0.5]
    rs = np.random.RandomState(13)
    x, s = rs.randn(t_steps, n, d), rs.randn(n, ds)
    cont = np.ones((t_steps, n))
    cont[0] = 0
    cont[2, 1] = 0
    w = [b.detach().numpy() for b in mod.blobs]
    y = mod(torch.tensor(x), torch.tensor(cont), torch.tensor(s))
    ey, eh = rnn_np(x, cont, w[0], w[1], w[3], w[4], w[5], np.zeros((n, h)), w[2], s)
    np.testing.assert_allclose(y.detach().numpy(), ey, atol=1e-12)
    # the next forward starts from this forward's h_T (cont_1 = 1)
    x2 = rs.randn(t_steps, n, d)
    cont2 = np.ones((t_steps, n))
    y2 = mod(torch.tensor(x2), torch.tensor(cont2), torch.tensor(s))
    ey2, _ = rnn_np(x2, cont2, w[0], w[1], w[3], w[4], w[5], eh, w[2], s)
    np.testing.assert_allclose(y2.detach().numpy(), ey2, atol=1e-12)


def test_rnn_gradients_gradcheck_and_exposed_hidden():
    t_steps, n, d, h = 3, 2, 2, 3
    text = ('name:"rnn" type:"RNN" bottom:"x" bottom:"cont" bottom:"h0" top:"o" top:"hT" '
            'recurrent_param { num_output: 3 expose_hidden: true }')
    layer, mod = make(text, [(t_steps, n, d), (t_steps, n), (1, n, h)], seed=14, dtype=torch.float64)
    assert layer.top_shapes == [(t_steps, n, h), (1, n, h)]
    assert len(layer.blobs) == 5
    rs = np.random.RandomState(15)
    x = torch.tensor(rs.randn(t_steps, n, d), requires_grad=True)
    h0 = torch.tensor(rs.randn(1, n, h))
    cont = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.autograd.gradcheck(lambda xx, *ps: mod(xx, cont, h0)[0], (x, *mod.blobs))
    o, h_t = mod(x, cont, h0)
    w = [b.detach().numpy() for b in mod.blobs]
    ey, eh = rnn_np(x.detach().numpy(), cont.numpy(), w[0], w[1], w[2], w[3], w[4], h0.numpy()[0])
    np.testing.assert_allclose(o.detach().numpy(), ey, atol=1e-12)
    np.testing.assert_allclose(h_t.numpy()[0], eh, atol=1e-12)
    assert not h_t.requires_grad


# ----------------------------------------------------------------------------------------------------------
# shape rules


@pytest.mark.parametrize("text, shapes, match", [
    (lstm_text(0), [(2, 1, 3), (2, 1)], "num_output must be positive"),
    (lstm_text(4), [(2, 1, 3), (2, 1, 1)], "exactly 2 axes"),
    (lstm_text(4), [(2, 1, 3), (3, 1)], r"must be \(T, N\)"),
    (lstm_text(4), [(2,), (2, 1)], "at least 2 axes"),
    (lstm_text(4, bottoms=("x", "cont", "s")), [(2, 1, 3), (2, 1), (2, 5)], "static input"),
    (lstm_text(4, tops=("h", "hT")), [(2, 1, 3), (2, 1)], "exactly 1 top"),
    (lstm_text(4, bottoms=("x", "cont", "h0", "c0"), tops=("h", "hT", "cT"), expose=True),
     [(2, 1, 3), (2, 1), (1, 1, 4), (1, 2, 4)], r"c_0 .* must be \(1, 1, 4\)"),
])
def test_recurrent_shape_errors(text, shapes, match):
    with pytest.raises(ShapeError, match=match):
        make(text, shapes)


def test_registry_entries():
    for t in ("RNN", "LSTM"):
        e = registry.get(t)
        assert e.no_grad_bottoms == (1,) and not e.loss and e.family == "recurrent"
    assert registry.get("LSTMUnit").no_grad_bottoms == (2,)


def test_lstm_unit_function_forces_forget_gate_to_zero():
    gates = torch.tensor([[0.0, 30.0, 0.0, 1.0]])  # f = sigmoid(30) ~ 1, but cont = 0 forces it to 0
    c, _ = lstm_unit(torch.tensor([[3.0]]), gates, torch.tensor([0.0]))
    assert float(c) == pytest.approx(0.5 * np.tanh(1.0), rel=1e-6)  # only i·g remains
    c, _ = lstm_unit(torch.tensor([[3.0]]), gates, torch.tensor([0.5]))
    assert float(c) == pytest.approx(0.5 * 3.0 + 0.5 * np.tanh(1.0), rel=1e-6)  # Caffe scales f by cont
