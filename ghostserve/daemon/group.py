"""One tensor-parallel group: its ranks, the stripe scheduler, encoder and restorer.

A stripe is the same (layer, block) on all N ranks. Ranks commit steps in order;
when every rank has committed step t, the encoder thread encodes the union of
the byte ranges step t wrote (only those bytes) into the parity store, records
CRC32C checksums of every rank's chunk, frees released blocks, and acknowledges
the new protected step and request watermarks to every rank's stream.

Threads and locks:

* ``lock`` guards rank state, pending commits and watermarks. gRPC handler
  threads take it briefly; it is never held while bytes are encoded.
* ``io_lock`` serialises everything that reads or writes KV and parity bytes
  (encoding a step, restore, scrub), so a restore never sees half a step.
* The encoder thread is the only writer of the parity store's step records.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.codec import RSCode, crcfold
from ghostserve.codec.isal import crc32c, encode_raw
from ghostserve.config import Config
from ghostserve.daemon import rebuild
from ghostserve.daemon.index import Record, StepNews
from ghostserve.daemon.store import Layout, ParityStore
from ghostserve.errors import (
    BlockOutOfRange,
    DuplicateRank,
    InvalidRequest,
    UnknownRank,
    WrongState,
)
from ghostserve.metrics import Metrics

log = logging.getLogger("ghostserve.group")

ALIVE, LOST, DETACHED, REPLACING, LEFT = "alive", "lost", "detached", "replacing", "left"
STATES = (ALIVE, LOST, DETACHED, REPLACING, LEFT)
PARALLEL_RESTORE_BYTES = 4 << 20  # a restore below this runs on one thread: Python-bound


@dataclass
class CommitRecord:
    """A validated step commit of one rank (plain Python, no proto)."""

    step: int
    ranges: list[tuple[int, int, int]]          # (block, start, end), chunk-aligned
    requests: list[tuple[str, int]] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    fills: dict[int, int] = field(default_factory=dict)   # block -> filled slots (slot layouts)
    released: list[int] = field(default_factory=list)     # dropped before this step's writes
    records: list[Record] = field(default_factory=list)


@dataclass
class Rank:
    rank: int
    state: str
    pid: int
    region: str
    session: str = ""
    segment: shm.Segment | None = None
    view: np.ndarray | None = None
    addr: int = 0
    committed: int = -1
    outbox: queue.Queue | None = None
    ident: tuple[int, int] | None = None   # (device, inode) of the region when mapped
    release_region: bool = False          # said goodbye: unlink the region when the group is dropped

    def map(self, size: int) -> None:
        """Map the region, its page tables filled (the daemon reads or writes all of it)."""
        self.ident = shm.identity(self.region)
        self.segment = shm.Segment.attach(self.region, size, populate=True)
        self.view = self.segment.array()
        self.addr = self.view.ctypes.data

    def unmap(self) -> None:
        """Forget the memory: a lost rank's bytes must never feed a restore."""
        self.view, self.addr = None, 0
        if self.segment is not None:
            self.segment.close()
            self.segment = None


@dataclass
class RestoreResult:
    protected_step: int
    restored_bytes: int = 0
    unrecoverable_blocks: list[int] = field(default_factory=list)
    unrecoverable_bytes: int = 0
    corrupt_chunks: int = 0
    watermarks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class FetchResult:
    fetched_bytes: int = 0
    rebuilt: bool = False
    unrecoverable_blocks: list[int] = field(default_factory=list)
    corrupt_chunks: int = 0
    seconds: float = 0.0


@dataclass
class ScrubResult:
    chunks_checked: int = 0
    parity_mismatches: int = 0
    checksum_mismatches: int = 0
    bad_blocks: list[int] = field(default_factory=list)
    bad_ranks: list[int] = field(default_factory=list)
    parity_checked: bool = True


class EndReason:
    """Why a group has no engine any more (persisted in its manifest)."""

    CLEAN = "clean"      # every rank said goodbye, none was lost: dropped at once
    FAILURE = "failure"  # ranks were lost: kept for a resume until --ended-ttl


class Group:
    """One TP group; see the module doc for its threads and locks."""

    def __init__(self, name: str, store: ParityStore, metrics: Metrics, pool: ThreadPoolExecutor,
                 config: Config):
        self.name, self.store, self.metrics, self.pool = name, store, metrics, pool
        self.threads = config.threads  # the pool's size
        self.tile_bytes = config.restore_tile_bytes
        self.layout: Layout = store.layout
        self.n, self.m = store.k, store.m
        # CPU regions are encoded with ISA-L on raw addresses (see _encode_range)
        self.code = RSCode(self.n, self.m, "isal", threads=1)
        self._tables = self.code.backend.tables
        self._parity_addr = store.parity.ctypes.data
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.io_lock = threading.Lock()
        self.ranks: dict[int, Rank] = {}
        self.pending: dict[int, dict[int, CommitRecord]] = {}
        # watermarks, the Lookup index (Commit.records), releases: in shared memory
        self.index = store.index
        self.keep_survivors = bool(store.manifest.get("keep_survivors"))
        self.namespace = str(store.manifest.get("namespace", ""))
        # keep_survivors groups: set once no rank is alive (persisted: a restarted
        # daemon must not mistake an ended engine for one whose workers will rejoin)
        self._ended = bool(store.manifest.get("ended"))
        self.ended_at: float | None = store.manifest.get("ended_at")  # unix time
        self.end_reason: str | None = store.manifest.get("end_reason")
        self.slotted = self.layout.block_slots > 0
        self._masks: dict[int, np.ndarray] = {}
        self.last_restore: dict[str, Any] | None = None
        self._stopped = False
        # (block, chunk) found unrecoverable by a restore; guarded by io_lock
        self.broken: set[tuple[int, int]] = set()
        self.rejoin_wait = config.rejoin_wait_seconds  # a restore waits this long for detached survivors
        self._encoder = threading.Thread(target=self._encode_loop, name=f"gs-encode-{name}", daemon=True)
        lay = self.layout
        self.metrics.kv_bytes.labels(name).set(lay.kv_bytes() * self.n)
        self.metrics.parity_arena_bytes.labels(name).set(lay.kv_bytes() * self.m)
        self._update_gauges()

    def start(self) -> None:
        self._encoder.start()

    def stop(self) -> None:
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        if self._encoder.is_alive():
            self._encoder.join(timeout=5)

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
        manifest["ranks"] = {str(r.rank): {"region": r.region, "pid": r.pid, "state": r.state,
                                           "ident": r.ident, "release_region": r.release_region}
                             for r in self.ranks.values()}
        self.store.write_manifest(manifest)

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

    def register(self, rank: int, pid: int, region: str, region_size: int) -> tuple[str, str]:
        """Add or re-admit ``rank``; returns (role, session). Caller validated layout/code."""
        if not 0 <= rank < self.n:
            raise UnknownRank(self.name, rank, f"is outside 0..{self.n - 1}")
        with self.lock:
            if self._ended:
                raise WrongState(self.name, rank, "the group's engine ended after a failure; a new "
                                 "engine needs a new group (drop this one once resumed)")
            self.ended_at = self.end_reason = None  # every rank was lost: a replacement revives it
            old = self.ranks.get(rank)
            if old is None:
                role = "NEW"
            elif old.state in (ALIVE, DETACHED, LEFT) and old.region == region:
                if old.state == ALIVE and old.pid != pid:
                    raise DuplicateRank(self.name, rank)
                role = "REJOINED"
            elif old.state in (ALIVE, DETACHED, LEFT):
                raise DuplicateRank(self.name, rank)
            else:  # LOST or REPLACING: fresh memory for a lost rank
                role = "REPLACEMENT"
            new = Rank(rank, ALIVE if role != "REPLACEMENT" else REPLACING, pid, region)
            try:
                new.map(region_size)
            except FileNotFoundError:
                raise InvalidRequest(f"shared memory region {region!r} does not exist") from None
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if old is not None:
                if role == "REJOINED":
                    new.committed = old.committed if old.state == ALIVE else self.protected_step
                if old.outbox is not None:
                    old.outbox.put(None)
                old.unmap()
            else:
                new.committed = self.protected_step
            if role == "REPLACEMENT":
                new.committed = self.protected_step
            new.session = uuid.uuid4().hex
            self.ranks[rank] = new
            self.manifest_ranks()
            self._update_gauges()
            self.cond.notify_all()
            return role, new.session

    def attach_detached(self, manifest_ranks: dict[str, Any], region_size: int) -> None:
        """After a daemon restart: map every known rank's region again, detached
        until its worker reconnects; a rank whose region is gone is lost."""
        with self.lock:
            for key, info in manifest_ranks.items():
                r = Rank(int(key), DETACHED, int(info["pid"]), info["region"], committed=self.protected_step,
                         release_region=bool(info.get("release_region")))
                r.ident = tuple(info["ident"]) if info.get("ident") else None
                if info.get("state") in (LOST, REPLACING):
                    r.state = LOST
                elif info.get("state") == LEFT:
                    r.state = LEFT
                if r.state != LOST:
                    try:
                        r.map(region_size)
                    except (FileNotFoundError, ValueError):
                        r.state = LOST
                self.ranks[r.rank] = r
            self._update_gauges()

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
            if r.state == DETACHED and r.view is not None:
                r.state = ALIVE  # its last stream was refused; this one carries on
                self._update_gauges()
            if r.outbox is not None:
                r.outbox.put(None)  # ends an older stream of this rank
            r.outbox = queue.Queue()
            r.outbox.put(("ack", self.protected_step, dict(self.watermarks)))
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
                self._update_gauges()

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
            for commits in self.pending.values():
                commits.pop(rank, None)
            if any(x.state == LOST for x in self.ranks.values()):
                r.state = DETACHED  # the engine is going down after a failure: keep it
                if self.keep_survivors:
                    self._ended = all(x.state in (LOST, DETACHED, LEFT) for x in self.ranks.values())
            else:
                r.state = LEFT
            log.info("group %s: rank %d said goodbye", self.name, rank)
            self._note_end()
            self.manifest_ranks()
            self._update_gauges()
            self.cond.notify_all()
            return self.end_reason == EndReason.CLEAN

    def mark_lost(self, rank: int, kind: str) -> bool:
        """Rank ``rank`` failed: unmap its memory, drop its unencoded commits. Idempotent."""
        with self.lock:
            r = self.ranks.get(rank)
            if r is None or r.state in (LOST, LEFT):
                return False  # a rank that said goodbye may end its process
            if self.keep_survivors and r.view is not None and (
                    r.state == DETACHED or any(x.state == LOST for x in self.ranks.values())):
                # the engine tears down every rank after one fails; this one's
                # memory outlives it (shared memory) and stays a recovery source
                if r.state != DETACHED:
                    log.warning("group %s: rank %d ended after a failure (%s); its memory is kept",
                                self.name, rank, kind)
                    r.state = DETACHED
                    for commits in self.pending.values():
                        commits.pop(rank, None)
                    self._ended = all(x.state in (LOST, DETACHED, LEFT) for x in self.ranks.values())
                    self._note_end()
                    self.manifest_ranks()
                    self._update_gauges()
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
                self._ended = all(x.state in (LOST, DETACHED) for x in self.ranks.values())
            for commits in self.pending.values():
                commits.pop(rank, None)
            self.metrics.failures.labels(self.name, kind).inc()
            self._note_end()
            self.manifest_ranks()
            self._update_gauges()
            self._broadcast(("event", "RANK_LOST", rank, kind))
            self.cond.notify_all()
            return True

    def end_streams(self) -> None:
        """End every worker stream (daemon shutdown); workers rejoin a new daemon."""
        with self.lock:
            for r in self.ranks.values():
                if r.outbox is not None:
                    r.outbox.put(None)
                    r.outbox = None

    def watched_pids(self) -> list[tuple[int, int]]:
        with self.lock:
            return [(r.rank, r.pid) for r in self.ranks.values() if r.state not in (LOST, LEFT) and r.pid > 0]

    # ------------------------------------------------------------------ commits

    def validate_commit(self, rec: CommitRecord, rank: int) -> None:
        lay = self.layout
        for block, start, end in rec.ranges:
            if block >= lay.num_blocks:
                raise BlockOutOfRange(self.name, rank, block, f"outside 0..{lay.num_blocks - 1}")
            if not 0 <= start < end <= lay.block_bytes:
                raise BlockOutOfRange(self.name, rank, block,
                                      f"byte range [{start}, {end}) outside 0..{lay.block_bytes}")
            if start % lay.chunk_bytes or end % lay.chunk_bytes:
                raise InvalidRequest(f"byte range [{start}, {end}) of block {block} is not aligned "
                                     f"to chunk_bytes {lay.chunk_bytes}")
        for block in (*rec.freed, *rec.released):
            if block >= lay.num_blocks:
                raise BlockOutOfRange(self.name, rank, block, "freed block outside the layout")
        if rec.fills and not self.slotted:
            raise InvalidRequest("fills are for slot-addressed layouts (block_slots > 0)")
        for block, filled in rec.fills.items():
            if block >= lay.num_blocks:
                raise BlockOutOfRange(self.name, rank, block, "filled block outside the layout")
            if not 0 < filled <= lay.block_slots:
                raise InvalidRequest(f"block {block}: {filled} filled slots of {lay.block_slots}")
        for record in rec.records:
            if not record.request or len(record.request) > 256:
                raise InvalidRequest("request ids must be 1-256 characters")
            if any(b >= lay.num_blocks for b in record.blocks):
                raise BlockOutOfRange(self.name, rank, max(record.blocks),
                                      "request record block outside the layout")
        for req, _ in rec.requests:
            if not req or len(req) > 256:
                raise InvalidRequest("request ids must be 1-256 characters")

    def commit(self, rank: int, session: str, rec: CommitRecord) -> None:
        """Queue a validated step commit; returns at once (encoding is async)."""
        self.validate_commit(rec, rank)
        with self.lock:
            r = self.check_session(rank, session)
            if r.state != ALIVE:
                raise WrongState(self.name, rank, f"rank is {r.state}: cannot commit")
            if rec.step <= r.committed:
                return  # a resend after reconnecting: already have it
            if rec.step != r.committed + 1:
                raise WrongState(self.name, rank,
                                 f"step {rec.step} after {r.committed}: steps must be consecutive")
            self.pending.setdefault(rec.step, {})[rank] = rec
            r.committed = rec.step
            self.metrics.commits.labels(self.name).inc()
            self._update_lag()
            self.cond.notify_all()

    def _ready_step(self) -> int | None:
        t = self.protected_step + 1
        commits = self.pending.get(t)
        if commits is None or len(commits) < self.n:
            return None
        if any(self.ranks.get(q) is None or self.ranks[q].state != ALIVE for q in range(self.n)):
            return None
        return t

    def _encode_loop(self) -> None:
        """The encoder thread: one step at a time, woken by ``cond`` (every change
        that can make a step ready notifies it)."""
        while True:
            with self.cond:
                while not self._stopped and self._ready_step() is None:
                    self.cond.wait()
                if self._stopped:
                    return
                t = self._ready_step()
                commits = self.pending.pop(t)
                views = {q: (self.ranks[q].view, self.ranks[q].addr) for q in range(self.n)}
            try:
                self._encode_step(t, commits, views)
            except Exception:  # a daemon bug: fail this step visibly, keep serving
                log.exception("group %s: encoding step %d failed; its writes are unprotected", self.name, t)
                self._fail_step(t, commits)

    def _fail_step(self, t: int, commits: dict[int, CommitRecord]) -> None:
        """Step ``t`` could not be encoded: void every chunk it touched and stop
        claiming the requests it wrote (they get no watermark until they finish
        or are released: their voided chunks are never re-encoded), then move on
        to step t + 1 so the group keeps protecting everything else."""
        cb = self.layout.chunk_bytes
        victims = {req for c in commits.values() for req, _ in c.requests}
        victims |= {rec.request for c in commits.values() for rec in c.records}
        with self.io_lock:
            for b, s, e in self._merge(rg for c in commits.values() for rg in c.ranges):
                if self.slotted:
                    self.store.chunk_step[b, :] = -1
                else:
                    self.store.chunk_step[b, s // cb : e // cb] = -1
            for b in {b for c in commits.values() for b in (*c.released, *c.freed)}:
                self.store.chunk_step[b, :] = -1
            with self.lock:
                finished = {req for c in commits.values() for req in c.finished}
                try:
                    changed = self.index.apply(StepNews(step=t, unprotect=victims - finished,
                                                        finished=finished))
                except Exception:
                    log.exception("group %s: recording step %d's failure failed", self.name, t)
                    changed = self.index.unprotect_in_memory(victims)
                self.store.protected_step = t
                self.metrics.encode_failures.labels(self.name).inc()
                self._update_gauges()
                self._broadcast(("ack", t, changed))
                self._broadcast(("event", "STEP_FAILED", 0, f"step {t}: {len(victims)} requests unprotected"))

    @staticmethod
    def _merge(ranges: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for block, s, e in sorted(ranges):
            if out and out[-1][0] == block and s <= out[-1][2]:
                out[-1] = (block, out[-1][1], max(out[-1][2], e))
            else:
                out.append((block, s, e))
        return out

    def _encode_step(self, t: int, commits: dict[int, CommitRecord], views: dict[int, tuple]) -> None:
        started = time.perf_counter()
        ranges = self._merge(rg for c in commits.values() for rg in c.ranges)
        fills: dict[int, int] = {}
        for c in commits.values():
            for b, f in c.fills.items():
                fills[b] = max(f, fills.get(b, 0))
        with self.io_lock:
            for block in {b for c in commits.values() for b in c.released}:
                self.store.chunk_step[block, :] = -1  # reused by this step: old parity is void
                self.broken.difference_update((block, c) for c in range(self.layout.chunks))
            if self.slotted:
                for b, _, _ in ranges:
                    self.store.chunk_step[b, :] = -1  # before its fill changes
                    self.store.fill[b] = fills.get(b, self.layout.block_slots)
            futures = [self.pool.submit(self._encode_range, t, b, s, e, views) for b, s, e in ranges]
            nbytes = sum(f.result() for f in futures)
            with self.lock:
                if any(self.ranks[q].view is not views[q][0] for q in range(self.n)):
                    # a rank was lost while we read it: this parity may cover bytes
                    # of a dead rank's destroyed memory. Drop it; the replacement
                    # recommits step t and it is encoded again.
                    cb = self.layout.chunk_bytes
                    for b, s, e in ranges:
                        self.store.chunk_step[b, s // cb : e // cb] = -1
                    alive = {q: c for q, c in commits.items() if self.ranks[q].state == ALIVE}
                    self.pending.setdefault(t, {}).update(alive)
                    self._update_gauges()
                    return
            for block in {b for c in commits.values() for b in c.freed}:
                self.store.chunk_step[block, :] = -1
                self.broken.difference_update((block, c) for c in range(self.layout.chunks))
            with self.lock:
                # the index first: after a crash in between, the workers resend step t
                # and the index, which already has it, ignores the resend
                changed = self.index.apply(self._step_news(t, commits))
                self.store.protected_step = t
                self.metrics.encoded_bytes.labels(self.name).inc(nbytes)
                self.metrics.encode_seconds.labels(self.name).inc(time.perf_counter() - started)
                self.metrics.steps_encoded.labels(self.name).inc()
                self._update_gauges()
                self._broadcast(("ack", t, changed))

    def _step_news(self, t: int, commits: dict[int, CommitRecord]) -> StepNews:
        """What step ``t`` tells the index: tokens written on every rank (the
        minimum across ranks) become protected; records of requests not released
        since; finished requests are dropped."""
        marks: dict[str, int] = {}
        for c in commits.values():
            for req, tokens in c.requests:
                if not self.index.void(req, c.step):
                    marks[req] = min(tokens, marks.get(req, tokens))
        records = [rec for c in commits.values() for rec in c.records if not self.index.void(rec.request, c.step)]
        finished = {req for c in commits.values() for req in c.finished}
        # a release at step s voids news of steps < s; once t is encoded no such news can come
        return StepNews(step=t, watermarks=marks, records=records, finished=finished, prune_before=t + 2)

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
                self._update_gauges()

    def _shard(self, view: np.ndarray, layer: int, block: int, start: int, end: int) -> np.ndarray:
        base = self.layout.offset + layer * self.layout.layer_stride + block * self.layout.block_stride
        return view[base + start : base + end]

    def _crc(self, addr: int, block: int, chunk: int) -> int:
        lay = self.layout
        at = int(addr + lay.offset + block * lay.block_stride + chunk * lay.chunk_bytes)
        return self._crc_at([at + layer * lay.layer_stride for layer in range(lay.num_layers)],
                            int(self.store.fill[block]) if self.slotted else 0)

    def _mask(self, fill: int) -> np.ndarray:
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

    def _crc_at(self, addrs: list[int], fill: int = 0) -> int:
        """CRC32C chained over one chunk per layer at ``addrs``. In a slot-addressed
        layout only the first ``fill`` slots count (the rest read as zero): those
        bytes may keep changing after the chunk was encoded."""
        cb, crc = self.layout.chunk_bytes, 0
        if not self.slotted or fill >= self.layout.block_slots:
            for at in addrs:
                crc = crc32c(at, cb, crc)
            return crc
        keep = self._keep(fill)
        covered = np.empty(cb, dtype=np.uint8)  # per call: encode threads run this in parallel
        for at in addrs:
            np.bitwise_and(np.ctypeslib.as_array((ctypes.c_uint8 * cb).from_address(at)), keep, out=covered)
            crc = crc32c(covered.ctypes.data, cb, crc)
        return crc

    def _addr(self, base: int, layer: int, block: int, start: int) -> int:
        """Address of byte ``start`` of the (layer, block) shard in a region at ``base``."""
        lay = self.layout
        return int(base + lay.offset + layer * lay.layer_stride + block * lay.block_stride + start)

    def _paddr(self, layer: int, block: int, j: int, start: int) -> int:
        """Address of byte ``start`` of parity row j of the (layer, block) stripe."""
        return int(self._parity_addr + ((layer * self.m + j) * self.layout.num_blocks + block)
                   * self.layout.block_bytes + start)

    def _encode_range(self, t: int, block: int, start: int, end: int, views: dict[int, tuple]) -> int:
        # Raw ISA-L on addresses: the layout was validated at registration, and
        # per-call validation would cost more than encoding a decode step's bytes.
        lay, store = self.layout, self.store
        c0, c1 = start // lay.chunk_bytes, end // lay.chunk_bytes
        store.chunk_step[block, c0:c1] = -1  # unprotected while its parity changes
        tables = self._tables(self.code.parity_matrix)
        for layer in range(lay.num_layers):
            encode_raw(tables, end - start, [self._addr(views[q][1], layer, block, start) for q in range(self.n)],
                       [self._paddr(layer, block, j, start) for j in range(self.m)])
        for c in range(c0, c1):
            for q in range(self.n):
                store.crc[block, c, q] = self._crc(views[q][1], block, c)
        store.chunk_step[block, c0:c1] = t
        self.broken.difference_update((block, c) for c in range(c0, c1))
        return (end - start) * lay.num_layers * self.n

    # ------------------------------------------------------------------ restore

    def restore(self, rank: int, session: str | None) -> RestoreResult:
        """Rebuild every protected chunk of ``rank`` into its current memory from
        the survivors and parity. Survivors failing their checksum count as
        erasures (and are repaired when the code allows). Chunks with more bad
        shards than m are reported unrecoverable and left untouched."""
        started = time.perf_counter()
        with self.lock:
            # After a daemon restart, survivors are detached until their workers
            # reconnect and resend what they wrote since the protected step. Until
            # then their in-flight chunks are unknown, so wait for them.
            deadline = time.monotonic() + self.rejoin_wait
            while any(x.state == DETACHED for q, x in self.ranks.items() if q != rank):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            r = self.ranks.get(rank)
            if r is None:
                raise UnknownRank(self.name, rank)
            if session is not None and r.session != session:
                raise WrongState(self.name, rank, "stale session: register again")
            if r.view is None:
                raise WrongState(self.name, rank, f"rank is {r.state} with no memory registered")
            survivors = {q: (x.view, x.addr) for q, x in self.ranks.items()
                         if q != rank and x.state == ALIVE and x.view is not None}
            base_erased = {q for q in range(self.n) if q not in survivors}
            # chunks written or freed by steps not yet encoded are in flux: the
            # engine recomputes them, so they are neither restored nor "corrupt"
            flux: set[tuple[int, int]] = set()
            freed_in_flux: set[int] = set()
            cb = self.layout.chunk_bytes
            for commits in self.pending.values():
                for c in commits.values():
                    for b, s, e in c.ranges:
                        flux.update((b, ch) for ch in range(s // cb, e // cb))
                    freed_in_flux.update(c.freed)
            target = (r.view, r.addr)
            result = RestoreResult(self.protected_step, watermarks=dict(self.watermarks))
        with self.io_lock:
            self._restore_into(rank, target, survivors, base_erased, flux, freed_in_flux, result)
        result.seconds = time.perf_counter() - started
        with self.lock:
            if r.state == REPLACING:
                r.state = ALIVE
                r.committed = self.protected_step
            self.metrics.restores.labels(
                self.name, "ok" if not result.unrecoverable_blocks else "partial").inc()
            self.metrics.restore_seconds.labels(self.name).observe(result.seconds)
            self.metrics.restored_bytes.labels(self.name).inc(result.restored_bytes)
            self.metrics.unrecoverable_bytes.labels(self.name).inc(result.unrecoverable_bytes)
            self.metrics.corruption.labels(self.name).inc(result.corrupt_chunks)
            self.last_restore = {"rank": rank, "seconds": result.seconds,
                                 "restored_bytes": result.restored_bytes,
                                 "unrecoverable_bytes": result.unrecoverable_bytes,
                                 "unix_time": time.time()}
            self.manifest_ranks()
            self._update_gauges()
            self._broadcast(("event", "RANK_RESTORED", rank, ""))
            self.cond.notify_all()
        return result

    def _rebuild_plan(self, erased: tuple[int, ...], want: tuple[int, ...]) -> tuple[tuple[int, ...], Any]:
        """(survivor shard indices, ISA-L tables) giving the ``want`` rows for ``erased``."""
        survivors, coeffs = self.code.decode_matrix(list(erased))
        rows = np.ascontiguousarray(coeffs[[list(erased).index(w) for w in want]])
        rows.flags.writeable = False
        return survivors, self._tables(rows)

    def _restore_into(self, rank, target, survivors, base_erased, flux, freed_in_flux, result) -> None:
        """Rebuild every protected, settled chunk of ``rank``.

        Fast path (:mod:`ghostserve.daemon.rebuild`): tiles of whole chunks (up
        to ``tile_bytes`` of each layer, every layer), each checked on every
        survivor, decoded while its sources are in cache and checked again,
        spread over the encode threads. Tiles that fail a check, partly filled
        slot-addressed blocks (masked checksums), restores with more erasures
        than parity, and everything when ``tile_bytes <= 0``, take the chunk path
        below: survivors checked run by run (:mod:`ghostserve.codec.crcfold`: one
        CRC pass per layer of a run), a run that fails chunk by chunk, bad chunks
        counted as erasures (beyond m: unrecoverable, nothing written for them);
        rebuilt bytes that do not verify are zeroed and reported lost."""
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        settled = store.chunk_step >= 0
        for b, c in flux:
            settled[b, c] = False
        settled[sorted(freed_in_flux)] = False
        # lost in an earlier restore: still lost
        lost_chunks = sorted((b, c) for b, c in self.broken if settled[b, c])
        for b, c in lost_chunks:
            settled[b, c] = False
        result.unrecoverable_bytes += len(lost_chunks) * cb * lay.num_layers
        unrecoverable = {b for b, _ in lost_chunks}
        # runs (block, c0, c1) of consecutive settled chunks
        edges = np.diff(np.pad(settled.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        (rb, c0s), (_, c1s) = np.nonzero(edges == 1), np.nonzero(edges == -1)
        runs: list[tuple[int, int, int]] = list(zip(rb.tolist(), c0s.tolist(), c1s.tolist(), strict=True))
        erased = tuple(sorted(base_erased | {rank}))
        if runs and self.tile_bytes > 0 and len(erased) <= self.m:
            slow: list[tuple[int, int, int]] = []
            if self.slotted:  # masked checksums: partly filled blocks stay on the chunk path
                full = store.fill >= lay.block_slots
                slow = [rn for rn in runs if not full[rn[0]]]
                runs = [rn for rn in runs if full[rn[0]]]
            plan = rebuild.TilePlan(lay, rank, target[1], {q: a for q, (_, a) in survivors.items()},
                                    self._parity_addr, self.m, *self._rebuild_plan(erased, (rank,)),
                                    store.crc, self.n)
            done, retry = rebuild.rebuild_runs(plan, runs, self.tile_bytes, self.pool, self.threads)
            result.restored_bytes += done * cb * lay.num_layers
            # tiles that failed a check are redone chunk by chunk (one whose survivors failed wrote nothing)
            runs = sorted(slow + retry)
        # survivors: fast check of every run, then chunk by chunk where it fails
        suspect: set[int] = set()
        for q, (_, addr) in survivors.items():
            suspect.update(int(j) for j in np.flatnonzero(~self._runs_intact(addr, q, runs)))
        segments: list[tuple[int, int, int, frozenset[int]]] = []
        for j, (b, c0, c1) in enumerate(runs):
            if j not in suspect:
                segments.append((b, c0, c1, frozenset()))
                continue
            for c in range(c0, c1):
                bad = frozenset(q for q, (_, addr) in survivors.items() if self._crc(addr, b, c) != store.crc[b, c, q])
                if bad:
                    result.corrupt_chunks += len(bad)
                    log.warning("group %s: block %d chunk %d (protected at step %d) fails its checksum "
                                "on ranks %s", self.name, b, c, store.chunk_step[b, c], sorted(bad))
                if segments and segments[-1][0] == b and segments[-1][2] == c and segments[-1][3] == bad:
                    segments[-1] = (b, segments[-1][1], c + 1, bad)
                else:
                    segments.append((b, c, c + 1, bad))
        addr = {q: a for q, (_, a) in survivors.items()}
        addr[rank] = target[1]
        rebuilt: list[tuple[int, int, int, tuple[int, ...]]] = []
        plans = []
        for b, c0, c1, bad in segments:
            erased = tuple(sorted(base_erased | {rank} | bad))
            if len(erased) > self.m:
                result.unrecoverable_bytes += (c1 - c0) * cb * lay.num_layers
                self.broken.update((b, c) for c in range(c0, c1))
                unrecoverable.add(b)
                continue
            want = (rank, *sorted(bad))
            rebuilt.append((b, c0, c1, want))
            plans.append((b, c0, c1, want, *self._rebuild_plan(erased, want)))

        def decode(part: list) -> None:
            for b, c0, c1, want, sources, tables in part:
                s, e = c0 * cb, c1 * cb
                for layer in range(lay.num_layers):
                    src = [self._addr(addr[i], layer, b, s) if i < self.n else
                           self._paddr(layer, b, i - self.n, s) for i in sources]
                    encode_raw(tables, e - s, src, [self._addr(addr[w], layer, b, s) for w in want])

        self._in_slices(decode, plans, sum((c1 - c0) for b, c0, c1, *_ in plans) * cb * lay.num_layers)
        # end-to-end check of what was written against the encode-time checksums
        failed: set[int] = set()
        for w in {w for *_, want in rebuilt for w in want}:
            mine = [j for j, (*_, want) in enumerate(rebuilt) if w in want]
            ok = self._runs_intact(addr[w], w, [rebuilt[j][:3] for j in mine])
            for j, good in zip(mine, ok, strict=True):
                b, c0, c1, _ = rebuilt[j]
                # a run's plain CRC misses for partly filled slot blocks: check those chunk by chunk
                if not good and any(self._crc(addr[w], b, c) != store.crc[b, c, w] for c in range(c0, c1)):
                    failed.add(j)
        for j, (b, c0, c1, _) in enumerate(rebuilt):
            s, e = c0 * cb, c1 * cb
            if j in failed:
                for layer in range(lay.num_layers):
                    self._shard(target[0], layer, b, s, e)[:] = 0
                result.unrecoverable_bytes += (e - s) * lay.num_layers
                self.broken.update((b, c) for c in range(c0, c1))
                unrecoverable.add(b)
            else:
                result.restored_bytes += (e - s) * lay.num_layers
        result.unrecoverable_blocks = sorted(unrecoverable)

    def _in_slices(self, fn, items: list, nbytes: int) -> None:
        """``fn`` over ``items``: one contiguous slice per encode thread when the
        native work (``nbytes``) outweighs the GIL hand-offs, else on this thread."""
        parts = self.threads if nbytes >= PARALLEL_RESTORE_BYTES else 1
        if parts <= 1 or len(items) < 2:
            fn(items)
            return
        step = -(-len(items) // parts)
        for f in [self.pool.submit(fn, items[i : i + step]) for i in range(0, len(items), step)]:
            f.result()

    def _runs_intact(self, addr: int, q: int, runs: list[tuple[int, int, int]]) -> np.ndarray:
        """For each (block, c0, c1) run: do rank ``q``'s bytes at ``addr`` match the
        stored chunk checksums? One CRC pass per layer and run."""
        if not runs:
            return np.ones(0, dtype=bool)
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        passes = np.empty((len(runs), lay.num_layers), dtype=np.uint32)

        def crc_passes(part: list[int]) -> None:
            for j in part:
                b, c0, c1 = runs[j]
                at = self._addr(addr, 0, b, c0 * cb)
                for layer in range(lay.num_layers):
                    passes[j, layer] = crc32c(at + layer * lay.layer_stride, (c1 - c0) * cb, 0)

        self._in_slices(crc_passes, list(range(len(runs))),
                        sum(c1 - c0 for _, c0, c1 in runs) * cb * lay.num_layers)
        width = max(c1 - c0 for _, c0, c1 in runs)
        stored = crcfold.pad_left([store.crc[b, c0:c1, q] for b, c0, c1 in runs], width)
        s = crcfold.shift(cb)
        return crcfold.horner(passes, s) == crcfold.horner(stored, s)

    # ------------------------------------------------------------------ fetch

    def compatible(self, other: Group) -> list[str]:
        """Why ``other``'s blocks cannot receive this group's (empty: they can)."""
        a, b = self.layout, other.layout
        diff = [f for f in ("num_layers", "block_bytes", "chunk_bytes", "block_slots")
                if getattr(a, f) != getattr(b, f)]
        if self.n != other.n:
            diff.append("world_size")
        if not diff and self.slotted and not np.array_equal(self.store.slot_map, other.store.slot_map):
            diff.append("slot_map")
        return diff

    def fetch(self, rank: int, blocks: list[int], tokens: int, dst: Group, dst_rank: int,
              dst_session: str, dst_blocks: list[int]) -> FetchResult:
        """Write rank ``rank``'s protected bytes of ``blocks`` (covering ``tokens``
        slots, block i holding slots [i*S, (i+1)*S)) into ``dst_blocks`` of rank
        ``dst_rank`` of ``dst``. Read from the rank's kept memory when its bytes
        pass their checksums, else decoded from the other ranks and parity. Every
        delivered block is checked against the encode-time checksums; blocks that
        cannot be delivered are reported, and their destination is left as it was.
        The caller checked ``ended()`` and ``compatible()``."""
        started = time.perf_counter()
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        if not 0 <= rank < self.n:
            raise UnknownRank(self.name, rank, f"is outside 0..{self.n - 1}")
        for b in blocks:
            if b >= lay.num_blocks:
                raise BlockOutOfRange(self.name, rank, b, f"outside 0..{lay.num_blocks - 1}")
        for b in dst_blocks:
            if b >= dst.layout.num_blocks:
                raise BlockOutOfRange(dst.name, dst_rank, b, f"outside 0..{dst.layout.num_blocks - 1}")
        slots = lay.block_slots
        if slots and tokens > len(blocks) * slots:
            raise InvalidRequest(f"{tokens} tokens do not fit in {len(blocks)} blocks of {slots} slots")
        with self.lock:
            held = {q: (x.view, x.addr) for q, x in self.ranks.items() if x.view is not None}
        with dst.lock:
            target = dst.check_session(dst_rank, dst_session)
            if target.state != ALIVE or target.view is None:
                raise WrongState(dst.name, dst_rank, f"rank is {target.state}: cannot receive a fetch")
            tview, taddr = target.view, target.addr  # keep the mapping alive while we write
        out = FetchResult(rebuilt=rank not in held)
        addr = {q: a for q, (_, a) in held.items()}

        def src_at(q: int, layer: int, b: int, c: int) -> int:
            if q >= self.n:
                return self._paddr(layer, b, q - self.n, c * cb)
            return self._addr(addr[q], layer, b, c * cb)

        with self.io_lock, dst.io_lock:
            for i, (b, db) in enumerate(zip(blocks, dst_blocks, strict=True)):
                need = min(slots, tokens - i * slots) if slots else 0
                if slots and need <= 0:
                    continue
                ok = bool((store.chunk_step[b] >= 0).all()) and (not slots or store.fill[b] >= need)
                if not ok or any((b, c) in self.broken for c in range(lay.chunks)):
                    out.unrecoverable_blocks.append(b)
                    continue
                delivered = True
                for c in range(lay.chunks):
                    dst_addrs = [dst._addr(taddr, layer, db, c * cb) for layer in range(lay.num_layers)]
                    if rank in held and self._crc(addr[rank], b, c) == store.crc[b, c, rank]:
                        for layer in range(lay.num_layers):  # the kept bytes are good: copy them
                            ctypes.memmove(dst_addrs[layer], src_at(rank, layer, b, c), cb)
                        continue
                    bad = {q for q in held if self._crc(addr[q], b, c) != store.crc[b, c, q]}
                    out.corrupt_chunks += len(bad)
                    erased = tuple(sorted({q for q in range(self.n) if q not in held} | bad | {rank}))
                    if len(erased) > self.m:
                        delivered = False
                        break
                    sources, tables = self._rebuild_plan(erased, (rank,))
                    for layer in range(lay.num_layers):
                        encode_raw(tables, cb, [src_at(q, layer, b, c) for q in sources], [dst_addrs[layer]])
                    out.rebuilt = True
                    if self._crc_at(dst_addrs, int(store.fill[b]) if slots else 0) != store.crc[b, c, rank]:
                        delivered = False
                        break
                if delivered:
                    out.fetched_bytes += lay.block_bytes * lay.num_layers
                else:
                    out.unrecoverable_blocks.append(b)
        del tview
        out.seconds = time.perf_counter() - started
        with self.lock:
            self.metrics.fetches.labels(self.name, "ok" if not out.unrecoverable_blocks else "partial").inc()
            self.metrics.fetch_seconds.labels(self.name).observe(out.seconds)
            self.metrics.fetched_bytes.labels(self.name).inc(out.fetched_bytes)
        return out

    def close(self) -> None:
        """Stop and forget every mapping (Drop)."""
        self.stop()
        with self.lock:
            for r in self.ranks.values():
                if r.outbox is not None:
                    r.outbox.put(None)
                r.unmap()

    # ------------------------------------------------------------------ scrub

    def scrub(self) -> ScrubResult:
        """Compare every protected chunk's live bytes with its checksums and its
        stored parity with a fresh encode. Needs every rank alive, or, for an
        ended group, checks the kept (detached) ranks' bytes only."""
        with self.lock:
            alive = all(self.ranks.get(q) is not None and self.ranks[q].state == ALIVE for q in range(self.n))
            if not alive and not self.ended():
                raise WrongState(self.name, None, "scrub needs every rank alive (or none: an ended group)")
            views = {q: (r.view, r.addr) for q, r in self.ranks.items() if r.view is not None}
        lay, store, cb = self.layout, self.store, self.layout.chunk_bytes
        out = ScrubResult(parity_checked=alive)
        bad_blocks: set[int] = set()
        bad_ranks: set[int] = set()
        with self.io_lock:
            for block in range(lay.num_blocks):
                for c in np.flatnonzero(store.chunk_step[block] >= 0):
                    out.chunks_checked += 1
                    bad = [q for q in views if self._crc(views[q][1], block, c) != store.crc[block, c, q]]
                    if bad:
                        out.checksum_mismatches += 1
                        bad_blocks.add(block)
                        bad_ranks.update(bad)
                    if not alive:
                        continue
                    s, e = c * cb, (c + 1) * cb
                    keep = (slice(None) if not self.slotted or store.fill[block] >= lay.block_slots
                            else ~self._mask(int(store.fill[block])))
                    for layer in range(lay.num_layers):
                        fresh = self.code.encode([self._shard(views[q][0], layer, block, s, e) for q in range(self.n)])
                        if not np.array_equal(fresh[:, keep], store.parity[layer, :, block, s:e][:, keep]):
                            out.parity_mismatches += 1
                            bad_blocks.add(block)
                            break
        out.bad_blocks, out.bad_ranks = sorted(bad_blocks), sorted(bad_ranks)
        if out.checksum_mismatches:
            self.metrics.corruption.labels(self.name).inc(out.checksum_mismatches)
        return out

    # ------------------------------------------------------------------ status

    def newest_step(self) -> int:
        return max([r.committed for r in self.ranks.values()] + [self.protected_step])

    def _update_lag(self) -> None:
        self.metrics.lag_steps.labels(self.name).set(self.newest_step() - self.protected_step)

    def _update_gauges(self) -> None:
        lay = self.layout
        chunks = self.store.protected_chunks()
        per_chunk = lay.chunk_bytes * lay.num_layers
        self.metrics.protected_bytes.labels(self.name).set(chunks * per_chunk * self.n)
        self.metrics.parity_bytes.labels(self.name).set(chunks * per_chunk * self.m)
        states = [r.state for r in self.ranks.values()]
        for state in STATES:
            self.metrics.ranks.labels(self.name, state).set(states.count(state))
        ended = self._ended or self.ended_at is not None
        # an ended engine gets no replacement: it is kept for a resume, not degraded
        self.metrics.degraded.labels(self.name).set(
            1 if not ended and any(s in (LOST, REPLACING) for s in states) else 0)
        self.metrics.ended.labels(self.name).set(1 if ended else 0)
        self._update_lag()

    def degraded(self) -> bool:
        return any(r.state in (LOST, REPLACING) for r in self.ranks.values())

    def _broadcast(self, item: tuple) -> None:
        for r in self.ranks.values():
            if r.outbox is not None and r.state != LOST:
                r.outbox.put(item)
