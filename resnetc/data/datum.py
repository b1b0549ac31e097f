"""Caffe ``Datum`` records <-> numpy arrays (CAFFE_SEMANTICS.md §6.1).

A raw Datum holds uint8 pixels in CHW order (``(c*H + h)*W + w``), BGR for colour images as OpenCV reads
them, or float32 values in ``float_data`` when ``data`` is empty. An encoded Datum holds an image file
(JPEG/PNG ...) in ``data`` and no sizes; it is decoded with OpenCV: native channels by default, 3-channel
BGR with ``force_color``, 1 channel with ``force_gray``.

Every error names the source (DB path or file) and the record key, so a user can find the bad record.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import ResnetcError
from ..proto import caffe_pb2

log = logging.getLogger(__name__)

# OpenCV imdecode/imread flags (numeric, so importing this module does not need cv2)
IMREAD_UNCHANGED = -1
IMREAD_GRAYSCALE = 0
IMREAD_COLOR = 1


def _cv2():
    try:
        import cv2
    except ImportError:  # pragma: no cover - depends on the installation
        raise ResnetcError("reading images needs OpenCV: pip install opencv-python-headless "
                           "(or `pip install resnetc[data]`)") from None
    return cv2


def where(source, key) -> str:
    """How errors name a record: ``record '00000042_cat/1.jpg'``."""
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    return f"record '{key}'" if key is not None else "record"


def parse_datum(value: bytes, source: str, key) -> caffe_pb2.Datum:
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ResnetcError(f"{where(source, key)}: not a Caffe Datum ({type(e).__name__}: {e})",
                           file=source) from None
    return datum


def decode_image(data: bytes, flags: int, source: str, key) -> np.ndarray:
    """Decode an image file's bytes to a uint8 HxW or HxWxC array (BGR), or raise naming the record."""
    cv2 = _cv2()
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None:
        raise ResnetcError(f"{where(source, key)}: could not decode the image ({len(data)} bytes; "
                           f"not a JPEG/PNG/... OpenCV can read)", file=source)
    if img.dtype != np.uint8:
        raise ResnetcError(f"{where(source, key)}: image has {img.dtype} pixels; Caffe needs 8-bit images",
                           file=source)
    return img


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """An OpenCV image (HxW or HxWxC) as a CHW array (a view when possible)."""
    if img.ndim == 2:
        return img[None, :, :]
    return img.transpose(2, 0, 1)


def decode_flags(force_color: bool, force_gray: bool, source: str | None = None) -> int:
    if force_color and force_gray:
        raise ResnetcError("transform_param: force_color and force_gray cannot both be set", file=source)
    if force_color:
        return IMREAD_COLOR
    if force_gray:
        return IMREAD_GRAYSCALE
    return IMREAD_UNCHANGED


def datum_to_array(datum: caffe_pb2.Datum, source: str, key, *, force_color: bool = False,
                   force_gray: bool = False) -> np.ndarray:
    """The pixels of one Datum as a CHW array: uint8 (raw or decoded) or float32 (``float_data``)."""
    if datum.encoded:
        img = decode_image(datum.data, decode_flags(force_color, force_gray, source), source, key)
        return hwc_to_chw(img)
    if force_color or force_gray:
        log.error("%s: %s: force_color/force_gray ignored: the datum is not encoded", source, where(source, key))
    c, h, w = datum.channels, datum.height, datum.width
    if c <= 0 or h <= 0 or w <= 0:
        raise ResnetcError(f"{where(source, key)}: datum header has size {c}x{h}x{w}: channels, height and "
                           f"width must be > 0 for a raw (not encoded) datum", file=source)
    n = c * h * w
    if datum.data:
        if len(datum.data) != n:
            raise ResnetcError(f"{where(source, key)}: datum data has {len(datum.data)} bytes but its header says "
                               f"{c}x{h}x{w} = {n}", file=source)
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data) != n:
        raise ResnetcError(f"{where(source, key)}: datum has {len(datum.float_data)} float_data values but its "
                           f"header says {c}x{h}x{w} = {n}", file=source)
    return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)


def array_to_datum(chw: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """A raw Datum from a CHW uint8 (-> ``data``) or float (-> ``float_data``) array."""
    chw = np.asarray(chw)
    if chw.ndim != 3:
        raise ValueError(f"a Datum holds a CHW array, got shape {chw.shape}")
    d = caffe_pb2.Datum()
    d.channels, d.height, d.width = (int(s) for s in chw.shape)
    if chw.dtype == np.uint8:
        d.data = np.ascontiguousarray(chw).tobytes()
    else:
        d.float_data.extend(np.asarray(chw, dtype=np.float32).ravel().tolist())
    d.label = int(label)
    return d


def encoded_datum(image_bytes: bytes, label: int = 0) -> caffe_pb2.Datum:
    """An encoded Datum (image file bytes; Caffe leaves the sizes unset)."""
    d = caffe_pb2.Datum()
    d.data = bytes(image_bytes)
    d.label = int(label)
    d.encoded = True
    return d


def encode_image(img_hwc: np.ndarray, ext: str) -> bytes:
    """Encode a uint8 HxW[xC] BGR image with OpenCV (``ext`` like ``jpg`` or ``png``)."""
    cv2 = _cv2()
    ext = ext.lower().lstrip(".")
    ok, buf = cv2.imencode("." + ext, img_hwc)
    if not ok:
        raise ResnetcError(f"OpenCV cannot encode images as '{ext}'")
    return buf.tobytes()
