"""Neuron layers: one bottom, one top of the same shape, computed element by element (CAFFE_SEMANTICS.md §7.2).

Every forward follows Caffe's own formula and precision (where Caffe's ``1.``/``0.5`` constants make it compute
in double, as in BNLL and Sigmoid, the correctly rounded torch op is used), and is written so that plain
autograd gives Caffe's backward, including at the kinks:

* ReLU / PReLU: gradient at x == 0 is the negative slope (Caffe's ``x > 0`` test), as torch's leaky_relu/prelu.
* ELU: at x == 0 the gradient is ``alpha`` (Caffe: ``x > 0 ? 1 : y + alpha``): ``relu`` passes nothing at 0 and
  ``clamp(max=0)`` passes everything, so the sum is exactly Caffe's.
* BNLL: Caffe's two-branch formula, computed in double and rounded, is the correctly rounded softplus, which
  torch's fused ``softplus`` gives (gradient ``σ(x)``, 0.5 at 0).
* Clip: ``torch.clamp``'s gradient is inclusive at both bounds, as Caffe's ``min <= x <= max``.
* Threshold has no gradient (Caffe's backward is NOT_IMPLEMENTED), Power with ``power·scale == 0`` is a constant.

No custom autograd Function is needed here, so every layer exports to ONNX as plain operators.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import CaffeLayer
from .registry import ParamBlob, ShapeError, constant_filler, register

FAMILY = "neuron"


def same_shape(layer, bottoms):
    """Neuron layers: the top has the bottom's shape."""
    return [tuple(bottoms[0])]


def _neuron(name: str, lower, *, shape=same_shape, check=None, params=None, no_grad_bottoms=(),
            doc: str = "") -> None:
    register(name, shape=shape, check=check, params=params, lower=lower, bottoms=(1, 1), tops=(1, 1),
             no_grad_bottoms=no_grad_bottoms, family=FAMILY, doc=doc)


# ----------------------------------------------------------------------------------------------------------
# ReLU / PReLU


class ReLU(CaffeLayer):
    """``max(x, 0) + negative_slope·min(x, 0)``; gradient ``x > 0 ? 1 : negative_slope``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.negative_slope = float(layer.param.relu_param.negative_slope)

    def forward(self, x):
        if self.negative_slope == 0.0:
            return torch.relu(x)
        return F.leaky_relu(x, self.negative_slope)

    def inplace(self, x):
        """The same, overwriting ``x`` (the net uses it when nothing else reads ``x``; hooks still fire)."""
        if self._forward_hooks or self._forward_pre_hooks:
            return self(x)
        if self.negative_slope == 0.0:
            return torch.relu_(x)
        return F.leaky_relu_(x, self.negative_slope)


def _prelu_shape(layer, bottoms):
    if len(bottoms[0]) < 2:
        raise ShapeError(f"PReLU needs a bottom with at least 2 axes (channels on axis 1), got {len(bottoms[0])}")
    return same_shape(layer, bottoms)


def _prelu_params(layer, bottoms):
    p = layer.param.prelu_param
    shape = () if p.channel_shared else (bottoms[0][1],)
    filler = p.filler if p.HasField("filler") else constant_filler(0.25)
    return [ParamBlob(shape, filler, role="slope")]


class PReLU(CaffeLayer):
    """``max(x, 0) + a_c·min(x, 0)`` with a learned slope per channel (axis 1) or one shared slope."""

    def forward(self, x):
        w = self.blobs[0]
        # a channel-shared slope is a 0-axis blob; torch's prelu backward wants it 1-D
        return F.prelu(x, w.reshape(1) if w.dim() == 0 else w)


# ----------------------------------------------------------------------------------------------------------
# Smooth activations


class ELU(CaffeLayer):
    """``max(x, 0) + alpha·(exp(min(x, 0)) − 1)``; gradient ``x > 0 ? 1 : y + alpha``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.alpha = float(layer.param.elu_param.alpha)

    def forward(self, x):
        return torch.relu(x) + self.alpha * (torch.exp(torch.clamp(x, max=0.0)) - 1.0)


class Sigmoid(CaffeLayer):
    """Caffe computes ``0.5·tanh(0.5x) + 0.5`` in double precision (its constants are doubles) and rounds to
    float, i.e. the correctly rounded sigmoid: torch.sigmoid is that to an ulp (a float32 tanh form is not)."""

    def forward(self, x):
        return torch.sigmoid(x)


class TanH(CaffeLayer):
    def forward(self, x):
        return torch.tanh(x)


class AbsVal(CaffeLayer):
    """``|x|``; gradient ``sign(x)`` with sign(0) = 0."""

    def forward(self, x):
        return torch.abs(x)


class BNLL(CaffeLayer):
    """``x > 0 ? x + log(1 + e^−x) : log(1 + e^x)``; gradient ``σ(min(x, 50))``.

    Caffe evaluates the log in double (its ``1.`` constant is a double) and rounds once, i.e. the correctly
    rounded softplus; torch's fused ``softplus`` is that to an ulp (it returns x beyond 20, where Caffe's
    ``x + log1p(e^−x)`` rounds to x too), and its gradient is ``σ(x)``, 0.5 at 0, as Caffe's."""

    def forward(self, x):
        return F.softplus(x)


class Swish(CaffeLayer):
    """``x·σ(beta·x)`` with Caffe's tanh-form sigmoid."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.beta = float(layer.param.swish_param.beta)

    def forward(self, x):
        return x * torch.sigmoid(x if self.beta == 1.0 else self.beta * x)


# ----------------------------------------------------------------------------------------------------------
# Power / Exp / Log


class Power(CaffeLayer):
    """``(shift + scale·x)^power``. With ``power·scale == 0`` the top is the constant ``power == 0 ? 1 :
    shift^power`` and the bottom gets no gradient."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.constant = None
        if self.power * self.scale == 0.0:
            self.constant = 1.0 if self.power == 0.0 else _f32_pow(self.shift, self.power)

    def forward(self, x):
        if self.constant is not None:
            return torch.full_like(x, self.constant)
        y = x
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift != 0.0:
            y = y + self.shift
        if self.power != 1.0:
            y = torch.pow(y, self.power)
        return y


def _f32_pow(base: float, exponent: float) -> float:
    """std::pow on floats; NaN for a negative base with a fractional exponent, like C."""
    try:
        v = math.pow(base, exponent)
    except (ValueError, OverflowError):
        v = float("nan") if base < 0 else float("inf")
    return float(torch.tensor(v, dtype=torch.float32))


def _check_base(what: str):
    def check(layer):
        base = getattr(layer.param, what).base
        if base != -1 and not base > 0:
            raise ShapeError(f"{what}.base must be strictly positive, or -1 for e (got {base:g})")
    return check


class Exp(CaffeLayer):
    """``base^(shift + scale·x)`` computed as Caffe does: ``base^shift · exp(ln(base)·scale · x)``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        log_base = 1.0 if base == -1 else _f32(math.log(_f32(base)))
        self.inner = _f32(log_base * _f32(scale))
        if shift == 0.0:
            self.outer = 1.0
        else:
            self.outer = _f32(math.exp(_f32(shift))) if base == -1 else _f32_pow(_f32(base), _f32(shift))

    def forward(self, x):
        y = torch.exp(x if self.inner == 1.0 else x * self.inner)
        return y if self.outer == 1.0 else y * self.outer


class Log(CaffeLayer):
    """``log(shift + scale·x) / ln(base)`` (base −1 = natural log)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.log_param
        base = float(p.base)
        self.base_scale = 1.0 if base == -1 else _f32(1.0 / _f32(math.log(_f32(base))))
        self.scale, self.shift = float(p.scale), float(p.shift)

    def forward(self, x):
        y = x
        if self.scale != 1.0:
            y = y * self.scale
        if self.shift != 0.0:
            y = y + self.shift
        y = torch.log(y)
        return y if self.base_scale == 1.0 else y * self.base_scale


def _f32(v: float) -> float:
    """Round a Python float to float32 (Caffe holds these factors as Dtype)."""
    return float(torch.tensor(v, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------------
# Threshold / Clip / Dropout


class Threshold(CaffeLayer):
    """``x > threshold ? 1 : 0`` (strict). No gradient: Caffe's backward is NOT_IMPLEMENTED."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.threshold = float(layer.param.threshold_param.threshold)

    def forward(self, x):
        return (x.detach() > self.threshold).to(x.dtype)


class Clip(CaffeLayer):
    """``max(min, min(x, max))``; gradient where ``min <= x <= max`` (inclusive)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.clip_param
        self.lo, self.hi = float(p.min), float(p.max)

    def forward(self, x):
        if self.lo <= self.hi:
            return torch.clamp(x, self.lo, self.hi)
        # Caffe's order when min > max: every value becomes min, no gradient passes (torch.clamp would give max)
        return torch.clamp(torch.clamp(x, max=self.hi), min=self.lo)


def _dropout_check(layer):
    r = layer.param.dropout_param.dropout_ratio
    if not 0.0 <= r < 1.0:
        raise ShapeError(f"dropout_ratio must be in [0, 1) (got {r:g}): Caffe scales kept values by 1/(1 - ratio)")


class Dropout(CaffeLayer):
    """TRAIN (the layer's own phase): keep with probability ``1 − ratio`` and scale by ``1/(1 − ratio)``;
    TEST: identity. ``module.train()/eval()`` does not change it: the phase is fixed when the net is built."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.ratio = float(layer.param.dropout_param.dropout_ratio)
        self.active = layer.phase == "TRAIN" and self.ratio > 0.0

    def forward(self, x):
        if not self.active:
            return x
        return F.dropout(x, self.ratio, training=True)


# ----------------------------------------------------------------------------------------------------------
# Registration

_neuron("ReLU", ReLU, doc="max(x,0) + negative_slope*min(x,0)")
_neuron("PReLU", PReLU, shape=_prelu_shape, params=_prelu_params,
        doc="learned negative slope per channel (default 0.25)")
_neuron("ELU", ELU)
_neuron("Sigmoid", Sigmoid)
_neuron("TanH", TanH)
_neuron("AbsVal", AbsVal)
_neuron("BNLL", BNLL)
_neuron("Swish", Swish)
_neuron("Power", Power)
_neuron("Exp", Exp, check=_check_base("exp_param"))
_neuron("Log", Log, check=_check_base("log_param"))
_neuron("Threshold", Threshold, no_grad_bottoms=(0,))
_neuron("Clip", Clip)
_neuron("Dropout", Dropout, check=_dropout_check)
