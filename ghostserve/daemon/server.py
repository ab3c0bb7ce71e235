"""The daemon: group registry, failure detector, gRPC services, and ``serve``.

Request handlers run on the gRPC server's thread pool; each worker stream uses
two threads (one reads commits, one writes acknowledgements). Handlers validate
everything before touching state and turn :class:`GhostServeError` into the
status code of ``status_codes.GRPC_STATUS``, so one bad client never disturbs
the others.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

import ghostserve
from ghostserve import shm
from ghostserve.config import Config
from ghostserve.daemon.group import CommitRecord, Group
from ghostserve.daemon.status_codes import status_for
from ghostserve.daemon.store import Layout, ParityStore
from ghostserve.errors import (
    GhostServeError,
    InvalidRequest,
    ResourceExhausted,
    UnknownGroup,
    Unsupported,
    WrongState,
)
from ghostserve.metrics import Metrics
from ghostserve.v1 import ghostserve_pb2 as pb

log = logging.getLogger("ghostserve.daemon")

_GROUP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SERVICES = ("ghostserve.v1.Worker", "ghostserve.v1.Operator")


class Daemon:
    """Groups by name, plus the pid watcher. Thread-safe."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None):
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.pool = ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="gs-encode")
        self.groups: dict[str, Group] = {}
        self.lock = threading.Lock()
        self.draining = False
        self._stop = threading.Event()
        self._procs: dict[int, psutil.Process] = {}
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
            except (ValueError, FileNotFoundError, KeyError) as exc:
                log.warning("skipping incomplete group %s: %s", name, exc)
                continue
            group = self._new_group(name, store)
            group.attach_detached(store.manifest.get("ranks", {}), store.layout.region_bytes())
            log.info("re-attached group %s at protected step %d", name, store.protected_step)

    def _new_group(self, name: str, store: ParityStore) -> Group:
        group = Group(name, store, self.metrics, self.pool, self.config.threads)
        self.groups[name] = group
        group.start()
        return group

    def stop(self) -> None:
        self.draining = True
        self._stop.set()
        for group in list(self.groups.values()):
            group.stop()
        self.pool.shutdown(wait=True)

    def group(self, name: str) -> Group:
        group = self.groups.get(name)
        if group is None:
            raise UnknownGroup(name)
        return group

    def _watch_pids(self) -> None:
        while not self._stop.wait(self.config.pid_poll_seconds):
            for group in list(self.groups.values()):
                for rank, pid in group.watched_pids():
                    if not self._alive(pid):
                        group.mark_lost(rank, "pid_gone")

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
        layout = Layout(lay.num_layers, lay.num_blocks, lay.block_bytes, lay.chunk_bytes,
                        lay.layer_stride, lay.block_stride, lay.offset, lay.block_slots)
        problems = layout.problems() or layout.slot_map_problems(lay.slot_map)
        if problems:
            raise InvalidRequest("layout: " + "; ".join(problems))
        kind = req.region.WhichOneof("kind")
        if kind == "cuda_ipc_handle":
            raise Unsupported("CUDA IPC regions need the GPU build of the daemon (not available here)")
        if kind != "shm_name":
            raise InvalidRequest("region: give shm_name")
        try:
            shm.check_name(req.region.shm_name)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if req.region.size < layout.region_bytes():
            raise InvalidRequest(f"region of {req.region.size} bytes is smaller than the layout "
                                 f"needs ({layout.region_bytes()})")
        if req.pid <= 0 or not self._alive(req.pid):
            raise InvalidRequest(f"pid {req.pid} is not a running process")
        if len(req.namespace) > 256:
            raise InvalidRequest("namespace: at most 256 characters")
        manifest = {"world_size": n, "parity": m, "layout": layout.__dict__,
                    "keep_survivors": req.keep_survivors, "namespace": req.namespace}
        with self.lock:
            group = self.groups.get(req.group)
            created = group is None
            if created:
                try:
                    store = ParityStore.create(self.config.shm_prefix, req.group, {**manifest, "ranks": {}},
                                               lay.slot_map)
                except OSError as exc:
                    raise ResourceExhausted(f"shared memory for parity ({exc})") from None
                group = self._new_group(req.group, store)
            else:
                have = {k: group.store.manifest.get(k, "" if k == "namespace" else False) for k in manifest}
                if have != manifest:
                    raise InvalidRequest(f"group {req.group!r} is registered with {have}, not {manifest}")
                if layout.block_slots and bytes(group.store.slot_map.tobytes()) != lay.slot_map:
                    raise InvalidRequest(f"group {req.group!r} is registered with another slot_map")
            try:
                role, session = group.register(req.rank, req.pid, req.region.shm_name, layout.region_bytes())
            except GhostServeError:
                if created:  # leave nothing behind for a refused first registration
                    self.groups.pop(req.group).stop()
                    store.close()
                    ParityStore.destroy(self.config.shm_prefix, req.group)
                raise
        return pb.RegisterResponse(role=pb.RegisterResponse.Role.Value(role), session=session,
                                   protected_step=group.protected_step,
                                   next_step=group.protected_step + 1)

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
            self.groups.pop(req.group)
        regions = [r.region for r in g.ranks.values()]
        g.close()
        released = g.layout.kv_bytes() * g.m
        g.store.close()
        ParityStore.destroy(self.config.shm_prefix, g.name)
        if req.unlink_regions:
            for name in regions:
                shm.unlink(name)
        log.info("dropped group %s (%d parity bytes)", g.name, released)
        return pb.DropResponse(released_bytes=released)

    # ---------------------------------------------------------------- status

    def status(self, name: str = "") -> pb.StatusResponse:
        groups = [self.group(name)] if name else list(self.groups.values())
        out = pb.StatusResponse(version=ghostserve.__version__)
        for g in groups:
            with g.lock:
                lay = g.layout
                chunks = g.store.protected_chunks()
                per_chunk = lay.chunk_bytes * lay.num_layers
                gs = out.groups.add(
                    group=g.name, world_size=g.n, parity=g.m,
                    state="degraded" if g.degraded() else "healthy",
                    protected_step=g.protected_step, newest_step=g.newest_step(),
                    lag_steps=g.newest_step() - g.protected_step,
                    kv_bytes=lay.kv_bytes() * g.n, protected_bytes=chunks * per_chunk * g.n,
                    parity_bytes=chunks * per_chunk * g.m, parity_arena_bytes=lay.kv_bytes() * g.m,
                    layout=pb.KVLayout(**lay.__dict__),
                )
                for r in sorted(g.ranks.values(), key=lambda r: r.rank):
                    gs.ranks.add(rank=r.rank, state=r.state, pid=r.pid,
                                 committed_step=r.committed, region=r.region)
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
        records=[(r.request_id, list(r.tokens), list(r.blocks), r.reset) for r in c.records],
    )


class Services:
    """Worker and Operator handlers over one :class:`Daemon`."""

    def __init__(self, daemon: Daemon):
        self.d = daemon

    def _unary(self, name: str, fn: Callable[[Any], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        @functools.wraps(fn)
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                if isinstance(request, _Malformed):
                    raise InvalidRequest(f"malformed {name} message: {request.error}")
                return fn(request)
            except GhostServeError as exc:
                code = status_for(exc)
                self.d.metrics.rejected.labels(name, code.name).inc()
                context.abort(code, str(exc))
        return handler

    # Worker
    def register(self, req: pb.RegisterRequest) -> pb.RegisterResponse:
        return self.d.register(req)

    def restore(self, req: pb.RestoreRequest) -> pb.RestoreResponse:
        return _restore_response(self.d.group(req.group).restore(req.rank, req.session))

    def operator_restore(self, req: pb.RestoreRequest) -> pb.RestoreResponse:
        return _restore_response(self.d.group(req.group).restore(req.rank, None))

    def status(self, req: pb.StatusRequest) -> pb.StatusResponse:
        return self.d.status(req.group)

    def scrub(self, req: pb.ScrubRequest) -> pb.ScrubResponse:
        res = self.d.group(req.group).scrub()
        return pb.ScrubResponse(chunks_checked=res.chunks_checked, parity_mismatches=res.parity_mismatches,
                                checksum_mismatches=res.checksum_mismatches, bad_blocks=res.bad_blocks,
                                bad_ranks=res.bad_ranks, parity_checked=res.parity_checked)

    def stream(self, requests: Any, context: grpc.ServicerContext):
        """Hello, then commits; yields acks and events. The stream ending from the
        client's side (EOF, cancel, broken connection) marks the rank lost."""
        def reject(exc: GhostServeError) -> None:
            code = status_for(exc)
            self.d.metrics.rejected.labels("Stream", code.name).inc()
            context.abort(code, str(exc))

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
            reject(exc)
            return
        rank, session = hello.rank, hello.session
        verdict: dict[str, Any] = {}

        def read() -> None:
            try:
                for msg in requests:
                    if isinstance(msg, _Malformed) or msg.WhichOneof("msg") != "commit":
                        raise InvalidRequest("after hello, a stream carries only commits")
                    group.commit(rank, session, _commit_record(msg.commit))
            except GhostServeError as exc:
                verdict["error"] = exc
            except Exception:  # the connection broke: the worker is gone
                pass
            outbox.put(("eof",))

        context.add_callback(lambda: outbox.put(("eof",)))
        threading.Thread(target=read, name=f"gs-stream-{group.name}-{rank}", daemon=True).start()
        while True:
            item = outbox.get()
            if item is None:  # a newer stream of this rank took over
                return
            if item[0] == "eof":
                error = verdict.get("error")
                group.stream_closed(rank, session, by_client=error is None and not self.d.draining)
                if error is not None:
                    reject(error)
                return
            if item[0] == "ack":
                _, step, marks = item
                yield pb.DaemonMessage(ack=pb.Ack(
                    protected_step=step,
                    watermarks=[pb.RequestTokens(request_id=k, tokens=v) for k, v in marks.items()]))
            elif item[0] == "event":
                _, kind, who, detail = item
                yield pb.DaemonMessage(event=pb.GroupEvent(
                    kind=pb.GroupEvent.Kind.Value(kind), rank=who, detail=detail))

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(name, fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, fn), request_deserializer=_parser(req),
                response_serializer=resp.SerializeToString)

        worker = grpc.method_handlers_generic_handler("ghostserve.v1.Worker", {
            "Register": unary("Register", self.register, pb.RegisterRequest, pb.RegisterResponse),
            "Restore": unary("Restore", self.restore, pb.RestoreRequest, pb.RestoreResponse),
            "Lookup": unary("Lookup", self.d.lookup, pb.LookupRequest, pb.LookupResponse),
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


class Server:
    """A running daemon: gRPC on the socket (and TCP if configured), health,
    reflection and metrics. ``start()`` returns once it listens."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None):
        self.config = config
        self.daemon = Daemon(config, registry)
        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=256, thread_name_prefix="gs-rpc"),
                                options=[("grpc.so_reuseport", 0)])
        self.health = health.HealthServicer()
        self.metrics_server = None
        self.metrics_port = 0

    def start(self) -> None:
        cfg = self.config
        self.daemon.start()
        self.grpc.add_generic_rpc_handlers(Services(self.daemon).handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        if cfg.socket:
            directory = os.path.dirname(cfg.socket)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            if os.path.exists(cfg.socket) and stat.S_ISSOCK(os.stat(cfg.socket).st_mode):
                os.unlink(cfg.socket)  # stale socket of a dead daemon
            old = os.umask(0o177)  # the socket is created 0600
            try:
                self.grpc.add_insecure_port("unix:" + cfg.socket)
            finally:
                os.umask(old)
        if cfg.listen:
            if cfg.tls_cert:
                with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
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

    def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, finish in-flight RPCs, stop encoders. Parity stays."""
        self.daemon.draining = True
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        for group in list(self.daemon.groups.values()):
            group.end_streams()  # ranks stay registered (detached); parity stays
        self.grpc.stop(grace).wait()
        self.daemon.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.config.socket and os.path.exists(self.config.socket):
            os.unlink(self.config.socket)


def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(config)
    server.start()
    log.info("ghostserve %s serving on %s%s, metrics %s", ghostserve.__version__, config.socket,
             f" and {config.listen}" if config.listen else "",
             f"on :{server.metrics_port}" if server.metrics_port else "off")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"ready socket={config.socket} metrics_port={server.metrics_port}", flush=True)
    while not done.wait(0.5):
        pass
    log.info("draining")
    server.stop()
    return 0


__all__ = ["Daemon", "Server", "Services", "serve"]
