"""Command-line options of ``ghostserve demo``, apart from the demo itself.

Building the CLI parser imports this module only: the demo runs the reference
engine, which needs torch (the ``engine`` extra), and ``ghostserve serve`` or
``--help`` must work without it.
"""

from __future__ import annotations

import argparse

from ghostserve.errors import DemoOptionError

#: the engine's protection modes; ``none`` first: its failure-free run is the reference
MODES = ("none", "replicate", "ec")
#: what ``--modes`` accepts: the report names, and the engine's own ``none``
MODE_NAMES = {"recompute": "none", "none": "none", "replicate": "replicate", "ec": "ec"}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The demo's options, on ``p``."""
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel ranks")
    p.add_argument("--parity", type=int, default=1, help="ec parity shards m, 1..--tp")
    p.add_argument("--kill", action="append", default=None, metavar="RANK@TOKEN",
                   help="SIGKILL RANK once TOKEN tokens were generated in all (repeatable; "
                        "the same TOKEN kills at once; RANK@sSTEP for an engine step). "
                        "Default: rank 1 halfway through decoding")
    p.add_argument("--kill-phase", choices=("mid", "post"), default="mid",
                   help="mid: inside the forward pass; post: after it, before the commit")
    p.add_argument("--requests", type=int, default=4, help="requests, served together")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="first prompt; later ones are longer")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per request")
    p.add_argument("--modes", default="recompute,replicate,ec",
                   help="comma-separated subset of recompute (also spelled none), replicate, ec; "
                        "recompute always runs: it is the reference")
    p.add_argument("--weights", default="", help="a local Hugging Face Llama/Qwen2 safetensors directory "
                                                 "('': seeded random weights)")
    p.add_argument("--spares", type=int, default=0, help="hot spare rank processes")
    p.add_argument("--rounds", type=int, default=2, help="failure-free runs per mode, interleaved")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def parse_modes(text: str) -> list[str]:
    """``--modes`` -> engine modes in order, the reference ``none`` always first."""
    modes = []
    for name in (m.strip() for m in text.split(",")):
        if not name:
            continue
        if name not in MODE_NAMES:
            raise DemoOptionError(f"--modes: unknown mode {name!r}; choose from recompute, replicate, ec")
        if MODE_NAMES[name] not in modes:
            modes.append(MODE_NAMES[name])
    if "none" not in modes:
        modes.append("none")
    return sorted(modes, key=MODES.index)


def check_demo_args(args: argparse.Namespace) -> None:
    """Refuse values the demo cannot run with, naming the option and its value,
    before anything is started (or torch imported)."""
    for flag, value, low in (("--tp", args.tp, 1), ("--requests", args.requests, 1),
                             ("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 1),
                             ("--rounds", args.rounds, 1), ("--spares", args.spares, 0)):
        if value < low:
            raise DemoOptionError(f"{flag} {value}: must be >= {low}")
    if not 1 <= args.parity <= args.tp:
        raise DemoOptionError(f"--parity {args.parity}: must be in 1..{args.tp} (at least 1, at most --tp)")
    parse_modes(args.modes)
