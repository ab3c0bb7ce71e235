"""The seam between a group's logic and the memory its bytes live in.

A :class:`DataPath` maps ranks' KV regions and does the native work on them and
on the group's parity: encode the dirty ranges of a step, checksum chunks,
rebuild erased shards from survivors and parity, copy blocks. The group, the
step encoder and recovery never touch addresses or a codec themselves; they
plan (which ranges, which erasures, which chunks are settled) and publish.

Implementations, imported lazily by :func:`load` (``cuda`` needs CuPy; the
daemon must start without it):

* ``host``: POSIX shared memory and Intel ISA-L on the encode thread pool
  (:mod:`ghostserve.daemon.datapath.host`);
* ``cuda``: CUDA IPC regions, the kernels of ``cuda/`` on the devices, parity
  copied into the same pinned shared-memory arena (not built yet).

Contract of every data path:

* :meth:`DataPath.encode` returns a :class:`Completion` at once; parity and the
  encode-time checksums (``store.crc``) of the ranges are written when it is
  done. The caller marks the chunks unprotected before and publishes them
  (``store.chunk_step``, the protected step) only after ``result()`` returned.
* Everything else blocks until done and is called under the group's
  ``io_lock``, so a restore never sees half a step.
* A :class:`RankMemory` is owned by the data path that attached it; ``close``
  unmaps it once no caller holds it (a restore in flight keeps it alive).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ghostserve.errors import Unsupported

IMPLEMENTATIONS = {"host": "ghostserve.daemon.datapath.host:HostDataPath"}

Runs = Sequence[tuple[int, int, int]]      # (block, first chunk, end chunk)


class RankMemory(Protocol):
    """One rank's KV region as the data path mapped it."""

    region: str                        # the name the worker registered
    ident: tuple[int, int] | None      # identity of the memory object (to refuse sharing it)

    def close(self) -> None:
        """Forget the mapping (a lost rank's bytes must never feed a restore)."""


class Completion(Protocol):
    """Work in flight; ``result()`` waits and returns the data bytes it encoded,
    or raises what failed."""

    def result(self) -> int: ...


class DataPath(Protocol):
    """See the module doc. One per group; thread-safe where the group needs it."""

    kind: str

    def attach(self, region: str, size: int) -> RankMemory:
        """Map ``region`` (at least ``size`` bytes). Raises FileNotFoundError or ValueError."""

    def encode(self, ranges: Runs, mems: Mapping[int, RankMemory]) -> Completion:
        """Encode parity of every (block, start, end) byte range of every layer from
        ``mems`` (all N ranks) and record each touched chunk's checksums."""

    def checksum(self, mem: RankMemory, block: int, chunk: int) -> int:
        """The chunk's CRC32C, chained over layers (masked to the filled slots)."""

    def intact(self, mem: RankMemory, rank: int, runs: Runs) -> np.ndarray:
        """Per run: do ``mem``'s bytes match rank ``rank``'s stored checksums?"""

    def rebuild_tiles(self, rank: int, target: RankMemory, survivors: Mapping[int, RankMemory],
                      erased: tuple[int, ...], runs: Runs) -> tuple[int, list[tuple[int, int, int]]]:
        """The fused fast path: (chunks rebuilt and verified, runs to redo chunk by chunk)."""

    def decode(self, plans: Sequence[tuple[Any, ...]], mems: Mapping[int, RankMemory],
               dest: Mapping[int, tuple[RankMemory, Any]] | None = None) -> None:
        """Rebuild the wanted shards of every planned chunk range from survivors and parity."""

    def copy(self, src: RankMemory, block: int, chunk: int, dst: RankMemory, dst_block: int) -> None:
        """Copy one chunk (every layer) of ``src`` into ``dst_block`` of ``dst``."""


def load(kind: str) -> type:
    """The data path class for ``kind`` ("host", "cuda"). Raises :class:`Unsupported`."""
    if kind not in IMPLEMENTATIONS:
        raise Unsupported(f"no {kind!r} data path in this build (have: {', '.join(sorted(IMPLEMENTATIONS))})")
    module, _, name = IMPLEMENTATIONS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["Completion", "DataPath", "RankMemory", "load"]
