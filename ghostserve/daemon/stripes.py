"""One group's protection state, and the only code that changes it.

:class:`Stripes` owns what says which bytes are protected: the group's parity
store (parity; per chunk the step it was last protected at and every rank's
checksum; per block its filled slots; the protected step), the chunks a restore
found unrecoverable (``broken``), the I/O lock and the data path. The step
encoder and recovery work on a group's stripes and on snapshots the group hands
them; neither sees the group, and nothing else writes these records.

Locks: ``io`` serialises everything that reads or writes KV and parity bytes
(encoding a step, restore, fetch, scrub, a release), so a restore never sees
half a step. The methods that change records are called with ``io`` held, but
:meth:`publish` (the protected step), which the group calls under its own lock
right after the step's index news.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np

from ghostserve.daemon.commits import Range
from ghostserve.daemon.datapath import DataPath
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.store import ParityStore

Runs = list[tuple[int, int, int]]  # (block, first chunk, end chunk)


class Stripes:
    """The protection state of one group; see the module doc."""

    def __init__(self, name: str, store: ParityStore, data: DataPath):
        self.name, self.store, self.data = name, store, data
        self.layout: Layout = store.layout
        self.n, self.m = store.k, store.m
        self.slotted = self.layout.block_slots > 0
        self.io = threading.Lock()
        self._broken: set[tuple[int, int]] = set()  # (block, chunk) found unrecoverable; under io

    # ---------------------------------------------------------------- reading

    @property
    def protected_step(self) -> int:
        return self.store.protected_step

    def protected_chunks(self) -> int:
        return self.store.protected_chunks()

    def deliverable(self, blocks: Sequence[int], need: np.ndarray | None = None) -> np.ndarray:
        """Per block: every chunk protected, none known unrecoverable and, for
        slot-addressed layouts, at least ``need`` slots filled. Caller holds ``io``."""
        b = np.asarray(blocks, dtype=np.int64)
        ok = (self.store.chunk_step[b] >= 0).all(axis=1)
        if need is not None and self.slotted:
            ok &= self.store.fill[b] >= need
        if self._broken:
            ok &= np.array([not any((x, c) in self._broken for c in range(self.layout.chunks)) for x in blocks],
                           dtype=bool)
        return np.asarray(ok, dtype=bool)

    def settled_runs(self, flux: Iterable[tuple[int, int]], freed: Iterable[int]) -> tuple[Runs, list[tuple[int, int]]]:
        """What a restore rebuilds: (runs of consecutive protected chunks that no
        step in flight wrote, chunks of those a restore already found
        unrecoverable). Caller holds ``io``."""
        settled = self.store.chunk_step >= 0
        for b, c in flux:
            settled[b, c] = False
        settled[sorted(freed)] = False
        lost = sorted((b, c) for b, c in self._broken if settled[b, c])
        for b, c in lost:
            settled[b, c] = False
        edges = np.diff(np.pad(settled.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        (rb, c0s), (_, c1s) = np.nonzero(edges == 1), np.nonzero(edges == -1)
        return list(zip(rb.tolist(), c0s.tolist(), c1s.tolist(), strict=True)), lost

    def compatible(self, other: Stripes) -> list[str]:
        """Why ``other``'s blocks cannot receive these (empty: they can)."""
        a, b = self.layout, other.layout
        diff = [f for f in ("num_layers", "block_bytes", "chunk_bytes", "block_slots") if getattr(a, f) != getattr(b, f)]
        if self.n != other.n:
            diff.append("world_size")
        if not diff and self.slotted and not np.array_equal(self.store.slot_map, other.store.slot_map):
            diff.append("slot_map")
        return diff

    # ---------------------------------------------------------------- changing (caller holds io)

    def begin(self, ranges: Sequence[Range], fills: dict[int, int], released: Iterable[int]) -> None:
        """Before a step's parity is written: void the blocks it released (reused
        by this step), then mark every chunk it touches unprotected (a slot block
        whole, its fill set to what the step leaves)."""
        cb = self.layout.chunk_bytes
        self.void(released)
        step = self.store.chunk_step
        for b, s, e in ranges:
            if self.slotted:
                step[b, :] = -1  # before its fill changes
                self.store.fill[b] = fills.get(b, self.layout.block_slots)
            else:
                step[b, s // cb : e // cb] = -1

    def protect(self, t: int, ranges: Sequence[Range], freed: Iterable[int]) -> None:
        """After step ``t``'s parity and checksums are in place: its chunks are
        protected at ``t``; the blocks freed after it are void."""
        cb = self.layout.chunk_bytes
        for b, s, e in ranges:
            self.store.chunk_step[b, s // cb : e // cb] = t
            self._broken.difference_update((b, c) for c in range(s // cb, e // cb))
        self.void(freed)

    def void(self, blocks: Iterable[int]) -> None:
        """The blocks hold nothing protected any more (released, freed, reused)."""
        for b in set(blocks):
            self.store.chunk_step[b, :] = -1
            self._broken.difference_update((b, c) for c in range(self.layout.chunks))

    def fail(self, ranges: Sequence[Range], blocks: Iterable[int]) -> None:
        """A step that could not be encoded: every chunk it touched is unprotected
        (a slot block whole) and ``blocks`` (released or freed by it) are void."""
        cb, step = self.layout.chunk_bytes, self.store.chunk_step
        for b, s, e in ranges:
            if self.slotted:
                step[b, :] = -1
            else:
                step[b, s // cb : e // cb] = -1
        self.void(blocks)

    def mark_broken(self, block: int, c0: int, c1: int) -> None:
        """A restore could not rebuild chunks [c0, c1) of ``block``: they stay
        unrecoverable until a step writes them again."""
        self._broken.update((block, c) for c in range(c0, c1))

    # ---------------------------------------------------------------- publishing (caller holds the group's lock)

    def publish(self, t: int) -> None:
        """Step ``t`` is protected (after its index news are in)."""
        self.store.protected_step = t


__all__ = ["Runs", "Stripes"]
