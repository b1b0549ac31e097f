"""The layer registry and the built-in layer families (one module per family)."""
from .registry import REGISTRY, LayerType, ParamBlob, ShapeError, get, register, supported_types  # noqa: F401
