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
    def create(cls, name: str, size: int, *, exist_ok: bool = False, reserve: bool = False) -> Segment:
        """Create (zero-filled) and map ``name`` of ``size`` bytes. With ``reserve``
        the pages are allocated now (``posix_fallocate``), so a full ``/dev/shm``
        raises ``OSError(ENOSPC)`` here (and the segment is removed) instead of
        a SIGBUS at the first write."""
        check_name(name)
        if size <= 0:
            raise ValueError("size must be positive")
        flags = os.O_CREAT | os.O_RDWR | (0 if exist_ok else os.O_EXCL)
        fd = _open(name, flags)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            if reserve:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:
                    unlink(name)
                    raise
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm)

    @classmethod
    def attach(cls, name: str, size: int | None = None, *, populate: bool = False) -> Segment:
        """Map an existing ``name``; with ``size``, require at least that many bytes.
        With ``populate`` the page tables are filled now (``MAP_POPULATE``): the
        first touch of each page costs a fault otherwise, which would dominate a
        restore's time. Raises FileNotFoundError or ValueError."""
        check_name(name)
        fd = _open(name, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if size is not None and actual < size:
                raise ValueError(f"shared memory {name!r} has {actual} bytes, expected {size}")
            if actual == 0:
                raise ValueError(f"shared memory {name!r} is empty")
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            mm = mmap.mmap(fd, actual, flags=flags)
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


def identity(name: str) -> tuple[int, int]:
    """(device, inode) of segment ``name``: the same for every name of one object.
    Raises FileNotFoundError."""
    fd = _open(check_name(name), os.O_RDONLY)
    try:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino
    finally:
        os.close(fd)


def unlink_if(name: str, ident: tuple[int, int] | None) -> bool:
    """Unlink ``name`` only if it is still the object ``ident`` (a segment
    recreated under the same name by someone else is left alone)."""
    try:
        if ident is not None and identity(name) != tuple(ident):
            return False
    except FileNotFoundError:
        return False
    return unlink(name)


def free_bytes() -> int:
    """Bytes a new segment can still take in ``/dev/shm``."""
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def used_bytes(name: str) -> int:
    """Bytes of memory segment ``name`` occupies (its allocated pages), 0 if gone."""
    try:
        fd = _open(check_name(name), os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        return os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


class PrefixLock:
    """An exclusive lock on a shared-memory prefix: one daemon per prefix.

    ``flock`` on ``{prefix}.lock``, released by the kernel when the holder dies
    (a SIGKILLed daemon never blocks its successor). The file holds the
    holder's pid, for the refusal message."""

    def __init__(self, prefix: str):
        self.name = check_name(prefix + ".lock")
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock; returns None, or the pid of the daemon holding it."""
        import fcntl  # noqa: PLC0415 - POSIX only

        while True:
            fd = _open(self.name, os.O_CREAT | os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = int(os.pread(fd, 32, 0).split(b"\0")[0] or 0)
                finally:
                    os.close(fd)
                return holder or -1
            # the file may have been unlinked by a holder that just stopped: lock the live one
            try:
                same = identity(self.name) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._fd = fd
            return None

    def release(self) -> None:
        if self._fd is not None:
            unlink(self.name)
            os.close(self._fd)
            self._fd = None


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
