"""The daemon's process: a gRPC server on the socket (and TCP if configured),
health, reflection, Prometheus metrics, signals. What it serves is
:class:`~ghostserve.daemon.daemon.Daemon` (the registry of groups) through
:class:`~ghostserve.daemon.service.Services` (the gRPC handlers).
"""

from __future__ import annotations

import logging
import os
import signal
import socket as socketlib
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

import ghostserve
from ghostserve import shm, wire
from ghostserve.config import Config
from ghostserve.daemon.daemon import Daemon
from ghostserve.daemon.service import Services
from ghostserve.errors import DaemonStartError

log = logging.getLogger("ghostserve.daemon")

SERVICES = tuple(wire.full_name(name) for name in wire.SERVICES)


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
        self.metrics_server: Any = None  # prometheus_client's WSGI server, when --metrics-port
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
        self.daemon.end_streams()  # ranks stay registered (detached); parity stays
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


__all__ = ["SERVICES", "Server", "add_reflection", "serve"]
