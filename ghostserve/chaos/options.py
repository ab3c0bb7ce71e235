"""Command-line options of ``ghostserve chaos`` and their checks (kept apart so
``--help`` imports little), and the harness's errors."""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Iterable
from enum import StrEnum

from ghostserve import shm
from ghostserve.errors import ChaosOptionError

MAX_SHARDS = 255  # data + parity shards of one stripe: GF(2^8) has 255 evaluation points


class KvDevice(StrEnum):
    """Where the chaos workers keep their KV."""

    HOST = "host"   # POSIX shared memory: the CPU data path
    CUDA = "cuda"   # a GPU allocation exported over CUDA IPC: the CUDA data path


class DaemonMoment(StrEnum):
    """When a ``--kill-daemon`` SIGKILLs the daemon (and starts it again)."""

    STEP = "step"          # before the step's writes
    DEATH = "death"        # right after the step's planned worker deaths, before the daemon may have seen them
    REGISTER = "register"  # once those deaths are seen, while their replacements register


def daemon_at(text: str) -> tuple[DaemonMoment, int]:
    """``STEP`` or ``MOMENT@STEP`` -> (moment, step)."""
    moment, _, step = text.rpartition("@")
    try:
        return DaemonMoment(moment or DaemonMoment.STEP), int(step)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected STEP or MOMENT@STEP, MOMENT one of {', '.join(m.value for m in DaemonMoment)} "
            "(e.g. 20, death@20)") from None


def rank_at(text: str) -> tuple[int, int]:
    """``RANK@STEP`` -> (rank, step)."""
    try:
        rank, step = text.split("@")
        return int(rank), int(step)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RANK@STEP, e.g. 1@20") from None


def add_chaos_args(p: argparse.ArgumentParser) -> None:
    """The chaos run's options, on ``p``."""
    p.add_argument("--ranks", type=int, default=4, help="TP ranks (data shards); ranks + parity <= 255")
    p.add_argument("--parity", type=int, default=1, help="parity shards m")
    p.add_argument("--layers", type=int, default=4, help="KV layers per rank")
    p.add_argument("--blocks", type=int, default=64, help="KV blocks per rank")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--heads", type=int, default=2, help="KV heads per rank")
    p.add_argument("--head-dim", type=int, default=64, help="bytes per head and token / 2")
    p.add_argument("--requests", type=int, default=6, help="concurrent requests")
    p.add_argument("--steps", type=int, default=60, help="engine steps in the run")
    p.add_argument("--seed", type=int, default=0, help="workload and KV bytes")
    p.add_argument("--kill", type=rank_at, action="append", default=[], metavar="RANK@STEP",
                   help="SIGKILL a worker before STEP and destroy its memory (repeatable; "
                        "several at one step fail together)")
    p.add_argument("--kill-daemon", type=daemon_at, action="append", default=[], metavar="[MOMENT@]STEP",
                   help="SIGKILL the daemon and restart it (repeatable): before STEP's writes; with death@STEP "
                        "right after STEP's --kill, before it has seen the death; with register@STEP while "
                        "the killed rank's replacement registers")
    p.add_argument("--corrupt", type=rank_at, action="append", default=[], metavar="RANK@STEP",
                   help="flip bytes of already-protected KV of RANK before STEP, silently (repeatable); "
                        "every corruption is checked by the end of the run")
    p.add_argument("--recover-after", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long after a fault before the replacement or restarted daemon starts")
    p.add_argument("--step-ms", type=float, default=0.0, metavar="MS", help="pace steps (0: as fast as possible)")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT", help="the private daemon's metrics port (0: off)")
    p.add_argument("--socket", default="", metavar="PATH",
                   help="the private daemon's socket (default: a fresh temp path; GHOSTSERVE_SOCKET is not "
                        "used, and a socket a daemon answers on is refused)")
    p.add_argument("--shm-prefix", default="", metavar="PREFIX",
                   help="the private daemon's shared-memory prefix, removed at the end (default: "
                        "$GHOSTSERVE_SHM_PREFIX, or 'gs', followed by 'c' and a unique id; a prefix "
                        "already in use is refused)")
    p.add_argument("--stall-seconds", type=float, default=30.0, metavar="SECONDS",
                   help="fail the run when a committed step waits longer than this to be protected")
    p.add_argument("--device", choices=[d.value for d in KvDevice], default=KvDevice.HOST.value,
                   help="where the workers' KV lives: host (shared memory) or cuda (a GPU allocation, "
                        "rank r on device r mod the devices; needs the gpu-cuda12/13 extra and a GPU)")
    n = p.add_argument_group("node loss (needs the mooncake extra; docs/scale-out.md)")
    n.add_argument("--nodes", type=int, default=0, metavar="N",
                   help="run on N nodes (0: one, no store; only 2 for now): a Mooncake master and a daemon per "
                        "node on loopback, "
                        "each joined to the store; the workers run on node A, whose daemon mirrors their KV "
                        "into node B's store segment (--metrics-port is node A's daemon's)")
    n.add_argument("--kill-node", type=int, default=None, metavar="STEP",
                   help="with --nodes 2: lose node A whole before STEP (SIGKILL its daemon and workers, unlink "
                        "its shared memory), then resume its requests on node B from the store: Lookup, Fetch, "
                        "every fetched byte checked, the rest recomputed, the run finished on node B")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def private_prefix(env: dict[str, str] | None = None) -> str:
    """A fresh shared-memory prefix for a chaos daemon: GHOSTSERVE_SHM_PREFIX (or
    ``gs``), ``c``, a unique id, ``-``. Starting with the operator's prefix keeps
    its segments where the operator's policies look; the id keeps them apart."""
    env = os.environ if env is None else env
    base = env.get("GHOSTSERVE_SHM_PREFIX") or "gs"
    prefix = f"{base}c{uuid.uuid4().hex[:8]}-"
    try:
        shm.check_name(prefix + "x")
    except ValueError:
        raise ChaosOptionError(f"GHOSTSERVE_SHM_PREFIX={base!r}: use letters, digits and ._-") from None
    if len(prefix) > 40:  # room for the group's and the regions' names after it
        raise ChaosOptionError(f"GHOSTSERVE_SHM_PREFIX={base!r}: at most 30 characters for chaos runs")
    return prefix


def check_plan(ranks: int, parity: int, steps: int, sizes: dict[str, int],
               kills: Iterable[tuple[int, int]] = (), daemon_kills: Iterable[int | tuple[DaemonMoment, int]] = (),
               corrupts: Iterable[tuple[int, int]] = (), recover_after: float = 0.0,
               step_seconds: float = 0.0, metrics_port: int = 0, stall_seconds: float = 30.0) -> None:
    """Refuse a run that cannot work, naming the option and its value."""
    for flag, value in (("--ranks", ranks), ("--parity", parity), ("--steps", steps), *sizes.items()):
        if value < 1:
            raise ChaosOptionError(f"{flag} {value}: must be >= 1")
    if ranks + parity > MAX_SHARDS:
        raise ChaosOptionError(f"--ranks {ranks} with --parity {parity}: ranks + parity must be <= "
                               f"{MAX_SHARDS} (shards of one Reed-Solomon stripe over GF(2^8))")
    for flag, faults in (("--kill", kills), ("--corrupt", corrupts)):
        for rank, step in faults:
            if not 0 <= rank < ranks:
                raise ChaosOptionError(f"{flag} {rank}@{step}: rank {rank} is outside 0..{ranks - 1}")
            if not 0 < step < steps:
                raise ChaosOptionError(f"{flag} {rank}@{step}: step {step} is outside 1..{steps - 1}")
    kill_steps = {step for _, step in kills}
    for moment, step in map(as_daemon_kill, daemon_kills):
        flag = f"--kill-daemon {step}" if moment == DaemonMoment.STEP else f"--kill-daemon {moment}@{step}"
        if not 0 < step < steps:
            raise ChaosOptionError(f"{flag}: step {step} is outside 1..{steps - 1}")
        if moment != DaemonMoment.STEP and step not in kill_steps:
            raise ChaosOptionError(f"{flag}: no --kill RANK@{step}: the {moment} moment is a worker's")
    if stall_seconds <= 0:
        raise ChaosOptionError(f"--stall-seconds {stall_seconds}: must be > 0")
    if recover_after < 0:
        raise ChaosOptionError(f"--recover-after {recover_after}: must be >= 0")
    if step_seconds < 0:
        raise ChaosOptionError(f"--step-ms {step_seconds * 1000:g}: must be >= 0")
    if not 0 <= metrics_port <= 65535:
        raise ChaosOptionError(f"--metrics-port {metrics_port}: not a port")


def check_nodes(nodes: int, kill_node: int | None, steps: int, device: str = KvDevice.HOST,
                kills: Iterable[tuple[int, int]] = (), daemon_kills: Iterable[object] = (),
                corrupts: Iterable[tuple[int, int]] = (), socket: str = "") -> None:
    """Refuse a node-loss plan that cannot work (``--nodes``, ``--kill-node``), naming the option."""
    if not nodes:
        if kill_node is not None:
            raise ChaosOptionError(f"--kill-node {kill_node}: needs --nodes 2 (a node to lose and one to resume on)")
        return
    if nodes != 2:
        raise ChaosOptionError(f"--nodes {nodes}: only 2 nodes for now (node A runs the workers and is lost, "
                               "node B resumes its requests)")
    if kill_node is None:
        raise ChaosOptionError("--nodes 2: give --kill-node STEP (the loss of node A is the run's fault)")
    if not 0 < kill_node < steps:
        raise ChaosOptionError(f"--kill-node {kill_node}: step {kill_node} is outside 1..{steps - 1}")
    if device != KvDevice.HOST:
        raise ChaosOptionError(f"--device {device} with --nodes: node loss runs on host KV only for now")
    for flag, given in (("--kill", list(kills)), ("--kill-daemon", list(daemon_kills)),
                        ("--corrupt", list(corrupts))):
        if given:
            raise ChaosOptionError(f"{flag} with --nodes: the loss of node A is a two-node run's only fault "
                                   "for now")
    if socket:
        raise ChaosOptionError(f"--socket {socket} with --nodes: each node's daemon gets a fresh socket of its own")


def as_daemon_kill(item: int | tuple[DaemonMoment, int]) -> tuple[DaemonMoment, int]:
    """A daemon kill of a plan: a bare step means before that step's writes."""
    return (DaemonMoment.STEP, item) if isinstance(item, int) else (DaemonMoment(item[0]), int(item[1]))


def check_args(args: argparse.Namespace) -> None:
    """:func:`check_plan` for parsed ``ghostserve chaos`` options."""
    sizes = {"--layers": args.layers, "--blocks": args.blocks, "--block-size": args.block_size,
             "--heads": args.heads, "--head-dim": args.head_dim, "--requests": args.requests}
    check_plan(args.ranks, args.parity, args.steps, sizes, args.kill, args.kill_daemon, args.corrupt,
               args.recover_after, args.step_ms / 1000, args.metrics_port, args.stall_seconds)
    check_nodes(args.nodes, args.kill_node, args.steps, args.device, args.kill, args.kill_daemon, args.corrupt,
                args.socket)
