"""The record sources behind the non-DB data layers: image lists (ImageData), HDF5 files (HDF5Data),
and arrays handed over from Python (MemoryData). Also Caffe's list-file parsing and image reading, shared
with ``convert-imageset``.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from ..errors import ResnetcError
from .datum import IMREAD_COLOR, IMREAD_GRAYSCALE, _cv2

log = logging.getLogger(__name__)

_ATOI = re.compile(r"\s*([+-]?\d+)")


def atoi(text: str) -> int:
    """C's ``atoi``: leading blanks, optional sign, digits; 0 when there are none."""
    m = _ATOI.match(text)
    return int(m.group(1)) if m else 0


def resolve_path(path: str, relative_to: str | None = None) -> str:
    """A data path as Caffe resolves it (relative to the working directory); if it is not there but exists
    relative to ``relative_to`` (the directory of the prototxt), that one. Returns the path to use."""
    if os.path.isabs(path) or os.path.exists(path) or not relative_to:
        return path
    alt = os.path.join(relative_to, path)
    return alt if os.path.exists(alt) else path


def read_list(path: str) -> list:
    """Parse an image list (``path label`` per line) like Caffe: split at the **last** space, the label is
    ``atoi`` of the rest (so paths may hold spaces; a line without a space is its own path and label).
    Blank lines are skipped. Returns [(path, label, line number)]."""
    if not os.path.isfile(path):
        raise ResnetcError("image list file not found", file=path)
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            pos = line.rfind(" ")
            if pos < 0:
                out.append((line, atoi(line), i))
            else:
                out.append((line[:pos], atoi(line[pos + 1:]), i))
    if not out:
        raise ResnetcError("image list file has no entries", file=path)
    return out


def read_image(filename: str, *, is_color: bool = True, new_height: int = 0, new_width: int = 0,
               source: str | None = None, line: int | None = None) -> np.ndarray:
    """Caffe's ``ReadImageToCVMat``: ``imread`` colour (BGR) or grey, then ``cv::resize`` (bilinear) to
    exactly (new_width, new_height) when both are > 0. Returns HxW (grey) or HxWx3 uint8."""
    cv2 = _cv2()
    img = None
    if os.path.isfile(filename):
        img = cv2.imread(filename, IMREAD_COLOR if is_color else IMREAD_GRAYSCALE)
    if img is None:
        what = "could not open or find the image" if not os.path.exists(filename) else "could not decode the image"
        raise ResnetcError(f"{what} '{filename}'", file=source, line=line)
    if new_height > 0 and new_width > 0:
        img = cv2.resize(img, (new_width, new_height))
    return img


# ----------------------------------------------------------------------------------------------------------
# HDF5


def read_hdf5_list(path: str) -> list:
    """HDF5Data's ``source``: a text file of .h5 paths separated by whitespace."""
    if not os.path.isfile(path):
        raise ResnetcError("HDF5 list file not found", file=path)
    with open(path, encoding="utf-8") as f:
        files = f.read().split()
    if not files:
        raise ResnetcError("HDF5 list file names no files", file=path)
    return files


def load_hdf5(path: str, names, *, source: str | None = None) -> list:
    """The datasets ``names`` (the layer's top names) of one HDF5 file as float32 arrays with the same
    first dimension (Caffe converts integer data to float)."""
    try:
        import h5py
    except ImportError:  # pragma: no cover - depends on the installation
        raise ResnetcError("HDF5Data needs the `h5py` package: pip install h5py") from None
    if not os.path.isfile(path):
        raise ResnetcError(f"HDF5 file '{path}' (listed in the source) not found", file=source)
    arrays = []
    try:
        with h5py.File(path, "r") as f:
            for name in names:
                if name not in f:
                    raise ResnetcError(f"HDF5 file '{path}' has no dataset '{name}' (HDF5Data reads one dataset "
                                       f"per top, named like the top)", file=source)
                a = np.asarray(f[name][()], dtype=np.float32)
                if a.ndim < 1:
                    raise ResnetcError(f"HDF5 dataset '{name}' in '{path}' is a scalar; it needs >= 1 axis",
                                       file=source)
                arrays.append(a)
    except OSError as e:
        raise ResnetcError(f"cannot read HDF5 file '{path}': {e}", file=source) from None
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise ResnetcError(f"HDF5 datasets {list(names)} in '{path}' have different numbers of rows "
                           f"{[a.shape[0] for a in arrays]}", file=source)
    if rows == {0}:
        raise ResnetcError(f"HDF5 file '{path}' has no rows", file=source)
    return arrays


def hdf5_first_shapes(list_path: str, names) -> list:
    """Per top: the shape of one row of the first file (for the layer's shape rule)."""
    first = read_hdf5_list(list_path)[0]
    first = resolve_path(first, os.path.dirname(list_path))
    return [a.shape[1:] for a in load_hdf5(first, names, source=list_path)]
