"""The host data path: ranks' KV in POSIX shared memory, Intel ISA-L on raw addresses.

Raw ``ec_encode_data`` and CRC32C calls on addresses, not the checked
:class:`~ghostserve.codec.RSCode` API: the layout was validated at
registration, and per-call validation would cost more than encoding a decode
step's bytes. ISA-L releases the GIL, so ranges and tiles run in parallel on
the daemon's encode pool.

Addresses: the shard of stripe (layer, block) of a rank is ``block_bytes`` at
``offset + layer * layer_stride + block * block_stride`` in its region; parity
row j of it is at ``((layer * m + j) * num_blocks + block) * block_bytes`` in
the arena (a row of a layer is contiguous across blocks).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.codec import RSCode, crcfold
from ghostserve.codec.isal import crc32c, encode_raw
from ghostserve.daemon import rebuild
from ghostserve.daemon.store import ParityStore

PARALLEL_BYTES = 4 << 20  # less native work than this runs on one thread: Python-bound


@dataclass
class HostMemory:
    """A rank's region mapped into the daemon (page tables filled: the daemon reads
    or writes all of it, and a fault per page would dominate a restore)."""

    region: str
    segment: shm.Segment | None = None
    view: np.ndarray | None = None
    addr: int = 0
    ident: tuple[int, int] | None = None

    @classmethod
    def attach(cls, region: str, size: int) -> HostMemory:
        ident = shm.identity(region)
        seg = shm.Segment.attach(region, size, populate=True)
        view = seg.array()
        return cls(region, seg, view, view.ctypes.data, ident)

    def close(self) -> None:
        """The owner lets go. Work in flight that still holds this object keeps
        reading valid memory (its view keeps the mapping); the mapping goes with
        the last reference."""
        if self.segment is not None:
            self.segment.close()  # unmaps now only if no view is left
            self.segment = None


@dataclass
class _Done:
    """A completion whose work already ran (or failed) on the pool."""

    futures: list[Future] = field(default_factory=list)

    def result(self) -> int:
        return sum(f.result() for f in self.futures)


class HostDataPath:
    """Shared memory + ISA-L for one group. Thread-safe: every method reads the
    store's layout and writes only the bytes and checksums it is asked to."""

    kind = "host"

    def __init__(self, store: ParityStore, pool: ThreadPoolExecutor, threads: int, tile_bytes: int):
        self.store, self.pool, self.threads, self.tile_bytes = store, pool, threads, tile_bytes
        self.layout = store.layout
        self.n, self.m = store.k, store.m
        self.slotted = self.layout.block_slots > 0
        self.code = RSCode(self.n, self.m, "isal", threads=1)
        self._tables = self.code.backend.tables
        self._parity_addr = store.parity.ctypes.data
        self._masks: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ memory

    def attach(self, region: str, size: int) -> HostMemory:
        """Map ``region``. Raises FileNotFoundError or ValueError (too small, empty)."""
        return HostMemory.attach(region, size)

    def addr(self, base: int, layer: int, block: int, start: int) -> int:
        """Address of byte ``start`` of the (layer, block) shard in a region at ``base``."""
        lay = self.layout
        return int(base + lay.offset + layer * lay.layer_stride + block * lay.block_stride + start)

    def paddr(self, layer: int, block: int, j: int, start: int) -> int:
        """Address of byte ``start`` of parity row j of the (layer, block) stripe."""
        return int(self._parity_addr + ((layer * self.m + j) * self.layout.num_blocks + block)
                   * self.layout.block_bytes + start)

    def shard(self, mem: HostMemory, layer: int, block: int, start: int, end: int) -> np.ndarray:
        """A view of bytes [start, end) of ``mem``'s (layer, block) shard."""
        base = self.layout.offset + layer * self.layout.layer_stride + block * self.layout.block_stride
        return mem.view[base + start : base + end]

    def source(self, mems: Mapping[int, HostMemory], q: int, layer: int, block: int, start: int) -> int:
        """Address of shard ``q`` (a rank < N, or parity row q - N) of a stripe."""
        if q >= self.n:
            return self.paddr(layer, block, q - self.n, start)
        return self.addr(mems[q].addr, layer, block, start)

    # ------------------------------------------------------------------ encode

    def encode(self, ranges: Sequence[tuple[int, int, int]], mems: Mapping[int, HostMemory]) -> _Done:
        """Parity of every range (all layers) and the checksums of the chunks it
        covers, one pool task per range. The caller publishes after ``result()``."""
        addrs = {q: mems[q].addr for q in range(self.n)}
        return _Done([self.pool.submit(self._encode_range, b, s, e, addrs) for b, s, e in ranges])

    def _encode_range(self, block: int, start: int, end: int, addrs: Mapping[int, int]) -> int:
        lay, store = self.layout, self.store
        tables = self._tables(self.code.parity_matrix)
        for layer in range(lay.num_layers):
            encode_raw(tables, end - start, [self.addr(addrs[q], layer, block, start) for q in range(self.n)],
                       [self.paddr(layer, block, j, start) for j in range(self.m)])
        for c in range(start // lay.chunk_bytes, end // lay.chunk_bytes):
            for q in range(self.n):
                store.crc[block, c, q] = self._crc(addrs[q], block, c)
        return (end - start) * lay.num_layers * self.n

    # ------------------------------------------------------------------ checksums

    def checksum(self, mem: HostMemory, block: int, chunk: int) -> int:
        """The CRC32C of ``mem``'s chunk, chained over layers (filled slots only)."""
        return self._crc(mem.addr, block, chunk)

    def _crc(self, addr: int, block: int, chunk: int) -> int:
        lay = self.layout
        at = int(addr + lay.offset + block * lay.block_stride + chunk * lay.chunk_bytes)
        return self.checksum_at([at + layer * lay.layer_stride for layer in range(lay.num_layers)],
                                int(self.store.fill[block]) if self.slotted else 0)

    def unfilled(self, fill: int) -> np.ndarray:
        """Bytes of a slot-addressed block that lie in slots >= ``fill`` (not covered)."""
        return self._keep(fill) == 0

    def _keep(self, fill: int) -> np.ndarray:
        """0xFF for the bytes of a block in slots < ``fill``, else 0 (an AND mask)."""
        keep = self._masks.get(fill)
        if keep is None:
            if len(self._masks) > 512:
                self._masks.clear()
            keep = self._masks[fill] = np.where(self.store.slot_map < fill, 0xFF, 0).astype(np.uint8)
        return keep

    def checksum_at(self, addrs: Sequence[int], fill: int = 0) -> int:
        """CRC32C chained over one chunk per layer at ``addrs``. In a slot-addressed
        layout only the first ``fill`` slots count (the rest read as zero): those
        bytes may keep changing after the chunk was encoded."""
        cb, crc = self.layout.chunk_bytes, 0
        if not self.slotted or fill >= self.layout.block_slots:
            for at in addrs:
                crc = crc32c(at, cb, crc)
            return crc
        keep = self._keep(fill)
        covered = np.empty(cb, dtype=np.uint8)  # per call: encode threads run this in parallel
        for at in addrs:
            np.bitwise_and(np.ctypeslib.as_array((ctypes.c_uint8 * cb).from_address(at)), keep, out=covered)
            crc = crc32c(covered.ctypes.data, cb, crc)
        return crc

    def intact(self, mem: HostMemory, q: int, runs: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """For each (block, c0, c1) run: do ``mem``'s bytes match rank ``q``'s stored
        chunk checksums? One CRC pass per layer and run, folded
        (:mod:`ghostserve.codec.crcfold`)."""
        if not runs:
            return np.ones(0, dtype=bool)
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        passes = np.empty((len(runs), lay.num_layers), dtype=np.uint32)
        base = mem.addr

        def crc_passes(part: list[int]) -> None:
            for j in part:
                b, c0, c1 = runs[j]
                at = self.addr(base, 0, b, c0 * cb)
                for layer in range(lay.num_layers):
                    passes[j, layer] = crc32c(at + layer * lay.layer_stride, (c1 - c0) * cb, 0)

        self.in_slices(crc_passes, list(range(len(runs))), sum(c1 - c0 for _, c0, c1 in runs) * cb * lay.num_layers)
        width = max(c1 - c0 for _, c0, c1 in runs)
        stored = crcfold.pad_left([store.crc[b, c0:c1, q] for b, c0, c1 in runs], width)
        s = crcfold.shift(cb)
        return crcfold.horner(passes, s) == crcfold.horner(stored, s)

    # ------------------------------------------------------------------ rebuild

    def rebuild_plan(self, erased: tuple[int, ...], want: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        """(source shard indices, ISA-L tables) giving the ``want`` rows for ``erased``."""
        sources, coeffs = self.code.decode_matrix(list(erased))
        rows = np.ascontiguousarray(coeffs[[list(erased).index(w) for w in want]])
        rows.flags.writeable = False
        return sources, self._tables(rows)

    def rebuild_tiles(self, rank: int, target: HostMemory, survivors: Mapping[int, HostMemory],
                      erased: tuple[int, ...], runs: Sequence[tuple[int, int, int]]
                      ) -> tuple[int, list[tuple[int, int, int]]]:
        """The fused pass (:mod:`ghostserve.daemon.rebuild`): (chunks rebuilt and
        verified, runs whose tiles failed a check: redo them chunk by chunk)."""
        plan = rebuild.TilePlan(self.layout, rank, target.addr, {q: x.addr for q, x in survivors.items()},
                                self._parity_addr, self.m, *self.rebuild_plan(erased, (rank,)),
                                self.store.crc, self.n)
        return rebuild.rebuild_runs(plan, runs, self.tile_bytes, self.pool, self.threads)

    def decode(self, plans: Sequence[tuple], mems: Mapping[int, HostMemory],
               place: Mapping[int, Any] | None = None) -> None:
        """For each plan (block, c0, c1, want, sources, tables): rebuild the ``want``
        ranks' chunks [c0, c1) of every layer into their own memory in ``mems``,
        or, for a rank in ``place``, where its placement says (another group's
        blocks: ``place[w].addrs(block, chunk)``, chunk by chunk)."""
        cb, lay = self.layout.chunk_bytes, self.layout
        place = place or {}

        def run(part: list) -> None:
            for b, c0, c1, want, sources, tables in part:
                s, e = c0 * cb, c1 * cb
                if any(w in place for w in want):
                    for c in range(c0, c1):
                        outs = [place[w].addrs(b, c) if w in place else
                                [self.addr(mems[w].addr, layer, b, c * cb) for layer in range(lay.num_layers)]
                                for w in want]
                        for layer in range(lay.num_layers):
                            encode_raw(tables, cb, [self.source(mems, q, layer, b, c * cb) for q in sources],
                                       [o[layer] for o in outs])
                    continue
                for layer in range(lay.num_layers):
                    encode_raw(tables, e - s, [self.source(mems, q, layer, b, s) for q in sources],
                               [self.addr(mems[w].addr, layer, b, s) for w in want])

        self.in_slices(run, list(plans), sum(c1 - c0 for _, c0, c1, *_ in plans) * cb * lay.num_layers)

    def chunk_addrs(self, mem: HostMemory, block: int, chunk: int) -> list[int]:
        """The address of a chunk in every layer of ``mem``."""
        return [self.addr(mem.addr, layer, block, chunk * self.layout.chunk_bytes)
                for layer in range(self.layout.num_layers)]

    def copy(self, src: HostMemory, block: int, chunk: int, dst_addrs: Sequence[int]) -> None:
        """Copy one chunk (every layer) of ``src`` to ``dst_addrs``."""
        cb = self.layout.chunk_bytes
        for layer, at in enumerate(dst_addrs):
            ctypes.memmove(at, self.addr(src.addr, layer, block, chunk * cb), cb)

    def zero(self, mem: HostMemory, block: int, c0: int, c1: int) -> None:
        """Zero chunks [c0, c1) of a block in every layer (bytes that did not verify)."""
        cb = self.layout.chunk_bytes
        for layer in range(self.layout.num_layers):
            self.shard(mem, layer, block, c0 * cb, c1 * cb)[:] = 0

    def parity_mismatch(self, mems: Mapping[int, HostMemory], block: int, chunk: int) -> bool:
        """Does the stored parity of a chunk differ from a fresh encode of ``mems``
        (filled slots only)? For scrub."""
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        s, e = chunk * cb, (chunk + 1) * cb
        keep = (slice(None) if not self.slotted or store.fill[block] >= lay.block_slots
                else ~self.unfilled(int(store.fill[block])))
        for layer in range(lay.num_layers):
            fresh = self.code.encode([self.shard(mems[q], layer, block, s, e) for q in range(self.n)])
            if not np.array_equal(fresh[:, keep], store.parity[layer, :, block, s:e][:, keep]):
                return True
        return False

    def in_slices(self, fn: Callable[[list], None], items: list, nbytes: int) -> None:
        """``fn`` over ``items``: one contiguous slice per encode thread when the
        native work (``nbytes``) outweighs the GIL hand-offs, else on this thread."""
        parts = self.threads if nbytes >= PARALLEL_BYTES else 1
        if parts <= 1 or len(items) < 2:
            fn(items)
            return
        step = -(-len(items) // parts)
        for f in [self.pool.submit(fn, items[i : i + step]) for i in range(0, len(items), step)]:
            f.result()


__all__ = ["HostDataPath", "HostMemory"]
