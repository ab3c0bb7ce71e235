"""Reed-Solomon erasure coding over GF(2^8), byte-compatible with ISA-L.

``RSCode(k, m)`` protects k data shards with m parity shards. Parity rows are
rows k..k+m-1 of ISA-L's ``gf_gen_cauchy1_matrix(k + m, k)`` with polynomial
0x11D, so parity bytes equal ISA-L's and pyeclib's ``isa_l_rs_cauchy`` payloads.

RS works column by column: byte b of every parity shard depends only on byte b
of the data shards. Encoding a byte range of a stripe therefore costs only that
range (:meth:`RSCode.encode_range`), which is how ghostserve checkpoints one
decode step without touching the rest of a block.

Buffers: shards are a 2-D uint8 array (one row each) or a sequence of 1-D byte
buffers (numpy views at any offset or stride, memoryviews, CPU torch uint8
tensors, or CuPy arrays for the GPU backend). The caller owns them; nothing is
retained. Outputs are written in place. All methods are safe to call from
several threads at once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ghostserve.codec import backends, gf
from ghostserve.codec.shards import Shards, as_shards, check_lengths, is_device_array
from ghostserve.errors import InvalidCodeParameters, ShardError, TooManyErasures

__all__ = ["RSCode", "backends", "gf"]


class RSCode:
    """A systematic (k + m, k) Reed-Solomon code with a Cauchy generator.

    ``backend``: ``"auto"`` (CuPy with a CUDA device, else ISA-L), ``"isal"``,
    ``"cupy"`` or ``"reference"``; extra keyword options go to the backend
    (``threads=`` for ISA-L).
    """

    def __init__(self, k: int, m: int, backend: str = "auto", **backend_options: Any):
        for name, value in (("k", k), ("m", m)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidCodeParameters(k, m, f"{name} must be an int")
        if k < 1 or m < 1:
            raise InvalidCodeParameters(k, m, "k and m must both be >= 1")
        if k + m > 255:
            raise InvalidCodeParameters(k, m, "k + m must be <= 255 over GF(2^8)")
        self.k, self.m = k, m
        self.matrix = gf.cauchy_matrix(k, m)
        self.matrix.flags.writeable = False
        self.backend = backends.load(backend, **backend_options)
        self._decode: dict[tuple[int, ...], tuple[tuple[int, ...], np.ndarray]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RSCode(k={self.k}, m={self.m}, backend={self.backend.name!r})"

    @property
    def parity_matrix(self) -> np.ndarray:
        """The (m, k) parity rows of the generator."""
        return self.matrix[self.k :]

    # ------------------------------------------------------------------ encode

    def encode(self, data: Any) -> Any:
        """Parity of ``data`` (k shards of L bytes) as a new (m, L) array
        (a CuPy array when ``data`` is on the device)."""
        src = as_shards(data, self.k, writable=False, what="data")
        length = len(src[0])
        if is_device_array(src[0]):
            import cupy  # noqa: PLC0415

            parity = cupy.empty((self.m, length), dtype=cupy.uint8)
        else:
            parity = np.empty((self.m, length), dtype=np.uint8)
        self._apply(self.parity_matrix, src, as_shards(parity, self.m, writable=True, what="parity"))
        return parity

    def encode_into(self, data: Any, parity: Any) -> None:
        """Write the parity of ``data`` into ``parity`` (m shards), allocating nothing
        for contiguous buffers."""
        if (
            type(data) is np.ndarray and type(parity) is np.ndarray
            and data.ndim == 2 and parity.ndim == 2
            and data.dtype == np.uint8 and parity.dtype == np.uint8
            and data.shape[0] == self.k and parity.shape[0] == self.m
            and data.shape[1] == parity.shape[1] > 0
            and data.flags.c_contiguous and parity.flags.c_contiguous and parity.flags.writeable
        ):  # the common case, checked in a few attribute reads (see benchmarks/RESULTS.md)
            self.backend.matmul_arrays(self.parity_matrix, data, parity)
            return
        src = as_shards(data, self.k, writable=False, what="data")
        dst = as_shards(parity, self.m, writable=True, what="parity")
        check_lengths(dst, len(src[0]))
        self._apply(self.parity_matrix, src, dst)

    def encode_range(self, data: Any, parity: Any, start: int, stop: int) -> None:
        """Encode only bytes [start, stop) of each shard (the rest is untouched)."""
        src = as_shards(data, self.k, writable=False, what="data")
        dst = as_shards(parity, self.m, writable=True, what="parity")
        length = check_lengths(dst, len(src[0]))
        if not 0 <= start < stop <= length:
            raise ShardError(f"byte range [{start}, {stop}) is outside 0..{length}")
        self._apply(self.parity_matrix, src.sliced(start, stop), dst.sliced(start, stop))

    # ------------------------------------------------------------- reconstruct

    def decode_matrix(self, erased: Sequence[int]) -> tuple[tuple[int, ...], np.ndarray]:
        """(survivors, coeffs) for an erasure pattern: the k shard indices to read
        and the (len(erased), k) matrix giving the erased shards from them.
        Cached per pattern."""
        key = tuple(sorted(set(int(e) for e in erased)))
        if len(key) != len(erased):
            raise TooManyErasures(erased, self.m, f"duplicate index in erasures {list(erased)}")
        if any(e < 0 or e >= self.k + self.m for e in key):
            raise TooManyErasures(erased, self.m, f"erasure index outside 0..{self.k + self.m - 1}")
        if len(key) > self.m:
            raise TooManyErasures(key, self.m)
        hit = self._decode.get(key)
        if hit is not None:
            return hit
        survivors = tuple(i for i in range(self.k + self.m) if i not in key)[: self.k]
        inverse = gf.invert(self.matrix[list(survivors)], survivors)
        coeffs = gf.matmul(self.matrix[list(key)], inverse) if key else np.zeros((0, self.k), np.uint8)
        coeffs.flags.writeable = False
        with self._lock:
            return self._decode.setdefault(key, (survivors, coeffs))

    def reconstruct(self, shards: Any, erased: Sequence[int]) -> Any:
        """Rebuild the ``erased`` rows of ``shards`` (k + m shards) in place from
        the others and return ``shards``, all rows valid. Bytes in erased rows are
        ignored on input. Raises :class:`TooManyErasures` for more than m."""
        views = as_shards(shards, self.k + self.m, writable=True, what="shards")
        survivors, coeffs = self.decode_matrix(list(erased))
        if len(coeffs):
            ordered = sorted(set(int(e) for e in erased))
            self._apply(coeffs, views.pick(survivors), views.pick(ordered))
        return shards

    def rebuild(self, shards: Sequence[Any], erased: Sequence[int], want: Sequence[int]) -> None:
        """Rebuild only the rows ``want`` (a subset of ``erased``) in place.

        ``shards`` has k + m entries; entries at erased indices not in ``want``
        may be None (a lost rank with no memory yet). Used by the restorer,
        which writes the replacement's shard and repairs corrupt survivors
        without needing buffers for ranks that are still gone.
        """
        if len(shards) != self.k + self.m:
            raise ShardError(f"shards: {len(shards)} entries, expected {self.k + self.m}")
        survivors, coeffs = self.decode_matrix(list(erased))
        ordered = sorted(set(int(e) for e in erased))
        if not set(want) <= set(ordered):
            raise ShardError(f"want {list(want)} must be a subset of erased {ordered}")
        if not want:
            return
        src = as_shards([shards[i] for i in survivors], self.k, writable=False, what="survivors")
        dst = as_shards([shards[w] for w in want], len(want), writable=True, what="outputs")
        check_lengths(dst, len(src[0]))
        rows = np.ascontiguousarray(coeffs[[ordered.index(w) for w in want]])
        rows.flags.writeable = False
        self._apply(rows, src, dst)

    def verify(self, shards: Any) -> bool:
        """True when the parity rows of ``shards`` (k + m shards) match its data rows."""
        views = as_shards(shards, self.k + self.m, writable=False, what="shards")
        length = len(views[0])
        xp: Any = np
        if is_device_array(views[0]):
            import cupy  # noqa: PLC0415

            xp = cupy
        fresh = xp.empty((self.m, length), dtype=xp.uint8)
        self._apply(
            self.parity_matrix, views.pick(range(self.k)), as_shards(fresh, self.m, writable=True, what="parity")
        )
        return all(bool((fresh[j] == views[self.k + j]).all()) for j in range(self.m))

    # ---------------------------------------------------------------- internal

    def _apply(self, coeffs: np.ndarray, src: Shards, dst: Shards) -> None:
        if (src.device or dst.device) and not self.backend.accepts_device_arrays():
            raise ShardError(f"device (CuPy) arrays need the cupy backend, not {self.backend.name!r}")
        self.backend.matmul(coeffs, src, dst)
