"""Runs requests through a real vLLM engine, optionally with the ghostserve connector.

Used by tests/test_vllm.py as a subprocess (vLLM spawns its worker processes, and
an engine whose worker is SIGKILLed must die without taking pytest with it):

    python tests/vllm_driver.py SPEC.json OUT.json

SPEC: {"model": dir, "tp": 2, "socket": path or null, "parity": 1,
       "requests": [{"id": str, "prompt": [ids], "max_tokens": n, "done": [ids]}]}
("done": tokens already generated before an engine died; the request is resubmitted
with ghostserve.integrations.vllm.resume_request). OUT gets the tokens of every
request (including "done" ones), timings, and "dead": true if the engine died.
Progress goes to stdout, one JSON line per engine step.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    spec = json.load(open(sys.argv[1]))
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
            print(json.dumps({"tokens": {k: len(v) for k, v in tokens.items()}}), flush=True)
    except Exception as exc:  # EngineDeadError once a worker is killed
        dead = True
        print(json.dumps({"dead": type(exc).__name__}), flush=True)
    end = time.perf_counter()
    json.dump({"tokens": tokens, "dead": dead, "startup_seconds": ready - started,
               "first_token_seconds": first, "cached_tokens": cached, "run_seconds": end - t0}, open(sys.argv[2], "w"))
    if not dead:
        llm.llm_engine.engine_core.shutdown()
    return 3 if dead else 0


if __name__ == "__main__":
    sys.exit(main())
