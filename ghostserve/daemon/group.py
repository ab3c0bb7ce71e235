"""One tensor-parallel group: its ranks, and what applies the work of its parts.

A stripe is the same (layer, block) on all N ranks. A group owns its ranks and
their states (:mod:`ghostserve.daemon.ranks`: registration, streams, loss,
goodbye, the end of the engine), the commits not yet encoded
(:class:`~ghostserve.daemon.encoder.Pending`), the request index
(:mod:`ghostserve.daemon.index`: watermarks and Lookup records, in shared
memory) and the engine's end. Its parts, which never see the group:

* :class:`~ghostserve.daemon.stripes.Stripes`: the protection state (parity
  store records, broken chunks, the I/O lock, the data path); the only code that
  changes it;
* :class:`~ghostserve.daemon.encoder.StepEncoder`: encodes a step into the
  stripes, on the group's encoder thread;
* :mod:`ghostserve.daemon.recovery`: restore, fetch and scrub over the stripes.

The group hands them snapshots (the step's commits and the ranks' memories;
the survivors and what is in flux) and applies their results: the index news,
the protected step, metrics, acknowledgements and events to the ranks.

Threads and locks:

* ``lock`` (with ``cond``) guards rank state, pending commits and the index's
  in-memory copy. gRPC handler threads take it briefly; it is never held while
  bytes are encoded or rebuilt.
* the stripes' ``io`` serialises everything that reads or writes KV and parity
  bytes; it is taken before ``lock``, never inside it.
* ``gs-encode-<group>`` encodes each step once every rank committed it.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

import numpy as np

from ghostserve.config import Config
from ghostserve.daemon import datapath, recovery
from ghostserve.daemon.calls import GroupView, MirrorView, Notice, NoticeKind, RankView
from ghostserve.daemon.commits import CommitRecord, validate
from ghostserve.daemon.datapath import DataPath, RankMemory, RegionSpec
from ghostserve.daemon.encoder import Pending, StepEncoder, coalesce, failed_news, news
from ghostserve.daemon.index import RequestIndex, StepNews
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.messages import SUPERSEDED, Ack, Event, EventKind, OutboxItem
from ghostserve.daemon.ranks import Rank, RankState, Role
from ghostserve.daemon.store import ParityStore
from ghostserve.daemon.stripes import Stripes
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


class EndReason(StrEnum):
    """Why a group has no engine any more (persisted in its manifest)."""

    CLEAN = "clean"      # every rank said goodbye, none was lost: dropped at once
    FAILURE = "failure"  # ranks were lost: kept for a resume until --ended-ttl


class Group:
    """One TP group; see the module doc for its parts, threads and locks.
    ``data`` is the data path the daemon opened for the group's store."""

    def __init__(self, name: str, store: ParityStore, data: DataPath, metrics: Metrics, config: Config):
        self.name, self.metrics = name, metrics
        self._store = store  # the manifest (membership) and the index; protection is the stripes'
        self.stripes = Stripes(name, store, data)
        self.layout: Layout = store.layout
        self.n, self.m = store.k, store.m
        self.slotted = self.layout.block_slots > 0
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.ranks: dict[int, Rank] = {}
        self.pending = Pending()
        self.encoder = StepEncoder(self.stripes)
        # watermarks, the Lookup index (Commit.records), releases: in shared memory
        if store.index is None:
            raise ValueError(f"group {name}: its store has no request index")
        self.index: RequestIndex = store.index
        self.keep_survivors = bool(store.manifest.get("keep_survivors"))
        self.namespace = str(store.manifest.get("namespace", ""))
        # keep_survivors groups: set once no rank is alive (persisted: a restarted
        # daemon must not mistake an ended engine for one whose workers will rejoin)
        self._ended = bool(store.manifest.get("ended"))
        self.ended_at: float | None = store.manifest.get("ended_at")  # unix time
        reason = store.manifest.get("end_reason")
        self.end_reason: EndReason | None = EndReason(reason) if reason else None
        self.last_restore: dict[str, Any] | None = None
        self.rejoin_wait = config.rejoin_wait_seconds  # a restore waits this long for survivors to rejoin
        self.coalesce_steps, self.coalesce_wait = config.coalesce_steps, config.coalesce_wait_seconds
        self.stall_seconds = config.stall_seconds
        self.closed = False  # dropped: the pid watcher may still hold it for one pass
        # called (under ``lock``, must not block) when a rank registers or the engine ends:
        # the daemon's pid watcher sleeps until then
        self.on_change: Callable[[], None] = lambda: None
        # called (under ``lock``, must not block) with what watchers hear (Operator.Watch)
        self.on_notice: Callable[[Notice], None] = lambda notice: None
        # called (under ``lock``, must not block) with the watermarks a protected step or
        # a release changed (0: the request is gone): the mirror looks again
        self.on_watermarks: Callable[[Group, dict[str, int]], None] = lambda group, changed: None
        # (step, monotonic time it was first committed) of committed steps not yet known
        # protected, oldest first: how long protection has kept a step waiting
        self._waiting: collections.deque[tuple[int, float]] = collections.deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._encode_loop, name=f"gs-encode-{name}", daemon=True)
        lay = self.layout
        self.metrics.kv_bytes.labels(name).set(lay.kv_bytes() * self.n)
        self.metrics.parity_arena_bytes.labels(name).set(lay.kv_bytes() * self.m)
        self.metrics.lag_seconds.labels(name).set_function(self.lag_seconds)
        self.update_gauges()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Stop and forget every mapping and the store (Drop). The caller unlinks
        the store's segments afterwards."""
        self.stop()
        with self.lock:
            self.closed = True
            for r in self.ranks.values():
                if r.outbox is not None:
                    r.outbox.put(SUPERSEDED)
                r.unmap()
        self.stripes.data.close()
        with self.stripes.io:  # after a restore, fetch or scrub in flight
            self._store.close()

    # ------------------------------------------------------------------ ranks

    @property
    def protected_step(self) -> int:
        return self.stripes.protected_step

    @property
    def watermarks(self) -> dict[str, int]:
        """Protected tokens per request (the index's; read under ``lock``)."""
        return self.index.watermarks

    def manifest_ranks(self) -> None:
        """Persist rank regions and pids (a restarted daemon re-attaches from them)."""
        manifest = dict(self._store.manifest)
        manifest["ended"] = self._ended
        manifest["ended_at"] = self.ended_at
        manifest["end_reason"] = str(self.end_reason) if self.end_reason else None
        manifest["ranks"] = {str(r.rank): {"regions": [s.to_dict() for s in r.specs], "pid": r.pid,
                                           "pid_start": r.pid_start, "state": str(r.state),
                                           "idents": [list(i) for i in r.idents],
                                           "release_region": r.release_region,
                                           "process_ended": r.process_ended}
                             for r in self.ranks.values()}
        self._store.write_manifest(manifest)

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
        self._notify(NoticeKind.GROUP_ENDED, detail=str(self.end_reason))
        self.on_change()

    def conflict(self, manifest: Mapping[str, Any], slot_map: bytes) -> str | None:
        """Why a rank registering with ``manifest`` (code, layout, namespace, ...)
        and ``slot_map`` does not belong to this group (None: it does)."""
        defaults = {"namespace": "", "kind": "host", "shm_prefix": manifest.get("shm_prefix"),
                    "checksum_width": manifest.get("checksum_width")}
        have = {k: self._store.manifest.get(k, defaults.get(k, False)) for k in manifest}
        if have != dict(manifest):
            return f"group {self.name!r} is registered with {have}, not {dict(manifest)}"
        if self.slotted and bytes(self.stripes.store.slot_map.tobytes()) != slot_map:
            return f"group {self.name!r} is registered with another slot_map"
        return None

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
                new.memory = self.stripes.data.attach(self.region_sizes(regions))
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
            self._rank_changed(new, str(role))
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
                        r.memory = self.stripes.data.attach(self.region_sizes(r.specs))
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
                self._rank_changed(r, "stream opened")
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
                self._rank_changed(r, "stream ended by the daemon")

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
            self.pending.drop_rank(rank)
            if any(x.state == LOST for x in self.ranks.values()):
                r.state = DETACHED  # the engine is going down after a failure: keep it
                self._check_ended()
            else:
                r.state = LEFT
            log.info("group %s: rank %d said goodbye", self.name, rank)
            self._rank_changed(r, "goodbye")
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
                self.pending.drop_rank(rank)
                self._check_ended()
                self._rank_changed(r, kind)
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
            self.pending.drop_rank(rank)
            self.metrics.failures.labels(self.name, kind).inc()
            self._rank_changed(r, kind)
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

    def shm_regions(self, every: bool) -> list[tuple[str, tuple[int, int] | None]]:
        """(name, identity when mapped) of the ranks' shared-memory regions: of
        ranks that said goodbye with ``release_region``, or of ``every`` rank."""
        if not self.stripes.data.shm_names:
            return []  # a GPU's memory goes with its process
        with self.lock:
            return [(s.name, ident) for r in self.ranks.values() if every or r.release_region
                    for s, ident in zip(r.specs, r.idents or [None] * len(r.specs), strict=True)]

    def kept_regions(self) -> list[str]:
        """Names of the shared-memory regions the group keeps mapped (an ended engine's survivors)."""
        if not self.stripes.data.shm_names:
            return []
        with self.lock:
            return [s.name for r in self.ranks.values() if r.mapped for s in r.specs]

    def store_bytes(self) -> int:
        """Shared memory of the group's own store: parity, metadata, index."""
        return self._store.nbytes()

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
            self.pending.add(rank, rec)
            self.cond.notify_all()
            self.metrics.commits.labels(self.name).inc()
            self._update_lag()

    def _alive(self, q: int) -> bool:
        r = self.ranks.get(q)
        return r is not None and r.state == ALIVE

    def _encode_loop(self) -> None:
        """The encoder thread: the next step once every rank committed it and all are
        alive, with the steps after it that are ready too (at most ``coalesce_steps``,
        one encode: the daemon is behind), after waiting up to ``coalesce_wait_seconds``
        for the next one; the result applied under ``lock`` (index news step by step,
        then the protected step)."""
        while True:
            with self.cond:
                while not self._stopped and self.pending.ready(self.protected_step, self.n, self._alive) is None:
                    self.cond.wait()
                if self._stopped:
                    return
                if self.coalesce_wait > 0 and self.coalesce_steps > 1:  # the steps stay pending meanwhile
                    self.cond.wait_for(lambda: self._stopped or self.pending.ready(
                        self.protected_step + 1, self.n, self._alive) is not None, timeout=self.coalesce_wait)
                run = self.pending.take_run(self.protected_step, self.n, self._alive, self.coalesce_steps)
                if not run:  # a rank was lost while we waited
                    continue
                mems = self._memories()
            t = run[-1][0]
            commits = coalesce(run) if len(run) > 1 else run[0][1]
            started = time.perf_counter()
            try:
                nbytes = self.encoder.encode(t, commits, mems, functools.partial(self._still_mapped, run, mems))
            except Exception:  # a daemon bug: fail these steps visibly, keep serving
                log.exception("group %s: encoding step %d failed; its writes are unprotected", self.name, t)
                for s, c in run:
                    self._step_failed(s, c)
                continue
            if nbytes is None:
                continue
            with self.lock:
                # the index first: after a crash in between, the workers resend the steps
                # and the index, which already has them, ignores the resend
                changed: dict[str, int] = {}
                for s, c in run:
                    changed.update(self.index.apply(news(s, c, self.index.void)))
                self.stripes.publish(t)
                self.metrics.encoded_bytes.labels(self.name).inc(nbytes)
                self.metrics.encode_seconds.labels(self.name).inc(time.perf_counter() - started)
                self.metrics.steps_encoded.labels(self.name).inc(len(run))
                self.metrics.encodes.labels(self.name).inc()
                self.update_gauges()
                self.broadcast(Ack(t, changed))
                self._notify(NoticeKind.STEP_PROTECTED)
                self.on_watermarks(self, changed)

    def _memories(self) -> dict[int, RankMemory]:
        """Every rank's memory (all alive: all mapped). Caller holds ``lock``."""
        mems: dict[int, RankMemory] = {}
        for q in range(self.n):
            mem = self.ranks[q].memory
            assert mem is not None, f"rank {q} is alive with no memory"
            mems[q] = mem
        return mems

    def _still_mapped(self, run: list[tuple[int, dict[int, CommitRecord]]], mems: Mapping[int, RankMemory]) -> bool:
        """Are ``mems`` still the ranks' memories? If a rank was lost while the
        encoder read it, the parity may cover a dead rank's destroyed bytes: the
        steps' live commits wait again, and the replacement recommits them."""
        with self.lock:
            if all(self.ranks[q].memory is mems[q] for q in range(self.n)):
                return True
            for t, commits in run:
                self.pending.put_back(t, {q: c for q, c in commits.items() if self._alive(q)})
            self.update_gauges()
            return False

    def _step_failed(self, t: int, commits: Mapping[int, CommitRecord]) -> None:
        """Step ``t`` could not be encoded: its chunks are void, the requests it
        wrote lose their watermark, every rank hears it, and the group goes on
        with step t + 1."""
        self.encoder.fail(commits)
        with self.lock:
            n = failed_news(t, commits)
            try:
                changed = self.index.apply(n)
            except Exception:
                log.exception("group %s: recording step %d's failure failed", self.name, t)
                changed = self.index.unprotect_in_memory(n.unprotect)
            self.stripes.publish(t)
            self.metrics.encode_failures.labels(self.name).inc()
            self.update_gauges()
            self._notify(NoticeKind.STEP_PROTECTED, detail="failed")
            self.broadcast(Ack(t, changed))
            self.broadcast(Event(EventKind.STEP_FAILED, 0, f"step {t}: {len(n.unprotect)} requests unprotected"))

    def match(self, tokens: np.ndarray) -> tuple[str, int, list[int]] | None:
        """The request whose protected KV covers the longest prefix of ``tokens``:
        (request id, tokens covered, its blocks for them), or None."""
        with self.lock:
            return self.index.match(tokens, self.layout.block_slots)

    def mirror_view(self, min_tokens: int, known: Mapping[str, int]) -> MirrorView | None:
        """What the mirror may copy off-node now: the protected step, the requests
        with at least ``min_tokens`` protected, and the tokens and full blocks up to
        the watermark of those that have more full blocks than ``known`` says
        (None: the group keeps no request index, or its engine ended)."""
        slots = self.layout.block_slots
        with self.lock:
            if not self.slotted or self._ended or self.ended_at is not None:
                return None
            present, out = set(), {}
            for req, (tokens, blocks) in self.index.requests.items():
                mark = min(self.index.watermarks.get(req, 0), len(tokens), len(blocks) * slots)
                if mark >= min_tokens:
                    present.add(req)
                    if mark // slots > known.get(req, 0):
                        out[req] = (tokens[:mark], blocks[: mark // slots])
            return MirrorView(self.protected_step, self.namespace, self.layout, self.n, present, out)

    def read_protected(self, block: int, outs: list[np.ndarray], as_of: int) -> bool:
        """Copy every rank's shard of full ``block`` into ``outs[rank]`` if they are
        the bytes protected at step ``as_of`` or before (each rank's checksum after
        the copy is the one recorded when the block was encoded); False (``outs``
        undefined) if a rank is not alive, the block is not full and protected, or
        it was encoded again since ``as_of`` (reused by another request, say)."""
        slots = self.layout.block_slots
        with self.lock:
            mems = {q: r.memory for q, r in self.ranks.items() if r.state == ALIVE and r.memory is not None}
        if len(mems) != self.n:
            return False
        st = self.stripes
        with st.io:
            if not st.deliverable([block], np.asarray([slots]))[0] or int(st.store.chunk_step[block].max()) > as_of:
                return False
            for q, mem in mems.items():
                st.data.read_block(mem, block, outs[q])
                if st.data.checksum(mem, block, 0, slots) != int(st.store.crc[block, 0, q]):
                    return False
        return True

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
        with self.stripes.io:  # after an encode in progress, before the next
            self.stripes.void(blocks)
            with self.lock:
                if requests:
                    changed = self.index.apply(StepNews(step=None, forget=dict.fromkeys(requests, step)))
                    self.on_watermarks(self, {**changed, **dict.fromkeys(requests, 0)})
                self.update_gauges()

    # ------------------------------------------------------------------ recovery

    def restore(self, rank: int, session: str | None) -> recovery.RestoreResult:
        """Rebuild every protected chunk of ``rank`` into its current memory from
        the survivors and parity (:func:`recovery.restore`), once every survivor
        has rejoined and resent its commits."""
        started = time.perf_counter()
        with self.lock:
            # After a daemon restart, survivors are detached until their workers
            # reconnect, and then catching up until the commits they resend (all they
            # wrote since the protected step) have arrived. Until then their in-flight
            # chunks are unknown: a chunk they rewrote would fail its checksum and be
            # taken for corruption. So wait for them (a survivor that dies meanwhile
            # stops being waited for).
            deadline = time.monotonic() + self.rejoin_wait
            while waiting := self.catching_up(but=rank):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("group %s: restoring rank %d without ranks %s, which have not rejoined and "
                                "resent their commits within %g s", self.name, rank, waiting, self.rejoin_wait)
                    break
                self.cond.wait(left)
            r = self.ranks.get(rank)
            if r is None:
                raise UnknownRank(self.name, rank)
            if session is not None and r.session != session:
                raise WrongState(self.name, rank, "stale session: register again")
            if r.memory is None:
                raise WrongState(self.name, rank, f"rank is {r.state} with no memory registered")
            # a survivor still catching up (its wait ran out) is an erasure: its chunks are not all known
            survivors = {q: x.memory for q, x in self.ranks.items()
                         if q != rank and x.state == ALIVE and not x.catching_up and x.memory is not None}
            flux, freed = self.pending.in_flux(self.layout.chunk_bytes)
            target = r.memory
            result = recovery.RestoreResult(self.protected_step, watermarks=dict(self.watermarks))
        recovery.restore(self.stripes, rank, target, survivors, flux, freed, result)
        result.seconds = time.perf_counter() - started
        with self.lock:
            if r.state == REPLACING:
                r.state = ALIVE
                r.committed = self.protected_step
                self._rank_changed(r, "restored")
            self.metrics.restores.labels(self.name, "ok" if not result.unrecoverable_blocks else "partial").inc()
            self.metrics.restore_seconds.labels(self.name).observe(result.seconds)
            self.metrics.restored_bytes.labels(self.name).inc(result.restored_bytes)
            self.metrics.unrecoverable_bytes.labels(self.name).inc(result.unrecoverable_bytes)
            self.metrics.corruption.labels(self.name).inc(result.corrupt_chunks)
            self.last_restore = {"rank": rank, "seconds": result.seconds, "restored_bytes": result.restored_bytes,
                                 "unrecoverable_bytes": result.unrecoverable_bytes, "unix_time": time.time()}
            self.manifest_ranks()
            self.update_gauges()
            self.broadcast(Event(EventKind.RANK_RESTORED, rank))
            self._notify(NoticeKind.RANK_RESTORED, rank=rank)
            self.cond.notify_all()
        return result

    def receiver(self, rank: int, session: str) -> tuple[DataPath, RankMemory]:
        """Rank ``rank`` as a fetch's destination: its data path and memory (the
        caller holds the memory, so its mapping stays while it writes)."""
        with self.lock:
            target = self.check_session(rank, session)
            if target.state != ALIVE or target.memory is None:
                raise WrongState(self.name, rank, f"rank is {target.state}: cannot receive a fetch")
            return self.stripes.data, target.memory

    def fetch(self, rank: int, blocks: list[int], tokens: int, dst: Group, dst_rank: int,
              dst_session: str, dst_blocks: list[int]) -> recovery.FetchResult:
        """Deliver this ended group's rank ``rank`` blocks into ``dst_blocks`` of
        ``dst``'s rank (:func:`recovery.fetch`). The caller checked that this group
        ended and that ``dst`` can receive its blocks (:meth:`Stripes.compatible`)."""
        lay = self.layout
        if not 0 <= rank < self.n:
            raise UnknownRank(self.name, rank, f"is outside 0..{self.n - 1}")
        for b in blocks:
            if b >= lay.num_blocks:
                raise BlockOutOfRange(self.name, rank, b, f"outside 0..{lay.num_blocks - 1}")
        for b in dst_blocks:
            if b >= dst.layout.num_blocks:
                raise BlockOutOfRange(dst.name, dst_rank, b, f"outside 0..{dst.layout.num_blocks - 1}")
        if lay.block_slots and tokens > len(blocks) * lay.block_slots:
            raise InvalidRequest(f"{tokens} tokens do not fit in {len(blocks)} blocks of {lay.block_slots} slots")
        with self.lock:
            held = {q: x.memory for q, x in self.ranks.items() if x.memory is not None}
        dst_data, dst_memory = dst.receiver(dst_rank, dst_session)
        with dst.stripes.io:
            out = recovery.fetch(self.stripes, rank, held, blocks, tokens, dst_data, dst_memory, dst_blocks)
        self.metrics.fetches.labels(self.name, "ok" if not out.unrecoverable_blocks else "partial").inc()
        self.metrics.fetch_seconds.labels(self.name).observe(out.seconds)
        self.metrics.fetched_bytes.labels(self.name).inc(out.fetched_bytes)
        return out

    def scrub(self) -> recovery.ScrubResult:
        """Check every protected chunk (:func:`recovery.scrub`): with every rank
        alive, against checksums and parity; for an ended group, the kept ranks'
        bytes against their checksums."""
        with self.lock:
            alive = all(self._alive(q) for q in range(self.n))
            if not alive and not self.ended():
                raise WrongState(self.name, None, "scrub needs every rank alive (or none: an ended group)")
            mems = {q: r.memory for q, r in self.ranks.items() if r.memory is not None}
        out = recovery.scrub(self.stripes, mems, parity=alive)
        if out.checksum_mismatches:
            self.metrics.corruption.labels(self.name).inc(out.checksum_mismatches)
        return out

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

    def state(self) -> str:
        """healthy, degraded (a rank lost or being rebuilt), stalled (a committed
        step waited longer than ``stall_seconds``) or ended."""
        with self.lock:
            if self.ended():
                return "ended"
            if self.degraded():
                return "degraded"
            return "stalled" if self.lag_seconds() > self.stall_seconds else "healthy"

    def view(self) -> GroupView:
        """A snapshot for status (the daemon adds what it knows: held memory, expiry)."""
        with self.lock:
            lay = self.layout
            per_chunk = lay.chunk_bytes * lay.num_layers
            chunks = self.stripes.protected_chunks()
            return GroupView(
                group=self.name, world_size=self.n, parity=self.m, state=self.state(),
                protected_step=self.protected_step, newest_step=self.newest_step(),
                lag_steps=self.newest_step() - self.protected_step, lag_seconds=self.lag_seconds(),
                kv_bytes=lay.kv_bytes() * self.n, protected_bytes=chunks * per_chunk * self.n,
                parity_bytes=chunks * per_chunk * self.m, parity_arena_bytes=lay.kv_bytes() * self.m,
                layout=lay,
                ranks=[RankView(r.rank, str(r.state), r.pid, r.committed, r.region, r.process_ended)
                       for r in sorted(self.ranks.values(), key=lambda r: r.rank)],
                watermarks=dict(sorted(self.watermarks.items())),
                last_restore=dict(self.last_restore) if self.last_restore else None,
                ended_seconds=time.time() - self.ended_at if self.ended_at is not None else 0.0)

    def snapshot(self) -> Notice:
        """The group for a new watcher: every rank, the protected step, the state."""
        with self.lock:
            v = self.view()
            return Notice(NoticeKind.SNAPSHOT, self.name, v.protected_step, v.state, ranks=tuple(v.ranks))

    def _notify(self, kind: NoticeKind, rank: int = 0, detail: str = "") -> None:
        """Tell the watchers. Caller holds ``lock``."""
        self.on_notice(Notice(kind, self.name, self.protected_step, self.state(), rank=rank, detail=detail))

    def _rank_changed(self, r: Rank, why: str) -> None:
        """Tell the watchers a rank's new state. Caller holds ``lock``."""
        self.on_notice(Notice(NoticeKind.RANK_STATE, self.name, self.protected_step, self.state(), rank=r.rank,
                              rank_state=str(r.state), process_ended=r.process_ended, detail=why))

    def _update_lag(self) -> None:
        self.metrics.lag_steps.labels(self.name).set(self.newest_step() - self.protected_step)

    def update_gauges(self) -> None:
        """Refresh the group's gauges. Caller holds ``lock``."""
        lay = self.layout
        chunks = self.stripes.protected_chunks()
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


def open_group(name: str, store: ParityStore, metrics: Metrics, pool: ThreadPoolExecutor, config: Config,
               runtime: Any = None) -> Group:
    """A group over ``store`` with the data path of its kind (the manifest's),
    opened with the daemon's encode pool and ``runtime`` (CUDA's; None: the real
    one). Raises what the data path raises (``GpuUnavailable``, ``Unsupported``)."""
    cls = datapath.load(store.manifest.get("kind", "host"))
    return Group(name, store, cls(store, pool, config, runtime), metrics, config)


__all__ = ["EndReason", "Group", "open_group"]
