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


def top_k_classes(probs: np.ndarray, k: int, labels: Optional[list] = None) -> list:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i]), labels[i] if labels and i < len(labels) else str(int(i))) for i in order]


top_k = top_k_classes


def classify_images(model: str, images: Sequence[str], *, weights: Optional[str] = None,
                    labels: Optional[str] = None, mean: Optional[str] = None, scale: float = 1.0,
                    resize: Optional[Sequence[int]] = None, top_k: int = 5, device: str = "cpu") -> list:
    """Caffe's classify.py: [(image path, [(class index, probability, label), ...] best first)].

    ``model``: an exported .onnx file (run in onnxruntime; its weights are inside) or a prototxt with ``weights``
    (its deploy form, run in PyTorch). The output read is ``prob`` when the net has one, else its last output."""
    import logging

    if top_k < 1:
        raise ResnetcError(f"--top-k must be >= 1, got {top_k}")
    is_onnx = os.fspath(model).endswith(".onnx")
    if is_onnx and weights:
        raise ResnetcError("--weights is for a prototxt: an .onnx model carries its weights", file=model)
    if not is_onnx and not weights:
        raise ResnetcError("classifying with a prototxt needs its trained weights: give --weights W.caffemodel",
                           file=model)
    label_names = read_labels(labels)
    if is_onnx:
        from .export import InferenceSession

        sess = InferenceSession(model, device=None if str(device).startswith("cuda") else "cpu")
        in_names, shape = sess.inputs, list(sess.input_shapes[sess.inputs[0]])
        out_name = "prob" if "prob" in sess.outputs else sess.outputs[-1]
        fixed = shape[0] if shape and isinstance(shape[0], int) else None

        def run(batch):
            return np.asarray(sess(**{in_names[0]: batch})[out_name], dtype=np.float32)
    else:
        import torch

        from .export import prepare_deploy_net

        net, _ = prepare_deploy_net(model, weights)
        dev = device if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu"
        net.to(dev)
        in_names, shape = net.inputs, list(net.graph.shape(net.inputs[0]) or [])
        out_name = "prob" if "prob" in net.outputs else net.outputs[-1]
        fixed = None

        def run(batch):
            with torch.no_grad():
                return net(**{in_names[0]: torch.from_numpy(batch).to(dev)})[out_name].float().cpu().numpy()
    if len(in_names) != 1:
        raise ResnetcError(f"classify needs a net with one input, this one has {in_names}", file=model)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise ResnetcError(f"classify needs an image input N,C,H,W; input '{in_names[0]}' is {shape}", file=model)
    channels, size = int(shape[1]), (int(shape[2]), int(shape[3]))
    mean_arr = parse_mean(mean, channels)
    batch = np.stack([preprocess(load_image_bgr(p, channels), size, mean=mean_arr, scale=scale, resize=resize)
                      for p in images]).astype(np.float32)
    step = fixed or len(batch)
    chunks = []
    for i in range(0, len(batch), step):
        part = batch[i:i + step]
        n = len(part)
        if n < step:  # a fixed-batch model: pad the last chunk
            part = np.concatenate([part, np.zeros((step - n,) + part.shape[1:], np.float32)])
        chunks.append(run(part)[:n])
    probs = np.concatenate(chunks).reshape(len(batch), -1)
    if label_names is not None and len(label_names) != probs.shape[1]:
        logging.getLogger("resnetc.classify").warning(
            "%s has %d labels for %d classes", labels, len(label_names), probs.shape[1])
    return [(path, top_k_classes(p, top_k, label_names)) for path, p in zip(images, probs)]
