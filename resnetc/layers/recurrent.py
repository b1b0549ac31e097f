"""RNN, LSTM and LSTMUnit with Caffe's unrolled semantics (CAFFE_SEMANTICS.md §7.4).

Caffe builds an unrolled net of InnerProduct (axis 2), Scale (by ``cont``), Eltwise SUM, TanH / LSTMUnit
layers; we compute the same recurrence with plain torch ops over a Python loop on T, so autograd yields
Caffe's gradients:

* Bottoms: ``x (T, N, ...)``, ``cont (T, N)``, an optional static input ``x_static (N, ...)``, then, only
  with ``expose_hidden``, the initial states (RNN ``h_0``; LSTM ``h_0``, ``c_0``), each ``(1, N, H)``. The
  static input is recognised by the bottom count (``len > 2 + #exposed states``), as in Caffe.
* ``cont_t`` multiplies the previous state (0 starts a new sequence). Without ``expose_hidden`` the
  initial state of a forward is the final state of the previous forward (zeros at first); like Caffe, no
  gradient crosses forward calls. No gradient reaches ``cont`` or the exposed ``h_0``/``c_0``, and none
  flows back from the exposed ``h_T``/``c_T`` tops (Caffe shares their data only, not their diffs).
* Parameter blobs in Caffe's order. LSTM: ``W_xc (4H, D)``, ``b_c (4H)``, [``W_xc_static (4H, D_s)``],
  ``W_hc (4H, H)`` with gate blocks **i, f, o, g**. RNN: ``W_xh (H, D)``, ``b_h (H)``,
  [``W_xh_static (H, D_s)``], ``W_hh (H, H)``, ``W_ho (H, H)``, ``b_o (H)``. ``D = x.count(2)``,
  ``D_s = x_static.count(1)``. Fillers: ``recurrent_param.weight_filler`` / ``bias_filler`` (default
  constant 0).

One documented difference: Caffe's LSTMUnit backward uses ``f(1 − f)`` with ``f = cont·σ(a_f)`` for the
forget-gate derivative; for the usual binary ``cont`` that equals the true derivative that autograd gives,
for a fractional ``cont`` it does not (Caffe's is not the derivative of its own forward there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CaffeLayer
from .registry import ParamBlob, ShapeError, count, filler_or_default, register

_STATES = {"RNN": ("h_0",), "LSTM": ("h_0", "c_0")}
_FINAL = {"RNN": ("h_T",), "LSTM": ("h_T", "c_T")}


def _num_states(layer) -> int:
    return len(_STATES[layer.type]) if layer.param.recurrent_param.expose_hidden else 0


def _has_static(layer) -> bool:
    return len(layer.caffe_bottoms) > 2 + _num_states(layer)


def _recurrent_check(layer) -> None:
    rp = layer.param.recurrent_param
    if rp.num_output <= 0:
        raise ShapeError("recurrent_param.num_output must be positive")
    k = _num_states(layer)
    nb, nt = len(layer.caffe_bottoms), len(layer.caffe_tops)
    if nb > 3 + k:
        raise ShapeError(f"takes at most {3 + k} bottoms (x, cont, optional static input"
                         + (f", {', '.join(_STATES[layer.type])}" if k else "") + f"), got {nb}")
    if nt != 1 + k:
        what = "the output" + (f" and the final states {', '.join(_FINAL[layer.type])}" if k else "")
        raise ShapeError(f"produces exactly {1 + k} top(s) ({what}), got {nt}"
                         + ("" if k else " (set recurrent_param.expose_hidden to get the final states)"))


def _recurrent_shape(layer, bottoms):
    h = layer.param.recurrent_param.num_output
    x, cont = bottoms[0], bottoms[1]
    if len(x) < 2:
        raise ShapeError(f"bottom 0 must have at least 2 axes (#timesteps, #streams, ...), got {tuple(x)}")
    t, n = x[0], x[1]
    if len(cont) != 2:
        raise ShapeError(f"bottom 1 (cont) must have exactly 2 axes (#timesteps, #streams), got {tuple(cont)}")
    if tuple(cont) != (t, n):
        raise ShapeError(f"cont shape {tuple(cont)} must be (T, N) = ({t}, {n}) like the input")
    static = _has_static(layer)
    if static:
        s = bottoms[2]
        if len(s) < 1 or s[0] != n:
            raise ShapeError(f"the static input (bottom 2) must be (N, ...) with N = {n}, got {tuple(s)}")
    first_state = 2 + int(static)
    for j, shp in enumerate(bottoms[first_state:]):
        if tuple(shp) != (1, n, h):
            raise ShapeError(f"initial state {_STATES[layer.type][j]} (bottom {first_state + j}) must be "
                             f"(1, {n}, {h}), got {tuple(shp)}")
    tops = [(t, n, h)]
    tops += [(1, n, h)] * (len(layer.caffe_tops) - 1)
    return tops


def _recurrent_params(layer, bottoms):
    rp = layer.param.recurrent_param
    h = rp.num_output
    gates = 4 * h if layer.type == "LSTM" else h
    wf = filler_or_default(rp, "weight_filler")
    bf = filler_or_default(rp, "bias_filler")
    d = count(bottoms[0], 2)
    pre = "c" if layer.type == "LSTM" else "h"
    blobs = [ParamBlob((gates, d), wf, role=f"W_x{pre}"), ParamBlob((gates,), bf, role=f"b_{pre}")]
    if _has_static(layer):
        blobs.append(ParamBlob((gates, count(bottoms[2], 1)), wf, role=f"W_x{pre}_static"))
    if layer.type == "LSTM":
        blobs.append(ParamBlob((gates, h), wf, role="W_hc"))
    else:
        blobs += [ParamBlob((h, h), wf, role="W_hh"), ParamBlob((h, h), wf, role="W_ho"),
                  ParamBlob((h,), bf, role="b_o")]
    return blobs


def _recurrent_flops(layer, bottoms, tops):
    t, n = bottoms[0][0], bottoms[0][1]
    h = layer.param.recurrent_param.num_output
    g = 4 * h if layer.type == "LSTM" else h
    total = t * n * g * count(bottoms[0], 2) + t * n * g * h
    if layer.type == "RNN":
        total += t * n * h * h
    if _has_static(layer):
        total += n * g * count(bottoms[2], 1)
    return total


def lstm_unit(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor):
    """Caffe's LSTMUnit for one step: ``gates (..., 4H)`` in block order i, f, o, g; ``cont (...)``.

    ``f`` is forced to exactly 0 where ``cont == 0``; returns ``(c, h)``."""
    hdim = c_prev.shape[-1]
    i = torch.sigmoid(gates[..., :hdim])
    f = torch.sigmoid(gates[..., hdim:2 * hdim])
    o = torch.sigmoid(gates[..., 2 * hdim:3 * hdim])
    g = torch.tanh(gates[..., 3 * hdim:])
    cc = cont.unsqueeze(-1)
    f = torch.where(cc == 0, torch.zeros_like(f), cc * f)
    c = f * c_prev + i * g
    return c, o * torch.tanh(c)


class _Recurrent(CaffeLayer):
    """Shared plumbing: bottoms, carried state and the static input transform."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.hidden = layer.param.recurrent_param.num_output
        self.exposed = _num_states(layer)
        self.static = _has_static(layer)
        self.n_states = len(_STATES[layer.type])
        for j in range(self.n_states):
            self.register_buffer(f"_state{j}", None, persistent=False)

    def _split_bottoms(self, bottoms):
        x, cont = bottoms[0], bottoms[1]
        rest = list(bottoms[2:])
        xs = rest.pop(0) if self.static else None
        return x, cont, xs, rest

    def _initial_states(self, given, n, like):
        """Exposed states (detached: no gradient into them; absent ones are zero, as Caffe's never-written
        input blobs), else the final states of the previous forward. If N changed, Caffe keeps the first N
        streams' values when it shrank and starts from zeros when it grew (its blobs were reallocated)."""
        zeros = like.new_zeros((1, n, self.hidden))
        if self.exposed:
            return [given[j].detach() if j < len(given) else zeros for j in range(self.n_states)]
        out = []
        for j in range(self.n_states):
            s = getattr(self, f"_state{j}")
            if s is None or s.shape[1] < n or s.dtype != like.dtype or s.device != like.device:
                out.append(zeros)
            else:
                out.append(s[:, :n])
        return out

    def _remember(self, finals) -> None:
        if not self.exposed:
            for j, s in enumerate(finals):
                setattr(self, f"_state{j}", s.detach())

    def reset_state(self) -> None:
        """Forget the carried state (Caffe's ``RecurrentLayer::Reset``)."""
        for j in range(self.n_states):
            setattr(self, f"_state{j}", None)


class LSTM(_Recurrent):
    def forward(self, *bottoms):
        x, cont, xs, given = self._split_bottoms(bottoms)
        t_steps, n = x.shape[0], x.shape[1]
        w_xc, b_c = self.blobs[0], self.blobs[1]
        w_hc = self.blobs[3 if self.static else 2]
        xw = F.linear(x.reshape(t_steps, n, -1), w_xc, b_c)  # (T, N, 4H)
        if self.static:
            xw = xw + F.linear(xs.reshape(n, -1), self.blobs[2]).unsqueeze(0)
        cont = cont.detach().to(x.dtype)
        h, c = self._initial_states(given, n, x)
        h, c = h[0], c[0]
        hs = []
        for t in range(t_steps):
            ct = cont[t]
            gates = F.linear(ct.unsqueeze(-1) * h, w_hc) + xw[t]
            c, h = lstm_unit(c, gates, ct)
            hs.append(h)
        out = torch.stack(hs, 0)
        h_t, c_t = h.unsqueeze(0), c.unsqueeze(0)
        self._remember((h_t, c_t))
        if self.exposed:
            return out, h_t.detach(), c_t.detach()
        return out


class RNN(_Recurrent):
    def forward(self, *bottoms):
        x, cont, xs, given = self._split_bottoms(bottoms)
        t_steps, n = x.shape[0], x.shape[1]
        w_xh, b_h = self.blobs[0], self.blobs[1]
        k = 3 if self.static else 2
        w_hh, w_ho, b_o = self.blobs[k], self.blobs[k + 1], self.blobs[k + 2]
        xw = F.linear(x.reshape(t_steps, n, -1), w_xh, b_h)  # (T, N, H)
        if self.static:
            xw = xw + F.linear(xs.reshape(n, -1), self.blobs[2]).unsqueeze(0)
        cont = cont.detach().to(x.dtype)
        (h,) = self._initial_states(given, n, x)
        h = h[0]
        hs = []
        for t in range(t_steps):
            h = torch.tanh(F.linear(cont[t].unsqueeze(-1) * h, w_hh) + xw[t])
            hs.append(h)
        hseq = torch.stack(hs, 0)
        out = torch.tanh(F.linear(hseq, w_ho, b_o))
        h_t = h.unsqueeze(0)
        self._remember((h_t,))
        if self.exposed:
            return out, h_t.detach()
        return out


def _lstm_unit_shape(layer, bottoms):
    c_prev, gates, cont = bottoms
    if len(c_prev) != 3 or len(gates) != 3 or len(cont) != 2:
        raise ShapeError(f"LSTMUnit takes c_prev (1, N, H), gates (1, N, 4H) and cont (1, N); got "
                         f"{tuple(c_prev)}, {tuple(gates)}, {tuple(cont)}")
    n = c_prev[1]
    for i, b in enumerate(bottoms):
        if b[0] != 1 or b[1] != n:
            raise ShapeError(f"bottom {i} must be a single timestep of {n} streams (1, {n}, ...), got {tuple(b)}")
    if gates[2] != 4 * c_prev[2]:
        raise ShapeError(f"the gate input must have 4 x {c_prev[2]} = {4 * c_prev[2]} channels, got {gates[2]}")
    return [tuple(c_prev), tuple(c_prev)]


class LSTMUnit(CaffeLayer):
    """One LSTM step: bottoms ``c_prev (1,N,H)``, ``gates (1,N,4H)`` (i, f, o, g), ``cont (1,N)``; tops
    ``c``, ``h``. No gradient to ``cont``."""

    def forward(self, c_prev, gates, cont):
        return lstm_unit(c_prev, gates, cont.detach().to(c_prev.dtype))


_COMMON = dict(check=_recurrent_check, shape=_recurrent_shape, params=_recurrent_params, flops=_recurrent_flops,
               in_place=False, no_grad_bottoms=(1,), family="recurrent")
register("LSTM", lower=LSTM, bottoms=(2, 5), tops=(1, 3),
         doc="LSTM over T timesteps with sequence-continuation input (Caffe's unrolled semantics)", **_COMMON)
register("RNN", lower=RNN, bottoms=(2, 4), tops=(1, 2),
         doc="Elman RNN over T timesteps with sequence-continuation input", **_COMMON)
register("LSTMUnit", shape=_lstm_unit_shape, lower=LSTMUnit, bottoms=(3, 3), tops=(2, 2), in_place=False,
         no_grad_bottoms=(2,), family="recurrent", doc="one LSTM cell step (used inside Caffe's unrolled LSTM)")
