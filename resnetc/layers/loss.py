"""Loss and accuracy layers with Caffe's exact semantics (CAFFE_SEMANTICS.md §7.3, §1.7).

Every loss module returns the **unweighted** loss as a 0-axis tensor, as Caffe's loss blob holds it:
``loss_weight`` scales only the gradient and the net's total, which CaffeNet forms. Labels (and every other
input Caffe never backpropagates into) are detached, so autograd gives exactly Caffe's bottom diffs:

* SoftmaxWithLoss / InfogainLoss use ``log_softmax`` (its gradient is Caffe's ``p - onehot`` exactly) and
  clamp the log-probability with a straight-through step, so the *value* is ``log(max(p, FLT_MIN))`` (or
  ``1e-20`` for Infogain) while the gradient stays Caffe's unclamped one.
* MultinomialLogisticLoss divides its gradient by the clamped probability, as Caffe does.
* ContrastiveLoss (non-legacy) divides its gradient by ``dist + 1e-4`` like Caffe, not by ``dist``.

Normalisation (``LossParameter``) follows Caffe per layer: SoftmaxWithLoss defaults to VALID and maps the
legacy ``normalize`` (true: VALID, false: BATCH_SIZE) when ``normalization`` is not written; SigmoidCE
prefers an explicit ``normalization``, then ``normalize``, else BATCH_SIZE; InfogainLoss rejects
``normalize``. The normaliser is floored at 1.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ResnetcError
from ..proto import caffe_pb2
from .base import CaffeLayer
from .registry import ShapeError, canonical_axis, count, register

FLT_MIN = float(np.finfo(np.float32).tiny)  # 1.17549435e-38, Caffe's clamp before the log
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD (Infogain, MultinomialLogistic)

Norm = caffe_pb2.LossParameter
_NORM_NAMES = {Norm.FULL: "FULL", Norm.VALID: "VALID", Norm.BATCH_SIZE: "BATCH_SIZE", Norm.NONE: "NONE"}


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling() or torch.jit.is_tracing()
    except AttributeError:  # pragma: no cover - older torch
        return torch.jit.is_tracing()


def _legacy_dims(shape, what: str) -> tuple:
    """Caffe's legacy accessors (num, channels, height, width): 1 for missing axes, FATAL beyond 4 axes."""
    if len(shape) > 4:
        raise ShapeError(f"{what} has {len(shape)} axes; this layer reads it with Caffe's legacy 4-D accessors "
                         f"(at most 4 axes)")
    return tuple(shape) + (1,) * (4 - len(shape))


def _check_first_dim(bottoms) -> None:
    """LossLayer::Reshape: bottom 0 and bottom 1 have the same first dimension."""
    a, b = bottoms[0], bottoms[1]
    if len(a) == 0 or len(b) == 0:
        raise ShapeError("loss inputs need at least one axis (the batch)")
    if a[0] != b[0]:
        raise ShapeError(f"the data and label should have the same first dimension: {a[0]} vs {b[0]}")


def _scalar_tops(layer, extra=()) -> list:
    """Top 0 is the 0-axis loss; ``extra`` gives the optional further tops, cut to the tops written."""
    tops = [()] + list(extra)
    return tops[:max(1, len(layer.caffe_tops))]


def softmax_normalization(lp) -> int:
    """SoftmaxWithLoss: ``normalize`` only counts when ``normalization`` is not written."""
    p = lp.loss_param
    if not p.HasField("normalization") and p.HasField("normalize"):
        return Norm.VALID if p.normalize else Norm.BATCH_SIZE
    return p.normalization


def sigmoid_ce_normalization(lp) -> int:
    """SigmoidCrossEntropyLoss: ``normalization`` > legacy ``normalize`` > BATCH_SIZE (not VALID)."""
    p = lp.loss_param
    if p.HasField("normalization"):
        return p.normalization
    if p.HasField("normalize"):
        return Norm.VALID if p.normalize else Norm.BATCH_SIZE
    return Norm.BATCH_SIZE


def normalizer(mode: int, outer: int, inner: int, valid=None):
    """Caffe's ``get_normalizer``, floored at 1. ``valid`` is the count of non-ignored labels (a tensor) or
    None when nothing can be ignored (then VALID equals FULL)."""
    if mode == Norm.FULL:
        return float(max(1, outer * inner))
    if mode == Norm.VALID:
        if valid is None:
            return float(max(1, outer * inner))
        return valid.clamp_min(1)
    if mode == Norm.BATCH_SIZE:
        return float(max(1, outer))
    if mode == Norm.NONE:
        return 1.0
    raise ResnetcError(f"unknown loss normalization mode {mode}")


def _clamp_min_st(x: torch.Tensor, lo: float) -> torch.Tensor:
    """``max(x, lo)`` in value, identity in gradient (Caffe clamps only the forward value)."""
    return x + (x.clamp_min(lo) - x).detach()


def _labels(label: torch.Tensor) -> torch.Tensor:
    """``static_cast<int>(label)``: truncation toward zero; never differentiated."""
    label = label.detach()
    return label if not label.is_floating_point() else label.trunc().long()


class _LossBase(CaffeLayer):
    def _bad_labels(self, lab: torch.Tensor, valid, num_classes: int) -> None:
        """Out-of-range labels are undefined behaviour in Caffe; we refuse them with a clear error."""
        if _compiling():
            return
        bad = (lab < 0) | (lab >= num_classes)
        if valid is not None:
            bad = bad & valid
        if bool(bad.any()):
            v = int(lab[bad][0])
            raise ResnetcError(f"label {v} is out of range for {num_classes} classes (labels must be integers in "
                               f"0..{num_classes - 1}" + (", or the ignore_label)" if valid is not None else ")"),
                               layer=self.layer_name, layer_type=self.layer_type)


# ----------------------------------------------------------------------------------------------------------
# SoftmaxWithLoss


def _softmax_loss_shape(layer, bottoms):
    _check_first_dim(bottoms)
    x, lab = bottoms
    axis = canonical_axis(layer.param.softmax_param.axis, len(x), "softmax_param.axis")
    outer, inner = count(x, 0, axis), count(x, axis + 1)
    if outer * inner != count(lab):
        raise ShapeError(f"number of labels ({count(lab)}) must match number of predictions ({outer}x{inner}): "
                         f"with softmax axis {axis} and prediction shape {tuple(x)}, the label count must be "
                         f"{outer * inner}")
    return _scalar_tops(layer, [tuple(x)])


class SoftmaxWithLoss(_LossBase):
    """Softmax over ``softmax_param.axis`` + multinomial logistic loss; optional 2nd top = probabilities
    (Caffe never backpropagates from it: it is returned detached)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        lp = layer.param
        self.axis_param = lp.softmax_param.axis
        self.has_ignore = lp.loss_param.HasField("ignore_label")
        self.ignore_label = lp.loss_param.ignore_label
        self.normalization = softmax_normalization(lp)
        self.with_prob = len(layer.caffe_tops) > 1

    def forward(self, x, label):
        axis = self.axis_param + x.dim() if self.axis_param < 0 else self.axis_param
        c = x.shape[axis]
        outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
        logp = torch.log_softmax(x, dim=axis).reshape(outer, c, inner)
        lab = _labels(label).reshape(outer, inner)
        valid = (lab != self.ignore_label) if self.has_ignore else None
        self._bad_labels(lab, valid, c)
        idx = lab if valid is None else torch.where(valid, lab, torch.zeros_like(lab))
        nll = -_clamp_min_st(logp.gather(1, idx.unsqueeze(1)).squeeze(1), math.log(FLT_MIN))
        if valid is not None:
            nll = torch.where(valid, nll, torch.zeros_like(nll))
        norm = normalizer(self.normalization, outer, inner, None if valid is None else valid.sum().to(x.dtype))
        loss = nll.sum() / norm
        if self.with_prob:
            return loss, torch.softmax(x.detach(), dim=axis)
        return loss


# ----------------------------------------------------------------------------------------------------------
# EuclideanLoss


def _euclidean_shape(layer, bottoms):
    _check_first_dim(bottoms)
    _legacy_dims(bottoms[0], "bottom 0")
    a, b = bottoms
    if count(a, 1) != count(b, 1):
        raise ShapeError(f"inputs must have the same dimension: {tuple(a)} vs {tuple(b)}")
    return _scalar_tops(layer)


class EuclideanLoss(_LossBase):
    """``Σ(a − b)² / (2N)``; both inputs get gradients (±)."""

    def forward(self, a, b):
        n = a.shape[0]
        d = a - b.reshape(a.shape)
        return (d * d).sum() / n / 2


# ----------------------------------------------------------------------------------------------------------
# SigmoidCrossEntropyLoss


def _sigmoid_ce_shape(layer, bottoms):
    _check_first_dim(bottoms)
    if count(bottoms[0]) != count(bottoms[1]):
        raise ShapeError(f"SigmoidCrossEntropyLoss inputs must have the same count: {tuple(bottoms[0])} vs "
                         f"{tuple(bottoms[1])}")
    return _scalar_tops(layer)


class SigmoidCrossEntropyLoss(_LossBase):
    """Caffe's stable form ``−[x(t − 1{x≥0}) − log(1 + exp(x − 2x·1{x≥0}))]``; targets may be soft;
    ``int(t) == ignore_label`` is skipped. Default normalisation BATCH_SIZE."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        lp = layer.param
        self.has_ignore = lp.loss_param.HasField("ignore_label")
        self.ignore_label = lp.loss_param.ignore_label
        self.normalization = sigmoid_ce_normalization(lp)

    def forward(self, x, target):
        outer = x.shape[0]
        inner = x.numel() // outer if outer else 0
        t = target.detach().reshape(x.shape).to(x.dtype)
        pos = (x >= 0).to(x.dtype)
        per = x * (t - pos) - torch.log(1 + torch.exp(x - 2 * x * pos))
        valid = None
        if self.has_ignore:
            valid = _labels(target).reshape(x.shape) != self.ignore_label
            per = torch.where(valid, per, torch.zeros_like(per))
        norm = normalizer(self.normalization, outer, inner, None if valid is None else valid.sum().to(x.dtype))
        return -per.sum() / norm


# ----------------------------------------------------------------------------------------------------------
# HingeLoss


def _per_sample_label_shape(layer, bottoms):
    """HingeLoss / MultinomialLogisticLoss: N = num(), one label per sample (read as label[i], i < N)."""
    _check_first_dim(bottoms)
    _legacy_dims(bottoms[0], "bottom 0")
    if layer.type == "MultinomialLogisticLoss":
        dims = _legacy_dims(bottoms[1], "the label blob")
        if dims[1:] != (1, 1, 1):
            raise ShapeError(f"the label blob must have channels = height = width = 1, got {tuple(bottoms[1])}")
    if count(bottoms[1]) < bottoms[0][0]:
        raise ShapeError(f"need one label per sample: {bottoms[0][0]} samples, {count(bottoms[1])} labels")
    return _scalar_tops(layer)


def _sample_labels(label: torch.Tensor, n: int) -> torch.Tensor:
    return _labels(label).reshape(-1)[:n]


class HingeLoss(_LossBase):
    """One-vs-all hinge: ``t_j = max(0, 1 ± x_j)`` (minus sign at the label); L1 ``Σt/N``, L2 ``Σt²/N``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.l2 = layer.param.hinge_loss_param.norm == caffe_pb2.HingeLossParameter.L2

    def forward(self, x, label):
        n = x.shape[0]
        x2 = x.reshape(n, -1)
        lab = _sample_labels(label, n)
        self._bad_labels(lab, None, x2.shape[1])
        sign = 1 - 2 * F.one_hot(lab, x2.shape[1]).to(x.dtype)
        t = torch.relu(1 + x2 * sign)
        return ((t * t).sum() if self.l2 else t.sum()) / n


# ----------------------------------------------------------------------------------------------------------
# MultinomialLogisticLoss


class MultinomialLogisticLoss(_LossBase):
    """Bottom 0 holds probabilities: ``−Σ log(max(p[n, label], 1e-20)) / N``; the gradient is
    ``−1 / max(p, 1e-20) / N`` at the label (Caffe's, also where the clamp is active)."""

    def forward(self, p, label):
        n = p.shape[0]
        p2 = p.reshape(n, -1)
        lab = _sample_labels(label, n)
        self._bad_labels(lab, None, p2.shape[1])
        picked = p2.gather(1, lab.unsqueeze(1)).squeeze(1)
        clamped = picked + (picked.clamp_min(LOG_THRESHOLD) - picked).detach()
        return -torch.log(clamped).sum() / n


# ----------------------------------------------------------------------------------------------------------
# InfogainLoss


def _infogain_check(layer):
    if layer.param.loss_param.HasField("normalize"):
        raise ShapeError('loss_param.normalize is deprecated for InfogainLoss (Caffe refuses it): use '
                         '"normalization"')
    if len(layer.caffe_bottoms) < 3 and not layer.param.infogain_loss_param.source:
        raise ShapeError("the infogain matrix H is needed: give a third bottom or infogain_loss_param.source "
                         "(a binary BlobProto file)")


def _infogain_shape(layer, bottoms):
    _check_first_dim(bottoms)
    x, lab = bottoms[0], bottoms[1]
    axis = canonical_axis(layer.param.infogain_loss_param.axis, len(x), "infogain_loss_param.axis")
    outer, inner = count(x, 0, axis), count(x, axis + 1)
    if outer * inner != count(lab):
        raise ShapeError(f"number of labels ({count(lab)}) must match number of predictions ({outer}x{inner}) "
                         f"for prediction shape {tuple(x)} and infogain axis {axis}")
    c = x[axis]
    if len(bottoms) > 2 and count(bottoms[2]) != c * c:
        raise ShapeError(f"H (bottom 2) must have {c}x{c} = {c * c} elements, got {tuple(bottoms[2])}")
    return _scalar_tops(layer, [tuple(x)])


def blobproto_array(bp: caffe_pb2.BlobProto) -> np.ndarray:
    """The values of a BlobProto as float32 (``data`` or ``double_data``), flat."""
    if len(bp.double_data):
        return np.asarray(bp.double_data, dtype=np.float64).astype(np.float32)
    return np.asarray(bp.data, dtype=np.float32)


def read_infogain_matrix(source: str, base_dir=None) -> np.ndarray:
    """H from a binary BlobProto file. Caffe opens ``source`` relative to the working directory; if it is
    not there we also look next to the prototxt."""
    from ..prototxt import read_binary

    path = source
    if not os.path.exists(path) and base_dir and not os.path.isabs(source):
        alt = os.path.join(base_dir, source)
        if os.path.exists(alt):
            path = alt
    return blobproto_array(read_binary(path, caffe_pb2.BlobProto))


class InfogainLoss(_LossBase):
    """``−Σ_j H[label][j]·log(max(p_j, 1e-20))`` over non-ignored positions, ``p = softmax(x)`` over
    ``infogain_loss_param.axis``; gradient ``p·ΣH[label] − H[label]`` (Caffe's). H comes from bottom 2 (no
    gradient) or from the BlobProto file ``source``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        lp = layer.param
        self.axis_param = lp.infogain_loss_param.axis
        self.has_ignore = lp.loss_param.HasField("ignore_label")
        self.ignore_label = lp.loss_param.ignore_label
        self.normalization = lp.loss_param.normalization
        self.with_prob = len(layer.caffe_tops) > 1
        h = None
        if len(layer.caffe_bottoms) < 3:
            src = lp.infogain_loss_param.source
            base = os.path.dirname(layer.file) if layer.file else None
            try:
                h = torch.from_numpy(read_infogain_matrix(src, base))
            except ResnetcError as e:
                raise ResnetcError(f"infogain_loss_param.source: {e}", file=layer.file, line=layer.line,
                                   layer=layer.name, layer_type=layer.type) from None
            shapes = layer.bottom_shapes
            if shapes and shapes[0] is not None and None not in shapes[0]:
                axis = canonical_axis(self.axis_param, len(shapes[0]), "infogain_loss_param.axis")
                c = shapes[0][axis]
                if h.numel() != c * c:
                    raise ResnetcError(f"the infogain matrix in '{src}' has {h.numel()} values; {c} classes need "
                                       f"{c}x{c} = {c * c}", file=layer.file, line=layer.line, layer=layer.name,
                                       layer_type=layer.type)
        self.register_buffer("H", h, persistent=False)

    def forward(self, x, label, h=None):
        axis = self.axis_param + x.dim() if self.axis_param < 0 else self.axis_param
        c = x.shape[axis]
        outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
        hm = (self.H if h is None else h.detach())
        if hm.numel() != c * c:
            raise ResnetcError(f"H must be {c}x{c}, got {hm.numel()} values", layer=self.layer_name,
                               layer_type=self.layer_type)
        hm = hm.reshape(c, c).to(x.dtype)
        logp = torch.log_softmax(x, dim=axis).reshape(outer, c, inner)
        logp = _clamp_min_st(logp, math.log(LOG_THRESHOLD))
        lab = _labels(label).reshape(outer, inner)
        valid = (lab != self.ignore_label) if self.has_ignore else None
        self._bad_labels(lab, valid, c)
        idx = lab if valid is None else torch.where(valid, lab, torch.zeros_like(lab))
        rows = hm[idx]  # (outer, inner, C): H[label]
        per = -(rows.permute(0, 2, 1) * logp).sum(1)  # (outer, inner)
        if valid is not None:
            per = torch.where(valid, per, torch.zeros_like(per))
        norm = normalizer(self.normalization, outer, inner, None if valid is None else valid.sum().to(x.dtype))
        loss = per.sum() / norm
        if self.with_prob:
            return loss, torch.softmax(x.detach(), dim=axis)
        return loss


# ----------------------------------------------------------------------------------------------------------
# ContrastiveLoss


def _contrastive_shape(layer, bottoms):
    _check_first_dim(bottoms)
    a = _legacy_dims(bottoms[0], "bottom 0")
    b = _legacy_dims(bottoms[1], "bottom 1")
    y = _legacy_dims(bottoms[2], "bottom 2 (the similarity label)")
    if a[1] != b[1]:
        raise ShapeError(f"the two feature blobs need the same channels: {tuple(bottoms[0])} vs {tuple(bottoms[1])}")
    if a[2:] != (1, 1) or b[2:] != (1, 1):
        raise ShapeError(f"feature blobs must be (N, C[, 1, 1]), got {tuple(bottoms[0])} and {tuple(bottoms[1])}")
    if y[1:] != (1, 1, 1):
        raise ShapeError(f"the similarity label must be (N[, 1, 1, 1]), got {tuple(bottoms[2])}")
    if y[0] < a[0]:
        raise ShapeError(f"need one similarity label per pair: {a[0]} pairs, {y[0]} labels")
    return _scalar_tops(layer)


class ContrastiveLoss(_LossBase):
    """Similar pairs (int(y) ≠ 0): d²; dissimilar: ``max(margin − d, 0)²`` (``max(margin − d², 0)`` with
    ``legacy_version``); sum / 2N. The non-legacy gradient divides by ``d + 1e-4`` as Caffe does."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.contrastive_loss_param
        self.margin = float(np.float32(p.margin))
        self.legacy = p.legacy_version

    def forward(self, a, b, y):
        n = a.shape[0]
        d = a.reshape(n, -1) - b.reshape(n, -1)
        dsq = (d * d).sum(1)
        similar = _labels(y).reshape(-1)[:n] != 0
        if self.legacy:
            dis = torch.relu(self.margin - dsq)
        else:
            dist = dsq.detach().sqrt()
            # value: sqrt(d²); gradient w.r.t. d²: 1 / (2·(dist + 1e-4)) (Caffe's guarded division)
            dist_st = dist + (dsq - dsq.detach()) / (2 * (dist + 1e-4))
            m = torch.relu(self.margin - dist_st)
            dis = m * m
        per = torch.where(similar, dsq, dis)
        return per.sum() / n / 2


# ----------------------------------------------------------------------------------------------------------
# Accuracy


def _accuracy_check(layer):
    if layer.param.accuracy_param.top_k < 1:
        raise ShapeError("accuracy_param.top_k must be at least 1")


def _accuracy_shape(layer, bottoms):
    x, lab = bottoms
    top_k = layer.param.accuracy_param.top_k
    if count(lab) == 0 or top_k > count(x) // count(lab):
        raise ShapeError(f"top_k ({top_k}) must be less than or equal to the number of classes "
                         f"({count(x) // max(1, count(lab))})")
    axis = canonical_axis(layer.param.accuracy_param.axis, len(x), "accuracy_param.axis")
    outer, inner = count(x, 0, axis), count(x, axis + 1)
    if outer * inner != count(lab):
        raise ShapeError(f"number of labels ({count(lab)}) must match number of predictions ({outer}x{inner}) "
                         f"for prediction shape {tuple(x)} and label axis {axis}")
    return [(), (x[axis],)][:max(1, len(layer.caffe_tops))]


class Accuracy(_LossBase):
    """A prediction is correct iff fewer than ``top_k`` classes (the true one included) score ``>=`` the
    true class — ties count against it. Optional 2nd top: per-class accuracy (0 for absent classes).
    Never differentiated (Caffe aborts on an Accuracy backward)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.accuracy_param
        self.axis_param = p.axis
        self.top_k = p.top_k
        self.has_ignore = p.HasField("ignore_label")
        self.ignore_label = p.ignore_label
        self.per_class = len(layer.caffe_tops) > 1

    @torch.no_grad()
    def forward(self, x, label):
        x = x.detach()
        axis = self.axis_param + x.dim() if self.axis_param < 0 else self.axis_param
        c = x.shape[axis]
        outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
        x3 = x.reshape(outer, c, inner)
        lab = _labels(label).reshape(outer, inner)
        valid = (lab != self.ignore_label) if self.has_ignore else torch.ones_like(lab, dtype=torch.bool)
        self._bad_labels(lab, valid if self.has_ignore else None, c)
        idx = torch.where(valid, lab, torch.zeros_like(lab))
        true_score = x3.gather(1, idx.unsqueeze(1))  # (outer, 1, inner)
        better = (x3 >= true_score).sum(1) - 1  # the true class itself is counted once by >=
        correct = (better < self.top_k) & valid
        n = valid.sum()
        acc = torch.where(n > 0, correct.sum().to(x.dtype) / n.clamp_min(1).to(x.dtype),
                          torch.zeros((), dtype=x.dtype, device=x.device))
        if not self.per_class:
            return acc
        flat = idx.reshape(-1)
        nums = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(0, flat, valid.reshape(-1).to(x.dtype))
        hits = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(0, flat, correct.reshape(-1).to(x.dtype))
        per = torch.where(nums > 0, hits / nums.clamp_min(1), torch.zeros_like(nums))
        return acc, per


# ----------------------------------------------------------------------------------------------------------
# registration

_LOSS = dict(loss=True, in_place=False, family="loss")

register("SoftmaxWithLoss", shape=_softmax_loss_shape, lower=SoftmaxWithLoss, bottoms=(2, 2), tops=(1, 2),
         no_grad_bottoms=(1,), doc="softmax + multinomial logistic loss; VALID normalisation by default",
         **_LOSS)
register("EuclideanLoss", shape=_euclidean_shape, lower=EuclideanLoss, bottoms=(2, 2), tops=(1, 1),
         doc="sum of squared differences / 2N; gradients to both inputs", **_LOSS)
register("SigmoidCrossEntropyLoss", shape=_sigmoid_ce_shape, lower=SigmoidCrossEntropyLoss, bottoms=(2, 2),
         tops=(1, 1), no_grad_bottoms=(1,), doc="sigmoid cross-entropy; BATCH_SIZE normalisation by default",
         **_LOSS)
register("HingeLoss", shape=_per_sample_label_shape, lower=HingeLoss, bottoms=(2, 2), tops=(1, 1),
         no_grad_bottoms=(1,), doc="one-vs-all hinge loss (L1 or L2)", **_LOSS)
register("MultinomialLogisticLoss", shape=_per_sample_label_shape, lower=MultinomialLogisticLoss,
         bottoms=(2, 2), tops=(1, 1), no_grad_bottoms=(1,), doc="−log of given probabilities", **_LOSS)
register("InfogainLoss", shape=_infogain_shape, check=_infogain_check, lower=InfogainLoss, bottoms=(2, 3),
         tops=(1, 2), no_grad_bottoms=(1, 2), doc="softmax + infogain-weighted log loss", **_LOSS)
register("ContrastiveLoss", shape=_contrastive_shape, lower=ContrastiveLoss, bottoms=(3, 3), tops=(1, 1),
         no_grad_bottoms=(2,), doc="siamese contrastive loss (margin, legacy_version)", **_LOSS)
register("Accuracy", shape=_accuracy_shape, check=_accuracy_check, lower=Accuracy, bottoms=(2, 2), tops=(1, 2),
         in_place=False, no_grad_bottoms=(0, 1), family="loss", doc="top-k accuracy (ties count against)")
