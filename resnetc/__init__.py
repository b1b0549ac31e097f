"""resnetc: a Caffe-compatible declarative model compiler.

The public API (stable)::

    import resnetc
    net = resnetc.load_net("deploy.prototxt", weights="w.caffemodel", phase="TEST")
    outs = net(data=x)                    # {output blob: tensor}
    net.blobs["conv1"], net.params["conv1"][0]
    resnetc.load_caffemodel(net, "w.caffemodel"); resnetc.save_caffemodel(net, "out.caffemodel")
    resnetc.Solver, resnetc.export_onnx

Names are imported lazily so that ``import resnetc`` stays cheap (no torch until a net is built).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_net": "resnetc.net",
    "CaffeNet": "resnetc.net",
    "build_graph": "resnetc.graph",
    "LayerGraph": "resnetc.graph",
    "read_net": "resnetc.prototxt",
    "read_solver": "resnetc.prototxt",
    "ResnetcError": "resnetc.errors",
    "load_caffemodel": "resnetc.weights",
    "save_caffemodel": "resnetc.weights",
    "Solver": "resnetc.solver",
    "export_onnx": "resnetc.export",
    "InferenceSession": "resnetc.export",
    "NetSpec": "resnetc.netspec",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    mod = _API.get(name)
    if mod is None:
        raise AttributeError(f"module 'resnetc' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__():
    return sorted(list(globals()) + __all__)
