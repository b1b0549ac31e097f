"""``caffe.io`` of pycaffe: load_image, resize_image, Transformer, blobproto/array conversion."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ResnetcError
from ..proto import caffe_pb2


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """HxWx3 RGB (or HxWx1 intensity) float32 in [0, 1], as pycaffe's ``caffe.io.load_image``.

    pycaffe reads with scikit-image (``imread(as_grey=not color)`` + ``img_as_float``); we read with OpenCV and
    convert the same way: 8/16-bit values scaled to [0, 1], a grey file tiled to 3 channels when ``color``,
    alpha dropped, and colour turned to intensity with scikit-image's weights (0.2125 R + 0.7154 G + 0.0721 B).
    """
    try:
        import cv2
    except ImportError:
        raise ResnetcError("caffe.io.load_image needs OpenCV: pip install opencv-python-headless") from None
    img = cv2.imread(os.fspath(filename), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ResnetcError("cannot read or decode the image", file=os.fspath(filename))
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / np.float32(255)
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / np.float32(65535)
    else:
        img = img.astype(np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = img[:, :, 2::-1] if img.shape[2] >= 3 else img  # BGR(A) -> RGB
        if not color:
            img = (img[:, :, 0] * np.float32(0.2125) + img[:, :, 1] * np.float32(0.7154)
                   + img[:, :, 2] * np.float32(0.0721))
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    return np.ascontiguousarray(img, dtype=np.float32)


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """HxWxK image resized to ``new_dims`` (height, width); ``interp_order`` 0 nearest, 1 linear, >1 cubic.

    pycaffe resizes with scikit-image (rescaled to [0, 1] first); we use OpenCV's resize on the same rescaled
    image, so values agree closely but not bit for bit (skimage's anti-aliasing differs by version). A constant
    image stays exactly constant, as in pycaffe."""
    import cv2

    im = np.asarray(im, dtype=np.float32)
    h, w = int(new_dims[0]), int(new_dims[1])
    im_min, im_max = (float(im.min()), float(im.max())) if im.size else (0.0, 0.0)
    if im_max <= im_min:
        return np.full((h, w, im.shape[-1]), im_min, dtype=np.float32)
    interp = cv2.INTER_NEAREST if interp_order == 0 else (cv2.INTER_LINEAR if interp_order == 1 else cv2.INTER_CUBIC)
    std = (im - im_min) / (im_max - im_min)
    out = cv2.resize(np.ascontiguousarray(std), (w, h), interpolation=interp)
    if out.ndim == 2:
        out = out[:, :, None]
    return (out * (im_max - im_min) + im_min).astype(np.float32)


def oversample(images, crop_dims):
    """The 10 crops (4 corners + centre, and their mirrors) of each image, as pycaffe's ``oversample``."""
    crop_dims = np.array(crop_dims)
    im_shape = np.array(images[0].shape)
    im_center = im_shape[:2] / 2.0
    h_indices = (0, im_shape[0] - crop_dims[0])
    w_indices = (0, im_shape[1] - crop_dims[1])
    crops_ix = np.empty((5, 4), dtype=int)
    curr = 0
    for i in h_indices:
        for j in w_indices:
            crops_ix[curr] = (i, j, i + crop_dims[0], j + crop_dims[1])
            curr += 1
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]), dtype=np.float32)
    ix = 0
    for im in images:
        for crop in crops_ix:
            crops[ix] = im[crop[0]:crop[2], crop[1]:crop[3], :]
            ix += 1
        crops[ix - 5:ix] = crops[ix - 5:ix, :, ::-1, :]
    return crops


def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or diff) as an array of its shape (legacy num/channels/height/width if set)."""
    data = np.array(blob.diff if return_diff else blob.data)
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None) -> caffe_pb2.BlobProto:
    """A BlobProto with the array's shape and values (and ``diff``, same shape, if given)."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(arr) for arr in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(data: bytes) -> list:
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label: int = 0) -> caffe_pb2.Datum:
    """A Datum from a CxHxW array: uint8 -> ``data`` bytes, anything else -> ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    datum.label = int(label)
    return datum


def datum_to_array(datum) -> np.ndarray:
    """The Datum's CxHxW array (uint8 from ``data``, float64 from ``float_data``); the label is not returned."""
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(datum.channels, datum.height, datum.width).copy()
    return np.array(datum.float_data).astype(float).reshape(datum.channels, datum.height, datum.width)


class Transformer:
    """pycaffe's preprocessing for one or more inputs: transpose, channel swap, raw scale, mean, input scale.

    ``preprocess(name, image)``: image HxWxK float in [0, 1] (``load_image``) → resized to the input's H, W →
    transposed → channel-swapped → × raw_scale → − mean → × input_scale, as pycaffe does, in that order.
    """

    def __init__(self, inputs: dict):
        self.inputs = {k: tuple(v) for k, v in inputs.items()}
        self.transpose, self.channel_swap, self.raw_scale, self.mean, self.input_scale = {}, {}, {}, {}, {}

    def _check(self, name):
        if name not in self.inputs:
            raise ValueError(f"{name} is not one of the net inputs: {list(self.inputs)}")

    def set_transpose(self, name, order):
        self._check(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError("Transpose order needs to have the same number of dimensions as the input.")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name, order):
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError("Channel swap needs to have the same number of dimensions as the input channels.")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name, scale):
        self._check(name)
        self.raw_scale[name] = scale

    def set_mean(self, name, mean):
        """A per-channel mean (K,) or an elementwise mean (K, H, W) / (H, W) matching the input."""
        self._check(name)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[name][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError("Mean shape invalid")
            if ms != tuple(self.inputs[name][1:]):
                raise ValueError("Mean shape incompatible with input shape.")
        self.mean[name] = mean

    def set_input_scale(self, name, scale):
        self._check(name)
        self.input_scale[name] = scale

    def preprocess(self, name, data) -> np.ndarray:
        """HxWxK image -> KxHxW float32 input, in pycaffe's order and arithmetic (float32 in place; a float64
        mean is subtracted in float64 and rounded, as numpy's ``-=`` does). ``data`` itself is not modified."""
        self._check(name)
        caffe_in = np.array(data, dtype=np.float32)
        in_dims = tuple(self.inputs[name][2:])
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if name in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[name])
        if name in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[name]), :, :]
        caffe_in = np.array(caffe_in, dtype=np.float32)
        if name in self.raw_scale:
            caffe_in *= self.raw_scale[name]
        if name in self.mean:
            caffe_in -= self.mean[name]
        if name in self.input_scale:
            caffe_in *= self.input_scale[name]
        return caffe_in

    def deprocess(self, name, data) -> np.ndarray:
        """Undo :meth:`preprocess` (resizing excepted): KxHxW -> HxWxK."""
        self._check(name)
        decaf_in = np.array(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            decaf_in /= self.input_scale[name]
        if name in self.mean:
            decaf_in += self.mean[name]
        if name in self.raw_scale:
            decaf_in /= self.raw_scale[name]
        if name in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[name]))
        return decaf_in
