"""The ``ghostserve`` command: serve, demo, chaos, status, drop, bench, front, vllm.

Commands that report results accept ``--json`` and then print exactly one JSON
object on stdout, errors included (progress and tables go to stderr or are
suppressed). Exit status: 0 success, 1 a failed run or an error at run time,
2 a bad option or configuration value, or a missing optional extra.

Building the parser imports no command's implementation: ``serve``, ``status``,
``drop``, ``chaos`` and ``--help`` work on a plain ``pip install ghostserve``;
only ``demo`` and the engine benchmarks need the ``engine`` extra (torch),
``front`` the ``front`` extra (aiohttp) and ``vllm`` both ``front`` and ``vllm``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from ghostserve.config import Config, default_socket
from ghostserve.errors import ConfigError, GhostServeError, MissingExtra, UsageError
from ghostserve.extras import extra_of, require


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with errors raised as :class:`UsageError` (``--help`` still exits)."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self, message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless there is none to show
    (flags, and options whose default is taken from elsewhere and said in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default  # by identity: a default of 0 is worth showing, unlike False
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, str | list) and not d):
            return action.help
        return super()._get_help_string(action)


_DEFAULTS = {f.name: f.default for f in fields(Config)}


def _config_args(p: argparse.ArgumentParser) -> None:
    def env(name: str, default: Any = None) -> str:  # the help's "(env ...; default ...)"
        default = _DEFAULTS[name] if default is None else default
        shown = repr(default) if isinstance(default, str) else default
        return f"env GHOSTSERVE_{name.upper()}; default: {shown}"

    p.add_argument("--socket", metavar="PATH", help=f"unix socket path ({env('socket', default_socket())})")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="also listen on TCP HOST:PORT; needs --tls-cert/--tls-key, or --insecure on loopback "
                        "(env GHOSTSERVE_LISTEN; default: no TCP)")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain for --listen (env GHOSTSERVE_TLS_CERT)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key for --listen (env GHOSTSERVE_TLS_KEY)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="TCP without TLS, loopback addresses only (env GHOSTSERVE_INSECURE)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help=f"Prometheus exposition port, 0 disables ({env('metrics_port')})")
    p.add_argument("--metrics-host", metavar="HOST",
                   help=f"address the metrics port binds ({env('metrics_host')})")
    p.add_argument("--shm-prefix", metavar="PREFIX",
                   help="prefix of the daemon's shared-memory names; two daemons on one /dev/shm need "
                        f"different ones ({env('shm_prefix')})")
    p.add_argument("--encode-threads", type=int, metavar="N",
                   help=f"encoder threads, 0 = one per CPU ({env('encode_threads')})")
    p.add_argument("--log-level", metavar="{debug,info,warning,error}", help=f"log level ({env('log_level')})")
    p.add_argument("--region-prefix", metavar="PREFIX",
                   help="refuse ranks' regions whose name does not start with this "
                        "(env GHOSTSERVE_REGION_PREFIX; default: any name)")
    p.add_argument("--ended-ttl", type=float, metavar="SECONDS",
                   help=f"how long a failure-ended group is kept for a resume ({env('ended_ttl')})")
    p.add_argument("--cuda-staging-bytes", type=int, metavar="BYTES",
                   help="each GPU's staging buffer for CUDA groups (peer sources, parity on its way to "
                        f"host memory) ({env('cuda_staging_bytes')})")
    s = p.add_argument_group("off-node mirror (Mooncake Store; docs/scale-out.md)")
    s.add_argument("--store", metavar="URL",
                   help="mirror protected KV into this Mooncake Store: mooncake://HOST:PORT[?metadata=URL&"
                        f"admin=HOST:PORT] ({env('store')}; needs ghostserve[mooncake])")
    s.add_argument("--node", metavar="NAME", help=f"this node's name in status and logs ({env('node')})")
    s.add_argument("--store-address", metavar="HOST[:PORT]",
                   help=f"this node's address for the store's transfers ({env('store_address')})")
    s.add_argument("--store-segment-bytes", type=int, metavar="BYTES",
                   help=f"host memory this node gives the store for other nodes' mirrors ({env('store_segment_bytes')})")
    s.add_argument("--mirror-min-tokens", type=int, metavar="N",
                   help=f"mirror only requests with at least N protected tokens ({env('mirror_min_tokens')})")
    s.add_argument("--mirror-backlog-blocks", type=int, metavar="N",
                   help="blocks allowed to wait for the store before the oldest requests' mirroring is dropped "
                        f"({env('mirror_backlog_blocks')})")


def config_from(args: argparse.Namespace) -> Config:
    """The daemon's Config: defaults, then ``GHOSTSERVE_*``, then the flags given."""
    keys = ("socket", "listen", "tls_cert", "tls_key", "insecure", "metrics_port", "metrics_host",
            "shm_prefix", "encode_threads", "log_level", "region_prefix", "ended_ttl", "cuda_staging_bytes",
            "store", "node", "store_address", "store_segment_bytes", "mirror_min_tokens", "mirror_backlog_blocks")
    return Config.from_env(**{k: getattr(args, k, None) for k in keys})


def cmd_serve(args: argparse.Namespace) -> int:
    """``ghostserve serve``: validate the configuration, then run the daemon."""
    config = config_from(args)  # before the import: a bad value is reported fast
    from ghostserve.daemon.server import serve  # noqa: PLC0415

    return serve(config)


def cmd_status(args: argparse.Namespace) -> int:
    """``ghostserve status``."""
    from ghostserve.status import run_status  # noqa: PLC0415

    return run_status(args)


def cmd_drop(args: argparse.Namespace) -> int:
    """``ghostserve drop GROUP``: forget an ended group."""
    from ghostserve.client import OperatorClient  # noqa: PLC0415
    from ghostserve.errors import DaemonUnavailable  # noqa: PLC0415
    from ghostserve.status import daemon_socket  # noqa: PLC0415

    op = OperatorClient(daemon_socket(args.socket), timeout=10)
    try:
        resp = op.drop(args.group, unlink_regions=args.unlink_regions)
    except DaemonUnavailable:
        raise  # main() reports it
    except GhostServeError as exc:  # the daemon refused: its reason and code
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "code": exc.code}))
        print(f"ghostserve: drop {args.group}: {exc} ({exc.code})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, "group": args.group, "released_bytes": resp.released_bytes}))
    else:
        print(f"dropped {args.group}: {resp.released_bytes / 2**20:.1f} MiB of shared memory released")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    """``ghostserve chaos``."""
    from ghostserve.chaos.harness import run_cli  # noqa: PLC0415

    return run_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """``ghostserve demo``: needs the engine extra (torch)."""
    from ghostserve.demo_options import check_demo_args  # noqa: PLC0415

    check_demo_args(args)  # a bad value is named before torch is even looked for
    require("engine", "ghostserve demo")
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
    """``ghostserve bench NAME [ARGS]``: run ``benchmarks/NAME.py``'s ``main(ARGS)``."""
    path = benchmarks_dir() / f"{args.name}.py"
    if not path.exists():
        available = sorted(p.stem for p in path.parent.glob("*.py") if not p.stem.startswith("_"))
        print(f"no benchmark {args.name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    module = runpy.run_path(str(path), run_name="ghostserve_bench")
    return int(module["main"](args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Imports only the options modules of the commands."""
    from ghostserve.chaos.options import add_chaos_args  # noqa: PLC0415
    from ghostserve.demo_options import add_demo_args  # noqa: PLC0415
    from ghostserve.front import cli as front_cli  # noqa: PLC0415

    parser = ArgumentParser(prog="ghostserve", description=__doc__.split("\n\n")[0],
                            formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    _config_args(command("serve", "run the daemon", cmd_serve))

    p = command("status", "show a running daemon's groups and ranks", cmd_status)
    p.add_argument("--socket", metavar="PATH", help=f"daemon socket (env GHOSTSERVE_SOCKET; default: {default_socket()!r})")
    p.add_argument("--group", default="", help="only this group (default: every group)")
    p.add_argument("--json", action="store_true", help="print one JSON object (StatusResponse) instead of tables")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (1 if none given) until interrupted")

    p = command("drop", "forget an ended group (no rank alive): parity, index, mappings", cmd_drop)
    p.add_argument("group", help="the group's name, as `ghostserve status` lists it")
    p.add_argument("--socket", metavar="PATH", help=f"daemon socket (env GHOSTSERVE_SOCKET; default: {default_socket()!r})")
    p.add_argument("--unlink-regions", action="store_true",
                   help="also unlink the ranks' KV shared memory (after a resume, or to give up on it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    add_chaos_args(command("chaos", "fault-injection run: a private daemon, synthetic workers, faults",
                           cmd_chaos))
    add_demo_args(command("demo", "a TP engine survives SIGKILLed ranks: recompute vs replicate vs ec "
                                  "(needs the engine extra)", cmd_demo))

    front_cli.add_front_args(command(
        "front", "an OpenAI-compatible front for a vLLM server: requests survive engine failures "
                 "(needs the front extra)", front_cli.cmd_front))
    front_cli.add_vllm_args(command(
        "vllm", "vLLM's OpenAI server with ghostserve, restarted when it dies, behind the front: "
                "ghostserve vllm [OPTIONS] -- VLLM_ARGS (needs the front and vllm extras)", front_cli.cmd_vllm))

    p = command("bench", "run a benchmark from benchmarks/ (codec, checkpoint, serving, vllm_resume, "
                         "front_resume, sglang_resume, peers, node_loss)", cmd_bench)
    p.add_argument("name", help="the benchmark: a file name in benchmarks/ without .py")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --json)")
    return parser


def _wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False) or "--json" in (getattr(args, "rest", None) or ()))


def _fail(args: argparse.Namespace, message: str, exc: BaseException, status: int) -> int:
    if _wants_json(args):
        print(json.dumps({"ok": False, "error": str(exc), "type": type(exc).__name__}))
    print(f"ghostserve: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
        if "--json" in argv:
            print(json.dumps({"ok": False, "error": exc.message, "type": "UsageError"}))
        return 2
    try:
        return args.func(args)
    except MissingExtra as exc:
        return _fail(args, str(exc), exc, 2)
    except ConfigError as exc:
        return _fail(args, f"configuration error: {exc}", exc, 2)
    except GhostServeError as exc:
        # ValueError subclasses are bad option values; the rest happened at run time
        return _fail(args, str(exc), exc, 2 if isinstance(exc, ValueError) else 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        extra = extra_of(exc) if isinstance(exc, ModuleNotFoundError) else None
        if extra is not None:  # an import the command's own check did not foresee
            missing = MissingExtra(extra, f"ghostserve {args.command}", exc.name or "?")
            return _fail(args, str(missing), missing, 2)
        if not _wants_json(args):
            raise
        traceback.print_exc()  # the details, on stderr; stdout still gets its one object
        return _fail(args, f"unexpected error: {type(exc).__name__}: {exc}", exc, 1)


if __name__ == "__main__":
    sys.exit(main())
