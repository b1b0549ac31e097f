"""CaffeNet: a LayerGraph lowered to a real ``torch.nn.Module`` for one phase.

The module runs the layers in Caffe's order over a value environment keyed by single-assignment blob names
(the plan is precomputed, so a forward is one Python loop of module calls). Parameters are Caffe's blobs:
``net.params['conv1'][0]`` is blob 0 of layer ``conv1`` (an ``nn.Parameter``; shared params are one object;
BatchNorm statistics have ``requires_grad=False``). ``net.blobs['x']`` is blob ``x`` after the last forward.

Data layers are not modules: their tops, like ``Input`` tops, are keyword inputs of the forward.

The forward runs an *execution plan* derived from the per-layer plan (``_plan``, one entry per layer, which
``resnetc.timing`` and ``export.fold_batchnorm`` use and may edit; the execution plan is rebuilt when it
changes). ``net.keep_blobs`` decides which blobs outlive the forward and, with that, what may be fused:

* ``"auto"`` (default): ``True`` in an eager forward, ``False`` in a ``torch.compile``'d one (every blob a
  compiled graph returns is one it must materialise and cannot fuse away: keeping them all made a compiled
  ResNet-20 training step 1.6x slower; set ``True`` to keep them anyway).
* ``True``: every blob pycaffe can name — each Caffe blob's final value (``net.blobs``) and, when
  gradients are enabled, the first version of an in-place chain (whose gradient pycaffe reports as the blob's
  diff), plus inputs, outputs and loss tops. Intermediate versions of an in-place chain (``conv1`` after
  BatchNorm, before Scale) are not kept: a BatchNorm followed by a per-channel Scale on such a blob runs as
  one ``batch_norm`` kernel (``layers.norm.BatchNormScale``), a ReLU overwrites such a blob in place
  (``ReLU.inplace``) when its producer's backward does not need it, and a Split's tops alias its bottom
  without a call.
* ``False``: only inputs, outputs and loss tops are kept (``net.blobs`` holds only those); the rest is freed
  as soon as its last reader ran, and more BatchNorm/Scale pairs and ReLUs qualify.
* ``"all"``: every layer runs as its own module and every single-assignment version is kept (debugging).

In every mode but ``"all"`` the statistics of all ``use_global_stats`` BatchNorms are computed by one first
step (``layers.norm.GlobalStatistics``) instead of five small ops per layer. Forward hooks on a layer module
still fire: a fused or in-place step falls back to calling the modules when they have hooks.
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
        if ssa is None:
            raise KeyError(name)
        if ssa not in env:
            keep = self._net.keep_blobs
            why = "; a torch.compile'd forward then keeps only inputs, outputs and loss tops" if keep == "auto" else ""
            raise KeyError(f"{name!r} was not kept by the last forward (net.keep_blobs is {keep!r}{why}; set it to "
                           f"True to keep every blob)")
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

    def __init__(self, graph: LayerGraph, *, seed: Optional[int] = None, device=None, fill_params: bool = True,
                 keep_blobs="auto"):
        super().__init__()
        self.graph = graph
        self.phase = graph.phase
        self._env = None
        self.keep_blobs = keep_blobs
        self._exec: dict = {}  # (keep_blobs resolved, grad enabled) -> execution plan
        self._exec_src = None
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
        self._build_exec()
        self.load_prototxt_blobs()
        if device is not None:
            self.to(device)

    # -- execution plan --------------------------------------------------------------------------------------
    @property
    def keep_blobs(self):
        return self._keep_blobs

    @keep_blobs.setter
    def keep_blobs(self, value) -> None:
        if not (value is True or value is False or value in ("all", "auto")):
            raise ValueError(f"keep_blobs must be 'auto', True, False or 'all', got {value!r}")
        self._keep_blobs = value

    def kept_blobs(self, grad: bool = True, keep=None) -> Optional[set]:
        """The single-assignment blob names a forward (with or without grad) leaves in ``_env`` (None: all);
        ``keep`` defaults to ``keep_blobs`` as an eager forward resolves it."""
        mode = self._keep_blobs if keep is None else keep
        mode = True if mode == "auto" else mode
        if mode == "all":
            return None
        graph = self.graph
        keep = set(self._input_names) | {ssa for _, ssa in self._outputs} | {ssa for ssa, _ in self._loss_terms}
        if mode:
            keep |= set(graph.blob_alias.values())
            if grad:
                keep |= {ssa for l in graph.layers for t, ssa in zip(l.caffe_tops, l.tops) if ssa == t}
        return keep

    def _build_exec(self) -> None:
        """Every execution plan a forward may pick (built ahead: a compiled forward must not build one)."""
        plan = list(self._plan)
        self._exec = {(keep, grad): self._exec_plan(plan, grad, keep)
                      for keep in (True, False, "all") for grad in (False, True)}
        self._exec_src = plan

    def execution_plan(self, grad: bool = True, keep=None) -> list:
        """The steps a forward runs (``keep`` defaults to ``keep_blobs`` as an eager forward resolves it)."""
        keep = self._keep_blobs if keep is None else keep
        if self._exec_src != self._plan:
            self._build_exec()
        return self._exec[(True if keep == "auto" else keep, bool(grad))]

    def _exec_plan(self, plan: list, grad: bool, keep_mode) -> list:
        """The execution plan for a forward with or without grad: steps ``(fn, bottoms, tops, detach, drop)``;
        ``fn`` None means the tops alias the single bottom; ``drop`` lists the blobs no later step reads (and
        not kept)."""
        from .layers.common import Eltwise, Op, Split
        from .layers.neuron import ReLU
        from .layers.norm import BatchNorm, BatchNormScale, Bias, GlobalBatchNorm, GlobalStatistics, Scale
        from .layers.vision import Convolution, InnerProduct

        keep = self.kept_blobs(grad, keep_mode)
        optimise = keep is not None
        reads: dict = {}
        for _, bottoms, _, _ in plan:
            for b in bottoms:
                reads[b] = reads.get(b, 0) + 1

        def private(ssa) -> bool:  # read by one layer only, and not kept after the forward
            return optimise and reads.get(ssa, 0) == 1 and ssa not in keep

        steps = []
        # the statistics of every use_global_stats BatchNorm, computed together by a first step
        global_bns = [] if not optimise else \
            [e[0] for e in plan if type(e[0]) is BatchNorm and e[0].global_stats and e[3] is None]
        stats_key = {id(bn): f"(statistics:{k})" for k, bn in enumerate(global_bns)}
        if global_bns:
            steps.append((GlobalStatistics(global_bns), (), tuple(stats_key.values()), None))
        fresh = set()  # blobs in new storage that their producer's backward does not read
        i = 0
        while i < len(plan):
            mod, bottoms, tops, detach = plan[i]
            fn, outs_fresh = mod, False
            if optimise and detach is None:
                nxt = plan[i + 1] if i + 1 < len(plan) else None
                stats = (stats_key[id(mod)],) if id(mod) in stats_key else ()
                if (type(mod) is BatchNorm and nxt is not None and nxt[3] is None and nxt[1] == tops
                        and private(tops[0])
                        and BatchNormScale.fusable(mod, nxt[0], self.graph.blob_shapes.get(bottoms[0]))):
                    steps.append((BatchNormScale(mod, nxt[0]), bottoms + stats, nxt[2], None))
                    fresh.update(nxt[2])
                    i += 2
                    continue
                if stats:
                    fn, bottoms = GlobalBatchNorm(mod), bottoms + stats
                if type(mod) is Split:
                    fn = None
                elif type(mod) is ReLU and bottoms[0] in fresh and private(bottoms[0]):
                    fn = mod.inplace
                elif isinstance(mod, (BatchNorm, Scale, Bias, Convolution, InnerProduct)):
                    outs_fresh = True
                elif type(mod) is Eltwise and mod.op == Op.SUM and len(bottoms) > 1:
                    outs_fresh = True
            if outs_fresh:
                fresh.update(tops)
            steps.append((fn, bottoms, tops, detach))
            i += 1
        last = {}
        for k, (_, bottoms, tops, _) in enumerate(steps):
            for t in tops:
                last.setdefault(t, k)
            for b in bottoms:
                last[b] = k
        drops = [[] for _ in steps]
        if keep is not None:
            for ssa, k in last.items():
                if ssa not in keep:
                    drops[k].append(ssa)
        return [(fn, bottoms, tops, detach, tuple(d) if d else None) for (fn, bottoms, tops, detach), d in
                zip(steps, drops)]

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
        keep = self._keep_blobs
        if torch.compiler.is_compiling():
            keep = False if keep == "auto" else keep
        else:
            keep = True if keep == "auto" else keep
            if self._exec_src != self._plan:
                self._build_exec()
        self._env = None  # the last forward's blobs are freed before this one allocates
        for fn, bottoms, tops, detach, drop in self._exec[(keep, torch.is_grad_enabled())]:
            # no local may hold a blob past its step: a freed blob's memory is what the next layer reuses
            if fn is None:
                for t in tops:
                    env[t] = env[bottoms[0]]
            elif detach is None and len(bottoms) == 1 and len(tops) == 1:
                out = fn(env[bottoms[0]])
                env[tops[0]] = out[0] if isinstance(out, (tuple, list)) else out
                out = None
            else:
                args = [env[b] for b in bottoms]
                if detach is not None:
                    args = [a.detach() if d else a for a, d in zip(args, detach)]
                out = fn(*args)
                args = None
                if len(tops) == 1:
                    env[tops[0]] = out[0] if isinstance(out, (tuple, list)) else out
                else:
                    for t, v in zip(tops, out):
                        env[t] = v
                    v = None
                out = None
            if drop is not None:
                for d in drop:
                    del env[d]
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
