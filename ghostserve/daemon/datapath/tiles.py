"""Restore's fused pass: check and rebuild one cache-sized tile at a time.

Rebuilding L bytes of a lost rank reads k shards (its k - 1 data survivors and a
parity row, or more parity when more ranks are lost) and writes one, so a
restore cannot beat ``memcpy * 2 / (k + 1)``. Checking every survivor against
its encode-time CRC32C in a pass of its own, then decoding, then checking the
rebuilt bytes, reads everything from memory two or three times. Here each
**tile** (whole chunks of every layer: up to ``tile_bytes`` of the lost rank,
``tile_bytes / num_layers`` of each layer, and k times that of sources) is

rebuilt layer by layer: each survivor's layer of the tile is checksummed
(CRC32C), then decoded at once, while it is in cache, into the thread's scratch
tile (one ``ec_encode_data``), and the rebuilt layer is checksummed from cache.
The per-layer checksums are folded (:mod:`ghostserve.codec.crcfold`) and compared
with the stored per-chunk ones, the survivors' and the target's; only a tile
that passed them all is copied into the target. A tile that is not OK writes
nothing.

A chunk's checksum covers all its layers, so a tile never splits a chunk (a
chunk larger than ``tile_bytes`` is a tile of its own); it may start anywhere
in a block and, where a layer's blocks lie back to back in memory, run on into
the next block (one CRC call per survivor and layer for the whole tile). Tiles
are handed out to the caller's thread and ``threads - 1`` tasks on the pool.
One tile is one call of a numba-compiled ``nogil`` kernel (:func:`tile`) that
makes all of a tile's ISA-L calls and checksum folds: with one Python call per ISA-L call,
threads handed the GIL back and forth between calls and two ran slower than one
(``benchmarks/checkpoint.py --tile-bytes``). Without numba the same kernel runs
as Python.

A tile whose survivors fail comes back ``SUSPECT`` and one whose rebuilt bytes
fail ``REBUILT_BAD`` (neither wrote anything); the caller redoes both chunk by chunk
(finding the bad chunks, treating them as erasures, reporting what is beyond
the code, zeroing rebuilt bytes that still do not verify). Nothing here decides
what is lost: it only proves tiles good. Masked checksums (partly filled
slot-addressed blocks) stay on the caller's path.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ghostserve.codec import crcfold
from ghostserve.codec.isal import crc32c_name, library
from ghostserve.daemon.layout import Layout

PARALLEL_BYTES = 2 << 20  # fewer rebuilt bytes than this run on the caller's thread
# a tile's piece of each layer is one CRC and one decode call per source: shorter
# calls stream from memory more slowly (many-layer models get larger tiles instead)
MIN_LAYER_BYTES = 64 << 10

OK, SUSPECT, REBUILT_BAD = 0, 1, 2

log = logging.getLogger(__name__)


def tiles(runs: Sequence[tuple[int, int, int]], layout: Layout, tile_bytes: int,
          joins: Callable[[int], bool] | None = None) -> list[tuple[int, int]]:
    """Split runs (block, c0, c1) of chunks into tiles of at most ``tile_bytes``
    per layer (at least one chunk each; a tile covers every layer). A tile is a
    range [g0, g1) of chunk numbers ``g = block * chunks + chunk``; it spans
    blocks only when a layer's blocks lie back to back in memory
    (``block_stride == block_bytes``), so that each layer of a tile is one
    contiguous range, and where ``joins(block)`` allows block to follow block - 1
    in one tile (a fetch: where their destinations lie back to back too)."""
    per = max(1, tile_bytes // layout.chunk_bytes)
    spans: list[list[int]] = []
    joined = layout.block_stride == layout.block_bytes or layout.num_blocks == 1
    for b, c0, c1 in runs:
        g0, g1 = b * layout.chunks + c0, b * layout.chunks + c1
        if joined and spans and spans[-1][1] == g0 and (joins is None or c0 or joins(b)):
            spans[-1][1] = g1
        else:
            spans.append([g0, g1])
    return [(g, min(g + per, g1)) for g0, g1 in spans for g in range(g0, g1, per)]


def block_runs(units: Sequence[tuple[int, int]], chunks: int) -> list[tuple[int, int, int]]:
    """Tiles [g0, g1) back as runs (block, c0, c1) that do not cross blocks."""
    out = []
    for g0, g1 in units:
        g = g0
        while g < g1:
            b = g // chunks
            e = min(g1, (b + 1) * chunks)
            out.append((b, g - b * chunks, e - b * chunks))
            g = e
    return out


@dataclass
class TilePlan:
    """Everything the tile workers read (nothing here is written by them)."""

    layout: Layout
    rank: int                      # the rank being rebuilt
    target: int                    # base address of its region
    survivors: dict[int, int]      # data rank -> base address, every one checked
    parity_addr: int               # base of the parity store, (layers, m, blocks, block_bytes)
    m: int
    sources: tuple[int, ...]       # shard indices the decode reads (>= n: parity rows)
    tables: Any                    # ISA-L tables giving ``rank`` from ``sources`` (ctypes pointer)
    crc: np.ndarray                # store.crc, (blocks, chunks, n)
    n: int
    # a fetch writes another group's memory: its layout, and source block -> its block
    target_layout: Layout | None = None
    target_blocks: Mapping[int, int] | None = None

    def joins(self, block: int) -> bool:
        """May ``block`` follow ``block - 1`` in one tile? (Their targets lie back to back.)"""
        if self.target_blocks is None:
            return True
        t = self.target_layout
        assert t is not None  # set with target_blocks
        return (t.block_stride == t.block_bytes and block - 1 in self.target_blocks
                and self.target_blocks[block] == self.target_blocks[block - 1] + 1)

    def target_base(self, g0: int) -> int:
        """Address that, plus a tile's offset in the source layout (``at`` in
        :func:`tile`), is where the tile starting at chunk ``g0`` goes."""
        lay = self.layout
        if self.target_blocks is None:
            return self.target + lay.offset
        b0 = g0 // lay.chunks
        t = self.target_layout
        assert t is not None  # set with target_blocks
        return self.target + t.offset + self.target_blocks[b0] * t.block_stride - b0 * lay.block_stride


def rebuild_runs(plan: TilePlan, runs: Sequence[tuple[int, int, int]], tile_bytes: int,
                 pool: ThreadPoolExecutor | None = None, threads: int = 1) -> tuple[int, list[tuple[int, int, int]]]:
    """The fused pass over ``runs`` (block, c0, c1): (chunks rebuilt and verified,
    runs the caller must redo chunk by chunk: tiles that failed a check).
    ``tile_bytes`` is what a tile rebuilds, all layers together (each thread's
    scratch): ``tile_bytes / num_layers`` of each layer, but at least
    ``MIN_LAYER_BYTES`` and one chunk."""
    units = tiles(runs, plan.layout, max(tile_bytes // plan.layout.num_layers, MIN_LAYER_BYTES),
                  plan.joins if plan.target_blocks is not None else None)
    status = run_tiles(plan, units, pool, threads)
    done = sum(g1 - g0 for (g0, g1), st in zip(units, status, strict=True) if st == OK)
    return done, block_runs([u for u, st in zip(units, status, strict=True) if st != OK], plan.layout.chunks)


def run_tiles(plan: TilePlan, units: list[tuple[int, int]], pool: ThreadPoolExecutor | None = None,
              threads: int = 1, kernel: Any = None) -> np.ndarray:
    """Check and rebuild every tile; returns one status per tile (OK, SUSPECT,
    REBUILT_BAD). Only OK tiles wrote their bytes (the caller redoes the others). ``kernel``: the
    compiled :func:`tile_kernel` unless given (tests also pass :func:`tile`, uncompiled)."""
    kernel = kernel or tile_kernel()
    status = np.zeros(len(units), dtype=np.int8)
    if not units:
        return status
    lay = plan.layout
    checked = sorted(plan.survivors)
    nbytes = sum(g1 - g0 for g0, g1 in units) * lay.chunk_bytes * lay.num_layers
    it = iter(range(len(units)))  # shared: list iterators hand out items atomically under the GIL
    parts = min(threads, len(units)) if pool is not None and nbytes >= PARALLEL_BYTES else 1
    # the caller works too: progress does not wait for pool threads busy elsewhere
    futures = [pool.submit(_work, kernel, plan, units, checked, it, status)  # type: ignore[union-attr]
               for _ in range(parts - 1)]  # parts > 1 only with a pool
    try:
        _work(kernel, plan, units, checked, it, status)
    finally:
        for f in futures:  # every writer is done before the caller lets go of the mappings
            f.exception()
    for f in futures:
        f.result()
    return status


def _work(kernel, plan: TilePlan, units, checked, it, status) -> None:
    """One thread's share: take tiles from ``it`` until none is left, one
    ``kernel`` call per tile (compiled, the GIL changes hands once per tile, not
    once per ISA-L call)."""
    lay = plan.layout
    nb, m = lay.num_blocks, plan.m
    # address of source i for (layer l, block b, byte s) = const[i] + b * bmul[i] + loff[l, i] + s
    const = np.array([plan.survivors[q] + lay.offset if q < plan.n else plan.parity_addr + (q - plan.n) * nb * lay.block_bytes
                      for q in plan.sources], dtype=np.int64)
    bmul = np.array([lay.block_stride if q < plan.n else lay.block_bytes for q in plan.sources], dtype=np.int64)
    loff = np.ascontiguousarray(np.arange(lay.num_layers, dtype=np.int64)[:, None] * np.array(
        [lay.layer_stride if q < plan.n else m * nb * lay.block_bytes for q in plan.sources], dtype=np.int64)[None, :])
    bases = np.array([plan.survivors[q] + lay.offset for q in checked], dtype=np.int64)
    ranks = np.array([*checked, plan.rank], dtype=np.int64)
    crc = plan.crc.reshape(-1, plan.crc.shape[-1])  # (chunk number g, rank)
    tables = ctypes.cast(plan.tables, ctypes.c_void_p).value
    shifts = shift_table(lay.chunk_bytes)
    scratch = _scratch(max(g1 - g0 for g0, g1 in units) * lay.chunk_bytes * lay.num_layers)
    fns = native_fns()
    tls = (plan.target_layout or lay).layer_stride
    for u in it:
        g0, g1 = units[u]
        status[u] = kernel(*fns, g0, g1, lay.chunks, lay.chunk_bytes, lay.num_layers, lay.layer_stride, lay.block_stride,
                           const, bmul, loff, tables, bases, plan.target_base(g0), tls, crc, ranks, shifts, scratch)


_local = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's tile buffer, kept between restores: a fresh one would cost a
    page fault per 4 KiB inside every restore."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.size < nbytes:
        buf = _local.scratch = np.zeros(nbytes, dtype=np.uint8)  # touched now
    return buf


@lru_cache(maxsize=64)
def shift_table(nbytes: int) -> np.ndarray:
    """crcfold's shift S_nbytes as a read-only (4, 256) int64 array, one row per byte
    of its argument: ``S(x) = t[0, x & 255] ^ t[1, x >> 8 & 255] ^ t[2, x >> 16 & 255]
    ^ t[3, x >> 24]`` (S is linear; 8 KiB, where crcfold's two 16-bit tables are 512 KiB)."""
    s = crcfold.shift(nbytes)
    table = np.array([s.lo[:256], s.lo[::256], s.hi[:256], s.hi[::256]], dtype=np.int64)
    table.flags.writeable = False
    return table


def tile(crc32c, encode, memcpy, g0, g1, chunks, cb, layers, ls, bs, const, bmul, loff, tables, bases, tbase,
         tls, crc, ranks, shifts, scratch):
    """Check and rebuild one tile, chunks [g0, g1): OK, SUSPECT or REBUILT_BAD.

    The kernel, plain Python as written (:func:`tile_kernel` compiles it).
    ``crc32c``, ``encode`` and ``memcpy`` are :func:`native_fns` (arguments, not
    globals, so that numba can cache the compiled kernel on disk). Every layer
    of a tile is one contiguous range of ``n`` bytes at ``at`` in each rank (and
    of parity rows): a tile spans blocks only where they lie back to back.
    ``ranks`` are the survivors' (in ``bases`` order), then the target's: the
    columns of ``crc`` whose fold over [g0, g1) each must match. Layer by layer,
    the survivors' bytes are checksummed and at once decoded (still in cache)
    into ``scratch`` (the caller's, ``layers * n`` bytes), and the rebuilt layer
    is checksummed; only a tile whose every check passed is copied into the
    target (layer l at ``tbase + at + l * tls``): a tile that is not OK writes nothing."""
    n = (g1 - g0) * cb
    if n <= 0:
        return OK
    b0 = g0 // chunks
    c0 = g0 - b0 * chunks
    at = b0 * bs + c0 * cb
    k, checked = const.shape[0], bases.shape[0]
    ptrs = np.empty(k, dtype=np.int64)
    dst = np.empty(1, dtype=np.int64)
    acc = np.zeros(checked + 1, dtype=np.int64)
    out = scratch.ctypes.data
    for layer in range(layers):
        for i in range(checked):
            x = acc[i]
            acc[i] = (shifts[0, x & 255] ^ shifts[1, (x >> 8) & 255] ^ shifts[2, (x >> 16) & 255]
                      ^ shifts[3, (x >> 24) & 255] ^ crc32c(bases[i] + at + layer * ls, n, 0))
        for i in range(k):
            ptrs[i] = const[i] + b0 * bmul[i] + loff[layer, i] + c0 * cb
        dst[0] = out + layer * n
        encode(n, k, 1, tables, ptrs.ctypes.data, dst.ctypes.data)
        x = acc[checked]
        acc[checked] = (shifts[0, x & 255] ^ shifts[1, (x >> 8) & 255] ^ shifts[2, (x >> 16) & 255]
                        ^ shifts[3, (x >> 24) & 255] ^ crc32c(out + layer * n, n, 0))
    for i in range(checked + 1):  # crcfold's right-hand side: Horner over the tile's chunks
        want = 0
        for g in range(g0, g1):
            want = (shifts[0, want & 255] ^ shifts[1, (want >> 8) & 255] ^ shifts[2, (want >> 16) & 255]
                    ^ shifts[3, (want >> 24) & 255] ^ crc[g, ranks[i]])
        if acc[i] != want:
            return SUSPECT if i < checked else REBUILT_BAD
    for layer in range(layers):
        memcpy(tbase + at + layer * tls, out + layer * n, n)
    return OK


_kernel_lock = threading.Lock()


def tile_kernel():
    """The tile routine compiled by numba (``nogil``: threads run it side by side),
    or plain Python where numba cannot be imported or ``NUMBA_DISABLE_JIT`` is set.
    Compiled once per process under a lock (about a second; numba caches it on
    disk, so later processes load it in about half that), in advance by :func:`warm`."""
    global _kernel
    if _kernel is None:
        with _kernel_lock:
            if _kernel is None:
                _kernel = _compile()
    return _kernel


_kernel = None


def _compile():
    try:
        import numba
    except ImportError:
        log.info("numba is not installed: restores check and decode tiles in Python (slower on threads)")
        return tile
    try:
        try:
            jitted = numba.njit(nogil=True, cache=True)(tile)
        except RuntimeError:  # nowhere to write numba's cache (read-only install and home)
            jitted = numba.njit(nogil=True)(tile)
        z, zz = np.zeros(1, dtype=np.int64), np.zeros((1, 1), dtype=np.int64)
        jitted(*native_fns(), 0, 0, 1, 1, 1, 0, 0, z, z, zz, 0, z, 0, 0, np.zeros((1, 1), dtype=np.uint32), z,
               shift_table(1), np.zeros(1, dtype=np.uint8))  # compile (or load) now
    except Exception as exc:  # noqa: BLE001 - numba broken here (seen once: a half-done import); restores still work
        log.warning("numba could not compile the tile kernel (%s: %s): restores check and decode tiles in Python "
                    "(slower on threads)", type(exc).__name__, exc)
        return tile
    return jitted


_warming = threading.Event()


def warm() -> None:
    """Compile (or load) the kernel on a background thread, once per process: the
    host data path calls this when a group is made, so that the first restore
    does not wait for it and a daemon that never holds a group never pays it."""
    if _kernel is None and not _warming.is_set():
        _warming.set()
        threading.Thread(target=tile_kernel, name="gs-jit", daemon=True).start()


@lru_cache(maxsize=1)
def native_fns():
    """ISA-L's CRC32C (:func:`~ghostserve.codec.isal.crc32c_name`) and
    ``ec_encode_data``, and ctypes' ``memmove``: prototypes of their own that take
    every address as an integer (the form numba can call)."""
    lib = library()
    addr = ctypes.cast(getattr(lib, crc32c_name()), ctypes.c_void_p).value
    crc = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint32)(addr)
    addr = ctypes.cast(lib.ec_encode_data, ctypes.c_void_p).value
    enc = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint64,
                           ctypes.c_uint64, ctypes.c_uint64)(addr)
    addr = ctypes.cast(ctypes.memmove, ctypes.c_void_p).value
    copy = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)(addr)
    return crc, enc, copy
