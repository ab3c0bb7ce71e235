"""Command-line options of ``ghostserve front`` and ``ghostserve vllm``, and
their entry points. Building the options imports nothing beyond the standard
library (``--help`` works without the ``front`` extra); running checks the
configuration first, then the extras, then imports aiohttp."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import fields
from typing import Any

from ghostserve.errors import ConfigError
from ghostserve.extras import require
from ghostserve.front.config import ENV_PREFIX, FrontConfig, SupervisorConfig

_FRONT = {f.name: f.default for f in fields(FrontConfig)}
_SUP = {f.name: f.default for f in fields(SupervisorConfig) if not callable(f.default)}

# (field, flag, type, help)
FRONT_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("host", "--host", str, "address the front listens on"),
    ("port", "--port", int, "port the front listens on (0: any free port, printed as 'front port=N')"),
    ("resume_wait", "--resume-wait", float, "seconds an accepted request waits for an upstream to come back "
                                            "(when none is healthy to move it to)"),
    ("retry_after", "--retry-after", int, "Retry-After seconds of a 503 (the upstream is down when a request "
                                          "arrives)"),
    ("max_moves", "--max-moves", int, "resumes per request (moved to another upstream or to a restarted one) "
                                      "before it is failed"),
    ("handover_wait", "--handover-wait", float, "ghostserve vllm: seconds a moved request waits at most for the "
                                                "dead engine's ghostserve group to end (its KV then loads)"),
    ("health_interval", "--health-interval", float, "seconds between /health probes of the upstreams "
                                                    "(ghostserve front)"),
    ("connect_timeout", "--connect-timeout", float, "seconds to connect to the upstream"),
    ("drain_seconds", "--drain-seconds", float, "SIGTERM: seconds in-flight requests get to finish"),
    ("log_level", "--log-level", str, "log level: debug, info, warning, error"),
]


def _front_args(p: argparse.ArgumentParser) -> None:
    for name, flag, kind, text in FRONT_OPTIONS:
        p.add_argument(flag, dest=name, type=kind, default=None,
                       help=f"{text} (env {ENV_PREFIX}{name.upper()}; default: {_FRONT[name]!r})")
    p.add_argument("--resume-info", dest="resume_info", action="store_true", default=None,
                   help="add a 'ghostserve' object to responses: each resume's tokens, cached tokens and gap "
                        f"(env {ENV_PREFIX}RESUME_INFO)")
    p.add_argument("--upstream-parses-chat", dest="upstream_parses_chat", action="store_true", default=None,
                   help="the upstream runs a reasoning or tool-call parser: chat requests are relayed, not "
                        f"resumed (env {ENV_PREFIX}UPSTREAM_PARSES_CHAT)")


def add_front_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", metavar="URL", action="append", default=None,
                   help="a vLLM OpenAI server's base URL, e.g. http://127.0.0.1:8000; repeat it for several "
                        "(same model and layout): new requests go to the healthy one with the fewest in flight, "
                        f"and a request whose upstream dies moves to another (env {ENV_PREFIX}UPSTREAM, "
                        "comma-separated)"),
    _front_args(p)


def add_vllm_args(p: argparse.ArgumentParser) -> None:
    _front_args(p)
    p.add_argument("--socket", metavar="PATH", default=None,
                   help="the ghostserve daemon's socket: used if a daemon answers there, else one is started "
                        "there (env GHOSTSERVE_SOCKET; default: ghostserve serve's)")
    p.add_argument("--parity", type=int, default=None, help=f"parity shards per stripe (default: {_SUP['parity']})")
    p.add_argument("--kv-shm-prefix", default=None,
                   help=f"prefix of the ranks' KV shared memory (default: {_SUP['kv_shm_prefix']!r})")
    p.add_argument("--no-kv-resume", dest="kv_resume", action="store_false", default=None,
                   help="the connector does not load ended engines' KV: resumed requests are recomputed "
                        "(for comparisons)")
    p.add_argument("--replicas", type=int, default=None,
                   help="vLLM servers behind the front, each with its own engine and ghostserve group on the one "
                        "daemon; a request whose engine dies moves to a live one with its KV "
                        f"(default: {_SUP['replicas']}: it waits for the restart)")
    p.add_argument("--devices", default=None, metavar="IDS:IDS",
                   help="each replica's CUDA_VISIBLE_DEVICES, separated by ':' (e.g. 0,1:2,3); default: the "
                        "visible GPUs split by the TP size")
    p.add_argument("--cpu-binds", dest="cpu_binds", default=None, metavar="BIND:BIND",
                   help="vLLM's CPU build: each replica's VLLM_CPU_OMP_THREADS_BIND, separated by ':' "
                        "(e.g. 0|1:2|3); default: every replica inherits the environment's and they share cores")
    p.add_argument("--python", default=None, help="the interpreter that runs vLLM (default: this one)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help=f"engine restarts allowed within --restart-window (default: {_SUP['max_restarts']})")
    p.add_argument("--restart-window", type=float, default=None,
                   help=f"seconds (default: {_SUP['restart_window']:g})")
    p.add_argument("--backoff", type=float, default=None,
                   help=f"first wait before restarting an engine that died starting (default: {_SUP['backoff']:g}); "
                        "doubles each time")
    p.add_argument("--backoff-max", type=float, default=None, help=f"(default: {_SUP['backoff_max']:g})")
    p.add_argument("--startup-timeout", type=float, default=None,
                   help=f"seconds for vLLM to become healthy (default: {_SUP['startup_timeout']:g})")
    p.add_argument("--engine-health-interval", dest="engine_health_interval", type=float, default=None,
                   help=f"seconds between /health checks of a running engine (default: {_SUP['health_interval']:g})")
    p.add_argument("--health-failures", type=int, default=None,
                   help=f"failed /health checks in a row that declare the engine dead (default: {_SUP['health_failures']})")
    p.add_argument("--stop-timeout", type=float, default=None,
                   help=f"seconds from SIGTERM to SIGKILL for vLLM and the daemon (default: {_SUP['stop_timeout']:g})")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_ARGS",
                   help="vLLM OpenAI server arguments (--model ... --tensor-parallel-size N ...)")


def front_config(args: argparse.Namespace, standalone: bool) -> FrontConfig:
    values = {name: getattr(args, name, None) for name in _FRONT}
    if standalone:
        values["upstream"] = args.upstream
        config = FrontConfig.from_env(**values)
        if not config.upstream:
            raise ConfigError("upstream", "give --upstream URL (a vLLM OpenAI server; repeat it for several)")
        return config
    # ghostserve vllm runs its own upstream: GHOSTSERVE_FRONT_UPSTREAM is not for it
    return FrontConfig.from_env({k: v for k, v in os.environ.items() if k != ENV_PREFIX + "UPSTREAM"}, **values)


def supervisor_config(args: argparse.Namespace) -> SupervisorConfig:
    rest = list(args.vllm_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    values: dict[str, Any] = {
        "socket": args.socket, "parity": args.parity, "replicas": args.replicas, "devices": args.devices,
        "cpu_binds": args.cpu_binds, "kv_shm_prefix": args.kv_shm_prefix, "kv_resume": args.kv_resume,
        "python": args.python, "max_restarts": args.max_restarts, "restart_window": args.restart_window,
        "backoff": args.backoff, "backoff_max": args.backoff_max, "startup_timeout": args.startup_timeout,
        "health_interval": args.engine_health_interval, "health_failures": args.health_failures,
        "stop_timeout": args.stop_timeout}
    return SupervisorConfig(vllm_args=tuple(rest), front=front_config(args, standalone=False),
                            **{k: v for k, v in values.items() if v is not None})


def cmd_front(args: argparse.Namespace) -> int:
    """``ghostserve front``: validate, check the extra, serve until SIGTERM/SIGINT."""
    config = front_config(args, standalone=True)
    require("front", "ghostserve front")
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve_front(config))


async def _serve_front(config: FrontConfig) -> int:
    from ghostserve.front.app import Front  # noqa: PLC0415
    from ghostserve.front.upstream import Upstreams  # noqa: PLC0415

    front = Front(config, Upstreams(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await front.start()
    except ConfigError:  # upstreams serving different models
        await front.upstreams.close()
        raise
    print(f"front port={port}", flush=True)
    logging.getLogger("ghostserve.front").info("front on %s:%d, upstreams %s", config.host, port,
                                               ", ".join(config.upstream))
    await stop.wait()
    await front.stop()
    return 0


def cmd_vllm(args: argparse.Namespace) -> int:
    """``ghostserve vllm``: validate, check the extras, supervise until SIGTERM/SIGINT."""
    config = supervisor_config(args)
    require("front", "ghostserve vllm")
    require("vllm", "ghostserve vllm")
    from ghostserve.front.supervisor import run  # noqa: PLC0415

    return run(config)
