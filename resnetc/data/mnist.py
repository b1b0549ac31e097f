"""MNIST IDX files -> train/test LMDBs + mean file (Caffe's ``examples/mnist/convert_mnist_data``).

Input: a directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte`` (each optionally ``.gz``). IDX: big-endian magic 2051 (images: n, rows, cols) or
2049 (labels: n), then uint8 values. Datums are 1 x rows x cols, keys the 8-digit index, as in Caffe.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct

import numpy as np

from ..errors import ResnetcError
from .datum import array_to_datum
from .db import write_db
from .mean import compute_image_mean, write_mean

log = logging.getLogger(__name__)

SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read(src_dir: str, name: str) -> tuple:
    for fn in (name, name + ".gz", name.replace("-idx", ".idx")):
        p = os.path.join(src_dir, fn)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                data = f.read()
            if data[:2] == b"\x1f\x8b":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    raise ResnetcError(f"corrupt gzip file: {e}", file=p) from None
            return p, data
    raise ResnetcError(f"MNIST file '{name}' (or {name}.gz) not found", file=src_dir)


def read_idx_images(path: str, data: bytes) -> np.ndarray:
    if len(data) < 16:
        raise ResnetcError("too short for an IDX image file", file=path)
    magic, n, rows, cols = struct.unpack(">iiii", data[:16])
    if magic != 2051:
        raise ResnetcError(f"bad magic number {magic} (IDX images have 2051)", file=path)
    if len(data) != 16 + n * rows * cols:
        raise ResnetcError(f"header says {n} images of {rows}x{cols} but the file has {len(data) - 16} pixel bytes",
                           file=path)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols)


def read_idx_labels(path: str, data: bytes) -> np.ndarray:
    if len(data) < 8:
        raise ResnetcError("too short for an IDX label file", file=path)
    magic, n = struct.unpack(">ii", data[:8])
    if magic != 2049:
        raise ResnetcError(f"bad magic number {magic} (IDX labels have 2049)", file=path)
    if len(data) != 8 + n:
        raise ResnetcError(f"header says {n} labels but the file has {len(data) - 8}", file=path)
    return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


def read_mnist(src_dir: str, split: str) -> tuple:
    """(images uint8 (n, 1, rows, cols), labels int64 (n,))."""
    if not os.path.isdir(src_dir):
        raise ResnetcError("MNIST source directory not found", file=src_dir)
    img_name, lab_name = SPLITS[split]
    ip, idata = _read(src_dir, img_name)
    lp, ldata = _read(src_dir, lab_name)
    x, y = read_idx_images(ip, idata), read_idx_labels(lp, ldata)
    if len(x) != len(y):
        raise ResnetcError(f"{len(x)} images but {len(y)} labels in {os.path.basename(lp)}", file=ip)
    return x, y


def convert_mnist(src_dir: str, out_dir: str) -> dict:
    """Write ``mnist_train_lmdb``, ``mnist_test_lmdb`` and ``mean.binaryproto`` (train mean) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        x, y = read_mnist(src_dir, split)
        path = os.path.join(out_dir, f"mnist_{split}_lmdb")
        with write_db(path) as db:
            for i in range(len(x)):
                db.put(b"%08d" % i, array_to_datum(x[i], int(y[i])).SerializeToString())
        counts[split] = len(x)
        log.info("%s: %d images", path, len(x))
    write_mean(os.path.join(out_dir, "mean.binaryproto"),
               compute_image_mean(os.path.join(out_dir, "mnist_train_lmdb")))
    return counts
