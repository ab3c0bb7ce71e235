"""The ISA-L backend: Intel ISA-L's ``ec_encode_data`` through ctypes, zero-copy.

ISA-L is found in pyeclib's wheel (``pyeclib.libs/libisal*.so``) or as the
system ``libisal``. ctypes releases the GIL for the duration of each call, so
large ranges are split into cache-friendly chunks and encoded in parallel on a
shared thread pool; small ranges run on the caller's thread.

Thread safety: the expanded tables (32 bytes per coefficient, built once per
coefficient matrix by ``ec_init_tables``) are immutable after creation, so any
number of threads may call :meth:`IsalBackend.matmul` at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from ghostserve.codec.backends import Backend
from ghostserve.errors import BackendUnavailable

_u8p = ctypes.POINTER(ctypes.c_ubyte)
log = logging.getLogger(__name__)


def _candidates() -> list[str]:
    found: list[str] = []
    spec = importlib.util.find_spec("pyeclib")
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            found += sorted(glob.glob(os.path.join(os.path.dirname(location), "pyeclib.libs", "libisal*.so*")))
    system = ctypes.util.find_library("isal")
    if system:
        found.append(system)
    return found


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded ISA-L library, with argument types set. Raises BackendUnavailable."""
    tried = _candidates()
    for path in tried:
        try:
            lib = ctypes.CDLL(path)
            lib.ec_encode_data  # noqa: B018 - probe the symbol
        except (OSError, AttributeError):
            continue
        lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, _u8p, _u8p]
        lib.ec_init_tables.restype = None
        lib.ec_encode_data.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, _u8p,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p),
        ]
        lib.ec_encode_data.restype = None
        lib.gf_gen_cauchy1_matrix.argtypes = [_u8p, ctypes.c_int, ctypes.c_int]
        lib.gf_gen_cauchy1_matrix.restype = None
        lib.gf_invert_matrix.argtypes = [_u8p, _u8p, ctypes.c_int]
        lib.gf_invert_matrix.restype = ctypes.c_int
        lib.path = path  # type: ignore[attr-defined]  # where it came from, for reports
        return lib
    raise BackendUnavailable(
        "isal",
        "Intel ISA-L not found: install pyeclib (its wheel bundles libisal) "
        f"or the system libisal (tried: {tried or 'nothing found'})",
    )


def _ptr(a: np.ndarray) -> Any:  # a ctypes pointer to unsigned bytes
    return a.ctypes.data_as(_u8p)


def init_tables(coeffs: np.ndarray) -> np.ndarray:
    """ISA-L's expanded multiplication tables for an (r, k) coefficient matrix."""
    rows, k = coeffs.shape
    c = np.ascontiguousarray(coeffs, dtype=np.uint8)
    tables = np.empty(32 * rows * k, dtype=np.uint8)
    library().ec_init_tables(k, rows, _ptr(c), _ptr(tables))
    return tables


def encode_raw(tables: Any, length: int, src_addrs: Sequence[int], dst_addrs: Sequence[int]) -> None:
    """One ``ec_encode_data`` call on raw addresses (no checks: the caller owns them).
    ``tables`` is an array from :func:`init_tables` or a ctypes pointer to one."""
    k, rows = len(src_addrs), len(dst_addrs)
    if isinstance(tables, np.ndarray):
        tables = _ptr(tables)
    library().ec_encode_data(
        length, k, rows, tables,
        (ctypes.c_void_p * k)(*src_addrs), (ctypes.c_void_p * rows)(*dst_addrs),
    )


def cauchy1_matrix(k: int, m: int) -> np.ndarray:
    """ISA-L's own ``gf_gen_cauchy1_matrix(k + m, k)``: the oracle for ``gf.cauchy_matrix``."""
    a = np.zeros((k + m) * k, dtype=np.uint8)
    library().gf_gen_cauchy1_matrix(_ptr(a), k + m, k)
    return a.reshape(k + m, k)


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="gs-isal")
        return _pool


class IsalBackend(Backend):
    """ISA-L ``ec_encode_data``.

    ``threads``: 1 runs every call on the caller's thread (what the daemon uses,
    as it parallelises over stripes itself); N > 1 splits a call longer than
    ``parallel_min_bytes`` per shard into N chunks on a shared pool; 0 picks
    ``os.cpu_count()``.
    """

    name = "isal"

    def __init__(self, threads: int = 1, parallel_min_bytes: int = 1 << 20):
        library()  # fail now, with the reason, rather than on first use
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = threads or (os.cpu_count() or 1)
        self.parallel_min_bytes = parallel_min_bytes
        self._tables: dict[bytes, tuple[np.ndarray, Any]] = {}
        self._lock = threading.Lock()

    def tables(self, coeffs: np.ndarray) -> Any:
        """A ctypes pointer to ISA-L's tables for ``coeffs``, built once and cached
        (the array behind it is kept in the cache and never written again)."""
        key = coeffs.shape[0].to_bytes(2, "little") + coeffs.tobytes()
        hit = self._tables.get(key)
        if hit is None:
            t = init_tables(coeffs)
            with self._lock:
                hit = self._tables.setdefault(key, (t, _ptr(t)))
        return hit[1]

    def matmul_arrays(self, coeffs: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        length = src.shape[1]
        if self.threads > 1 and length >= self.parallel_min_bytes:
            return self.matmul(coeffs, list(src), list(dst))
        sb, ss, db, ds = src.ctypes.data, src.strides[0], dst.ctypes.data, dst.strides[0]
        k, rows = src.shape[0], dst.shape[0]
        library().ec_encode_data(
            length, k, rows, self.tables(coeffs),
            (ctypes.c_void_p * k)(*range(sb, sb + k * ss, ss)),
            (ctypes.c_void_p * rows)(*range(db, db + rows * ds, ds)),
        )

    def matmul(self, coeffs: np.ndarray, src: Sequence[np.ndarray], dst: Sequence[np.ndarray]) -> None:
        tables = self.tables(coeffs)
        length = len(src[0])
        # ISA-L wants plain pointers: strided views go through contiguous copies.
        sa = getattr(src, "addrs", None)
        if sa is None:
            srcc = [s if s.flags.c_contiguous else np.ascontiguousarray(s) for s in src]
            sa = [s.ctypes.data for s in srcc]  # srcc keeps the copies alive
        dstc = dst
        da = getattr(dst, "addrs", None)
        if da is None:
            dstc = [d if d.flags.c_contiguous else np.empty(length, dtype=np.uint8) for d in dst]
            da = [d.ctypes.data for d in dstc]
        if self.threads <= 1 or length < self.parallel_min_bytes:
            encode_raw(tables, length, sa, da)
        else:
            chunk = -(-length // self.threads)
            chunk = (chunk + 63) & ~63
            futures = [
                _shared_pool().submit(
                    encode_raw, tables, min(chunk, length - off),
                    [a + off for a in sa], [a + off for a in da],
                )
                for off in range(0, length, chunk)
            ]
            for f in futures:
                f.result()
        if dstc is not dst:
            for d, c in zip(dst, dstc, strict=True):
                if d is not c:
                    d[:] = c


# What crc32_iscsi_by16_10 (VPCLMULQDQ folding over zmm registers) executes. ISA-L's
# dispatcher does not choose it on every CPU that has these: on AMD Zen 4 it ran the
# crc32-instruction routine at half the speed (25 against 51 GB/s at 1 MiB).
_BY16_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "vpclmulqdq"})


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``; the kernel
    drops AVX-512 flags when it does not save the registers); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _agrees_with_base(lib: ctypes.CDLL, name: str) -> bool:
    """``name`` gives the portable routine's CRC for lengths around every fold width,
    unaligned starts and chained seeds."""
    fns = []
    for n in (name, "crc32_iscsi_base"):
        fn = lib[n]
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        fn.restype = ctypes.c_uint32
        fns.append(fn)
    data = np.random.default_rng(0x1C5C).integers(0, 256, 8192 + 64, dtype=np.uint8)
    base = data.ctypes.data
    for length in (0, 1, 7, 15, 16, 17, 31, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 1000, 4096, 8192):
        for start, seed in ((0, 0), (1, 0xFFFFFFFF), (3, 0x12345678), (33, 0x9E3779B9)):
            if fns[0](base + start, length, seed) != fns[1](base + start, length, seed):
                return False
    return True


@lru_cache(maxsize=1)
def crc32c_name() -> str:
    """The ISA-L routine behind :func:`crc32c`: ``crc32_iscsi_by16_10`` where the CPU
    has what it executes and it agrees with the portable routine, else the
    library's own dispatcher ``crc32_iscsi``."""
    lib = library()
    fast = "crc32_iscsi_by16_10"
    if _BY16_FLAGS <= cpu_flags() and hasattr(lib, fast) and hasattr(lib, "crc32_iscsi_base"):
        if _agrees_with_base(lib, fast):
            return fast
        log.warning("ISA-L's %s disagrees with crc32_iscsi_base here: using its dispatcher", fast)
    return "crc32_iscsi"


@lru_cache(maxsize=1)
def _crc_fn():
    fn = library()[crc32c_name()]
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    fn.restype = ctypes.c_uint32
    return fn


def crc32c(addr: int, length: int, seed: int = 0) -> int:
    """ISA-L's CRC32C (:func:`crc32c_name`) of ``length`` bytes at ``addr``, chained from
    ``seed``. Releases the GIL. The caller guarantees the bytes stay mapped."""
    return _crc_fn()(addr, length, seed)
