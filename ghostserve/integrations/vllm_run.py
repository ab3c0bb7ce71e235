"""Run requests through a real vLLM engine, optionally with the ghostserve connector,
and the helpers that kill one of its workers. Used by tests/test_vllm.py and
benchmarks/vllm_resume.py, each engine in its own process (vLLM spawns its worker
processes, and an engine whose worker is SIGKILLed must die alone):

    python -m ghostserve.integrations.vllm_run SPEC.json OUT.json

SPEC: {"model": dir, "tp": 2, "socket": path or null, "parity": 1,
       "requests": [{"id": str, "prompt": [ids], "max_tokens": n, "done": [ids]}]}
("done": tokens already generated before an engine died; the request is resubmitted
with ghostserve.integrations.vllm.resume_request). Optional: "kv", vLLM's
KVTransferConfig fields for another connector (instead of "socket": ghostserve's);
"phases", lists of requests run one list after another, each
{"requests": [...], "sequential": bool (one request at a time), "announce": n (print
{"decoded": n} once each of them has n new tokens)}; {"phase_done": i} is printed
after each. OUT gets the tokens of every
request (including "done" ones), timings (per request: first token after its
submission, and each new token's time), and "dead": true if the engine died.
It prints {"ready": seconds} once the engine is up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any


def engine_env(tmp: str, **extra: str) -> dict[str, str]:
    """Environment for vLLM's CPU build on a small machine (two cores, TP 2): threads
    pinned one core per rank, 1 GiB of KV per rank, no torch.compile (seconds, not
    minutes, to start), and vLLM's sockets and caches in ``tmp``."""
    os.makedirs(tmp, exist_ok=True)
    return dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",
                TORCH_COMPILE_DISABLE="1", TMPDIR=tmp, VLLM_CACHE_ROOT=os.path.join(tmp, "cache"),
                VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="WARNING", **extra)


def start(spec: dict, spec_path: str, out_path: str, env: dict[str, str],
          python: str = sys.executable) -> subprocess.Popen:
    """Start an engine process on ``spec`` (with ``python``: another environment's,
    for another connector); it writes its results to ``out_path``."""
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    return subprocess.Popen([python, "-m", "ghostserve.integrations.vllm_run", spec_path, out_path],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Supervised:
    """A long-running ghostserve command (``ghostserve vllm``, ``ghostserve front``)
    in its own session: stdout lines go to a queue that :meth:`expect` reads,
    stderr to ``log_path``. For tests and benchmarks."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str):
        import queue  # noqa: PLC0415
        import threading  # noqa: PLC0415

        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # EOF

    def expect(self, pattern: str, timeout: float):
        """The match of the first stdout line matching ``pattern``; AssertionError
        (with the log's tail) if none comes within ``timeout`` s or the process ends."""
        import queue  # noqa: PLC0415
        import re  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)  # later calls see the end too
                break
            if m := re.match(pattern, line):
                return m
        raise AssertionError(f"no line {pattern!r} within {timeout} s; log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM, then SIGKILL of its whole session after ``timeout``; the exit status."""
        import signal  # noqa: PLC0415

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def tp_worker(engine_pid: int, rank: int):
    """The psutil.Process of TP rank ``rank``'s worker under an engine process."""
    import psutil  # noqa: PLC0415

    for child in psutil.Process(engine_pid).children(recursive=True):
        try:
            if f"Worker_TP{rank}" in child.name() or f"Worker_TP{rank}" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no Worker_TP{rank} under process {engine_pid}")


def lower_priority(proc: Any, nice: int = 19) -> None:
    """Run every thread of ``proc`` (a psutil.Process) at ``nice``; Linux nice is
    per thread, and vLLM's CPU workers are many busy threads. On a 2-core machine
    they otherwise starve the daemon, vLLM's server, the front and the clients,
    which then see tokens seconds after they were made (tests, benchmarks)."""
    import psutil  # noqa: PLC0415

    for t in proc.threads():
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            os.setpriority(os.PRIO_PROCESS, t.id, nice)


def sigkill(proc: Any) -> None:
    """SIGKILL ``proc`` (a psutil.Process) at the caller's priority. A process's
    exit (freeing its memory) runs at its own nice: a worker left at nice 19 by
    :func:`lower_priority` on 2 busy cores took 20-60 s to end after its SIGKILL,
    and the daemon sees a rank lost only when its process has ended."""
    lower_priority(proc, os.getpriority(os.PRIO_PROCESS, 0))
    proc.send_signal(signal.SIGKILL)


def watermarks(group_status: Any, ids: list[str]) -> dict[str, int]:
    """A group's protected tokens by the caller's request ids (vLLM suffixes the ids it is given)."""
    out: dict[str, int] = {}
    for w in group_status.watermarks:
        for rid in ids:
            if w.request_id == rid or w.request_id.startswith(rid + "-"):
                out[rid] = w.tokens
    return out


def kv_config(spec: dict) -> Any:
    """The engine's KVTransferConfig: ``spec["kv"]`` as given, ghostserve's connector
    on ``spec["socket"]``, or None (no connector)."""
    from vllm.config import KVTransferConfig  # noqa: PLC0415

    if spec.get("kv"):
        return KVTransferConfig(**spec["kv"])
    if spec.get("socket"):
        return KVTransferConfig(
            kv_connector="GhostServeConnector", kv_connector_module_path="ghostserve.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"socket": spec["socket"], "parity": spec.get("parity", 1),
                                       "shm_prefix": spec.get("shm_prefix", "gs-vllm-")})
    return None


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    from ghostserve.integrations.vllm import resume_request  # noqa: PLC0415

    started = time.perf_counter()
    llm = LLM(model=spec["model"], load_format="dummy", skip_tokenizer_init=True,
              tensor_parallel_size=spec.get("tp", 2), max_model_len=spec.get("max_model_len", 2048),
              dtype="bfloat16", seed=0, enforce_eager=True, kv_transfer_config=kv_config(spec),
              enable_prefix_caching=spec.get("prefix_caching", True))
    ready = time.perf_counter()
    engine = llm.llm_engine
    phases = spec.get("phases") or [{"requests": spec["requests"]}]
    everything = [r for ph in phases for r in ph["requests"]]
    done = {r["id"]: list(r.get("done", [])) for r in everything}
    tokens = {rid: list(d) for rid, d in done.items()}
    submitted: dict[str, float] = {}
    first: dict[str, float] = {}
    arrivals: dict[str, list[float]] = {rid: [] for rid in done}
    cached: dict[str, int] = {}
    t0 = time.perf_counter()

    def submit(r: dict) -> None:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=r["max_tokens"])
        prompt: dict = {"prompt_token_ids": r["prompt"]}
        if done[r["id"]]:
            prompt, params = resume_request(r["prompt"], done[r["id"]], params)
        submitted[r["id"]] = time.perf_counter()
        engine.add_request(r["id"], prompt, params)

    def drain(announce: int | None, ids: list[str]) -> None:
        while engine.has_unfinished_requests():
            for out in engine.step():
                rid = out.request_id
                new = list(out.outputs[0].token_ids)
                now = time.perf_counter()
                if new and rid not in first:
                    first[rid] = now - submitted[rid]
                arrivals[rid] += [now - t0] * (len(done[rid]) + len(new) - len(tokens[rid]))
                tokens[rid] = done[rid] + new
                if out.num_cached_tokens is not None:
                    cached[rid] = out.num_cached_tokens
            if announce is not None and all(len(tokens[i]) - len(done[i]) >= announce for i in ids):
                print(json.dumps({"decoded": announce}), flush=True)
                announce = None

    dead = False
    print(json.dumps({"ready": ready - started}), flush=True)
    try:
        for n, ph in enumerate(phases):
            batches = [[r] for r in ph["requests"]] if ph.get("sequential") else [ph["requests"]]
            for batch in batches:
                for r in batch:
                    submit(r)
                drain(ph.get("announce"), [r["id"] for r in batch])
            print(json.dumps({"phase_done": n}), flush=True)
    except Exception as exc:  # EngineDeadError once a worker is killed
        dead = True
        print(json.dumps({"dead": type(exc).__name__}), flush=True)
    end = time.perf_counter()
    with open(sys.argv[2], "w") as f:
        json.dump({"tokens": tokens, "dead": dead, "startup_seconds": ready - started,
                   "first_token_seconds": first, "cached_tokens": cached, "arrivals": arrivals,
                   "run_seconds": end - t0}, f)
    if not dead:
        llm.llm_engine.engine_core.shutdown()
    return 3 if dead else 0


if __name__ == "__main__":
    sys.exit(main())
