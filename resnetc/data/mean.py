"""Mean files: a binary ``BlobProto`` (``.binaryproto``) holding the per-pixel mean image.

Caffe's ``compute_image_mean`` writes the legacy dims ``num 1, channels, height, width`` and no ``shape``;
readers accept either form. The mean is used as a CxHxW float32 array.
"""
from __future__ import annotations

import os

import numpy as np

from ..atomic import write_bytes
from ..errors import ResnetcError
from ..proto import caffe_pb2


def blob_shape(blob: caffe_pb2.BlobProto) -> tuple:
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    return tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))


def read_mean(path: str) -> np.ndarray:
    """The mean image of a ``.binaryproto`` as a float32 CxHxW array (a leading 1 is dropped)."""
    if not os.path.isfile(path):
        raise ResnetcError("mean file not found", file=path)
    blob = caffe_pb2.BlobProto()
    try:
        with open(path, "rb") as f:
            blob.ParseFromString(f.read())
    except Exception as e:
        raise ResnetcError(f"not a binary BlobProto mean file ({type(e).__name__}: {e})", file=path) from None
    shape = blob_shape(blob)
    values = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    n = int(np.prod(shape)) if shape else 0
    if n == 0 or values.size != n:
        raise ResnetcError(f"mean blob has {values.size} values for shape {shape}", file=path)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ResnetcError(f"mean blob has shape {shape}; expected 1xCxHxW or CxHxW", file=path)
    return values.reshape(shape)


def mean_blob(mean_chw: np.ndarray) -> caffe_pb2.BlobProto:
    """A BlobProto with Caffe's legacy dims (num 1, channels, height, width), as compute_image_mean writes."""
    mean_chw = np.asarray(mean_chw, dtype=np.float32)
    c, h, w = mean_chw.shape
    blob = caffe_pb2.BlobProto()
    blob.num, blob.channels, blob.height, blob.width = 1, c, h, w
    blob.data.extend(mean_chw.ravel().tolist())
    return blob


def write_mean(path: str, mean_chw: np.ndarray) -> None:
    write_bytes(path, mean_blob(mean_chw).SerializeToString())


def compute_image_mean(source: str, backend: str = "lmdb") -> np.ndarray:
    """Caffe's ``compute_image_mean``: the per-element mean of every record of a DB (encoded datums decoded
    natively), summed in a float32 accumulator and divided by the record count. Returns CxHxW float32."""
    from .datum import datum_to_array, parse_datum
    from .db import DBReader

    acc = None
    n = 0
    first_key = None
    with DBReader(source, backend) as db:
        for key, value in db.items():
            img = datum_to_array(parse_datum(value, source, key), source, key)
            if acc is None:
                acc = np.zeros(img.shape, dtype=np.float32)
                first_key = key
            elif img.shape != acc.shape:
                k0 = first_key.decode("utf-8", "replace")
                k = key.decode("utf-8", "replace")
                raise ResnetcError(f"record '{k}' is {'x'.join(map(str, img.shape))} but record '{k0}' is "
                                   f"{'x'.join(map(str, acc.shape))}: all images need the same size for a mean",
                                   file=source)
            acc += img
            n += 1
    mean = acc / np.float32(n)
    return mean.astype(np.float32)
