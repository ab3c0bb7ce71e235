"""Restore's fused pass: check and rebuild one cache-sized tile at a time.

Rebuilding L bytes of a lost rank reads k shards (its k - 1 data survivors and a
parity row, or more parity when more ranks are lost) and writes one, so a
restore cannot beat ``memcpy * 2 / (k + 1)``. Checking every survivor against
its encode-time CRC32C in a pass of its own, then decoding, then checking the
rebuilt bytes, reads everything from memory two or three times. Here each
**tile** (whole chunks: up to ``tile_bytes`` of each layer, every layer, so
``num_layers * tile_bytes`` of the lost rank and k times that of sources) is

1. checked: one CRC32C pass per survivor and layer, folded against the stored
   per-chunk checksums (:mod:`ghostserve.codec.crcfold`, in Python ints);
2. decoded into the target while its sources are still in cache (one
   ``ec_encode_data`` per layer and block), and only when every survivor
   passed: a tile that fails its check writes nothing;
3. checked again: the rebuilt bytes' CRC passes against the target's stored
   checksums, from cache.

A chunk's checksum covers all its layers, so a tile never splits a chunk (a
chunk larger than ``tile_bytes`` is a tile of its own); it may start anywhere
in a block and, where a layer's blocks lie back to back in memory, run on into
the next block (one CRC call per survivor and layer for the whole tile). Tiles
are handed out to the caller's thread and ``threads - 1`` tasks on the pool;
ISA-L calls through ctypes release the GIL, and long calls are what lets the
threads overlap (short ones mostly hand the GIL back and forth:
``benchmarks/checkpoint.py --tile-bytes``).

A tile whose survivors fail comes back ``SUSPECT`` (nothing written) and one
whose rebuilt bytes fail ``REBUILT_BAD``; the caller redoes both chunk by chunk
(finding the bad chunks, treating them as erasures, reporting what is beyond
the code, zeroing rebuilt bytes that still do not verify). Nothing here decides
what is lost: it only proves tiles good. Masked checksums (partly filled
slot-addressed blocks) stay on the caller's path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ghostserve.codec import crcfold
from ghostserve.codec.isal import _crc_fn, library
from ghostserve.daemon.layout import Layout

PARALLEL_BYTES = 2 << 20  # fewer rebuilt bytes than this run on the caller's thread

OK, SUSPECT, REBUILT_BAD = 0, 1, 2


@lru_cache(maxsize=1)
def _encode_fn():
    """``ec_encode_data`` taking plain integers (addresses of pointer tables):
    a prototype of its own, so callers that pass ctypes arrays are unaffected."""
    fn = library()["ec_encode_data"]
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = None
    return fn


@lru_cache(maxsize=64)
def shift_bytes(nbytes: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """crcfold's shift S_nbytes as four 256-entry lists of Python ints, one per byte
    of its argument: ``S(x) = t0[x & 255] ^ t1[x >> 8 & 255] ^ t2[x >> 16 & 255] ^ t3[x >> 24]``
    (S is linear). Python ints: a tile's fold costs a few hundred nanoseconds."""
    s = crcfold.shift(nbytes)
    return s.lo[:256].tolist(), s.lo[::256].tolist(), s.hi[:256].tolist(), s.hi[::256].tolist()


def tiles(runs: Sequence[tuple[int, int, int]], layout: Layout, tile_bytes: int) -> list[tuple[int, int]]:
    """Split runs (block, c0, c1) of chunks into tiles of at most ``tile_bytes``
    per layer (at least one chunk each; a tile covers every layer). A tile is a
    range [g0, g1) of chunk numbers ``g = block * chunks + chunk``; it spans
    blocks only when a layer's blocks lie back to back in memory
    (``block_stride == block_bytes``), so that each layer of a tile is one
    contiguous range."""
    per = max(1, tile_bytes // layout.chunk_bytes)
    spans: list[list[int]] = []
    joined = layout.block_stride == layout.block_bytes or layout.num_blocks == 1
    for b, c0, c1 in runs:
        g0, g1 = b * layout.chunks + c0, b * layout.chunks + c1
        if joined and spans and spans[-1][1] == g0:
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


def stored_folds(crc: np.ndarray, units: Sequence[tuple[int, int]], ranks: Sequence[int],
                 chunk_bytes: int) -> np.ndarray:
    """For each tile and rank, ``XOR_g S^(n-1-g)(crc[g, rank])`` over its chunks
    (crcfold's right-hand side; ``crc`` is store.crc, (blocks, chunks, n)),
    shape (tiles, ranks), vectorised."""
    if not units:
        return np.zeros((0, len(ranks)), dtype=np.uint32)
    flat = crc.reshape(-1, crc.shape[-1])
    u = np.asarray(units, dtype=np.int64)
    g0, n = u[:, 0], u[:, 1] - u[:, 0]
    width = int(n.max())
    j = np.arange(width)[None, :] - (width - n)[:, None]      # < 0: left padding
    rows = g0[:, None] + np.maximum(j, 0)
    vals = flat[rows[:, :, None], np.asarray(ranks, dtype=np.int64)[None, None, :]]
    vals[j < 0] = 0                                             # (tiles, width, ranks)
    s = crcfold.shift(chunk_bytes)
    acc = np.zeros((len(units), len(ranks)), dtype=np.uint32)
    for i in range(width):
        acc = s(acc) ^ vals[:, i, :]
    return acc


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


def rebuild_runs(plan: TilePlan, runs: Sequence[tuple[int, int, int]], tile_bytes: int,
                 pool: ThreadPoolExecutor | None = None, threads: int = 1) -> tuple[int, list[tuple[int, int, int]]]:
    """The fused pass over ``runs`` (block, c0, c1): (chunks rebuilt and verified,
    runs the caller must redo chunk by chunk: tiles that failed a check)."""
    units = tiles(runs, plan.layout, tile_bytes)
    status = run_tiles(plan, units, pool, threads)
    done = sum(g1 - g0 for (g0, g1), st in zip(units, status, strict=True) if st == OK)
    return done, block_runs([u for u, st in zip(units, status, strict=True) if st != OK], plan.layout.chunks)


def run_tiles(plan: TilePlan, units: list[tuple[int, int]], pool: ThreadPoolExecutor | None = None,
              threads: int = 1) -> np.ndarray:
    """Check and rebuild every tile; returns one status per tile (OK, SUSPECT,
    REBUILT_BAD). A SUSPECT tile wrote nothing; a REBUILT_BAD one wrote bytes
    that did not verify (the caller redoes or zeroes them)."""
    status = np.zeros(len(units), dtype=np.int8)
    if not units:
        return status
    lay = plan.layout
    checked = sorted(plan.survivors)
    want = stored_folds(plan.crc, units, [*checked, plan.rank], lay.chunk_bytes).tolist()
    nbytes = sum(g1 - g0 for g0, g1 in units) * lay.chunk_bytes * lay.num_layers
    it = iter(range(len(units)))  # shared: list iterators hand out items atomically under the GIL
    parts = min(threads, len(units)) if pool is not None and nbytes >= PARALLEL_BYTES else 1
    # the caller works too: progress does not wait for pool threads busy elsewhere
    futures = [pool.submit(_work, plan, units, want, checked, it, status) for _ in range(parts - 1)]
    try:
        _work(plan, units, want, checked, it, status)
    finally:
        for f in futures:  # every writer is done before the caller lets go of the mappings
            f.exception()
    for f in futures:
        f.result()
    return status


def _work(plan: TilePlan, units, want, checked, it, status) -> None:
    """One thread's share: take tiles from ``it`` until none is left."""
    lay = plan.layout
    crc32c, encode = _crc_fn(), _encode_fn()
    t0, t1, t2, t3 = shift_bytes(lay.chunk_bytes)
    cb, layers, ls, bs, bb = lay.chunk_bytes, lay.num_layers, lay.layer_stride, lay.block_stride, lay.block_bytes
    chunks, k, nb, m = lay.chunks, len(plan.sources), lay.num_blocks, plan.m
    # address of source i for (layer l, block b, byte s) = const[i] + b * bmul[i] + l * lmul[i] + s
    const = np.array([plan.survivors[q] + lay.offset if q < plan.n else plan.parity_addr + (q - plan.n) * nb * bb
                      for q in plan.sources], dtype=np.int64)
    bmul = np.array([bs if q < plan.n else bb for q in plan.sources], dtype=np.int64)
    loff = np.arange(layers, dtype=np.int64)[:, None] * np.array(
        [ls if q < plan.n else m * nb * bb for q in plan.sources], dtype=np.int64)[None, :]
    # blocks back to back in a layer (parity rows always are): a tile is one decode per layer
    joined = bs == bb
    row = 8 * k
    dst = np.zeros(1, dtype=np.int64)
    dbase = dst.ctypes.data
    tables = ctypes.cast(plan.tables, ctypes.c_void_p).value
    bases = [(plan.survivors[q] + lay.offset) for q in checked]
    tbase = plan.target + lay.offset
    nchecked = len(checked)
    for u in it:
        g0, g1 = units[u]
        b0, c0 = divmod(g0, chunks)
        at, n = b0 * bs + c0 * cb, (g1 - g0) * cb   # a tile's bytes of one layer: [at, at + n)
        folds = want[u]
        # 1. every survivor's bytes of the tile against the stored checksums
        good = True
        for i in range(nchecked):
            a, acc = bases[i] + at, 0
            for _ in range(layers):
                acc = t0[acc & 255] ^ t1[acc >> 8 & 255] ^ t2[acc >> 16 & 255] ^ t3[acc >> 24] ^ crc32c(a, n, 0)
                a += ls
            if acc != folds[i]:
                good = False
                break
        if not good:
            status[u] = SUSPECT
            continue
        # 2. decode from the (cached) sources into the target, block by block (parity
        # rows are per block), 3. and check each layer of it
        pieces = [(b0, c0 * cb, n)] if joined else []  # (block, first byte, bytes)
        g = g1 if joined else g0
        while g < g1:
            b = g // chunks
            e = min(g1, (b + 1) * chunks)
            pieces.append((b, (g - b * chunks) * cb, (e - g) * cb))
            g = e
        ptrs = np.array([const + b * bmul + s for b, s, _ in pieces], dtype=np.int64)[:, None, :] + loff[None]
        pbase, prow = ptrs.ctypes.data, layers * row
        d, acc = tbase + at, 0
        for layer in range(layers):
            for p, (b, s, length) in enumerate(pieces):
                dst[0] = tbase + b * bs + s + layer * ls
                encode(length, k, 1, tables, pbase + p * prow + layer * row, dbase)
            acc = t0[acc & 255] ^ t1[acc >> 8 & 255] ^ t2[acc >> 16 & 255] ^ t3[acc >> 24] ^ crc32c(d, n, 0)
            d += ls
        if acc != folds[nchecked]:
            status[u] = REBUILT_BAD
