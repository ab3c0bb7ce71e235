"""Run requests through a real vLLM engine, optionally with the ghostserve connector,
and the helpers that kill one of its workers. Used by tests/test_vllm.py and
benchmarks/vllm_resume.py, each engine in its own process (vLLM spawns its worker
processes, and an engine whose worker is SIGKILLed must die alone):

    python -m ghostserve.integrations.vllm_run SPEC.json OUT.json

SPEC: {"model": dir, "tp": 2, "socket": path or null, "parity": 1,
       "requests": [{"id": str, "prompt": [ids], "max_tokens": n, "done": [ids]}]}
("done": tokens already generated before an engine died; the request is resubmitted
with ghostserve.integrations.vllm.resume_request). OUT gets the tokens of every
request (including "done" ones), timings, and "dead": true if the engine died.
It prints {"ready": seconds} once the engine is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1024,
              "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "torch_dtype": "bfloat16", "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}


def make_model(path: str, **config: Any) -> str:
    """A model directory with only config.json (vLLM's load_format="dummy" needs no weights)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(TINY_LLAMA, **config), f)
    return path


def engine_env(tmp: str, **extra: str) -> dict[str, str]:
    """Environment for vLLM's CPU build on a small machine (two cores, TP 2): threads
    pinned one core per rank, 1 GiB of KV per rank, no torch.compile (seconds, not
    minutes, to start), and vLLM's sockets and caches in ``tmp``."""
    os.makedirs(tmp, exist_ok=True)
    return dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",
                TORCH_COMPILE_DISABLE="1", TMPDIR=tmp, VLLM_CACHE_ROOT=os.path.join(tmp, "cache"),
                VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="WARNING", **extra)


def start(spec: dict, spec_path: str, out_path: str, env: dict[str, str]) -> subprocess.Popen:
    """Start an engine process on ``spec``; it writes its results to ``out_path``."""
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    return subprocess.Popen([sys.executable, "-m", "ghostserve.integrations.vllm_run", spec_path, out_path],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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


def watermarks(group_status: Any, ids: list[str]) -> dict[str, int]:
    """A group's protected tokens by the caller's request ids (vLLM suffixes the ids it is given)."""
    out: dict[str, int] = {}
    for w in group_status.watermarks:
        for rid in ids:
            if w.request_id == rid or w.request_id.startswith(rid + "-"):
                out[rid] = w.tokens
    return out


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams  # noqa: PLC0415

    from ghostserve.integrations.vllm import resume_request  # noqa: PLC0415

    kv = None
    if spec.get("socket"):
        from vllm.config import KVTransferConfig  # noqa: PLC0415

        kv = KVTransferConfig(
            kv_connector="GhostServeConnector", kv_connector_module_path="ghostserve.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"socket": spec["socket"], "parity": spec.get("parity", 1),
                                       "shm_prefix": spec.get("shm_prefix", "gs-vllm-")})
    started = time.perf_counter()
    llm = LLM(model=spec["model"], load_format="dummy", skip_tokenizer_init=True,
              tensor_parallel_size=spec.get("tp", 2), max_model_len=spec.get("max_model_len", 2048),
              dtype="bfloat16", seed=0, enforce_eager=True, kv_transfer_config=kv,
              enable_prefix_caching=spec.get("prefix_caching", True))
    ready = time.perf_counter()
    engine = llm.llm_engine
    done = {r["id"]: list(r.get("done", [])) for r in spec["requests"]}
    tokens = {rid: list(d) for rid, d in done.items()}
    first: dict[str, float] = {}
    cached: dict[str, int] = {}
    t0 = time.perf_counter()
    for r in spec["requests"]:
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=r["max_tokens"])
        prompt: dict = {"prompt_token_ids": r["prompt"]}
        if done[r["id"]]:
            prompt, params = resume_request(r["prompt"], done[r["id"]], params)
        engine.add_request(r["id"], prompt, params)
    dead = False
    print(json.dumps({"ready": ready - started}), flush=True)
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                rid = out.request_id
                new = list(out.outputs[0].token_ids)
                if new and rid not in first:
                    first[rid] = time.perf_counter() - t0
                tokens[rid] = done[rid] + new
                if out.num_cached_tokens is not None:
                    cached[rid] = out.num_cached_tokens
    except Exception as exc:  # EngineDeadError once a worker is killed
        dead = True
        print(json.dumps({"dead": type(exc).__name__}), flush=True)
    end = time.perf_counter()
    with open(sys.argv[2], "w") as f:
        json.dump({"tokens": tokens, "dead": dead, "startup_seconds": ready - started,
                   "first_token_seconds": first, "cached_tokens": cached, "run_seconds": end - t0}, f)
    if not dead:
        llm.llm_engine.engine_core.shutdown()
    return 3 if dead else 0


if __name__ == "__main__":
    sys.exit(main())
