"""Caffe's random streams (CAFFE_SEMANTICS.md §5.2), for the data pipelines.

Caffe uses ``boost::mt19937`` seeded with a 32-bit seed; its raw stream equals numpy's legacy
``RandomState(seed)`` Mersenne Twister, one 32-bit output per draw.
"""
from __future__ import annotations

import os

import numpy as np

_U32 = 2 ** 32


def random_seed() -> int:
    """A seed from /dev/urandom, as Caffe does without ``random_seed``."""
    return int.from_bytes(os.urandom(4), "little")


class CaffeRNG:
    """A Caffe RNG: raw 32-bit draws, ``rand(n)`` (= raw mod n, DataTransformer::Rand), Caffe's shuffle."""

    def __init__(self, seed: int | None = None):
        self.seed = random_seed() if seed is None else int(seed) % _U32
        self._rs = np.random.RandomState(self.seed)

    def raw(self) -> int:
        return int(self._rs.randint(0, _U32, dtype=np.uint32))

    def raws(self, n: int) -> np.ndarray:
        return self._rs.randint(0, _U32, size=n, dtype=np.uint32)

    def rand(self, n: int) -> int:
        return self.raw() % n

    def uniform_int(self, r: int) -> int:
        """boost ``uniform_int(0, r)`` on 32-bit raw values (rejection with bucket size b)."""
        if r == 0:
            return 0
        brange = _U32 - 1
        b = brange // (r + 1)
        if brange % (r + 1) == r:
            b += 1
        while True:
            v = self.raw() // b
            if v <= r:
                return v

    def shuffle(self, items: list) -> None:
        """``caffe::shuffle``: Fisher-Yates from the end, in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.uniform_int(i)
            items[i], items[j] = items[j], items[i]
