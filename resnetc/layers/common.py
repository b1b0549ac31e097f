"""Plumbing layers: blob routing, reshaping, reductions, lookups and generators (CAFFE_SEMANTICS.md §7.1).

Input, Split, Concat, Slice, Eltwise, Flatten, Reshape, Crop, Tile, Reduction, ArgMax, Embed, Silence, Filter,
BatchReindex, Parameter, DummyData, Softmax, HDF5Output.

Shape rules follow each Caffe layer's ``LayerSetUp``/``Reshape`` (legacy ``concat_dim``/``slice_dim``, Reshape's
``0``/``-1`` and its "negative axis counts from the end + 1", Flatten's inclusive ``end_axis``, Reduction over
*all* axes from ``axis``, ArgMax's ``(N, 1|2, top_k[, 1…])`` layout). Lowerings are plain torch operators whose
autograd is Caffe's backward; where Caffe routes gradients differently from the obvious torch op (Eltwise MAX
ties go to the later bottom) the forward is built from ``torch.where`` chains that encode Caffe's choice, so
no custom autograd Function is needed and the module still exports to ONNX.

Input tops are the keyword inputs of ``CaffeNet.forward``: Input is registered with ``lower=None`` and
CaffeNet skips it. DummyData *is* lowered: it makes its filler values at every forward.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ResnetcError
from ..proto import caffe_pb2
from .base import CaffeLayer
from .registry import ParamBlob, ShapeError, canonical_axis, count, filler_or_default, register

FAMILY = "common"
INT32_MAX = 2 ** 31 - 1


class _Located(CaffeLayer):
    """A CaffeLayer that can raise a ResnetcError naming its file, line and layer from ``forward``."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self._file, self._line = layer.file, layer.line

    def error(self, message: str) -> ResnetcError:
        return ResnetcError(message, file=self._file, line=self._line, layer=self.layer_name,
                            layer_type=self.layer_type)


def _tracing() -> bool:
    """Inside torch.compile / tracing / ONNX export: skip data-dependent validation (it would break the graph)."""
    try:
        return torch.compiler.is_compiling() or torch.jit.is_tracing()
    except AttributeError:  # pragma: no cover - older torch
        return torch.jit.is_tracing()


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _bottom(layer, i: int = 0, *, full: bool = True) -> tuple:
    """Bottom ``i``'s inferred shape for a lowering; a clear error when it is unknown (``full``: every dim
    needed, else only the number of axes)."""
    shape = layer.bottom_shapes[i] if i < len(layer.bottom_shapes) else None
    if shape is None or (full and any(d is None for d in shape)):
        raise layer.error(f"cannot lower: the shape of bottom {i} ('{layer.caffe_bottoms[i]}') is unknown (give the "
                          f"input shapes, e.g. --input-shape data=1,3,224,224)")
    return tuple(shape)


# ----------------------------------------------------------------------------------------------------------
# Input


def _input_shape(layer, bottoms):
    shapes = list(layer.param.input_param.shape)
    ntop = len(layer.caffe_tops)
    if len(shapes) not in (0, 1, ntop):
        raise ShapeError(f"input_param needs 0 shapes, 1 shape (for every top) or one per top ({ntop}); "
                         f"got {len(shapes)}")
    if not shapes:
        return [None] * ntop
    out = []
    for j in range(ntop):
        dims = tuple(int(d) for d in shapes[0 if len(shapes) == 1 else j].dim)
        if any(d < 0 for d in dims):
            raise ShapeError(f"input shape {list(dims)} has a negative dimension")
        out.append(dims)
    return out


# ----------------------------------------------------------------------------------------------------------
# Split / Silence


def _split_shape(layer, bottoms):
    return [tuple(bottoms[0])] * len(layer.caffe_tops)


class Split(CaffeLayer):
    """Every top is the bottom; autograd sums the tops' gradients into it, as Caffe's SplitLayer backward."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.n = len(layer.tops)

    def forward(self, x):
        return (x,) * self.n


class Silence(CaffeLayer):
    """Consumes its bottoms; no tops (its backward gives the bottoms zero gradient, which is nothing)."""

    def forward(self, *bottoms):
        return ()


# ----------------------------------------------------------------------------------------------------------
# Concat / Slice


def _legacy_or_axis(p, legacy: str, what: str, num_axes: int) -> int:
    if p.HasField("axis") and p.HasField(legacy):
        raise ShapeError(f"{what}: give either axis or {legacy}, not both")
    if p.HasField(legacy):
        d = getattr(p, legacy)
        if d > INT32_MAX:
            raise ShapeError(f"{what}.{legacy} {d} is negative as int32; it must satisfy 0 <= {legacy} < {num_axes}")
        if d >= num_axes:
            raise ShapeError(f"{what}.{legacy} {d} out of range for a {num_axes}-axis blob")
        return int(d)
    return canonical_axis(p.axis, num_axes, f"{what}.axis")


def _concat_check(layer):
    p = layer.param.concat_param
    if p.HasField("axis") and p.HasField("concat_dim"):
        raise ShapeError("concat_param: give either axis or concat_dim, not both")


def _concat_axis(layer, bottoms) -> int:
    return _legacy_or_axis(layer.param.concat_param, "concat_dim", "concat_param", len(bottoms[0]))


def _concat_shape(layer, bottoms):
    axis = _concat_axis(layer, bottoms)
    top = list(bottoms[0])
    for i, b in enumerate(bottoms[1:], 1):
        if len(b) != len(top):
            raise ShapeError(f"all inputs must have the same number of axes: bottom 0 is {_fmt(bottoms[0])}, "
                             f"bottom {i} is {_fmt(b)}")
        for j in range(len(top)):
            if j != axis and b[j] != top[j]:
                raise ShapeError(f"all inputs must have the same shape except on the concat axis {axis}: bottom 0 "
                                 f"is {_fmt(bottoms[0])}, bottom {i} is {_fmt(b)}")
        top[axis] += b[axis]
    return [tuple(top)]


class Concat(CaffeLayer):
    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.axis = _concat_axis(layer, [_bottom(layer, 0, full=False)])

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return bottoms[0]
        return torch.cat(bottoms, dim=self.axis)


def _slice_check(layer):
    p = layer.param.slice_param
    if p.HasField("axis") and p.HasField("slice_dim"):
        raise ShapeError("slice_param: give either axis or slice_dim, not both")


def _slice_sizes(layer, bottom) -> tuple:
    """(axis, [size of each top along it]) per Caffe's SliceLayer::Reshape."""
    p = layer.param.slice_param
    axis = _legacy_or_axis(p, "slice_dim", "slice_param", len(bottom))
    dim = bottom[axis]
    ntop = len(layer.caffe_tops)
    points = list(p.slice_point)
    if points:
        if len(points) != ntop - 1:
            raise ShapeError(f"slice_point needs exactly {ntop - 1} value(s) for {ntop} tops, got {len(points)}")
        if ntop > dim:
            raise ShapeError(f"{ntop} tops cannot slice an axis of size {dim}")
        sizes, prev = [], 0
        for pt in points:
            if pt <= prev:
                raise ShapeError(f"slice_point values must be strictly increasing and positive (got {points})")
            sizes.append(pt - prev)
            prev = pt
        if prev > dim:
            raise ShapeError(f"slice_point {prev} is beyond the size {dim} of axis {axis}")
        sizes.append(dim - prev)
    else:
        if dim % ntop:
            raise ShapeError(f"axis {axis} of size {dim} cannot be split equally into {ntop} tops "
                             f"(give slice_point)")
        sizes = [dim // ntop] * ntop
    return axis, sizes


def _slice_shape(layer, bottoms):
    axis, sizes = _slice_sizes(layer, bottoms[0])
    out = []
    for s in sizes:
        t = list(bottoms[0])
        t[axis] = s
        out.append(tuple(t))
    return out


class Slice(CaffeLayer):
    """Sizes follow Caffe's Reshape at every forward, so slicing the batch axis works for any batch size."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.axis, sizes = _slice_sizes(layer, _bottom(layer))
        self.n = len(sizes)
        self.points = list(layer.param.slice_param.slice_point)
        self.static = sizes
        self.static_dim = sum(sizes)

    def forward(self, x):
        if self.n == 1:
            return x
        dim = x.shape[self.axis]
        if dim == self.static_dim:
            sizes = self.static
        elif self.points:
            sizes = self.static[:-1] + [dim - self.points[-1]]
        else:
            sizes = [dim // self.n] * self.n
        return tuple(torch.split(x, sizes, dim=self.axis))


# ----------------------------------------------------------------------------------------------------------
# Eltwise

Op = caffe_pb2.EltwiseParameter


def _eltwise_check(layer):
    p = layer.param.eltwise_param
    n = len(layer.caffe_bottoms)
    if p.coeff and p.operation != Op.SUM:
        raise ShapeError("eltwise_param.coeff is only allowed with operation SUM")
    if p.coeff and len(p.coeff) != n:
        raise ShapeError(f"eltwise_param needs one coeff per bottom ({n}), got {len(p.coeff)}")


def _eltwise_shape(layer, bottoms):
    for i, b in enumerate(bottoms[1:], 1):
        if tuple(b) != tuple(bottoms[0]):
            raise ShapeError(f"all bottoms must have the same shape (no broadcasting): bottom 0 is "
                             f"{_fmt(bottoms[0])}, bottom {i} is {_fmt(b)}")
    return [tuple(bottoms[0])]


class _ProdByQuotient(torch.autograd.Function):
    """PROD with ``stable_prod_grad: false``: Caffe's gradient is ``top_diff · y / x_i`` (inf/NaN at x_i == 0)."""

    @staticmethod
    def forward(ctx, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y * x
        ctx.save_for_backward(y, *xs)
        return y

    @staticmethod
    def backward(ctx, g):
        y, *xs = ctx.saved_tensors
        return tuple(g * (y / x) if ctx.needs_input_grad[i] else None for i, x in enumerate(xs))


class Eltwise(CaffeLayer):
    """SUM (with coeffs), PROD and MAX with Caffe's tie rule.

    MAX: ``top = a > b ? a : b`` for bottoms 0 and 1 (a tie goes to bottom 1), then each later bottom wins only
    if strictly greater. ``torch.where`` sends the whole gradient to the chosen side, which is Caffe's mask.
    """

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.eltwise_param
        self.op = p.operation
        n = len(layer.bottoms)
        self.coeffs = [float(c) for c in p.coeff] if p.coeff else [1.0] * n
        self.stable_prod_grad = bool(p.stable_prod_grad)

    def forward(self, *xs):
        if self.op == Op.SUM:
            c0 = self.coeffs[0]
            y = xs[0] if c0 == 1.0 else xs[0] * c0
            for x, c in zip(xs[1:], self.coeffs[1:]):
                y = y + x if c == 1.0 else torch.add(y, x, alpha=c)
            return y
        if self.op == Op.PROD:
            if not self.stable_prod_grad and torch.is_grad_enabled() and not _tracing():
                return _ProdByQuotient.apply(*xs)
            y = xs[0]
            for x in xs[1:]:
                y = y * x
            return y
        if self.op == Op.MAX:
            y = torch.where(xs[0] > xs[1], xs[0], xs[1])
            for x in xs[2:]:
                y = torch.where(x > y, x, y)
            return y
        raise ResnetcError(f"unknown Eltwise operation {self.op}", layer=self.layer_name, layer_type="Eltwise")


# ----------------------------------------------------------------------------------------------------------
# Flatten / Reshape


def _flatten_axes(layer, shape) -> tuple:
    p = layer.param.flatten_param
    n = len(shape)
    start = canonical_axis(p.axis, n, "flatten_param.axis")
    end = canonical_axis(p.end_axis, n, "flatten_param.end_axis")
    if end + 1 < start:
        raise ShapeError(f"flatten_param.end_axis ({p.end_axis}) is before axis ({p.axis})")
    return start, end


def _flatten_shape(layer, bottoms):
    b = bottoms[0]
    start, end = _flatten_axes(layer, b)
    return [tuple(b[:start]) + (count(b, start, end + 1),) + tuple(b[end + 1:])]


class Flatten(CaffeLayer):
    """Merges axes ``axis..end_axis``; ``end_axis == axis - 1`` (an empty range) inserts an axis of size 1."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.start, self.end = _flatten_axes(layer, _bottom(layer, full=False))

    def forward(self, x):
        if self.end < self.start:
            return x.unsqueeze(self.start)
        return torch.flatten(x, self.start, self.end)


def _reshape_check(layer):
    p = layer.param.reshape_param
    dims = list(p.shape.dim)
    if sum(1 for d in dims if d == -1) > 1:
        raise ShapeError("reshape_param.shape contains more than one -1 (at most one dimension can be inferred)")
    bad = [d for d in dims if d < -1]
    if bad:
        raise ShapeError(f"reshape_param.shape has an invalid dimension {bad[0]} (dims are >= 0, 0 = copy, "
                         f"-1 = infer)")
    if p.num_axes < -1:
        raise ShapeError(f"reshape_param.num_axes must be >= 0, or -1 for all (got {p.num_axes})")


def _reshape_range(layer, num_axes: int) -> tuple:
    """(start, end) of the replaced axes. A negative ``axis`` counts from the end + 1 (−1 = after the last)."""
    p = layer.param.reshape_param
    start = p.axis if p.axis >= 0 else num_axes + p.axis + 1
    if not 0 <= start <= num_axes:
        raise ShapeError(f"reshape_param.axis {p.axis} out of range for a {num_axes}-axis blob")
    end = num_axes if p.num_axes == -1 else start + p.num_axes
    if end > num_axes:
        raise ShapeError(f"reshape_param: axis + num_axes = {end} is beyond the {num_axes} axes of the bottom")
    return start, end


def _reshape_shape(layer, bottoms):
    b = tuple(bottoms[0])
    start, end = _reshape_range(layer, len(b))
    dims = [int(d) for d in layer.param.reshape_param.shape.dim]
    new = []
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= len(b):
                raise ShapeError(f"reshape_param.shape has a 0 at position {i} but the bottom {_fmt(b)} has no "
                                 f"axis {start + i} to copy")
            new.append(b[start + i])
        else:
            new.append(d)
    top = list(b[:start]) + new + list(b[end:])
    total = count(b)
    if -1 in new:
        k = new.index(-1)
        known = count(b[:start]) * count(b[end:]) * count([d for d in new if d != -1])
        if known == 0 or total % known:
            raise ShapeError(f"cannot infer the -1 of reshape_param.shape: the bottom count {total} ({_fmt(b)}) is "
                             f"not divisible by the product of the other dimensions ({known})")
        top[start + k] = total // known
    if count(top) != total:
        raise ShapeError(f"reshape of {_fmt(b)} (count {total}) to {_fmt(top)} (count {count(top)}) changes the "
                         f"number of elements")
    return [tuple(top)]


class Reshape(CaffeLayer):
    """A view with Caffe's new shape; ``0`` copies the bottom's dim at run time (so the batch may change)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        b = _bottom(layer, full=False)
        self.start, self.end = _reshape_range(layer, len(b))
        # per new axis: ("copy", bottom axis) or ("dim", value incl. -1)
        self.spec = [(True, self.start + i) if d == 0 else (False, int(d))
                     for i, d in enumerate(layer.param.reshape_param.shape.dim)]

    def forward(self, x):
        shape = list(x.shape[:self.start])
        for copy, v in self.spec:
            shape.append(x.shape[v] if copy else v)
        shape.extend(x.shape[self.end:])
        return x.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Crop / Tile


def _crop_offsets(layer, b0, b1) -> tuple:
    """(start axis, offsets per axis) per Caffe's CropLayer."""
    p = layer.param.crop_param
    n = len(b0)
    start = canonical_axis(p.axis, n, "crop_param.axis")
    offs = list(p.offset)
    if len(offs) > 1 and start + len(offs) != n:
        raise ShapeError(f"crop_param gives {len(offs)} offsets; it needs 1 or exactly one per cropped axis "
                         f"({n - start}: axes {start}..{n - 1})")
    if len(b1) < n:
        raise ShapeError(f"the reference bottom {_fmt(b1)} has fewer axes than the cropped bottom {_fmt(b0)}")
    offsets = [0] * n
    for i in range(start, n):
        o = offs[0] if len(offs) == 1 else (offs[i - start] if offs else 0)
        if b0[i] - o < b1[i]:
            raise ShapeError(f"the crop of axis {i} is out of bounds: size {b1[i]} at offset {o} in {b0[i]}")
        offsets[i] = int(o)
    return start, offsets


def _crop_shape(layer, bottoms):
    b0, b1 = bottoms
    start, _ = _crop_offsets(layer, b0, b1)
    return [tuple(b0[:start]) + tuple(b1[start:len(b0)])]


class Crop(CaffeLayer):
    """bottom[0][..., o_i : o_i + size_i(bottom[1]), ...] for axes >= axis; bottom[1] only gives sizes."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        b0, b1 = _bottom(layer, 0), _bottom(layer, 1)
        self.start, offsets = _crop_offsets(layer, b0, b1)
        self.offsets = offsets[self.start:]

    def forward(self, x, ref):
        for k, o in enumerate(self.offsets):
            ax = self.start + k
            x = x.narrow(ax, o, ref.shape[ax])
        return x


def _tile_check(layer):
    if layer.param.tile_param.tiles <= 0:
        raise ShapeError(f"tile_param.tiles must be positive (got {layer.param.tile_param.tiles})")


def _tile_shape(layer, bottoms):
    b = list(bottoms[0])
    axis = canonical_axis(layer.param.tile_param.axis, len(b), "tile_param.axis")
    b[axis] *= layer.param.tile_param.tiles
    return [tuple(b)]


class Tile(CaffeLayer):
    """Repeats the whole block of axes >= axis ``tiles`` times (numpy ``tile`` on that axis)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        n = len(_bottom(layer, full=False))
        axis = canonical_axis(layer.param.tile_param.axis, n, "tile_param.axis")
        self.repeats = [1] * n
        self.repeats[axis] = int(layer.param.tile_param.tiles)

    def forward(self, x):
        return x.repeat(self.repeats)


# ----------------------------------------------------------------------------------------------------------
# Reduction / Softmax / ArgMax

Red = caffe_pb2.ReductionParameter


def _reduction_shape(layer, bottoms):
    b = bottoms[0]
    axis = canonical_axis(layer.param.reduction_param.axis, len(b), "reduction_param.axis")
    return [tuple(b[:axis])]


class Reduction(CaffeLayer):
    """SUM / ASUM / SUMSQ / MEAN over **all** axes from ``axis`` to the end, times ``coeff`` (MEAN: coeff/dim,
    computed in float32 as Caffe does)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.reduction_param
        b = _bottom(layer, full=False)
        self.axis = canonical_axis(p.axis, len(b), "reduction_param.axis")
        self.op = p.operation
        self.coeff = float(np.float32(p.coeff))
        self._mean_coeffs = {}

    def _mean_coeff(self, dim: int) -> float:
        """MEAN: Caffe's ``coeff_ /= dim_`` in float32, re-derived when the reduced size changes."""
        c = self._mean_coeffs.get(dim)
        if c is None:
            c = self._mean_coeffs[dim] = float(np.float32(np.float32(self.coeff) / np.float32(dim)))
        return c

    def forward(self, x):
        flat = torch.flatten(x, self.axis) if x.dim() else x.reshape(1)
        if self.op == Red.ASUM:
            flat = torch.abs(flat)
        elif self.op == Red.SUMSQ:
            flat = flat * flat
        y = flat.sum(-1)
        c = self._mean_coeff(int(flat.shape[-1])) if self.op == Red.MEAN else self.coeff
        return y if c == 1.0 else y * c


def _softmax_axis(layer, shape) -> int:
    return canonical_axis(layer.param.softmax_param.axis, len(shape), "softmax_param.axis")


def _softmax_shape(layer, bottoms):
    _softmax_axis(layer, bottoms[0])
    return [tuple(bottoms[0])]


class Softmax(CaffeLayer):
    """Softmax over ``axis`` (max-subtracted, as Caffe)."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.axis = _softmax_axis(layer, _bottom(layer, full=False))

    def forward(self, x):
        return torch.softmax(x, self.axis)


def _argmax_setup(layer, b) -> tuple:
    """(axis or None, top_k, out_max_val) after Caffe's ArgMaxLayer::LayerSetUp checks."""
    p = layer.param.argmax_param
    k = int(p.top_k)
    if k < 1:
        raise ShapeError("argmax_param.top_k must be at least 1")
    if p.HasField("axis"):
        axis = canonical_axis(p.axis, len(b), "argmax_param.axis")
        if k > b[axis]:
            raise ShapeError(f"argmax_param.top_k {k} is larger than axis {axis} ({b[axis]})")
        return axis, k, bool(p.out_max_val)
    if len(b) == 0 or k > count(b, 1):
        raise ShapeError(f"argmax_param.top_k {k} is larger than the {count(b, 1) if b else 0} values per item")
    return None, k, bool(p.out_max_val)


def _argmax_shape(layer, bottoms):
    b = tuple(bottoms[0])
    axis, k, out_max_val = _argmax_setup(layer, b)
    if axis is not None:
        top = list(b)
        top[axis] = k
        return [tuple(top)]
    top = [1] * max(3, len(b))
    top[0] = b[0]
    top[2] = k
    if out_max_val:
        top[1] = 2
    return [tuple(top)]


class ArgMax(CaffeLayer):
    """Top-k indices (as floats) and/or values.

    Caffe sorts ``(value, index)`` pairs with ``std::greater``, so among equal values the **higher index comes
    first**. We sort the reversed axis with a stable descending sort and map the indices back, which gives the
    same order. No gradient (Caffe's backward is NOT_IMPLEMENTED).
    """

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        b = _bottom(layer)
        self.axis, self.k, self.out_max_val = _argmax_setup(layer, b)
        self.top_shape_tail = tuple(_argmax_shape(layer, [b])[0][1:])

    def _topk(self, x, dim: int):
        n = x.shape[dim]
        rev = torch.flip(x, (dim,))
        if _tracing():
            # ONNX TopK puts the lower index first among equal values: on the reversed axis, Caffe's order
            values, idx = torch.topk(rev, self.k, dim=dim, largest=True, sorted=True)
        elif self.k == 1:
            values, idx = torch.max(rev, dim=dim, keepdim=True)  # the first maximum of the reversed axis
        else:
            values, idx = torch.sort(rev, dim=dim, descending=True, stable=True)
            values, idx = values.narrow(dim, 0, self.k), idx.narrow(dim, 0, self.k)
        return values, ((n - 1) - idx).to(x.dtype)

    def forward(self, x):
        x = x.detach()
        if self.axis is not None:
            values, idx = self._topk(x, self.axis)
            return values if self.out_max_val else idx
        flat = x.reshape(x.shape[0], -1)
        values, idx = self._topk(flat, 1)
        out = torch.cat([idx, values], dim=1) if self.out_max_val else idx
        return out.reshape((x.shape[0],) + self.top_shape_tail)


# ----------------------------------------------------------------------------------------------------------
# Embed


def _embed_check(layer):
    p = layer.param.embed_param
    if p.num_output <= 0:
        raise ShapeError("embed_param.num_output must be positive")
    if p.input_dim <= 0:
        raise ShapeError("embed_param.input_dim must be positive")


def _embed_shape(layer, bottoms):
    return [tuple(bottoms[0]) + (int(layer.param.embed_param.num_output),)]


def _embed_params(layer, bottoms):
    p = layer.param.embed_param
    blobs = [ParamBlob((int(p.input_dim), int(p.num_output)), filler_or_default(p, "weight_filler"), role="weight")]
    if p.bias_term:
        blobs.append(ParamBlob((int(p.num_output),), filler_or_default(p, "bias_filler"), role="bias"))
    return blobs


class Embed(_Located):
    """``W[int(x)] (+ b)``: each value is truncated toward zero to a row index; no gradient to the input."""

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.input_dim = int(layer.param.embed_param.input_dim)
        self.bias = bool(layer.param.embed_param.bias_term)

    def forward(self, x):
        idx = x.detach().to(torch.int64)  # static_cast<int>: truncation toward zero (ONNX Cast does the same)
        if not _tracing() and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.input_dim:
                bad = lo if lo < 0 else hi
                raise self.error(f"index {bad} is out of range for input_dim {self.input_dim} (values are "
                                 f"truncated to integers in 0..{self.input_dim - 1})")
        y = F.embedding(idx, self.blobs[0])
        return y + self.blobs[1] if self.bias else y


# ----------------------------------------------------------------------------------------------------------
# Filter / BatchReindex


def _filter_check(layer):
    if len(layer.caffe_tops) != len(layer.caffe_bottoms) - 1:
        raise ShapeError(f"Filter needs one top per filtered bottom ({len(layer.caffe_bottoms) - 1}: every bottom "
                         f"but the last, the selector), got {len(layer.caffe_tops)}")


def _filter_shape(layer, bottoms):
    sel = bottoms[-1]
    if len(sel) == 0:
        raise ShapeError("the selector (last bottom) needs a first axis")
    if any(d != 1 for d in sel[1:]):
        raise ShapeError(f"the selector (last bottom) must be 1 on every axis but the first, got {_fmt(sel)}")
    for i, b in enumerate(bottoms[:-1]):
        if len(b) == 0 or b[0] != sel[0]:
            raise ShapeError(f"bottom {i} {_fmt(b)} must have the selector's first dimension {sel[0]}")
    # at setup Caffe keeps the full batch; every forward then keeps only the selected rows
    return [tuple(b) for b in bottoms[:-1]]


class Filter(CaffeLayer):
    """Keeps the rows (axis 0) whose selector value is non-zero, in order; the output size depends on the data.
    Unselected rows get zero gradient; the selector gets none."""

    def forward(self, *bottoms):
        sel = bottoms[-1].detach()
        keep = torch.nonzero(sel.reshape(sel.shape[0]) != 0).reshape(-1)
        tops = tuple(b.index_select(0, keep) for b in bottoms[:-1])
        return tops if len(tops) != 1 else tops[0]


def _reindex_shape(layer, bottoms):
    b, idx = bottoms
    if len(idx) != 1:
        raise ShapeError(f"the indices (bottom 1) must be 1-D, got {_fmt(idx)}")
    if len(b) == 0:
        raise ShapeError("bottom 0 needs a first axis to index")
    return [(idx[0],) + tuple(b[1:])]


class BatchReindex(_Located):
    """``top[i] = bottom[int(idx[i])]``; gradients of repeated indices add up; none to the indices."""

    def forward(self, x, idx):
        i = idx.detach().to(torch.int64)
        if not _tracing() and i.numel():
            lo, hi = int(i.min()), int(i.max())
            if lo < 0 or hi >= x.shape[0]:
                raise self.error(f"index {lo if lo < 0 else hi} is out of range for a batch of {x.shape[0]}")
        return x.index_select(0, i)


# ----------------------------------------------------------------------------------------------------------
# Parameter / DummyData


def _parameter_shape(layer, bottoms):
    dims = tuple(int(d) for d in layer.param.parameter_param.shape.dim)
    if any(d < 0 for d in dims):
        raise ShapeError(f"parameter_param.shape {list(dims)} has a negative dimension")
    return [dims]


def _parameter_params(layer, bottoms):
    return [ParamBlob(_parameter_shape(layer, bottoms)[0], None, role="value")]


class Parameter(CaffeLayer):
    """The top is the layer's parameter blob itself (its data and its gradient)."""

    def forward(self):
        return self.blobs[0]


def _dummy_check(layer):
    p = layer.param.dummy_data_param
    ntop = len(layer.caffe_tops)
    if len(p.data_filler) not in (0, 1, ntop):
        raise ShapeError(f"dummy_data_param needs 0, 1 or one data_filler per top ({ntop}), got {len(p.data_filler)}")
    legacy = {"num": p.num, "channels": p.channels, "height": p.height, "width": p.width}
    if any(len(v) for v in legacy.values()):
        if len(p.shape):
            raise ShapeError("dummy_data_param: give either shape or the legacy num/channels/height/width, not both")
        for k, v in legacy.items():
            if len(v) not in (1, ntop):
                raise ShapeError(f"dummy_data_param.{k} must be given once, or once per top ({ntop}); got {len(v)}")
    elif len(p.shape) not in (1, ntop):
        raise ShapeError(f"dummy_data_param.shape must be given once, or once per top ({ntop}); got {len(p.shape)}")
    for f in p.data_filler:
        if f.type not in ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear"):
            raise ShapeError(f"unknown filler type '{f.type}' in dummy_data_param.data_filler")


def _dummy_shape(layer, bottoms):
    p = layer.param.dummy_data_param
    out = []
    legacy = len(p.num) or len(p.channels) or len(p.height) or len(p.width)
    for j in range(len(layer.caffe_tops)):
        if legacy:
            pick = lambda v: int(v[0] if len(v) == 1 else v[j])  # noqa: E731
            out.append((pick(p.num), pick(p.channels), pick(p.height), pick(p.width)))
        else:
            dims = tuple(int(d) for d in p.shape[0 if len(p.shape) == 1 else j].dim)
            if any(d < 0 for d in dims):
                raise ShapeError(f"dummy_data_param.shape {list(dims)} has a negative dimension")
            out.append(dims)
    return out


class DummyData(CaffeLayer):
    """Makes each top from its filler at every forward (constant 0 without a filler).

    constant / uniform / gaussian are drawn with torch's generator on the module's device (seed it with
    ``torch.manual_seed``); the other Caffe fillers (xavier, msra, positive_unitball, bilinear) go through
    ``resnetc.fillers`` with a stream seeded from torch's generator. Caffe's own random numbers cannot be
    reproduced (its Boost streams are shared with every other random layer), only their distributions.
    """

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        p = layer.param.dummy_data_param
        self.shapes = [tuple(s) for s in layer.top_shapes]
        fillers = list(p.data_filler)
        if not fillers:
            f = caffe_pb2.FillerParameter()
            f.type, f.value = "constant", 0.0
            fillers = [f]
        self.fillers = [fillers[0 if len(fillers) == 1 else j] for j in range(len(self.shapes))]
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # device and dtype of the tops

    def _make(self, filler, shape):
        like = self._anchor
        t = filler.type
        if t == "constant":
            return torch.full(shape, float(filler.value), dtype=like.dtype, device=like.device)
        if t == "uniform":
            return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(float(filler.min),
                                                                                   float(filler.max))
        if t == "gaussian":
            y = torch.empty(shape, dtype=like.dtype, device=like.device).normal_(float(filler.mean),
                                                                                 float(filler.std))
            if filler.sparse >= 0:
                p = filler.sparse / shape[0] if shape and shape[0] else 0.0
                y = y * torch.bernoulli(torch.full(shape, p, dtype=like.dtype, device=like.device))
            return y
        from ..fillers import CaffeRNG, fill

        rng = CaffeRNG(int(torch.randint(0, 2 ** 31 - 1, ()).item()))
        return torch.from_numpy(fill(filler, shape, rng, where=f"layer '{self.layer_name}': ")).to(like)

    def forward(self):
        tops = tuple(self._make(f, s) for f, s in zip(self.fillers, self.shapes))
        return tops if len(tops) != 1 else tops[0]


# ----------------------------------------------------------------------------------------------------------
# HDF5Output


def _hdf5_output_check(layer):
    if not layer.param.hdf5_output_param.file_name:
        raise ShapeError("hdf5_output_param.file_name is required")


def _legacy4(shape) -> tuple:
    if len(shape) > 4:
        raise ShapeError(f"HDF5Output reads its bottoms as 4-D (num, channels, height, width); got {_fmt(shape)}")
    return tuple(shape) + (1,) * (4 - len(shape))


def _hdf5_output_shape(layer, bottoms):
    for b in bottoms:
        _legacy4(b)
    return []


class HDF5Output(_Located):
    """Writes bottom 0 as dataset ``data`` and bottom 1 as ``label`` (both as 4-D float32) to ``file_name``.

    Like Caffe, one batch only: Caffe creates the file at setup and fails when a second forward tries to
    create the datasets again; we write the file (atomically) at the first forward and refuse a second one.
    """

    def __init__(self, layer, blobs):
        super().__init__(layer, blobs)
        self.path = layer.param.hdf5_output_param.file_name
        self.written = False

    def forward(self, data, label):
        if _tracing():
            return ()
        if self.written:
            raise self.error(f"HDF5Output already wrote {self.path}: like Caffe it writes one batch "
                             f"(datasets 'data' and 'label') and cannot write a second forward")
        import h5py

        from ..atomic import atomic_path

        arrays = {name: t.detach().float().cpu().numpy().reshape(_legacy4(tuple(t.shape)))
                  for name, t in (("data", data), ("label", label))}
        try:
            with atomic_path(self.path, suffix=".h5") as tmp:
                with h5py.File(tmp, "w") as f:
                    for name, a in arrays.items():
                        f.create_dataset(name, data=a)
        except ResnetcError as e:
            raise e.at(file=self._file, line=self._line, layer=self.layer_name, layer_type=self.layer_type)
        except OSError as e:
            raise self.error(f"cannot write {self.path}: {e}")
        self.written = True
        return ()


# ----------------------------------------------------------------------------------------------------------
# Registration


def _reg(name, shape, lower, *, bottoms, tops, **kw):
    register(name, shape=shape, lower=lower, bottoms=bottoms, tops=tops, family=FAMILY, **kw)


_reg("Input", _input_shape, None, bottoms=(0, 0), tops=(1, None),
     doc="net inputs: its tops are keyword inputs of CaffeNet.forward (not lowered)")
_reg("Split", _split_shape, Split, bottoms=(1, 1), tops=(1, None), in_place=False)
_reg("Silence", lambda layer, bottoms: [], Silence, bottoms=(1, None), tops=(0, 0))
_reg("Concat", _concat_shape, Concat, check=_concat_check, bottoms=(1, None), tops=(1, 1))
_reg("Slice", _slice_shape, Slice, check=_slice_check, bottoms=(1, 1), tops=(1, None))
_reg("Eltwise", _eltwise_shape, Eltwise, check=_eltwise_check, bottoms=(2, None), tops=(1, 1))
_reg("Flatten", _flatten_shape, Flatten, bottoms=(1, 1), tops=(1, 1), in_place=False)
_reg("Reshape", _reshape_shape, Reshape, check=_reshape_check, bottoms=(1, 1), tops=(1, 1), in_place=False)
_reg("Crop", _crop_shape, Crop, bottoms=(2, 2), tops=(1, 1), no_grad_bottoms=(1,))
_reg("Tile", _tile_shape, Tile, check=_tile_check, bottoms=(1, 1), tops=(1, 1))
_reg("Reduction", _reduction_shape, Reduction, bottoms=(1, 1), tops=(1, 1))
_reg("Softmax", _softmax_shape, Softmax, bottoms=(1, 1), tops=(1, 1))
_reg("ArgMax", _argmax_shape, ArgMax, bottoms=(1, 1), tops=(1, 1), no_grad_bottoms=(0,))
_reg("Embed", _embed_shape, Embed, check=_embed_check, params=_embed_params, bottoms=(1, 1), tops=(1, 1),
     no_grad_bottoms=(0,))
_reg("Filter", _filter_shape, Filter, check=_filter_check, bottoms=(2, None), tops=(1, None))
_reg("BatchReindex", _reindex_shape, BatchReindex, bottoms=(2, 2), tops=(1, 1), no_grad_bottoms=(1,))
_reg("Parameter", _parameter_shape, Parameter, params=_parameter_params, bottoms=(0, 0), tops=(1, 1))
_reg("DummyData", _dummy_shape, DummyData, check=_dummy_check, bottoms=(0, 0), tops=(1, None))
_reg("HDF5Output", _hdf5_output_shape, HDF5Output, check=_hdf5_output_check, bottoms=(2, 2), tops=(0, 0))
