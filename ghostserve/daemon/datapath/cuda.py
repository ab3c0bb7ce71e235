"""The CUDA data path: ranks' KV on GPUs (CUDA IPC), parity encoded on the devices
and copied into the same pinned shared-memory arena as the host path.

Everything here is planning and ordering; every CUDA call goes through a
:class:`~ghostserve.daemon.datapath.cudart.CudaRuntime` (the real one is CuPy;
the tests run this module on the CPU with a stand-in of the runtime).

* **Registration.** A rank's region is an IPC handle of its allocation's base,
  an offset and a device UUID; each allocation is opened once per daemon
  (reference-counted by the runtime), with lazy peer access. The parity arena
  (the store's ``.parity`` segment, in ``/dev/shm``) is registered as pinned
  memory once per group, so it still survives a daemon crash.
* **Ordering.** A commit may carry the handle of an interprocess event the
  worker recorded after its step's writes; the daemon's streams wait on it
  before reading that rank's memory. The worker never waits on the daemon.
* **Encode.** Stripe (layer, block) is encoded on the device of rank
  ``block mod N`` (load balance), all m parity rows in one pass; a source on
  another device is first copied (peer) into the staging buffer of the encoding
  device, the parity rows are written into the staging buffer and copied on the same
  stream into the arena. Stripes of one length go to the kernel together (one
  launch for many (layer, block) sets); nothing waits on the host until the
  completion's ``result()``, which waits for the copies and the checksums;
  only then does the encoder publish the chunks.
* **Checksums** are sum64 (:mod:`ghostserve.codec.gpu_checksum`), computed on
  each rank's device at encode time and at restore; the store keeps 8 bytes per
  (block, chunk, rank).
* **Restore and fetch** decode on the device of the rank being rebuilt:
  survivors read where they live (staged if on another device), parity copied up
  from the arena, the rebuilt bytes checked before anything is reported.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ghostserve.codec import RSCode
from ghostserve.codec.gpu_checksum import Chunk
from ghostserve.config import Config
from ghostserve.daemon.datapath import DataPath, RankMemory, RegionSpec
from ghostserve.daemon.datapath.cudart import CudaRuntime, CupyRuntime
from ghostserve.daemon.store import ParityStore
from ghostserve.errors import GpuUnavailable, ResourceExhausted

MAX_SETS = 4096        # stripes in one kernel launch (its pointer table: 8 * (k + m) bytes each)


@dataclass
class CudaMemory:
    """A rank's CUDA regions as this daemon mapped them (IPC)."""

    regions: list[str]
    device: int
    handles: list[bytes]
    bases: list[int]
    idents: list[tuple[int, int]]
    runtime: CudaRuntime
    closed: bool = False

    @property
    def region(self) -> str:
        return self.regions[0]

    @property
    def ident(self) -> tuple[int, int] | None:
        return self.idents[0] if self.idents else None

    def close(self) -> None:
        """Unmap (the runtime's reference count keeps an allocation another rank or
        an open handle of this process still uses)."""
        if not self.closed:
            self.closed = True
            for h in self.handles:
                self.runtime.close_ipc(h)


class StagingBuffer:
    """One device's staging bytes, handed out in units.

    Every user of a device's staging queues its work on the one stream of that
    device, in order, so the bytes of a *sealed* unit (the kernels and copies
    that read them are queued) may be handed out again at once: whatever writes
    them next runs after those readers, and no host wait is needed. The bytes of
    the *open* unit may not: their readers are not queued yet, and reusing them
    would let one unit overwrite its own inputs. So a unit takes bytes from the
    start, :meth:`fits` says whether more fit, :meth:`take` refuses what does not
    (:class:`ResourceExhausted`), and the caller queues and :meth:`seal`\\ s what
    it has first, and cuts what is larger than the buffer."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0   # bytes of the open unit

    def fits(self, nbytes: int, count: int = 1) -> bool:
        """Would ``count`` takes of ``nbytes`` fit beside the open unit?"""
        return self.used + count * ((nbytes + 255) & ~255) <= self.capacity

    def take(self, nbytes: int) -> int:
        """An offset of ``nbytes`` contiguous bytes, aligned to 256, in the open unit."""
        if not self.fits(nbytes):
            raise ResourceExhausted(f"staging: {nbytes} more bytes do not fit {self.capacity} bytes beside the "
                                    f"{self.used} bytes of work not queued yet")
        at = self.used
        self.used += (nbytes + 255) & ~255
        return at

    def seal(self) -> None:
        """The open unit's readers are queued: its bytes may be handed out again."""
        self.used = 0


class _Batch:
    """Stripes waiting for one device's kernel: sets of one length launched together,
    then their parity copied to the arena, then the staging unit sealed."""

    def __init__(self, path: CudaDataPath, device: int, coeffs: np.ndarray):
        self.path, self.device, self.coeffs = path, device, coeffs
        self.nbytes = 0
        self.src: list[list[int]] = []
        self.dst: list[list[int]] = []
        self.outs: list[tuple[int, int]] = []  # (arena address, staging address), nbytes each

    def room(self, nbytes: int, takes: int) -> bool:
        """Can a set of ``nbytes`` with ``takes`` staged pieces join this batch?"""
        staging = self.path._staging(self.device)[1]
        return (not self.src or nbytes == self.nbytes) and len(self.src) < MAX_SETS and staging.fits(nbytes, takes)

    def add(self, nbytes: int, src: list[int], dst: list[int], outs: list[tuple[int, int]]) -> None:
        self.nbytes = nbytes
        self.src.append(src)
        self.dst.append(dst)
        self.outs.extend(outs)

    def flush(self) -> None:
        """Queue the kernel and the copies, seal the staging unit."""
        if not self.src:
            return
        rt = self.path.rt
        stream = rt.stream(self.device)
        rt.matmul(self.device, self.coeffs, self.src, self.dst, self.nbytes, stream)
        for host, staged in self.outs:
            rt.copy(host, staged, self.nbytes, stream)
        self.path._staging(self.device)[1].seal()
        self.src, self.dst, self.outs = [], [], []


@dataclass
class _Completion:
    """Parity copies and checksums in flight for one step."""

    events: list[Any] = field(default_factory=list)
    finish: list[Callable[[], None]] = field(default_factory=list)
    nbytes: int = 0

    def result(self) -> int:
        for ev in self.events:
            ev.synchronize()
        for f in self.finish:
            f()
        return self.nbytes


def encode_device(block: int, mems: Mapping[int, CudaMemory], n: int) -> int:
    """The device a stripe of ``block`` is encoded on: rank ``block mod N``'s."""
    return mems[block % n].device


class CudaDataPath:
    """See the module doc. Calls come under the stripes' ``io`` lock (encode,
    restore, fetch, scrub never overlap), so the staging buffers need no lock of their own;
    ``attach`` may come from any RPC thread."""

    kind = "cuda"
    checksum_width = 8   # sum64 (ghostserve.codec.gpu_checksum)
    shm_names = False    # a GPU's memory goes with its process

    @staticmethod
    def check(spec: RegionSpec) -> None:
        if len(spec.ipc_handle) != 64 or len(spec.device_uuid) != 16:
            raise ValueError(f"region {spec.name!r}: a CUDA IPC handle is 64 bytes and a device UUID 16")

    @staticmethod
    def identity(spec: RegionSpec) -> tuple[int, int]:
        """The device and IPC allocation (a digest of both), and the offset."""
        return int.from_bytes(hashlib.sha256(spec.device_uuid + spec.ipc_handle).digest()[:8], "little"), spec.offset

    def __init__(self, store: ParityStore, pool: ThreadPoolExecutor, config: Config,
                 runtime: CudaRuntime | None = None):
        del pool  # the devices do the work
        self.tile_bytes = 0  # no fused restore pass on the devices yet: the chunk path
        self.rt = runtime if runtime is not None else CupyRuntime()
        self.store, self.layout = store, store.layout
        self.n, self.m = store.k, store.m
        self.slotted = self.layout.block_slots > 0
        self.code = RSCode(self.n, self.m, "reference")  # the matrices only; kernels run on the devices
        self._parity_addr = store.parity.ctypes.data
        self.rt.register_host(self._parity_addr, store.parity.nbytes)
        self._stagings: dict[int, tuple[int, Any, StagingBuffer]] = {}
        self._slot_maps: dict[int, tuple[int, Any]] = {}
        self.staging_bytes = config.cuda_staging_bytes
        self._lock = threading.Lock()

    def close(self) -> None:
        self.rt.unregister_host(self._parity_addr)

    # ------------------------------------------------------------------ memory

    def attach(self, regions: Sequence[RegionSpec]) -> CudaMemory:
        """Open a rank's CUDA regions: all on one device."""
        if any(r.kind != "cuda" for r in regions):
            raise ValueError("a CUDA group's ranks register CUDA IPC regions")
        devices = {self.rt.device_of(r.device_uuid) for r in regions}
        if len(devices) != 1:
            raise ValueError(f"a rank's regions are on {len(devices)} devices; one rank, one device")
        device = devices.pop()
        handles, bases = [], []
        try:
            for r in regions:
                bases.append(self.rt.open_ipc(r.ipc_handle, device) + r.offset)
                handles.append(r.ipc_handle)
        except BaseException:
            for h in handles:
                self.rt.close_ipc(h)
            raise
        idents = [self.identity(r) for r in regions]
        return CudaMemory([r.name for r in regions], device, handles, bases, idents, self.rt)

    def pieces(self, mem: CudaMemory, layer: int, block: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """Bytes [start, end) of ``mem``'s (layer, block) shard as (logical start,
        logical end, device address) pieces."""
        lay = self.layout
        if lay.simple:
            return [(start, end, int(mem.bases[0] + lay.offset + layer * lay.layer_stride
                                     + block * lay.block_stride + start))]
        return [(e.at + off, e.at + off + n, int(e.address(mem.bases[e.region], layer, block, off)))
                for e, off, n in lay.spans(layer, int(start), int(end))]

    def paddr(self, layer: int, block: int, j: int, start: int) -> int:
        """Host (pinned) address of byte ``start`` of parity row j of a stripe."""
        return int(self._parity_addr + ((layer * self.m + j) * self.layout.num_blocks + block)
                   * self.layout.block_bytes + start)

    def _staging(self, device: int) -> tuple[int, StagingBuffer]:
        hit = self._stagings.get(device)
        if hit is None:
            ptr, owner = self.rt.alloc(device, self.staging_bytes)
            hit = self._stagings[device] = (ptr, owner, StagingBuffer(self.staging_bytes))
        return hit[0], hit[2]

    def _piece_bytes(self, takes: int) -> int:
        """The most bytes of one piece whose ``takes`` staged copies fit half the
        staging buffer (pieces longer than that are cut, and at least two go to
        each launch), a multiple of 256."""
        most = (self.staging_bytes // 2 // max(1, takes)) & ~255
        if most < 256:
            raise ResourceExhausted(f"staging: {self.staging_bytes} bytes cannot hold {takes} pieces of 256 bytes "
                                    "(GHOSTSERVE_CUDA_STAGING_BYTES)")
        return most

    def _stage(self, dev: int, at: int, n: int, stream: Any) -> int:
        """``n`` bytes at ``at`` (peer or pinned host memory) copied into ``dev``'s staging buffer: their address there."""
        base, staging = self._staging(dev)
        s = base + staging.take(n)
        self.rt.copy(s, at, n, stream)
        return s

    def _slot_map(self, device: int) -> int:
        """The layout's slot map on ``device`` (for masked checksums)."""
        hit = self._slot_maps.get(device)
        if hit is None:
            sm = np.ascontiguousarray(self.store.slot_map)
            ptr, owner = self.rt.alloc(device, sm.nbytes)
            stream = self.rt.stream(device)
            self.rt.copy(ptr, sm.ctypes.data, sm.nbytes, stream)
            self.rt.record(stream).synchronize()
            hit = self._slot_maps[device] = (ptr, owner)
        return hit[0]

    # ------------------------------------------------------------------ checksums

    def _chunk(self, mem: CudaMemory, block: int, chunk: int, fill: int | None) -> Chunk:
        lay, cb = self.layout, self.layout.chunk_bytes
        pieces = [(a, hi - lo) for layer in range(lay.num_layers)
                  for lo, hi, a in self.pieces(mem, layer, block, chunk * cb, (chunk + 1) * cb)]
        if fill is None:
            fill = int(self.store.fill[block]) if self.slotted else 0
        if self.slotted and fill < lay.block_slots:
            return Chunk(pieces, slot_map=self._slot_map(mem.device), fill=fill, period=lay.block_bytes,
                         total=cb * lay.num_layers)
        return Chunk(pieces, total=cb * lay.num_layers)

    def _sums(self, mem: CudaMemory, items: Sequence[tuple[int, int]], fill: int | None = None) -> list[int]:
        """sum64 of (block, chunk) items of ``mem``, on its device, after what its
        stream has queued."""
        if not items:
            return []
        return self.rt.checksums(mem.device, [self._chunk(mem, b, c, fill) for b, c in items],
                                 self.rt.stream(mem.device))

    def checksum(self, mem: CudaMemory, block: int, chunk: int, fill: int | None = None) -> int:
        """The chunk's sum64 over its layers (masked to ``fill`` slots, default the stored fill)."""
        return self._sums(mem, [(block, chunk)], fill)[0]

    def intact(self, mem: CudaMemory, q: int, runs: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """Per (block, c0, c1) run: do all its chunks match rank ``q``'s stored sums? One launch."""
        items = [(b, c) for b, c0, c1 in runs for c in range(c0, c1)]
        sums = iter(self._sums(mem, items))
        store = self.store
        return np.array([all(next(sums) == int(store.crc[b, c, q]) for c in range(c0, c1))
                         for b, c0, c1 in runs], dtype=bool)

    # ------------------------------------------------------------------ encode

    def encode(self, ranges: Sequence[tuple[int, int, int]], mems: Mapping[int, CudaMemory],
               ready: Mapping[int, bytes] | None = None) -> _Completion:
        """Queue the parity of every range on its stripe's device and the sums of
        every touched chunk on each rank's device; ``result()`` waits for both and
        writes the sums into the store."""
        lay, rt, cb = self.layout, self.rt, self.layout.chunk_bytes
        devices = {m.device for m in mems.values()}
        events = {q: rt.open_event(h, mems[q].device) for q, h in (ready or {}).items() if h}
        for d in devices:  # every stream that reads a rank's memory waits for its writes
            for ev in events.values():
                rt.wait(rt.stream(d), ev)
        out = _Completion()
        coeffs = np.ascontiguousarray(self.code.parity_matrix)
        batches: dict[int, _Batch] = {}
        for block, start, end in ranges:
            dev = encode_device(block, mems, self.n)
            stream = rt.stream(dev)
            batch = batches.get(dev) or batches.setdefault(dev, _Batch(self, dev, coeffs))
            peers = [q for q in range(self.n) if mems[q].device != dev]
            takes = len(peers) + self.m
            most = self._piece_bytes(takes)
            for layer in range(lay.num_layers):
                cuts = [self.pieces(mems[q], layer, block, start, end) for q in range(self.n)]
                for i, (lo, hi, _) in enumerate(cuts[0]):
                    for a in range(lo, hi, most):
                        n = min(most, hi - a)
                        if not batch.room(n, takes):
                            batch.flush()
                        src = [cuts[q][i][2] + (a - lo) for q in range(self.n)]
                        for q in peers:  # not on this device: stage it (peer copy)
                            src[q] = self._stage(dev, src[q], n, stream)
                        base, staging = self._staging(dev)
                        dst = [base + staging.take(n) for _ in range(self.m)]
                        batch.add(n, src, dst, [(self.paddr(layer, block, j, a), dst[j]) for j in range(self.m)])
            out.nbytes += (end - start) * lay.num_layers * self.n
        for dev, batch in batches.items():
            batch.flush()
            out.events.append(rt.record(rt.stream(dev)))
        # the sums: per rank, on its device, every chunk the ranges touched
        items = [(b, c) for b, s, e in ranges for c in range(s // cb, e // cb)]

        def sums() -> None:
            for q in range(self.n):
                for (b, c), v in zip(items, self._sums(mems[q], items), strict=True):
                    self.store.crc[b, c, q] = v

        out.finish.append(sums)
        return out

    # ------------------------------------------------------------------ rebuild

    def rebuild_plan(self, erased: tuple[int, ...], want: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray]:
        """(source shard indices, decode rows giving ``want`` for ``erased``)."""
        sources, coeffs = self.code.decode_matrix(list(erased))
        return sources, np.ascontiguousarray(coeffs[[list(erased).index(w) for w in want]])

    def rebuild_tiles(self, rank, target, survivors, erased, runs) -> tuple[int, list[tuple[int, int, int]]]:
        """No fused pass on the GPU yet: every run goes chunk by chunk."""
        return 0, list(runs)

    def fetch_tiles(self, rank, survivors, erased, runs, place) -> tuple[int, list[tuple[int, int, int]]]:
        """No fused fetch on the GPU yet: every block goes its own way."""
        return 0, list(runs)

    def decode(self, plans: Sequence[tuple], mems: Mapping[int, CudaMemory], place: Mapping[int, Any] | None = None
               ) -> None:
        """For each plan (block, c0, c1, want, sources, rows): rebuild each wanted
        rank's chunks on its own device (or the device of its placement), from
        the survivors (staged when elsewhere) and parity copied up from the arena."""
        lay, rt, cb = self.layout, self.rt, self.layout.chunk_bytes
        place = place or {}
        used: set[int] = set()
        for b, c0, c1, want, sources, rows in plans:
            for wi, w in enumerate(want):
                if w in place:
                    dpath, dmem, db = place[w].data, place[w].memory, place[w].blocks[b]
                else:
                    dpath, dmem, db = self, mems[w], b
                dev = dmem.device
                stream = rt.stream(dev)
                staging = self._staging(dev)[1]
                used.add(dev)
                staged = [q for q in sources if q >= self.n or mems[q].device != dev]  # parity (host) or elsewhere
                most = self._piece_bytes(len(staged))
                for layer in range(lay.num_layers):
                    parties = [[(c0 * cb, c1 * cb, self.paddr(layer, b, q - self.n, c0 * cb))] if q >= self.n
                               else self.pieces(mems[q], layer, b, c0 * cb, c1 * cb) for q in sources]
                    parties.append(dpath.pieces(dmem, layer, db, c0 * cb, c1 * cb))
                    for _, length, addrs in _aligned(parties, c0 * cb, c1 * cb):
                        for off in range(0, length, most):
                            n = min(most, length - off)
                            src = [self._stage(dev, at + off, n, stream) if q in staged else at + off
                                   for q, at in zip(sources, addrs[:-1], strict=True)]
                            rt.matmul(dev, rows[wi : wi + 1], [src], [[addrs[-1] + off]], n, stream)
                            staging.seal()
        for ev in [rt.record(rt.stream(d)) for d in used]:
            ev.synchronize()

    def copy(self, src: CudaMemory, block: int, chunk: int, dst_path: Any, dst: Any, dst_block: int) -> None:
        """Copy one chunk (every layer) device to device (or peer)."""
        cb, rt = self.layout.chunk_bytes, self.rt
        stream = rt.stream(dst.device)
        for layer in range(self.layout.num_layers):
            parties = [self.pieces(src, layer, block, chunk * cb, (chunk + 1) * cb),
                       dst_path.pieces(dst, layer, dst_block, chunk * cb, (chunk + 1) * cb)]
            for _, n, (s, d) in _aligned(parties, chunk * cb, (chunk + 1) * cb):
                rt.copy(d, s, n, stream)
        rt.record(stream).synchronize()

    def zero(self, mem: CudaMemory, block: int, c0: int, c1: int) -> None:
        """Zero chunks [c0, c1) of a block in every layer (bytes that did not verify)."""
        cb, rt = self.layout.chunk_bytes, self.rt
        stream = rt.stream(mem.device)
        for layer in range(self.layout.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, c0 * cb, c1 * cb):
                rt.memset(at, 0, hi - lo, stream)
        rt.record(stream).synchronize()

    def read_block(self, mem: CudaMemory, block: int, out: np.ndarray) -> None:
        """Copy ``mem``'s shard of ``block`` (device) into ``out`` (host), layer after layer."""
        bb, rt = self.layout.block_bytes, self.rt
        stream = rt.stream(mem.device)
        for layer in range(self.layout.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, 0, bb):
                rt.copy(out.ctypes.data + layer * bb + lo, at, hi - lo, stream)
        rt.record(stream).synchronize()

    def write_block(self, mem: CudaMemory, block: int, data: np.ndarray) -> None:
        """Copy ``data`` (host, :meth:`read_block`'s order) into ``mem``'s ``block``."""
        bb, rt = self.layout.block_bytes, self.rt
        stream = rt.stream(mem.device)
        for layer in range(self.layout.num_layers):
            for lo, hi, at in self.pieces(mem, layer, block, 0, bb):
                rt.copy(at, data.ctypes.data + layer * bb + lo, hi - lo, stream)
        rt.record(stream).synchronize()

    def parity_mismatch(self, mems: Mapping[int, CudaMemory], block: int, chunk: int) -> bool:
        """Does the arena's parity of a chunk differ from a fresh encode (filled slots only)?"""
        lay, cb, store = self.layout, self.layout.chunk_bytes, self.store
        fresh = np.zeros((lay.num_layers, self.m, cb), dtype=np.uint8)
        dev = encode_device(block, mems, self.n)
        stream = self.rt.stream(dev)
        coeffs = np.ascontiguousarray(self.code.parity_matrix)
        peers = [q for q in range(self.n) if mems[q].device != dev]
        most = self._piece_bytes(len(peers) + self.m)
        for layer in range(lay.num_layers):
            parties = [self.pieces(mems[q], layer, block, chunk * cb, (chunk + 1) * cb) for q in range(self.n)]
            for lo, length, addrs in _aligned(parties, chunk * cb, (chunk + 1) * cb):
                for off in range(0, length, most):
                    n = min(most, length - off)
                    src = [self._stage(dev, at + off, n, stream) if q in peers else at + off
                           for q, at in enumerate(addrs)]
                    base, staging = self._staging(dev)
                    dst = [base + staging.take(n) for _ in range(self.m)]
                    self.rt.matmul(dev, coeffs, [src], [dst], n, stream)
                    for j in range(self.m):
                        self.rt.copy(fresh[layer, j].ctypes.data + lo + off - chunk * cb, dst[j], n, stream)
                    staging.seal()
        self.rt.record(stream).synchronize()
        keep = (slice(None) if not self.slotted or store.fill[block] >= lay.block_slots
                else store.slot_map < store.fill[block])
        for layer in range(lay.num_layers):
            if not np.array_equal(fresh[layer][:, keep], store.parity[layer, :, block, chunk * cb:(chunk + 1) * cb][:, keep]):
                return True
        return False


def _aligned(parties: Sequence[Sequence[tuple[int, int, int]]], start: int, end: int
             ) -> list[tuple[int, int, list[int]]]:
    """Cut [start, end) where any party's pieces change: (logical start, bytes,
    one address per party)."""
    if all(len(p) == 1 for p in parties):
        return [(start, end - start, [p[0][2] for p in parties])]
    edges = sorted({start, end} | {x for p in parties for lo, hi, _ in p for x in (lo, hi)})
    out = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        out.append((lo, hi - lo, [next(a + (lo - plo) for plo, phi, a in p if plo <= lo < phi) for p in parties]))
    return out

if TYPE_CHECKING:  # the seam, checked by the type checker (bin/test): this class is a DataPath
    _PATH: type[DataPath[CudaMemory]] = CudaDataPath

    def _memory(m: CudaMemory) -> RankMemory:
        return m


__all__ = ["CudaDataPath", "CudaMemory", "GpuUnavailable", "StagingBuffer", "encode_device"]
