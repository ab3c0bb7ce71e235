"""The daemon's registry of groups: registration checks, the failure detector
(``gs-pids``), the janitor of ended groups, and the calls that span groups
(Lookup, Fetch, Reclaim, Drop, Status). It speaks the types of
:mod:`ghostserve.daemon.calls`; the wire is :mod:`ghostserve.daemon.service`'s.

Shared memory is given back when an engine ends: at once when every rank said
goodbye (a clean shutdown), after ``ended_ttl`` for an engine that ended by
failure (kept that long for a resume), or earlier, oldest first, when a new
registration needs the room. Every group's parity and request index live in
named shared memory, so a daemon that is SIGKILLed and started again re-attaches
them (:meth:`Daemon.reattach`) and loses nothing protected.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

import numpy as np
import psutil
from prometheus_client import CollectorRegistry

from ghostserve import shm
from ghostserve.config import Config
from ghostserve.daemon import datapath
from ghostserve.daemon.calls import (
    FetchCall,
    GroupView,
    LookupHit,
    Notice,
    NoticeKind,
    Registered,
    Registration,
)
from ghostserve.daemon.datapath import DataPath, RegionSpec
from ghostserve.daemon.group import EndReason, Group, open_group
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.offnode.mirror import STORE_GROUP, Mirror
from ghostserve.daemon.offnode.objects import KeySpace
from ghostserve.daemon.pidwatch import PidWatch
from ghostserve.daemon.recovery import FetchResult
from ghostserve.daemon.store import ParityStore
from ghostserve.daemon.watch import Subscription, Watchers
from ghostserve.errors import (
    BlockOutOfRange,
    ForeignStore,
    GhostServeError,
    InvalidRequest,
    RegionInUse,
    RegionRefused,
    ResourceExhausted,
    UnknownGroup,
    WrongState,
)
from ghostserve.metrics import Metrics

log = logging.getLogger("ghostserve.daemon")

_GROUP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# names of the daemon's own segments under its prefix (ParityStore, RequestIndex, PrefixLock)
_OWN_SUFFIXES = (".meta", ".parity", ".index", ".index-wal", ".index-shm", ".index-journal", ".lock")


class DropReason(StrEnum):
    """Why a group was dropped (the ``reason`` label of ``ghostserve_groups_dropped_total``)."""

    CLEAN = "clean"        # every rank said goodbye
    TTL = "ttl"            # ended by failure longer than --ended-ttl ago
    SPACE = "space"        # /dev/shm was short of what a new registration needed
    OPERATOR = "operator"  # ghostserve drop


class Daemon:
    """Groups by name, the pid watcher and the janitor of ended groups. Thread-safe.

    ``shm_free`` reports the bytes ``/dev/shm`` can still take (injected by tests,
    which cannot fill the real one); ``cuda_runtime`` is CUDA's (None: the real
    one, CuPy, loaded on the first CUDA region; tests inject a stand-in)."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 shm_free: Callable[[], int] = shm.free_bytes, cuda_runtime: Any = None):
        self.config = config
        self.cuda_runtime = cuda_runtime
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="gs-encode")
        self.groups: dict[str, Group] = {}
        self.lock = threading.RLock()  # the janitor drops groups from inside register
        self.shm_free = shm_free
        self.draining = False
        self._stop = threading.Event()
        self._procs: dict[int, psutil.Process] = {}
        self._pids = PidWatch()
        self._watcher = threading.Thread(target=self._watch_pids, name="gs-pids", daemon=True)
        self.watchers = Watchers()
        self.node = config.node or socket.gethostname()
        self.mirror: Mirror | None = None
        if config.store:  # Mooncake is imported by the mirror's thread, never without --store
            from ghostserve.daemon.offnode.store import open_store
            from ghostserve.extras import require
            require("mooncake", "ghostserve serve --store")
            self.mirror = Mirror(functools.partial(open_store, config.store, config.store_address,
                                                   config.store_segment_bytes), config, self.metrics)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.reattach()
        self._watcher.start()
        if self.mirror is not None:
            self.mirror.start()

    def reattach(self) -> None:
        """Re-open every group left in shared memory by an earlier daemon."""
        for name in ParityStore.groups(self.config.shm_prefix):
            try:
                store = ParityStore.open(self.config.shm_prefix, name)
            except ForeignStore:
                continue  # a daemon with a longer prefix (e.g. chaos under ours) owns it
            except (ValueError, FileNotFoundError, KeyError, sqlite3.Error) as exc:
                log.warning("skipping incomplete group %s: %s", name, exc)
                continue
            try:
                group = self._new_group(name, store)
            except GhostServeError as exc:  # a CUDA group on a daemon that has no GPU now
                log.warning("cannot re-attach group %s: %s", name, exc)
                store.close()
                continue
            group.attach_detached(store.manifest.get("ranks", {}))
            log.info("re-attached group %s at protected step %d", name, store.protected_step)
            # workers that ended while no daemon watched them (or whose pid is now another process's)
            group.forget_dead(self._process_alive)
        self._expire()  # a crash between an engine's goodbye and its drop

    def _new_group(self, name: str, store: ParityStore) -> Group:
        group = open_group(name, store, self.metrics, self.pool, self.config, self.cuda_runtime)
        self.groups[name] = group
        group.on_change = self._pids.kick  # new pids and ended engines: the watcher looks again
        group.on_notice = self.watchers.publish
        if self.mirror is not None:
            group.on_watermarks = self.mirror.kick
        group.start()
        return group

    def stop(self) -> None:
        self.draining = True
        self._stop.set()
        self._pids.kick()
        self.watchers.close()
        for group in list(self.groups.values()):
            group.stop()
        if self.mirror is not None:
            self.mirror.close()
        self.pool.shutdown(wait=True)

    def end_streams(self) -> None:
        """Drain: end every worker stream (ranks stay registered, detached; parity stays)."""
        self.draining = True
        self.watchers.close()  # watches end now, not when the drain's grace runs out
        for group in list(self.groups.values()):
            group.end_streams()

    def group(self, name: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            raise UnknownGroup(name)
        return group

    def _watch_pids(self) -> None:
        """The ``gs-pids`` thread: a rank whose pid is gone is lost (its stream
        may outlive it briefly); ended groups are dropped, clean ones at once,
        failed ones when their ``ended_ttl`` runs out. It sleeps in
        :meth:`PidWatch.wait` until a worker ends, a group changes (``on_change``)
        or the next expiry is due; every ``pid_poll_seconds`` only where the
        kernel gives no pidfds."""
        try:
            while not self._stop.is_set():
                self._pids.sync(pid for g in list(self.groups.values()) for _, pid in g.watched_pids())
                timeout = self._next_expiry()
                if not self._pids.events:
                    timeout = min(timeout, self.config.pid_poll_seconds) if timeout is not None \
                        else self.config.pid_poll_seconds
                gone = self._pids.wait(timeout)
                if self._stop.is_set():
                    break
                for group in list(self.groups.values()):
                    for rank, pid in group.watched_pids():
                        if pid in gone or (not self._pids.events and not self._alive(pid)):
                            group.mark_lost(rank, "pid_gone")
                self._expire()
        finally:
            self._pids.close()

    def _next_expiry(self) -> float | None:
        """Seconds until the first failure-ended group's ``ended_ttl`` runs out (None: none)."""
        ends = [g.ended_at for g in list(self.groups.values())
                if g.end_reason == EndReason.FAILURE and g.ended_at is not None]
        return max(0.0, min(ends) + self.config.ended_ttl - time.time()) if ends else None

    # ---------------------------------------------------------------- janitor

    def _expire(self) -> None:
        """Drop cleanly ended groups, and failure-ended ones older than ``ended_ttl``."""
        now = time.time()
        for g in list(self.groups.values()):
            if g.end_reason == EndReason.CLEAN:
                self.drop_group(g, DropReason.CLEAN)
            elif g.end_reason == EndReason.FAILURE and now - (g.ended_at or now) >= self.config.ended_ttl:
                self.drop_group(g, DropReason.TTL)

    def make_room(self, need: int) -> list[str]:
        """Drop failure-ended groups, oldest first, until ``need`` bytes of
        shared memory are free (or none is left to drop). Returns their names."""
        dropped: list[str] = []
        with self.lock:
            ended = sorted((g for g in self.groups.values() if g.end_reason == EndReason.FAILURE),
                           key=lambda g: g.ended_at or 0.0)
            for g in ended:
                if self.shm_free() >= need:
                    break
                self.drop_group(g, DropReason.SPACE)
                dropped.append(g.name)
        return dropped

    def drop_group(self, g: Group, reason: DropReason, unlink_regions: bool | None = None) -> int:
        """Forget ``g`` and give back its shared memory: parity, metadata, index,
        and the ranks' regions (those that said goodbye with ``release_region``;
        all of them for an engine that ended by failure and is given up on, unless
        ``unlink_regions`` says otherwise). Returns the bytes released. Idempotent."""
        if unlink_regions is None:
            unlink_regions = reason in (DropReason.TTL, DropReason.SPACE)
        # under the registry's lock throughout: no registration can reach the group
        # half dropped, and once it is out of the registry its memory is given back
        with self.lock:
            if self.groups.get(g.name) is not g:
                return 0
            regions = g.shm_regions(every=unlink_regions)
            held = g.store_bytes()
            g.close()
            ParityStore.destroy(self.config.shm_prefix, g.name)
            for name, ident in regions:
                size = shm.used_bytes(name)
                if shm.unlink_if(name, ident):
                    held += size
            self.groups.pop(g.name)
        self.metrics.forget_group(g.name)
        if self.mirror is not None:
            self.mirror.forget_group(g.name)
        self.watchers.publish(Notice(NoticeKind.GROUP_DROPPED, g.name, -1, "dropped", detail=str(reason)))
        self.metrics.groups_dropped.labels(reason).inc()
        self.metrics.dropped_bytes.labels(reason).inc(held)
        log.info("dropped group %s (%s): %d bytes of shared memory given back%s", g.name, reason, held,
                 f", {len(regions)} regions unlinked" if regions else "")
        return held

    def held_bytes(self, g: Group) -> int:
        """Shared memory ``g`` holds: its store, and for an ended engine the kept regions."""
        held = g.store_bytes()
        if g.ended():
            held += sum(shm.used_bytes(name) for name in g.kept_regions())
        return held

    def _process_alive(self, pid: int, start: float) -> bool:
        """Is the process ``pid`` that started at ``start`` (0: unknown) still running?
        A pid can be reused once its process has ended: a different start time is
        another process."""
        if not self._alive(pid):
            return False
        return not start or abs(self._start_time(pid) - start) < 0.01

    def _start_time(self, pid: int) -> float:
        """The start time of process ``pid`` (0 if unknown)."""
        try:
            return psutil.Process(pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0.0

    def _alive(self, pid: int) -> bool:
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            self._procs.pop(pid, None)
            return False
        except psutil.AccessDenied:
            return True

    # ---------------------------------------------------------------- register

    def register(self, reg: Registration) -> Registered:
        """Register (or re-register) a rank's KV; creates the group on its first
        rank. Everything is checked before anything changes: a refused first
        registration leaves nothing behind."""
        if not _GROUP_NAME.match(reg.group):
            raise InvalidRequest(f"group name {reg.group!r}: use 1-64 of [A-Za-z0-9._-]")
        n, m = reg.world_size, reg.parity
        if n < 1 or m < 1 or n + m > 255:
            raise InvalidRequest(f"code ({n}, {m}): need world_size >= 1, parity >= 1, sum <= 255")
        if reg.rank >= n:
            raise InvalidRequest(f"rank {reg.rank} is outside 0..{n - 1}")
        layout = reg.layout
        problems = layout.problems() or layout.slot_map_problems(reg.slot_map)
        if problems:
            raise InvalidRequest("layout: " + "; ".join(problems))
        if len(reg.regions) != layout.regions:
            raise InvalidRequest(f"{len(reg.regions)} regions given, the layout's extents name {layout.regions}")
        kinds = {s.kind for s in reg.regions}
        if len(kinds) > 1:
            raise InvalidRequest("a rank's regions are all shared memory or all CUDA IPC, not both")
        kind = kinds.pop()
        path = datapath.load(kind)
        for i, spec in enumerate(reg.regions):
            self._check_region(i, spec, layout, path)
        if len({s.name for s in reg.regions}) != len(reg.regions):
            raise InvalidRequest("a region is named twice")
        if reg.pid <= 0 or not self._alive(reg.pid):
            raise InvalidRequest(f"pid {reg.pid} is not a running process")
        if len(reg.namespace) > 256:
            raise InvalidRequest("namespace: at most 256 characters")
        manifest = {"world_size": n, "parity": m, "layout": layout.to_dict(),
                    "keep_survivors": reg.keep_survivors, "namespace": reg.namespace,
                    "shm_prefix": self.config.shm_prefix, "kind": kind, "checksum_width": path.checksum_width}
        with self.lock:
            idents = set()
            for spec in reg.regions:
                try:
                    ident = path.identity(spec)
                except FileNotFoundError:
                    raise InvalidRequest(f"shared memory region {spec.name!r} does not exist") from None
                holder = self._holder(ident, reg.group, reg.rank)
                if holder is not None:
                    raise RegionInUse(spec.name, *holder)
                if ident in idents:
                    raise InvalidRequest(f"region {spec.name!r} is another name of a region given before")
                idents.add(ident)
            known = self.groups.get(reg.group)
            created = known is None
            if known is None:
                need = sum(ParityStore.sizes(layout, n, m, path.checksum_width))
                self.make_room(need)
                try:
                    store = ParityStore.create(self.config.shm_prefix, reg.group, {**manifest, "ranks": {}},
                                               reg.slot_map)
                except OSError as exc:
                    raise ResourceExhausted(f"shared memory for parity: {need} bytes ({exc})") from None
                try:
                    group = self._new_group(reg.group, store)
                except BaseException:  # e.g. no GPU runtime for a CUDA group: leave nothing
                    store.close()
                    ParityStore.destroy(self.config.shm_prefix, reg.group)
                    self.metrics.forget_group(reg.group)
                    raise
            else:
                group = known
                conflict = group.conflict(manifest, reg.slot_map)
                if conflict:
                    raise InvalidRequest(conflict)
                # a holder of this rank whose process is gone: its death, now
                group.forget_dead(self._process_alive, [reg.rank])
            try:
                role, session = group.register(reg.rank, reg.pid, tuple(reg.regions), reg.last_step,
                                               self._start_time(reg.pid))
            except GhostServeError:
                if created:  # leave nothing behind for a refused first registration
                    self.groups.pop(reg.group)
                    group.close()
                    ParityStore.destroy(self.config.shm_prefix, reg.group)
                    self.metrics.forget_group(reg.group)
                raise
        return Registered(role, session, group.protected_step)

    def _check_region(self, i: int, spec: RegionSpec, layout: Layout, path: type[DataPath[Any]]) -> None:
        """Region ``i`` of a registration: big enough for the layout, well formed
        for its data path, and, for named shared memory, the engine's KV: not a
        segment of the daemon's own (parity, metadata, index, lock), and under
        ``region_prefix`` if set."""
        if spec.size < layout.region_bytes(i):
            raise InvalidRequest(f"region {i} of {spec.size} bytes is smaller than the layout "
                                 f"needs ({layout.region_bytes(i)})")
        try:
            path.check(spec)
        except ValueError as exc:
            raise InvalidRequest(f"region {i}: {exc}") from None
        if not path.shm_names:
            return
        prefix = self.config.shm_prefix
        if spec.name.startswith(prefix) and spec.name.endswith(_OWN_SUFFIXES):
            raise RegionRefused(spec.name, "names a segment of the daemon's own (parity, metadata, "
                                "index or lock), not an engine's KV")
        if self.config.region_prefix and not spec.name.startswith(self.config.region_prefix):
            raise RegionRefused(spec.name, f"outside the daemon's --region-prefix "
                                f"{self.config.region_prefix!r}")

    def _holder(self, ident: tuple[int, int], group: str, rank: int) -> tuple[str, int] | None:
        """(group, rank) of another rank that holds the memory ``ident`` mapped."""
        for g in list(self.groups.values()):
            with g.lock:
                for r in g.ranks.values():
                    if r.mapped and ident in r.idents and (g.name, r.rank) != (group, rank):
                        return g.name, r.rank
        return None

    def reclaim(self, nbytes: int) -> tuple[int, list[str]]:
        """Make room for ``nbytes`` of new shared memory; (free bytes after, groups dropped)."""
        dropped = self.make_room(nbytes)
        return self.shm_free(), dropped

    # ---------------------------------------------------------------- resume

    def lookup(self, tokens: np.ndarray, namespace: str) -> LookupHit | None:
        """The ended group of ``namespace`` whose protected KV covers the longest
        prefix of ``tokens`` (only ended engines' KV is settled)."""
        best: tuple[Group, tuple[str, int, list[int]]] | None = None
        for g in list(self.groups.values()):
            if not g.slotted or g.namespace != namespace or not g.ended():
                continue
            hit = g.match(tokens)
            if hit is not None and (best is None or hit[1] > best[1][1]):
                best = (g, hit)
        if best is None:  # another node's KV, mirrored into the store?
            if self.mirror is None:
                return None
            spaces = {KeySpace.of(g.namespace, g.layout, g.n) for g in list(self.groups.values())
                      if g.slotted and g.namespace == namespace}
            started = time.perf_counter()
            stored = self.mirror.lookup(tokens, sorted(spaces, key=lambda s: s.prefix))
            if stored is not None:
                log.info("lookup: %d of %d tokens in the store (%s) in %.4f s", stored.tokens, len(tokens),
                         stored.group, time.perf_counter() - started)
            return stored
        g, (request_id, n, blocks) = best
        return LookupHit(g.name, request_id, n, blocks, g.layout.block_slots)

    def fetch(self, call: FetchCall) -> FetchResult:
        """Deliver an ended group's blocks into a registered rank's (:meth:`Group.fetch`),
        or a store hit's (:meth:`Mirror.fetch`)."""
        if call.source_group.startswith(STORE_GROUP) and self.mirror is not None:
            if len(call.source_blocks) != len(call.blocks):
                raise InvalidRequest(f"{len(call.source_blocks)} source blocks but {len(call.blocks)} destination blocks")
            dst = self.group(call.group)
            for b in call.blocks:
                if b >= dst.layout.num_blocks:
                    raise BlockOutOfRange(dst.name, call.rank, b, f"outside 0..{dst.layout.num_blocks - 1}")
            out = self.mirror.fetch(call, dst)
            log.info("fetch: %s rank %d <- the store (%s rank %d): %d blocks, %d bytes in %.4f s%s", dst.name,
                     call.rank, call.source_group, call.source_rank, len(call.blocks), out.fetched_bytes, out.seconds,
                     f", {len(out.unrecoverable_blocks)} blocks missing or corrupt" if out.unrecoverable_blocks else "")
            return out
        src, dst = self.group(call.source_group), self.group(call.group)
        if src is dst:
            raise InvalidRequest("source_group and group are the same group")
        if not src.ended():
            raise WrongState(src.name, None, "a group with live ranks cannot be fetched from")
        if len(call.source_blocks) != len(call.blocks):
            raise InvalidRequest(f"{len(call.source_blocks)} source blocks but {len(call.blocks)} destination blocks")
        diff = src.stripes.compatible(dst.stripes)
        if diff:
            raise InvalidRequest(f"groups {src.name!r} and {dst.name!r} differ in {', '.join(diff)}")
        out = src.fetch(call.source_rank, call.source_blocks, call.tokens, dst, call.rank, call.session,
                        call.blocks)
        # one line per rank and request resumed: the metrics' series go with the dropped group
        log.info("fetch: %s rank %d <- %s rank %d: %d blocks, %d bytes in %.4f s%s%s", dst.name, call.rank, src.name,
                 call.source_rank, len(call.blocks), out.fetched_bytes, out.seconds,
                 " (rebuilt from parity)" if out.rebuilt else "",
                 f", {len(out.unrecoverable_blocks)} blocks unrecoverable" if out.unrecoverable_blocks else "")
        return out

    def release(self, group: str, rank: int, session: str, step: int, requests: list[str],
                blocks: list[int]) -> None:
        self.group(group).release(rank, session, step, requests, blocks)

    def drop(self, group: str, unlink_regions: bool) -> int:
        """Operator Drop: forget an ended group; the bytes released."""
        with self.lock:
            g = self.group(group)
            if not g.ended():
                raise WrongState(g.name, None, "only a group with no rank alive can be dropped")
            return self.drop_group(g, DropReason.OPERATOR, unlink_regions=unlink_regions)

    # ---------------------------------------------------------------- status

    def watch(self, group: str) -> Subscription:
        """A new watcher of ``group`` (every group if empty): first a snapshot of
        each, then what happens. The caller ends it with ``watchers.unsubscribe``."""
        groups = [self.group(group)] if group else list(self.groups.values())
        sub = self.watchers.subscribe(group)  # first: nothing after the snapshots is missed
        for g in groups:
            sub.put(g.snapshot())
        return sub

    def status(self, name: str = "") -> list[GroupView]:
        """A view of group ``name`` (every group if empty), with the memory each holds."""
        out = []
        for g in [self.group(name)] if name else list(self.groups.values()):
            v = g.view()
            expires = 0.0
            if g.end_reason == EndReason.FAILURE:
                expires = max(0.0, self.config.ended_ttl - v.ended_seconds)
            mirrored, remote = self.mirror.view(g.name) if self.mirror is not None else (-1, 0)
            out.append(dataclasses.replace(v, held_bytes=self.held_bytes(g), expires_seconds=expires,
                                           mirrored_step=mirrored, remote_bytes=remote))
        return out


__all__ = ["Daemon", "DropReason"]
