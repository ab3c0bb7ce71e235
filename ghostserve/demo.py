"""``ghostserve demo``: a tensor-parallel engine survives SIGKILLed ranks, three ways.

The reference engine (:mod:`ghostserve.engine`) runs the same requests under each
protection mode, first failure-free and then with ranks SIGKILLed mid-decode:
``recompute`` (the engine's mode ``none``: recompute everything the failure
touched; ``--modes`` takes either name), ``replicate`` (a full
host copy of the KV, DejaVu-style) and ``ec`` (ghostserve: m parity shards from
a real daemon). Every run's tokens are compared with the failure-free
``recompute`` run; the table shows recovery time, step overhead and host memory per mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ghostserve.demo_options import MODES, add_demo_args, check_demo_args, parse_modes
from ghostserve.engine.engine import (
    REPORT_NAME,
    Engine,
    EngineConfig,
    EngineConfigError,
    Kill,
    RunResult,
)
from ghostserve.engine.model import ModelConfig
from ghostserve.engine.workload import blocks_needed, copy, fixed

__all__ = ["DemoPlan", "add_demo_args", "compare", "plan_from", "render", "run_demo", "summarize"]


@dataclass
class DemoPlan:
    """What one demo runs: the engine configuration (mode aside), the requests,
    the kills and the modes, ``none`` first."""

    config: EngineConfig
    requests: list
    kills: list[Kill]
    modes: list[str] = field(default_factory=lambda: list(MODES))


def plan_from(args: argparse.Namespace) -> DemoPlan:
    """The plan for ``ghostserve demo``'s options; refuses what cannot run before
    anything starts."""
    check_demo_args(args)
    model = ModelConfig.from_hf(args.weights) if args.weights else ModelConfig()
    reqs = fixed(args.requests, args.prompt_tokens, args.new_tokens, model.vocab, args.seed, spread=61)
    total = args.requests * args.new_tokens
    kills = [Kill.parse(k, args.kill_phase) for k in args.kill] if args.kill else \
        [Kill(1 if args.tp > 1 else 0, tokens=total // 2, phase=args.kill_phase)]
    for k in kills:  # refuse now, not after the failure-free rounds
        if k.rank >= args.tp:
            raise EngineConfigError(f"--kill {k.rank}@...: the engine has ranks 0..{args.tp - 1}")
        if k.tokens is not None and k.tokens >= total:
            raise EngineConfigError(f"--kill ...@{k.tokens}: the run generates only {total} tokens")
    modes = parse_modes(args.modes)
    cfg = EngineConfig(model=model, tp=args.tp, parity=args.parity, seed=args.seed, weights_dir=args.weights,
                       blocks=blocks_needed(reqs, 16) + 8, spares=args.spares)
    return DemoPlan(cfg, reqs, kills, modes)


def compare(plan: DemoPlan, rounds: int = 2,
            progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Every mode's engine is started at once. The failure-free runs are
    interleaved over ``rounds`` (modes in order, then reversed, ...) so machine
    drift hits each mode alike; then each mode runs the requests with the kills."""
    engines = {mode: Engine(replace(plan.config, mode=mode)) for mode in plan.modes}
    free: dict[str, list[RunResult]] = {m: [] for m in plan.modes}
    faulty: dict[str, RunResult] = {}

    def run(mode: str, label: str, kills: list[Kill]) -> RunResult:
        cb = (lambda d, t: progress(f"{REPORT_NAME[mode]}: {label}", d, t)) if progress else None
        return engines[mode].run(copy(plan.requests), kills, progress=cb)

    try:
        for eng in engines.values():
            eng.launch()
        for eng in engines.values():
            eng.ready()
        for r in range(rounds):
            for mode in plan.modes if r % 2 == 0 else plan.modes[::-1]:
                free[mode].append(run(mode, f"failure-free {r + 1}", []))
        for mode in plan.modes:
            faulty[mode] = run(mode, "with kills", plan.kills)
    finally:
        for eng in engines.values():
            eng.stop()
    return summarize(plan, free, faulty)


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def summarize(plan: DemoPlan, free: dict[str, list[RunResult]], faulty: dict[str, RunResult]) -> dict[str, Any]:
    """The demo's JSON result from every mode's failure-free and faulty runs."""
    ref = free["none"][0]
    base = sum(r.step_seconds() for r in free["none"])
    identical = {REPORT_NAME[m]: faulty[m].outputs == ref.outputs and all(r.outputs == ref.outputs for r in free[m])
                 for m in plan.modes}
    fails = {m: faulty[m].failures for m in plan.modes}
    every = [f for fs in fails.values() for f in fs]
    cfg = plan.config
    return {
        "ok": all(identical.values()),
        "tokens_identical": all(identical.values()),
        "tokens_identical_by_mode": identical,
        "recovery_seconds": {REPORT_NAME[m]: _mean([f.recovery_seconds for f in fs]) for m, fs in fails.items()},
        "restore_seconds": {REPORT_NAME[m]: _mean([f.restore_seconds for f in fs]) for m, fs in fails.items()},
        "recompute_seconds": {REPORT_NAME[m]: _mean([f.recompute_seconds for f in fs]) for m, fs in fails.items()},
        "recomputed_tokens": {REPORT_NAME[m]: sum(f.recomputed_tokens for f in fs) for m, fs in fails.items()},
        "held_tokens": {REPORT_NAME[m]: sum(f.held_tokens for f in fs) for m, fs in fails.items()},
        "rejoin_seconds": _mean([f.rejoin_seconds for f in every]),
        "startup_seconds": _mean([f.startup_seconds for f in every]),
        "reform_seconds": _mean([f.reform_seconds for f in every]),
        "detect_seconds": _mean([f.detect_seconds for f in every]),
        "step_overhead": {REPORT_NAME[m]: sum(r.step_seconds() for r in free[m]) / base - 1
                          for m in plan.modes if m != "none"},
        "step_seconds": {REPORT_NAME[m]: sum(r.step_seconds() for r in free[m]) for m in plan.modes},
        "rounds": len(free["none"]),
        "host_bytes": {REPORT_NAME[m]: faulty[m].host_bytes for m in plan.modes if m != "none"},
        "kv_bytes": ref.kv_bytes,
        "kv_used_bytes": sum(len(r.prompt) + r.max_new for r in plan.requests)
        * cfg.shape.token_bytes * cfg.model.layers * cfg.tp,
        "config": {"tp": cfg.tp, "parity": cfg.parity, "requests": len(plan.requests),
                   "prompt_tokens": [len(r.prompt) for r in plan.requests],
                   "new_tokens": plan.requests[0].max_new if plan.requests else 0,
                   "model": json.loads(cfg.model.to_json()), "seed": cfg.seed,
                   "kills": [{"rank": k.rank, "tokens": k.tokens, "step": k.step, "phase": k.phase}
                             for k in plan.kills]},
        "failures": {REPORT_NAME[m]: [f.__dict__ for f in fs] for m, fs in fails.items()},
        "outputs": ref.outputs,
    }


def render(result: dict[str, Any]) -> Any:
    """The result as a rich table, one column per mode."""
    from rich.table import Table  # noqa: PLC0415

    modes = [m for m in ("recompute", "replicate", "ec") if m in result["recovery_seconds"]]
    c = result["config"]
    kills = ", ".join(f"rank {k['rank']}@{k['tokens'] if k['tokens'] is not None else 's' + str(k['step'])}"
                      for k in c["kills"])
    title = (f"TP {c['tp']}: {c['requests']} requests, {min(c['prompt_tokens'])}-{max(c['prompt_tokens'])} "
             f"prompt + {c['new_tokens']} new tokens; SIGKILL {kills}")
    t = Table(title=title, min_width=min(len(title), 100))
    t.add_column("")
    for m in modes:
        t.add_column(m if m != "ec" else f"ec {c['tp']}+{c['parity']}", justify="right")

    def row(label: str, fn: Callable[[str], str]) -> None:
        t.add_row(label, *(fn(m) for m in modes))

    ok = result["tokens_identical_by_mode"]
    row("tokens identical", lambda m: "[green]yes[/]" if ok[m] else "[red]NO[/]")
    row("recovery (s)", lambda m: f"{result['recovery_seconds'][m]:.3f}")
    row("  restore (s)", lambda m: f"{result['restore_seconds'][m]:.3f}")
    row("  recompute (s)", lambda m: f"{result['recompute_seconds'][m]:.3f}")
    row("tokens recomputed", lambda m: f"{result['recomputed_tokens'][m]:,} of {result['held_tokens'][m]:,}")
    row("step overhead", lambda m: "baseline" if m == "recompute" else f"{result['step_overhead'][m]:+.1%}")
    row("host memory (MiB)", lambda m: "0" if m == "recompute" else
        f"{result['host_bytes'][m] / 2**20:.1f} ({result['host_bytes'][m] / result['kv_bytes']:.0%})")
    t.caption = (f"recovery: group re-formed -> next token can be decoded. Step overhead: failure-free "
                 f"step time vs recompute's ({result['rounds']} interleaved rounds). Host memory: % of the "
                 f"{result['kv_bytes'] / 2**20:.1f} MiB KV pools. Same for every mode: failure seen "
                 f"{result['detect_seconds'] * 1e3:.0f} ms after SIGKILL; rejoin {result['rejoin_seconds']:.2f} s "
                 f"(replacement start-up {result['startup_seconds']:.2f} s, group re-form "
                 f"{result['reform_seconds']:.2f} s).")
    return t


def run_demo(args: argparse.Namespace) -> int:
    """``ghostserve demo``: run the plan, print the table (or ``--json``); exit
    status 0 if every mode's tokens equal the failure-free run's."""
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: PLC0415

    plan = plan_from(args)
    if args.json:
        result = compare(plan, args.rounds)
        print(json.dumps(result))
        return 0 if result["tokens_identical"] else 1
    err = Console(stderr=True)
    err.print(f"[bold]ghostserve demo[/]: a TP-{plan.config.tp} engine, each run failure-free and then with "
              f"{len(plan.kills)} rank(s) SIGKILLed, under {', '.join(REPORT_NAME[m] for m in plan.modes)}")
    with Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tokens"), console=err, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        result = compare(plan, args.rounds, progress)
    Console().print(render(result))
    return 0 if result["tokens_identical"] else 1
