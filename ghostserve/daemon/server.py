"""The daemon: group registry, failure detector, janitor, gRPC services, and ``serve``.

Request handlers run on the gRPC server's thread pool; each worker stream uses
two threads (one reads commits, one writes acknowledgements). Handlers validate
everything before touching state and turn :class:`GhostServeError` into the
status code of ``status_codes.GRPC_STATUS``, so one bad client never disturbs
the others; any other exception is a daemon bug: logged, answered INTERNAL.

Shared memory is given back when an engine ends: at once when every rank said
goodbye (a clean shutdown), after ``ended_ttl`` for an engine that ended by
failure (kept that long for a resume), or earlier, oldest first, when a new
registration needs the room. The ``gs-pids`` thread watches workers' pids and
expires ended groups.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import signal
import socket as socketlib
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

import ghostserve
from ghostserve import shm
from ghostserve.config import Config
from ghostserve.daemon.commits import CommitRecord
from ghostserve.daemon.datapath import RegionSpec
from ghostserve.daemon.group import EndReason, Group
from ghostserve.daemon.index import Record
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.messages import STREAM_END, SUPERSEDED, Ack, Event
from ghostserve.daemon.pidwatch import PidWatch
from ghostserve.daemon.status_codes import status_for
from ghostserve.daemon.store import ParityStore
from ghostserve.errors import (
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
from ghostserve.v1 import ghostserve_pb2 as pb

log = logging.getLogger("ghostserve.daemon")

_GROUP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SERVICES = ("ghostserve.v1.Worker", "ghostserve.v1.Operator")
# names of the daemon's own segments under its prefix (ParityStore, RequestIndex, PrefixLock)
_OWN_SUFFIXES = (".meta", ".parity", ".index", ".index-wal", ".index-shm", ".index-journal", ".lock")


def region_identity(spec: RegionSpec) -> tuple[int, int]:
    """What makes two regions the same memory: the (device, inode) of a shared
    memory object; the device and IPC allocation, and the offset, of a CUDA one.
    Raises FileNotFoundError for a shared-memory name that does not exist."""
    if spec.kind == "cuda":
        digest = hashlib.sha256(spec.device_uuid + spec.ipc_handle).digest()
        return int.from_bytes(digest[:8], "little"), spec.offset
    return shm.identity(spec.name)


class DaemonStartError(GhostServeError):
    """The daemon cannot start here: another daemon serves the socket or the
    shared-memory prefix. Raised by :meth:`Server.start`; nothing is changed."""


class DropReason:
    """Why a group was dropped (the ``reason`` label of ``ghostserve_groups_dropped_total``)."""

    CLEAN = "clean"        # every rank said goodbye
    TTL = "ttl"            # ended by failure longer than --ended-ttl ago
    SPACE = "space"        # /dev/shm was short of what a new registration needed
    OPERATOR = "operator"  # ghostserve drop


class Daemon:
    """Groups by name, the pid watcher and the janitor of ended groups. Thread-safe.

    ``shm_free`` reports the bytes ``/dev/shm`` can still take (injected by tests,
    which cannot fill the real one)."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 shm_free: Callable[[], int] = shm.free_bytes, cuda_runtime: Any = None):
        self.config = config
        self.cuda_runtime = cuda_runtime  # None: the real one (CuPy), loaded on the first CUDA region
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

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.reattach()
        self._watcher.start()

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
        group = Group(name, store, self.metrics, self.pool, self.config, store.manifest.get("kind", "host"),
                      self.cuda_runtime)
        self.groups[name] = group
        group.on_change = self._pids.kick  # new pids and ended engines: the watcher looks again
        group.start()
        return group

    def stop(self) -> None:
        self.draining = True
        self._stop.set()
        self._pids.kick()
        for group in list(self.groups.values()):
            group.stop()
        self.pool.shutdown(wait=True)

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

    def drop_group(self, g: Group, reason: str, unlink_regions: bool | None = None) -> int:
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
            regions = [(s.name, ident) for r in g.ranks.values() if unlink_regions or r.release_region
                       for s, ident in zip(r.specs, r.idents or [None] * len(r.specs), strict=True)
                       if s.kind == "host"]  # a GPU's memory goes with its process
            held = g.store.nbytes()
            g.close()
            with g.io_lock:  # after a restore, fetch or scrub in flight
                g.store.close()
                ParityStore.destroy(self.config.shm_prefix, g.name)
            for name, ident in regions:
                size = shm.used_bytes(name)
                if shm.unlink_if(name, ident):
                    held += size
            self.groups.pop(g.name)
        self.metrics.forget_group(g.name)
        self.metrics.groups_dropped.labels(reason).inc()
        self.metrics.dropped_bytes.labels(reason).inc(held)
        log.info("dropped group %s (%s): %d bytes of shared memory given back%s", g.name, reason, held,
                 f", {len(regions)} regions unlinked" if regions else "")
        return held

    def held_bytes(self, g: Group) -> int:
        """Shared memory ``g`` holds: its store, and for an ended engine the kept regions."""
        held = g.store.nbytes()
        if g.ended():
            held += sum(shm.used_bytes(s.name) for r in list(g.ranks.values()) if r.mapped
                        for s in r.specs if s.kind == "host")
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

    def register(self, req: pb.RegisterRequest) -> pb.RegisterResponse:
        if not _GROUP_NAME.match(req.group):
            raise InvalidRequest(f"group name {req.group!r}: use 1-64 of [A-Za-z0-9._-]")
        n, m = req.world_size, req.parity
        if n < 1 or m < 1 or n + m > 255:
            raise InvalidRequest(f"code ({n}, {m}): need world_size >= 1, parity >= 1, sum <= 255")
        if req.rank >= n:
            raise InvalidRequest(f"rank {req.rank} is outside 0..{n - 1}")
        lay = req.layout
        layout = Layout.from_proto(lay)
        problems = layout.problems() or layout.slot_map_problems(lay.slot_map)
        if problems:
            raise InvalidRequest("layout: " + "; ".join(problems))
        regions = list(req.regions) or [req.region]
        if len(regions) != layout.regions:
            raise InvalidRequest(f"{len(regions)} regions given, the layout's extents name {layout.regions}")
        specs = [self._region_spec(i, region, layout) for i, region in enumerate(regions)]
        kinds = {s.kind for s in specs}
        if len(kinds) > 1:
            raise InvalidRequest("a rank's regions are all shared memory or all CUDA IPC, not both")
        kind = kinds.pop()
        if len({s.name for s in specs}) != len(specs):
            raise InvalidRequest("a region is named twice")
        if req.pid <= 0 or not self._alive(req.pid):
            raise InvalidRequest(f"pid {req.pid} is not a running process")
        if len(req.namespace) > 256:
            raise InvalidRequest("namespace: at most 256 characters")
        manifest = {"world_size": n, "parity": m, "layout": layout.to_dict(),
                    "keep_survivors": req.keep_survivors, "namespace": req.namespace,
                    "shm_prefix": self.config.shm_prefix, "kind": kind}
        with self.lock:
            idents = set()
            for spec in specs:
                try:
                    ident = region_identity(spec)
                except FileNotFoundError:
                    raise InvalidRequest(f"shared memory region {spec.name!r} does not exist") from None
                holder = self._holder(ident, req.group, req.rank)
                if holder is not None:
                    raise RegionInUse(spec.name, *holder)
                if ident in idents:
                    raise InvalidRequest(f"region {spec.name!r} is another name of a region given before")
                idents.add(ident)
            group = self.groups.get(req.group)
            created = group is None
            if created:
                need = sum(ParityStore.sizes(layout, n, m, 8 if kind == "cuda" else 4))
                self.make_room(need)
                try:
                    store = ParityStore.create(self.config.shm_prefix, req.group, {**manifest, "ranks": {}},
                                               lay.slot_map)
                except OSError as exc:
                    raise ResourceExhausted(f"shared memory for parity: {need} bytes ({exc})") from None
                try:
                    group = self._new_group(req.group, store)
                except BaseException:  # e.g. no GPU runtime for a CUDA group: leave nothing
                    store.close()
                    ParityStore.destroy(self.config.shm_prefix, req.group)
                    self.metrics.forget_group(req.group)
                    raise
            else:
                defaults = {"namespace": "", "kind": "host", "shm_prefix": manifest["shm_prefix"]}
                have = {k: group.store.manifest.get(k, defaults.get(k, False)) for k in manifest}
                if have != manifest:
                    raise InvalidRequest(f"group {req.group!r} is registered with {have}, not {manifest}")
                if layout.block_slots and bytes(group.store.slot_map.tobytes()) != lay.slot_map:
                    raise InvalidRequest(f"group {req.group!r} is registered with another slot_map")
            if not created:  # a holder of this rank whose process is gone: its death, now
                group.forget_dead(self._process_alive, [req.rank])
            try:
                role, session = group.register(req.rank, req.pid, tuple(specs),
                                               req.last_step if req.HasField("last_step") else None,
                                               self._start_time(req.pid))
            except GhostServeError:
                if created:  # leave nothing behind for a refused first registration
                    self.groups.pop(req.group).stop()
                    store.close()
                    ParityStore.destroy(self.config.shm_prefix, req.group)
                    self.metrics.forget_group(req.group)
                raise
        return pb.RegisterResponse(role=pb.RegisterResponse.Role.Value(role), session=session,
                                   protected_step=group.protected_step,
                                   next_step=group.protected_step + 1)

    def _region_spec(self, i: int, region: pb.Region, layout: Layout) -> RegionSpec:
        """Region ``i`` of a Register, checked: a shared-memory name the daemon may
        map, or a CUDA IPC handle with its device; big enough for the layout."""
        kind = region.WhichOneof("kind")
        if region.size < layout.region_bytes(i):
            raise InvalidRequest(f"region {i} of {region.size} bytes is smaller than the layout "
                                 f"needs ({layout.region_bytes(i)})")
        if kind == "cuda_ipc_handle":
            if len(region.cuda_ipc_handle) != 64 or len(region.device_uuid) != 16:
                raise InvalidRequest(f"region {i}: a CUDA IPC handle is 64 bytes and a device UUID 16")
            digest = hashlib.sha256(region.cuda_ipc_handle).hexdigest()[:16]
            return RegionSpec(f"cuda:{region.device_uuid.hex()}:{digest}+{region.offset}", region.size,
                              region.cuda_ipc_handle, region.offset, region.device_uuid)
        if kind != "shm_name":
            raise InvalidRequest(f"region {i}: give shm_name or cuda_ipc_handle")
        try:
            shm.check_name(region.shm_name)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._check_region_name(region.shm_name)
        return RegionSpec(region.shm_name, region.size)

    def _check_region_name(self, region: str) -> None:
        """A region must be the engine's KV: not a segment of the daemon's own
        (parity, metadata, index, lock), and under ``region_prefix`` if set."""
        prefix = self.config.shm_prefix
        if region.startswith(prefix) and region.endswith(_OWN_SUFFIXES):
            raise RegionRefused(region, "names a segment of the daemon's own (parity, metadata, "
                                "index or lock), not an engine's KV")
        if self.config.region_prefix and not region.startswith(self.config.region_prefix):
            raise RegionRefused(region, f"outside the daemon's --region-prefix "
                                f"{self.config.region_prefix!r}")

    def _holder(self, ident: tuple[int, int], group: str, rank: int) -> tuple[str, int] | None:
        """(group, rank) of another rank that holds the memory ``ident`` mapped."""
        for g in list(self.groups.values()):
            with g.lock:
                for r in g.ranks.values():
                    if r.mapped and ident in r.idents and (g.name, r.rank) != (group, rank):
                        return g.name, r.rank
        return None

    def reclaim(self, req: pb.ReclaimRequest) -> pb.ReclaimResponse:
        dropped = self.make_room(req.bytes)
        return pb.ReclaimResponse(free_bytes=self.shm_free(), dropped_groups=dropped)

    # ---------------------------------------------------------------- resume

    def lookup(self, req: pb.LookupRequest) -> pb.LookupResponse:
        if len(req.tokens) % 4:
            raise InvalidRequest(f"tokens is {len(req.tokens)} bytes, not uint32 ids")
        tokens = np.frombuffer(req.tokens, dtype="<u4")
        best: tuple[Group, tuple[str, int, list[int]]] | None = None
        for g in list(self.groups.values()):
            if not g.slotted or g.namespace != req.namespace or not g.ended():
                continue  # only ended engines' KV is settled, and only the same model's counts
            hit = g.match(tokens)
            if hit is not None and (best is None or hit[1] > best[1][1]):
                best = (g, hit)
        if best is None:
            return pb.LookupResponse()
        g, (request_id, n, blocks) = best
        return pb.LookupResponse(group=g.name, request_id=request_id, tokens=n, blocks=blocks,
                                 block_slots=g.layout.block_slots)

    def fetch(self, req: pb.FetchRequest) -> pb.FetchResponse:
        src, dst = self.group(req.source_group), self.group(req.group)
        if src is dst:
            raise InvalidRequest("source_group and group are the same group")
        if not src.ended():
            raise WrongState(src.name, None, "a group with live ranks cannot be fetched from")
        if len(req.source_blocks) != len(req.blocks):
            raise InvalidRequest(f"{len(req.source_blocks)} source blocks but {len(req.blocks)} destination blocks")
        diff = src.compatible(dst)
        if diff:
            raise InvalidRequest(f"groups {src.name!r} and {dst.name!r} differ in {', '.join(diff)}")
        res = src.fetch(req.source_rank, list(req.source_blocks), req.tokens, dst, req.rank,
                        req.session, list(req.blocks))
        return pb.FetchResponse(fetched_bytes=res.fetched_bytes, rebuilt=res.rebuilt,
                                unrecoverable_blocks=res.unrecoverable_blocks,
                                corrupt_chunks=res.corrupt_chunks, seconds=res.seconds)

    def release(self, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        self.group(req.group).release(req.rank, req.session, req.step, list(req.request_ids), list(req.blocks))
        return pb.ReleaseResponse()

    def drop(self, req: pb.DropRequest) -> pb.DropResponse:
        with self.lock:
            g = self.group(req.group)
            if not g.ended():
                raise WrongState(g.name, None, "only a group with no rank alive can be dropped")
            released = self.drop_group(g, DropReason.OPERATOR, unlink_regions=req.unlink_regions)
        return pb.DropResponse(released_bytes=released)

    # ---------------------------------------------------------------- status

    def status(self, name: str = "") -> pb.StatusResponse:
        groups = [self.group(name)] if name else list(self.groups.values())
        out = pb.StatusResponse(version=ghostserve.__version__)
        now = time.time()
        for g in groups:
            with g.lock:
                lay = g.layout
                chunks = g.store.protected_chunks()
                per_chunk = lay.chunk_bytes * lay.num_layers
                ended = g.ended()
                age = now - g.ended_at if g.ended_at is not None else 0.0
                gs = out.groups.add(
                    group=g.name, world_size=g.n, parity=g.m,
                    state="ended" if ended else "degraded" if g.degraded()
                    else "stalled" if g.lag_seconds() > self.config.stall_seconds else "healthy",
                    ended_seconds=age, held_bytes=self.held_bytes(g),
                    expires_seconds=max(0.0, self.config.ended_ttl - age)
                    if g.end_reason == EndReason.FAILURE else 0.0,
                    protected_step=g.protected_step, newest_step=g.newest_step(),
                    lag_steps=g.newest_step() - g.protected_step, lag_seconds=g.lag_seconds(),
                    kv_bytes=lay.kv_bytes() * g.n, protected_bytes=chunks * per_chunk * g.n,
                    parity_bytes=chunks * per_chunk * g.m, parity_arena_bytes=lay.kv_bytes() * g.m,
                    layout=pb.KVLayout(**lay.to_dict()),
                )
                for r in sorted(g.ranks.values(), key=lambda r: r.rank):
                    gs.ranks.add(rank=r.rank, state=r.state, pid=r.pid, committed_step=r.committed,
                                 region=r.region, process_ended=r.process_ended)
                for req, tokens in sorted(g.watermarks.items()):
                    gs.watermarks.add(request_id=req, tokens=tokens)
                if g.last_restore:
                    gs.last_restore.CopyFrom(pb.LastRestore(**g.last_restore))
        return out


# ------------------------------------------------------------------------ gRPC


class _Malformed:
    """What a request that does not parse deserialises to."""

    def __init__(self, error: str):
        self.error = error


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError and friends
            return _Malformed(str(exc))
    return parse


def _restore_response(res) -> pb.RestoreResponse:
    return pb.RestoreResponse(
        protected_step=res.protected_step, restored_bytes=res.restored_bytes,
        unrecoverable_blocks=res.unrecoverable_blocks, unrecoverable_bytes=res.unrecoverable_bytes,
        corrupt_chunks=res.corrupt_chunks, seconds=res.seconds,
        watermarks=[pb.RequestTokens(request_id=k, tokens=v) for k, v in sorted(res.watermarks.items())],
    )


def _commit_record(c: pb.Commit) -> CommitRecord:
    if c.step < 0:
        raise InvalidRequest(f"step {c.step} is negative")
    if len(c.dirty) % 24:
        raise InvalidRequest(f"dirty is {len(c.dirty)} bytes, not (block, start, end) uint64 triples")
    if len(c.request_ids) != len(c.request_tokens):
        raise InvalidRequest("request_ids and request_tokens differ in length")
    ranges = np.frombuffer(c.dirty, dtype="<u8").reshape(-1, 3)
    if ranges.size and int(ranges[:, 0].max()) >= 1 << 32:
        raise InvalidRequest("block id out of range")
    if len(c.fills) % 8:
        raise InvalidRequest(f"fills is {len(c.fills)} bytes, not (block, slots) uint32 pairs")
    fills = np.frombuffer(c.fills, dtype="<u4").reshape(-1, 2)
    return CommitRecord(
        step=c.step, ranges=[(int(b), int(s), int(e)) for b, s, e in ranges],
        requests=list(zip(c.request_ids, c.request_tokens, strict=True)),
        freed=list(c.freed_blocks), finished=list(c.finished_requests),
        fills={int(b): int(f) for b, f in fills}, released=list(c.released_blocks),
        records=[Record(r.request_id, list(r.tokens), list(r.blocks), r.reset) for r in c.records],
        event=bytes(c.cuda_event),
    )


class _StreamEnd:
    """How a worker's stream ended, as its reader thread saw it."""

    def __init__(self) -> None:
        self.goodbye = False                       # the worker ended cleanly
        self.refused: GhostServeError | None = None  # it sent something invalid
        self.bug: Exception | None = None          # the daemon failed on a valid message


class Services:
    """Worker and Operator handlers over one :class:`Daemon`. Each handler runs
    on a thread of the gRPC server's pool."""

    def __init__(self, daemon: Daemon):
        self.d = daemon

    def _refuse(self, method: str, exc: GhostServeError, context: grpc.ServicerContext) -> None:
        code = status_for(exc)
        self.d.metrics.rejected.labels(method, code.name).inc()
        log.warning("refused %s: %s (%s)", method, exc, code.name)
        context.abort(code, str(exc))

    def _internal(self, method: str, exc: Exception, context: grpc.ServicerContext) -> None:
        self.d.metrics.rejected.labels(method, grpc.StatusCode.INTERNAL.name).inc()
        log.error("%s failed inside the daemon (a bug)", method, exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL, f"ghostserve daemon error in {method}: "
                      f"{type(exc).__name__}: {exc} (see the daemon's log)")

    def _unary(self, name: str, fn: Callable[[Any], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        @functools.wraps(fn)
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if isinstance(request, _Malformed):
                    raise InvalidRequest(f"malformed {name} message: {request.error}")
                return fn(request)
            except GhostServeError as exc:
                self._refuse(name, exc, context)
            except Exception as exc:  # noqa: BLE001 - a bug: log it, answer INTERNAL, keep serving
                self._internal(name, exc, context)
        return handler

    # Worker
    def register(self, req: pb.RegisterRequest) -> pb.RegisterResponse:
        """Register (or re-register) a rank's KV region; creates the group on its first rank."""
        return self.d.register(req)

    def restore(self, req: pb.RestoreRequest) -> pb.RestoreResponse:
        """Rebuild a replacement rank's protected KV into its region (blocks until written)."""
        return _restore_response(self.d.group(req.group).restore(req.rank, req.session))

    def operator_restore(self, req: pb.RestoreRequest) -> pb.RestoreResponse:
        """Operator Restore: the same without a session (e.g. to repair a corrupt rank)."""
        return _restore_response(self.d.group(req.group).restore(req.rank, None))

    def status(self, req: pb.StatusRequest) -> pb.StatusResponse:
        """Groups, ranks, watermarks and shared memory held."""
        return self.d.status(req.group)

    def scrub(self, req: pb.ScrubRequest) -> pb.ScrubResponse:
        """Check every protected chunk against its checksums (and parity, if every rank is alive)."""
        res = self.d.group(req.group).scrub()
        return pb.ScrubResponse(chunks_checked=res.chunks_checked, parity_mismatches=res.parity_mismatches,
                                checksum_mismatches=res.checksum_mismatches, bad_blocks=res.bad_blocks,
                                bad_ranks=res.bad_ranks, parity_checked=res.parity_checked)

    def stream(self, requests: Any, context: grpc.ServicerContext):
        """Hello, then commits, then maybe a goodbye; yields acks and events.

        The stream ending from the client's side without a goodbye (EOF, cancel,
        broken connection) marks the rank lost. A goodbye ends the rank cleanly
        (and, once every rank has, drops the group). An invalid message is
        refused with its code; a daemon bug on a valid one is logged and
        answered INTERNAL, and the rank is only detached: it rejoins and resends."""
        try:
            first = next(requests)
        except (StopIteration, grpc.RpcError):
            return
        try:
            if isinstance(first, _Malformed) or first.WhichOneof("msg") != "hello":
                raise InvalidRequest("a stream must start with hello")
            hello = first.hello
            group = self.d.group(hello.group)
            outbox = group.open_stream(hello.rank, hello.session)
        except GhostServeError as exc:
            self._refuse("Stream", exc, context)
            return
        rank, session = hello.rank, hello.session
        end = _StreamEnd()

        def read() -> None:
            while True:
                try:
                    msg = next(requests)
                except StopIteration:
                    break
                except Exception:  # noqa: BLE001 - the connection broke: the worker is gone
                    break
                try:
                    kind = None if isinstance(msg, _Malformed) else msg.WhichOneof("msg")
                    if kind == "commit":
                        group.commit(rank, session, _commit_record(msg.commit))
                    elif kind == "goodbye":
                        end.goodbye = True
                        if group.goodbye(rank, session, msg.goodbye.release_region):
                            self.d.drop_group(group, DropReason.CLEAN)
                        break
                    else:
                        raise InvalidRequest("after hello, a stream carries commits and one goodbye")
                except GhostServeError as exc:
                    end.refused = exc
                    break
                except Exception as exc:  # noqa: BLE001 - a daemon bug, not the worker's failure
                    end.bug = exc
                    break
            outbox.put(STREAM_END)

        context.add_callback(lambda: outbox.put(STREAM_END))
        threading.Thread(target=read, name=f"gs-stream-{group.name}-{rank}", daemon=True).start()
        while True:
            item = outbox.get()
            if item is SUPERSEDED:  # a newer stream of this rank took over, or the group was dropped
                return
            if item is STREAM_END:
                if end.goodbye:
                    return
                lost = end.refused is None and end.bug is None and not self.d.draining
                group.stream_closed(rank, session, by_client=lost)
                if end.refused is not None:
                    self._refuse("Stream", end.refused, context)
                elif end.bug is not None:
                    self._internal("Stream", end.bug, context)
                return
            if isinstance(item, Ack):
                yield pb.DaemonMessage(ack=pb.Ack(
                    protected_step=item.step,
                    watermarks=[pb.RequestTokens(request_id=k, tokens=v) for k, v in item.watermarks.items()]))
            elif isinstance(item, Event):
                yield pb.DaemonMessage(event=pb.GroupEvent(
                    kind=pb.GroupEvent.Kind.Value(item.kind), rank=item.rank, detail=item.detail))

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(name, fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, fn), request_deserializer=_parser(req),
                response_serializer=resp.SerializeToString)

        worker = grpc.method_handlers_generic_handler("ghostserve.v1.Worker", {
            "Register": unary("Register", self.register, pb.RegisterRequest, pb.RegisterResponse),
            "Restore": unary("Restore", self.restore, pb.RestoreRequest, pb.RestoreResponse),
            "Lookup": unary("Lookup", self.d.lookup, pb.LookupRequest, pb.LookupResponse),
            "Reclaim": unary("Reclaim", self.d.reclaim, pb.ReclaimRequest, pb.ReclaimResponse),
            "Release": unary("Release", self.d.release, pb.ReleaseRequest, pb.ReleaseResponse),
            "Fetch": unary("Fetch", self.d.fetch, pb.FetchRequest, pb.FetchResponse),
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.stream, request_deserializer=_parser(pb.WorkerMessage),
                response_serializer=pb.DaemonMessage.SerializeToString),
        })
        operator = grpc.method_handlers_generic_handler("ghostserve.v1.Operator", {
            "Status": unary("Status", self.status, pb.StatusRequest, pb.StatusResponse),
            "Scrub": unary("Scrub", self.scrub, pb.ScrubRequest, pb.ScrubResponse),
            "Restore": unary("OperatorRestore", self.operator_restore, pb.RestoreRequest, pb.RestoreResponse),
            "Drop": unary("Drop", self.d.drop, pb.DropRequest, pb.DropResponse),
        })
        return [worker, operator]


# Server reflection: grpcurl asks for grpc.reflection.v1 first, grpcio-reflection
# implements v1alpha. The two protocols are the same messages under another package,
# so one servicer answers both; v1's descriptor is v1alpha's, renamed.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection_v1_descriptor() -> None:
    from google.protobuf import descriptor_pb2, descriptor_pool  # noqa: PLC0415

    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return  # registered already (by this function or by a real v1 package)
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fdp.name, fdp.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for msg in fdp.message_type:
        for f in msg.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for svc in fdp.service:
        for m in svc.method:
            m.input_type, m.output_type = m.input_type.replace(old, new), m.output_type.replace(old, new)
    pool.Add(fdp)


def add_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Serve reflection v1 and v1alpha for ``services`` (and for themselves)."""
    _add_reflection_v1_descriptor()
    servicer = reflection.ReflectionServicer((*services, reflection.SERVICE_NAME, REFLECTION_V1))
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
        for name in (reflection.SERVICE_NAME, REFLECTION_V1)])


def _daemon_answers(path: str) -> bool:
    """Does a process accept connections on the unix socket ``path``?"""
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:  # refused (stale) or gone
        return False
    finally:
        s.close()


class Server:
    """A running daemon: gRPC on the socket (and TCP if configured), health,
    reflection and metrics. ``start()`` returns once it listens; it raises
    :class:`DaemonStartError` when another daemon holds the socket or the
    shared-memory prefix, and leaves nothing behind when it fails."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 shm_free: Callable[[], int] = shm.free_bytes, cuda_runtime: Any = None):
        self.config = config
        self.daemon = Daemon(config, registry, shm_free, cuda_runtime)
        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="gs-rpc"),
                                options=[("grpc.so_reuseport", 0)])
        self.health = health.HealthServicer()
        self.metrics_server = None
        self.metrics_port = 0
        self._lock = shm.PrefixLock(config.shm_prefix)
        self._bound = False

    def start(self) -> None:
        cfg = self.config
        holder = self._lock.acquire()
        if holder is not None:
            raise DaemonStartError(f"another ghostserve daemon (pid {holder}) serves shared-memory prefix "
                                   f"{cfg.shm_prefix!r}; stop it or give this one another --shm-prefix")
        try:
            if cfg.socket and _daemon_answers(cfg.socket):
                raise DaemonStartError(f"a daemon already answers on {cfg.socket}; stop it or use another --socket")
            self._start()
        except BaseException:
            self._cleanup()
            raise

    def _start(self) -> None:
        cfg = self.config
        creds = None
        if cfg.listen and cfg.tls_cert:  # read first: a bad file fails before anything is bound
            with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        self.daemon.start()
        self.grpc.add_generic_rpc_handlers(Services(self.daemon).handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        add_reflection(self.grpc, (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        if cfg.socket:
            directory = os.path.dirname(cfg.socket)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            if os.path.exists(cfg.socket) and stat.S_ISSOCK(os.stat(cfg.socket).st_mode):
                os.unlink(cfg.socket)  # stale socket of a dead daemon (no one answers: checked)
            old = os.umask(0o177)  # the socket is created 0600
            try:
                self.grpc.add_insecure_port("unix:" + cfg.socket)
                self._bound = True
            finally:
                os.umask(old)
        if cfg.listen:
            if creds is not None:
                self.grpc.add_secure_port(cfg.listen, creds)
            else:
                self.grpc.add_insecure_port(cfg.listen)
        self.grpc.start()
        if cfg.socket:
            os.chmod(cfg.socket, 0o600)
        if cfg.metrics_port:
            self.metrics_server, _ = start_http_server(cfg.metrics_port, cfg.metrics_host,
                                                       registry=self.daemon.registry)
            self.metrics_port = self.metrics_server.server_port
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _cleanup(self) -> None:
        self.grpc.stop(0)
        self.daemon.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        if self._bound and os.path.exists(self.config.socket):
            os.unlink(self.config.socket)
        self._bound = False
        self._lock.release()

    def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, give in-flight RPCs ``grace`` seconds (default
        ``drain_seconds``), stop encoders. Parity stays."""
        self.daemon.draining = True
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for group in list(self.daemon.groups.values()):
            group.end_streams()  # ranks stay registered (detached); parity stays
        self.grpc.stop(self.config.drain_seconds if grace is None else grace).wait()
        self._cleanup()


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status.

    The signals are blocked in every thread (all start after this) and taken
    by ``sigwait`` on the main thread: no Python signal handler runs, so none can
    interrupt a lock it then waits for. A second signal during the drain ends
    the process at once."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    server = Server(config)
    server.start()
    log.info("ghostserve %s serving on %s%s, metrics %s", ghostserve.__version__, config.socket,
             f" and {config.listen}" if config.listen else "",
             f"on :{server.metrics_port}" if server.metrics_port else "off")
    print(f"ready socket={config.socket} metrics_port={server.metrics_port}", flush=True)
    sig = signal.sigwait(signals)
    log.info("%s: draining", signal.Signals(sig).name)

    def force() -> None:
        again = signal.sigwait(signals)
        log.warning("%s during the drain: exiting now", signal.Signals(again).name)
        os._exit(128 + again)

    threading.Thread(target=force, name="gs-signals", daemon=True).start()
    server.stop()
    return 0


__all__ = ["Daemon", "DaemonStartError", "DropReason", "Server", "Services", "add_reflection", "serve"]
