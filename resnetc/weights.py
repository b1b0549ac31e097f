"""Caffe weights I/O: ``.caffemodel`` (binary NetParameter), ``.caffemodel.h5``, and torch / safetensors
state dicts of ``{"<layer>/<blob index>": tensor}``.

Loading follows Caffe's ``Net::CopyTrainedLayersFrom`` (CAFFE_SEMANTICS.md §2): the format is detected from
the content; binary files are upgraded like a prototxt (V0/V1 nets, legacy 4-D blob dims load); each source
layer is matched by name to the *first* net layer of that name (HDF5: the last), unknown source layers are
logged and ignored, blob counts and shapes must agree. Unlike Caffe, which aborts half-way, everything is
read and checked first and only then copied, so a bad file never leaves a half-loaded net behind.

Memory: a binary file is read one top-level ``layer`` at a time (never the whole file as one bytes object
plus one parsed message); each blob becomes one float32 array and the layer's message is dropped. Peak
memory is the net plus one copy of its weights plus one layer in flight (``bench/weights_memory.py``).

Writing follows ``Net::ToProto`` (§2.3) and ``Net::ToHDF5`` (§2.4); files are written atomically.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from google.protobuf import message as _pb_message

from .atomic import atomic_path
from .errors import ResnetcError
from .proto import caffe_pb2

log = logging.getLogger("resnetc.weights")

__all__ = [
    "SourceBlob", "SourceLayer", "WeightsFile", "LoadResult", "read_weights", "read_caffemodel",
    "read_caffemodel_h5", "read_state_dict", "is_hdf5", "load_caffemodel", "load_weights",
    "blobproto_to_array", "check_blob_shape", "layer_to_proto", "net_to_proto", "graph_to_proto",
    "save_caffemodel", "save_caffemodel_h5", "save_state_dict", "weights_format",
]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# What a weights file holds, independent of its format


@dataclasses.dataclass
class SourceBlob:
    """One parameter blob as stored in a file: flat float32 values and the shape the file gives."""

    data: np.ndarray  # float32, 1-D
    shape: Optional[tuple] = None  # BlobShape dims (V2), or the dataset/tensor shape
    legacy: Optional[tuple] = None  # (num, channels, height, width) when the file uses legacy 4-D dims
    diff: Optional[np.ndarray] = None

    def describe(self) -> str:
        if self.legacy is not None:
            return f"{_fmt(self.legacy)} (legacy num/channels/height/width; {self.data.size} values)"
        return f"{_fmt(self.shape)} ({self.data.size} values)"

    def natural_shape(self) -> tuple:
        """The shape Caffe gives a blob read from this proto with reshape (legacy dims -> 4 axes)."""
        return tuple(self.legacy) if self.legacy is not None else tuple(self.shape)


@dataclasses.dataclass
class SourceLayer:
    name: str
    blobs: list  # [SourceBlob]
    type: str = ""


@dataclasses.dataclass
class WeightsFile:
    """The layers of a weights file, in file order.

    ``format`` is ``caffemodel``, ``h5``, ``pt`` or ``safetensors``. For a binary ``.caffemodel``, ``net`` is
    the file's NetParameter (upgraded, blobs removed: they are in ``layers``)."""

    path: str
    format: str
    layers: list  # [SourceLayer]
    net: Optional[caffe_pb2.NetParameter] = None
    upgrade_log: list = dataclasses.field(default_factory=list)


class LoadResult(tuple):
    """``(copied, skipped)``: net layers that received values from the file, and source layers that match no
    net layer (Caffe's "Ignoring source layer"). ``.missing``: net layers with parameters absent from the
    file (they keep their initial values, as when Caffe fine-tunes)."""

    def __new__(cls, copied: list, skipped: list, missing: list):
        self = super().__new__(cls, (copied, skipped))
        self.copied, self.skipped, self.missing = copied, skipped, missing
        return self


def _fmt(shape) -> str:
    if shape is None:
        return "?"
    return "x".join(str(int(d)) for d in shape) if len(shape) else "scalar"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ----------------------------------------------------------------------------------------------------------
# Format detection


def is_hdf5(path: str) -> bool:
    """``H5Fis_hdf5``: the HDF5 signature at offset 0, 512, 1024, 2048, ..."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def weights_format(path: str, *, for_writing: bool = False) -> str:
    """``caffemodel`` / ``h5`` / ``pt`` / ``safetensors``. Existing files are told apart by content (Caffe
    checks for HDF5 by content too); names decide for files to be written."""
    name = os.path.basename(os.fspath(path)).lower()
    by_name = None
    if name.endswith((".h5", ".hdf5")):
        by_name = "h5"
    elif name.endswith((".pt", ".pth")):
        by_name = "pt"
    elif name.endswith(".safetensors"):
        by_name = "safetensors"
    elif name.endswith((".caffemodel", ".binaryproto", ".pb")):
        by_name = "caffemodel"
    if for_writing:
        if by_name is None:
            raise ResnetcError("unknown weights format: name it .caffemodel, .caffemodel.h5, .pt or .safetensors",
                               file=path)
        return by_name
    if not os.path.exists(path):
        raise ResnetcError("no such file", file=path)
    if os.path.isdir(path):
        raise ResnetcError("is a directory, expected a weights file", file=path)
    if is_hdf5(path):
        return "h5"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        return "pt"  # torch.save's zip container
    if by_name == "safetensors":
        return "safetensors"
    return "caffemodel"


# ----------------------------------------------------------------------------------------------------------
# Binary .caffemodel, read one top-level field at a time

_NET_LAYER = 100  # NetParameter.layer (LayerParameter)
_NET_LAYERS = 2  # NetParameter.layers (V1LayerParameter, possibly wrapping a V0LayerParameter)


class _Truncated(Exception):
    pass


def _read_varint(f) -> Optional[int]:
    """A base-128 varint from the stream; None at a clean end of file."""
    result = shift = 0
    first = True
    while True:
        b = f.read(1)
        if not b:
            if first:
                return None
            raise _Truncated()
        first = False
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _blob_from_proto(bp) -> SourceBlob:
    legacy = None
    if bp.HasField("num") or bp.HasField("channels") or bp.HasField("height") or bp.HasField("width"):
        legacy = (bp.num, bp.channels, bp.height, bp.width)
    shape = tuple(bp.shape.dim)
    if len(bp.double_data):
        data = np.array(bp.double_data, dtype=np.float64).astype(np.float32)
    else:
        data = np.array(bp.data, dtype=np.float32)
    diff = None
    if len(bp.double_diff):
        diff = np.array(bp.double_diff, dtype=np.float64).astype(np.float32)
    elif len(bp.diff):
        diff = np.array(bp.diff, dtype=np.float32)
    return SourceBlob(data=data, shape=shape, legacy=legacy, diff=diff)


def blobproto_to_array(bp) -> np.ndarray:
    """A BlobProto's values as a float32 array (``double_data`` when present, as Caffe), shaped by the proto
    (legacy dims give 4 axes); flat when the proto's shape does not account for its values."""
    blob = _blob_from_proto(bp)
    shape = blob.natural_shape()
    return blob.data.reshape(shape) if _numel(shape) == blob.data.size else blob.data


def _take_blobs(layer_msg, is_v1: bool) -> list:
    """Move the blobs out of a parsed layer message into SourceBlobs (the message keeps no values)."""
    blobs = [_blob_from_proto(bp) for bp in layer_msg.blobs]
    layer_msg.ClearField("blobs")
    if is_v1 and layer_msg.HasField("layer"):  # a V0 layer wrapped in a V1 connection
        if not blobs:
            blobs = [_blob_from_proto(bp) for bp in layer_msg.layer.blobs]
        layer_msg.layer.ClearField("blobs")
    return blobs


def _raw_layer_name(layer_msg, is_v1: bool) -> str:
    if is_v1 and not layer_msg.name and layer_msg.HasField("layer"):
        return layer_msg.layer.name
    return layer_msg.name


def _looks_like_text(head: bytes) -> bool:
    return bool(re.match(rb"\s*(#|[A-Za-z_][A-Za-z0-9_]*\s*[:{])", head))


def read_caffemodel(path: str, *, upgrade: bool = True) -> WeightsFile:
    """Read a binary NetParameter weights file (V2, V1 or V0), upgraded to V2; blobs become SourceBlobs."""
    from . import upgrade as _upgrade

    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        f = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise ResnetcError("no such file", file=path) from None
    except OSError as e:
        raise ResnetcError(f"cannot read: {e.strerror}", file=path) from None
    if size == 0:
        f.close()
        raise ResnetcError("empty file: not a .caffemodel", file=path)
    skeleton = io.BytesIO()  # every top-level field, layers without their blobs
    raw: list = []  # (name, [SourceBlob]) per source layer, in file order
    index = 0
    with f:
        head = f.peek(64)[:64]
        try:
            while True:
                tag = _read_varint(f)
                if tag is None:
                    break
                field, wire = tag >> 3, tag & 7
                if field == 0:
                    raise ValueError("field number 0")
                if wire == 0:
                    payload = _varint_bytes(_read_varint_strict(f))
                elif wire == 1:
                    payload = _read_exact(f, 8)
                elif wire == 5:
                    payload = _read_exact(f, 4)
                elif wire == 2:
                    n = _read_varint_strict(f)
                    if n > size - f.tell():
                        raise _Truncated(f"a field of {n} bytes at byte {f.tell()} runs past the end of the "
                                         f"{size}-byte file")
                    data = _read_exact(f, n)
                    if field in (_NET_LAYER, _NET_LAYERS):
                        is_v1 = field == _NET_LAYERS
                        msg = (caffe_pb2.V1LayerParameter if is_v1 else caffe_pb2.LayerParameter)()
                        msg.ParseFromString(data)
                        del data
                        blobs = _take_blobs(msg, is_v1)
                        raw.append((_raw_layer_name(msg, is_v1), blobs))
                        data = msg.SerializeToString()
                        index += 1
                    payload = _varint_bytes(len(data)) + data
                else:
                    raise ValueError(f"invalid wire type {wire} for field {field}")
                skeleton.write(_varint_bytes(tag))
                skeleton.write(payload)
        except _Truncated as e:
            detail = f" ({e})" if str(e) else ""
            raise ResnetcError(f"truncated or corrupt file: it ends inside layer {index + 1}{detail}; the "
                               f".caffemodel is incomplete", file=path) from None
        except (_pb_message.DecodeError, ValueError, RuntimeError, OverflowError) as e:
            hint = (" (it looks like a text prototxt; weights are binary)" if _looks_like_text(head) else
                    " (truncated, corrupt, or not a .caffemodel)")
            raise ResnetcError(f"not a valid binary NetParameter near layer {index + 1}: {e}{hint}",
                               file=path) from None
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(skeleton.getvalue())
    except (_pb_message.DecodeError, ValueError, RuntimeError) as e:
        raise ResnetcError(f"not a valid binary NetParameter: {e} (truncated, corrupt, or not a .caffemodel)",
                           file=path) from None
    if not raw and not len(net.layer) and not len(net.layers):
        raise ResnetcError("not a .caffemodel: the file holds no layers", file=path)
    upgrade_log = []
    if upgrade:
        upgrade_log = _upgrade.upgrade_net(net, path) or []
    layers = _reattach(net, raw, path)
    return WeightsFile(path=path, format="caffemodel", layers=layers, net=net, upgrade_log=upgrade_log)


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Truncated()
    return data


def _read_varint_strict(f) -> int:
    v = _read_varint(f)
    if v is None:
        raise _Truncated()
    return v


def _reattach(net, raw: list, path: str) -> list:
    """Pair the upgraded layers with the blobs taken from the raw ones (the upgrade keeps layer order and
    names; V0 padding layers, which have no blobs, may disappear)."""
    upgraded = net.layer if len(net.layer) else net.layers
    layers = []
    k = 0
    for lp in upgraded:
        name = lp.name
        while k < len(raw) and raw[k][0] != name:
            if raw[k][1]:
                raise ResnetcError(f"internal: upgrading the file dropped layer '{raw[k][0]}', which has weights",
                                   file=path)
            k += 1
        if k == len(raw):
            raise ResnetcError(f"internal: upgraded layer '{name}' has no source layer", file=path)
        layers.append(SourceLayer(name=name, blobs=raw[k][1], type=lp.type if hasattr(lp, "type") else ""))
        k += 1
    return layers


# ----------------------------------------------------------------------------------------------------------
# HDF5 (.caffemodel.h5) and state dicts


def _import_h5py(path: str, writing: bool = False):
    try:
        import h5py
    except ImportError:
        verb = "writing" if writing else "reading"
        raise ResnetcError(f"{verb} an HDF5 weights file needs the h5py package (pip install h5py)",
                           file=path) from None
    return h5py


def read_caffemodel_h5(path: str) -> WeightsFile:
    """``/data/<layer>/<i>`` datasets (Caffe's ``ToHDF5`` layout); ``/diff`` is read too when present."""
    h5py = _import_h5py(path)
    layers = []
    try:
        with h5py.File(path, "r") as h5:
            if "data" not in h5 or not isinstance(h5["data"], h5py.Group):
                raise ResnetcError("HDF5 file without a /data group: not Caffe weights (.caffemodel.h5)", file=path)
            diff = h5.get("diff")
            for name in h5["data"]:  # h5py iterates by name, like Caffe's H5_INDEX_NAME
                group = h5["data"][name]
                if not isinstance(group, h5py.Group):
                    raise ResnetcError(f"/data/{name} is not a group", file=path, layer=name)
                blobs = {}
                for key in group:
                    if not key.isdigit():
                        raise ResnetcError(f"dataset /data/{name}/{key} is not a blob index", file=path, layer=name)
                    ds = group[key]
                    if ds.dtype.kind not in "fiu":
                        raise ResnetcError(f"dataset /data/{name}/{key} has type {ds.dtype}, not numbers",
                                           file=path, layer=name)
                    arr = np.asarray(ds[()], dtype=np.float32)
                    d = None
                    if diff is not None and name in diff and key in diff[name]:
                        d = np.asarray(diff[name][key][()], dtype=np.float32).reshape(-1)
                    blobs[int(key)] = SourceBlob(data=arr.reshape(-1), shape=tuple(arr.shape), diff=d)
                layers.append(SourceLayer(name=name, blobs=[blobs.get(i) for i in range(max(blobs, default=-1) + 1)]))
    except ResnetcError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ResnetcError(f"cannot read HDF5 weights (truncated or corrupt file?): {e}", file=path) from None
    return WeightsFile(path=path, format="h5", layers=layers)


_KEY_RE = re.compile(r"^(.*)/(\d+)$")


def _layers_from_dict(items, path: str, fmt: str) -> WeightsFile:
    by_layer: dict = {}
    for key, arr in items:
        m = _KEY_RE.match(key)
        if not m:
            raise ResnetcError(f"key '{key}' is not '<layer>/<blob index>'", file=path)
        by_layer.setdefault(m.group(1), {})[int(m.group(2))] = arr
    layers = []
    for name, blobs in by_layer.items():
        n = max(blobs) + 1
        out = []
        for i in range(n):
            a = blobs.get(i)
            if a is None:
                out.append(None)
                continue
            a = np.ascontiguousarray(a, dtype=np.float32)
            out.append(SourceBlob(data=a.reshape(-1), shape=tuple(a.shape)))
        layers.append(SourceLayer(name=name, blobs=out))
    return WeightsFile(path=path, format=fmt, layers=layers)


def read_state_dict(path: str, fmt: str) -> WeightsFile:
    """A ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` dict ``{"<layer>/<i>": tensor}``."""
    if fmt == "safetensors":
        st = _import_safetensors(path)
        try:
            tensors = st.load_file(path)
        except Exception as e:  # the Rust reader raises its own error types
            raise ResnetcError(f"cannot read safetensors file (truncated or corrupt?): {e}", file=path) from None
        items = list(tensors.items())
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # zip / unpickler errors of many types
            raise ResnetcError(f"cannot read torch weights (truncated, corrupt, or not a state dict): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=path) from None
        if not isinstance(obj, Mapping):
            raise ResnetcError(f"expected a dict of tensors, found {type(obj).__name__}", file=path)
        items = []
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise ResnetcError(f"entry {k!r} is not '<layer>/<i>': tensor", file=path)
            items.append((k, v.detach().to(torch.float32).numpy()))
    return _layers_from_dict(items, path, fmt)


def _import_safetensors(path: str):
    try:
        import safetensors.numpy as st
    except ImportError:
        raise ResnetcError(".safetensors files need the safetensors package (pip install safetensors)",
                           file=path) from None
    return st


def read_weights(path: str) -> WeightsFile:
    path = os.fspath(path)
    fmt = weights_format(path)
    if fmt == "h5":
        return read_caffemodel_h5(path)
    if fmt in ("pt", "safetensors"):
        return read_state_dict(path, fmt)
    return read_caffemodel(path)


# ----------------------------------------------------------------------------------------------------------
# Shape rules and the copy plan


def _fits_binary(blob: SourceBlob, target: tuple) -> bool:
    """Caffe's ``Blob::ShapeEquals``: legacy dims match the target left-padded with 1s to 4 axes."""
    if blob.legacy is not None:
        return len(target) <= 4 and tuple(blob.legacy) == (1,) * (4 - len(target)) + tuple(target)
    return tuple(blob.shape) == tuple(target)


def _fits_named(blob: SourceBlob, target: tuple) -> bool:
    """State dicts converted from legacy files carry 4-D shapes: allow those the same leniency."""
    if tuple(blob.shape) == tuple(target):
        return True
    return len(blob.shape) == 4 and len(target) <= 4 and tuple(blob.shape) == (1,) * (4 - len(target)) + tuple(target)


def _mismatch(path, layer, i, blob: SourceBlob, target: tuple, what="shape mismatch") -> ResnetcError:
    return ResnetcError(
        f"cannot copy blob {i} from the file: {what}: the file has {blob.describe()}, the net's layer needs "
        f"{_fmt(target)} ({_numel(target)} values). To initialise this layer from its fillers instead of "
        f"the file, rename the layer", file=path, layer=layer.name, layer_type=layer.type)


def check_blob_shape(bp, param_tensor, layer_name: str, blob_index: int, file: Optional[str]) -> None:
    """Check a BlobProto (written in a prototxt or a weights file) against its parameter: Caffe's shape rule
    and the value count. Raises ResnetcError naming file, layer, blob index and both shapes."""
    blob = _blob_from_proto(bp)
    target = tuple(param_tensor.shape)
    if not _fits_binary(blob, target):
        raise ResnetcError(f"cannot copy blob {blob_index}: shape mismatch: the file has {blob.describe()}, the "
                           f"layer needs {_fmt(target)} ({_numel(target)} values). To initialise this layer from "
                           f"its fillers instead, rename the layer", file=file, layer=layer_name)
    if blob.data.size != _numel(target):
        raise ResnetcError(f"blob {blob_index} has {blob.data.size} values, its shape {_fmt(target)} needs "
                           f"{_numel(target)} (truncated or corrupt blob)", file=file, layer=layer_name)


def _graph_of(net):
    return net.graph


def _plan(graph, params: Mapping, wf: WeightsFile, strict_shapes: bool) -> tuple:
    """Match source layers to net layers and check everything; returns (plan, copied, skipped).

    plan: [(target tensor, SourceBlob)] in copy order."""
    path = wf.path
    first, last = {}, {}
    for layer in graph.layers:
        first.setdefault(layer.name, layer)
        last[layer.name] = layer
    index = last if wf.format == "h5" else first  # Caffe: HDF5 uses layer_names_index_ (last wins)
    plan, copied, skipped = [], [], []
    for src in wf.layers:
        layer = index.get(src.name)
        if layer is None:
            if wf.format in ("pt", "safetensors"):  # not Caffe's format: every key is a weight to place
                raise ResnetcError(f"the file has weights for layer '{src.name}', which the net does not have "
                                   f"(net layers with parameters: {_names_with_params(graph, params)})",
                                   file=path, layer=src.name)
            log.info("Ignoring source layer %s", src.name)
            skipped.append(src.name)
            continue
        targets = list(params.get(layer.name, ())) if layer.blobs else []
        n_src = len(src.blobs)
        if wf.format == "h5":
            if n_src > len(targets):
                raise ResnetcError(f"incompatible number of blobs: the file has {n_src}, the net's layer has "
                                   f"{len(targets)}", file=path, layer=layer.name, layer_type=layer.type)
        elif n_src != len(targets):
            raise ResnetcError(f"incompatible number of blobs: the file has {n_src}, the net's layer has "
                               f"{len(targets)}. To initialise this layer from its fillers instead, rename the layer",
                               file=path, layer=layer.name, layer_type=layer.type)
        for i, tensor in enumerate(targets):
            blob = src.blobs[i] if i < n_src else None
            target = tuple(tensor.shape)
            if blob is None:
                shared = layer.shared_from[i] if i < len(layer.shared_from) else None
                if wf.format != "caffemodel" and shared is not None:
                    continue  # HDF5 stores owners only: a missing shared blob is fine
                raise ResnetcError(f"blob {i} is missing from the file (the net's layer has {len(targets)} blobs)",
                                   file=path, layer=layer.name, layer_type=layer.type)
            if wf.format == "caffemodel":
                fits = _fits_binary(blob, target)
            elif wf.format == "h5":
                fits = tuple(blob.shape) == target
            else:
                fits = _fits_named(blob, target)
            if not fits and (strict_shapes or blob.data.size != _numel(target)):
                raise _mismatch(path, layer, i, blob, target)
            if blob.data.size != _numel(target):
                raise _mismatch(path, layer, i, blob, target,
                                what="value count does not match (truncated or corrupt blob?)")
            if blob.diff is not None and blob.diff.size != _numel(target):
                raise _mismatch(path, layer, i, blob, target, what=f"its diff has {blob.diff.size} values")
            plan.append((tensor, blob))
        if targets and layer.name not in copied:
            copied.append(layer.name)
    with_weights = [src.name for src in wf.layers if any(b is not None for b in src.blobs)]
    if with_weights and not copied and params:
        shown = ", ".join(with_weights[:8]) + (", ..." if len(with_weights) > 8 else "")
        raise ResnetcError(f"no layer with weights in the file matches a layer of the net by name (file: {shown}; "
                           f"net: {_names_with_params(graph, params)}): wrong weights for this net?", file=path)
    return plan, copied, skipped


def _names_with_params(graph, params) -> str:
    names = [layer.name for layer in graph.layers if layer.blobs and layer.name in params]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none"


def _copy(plan: list) -> None:
    """Copy planned values into the net, dropping each source array once copied."""
    with torch.no_grad():
        for k in range(len(plan)):
            tensor, blob = plan[k]
            plan[k] = None
            src = torch.from_numpy(blob.data).reshape(tensor.shape)
            tensor.copy_(src)
            if blob.diff is not None:
                d = torch.from_numpy(blob.diff).reshape(tensor.shape).to(tensor.device, tensor.dtype)
                if tensor.grad is None:
                    tensor.grad = d.clone()
                else:
                    tensor.grad.copy_(d)
            blob.data = blob.diff = None


def load_weights(graph, params: Mapping, wf: WeightsFile, *, strict_shapes: bool = True) -> LoadResult:
    """Copy a read WeightsFile into ``params`` ({layer name: [tensor]}) of ``graph``; all-or-nothing."""
    plan, copied, skipped = _plan(graph, params, wf, strict_shapes)
    _copy(plan)
    wf.layers = []  # values now live in the net only
    have = set(copied)
    missing = [layer.name for layer in graph.layers if layer.blobs and layer.name in params and
               layer.name not in have]
    missing = list(dict.fromkeys(missing))
    if missing:
        log.warning("%d layer(s) with parameters are not in %s and keep their initial (filler) values: %s",
                    len(missing), wf.path, ", ".join(missing))
    log.debug("Copied weights of %d layer(s) from %s", len(copied), wf.path)
    return LoadResult(copied, skipped, missing)


def load_caffemodel(net, path, *, strict_shapes: bool = True) -> LoadResult:
    """Copy weights from ``path`` into ``net`` by layer name (Caffe's ``CopyTrainedLayersFrom``).

    ``path`` may be a binary .caffemodel (V2/V1/V0), a .caffemodel.h5 (detected by content), or a .pt /
    .safetensors state dict. Returns ``(copied, skipped)`` (a :class:`LoadResult`; ``.missing`` lists net
    layers not in the file). ``strict_shapes=False`` accepts a blob whose shape differs but whose value
    count is the same (values are reshaped). Nothing is copied unless every blob fits."""
    wf = read_weights(os.fspath(path))
    return load_weights(_graph_of(net), net.params, wf, strict_shapes=strict_shapes)


# ----------------------------------------------------------------------------------------------------------
# Writing


def layer_to_proto(layer) -> caffe_pb2.LayerParameter:
    """The layer's LayerParameter as Caffe's ``layer_param_`` holds it after setup (§1.11), without blobs:
    phase filled (by the graph), ``loss_weight: 1`` added to loss layers that gave none, BatchNorm's
    ``param { lr_mult: 0 }`` appended for each blob without a spec."""
    lp = caffe_pb2.LayerParameter()
    lp.CopyFrom(layer.param)
    lp.ClearField("blobs")
    if layer.spec is not None and layer.spec.loss and not len(lp.loss_weight):
        lp.loss_weight.append(1.0)
    if layer.type == "BatchNorm":
        for _ in range(len(lp.param), len(layer.blobs or ())):
            lp.param.add().lr_mult = 0.0
    return lp


def _blob_bytes(values: np.ndarray, shape: Sequence, diff: Optional[np.ndarray]) -> bytes:
    """A serialized BlobProto (``shape`` + packed float ``data`` [+ ``diff``]) built without a Python loop."""
    out = bytearray()
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    if data:
        out += b"\x2a" + _varint_bytes(len(data)) + data  # field 5, length-delimited (packed)
    if diff is not None:
        d = np.ascontiguousarray(diff, dtype="<f4").tobytes()
        if d:
            out += b"\x32" + _varint_bytes(len(d)) + d  # field 6
    bs = caffe_pb2.BlobShape()
    bs.dim.extend(int(x) for x in shape)
    sb = bs.SerializeToString()
    out += b"\x3a" + _varint_bytes(len(sb)) + sb  # field 7 (always present, even for a scalar)
    return bytes(out)


def _tensor_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _layer_with_blobs(layer, tensors, write_diff: bool) -> caffe_pb2.LayerParameter:
    lp = layer_to_proto(layer)
    for t in tensors:
        diff = None
        if write_diff:
            diff = _tensor_np(t.grad) if t.grad is not None else np.zeros(tuple(t.shape), np.float32)
        lp.blobs.add().MergeFromString(_blob_bytes(_tensor_np(t), tuple(t.shape), diff))
    return lp


def _iter_layers(graph, params, write_diff):
    for layer in graph.layers:
        tensors = params.get(layer.name, ()) if layer.blobs else ()
        yield _layer_with_blobs(layer, tensors, write_diff)


def graph_to_proto(graph, params: Mapping, *, write_diff: bool = False) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    net.name = graph.name
    for lp in _iter_layers(graph, params, write_diff):
        net.layer.add().CopyFrom(lp)
    return net


def net_to_proto(net, *, write_diff: bool = False) -> caffe_pb2.NetParameter:
    """Caffe's ``Net::ToProto``: the net's name and one ``layer`` per net layer (Split layers included)."""
    return graph_to_proto(net.graph, net.params, write_diff=write_diff)


def _write_stream(path: str, name: str, layers) -> None:
    """Write a NetParameter field by field (same bytes as serializing it whole, one layer in memory)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            if name:
                nb = name.encode("utf-8")
                f.write(b"\x0a" + _varint_bytes(len(nb)) + nb)
            tag = _varint_bytes((_NET_LAYER << 3) | 2)
            for lp in layers:
                data = lp.SerializeToString()
                f.write(tag + _varint_bytes(len(data)))
                f.write(data)
            f.flush()
            os.fsync(f.fileno())


def save_graph_caffemodel(graph, params: Mapping, path: str, *, write_diff: bool = False) -> None:
    _write_stream(os.fspath(path), graph.name, _iter_layers(graph, params, write_diff))


def save_caffemodel(net, path, *, write_diff: bool = False) -> None:
    """Write ``net`` as a binary .caffemodel (``Net::ToProto`` + serialize), atomically."""
    save_graph_caffemodel(net.graph, net.params, path, write_diff=write_diff)


def save_weightsfile_caffemodel(wf: WeightsFile, path: str) -> None:
    """Write a read .caffemodel back in today's (V2) form, blobs with ``shape`` dims (an upgrade)."""
    if wf.net is None:
        raise ResnetcError("writing a .caffemodel needs the net's layer definitions: give --net NET.prototxt",
                           file=path)
    by_name = iter(wf.layers)

    def layers():
        for lp0, src in zip(wf.net.layer, by_name):
            lp = caffe_pb2.LayerParameter()
            lp.CopyFrom(lp0)
            for b in src.blobs:
                lp.blobs.add().MergeFromString(_blob_bytes(b.data, b.natural_shape(), None))
            yield lp

    _write_stream(os.fspath(path), wf.net.name, layers())


def _check_h5_name(name: str, path: str) -> None:
    if "/" in name or name in (".", ""):
        raise ResnetcError(f"layer name '{name}' cannot be an HDF5 group name (it contains '/')", file=path,
                           layer=name)


def save_graph_h5(graph, params: Mapping, path: str, *, write_diff: bool = False) -> None:
    """Caffe's ``Net::ToHDF5``: /data/<layer>/<i> for owner params only, a group for every layer; with
    ``write_diff``, /diff/<layer>/<i> for all params."""
    path = os.fspath(path)
    h5py = _import_h5py(path, writing=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_group("data")
            diff = h5.create_group("diff") if write_diff else None
            for layer in graph.layers:
                _check_h5_name(layer.name, path)
                if layer.name in data:
                    raise ResnetcError("two layers have this name: HDF5 weights need unique layer names", file=path,
                                       layer=layer.name)
                g = data.create_group(layer.name)
                gd = diff.create_group(layer.name) if diff is not None else None
                tensors = params.get(layer.name, ()) if layer.blobs else ()
                for i, t in enumerate(tensors):
                    if layer.shared_from[i] is None:
                        g.create_dataset(str(i), data=_tensor_np(t))
                    if gd is not None:
                        gd.create_dataset(str(i), data=_tensor_np(t.grad) if t.grad is not None else
                                          np.zeros(tuple(t.shape), np.float32))


def save_caffemodel_h5(net, path, *, write_diff: bool = False) -> None:
    save_graph_h5(net.graph, net.params, path, write_diff=write_diff)


def save_weightsfile_h5(wf: WeightsFile, path: str) -> None:
    """Write the blobs of a read file as /data/<layer>/<i> (no net: every blob is written)."""
    path = os.fspath(path)
    h5py = _import_h5py(path, writing=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_group("data")
            for src in wf.layers:
                _check_h5_name(src.name, path)
                if src.name in data:
                    raise ResnetcError("two layers in the file have this name", file=wf.path, layer=src.name)
                g = data.create_group(src.name)
                for i, b in enumerate(src.blobs):
                    if b is not None:
                        g.create_dataset(str(i), data=b.data.reshape(b.natural_shape()))


def save_state_dict(tensors: dict, path: str, fmt: str) -> None:
    """``{"<layer>/<i>": tensor}`` to .pt (torch.save) or .safetensors, atomically."""
    path = os.fspath(path)
    if fmt == "safetensors":
        st = _import_safetensors(path)
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                                          dtype=np.float32) for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            st.save_file(arrays, tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # the Rust writer creates the file private
        return
    with atomic_path(path) as tmp:
        torch.save({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(v))
                    for k, v in tensors.items()}, tmp)


def graph_state_dict(graph, params: Mapping) -> dict:
    """Every blob of every layer (shared ones repeated, like a binary .caffemodel), keyed ``<layer>/<i>``."""
    out = {}
    for layer in graph.layers:
        for i, t in enumerate(params.get(layer.name, ()) if layer.blobs else ()):
            out[f"{layer.name}/{i}"] = t
    return out


def weightsfile_state_dict(wf: WeightsFile) -> dict:
    out = {}
    for src in wf.layers:
        for i, b in enumerate(src.blobs):
            if b is None:
                continue
            key = f"{src.name}/{i}"
            if key in out:
                raise ResnetcError(f"two layers in the file are named '{src.name}': keys would collide", file=wf.path,
                                   layer=src.name)
            out[key] = b.data.reshape(b.natural_shape())
    return out


# ----------------------------------------------------------------------------------------------------------
# Conversion (``resnetc convert``)


def fresh_params(graph, *, seed: Optional[int] = None) -> dict:
    """{layer name: [tensor]} for ``graph`` filled by the layers' fillers, shared blobs as one tensor (what a
    CaffeNet holds, without building its modules: conversion needs no lowering)."""
    from .fillers import CaffeRNG, fill

    rng = CaffeRNG(seed)
    owned, params = {}, {}
    for layer in graph.layers:
        if layer.blobs is None:
            raise layer.error("the sizes of its inputs are unknown, so its parameter shapes are too (give them "
                              "with --input-shape BLOB=N,C,H,W)")
        blobs = []
        for i, pb in enumerate(layer.blobs):
            shared = layer.shared_from[i] if i < len(layer.shared_from) else None
            if shared is not None:
                blobs.append(owned[shared])
                continue
            t = torch.from_numpy(fill(pb.filler, pb.shape, rng, where=f"layer '{layer.name}' blob {i}: "))
            owned[(layer.name, i)] = t
            blobs.append(t)
        if blobs:
            params.setdefault(layer.name, blobs)
    return params


def convert(in_path: str, out_path: str, *, net_path: Optional[str] = None, phase: str = "TEST",
            input_shapes: Optional[dict] = None, level: Optional[int] = None, stages=(),
            strict_shapes: bool = True) -> LoadResult | None:
    """Convert weights between .caffemodel, .caffemodel.h5, .pt and .safetensors.

    With ``net_path`` the weights go through the net (Caffe's load rules, shapes from the net, layer params
    from the prototxt); without it they are copied by layer name as the file holds them, which is enough
    for every target but a .caffemodel from a file that has no layer definitions (.pt, .safetensors, .h5)."""
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    out_fmt = weights_format(out_path, for_writing=True)
    if out_fmt == "safetensors":
        _import_safetensors(out_path)
    if out_fmt == "h5":
        _import_h5py(out_path, writing=True)
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise ResnetcError("input and output are the same file", file=out_path)
    wf = read_weights(in_path)
    if net_path is not None:
        from .graph import build_graph

        graph = build_graph(net_path, phase, level=level, stages=stages, input_shapes=input_shapes)
        params = fresh_params(graph)
        result = load_weights(graph, params, wf, strict_shapes=strict_shapes)
        if out_fmt == "caffemodel":
            save_graph_caffemodel(graph, params, out_path)
        elif out_fmt == "h5":
            save_graph_h5(graph, params, out_path)
        else:
            save_state_dict(graph_state_dict(graph, params), out_path, out_fmt)
        return result
    if out_fmt == "caffemodel":
        if wf.net is None:
            raise ResnetcError(f"a {wf.format} file holds no layer definitions: writing a .caffemodel needs the net "
                               f"(--net NET.prototxt)", file=in_path)
        save_weightsfile_caffemodel(wf, out_path)
    elif out_fmt == "h5":
        save_weightsfile_h5(wf, out_path)
    else:
        save_state_dict(weightsfile_state_dict(wf), out_path, out_fmt)
    return None
