"""Serving benchmark: the GhostServe paper's experiments at CPU scale, on the
reference TP engine, every protection mode measured in the same run.

    python benchmarks/serving.py [--json] [--quick] [--plots DIR] [--only overhead,recovery,latency]

1. overhead: the same requests failure-free under none, replicate and ec, in
   interleaved rounds (ABC, CBA, ...); median decode-step and prefill-step time
   per mode as a ratio to none's in the same round (median over rounds);
2. recovery: one request of each context length, a rank SIGKILLed mid-decode;
   recovery time (group re-formed -> next token can be decoded) per mode, and
   recompute / ec and replicate / ec ratios: the scaling curve;
3. latency: Poisson arrivals with failures hitting 0, 5 and 15% of requests
   (a kill per failure, at a random token, on a random rank); P50 and P99
   request latency per mode. Each mode keeps a hot spare rank, so replacement
   start-up (equal for all modes) does not hide the recovery itself.

Every engine's tokens are checked against the failure-free none run; a
mismatch fails the benchmark. The ec daemon is a separate process, as deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

from ghostserve.extras import require

# before the engine (and torch) is imported: without the engine extra, one clear line
require("engine", "benchmarks/serving.py")

from ghostserve.engine.engine import REPORT_NAME, Engine, EngineConfig, Kill  # noqa: E402
from ghostserve.engine.model import ModelConfig  # noqa: E402
from ghostserve.engine.workload import blocks_needed, copy, fixed, poisson  # noqa: E402

MODES = ("none", "replicate", "ec")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Engines:
    """One started engine per mode, all at once (they idle while another runs)."""

    def __init__(self, cfg: EngineConfig):
        self.by_mode = {m: Engine(replace(cfg, mode=m)) for m in MODES}

    def __enter__(self) -> dict[str, Engine]:
        try:
            for e in self.by_mode.values():
                e.launch()
            for e in self.by_mode.values():
                e.ready()
        except BaseException:
            self.__exit__()
            raise
        return self.by_mode

    def __exit__(self, *exc: object) -> None:
        for e in self.by_mode.values():
            e.stop()


def check(outputs: dict, ref: dict, what: str) -> None:
    if outputs != ref:
        raise SystemExit(f"serving benchmark: tokens differ from the failure-free run in {what}")


def workloads(model: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "overhead": fixed(args.requests, args.prompt_tokens, args.new_tokens, model.vocab, seed=1, spread=37),
        "recovery": {ctx: fixed(1, ctx, 8, model.vocab, seed=ctx) for ctx in args.contexts},
        "latency": poisson(args.poisson_requests, args.rate, (args.prompt_tokens // 4, args.prompt_tokens),
                           (args.new_tokens // 2, args.new_tokens), model.vocab, seed=7),
    }


def bench_overhead(engines: dict[str, Engine], reqs: list, args: argparse.Namespace) -> dict[str, Any]:
    per: dict[str, dict[str, list[float]]] = {m: {"decode": [], "prefill": [], "commit_us": []} for m in MODES}
    ref = None
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            res = engines[mode].run(copy(reqs))
            if ref is None:  # round 0 starts with none: the reference
                ref = res.outputs
            check(res.outputs, ref, f"overhead/{mode}")
            for kind in ("decode", "prefill"):
                per[mode][kind].append(statistics.median(s.seconds for s in res.steps if s.kind == kind))
            per[mode]["commit_us"].append(
                1e6 * statistics.median(s.commit_seconds for s in res.steps if s.kind == "decode"))
    out: dict[str, Any] = {"requests": len(reqs), "prompt_tokens": [len(q.prompt) for q in reqs],
                           "new_tokens": args.new_tokens, "rounds": args.rounds, "modes": {}}
    for mode in MODES:
        row = {f"{k}_step_ms": 1e3 * statistics.median(per[mode][k]) for k in ("decode", "prefill")}
        row["commit_us"] = statistics.median(per[mode]["commit_us"])
        if mode != "none":
            for k in ("decode", "prefill"):
                ratios = [a / b for a, b in zip(per[mode][k], per["none"][k], strict=True)]
                row[f"{k}_overhead"] = statistics.median(ratios) - 1
        out["modes"][REPORT_NAME[mode]] = row
    return out


def bench_recovery(engines: dict[str, Engine], by_ctx: dict[int, list], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for ctx, reqs in by_ctx.items():
        ref = engines["none"].run(copy(reqs)).outputs
        row: dict[str, Any] = {"context_tokens": ctx}
        for mode in MODES:
            res = engines[mode].run(copy(reqs), [Kill(1, tokens=4)])
            check(res.outputs, ref, f"recovery/{mode}/{ctx}")
            (f,) = res.failures
            name = REPORT_NAME[mode]
            row[name] = {"recovery_seconds": f.recovery_seconds, "restore_seconds": f.restore_seconds,
                         "recompute_seconds": f.recompute_seconds, "recomputed_tokens": f.recomputed_tokens,
                         "restored_bytes": f.restored_bytes, "rejoin_seconds": f.rejoin_seconds}
        row["recompute_over_ec"] = row["recompute"]["recovery_seconds"] / row["ec"]["recovery_seconds"]
        row["replicate_over_ec"] = row["replicate"]["recovery_seconds"] / row["ec"]["recovery_seconds"]
        rows.append(row)
        print(f"  recovery at {ctx} tokens done", file=sys.stderr)
    return {"rows": rows}


def bench_latency(engines: dict[str, Engine], reqs: list, args: argparse.Namespace) -> dict[str, Any]:
    total = sum(r.max_new for r in reqs)
    tp = engines["none"].cfg.tp
    rows = []
    ref = engines["none"].run(copy(reqs)).outputs  # the reference tokens
    for rate in args.failure_rates:
        rng = random.Random(int(rate * 1000))
        n = round(rate * len(reqs))
        at = sorted(rng.sample(range(1, total - 1), n))
        kills = [Kill(rng.randrange(tp), tokens=t) for t in at]
        row: dict[str, Any] = {"failure_rate": rate, "failures": n}
        runs: dict[str, list] = {m: [] for m in MODES}
        for r in range(args.latency_rounds):  # interleaved: ABC, CBA, ...
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                res = engines[mode].run(copy(reqs), kills, clock="seconds")
                check(res.outputs, ref, f"latency/{mode}/{rate}")
                runs[mode].append(res)
        for mode in MODES:
            lat = [list(res.latency_seconds.values()) for res in runs[mode]]
            row[REPORT_NAME[mode]] = {
                "p50_seconds": statistics.median(pct(x, 0.5) for x in lat),
                "p99_seconds": statistics.median(pct(x, 0.99) for x in lat),
                "recovery_seconds": statistics.median(sum(f.recovery_seconds for f in res.failures)
                                                      for res in runs[mode]),
                "recomputed_tokens": sum(f.recomputed_tokens for f in runs[mode][0].failures),
                "wall_seconds": statistics.median(res.wall_seconds for res in runs[mode])}
        for q in ("p50", "p99"):
            row[f"{q}_recompute_over_ec"] = row["recompute"][f"{q}_seconds"] / row["ec"][f"{q}_seconds"]
            row[f"{q}_replicate_over_ec"] = row["replicate"][f"{q}_seconds"] / row["ec"][f"{q}_seconds"]
        rows.append(row)
        print(f"  latency at failure rate {rate:.0%} done", file=sys.stderr)
    return {"requests": len(reqs), "rate_per_second": args.rate, "rounds": args.latency_rounds, "rows": rows}


def plots(result: dict[str, Any], folder: str) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415

    made = []
    names = ("recompute", "replicate", "ec")
    if "recovery" in result:
        rows = result["recovery"]["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ax.plot([r["context_tokens"] for r in rows], [r[name]["recovery_seconds"] for r in rows], "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="recovery (s)",
               title=f"Recovery after one rank is SIGKILLed (TP {result['config']['tp']})")
        ax.set_xticks([r["context_tokens"] for r in rows], [f"{r['context_tokens']:,}" for r in rows])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        made.append(f"{folder}/serving_recovery.png")
        fig.tight_layout()
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if "latency" in result:
        rows = result["latency"]["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=False)
        width = 0.27
        for ax, q in zip(axes, ("p50", "p99"), strict=True):
            for i, name in enumerate(names):
                ax.bar([j + (i - 1) * width for j in range(len(rows))], [r[name][f"{q}_seconds"] for r in rows],
                       width, label=name)
            ax.set_xticks(range(len(rows)), [f"{r['failure_rate']:.0%}" for r in rows])
            ax.set(xlabel="requests hit by a failure", ylabel=f"{q.upper()} latency (s)")
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].legend(loc="upper left", fontsize=8)
        fig.suptitle("Request latency, Poisson arrivals")
        made.append(f"{folder}/serving_latency.png")
        fig.tight_layout()
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    con = Console(width=None if sys.stdout.isatty() else 120)
    if "overhead" in result:
        o = result["overhead"]
        t = Table(title=f"checkpoint overhead: {o['requests']} requests, {o['rounds']} interleaved rounds")
        for c in ("mode", "decode step ms", "decode overhead", "prefill step ms", "prefill overhead",
                  "commit us"):
            t.add_column(c, justify="left" if c == "mode" else "right")
        for name, row in o["modes"].items():
            t.add_row(name, f"{row['decode_step_ms']:.1f}", f"{row.get('decode_overhead', 0):+.1%}"
                      if name != "recompute" else "baseline", f"{row['prefill_step_ms']:.1f}",
                      f"{row.get('prefill_overhead', 0):+.1%}" if name != "recompute" else "baseline",
                      f"{row['commit_us']:.0f}")
        con.print(t)
    if "recovery" in result:
        t = Table(title="recovery (s): group re-formed -> next token can be decoded")
        for c in ("context", "recompute", "replicate", "ec", "recompute/ec", "replicate/ec", "ec restore MiB"):
            t.add_column(c, justify="right")
        for r in result["recovery"]["rows"]:
            t.add_row(f"{r['context_tokens']:,}", f"{r['recompute']['recovery_seconds']:.3f}",
                      f"{r['replicate']['recovery_seconds']:.3f}", f"{r['ec']['recovery_seconds']:.3f}",
                      f"{r['recompute_over_ec']:.1f}x", f"{r['replicate_over_ec']:.2f}x",
                      f"{r['ec']['restored_bytes'] / 2**20:.2f}")
        con.print(t)
    if "latency" in result:
        lat = result["latency"]
        t = Table(title=f"request latency (s): {lat['requests']} Poisson requests at {lat['rate_per_second']:g}/s, "
                        f"median of {lat['rounds']} runs")
        for c in ("failures", "recompute p50/p99", "replicate p50/p99", "ec p50/p99", "p50 recompute/ec",
                  "p99 recompute/ec"):
            t.add_column(c, justify="right")
        for r in lat["rows"]:
            t.add_row(f"{r['failure_rate']:.0%} ({r['failures']})",
                      *(f"{r[n]['p50_seconds']:.2f} / {r[n]['p99_seconds']:.2f}" for n in ("recompute", "replicate", "ec")),
                      f"{r['p50_recompute_over_ec']:.2f}x", f"{r['p99_recompute_over_ec']:.2f}x")
        con.print(t)
    c = result["config"]
    m = c["model"]
    con.print(f"TP {c['tp']}, ec {c['tp']}+{c['parity']}, model: {m['layers']} layers, hidden {m['hidden']}, "
              f"{m['heads']} heads / {m['kv_heads']} KV heads of {m['head_dim']}, vocab {m['vocab']}; "
              f"{c['cpus']} cpus, wall {result['wall_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="a small model and short runs, for tests")
    p.add_argument("--only", default="overhead,recovery,latency")
    p.add_argument("--plots", default="", help="write PNG plots into this folder")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--parity", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--contexts", default="256,512,1024,2048,4096,8192")
    p.add_argument("--step-tokens", type=int, default=512, help="token budget of a step (prefill chunk)")
    p.add_argument("--poisson-requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.5, help="arrivals per second")
    p.add_argument("--failure-rates", default="0,0.05,0.15")
    p.add_argument("--latency-rounds", type=int, default=2, help="runs per mode and failure rate (median)")
    args = p.parse_args(argv)
    model = ModelConfig()
    if args.quick:
        model = ModelConfig(vocab=256, hidden=64, layers=3, heads=4, kv_heads=4, head_dim=16, ffn=128)
        args.tp, args.rounds, args.requests, args.prompt_tokens, args.new_tokens = 2, 2, 2, 48, 8
        args.contexts, args.poisson_requests, args.rate, args.failure_rates = "64,256", 8, 20.0, "0,0.25"
        args.latency_rounds = 1
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.failure_rates = [float(x) for x in args.failure_rates.split(",")]
    work = workloads(model, args)
    need = max(blocks_needed(work["overhead"], 16), blocks_needed(work["latency"], 16),
               max(blocks_needed(r, 16) for r in work["recovery"].values()))
    # one hot spare per engine keeps replacement start-up (equal for every mode) out of the latencies
    base = EngineConfig(model=model, tp=args.tp, parity=args.parity, block_tokens=16, blocks=need + 4,
                        step_tokens=args.step_tokens, spares=1)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    only = [x for x in ("overhead", "recovery", "latency") if x in args.only.split(",")]
    with Engines(base) as engines:
        for name in only:
            print(f"serving benchmark: {name}...", file=sys.stderr)
            result[name] = {"overhead": bench_overhead, "recovery": bench_recovery,
                            "latency": bench_latency}[name](engines, work[name], args)
    result["config"] = {"tp": args.tp, "parity": args.parity, "model": json.loads(model.to_json()),
                        "cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick}
    result["wall_seconds"] = time.perf_counter() - t0
    if args.plots:
        result["plots"] = plots(result, args.plots)
    if args.json:
        print(json.dumps(result))
    else:
        table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
