"""Normalisation layers: BatchNorm, Scale, Bias, MVN (CAFFE_SEMANTICS.md §7.1/§7.2, oracle README).

* **BatchNorm** has no affine part. Its three blobs are ``[mean·s, var·s, s]`` (not learnable, zeros by
  default); the layer divides by ``s`` (``s == 0`` ⇒ factor 0). ``use_global_stats`` defaults to the
  *layer's* phase being TEST. Without global stats the forward normalises with the biased batch variance and
  updates the blobs in place: ``s ← maf·s + 1``, ``m ← maf·m + mean``, ``v ← maf·v + var·M/(M−1)``. ``eps`` is
  added to the variance. The global-stats backward treats the statistics as constants, as Caffe does.
* **Scale** / **Bias**: one bottom ⇒ a learned blob of shape ``bottom.shape[axis : axis+num_axes]`` broadcast
  over the other axes (Scale's default filler is constant 1, Bias's constant 0; Scale with ``bias_term`` adds a
  bias blob of the same shape). Two bottoms ⇒ bottom[1] is the scale/bias (its own shape decides; a 0-axis one
  is broadcast everywhere) and receives a gradient.
* **MVN**: ``(x − mean) / (std + eps)`` per (n, c) or per n (``across_channels``), biased std, top forced 4-D.
  Its gradient is Caffe's formula ``(dy − mean(dy) − y·mean(y·dy)) / (std + eps)``, which differs from the
  exact derivative only through eps, and is finite on constant groups (see :func:`_caffe_std`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CaffeLayer
from .registry import ParamBlob, ShapeError, canonical_axis, constant_filler, count, register

FAMILY = "norm"


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


# ==========================================================================================================
# BatchNorm


def _bn_channels(shape) -> int:
    return 1 if len(shape) == 1 else int(shape[1])


def _bn_shape(layer, bottoms):
    if len(bottoms[0]) < 1:
        raise ShapeError("BatchNorm needs a bottom with at least one axis")
    return [tuple(bottoms[0])]


def _bn_params(layer, bottoms):
    c = _bn_channels(bottoms[0])
    return [ParamBlob((c,), None, learnable=False, role="mean"),
            ParamBlob((c,), None, learnable=False, role="variance"),
            ParamBlob((1,), None, learnable=False, role="scale factor")]


def _bn_flops(layer, bottoms, tops):
    return count(bottoms[0])  # one subtract-and-scale per element


def use_global_stats(layer) -> bool:
    p = layer.param.batch_norm_param
    return bool(p.use_global_stats) if p.HasField("use_global_stats") else layer.phase == "TEST"


class BatchNorm(CaffeLayer):
    """Caffe BatchNorm (statistics only; the affine part is a following Scale layer).

    Both modes run torch's fused ``batch_norm`` kernel. With batch statistics the kernel also writes the batch
    mean and the unbiased batch variance (``momentum`` 1) into two scratch buffers, from which Caffe's blobs
    are updated (``s ← maf·s + 1``, ``m ← maf·m + mean``, ``v ← maf·v + var·M/(M−1)``): no second pass over
    the input. :meth:`normalize` takes an optional per-channel ``weight``/``bias``, so the net can run a
    BatchNorm and the Scale that follows it as one kernel (see ``CaffeNet``)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.batch_norm_param
        self.global_stats = use_global_stats(layer)
        self.maf = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        if not self.global_stats:
            c = int(blobs[0].shape[0])
            self.register_buffer("batch_mean", torch.zeros(c), persistent=False)
            self.register_buffer("batch_var", torch.ones(c), persistent=False)
            self.register_buffer("one", torch.ones(1), persistent=False)

    def forward(self, x):
        return self.normalize(x)

    def statistics(self):
        """(mean, variance) from the blobs ``[mean·s, var·s, s]`` (``s == 0`` ⇒ factor 0), as constants."""
        s = self.blobs[2].detach()  # shape (1,): broadcasts over the channels
        factor = torch.where(s == 0, 0.0, s.reciprocal())
        return self.blobs[0].detach() * factor, self.blobs[1].detach() * factor

    def normalize(self, x, weight=None, bias=None, stats=None):
        """BatchNorm of ``x``, then ``·weight + bias`` per channel when given (a fused Scale layer).
        ``stats``: this layer's ``statistics()`` when already computed (:class:`GlobalStatistics`)."""
        one_d = x.dim() == 1
        if one_d:
            x = x.unsqueeze(1)
        if self.global_stats:
            mean, var = self.statistics() if stats is None else stats
            # (x − mean) / sqrt(var + eps) in one fused kernel; the statistics are constants for autograd
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        else:
            m = x.numel() // x.shape[1]
            if m > 1:
                # torch's training-mode batch_norm normalises with the biased batch variance, as Caffe, and
                # (momentum 1) leaves the batch mean and the unbiased variance in the scratch buffers
                y = F.batch_norm(x, self.batch_mean, self.batch_var, weight, bias, True, 1.0, self.eps)
                self._update_running(self.batch_mean, self.batch_var)
            else:  # one value per channel: torch refuses, Caffe gives (x − x)/sqrt(eps) = 0
                dims = [0] + list(range(2, x.dim()))
                mean = x.mean(dim=dims, keepdim=True)
                var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
                y = (x - mean) / torch.sqrt(var + self.eps)
                if weight is not None or bias is not None:
                    shape = (1, -1) + (1,) * (x.dim() - 2)
                    y = y * weight.reshape(shape) if weight is not None else y
                    y = y + bias.reshape(shape) if bias is not None else y
                self._update_running(mean, var)  # M == 1: Caffe's correction factor is 1
        if torch.is_grad_enabled() and any(b.requires_grad for b in self.blobs):
            # force_backward: Caffe gives the statistics a diff, and it is zero (its backward never writes it)
            y = y + 0.0 * (self.blobs[0].sum() + self.blobs[1].sum() + self.blobs[2].sum())
        return y.squeeze(1) if one_d else y

    def _update_running(self, mean, var) -> None:
        """Caffe's moving averages; ``var`` is already the unbiased (M/(M−1)-corrected) batch variance."""
        with torch.no_grad():
            b = self.blobs
            blobs = [b[0], b[1], b[2]]
            torch._foreach_mul_(blobs, self.maf)
            torch._foreach_add_(blobs, [mean.detach().reshape(-1), var.detach().reshape(-1), self.one])


class BatchNormScale:
    """A BatchNorm and the per-channel Scale that reads its top, run as one ``batch_norm`` kernel with the
    Scale's blobs as weight and bias (same arithmetic up to rounding; gradients reach both layers' blobs).

    Not a module: both layers stay registered in the net under their own names; this only calls them. When
    either layer has forward hooks it runs them one after the other, so the hooks fire."""

    def __init__(self, bn: BatchNorm, scale: "Scale"):
        self.bn, self.scale = bn, scale
        self.bias_index = 1 if scale.has_bias else None

    @staticmethod
    def fusable(bn, scale, bottom_shape) -> bool:
        """Whether ``scale`` (reading ``bn``'s top of shape ``bottom_shape``) multiplies per channel (axis 1)."""
        return (type(bn) is BatchNorm and type(scale) is Scale and not scale.two_bottoms
                and bottom_shape is not None and len(bottom_shape) >= 2 and scale.per_channel)

    def __call__(self, x, stats=None):
        bn, scale = self.bn, self.scale
        if bn._forward_hooks or bn._forward_pre_hooks or scale._forward_hooks or scale._forward_pre_hooks:
            return scale(bn(x))
        b = scale.blobs
        return bn.normalize(x, b[0], None if self.bias_index is None else b[self.bias_index], stats)


class GlobalBatchNorm:
    """A ``use_global_stats`` BatchNorm given its statistics by :class:`GlobalStatistics` (hooks still fire)."""

    def __init__(self, bn: BatchNorm):
        self.bn = bn

    def __call__(self, x, stats):
        bn = self.bn
        if bn._forward_hooks or bn._forward_pre_hooks:
            return bn(x)
        return bn.normalize(x, stats=stats)


class GlobalStatistics:
    """The (mean, variance) of many ``use_global_stats`` BatchNorms in a handful of kernels (concatenate, scale
    by each layer's factor, split) instead of five per layer: the same arithmetic, element for element."""

    def __init__(self, bns):
        self.bns = list(bns)
        self.sizes = [int(bn.blobs[0].shape[0]) for bn in self.bns]
        self.index = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))

    def __call__(self):
        if torch.compiler.is_compiling():
            # a compiled graph fuses each layer's few ops into its consumer; the gather by channel would stop
            # that kernel from vectorising
            return tuple(bn.statistics() for bn in self.bns)
        blobs = [bn.blobs for bn in self.bns]
        s = torch.cat([b[2] for b in blobs]).detach()
        if self.index.device != s.device:
            self.index = self.index.to(s.device)
        factor = torch.where(s == 0, 0.0, s.reciprocal())[self.index]
        mean = torch.cat([b[0] for b in blobs]).detach() * factor
        var = torch.cat([b[1] for b in blobs]).detach() * factor
        return tuple(zip(mean.split(self.sizes), var.split(self.sizes)))


# ==========================================================================================================
# Scale / Bias


def _blob_axes(layer, bottoms, p, what: str):
    """(axis, blob shape) of a Scale/Bias: the learned blob's shape (1 bottom) or bottom[1]'s (2 bottoms)."""
    b = tuple(bottoms[0])
    if len(bottoms) > 1:
        shape = tuple(bottoms[1])
    else:
        if p.num_axes < -1:
            raise ShapeError("num_axes must be non-negative, or -1 to extend to the end of bottom[0]")
        axis = canonical_axis(p.axis, len(b), f"{what}_param.axis")
        if p.num_axes >= 0 and len(b) < axis + p.num_axes:
            raise ShapeError(f"{what} blob's shape extends past bottom[0]'s shape when applied starting with "
                             f"bottom[0] axis = {axis}")
        shape = b[axis:] if p.num_axes == -1 else b[axis:axis + p.num_axes]
    axis = 0 if len(shape) == 0 else canonical_axis(p.axis, len(b), f"{what}_param.axis")
    if len(b) < axis + len(shape):
        raise ShapeError(f"{what} of shape {_fmt(shape)} does not fit bottom[0] {_fmt(b)} from axis {axis}")
    for i, d in enumerate(shape):
        if b[axis + i] != d:
            raise ShapeError(f"dimension mismatch between bottom[0]->shape({axis + i}) = {b[axis + i]} and "
                             f"{what}->shape({i}) = {d} (bottom[0] {_fmt(b)}, {what} {_fmt(shape)})")
    return axis, shape


def _scale_shape(layer, bottoms):
    _blob_axes(layer, bottoms, layer.param.scale_param, "scale")
    return [tuple(bottoms[0])]


def _bias_shape(layer, bottoms):
    _blob_axes(layer, bottoms, layer.param.bias_param, "bias")
    return [tuple(bottoms[0])]


def _scale_params(layer, bottoms):
    p = layer.param.scale_param
    _, shape = _blob_axes(layer, bottoms, p, "scale")
    blobs = []
    if len(bottoms) == 1:
        blobs.append(ParamBlob(shape, p.filler if p.HasField("filler") else constant_filler(1.0), role="scale"))
    if p.bias_term:
        blobs.append(ParamBlob(shape, p.bias_filler if p.HasField("bias_filler") else constant_filler(0.0),
                               role="bias"))
    return blobs


def _bias_params(layer, bottoms):
    if len(bottoms) > 1:
        return []
    p = layer.param.bias_param
    _, shape = _blob_axes(layer, bottoms, p, "bias")
    return [ParamBlob(shape, p.filler if p.HasField("filler") else constant_filler(0.0), role="bias")]


def _scale_flops(layer, bottoms, tops):
    return count(bottoms[0])


class _Broadcast(CaffeLayer):
    """Shared plumbing: reshape a blob of shape ``bottom.shape[axis : axis+k]`` to broadcast against bottom 0."""

    def _setup(self, layer, p, what):
        axis, shape = _blob_axes(layer, layer.bottom_shapes, p, what)
        # trailing singleton axes after the blob's axes; the leading ones come from broadcasting
        self.trailing = (1,) * (len(layer.bottom_shapes[0]) - axis - len(shape))

    def _expand(self, t):
        return t.reshape(tuple(t.shape) + self.trailing) if self.trailing and t.dim() else t


class Scale(_Broadcast):
    """``y = x·scale (+ bias)``; the scale is blob 0 (1 bottom) or bottom 1."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.scale_param
        self._setup(layer, p, "scale")
        self.two_bottoms = len(layer.bottom_shapes) > 1
        self.has_bias = bool(p.bias_term)
        axis, shape = _blob_axes(layer, layer.bottom_shapes, p, "scale")
        b = layer.bottom_shapes[0]
        self.per_channel = axis == 1 and len(shape) == 1 and len(b) >= 2 and shape[0] == b[1]

    def forward(self, x, *rest):
        s = self._expand(rest[0] if self.two_bottoms else self.blobs[0])
        if self.has_bias:  # x·s + b in one pass
            return torch.addcmul(self._expand(self.blobs[0 if self.two_bottoms else 1]), x, s)
        return x * s


class Bias(_Broadcast):
    """``y = x + bias``; the bias is blob 0 (1 bottom) or bottom 1."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self._setup(layer, layer.param.bias_param, "bias")
        self.two_bottoms = len(layer.bottom_shapes) > 1

    def forward(self, x, *rest):
        return x + self._expand(rest[0] if self.two_bottoms else self.blobs[0])


# ==========================================================================================================
# MVN


def _mvn_shape(layer, bottoms):
    b = tuple(bottoms[0])
    if len(b) > 4:
        raise ShapeError(f"MVN reads its bottom through Caffe's legacy (num, channels, height, width) accessors, "
                         f"which allow at most 4 axes; got {_fmt(b)}")
    return [b + (1,) * (4 - len(b))]


def _mvn_flops(layer, bottoms, tops):
    return 2 * count(bottoms[0])


def _caffe_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(var)`` whose derivative is ``1/(2·(sqrt(var) + eps))`` instead of ``1/(2·sqrt(var))``.

    With it, autograd of ``(x − mean)/(std + eps)`` is exactly Caffe's MVN backward (which uses ``y/(std+eps)``
    where the true derivative has ``(x − mean)/std``), and stays finite on constant groups (var == 0)."""
    std = torch.sqrt(var.detach())
    return std + (var - var.detach()) / (2.0 * (std + eps))


class MVN(CaffeLayer):
    """Mean-variance normalisation over each (n, c) plane, or each n with ``across_channels``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.mvn_param
        self.dims = (1, 2, 3) if p.across_channels else (2, 3)
        self.normalize_variance = bool(p.normalize_variance)
        self.eps = float(p.eps)
        self.pad_axes = 4 - len(layer.bottom_shapes[0])

    def forward(self, x):
        if self.pad_axes:
            x = x.reshape(tuple(x.shape) + (1,) * self.pad_axes)
        centred = x - x.mean(dim=self.dims, keepdim=True)
        if not self.normalize_variance:
            return centred
        var = (centred * centred).mean(dim=self.dims, keepdim=True)
        return centred / (_caffe_std(var, self.eps) + self.eps)


# ==========================================================================================================
# registration


def _reg(name, shape, lower, **kw):
    register(name, shape=shape, lower=lower, family=FAMILY, **kw)


_reg("BatchNorm", _bn_shape, BatchNorm, params=_bn_params, flops=_bn_flops, bottoms=(1, 1), tops=(1, 1),
     doc="Batch normalisation statistics ([mean·s, var·s, s] blobs); affine part is a Scale layer")
_reg("Scale", _scale_shape, Scale, params=_scale_params, flops=_scale_flops, bottoms=(1, 2), tops=(1, 1),
     doc="Broadcast multiply by a learned (or second-bottom) scale, optional bias")
_reg("Bias", _bias_shape, Bias, params=_bias_params, bottoms=(1, 2), tops=(1, 1),
     doc="Broadcast add of a learned (or second-bottom) bias")
_reg("MVN", _mvn_shape, MVN, flops=_mvn_flops, bottoms=(1, 1), tops=(1, 1),
     doc="Mean-variance normalisation")
