"""Recovery of one group: restore a replacement rank, fetch an ended engine's blocks
into a new engine, scrub. All three rest on one rule: no byte is trusted until
its encode-time checksum says so, and no rebuilt byte is reported until it
verifies. :func:`rebuild_verified` is the routine restore and fetch share.

Threads: each call runs on its RPC's handler thread and holds the group's
``io_lock`` while it reads or writes bytes (so it never sees half a step); it
takes ``lock`` only to read state and publish. Native work goes through the
group's data path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ghostserve.daemon.messages import Event, EventKind
from ghostserve.daemon.ranks import RankState
from ghostserve.errors import BlockOutOfRange, InvalidRequest, UnknownRank, WrongState

if TYPE_CHECKING:
    from ghostserve.daemon.datapath import RankMemory
    from ghostserve.daemon.group import Group

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


@dataclass
class FetchResult:
    """What a fetch did (``FetchResponse``)."""

    fetched_bytes: int = 0
    rebuilt: bool = False
    unrecoverable_blocks: list[int] = field(default_factory=list)
    corrupt_chunks: int = 0
    seconds: float = 0.0


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


def find_bad(g: Group, survivors: Mapping[int, RankMemory], runs, corrupt: list[int]) -> list[Segment]:
    """Check every run on every survivor (one folded pass per run), and chunk by
    chunk where a run fails: segments with the same bad survivors. Adds the
    number of bad (chunk, rank) pairs to ``corrupt[0]``."""
    if not runs:  # everything went through the fused tiles
        return []
    data, store = g.data, g.store
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
                            "on ranks %s", g.name, b, c, store.chunk_step[b, c], sorted(bad))
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

    data: object          # the destination group's data path
    memory: RankMemory
    blocks: Mapping[int, int]


def rebuild_verified(g: Group, rank: int, target: RankMemory | None, survivors: Mapping[int, RankMemory],
                     base_erased: set[int], segments: list[Segment], place: Placement | None = None
                     ) -> tuple[list[Segment], list[Segment]]:
    """Rebuild ``rank``'s chunks of every segment (into ``target``, or where
    ``place`` says), and the bad survivors' into their own memory (repaired),
    from the good survivors and parity; then check what was written against the
    encode-time checksums. Returns (segments rebuilt and verified, segments
    beyond the code or that did not verify). Beyond the code: nothing is
    written; did not verify: the bytes written there are zeroed."""
    if not segments:
        return [], []
    data, store = g.data, g.store
    mems = {**survivors, **({rank: target} if target is not None else {})}
    plans, rebuilt, lost = [], [], []
    for seg in segments:
        erased = tuple(sorted(base_erased | {rank} | seg.bad))
        if len(erased) > g.m:
            lost.append(seg)
            continue
        want = (rank, *sorted(seg.bad))
        rebuilt.append((seg, want))
        plans.append((seg.block, seg.c0, seg.c1, want, *data.rebuild_plan(erased, want)))
    data.decode(plans, mems, place={rank: place} if place is not None else None)
    failed: set[int] = set()
    fill = store.fill if g.slotted else None
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
        else:
            data.zero(target, seg.block, seg.c0, seg.c1)
        lost.append(seg)
    return done, lost


# ---------------------------------------------------------------------- restore


def restore(g: Group, rank: int, session: str | None) -> RestoreResult:
    """Rebuild every protected chunk of ``rank`` into its current memory from the
    survivors and parity. Survivors failing their checksum count as erasures
    (and are repaired when the code allows). Chunks with more bad shards than m
    are reported unrecoverable and left untouched."""
    started = time.perf_counter()
    with g.lock:
        # After a daemon restart, survivors are detached until their workers
        # reconnect, and then catching up until the commits they resend (all they
        # wrote since the protected step) have arrived. Until then their in-flight
        # chunks are unknown: a chunk they rewrote would fail its checksum and be
        # taken for corruption. So wait for them (a survivor that dies meanwhile
        # stops being waited for).
        deadline = time.monotonic() + g.rejoin_wait
        while waiting := g.catching_up(but=rank):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("group %s: restoring rank %d without ranks %s, which have not rejoined and "
                            "resent their commits within %g s", g.name, rank, waiting, g.rejoin_wait)
                break
            g.cond.wait(left)
        r = g.ranks.get(rank)
        if r is None:
            raise UnknownRank(g.name, rank)
        if session is not None and r.session != session:
            raise WrongState(g.name, rank, "stale session: register again")
        if r.memory is None:
            raise WrongState(g.name, rank, f"rank is {r.state} with no memory registered")
        # a survivor still catching up (its wait ran out) is an erasure: its chunks are not all known
        survivors = {q: x.memory for q, x in g.ranks.items()
                     if q != rank and x.state == RankState.ALIVE and not x.catching_up and x.memory is not None}
        base_erased = {q for q in range(g.n) if q not in survivors}
        flux, freed_in_flux = g.encoder.in_flux()
        target = r.memory
        result = RestoreResult(g.protected_step, watermarks=dict(g.watermarks))
    with g.io_lock:
        _restore_into(g, rank, target, survivors, base_erased, flux, freed_in_flux, result)
    result.seconds = time.perf_counter() - started
    with g.lock:
        if r.state == RankState.REPLACING:
            r.state = RankState.ALIVE
            r.committed = g.protected_step
        g.metrics.restores.labels(g.name, "ok" if not result.unrecoverable_blocks else "partial").inc()
        g.metrics.restore_seconds.labels(g.name).observe(result.seconds)
        g.metrics.restored_bytes.labels(g.name).inc(result.restored_bytes)
        g.metrics.unrecoverable_bytes.labels(g.name).inc(result.unrecoverable_bytes)
        g.metrics.corruption.labels(g.name).inc(result.corrupt_chunks)
        g.last_restore = {"rank": rank, "seconds": result.seconds, "restored_bytes": result.restored_bytes,
                          "unrecoverable_bytes": result.unrecoverable_bytes, "unix_time": time.time()}
        g.manifest_ranks()
        g.update_gauges()
        g.broadcast(Event(EventKind.RANK_RESTORED, rank))
        g.cond.notify_all()
    return result


def _restore_into(g: Group, rank, target, survivors, base_erased, flux, freed_in_flux, result) -> None:
    """Rebuild every protected, settled chunk of ``rank``.

    Fast path (the data path's fused tiles, :mod:`ghostserve.daemon.rebuild`):
    tiles of whole chunks, each checked on every survivor, decoded while its
    sources are in cache and checked again, spread over the encode threads.
    Tiles that fail a check, partly filled slot-addressed blocks (masked
    checksums), restores with more erasures than parity, and everything when
    ``tile_bytes <= 0``, take the chunk path: :func:`find_bad` then
    :func:`rebuild_verified`."""
    lay, store, cb = g.layout, g.store, g.layout.chunk_bytes
    settled = store.chunk_step >= 0
    for b, c in flux:
        settled[b, c] = False
    settled[sorted(freed_in_flux)] = False
    # lost in an earlier restore: still lost
    lost_chunks = sorted((b, c) for b, c in g.broken if settled[b, c])
    for b, c in lost_chunks:
        settled[b, c] = False
    result.unrecoverable_bytes += len(lost_chunks) * cb * lay.num_layers
    unrecoverable = {b for b, _ in lost_chunks}
    # runs (block, c0, c1) of consecutive settled chunks
    edges = np.diff(np.pad(settled.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    (rb, c0s), (_, c1s) = np.nonzero(edges == 1), np.nonzero(edges == -1)
    runs: list[tuple[int, int, int]] = list(zip(rb.tolist(), c0s.tolist(), c1s.tolist(), strict=True))
    erased = tuple(sorted(base_erased | {rank}))
    if runs and g.tile_bytes > 0 and len(erased) <= g.m:
        slow: list[tuple[int, int, int]] = []
        if g.slotted:  # masked checksums: partly filled blocks stay on the chunk path
            full = store.fill >= lay.block_slots
            slow = [rn for rn in runs if not full[rn[0]]]
            runs = [rn for rn in runs if full[rn[0]]]
        g.data.tile_bytes = g.tile_bytes
        done, retry = g.data.rebuild_tiles(rank, target, survivors, erased, runs)
        result.restored_bytes += done * cb * lay.num_layers
        # tiles that failed a check (they wrote nothing) are redone chunk by chunk
        runs = sorted(slow + retry)
    corrupt = [0]
    segments = find_bad(g, survivors, runs, corrupt)
    result.corrupt_chunks += corrupt[0]
    done_segs, lost_segs = rebuild_verified(g, rank, target, survivors, base_erased, segments)
    for seg in done_segs:
        result.restored_bytes += (seg.c1 - seg.c0) * cb * lay.num_layers
    for seg in lost_segs:
        result.unrecoverable_bytes += (seg.c1 - seg.c0) * cb * lay.num_layers
        g.broken.update((seg.block, c) for c in range(seg.c0, seg.c1))
        unrecoverable.add(seg.block)
    result.unrecoverable_blocks = sorted(unrecoverable)


# ---------------------------------------------------------------------- fetch


def compatible(src: Group, dst: Group) -> list[str]:
    """Why ``dst``'s blocks cannot receive ``src``'s (empty: they can)."""
    a, b = src.layout, dst.layout
    diff = [f for f in ("num_layers", "block_bytes", "chunk_bytes", "block_slots") if getattr(a, f) != getattr(b, f)]
    if src.n != dst.n:
        diff.append("world_size")
    if not diff and src.slotted and not np.array_equal(src.store.slot_map, dst.store.slot_map):
        diff.append("slot_map")
    return diff


def fetch(g: Group, rank: int, blocks: list[int], tokens: int, dst: Group, dst_rank: int,
          dst_session: str, dst_blocks: list[int]) -> FetchResult:
    """Write rank ``rank``'s protected bytes of ``blocks`` (covering ``tokens``
    slots, block i holding slots [i*S, (i+1)*S)) into ``dst_blocks`` of rank
    ``dst_rank`` of ``dst``. Read from the rank's kept memory when its bytes pass
    their checksums, else decoded from the other ranks and parity. Every
    delivered block is checked against the encode-time checksums; blocks that
    cannot be delivered are reported (the engine recomputes them), and what was
    written there does not count. The caller checked ``ended()`` and
    :func:`compatible`."""
    started = time.perf_counter()
    lay, store = g.layout, g.store
    if not 0 <= rank < g.n:
        raise UnknownRank(g.name, rank, f"is outside 0..{g.n - 1}")
    for b in blocks:
        if b >= lay.num_blocks:
            raise BlockOutOfRange(g.name, rank, b, f"outside 0..{lay.num_blocks - 1}")
    for b in dst_blocks:
        if b >= dst.layout.num_blocks:
            raise BlockOutOfRange(dst.name, dst_rank, b, f"outside 0..{dst.layout.num_blocks - 1}")
    slots = lay.block_slots
    if slots and tokens > len(blocks) * slots:
        raise InvalidRequest(f"{tokens} tokens do not fit in {len(blocks)} blocks of {slots} slots")
    with g.lock:
        held = {q: x.memory for q, x in g.ranks.items() if x.memory is not None}
    with dst.lock:
        target = dst.check_session(dst_rank, dst_session)
        if target.state != RankState.ALIVE or target.memory is None:
            raise WrongState(dst.name, dst_rank, f"rank is {target.state}: cannot receive a fetch")
        tmem = target.memory  # held: the mapping stays alive while we write
    out = FetchResult(rebuilt=rank not in held)
    data = g.data
    with g.io_lock, dst.io_lock:
        src_b = np.asarray(blocks, dtype=np.int64)
        ok = (store.chunk_step[src_b] >= 0).all(axis=1)
        wanted = np.ones(len(src_b), dtype=bool)
        if slots:  # block i holds slots [i*S, (i+1)*S) of the tokens: past them nothing is needed
            need = np.minimum(slots, tokens - np.arange(len(src_b)) * slots)
            wanted = need > 0
            ok &= store.fill[src_b] >= need
        if g.broken:
            ok &= np.array([not any((b, c) in g.broken for c in range(lay.chunks)) for b in blocks], dtype=bool)
        out.unrecoverable_blocks += src_b[wanted & ~ok].tolist()
        todo = [(b, db) for b, db, use in zip(blocks, dst_blocks, (wanted & ok).tolist(), strict=True) if use]
        fast = _fetch_tiles(g, rank, held, todo, Placement(dst.data, tmem, dict(todo)), out)
        for b, db in todo:
            if b in fast:
                out.fetched_bytes += lay.block_bytes * lay.num_layers
                continue
            src = held.get(rank)
            if src is not None and all(data.checksum(src, b, c) == store.crc[b, c, rank] for c in range(lay.chunks)):
                for c in range(lay.chunks):  # the kept bytes are good: copy them
                    data.copy(src, b, c, dst.data, tmem, db)
                out.fetched_bytes += lay.block_bytes * lay.num_layers
                continue
            others = {q: mem for q, mem in held.items() if q != rank}
            corrupt = [int(src is not None)]  # the kept copy failed its check
            segments = find_bad(g, others, [(b, 0, lay.chunks)], corrupt)
            out.corrupt_chunks += corrupt[0]
            done, lost = rebuild_verified(g, rank, None, others, {q for q in range(g.n) if q not in others},
                                          segments, Placement(dst.data, tmem, {b: db}))
            out.rebuilt = True
            if lost:
                out.unrecoverable_blocks.append(b)
            else:
                out.fetched_bytes += lay.block_bytes * lay.num_layers
    out.seconds = time.perf_counter() - started
    with g.lock:
        g.metrics.fetches.labels(g.name, "ok" if not out.unrecoverable_blocks else "partial").inc()
        g.metrics.fetch_seconds.labels(g.name).observe(out.seconds)
        g.metrics.fetched_bytes.labels(g.name).inc(out.fetched_bytes)
    return out


def _fetch_tiles(g: Group, rank: int, held: Mapping[int, RankMemory], todo: list[tuple[int, int]],
                 place: Placement, out: FetchResult) -> set[int]:
    """Fetch's fast path (the data path's fused tiles): whole blocks (every slot
    filled), copied from the rank's kept memory, else rebuilt from the others
    and parity, each tile checked before and after, tiles running on over
    blocks that lie back to back at both ends. Returns the blocks delivered;
    the caller takes the rest block by block (which finds bad chunks, repairs
    or reports them). Nothing here decides that a block is lost."""
    lay, store = g.layout, g.store
    if g.tile_bytes <= 0 or len({b for b, _ in todo}) != len(todo) or len({d for _, d in todo}) != len(todo):
        return set()
    full = [b for b, _ in todo if not lay.block_slots or store.fill[b] >= lay.block_slots]
    left = set(full)
    g.data.tile_bytes = g.tile_bytes
    if rank in held and left:
        _, failed = g.data.fetch_tiles(rank, {rank: held[rank]}, (), [(b, 0, lay.chunks) for b in sorted(left)],
                                       place)
        left = {b for b, _, _ in failed}
    others = {q: mem for q, mem in held.items() if q != rank}
    erased = tuple(q for q in range(g.n) if q not in others)
    if left and len(erased) <= g.m:
        _, failed = g.data.fetch_tiles(rank, others, erased, [(b, 0, lay.chunks) for b in sorted(left)], place)
        out.rebuilt = out.rebuilt or len(failed) < len(left)
        left = {b for b, _, _ in failed}
    return set(full) - left


# ---------------------------------------------------------------------- scrub


def scrub(g: Group) -> ScrubResult:
    """Compare every protected chunk's live bytes with its checksums and its
    stored parity with a fresh encode. Needs every rank alive, or, for an ended
    group, checks the kept (detached) ranks' bytes only."""
    with g.lock:
        alive = all(g.ranks.get(q) is not None and g.ranks[q].state == RankState.ALIVE for q in range(g.n))
        if not alive and not g.ended():
            raise WrongState(g.name, None, "scrub needs every rank alive (or none: an ended group)")
        mems = {q: r.memory for q, r in g.ranks.items() if r.memory is not None}
    lay, store, data = g.layout, g.store, g.data
    out = ScrubResult(parity_checked=alive)
    bad_blocks: set[int] = set()
    bad_ranks: set[int] = set()
    with g.io_lock:
        for block in range(lay.num_blocks):
            for c in np.flatnonzero(store.chunk_step[block] >= 0):
                out.chunks_checked += 1
                bad = [q for q in mems if data.checksum(mems[q], block, c) != store.crc[block, c, q]]
                if bad:
                    out.checksum_mismatches += 1
                    bad_blocks.add(block)
                    bad_ranks.update(bad)
                if alive and data.parity_mismatch(mems, block, int(c)):
                    out.parity_mismatches += 1
                    bad_blocks.add(block)
    out.bad_blocks, out.bad_ranks = sorted(bad_blocks), sorted(bad_ranks)
    if out.checksum_mismatches:
        g.metrics.corruption.labels(g.name).inc(out.checksum_mismatches)
    return out


__all__ = ["FetchResult", "Placement", "RestoreResult", "ScrubResult", "Segment", "compatible", "fetch",
           "find_bad", "rebuild_verified", "restore", "scrub"]
