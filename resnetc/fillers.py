"""Caffe's weight fillers (CAFFE_SEMANTICS.md §5.1).

Uniform-based fillers (constant, uniform, xavier, positive_unitball, bilinear) follow Caffe's arithmetic
from a Mersenne-Twister stream (numpy's RandomState has boost::mt19937's raw stream), so they reproduce
Caffe's values for the same seed and draw order. Gaussian and msra use numpy's normal generator: the
distribution is Caffe's, the exact numbers are not (Caffe uses Boost's ziggurat).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ResnetcError
from .proto import caffe_pb2


class CaffeRNG:
    """A boost::mt19937-compatible stream (raw 32-bit draws), as Caffe's ``caffe_rng``."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int.from_bytes(np.random.SeedSequence().generate_state(1, dtype=np.uint32).tobytes(), "little")
        self._rs = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def raw(self, n: int) -> np.ndarray:
        return self._rs.randint(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)

    def uniform(self, n: int, lo: float, hi: float) -> np.ndarray:
        """boost::uniform_real<float>(lo, nextafter(hi)) as Caffe's caffe_rng_uniform draws it."""
        lo32 = np.float32(lo)
        hi32 = np.nextafter(np.float32(hi), np.float32(np.inf), dtype=np.float32)
        span = np.float32(hi32 - lo32)
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            x = self.raw(n - filled).astype(np.float32)
            u = (x / np.float32(4294967296.0)).astype(np.float32) * span + lo32
            u = u[u < hi32]
            out[filled:filled + len(u)] = u
            filled += len(u)
        return out

    def normal(self, n: int, mean: float, std: float) -> np.ndarray:
        return self._rs.normal(mean, std, size=n).astype(np.float32)

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        if p == 0:
            return np.zeros(n, dtype=bool)
        x = self.raw(n).astype(np.float64)
        return x <= p * 4294967295.0


def _fans(shape) -> tuple:
    count = int(np.prod(shape)) if len(shape) else 1
    fan_in = count // shape[0] if len(shape) >= 1 and shape[0] else count
    fan_out = count // shape[1] if len(shape) >= 2 and shape[1] else count
    return fan_in, fan_out


def _n(filler: caffe_pb2.FillerParameter, shape) -> float:
    fan_in, fan_out = _fans(shape)
    vn = filler.variance_norm
    if vn == caffe_pb2.FillerParameter.FAN_OUT:
        return float(fan_out)
    if vn == caffe_pb2.FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return float(fan_in)


def fill(filler: caffe_pb2.FillerParameter | None, shape, rng: CaffeRNG, *, where: str = "") -> np.ndarray:
    """Values of one blob of ``shape`` filled by ``filler`` (None = zeros), float32, C order."""
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape)) if shape else 1
    if filler is None:
        return np.zeros(shape, dtype=np.float32)
    t = filler.type
    if filler.sparse != -1 and t != "gaussian":
        raise ResnetcError(f"{where}filler '{t}' does not take `sparse` (only gaussian does)")
    if t == "constant":
        data = np.full(count, filler.value, dtype=np.float32)
    elif t == "uniform":
        if filler.min > filler.max:
            raise ResnetcError(f"{where}uniform filler needs min <= max (got {filler.min} > {filler.max})")
        data = rng.uniform(count, filler.min, filler.max)
    elif t == "gaussian":
        if filler.std <= 0:
            raise ResnetcError(f"{where}gaussian filler needs std > 0")
        data = rng.normal(count, filler.mean, filler.std)
        if filler.sparse >= 0:
            p = filler.sparse / shape[0] if shape else 0.0
            if p > 1:
                raise ResnetcError(f"{where}gaussian filler: sparse/num_output must be <= 1")
            data = data * rng.bernoulli(count, p).astype(np.float32)
    elif t == "positive_unitball":
        data = rng.uniform(count, 0.0, 1.0).reshape(shape[0] if shape else 1, -1)
        data = (data / data.sum(axis=1, keepdims=True)).astype(np.float32).ravel()
    elif t == "xavier":
        a = math.sqrt(3.0 / _n(filler, shape))
        data = rng.uniform(count, -a, a)
    elif t == "msra":
        data = rng.normal(count, 0.0, math.sqrt(2.0 / _n(filler, shape)))
    elif t == "bilinear":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ResnetcError(f"{where}bilinear filler needs a 4-D blob with a square kernel, got {shape}")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        ys, xs = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        w = (1 - np.abs(xs / f - c)) * (1 - np.abs(ys / f - c))
        data = np.broadcast_to(w.astype(np.float32), shape).copy().ravel()
    else:
        raise ResnetcError(f"{where}unknown filler type '{t}' (constant, uniform, gaussian, positive_unitball, "
                           f"xavier, msra, bilinear)")
    return np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
