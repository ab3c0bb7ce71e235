"""The seam between a group's logic and the memory its bytes live in.

A :class:`DataPath` maps ranks' KV regions and does the native work on them and
on the group's parity: encode the dirty ranges of a step, checksum chunks,
rebuild erased shards from survivors and parity, copy blocks. The group, the
step encoder and recovery never touch addresses or a codec themselves; they
plan (which ranges, which erasures, which chunks are settled) and publish.

Implementations, imported lazily by :func:`load` (``cuda`` needs CuPy to run,
not to be imported; the daemon must start without it):

* ``host``: POSIX shared memory and Intel ISA-L on the encode thread pool
  (:mod:`ghostserve.daemon.datapath.host`), with restore's fused tiles
  (:mod:`ghostserve.daemon.datapath.tiles`);
* ``cuda``: CUDA IPC regions, the kernels of ``cuda/`` on the devices, parity
  copied into the same pinned shared-memory arena
  (:mod:`ghostserve.daemon.datapath.cuda`; run so far against a stand-in of
  CUDA on the CPU, not on a GPU).

What differs between kinds is asked of the class, never tested above this seam
with the kind's name: :meth:`DataPath.check` and :meth:`DataPath.identity` of a
region, ``checksum_width``, and ``shm_names`` (whether its regions are named
shared-memory segments the daemon may unlink when it drops a group).

Contract of every data path:

* :meth:`DataPath.encode` returns a :class:`Completion` at once; parity and the
  encode-time checksums (``store.crc``) of the ranges are written when it is
  done. The caller (the group's stripes) marks the chunks unprotected before and
  protects them (``store.chunk_step``, then the protected step) only after
  ``result()`` returned.
* Everything else blocks until done and is called under the group's
  stripes' ``io`` lock, so a restore never sees half a step.
* A :class:`RankMemory` is owned by the data path that attached it; ``close``
  unmaps it once no caller holds it (a restore in flight keeps it alive).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from ghostserve.errors import Unsupported

IMPLEMENTATIONS = {"host": "ghostserve.daemon.datapath.host:HostDataPath",
                   "cuda": "ghostserve.daemon.datapath.cuda:CudaDataPath"}


@dataclass(frozen=True)
class RegionSpec:
    """One region a rank registered, as a data path needs it to map it.

    ``name`` identifies it in status, logs and refusals: the shared-memory name
    (host), or ``cuda:<uuid>:<handle digest>+<offset>`` (CUDA). ``size`` is the
    bytes the layout uses there."""

    name: str
    size: int
    ipc_handle: bytes = b""    # CUDA: cudaIpcMemHandle_t of the allocation's base
    offset: int = 0            # CUDA: where the region starts in that allocation
    device_uuid: bytes = b""   # CUDA: the device, by UUID

    @property
    def kind(self) -> str:
        """Which data path maps it ("host", "cuda")."""
        return "cuda" if self.ipc_handle else "host"

    @classmethod
    def shm(cls, name: str, size: int) -> RegionSpec:
        """A named POSIX shared-memory segment."""
        return cls(name, size)

    @classmethod
    def cuda(cls, ipc_handle: bytes, offset: int, device_uuid: bytes, size: int) -> RegionSpec:
        """A CUDA allocation's IPC handle, the region's offset in it and its device;
        named ``cuda:<uuid>:<handle digest>+<offset>`` in status and logs."""
        digest = hashlib.sha256(ipc_handle).hexdigest()[:16]
        return cls(f"cuda:{device_uuid.hex()}:{digest}+{offset}", size, ipc_handle, offset, device_uuid)

    def sized(self, size: int) -> RegionSpec:
        return RegionSpec(self.name, size, self.ipc_handle, self.offset, self.device_uuid)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ipc_handle"], d["device_uuid"] = self.ipc_handle.hex(), self.device_uuid.hex()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegionSpec:
        return cls(d["name"], int(d["size"]), bytes.fromhex(d.get("ipc_handle", "")), int(d.get("offset", 0)),
                   bytes.fromhex(d.get("device_uuid", "")))

Runs = Sequence[tuple[int, int, int]]      # (block, first chunk, end chunk)


class RankMemory(Protocol):
    """One rank's KV regions as the data path mapped them."""

    idents: list[tuple[int, int]]      # identity of each region (two ranks may not share one)

    @property
    def region(self) -> str:
        """The first region's name (in status and logs)."""

    def close(self) -> None:
        """Forget the mapping (a lost rank's bytes must never feed a restore)."""


M = TypeVar("M", bound=RankMemory)


class Completion(Protocol):
    """Work in flight; ``result()`` waits and returns the data bytes it encoded,
    or raises what failed."""

    def result(self) -> int: ...


class DataPath(Protocol[M]):
    """See the module doc. One per group; thread-safe where the group needs it.
    ``M`` is the implementation's own :class:`RankMemory`: its methods take only
    memories it attached. Constructed as ``cls(store, pool, config, runtime)`` (``config``: the
    daemon's :class:`~ghostserve.config.Config`; ``runtime``: the CUDA runtime, None for the
    real one; the host path takes no runtime)."""

    kind: str
    checksum_width: int                # bytes of one chunk checksum in the store
    shm_names: bool                    # regions are named shared-memory segments
    tile_bytes: int                    # restore's fused tiles: bytes of the lost rank per tile (0: none)

    def __init__(self, store: Any, pool: Any, config: Any, runtime: Any = None) -> None:
        """Over ``store`` (the group's ParityStore), with the daemon's encode pool."""

    @staticmethod
    def check(spec: RegionSpec) -> None:
        """Raise ValueError unless ``spec`` can name a region of this kind."""

    @staticmethod
    def identity(spec: RegionSpec) -> tuple[int, int]:
        """What makes two regions the same memory (two ranks may not share one).
        Raises FileNotFoundError for a region that does not exist."""

    def attach(self, regions: Sequence[RegionSpec]) -> M:
        """Map a rank's regions (in the layout's region order). Raises
        FileNotFoundError or ValueError (the region is not there, or too small)."""

    def encode(self, ranges: Runs, mems: Mapping[int, M],
               ready: Mapping[int, bytes] | None = None) -> Completion:
        """Encode parity of every (block, start, end) byte range of every layer from
        ``mems`` (all N ranks) and record each touched chunk's checksums. ``ready``:
        per rank, the handle of an event after which its writes are complete."""

    def checksum(self, mem: M, block: int, chunk: int, fill: int | None = None) -> int:
        """The chunk's checksum, chained over layers, masked to ``fill`` slots
        (default: the store's fill of the block; slot-addressed layouts only)."""

    def intact(self, mem: M, rank: int, runs: Runs) -> np.ndarray:
        """Per run: do ``mem``'s bytes match rank ``rank``'s stored checksums?"""

    def rebuild_tiles(self, rank: int, target: M, survivors: Mapping[int, M],
                      erased: tuple[int, ...], runs: Runs) -> tuple[int, list[tuple[int, int, int]]]:
        """The fused fast path: (chunks rebuilt and verified, runs to redo chunk by chunk)."""

    def fetch_tiles(self, rank: int, survivors: Mapping[int, M], erased: tuple[int, ...],
                    runs: Runs, place: Any) -> tuple[int, list[tuple[int, int, int]]]:
        """Like :meth:`rebuild_tiles`, into another group's blocks (a fetch); copies
        when ``rank`` is a survivor. May do nothing (every run returned)."""

    def rebuild_plan(self, erased: tuple[int, ...], want: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        """(the survivors to read, the decode matrix) that rebuild ``want`` when
        ``erased`` are missing."""

    def decode(self, plans: Sequence[tuple[Any, ...]], mems: Mapping[int, M],
               place: Mapping[int, Any] | None = None) -> None:
        """Rebuild the wanted shards of every planned chunk range from survivors and
        parity; ``place`` puts a rank's rebuilt chunks into another group's blocks."""

    def copy(self, src: M, block: int, chunk: int, dst_path: DataPath[M], dst: M,
             dst_block: int) -> None:
        """Copy one chunk (every layer) of ``src`` into ``dst_block`` of ``dst``."""

    def zero(self, mem: M, block: int, c0: int, c1: int) -> None:
        """Zero chunks [c0, c1) of ``block`` in every layer (a rebuild that did not verify)."""

    def read_block(self, mem: M, block: int, out: np.ndarray) -> None:
        """Gather ``mem``'s shard of ``block``, every layer, into ``out`` (host bytes,
        ``num_layers * block_bytes``, layer after layer): what the mirror stores."""

    def write_block(self, mem: M, block: int, data: np.ndarray) -> None:
        """Scatter ``data`` (as :meth:`read_block` gathers it) into ``mem``'s ``block``."""

    def parity_mismatch(self, mems: Mapping[int, M], block: int, chunk: int) -> bool:
        """Does the stored parity of the chunk differ from a fresh encode of ``mems`` (scrub)?"""

    def close(self) -> None:
        """The group is dropped: give back what the data path holds itself."""


def load(kind: str) -> type[DataPath[Any]]:
    """The data path class for ``kind`` ("host", "cuda"). Raises :class:`Unsupported`."""
    if kind not in IMPLEMENTATIONS:
        raise Unsupported(f"no {kind!r} data path in this build (have: {', '.join(sorted(IMPLEMENTATIONS))})")
    module, _, name = IMPLEMENTATIONS[kind].partition(":")
    cls: type[DataPath[Any]] = getattr(importlib.import_module(module), name)
    return cls


__all__ = ["Completion", "DataPath", "RankMemory", "RegionSpec", "load"]
