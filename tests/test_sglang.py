"""The SGLang plug-in on a real SGLang: 0.5.23's CPU engine, TP 2 (two scheduler
processes over gloo), a tiny Llama with random weights, the ghostserve daemon on
a unix socket, SIGKILL of a TP scheduler.

SGLang runs in its own environment (``.venv-sglang``, made by ``bin/setup-sglang``; its
torch differs from the vLLM extra's), so these tests drive its servers as
processes through ``ghostserve.integrations.sglang_run``; the one stand-in is
``tests/sglang_cpu/sgl_kernel`` (SGLang's CPU kernel library is not published;
with the stand-in SGLang takes its native torch paths). About four minutes on
2 cores, most of it SGLang starting servers.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ghostserve import shm
from ghostserve.client import OperatorClient
from ghostserve.integrations import sglang_run, testmodels
from ghostserve.sidecar import Sidecar

PY = sglang_run.default_python()
pytestmark = pytest.mark.skipif(not os.path.exists(PY), reason=f"no SGLang environment at {PY} (bin/setup-sglang makes it)")
STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_cpu")
NEW_TOKENS = 160


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang")
    # KV heads 4: two each on TP 2; 1: the one KV head replicated on both ranks
    models = {h: testmodels.make_served_model(str(root / f"model-kv{h}"), num_key_value_heads=h) for h in (4, 1)}
    rng = random.Random(11)
    requests = [{"id": f"r{i}", "prompt": [rng.randrange(3, 1000) for _ in range(500 + 211 * i)]} for i in range(3)]
    with Sidecar(log_level="info") as daemon:
        state = {"root": root, "models": models, "requests": requests, "daemon": daemon,
                 "op": OperatorClient(daemon.socket, timeout=30)}
        yield state
        state["op"].close()


def server(env, name: str, plugin: bool = True, kv_heads: int = 4, tp: int = 2,
           **extra: str) -> sglang_run.SGLangServer:
    e = sglang_run.cpu_env(str(env["root"] / "tmp"), STUB, bind="0|1" if tp == 2 else "0-1")
    for k in [k for k in e if k.startswith("GHOSTSERVE_SGLANG")]:
        del e[k]
    if plugin:
        e.update(GHOSTSERVE_SGLANG="1", GHOSTSERVE_SGLANG_SOCKET=env["daemon"].socket,
                 GHOSTSERVE_SGLANG_SHM_PREFIX=env["daemon"].prefix + "kv-")
    e.update(extra)
    srv = sglang_run.SGLangServer(sglang_run.cpu_args(env["models"][kv_heads], tp=tp), e,
                                  str(env["root"] / f"{name}.log"))
    return srv.start()


def groups(env) -> dict:
    return {g.group: g for g in env["op"].status().groups}


def generate_all(srv, reqs) -> dict[str, dict]:
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = {r["id"]: pool.submit(srv.generate, r["prompt"], r["max_tokens"], rid=r["id"]) for r in reqs}
        return {rid: f.result() for rid, f in futures.items()}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("kv_heads", [
    4,
    # one KV head on two ranks: rank 1 is a replica, only rank 0 is a shard (1+1), and on
    # resume rank 1 copies what rank 0 fetched (a second set of servers: slow)
    pytest.param(1, marks=pytest.mark.slow),
])
def test_protected_server_matches_then_a_killed_one_resumes_from_ghostserve(env, kv_heads):
    reqs = [dict(r, max_tokens=NEW_TOKENS) for r in env["requests"]]
    shards = 2 if kv_heads == 4 else 1
    # 1. the tokens every run must give: SGLang without the plug-in
    plain = server(env, f"plain{kv_heads}", plugin=False, kv_heads=kv_heads)
    try:
        plain.wait_ready()
        base = {rid: out["output_ids"] for rid, out in generate_all(plain, reqs).items()}
    finally:
        plain.stop()
    assert all(len(t) == NEW_TOKENS for t in base.values())
    before = set(groups(env))
    assert not before, "the plug-in is off without GHOSTSERVE_SGLANG"

    # 2. with the plug-in: the same tokens
    srv = server(env, f"protected{kv_heads}", kv_heads=kv_heads)
    try:
        srv.wait_ready()
        ((name, g),) = groups(env).items()
        assert g.world_size == shards and g.parity == 1 and g.state == "healthy"
        assert g.layout.block_slots == 1 and g.layout.num_layers == 2 * 2  # K and V planes of 2 layers
        out = generate_all(srv, reqs)
        assert {rid: o["output_ids"] for rid, o in out.items()} == base

        # 3. again, streamed: stop both ranks well into decoding, check parity against the
        # live KV and the watermarks against the tokens, then SIGKILL TP rank 1
        killed = [dict(r, id=f"k{r['id']}") for r in reqs]
        got: dict[str, list[int]] = {}
        going = threading.Event()

        def seen(rid, tokens):
            got[rid] = tokens
            if len(got) == len(killed) and all(len(t) >= 40 for t in got.values()):
                going.set()

        with ThreadPoolExecutor(len(killed)) as pool:
            streams = {r["id"]: pool.submit(srv.stream, r["prompt"], NEW_TOKENS, r["id"],
                                            lambda t, rid=r["id"]: seen(rid, t)) for r in killed}
            assert going.wait(240), "decoding never got going"
            ranks = srv.schedulers()
            for p in ranks.values():
                p.suspend()
            time.sleep(0.5)  # the daemon encodes what the ranks committed before they stopped
            scrub = env["op"].scrub(name)
            marks = {w.request_id: w.tokens for w in groups(env)[name].watermarks}
            received = {rid: len(t) for rid, t in got.items()}
            for p in ranks.values():
                p.resume()
            ranks[1].kill()
            ended = {rid: f.result(timeout=120) for rid, f in streams.items()}
        assert srv.wait_exit(120) != 0  # SGLang is fail-stop: one dead rank ends the server
    finally:
        srv.stop()
    assert scrub.chunks_checked > 0 and scrub.parity_mismatches == 0 and scrub.checksum_mismatches == 0
    for r in killed:
        # the watermark follows the tokens. The client's newest token n came from the
        # forward that wrote token n - 1's KV; a rank may have been stopped after that
        # token went out and before it sent that forward's commit (the encoder needs
        # every rank's), so the watermark is p + n - 2 or p + n - 1; the engine may
        # also be a step ahead of the client
        p, n = len(r["prompt"]), received[r["id"]]
        assert p + n - 2 <= marks[r["id"]] <= p + n + 1, (marks, received)

    g = groups(env)[name]
    states = {x.rank: x.state for x in g.ranks}
    if shards == 2:
        assert g.state == "ended" and states == {0: "detached", 1: "lost"}
        kept = env["op"].scrub(name)  # the survivor's kept KV is as it was protected
        assert kept.chunks_checked > 0 and kept.checksum_mismatches == 0 and not kept.parity_checked
    else:  # the replica never registered: the one shard ended first, lost
        assert g.state == "ended" and states == {0: "lost"}
    done = {}
    for r in killed:
        tokens, finished = ended[r["id"]]
        assert not finished and tokens == base[r["id"][1:]][: len(tokens)]
        done[r["id"]] = tokens
    lost = shm.Segment.attach(next(x.region for x in g.ranks if x.state == "lost"))
    lost.array()[:] = 0xA5  # the killed rank's memory is gone for real
    del lost

    # 4. a new server: each request resubmitted as prompt + tokens received, its KV
    # loaded from ghostserve (rank 1's rebuilt from parity), not prefilled
    again = server(env, f"resumed{kv_heads}", kv_heads=kv_heads)
    try:
        again.wait_ready()
        resumed = [dict(r, prompt=r["prompt"] + done[r["id"]], max_tokens=NEW_TOKENS - len(done[r["id"]]))
                   for r in killed]
        out = generate_all(again, resumed)
        for r in resumed:
            assert done[r["id"]] + out[r["id"]]["output_ids"] == base[r["id"][1:]]
            # SGLang computed one token of the resubmitted prompt and loaded the rest (or
            # two: the killed rank may have died between streaming the last token and
            # sending that forward's commit, see above); the original prompt was all loaded
            cached = out[r["id"]]["meta_info"]["cached_tokens"]
            assert len(r["prompt"]) - 2 <= cached <= len(r["prompt"]) - 1
            assert cached >= len(r["prompt"]) - len(done[r["id"]])
        ((new_name, _),) = ((n, x) for n, x in groups(env).items() if n != name)
        env["op"].drop(name, unlink_regions=True)
        assert not [n for n in shm.list_names(env["daemon"].prefix) if name in n]
    finally:
        rc = again.stop()
    # a graceful shutdown: every rank said goodbye, the daemon dropped the group and its KV segments
    assert rc == 0, again.tail()
    assert new_name not in groups(env)
    assert not [n for n in shm.list_names(env["daemon"].prefix) if new_name in n]
    print(f"\nresumed in {max(o['seconds'] for o in out.values()):.2f} s "
          f"({sum(len(r['prompt']) - 1 for r in resumed)} tokens loaded)")


@pytest.mark.timeout(600)
def test_no_daemon_serves_unprotected_says_so_and_leaves_nothing(env, tmp_path):
    """An engine must not die because its sidecar is away: with no daemon on the
    socket, start-up waits GHOSTSERVE_SGLANG_DAEMON_WAIT seconds, then every rank
    runs unprotected, says so at ERROR level, serves, and leaves nothing in /dev/shm.
    (TP 1: what is checked is each rank's own, and one scheduler starts sooner.)"""
    before = set(os.listdir("/dev/shm"))
    srv = server(env, "nodaemon", tp=1, GHOSTSERVE_SGLANG_SOCKET=str(tmp_path / "nobody.sock"),
                 GHOSTSERVE_SGLANG_DAEMON_WAIT="1")
    try:
        srv.wait_ready(240)
        out = srv.generate(env["requests"][0]["prompt"][:64], 4)
        assert len(out["output_ids"]) == 4
        log = open(srv.log_path).read()
        assert log.count("runs UNPROTECTED") == 1 and "within 1 s" in log, log[-3000:]
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(env["daemon"].prefix + "kv-")
                    and n not in before]
    finally:
        srv.stop()
    assert set(os.listdir("/dev/shm")) <= before
