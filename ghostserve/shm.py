"""Named POSIX shared memory without Python's resource tracker.

``multiprocessing.shared_memory`` registers every segment it opens with a
tracker process that unlinks it when the opener exits. That is wrong for
ghostserve: parity must outlive a SIGKILLed daemon, and the daemon must be able
to map a worker's KV without taking ownership. So this module opens segments
directly (``shm_open`` through ``_posixshmem``, falling back to ``/dev/shm``)
and never unlinks anything unless asked to.

A :class:`Segment` owns one mapping. Views from :meth:`Segment.array` share it;
``close()`` unmaps once no view is left (a live view keeps the mapping alive,
so closing never invalidates memory someone still reads).
"""

from __future__ import annotations

import mmap
import os
import re

import numpy as np

try:  # CPython's own binding of shm_open/shm_unlink
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX
    _posixshmem = None

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def check_name(name: str) -> str:
    """A valid segment name (no slashes; letters, digits, ``._-``); raises ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid shared memory name {name!r}")
    return name


def _open(name: str, flags: int, mode: int = 0o600) -> int:
    if _posixshmem is not None:
        return _posixshmem.shm_open("/" + name, flags, mode)
    return os.open(os.path.join("/dev/shm", name), flags, mode)


class Segment:
    """One mapped shared-memory object."""

    def __init__(self, name: str, size: int, mm: mmap.mmap):
        self.name, self.size, self._mm = name, size, mm

    @classmethod
    def create(cls, name: str, size: int, *, exist_ok: bool = False) -> Segment:
        """Create (zero-filled) and map ``name`` of ``size`` bytes."""
        check_name(name)
        if size <= 0:
            raise ValueError("size must be positive")
        flags = os.O_CREAT | os.O_RDWR | (0 if exist_ok else os.O_EXCL)
        fd = _open(name, flags)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm)

    @classmethod
    def attach(cls, name: str, size: int | None = None) -> Segment:
        """Map an existing ``name``; with ``size``, require at least that many bytes.
        Raises FileNotFoundError or ValueError."""
        check_name(name)
        fd = _open(name, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if size is not None and actual < size:
                raise ValueError(f"shared memory {name!r} has {actual} bytes, expected {size}")
            if actual == 0:
                raise ValueError(f"shared memory {name!r} is empty")
            mm = mmap.mmap(fd, actual)
        finally:
            os.close(fd)
        return cls(name, actual, mm)

    def array(self, dtype=np.uint8, offset: int = 0, count: int = -1) -> np.ndarray:
        """A numpy view of the mapping (no copy)."""
        return np.frombuffer(self._mm, dtype=dtype, count=count, offset=offset)

    @property
    def buf(self) -> mmap.mmap:
        return self._mm

    def close(self) -> None:
        """Unmap now if no view is alive, else when the last view goes."""
        try:
            self._mm.close()
        except BufferError:
            pass  # views still exported: the mapping lives until they are gone


def unlink(name: str) -> bool:
    """Remove ``name``; True if it existed. Mapped copies stay valid until unmapped."""
    check_name(name)
    try:
        if _posixshmem is not None:
            _posixshmem.shm_unlink("/" + name)
        else:
            os.unlink(os.path.join("/dev/shm", name))
        return True
    except FileNotFoundError:
        return False


def exists(name: str) -> bool:
    try:
        os.close(_open(check_name(name), os.O_RDONLY))
        return True
    except FileNotFoundError:
        return False


def list_names(prefix: str) -> list[str]:
    """Segment names starting with ``prefix`` (Linux: read from /dev/shm)."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except FileNotFoundError:  # pragma: no cover
        return []
