"""Turning what callers pass as shards into 1-D uint8 arrays, with clear errors.

A caller may pass a 2-D uint8 array (one shard per row) or a sequence of
one-dimensional byte buffers: numpy uint8 views (strided or at any offset),
``memoryview``/``bytearray``/``bytes``, CPU torch uint8 tensors (through DLPack,
without importing torch), or CuPy arrays (left as they are, for the GPU backend).

Nothing is copied here: every returned array is a view of the caller's memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ghostserve.errors import ShardError, ShardSizeMismatch


def is_device_array(obj: Any) -> bool:
    """True for a CuPy array (checked by module name, so CuPy is never imported here)."""
    return type(obj).__module__.startswith("cupy")


def _one(obj: Any, index: int, writable: bool) -> Any:
    if is_device_array(obj):
        arr = obj
        if arr.dtype.name != "uint8":
            raise ShardError(f"dtype {arr.dtype.name}, expected uint8", index)
    elif isinstance(obj, np.ndarray):
        arr = obj
    elif isinstance(obj, bytes | bytearray | memoryview):
        mv = memoryview(obj)
        if writable and mv.readonly:
            raise ShardError("read-only buffer given for output", index)
        arr = np.asarray(mv)  # keeps strides; a view, not a copy
        if arr.dtype != np.uint8 and mv.c_contiguous:
            arr = np.asarray(mv.cast("B"))
    elif hasattr(obj, "__dlpack__"):
        if getattr(obj, "is_cuda", False):
            raise ShardError("a CUDA tensor; pass a CuPy array (cupy.from_dlpack) instead", index)
        try:
            arr = np.from_dlpack(obj)
        except (TypeError, BufferError, RuntimeError) as exc:
            raise ShardError(f"cannot view as bytes through DLPack: {exc}", index) from exc
    else:
        raise ShardError(f"unsupported shard type {type(obj).__name__}", index)
    if arr.dtype != np.uint8:
        raise ShardError(f"dtype {arr.dtype}, expected uint8", index)
    if arr.ndim != 1:
        raise ShardError(f"{arr.ndim}-D, expected one-dimensional", index)
    if writable and isinstance(arr, np.ndarray) and not arr.flags.writeable:
        raise ShardError("read-only buffer given for output", index)
    return arr


class Shards(list):
    """A list of 1-D uint8 views; ``addrs`` holds their base addresses when they
    are the rows of one C-contiguous host array (saves a look-up per row)."""

    addrs: list[int] | None = None
    device: bool = False

    def pick(self, indices: Any) -> Shards:
        """The shards at ``indices``, in that order."""
        out = Shards(self[i] for i in indices)
        out.device = self.device
        if self.addrs is not None:
            out.addrs = [self.addrs[i] for i in indices]
        return out

    def sliced(self, start: int, stop: int) -> Shards:
        """Bytes [start, stop) of every shard."""
        out = Shards(v[start:stop] for v in self)
        out.device = self.device
        if self.addrs is not None:
            out.addrs = [a + start for a in self.addrs]
        return out


def as_shards(obj: Any, count: int, *, writable: bool, what: str) -> Shards:
    """Views of ``count`` shards from a 2-D array or a sequence of 1-D buffers.

    Raises :class:`ShardError` for a wrong type, dtype, count or a read-only
    output, and :class:`ShardSizeMismatch` when lengths differ or are zero.
    """
    if isinstance(obj, np.ndarray) or is_device_array(obj):
        if obj.ndim != 2:
            raise ShardError(f"{what}: a {obj.ndim}-D array, expected ({count}, L)")
        if obj.dtype != np.uint8:  # not .name: that builds a string each time (2 us)
            raise ShardError(f"{what}: dtype {obj.dtype}, expected uint8")
        if obj.shape[0] != count:
            raise ShardError(f"{what}: {obj.shape[0]} shards, expected {count}")
        if obj.shape[1] == 0:
            raise ShardSizeMismatch(0, 0, 0)
        if writable and isinstance(obj, np.ndarray) and not obj.flags.writeable:
            raise ShardError(f"{what}: read-only array given for output")
        views = Shards(obj)
        views.device = not isinstance(obj, np.ndarray)
        if not views.device and obj.flags.c_contiguous:
            base, stride = obj.ctypes.data, obj.strides[0]
            views.addrs = [base + i * stride for i in range(count)]
        return views
    if isinstance(obj, Sequence) and not isinstance(obj, bytes | bytearray | str):
        rows = list(obj)
    else:
        raise ShardError(
            f"{what}: expected a 2-D uint8 array or a sequence of buffers, got {type(obj).__name__}"
        )
    if len(rows) != count:
        raise ShardError(f"{what}: {len(rows)} shards, expected {count}")
    views = Shards(_one(r, i, writable) for i, r in enumerate(rows))
    views.device = any(is_device_array(v) for v in views)
    check_lengths(views)
    return views


def check_lengths(views: Sequence[Any], expected: int | None = None) -> int:
    """The common length of ``views``; raises :class:`ShardSizeMismatch` if any differs."""
    length = len(views[0]) if expected is None else expected
    for i, v in enumerate(views):
        if len(v) != length or length == 0:
            raise ShardSizeMismatch(i, length, len(v))
    return length
