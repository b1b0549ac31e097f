"""The UCI handwritten digits shipped inside resnetc (``resnetc/datasets/digits``, CC BY 4.0): arrays and
the ``resnetc data digits`` conversion to train/test LMDBs + a mean file.

Split (deterministic, no RNG): image ``i`` of the original order goes to test when ``i % 5 == 0`` (360
images), else to train (1,437). ``classes`` keeps only some digits (e.g. 0-4 and 5-9 for fine-tuning between
class splits); ``relabel`` maps the kept digits to 0..k-1 in increasing order. ``labels.txt`` beside the LMDBs
names the class of each label, one line per label value (Caffe's ``synset_words.txt`` convention): the kept
digits in order with ``relabel``, else the ten digits (the label is the digit itself).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os

import numpy as np

from ..atomic import write_text
from ..errors import ResnetcError
from .datum import array_to_datum
from .db import write_db
from .mean import compute_image_mean, write_mean

log = logging.getLogger(__name__)

DATA_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "digits",
                         "digits.u8.gz")
SHA256 = "d8121ca7764eccfaef1df6bc4589c6527c58fcbab0cb1b079e79f97f8cb8219a"
N_IMAGES = 1797
TEST_EVERY = 5


def load_digits() -> tuple:
    """(images uint8 (1797, 8, 8) with values 0..16, labels int64 (1797,)) in the original order."""
    with open(DATA_FILE, "rb") as f:
        raw = gzip.decompress(f.read())
    if hashlib.sha256(raw).hexdigest() != SHA256:
        raise ResnetcError("the shipped digits data is corrupt (sha256 mismatch)", file=DATA_FILE)
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(N_IMAGES, 65)
    return rec[:, 1:].reshape(N_IMAGES, 8, 8).copy(), rec[:, 0].astype(np.int64)


def parse_classes(spec: str | None) -> list:
    """``"0-4"``, ``"1,3,5-7"`` -> sorted digit list; None/"" -> all 10."""
    if not spec:
        return list(range(10))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ResnetcError(f"--classes '{spec}': expected digits and ranges like 0-4 or 1,3,5-7") from None
    if not out or min(out) < 0 or max(out) > 9:
        raise ResnetcError(f"--classes '{spec}': digits must be within 0-9")
    return sorted(out)


def split_arrays(classes=None, relabel: bool = False, size: int = 8) -> dict:
    """{"train": (images uint8 (n,1,size,size) 0..255, labels), "test": (...)} for the chosen classes."""
    images, labels = load_digits()
    keep = parse_classes(classes) if isinstance(classes, (str, type(None))) else sorted(classes)
    pix = ((images.astype(np.uint16) * 255 + 8) // 16).astype(np.uint8)
    if size != 8:
        import cv2

        pix = np.stack([cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR) for p in pix])
    mapping = {c: (i if relabel else c) for i, c in enumerate(keep)}
    idx = np.arange(N_IMAGES)
    mask = np.isin(labels, keep)
    out = {}
    for name, sel in (("train", mask & (idx % TEST_EVERY != 0)), ("test", mask & (idx % TEST_EVERY == 0))):
        out[name] = (pix[sel][:, None], np.array([mapping[int(l)] for l in labels[sel]], dtype=np.int64))
    return out


def label_names(classes=None, relabel: bool = False) -> list:
    """Line ``i`` of ``labels.txt``: the digit that label ``i`` stands for."""
    keep = parse_classes(classes) if isinstance(classes, (str, type(None))) else sorted(classes)
    return [str(d) for d in (keep if relabel else range(10))]


def write_digits(out_dir: str, classes=None, relabel: bool = False, size: int = 8) -> dict:
    """Write ``digits_train_lmdb``, ``digits_test_lmdb`` (keys ``%08d``), ``mean.binaryproto`` (of train) and
    ``labels.txt`` (the digit of each label value)."""
    if size < 1:
        raise ResnetcError(f"--size must be >= 1 (got {size})")
    names = label_names(classes, relabel)
    parts = split_arrays(classes, relabel, size)
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for name, (x, y) in parts.items():
        path = os.path.join(out_dir, f"digits_{name}_lmdb")
        with write_db(path) as db:
            for i in range(len(x)):
                db.put(b"%08d" % i, array_to_datum(x[i], int(y[i])).SerializeToString())
        counts[name] = len(x)
        log.info("%s: %d images", path, len(x))
    write_mean(os.path.join(out_dir, "mean.binaryproto"),
               compute_image_mean(os.path.join(out_dir, "digits_train_lmdb")))
    write_text(os.path.join(out_dir, "labels.txt"), "".join(n + "\n" for n in names))
    return counts
