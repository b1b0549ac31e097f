"""pycaffe, on resnetc: ``from resnetc.compat import caffe`` and classic pycaffe scripts run unchanged.

What follows pycaffe (BVLC master ``python/caffe/pycaffe.py`` and ``_caffe.cpp``):

* ``caffe.Net(file, phase, level=0, stages=None, weights=None)`` and the legacy ``caffe.Net(file, weights,
  phase)``; ``phase`` is ``caffe.TRAIN``/``caffe.TEST``.
* Arrays are float32 numpy views: ``net.params[name][i].data`` *is* the model's parameter (writes reach the
  model, ``net.save`` writes them); ``net.blobs[input].data`` is the buffer the next ``forward()`` reads
  (``net.blobs['data'].data[...] = x; net.forward()``); any other blob's ``data`` is its value after the last
  forward (an in-place chain gives the final value, its ``diff`` the gradient at the chain's start, as Caffe's
  shared memory does). ``net.blobs`` is ordered as Caffe creates blobs (split blobs included), ``net.params``
  by layer.
* ``forward(**inputs)`` checks the inputs as pycaffe does and returns ``{output: array}``; nets with data
  layers read their next batch (a solver's nets read the solver's batches, as Caffe's share the data layers).
* ``backward()`` starts from the loss layers (top diff = loss weight) and from any diff written into an
  output blob; ``backward(**top_diffs)`` sets the output diffs first. Param diffs accumulate until
  ``clear_param_diffs()`` (Caffe's rule); input diffs exist only with ``force_backward``.
* ``caffe.SGDSolver(file)`` (and the other types) builds that solver type whatever the file's ``type`` says;
  ``caffe.get_solver(file)`` follows the file. ``solver.net`` / ``solver.test_nets`` are Nets over the
  solver's own nets: after ``solver.step(1)`` ``solver.net.blobs['loss'].data`` is that step's loss, and the
  test nets share the train weights from the first test pass on (``test_initialization``), as in Caffe.

A pycaffe call resnetc does not support raises :class:`UnsupportedCall` (a NotImplementedError) naming the
closest supported call.
"""
from __future__ import annotations

import collections
import difflib
import logging
import os

import numpy as np
import torch

from .. import netspec as _netspec
from ..proto import caffe_pb2
from . import caffe_io as io  # noqa: F401  (caffe.io)

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST
_PHASE_NAMES = {caffe_pb2.TRAIN: "TRAIN", caffe_pb2.TEST: "TEST"}

NetSpec = _netspec.NetSpec
layers = _netspec.layers
params = _netspec.params
to_proto = _netspec.to_proto

log = logging.getLogger("resnetc.compat")


class UnsupportedCall(NotImplementedError, AttributeError):
    """A pycaffe call resnetc's compatibility layer does not provide (also an AttributeError, so ``hasattr``
    answers False as it would for a missing attribute)."""


class _Mode:
    device = "cpu"
    seeds = None  # np.random.RandomState after set_random_seed: one filler seed per net created


def set_mode_cpu():
    _Mode.device = "cpu"


def set_mode_gpu():
    if torch.cuda.is_available():
        _Mode.device = f"cuda:{torch.cuda.current_device()}"
    else:
        log.warning("set_mode_gpu: CUDA is not available, running on the CPU")
        _Mode.device = "cpu"


def set_device(device_id: int):
    """Select the GPU used from now on (pycaffe: before ``set_mode_gpu``); harmless without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(device_id))
        if _Mode.device.startswith("cuda"):
            _Mode.device = f"cuda:{int(device_id)}"


def set_random_seed(seed: int):
    """Seed the fillers of the nets created from now on (and torch/numpy). Nets get distinct, reproducible
    filler streams; they are not Caffe's exact ones."""
    _Mode.seeds = np.random.RandomState(int(seed) & 0xFFFFFFFF)
    torch.manual_seed(int(seed))


def _next_seed():
    return None if _Mode.seeds is None else int(_Mode.seeds.randint(0, 2 ** 31 - 1))


def get_device_count() -> int:
    return torch.cuda.device_count()


def layer_type_list() -> list:
    from ..layers.registry import supported_types

    return supported_types()


# ------------------------------------------------------------------------------------------------------------
# host views of tensors


def _host_view(t: torch.Tensor, mirrors: dict) -> np.ndarray:
    """A numpy array of ``t`` whose writes reach ``t``: a view for CPU tensors; for device tensors a host copy
    written back before the next computation (Caffe's ``mutable_cpu_data``)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    arr = mirrors.get(id(t))
    if arr is None or arr[0] is not t:
        arr = (t, t.cpu().numpy())
        mirrors[id(t)] = arr
    return arr[1]


def _flush_mirrors(mirrors: dict) -> None:
    with torch.no_grad():
        for t, arr in mirrors.values():
            t.copy_(torch.from_numpy(arr))
    mirrors.clear()


class Blob:
    """A pycaffe blob: ``data`` / ``diff`` numpy arrays, ``shape``, ``count``, ``reshape``, legacy ``num`` ..."""

    def __init__(self, get_data, get_diff, reshape=None, what="blob"):
        self._get_data = get_data
        self._get_diff = get_diff
        self._reshape = reshape
        self._what = what

    @property
    def data(self) -> np.ndarray:
        return self._get_data()

    @data.setter
    def data(self, value):
        self._get_data()[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._get_diff()

    @diff.setter
    def diff(self, value):
        self._get_diff()[...] = value

    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    def _legacy(self, i):
        s = self.shape
        return s[i] if len(s) > i else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if self._reshape is None:
            _unsupported(f"Blob.reshape on {self._what}", "net.blobs[<input>].reshape(...)")
        self._reshape(tuple(int(d) for d in shape))

    def __repr__(self):
        return f"<caffe.Blob {self._what} shape={self.shape}>"


class _Layer:
    """An entry of ``net.layers``: ``type`` and ``blobs`` (its parameter blobs), as pycaffe's Layer."""

    def __init__(self, name, type_, blobs):
        self.name = name
        self.type = type_
        self.blobs = blobs

    def __repr__(self):
        return f"<caffe.Layer {self.name} ({self.type})>"


class _Inputs:
    """The host buffers of a net's Input-layer tops (what ``net.blobs[input].data`` is)."""

    def __init__(self, graph):
        self.buffers = collections.OrderedDict()
        for name in graph.inputs:
            shape = graph.shape(name)
            shape = tuple(d if d is not None else 1 for d in shape) if shape is not None else (1,)
            self.buffers[name] = np.zeros(shape, dtype=np.float32)


class _SolverFeed:
    """A solver net's batches: its data layers' pipeline plus the host buffers of its Input tops (so the
    classic ``solver.net.blobs['data'].data[...] = x; solver.step(1)`` works)."""

    def __init__(self, pipeline_feed, inputs: _Inputs, device):
        self.pipeline_feed = pipeline_feed
        self.inputs = inputs
        self.device = device
        self.pipelines = pipeline_feed.pipelines

    def __call__(self) -> dict:
        batch = self.pipeline_feed()
        for name, buf in self.inputs.buffers.items():
            batch[name] = torch.from_numpy(buf).to(self.device)
        return batch

    def top_shapes(self) -> dict:
        return self.pipeline_feed.top_shapes()

    def close(self) -> None:
        self.pipeline_feed.close()


# ------------------------------------------------------------------------------------------------------------
# Net


class Net:
    """``caffe.Net(network_file, phase, level=0, stages=None, weights=None)`` or the legacy
    ``caffe.Net(network_file, weights_file, phase)``."""

    def __init__(self, network_file, *args, phase=None, level=0, stages=None, weights=None, **kw):
        if kw:
            raise TypeError(f"Net() got unexpected keyword arguments {sorted(kw)}; pycaffe's are phase, level, "
                            f"stages, weights")
        rest = list(args)
        if len(rest) >= 2 and isinstance(rest[0], (str, bytes, os.PathLike)):  # legacy (file, weights, phase)
            if len(rest) > 2 or weights is not None:
                raise TypeError("legacy Net(network_file, weights_file, phase) takes exactly 3 arguments")
            weights, phase = rest
            rest = []
        if rest:
            if phase is not None:
                raise TypeError("Net() got phase twice")
            phase = rest.pop(0)
        if rest:
            level = rest.pop(0)
        if rest:
            stages = rest.pop(0)
        if rest:
            weights = rest.pop(0)
        if rest:
            raise TypeError("Net(network_file, phase, level=0, stages=None, weights=None)")
        if phase is None:
            raise TypeError("Net() needs a phase: caffe.Net(model, caffe.TEST, weights=...) or the legacy "
                            "caffe.Net(model, weights, caffe.TEST)")
        if phase not in _PHASE_NAMES:
            raise ValueError(f"phase must be caffe.TRAIN ({TRAIN}) or caffe.TEST ({TEST}), got {phase!r}")
        self._build(os.fsdecode(network_file), _PHASE_NAMES[phase], int(level), list(stages or ()),
                    os.fsdecode(weights) if weights is not None else None)

    def _build(self, path, phase, level, stages, weights):
        from ..graph import build_graph
        from ..net import CaffeNet
        from ..prototxt import read_net
        from ..solver.feeds import pipeline_feed

        src = read_net(path)
        graph = build_graph(src, phase, level=level, stages=stages)
        device = torch.device(_Mode.device)
        feed = None
        if graph.data_tops:
            feed = pipeline_feed(graph, seed=_next_seed(), device=device)
            if not graph.shapes_known:
                shapes = feed.top_shapes()
                if shapes:
                    graph = build_graph(src, phase, level=level, stages=stages, input_shapes=shapes)
        net = CaffeNet(graph, seed=_next_seed())
        if weights is not None:
            from ..weights import load_caffemodel

            load_caffemodel(net, weights)
        net.to(device)
        self._attach(net, feed, _Inputs(graph))

    @classmethod
    def _wrap(cls, net, feed, inputs: _Inputs) -> "Net":
        self = cls.__new__(cls)
        self._attach(net, feed, inputs)
        return self

    def _attach(self, net, feed, inputs: _Inputs):
        self._net = net
        self._feed = feed
        self._in = inputs
        self._device = next((p.device for p in net.parameters()), torch.device(_Mode.device))
        self._mirrors = {}
        self._diffs = {}  # Caffe name -> host diff array, valid for the env it was made for
        self._diffs_env = None
        self._backward_ran = False
        self._zeros = {}  # blob values before any forward

    # -- structure ------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> list:
        return list(self._net.graph.inputs)

    @property
    def outputs(self) -> list:
        return list(self._net.graph.outputs)

    @property
    def _blob_names(self) -> list:
        return [n for n in self._net.graph.blob_alias if not n.startswith("(automatic:")]

    @property
    def _layer_names(self) -> list:
        return [l.name for l in self._net.graph.layers]

    @property
    def blobs(self):
        out = collections.OrderedDict()
        for name in self._blob_names:
            if name in self._in.buffers:
                out[name] = Blob(lambda n=name: self._in.buffers[n], lambda n=name: self._blob_diff(n),
                                 lambda shape, n=name: self._reshape_input(n, shape), what=f"'{name}'")
            else:
                out[name] = Blob(lambda n=name: self._blob_data(n), lambda n=name: self._blob_diff(n),
                                 what=f"'{name}' (not an input)")
        return out

    @property
    def params(self):
        out = collections.OrderedDict()
        for layer, blobs in self._net.params.items():
            out[layer] = [Blob(lambda p=p: _host_view(p, self._mirrors), lambda p=p: self._param_diff(p),
                               what=f"param of '{layer}'") for p in blobs]
        return out

    @property
    def layers(self) -> list:
        params = self.params
        return [_Layer(l.name, l.type, params.get(l.name, [])) for l in self._net.graph.layers]

    @property
    def layer_dict(self):
        return collections.OrderedDict((l.name, l) for l in self.layers)

    @property
    def top_names(self):
        return collections.OrderedDict((l.name, [t for t in l.caffe_tops if not t.startswith("(automatic:")])
                                       for l in self._net.graph.layers)

    @property
    def bottom_names(self):
        return collections.OrderedDict((l.name, list(l.caffe_bottoms)) for l in self._net.graph.layers)

    @property
    def blob_loss_weights(self):
        weights = collections.OrderedDict((n, 0.0) for n in self._blob_names)
        for l in self._net.graph.layers:
            for name, w in zip(l.caffe_tops, l.loss_weights):
                if name in weights:
                    weights[name] = float(w)
        return weights

    @property
    def _blob_loss_weights(self) -> list:
        return list(self.blob_loss_weights.values())

    # -- forward / backward ---------------------------------------------------------------------------------
    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """Run the net (inputs from ``kwargs`` or the input blobs); returns ``{output: array}`` plus ``blobs``."""
        if start is not None or end is not None:
            _unsupported("Net.forward(start=..., end=...)", "Net.forward(**inputs) then read net.blobs")
        if kwargs:
            if set(kwargs) != set(self.inputs):
                raise ValueError("Input blob arguments do not match net inputs.")
            for name, value in kwargs.items():
                buf = self._in.buffers[name]
                if np.shape(value)[0] != buf.shape[0]:
                    raise ValueError("Input is not batch sized")
                buf[...] = value
        self._sync()
        feeds = self._feed() if self._feed is not None else {}
        graph = self._net.graph
        for name, buf in self._in.buffers.items():
            t = torch.from_numpy(buf).to(self._device)
            if graph.force_backward:
                t = t.detach().requires_grad_(True)
            feeds[name] = t
        want_grad = graph.force_backward or any(p.requires_grad for p in self._net.parameters())
        with torch.set_grad_enabled(want_grad):
            self._net(**feeds)
        if want_grad:
            for t in self._net._env.values():
                if torch.is_tensor(t) and t.requires_grad and not t.is_leaf:
                    t.retain_grad()
        self._backward_ran = False
        return {name: self._blob_data(name) for name in set(self.outputs) | set(blobs or ())}

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """Backpropagate the last forward: loss layers (diff = loss weight) plus output diffs (``kwargs`` or
        written into ``net.blobs[output].diff``). Returns ``{input: diff}`` plus ``diffs``."""
        if start is not None or end is not None:
            _unsupported("Net.backward(start=..., end=...)", "Net.backward(**top_diffs)")
        env = self._env()
        if env is None:
            raise RuntimeError("Net.backward() before Net.forward()")
        if kwargs:
            if set(kwargs) != set(self.outputs):
                raise ValueError("Top diff arguments do not match net outputs.")
            for name, value in kwargs.items():
                d = self._blob_diff(name)
                if np.shape(value)[0] != d.shape[0]:
                    raise ValueError("Diff is not batch sized")
                d[...] = value
        graph = self._net.graph
        ys, gs = [], []
        user = {name: self._diffs[name] for name in graph.outputs if name in self._diffs}
        for layer in graph.layers:
            for caffe_name, ssa, w in zip(layer.caffe_tops, layer.tops, layer.loss_weights):
                if w and caffe_name not in user:
                    ys.append(env[ssa])
                    gs.append(torch.full_like(env[ssa], float(w)))
        for name, d in user.items():
            if np.any(d):
                t = env[graph.blob_alias[name]]
                ys.append(t)
                gs.append(torch.from_numpy(np.ascontiguousarray(d)).to(t.device).reshape(t.shape))
        self._sync()
        for t in env.values():  # blob diffs are overwritten by each backward (param diffs accumulate)
            if torch.is_tensor(t) and (t.is_leaf or t.retains_grad) and t.grad is not None:
                t.grad = None
        pairs = [(y, g) for y, g in zip(ys, gs) if y.requires_grad]
        if pairs:
            torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs], retain_graph=True)
        self._backward_ran = True
        keep = {n: self._diffs[n] for n in user}
        self._diffs = keep
        return {name: self._blob_diff(name) for name in set(self.inputs) | set(diffs or ())}

    def forward_all(self, blobs=None, **kwargs):
        """Run ``kwargs`` (input name -> array of any length) through the net in batches; outputs stacked."""
        all_outs = {out: [] for out in set(self.outputs) | set(blobs or ())}
        n = len(next(iter(kwargs.values()))) if kwargs else 0
        for batch in self._batch(kwargs):
            outs = self.forward(blobs=blobs, **batch)
            for out, value in outs.items():
                all_outs[out].extend(value.copy())
        for out in all_outs:
            all_outs[out] = np.asarray(all_outs[out])[:n] if kwargs else np.asarray(all_outs[out])
        return all_outs

    def _batch(self, arrays):
        if not arrays:
            return
        num = len(next(iter(arrays.values())))
        batch_size = self._in.buffers[next(iter(self._in.buffers))].shape[0]
        for i in range(0, num - num % batch_size, batch_size):
            yield {name: np.asarray(a)[i:i + batch_size] for name, a in arrays.items()}
        rem = num % batch_size
        if rem:
            padded = {}
            for name, a in arrays.items():
                a = np.asarray(a)
                padded[name] = np.concatenate([a[-rem:], np.zeros((batch_size - rem,) + a.shape[1:], a.dtype)])
            yield padded

    def clear_param_diffs(self):
        for p in self._net.parameters():
            p.grad = None

    def reshape(self):
        """Caffe reshapes every layer on each forward; resnetc does too (kept for scripts that call it)."""

    def set_input_arrays(self, data, labels):
        """Hand arrays to the net's MemoryData layer (``labels`` may be 1-D)."""
        from ..data.pipeline import MemoryDataPipeline

        pipes = list(getattr(self._feed, "pipelines", {}).values()) if self._feed is not None else []
        first = self._net.graph.layers[0] if self._net.graph.layers else None
        if first is None or first.type != "MemoryData" or not pipes or not isinstance(pipes[0], MemoryDataPipeline):
            raise RuntimeError("set_input_arrays may only be called if the first layer is a MemoryDataLayer")
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = labels[:, None, None, None]
        pipes[0].reset(data, labels)

    # -- weights --------------------------------------------------------------------------------------------
    def save(self, filename):
        from ..weights import save_caffemodel

        self._sync()
        save_caffemodel(self._net, os.fsdecode(filename))

    def save_hdf5(self, filename):
        from ..weights import save_caffemodel_h5

        self._sync()
        save_caffemodel_h5(self._net, os.fsdecode(filename))

    def copy_from(self, filename):
        from ..weights import load_caffemodel

        self._sync()
        load_caffemodel(self._net, os.fsdecode(filename))

    load_hdf5 = copy_from

    def share_with(self, other: "Net"):
        """Caffe's ``ShareTrainedLayersWith``: this net's layers named like ``other``'s use its blobs."""
        self._sync()
        other._sync()
        for layer, blobs in self._net.params.items():
            src = other._net.params.get(layer)
            if src is None:
                continue
            if len(src) != len(blobs):
                raise ValueError(f"layer '{layer}' has {len(blobs)} blobs here, {len(src)} in the other net")
            for dst, s in zip(blobs, src):
                if dst.shape != s.shape:
                    raise ValueError(f"layer '{layer}': blob shape {tuple(dst.shape)} vs {tuple(s.shape)}")
                dst.data = s.data

    # -- internals ------------------------------------------------------------------------------------------
    def _sync(self):
        if self._mirrors:
            _flush_mirrors(self._mirrors)

    def _env(self):
        env = self._net._env
        if env is not self._diffs_env:
            self._diffs, self._diffs_env, self._backward_ran = {}, env, False
        return env

    def _reshape_input(self, name, shape):
        self._in.buffers[name] = np.zeros(shape, dtype=np.float32)

    def _blob_data(self, name):
        if name in self._in.buffers:
            return self._in.buffers[name]
        env = self._env()
        if env is None:
            if name not in self._zeros:
                shape = self._net.graph.shape(name)
                self._zeros[name] = np.zeros([d or 1 for d in shape] if shape else (), dtype=np.float32)
            return self._zeros[name]
        return _host_view(env[self._net.graph.blob_alias[name]], self._mirrors)

    def _blob_diff(self, name):
        env = self._env()
        d = self._diffs.get(name)
        if d is not None:
            return d
        t = None
        if env is not None:
            # Caffe's in-place layers share one diff: after backward it holds the gradient at the chain's start
            t = env.get(name, env.get(self._net.graph.blob_alias.get(name)))
        if (self._backward_ran and torch.is_tensor(t) and (t.is_leaf or t.retains_grad)
                and t.grad is not None):
            d = _host_view(t.grad, self._mirrors)
        else:
            shape = tuple(t.shape) if torch.is_tensor(t) else tuple(self._blob_data(name).shape)
            d = np.zeros(shape, dtype=np.float32)
        self._diffs[name] = d
        return d

    def _param_diff(self, p):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return _host_view(p.grad, self._mirrors)

    def __getattr__(self, name):
        _missing("Net", name, _NET_PYCAFFE, _public(Net))


# ------------------------------------------------------------------------------------------------------------
# Solvers


class _SolverBase:
    """A pycaffe solver over :class:`resnetc.solver.Solver` (Caffe's semantics, logs and snapshots)."""

    TYPE = None  # the update rule; None: the file's ``type``

    def __init__(self, filename):
        from ..prototxt import read_solver
        from ..solver import Solver
        from ..solver.core import default_snapshot_prefix

        path = os.fsdecode(filename)
        param = read_solver(path)
        default_snapshot_prefix(param, path)
        if self.TYPE is not None:  # pycaffe's caffe.SGDSolver(file) is an SGD solver whatever the file says
            param.ClearField("solver_type")
            param.type = self.TYPE
        self._feed_inputs = {}  # (phase, test index) -> _Inputs

        def feed_factory(graph, phase, index, seed, device):
            from ..solver.feeds import pipeline_feed

            inputs = _Inputs(graph)
            feed = _SolverFeed(pipeline_feed(graph, seed=seed, device=device), inputs, device)
            self._feed_inputs[(phase, index)] = inputs
            return feed

        self._solver = Solver(param, device=_Mode.device, solver_file=path, feed_factory=feed_factory)
        s = self._solver
        self.net = Net._wrap(s.net, s.train_feed, self._feed_inputs[("TRAIN", None)])
        self.test_nets = [Net._wrap(n, f, self._feed_inputs[("TEST", i)])
                          for i, (n, f) in enumerate(zip(s.test_nets, s.test_feeds))]

    @property
    def iter(self) -> int:
        return self._solver.iter

    @property
    def max_iter(self) -> int:
        return self._solver.param.max_iter

    @property
    def param(self):
        return self._solver.param

    def _sync(self):
        for n in [self.net] + self.test_nets:
            n._sync()

    def step(self, iters: int):
        self._sync()
        self._solver.step(int(iters))

    def solve(self, resume_file=None):
        self._sync()
        self._solver.solve(os.fsdecode(resume_file) if resume_file else None)

    def restore(self, state_file):
        self._sync()
        self._solver.restore(os.fsdecode(state_file))

    def snapshot(self):
        self._sync()
        self._solver.snapshot()

    def apply_update(self):
        self._sync()
        self._solver.apply_update()

    def share_weights(self, net: Net):
        """Share the train net's weights with ``net`` (Caffe's ``ShareTrainedLayersWith``)."""
        self._sync()
        net._sync()
        self._solver.share_weights(net._net)

    def __getattr__(self, name):
        _missing("Solver", name, _SOLVER_PYCAFFE, _public(_SolverBase))


class SGDSolver(_SolverBase):
    TYPE = "SGD"


class NesterovSolver(_SolverBase):
    TYPE = "Nesterov"


class AdaGradSolver(_SolverBase):
    TYPE = "AdaGrad"


class RMSPropSolver(_SolverBase):
    TYPE = "RMSProp"


class AdaDeltaSolver(_SolverBase):
    TYPE = "AdaDelta"


class AdamSolver(_SolverBase):
    TYPE = "Adam"


def get_solver(filename):
    """The solver of the type the file names (pycaffe's ``caffe.get_solver``)."""
    return _SolverBase(filename)


# ------------------------------------------------------------------------------------------------------------
# caffe.proto and what is not supported


class _ProtoModule:
    caffe_pb2 = caffe_pb2


proto = _ProtoModule()

# pycaffe names (BVLC master) resnetc does not provide, each with the closest supported call
_MODULE_PYCAFFE = {
    "Layer": "a registered resnetc layer type (resnetc.layers.registry.register)",
    "Classifier": "caffe.Net + caffe.io.Transformer (or `resnetc classify`)",
    "Detector": "caffe.Net + caffe.io.Transformer",
    "NCCL": "caffe.SGDSolver (one device)",
    "Timer": "`resnetc time`",
    "init_log": "logging.basicConfig",
    "log": "logging.getLogger('resnetc').info",
    "solver_count": "caffe.get_device_count",
    "set_solver_count": "caffe.set_device",
    "solver_rank": "caffe.set_device",
    "set_solver_rank": "caffe.set_device",
    "set_multiprocess": "caffe.set_mode_gpu",
    "has_nccl": "caffe.get_device_count",
    "draw": "`resnetc draw`",
}
_NET_PYCAFFE = {
    "forward_backward_all": "Net.forward_all then Net.backward",
    "_forward": "Net.forward",
    "_backward": "Net.backward",
    "_set_input_arrays": "Net.set_input_arrays",
    "_bottom_ids": "Net.bottom_names",
    "_top_ids": "Net.top_names",
    "_blobs": "Net.blobs",
    "_inputs": "Net.inputs",
    "_outputs": "Net.outputs",
    "before_forward": "Net.forward",
    "after_forward": "Net.forward",
    "before_backward": "Net.backward",
    "after_backward": "Net.backward",
    "set_mean": "caffe.io.Transformer.set_mean",
    "set_input_scale": "caffe.io.Transformer.set_input_scale",
    "set_channel_swap": "caffe.io.Transformer.set_channel_swap",
    "set_raw_scale": "caffe.io.Transformer.set_raw_scale",
    "preprocess": "caffe.io.Transformer.preprocess",
    "deprocess": "caffe.io.Transformer.deprocess",
}
_SOLVER_PYCAFFE = {
    "add_callback": "Solver.step",
    "test_all": "Solver.step (tests run every test_interval)",
}

_SUPPORTED = ["Net", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "io",
              "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
              "get_solver", "NetSpec", "layers", "params", "proto", "to_proto", "get_device_count",
              "layer_type_list"]


def _public(cls) -> list:
    return [n for n in dir(cls) if not n.startswith("_")]


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return match[0] if match else options[0]


def _unsupported(call: str, closest: str):
    raise UnsupportedCall(f"{call} is not supported by resnetc's pycaffe compatibility layer; the closest "
                          f"supported call is {closest}")


def _missing(owner: str, name: str, known: dict, supported: list):
    """A pycaffe name we lack -> UnsupportedCall naming the closest supported one; any other -> AttributeError."""
    if name in known:
        _unsupported(f"{owner}.{name}", known[name])
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"'{owner}' has no attribute '{name}' (in pycaffe or resnetc); did you mean "
                         f"{owner}.{_closest(name, supported)}?")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    prefix = "caffe."
    if name in _MODULE_PYCAFFE:
        _unsupported(prefix + name, _MODULE_PYCAFFE[name])
    raise AttributeError(f"module 'caffe' has no attribute '{name}' (in pycaffe or resnetc); did you mean "
                         f"{prefix}{_closest(name, _SUPPORTED)}?")
