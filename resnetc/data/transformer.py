"""Caffe's DataTransformer, exactly (CAFFE_SEMANTICS.md §6.2), plus resnetc's opt-in augmentation.

Per image, in this order:

1. random draws from the transformer's own RNG: ``mirror = param.mirror && Rand(2)`` (in **any** phase), then,
   with ``crop_size`` in TRAIN, ``h_off = Rand(H - crop + 1)``, ``w_off = Rand(W - crop + 1)``; in TEST the crop
   is centred (``(H - crop) // 2``);
2. ``value = (x - mean) * scale`` at the cropped position, where the mean file has the full uncropped size and
   is cropped at the same offset, or ``mean_value`` is one value or one per channel;
3. mirroring writes column ``w`` to ``width - 1 - w`` of the cropped, mean-subtracted, scaled patch.

``Rand(n)`` is ``raw mod n`` of one 32-bit draw, so every image consumes a fixed number of raw draws whatever
its size: :meth:`DataTransformer.draw` takes them in record order (on the thread that reads the records) and
:meth:`DataTransformer.transform` applies them later on any worker thread, which keeps the results
deterministic under parallel decoding.

``transform_param.resnetc_augment`` (a resnetc extension, off by default, TRAIN only) runs after Caffe's
transform: zero-pad by ``pad`` on each side and random-crop back to the same size (draws: row, column), then
a random horizontal flip (one draw) if ``random_flip``.
"""
from __future__ import annotations

import numpy as np

from ..errors import ResnetcError
from .datum import where
from .mean import read_mean


class DataTransformer:
    def __init__(self, param, phase: str = "TEST", *, mean_file: str | None = None, rng=None):
        """``param`` is a ``TransformationParameter``; ``mean_file`` overrides the path of
        ``param.mean_file`` (already resolved by the caller); ``rng`` a :class:`~resnetc.data.rng.CaffeRNG`."""
        self.param = param
        self.phase = phase.upper()
        self.train = self.phase == "TRAIN"
        self.scale = np.float32(param.scale)
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise ResnetcError("transform_param: force_color and force_gray cannot both be set")
        self.mean = None
        self.mean_file = None
        if param.HasField("mean_file"):
            if len(param.mean_value):
                raise ResnetcError("transform_param: cannot specify mean_file and mean_value at the same time")
            self.mean_file = mean_file or param.mean_file
            self.mean = read_mean(self.mean_file)
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32) if len(param.mean_value) else None
        aug = param.resnetc_augment if param.HasField("resnetc_augment") else None
        self.pad = int(aug.pad) if (aug is not None and self.train) else 0
        self.random_flip = bool(aug.random_flip) if (aug is not None and self.train) else False
        self.rng = rng
        self.draws_per_image = (int(self.mirror) + (2 if self.crop and self.train else 0)
                                + (2 if self.pad else 0) + int(self.random_flip))

    @property
    def needs_rand(self) -> bool:
        """Caffe's InitRand condition (mirror, or a TRAIN crop), widened by the augmentation extension."""
        return self.draws_per_image > 0

    def draw(self) -> np.ndarray:
        """The raw 32-bit draws of one image, in Caffe's order (empty when nothing is random)."""
        if not self.draws_per_image:
            return _NO_DRAWS
        return self.rng.raws(self.draws_per_image)

    def output_shape(self, c: int, h: int, w: int) -> tuple:
        """``InferBlobShape``: (C, crop or H, crop or W)."""
        if self.crop:
            return (c, self.crop, self.crop)
        return (c, h, w)

    def check(self, c: int, h: int, w: int, source: str, key) -> None:
        if self.crop and (h < self.crop or w < self.crop):
            raise ResnetcError(f"{where(source, key)}: image is {h}x{w}, smaller than crop_size {self.crop}",
                               file=source)
        if self.mean is not None and self.mean.shape != (c, h, w):
            mc, mh, mw = self.mean.shape
            raise ResnetcError(f"mean file {self.mean_file} is {mc}x{mh}x{mw} but {where(source, key)} is "
                               f"{c}x{h}x{w} (the mean must have the full, uncropped image size)", file=source)
        if self.mean_values is not None and len(self.mean_values) not in (1, c):
            raise ResnetcError(f"transform_param has {len(self.mean_values)} mean_value entries for a {c}-channel "
                               f"image ({where(source, key)}): give 1 or {c}", file=source)

    def transform(self, chw: np.ndarray, draws=None, *, source: str = "", key=None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Transform one CHW image (uint8 or float32) with the raw ``draws`` from :meth:`draw`.

        Writes into ``out`` (float32, the output shape) when given; returns the float32 result.
        """
        c, h, w = chw.shape
        self.check(c, h, w, source, key)
        i = 0
        do_mirror = False
        if self.mirror:
            do_mirror = bool(int(draws[i]) % 2)
            i += 1
        h_off = w_off = 0
        oh, ow = h, w
        if self.crop:
            oh = ow = self.crop
            if self.train:
                h_off = int(draws[i]) % (h - self.crop + 1)
                w_off = int(draws[i + 1]) % (w - self.crop + 1)
                i += 2
            else:
                h_off = (h - self.crop) // 2
                w_off = (w - self.crop) // 2
        patch = chw[:, h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
        if self.mean is not None:
            patch -= self.mean[:, h_off:h_off + oh, w_off:w_off + ow]
        elif self.mean_values is not None:
            mv = self.mean_values if len(self.mean_values) == c else np.repeat(self.mean_values, c)
            patch -= mv[:, None, None]
        if self.scale != 1:
            patch *= self.scale
        if do_mirror:
            patch = patch[:, :, ::-1]
        if self.pad:
            span = 2 * self.pad + 1
            y, x = int(draws[i]) % span, int(draws[i + 1]) % span
            i += 2
            padded = np.zeros((c, oh + 2 * self.pad, ow + 2 * self.pad), dtype=np.float32)
            padded[:, self.pad:self.pad + oh, self.pad:self.pad + ow] = patch
            patch = padded[:, y:y + oh, x:x + ow]
        if self.random_flip:
            if int(draws[i]) % 2:
                patch = patch[:, :, ::-1]
            i += 1
        if out is None:
            return np.ascontiguousarray(patch)
        out[...] = patch
        return out


_NO_DRAWS = np.zeros(0, dtype=np.uint32)
