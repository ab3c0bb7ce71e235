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
from typing import TYPE_CHECKING, Any

import numpy as np

from ghostserve import shm
from ghostserve.codec import RSCode, crcfold
from ghostserve.codec.isal import IsalBackend, crc32c, encode_raw
from ghostserve.config import Config
from ghostserve.daemon.datapath import DataPath, RankMemory, RegionSpec, tiles
from ghostserve.daemon.store import ParityStore

PARALLEL_BYTES = 4 << 20  # less native work than this runs on one thread: Python-bound


@dataclass
class HostMemory:
    """A rank's regions mapped into the daemon (page tables filled: the daemon reads
    or writes all of it, and a fault per page would dominate a restore).
    ``bases[i]`` is the address of region i (``KVLayout.extents`` name regions by index)."""

    regions: list[str]
    segments: list[shm.Segment] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    bases: list[int] = field(default_factory=list)
    idents: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def attach(cls, regions: Sequence[RegionSpec]) -> HostMemory:
        mem = cls([r.name for r in regions])
        try:
            for name, size in ((r.name, r.size) for r in regions):
                ident = shm.identity(name)
                seg = shm.Segment.attach(name, size, populate=True)
                mem.segments.append(seg)
                mem.views.append(seg.array())
                mem.bases.append(mem.views[-1].ctypes.data)
                mem.idents.append(ident)
        except BaseException:
            mem.close()
            raise
        return mem

    @property
    def region(self) -> str:
        return self.regions[0]

    @property
    def addr(self) -> int:
        """Base of region 0 (the only one of a simple layout)."""
        return self.bases[0]

    @property
    def view(self) -> np.ndarray:
        return self.views[0]

    @property
    def ident(self) -> tuple[int, int] | None:
        return self.idents[0] if self.idents else None

    def close(self) -> None:
        """The owner lets go. Work in flight that still holds this object keeps
        reading valid memory (its views keep the mappings); they go with the
        last reference."""
        for seg in self.segments:
            seg.close()  # unmaps now only if no view is left
        self.segments = []


@dataclass
class _Done:
    """A completion whose work already ran (or failed) on the pool."""

    futures: list[Future] = field(default_factory=list)

    def result(self) -> int:
        return sum(f.result() for f in self.futures)


class HostDataPath:
    """Shared memory + ISA-L for one group. Thread-safe: every method reads the
    store's layout and writes only the bytes and checksums it is asked to.

    Byte ranges of a shard are logical (0..block_bytes); where a layout has
    several extents (K and V apart, layers in their own regions) a range is cut
    into pieces at the extents' edges (:meth:`pieces`), and a call that reads
    one layout and writes another (a fetch into a differently laid out engine)
    is cut at the edges of both."""

    kind = "host"
    checksum_width = 4   # CRC32C
    shm_names = True

    @staticmethod
    def check(spec: RegionSpec) -> None:
        if spec.kind != "host":
            raise ValueError(f"region {spec.name!r} is not a shared-memory segment")
        shm.check_name(spec.name)

    @staticmethod
    def identity(spec: RegionSpec) -> tuple[int, int]:
        """(device, inode) of the shared-memory object."""
        return shm.identity(spec.name)

    def __init__(self, store: ParityStore, pool: ThreadPoolExecutor, config: Config, runtime: Any = None):
        del runtime  # the CPU needs none
        self.store, self.pool = store, pool
        self.threads, self.tile_bytes = config.threads, config.restore_tile_bytes
        tiles.warm()  # restore's tile kernel, compiled off the first restore's path
        self.layout = store.layout
        self.n, self.m = store.k, store.m
        self.slotted = self.layout.block_slots > 0
        self.code = RSCode(self.n, self.m, "isal", threads=1)
        backend = self.code.backend
        assert isinstance(backend, IsalBackend)  # asked for "isal" above
        self._tables = backend.tables
        self._parity_addr = store.parity.ctypes.data
        self._masks: dict[int, np.ndarray] = {}

    def close(self) -> None:
        """Nothing to give back: the mappings go with the ranks' memories."""

    # ------------------------------------------------------------------ memory

    def attach(self, regions: Sequence[RegionSpec]) -> HostMemory:
        """Map a rank's shared-memory regions (in the layout's region order; each
        at least ``size`` bytes). Raises FileNotFoundError or ValueError."""
        return HostMemory.attach(regions)

    def addr(self, base: int, layer: int, block: int, start: int) -> int:
        """Address of byte ``start`` of the (layer, block) shard in a region at
        ``base``: simple layouts only (one strided extent)."""
        lay = self.layout
        return int(base + lay.offset + layer * lay.layer_stride + block * lay.block_stride + start)

    def paddr(self, layer: int, block: int, j: int, start: int) -> int:
        """Address of byte ``start`` of parity row j of the (layer, block) stripe."""
        return int(self._parity_addr + ((layer * self.m + j) * self.layout.num_blocks + block)
                   * self.layout.block_bytes + start)

    def pieces(self, mem: HostMemory, layer: int, block: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """Bytes [start, end) of ``mem``'s (layer, block) shard as (logical start,
        logical end, address) pieces, in order."""
        if self.layout.simple:
            return [(start, end, self.addr(mem.bases[0], layer, block, start))]
        return [(e.at + off, e.at + off + n, int(e.address(mem.bases[e.region], layer, block, off)))
                for e, off, n in self.layout.spans(layer, int(start), int(end))]

    def shard(self, mem: HostMemory, layer: int, block: int, start: int, end: int) -> np.ndarray:
        """Bytes [start, end) of ``mem``'s (layer, block) shard: a view for a
        simple layout, else a copy gathered from its pieces."""
        if self.layout.simple:
            base = self.layout.offset + layer * self.layout.layer_stride + block * self.layout.block_stride
            return mem.views[0][base + start : base + end]
        return np.concatenate([_at(a, hi - lo) for lo, hi, a in self.pieces(mem, layer, block, start, end)])

    # ------------------------------------------------------------------ encode

    def encode(self, ranges: Sequence[tuple[int, int, int]], mems: Mapping[int, HostMemory],
               ready: Mapping[int, bytes] | None = None) -> _Done:
        """Parity of every range (all layers) and the checksums of the chunks it
        covers, one pool task per range. The caller publishes after ``result()``.
        ``ready`` (CUDA event handles) has no meaning here: host writes are done
        when a worker commits."""
        own = {q: mems[q] for q in range(self.n)}
        return _Done([self.pool.submit(self._encode_range, b, s, e, own) for b, s, e in ranges])

    def _encode_range(self, block: int, start: int, end: int, mems: Mapping[int, HostMemory]) -> int:
        lay, store = self.layout, self.store
        tables = self._tables(self.code.parity_matrix)
        for layer in range(lay.num_layers):
            cuts = [self.pieces(mems[q], layer, block, start, end) for q in range(self.n)]
            for i, (lo, hi, _) in enumerate(cuts[0]):  # every rank has the same layout: the same cuts
                encode_raw(tables, hi - lo, [cuts[q][i][2] for q in range(self.n)],
                           [self.paddr(layer, block, j, lo) for j in range(self.m)])
        for c in range(start // lay.chunk_bytes, end // lay.chunk_bytes):
            for q in range(self.n):
                store.crc[block, c, q] = self.checksum(mems[q], block, c)
        return (end - start) * lay.num_layers * self.n

    # ------------------------------------------------------------------ checksums

    def checksum(self, mem: HostMemory, block: int, chunk: int, fill: int | None = None) -> int:
        """The CRC32C of ``mem``'s chunk, chained over layers (and pieces). In a
        slot-addressed layout only the first ``fill`` slots count (default: the
        block's stored fill; the rest read as zero): those bytes may keep changing
        after the chunk was encoded."""
        lay, cb = self.layout, self.layout.chunk_bytes
        if fill is None:
            fill = int(self.store.fill[block]) if self.slotted else 0
        masked = self.slotted and fill < lay.block_slots
        keep = self._keep(fill) if masked else None
        crc = 0
        for layer in range(lay.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, chunk * cb, (chunk + 1) * cb):
                if keep is None:
                    crc = crc32c(at, hi - lo, crc)
                else:  # per call: encode threads run this in parallel
                    covered = np.bitwise_and(_at(at, hi - lo), keep[lo - chunk * cb : hi - chunk * cb])
                    crc = crc32c(covered.ctypes.data, hi - lo, crc)
        return crc

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

    def intact(self, mem: HostMemory, q: int, runs: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """For each (block, c0, c1) run: do ``mem``'s bytes match rank ``q``'s stored
        chunk checksums? One CRC pass per layer and run (chained over its pieces),
        folded (:mod:`ghostserve.codec.crcfold`)."""
        if not runs:
            return np.ones(0, dtype=bool)
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        passes = np.empty((len(runs), lay.num_layers), dtype=np.uint32)

        def crc_passes(part: list[int]) -> None:
            for j in part:
                b, c0, c1 = runs[j]
                for layer in range(lay.num_layers):
                    crc = 0
                    for lo, hi, at in self.pieces(mem, layer, b, c0 * cb, c1 * cb):
                        crc = crc32c(at, hi - lo, crc)
                    passes[j, layer] = crc

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
        """The fused pass (:mod:`ghostserve.daemon.datapath.tiles`): (chunks rebuilt and
        verified, runs whose tiles failed a check: redo them chunk by chunk).
        Simple layouts only: others go chunk by chunk."""
        if not self.layout.simple:
            return 0, list(runs)
        plan = tiles.TilePlan(self.layout, rank, target.addr, {q: x.addr for q, x in survivors.items()},
                                self._parity_addr, self.m, *self.rebuild_plan(erased, (rank,)),
                                self.store.crc, self.n)
        return tiles.rebuild_runs(plan, runs, self.tile_bytes, self.pool, self.threads)

    def fetch_tiles(self, rank: int, survivors: Mapping[int, HostMemory], erased: tuple[int, ...],
                    runs: Sequence[tuple[int, int, int]], place: Any) -> tuple[int, list[tuple[int, int, int]]]:
        """The fused pass into another group's blocks (a fetch; ``place`` is the
        destination's ``Placement``): rank ``rank``'s chunks of ``runs``, copied
        from its own memory when ``rank`` is among ``survivors`` (checked before
        and after), else rebuilt from them and parity. Returns what
        :meth:`rebuild_tiles` does; tiles that failed a check wrote nothing."""
        if not (self.layout.simple and place.data.layout.simple):
            return 0, list(runs)
        if rank in survivors:
            survivors = {rank: survivors[rank]}
            sources: tuple[int, ...] = (rank,)
            tables = self._tables(np.ones((1, 1), dtype=np.uint8))
        else:
            sources, tables = self.rebuild_plan(erased, (rank,))
        plan = tiles.TilePlan(self.layout, rank, place.memory.addr, {q: x.addr for q, x in survivors.items()},
                                self._parity_addr, self.m, sources, tables, self.store.crc, self.n,
                                place.data.layout, place.blocks)
        return tiles.rebuild_runs(plan, runs, self.tile_bytes, self.pool, self.threads)

    def _cuts(self, sources: Sequence[int], mems: Mapping[int, HostMemory], outs: Sequence[tuple],
              layer: int, block: int, start: int, end: int) -> list[tuple[int, list[int], list[int]]]:
        """Bytes [start, end) of a stripe as pieces every party can take in one
        call: (length, source addresses, output addresses). ``outs`` are
        (data path, memory, block) of each output."""
        parties = [[(start, end, self.paddr(layer, block, q - self.n, start))] if q >= self.n else
                   self.pieces(mems[q], layer, block, start, end) for q in sources]
        parties += [dp.pieces(mem, layer, b, start, end) for dp, mem, b in outs]
        if all(len(p) == 1 for p in parties):
            return [(end - start, [p[0][2] for p in parties[: len(sources)]],
                     [p[0][2] for p in parties[len(sources):]])]
        edges = sorted({start, end} | {x for p in parties for lo, hi, _ in p for x in (lo, hi)})
        out = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            addrs = [next(a + (lo - plo) for plo, phi, a in p if plo <= lo < phi) for p in parties]
            out.append((hi - lo, addrs[: len(sources)], addrs[len(sources):]))
        return out

    def decode(self, plans: Sequence[tuple], mems: Mapping[int, HostMemory],
               place: Mapping[int, Any] | None = None) -> None:
        """For each plan (block, c0, c1, want, sources, tables): rebuild the ``want``
        ranks' chunks [c0, c1) of every layer into their own memory in ``mems``,
        or, for a rank in ``place``, into the block and memory its placement names
        (``place[w].data``, ``.memory``, ``.blocks``: another group's rank)."""
        cb, lay = self.layout.chunk_bytes, self.layout
        place = place or {}

        def run(part: list) -> None:
            for b, c0, c1, want, sources, tables in part:
                outs = [(place[w].data, place[w].memory, place[w].blocks[b]) if w in place else (self, mems[w], b)
                        for w in want]
                for layer in range(lay.num_layers):
                    for n, src, dst in self._cuts(sources, mems, outs, layer, b, c0 * cb, c1 * cb):
                        encode_raw(tables, n, src, dst)

        self.in_slices(run, list(plans), sum(c1 - c0 for _, c0, c1, *_ in plans) * cb * lay.num_layers)

    def copy(self, src: HostMemory, block: int, chunk: int, dst_path: DataPath[HostMemory], dst: HostMemory,
             dst_block: int) -> None:
        """Copy one chunk (every layer) of ``src`` into ``dst_block`` of ``dst``
        (laid out by ``dst_path``, a host path too: it attached ``dst``)."""
        assert isinstance(dst_path, HostDataPath)
        cb = self.layout.chunk_bytes
        for layer in range(self.layout.num_layers):
            a = self.pieces(src, layer, block, chunk * cb, (chunk + 1) * cb)
            b = dst_path.pieces(dst, layer, dst_block, chunk * cb, (chunk + 1) * cb)
            edges = sorted({x for p in (a, b) for lo, hi, _ in p for x in (lo, hi)})
            for lo, hi in zip(edges, edges[1:], strict=False):
                s = next(at + (lo - plo) for plo, phi, at in a if plo <= lo < phi)
                d = next(at + (lo - plo) for plo, phi, at in b if plo <= lo < phi)
                ctypes.memmove(d, s, hi - lo)

    def zero(self, mem: HostMemory, block: int, c0: int, c1: int) -> None:
        """Zero chunks [c0, c1) of a block in every layer (bytes that did not verify)."""
        cb = self.layout.chunk_bytes
        for layer in range(self.layout.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, c0 * cb, c1 * cb):
                ctypes.memset(at, 0, hi - lo)

    def read_block(self, mem: HostMemory, block: int, out: np.ndarray) -> None:
        """Gather ``mem``'s shard of ``block``, layer after layer, into ``out``."""
        bb = self.layout.block_bytes
        for layer in range(self.layout.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, 0, bb):
                ctypes.memmove(out.ctypes.data + layer * bb + lo, at, hi - lo)

    def write_block(self, mem: HostMemory, block: int, data: np.ndarray) -> None:
        """Scatter ``data`` (:meth:`read_block`'s order) into ``mem``'s ``block``."""
        bb = self.layout.block_bytes
        for layer in range(self.layout.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, 0, bb):
                ctypes.memmove(at, data.ctypes.data + layer * bb + lo, hi - lo)

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


def _at(addr: int, n: int) -> np.ndarray:
    """The ``n`` bytes at ``addr`` as a numpy array (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr))

if TYPE_CHECKING:  # the seam, checked by the type checker (bin/test): this class is a DataPath
    _PATH: type[DataPath[HostMemory]] = HostDataPath

    def _memory(m: HostMemory) -> RankMemory:
        return m


__all__ = ["HostDataPath", "HostMemory"]
