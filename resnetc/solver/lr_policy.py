"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``), with Caffe's float arithmetic.

Caffe computes the rate in ``float`` except where C++ promotes to ``double``: ``pow(float, int)`` (step,
exp, multistep) is a double ``pow`` times the float ``base_lr`` in double; ``pow(float, float)`` and
``exp(float)`` (inv, poly, sigmoid) give a correctly rounded float, then the products are float. (The
``inv`` run of the oracle tells the two apart: at iteration 40 Caffe logs 0.00997011, numpy's float32
``power`` gives 1 ulp less.)
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ResnetcError

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

f32 = np.float32


def _powf(x, y) -> np.float32:
    """C's ``powf``: the exact power rounded once to float (nan/inf as C gives them)."""
    try:
        return f32(math.pow(float(x), float(y)))
    except (OverflowError, ValueError):
        with np.errstate(all="ignore"):
            return f32(np.power(np.float64(x), np.float64(y)))


def _expf(x) -> np.float32:
    try:
        return f32(math.exp(float(x)))
    except OverflowError:
        return f32(np.inf)


def check_policy(param, file=None) -> None:
    """The checks Caffe makes (it makes them lazily, at the first update; we fail before training)."""
    policy = param.lr_policy
    if not param.HasField("lr_policy"):
        raise ResnetcError(f"the solver has no lr_policy (Caffe has no default; one of: {', '.join(POLICIES)})",
                           file=file)
    if policy not in POLICIES:
        raise ResnetcError(f"unknown lr_policy '{policy}' (one of: {', '.join(POLICIES)})", file=file)
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise ResnetcError(f"lr_policy '{policy}' needs stepsize > 0 (got {param.stepsize})", file=file)
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise ResnetcError(f"lr_policy '{policy}' needs gamma >= 0 (got {param.gamma:g})", file=file)
    if policy == "poly" and param.max_iter <= 0:
        raise ResnetcError("lr_policy 'poly' needs max_iter > 0", file=file)


def learning_rate(param, it: int, current_step: int):
    """Return ``(rate as np.float32, new current_step, log line or None)`` for the update at ``it``
    (the number of updates already applied)."""
    policy = param.lr_policy
    base = f32(param.base_lr)
    gamma = f32(param.gamma)
    note = None
    if policy == "fixed":
        rate = base
    elif policy == "step":
        current_step = it // param.stepsize
        rate = f32(float(base) * float(gamma) ** current_step)
    elif policy == "exp":
        rate = f32(float(base) * float(gamma) ** it)
    elif policy == "inv":
        rate = base * _powf(f32(1) + gamma * f32(it), -f32(param.power))
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
            note = f"MultiStep Status: Iteration {it}, step = {current_step}"
        rate = f32(float(base) * float(gamma) ** current_step)
    elif policy == "poly":
        rate = base * _powf(f32(1) - f32(it) / f32(param.max_iter), f32(param.power))
    elif policy == "sigmoid":
        rate = base * (f32(1) / (f32(1) + _expf(-gamma * (f32(it) - f32(param.stepsize)))))
    else:
        raise ResnetcError(f"unknown lr_policy '{policy}' (one of: {', '.join(POLICIES)})")
    return f32(rate), current_step, note
