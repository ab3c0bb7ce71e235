"""Daemon configuration: one frozen dataclass, validated at construction.

Precedence, lowest first: the defaults here, ``GHOSTSERVE_*`` environment
variables (``GHOSTSERVE_SOCKET``, ``GHOSTSERVE_SHM_PREFIX``, ...: the field name
upper-cased), then command-line flags. Nothing else in the code base picks a
port, a socket path or a shared-memory name.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ghostserve import shm
from ghostserve.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")

# How long a worker waits for a daemon that does not answer (one restarting, or
# descheduled on a busy node) before it runs unprotected: the clients' connect timeout.
CONNECT_WAIT_SECONDS = 20.0


def default_socket() -> str:
    """``$XDG_RUNTIME_DIR/ghostserve/ghostserve.sock``, else one under the temp dir per user."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"ghostserve-{os.getuid()}"
    )
    return os.path.join(base, "ghostserve", "ghostserve.sock")


@dataclass(frozen=True)
class Config:
    socket: str = dataclasses.field(default_factory=default_socket)
    listen: str = ""              # HOST:PORT for TCP, in addition to the socket
    tls_cert: str = ""
    tls_key: str = ""
    insecure: bool = False        # TCP without TLS; refused unless HOST is loopback
    metrics_port: int = 0         # Prometheus exposition; 0 disables
    metrics_host: str = "0.0.0.0"
    shm_prefix: str = "ghostserve-"
    encode_threads: int = 0       # 0: one per CPU
    pid_poll_seconds: float = 0.05  # only where the kernel gives no pidfds (they wake the watcher)
    log_level: str = "info"
    # Register refuses regions whose name does not start with this ("": any name)
    region_prefix: str = ""
    # a group whose engine ended by failure is kept this long for a resume, then dropped
    ended_ttl: float = 900.0
    rejoin_wait_seconds: float = 10.0   # a restore waits this long for survivors to rejoin and resend
    # a group whose oldest committed, unprotected step has waited longer than this shows as stalled
    stall_seconds: float = 30.0
    drain_seconds: float = 5.0          # SIGTERM: in-flight RPCs get this long to finish
    rpc_threads: int = 256              # gRPC handler threads (each worker stream holds one)
    # restore checks and decodes this many bytes of the lost rank at a time (all its
    # layers, at least a chunk of each; each restoring thread keeps a buffer this size),
    # over data still in cache (benchmarks/checkpoint.py --tile-bytes); 0: chunk by chunk
    restore_tile_bytes: int = 512 << 10
    # CUDA groups: each device's staging ring (peer sources, parity on its way to the
    # arena); a stripe longer than half of it is encoded in pieces
    cuda_staging_bytes: int = 64 << 20
    # a group's encoder takes up to this many consecutive ready steps in one encode (one
    # read of each block they wrote, one wake-up): it only merges steps that wait already
    coalesce_steps: int = 4
    # ... and waits up to this long for the next step before it encodes one alone (0: never
    # waits; a step's protection is then delayed by at most this, bounding lag to ~2 steps)
    coalesce_wait_seconds: float = 0.0
    # off-node mirror (docs/scale-out.md): "" keeps everything on this node and never imports Mooncake
    store: str = ""                     # mooncake://HOST:PORT[?metadata=URL&admin=HOST:PORT]
    node: str = ""                      # this node's name in status and logs ("": the host name)
    store_address: str = "127.0.0.1"    # HOST[:PORT] other nodes reach this node's segment at (no port: a free one)
    store_segment_bytes: int = 1 << 30  # host memory given to the store for other nodes' mirrors
    mirror_min_tokens: int = 512        # shorter requests are cheap to recompute: not mirrored
    mirror_backlog_blocks: int = 65536  # more blocks waiting than this: the oldest requests' mirroring is dropped
    store_retry_seconds: float = 2.0    # back-off after the store failed or refused

    def __post_init__(self) -> None:
        if not self.socket and not self.listen:
            raise ConfigError("socket", "give a unix socket path or --listen HOST:PORT")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.shm_prefix):
            raise ConfigError("shm_prefix", f"{self.shm_prefix!r}: use 1-64 of [A-Za-z0-9._-]")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", f"{self.metrics_port} is not a port")
        if self.encode_threads < 0:
            raise ConfigError("encode_threads", f"{self.encode_threads} must be >= 0 (0: one per CPU)")
        if self.pid_poll_seconds <= 0:
            raise ConfigError("pid_poll_seconds", f"{self.pid_poll_seconds} must be > 0")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError("log_level", f"{self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
        if self.region_prefix:
            try:
                shm.check_name(self.region_prefix)
            except ValueError:
                raise ConfigError("region_prefix", f"{self.region_prefix!r}: use letters, digits and ._-") from None
        if self.stall_seconds <= 0:
            raise ConfigError("stall_seconds", f"{self.stall_seconds} must be > 0")
        for name in ("ended_ttl", "rejoin_wait_seconds", "drain_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 0")
        if self.rpc_threads < 4:
            raise ConfigError("rpc_threads", f"{self.rpc_threads} must be >= 4")
        if self.restore_tile_bytes < 0:
            raise ConfigError("restore_tile_bytes", f"{self.restore_tile_bytes} must be >= 0 (0: no fused pass)")
        if self.coalesce_steps < 1:
            raise ConfigError("coalesce_steps", f"{self.coalesce_steps} must be >= 1 (1: a step per encode)")
        if not 0 <= self.coalesce_wait_seconds <= 5:
            raise ConfigError("coalesce_wait_seconds", f"{self.coalesce_wait_seconds} must be in 0..5")
        if self.cuda_staging_bytes < 64 << 10:
            raise ConfigError("cuda_staging_bytes", f"{self.cuda_staging_bytes} must be >= 65536")
        if self.store:
            from ghostserve.daemon.offnode.store import MIN_SEGMENT_BYTES, StoreUrl
            StoreUrl.parse(self.store)
            if self.store_segment_bytes < MIN_SEGMENT_BYTES:
                raise ConfigError("store_segment_bytes", f"{self.store_segment_bytes} must be >= {MIN_SEGMENT_BYTES}")
        if self.mirror_min_tokens < 1 or self.mirror_backlog_blocks < 1:
            raise ConfigError("mirror_min_tokens", "mirror_min_tokens and mirror_backlog_blocks must be >= 1")
        if self.store_retry_seconds <= 0:
            raise ConfigError("store_retry_seconds", f"{self.store_retry_seconds} must be > 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert", "give both --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key"):  # now, not after the socket is bound
            _check_readable(name, getattr(self, name))
        if self.listen:
            host, _, port = self.listen.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError("listen", f"{self.listen!r} is not HOST:PORT")
            if not self.tls_cert:
                if not self.insecure:
                    raise ConfigError("listen", "TCP needs --tls-cert/--tls-key, or --insecure on loopback")
                if not _is_loopback(host):
                    raise ConfigError("insecure", f"refused for non-loopback address {host!r}")

    @property
    def threads(self) -> int:
        return self.encode_threads or (os.cpu_count() or 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then ``GHOSTSERVE_*`` from ``env``, then ``overrides`` (None values ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("GHOSTSERVE_" + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(name, f"GHOSTSERVE_{name.upper()}={raw!r} is not a {kind}") from None
    return raw


def _check_readable(name: str, path: str) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise ConfigError(name, f"{path!r}: no such file" if not os.path.exists(path) else f"{path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(name, f"{path!r} is not readable by this user (uid {os.getuid()})")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
