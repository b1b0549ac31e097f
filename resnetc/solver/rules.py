"""Caffe's per-type update rules (``src/caffe/solvers/*.cpp``), one class per solver ``type``.

Each rule gets the gradient ``g`` of one learnable param after clipping, ``÷ iter_size`` and regularisation,
and returns the value Caffe leaves in the param's diff (the step); the solver then does ``w -= step``.
Arithmetic follows Caffe's BLAS call order in float32 (``axpby(a, x, b, y)`` = ``y = b·y; y += a·x``).
History blobs are laid out as Caffe snapshots them: ``history_sets`` groups of one blob per learnable
param, in learnable order (Adam: all ``m`` then all ``v``; AdaDelta: all ``h_g`` then all ``h_u``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ResnetcError

f32 = np.float32


class UpdateRule:
    type_name = ""
    history_sets = 1

    def __init__(self, param, params: list):
        self.momentum = float(f32(param.momentum))
        self.delta = float(f32(param.delta))
        self.n = len(params)
        self.history = [torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
                        for _ in range(self.history_sets) for p in params]

    @classmethod
    def check(cls, param, file=None) -> None:
        """Constructor checks Caffe makes (FATAL there, a ResnetcError here)."""

    def step(self, i: int, g: torch.Tensor, local_rate: float, it: int) -> torch.Tensor:
        raise NotImplementedError


class SGD(UpdateRule):
    """history = momentum·history + rate·g; step = history (rate inside the momentum, unlike torch.optim)."""

    type_name = "SGD"

    def step(self, i, g, local_rate, it):
        h = self.history[i]
        h.mul_(self.momentum).add_(g, alpha=local_rate)
        return h


class Nesterov(UpdateRule):
    """h_new = m·h + rate·g; step = (1+m)·h_new − m·h_old."""

    type_name = "Nesterov"

    def step(self, i, g, local_rate, it):
        h = self.history[i]
        m = self.momentum
        old = h.clone()
        h.mul_(m).add_(g, alpha=local_rate)
        return old.mul_(-m).add_(h, alpha=float(f32(1) + f32(m)))


class AdaGrad(UpdateRule):
    """h += g²; step = rate · g / (sqrt(h) + δ)."""

    type_name = "AdaGrad"

    @classmethod
    def check(cls, param, file=None):
        if param.momentum != 0:
            raise ResnetcError("AdaGrad has no momentum: remove 'momentum' from the solver (Caffe requires 0)",
                               file=file)

    def step(self, i, g, local_rate, it):
        h = self.history[i]
        h.addcmul_(g, g)
        u = h.sqrt().add_(self.delta)
        return torch.div(g, u).mul_(local_rate)


class RMSProp(UpdateRule):
    """h = d·h + (1−d)·g²; step = rate · g / (sqrt(h) + δ)."""

    type_name = "RMSProp"

    def __init__(self, param, params):
        super().__init__(param, params)
        self.decay = float(f32(param.rms_decay))
        self.one_minus = float(f32(1) - f32(param.rms_decay))

    @classmethod
    def check(cls, param, file=None):
        if param.momentum != 0:
            raise ResnetcError("RMSProp has no momentum: remove 'momentum' from the solver (Caffe requires 0)",
                               file=file)
        if not 0 <= param.rms_decay < 1:
            raise ResnetcError(f"RMSProp needs 0 <= rms_decay < 1 (got {param.rms_decay:g})", file=file)

    def step(self, i, g, local_rate, it):
        h = self.history[i]
        h.mul_(self.decay).add_(g * g, alpha=self.one_minus)
        u = h.sqrt().add_(self.delta)
        return torch.div(g, u).mul_(local_rate)


class AdaDelta(UpdateRule):
    """h_g = m·h_g + (1−m)·g²; u = g·sqrt((h_u+δ)/(h_g+δ)); h_u = m·h_u + (1−m)·u²; step = rate·u.

    The scheduled rate (lr policy × lr_mult) applies, as in Caffe's source."""

    type_name = "AdaDelta"
    history_sets = 2

    def step(self, i, g, local_rate, it):
        m = self.momentum
        one_minus = float(f32(1) - f32(m))
        hg = self.history[i]
        hu = self.history[self.n + i]
        hg.mul_(m).add_(g * g, alpha=one_minus)
        u = torch.add(hu, self.delta).div_(torch.add(hg, self.delta)).sqrt_().mul_(g)
        hu.mul_(m).add_(u * u, alpha=one_minus)
        return u.mul_(local_rate)


class Adam(UpdateRule):
    """m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
    step = rate·sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + δ), t = iter + 1 (δ on the uncorrected sqrt(v))."""

    type_name = "Adam"
    history_sets = 2

    def __init__(self, param, params):
        super().__init__(param, params)
        self.beta1 = f32(param.momentum)
        self.beta2 = f32(param.momentum2)

    def step(self, i, g, local_rate, it):
        b1, b2 = self.beta1, self.beta2
        t = it + 1
        # C++: Dtype(1) - pow(float, int) is double; the quotient is stored as float
        correction = f32(math.sqrt(1.0 - float(b2) ** t) / (1.0 - float(b1) ** t))
        mh = self.history[i]
        vh = self.history[self.n + i]
        mh.mul_(float(b1)).add_(g, alpha=float(f32(1) - b1))
        vh.mul_(float(b2)).add_(g * g, alpha=float(f32(1) - b2))
        u = vh.sqrt().add_(self.delta)
        return torch.div(mh, u).mul_(float(f32(local_rate) * correction))


RULES = {cls.type_name: cls for cls in (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)}

# the deprecated SolverParameter.solver_type enum -> type string (Caffe's UpgradeSolverType)
LEGACY_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def rule_class(type_name: str, file=None):
    cls = RULES.get(type_name)
    if cls is None:
        raise ResnetcError(f"unknown solver type '{type_name}' (one of: {', '.join(RULES)})", file=file)
    return cls
