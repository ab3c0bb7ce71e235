"""Configuration of ``ghostserve front`` and ``ghostserve vllm``: frozen
dataclasses, validated at construction (:class:`ConfigError` names the field).

Precedence, lowest first: the defaults here, ``GHOSTSERVE_FRONT_<FIELD>``
environment variables (front settings only), then command-line flags. Imports
nothing outside the standard library and ghostserve's own config (the CLI
builds its parser from these without the ``front`` extra).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from ghostserve import shm
from ghostserve.config import LOG_LEVELS, _parse, default_socket
from ghostserve.errors import ConfigError

ENV_PREFIX = "GHOSTSERVE_FRONT_"


@dataclass(frozen=True)
class FrontConfig:
    """The OpenAI-compatible front. ``upstream`` holds the base URLs
    (``http://host:port``) of the vLLM OpenAI servers it sends to (a string is
    split at commas); it is empty when ``ghostserve vllm`` supervises the
    upstreams and tells the front where they are."""

    upstream: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    port: int = 8080                  # 0: any free port (printed on the ready line)
    resume_wait: float = 300.0        # how long an accepted request waits for the upstream to come back
    health_interval: float = 0.5      # polling of the upstream's /health while waiting (standalone front)
    connect_timeout: float = 10.0     # TCP connect and /health probes to the upstream
    retry_after: int = 5              # Retry-After of a 503 (upstream down when a request arrives)
    max_moves: int = 3                # resumes per request (on another upstream or a restarted one); then failed
    handover_wait: float = 10.0       # a moved request waits this long at most for the dead engine's KV
    resume_info: bool = False         # add a "ghostserve" object (resumes, cached tokens) to responses
    upstream_parses_chat: bool = False  # the upstream runs a reasoning or tool-call parser: chat is not resumed
    drain_seconds: float = 30.0       # SIGTERM: in-flight requests get this long to finish
    log_level: str = "info"

    def __post_init__(self) -> None:
        ups = self.upstream
        if isinstance(ups, str):
            ups = tuple(u.strip() for u in ups.split(",") if u.strip())
        object.__setattr__(self, "upstream", tuple(ups))
        for one in self.upstream:
            url = urlsplit(one)
            if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
                raise ConfigError("upstream", f"{one!r}: give the server's base URL, "
                                  "e.g. http://127.0.0.1:8000")
            try:
                url.port  # noqa: B018 - validates the port
            except ValueError:
                raise ConfigError("upstream", f"{one!r}: bad port") from None
        if len(set(self.upstream_urls)) != len(self.upstream):
            raise ConfigError("upstream", "the same upstream is given twice")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError("port", f"{self.port!r} is not a port")
        if not self.host:
            raise ConfigError("host", "give an address to listen on")
        for name in ("resume_wait", "health_interval", "connect_timeout", "handover_wait"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"{getattr(self, name)} must be > 0")
        if self.drain_seconds < 0:
            raise ConfigError("drain_seconds", f"{self.drain_seconds} must be >= 0")
        if not isinstance(self.retry_after, int) or self.retry_after < 1:
            raise ConfigError("retry_after", f"{self.retry_after!r} must be a whole number of seconds >= 1")
        if not isinstance(self.max_moves, int) or self.max_moves < 0:
            raise ConfigError("max_moves", f"{self.max_moves!r} must be >= 0")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError("log_level", f"{self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        return tuple(u.rstrip("/") for u in self.upstream)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> FrontConfig:
        """Defaults, then ``GHOSTSERVE_FRONT_*`` from ``env``, then ``overrides`` (None ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                try:
                    values[f.name] = _parse(f.name, f.type, raw)
                except ConfigError as exc:  # name the variable the value came from
                    raise ConfigError(f.name, f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


#: vLLM server options ``ghostserve vllm`` sets itself; giving them after ``--`` is refused
OWNED_VLLM_OPTIONS = ("--host", "--port", "--uds", "--kv-transfer-config", "--headless")


@dataclass(frozen=True)
class SupervisorConfig:
    """``ghostserve vllm``: ``replicas`` vLLM OpenAI servers (each restarted
    when it or its engine dies), the ghostserve daemon they checkpoint into, and
    the front. ``devices``: each replica's ``CUDA_VISIBLE_DEVICES`` (empty: split
    the visible GPUs by the TP size, or nothing on a machine without GPUs);
    ``cpu_binds``: each replica's ``VLLM_CPU_OMP_THREADS_BIND`` on vLLM's CPU build
    (empty: every replica inherits the environment's, and they share the cores)."""

    vllm_args: tuple[str, ...]
    replicas: int = 1
    devices: tuple[str, ...] = ()
    cpu_binds: tuple[str, ...] = ()
    front: FrontConfig = dataclasses.field(default_factory=FrontConfig)
    socket: str = dataclasses.field(default_factory=lambda: os.environ.get("GHOSTSERVE_SOCKET") or default_socket())
    parity: int = 1
    kv_resume: bool = True            # off: resumed requests are recomputed (for comparisons)
    kv_shm_prefix: str = "gs-vllm-"   # the connector's names of the ranks' KV segments
    python: str = sys.executable      # the interpreter that runs vLLM's server (and a daemon we start)
    max_restarts: int = 10            # restarts allowed within restart_window before giving up
    restart_window: float = 3600.0
    backoff: float = 1.0              # first wait before restarting an engine that never became healthy
    backoff_max: float = 60.0
    startup_timeout: float = 900.0    # from start to a healthy /health
    health_interval: float = 1.0      # /health of a running engine
    health_failures: int = 3          # consecutive failed /health checks that declare the engine dead
    lost_wait: float = 2.0            # a dead worker: how long the daemon gets to mark its rank lost
    stop_timeout: float = 30.0        # SIGTERM to SIGKILL, for vLLM and for a daemon we started

    def __post_init__(self) -> None:
        args = tuple(self.vllm_args)
        if not args:
            raise ConfigError("vllm_args", "give vLLM's server arguments after --, e.g. -- --model MODEL")
        for a in args:
            name = a.split("=", 1)[0]
            if name in OWNED_VLLM_OPTIONS or name.startswith("--kv-connector"):
                raise ConfigError("vllm_args", f"{name}: ghostserve vllm sets this itself "
                                  "(use --port for the front's port)")
        if not self.socket:
            raise ConfigError("socket", "give the daemon's socket path")
        try:
            shm.check_name(self.kv_shm_prefix + "x")
        except ValueError:
            raise ConfigError("kv_shm_prefix", f"{self.kv_shm_prefix!r}: use letters, digits and ._-") from None
        if not isinstance(self.parity, int) or isinstance(self.parity, bool) or not 1 <= self.parity <= 254:
            raise ConfigError("parity", f"{self.parity!r}: an integer from 1 to 254")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError("max_restarts", f"{self.max_restarts!r} must be >= 0")
        if not isinstance(self.health_failures, int) or self.health_failures < 1:
            raise ConfigError("health_failures", f"{self.health_failures!r} must be >= 1")
        for name in ("restart_window", "startup_timeout", "health_interval", "stop_timeout", "backoff_max"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"{getattr(self, name)} must be > 0")
        for name in ("backoff", "lost_wait"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 0")
        if self.backoff > self.backoff_max:
            raise ConfigError("backoff", f"{self.backoff} exceeds --backoff-max {self.backoff_max}")
        if self.front.upstream:
            raise ConfigError("upstream", "ghostserve vllm runs the upstream itself")
        object.__setattr__(self, "vllm_args", args)
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or not 1 <= self.replicas <= 64:
            raise ConfigError("replicas", f"{self.replicas!r}: an integer from 1 to 64")
        for name, sep in (("devices", ":"), ("cpu_binds", ":")):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v for v in value.split(sep)) if value else ()
            value = tuple(value)
            object.__setattr__(self, name, value)
            if value and len(value) != self.replicas:
                raise ConfigError(name, f"{len(value)} groups for {self.replicas} replicas "
                                  f"(one per replica, separated by {sep!r})")
        for group in self.devices:
            ids = group.split(",")
            if len(ids) != self.tp_size or not all(i.strip() for i in ids):
                raise ConfigError("devices", f"{group!r}: give {self.tp_size} device(s) per replica "
                                  "(the TP size), e.g. 0,1:2,3")
        if len({d.strip() for g in self.devices for d in g.split(",")}) != self.tp_size * len(self.devices):
            raise ConfigError("devices", "a device is given to two replicas")

    @property
    def tp_size(self) -> int:
        """vLLM's --tensor-parallel-size (-tp) among the arguments; 1 if absent."""
        args = self.vllm_args
        for i, a in enumerate(args):
            name, _, value = a.partition("=")
            if name in ("--tensor-parallel-size", "-tp"):
                value = value or (args[i + 1] if i + 1 < len(args) else "")
                try:
                    return max(1, int(value))
                except ValueError:
                    raise ConfigError("vllm_args", f"{a} {value}: not a TP size") from None
        return 1

    def flag_given(self, name: str) -> bool:
        """Was vLLM option ``name`` (``--foo``) among the arguments after ``--``?"""
        return any(a == name or a.startswith(name + "=") for a in self.vllm_args)
