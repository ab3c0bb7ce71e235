"""The mirror: a daemon's protected KV copied into other nodes' store segments.

:class:`Mirror` owns everything off-node: its thread, the store client, which
keys this node holds for which (group, request), the lookups it answered, and
what it reports. Groups tell it that a step was protected
(:meth:`Mirror.kick`, from their encoder thread, never blocking); the mirror's
thread then asks each such group for a snapshot (:meth:`Group.mirror_view`) and
copies every full block of every request with at least ``mirror_min_tokens``
protected tokens that is not off-node yet: each rank's shard, read under the
group's I/O lock and checked against the checksum recorded when it was encoded
(:meth:`Group.read_protected`), into one object per rank on another node's
segment. A request's blocks go in order, so what is off-node is always a
prefix; a request the group no longer holds (finished, released, its group
dropped) has its objects removed unless another request of this node holds
the same keys.

Nothing here delays a step or an ack. When the store is down, full, or places
a replica on this node's own segment, the block is not counted as mirrored; the
mirror reports it (metrics, status: the newest step whose blocks are all
off-node, and the lag behind protection), backs off, and catches up later. When
more than ``mirror_backlog_blocks`` blocks wait, the oldest requests' mirroring
is dropped (counted): local protection never depends on the store.

``Lookup`` on a node whose own index misses asks :meth:`Mirror.lookup`: the
longest prefix of full blocks whose objects exist for every rank. The answer
names a pseudo-group ``store:<id>`` with the prefix's block positions as its
blocks; ``Fetch`` from it (:meth:`Mirror.fetch`) reads each object, checks its
header and CRC32C and writes it into the new rank's block; an object missing or
corrupt is reported unrecoverable (the engine recomputes it), never written.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ghostserve.codec.isal import crc32c
from ghostserve.config import Config
from ghostserve.daemon.calls import FetchCall, LookupHit
from ghostserve.daemon.offnode.objects import BlockObject, KeySpace
from ghostserve.daemon.offnode.store import PutOutcome, RemoteStore
from ghostserve.daemon.recovery import FetchResult, FetchSource
from ghostserve.errors import GhostServeError, StoreError, UnknownGroup
from ghostserve.metrics import Metrics

if TYPE_CHECKING:
    from ghostserve.daemon.group import Group

log = logging.getLogger("ghostserve.mirror")

STORE_GROUP = "store:"       # Lookup's answer for a store hit: "store:<id>"
_HITS_KEPT = 4096            # store lookups a Fetch may still name
_SEGMENTS_TTL = 2.0          # seconds a listing of the store's segments is trusted


def _crc(buf: np.ndarray) -> int:
    return crc32c(buf.ctypes.data, buf.nbytes, 0)


@dataclass
class _Request:
    """What this node mirrored of one request of one group."""

    chain: list[str] = field(default_factory=list)     # hashes of its full blocks known so far
    last: list[int] = field(default_factory=list)       # the tokens of the chain's last block
    stored: int = 0                                     # leading blocks off-node for every rank
    keys: dict[str, int] = field(default_factory=dict)  # keys it holds -> object bytes
    dropped: bool = False                               # given up (backlog): never mirrored again


@dataclass
class _GroupMirror:
    space: KeySpace
    requests: dict[str, _Request] = field(default_factory=dict)
    group: Any = None          # the Group (to look at it again after the store lost objects)
    mirrored_step: int = -1
    complete: bool = False     # every full block seen is off-node (or given up)
    buffers: list[np.ndarray] = field(default_factory=list)   # one per rank, reused


@dataclass(frozen=True)
class _Hit:
    space: KeySpace
    chain: list[str]


class Mirror:
    """See the module doc. ``connect`` joins the store (a :class:`RemoteStore`
    factory); it is retried from the mirror's thread until it works, so a daemon
    starts even while the store's master is down."""

    def __init__(self, connect: Any, config: Config, metrics: Metrics):
        self._connect = connect
        self.min_tokens = config.mirror_min_tokens
        self.backlog_limit = config.mirror_backlog_blocks
        self.retry_seconds = config.store_retry_seconds
        self.metrics = metrics
        self.store: RemoteStore | None = None
        self._cond = threading.Condition()
        self._dirty: dict[str, Group] = {}
        self._groups: dict[str, _GroupMirror] = {}        # the mirror thread's, read under _cond
        self._holders: dict[str, set[tuple[str, str]]] = {}
        self._removals: collections.deque[str] = collections.deque()
        self._hits: collections.OrderedDict[str, _Hit] = collections.OrderedDict()
        self._segments: tuple[float, list[str]] = (0.0, [])
        self._shunned: dict[str, float] = {}   # segment -> until when a failed put keeps it out
        self._said: dict[str, PutOutcome] = {}  # group -> the refusal last logged at WARNING
        self._backoff_until = 0.0
        # the store failed since the last audit: it may have restarted and forgotten every object
        self._suspect = False
        self._audit_at = 0.0
        self._remove_at = 0.0     # removals that met a lease wait until then
        self._stopped = False
        self.metrics.store_up.set(0)
        self._thread = threading.Thread(target=self._loop, name="gs-mirror", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------------ from groups

    def kick(self, group: Group, changed: dict[str, int]) -> None:
        """``group`` protected a step whose watermarks ``changed`` (its encoder
        thread, under its lock; must not block): look again if a request gained a
        full block worth mirroring or was dropped, else the group's mirror is as
        current as its protection."""
        slots = group.layout.block_slots
        with self._cond:
            gm = self._groups.get(group.name)
            have = gm.requests if gm is not None else {}
            due = gm is None or not gm.complete or any(
                (t == 0 and r in have) or (t >= self.min_tokens and t // slots > (have[r].stored if r in have else 0))
                for r, t in changed.items())
            if due:
                if gm is not None or any(t >= self.min_tokens for t in changed.values()):
                    self._dirty[group.name] = group
                    self._cond.notify()
            elif gm is not None:
                gm.mirrored_step = group.protected_step
                self.metrics.mirror_lag_steps.labels(group.name).set(0)

    def forget_group(self, name: str) -> None:
        """``name`` was dropped: its requests' objects go (unless held by another)."""
        with self._cond:
            self._dirty.pop(name, None)
            gm = self._groups.pop(name, None)
            if gm is not None:
                for req in list(gm.requests):
                    self._release(name, gm, req)
                self._cond.notify()

    def view(self, name: str) -> tuple[int, int]:
        """(newest step whose blocks are all off-node, bytes held remotely) of group ``name``."""
        with self._cond:
            gm = self._groups.get(name)
            if gm is None:
                return -1, 0
            return gm.mirrored_step, sum(sum(r.keys.values()) for r in gm.requests.values())

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._work_due():
                    self._cond.wait(self._wait_time())
                if self._stopped:
                    return
            if self.store is None and not self._join():
                continue
            if time.monotonic() < self._backoff_until:
                continue
            if self._suspect or time.monotonic() >= self._audit_at:
                try:
                    self._audit()
                except StoreError as exc:
                    self._store_failed("exists", exc)
                    continue
            with self._cond:
                dirty, self._dirty = self._dirty, {}
            for g in dirty.values():
                try:
                    self._scan(g)
                except StoreError as exc:
                    self._store_failed("put", exc)
                    with self._cond:
                        self._dirty.setdefault(g.name, g)  # again once the store is back
                    break
                except Exception:  # a bug: never take the daemon down for a mirror
                    log.exception("mirroring group %s failed", g.name)
            self._remove_due()

    def _work_due(self) -> bool:
        now = time.monotonic()
        if now < self._backoff_until:
            return False
        return (self.store is None or bool(self._dirty) or (bool(self._removals) and now >= self._remove_at)
                or self._suspect or (bool(self._holders) and now >= self._audit_at))

    def _wait_time(self) -> float | None:
        now = time.monotonic()
        if self.store is None or self._suspect or now < self._backoff_until:
            return max(0.05, min(self.retry_seconds, self._backoff_until - now))
        due = [t for t, want in ((self._remove_at, bool(self._removals)), (self._audit_at, bool(self._holders)))
               if want]
        return max(0.05, min(due) - now) if due else None

    def _audit(self) -> None:
        """Are the objects this node counts as off-node still in the store? A
        master without HA that restarted has forgotten every object: the requests
        go back to their first missing block, and are mirrored again."""
        assert self.store is not None
        self._audit_at = time.monotonic() + 5 * self.retry_seconds
        with self._cond:
            held = list(self._holders)
        have = dict(zip(held, self.store.exists(held), strict=True)) if held else {}
        lost = 0
        with self._cond:
            for name, gm in self._groups.items():
                for req, rm in gm.requests.items():
                    n = gm.space.world_size
                    first = next((i for i in range(rm.stored)
                                  if not all(have.get(gm.space.key(rm.chain[i], q), True) for q in range(n))), None)
                    if first is None:
                        continue
                    for i in range(first, rm.stored):
                        for q in range(n):
                            key = gm.space.key(rm.chain[i], q)
                            rm.keys.pop(key, None)
                            holders = self._holders.get(key)
                            if holders is not None:
                                holders.discard((name, req))
                                if not holders:
                                    del self._holders[key]
                    lost += rm.stored - first
                    rm.stored = first
                    gm.complete = False
                    if gm.group is not None:
                        self._dirty[name] = gm.group
        if lost:
            log.warning("the store lost %d mirrored blocks (a master restarted without HA?): mirroring them again",
                        lost)
            self.metrics.store_errors.labels("lost").inc(lost)
        self._suspect = False
        self.metrics.store_up.set(1)

    def _join(self) -> bool:
        try:
            self.store = self._connect()
        except GhostServeError as exc:  # StoreError; a ConfigError of the URL was caught at start
            log.warning("joining the store failed (%s); mirroring waits, local protection goes on", exc)
            self.metrics.store_errors.labels("join").inc()
            self._backoff_until = time.monotonic() + self.retry_seconds
            return False
        self.metrics.store_up.set(1)
        self._backoff_until = 0.0
        self._audit_at = time.monotonic() + 5 * self.retry_seconds
        return True

    def _store_failed(self, op: str, exc: Exception) -> None:
        log.warning("store %s failed: %s; mirroring retries in %.1f s", op, exc, self.retry_seconds)
        self.metrics.store_errors.labels(op).inc()
        self.metrics.store_up.set(0)
        self._suspect = True
        self._backoff_until = time.monotonic() + self.retry_seconds

    # ------------------------------------------------------------------ mirroring

    def _scan(self, g: Group) -> None:
        with self._cond:
            gm = self._groups.get(g.name)
            # requests with full blocks beyond what is off-node (given-up ones: beyond what was seen)
            known = {r: len(x.chain) if x.dropped else x.stored for r, x in gm.requests.items()} if gm else {}
        view = g.mirror_view(self.min_tokens, known)
        if view is None:
            return
        log.debug("mirror scan of %s at step %d: %d requests long enough, %d with new full blocks", g.name,
                  view.protected_step, len(view.present), len(view.requests))
        lay, slots = view.layout, view.layout.block_slots
        todo: list[tuple[str, _Request, list[int]]] = []
        with self._cond:
            if gm is None:
                gm = self._groups[g.name] = _GroupMirror(KeySpace.of(view.namespace, view.layout, view.world_size),
                                                         group=g)
            for req in [r for r in gm.requests if r not in view.present]:
                self._release(g.name, gm, req)
            for req, (tokens, blocks) in view.requests.items():
                rm = gm.requests.setdefault(req, _Request())
                full = len(tokens) // slots
                k = min(len(rm.chain), full)
                if k and tokens[(k - 1) * slots:k * slots] != rm.last:  # preempted, restarted otherwise
                    self._release(g.name, gm, req)
                    rm = gm.requests[req] = _Request()
                if len(rm.chain) < full:
                    rm.chain += gm.space.chain(tokens, len(rm.chain), rm.chain[-1] if rm.chain else "")
                    rm.last = tokens[(full - 1) * slots:full * slots]
                if not rm.dropped and rm.stored < len(blocks):
                    todo.append((req, rm, blocks))
            self._trim_backlog(g.name, todo)
            if todo:  # until this scan ends, the mirror is not as current as protection
                gm.complete = False
        if not gm.buffers:
            gm.buffers = [np.empty(lay.num_layers * lay.block_bytes, dtype=np.uint8) for _ in range(view.world_size)]
        complete = True
        for req, rm, blocks in todo:
            while not rm.dropped and rm.stored < len(blocks):
                if not self._mirror_block(g, gm, req, rm, rm.stored, blocks[rm.stored], view.protected_step):
                    complete = False
                    break
        with self._cond:
            if self._groups.get(g.name) is not gm:  # dropped meanwhile: what it stored goes too
                for req in list(gm.requests):
                    self._release(g.name, gm, req)
                return
            gm.complete = complete
            if complete:
                gm.mirrored_step = max(gm.mirrored_step, view.protected_step)
            else:
                self._dirty.setdefault(g.name, g)   # after the back-off
        self._gauges(g.name, gm, view.protected_step)

    def _trim_backlog(self, group: str, todo: list[tuple[str, _Request, list[int]]]) -> None:
        """Too much waits: give up the oldest requests' mirroring (counted)."""
        waiting = sum(len(b) - rm.stored for _, rm, b in todo if not rm.dropped)
        for req, rm, blocks in todo:
            if waiting <= self.backlog_limit:
                break
            n = len(blocks) - rm.stored
            rm.dropped, waiting = True, waiting - n
            self.metrics.mirror_dropped_blocks.inc(n)
            log.warning("mirror of %s/%s dropped: %d blocks behind (more than --mirror-backlog-blocks %d)",
                        group, req, n, self.backlog_limit)

    def _mirror_block(self, g: Group, gm: _GroupMirror, req: str, rm: _Request, i: int, block: int,
                      as_of: int) -> bool:
        """Copy position ``i`` (block ``block``) of request ``req`` off-node, every rank,
        if the block still holds what it held at step ``as_of`` (the snapshot's)."""
        assert self.store is not None
        lay = g.layout
        if not g.read_protected(block, gm.buffers, as_of):
            log.debug("mirror of %s/%s block %d (%d): not settled", g.name, req, i, block)
            self.metrics.mirror_refused.labels("unsettled").inc()
            return False
        target = self._target()
        for q, buf in enumerate(gm.buffers):
            key = gm.space.key(rm.chain[i], q)
            where = self.store.locate(key)
            if where is not None:
                # the same prefix is in the store already (another request's, or another node's
                # copy that this node resumed from): held by this request too, removed with it
                self._hold(key, g.name, req, rm, 0)
                if not self._is_own(where):
                    rm.keys[key] = self.store.size(key)
                    continue
                # another node's copy on this node's own segment (a request resumed here from it):
                # it does not survive this node, and is not replaced (a remove before a put that
                # fails would lose the only copy). The request's copies are held, to go with it,
                # and its mirroring is given up
                keys = [gm.space.key(h, r) for h in rm.chain for r in range(g.n)]
                for k, there in zip(keys, self.store.exists(keys), strict=True):
                    if there:
                        self._hold(k, g.name, req, rm, 0)
                rm.dropped = True
                self.metrics.mirror_refused.labels(str(PutOutcome.HELD_HERE)).inc()
                log.warning("mirror of %s/%s: its prefix is another node's copy on this node's segment; "
                            "not mirrored (docs/scale-out.md)", g.name, req)
                return False
            if not target:
                return self._refused(g.name, req, i, PutOutcome.NO_ROOM)
            obj = BlockObject(lay.num_layers, lay.block_bytes, lay.block_slots, q, g.n, _crc(buf)).pack(buf.data)
            try:
                outcome = self.store.put(key, obj, target)
            except StoreError:
                # a node that died stays listed until the master's client TTL: try the others meanwhile
                self._shunned[target] = time.monotonic() + 5 * self.retry_seconds
                self._segments = (0.0, [])
                raise
            if outcome != PutOutcome.STORED:
                return self._refused(g.name, req, i, outcome)
            self._hold(key, g.name, req, rm, len(obj))
        rm.stored = i + 1
        self._said.pop(g.name, None)
        self.metrics.mirrored_bytes.labels(g.name).inc(lay.num_layers * lay.block_bytes * g.n)
        return True

    def _hold(self, key: str, group: str, req: str, rm: _Request, nbytes: int) -> None:
        with self._cond:
            self._holders.setdefault(key, set()).add((group, req))
            rm.keys[key] = nbytes

    def _is_own(self, where: list[str]) -> bool:
        assert self.store is not None
        return bool(where) and all(w in self.store.own_names() for w in where)

    def _refused(self, group: str, req: str, i: int, outcome: PutOutcome) -> bool:
        """Block ``i`` of ``req`` is not off-node: count it, back off, look at the segments again."""
        self.metrics.mirror_refused.labels(str(outcome)).inc()
        self._segments = (0.0, [])
        self._backoff_until = time.monotonic() + self.retry_seconds
        say = log.warning if self._said.get(group) != outcome else log.debug  # once, not every retry
        self._said[group] = outcome
        say("mirror of %s/%s block %d refused: %s", group, req, i, outcome)
        return False

    def _target(self) -> str:
        """Another node's segment with the most room ("" if there is none)."""
        assert self.store is not None
        at, names = self._segments
        now = time.monotonic()
        if now - at > _SEGMENTS_TTL:
            segs = [s for s in self.store.segments()
                    if s.name != self.store.segment and self._shunned.get(s.name, 0.0) <= now]
            names = [s.name for s in sorted(segs, key=lambda s: s.used - s.capacity)]
            self._segments = (now, names)
        return names[0] if names else ""

    def _gauges(self, name: str, gm: _GroupMirror, protected: int) -> None:
        with self._cond:
            held = sum(sum(r.keys.values()) for r in gm.requests.values())
        self.metrics.mirror_lag_steps.labels(name).set(protected - gm.mirrored_step if gm.mirrored_step >= 0
                                                       else protected + 1)
        self.metrics.mirror_remote_bytes.labels(name).set(held)

    # ------------------------------------------------------------------ removal

    def _release(self, group: str, gm: _GroupMirror, req: str) -> None:
        """Forget request ``req``; queue its keys no one else holds. Caller holds ``_cond``."""
        rm = gm.requests.pop(req, None)
        if rm is None:
            return
        for key in rm.keys:
            holders = self._holders.get(key)
            if holders is None:
                continue
            holders.discard((group, req))
            if not holders:
                del self._holders[key]
                self._removals.append(key)

    def _remove_due(self) -> None:
        """Remove queued keys; those read recently (a lease) wait for a later pass."""
        if self.store is None:
            return
        with self._cond:
            keys, self._removals = list(self._removals), collections.deque()
        later = []
        for i, key in enumerate(keys):
            with self._cond:
                if key in self._holders:  # held again (the same prefix mirrored anew)
                    continue
            try:
                if not self.store.remove(key):
                    later.append(key)
            except StoreError as exc:
                self._store_failed("remove", exc)
                later += keys[i:]
                break
        with self._cond:
            self._removals.extend(later)
            self._remove_at = time.monotonic() + self.retry_seconds if later else 0.0

    # ------------------------------------------------------------------ resume

    def lookup(self, tokens: np.ndarray, spaces: list[KeySpace]) -> LookupHit | None:
        """The longest prefix of ``tokens`` whose full blocks are in the store for
        every rank, in any of ``spaces`` (the key spaces of this node's engines of
        the asking namespace). Prompts under ``mirror_min_tokens`` are not looked up."""
        store = self.store
        if store is None or len(tokens) < self.min_tokens:
            return None
        best: tuple[int, KeySpace, list[str]] | None = None
        for space in spaces:
            chain = space.chain(tokens)
            if not chain:
                continue
            keys = [space.key(h, q) for h in chain for q in range(space.world_size)]
            try:
                have = np.asarray(store.exists(keys), dtype=bool).reshape(len(chain), space.world_size)
            except StoreError as exc:
                self._store_failed("exists", exc)
                return None
            whole = have.all(axis=1)
            n = len(chain) if whole.all() else int(np.argmin(whole))
            if n and (best is None or n > best[0]):
                best = (n, space, chain[:n])
        if best is None:
            return None
        n, space, chain = best
        hit_id = uuid.uuid4().hex[:16]
        with self._cond:
            self._hits[hit_id] = _Hit(space, chain)
            while len(self._hits) > _HITS_KEPT:
                self._hits.popitem(last=False)
        return LookupHit(STORE_GROUP + hit_id, "", n * space.block_slots, list(range(n)), space.block_slots)

    def fetch(self, call: FetchCall, dst: Group) -> FetchResult:
        """Write the objects of a store hit (``call.source_group``) for rank
        ``call.source_rank`` into ``call.blocks`` of ``dst``'s rank. Each object's
        header must describe this layout and rank and its CRC32C must match: else
        the block is reported unrecoverable and nothing is written there."""
        started = time.perf_counter()
        hit_id = call.source_group[len(STORE_GROUP):]
        with self._cond:
            hit = self._hits.get(hit_id)
        if hit is None:
            raise UnknownGroup(call.source_group)
        store = self.store
        if store is None:
            raise StoreError("the store is not joined")
        lay = dst.layout
        out = FetchResult(source=FetchSource.STORE)
        data_path, mem = dst.receiver(call.rank, call.session)
        buf = np.empty(lay.num_layers * lay.block_bytes, dtype=np.uint8)
        for pos, db in zip(call.source_blocks, call.blocks, strict=True):
            obj = None
            if pos < len(hit.chain):
                try:
                    obj = store.get(hit.space.key(hit.chain[pos], call.source_rank))
                except StoreError as exc:
                    self._store_failed("get", exc)
            if obj is None:
                out.unrecoverable_blocks.append(pos)
                continue
            try:
                head, payload = BlockObject.unpack(obj)
                buf[:] = np.frombuffer(payload, dtype=np.uint8)
                if (head.num_layers, head.block_bytes, head.rank, head.world_size, head.fill) != (
                        lay.num_layers, lay.block_bytes, call.source_rank, hit.space.world_size, lay.block_slots):
                    raise ValueError("its header describes another layout or rank")
                if _crc(buf) != head.crc:
                    raise ValueError("CRC32C mismatch")
            except ValueError as exc:
                log.warning("store object of %s block %d is corrupt (%s): recomputed, not served",
                            call.source_group, pos, exc)
                out.corrupt_chunks += 1
                out.unrecoverable_blocks.append(pos)
                continue
            with dst.stripes.io:
                data_path.write_block(mem, db, buf)
            out.fetched_bytes += buf.nbytes
        out.seconds = time.perf_counter() - started
        self.metrics.store_fetches.labels("ok" if not out.unrecoverable_blocks else "partial").inc()
        self.metrics.store_fetched_bytes.inc(out.fetched_bytes)
        return out


__all__ = ["STORE_GROUP", "Mirror"]
