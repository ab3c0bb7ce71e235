"""The daemon's gRPC services: handlers and the protobuf conversion, nothing else.

Every RPC of :data:`ghostserve.wire.SERVICES` (the proto's own description, the
one the clients are built from) gets a handler here; a method without one fails
the daemon's start. A handler turns the request into the types of
:mod:`ghostserve.daemon.calls` (or a group's arguments), calls the
:class:`~ghostserve.daemon.daemon.Daemon`, and turns the answer back into
protobuf. Errors: a :class:`~ghostserve.errors.GhostServeError` is answered with
its status code (:func:`ghostserve.wire.status_for`) and its class named in the
trailing metadata, so the client raises the same class; any other exception is a
daemon bug: logged with its traceback, answered INTERNAL. One bad client never
disturbs the others.

Threads: handlers run on the gRPC server's pool; each worker stream uses two
threads (one reads commits, one writes acknowledgements and events).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from ghostserve import wire
from ghostserve.daemon.calls import FetchCall, GroupView, Notice, Registration
from ghostserve.daemon.commits import CommitRecord
from ghostserve.daemon.daemon import Daemon, DropReason
from ghostserve.daemon.datapath import RegionSpec
from ghostserve.daemon.index import Record
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.messages import STREAM_END, SUPERSEDED, Ack, Event
from ghostserve.daemon.recovery import RestoreResult
from ghostserve.errors import GhostServeError, InvalidRequest
from ghostserve.v1 import ghostserve_pb2 as pb

log = logging.getLogger("ghostserve.daemon")


# ------------------------------------------------------------------------ protobuf -> calls


class _Malformed:
    """What a request that does not parse deserialises to (refused INVALID_ARGUMENT)."""

    def __init__(self, error: str):
        self.error = error


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError and friends
            return _Malformed(str(exc))
    return parse


def _region(i: int, region: pb.Region) -> RegionSpec:
    kind = region.WhichOneof("kind")
    if kind == "shm_name":
        return RegionSpec.shm(region.shm_name, region.size)
    if kind == "cuda_ipc_handle":
        return RegionSpec.cuda(region.cuda_ipc_handle, region.offset, region.device_uuid, region.size)
    raise InvalidRequest(f"region {i}: give shm_name or cuda_ipc_handle")


def registration(req: pb.RegisterRequest) -> Registration:
    regions = list(req.regions) or [req.region]
    return Registration(
        group=req.group, rank=req.rank, world_size=req.world_size, parity=req.parity,
        layout=Layout.from_proto(req.layout), slot_map=bytes(req.layout.slot_map),
        regions=tuple(_region(i, r) for i, r in enumerate(regions)), pid=req.pid,
        keep_survivors=req.keep_survivors, namespace=req.namespace,
        last_step=req.last_step if req.HasField("last_step") else None)


def commit_record(c: pb.Commit) -> CommitRecord:
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


# ------------------------------------------------------------------------ answers -> protobuf


def _tokens(marks: dict[str, int]) -> list[pb.RequestTokens]:
    return [pb.RequestTokens(request_id=k, tokens=v) for k, v in sorted(marks.items())]


def restore_response(res: RestoreResult) -> pb.RestoreResponse:
    return pb.RestoreResponse(
        protected_step=res.protected_step, restored_bytes=res.restored_bytes,
        unrecoverable_blocks=res.unrecoverable_blocks, unrecoverable_bytes=res.unrecoverable_bytes,
        corrupt_chunks=res.corrupt_chunks, seconds=res.seconds, watermarks=_tokens(res.watermarks))


def group_status(v: GroupView) -> pb.GroupStatus:
    gs = pb.GroupStatus(
        group=v.group, world_size=v.world_size, parity=v.parity, state=v.state, ended_seconds=v.ended_seconds,
        held_bytes=v.held_bytes, expires_seconds=v.expires_seconds, protected_step=v.protected_step,
        newest_step=v.newest_step, lag_steps=v.lag_steps, lag_seconds=v.lag_seconds, kv_bytes=v.kv_bytes,
        protected_bytes=v.protected_bytes, parity_bytes=v.parity_bytes, parity_arena_bytes=v.parity_arena_bytes,
        layout=pb.KVLayout(**v.layout.to_dict()), watermarks=_tokens(v.watermarks),
        mirrored_step=v.mirrored_step, remote_bytes=v.remote_bytes)
    for r in v.ranks:
        gs.ranks.add(rank=r.rank, state=r.state, pid=r.pid, committed_step=r.committed_step, region=r.region,
                     process_ended=r.process_ended)
    if v.last_restore:
        gs.last_restore.CopyFrom(pb.LastRestore(**v.last_restore))
    return gs


def watch_event(n: Notice) -> pb.WatchEvent:
    ev = pb.WatchEvent(kind=pb.WatchEvent.Kind.Value(n.kind), group=n.group, rank=n.rank, rank_state=n.rank_state,
                       process_ended=n.process_ended, protected_step=n.protected_step, state=n.state,
                       detail=n.detail)
    for r in n.ranks:
        ev.ranks.add(rank=r.rank, state=r.state, pid=r.pid, committed_step=r.committed_step, region=r.region,
                     process_ended=r.process_ended)
    return ev


class _StreamEnd:
    """How a worker's stream ended, as its reader thread saw it."""

    def __init__(self) -> None:
        self.goodbye = False                       # the worker ended cleanly
        self.refused: GhostServeError | None = None  # it sent something invalid
        self.bug: Exception | None = None          # the daemon failed on a valid message


class Services:
    """The Worker and Operator services over one :class:`Daemon`."""

    def __init__(self, daemon: Daemon):
        self.d = daemon

    def _refuse(self, method: str, exc: GhostServeError, context: grpc.ServicerContext) -> None:
        code = wire.status_for(exc)
        self.d.metrics.rejected.labels(method, code.name).inc()
        log.warning("refused %s: %s (%s)", method, exc, code.name)
        context.set_trailing_metadata(((wire.ERROR_KEY, type(exc).__name__),))
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

    # ---------------------------------------------------------------- Worker

    def register(self, req: pb.RegisterRequest) -> pb.RegisterResponse:
        """Register (or re-register) a rank's KV region; creates the group on its first rank."""
        r = self.d.register(registration(req))
        return pb.RegisterResponse(role=pb.RegisterResponse.Role.Value(r.role), session=r.session,
                                   protected_step=r.protected_step, next_step=r.protected_step + 1)

    def restore(self, req: pb.RestoreRequest) -> pb.RestoreResponse:
        """Rebuild a replacement rank's protected KV into its region (blocks until written)."""
        return restore_response(self.d.group(req.group).restore(req.rank, req.session))

    def lookup(self, req: pb.LookupRequest) -> pb.LookupResponse:
        """The ended group holding protected KV for the longest prefix of the tokens."""
        if len(req.tokens) % 4:
            raise InvalidRequest(f"tokens is {len(req.tokens)} bytes, not uint32 ids")
        hit = self.d.lookup(np.frombuffer(req.tokens, dtype="<u4"), req.namespace)
        if hit is None:
            return pb.LookupResponse()
        return pb.LookupResponse(group=hit.group, request_id=hit.request_id, tokens=hit.tokens, blocks=hit.blocks,
                                 block_slots=hit.block_slots)

    def fetch(self, req: pb.FetchRequest) -> pb.FetchResponse:
        """An ended group's blocks into a registered rank's blocks (blocks until written)."""
        res = self.d.fetch(FetchCall(req.source_group, req.source_rank, list(req.source_blocks), req.tokens,
                                     req.group, req.rank, req.session, list(req.blocks)))
        return pb.FetchResponse(fetched_bytes=res.fetched_bytes, rebuilt=res.rebuilt,
                                unrecoverable_blocks=res.unrecoverable_blocks,
                                corrupt_chunks=res.corrupt_chunks, seconds=res.seconds, source=str(res.source))

    def release(self, req: pb.ReleaseRequest) -> pb.ReleaseResponse:
        """Forget finished requests and void released blocks before the step that reuses them."""
        self.d.release(req.group, req.rank, req.session, req.step, list(req.request_ids), list(req.blocks))
        return pb.ReleaseResponse()

    def reclaim(self, req: pb.ReclaimRequest) -> pb.ReclaimResponse:
        """Make room in /dev/shm by dropping ended engines' groups, oldest first."""
        free, dropped = self.d.reclaim(req.bytes)
        return pb.ReclaimResponse(free_bytes=free, dropped_groups=dropped)

    def stream(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[pb.DaemonMessage]:
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
                        group.commit(rank, session, commit_record(msg.commit))
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
                yield pb.DaemonMessage(ack=pb.Ack(protected_step=item.step, watermarks=[
                    pb.RequestTokens(request_id=k, tokens=v) for k, v in item.watermarks.items()]))
            elif isinstance(item, Event):
                yield pb.DaemonMessage(event=pb.GroupEvent(
                    kind=pb.GroupEvent.Kind.Value(item.kind), rank=item.rank, detail=item.detail))

    # ---------------------------------------------------------------- Operator

    def status(self, req: pb.StatusRequest) -> pb.StatusResponse:
        """Groups, ranks, watermarks and shared memory held."""
        import ghostserve  # noqa: PLC0415

        return pb.StatusResponse(version=ghostserve.__version__, node=self.d.node, store=self.d.config.store,
                                 groups=[group_status(v) for v in self.d.status(req.group)])

    def scrub(self, req: pb.ScrubRequest) -> pb.ScrubResponse:
        """Check every protected chunk against its checksums (and parity, if every rank is alive)."""
        res = self.d.group(req.group).scrub()
        return pb.ScrubResponse(chunks_checked=res.chunks_checked, parity_mismatches=res.parity_mismatches,
                                checksum_mismatches=res.checksum_mismatches, bad_blocks=res.bad_blocks,
                                bad_ranks=res.bad_ranks, parity_checked=res.parity_checked)

    def operator_restore(self, req: pb.RestoreRequest) -> pb.RestoreResponse:
        """Operator Restore: a restore without a session (e.g. to repair a corrupt rank)."""
        return restore_response(self.d.group(req.group).restore(req.rank, None))

    def drop(self, req: pb.DropRequest) -> pb.DropResponse:
        """Forget an ended group with its shared memory."""
        return pb.DropResponse(released_bytes=self.d.drop(req.group, req.unlink_regions))

    def watch(self, req: Any, context: grpc.ServicerContext) -> Iterator[pb.WatchEvent]:
        """A snapshot of each watched group, then every change, until the client
        goes or the daemon stops."""
        try:
            if isinstance(req, _Malformed):
                raise InvalidRequest(f"malformed Watch message: {req.error}")
            sub = self.d.watch(req.group)
        except GhostServeError as exc:
            self._refuse("Watch", exc, context)
            return
        context.add_callback(sub.close)  # the client went: wake the wait below
        try:
            while context.is_active() and not sub.closed:
                notice = sub.get(timeout=5.0)
                if notice is not None:
                    yield watch_event(notice)
        finally:
            self.d.watchers.unsubscribe(sub)

    # ---------------------------------------------------------------- the table

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """A handler for every RPC the proto declares (:data:`ghostserve.wire.SERVICES`)."""
        impl: dict[str, dict[str, tuple[str, Callable[..., Any]]]] = {
            "Worker": {"Register": ("Register", self.register), "Restore": ("Restore", self.restore),
                       "Lookup": ("Lookup", self.lookup), "Reclaim": ("Reclaim", self.reclaim),
                       "Release": ("Release", self.release), "Fetch": ("Fetch", self.fetch),
                       "Stream": ("Stream", self.stream)},
            "Operator": {"Status": ("Status", self.status), "Scrub": ("Scrub", self.scrub),
                         "Restore": ("OperatorRestore", self.operator_restore), "Drop": ("Drop", self.drop),
                         "Watch": ("Watch", self.watch)},
        }
        out = []
        for service, methods in wire.SERVICES.items():
            missing = sorted(set(methods) - set(impl.get(service, {})))
            if missing:
                raise RuntimeError(f"the daemon has no handler for {service}.{', '.join(missing)}")
            table: dict[str, grpc.RpcMethodHandler] = {}
            for name, m in methods.items():
                label, fn = impl[service][name]
                kw: dict[str, Any] = dict(request_deserializer=_parser(m.request),
                                          response_serializer=m.response.SerializeToString)
                if m.client_streaming:
                    table[name] = grpc.stream_stream_rpc_method_handler(fn, **kw)
                elif m.server_streaming:
                    table[name] = grpc.unary_stream_rpc_method_handler(fn, **kw)
                else:
                    table[name] = grpc.unary_unary_rpc_method_handler(self._unary(label, fn), **kw)
            out.append(grpc.method_handlers_generic_handler(wire.full_name(service), table))
        return out


__all__ = ["Services", "commit_record", "group_status", "registration", "restore_response", "watch_event"]
