"""``caffe.io`` of pycaffe: load_image, resize_image, Transformer, blobproto/array conversion."""
from __future__ import annotations

import numpy as np

from ..errors import ResnetcError
from ..proto import caffe_pb2


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """HxWx3 (or HxWx1) float32 RGB in [0, 1], as pycaffe's ``caffe.io.load_image``."""
    try:
        import cv2
    except ImportError:
        raise ResnetcError("caffe.io.load_image needs OpenCV: pip install opencv-python-headless") from None
    img = cv2.imread(str(filename), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ResnetcError("cannot read or decode the image", file=str(filename))
    img = img.astype(np.float32) / 255.0
    if color:
        return img[:, :, ::-1].copy()  # BGR -> RGB
    return img[:, :, None]


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    import cv2

    h, w = int(new_dims[0]), int(new_dims[1])
    interp = cv2.INTER_NEAREST if interp_order == 0 else (cv2.INTER_LINEAR if interp_order == 1 else cv2.INTER_CUBIC)
    out = cv2.resize(np.ascontiguousarray(im, dtype=np.float32), (w, h), interpolation=interp)
    if out.ndim == 2:
        out = out[:, :, None]
    return out.astype(np.float32)


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
    values = np.array(blob.diff if return_diff else blob.data, dtype=np.float32)
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return values.reshape(blob.num, blob.channels, blob.height, blob.width)
    return values.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr, diff=None) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(np.asarray(arr).shape)
    blob.data.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    if diff is not None:
        blob.diff.extend(np.asarray(diff, dtype=np.float32).ravel().tolist())
    return blob


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
            raise ValueError("transpose order needs to have the same number of dimensions as the input")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name, order):
        self._check(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError("channel swap needs to have the same number of dimensions as the input channels")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name, scale):
        self._check(name)
        self.raw_scale[name] = scale

    def set_mean(self, name, mean):
        self._check(name)
        mean = np.asarray(mean, dtype=np.float32)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[name][1]:
                raise ValueError("mean channels incompatible with input")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError("mean shape invalid")
            if ms != self.inputs[name][1:]:
                raise ValueError("mean shape incompatible with input shape")
        self.mean[name] = mean

    def set_input_scale(self, name, scale):
        self._check(name)
        self.input_scale[name] = scale

    def preprocess(self, name, data) -> np.ndarray:
        self._check(name)
        caffe_in = np.asarray(data, dtype=np.float32)
        in_dims = self.inputs[name][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if name in self.transpose:
            caffe_in = caffe_in.transpose(self.transpose[name])
        if name in self.channel_swap:
            caffe_in = caffe_in[list(self.channel_swap[name]), :, :]
        if name in self.raw_scale:
            caffe_in = caffe_in * self.raw_scale[name]
        if name in self.mean:
            caffe_in = caffe_in - self.mean[name]
        if name in self.input_scale:
            caffe_in = caffe_in * self.input_scale[name]
        return np.ascontiguousarray(caffe_in, dtype=np.float32)

    def deprocess(self, name, data) -> np.ndarray:
        self._check(name)
        decaf_in = np.asarray(data, dtype=np.float32).copy().squeeze()
        if name in self.input_scale:
            decaf_in = decaf_in / self.input_scale[name]
        if name in self.mean:
            decaf_in = decaf_in + self.mean[name]
        if name in self.raw_scale:
            decaf_in = decaf_in / self.raw_scale[name]
        if name in self.channel_swap:
            decaf_in = decaf_in[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            decaf_in = decaf_in.transpose(np.argsort(self.transpose[name]))
        return decaf_in
