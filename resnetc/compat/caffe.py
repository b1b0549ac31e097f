"""pycaffe, on resnetc: ``from resnetc.compat import caffe`` and classic pycaffe scripts run unchanged.

Arrays are numpy, as in pycaffe. ``net.params[name][i].data`` is a view of the model's parameter (writes reach
the model); ``net.blobs[name].data`` of an input blob is the buffer the next ``forward()`` reads, as in pycaffe;
of any other blob, the value of the last forward. A call pycaffe has and we do not raises NotImplementedError
naming the closest supported call.
"""
from __future__ import annotations

import collections
import difflib
import logging
import os
import sys

import numpy as np
import torch

from ..errors import ResnetcError
from ..proto import caffe_pb2
from . import caffe_io as io  # noqa: F401  (caffe.io)

TRAIN = 0
TEST = 1
_PHASES = {TRAIN: "TRAIN", TEST: "TEST", "TRAIN": "TRAIN", "TEST": "TEST"}

log = logging.getLogger("resnetc.compat")


class _Mode:
    device = "cpu"


def set_mode_cpu():
    _Mode.device = "cpu"


def set_mode_gpu():
    if torch.cuda.is_available():
        _Mode.device = f"cuda:{torch.cuda.current_device()}"
    else:
        log.warning("set_mode_gpu: CUDA is not available, running on the CPU")
        _Mode.device = "cpu"


def set_device(device_id: int):
    if torch.cuda.is_available():
        torch.cuda.set_device(int(device_id))
        if _Mode.device.startswith("cuda"):
            _Mode.device = f"cuda:{int(device_id)}"


def set_random_seed(seed: int):
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) & 0xFFFFFFFF)


def get_device_count() -> int:  # pragma: no cover - trivial
    return torch.cuda.device_count()


# ------------------------------------------------------------------------------------------------------------


class Blob:
    """A pycaffe blob: ``data`` / ``diff`` numpy arrays, ``reshape``, ``shape``, ``count``, legacy accessors."""

    def __init__(self, get_data, get_diff=None, reshape=None):
        self._get_data = get_data
        self._get_diff = get_diff
        self._reshape = reshape

    @property
    def data(self) -> np.ndarray:
        return self._get_data()

    @data.setter
    def data(self, value):
        self._get_data()[...] = value

    @property
    def diff(self) -> np.ndarray:
        if self._get_diff is None:
            return np.zeros_like(self.data)
        return self._get_diff()

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

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
            raise ValueError("only input blobs can be reshaped; reshape the net's inputs and call forward()")
        self._reshape(tuple(int(d) for d in shape))


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        return t.cpu().numpy()
    return t.numpy()


class _Layer:
    def __init__(self, name, type_, blobs):
        self.name = name
        self.type = type_
        self.blobs = blobs


class Net:
    """``caffe.Net(model, [weights], phase)``, ``caffe.Net(model, phase, weights=...)``, ``phase=`` keyword."""

    def __init__(self, model, *args, weights=None, phase=None, level=None, stages=(), net=None):
        rest = list(args)
        if rest and isinstance(rest[0], (str, os.PathLike)):
            weights = rest.pop(0)
        if rest:
            phase = rest.pop(0)
        if rest:
            raise TypeError("Net(model, [weights], phase)")
        if phase is None and net is None:
            raise TypeError("Net() needs a phase: caffe.Net(model, caffe.TEST) or caffe.Net(model, weights, caffe.TEST)")
        if net is None:
            from ..net import load_net

            net = load_net(os.fspath(model), weights=os.fspath(weights) if weights else None,
                           phase=_PHASES[phase], level=level, stages=stages, device=_Mode.device)
        self._net = net
        self._device = next((p.device for p in net.parameters()), torch.device("cpu"))
        self._inputs = collections.OrderedDict()
        for name in net.inputs:
            shape = net.graph.shape(name)
            shape = tuple(d if d is not None else 1 for d in shape) if shape is not None else (1,)
            self._inputs[name] = np.zeros(shape, dtype=np.float32)
        self._input_tensors = {}
        self._last = None

    # -- pycaffe surface ------------------------------------------------------------------------------------
    @property
    def inputs(self):
        return list(self._net.inputs)

    @property
    def outputs(self):
        return list(self._net.outputs)

    @property
    def blobs(self):
        out = collections.OrderedDict()
        for name in self._inputs:
            out[name] = Blob(lambda n=name: self._inputs[n], lambda n=name: self._input_diff(n),
                             lambda shape, n=name: self._reshape_input(n, shape))
        order = list(self._net.graph.blob_alias)
        for name in order:
            if name in out:
                continue
            out[name] = Blob(lambda n=name: self._blob_data(n), lambda n=name: self._blob_diff(n))
        return out

    @property
    def params(self):
        out = collections.OrderedDict()
        for layer, blobs in self._net.params.items():
            out[layer] = [Blob(lambda p=p: _numpy_view(p), lambda p=p: self._param_diff(p)) for p in blobs]
        return out

    @property
    def layers(self):
        return [_Layer(l.name, l.type, self.params.get(l.name, [])) for l in self._net.graph.layers]

    @property
    def _layer_names(self):
        return [l.name for l in self._net.graph.layers]

    @property
    def layer_dict(self):
        return collections.OrderedDict((l.name, l) for l in self.layers)

    @property
    def top_names(self):
        return collections.OrderedDict((l.name, list(l.caffe_tops)) for l in self._net.graph.layers)

    @property
    def bottom_names(self):
        return collections.OrderedDict((l.name, list(l.caffe_bottoms)) for l in self._net.graph.layers)

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """Run the net; keyword arrays set the inputs first. Returns {output: array} (+ ``blobs`` requested)."""
        if start is not None or end is not None:
            _unsupported("Net.forward(start=..., end=...)", "Net.forward(**inputs)")
        for name, value in kwargs.items():
            if name not in self._inputs:
                raise ValueError(f"'{name}' is not an input blob (inputs: {list(self._inputs)})")
            value = np.asarray(value, dtype=np.float32)
            if value.shape != self._inputs[name].shape:
                if value.shape[1:] != self._inputs[name].shape[1:]:
                    raise ValueError(f"input '{name}' has shape {value.shape}, the blob {self._inputs[name].shape}")
                self._inputs[name] = value.copy()
            else:
                self._inputs[name][...] = value
        feeds = {}
        for name, arr in self._inputs.items():
            t = torch.from_numpy(arr.copy()).to(self._device)
            if t.is_floating_point():
                t.requires_grad_(True)
            feeds[name] = t
        self._input_tensors = feeds
        outs = self._net(**feeds)
        for t in (self._net._env or {}).values():
            if torch.is_tensor(t) and t.requires_grad and not t.is_leaf:
                t.retain_grad()
        self._last = outs
        result = {k: _numpy_view(v).copy() for k, v in outs.items()}
        for b in blobs or ():
            result[b] = self._blob_data(b).copy()
        return result

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """Backpropagate from the losses of the last forward (or from top diffs given by name)."""
        if start is not None or end is not None:
            _unsupported("Net.backward(start=..., end=...)", "Net.backward(**top_diffs)")
        if self._last is None:
            raise RuntimeError("backward() before forward()")
        for p in self._net.parameters():
            p.grad = None
        if kwargs:
            ys, gs = [], []
            for name, g in kwargs.items():
                t = self._net.blobs[name]
                ys.append(t)
                gs.append(torch.as_tensor(np.asarray(g, dtype=np.float32)).reshape(t.shape).to(t.device))
            torch.autograd.backward(ys, gs)
        else:
            loss = self._net.total_loss()
            if not loss.requires_grad:
                raise RuntimeError("the net has no loss to backpropagate; pass top diffs: net.backward(prob=diff)")
            loss.backward()
        result = {n: self._input_diff(n).copy() for n in self._inputs}
        for b in diffs or ():
            result[b] = self._blob_diff(b).copy()
        return result

    def save(self, path):
        from ..weights import save_caffemodel

        save_caffemodel(self._net, os.fspath(path))

    def copy_from(self, path):
        from ..weights import load_caffemodel

        load_caffemodel(self._net, os.fspath(path))

    def reshape(self):
        """Caffe reshapes on every forward; resnetc does too. Kept for scripts that call it."""

    def share_with(self, other: "Net"):
        for layer, blobs in self._net.params.items():
            src = other._net.params.get(layer)
            if src is None:
                continue
            for dst, s in zip(blobs, src):
                dst.data = s.data

    # -- internals ------------------------------------------------------------------------------------------
    def _reshape_input(self, name, shape):
        self._inputs[name] = np.zeros(shape, dtype=np.float32)

    def _input_diff(self, name):
        t = self._input_tensors.get(name)
        if t is None or t.grad is None:
            return np.zeros_like(self._inputs[name])
        return _numpy_view(t.grad)

    def _blob_data(self, name):
        if name in self._inputs:
            return self._inputs[name]
        if self._last is None:
            shape = self._net.graph.shape(name)
            return np.zeros([d or 1 for d in shape] if shape else (), dtype=np.float32)
        t = self._net.blobs[name]
        return _numpy_view(t)

    def _blob_diff(self, name):
        if name in self._inputs:
            return self._input_diff(name)
        if self._last is None:
            return np.zeros_like(self._blob_data(name))
        t = self._net.blobs[name]
        g = t.grad if t.requires_grad else None
        return _numpy_view(g) if g is not None else np.zeros(tuple(t.shape), dtype=np.float32)

    @staticmethod
    def _param_diff(p):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return _numpy_view(p.grad)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        _unsupported(f"Net.{name}", _closest(name, [n for n in dir(Net) if not n.startswith("_")], "Net."))


# ------------------------------------------------------------------------------------------------------------
# Solvers


class _SolverBase:
    TYPE = None

    def __init__(self, solver_file):
        from ..prototxt import read_solver
        from ..solver import Solver
        from ..solver.core import default_snapshot_prefix

        path = os.fspath(solver_file)
        param = read_solver(path)
        default_snapshot_prefix(param, path)
        if self.TYPE is not None:  # pycaffe's caffe.SGDSolver(file) is an SGD solver whatever the file says
            param.ClearField("solver_type")
            param.type = self.TYPE
        self._solver = Solver(param, device=_Mode.device, solver_file=path)
        self.net = Net(None, net=self._solver.net)
        self.test_nets = [Net(None, net=n) for n in self._solver.test_nets]

    @property
    def iter(self) -> int:
        return self._solver.iter

    def step(self, n: int = 1):
        self._solver.step(int(n))
        self.net._last = self._solver.net._env and {k: self._solver.net.blobs[k] for k in self._solver.net.outputs}

    def solve(self, resume_file=None):
        if resume_file:
            self._solver.restore(os.fspath(resume_file))
        self._solver.solve()

    def restore(self, path):
        self._solver.restore(os.fspath(path))

    def snapshot(self):
        self._solver.snapshot()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        _unsupported(f"Solver.{name}", _closest(name, ["step", "solve", "restore", "snapshot", "net", "test_nets",
                                                        "iter"], "Solver."))


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


def get_solver(solver_file):
    """The solver class named by the file's ``type`` (like pycaffe's ``caffe.get_solver``)."""
    s = _SolverBase.__new__(_SolverBase)
    _SolverBase.__init__(s, solver_file)
    return s


# ------------------------------------------------------------------------------------------------------------
# caffe.proto, NetSpec, layers, params


class _ProtoModule:
    caffe_pb2 = caffe_pb2


proto = _ProtoModule()


def _netspec():
    from .. import netspec

    return netspec


def __getattr__(name):
    if name in ("NetSpec", "layers", "params", "to_proto"):
        ns = _netspec()
        return {"NetSpec": ns.NetSpec, "layers": ns.layers, "params": ns.params,
                "to_proto": getattr(ns, "to_proto", None)}[name]
    _unsupported(f"caffe.{name}", _closest(name, _SUPPORTED, "caffe."))


_SUPPORTED = ["Net", "TRAIN", "TEST", "set_mode_cpu", "set_mode_gpu", "set_device", "set_random_seed", "io",
              "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver", "AdamSolver",
              "get_solver", "NetSpec", "layers", "params", "proto", "to_proto", "get_device_count"]


def _closest(name: str, options, prefix: str) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return prefix + match[0] if match else prefix + options[0]


def _unsupported(call: str, closest: str):
    raise NotImplementedError(f"{call} is not supported by resnetc's pycaffe compatibility layer; the closest "
                              f"supported call is {closest}")
