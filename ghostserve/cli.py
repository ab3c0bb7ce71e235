"""The ``ghostserve`` command: serve, demo, chaos, status, drop, bench.

Commands that report results accept ``--json`` and then print exactly one JSON
object on stdout (progress and tables go to stderr or are suppressed).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

from ghostserve.config import Config, ConfigError
from ghostserve.errors import GhostServeError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="unix socket path (env GHOSTSERVE_SOCKET)")
    p.add_argument("--listen", help="also listen on TCP HOST:PORT (needs TLS or --insecure on loopback)")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--insecure", action="store_true", default=None, help="TCP without TLS, loopback only")
    p.add_argument("--metrics-port", type=int, help="Prometheus exposition port; 0 disables")
    p.add_argument("--metrics-host")
    p.add_argument("--shm-prefix", help="prefix of shared-memory names (env GHOSTSERVE_SHM_PREFIX)")
    p.add_argument("--encode-threads", type=int, help="encoder threads; 0 = one per CPU")
    p.add_argument("--log-level")
    p.add_argument("--region-prefix", help="refuse ranks' regions whose name does not start with this")
    p.add_argument("--ended-ttl", type=float, help="seconds a failure-ended group is kept for a resume")


def config_from(args: argparse.Namespace) -> Config:
    keys = ("socket", "listen", "tls_cert", "tls_key", "insecure", "metrics_port", "metrics_host",
            "shm_prefix", "encode_threads", "log_level", "region_prefix", "ended_ttl")
    return Config.from_env(**{k: getattr(args, k, None) for k in keys})


def cmd_serve(args: argparse.Namespace) -> int:
    from ghostserve.daemon.server import serve  # noqa: PLC0415

    return serve(config_from(args))


def cmd_status(args: argparse.Namespace) -> int:
    from ghostserve.status import run_status  # noqa: PLC0415

    return run_status(args)


def cmd_drop(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    from ghostserve.client import OperatorClient  # noqa: PLC0415

    op = OperatorClient(args.socket or Config.from_env().socket, timeout=10)
    try:
        resp = op.drop(args.group, unlink_regions=args.unlink_regions)
    except grpc.RpcError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": exc.details(), "code": exc.code().name}))
        print(f"ghostserve: drop {args.group}: {exc.details()} ({exc.code().name})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "group": args.group, "released_bytes": resp.released_bytes}))
    else:
        print(f"dropped {args.group}: {resp.released_bytes / 2**20:.1f} MiB of parity released")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    from ghostserve.chaos.harness import run_cli  # noqa: PLC0415

    return run_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from ghostserve.demo import run_demo  # noqa: PLC0415

    return run_demo(args)


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this package runs from."""
    here = Path(os.environ.get("GHOSTSERVE_BENCHMARKS", Path(__file__).resolve().parent.parent / "benchmarks"))
    if not any(here.glob("*.py")):
        raise GhostServeError(f"benchmarks not found at {here}: run from a source checkout "
                              "or set GHOSTSERVE_BENCHMARKS")
    return here


def cmd_bench(args: argparse.Namespace) -> int:
    path = benchmarks_dir() / f"{args.name}.py"
    if not path.exists():
        available = sorted(p.stem for p in path.parent.glob("*.py") if not p.stem.startswith("_"))
        print(f"no benchmark {args.name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    module = runpy.run_path(str(path), run_name="ghostserve_bench")
    return int(module["main"](args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ghostserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon")
    _config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show a running daemon's groups and ranks")
    p.add_argument("--socket", help="daemon socket (env GHOSTSERVE_SOCKET)")
    p.add_argument("--group", default="", help="only this group")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=None,
                   help="refresh every N seconds (default 1)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("drop", help="forget an ended group (no rank alive): parity, index, mappings")
    p.add_argument("group")
    p.add_argument("--socket", help="daemon socket (env GHOSTSERVE_SOCKET)")
    p.add_argument("--unlink-regions", action="store_true",
                   help="also unlink the ranks' KV shared memory (after a resume, or to give up on it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_drop)

    from ghostserve.chaos.options import add_chaos_args  # noqa: PLC0415

    p = sub.add_parser("chaos", help="fault-injection run: daemon + synthetic workers + faults")
    add_chaos_args(p)
    p.set_defaults(func=cmd_chaos)

    from ghostserve.demo import add_demo_args  # noqa: PLC0415

    p = sub.add_parser("demo", help="a TP engine survives SIGKILLed ranks: recompute vs replicate vs ec")
    add_demo_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run a benchmark from benchmarks/ (codec, checkpoint, ...)")
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --json)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"ghostserve: configuration error: {exc}", file=sys.stderr)
        return 2
    except GhostServeError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(exc), "type": type(exc).__name__}))
        print(f"ghostserve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
