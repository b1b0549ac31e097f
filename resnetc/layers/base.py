"""Base class of the torch modules the layer registry lowers to."""
from __future__ import annotations

import torch
from torch import nn


_KEYS = tuple(str(i) for i in range(32))


class Blobs(nn.ParameterList):
    """``nn.ParameterList`` whose integer indexing reads the registered parameter directly (``blobs[0]`` runs
    in every forward; the stock lookup formats and checks the index through several Python calls)."""

    def __getitem__(self, idx):
        if type(idx) is int and 0 <= idx < 32:
            p = self._parameters.get(_KEYS[idx])
            if p is not None:
                return p
        return super().__getitem__(idx)


class CaffeLayer(nn.Module):
    """One Caffe layer as a torch module.

    Constructed as ``Cls(layer, blobs)``: ``layer`` is the :class:`resnetc.graph.Layer` (its ``param`` is the
    LayerParameter, ``phase`` the layer's own phase, ``bottom_shapes``/``top_shapes`` the inferred shapes),
    ``blobs`` the layer's Caffe parameter blobs as ``nn.Parameter`` objects, in Caffe's order, created and
    filled by CaffeNet (shared params are the same object in every layer that shares them; BatchNorm
    statistics have ``requires_grad=False``). ``forward(*bottoms)`` returns one tensor, or a tuple with one
    tensor per top.

    Keep the forward free of Python-side shape bookkeeping that would cost time per call: precompute in
    ``__init__`` what depends only on parameters and shapes.
    """

    def __init__(self, layer, blobs):
        super().__init__()
        self.layer_name = layer.name
        self.layer_type = layer.type
        self.phase = layer.phase
        self.blobs = Blobs(blobs)

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}"


class Identity(CaffeLayer):
    """Tops alias the bottoms (Split, single-bottom Concat, Silence-like plumbing)."""

    def forward(self, *bottoms):
        return bottoms if len(bottoms) != 1 else bottoms[0]
