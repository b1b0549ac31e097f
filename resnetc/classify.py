"""Caffe's classify.py workflow: images → preprocessing → net (ONNX or prototxt) → top-k classes."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from .errors import ResnetcError


def load_image_bgr(path: str, channels: int = 3) -> np.ndarray:
    """HxWxC float32 in [0, 255] (BGR for 3 channels, grey for 1), as Caffe's OpenCV-based tools see an image."""
    try:
        import cv2
    except ImportError:
        raise ResnetcError("decoding images needs OpenCV: pip install opencv-python-headless") from None
    if not os.path.exists(path):
        raise ResnetcError("no such image file", file=path)
    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if img is None:
        raise ResnetcError("cannot decode the image (not a JPEG/PNG/BMP/... file, or corrupt)", file=path)
    if img.ndim == 2:
        img = img[:, :, None]
    return img.astype(np.float32)


def parse_mean(mean: Optional[str], channels: int) -> Optional[np.ndarray]:
    """``--mean``: a .binaryproto mean file (averaged per channel, as classify.py's typical use) or values."""
    if not mean:
        return None
    if os.path.exists(mean):
        from .prototxt import read_binary
        from .proto import caffe_pb2

        bp = read_binary(mean, caffe_pb2.BlobProto)
        arr = np.asarray(bp.data, dtype=np.float32)
        if arr.size % channels:
            raise ResnetcError(f"mean file has {arr.size} values, not a multiple of {channels} channels", file=mean)
        return arr.reshape(channels, -1).mean(axis=1)
    try:
        vals = np.array([float(v) for v in mean.split(",")], dtype=np.float32)
    except ValueError:
        raise ResnetcError(f"--mean: '{mean}' is neither a file nor comma-separated numbers") from None
    if vals.size == 1:
        vals = np.repeat(vals, channels)
    if vals.size != channels:
        raise ResnetcError(f"--mean has {vals.size} values for {channels} channels")
    return vals


def preprocess(img_bgr: np.ndarray, size: Sequence[int], *, mean=None, scale: float = 1.0,
               resize: Optional[Sequence[int]] = None) -> np.ndarray:
    """Resize (to ``resize`` then centre-crop to ``size``, or straight to ``size``), subtract the per-channel
    mean, scale; returns CxHxW float32 (BGR, Caffe's channel order)."""
    import cv2

    h, w = size
    if resize:
        img = cv2.resize(img_bgr, (resize[1], resize[0]), interpolation=cv2.INTER_LINEAR).reshape(
            resize[0], resize[1], -1)
        top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        img = img[top:top + h, left:left + w]
    else:
        img = cv2.resize(img_bgr, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
    x = img.transpose(2, 0, 1).astype(np.float32)
    if mean is not None:
        x = x - mean.reshape(-1, 1, 1)
    return x * scale


def read_labels(path: Optional[str]) -> Optional[list]:
    if not path:
        return None
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ResnetcError(f"cannot read labels: {e.strerror}", file=path) from None


def top_k(probs: np.ndarray, k: int, labels: Optional[list] = None) -> list:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i]), labels[i] if labels and i < len(labels) else str(int(i))) for i in order]
