"""Vision layers: Convolution, Deconvolution, Im2col, Pooling, SPP, LRN, InnerProduct (CAFFE_SEMANTICS.md §7.1,
oracle README "Caffe behaviour a re-implementation might not match").

Shape rules are transcriptions of Caffe's ``LayerSetUp``/``Reshape`` (``base_conv_layer.cpp``,
``pooling_layer.cpp``, ``spp_layer.cpp``, ``lrn_layer.cpp``, ``inner_product_layer.cpp``). The lowerings use
torch's fused kernels and reproduce Caffe's arithmetic where it differs from torch's defaults:

* Pooling sizes use Caffe's rule (CEIL default / FLOOR; the correction "the last window must start inside
  the image", ``(out − 1)·s < size + p`` in padded coordinates, applied to *both* axes as soon as *either* pad is
  non-zero). When torch's own
  ``max_pool2d``/``avg_pool2d`` (``ceil_mode``, implicit padding ≤ kernel/2) gives the same output size, it is
  called directly: its window clipping, AVE divisor (window clipped to ``[−p, H+p)``, padding counted) and MAX
  tie rule (first maximum in row-major window order) are Caffe's. Otherwise the input is padded explicitly to
  exactly the extent Caffe's windows cover and pooled without padding; AVE then divides the window sums by a
  precomputed divisor map (Caffe's clipped areas, including Caffe's 0/0 for windows starting past the pad).
* STOCHASTIC pooling: TEST = Caffe's GPU formula ``Σx² / (FLT_MIN + Σx)`` over the clipped window (CPU Caffe
  aborts there); TRAIN samples one element per window with probability ∝ its value, and the gradient goes to it.
* LRN ACROSS_CHANNELS: ``x·(k + alpha/size·Σx²)^(−beta)`` over zero-padded channels; WITHIN_CHANNEL:
  ``x·(1 + alpha·avgpool(x²))^(−beta)`` (``k`` ignored, padding counted in the divisor).
* Convolution keeps Caffe's C integer division of the output size (a slightly negative numerator still gives
  one output; the input is zero-padded explicitly for it). N-D convolution (1-3 spatial axes) and a channel
  ``axis`` other than 1 work; several bottoms share the weights.

No custom autograd Function is used: every backward is torch's autograd of these operators, which is Caffe's
backward; modules are torch.compile-able and export to ONNX.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import CaffeLayer
from .registry import ParamBlob, ShapeError, canonical_axis, count, filler_or_default, register

FAMILY = "vision"
FLT_MIN = 1.1754943508222875e-38
FLT_MAX = 3.4028234663852886e38

PP = caffe_pb2.PoolingParameter
MAX, AVE, STOCHASTIC = PP.MAX, PP.AVE, PP.STOCHASTIC
_METHOD_NAMES = {MAX: "MAX", AVE: "AVE", STOCHASTIC: "STOCHASTIC"}


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def c_div(a: int, b: int) -> int:
    """C/C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


# ==========================================================================================================
# Convolution geometry (base_conv_layer.cpp LayerSetUp)


class ConvGeometry:
    """Caffe's convolution parameters resolved for one bottom: channel axis, per-spatial-axis kernel, stride,
    pad, dilation, plus channels / num_output / group."""

    def __init__(self, layer, bottom_shape, *, transposed: bool = False):
        p = layer.param.convolution_param
        nax = len(bottom_shape)
        self.axis = canonical_axis(p.axis, nax, "convolution_param.axis")
        self.nspatial = nax - self.axis - 1
        n = self.nspatial
        self.kernel = _spatial_values(p, "kernel_size", "kernel_h", "kernel_w", n, None, "kernel")
        if any(k <= 0 for k in self.kernel):
            raise ShapeError("Filter dimensions must be nonzero (kernel_size / kernel_h / kernel_w)")
        self.stride = _spatial_values(p, "stride", "stride_h", "stride_w", n, 1, "stride")
        if any(s <= 0 for s in self.stride):
            raise ShapeError("stride must be positive")
        self.pad = _spatial_values(p, "pad", "pad_h", "pad_w", n, 0, "pad")
        nd = len(p.dilation)
        if nd not in (0, 1, n):
            raise ShapeError(f"dilation must be specified once, or once per spatial dimension (dilation specified "
                             f"{nd} times; {n} spatial dims)")
        self.dilation = [1] * n if nd == 0 else ([int(p.dilation[0])] * n if nd == 1 else [int(d) for d in p.dilation])
        if any(d <= 0 for d in self.dilation):
            raise ShapeError("dilation must be positive")
        self.channels = int(bottom_shape[self.axis])
        self.num_output = int(p.num_output)
        self.group = int(p.group)
        if self.channels % self.group:
            raise ShapeError(f"the input's {self.channels} channels are not a multiple of group {self.group}")
        if self.num_output % self.group:
            raise ShapeError(f"num_output {self.num_output} is not a multiple of group {self.group}")
        self.transposed = transposed
        self.extent = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation)]
        self.in_spatial = [int(d) for d in bottom_shape[self.axis + 1:]]

    def output_spatial(self) -> list:
        if self.transposed:  # deconv_layer.cpp compute_output_shape
            return [s * (i - 1) + e - 2 * p for i, s, e, p in zip(self.in_spatial, self.stride, self.extent, self.pad)]
        return [c_div(i + 2 * p - e, s) + 1 for i, s, e, p in zip(self.in_spatial, self.stride, self.extent, self.pad)]

    def weight_shape(self) -> tuple:
        if self.transposed:
            return (self.channels, self.num_output // self.group, *self.kernel)
        return (self.num_output, self.channels // self.group, *self.kernel)


def _spatial_values(p, rep: str, fh: str, fw: str, n: int, default, what: str) -> list:
    """kernel_size/stride/pad: the repeated field (1 value or one per spatial axis) or the _h/_w pair (2-D)."""
    if p.HasField(fh) or p.HasField(fw):
        if n != 2:
            raise ShapeError(f"{fh} & {fw} can only be used for 2D convolution ({n} spatial axes here)")
        if len(getattr(p, rep)):
            raise ShapeError(f"Either {rep} or {fh}/{fw} should be specified; not both")
        return [int(getattr(p, fh)), int(getattr(p, fw))]
    vals = [int(v) for v in getattr(p, rep)]
    if not vals:
        if default is None:
            raise ShapeError(f"{what} size is required: give {rep} or {fh} and {fw}")
        return [default] * n
    if len(vals) not in (1, n):
        raise ShapeError(f"{rep} must be specified once, or once per spatial dimension ({rep} specified "
                         f"{len(vals)} times; {n} spatial dims)")
    return vals * n if len(vals) == 1 else vals


def _conv_check(layer):
    p = layer.param.convolution_param
    if len(layer.param.top) != len(layer.param.bottom):
        raise ShapeError(f"{layer.type} needs one top per bottom ({len(layer.param.bottom)} bottom(s), "
                         f"{len(layer.param.top)} top(s))")
    if p.num_output <= 0:
        raise ShapeError("convolution_param.num_output must be positive")
    if p.group <= 0:
        raise ShapeError("convolution_param.group must be positive")
    if (p.HasField("kernel_h") or p.HasField("kernel_w")) and len(p.kernel_size):
        raise ShapeError("Either kernel_size or kernel_h/w should be specified; not both")
    if not (p.HasField("kernel_h") or p.HasField("kernel_w")) and not len(p.kernel_size):
        raise ShapeError("kernel size is required: give kernel_size or kernel_h and kernel_w")
    if (p.HasField("stride_h") or p.HasField("stride_w")) and len(p.stride):
        raise ShapeError("Either stride or stride_h/w should be specified; not both")
    if (p.HasField("pad_h") or p.HasField("pad_w")) and len(p.pad):
        raise ShapeError("Either pad or pad_h/w should be specified; not both")


def _conv_shape_common(layer, bottoms, transposed: bool, im2col: bool = False):
    first = tuple(bottoms[0])
    for i, b in enumerate(bottoms[1:], 1):
        if tuple(b) != first:
            raise ShapeError(f"shape mismatch - bottom[0]: {_fmt(first)} vs. bottom[{i}]: {_fmt(b)} (all bottoms "
                             f"of a {layer.type} must have the same shape)")
    g = ConvGeometry(layer, first, transposed=transposed)
    if g.nspatial < 1 and not im2col:
        raise ShapeError(f"{layer.type} needs at least one spatial axis after the channel axis {g.axis} "
                         f"(bottom {_fmt(first)})")
    out = g.output_spatial()
    ch = g.channels * count(g.kernel) if im2col else g.num_output
    top = first[:g.axis] + (ch,) + tuple(out)
    return g, [top] * len(bottoms)


def _conv_shape(layer, bottoms):
    return _conv_shape_common(layer, bottoms, False)[1]


def _deconv_shape(layer, bottoms):
    return _conv_shape_common(layer, bottoms, True)[1]


def _conv_params(layer, bottoms, transposed=False):
    g = ConvGeometry(layer, bottoms[0], transposed=transposed)
    p = layer.param.convolution_param
    blobs = [ParamBlob(g.weight_shape(), filler_or_default(p, "weight_filler"), role="weight")]
    if p.bias_term:
        blobs.append(ParamBlob((g.num_output,), filler_or_default(p, "bias_filler"), role="bias"))
    return blobs


def _deconv_params(layer, bottoms):
    return _conv_params(layer, bottoms, transposed=True)


def _conv_flops(layer, bottoms, tops):
    """Multiply-adds: every output element costs C_in/group · Πk (summed over all bottoms)."""
    g = ConvGeometry(layer, bottoms[0])
    return sum(count(t) for t in tops) * (g.channels // g.group) * count(g.kernel)


def _deconv_flops(layer, bottoms, tops):
    """Multiply-adds: every input element is scattered into num_output/group · Πk outputs."""
    g = ConvGeometry(layer, bottoms[0], transposed=True)
    return sum(count(b) for b in bottoms) * (g.num_output // g.group) * count(g.kernel)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class Convolution(CaffeLayer):
    """Caffe Convolution / Deconvolution: one weight set applied to every bottom (one top per bottom)."""

    transposed = False

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        g = ConvGeometry(layer, layer.bottom_shapes[0], transposed=self.transposed)
        n = g.nspatial
        table = _DECONV_FN if self.transposed else _CONV_FN
        if n not in table:
            raise ShapeError(f"{layer.type} with {n} spatial axes is not supported (1 to 3 are)")
        self.fn = table[n]
        self.axis = g.axis
        self.nspatial = n
        self.stride, self.dilation, self.groups = tuple(g.stride), tuple(g.dilation), g.group
        self.has_bias = bool(layer.param.convolution_param.bias_term)
        self.padding = tuple(g.pad)
        self.explicit_pad = None
        if not self.transposed:
            # Caffe's C division gives 1 output where (in + 2p − extent) is slightly negative; torch refuses such
            # an input, so those cases pad explicitly up to exactly one window
            out = g.output_spatial()
            if min(out) < 1:
                raise ShapeError(f"{layer.type} output would be empty ({_fmt(out)}) for input {_fmt(g.in_spatial)}")
            if any(i + 2 * p - e < 0 for i, p, e in zip(g.in_spatial, g.pad, g.extent)):
                pads = []
                for i, p, e, s, o in reversed(list(zip(g.in_spatial, g.pad, g.extent, g.stride, out))):
                    pads += [p, max(0, (o - 1) * s + e - i - p)]
                self.explicit_pad = tuple(pads)
                self.padding = (0,) * n

    def _one(self, x):
        lead = None
        if self.axis != 1:
            lead = x.shape[:self.axis]
            x = x.reshape((-1,) + tuple(x.shape[self.axis:]))
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad)
        b = self.blobs[1] if self.has_bias else None
        if self.transposed:
            y = self.fn(x, self.blobs[0], b, self.stride, self.padding, 0, self.groups, self.dilation)
        else:
            y = self.fn(x, self.blobs[0], b, self.stride, self.padding, self.dilation, self.groups)
        if lead is not None:
            y = y.reshape(tuple(lead) + tuple(y.shape[1:]))
        return y

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return self._one(bottoms[0])
        return tuple(self._one(x) for x in bottoms)


class Deconvolution(Convolution):
    transposed = True


# ----------------------------------------------------------------------------------------------------------
# Im2col


def _im2col_shape(layer, bottoms):
    return _conv_shape_common(layer, bottoms, False, im2col=True)[1]


def _im2col_check(layer):
    p = layer.param.convolution_param
    if p.group <= 0:
        raise ShapeError("convolution_param.group must be positive")


class Im2col(CaffeLayer):
    """Caffe's im2col: column channel index ``c·Πk + kernel offset`` (torch's unfold order), 2-D only."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        g = ConvGeometry(layer, layer.bottom_shapes[0])
        if g.nspatial != 2 or g.axis != 1:
            raise ShapeError("Im2col runs on 4-D (N, C, H, W) bottoms with axis 1 only")
        if any(i + 2 * p - e < 0 for i, p, e in zip(g.in_spatial, g.pad, g.extent)):
            raise ShapeError("Im2col with a kernel extent larger than the padded input is not supported")
        self.kernel, self.stride = tuple(g.kernel), tuple(g.stride)
        self.pad, self.dilation = tuple(g.pad), tuple(g.dilation)
        self.out = tuple(g.output_spatial())

    def forward(self, x):
        cols = F.unfold(x, self.kernel, self.dilation, self.pad, self.stride)
        return cols.reshape(cols.shape[0], cols.shape[1], self.out[0], self.out[1])


# ==========================================================================================================
# Pooling geometry (pooling_layer.cpp LayerSetUp / Reshape)


class PoolGeometry:
    """Resolved pooling parameters: kernel/stride/pad per axis, method, round mode, global flag."""

    def __init__(self, method, kernel, stride, pad, ceil: bool = True, global_pooling: bool = False):
        self.method = method
        self.kh, self.kw = kernel
        self.sh, self.sw = stride
        self.ph, self.pw = pad
        self.ceil = ceil
        self.global_pooling = global_pooling

    @classmethod
    def from_param(cls, p, hw=None) -> "PoolGeometry":
        """From a PoolingParameter; ``hw`` (the bottom's H, W) fills the kernel of global pooling."""
        _pool_param_check(p)
        if p.global_pooling:
            kernel = tuple(hw) if hw is not None else (None, None)
        elif p.HasField("kernel_size"):
            kernel = (int(p.kernel_size),) * 2
        else:
            kernel = (int(p.kernel_h), int(p.kernel_w))
        pad = (int(p.pad),) * 2 if p.HasField("pad") else (int(p.pad_h), int(p.pad_w))
        stride = (int(p.stride),) * 2 if not (p.HasField("stride_h") or p.HasField("stride_w")) else \
            (int(p.stride_h), int(p.stride_w))
        return cls(p.pool, kernel, stride, pad, ceil=p.round_mode == PP.CEIL, global_pooling=p.global_pooling)

    def output_hw(self, h: int, w: int) -> tuple:
        any_pad = bool(self.ph or self.pw)
        return (pooled_size(h, self.kh, self.sh, self.ph, self.ceil, any_pad),
                pooled_size(w, self.kw, self.sw, self.pw, self.ceil, any_pad))


def pooled_size(size: int, k: int, s: int, p: int, ceil: bool = True, any_pad: bool = None) -> int:
    """Caffe's pooled size along one axis.

    ``ceil((size + 2p − k)/s) + 1`` (CEIL) or ``floor(...)`` (FLOOR), minus one when any pad is non-zero and
    the last window would start at or after ``size + p`` in padded coordinates (i.e. outside the image). ``any_pad`` is "pad_h or pad_w is non-zero" (Caffe
    applies the correction to both axes when either is padded); by default this axis's ``p``.
    """
    num = size + 2 * p - k
    out = (-((-num) // s) if ceil else num // s) + 1
    if any_pad is None:
        any_pad = p > 0
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_param_check(p) -> None:
    has_k = p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w")
    if p.global_pooling:
        if has_k:
            raise ShapeError("With global_pooling: true, the filter size cannot be specified")
    else:
        both_hw = p.HasField("kernel_h") and p.HasField("kernel_w")
        if (not p.HasField("kernel_size")) == (not both_hw):
            raise ShapeError("Filter size is kernel_size OR kernel_h and kernel_w; not both" if both_hw else
                             "pooling needs kernel_size, or kernel_h and kernel_w")
        if not p.HasField("kernel_size") and not both_hw:
            raise ShapeError("For non-square filters both kernel_h and kernel_w are required")
    if not ((not p.HasField("pad") and p.HasField("pad_h") and p.HasField("pad_w"))
            or (not p.HasField("pad_h") and not p.HasField("pad_w"))):
        raise ShapeError("pad is pad OR pad_h and pad_w are required")
    if not ((not p.HasField("stride") and p.HasField("stride_h") and p.HasField("stride_w"))
            or (not p.HasField("stride_h") and not p.HasField("stride_w"))):
        raise ShapeError("Stride is stride OR stride_h and stride_w are required")
    kh, kw = ((p.kernel_size,) * 2) if p.HasField("kernel_size") else (p.kernel_h, p.kernel_w)
    if not p.global_pooling and (kh <= 0 or kw <= 0):
        raise ShapeError("Filter dimensions cannot be zero")
    pad = (p.pad,) * 2 if p.HasField("pad") else (p.pad_h, p.pad_w)
    stride = (p.stride,) * 2 if not (p.HasField("stride_h") or p.HasField("stride_w")) else (p.stride_h, p.stride_w)
    if min(stride) <= 0:
        raise ShapeError("pooling stride must be positive")
    if p.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise ShapeError("With global_pooling: true; only pad = 0 and stride = 1")
    if (pad[0] or pad[1]) and p.pool not in (AVE, MAX):
        raise ShapeError("Padding implemented only for average and max pooling")
    if not p.global_pooling and (pad[0] >= kh or pad[1] >= kw):
        raise ShapeError(f"pooling pad ({pad[0]}, {pad[1]}) must be smaller than the kernel ({kh}, {kw})")


def _pool_check(layer):
    p = layer.param.pooling_param
    _pool_param_check(p)
    if len(layer.param.top) > 1 and p.pool != MAX:
        raise ShapeError(f"only MAX pooling has a second (mask) top; this is {_METHOD_NAMES.get(p.pool, p.pool)}")


def _need_4d(layer, shape):
    if len(shape) != 4:
        raise ShapeError(f"{layer.type} input must have 4 axes, corresponding to (num, channels, height, width); "
                         f"got {_fmt(shape)}")


def _pool_shape(layer, bottoms):
    b = bottoms[0]
    _need_4d(layer, b)
    g = PoolGeometry.from_param(layer.param.pooling_param, b[2:])
    oh, ow = g.output_hw(b[2], b[3])
    return [(b[0], b[1], oh, ow)] * len(layer.param.top)


def _pool_flops(layer, bottoms, tops):
    """AVE: one add per window element and output; MAX/STOCHASTIC: no multiply-adds."""
    p = layer.param.pooling_param
    if p.pool != AVE:
        return 0
    b = bottoms[0]
    g = PoolGeometry.from_param(p, b[2:])
    return count(tops[0]) * g.kh * g.kw


def _torch_pooled_size(size, k, s, p, ceil):
    """The output size torch's pooling gives (its ceil_mode always applies the start-inside correction)."""
    num = size + 2 * p - k
    if num < 0:
        return None
    out = (-((-num) // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


class PoolOp(torch.nn.Module):
    """One Caffe pooling (MAX / AVE / STOCHASTIC) on (N, C, H, W), with precomputed padding plans."""

    def __init__(self, g: PoolGeometry, hw, *, phase: str = "TEST", mask: bool = False, allow_native: bool = True):
        super().__init__()
        self.allow_native = allow_native  # False: always the explicit-padding path (tests compare the two)
        self.g = g
        self.method = g.method
        self.train_phase = phase == "TRAIN"
        self.mask = mask
        self.kernel = (g.kh, g.kw)
        self.stride = (g.sh, g.sw)
        self._hw = None
        self.register_buffer("divisor", torch.ones(0), persistent=False)
        self._plan(int(hw[0]), int(hw[1]))

    # -- planning (depends on H, W only) ------------------------------------------------------------------
    def _plan(self, h: int, w: int, device=None) -> None:
        g = self.g
        oh, ow = g.output_hw(h, w)
        if oh <= 0 or ow <= 0:
            raise ShapeError(f"pooling output would be {oh}x{ow} for a {h}x{w} input")
        self._hw, self.out_hw = (h, w), (oh, ow)
        ph, pw = (g.ph, g.pw) if self.method != STOCHASTIC else (0, 0)
        # the fast path: torch's own pooling with implicit padding gives Caffe's windows when the sizes agree
        self.native = None
        if self.allow_native and self.method in (MAX, AVE) and 2 * ph <= g.kh and 2 * pw <= g.kw:
            for ceil in (False, True):
                if (_torch_pooled_size(h, g.kh, g.sh, ph, ceil), _torch_pooled_size(w, g.kw, g.sw, pw, ceil)) == (oh, ow):
                    self.native = ceil
                    break
        # otherwise: pad explicitly to the extent [−p, −p + (o−1)s + k) (negative right pad = crop)
        eh, ew = (oh - 1) * g.sh + g.kh, (ow - 1) * g.sw + g.kw
        rh, rw = eh - h - ph, ew - w - pw
        self.crop = (h + min(rh, 0), w + min(rw, 0)) if (rh < 0 or rw < 0) else None
        self.pads = (pw, max(rw, 0), ph, max(rh, 0))
        self.padded_w = ew
        if self.method == AVE and self.native is None:
            self.divisor = _ave_divisor(h, w, oh, ow, g).to(device or self.divisor.device)

    # -- forward ---------------------------------------------------------------------------------------------
    def _padded(self, x, value: float):
        if self.crop is not None:
            x = x[:, :, :self.crop[0], :self.crop[1]]
        if any(self.pads):
            x = F.pad(x, self.pads, value=value)
        return x

    def forward(self, x):
        if not torch.jit.is_tracing() and tuple(x.shape[2:]) != self._hw:
            self._plan(int(x.shape[2]), int(x.shape[3]), x.device)
        if self.method == MAX:
            return self._max(x)
        if self.method == AVE:
            if self.g.global_pooling and self.allow_native:
                return x.mean(dim=(2, 3), keepdim=True)
            if self.native is not None:
                return F.avg_pool2d(x, self.kernel, self.stride, (self.g.ph, self.g.pw), self.native, True)
            s = F.avg_pool2d(self._padded(x, 0.0), self.kernel, self.stride) * float(self.g.kh * self.g.kw)
            return s / self.divisor.to(s.dtype)
        return self._stochastic(x)

    def _max(self, x):
        g = self.g
        if self.native is not None:
            if not self.mask:
                return F.max_pool2d(x, self.kernel, self.stride, (g.ph, g.pw), 1, self.native)
            y, idx = F.max_pool2d(x, self.kernel, self.stride, (g.ph, g.pw), 1, self.native, return_indices=True)
            return y, idx.to(y.dtype)
        xp = self._padded(x, -FLT_MAX)  # Caffe starts each window at −FLT_MAX
        if not self.mask:
            return F.max_pool2d(xp, self.kernel, self.stride)
        y, idx = F.max_pool2d(xp, self.kernel, self.stride, return_indices=True)
        hh = torch.div(idx, self.padded_w, rounding_mode="floor") - g.ph
        ww = idx % self.padded_w - g.pw
        h, w = self._hw
        inside = (hh >= 0) & (hh < h) & (ww >= 0) & (ww < w)
        m = torch.where(inside, hh * w + ww, torch.full_like(idx, -1))
        return y, m.to(y.dtype)

    def _stochastic(self, x):
        xp = self._padded(x, 0.0)  # windows clipped to the image: zeros add nothing
        area = float(self.g.kh * self.g.kw)
        if not self.train_phase:
            s = F.avg_pool2d(xp, self.kernel, self.stride) * area
            s2 = F.avg_pool2d(xp * xp, self.kernel, self.stride) * area
            return s2 / (s + FLT_MIN)
        # windows as a strided view (N, C, OH, OW, kh·kw), row-major inside each window like Caffe's loop
        cols = xp.unfold(2, self.g.kh, self.g.sh).unfold(3, self.g.kw, self.g.sw)
        cols = cols.reshape(cols.shape[:4] + (self.g.kh * self.g.kw,))
        cum = torch.cumsum(cols.detach(), dim=4)
        thresh = torch.rand_like(cum[..., :1]) * cum[..., -1:]
        # the first element whose running sum reaches the threshold (argmax returns the first maximum)
        pick = torch.argmax((cum >= thresh).to(torch.uint8), dim=4, keepdim=True)
        return torch.gather(cols, 4, pick).squeeze(4)


def _ave_divisor(h, w, oh, ow, g: PoolGeometry) -> torch.Tensor:
    """Caffe's AVE divisor per output: the window clipped to ``[−p, size + p)`` (before clipping to the image)."""
    def sizes(o, s, p, k, size):
        out = []
        for i in range(o):
            start = i * s - p
            end = min(start + k, size + p)
            out.append(end - start)
        return out

    dh = torch.tensor(sizes(oh, g.sh, g.ph, g.kh, h), dtype=torch.float32)
    dw = torch.tensor(sizes(ow, g.sw, g.pw, g.kw, w), dtype=torch.float32)
    return dh[:, None] * dw[None, :]


class Pooling(CaffeLayer):
    """Caffe Pooling; a second top (MAX only) is the winner's index ``h·W + w`` in its plane, as float."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        b = layer.bottom_shapes[0]
        g = PoolGeometry.from_param(layer.param.pooling_param, b[2:])
        self.op = PoolOp(g, b[2:], phase=layer.phase, mask=len(layer.tops) > 1)

    def forward(self, x):
        return self.op(x)


# ----------------------------------------------------------------------------------------------------------
# SPP


def _spp_levels(layer, h: int, w: int) -> list:
    """One PoolGeometry per pyramid level (spp_layer.cpp GetPoolingParam)."""
    p = layer.param.spp_param
    method = {caffe_pb2.SPPParameter.MAX: MAX, caffe_pb2.SPPParameter.AVE: AVE,
              caffe_pb2.SPPParameter.STOCHASTIC: STOCHASTIC}[p.pool]
    levels = []
    for lvl in range(int(p.pyramid_height)):
        bins = 2 ** lvl
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        g = PoolGeometry(method, (kh, kw), (kh, kw), (ph, pw))
        if ph >= kh or pw >= kw:
            raise ShapeError(f"SPP level {lvl} ({bins} bins) on a {h}x{w} input gives pooling pad ({ph}, {pw}), not "
                             f"smaller than its kernel ({kh}, {kw}): Caffe's pooling refuses that")
        if (ph or pw) and method == STOCHASTIC:
            raise ShapeError(f"SPP level {lvl}: Padding implemented only for average and max pooling")
        levels.append(g)
    return levels


def _spp_check(layer):
    if layer.param.spp_param.pyramid_height < 1:
        raise ShapeError("spp_param.pyramid_height must be at least 1")


def _spp_shape(layer, bottoms):
    b = bottoms[0]
    _need_4d(layer, b)
    if b[2] <= 0 or b[3] <= 0:
        raise ShapeError("Input dimensions cannot be zero.")
    levels = _spp_levels(layer, b[2], b[3])
    outs = [g.output_hw(b[2], b[3]) for g in levels]
    if len(levels) == 1:
        return [(b[0], b[1]) + outs[0]]
    return [(b[0], sum(b[1] * oh * ow for oh, ow in outs))]


class SPP(CaffeLayer):
    """Spatial pyramid pooling: level l pools into 2^l bins; levels flattened and concatenated (level 0 first)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        b = layer.bottom_shapes[0]
        self.ops = torch.nn.ModuleList(PoolOp(g, b[2:], phase=layer.phase) for g in _spp_levels(layer, b[2], b[3]))

    def forward(self, x):
        if len(self.ops) == 1:
            return self.ops[0](x)
        return torch.cat([op(x).flatten(1) for op in self.ops], dim=1)


# ==========================================================================================================
# LRN


def _lrn_check(layer):
    p = layer.param.lrn_param
    if p.local_size % 2 != 1:
        raise ShapeError(f"LRN only supports odd values for local_size (got {p.local_size})")


def _lrn_shape(layer, bottoms):
    _need_4d(layer, bottoms[0])
    return [tuple(bottoms[0])]


def _lrn_flops(layer, bottoms, tops):
    p = layer.param.lrn_param
    n = p.local_size if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS else p.local_size ** 2
    return count(bottoms[0]) * (n + 2)


class LRN(CaffeLayer):
    """ACROSS_CHANNELS: ``x·(k + α/n·Σ_window x²)^(−β)``; WITHIN_CHANNEL: ``x·(1 + α·avgpool_n×n(x²))^(−β)``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.lrn_param
        self.size = int(p.local_size)
        self.pre_pad = (self.size - 1) // 2
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS

    def forward(self, x):
        sq = x * x
        if self.across:
            # average over a zero-padded channel window (padding counted) = Σ/size
            avg = F.avg_pool3d(sq.unsqueeze(1), (self.size, 1, 1), 1, (self.pre_pad, 0, 0), False, True).squeeze(1)
            scale = self.k + self.alpha * avg
        else:
            avg = F.avg_pool2d(sq, self.size, 1, self.pre_pad, False, True)
            scale = 1.0 + self.alpha * avg
        return x * torch.pow(scale, -self.beta)


# ==========================================================================================================
# InnerProduct


def _ip_shape(layer, bottoms):
    p = layer.param.inner_product_param
    b = tuple(bottoms[0])
    axis = canonical_axis(p.axis, len(b), "inner_product_param.axis")
    return [b[:axis] + (int(p.num_output),)]


def _ip_params(layer, bottoms):
    p = layer.param.inner_product_param
    b = tuple(bottoms[0])
    axis = canonical_axis(p.axis, len(b), "inner_product_param.axis")
    k, n = count(b, axis), int(p.num_output)
    blobs = [ParamBlob((k, n) if p.transpose else (n, k), filler_or_default(p, "weight_filler"), role="weight")]
    if p.bias_term:
        blobs.append(ParamBlob((n,), filler_or_default(p, "bias_filler"), role="bias"))
    return blobs


def _ip_flops(layer, bottoms, tops):
    p = layer.param.inner_product_param
    b = tuple(bottoms[0])
    axis = canonical_axis(p.axis, len(b), "inner_product_param.axis")
    return count(b, 0, axis) * count(b, axis) * int(p.num_output)


class InnerProduct(CaffeLayer):
    """``y = x·Wᵀ + b`` over the axes from ``axis`` flattened (``x·W`` with ``transpose: true``)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.inner_product_param
        self.axis = canonical_axis(p.axis, len(layer.bottom_shapes[0]), "inner_product_param.axis")
        self.transpose = bool(p.transpose)
        self.has_bias = bool(p.bias_term)

    def forward(self, x):
        x = x.flatten(self.axis) if self.axis < x.dim() - 1 else x
        w = self.blobs[0].t() if self.transpose else self.blobs[0]
        return F.linear(x, w, self.blobs[1] if self.has_bias else None)


# ==========================================================================================================
# registration


def _reg(name, shape, lower, **kw):
    register(name, shape=shape, lower=lower, family=FAMILY, **kw)


_reg("Convolution", _conv_shape, Convolution, check=_conv_check, params=_conv_params, flops=_conv_flops,
     bottoms=(1, None), tops=(1, None), doc="Caffe Convolution (N-D, groups, dilation, shared over bottoms)")
_reg("Deconvolution", _deconv_shape, Deconvolution, check=_conv_check, params=_deconv_params, flops=_deconv_flops,
     bottoms=(1, None), tops=(1, None), doc="Caffe Deconvolution (transposed convolution)")
_reg("Im2col", _im2col_shape, Im2col, check=_im2col_check, bottoms=(1, 1), tops=(1, 1),
     doc="Caffe Im2col: convolution patches as channels")
_reg("Pooling", _pool_shape, Pooling, check=_pool_check, flops=_pool_flops, bottoms=(1, 1), tops=(1, 2),
     doc="Caffe Pooling: MAX / AVE / STOCHASTIC with Caffe's sizes and divisors")
_reg("SPP", _spp_shape, SPP, check=_spp_check, bottoms=(1, 1), tops=(1, 1), doc="Spatial pyramid pooling")
_reg("LRN", _lrn_shape, LRN, check=_lrn_check, flops=_lrn_flops, bottoms=(1, 1), tops=(1, 1),
     doc="Local response normalisation (ACROSS_CHANNELS / WITHIN_CHANNEL)")
_reg("InnerProduct", _ip_shape, InnerProduct, params=_ip_params, flops=_ip_flops, bottoms=(1, 1), tops=(1, 1),
     doc="Fully connected layer")
