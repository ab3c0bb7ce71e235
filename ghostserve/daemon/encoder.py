"""The stripe scheduler and encoder of one group.

Ranks commit steps in order; step t is encoded when every rank has committed it
and all are alive. Encoding a step: void the blocks it released, mark the
chunks it touched unprotected, have the data path encode its byte ranges
(parity and checksums), and only once that completion has finished, publish:
the chunks protected at t, freed blocks voided, the step's index news
(watermarks, Lookup records) committed, then the protected step, then an
:class:`~ghostserve.daemon.messages.Ack` to every rank.

Threads: one encoder thread per group (``gs-encode-<group>``), woken by the
group's ``cond`` whenever a commit, a registration or a state change may have
made a step ready. It is the only writer of step records; it takes the group's
``io_lock`` while bytes are encoded and ``lock`` (never while encoding) to
publish.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ghostserve.daemon.commits import CommitRecord, merge
from ghostserve.daemon.index import StepNews
from ghostserve.daemon.messages import Ack, Event, EventKind
from ghostserve.daemon.ranks import RankState

if TYPE_CHECKING:
    from ghostserve.daemon.group import Group

log = logging.getLogger("ghostserve.group")


class StepEncoder:
    """Pending commits of a group and the thread that encodes them. Its state is
    guarded by the group's ``lock``."""

    def __init__(self, group: Group):
        self.g = group
        self.pending: dict[int, dict[int, CommitRecord]] = {}  # step -> rank -> commit
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"gs-encode-{group.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.g.cond:
            self._stopped = True
            self.g.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ commits (caller holds lock)

    def queue(self, rank: int, rec: CommitRecord) -> None:
        self.pending.setdefault(rec.step, {})[rank] = rec
        self.g.cond.notify_all()

    def drop_rank(self, rank: int) -> None:
        """Forget the unencoded commits of a rank that is gone (lost, left, detached)."""
        for commits in self.pending.values():
            commits.pop(rank, None)

    def in_flux(self) -> tuple[set[tuple[int, int]], set[int]]:
        """Chunks written, and blocks freed, by steps not yet encoded: a restore
        neither restores them nor calls them corrupt (the engine recomputes them)."""
        cb = self.g.layout.chunk_bytes
        flux: set[tuple[int, int]] = set()
        freed: set[int] = set()
        for commits in self.pending.values():
            for c in commits.values():
                for b, s, e in c.ranges:
                    flux.update((b, ch) for ch in range(s // cb, e // cb))
                freed.update(c.freed)
        return flux, freed

    def _ready(self) -> int | None:
        g = self.g
        t = g.protected_step + 1
        commits = self.pending.get(t)
        if commits is None or len(commits) < g.n:
            return None
        if any(g.ranks.get(q) is None or g.ranks[q].state != RankState.ALIVE for q in range(g.n)):
            return None
        return t

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        g = self.g
        while True:
            with g.cond:
                while not self._stopped and self._ready() is None:
                    g.cond.wait()
                if self._stopped:
                    return
                t = self._ready()
                commits = self.pending.pop(t)
                mems = {q: g.ranks[q].memory for q in range(g.n)}
            try:
                self._encode(t, commits, mems)
            except Exception:  # a daemon bug: fail this step visibly, keep serving
                log.exception("group %s: encoding step %d failed; its writes are unprotected", g.name, t)
                self._fail(t, commits)

    def _encode(self, t: int, commits: dict[int, CommitRecord], mems: dict) -> None:
        g, store, lay = self.g, self.g.store, self.g.layout
        started = time.perf_counter()
        ranges = merge(rg for c in commits.values() for rg in c.ranges)
        fills: dict[int, int] = {}
        for c in commits.values():
            for b, f in c.fills.items():
                fills[b] = max(f, fills.get(b, 0))
        cb = lay.chunk_bytes
        with g.io_lock:
            for block in {b for c in commits.values() for b in c.released}:
                store.chunk_step[block, :] = -1  # reused by this step: old parity is void
                g.broken.difference_update((block, c) for c in range(lay.chunks))
            if g.slotted:
                for b, _, _ in ranges:
                    store.chunk_step[b, :] = -1  # before its fill changes
                    store.fill[b] = fills.get(b, lay.block_slots)
            for b, s, e in ranges:
                store.chunk_step[b, s // cb : e // cb] = -1  # unprotected while their parity changes
            ready = {q: c.event for q, c in commits.items() if c.event}
            nbytes = g.data.encode(ranges, mems, ready).result()
            with g.lock:
                if any(g.ranks[q].memory is not mems[q] for q in range(g.n)):
                    # a rank was lost while we read it: this parity may cover bytes
                    # of a dead rank's destroyed memory. Drop it; the replacement
                    # recommits step t and it is encoded again.
                    alive = {q: c for q, c in commits.items() if g.ranks[q].state == RankState.ALIVE}
                    self.pending.setdefault(t, {}).update(alive)
                    g.update_gauges()
                    return
            for b, s, e in ranges:  # the completion is done: these chunks are protected at t
                store.chunk_step[b, s // cb : e // cb] = t
                g.broken.difference_update((b, c) for c in range(s // cb, e // cb))
            for block in {b for c in commits.values() for b in c.freed}:
                store.chunk_step[block, :] = -1
                g.broken.difference_update((block, c) for c in range(lay.chunks))
            with g.lock:
                # the index first: after a crash in between, the workers resend step t
                # and the index, which already has it, ignores the resend
                changed = g.index.apply(self._news(t, commits))
                store.protected_step = t
                g.metrics.encoded_bytes.labels(g.name).inc(nbytes)
                g.metrics.encode_seconds.labels(g.name).inc(time.perf_counter() - started)
                g.metrics.steps_encoded.labels(g.name).inc()
                g.update_gauges()
                g.broadcast(Ack(t, changed))

    def _news(self, t: int, commits: dict[int, CommitRecord]) -> StepNews:
        """What step ``t`` tells the index: tokens written on every rank (the
        minimum across ranks) become protected; records of requests not released
        since; finished requests are dropped."""
        index = self.g.index
        marks: dict[str, int] = {}
        for c in commits.values():
            for req, tokens in c.requests:
                if not index.void(req, c.step):
                    marks[req] = min(tokens, marks.get(req, tokens))
        records = [rec for c in commits.values() for rec in c.records if not index.void(rec.request, c.step)]
        finished = {req for c in commits.values() for req in c.finished}
        # a release at step s voids news of steps < s; once t is encoded no such news can come
        return StepNews(step=t, watermarks=marks, records=records, finished=finished, prune_before=t + 2)

    def _fail(self, t: int, commits: dict[int, CommitRecord]) -> None:
        """Step ``t`` could not be encoded: void every chunk it touched and stop
        claiming the requests it wrote (they get no watermark until they finish
        or are released: their voided chunks are never re-encoded), then move on
        to step t + 1 so the group keeps protecting everything else."""
        g, store, cb = self.g, self.g.store, self.g.layout.chunk_bytes
        victims = {req for c in commits.values() for req, _ in c.requests}
        victims |= {rec.request for c in commits.values() for rec in c.records}
        with g.io_lock:
            for b, s, e in merge(rg for c in commits.values() for rg in c.ranges):
                if g.slotted:
                    store.chunk_step[b, :] = -1
                else:
                    store.chunk_step[b, s // cb : e // cb] = -1
            for b in {b for c in commits.values() for b in (*c.released, *c.freed)}:
                store.chunk_step[b, :] = -1
            with g.lock:
                finished = {req for c in commits.values() for req in c.finished}
                try:
                    changed = g.index.apply(StepNews(step=t, unprotect=victims - finished, finished=finished))
                except Exception:
                    log.exception("group %s: recording step %d's failure failed", g.name, t)
                    changed = g.index.unprotect_in_memory(victims)
                store.protected_step = t
                g.metrics.encode_failures.labels(g.name).inc()
                g.update_gauges()
                g.broadcast(Ack(t, changed))
                g.broadcast(Event(EventKind.STEP_FAILED, 0, f"step {t}: {len(victims)} requests unprotected"))


__all__ = ["StepEncoder"]
