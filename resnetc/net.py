"""CaffeNet: a LayerGraph lowered to a real ``torch.nn.Module`` for one phase.

The module runs the layers in Caffe's order over a value environment keyed by single-assignment blob names
(the plan is precomputed, so a forward is one Python loop of module calls). Parameters are Caffe's blobs:
``net.params['conv1'][0]`` is blob 0 of layer ``conv1`` (an ``nn.Parameter``; shared params are one object;
BatchNorm statistics have ``requires_grad=False``). ``net.blobs['x']`` is blob ``x`` after the last forward.

Data layers are not modules: their tops, like ``Input`` tops, are keyword inputs of the forward.
"""
from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from torch import nn

from .errors import ResnetcError
from .fillers import CaffeRNG, fill
from .graph import LayerGraph, build_graph
from .prototxt import NetSource, read_net

log = logging.getLogger("resnetc.net")


def _module_key(name: str, used: set) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "layer"
    if key[0].isdigit():
        key = "l_" + key
    base, i = key, 1
    while key in used:
        i += 1
        key = f"{base}_{i}"
    used.add(key)
    return key


class BlobsView(Mapping):
    """``net.blobs``: Caffe blob name -> tensor of the last forward (read-only mapping)."""

    def __init__(self, net: "CaffeNet"):
        self._net = net

    def __getitem__(self, name: str) -> torch.Tensor:
        env = self._net._env
        if env is None:
            raise KeyError(f"{name!r}: no forward has run yet")
        ssa = self._net.graph.blob_alias.get(name)
        if ssa is None or ssa not in env:
            raise KeyError(name)
        return env[ssa]

    def __iter__(self):
        env = self._net._env or {}
        return (n for n, s in self._net.graph.blob_alias.items() if s in env)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name) -> bool:
        env = self._net._env or {}
        ssa = self._net.graph.blob_alias.get(name)
        return ssa is not None and ssa in env


class CaffeNet(nn.Module):
    """The lowered net. Call it with keyword inputs by blob name; returns {output blob: tensor}."""

    def __init__(self, graph: LayerGraph, *, seed: Optional[int] = None, device=None, fill_params: bool = True):
        super().__init__()
        self.graph = graph
        self.phase = graph.phase
        self._env = None
        rng = CaffeRNG(seed)
        owned: dict = {}  # (layer name, blob idx) -> Parameter
        self.params: "collections.OrderedDict[str, list]" = collections.OrderedDict()
        modules = nn.ModuleDict()
        self._module_keys: dict = {}
        used: set = set()
        plan = []
        self._input_names = list(graph.inputs) + [t for t in graph.data_tops if t not in graph.inputs]
        for layer in graph.layers:
            if layer.blobs is None:
                raise layer.error("cannot lower: the sizes of its inputs are unknown (give the input shapes, e.g. "
                                  "--input-shape data=1,3,224,224, or make the data source available)")
            blobs = []
            for i, pb in enumerate(layer.blobs):
                shared = layer.shared_from[i] if i < len(layer.shared_from) else None
                if shared is not None:
                    p = owned[shared]
                else:
                    where = f"layer '{layer.name}' blob {i}: "
                    values = fill(pb.filler, pb.shape, rng, where=where) if fill_params else \
                        np.zeros(pb.shape, np.float32)
                    p = nn.Parameter(torch.from_numpy(values),
                                     requires_grad=bool(pb.learnable and (layer.lr_mult[i] != 0 or graph.force_backward)))
                    owned[(layer.name, i)] = p
                blobs.append(p)
            if blobs:
                self.params[layer.name] = blobs
            if layer.spec.data or layer.type == "Input":
                continue
            if layer.spec.lower is None:
                raise layer.error(f"layer type {layer.type} cannot run in resnetc yet (no torch lowering)")
            try:
                mod = layer.spec.lower(layer, blobs)
            except ResnetcError as e:
                raise e.at(file=layer.file, line=layer.line, layer=layer.name, layer_type=layer.type)
            key = _module_key(layer.name, used)
            modules[key] = mod
            self._module_keys[layer.name] = key
            detach = [bool(layer.param.propagate_down) and not layer.param.propagate_down[j]
                      for j in range(len(layer.bottoms))]
            plan.append((mod, tuple(layer.bottoms), tuple(layer.tops), tuple(detach) if any(detach) else None))
        self.layers = modules
        self._plan = plan
        self._loss_terms = [(layer.tops[j], w) for layer in graph.layers for j, w in enumerate(layer.loss_weights)
                            if w != 0]
        self._outputs = [(name, graph.blob_alias[name]) for name in graph.outputs]
        self.load_prototxt_blobs()
        if device is not None:
            self.to(device)

    # -- views -----------------------------------------------------------------------------------------------
    @property
    def blobs(self) -> BlobsView:
        return BlobsView(self)

    @property
    def layer_modules(self) -> dict:
        return {name: self.layers[key] for name, key in self._module_keys.items()}

    @property
    def inputs(self) -> list:
        return list(self._input_names)

    @property
    def outputs(self) -> list:
        return [n for n, _ in self._outputs]

    def learnable_params(self) -> list:
        """Caffe's learnable_params order: owners only, by layer then blob index.

        Returns [(layer name, blob index, Parameter, lr_mult, decay_mult)]; BatchNorm statistics included
        (lr_mult 0), as Caffe keeps a history blob for them."""
        out = []
        for layer in self.graph.layers:
            for i in range(len(layer.blobs or [])):
                if layer.shared_from[i] is None:
                    out.append((layer.name, i, self.params[layer.name][i], layer.lr_mult[i], layer.decay_mult[i]))
        return out

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, **inputs) -> dict:
        env = {}
        for name in self._input_names:
            if name not in inputs:
                raise ResnetcError(f"missing input blob '{name}' (net inputs: {', '.join(self._input_names)})",
                                   file=self.graph.file)
            env[name] = inputs[name]
        for name in inputs:
            if name not in env:
                raise ResnetcError(f"'{name}' is not an input of this net (inputs: {', '.join(self._input_names)})",
                                   file=self.graph.file)
        for mod, bottoms, tops, detach in self._plan:
            args = [env[b] for b in bottoms]
            if detach is not None:
                args = [a.detach() if d else a for a, d in zip(args, detach)]
            out = mod(*args)
            if len(tops) == 1:
                env[tops[0]] = out[0] if isinstance(out, (tuple, list)) else out
            else:
                for t, v in zip(tops, out):
                    env[t] = v
        self._env = env
        return {name: env[ssa] for name, ssa in self._outputs}

    def total_loss(self) -> torch.Tensor:
        """Σ loss_weight · sum(top) over the loss tops of the last forward (Caffe's net loss)."""
        env = self._env
        total = None
        for ssa, w in self._loss_terms:
            term = env[ssa].sum() * w
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    @property
    def has_loss(self) -> bool:
        return bool(self._loss_terms)

    # -- weights ---------------------------------------------------------------------------------------------
    def load_prototxt_blobs(self) -> None:
        """Blobs written inside the prototxt's layers (``blobs { ... }``) replace the fillers, as in Caffe."""
        layers = [l for l in self.graph.layers if len(l.param.blobs)]
        if not layers:
            return
        from .weights import blobproto_to_array, check_blob_shape

        for layer in layers:
            dst = self.params.get(layer.name, [])
            if len(layer.param.blobs) != len(dst):
                raise layer.error(f"the prototxt gives {len(layer.param.blobs)} blobs, the layer has {len(dst)}")
            for i, bp in enumerate(layer.param.blobs):
                check_blob_shape(bp, dst[i], layer.name, i, self.graph.file)
                with torch.no_grad():
                    dst[i].copy_(torch.from_numpy(blobproto_to_array(bp).reshape(dst[i].shape)))


def load_net(path, weights: Optional[str] = None, phase: str = "TEST", *, level: Optional[int] = None, stages=(),
             input_shapes: Optional[dict] = None, seed: Optional[int] = None, device=None,
             allow_python_layers: bool = False) -> CaffeNet:
    """Build a CaffeNet from a prototxt (and optionally copy weights from a .caffemodel by layer name)."""
    src = path if isinstance(path, NetSource) else read_net(os.fspath(path))
    graph = build_graph(src, phase, level=level, stages=stages, input_shapes=input_shapes,
                        allow_python_layers=allow_python_layers)
    net = CaffeNet(graph, seed=seed)
    if weights:
        from .weights import load_caffemodel

        load_caffemodel(net, weights)
    if device is not None:
        net.to(device)
    return net
