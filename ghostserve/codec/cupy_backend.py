"""The GPU backend: ``cuda/rs_kernels.cu`` compiled with ``cupy.RawModule`` (NVRTC).

Accepts CuPy arrays (used in place, zero-copy, when contiguous) and host numpy
arrays (copied to the device and back). For each coefficient matrix the product
tables (``r*k*256`` bytes, from :func:`gf.mul_table`) or, when those would not
fit in 48 KiB of shared memory, the small log/exp blob are built on the host once
and cached on the device.

Streams: ``matmul`` runs on the backend's own non-blocking stream (one per
device), made to wait first for the work the caller has queued on its current
stream (so CuPy inputs written just before are read correctly). With every
shard on the device the host does not wait: the caller's current stream is
made to wait for the kernels instead (stream order, as CuPy's own operations);
with host shards the call returns when they are written. :meth:`CupyBackend.launch`
is the daemon's path: raw device addresses, many stripes in one launch, queued on
the caller's stream, no host wait. Safe to call from several threads at once.

The kernels' arithmetic is the ``__host__ __device__`` code of ``cuda/gf256.cuh``;
``tests/test_cuda.py`` builds it for the host and compares it with ISA-L byte for
byte, and checks the mirrors here (:func:`smem_bytes`, :func:`split`, the table
builders) against the C ones. CuPy is imported only when the backend is created.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ghostserve.codec import gf
from ghostserve.codec.backends import Backend
from ghostserve.codec.shards import is_device_array
from ghostserve.errors import BackendUnavailable, ShardError

# Mirrors of gf256.cuh (checked by tests/test_cuda.py against the host library).
BLOCK_THREADS = 256          # gs::GS_BLOCK_THREADS, the kernels' __launch_bounds__
SMEM_LIMIT = 48 * 1024       # dynamic shared memory a block gets without an opt-in
BLOB_LOG_OFFSET = 512        # blob: exp[512] | log[256] | clog[r*k]
BLOB_CLOG_OFFSET = 768
LOG_ZERO = 255               # clog of a zero coefficient

MAX_GRID_Y = 65535           # CUDA's limit on gridDim.y: sets per launch
KERNEL_TABLES = "gs_matmul_tables"
KERNEL_LOGEXP = "gs_matmul_logexp"
MAX_CACHED_TABLES = 4096     # per device; oldest dropped beyond that

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_.\-]+)"[ \t]*$', re.MULTILINE)


def cuda_dir() -> Path:
    """The kernel sources: ``$GHOSTSERVE_CUDA_DIR``, else ``ghostserve/cuda/`` (package data)."""
    env = os.environ.get("GHOSTSERVE_CUDA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "cuda"


def kernel_source(directory: Path | None = None) -> str:
    """``rs_kernels.cu`` with its local ``#include "..."`` files pasted in.

    Inlined rather than left to ``-I``: CuPy's compile cache is keyed by the
    source text and options, not by included files, so an edited header would
    otherwise be served stale from the cache.
    """
    directory = cuda_dir() if directory is None else directory
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:  # include guards make a second copy empty anyway
            return ""
        seen.add(name)
        text = (directory / name).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand("rs_kernels.cu")


def _align16(n: int) -> int:
    return (n + 15) & ~15


def smem_bytes(r: int, k: int, logexp: bool) -> int:
    """Dynamic shared memory of one block (``gs_smem_bytes``): the k + r pointers,
    padded to 16 bytes, then the product tables or the log/exp blob."""
    ptrs = _align16(8 * (r + k))
    return ptrs + (_align16(BLOB_CLOG_OFFSET + r * k) if logexp else 256 * r * k)


def uses_logexp(r: int, k: int) -> bool:
    """True when the product tables do not fit in a block's default shared memory."""
    return smem_bytes(r, k, False) > SMEM_LIMIT


def rows_per_launch(r: int, k: int) -> int:
    """Outputs one launch computes: all r when a kernel's shared memory fits (always
    for a Reed-Solomon code, r + k <= 255), else the most that fit the log/exp one."""
    if smem_bytes(r, k, uses_logexp(r, k)) <= SMEM_LIMIT:
        return r
    fixed = smem_bytes(0, k, True)  # the same formula with no outputs
    rows = min(r, max(0, (SMEM_LIMIT - fixed + 32) // (k + 8) + 1))  # >= the answer
    while rows > 0 and smem_bytes(rows, k, True) > SMEM_LIMIT:
        rows -= 1
    if rows < 1:
        raise ShardError(f"{k} input shards do not fit a kernel's shared memory")
    return rows


def product_tables(coeffs: np.ndarray) -> np.ndarray:
    """The r*k*256 product tables: byte ``(j*k + i)*256 + x`` is ``coeffs[j, i] * x``."""
    return np.ascontiguousarray(gf.mul_table()[np.asarray(coeffs, dtype=np.uint8).reshape(-1)]).reshape(-1)


def logexp_blob(coeffs: np.ndarray) -> np.ndarray:
    """exp[512] | log[256] | clog[r*k] | zeros to a multiple of 16 (see gf256.cuh)."""
    c = np.asarray(coeffs, dtype=np.uint8).reshape(-1)
    blob = np.zeros(_align16(BLOB_CLOG_OFFSET + c.size), dtype=np.uint8)
    blob[:BLOB_LOG_OFFSET] = gf.EXP
    blob[BLOB_LOG_OFFSET:BLOB_CLOG_OFFSET] = gf.LOG.astype(np.uint8)  # LOG[0] = 0, never used
    blob[BLOB_CLOG_OFFSET : BLOB_CLOG_OFFSET + c.size] = np.where(c == 0, LOG_ZERO, gf.LOG[c]).astype(np.uint8)
    return blob


def split(addrs: Sequence[int], length: int) -> tuple[int, int]:
    """(head, nwords) of ``gs_split``: words need all addresses equal modulo 4."""
    a0 = int(addrs[0])
    if any((int(a) ^ a0) & 3 for a in addrs):
        return 0, 0
    head = min((-a0) & 3, length)
    return head, (length - head) >> 2


def grid_blocks(units: int, max_blocks: int) -> int:
    """Blocks for ``units`` per-thread work items (grid-stride): enough for one item
    a thread, at most ``max_blocks`` (one resident wave), at least 1."""
    return max(1, min(-(-units // BLOCK_THREADS), max_blocks))


def resident_blocks(sm_count: int, smem_per_sm: int, threads_per_sm: int, smem: int) -> int:
    """Blocks of BLOCK_THREADS threads and ``smem`` bytes that fit on the device at once
    (1 KiB of shared memory per block is reserved by the driver)."""
    per_sm = min(threads_per_sm // BLOCK_THREADS, smem_per_sm // (smem + 1024))
    return max(1, sm_count * max(1, per_sm))


def _rows(cp: Any, n: int, length: int) -> Any:
    """n device rows of ``length`` bytes, each starting 256-byte aligned (so the
    kernels' 4-byte word path applies to them)."""
    pitch = (length + 255) & ~255
    return cp.empty((n, pitch), dtype=cp.uint8)[:, :length]


class _DeviceState:
    """Per device: compiled kernels, the stream, the cached tables."""

    def __init__(self, cupy: Any, device_id: int, source: str, include: str):
        rt = cupy.cuda.runtime
        self.device_id = device_id
        module = cupy.RawModule(code=source, options=("-I" + include,))
        self.kernels = {False: module.get_function(KERNEL_TABLES), True: module.get_function(KERNEL_LOGEXP)}
        self.stream = cupy.cuda.Stream(non_blocking=True)
        attr = rt.deviceGetAttribute
        self.sm_count = attr(rt.cudaDevAttrMultiProcessorCount, device_id)
        self.smem_per_sm = attr(rt.cudaDevAttrMaxSharedMemoryPerMultiprocessor, device_id)
        self.threads_per_sm = attr(rt.cudaDevAttrMaxThreadsPerMultiProcessor, device_id)
        self.tables: dict[bytes, tuple[bool, Any]] = {}
        self.lock = threading.Lock()


class CupyBackend(Backend):
    """GF(2^8) matrix-apply with the CUDA kernels of ``cuda/rs_kernels.cu``.

    ``device``: the CUDA device for calls whose shards are all on the host
    (default: the current device when the backend is created); calls with CuPy
    arrays run on those arrays' device. ``threads`` and ``parallel_min_bytes``
    (ISA-L options) are accepted and ignored, so ``backend="auto"`` takes the
    same options whichever backend it picks.
    """

    name = "cupy"

    def __init__(self, device: int | None = None, threads: int = 1, parallel_min_bytes: int = 0):
        del threads, parallel_min_bytes
        try:
            import cupy  # noqa: PLC0415
        except ImportError as exc:
            raise BackendUnavailable("cupy", f"CuPy is not installed ({exc}); pip install 'ghostserve[gpu]'") from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver, ...
            raise BackendUnavailable("cupy", f"no usable CUDA driver ({exc})") from exc
        if count < 1:
            raise BackendUnavailable("cupy", "no CUDA device")
        directory = cuda_dir()
        try:
            self._source = kernel_source(directory)
        except OSError as exc:
            raise BackendUnavailable(
                "cupy", f"kernel sources not readable in {directory} (set GHOSTSERVE_CUDA_DIR): {exc}"
            ) from exc
        self._include = str(directory)
        self._cp = cupy
        self.device = cupy.cuda.Device().id if device is None else int(device)
        if not 0 <= self.device < count:
            raise BackendUnavailable("cupy", f"no CUDA device {self.device} (found {count})")
        self._states: dict[int, _DeviceState] = {}
        self._lock = threading.Lock()
        try:
            self._state(self.device)  # compile now: fail here, with the log, not on first use
        except Exception as exc:
            raise BackendUnavailable("cupy", f"cannot build the CUDA kernels: {exc}") from exc

    def accepts_device_arrays(self) -> bool:
        return True

    # ----------------------------------------------------------------- internals

    def _state(self, device_id: int) -> _DeviceState:
        state = self._states.get(device_id)
        if state is None:
            with self._lock:
                state = self._states.get(device_id)
                if state is None:
                    with self._cp.cuda.Device(device_id):
                        state = _DeviceState(self._cp, device_id, self._source, self._include)
                    self._states[device_id] = state
        return state

    def _tables(self, state: _DeviceState, coeffs: np.ndarray) -> tuple[bool, Any]:
        """(logexp, device buffer) for ``coeffs``; call with the state's device and
        stream current (the upload is queued on it, before any kernel using it)."""
        r, k = coeffs.shape
        key = r.to_bytes(2, "little") + coeffs.tobytes()
        hit = state.tables.get(key)
        if hit is None:
            logexp = uses_logexp(r, k)
            host = logexp_blob(coeffs) if logexp else product_tables(coeffs)
            made = (logexp, self._cp.asarray(host))
            with state.lock:
                hit = state.tables.setdefault(key, made)
                while len(state.tables) > MAX_CACHED_TABLES:
                    del state.tables[next(iter(state.tables))]
        return hit

    # -------------------------------------------------------------------- matmul

    def matmul(self, coeffs: np.ndarray, src: Sequence[Any], dst: Sequence[Any]) -> None:
        cp = self._cp
        coeffs = np.asarray(coeffs, dtype=np.uint8)
        if coeffs.ndim != 2 or coeffs.shape != (len(dst), len(src)):
            raise ShardError(f"coeffs {coeffs.shape} do not match {len(dst)} outputs x {len(src)} inputs")
        r, k = coeffs.shape
        if r == 0:
            return
        length = len(src[0])
        if length == 0:
            return
        on_device = [a for a in (*src, *dst) if is_device_array(a)]
        device_id = on_device[0].device.id if on_device else self.device
        for a in on_device:
            if a.device.id != device_id:
                raise ShardError(f"shards on CUDA devices {device_id} and {a.device.id}; use one device")
        with cp.cuda.Device(device_id):
            state = self._state(device_id)
            stream = state.stream
            caller = cp.cuda.get_current_stream()
            if on_device:
                # Read the caller's arrays only after the work it queued on its stream.
                ready = cp.cuda.Event(disable_timing=True)
                ready.record(caller)
                stream.wait_event(ready)
            step = rows_per_launch(r, k)
            with stream:
                for r0 in range(0, r, step):
                    self._launch(state, coeffs[r0 : r0 + step], src, dst[r0 : r0 + step], length)
            if len(on_device) == len(src) + len(dst):
                done = cp.cuda.Event(disable_timing=True)
                done.record(stream)
                caller.wait_event(done)  # outputs ready in the caller's stream order
            else:
                stream.synchronize()     # host outputs are written now

    def launch(self, coeffs: np.ndarray, src: Sequence[Sequence[int]], dst: Sequence[Sequence[int]], nbytes: int,
               stream: Any) -> None:
        """Queue ``dst[i] = coeffs * src[i]`` for every set i on ``stream`` (a CuPy
        stream; its device is the one used), shards given as raw device addresses
        of ``nbytes`` each. The pointer and table uploads are queued on the same
        stream, before the kernels; the host does not wait. The caller keeps every
        buffer alive until the stream has passed this work."""
        coeffs = np.asarray(coeffs, dtype=np.uint8)
        if coeffs.ndim != 2 or len(src) != len(dst):
            raise ShardError(f"coeffs {coeffs.shape}, {len(src)} source sets and {len(dst)} destination sets")
        r, k = coeffs.shape
        if any(len(s) != k for s in src) or any(len(d) != r for d in dst):
            raise ShardError(f"every set needs {k} sources and {r} destinations")
        if not src or r == 0 or nbytes == 0:
            return
        with self._cp.cuda.Device(stream.device_id), stream:
            state = self._state(stream.device_id)
            step = rows_per_launch(r, k)
            for r0 in range(0, r, step):
                self._launch_sets(state, coeffs[r0 : r0 + step], [list(s) for s in src],
                                  [list(d)[r0 : r0 + step] for d in dst], nbytes)

    def _launch_sets(self, state: _DeviceState, coeffs: np.ndarray, src: Sequence[Sequence[int]],
                     dst: Sequence[Sequence[int]], length: int) -> None:
        """The kernel over every (sources, destinations) set, on the current stream."""
        cp = self._cp
        r, k = coeffs.shape
        logexp, table = self._tables(state, coeffs)
        sets = [list(map(int, s)) + list(map(int, d)) for s, d in zip(src, dst, strict=True)]
        addrs = cp.asarray(np.array(sets, dtype=np.uint64).reshape(-1))
        units = 1
        for one in sets:  # per-thread items: words, then edge bytes
            _, nwords = split(one, length)
            units = max(units, nwords, length - 4 * nwords)
        smem = smem_bytes(r, k, logexp)
        resident = resident_blocks(state.sm_count, state.smem_per_sm, state.threads_per_sm, smem)
        blocks = grid_blocks(units, max(1, resident // len(sets)))
        for y0 in range(0, len(sets), MAX_GRID_Y):
            ny = min(MAX_GRID_Y, len(sets) - y0)
            state.kernels[logexp](
                (blocks, ny), (BLOCK_THREADS,),
                (table, addrs[y0 * (k + r):], np.int32(r), np.int32(k), np.uint64(length)),
                shared_mem=smem,
            )

    def _launch(self, state: _DeviceState, coeffs: np.ndarray, src: Sequence[Any], dst: Sequence[Any],
                length: int) -> None:
        cp = self._cp
        r, k = coeffs.shape

        # Sources: device arrays as they are (contiguous copies of strided views),
        # host arrays through one staging buffer.
        host_src = [i for i, s in enumerate(src) if not is_device_array(s)]
        staging: Any = _rows(cp, len(host_src), length) if host_src else None
        dsrc: list[Any] = list(src)
        for n, i in enumerate(host_src):
            staging[n].set(np.ascontiguousarray(src[i]))
            dsrc[i] = staging[n]
        for i, s in enumerate(dsrc):
            if not s.flags.c_contiguous:
                dsrc[i] = cp.ascontiguousarray(s)

        # Outputs: contiguous device arrays written in place, the rest through
        # one scratch buffer copied out after the kernel.
        scratch_rows = [j for j, d in enumerate(dst) if not (is_device_array(d) and d.flags.c_contiguous)]
        scratch: Any = _rows(cp, len(scratch_rows), length) if scratch_rows else None
        ddst: list[Any] = list(dst)
        for n, j in enumerate(scratch_rows):
            ddst[j] = scratch[n]

        self._launch_sets(state, coeffs, [[a.data.ptr for a in dsrc]], [[a.data.ptr for a in ddst]], length)

        for n, j in enumerate(scratch_rows):
            out = dst[j]
            if is_device_array(out):
                out[...] = scratch[n]
            elif isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable:
                scratch[n].get(stream=state.stream, out=out)
            else:
                out[...] = scratch[n].get(stream=state.stream)
