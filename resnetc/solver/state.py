"""Snapshots and resume: ``PREFIX_iter_N.caffemodel`` + ``PREFIX_iter_N.solverstate`` (Caffe's formats).

The binary ``SolverState`` holds ``iter``, ``learned_net`` (the model path as written), the history blobs
(with ``shape``) and ``current_step``; the HDF5 variant (``snapshot_format: HDF5``) stores the same under
datasets ``iter``, ``learned_net``, ``current_step`` and group ``history``. Every file is written through
:mod:`resnetc.atomic`, so a crash never leaves a half-written snapshot.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

from ..atomic import atomic_path, write_bytes
from ..errors import ResnetcError
from ..proto import caffe_pb2


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def blob_bytes(t: torch.Tensor) -> bytes:
    """A BlobProto (``shape { dim }`` + packed float ``data``), encoded directly: protobuf's Python
    containers are slow for millions of floats."""
    arr = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()).astype("<f4", copy=False)
    dims = b"".join(_varint(int(d)) for d in arr.shape)
    shape = _field(1, dims) if dims else b""
    out = _field(7, shape) if arr.ndim else _varint((7 << 3) | 2) + _varint(0)
    if arr.size:
        out += _field(5, arr.tobytes())
    return out


def solverstate_bytes(it: int, learned_net: str, history: list, current_step: int) -> bytes:
    out = _varint(1 << 3) + _varint(it)
    out += _field(2, learned_net.encode("utf-8"))
    for h in history:
        out += _field(3, blob_bytes(h))
    out += _varint(4 << 3) + _varint(current_step)
    return out


def write_solverstate(path: str, it: int, learned_net: str, history: list, current_step: int) -> None:
    write_bytes(path, solverstate_bytes(it, learned_net, history, current_step))


def write_solverstate_h5(path: str, it: int, learned_net: str, history: list, current_step: int) -> None:
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("iter", data=np.array([it], np.int32))
            f.create_dataset("learned_net", data=learned_net.encode("utf-8"))
            f.create_dataset("current_step", data=np.array([current_step], np.int32))
            g = f.create_group("history")
            for i, h in enumerate(history):
                g.create_dataset(str(i), data=h.detach().cpu().numpy())


class RestoredState:
    def __init__(self, it: int, learned_net: str, history: list, current_step: int, exact_shapes: bool):
        self.iter = it
        self.learned_net = learned_net
        self.history = history  # [np.ndarray]
        self.current_step = current_step
        self.exact_shapes = exact_shapes  # HDF5 history must match the param shapes exactly


def read_solverstate(path: str) -> RestoredState:
    """Read a ``.solverstate`` (binary) or ``.solverstate.h5`` (chosen by the ``.h5`` ending, as Caffe)."""
    if not os.path.exists(path):
        raise ResnetcError("no such solver state file", file=path)
    if path.endswith(".h5"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                it = int(np.asarray(f["iter"]).reshape(-1)[0])
                ln = f["learned_net"][()]
                ln = ln.decode("utf-8") if isinstance(ln, bytes) else str(ln)
                cs = int(np.asarray(f["current_step"]).reshape(-1)[0]) if "current_step" in f else 0
                hist = [np.asarray(f["history"][str(i)], np.float32) for i in range(len(f["history"]))]
        except (OSError, KeyError) as e:
            raise ResnetcError(f"not a valid HDF5 solver state: {e}", file=path) from None
        return RestoredState(it, ln, hist, cs, True)
    from ..prototxt import read_binary

    st = read_binary(path, caffe_pb2.SolverState)
    hist = []
    for bp in st.history:
        if len(bp.double_data):
            arr = np.asarray(bp.double_data, np.float32)
        else:
            arr = np.asarray(bp.data, np.float32)
        if bp.HasField("shape"):
            shape = tuple(bp.shape.dim)
        else:
            shape = tuple(d for d in (bp.num, bp.channels, bp.height, bp.width))
        if int(np.prod(shape)) != arr.size:
            raise ResnetcError(f"history blob {len(hist)} has {arr.size} values for shape {shape}", file=path)
        hist.append(arr.reshape(shape))
    return RestoredState(st.iter, st.learned_net, hist, st.current_step, False)
