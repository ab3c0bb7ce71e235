"""Recovery of one group's stripes: restore a replacement rank, fetch an ended
engine's blocks into a new engine, scrub. All three rest on one rule: no byte is
trusted until its encode-time checksum says so, and no rebuilt byte is reported
until it verifies. :func:`rebuild_verified` is the routine restore and fetch
share.

These functions see a group's :class:`~ghostserve.daemon.stripes.Stripes` and
the snapshot the group hands them (which ranks' memories to read, which chunks
are in flux), never the group: the group decides who is a survivor, waits for
them, and applies the result (rank states, metrics, events).

Threads: each call runs on its RPC's handler thread and holds the stripes' ``io``
lock while it reads or writes bytes (so it never sees half a step). Native work
goes through the stripes' data path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from ghostserve.daemon.stripes import Runs, Stripes

if TYPE_CHECKING:
    from ghostserve.daemon.datapath import DataPath, RankMemory

log = logging.getLogger("ghostserve.group")


@dataclass
class RestoreResult:
    """What a restore did (``RestoreResponse``)."""

    protected_step: int
    restored_bytes: int = 0
    unrecoverable_blocks: list[int] = field(default_factory=list)
    unrecoverable_bytes: int = 0
    corrupt_chunks: int = 0
    watermarks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class FetchSource(StrEnum):
    """Where a fetch's bytes came from (``FetchResponse.source``)."""

    NODE = "node"     # this daemon's kept memory and parity
    STORE = "store"   # the off-node mirror in the store


@dataclass
class FetchResult:
    """What a fetch did (``FetchResponse``)."""

    fetched_bytes: int = 0
    rebuilt: bool = False
    unrecoverable_blocks: list[int] = field(default_factory=list)
    corrupt_chunks: int = 0
    seconds: float = 0.0
    source: FetchSource = FetchSource.NODE


@dataclass
class ScrubResult:
    """What a scrub found (``ScrubResponse``)."""

    chunks_checked: int = 0
    parity_mismatches: int = 0
    checksum_mismatches: int = 0
    bad_blocks: list[int] = field(default_factory=list)
    bad_ranks: list[int] = field(default_factory=list)
    parity_checked: bool = True


@dataclass(frozen=True)
class Segment:
    """Chunks [c0, c1) of a block, and the survivors whose bytes of them are bad."""

    block: int
    c0: int
    c1: int
    bad: frozenset[int] = frozenset()


# ---------------------------------------------------------------------- shared routine


def find_bad(st: Stripes, survivors: Mapping[int, RankMemory], runs: Runs, corrupt: list[int]) -> list[Segment]:
    """Check every run on every survivor (one folded pass per run), and chunk by
    chunk where a run fails: segments with the same bad survivors. Adds the
    number of bad (chunk, rank) pairs to ``corrupt[0]``. Caller holds ``io``."""
    if not runs:  # everything went through the fused tiles
        return []
    data, store = st.data, st.store
    suspect: set[int] = set()
    for q, mem in survivors.items():
        suspect.update(int(j) for j in np.flatnonzero(~data.intact(mem, q, runs)))
    segments: list[Segment] = []
    for j, (b, c0, c1) in enumerate(runs):
        if j not in suspect:
            segments.append(Segment(b, c0, c1))
            continue
        for c in range(c0, c1):
            bad = frozenset(q for q, mem in survivors.items() if data.checksum(mem, b, c) != store.crc[b, c, q])
            if bad:
                corrupt[0] += len(bad)
                log.warning("group %s: block %d chunk %d (protected at step %d) fails its checksum "
                            "on ranks %s", st.name, b, c, store.chunk_step[b, c], sorted(bad))
            last = segments[-1] if segments else None
            if last is not None and last.block == b and last.c1 == c and last.bad == bad:
                segments[-1] = Segment(b, last.c0, c + 1, bad)
            else:
                segments.append(Segment(b, c, c + 1, bad))
    return segments


@dataclass(frozen=True)
class Placement:
    """Where a rebuilt rank's chunks go when not into its own memory at the same
    block: another group's rank (a fetch into a new engine), ``blocks`` mapping
    source block -> destination block."""

    data: DataPath         # the destination group's data path
    memory: RankMemory
    blocks: Mapping[int, int]


def rebuild_verified(st: Stripes, rank: int, target: RankMemory | None, survivors: Mapping[int, RankMemory],
                     base_erased: set[int], segments: list[Segment], place: Placement | None = None
                     ) -> tuple[list[Segment], list[Segment]]:
    """Rebuild ``rank``'s chunks of every segment (into ``target``, or where
    ``place`` says), and the bad survivors' into their own memory (repaired),
    from the good survivors and parity; then check what was written against the
    encode-time checksums. Returns (segments rebuilt and verified, segments
    beyond the code or that did not verify). Beyond the code: nothing is
    written; did not verify: the bytes written there are zeroed. Caller holds ``io``."""
    if not segments:
        return [], []
    data, store = st.data, st.store
    mems = {**survivors, **({rank: target} if target is not None else {})}
    plans, rebuilt, lost = [], [], []
    for seg in segments:
        erased = tuple(sorted(base_erased | {rank} | seg.bad))
        if len(erased) > st.m:
            lost.append(seg)
            continue
        want = (rank, *sorted(seg.bad))
        rebuilt.append((seg, want))
        plans.append((seg.block, seg.c0, seg.c1, want, *data.rebuild_plan(erased, want)))
    data.decode(plans, mems, place={rank: place} if place is not None else None)
    failed: set[int] = set()
    fill = store.fill if st.slotted else None
    for w in {w for _, want in rebuilt for w in want}:
        mine = [j for j, (_, want) in enumerate(rebuilt) if w in want]
        if w == rank and place is not None:  # another group's blocks: chunk by chunk
            for j in mine:
                seg = rebuilt[j][0]
                f = int(fill[seg.block]) if fill is not None else 0
                if any(place.data.checksum(place.memory, place.blocks[seg.block], c, fill=f)
                       != store.crc[seg.block, c, w] for c in range(seg.c0, seg.c1)):
                    failed.add(j)
            continue
        ok = data.intact(mems[w], w, [(rebuilt[j][0].block, rebuilt[j][0].c0, rebuilt[j][0].c1) for j in mine])
        for j, good in zip(mine, ok, strict=True):
            seg = rebuilt[j][0]
            # a run's plain CRC misses for partly filled slot blocks: check those chunk by chunk
            if not good and any(data.checksum(mems[w], seg.block, c) != store.crc[seg.block, c, w]
                                for c in range(seg.c0, seg.c1)):
                failed.add(j)
    done = []
    for j, (seg, _) in enumerate(rebuilt):
        if j not in failed:
            done.append(seg)
            continue
        if place is not None:
            place.data.zero(place.memory, place.blocks[seg.block], seg.c0, seg.c1)
        elif target is not None:
            data.zero(target, seg.block, seg.c0, seg.c1)
        lost.append(seg)
    return done, lost


# ---------------------------------------------------------------------- restore


def restore(st: Stripes, rank: int, target: RankMemory, survivors: Mapping[int, RankMemory],
            flux: Iterable[tuple[int, int]], freed_in_flux: Iterable[int], result: RestoreResult) -> None:
    """Rebuild every protected, settled chunk of ``rank`` into ``target`` from
    ``survivors`` and parity, filling ``result``. Survivors failing their
    checksum count as erasures (and are repaired when the code allows). Chunks
    with more bad shards than m are reported unrecoverable and left untouched
    (and remembered as broken until rewritten); chunks in flux (written or freed
    by steps not yet encoded) are left to the engine's recompute.

    Fast path (the data path's fused tiles, :mod:`ghostserve.daemon.datapath.tiles`):
    tiles of whole chunks, each checked on every survivor, decoded while its
    sources are in cache and checked again, spread over the encode threads.
    Tiles that fail a check, partly filled slot-addressed blocks (masked
    checksums), restores with more erasures than parity, and everything when
    the data path has no tiles, take the chunk path: :func:`find_bad` then
    :func:`rebuild_verified`."""
    lay, cb = st.layout, st.layout.chunk_bytes
    base_erased = {q for q in range(st.n) if q not in survivors}
    with st.io:
        runs, lost_chunks = st.settled_runs(flux, freed_in_flux)
        result.unrecoverable_bytes += len(lost_chunks) * cb * lay.num_layers
        unrecoverable = {b for b, _ in lost_chunks}  # lost in an earlier restore: still lost
        erased = tuple(sorted(base_erased | {rank}))
        if runs and st.data.tile_bytes > 0 and len(erased) <= st.m:
            slow: Runs = []
            if st.slotted:  # masked checksums: partly filled blocks stay on the chunk path
                full = st.store.fill >= lay.block_slots
                slow = [rn for rn in runs if not full[rn[0]]]
                runs = [rn for rn in runs if full[rn[0]]]
            done, retry = st.data.rebuild_tiles(rank, target, survivors, erased, runs)
            result.restored_bytes += done * cb * lay.num_layers
            # tiles that failed a check (they wrote nothing) are redone chunk by chunk
            runs = sorted(slow + retry)
        corrupt = [0]
        segments = find_bad(st, survivors, runs, corrupt)
        result.corrupt_chunks += corrupt[0]
        done_segs, lost_segs = rebuild_verified(st, rank, target, survivors, base_erased, segments)
        for seg in done_segs:
            result.restored_bytes += (seg.c1 - seg.c0) * cb * lay.num_layers
        for seg in lost_segs:
            result.unrecoverable_bytes += (seg.c1 - seg.c0) * cb * lay.num_layers
            st.mark_broken(seg.block, seg.c0, seg.c1)
            unrecoverable.add(seg.block)
    result.unrecoverable_blocks = sorted(unrecoverable)


# ---------------------------------------------------------------------- fetch


def fetch(st: Stripes, rank: int, held: Mapping[int, RankMemory], blocks: list[int], tokens: int,
          dst_data: DataPath, dst_memory: RankMemory, dst_blocks: list[int]) -> FetchResult:
    """Write rank ``rank``'s protected bytes of ``blocks`` (covering ``tokens``
    slots, block i holding slots [i*S, (i+1)*S)) into ``dst_blocks`` of another
    group's rank (``dst_memory``, mapped by ``dst_data``). Read from the rank's kept memory (``held``) when its
    bytes pass their checksums, else decoded from the other ranks and parity.
    Every delivered block is checked against the encode-time checksums; blocks
    that cannot be delivered are reported (the engine recomputes them), and what
    was written there does not count. The caller checked the arguments and holds
    the destination's ``io``; this takes the source's."""
    started = time.perf_counter()
    lay, store, data = st.layout, st.store, st.data
    out = FetchResult(rebuilt=rank not in held)
    slots = lay.block_slots
    with st.io:
        src_b = np.asarray(blocks, dtype=np.int64)
        wanted = np.ones(len(src_b), dtype=bool)
        need = None
        if slots:  # block i holds slots [i*S, (i+1)*S) of the tokens: past them nothing is needed
            need = np.minimum(slots, tokens - np.arange(len(src_b)) * slots)
            wanted = need > 0
        ok = st.deliverable(blocks, need)
        out.unrecoverable_blocks += src_b[wanted & ~ok].tolist()
        todo = [(b, db) for b, db, use in zip(blocks, dst_blocks, (wanted & ok).tolist(), strict=True) if use]
        fast = _fetch_tiles(st, rank, held, todo, Placement(dst_data, dst_memory, dict(todo)), out)
        for b, db in todo:
            if b in fast:
                out.fetched_bytes += lay.block_bytes * lay.num_layers
                continue
            src = held.get(rank)
            if src is not None and all(data.checksum(src, b, c) == store.crc[b, c, rank] for c in range(lay.chunks)):
                for c in range(lay.chunks):  # the kept bytes are good: copy them
                    data.copy(src, b, c, dst_data, dst_memory, db)
                out.fetched_bytes += lay.block_bytes * lay.num_layers
                continue
            others = {q: mem for q, mem in held.items() if q != rank}
            corrupt = [int(src is not None)]  # the kept copy failed its check
            segments = find_bad(st, others, [(b, 0, lay.chunks)], corrupt)
            out.corrupt_chunks += corrupt[0]
            done, lost = rebuild_verified(st, rank, None, others, {q for q in range(st.n) if q not in others},
                                          segments, Placement(dst_data, dst_memory, {b: db}))
            out.rebuilt = True
            if lost:
                out.unrecoverable_blocks.append(b)
            else:
                out.fetched_bytes += lay.block_bytes * lay.num_layers
    out.seconds = time.perf_counter() - started
    return out


def _fetch_tiles(st: Stripes, rank: int, held: Mapping[int, RankMemory], todo: list[tuple[int, int]],
                 place: Placement, out: FetchResult) -> set[int]:
    """Fetch's fast path (the data path's fused tiles): whole blocks (every slot
    filled), copied from the rank's kept memory, else rebuilt from the others
    and parity, each tile checked before and after, tiles running on over
    blocks that lie back to back at both ends. Returns the blocks delivered;
    the caller takes the rest block by block (which finds bad chunks, repairs
    or reports them). Nothing here decides that a block is lost."""
    lay, store = st.layout, st.store
    if st.data.tile_bytes <= 0 or len({b for b, _ in todo}) != len(todo) or len({d for _, d in todo}) != len(todo):
        return set()
    full = [b for b, _ in todo if not lay.block_slots or store.fill[b] >= lay.block_slots]
    left = set(full)
    if rank in held and left:
        _, failed = st.data.fetch_tiles(rank, {rank: held[rank]}, (), [(b, 0, lay.chunks) for b in sorted(left)],
                                        place)
        left = {b for b, _, _ in failed}
    others = {q: mem for q, mem in held.items() if q != rank}
    erased = tuple(q for q in range(st.n) if q not in others)
    if left and len(erased) <= st.m:
        _, failed = st.data.fetch_tiles(rank, others, erased, [(b, 0, lay.chunks) for b in sorted(left)], place)
        out.rebuilt = out.rebuilt or len(failed) < len(left)
        left = {b for b, _, _ in failed}
    return set(full) - left


# ---------------------------------------------------------------------- scrub


def scrub(st: Stripes, mems: Mapping[int, RankMemory], parity: bool) -> ScrubResult:
    """Compare every protected chunk's live bytes in ``mems`` with its checksums
    and, with ``parity`` (every rank alive), its stored parity with a fresh encode."""
    lay, store, data = st.layout, st.store, st.data
    out = ScrubResult(parity_checked=parity)
    bad_blocks: set[int] = set()
    bad_ranks: set[int] = set()
    with st.io:
        for block in range(lay.num_blocks):
            for c in np.flatnonzero(store.chunk_step[block] >= 0):
                out.chunks_checked += 1
                bad = [q for q in mems if data.checksum(mems[q], block, c) != store.crc[block, c, q]]
                if bad:
                    out.checksum_mismatches += 1
                    bad_blocks.add(block)
                    bad_ranks.update(bad)
                if parity and data.parity_mismatch(mems, block, int(c)):
                    out.parity_mismatches += 1
                    bad_blocks.add(block)
    out.bad_blocks, out.bad_ranks = sorted(bad_blocks), sorted(bad_ranks)
    return out


__all__ = ["FetchResult", "FetchSource", "Placement", "RestoreResult", "ScrubResult", "Segment", "fetch", "find_bad",
           "rebuild_verified", "restore", "scrub"]
