"""GF(2^8) arithmetic with the polynomial 0x11D, as ISA-L uses it.

Small and readable on purpose: these functions build the (tiny) coding and
decoding matrices that every backend then applies to bulk bytes. The generator
is ISA-L's ``gf_gen_cauchy1_matrix(k + m, k)``: identity on top, then
``a[i][j] = 1 / (i ^ j)`` for parity row i in k..k+m-1 and data column j.

Everything here is pure numpy on small arrays and safe to call from any thread.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ghostserve.errors import SingularMatrixError

POLY = 0x11D

# EXP has 512 entries so that EXP[LOG[a] + LOG[b]] needs no modulo.
EXP = np.zeros(512, dtype=np.uint8)
LOG = np.zeros(256, dtype=np.int32)
_x = 1
for _i in range(255):
    EXP[_i] = _x
    LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= POLY
for _i in range(255, 512):
    EXP[_i] = EXP[_i - 255]
del _x, _i


def mul(a: int, b: int) -> int:
    """a * b in GF(2^8)."""
    if a == 0 or b == 0:
        return 0
    return int(EXP[LOG[a] + LOG[b]])


def inv(a: int) -> int:
    """1 / a in GF(2^8); a must be non-zero."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(EXP[255 - LOG[a]])


@lru_cache(maxsize=1)
def mul_table() -> np.ndarray:
    """The full 256 x 256 product table, ``T[a, b] = a * b``."""
    a = np.arange(256)
    t = EXP[(LOG[a][:, None] + LOG[a][None, :])]
    t[0, :] = 0
    t[:, 0] = 0
    return t.astype(np.uint8)


def cauchy_matrix(k: int, m: int) -> np.ndarray:
    """The (k + m) x k systematic generator, equal to ISA-L's
    ``gf_gen_cauchy1_matrix(k + m, k)``: rows 0..k-1 identity, rows k.. parity."""
    g = np.zeros((k + m, k), dtype=np.uint8)
    g[:k] = np.eye(k, dtype=np.uint8)
    for i in range(k, k + m):
        for j in range(k):
            g[i, j] = inv(i ^ j)
    return g


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over GF(2^8) of small uint8 matrices (r x n) @ (n x c)."""
    t = mul_table()
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.uint8)
    for i in range(a.shape[1]):
        out ^= t[a[:, i][:, None], b[i][None, :]]
    return out


def invert(a: np.ndarray, rows: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of a square uint8 matrix over GF(2^8) by Gauss-Jordan elimination.

    Raises :class:`SingularMatrixError` (carrying ``rows``, the survivor indices
    the matrix was built from, when given) if it has no inverse.
    """
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"matrix must be square, got {a.shape}")
    t = mul_table()
    m = a.astype(np.uint8).copy()
    out = np.eye(n, dtype=np.uint8)
    for col in range(n):
        pivot = next((r for r in range(col, n) if m[r, col]), None)
        if pivot is None:
            raise SingularMatrixError(rows)
        if pivot != col:
            m[[col, pivot]] = m[[pivot, col]]
            out[[col, pivot]] = out[[pivot, col]]
        scale = inv(int(m[col, col]))
        m[col] = t[scale][m[col]]
        out[col] = t[scale][out[col]]
        for r in range(n):
            if r != col and m[r, col]:
                f = int(m[r, col])
                m[r] ^= t[f][m[col]]
                out[r] ^= t[f][out[col]]
    return out
