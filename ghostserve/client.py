"""Clients of the daemon: :class:`WorkerClient` for engine ranks, :class:`OperatorClient`
for tools.

A worker registers its KV region once, then calls :meth:`WorkerClient.commit`
after every step. ``commit`` builds one small message and appends it to an
in-process queue (tens of microseconds, no network): a background thread owns the
gRPC stream, sends commits in order, and applies acknowledgements. Commits not
yet acknowledged as protected are kept and re-sent if the daemon restarts, so a
daemon crash loses nothing the engine committed.

A daemon that goes away (SIGKILLed, restarting) never fails the engine: ``register``
waits for it (``connect_wait`` seconds), the background thread registers again
when it is back and resends, and a rank whose daemon stays away longer than the
client can hold its commits (``max_unacked``) stops protecting, says so
(:attr:`WorkerClient.link`, a warning in the log) and lets the engine run on.

Thread safety: ``commit`` is meant to be called from one thread (the engine's
step loop); the read-only properties and ``wait_protected`` from any thread.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import grpc
import numpy as np

from ghostserve import wire
from ghostserve.config import CONNECT_WAIT_SECONDS
from ghostserve.errors import DaemonInternalError, DaemonUnavailable, GhostServeError
from ghostserve.v1 import ghostserve_pb2 as pb

_END = object()
log = logging.getLogger("ghostserve.client")



class Link(StrEnum):
    """Where a :class:`WorkerClient`'s protection stands."""

    NEW = "new"              # not registered yet
    PROTECTED = "protected"  # registered; commits flow to the daemon
    REJOINING = "rejoining"  # the daemon went away: registering again, commits kept for the resend
    UNPROTECTED = "unprotected"  # the daemon refused the rank, or stayed away too long: nothing is sent
    CLOSED = "closed"


def target_of(socket_or_target: str) -> str:
    """A gRPC target: ``unix:PATH`` for a socket path, else as given (``host:port``)."""
    if socket_or_target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return socket_or_target
    if "/" in socket_or_target or socket_or_target.endswith(".sock"):
        return "unix:" + os.path.abspath(socket_or_target)
    return socket_or_target


# Reconnect fast: on one node a restarted daemon is back within a second. gRPC reads
# min_reconnect_backoff_ms as the *minimum connect timeout*: set low, a daemon that is
# descheduled for a moment (a busy node) fails fresh channels' calls with UNAVAILABLE
# ("timed out before receiving SETTINGS frame") however long their deadline.
CONNECT_WAIT = CONNECT_WAIT_SECONDS  # how long a registration waits for a daemon to answer
CONNECT_TIMEOUT_MS = int(CONNECT_WAIT_SECONDS * 1000)
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
]


def channel(socket_or_target: str) -> grpc.Channel:
    return grpc.insecure_channel(target_of(socket_or_target), options=CHANNEL_OPTIONS)


def worker_stub(ch: grpc.Channel) -> Any:
    """The Worker service's raw stub: calls raise ``grpc.RpcError`` (tests of the wire)."""
    return wire.stub(ch, "Worker", raw=True)


def operator_stub(ch: grpc.Channel) -> Any:
    """The Operator service's raw stub: calls raise ``grpc.RpcError`` (tests of the wire)."""
    return wire.stub(ch, "Operator", raw=True)


class WorkerClient:
    """One TP rank's connection. ``layout`` has the fields of ``KVLayout``;
    ``keep_survivors`` is RegisterRequest's (engines that tear all ranks down).
    A rank whose KV lies in several regions (``layout["extents"]`` name them by
    index) passes them all as ``regions`` [(name, size), ...]; ``region`` and
    ``region_size`` are then the first. ``connect_wait``: seconds a registration
    waits for a daemon that does not answer; ``max_unacked``: commits kept for a
    daemon that went away before the rank gives up protecting."""

    def __init__(self, socket: str, group: str, rank: int, world_size: int, parity: int,
                 layout: Mapping[str, Any], region: str, region_size: int, pid: int | None = None,
                 reconnect: bool = True, timeout: float = 10.0, keep_survivors: bool = False,
                 namespace: str = "", regions: Sequence[tuple[str, int] | pb.Region] = (),
                 connect_wait: float = CONNECT_WAIT, max_unacked: int = 1 << 16):
        self.socket, self.group, self.rank = socket, group, rank
        self.world_size, self.parity = world_size, parity
        self.layout, self.region, self.region_size = dict(layout), region, region_size
        self.regions = list(regions)
        self.pid = pid or os.getpid()
        self.reconnect, self.timeout = reconnect, timeout
        self.connect_wait, self.max_unacked = connect_wait, max_unacked
        self.link = Link.NEW
        self.keep_survivors, self.namespace = keep_survivors, namespace
        self.role: str | None = None
        self.session = ""
        self.events: queue.Queue[pb.GroupEvent] = queue.Queue()
        self.errors: list[GhostServeError] = []
        self._channel = channel(socket)
        self._stub = wire.stub(self._channel, "Worker")  # typed: a refusal raises its ghostserve error
        self._cond = threading.Condition()
        self._protected = -1
        self._watermarks: dict[str, int] = {}
        self._unacked: collections.deque[tuple] = collections.deque()
        self._sendq: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()  # what a waiting rejoin sleeps on
        self._last_step = -1               # the newest step committed
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- calls

    def _register_request(self) -> pb.RegisterRequest:
        return pb.RegisterRequest(
            group=self.group, rank=self.rank, world_size=self.world_size, parity=self.parity,
            layout=pb.KVLayout(**self.layout),
            region=pb.Region(shm_name=self.region, size=self.region_size), pid=self.pid,
            keep_survivors=self.keep_survivors, namespace=self.namespace,
            regions=[r if isinstance(r, pb.Region) else pb.Region(shm_name=r[0], size=r[1]) for r in self.regions],
            last_step=self._last_step if self._last_step >= 0 else None)

    def _register_call(self, wait: float) -> pb.RegisterResponse:
        """One Register, waiting up to ``wait`` seconds for a daemon that does not
        answer (``wait_for_ready``: no busy loop while it restarts). Raises
        :class:`DaemonUnavailable` when none answered, the daemon's error when it refused."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            try:
                return self._stub.Register(self._register_request(), timeout=max(0.05, min(left, self.timeout)),
                                           wait_for_ready=True)
            except DaemonUnavailable as exc:
                if deadline - time.monotonic() <= 0:
                    raise DaemonUnavailable(f"no ghostserve daemon answered on {self.socket} within "
                                            f"{wait:g} s: {exc}") from exc
                # an RPC cut off by a daemon dying under it: again, once the channel is back
                self._closing.wait(0.05)

    def register(self, wait: float | None = None) -> pb.RegisterResponse:
        """Register (or re-register) this rank and open the commit stream. A daemon
        that does not answer (restarting, not started yet) is waited for up to
        ``wait`` seconds (default ``connect_wait``), then :class:`DaemonUnavailable`;
        a refusal is raised at once as the daemon's error (:mod:`ghostserve.errors`)."""
        resp = self._register_call(self.connect_wait if wait is None else wait)
        self.link = Link.PROTECTED
        self.role = pb.RegisterResponse.Role.Name(resp.role)
        self.session = resp.session
        with self._cond:
            self._protected = max(self._protected, resp.protected_step) if self.role != "REPLACEMENT" \
                else resp.protected_step
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"gs-client-{self.rank}", daemon=True)
            self._open_stream()
            self._thread.start()
        return resp

    def commit(self, step: int, dirty: Iterable[tuple[int, int, int]] = (),
               requests: Mapping[str, int] | None = None, freed: Iterable[int] = (),
               finished: Iterable[str] = (), fills: Mapping[int, int] | None = None,
               released: Iterable[int] = (), records: Iterable[pb.RequestRecord] = (),
               cuda_event: bytes = b"") -> None:
        """Queue step ``step``'s writes: ``dirty`` (block, start, end) byte ranges,
        request lengths after the step, freed blocks, finished requests; for
        slot-addressed layouts also ``fills`` (block -> filled slots), blocks
        ``released`` before this step wrote them, and Lookup ``records``. Never
        waits on the network; costs building one small message."""
        # Built here, not on the sender thread: a Python-heavy sender would hold the
        # GIL for up to a switch interval (5 ms) while the engine waits to run.
        if self.link == Link.UNPROTECTED:
            return
        requests = requests or {}
        msg = pb.WorkerMessage(commit=pb.Commit(
            step=step, dirty=np.asarray(dirty, dtype="<u8").tobytes(),
            request_ids=requests.keys(), request_tokens=requests.values(),
            freed_blocks=freed, finished_requests=finished,
            fills=np.asarray(list((fills or {}).items()), dtype="<u4").tobytes(),
            released_blocks=released, records=records, cuda_event=cuda_event))
        item = (step, msg)
        with self._send_lock:
            self._last_step = max(self._last_step, step)
            self._unacked.append(item)
            self._sendq.put(item)
            if len(self._unacked) > self.max_unacked:
                self._give_up(f"{len(self._unacked)} commits not acknowledged (the daemon on {self.socket} "
                              "has been away too long)")

    def restore(self) -> pb.RestoreResponse:
        """Ask the daemon to rebuild this (replacement) rank's protected KV."""
        resp = self._stub.Restore(pb.RestoreRequest(group=self.group, rank=self.rank,
                                                    session=self.session), timeout=600)
        with self._cond:
            self._protected = resp.protected_step
            self._watermarks = {w.request_id: w.tokens for w in resp.watermarks}
        return resp

    def lookup(self, tokens: Iterable[int]) -> pb.LookupResponse:
        """The ended group (of this client's namespace) holding protected KV for the
        longest prefix of ``tokens``."""
        return self._stub.Lookup(pb.LookupRequest(tokens=np.asarray(list(tokens), dtype="<u4").tobytes(),
                                                  namespace=self.namespace), timeout=self.timeout)

    def release(self, step: int, requests: Iterable[str] = (), blocks: Iterable[int] = ()) -> None:
        """Before running ``step``: forget ``requests`` and void ``blocks`` (which the
        step may reuse) now. Waits for the daemon (one round trip)."""
        self._stub.Release(pb.ReleaseRequest(group=self.group, rank=self.rank, session=self.session, step=step,
                                             request_ids=list(requests), blocks=list(blocks)),
                           timeout=self.timeout)

    def fetch(self, source_group: str, source_rank: int, source_blocks: Iterable[int], tokens: int,
              blocks: Iterable[int]) -> pb.FetchResponse:
        """Have the daemon write ``source_group``'s rank ``source_rank`` blocks into
        this rank's ``blocks`` (rebuilt from parity if that rank was lost). Blocks
        until written; this rank must not touch those blocks meanwhile."""
        return self._stub.Fetch(pb.FetchRequest(
            source_group=source_group, source_rank=source_rank, source_blocks=list(source_blocks),
            tokens=tokens, group=self.group, rank=self.rank, session=self.session,
            blocks=list(blocks)), timeout=600)

    @property
    def protected_step(self) -> int:
        return self._protected

    @property
    def watermarks(self) -> dict[str, int]:
        with self._cond:
            return dict(self._watermarks)

    def wait_protected(self, step: int, timeout: float = 10.0) -> bool:
        """Block until ``step`` is protected; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._protected < step:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def goodbye(self, release_region: bool = False) -> None:
        """End this rank cleanly (its engine shuts down), then close. Unlike
        :meth:`close`, this is not a failure: once every rank of the group has
        said goodbye, the daemon drops the group's parity at once, and with
        ``release_region`` unlinks this rank's region too (hand over only a
        segment made for ghostserve). Commits queued before are sent first."""
        msg = pb.WorkerMessage(goodbye=pb.Goodbye(release_region=release_region))
        with self._send_lock:
            self._sendq.put((None, msg))
        self.close()

    def close(self) -> None:
        """End the stream without a goodbye (the daemon then treats this rank as
        lost, as if the worker had died) and the channel."""
        self._closed = True
        self.link = Link.CLOSED
        self._closing.set()
        with self._send_lock:
            self._sendq.put(_END)
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
        self._channel.close()

    def reclaim(self, nbytes: int) -> pb.ReclaimResponse:
        """Before allocating ``nbytes`` of shared memory: have the daemon drop
        groups of engines that ended by failure, oldest first, until that much is free."""
        return self._stub.Reclaim(pb.ReclaimRequest(bytes=nbytes), timeout=self.timeout)

    # ---------------------------------------------------------------- stream

    def _open_stream(self) -> None:
        hello = pb.WorkerMessage(hello=pb.Hello(group=self.group, rank=self.rank, session=self.session))
        with self._send_lock:
            self._sendq.put(_END)  # ends the old request iterator, if any
            self._sendq = queue.Queue()
            for item in self._unacked:
                if item[0] > self._protected:
                    self._sendq.put(item)
            self._call = self._stub.Stream(self._requests(hello, self._sendq))

    def _requests(self, hello: pb.WorkerMessage, q: queue.Queue) -> Iterator[pb.WorkerMessage]:
        yield hello
        while True:
            item = q.get()
            if item is _END:
                return
            yield item[1]

    def _run(self) -> None:
        while True:
            try:
                for msg in self._call:
                    self._apply(msg)
                if self._closed:
                    return
            except grpc.RpcError as rpc:
                if self._closed or self.link == Link.UNPROTECTED:
                    return
                exc = wire.error_from(rpc)
                self.errors.append(exc)
                # the daemon went away (UNAVAILABLE, CANCELLED) or failed on a valid message
                # (INTERNAL: it ended the stream, not the rank): register again and resend
                if not isinstance(exc, DaemonUnavailable | DaemonInternalError):
                    with self._send_lock:
                        self._give_up(f"the daemon refused this rank's stream: {exc.code}: {exc}")
                    return  # surface it, do not loop
            if not self.reconnect or self._closed or self.link == Link.UNPROTECTED:
                return
            if not self._rejoin():
                return

    def _rejoin(self) -> bool:
        """The daemon went away: register again until it is back (sleeping on the
        channel, backing off), then resend. False if it refused the rank (or the
        client closed): protection has ended."""
        self.link = Link.REJOINING
        log.info("ghostserve: rank %d of %s: the daemon on %s went away; registering again", self.rank,
                 self.group, self.socket)
        delay = 0.02
        while not self._closed and self.link == Link.REJOINING:
            try:
                # short attempts: close() must not wait for one
                resp = self._stub.Register(self._register_request(), timeout=1.0, wait_for_ready=True)
            except DaemonUnavailable:
                self._closing.wait(delay)
                delay = min(2 * delay, 1.0)
                continue
            except GhostServeError as exc:
                self.errors.append(exc)
                with self._send_lock:
                    self._give_up(f"the daemon refused this rank again: {exc.code}: {exc}")
                return False
            self.session = resp.session
            with self._cond:
                self._protected = max(self._protected, resp.protected_step)
            self.link = Link.PROTECTED
            log.info("ghostserve: rank %d of %s registered again (%s) at protected step %d", self.rank, self.group,
                     pb.RegisterResponse.Role.Name(resp.role), resp.protected_step)
            self._open_stream()
            return True
        return False

    def _give_up(self, why: str) -> None:
        """Stop protecting (the engine runs on): drop what is queued, end the stream.
        Caller holds ``_send_lock``."""
        if self.link in (Link.UNPROTECTED, Link.CLOSED):
            return
        self.link = Link.UNPROTECTED
        log.warning("ghostserve: rank %d of %s is no longer protected: %s", self.rank, self.group, why)
        self._unacked.clear()
        self._sendq.put(_END)

    def _apply(self, msg: pb.DaemonMessage) -> None:
        if msg.WhichOneof("msg") == "ack":
            with self._cond:
                self._protected = max(self._protected, msg.ack.protected_step)
                for w in msg.ack.watermarks:
                    if w.tokens:
                        self._watermarks[w.request_id] = w.tokens
                    else:
                        self._watermarks.pop(w.request_id, None)
                while self._unacked and self._unacked[0][0] <= self._protected:
                    self._unacked.popleft()
                self._cond.notify_all()
        else:
            self.events.put(msg.event)


@dataclass
class Watched:
    """A group as a watch has seen it so far (:meth:`OperatorClient.wait`)."""

    group: str
    protected_step: int = -1
    state: str = ""                                          # healthy, degraded, stalled, ended, dropped
    ranks: dict[int, str] = field(default_factory=dict)     # rank -> state
    process_ended: dict[int, bool] = field(default_factory=dict)
    restored: set[int] = field(default_factory=set)         # ranks whose restore finished during the watch

    def apply(self, ev: pb.WatchEvent) -> None:
        self.protected_step = max(self.protected_step, ev.protected_step)
        self.state = ev.state
        kind = pb.WatchEvent.Kind.Name(ev.kind)
        if kind == "SNAPSHOT":
            self.protected_step = ev.protected_step
            self.ranks = {r.rank: r.state for r in ev.ranks}
            self.process_ended = {r.rank: r.process_ended for r in ev.ranks}
        elif kind == "RANK_STATE":
            self.ranks[ev.rank] = ev.rank_state
            self.process_ended[ev.rank] = ev.process_ended
        elif kind == "RANK_RESTORED":
            self.restored.add(ev.rank)


class OperatorClient:
    """Status, scrub, manual restore, drop, and waiting on what happens (Watch);
    health through ``grpc.health.v1``. A daemon's refusal raises its
    :mod:`ghostserve.errors` class."""

    def __init__(self, socket: str, timeout: float = 10.0):
        self._channel = channel(socket)
        self._stub = wire.stub(self._channel, "Operator")
        self.socket, self.timeout = socket, timeout

    def _call(self, name: str, request: Any, timeout: float | None = None) -> Any:
        """Call ``name``; the daemon's refusal raises its ghostserve error."""
        try:
            return getattr(self._stub, name)(request, timeout=timeout or self.timeout)
        except DaemonUnavailable as exc:
            raise DaemonUnavailable(f"no ghostserve daemon answers on {self.socket}: {exc}") from exc

    def status(self, group: str = "") -> pb.StatusResponse:
        return self._call("Status", pb.StatusRequest(group=group))

    def scrub(self, group: str) -> pb.ScrubResponse:
        return self._call("Scrub", pb.ScrubRequest(group=group), timeout=600)

    def restore(self, group: str, rank: int) -> pb.RestoreResponse:
        return self._call("Restore", pb.RestoreRequest(group=group, rank=rank), timeout=600)

    def drop(self, group: str, unlink_regions: bool = False) -> pb.DropResponse:
        """Forget an ended group (no rank alive): parity, index, mappings."""
        return self._call("Drop", pb.DropRequest(group=group, unlink_regions=unlink_regions))

    def watch(self, group: str = "", timeout: float | None = None) -> Iterator[pb.WatchEvent]:
        """Operator.Watch, started now: a snapshot of each group (``group``: just
        that one), then every change, until ``timeout`` (None: no end) or the
        daemon stops. A refusal raises its ghostserve error when iterated."""
        call = self._stub.Watch(pb.WatchRequest(group=group), timeout=timeout)

        def events() -> Iterator[pb.WatchEvent]:
            try:
                yield from call
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return
                raise wire.error_from(exc) from exc
            finally:
                call.cancel()
        return events()

    def wait(self, group: str, until: Callable[[Watched], bool], timeout: float, what: str = "") -> Watched:
        """Follow ``group`` until ``until(seen)`` holds; the :class:`Watched` then.
        Raises TimeoutError after ``timeout`` seconds (naming ``what`` and what was
        seen), :class:`DaemonUnavailable` if the daemon went away."""
        seen = Watched(group)
        for ev in self.watch(group, timeout):
            seen.apply(ev)
            if pb.WatchEvent.Kind.Name(ev.kind) == "GROUP_DROPPED":
                seen.state = "dropped"
            if until(seen):
                return seen
        if seen.state == "" and seen.protected_step < 0 and not seen.ranks:
            raise DaemonUnavailable(f"the watch of {group!r} on {self.socket} ended before it began")
        raise TimeoutError(f"{what or 'condition'} not reached within {timeout:g} s; seen: {seen}")

    def wait_ranks(self, group: str, states: Mapping[int, str | Iterable[str]], timeout: float) -> Watched:
        """Until each rank of ``states`` is in its state (or one of its states)."""
        want = {r: {s} if isinstance(s, str) else set(s) for r, s in states.items()}
        return self.wait(group, lambda w: all(w.ranks.get(r) in s for r, s in want.items()), timeout,
                         f"ranks {dict(states)}")

    def wait_protected(self, group: str, step: int, timeout: float) -> Watched:
        """Until ``group`` has protected ``step``."""
        return self.wait(group, lambda w: w.protected_step >= step, timeout, f"step {step} protected")

    def wait_ended(self, group: str, timeout: float) -> Watched:
        """Until ``group``'s engine has ended (or the group was dropped)."""
        return self.wait(group, lambda w: w.state in ("ended", "dropped"), timeout, "the engine's end")

    def healthy(self, wait_for_ready: bool = False) -> bool:
        """Does the daemon answer SERVING? With ``wait_for_ready``, one that does not
        answer yet (restarting) is waited for up to the client's timeout."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()
