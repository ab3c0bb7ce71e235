"""Checking many stored CRC32C values with a few long CRC passes.

The daemon keeps one CRC32C per (block, chunk, rank), chained over the layers:
``k_c = crc(P[L-1,c], ... crc(P[0,c], 0))`` where ``P[l,c]`` is chunk c of layer l.
In memory a layer's chunks are contiguous, so a restore can CRC a whole run of
chunks of one layer in one ISA-L call, ``r_l = crc(P[l,c0] .. P[l,c1-1], 0)``.
CRC32C is affine in its seed: ``crc(B, s) = S_|B|(s) ^ crc(B, 0)`` with ``S_n`` a
linear map on 32-bit words (multiplying by x^(8n) modulo the polynomial). Writing
both sides out over the per-piece CRCs gives, for a run of n chunks of
``chunk_bytes`` each and S = S_chunk_bytes,

    XOR_l S^(L-1-l)(r_l)  ==  XOR_c S^(n-1-c)(k_c)

so L long CRC passes check n * L pieces. S is invertible, so a corrupted piece
that CRC32C would catch is caught here too; corruption in two pieces cancels
with probability about 2^-32. A run that fails is looked at chunk by chunk.

Both folds are Horner schemes, vectorised over any number of runs with numpy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ghostserve.codec.isal import crc32c


class CRCShift:
    """S_n as two 65536-entry tables, ``S(x) = lo[x & 0xFFFF] ^ hi[x >> 16]`` (S is
    linear). Built once from 33 ISA-L calls over a zero buffer (about a millisecond);
    calls are thread-safe."""

    def __init__(self, nbytes: int):
        if nbytes < 1:
            raise ValueError("a CRC shift needs nbytes >= 1")
        self.nbytes = nbytes
        zeros = np.zeros(nbytes, dtype=np.uint8)
        z = crc32c(zeros.ctypes.data, nbytes, 0)
        basis = np.array([crc32c(zeros.ctypes.data, nbytes, 1 << b) ^ z for b in range(32)], dtype=np.uint32)
        # table[x] = XOR of basis[b] over the set bits b of x, built by doubling
        self.lo = np.zeros(1, dtype=np.uint32)
        self.hi = np.zeros(1, dtype=np.uint32)
        for bit in range(16):
            self.lo = np.concatenate((self.lo, self.lo ^ basis[bit]))
            self.hi = np.concatenate((self.hi, self.hi ^ basis[16 + bit]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.lo[x & 0xFFFF] ^ self.hi[x >> 16]


@lru_cache(maxsize=64)
def shift(nbytes: int) -> CRCShift:
    return CRCShift(nbytes)


def horner(values: np.ndarray, s: CRCShift) -> np.ndarray:
    """``XOR_i S^(n-1-i)(values[..., i])`` over the last axis (n entries). Leading
    zeros change nothing, so shorter rows can be padded on the left."""
    values = np.asarray(values, dtype=np.uint32)
    acc = np.zeros(values.shape[:-1], dtype=np.uint32)
    for i in range(values.shape[-1]):
        acc = s(acc) ^ values[..., i]
    return acc


def pad_left(rows: list[np.ndarray], width: int) -> np.ndarray:
    """Rows of different lengths as one (len(rows), width) array, zeros on the left."""
    out = np.zeros((len(rows), width), dtype=np.uint32)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = r
    return out
