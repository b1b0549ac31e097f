"""CIFAR-10 binary archive -> train/test LMDBs + mean file (Caffe's ``examples/cifar10/convert_cifar_data``
followed by ``compute_image_mean``).

Input: ``cifar-10-binary.tar.gz`` (read in place, not extracted) or a directory holding
``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin`` (directly or in ``cifar-10-batches-bin/``).
Each record is 1 label byte + 3072 pixel bytes (the R, G and B 32x32 planes). As in Caffe the planes are stored
as they are (so these datums are **RGB**, unlike images read with OpenCV), keys are the 5-digit running index.
The Python (pickled) version of the archive is refused: resnetc never unpickles files.
"""
from __future__ import annotations

import logging
import os
import tarfile

import numpy as np

from ..errors import ResnetcError
from .datum import array_to_datum
from .db import write_db
from .mean import compute_image_mean, write_mean

log = logging.getLogger(__name__)

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILES = ["test_batch.bin"]
RECORD = 1 + 3 * 32 * 32


def _read_member(src: str, name: str) -> bytes:
    if os.path.isdir(src):
        for d in (src, os.path.join(src, "cifar-10-batches-bin")):
            p = os.path.join(d, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    return f.read()
        if any(os.path.exists(os.path.join(d, name[:-4])) for d in (src, os.path.join(src, "cifar-10-batches-py"))):
            raise ResnetcError("this is the Python (pickled) CIFAR-10 version; resnetc never unpickles files: "
                               "use the binary version (cifar-10-binary.tar.gz)", file=src)
        raise ResnetcError(f"CIFAR-10 binary file '{name}' not found", file=src)
    try:
        with tarfile.open(src) as tar:
            names = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            if name not in names:
                if name[:-4] in names:
                    raise ResnetcError("this is the Python (pickled) CIFAR-10 archive; resnetc never unpickles "
                                       "files: use the binary version (cifar-10-binary.tar.gz)", file=src)
                raise ResnetcError(f"archive has no '{name}'", file=src)
            return tar.extractfile(names[name]).read()
    except (tarfile.TarError, OSError) as e:
        raise ResnetcError(f"cannot read the CIFAR-10 archive: {e}", file=src) from None


def read_cifar10(src: str, files) -> tuple:
    """(images uint8 (n, 3, 32, 32) RGB planes, labels int64 (n,)) of the given batch files, in order."""
    if not os.path.exists(src):
        raise ResnetcError("CIFAR-10 source not found", file=src)
    xs, ys = [], []
    for name in files:
        raw = _read_member(src, name)
        if len(raw) == 0 or len(raw) % RECORD:
            raise ResnetcError(f"'{name}' has {len(raw)} bytes, not a multiple of the {RECORD}-byte CIFAR-10 "
                               f"record", file=src)
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
        if rec[:, 0].max() > 9:
            raise ResnetcError(f"'{name}' has a label {int(rec[:, 0].max())} > 9: not a CIFAR-10 binary file",
                               file=src)
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs), np.concatenate(ys)


def convert_cifar10(src: str, out_dir: str) -> dict:
    """Write ``cifar10_train_lmdb``, ``cifar10_test_lmdb`` and ``mean.binaryproto`` (train mean) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for name, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        x, y = read_cifar10(src, files)
        path = os.path.join(out_dir, f"cifar10_{name}_lmdb")
        with write_db(path) as db:
            for i in range(len(x)):
                db.put(b"%05d" % i, array_to_datum(x[i], int(y[i])).SerializeToString())
        counts[name] = len(x)
        log.info("%s: %d images", path, len(x))
    write_mean(os.path.join(out_dir, "mean.binaryproto"),
               compute_image_mean(os.path.join(out_dir, "cifar10_train_lmdb")))
    return counts
