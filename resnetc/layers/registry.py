"""The layer library: one :class:`LayerType` entry per Caffe layer type.

Each entry holds everything the stages need, in one place:

* ``shape(layer, bottoms) -> tops``: Caffe's shape rule. ``bottoms`` are tuples of ints; raise
  :class:`ShapeError` (a ResnetcError; the graph adds file, line and layer) on a mismatch. Only called when
  every bottom shape is fully known.
* ``check(layer)``: parameter validation that needs no shapes (runs even when sizes are unknown).
* ``params(layer, bottoms) -> [ParamBlob]``: Caffe's parameter blobs, in Caffe's order, with shapes and
  default fillers.
* ``lower``: a class ``(layer, blobs) -> torch.nn.Module`` (subclass :class:`resnetc.layers.base.CaffeLayer`)
  computing tops from bottoms with Caffe's exact arithmetic. Added by the lowering issue.
* ``flops(layer, bottoms, tops) -> int``: multiply-adds of one forward (Convolution, InnerProduct, ...).
* ``loss``: a Caffe ``LossLayer`` (default ``loss_weight: 1`` on top 0).

Register with :func:`register`; registering a type twice raises. Custom (fork) layers register the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from ..errors import ResnetcError
from ..proto import caffe_pb2

Shape = tuple  # tuple[int, ...]; a dim may be None when unknown (data source absent)


class ShapeError(ResnetcError):
    """A shape rule failed; the graph fills in file, line and layer."""


@dataclasses.dataclass(frozen=True)
class ParamBlob:
    """One Caffe parameter blob of a layer."""

    shape: tuple
    # filler used when the weights are not loaded; None = zeros (BatchNorm statistics, Parameter)
    filler: Optional[caffe_pb2.FillerParameter] = None
    # False: not trained by gradients (BatchNorm statistics); the solver never updates it and
    # `summary` reports it apart from the learnable parameter count
    learnable: bool = True
    # what the blob is, for summaries and error messages ("weight", "bias", "mean", ...)
    role: str = ""


def constant_filler(value: float = 0.0) -> caffe_pb2.FillerParameter:
    f = caffe_pb2.FillerParameter()
    f.type = "constant"
    f.value = value
    return f


def filler_or_default(layer_param_msg, field: str, default_value: float = 0.0) -> caffe_pb2.FillerParameter:
    """``msg.<field>`` if set (e.g. ``convolution_param.weight_filler``), else Caffe's default constant."""
    if layer_param_msg.HasField(field):
        return getattr(layer_param_msg, field)
    return constant_filler(default_value)


@dataclasses.dataclass
class LayerType:
    name: str
    shape: Callable
    check: Optional[Callable] = None
    params: Optional[Callable] = None
    lower: Optional[Callable] = None
    flops: Optional[Callable] = None
    loss: bool = False
    bottoms: tuple = (0, None)  # (min, max) counts; None = unbounded
    tops: tuple = (0, None)
    in_place: bool = True  # may a top share its bottom's name (Flatten, Reshape, Split may not)
    data: bool = False  # a data layer: tops come from an input pipeline, not from a module
    # bottoms (by index) that never receive a gradient in Caffe (labels, indices, ...)
    no_grad_bottoms: tuple = ()
    family: str = ""
    doc: str = ""


REGISTRY: dict = {}


def register(name: str, **kwargs) -> LayerType:
    """Register a layer type. Raises if ``name`` is already registered."""
    if name in REGISTRY:
        raise ValueError(f"layer type {name!r} is registered twice")
    entry = LayerType(name=name, **kwargs)
    REGISTRY[name] = entry
    return entry


def get(name: str) -> Optional[LayerType]:
    _load_builtin()
    return REGISTRY.get(name)


def supported_types() -> list:
    _load_builtin()
    return sorted(REGISTRY)


_loaded = False


def _load_builtin() -> None:
    """Import the built-in families once (each module registers its types at import)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    from .. import layers as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("registry", "base", "shapes_util"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def canonical_axis(axis: int, num_axes: int, what: str = "axis") -> int:
    """Caffe's CanonicalAxisIndex: negative counts from the end; out of range is an error."""
    if not -num_axes <= axis < num_axes:
        raise ShapeError(f"{what} {axis} out of range for a {num_axes}-axis blob")
    return axis + num_axes if axis < 0 else axis


def count(shape: Sequence, start: int = 0, end: Optional[int] = None) -> int:
    n = 1
    for d in shape[start:end]:
        n *= d
    return n
