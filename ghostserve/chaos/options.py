"""Command-line options of ``ghostserve chaos`` (kept apart so ``--help`` imports little)."""

from __future__ import annotations

import argparse


def rank_at(text: str) -> tuple[int, int]:
    """``RANK@STEP`` -> (rank, step)."""
    try:
        rank, step = text.split("@")
        return int(rank), int(step)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RANK@STEP, e.g. 1@20") from None


def add_chaos_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, default=4, help="TP ranks (data shards)")
    p.add_argument("--parity", type=int, default=1, help="parity shards m")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--blocks", type=int, default=64, help="KV blocks per rank")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--heads", type=int, default=2, help="KV heads per rank")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--requests", type=int, default=6, help="concurrent requests")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill", type=rank_at, action="append", default=[], metavar="RANK@STEP",
                   help="SIGKILL a worker before STEP and destroy its memory (repeatable; "
                        "several at one step fail together)")
    p.add_argument("--kill-daemon", type=int, action="append", default=[], metavar="STEP",
                   help="SIGKILL the daemon before STEP and restart it")
    p.add_argument("--corrupt", type=rank_at, action="append", default=[], metavar="RANK@STEP",
                   help="flip bytes of already-protected KV of RANK before STEP, silently")
    p.add_argument("--recover-after", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long after a fault before the replacement or restarted daemon starts")
    p.add_argument("--step-ms", type=float, default=0.0, help="pace steps (0: as fast as possible)")
    p.add_argument("--metrics-port", type=int, default=0, help="daemon metrics port (0: off)")
    p.add_argument("--socket", default="", help="daemon socket (default: a fresh temp path)")
    p.add_argument("--shm-prefix", default="", help="shared-memory prefix (default: unique per run)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
