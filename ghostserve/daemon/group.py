"""One tensor-parallel group: its ranks and what ties the group's parts together.

A stripe is the same (layer, block) on all N ranks. The parts:

* ranks and their states (:mod:`ghostserve.daemon.ranks`): registration,
  streams, loss, goodbye, the end of the engine; here;
* the step encoder (:mod:`ghostserve.daemon.encoder`): pending commits, one
  thread encoding each step once every rank committed it, publishing after its
  completion;
* the request index (:mod:`ghostserve.daemon.index`): watermarks and Lookup
  records, in shared memory;
* recovery (:mod:`ghostserve.daemon.recovery`): restore, fetch and scrub;
* the data path (:mod:`ghostserve.daemon.datapath`): the memory and the native
  work (``host``: shared memory and ISA-L).

Threads and locks:

* ``lock`` (with ``cond``) guards rank state, pending commits and the index's
  in-memory copy. gRPC handler threads take it briefly; it is never held while
  bytes are encoded.
* ``io_lock`` serialises everything that reads or writes KV and parity bytes
  (encoding a step, restore, fetch, scrub, release), so a restore never sees half
  a step.
* The encoder thread is the only writer of the parity store's step records.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ghostserve.config import Config
from ghostserve.daemon import datapath, recovery
from ghostserve.daemon.commits import CommitRecord, validate
from ghostserve.daemon.datapath import RegionSpec
from ghostserve.daemon.encoder import StepEncoder
from ghostserve.daemon.index import StepNews
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.messages import SUPERSEDED, Ack, Event, EventKind, OutboxItem
from ghostserve.daemon.ranks import Rank, RankState, Role
from ghostserve.daemon.store import ParityStore
from ghostserve.errors import (
    BlockOutOfRange,
    DuplicateRank,
    InvalidRequest,
    UnknownRank,
    WrongState,
)
from ghostserve.metrics import Metrics

log = logging.getLogger("ghostserve.group")

ALIVE, LOST, DETACHED, REPLACING, LEFT = (RankState.ALIVE, RankState.LOST, RankState.DETACHED,
                                          RankState.REPLACING, RankState.LEFT)


class EndReason:
    """Why a group has no engine any more (persisted in its manifest)."""

    CLEAN = "clean"      # every rank said goodbye, none was lost: dropped at once
    FAILURE = "failure"  # ranks were lost: kept for a resume until --ended-ttl


class Group:
    """One TP group; see the module doc for its parts, threads and locks."""

    def __init__(self, name: str, store: ParityStore, metrics: Metrics, pool: ThreadPoolExecutor,
                 config: Config, kind: str = "host", cuda_runtime: Any = None):
        self.name, self.store, self.metrics = name, store, metrics
        self.layout: Layout = store.layout
        self.n, self.m = store.k, store.m
        self.slotted = self.layout.block_slots > 0
        self.tile_bytes = config.restore_tile_bytes  # restore's fused tiles (0: chunk by chunk)
        self.kind = kind
        extra = {"runtime": cuda_runtime} if kind == "cuda" else {}
        self.data = datapath.load(kind)(store, pool, config.threads, self.tile_bytes, **extra)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.io_lock = threading.Lock()
        self.ranks: dict[int, Rank] = {}
        self.encoder = StepEncoder(self)
        # watermarks, the Lookup index (Commit.records), releases: in shared memory
        self.index = store.index
        self.keep_survivors = bool(store.manifest.get("keep_survivors"))
        self.namespace = str(store.manifest.get("namespace", ""))
        # keep_survivors groups: set once no rank is alive (persisted: a restarted
        # daemon must not mistake an ended engine for one whose workers will rejoin)
        self._ended = bool(store.manifest.get("ended"))
        self.ended_at: float | None = store.manifest.get("ended_at")  # unix time
        self.end_reason: str | None = store.manifest.get("end_reason")
        self.last_restore: dict[str, Any] | None = None
        # (block, chunk) found unrecoverable by a restore; guarded by io_lock
        self.broken: set[tuple[int, int]] = set()
        self.rejoin_wait = config.rejoin_wait_seconds  # a restore waits this long for survivors to rejoin
        # (step, monotonic time it was first committed) of committed steps not yet known
        # protected, oldest first: how long protection has kept a step waiting
        self._waiting: collections.deque[tuple[int, float]] = collections.deque()
        self.closed = False  # dropped: the pid watcher may still hold it for one pass
        # called (under ``lock``, must not block) when a rank registers or the engine ends:
        # the daemon's pid watcher sleeps until then
        self.on_change: Callable[[], None] = lambda: None
        lay = self.layout
        self.metrics.kv_bytes.labels(name).set(lay.kv_bytes() * self.n)
        self.metrics.parity_arena_bytes.labels(name).set(lay.kv_bytes() * self.m)
        self.metrics.lag_seconds.labels(name).set_function(self.lag_seconds)
        self.update_gauges()

    def start(self) -> None:
        self.encoder.start()

    def stop(self) -> None:
        self.encoder.stop()

    def close(self) -> None:
        """Stop and forget every mapping (Drop)."""
        self.stop()
        with self.lock:
            self.closed = True
            for r in self.ranks.values():
                if r.outbox is not None:
                    r.outbox.put(SUPERSEDED)
                r.unmap()
        self.data.close()

    # ------------------------------------------------------------------ ranks

    @property
    def protected_step(self) -> int:
        return self.store.protected_step

    @property
    def watermarks(self) -> dict[str, int]:
        """Protected tokens per request (the index's; read under ``lock``)."""
        return self.index.watermarks

    def manifest_ranks(self) -> None:
        """Persist rank regions and pids (a restarted daemon re-attaches from them)."""
        manifest = dict(self.store.manifest)
        manifest["ended"] = self._ended
        manifest["ended_at"], manifest["end_reason"] = self.ended_at, self.end_reason
        manifest["ranks"] = {str(r.rank): {"regions": [s.to_dict() for s in r.specs], "pid": r.pid,
                                           "pid_start": r.pid_start, "state": str(r.state),
                                           "idents": [list(i) for i in r.idents],
                                           "release_region": r.release_region,
                                           "process_ended": r.process_ended}
                             for r in self.ranks.values()}
        self.store.write_manifest(manifest)

    def _check_ended(self) -> None:
        """A keep_survivors group's engine has ended once a rank failed and none can
        come back: each is lost, left, or detached with its process ended. Caller
        holds ``lock``."""
        if not self.keep_survivors or self._ended:
            return
        states = [x.state for x in self.ranks.values()]
        self._ended = (bool(states) and not all(st == LEFT for st in states)
                       and all(x.state in (LOST, LEFT) or (x.state == DETACHED and x.process_ended)
                               for x in self.ranks.values()))

    def _note_end(self) -> None:
        """Record when and why the engine ended, once no rank is alive. Caller holds ``lock``."""
        if self.ended_at is not None or not self.ranks:
            return
        states = [r.state for r in self.ranks.values()]
        if any(s in (ALIVE, REPLACING) for s in states):
            return
        if all(s == LEFT for s in states):
            self.end_reason = EndReason.CLEAN
        elif self.keep_survivors and self._ended or all(s in (LOST, LEFT) for s in states):
            self.end_reason = EndReason.FAILURE
        else:
            return  # detached ranks of a daemon restart: their workers may still rejoin
        self.ended_at = time.time()
        log.info("group %s: engine ended (%s)", self.name, self.end_reason)
        self.on_change()

    def region_sizes(self, specs: tuple[RegionSpec, ...]) -> list[RegionSpec]:
        """Each of a rank's regions, sized to the bytes the layout uses there."""
        return [s.sized(self.layout.region_bytes(i)) for i, s in enumerate(specs)]

    def register(self, rank: int, pid: int, regions: tuple[RegionSpec, ...], last_step: int | None = None,
                 pid_start: float = 0.0) -> tuple[Role, str]:
        """Add or re-admit ``rank``; returns (role, session). Caller validated layout/code.
        ``last_step``: the newest step the worker committed (its resent commits up to
        it follow on its stream); ``pid_start``: its process's start time."""
        if not 0 <= rank < self.n:
            raise UnknownRank(self.name, rank, f"is outside 0..{self.n - 1}")
        with self.lock:
            if self._ended:
                raise WrongState(self.name, rank, "the group's engine ended after a failure; a new "
                                 "engine needs a new group (drop this one once resumed)")
            self.ended_at = self.end_reason = None  # every rank was lost: a replacement revives it
            old = self.ranks.get(rank)
            if old is None:
                role = Role.NEW
            elif old.state in (ALIVE, DETACHED, LEFT) and old.specs == regions:
                if old.state == ALIVE and old.pid != pid:
                    raise DuplicateRank(self.name, rank)
                role = Role.REJOINED
            elif old.state in (ALIVE, DETACHED, LEFT):
                raise DuplicateRank(self.name, rank)
            else:  # LOST or REPLACING: fresh memory for a lost rank
                role = Role.REPLACEMENT
            new = Rank(rank, ALIVE if role != Role.REPLACEMENT else REPLACING, pid, regions, pid_start=pid_start)
            try:
                new.memory = self.data.attach(self.region_sizes(regions))
                new.idents = tuple(new.memory.idents)
            except FileNotFoundError as exc:
                raise InvalidRequest(f"region {exc.filename or regions[0].name!r} does not exist") from None
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if old is not None:
                if role == Role.REJOINED:
                    new.committed = old.committed if old.state == ALIVE else self.protected_step
                if old.outbox is not None:
                    old.outbox.put(SUPERSEDED)
                old.unmap()
            else:
                new.committed = self.protected_step
            if role == Role.REPLACEMENT:
                new.committed = self.protected_step
            elif last_step is not None:
                new.resend_through = last_step
            new.session = uuid.uuid4().hex
            self.ranks[rank] = new
            self.manifest_ranks()
            self.update_gauges()
            self.cond.notify_all()
            self.on_change()
            return role, new.session

    def attach_detached(self, manifest_ranks: dict[str, Any]) -> None:
        """After a daemon restart: map every known rank's region again, detached
        until its worker reconnects; a rank whose region is gone is lost. Whether
        each detached rank's process still runs is the caller's to check
        (:meth:`forget_dead`): one that ended while no daemon watched it must
        count as ended."""
        with self.lock:
            for key, info in manifest_ranks.items():
                r = Rank(int(key), DETACHED, int(info["pid"]), tuple(RegionSpec.from_dict(s) for s in info["regions"]),
                         committed=self.protected_step, release_region=bool(info.get("release_region")),
                         process_ended=bool(info.get("process_ended")), pid_start=float(info.get("pid_start", 0.0)))
                r.idents = tuple(tuple(x) for x in info.get("idents", ()))
                if info.get("state") in (LOST, REPLACING):
                    r.state = LOST
                elif info.get("state") == LEFT:
                    r.state = LEFT
                if r.state != LOST:
                    try:
                        r.memory = self.data.attach(self.region_sizes(r.specs))
                        r.idents = tuple(r.memory.idents)
                    except (FileNotFoundError, ValueError):
                        r.state = LOST
                self.ranks[r.rank] = r
            self.update_gauges()

    def forget_dead(self, alive: Callable[[int, float], bool], ranks: list[int] | None = None) -> None:
        """Ranks whose worker may still run (alive, or detached and not ended) but
        whose process ``alive(pid, start)`` says is gone are handled as a death now
        (:meth:`mark_lost`), not when the pid watcher gets to them: after a daemon
        restart (a worker that ended while no daemon watched), and before a rank's
        replacement registers."""
        with self.lock:
            suspects = [(r.rank, r.pid, r.pid_start) for r in self.ranks.values()
                        if (ranks is None or r.rank in ranks) and r.pid > 0 and not r.process_ended
                        and (r.state in (ALIVE, REPLACING) or r.may_return)]
        for rank, pid, start in suspects:
            if not alive(pid, start):
                self.mark_lost(rank, "pid_gone")

    def check_session(self, rank: int, session: str) -> Rank:
        r = self.ranks.get(rank)
        if r is None:
            raise UnknownRank(self.name, rank)
        if r.session != session:
            raise WrongState(self.name, rank, "stale session: register again")
        return r

    def open_stream(self, rank: int, session: str) -> queue.Queue:
        with self.lock:
            r = self.check_session(rank, session)
            if r.state == DETACHED and r.mapped:
                r.state = ALIVE  # its last stream was refused; this one carries on
                self.update_gauges()
            if r.outbox is not None:
                r.outbox.put(SUPERSEDED)  # ends an older stream of this rank
            r.outbox = queue.Queue()
            r.outbox.put(Ack(self.protected_step, dict(self.watermarks)))
            self.cond.notify_all()  # a rank alive again may make a step ready
            return r.outbox

    def stream_closed(self, rank: int, session: str, by_client: bool) -> None:
        """The rank's stream ended. A client-side end without a goodbye means the
        worker is gone; a daemon-side end (drain, a daemon bug) leaves it detached."""
        with self.lock:
            r = self.ranks.get(rank)
            if r is None or r.session != session or r.state not in (ALIVE, REPLACING):
                return
            if by_client:
                self.mark_lost(rank, "stream_closed")
            else:
                r.state = DETACHED
                self.update_gauges()

    def goodbye(self, rank: int, session: str, release_region: bool) -> bool:
        """The rank ends cleanly (its engine shuts down): not a failure. Its memory
        stays mapped until the group's fate is known: if another rank is lost
        meanwhile, it is a recovery source like any survivor. Returns True when
        every rank has now left and none was lost: the caller drops the group."""
        with self.lock:
            r = self.check_session(rank, session)
            if r.state not in (ALIVE, REPLACING):
                raise WrongState(self.name, rank, f"rank is {r.state}: cannot say goodbye")
            r.release_region = release_region
            r.process_ended = True
            self.encoder.drop_rank(rank)
            if any(x.state == LOST for x in self.ranks.values()):
                r.state = DETACHED  # the engine is going down after a failure: keep it
                self._check_ended()
            else:
                r.state = LEFT
            log.info("group %s: rank %d said goodbye", self.name, rank)
            self._note_end()
            self.manifest_ranks()
            self.update_gauges()
            self.cond.notify_all()
            return self.end_reason == EndReason.CLEAN

    def mark_lost(self, rank: int, kind: str) -> bool:
        """Rank ``rank``'s worker failed (its stream broke, its pid is gone): unmap
        its memory, drop its unencoded commits. In a keep_survivors group, a rank
        that ends after another was lost is kept instead (detached, its process
        ended). Idempotent."""
        with self.lock:
            r = self.ranks.get(rank)
            if r is None or r.state in (LOST, LEFT) or self.closed:
                return False  # a rank that said goodbye may end its process; a dropped group is gone
            if r.state == DETACHED and r.process_ended:
                return False  # kept already
            if self.keep_survivors and r.mapped and any(x.state == LOST for x in self.ranks.values()):
                # the engine tears down every rank after one fails; this one's
                # memory outlives it (shared memory) and stays a recovery source
                log.warning("group %s: rank %d ended after a failure (%s); its memory is kept",
                            self.name, rank, kind)
                r.state = DETACHED
                r.process_ended = True
                self.encoder.drop_rank(rank)
                self._check_ended()
                self._note_end()
                self.manifest_ranks()
                self.update_gauges()
                self.cond.notify_all()
                return False
            log.warning("group %s: rank %d lost (%s)", self.name, rank, kind)
            r.state = LOST
            r.unmap()
            r.committed = self.protected_step
            if self.keep_survivors:
                for x in self.ranks.values():
                    if x.state == LEFT:  # left before the failure was known: now a recovery source
                        x.state = DETACHED
                self._check_ended()
            self.encoder.drop_rank(rank)
            self.metrics.failures.labels(self.name, kind).inc()
            self._note_end()
            self.manifest_ranks()
            self.update_gauges()
            self.broadcast(Event(EventKind.RANK_LOST, rank, kind))
            self.cond.notify_all()
            return True

    def end_streams(self) -> None:
        """End every worker stream (daemon shutdown); workers rejoin a new daemon."""
        with self.lock:
            for r in self.ranks.values():
                if r.outbox is not None:
                    r.outbox.put(SUPERSEDED)
                    r.outbox = None

    def watched_pids(self) -> list[tuple[int, int]]:
        with self.lock:
            if self.closed:
                return []
            return [(r.rank, r.pid) for r in self.ranks.values()
                    if r.state not in (LOST, LEFT) and not r.process_ended and r.pid > 0]

    # ------------------------------------------------------------------ commits

    def commit(self, rank: int, session: str, rec: CommitRecord) -> None:
        """Queue a step commit; returns at once (encoding is async). Raises
        :class:`BlockOutOfRange`, :class:`InvalidRequest` or :class:`WrongState`
        and changes nothing when the commit is bad."""
        validate(rec, self.layout, self.name, rank)
        with self.lock:
            r = self.check_session(rank, session)
            if r.state != ALIVE:
                raise WrongState(self.name, rank, f"rank is {r.state}: cannot commit")
            if rec.step <= r.committed:
                return  # a resend after reconnecting: already have it
            if rec.step != r.committed + 1:
                raise WrongState(self.name, rank,
                                 f"step {rec.step} after {r.committed}: steps must be consecutive")
            r.committed = rec.step
            if not self._waiting or rec.step > self._waiting[-1][0]:
                self._waiting.append((rec.step, time.monotonic()))
                while self._waiting[0][0] <= self.protected_step:
                    self._waiting.popleft()
            self.encoder.queue(rank, rec)
            self.metrics.commits.labels(self.name).inc()
            self._update_lag()

    def match(self, tokens: np.ndarray) -> tuple[str, int, list[int]] | None:
        """The request whose protected KV covers the longest prefix of ``tokens``:
        (request id, tokens covered, its blocks for them), or None."""
        with self.lock:
            return self.index.match(tokens, self.layout.block_slots)

    def ended(self) -> bool:
        """The engine is gone (what Lookup, Fetch and Drop need): a keep_survivors
        group whose last rank ended, a group whose ranks all said goodbye, or
        any group whose ranks are all lost."""
        with self.lock:
            return self._ended or self.ended_at is not None or (
                bool(self.ranks) and all(r.state == LOST for r in self.ranks.values()))

    def release(self, rank: int, session: str, step: int, requests: list[str], blocks: list[int]) -> None:
        """Forget ``requests`` and void ``blocks`` now (ReleaseRequest): the engine is
        about to run ``step``, which may write those blocks for other requests."""
        for b in blocks:
            if b >= self.layout.num_blocks:
                raise BlockOutOfRange(self.name, rank, b, "released block outside the layout")
        with self.lock:
            self.check_session(rank, session)
        with self.io_lock:  # after an encode in progress, before the next
            for b in blocks:
                self.store.chunk_step[b, :] = -1
                self.broken.difference_update((b, c) for c in range(self.layout.chunks))
            with self.lock:
                if requests:
                    self.index.apply(StepNews(step=None, forget=dict.fromkeys(requests, step)))
                self.update_gauges()

    # ------------------------------------------------------------------ recovery

    def restore(self, rank: int, session: str | None) -> recovery.RestoreResult:
        """Rebuild ``rank``'s protected KV into its memory (:func:`recovery.restore`)."""
        return recovery.restore(self, rank, session)

    def fetch(self, rank: int, blocks: list[int], tokens: int, dst: Group, dst_rank: int,
              dst_session: str, dst_blocks: list[int]) -> recovery.FetchResult:
        """Deliver this ended group's blocks into ``dst`` (:func:`recovery.fetch`)."""
        return recovery.fetch(self, rank, blocks, tokens, dst, dst_rank, dst_session, dst_blocks)

    def compatible(self, other: Group) -> list[str]:
        """Why ``other``'s blocks cannot receive this group's (empty: they can)."""
        return recovery.compatible(self, other)

    def scrub(self) -> recovery.ScrubResult:
        """Check every protected chunk (:func:`recovery.scrub`)."""
        return recovery.scrub(self)

    # ------------------------------------------------------------------ status

    def newest_step(self) -> int:
        return max([r.committed for r in self.ranks.values()] + [self.protected_step])

    def lag_seconds(self) -> float:
        """How long the oldest committed, unprotected step has waited (0: none waits)."""
        with self.lock:
            protected = self.protected_step
            while self._waiting and self._waiting[0][0] <= protected:
                self._waiting.popleft()
            return time.monotonic() - self._waiting[0][1] if self._waiting else 0.0

    def catching_up(self, but: int | None = None) -> list[int]:
        """Ranks (other than ``but``) whose worker may still bring commits the
        daemon has not seen: detached ones that may rejoin, and rejoined ones whose
        resent commits are still arriving. Caller holds ``lock``."""
        return [q for q, x in self.ranks.items() if q != but and (x.may_return or x.catching_up)]

    def _update_lag(self) -> None:
        self.metrics.lag_steps.labels(self.name).set(self.newest_step() - self.protected_step)

    def update_gauges(self) -> None:
        """Refresh the group's gauges. Caller holds ``lock``."""
        lay = self.layout
        chunks = self.store.protected_chunks()
        per_chunk = lay.chunk_bytes * lay.num_layers
        self.metrics.protected_bytes.labels(self.name).set(chunks * per_chunk * self.n)
        self.metrics.parity_bytes.labels(self.name).set(chunks * per_chunk * self.m)
        states = [r.state for r in self.ranks.values()]
        for state in RankState:
            self.metrics.ranks.labels(self.name, state).set(states.count(state))
        ended = self._ended or self.ended_at is not None
        # an ended engine gets no replacement: it is kept for a resume, not degraded
        self.metrics.degraded.labels(self.name).set(
            1 if not ended and any(s in (LOST, REPLACING) for s in states) else 0)
        self.metrics.ended.labels(self.name).set(1 if ended else 0)
        self._update_lag()

    def degraded(self) -> bool:
        return any(r.state in (LOST, REPLACING) for r in self.ranks.values())

    def broadcast(self, item: OutboxItem) -> None:
        """Put ``item`` on every live rank's outbox. Caller holds ``lock``."""
        for r in self.ranks.values():
            if r.outbox is not None and r.state != LOST:
                r.outbox.put(item)


__all__ = ["EndReason", "Group"]
