"""What an operator hits on a real node, through the real gRPC server: a rank's
region must be its own KV; ended engines give their shared memory back (at once
after a clean shutdown, after --ended-ttl or under /dev/shm pressure after a
failure); the request index survives a SIGKILLed daemon; a daemon bug is answered
INTERNAL and never turns into a worker's failure; one daemon per socket and
shared-memory prefix; SIGTERM always ends the daemon; both reflection versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from test_resume import (
    BLOCK,
    BLOCKS,
    LAYERS,
    LAYOUT,
    SIZE,
    SLOTS,
    Rank,
    _one_request,
    code,
    end_engine,
    fill,
    wait_ended,
)

from ghostserve import shm
from ghostserve.client import OperatorClient, WorkerClient, channel, worker_stub
from ghostserve.config import Config
from ghostserve.daemon.server import Server
from ghostserve.errors import DaemonStartError, RegionRefused
from ghostserve.sidecar import Sidecar
from ghostserve.v1 import ghostserve_pb2 as pb


def wait(cond, timeout=5.0, what="condition"):
    """Poll a condition a test cannot be told about (another process's state)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.01)


def groups(sock) -> dict:
    op = OperatorClient(sock)
    try:
        return {g.group: g for g in op.status().groups}
    finally:
        op.close()


@pytest.fixture
def server_with(tmp_path, shm_prefix):
    """Factory: a started in-process Server with Config overrides (and a fresh registry)."""
    made = []

    def make(shm_free=shm.free_bytes, **overrides) -> Server:
        cfg = Config(socket=str(tmp_path / f"gs{len(made)}.sock"), shm_prefix=shm_prefix, encode_threads=2,
                     **overrides)
        s = Server(cfg, CollectorRegistry(), shm_free=shm_free)
        s.start()
        s.sock, s.registry = cfg.socket, s.daemon.registry
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop(grace=1)


# ------------------------------------------------------------------ regions


def test_a_region_must_be_the_callers_own_kv(daemon, region, shm_prefix):
    rng = np.random.default_rng(1)
    live = _one_request(daemon, region, "live", 2, 1, rng)
    stub = worker_stub(channel(daemon.sock))

    def register(group, rank, name):
        return stub.Register(pb.RegisterRequest(
            group=group, rank=rank, world_size=2, parity=1, layout=pb.KVLayout(**live[0].client.layout),
            region=pb.Region(shm_name=name, size=SIZE), pid=os.getpid(), keep_survivors=True))

    # the daemon's own parity arena and metadata, of a live group and of the group being created
    for name in (f"{shm_prefix}live.parity", f"{shm_prefix}live.meta", f"{shm_prefix}new.parity",
                 f"{shm_prefix}live.index"):
        assert code(register, "new", 0, name) == grpc.StatusCode.PERMISSION_DENIED
    # another live group's rank, and another rank of the same group
    assert code(register, "new", 0, live[1].seg.name) == grpc.StatusCode.ALREADY_EXISTS
    assert code(register, "live", 0, live[1].seg.name) == grpc.StatusCode.ALREADY_EXISTS
    assert "new" not in groups(daemon.sock)  # a refused first registration leaves nothing
    assert shm.exists(f"{shm_prefix}live.parity")
    # the holder is untouched and still protects its KV
    fill(live, rng, 1, {1: (5, 6)}, {"q": 14}, [])
    assert live[0].client.wait_protected(1)
    assert OperatorClient(daemon.sock).scrub("live").checksum_mismatches == 0
    rejected = daemon.registry.get_sample_value(
        "ghostserve_rejected_requests_total", {"method": "Register", "code": "ALREADY_EXISTS"})
    assert rejected == 2


def test_region_prefix_pins_what_the_daemon_maps(server_with, region, shm_prefix):
    s = server_with(region_prefix=shm_prefix + "kv-")
    outside, inside = region(SIZE, "other"), region(SIZE, "kv-r0")
    c = WorkerClient(s.sock, "p", 0, 1, 1, LAYOUT, outside.name, SIZE)
    with pytest.raises(RegionRefused) as info:  # the daemon's class, rebuilt by the client
        c.register()
    assert info.value.code == "PERMISSION_DENIED" and "--region-prefix" in str(info.value)
    c = WorkerClient(s.sock, "p", 0, 1, 1, LAYOUT, inside.name, SIZE)
    assert c.register().role == pb.RegisterResponse.NEW
    c.close()


# ------------------------------------------------------------------ ended engines


def test_clean_shutdown_drops_the_group_and_its_segments_at_once(server_with, region, shm_prefix):
    s = server_with()
    rng = np.random.default_rng(2)
    ranks = _one_request(s, region, "clean", 2, 1, rng)
    names = [r.seg.name for r in ranks]
    assert any(n.startswith(f"{shm_prefix}clean.") for n in shm.list_names(shm_prefix))
    ranks[0].client.goodbye(release_region=True)
    assert "clean" in groups(s.sock)  # one rank left: the group waits for the other
    ranks[1].client.goodbye(release_region=True)
    wait(lambda: "clean" not in groups(s.sock), what="clean drop")
    left = shm.list_names(shm_prefix)
    assert not any(n.startswith(f"{shm_prefix}clean.") for n in left)   # parity, meta, index
    assert not set(names) & set(left)                                   # the KV regions
    assert s.registry.get_sample_value("ghostserve_groups_dropped_total", {"reason": "clean"}) == 1
    # no series of the group is left behind
    assert s.registry.get_sample_value("ghostserve_kv_bytes", {"group": "clean"}) is None


def test_a_failure_is_not_a_goodbye_even_when_survivors_say_it(server_with, region):
    """vLLM tears the survivors down cleanly after one worker died: their goodbye
    must keep the group (and their memory) for a resume."""
    s = server_with()
    rng = np.random.default_rng(3)
    ranks = _one_request(s, region, "f", 3, 1, rng)
    ranks[1].client.close()  # dies: no goodbye
    wait(lambda: groups(s.sock)["f"].state == "degraded", what="loss")
    ranks[0].client.goodbye(release_region=True)
    ranks[2].client.goodbye(release_region=True)
    wait(lambda: groups(s.sock)["f"].state == "ended", what="end")
    g = groups(s.sock)["f"]
    assert {r.rank: r.state for r in g.ranks} == {0: "detached", 1: "lost", 2: "detached"}
    assert shm.exists(ranks[0].seg.name) and shm.exists(ranks[2].seg.name)
    hit = worker_stub(channel(s.sock)).Lookup(pb.LookupRequest(tokens=np.arange(14, dtype="<u4").tobytes()))
    assert (hit.group, hit.tokens) == ("f", 13)


def test_a_dropped_group_s_ranks_are_not_lost_afterwards(server_with, region):
    """The pid watcher works from a snapshot of the groups: one it still holds after a
    Drop must not report (log, count) a loss for a rank whose process ended since."""
    s = server_with()
    rng = np.random.default_rng(5)
    ranks = _one_request(s, region, "d", 2, 1, rng)
    end_engine(ranks, 1)
    wait(lambda: groups(s.sock)["d"].state == "ended", what="end")
    group = s.daemon.groups["d"]
    before = s.registry.get_sample_value("ghostserve_failures_total", {"group": "d", "kind": "pid_gone"}) or 0
    OperatorClient(s.sock).drop("d", unlink_regions=True)
    assert group.closed and group.watched_pids() == []
    assert group.mark_lost(0, "pid_gone") is False
    assert {r.state for r in group.ranks.values()} == {"detached", "lost"}
    after = s.registry.get_sample_value("ghostserve_failures_total", {"group": "d", "kind": "pid_gone"}) or 0
    assert after == before


def test_failure_ended_group_expires_after_the_ttl(server_with, region, shm_prefix):
    s = server_with(ended_ttl=1.0)
    rng = np.random.default_rng(4)
    ranks = _one_request(s, region, "t", 2, 1, rng)
    names = [r.seg.name for r in ranks]
    end_engine(ranks, 1)
    wait(lambda: groups(s.sock)["t"].state == "ended", what="end")
    g = groups(s.sock)["t"]
    # status tells its age, what it holds (store + the kept rank's KV) and when it goes
    assert 0 <= g.ended_seconds < 1.0 and 0 < g.expires_seconds <= 1.0
    assert g.held_bytes >= (1 + 1) * LAYERS * BLOCKS * BLOCK
    wait(lambda: "t" not in groups(s.sock), timeout=10, what="ttl drop")
    left = shm.list_names(shm_prefix)
    assert not any(n.startswith(f"{shm_prefix}t.") for n in left) and not set(names) & set(left)
    assert s.registry.get_sample_value("ghostserve_groups_dropped_total", {"reason": "ttl"}) == 1
    assert s.registry.get_sample_value("ghostserve_dropped_bytes_total", {"reason": "ttl"}) > 0


def test_shm_pressure_drops_ended_groups_oldest_first(server_with, region):
    """/dev/shm cannot be filled in a test: the free-space figure is the one fake
    here. It reads 0 while every group in ``pressure`` still exists."""
    pressure: set[str] = set()
    s = server_with(shm_free=lambda: 0 if pressure and pressure <= set(s.daemon.groups) else 1 << 40)
    rng = np.random.default_rng(5)
    for name in ("old", "mid"):
        ranks = _one_request(s, region, name, 2, 1, rng)
        end_engine(ranks, 0)
        wait_ended(s, name, 2)
    pressure.update({"old", "mid"})
    fresh = [Rank(s, region, "fresh", q, 2, 1) for q in range(2)]  # needs room: the oldest goes
    assert "old" not in groups(s.sock) and {"mid", "fresh"} <= set(groups(s.sock))
    assert s.registry.get_sample_value("ghostserve_groups_dropped_total", {"reason": "space"}) == 1
    # Reclaim (what an engine asks before allocating its KV) drops ended groups, never live ones
    pressure.clear()
    pressure.update({"mid", "fresh"})
    resp = worker_stub(channel(s.sock)).Reclaim(pb.ReclaimRequest(bytes=1 << 30))
    assert list(resp.dropped_groups) == ["mid"] and resp.free_bytes == 1 << 40
    assert "fresh" in groups(s.sock)
    for r in fresh:
        r.client.close()


# ------------------------------------------------------------------ index across a daemon crash


def test_lookup_and_fetch_survive_a_sigkilled_daemon(region):
    rng = np.random.default_rng(6)
    with Sidecar() as d:
        d.sock = d.socket
        ranks = _one_request(d, region, "crash", 2, 1, rng, prompt=13)
        fill(ranks, rng, 1, {1: (5, 6)}, {"q": 14}, [pb.RequestRecord(request_id="q", tokens=[99])])
        assert ranks[0].client.wait_protected(1)
        before = [r.kv.copy() for r in ranks]
        end_engine(ranks, 1)
        wait_ended(d, "crash", 2)
        d.kill()     # SIGKILL: the daemon's heap is gone
        d.start()    # same socket and prefix: it re-attaches from shared memory
        tokens = list(range(13)) + [99, 7]
        hit = worker_stub(channel(d.socket)).Lookup(pb.LookupRequest(tokens=np.asarray(tokens, dtype="<u4").tobytes()))
        assert (hit.group, hit.request_id, hit.tokens, list(hit.blocks)) == ("crash", "q", 14, [0, 1])
        dst = Rank(d, region, "crash-new", 1, 2, 1)
        resp = dst.client.fetch("crash", 1, hit.blocks, hit.tokens, [4, 5])  # the lost rank: rebuilt
        assert resp.rebuilt and list(resp.unrecoverable_blocks) == []
        assert np.array_equal(dst.kv[:, 4], before[1][:, 0])
        dst.client.close()


# ------------------------------------------------------------------ daemon bugs


def test_a_daemon_bug_in_commit_is_internal_and_not_a_lost_rank(daemon, region, monkeypatch):
    """Fault injection: Group.commit raises as a bug would (the rest is real)."""
    from ghostserve.daemon.group import Group

    rng = np.random.default_rng(7)
    ranks = _one_request(daemon, region, "bug", 2, 1, rng)
    real = Group.commit
    calls = {"n": 0}

    def buggy(self, rank, session, rec):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected bug")
        return real(self, rank, session, rec)

    monkeypatch.setattr(Group, "commit", buggy)
    fill(ranks, rng, 1, {1: (5, 6)}, {"q": 14}, [])
    # the worker got INTERNAL, rejoined and resent: the step is protected, no rank was lost
    assert ranks[0].client.wait_protected(1) and ranks[1].client.wait_protected(1)
    assert any(e.code == "INTERNAL" for c in ranks for e in c.client.errors)
    g = groups(daemon.sock)["bug"]
    assert g.state == "healthy" and {r.state for r in g.ranks} == {"alive"}
    assert daemon.registry.get_sample_value("ghostserve_failures_total", {"group": "bug", "kind": "stream_closed"}) is None


def test_a_failing_step_is_reported_and_the_group_goes_on(daemon, region, monkeypatch):
    """Fault injection: encoding one step raises. The step's writers lose their
    watermark for good, others keep theirs, and later steps are protected."""
    from ghostserve.daemon.datapath.host import HostDataPath

    rng = np.random.default_rng(8)
    ranks = _one_request(daemon, region, "enc", 2, 1, rng)   # "q" protected at 13 tokens
    real = HostDataPath._encode_range
    monkeypatch.setattr(HostDataPath, "_encode_range", lambda *a: (_ for _ in ()).throw(RuntimeError("injected")))
    fill(ranks, rng, 1, {2: (0, 3)}, {"q": 13, "v": 3},
         [pb.RequestRecord(request_id="v", tokens=[1, 2, 3], blocks=[2], reset=True)])
    assert ranks[0].client.wait_protected(1)  # the step is done with, not pending forever
    event = ranks[0].client.events.get(timeout=5)
    assert event.kind == pb.GroupEvent.STEP_FAILED
    monkeypatch.setattr(HostDataPath, "_encode_range", real)
    fill(ranks, rng, 2, {2: (3, 4), 3: (0, 1)}, {"q": 13, "v": 4, "w": 1},
         [pb.RequestRecord(request_id="w", tokens=[5], blocks=[3], reset=True)])
    assert ranks[0].client.wait_protected(2)
    marks = {w.request_id: w.tokens for w in groups(daemon.sock)["enc"].watermarks}
    assert marks == {"w": 1}  # q and v wrote in the failed step; w came after
    assert daemon.registry.get_sample_value("ghostserve_encode_failures_total", {"group": "enc"}) == 1


def test_released_requests_do_not_pile_up(daemon, region):
    rng = np.random.default_rng(9)
    ranks = [Rank(daemon, region, "rel", q, 2, 1) for q in range(2)]
    for step in range(40):
        rid = f"r{step}"
        b = step % BLOCKS
        for r in ranks:
            r.client.release(step, [f"r{step - 1}"] if step else [], [b])
        fill(ranks, rng, step, {b: (0, 1)}, {rid: 1}, [pb.RequestRecord(request_id=rid, tokens=[step], blocks=[b],
                                                                          reset=True)])
    assert ranks[0].client.wait_protected(39)
    g = daemon.daemon.group("rel")
    assert len(g.index.forgotten) <= 2 and set(g.index.requests) <= {"r38", "r39"}


# ------------------------------------------------------------------ one daemon, clean signals


def test_one_daemon_per_socket_and_per_prefix(tmp_path, shm_prefix):
    first = Server(Config(socket=str(tmp_path / "a.sock"), shm_prefix=shm_prefix), CollectorRegistry())
    first.start()
    try:
        same_prefix = Server(Config(socket=str(tmp_path / "b.sock"), shm_prefix=shm_prefix), CollectorRegistry())
        with pytest.raises(DaemonStartError, match="prefix"):
            same_prefix.start()
        same_socket = Server(Config(socket=str(tmp_path / "a.sock"), shm_prefix=shm_prefix + "x-"),
                             CollectorRegistry())
        with pytest.raises(DaemonStartError, match="already answers"):
            same_socket.start()
        assert OperatorClient(str(tmp_path / "a.sock")).healthy()  # the first one still serves
        assert not os.path.exists(tmp_path / "b.sock")
        # the CLI says so and exits 1 without touching the live socket
        out = subprocess.run([sys.executable, "-m", "ghostserve", "serve", "--socket", str(tmp_path / "a.sock"),
                              "--shm-prefix", shm_prefix + "y-"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "already answers" in out.stderr
        assert OperatorClient(str(tmp_path / "a.sock")).healthy()
    finally:
        first.stop(grace=0)
    for name in shm.list_names(shm_prefix):
        shm.unlink(name)


def test_sigterm_always_ends_the_daemon(tmp_path):
    """SIGTERM at random moments after start, with and without a client streaming:
    every daemon exits 0 within its drain time."""
    rng = np.random.default_rng(10)
    prefix = f"gss{uuid.uuid4().hex[:6]}-"
    try:
        for i in range(8):
            sock = str(tmp_path / f"s{i}.sock")
            proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "serve", "--socket", sock,
                                     "--shm-prefix", prefix, "--log-level", "warning"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            client = None
            try:
                assert proc.stdout.readline().startswith(b"ready")
                if i % 2:
                    seg = shm.Segment.create(f"{prefix}kv{i}", SIZE)
                    client = WorkerClient(sock, f"s{i}", 0, 1, 1, LAYOUT, seg.name, SIZE, reconnect=False)
                    client.register()
                    client.commit(0, [(0, 0, BLOCK)], fills={0: SLOTS})
                time.sleep(float(rng.uniform(0, 0.3)))
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=15) == 0, proc.stderr.read().decode()[-2000:]
            finally:
                if proc.poll() is None:  # never leave a daemon behind, whatever failed
                    proc.kill()
                    proc.wait()
                if client is not None:
                    client.close()
                    seg.close()
            assert not os.path.exists(sock)
    finally:
        for name in shm.list_names(prefix):
            shm.unlink(name)


# ------------------------------------------------------------------ reflection


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services_in_both_versions(daemon, version):
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    ch = channel(daemon.sock)
    call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                            response_deserializer=rpb.ServerReflectionResponse.FromString)
    reqs = [rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol="ghostserve.v1.Worker"),
            rpb.ServerReflectionRequest(file_containing_symbol=f"grpc.reflection.{version}.ServerReflection")]
    listed, worker, own = list(call(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"ghostserve.v1.Worker", "ghostserve.v1.Operator", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert worker.file_descriptor_response.file_descriptor_proto
    assert own.file_descriptor_response.file_descriptor_proto, own.error_response
    ch.close()


def test_a_daemon_leaves_a_longer_prefix_alone(tmp_path, region, shm_prefix):
    """chaos runs its private daemon under the node's prefix: a restart of the
    node's daemon must not take that daemon's groups for its own."""
    inner = Server(Config(socket=str(tmp_path / "in.sock"), shm_prefix=shm_prefix + "c1-"), CollectorRegistry())
    inner.start()
    inner.sock = inner.config.socket
    outer = None
    try:
        ranks = _one_request(inner, region, "x", 2, 1, np.random.default_rng(11))
        outer = Server(Config(socket=str(tmp_path / "out.sock"), shm_prefix=shm_prefix), CollectorRegistry())
        outer.start()
        assert groups(outer.config.socket) == {}
        fill(ranks, np.random.default_rng(12), 1, {1: (5, 6)}, {"q": 14}, [])
        assert ranks[0].client.wait_protected(1)  # the inner daemon is undisturbed
        for r in ranks:
            r.client.goodbye()
    finally:
        inner.stop(grace=0)
        if outer is not None:
            outer.stop(grace=0)


# ------------------------------------------------------------------ a daemon slow to answer


def test_a_fresh_client_waits_out_a_daemon_that_is_slow_to_answer():
    """A daemon descheduled for a while (SIGSTOP here; CPU starvation on a busy node
    does the same) must not fail a new channel's call within its deadline. With a
    20 ms connect timeout it failed at once: UNAVAILABLE, no SETTINGS frame."""
    with Sidecar() as d:
        op = OperatorClient(d.socket, timeout=30)  # a new channel: the handshake is still to come
        os.kill(d.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(1) as pool:
                call = pool.submit(op.status)
                time.sleep(1.0)
                assert not call.done()  # still waiting for the stopped daemon, not failed
                os.kill(d.proc.pid, signal.SIGCONT)
                resp = call.result(timeout=30)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
            op.close()
        assert time.monotonic() - t0 >= 1.0 and list(resp.groups) == []
        stub = worker_stub(channel(d.socket))  # and the workers' channel, from a stopped start
        os.kill(d.proc.pid, signal.SIGSTOP)
        threading.Timer(0.5, os.kill, (d.proc.pid, signal.SIGCONT)).start()
        hit = stub.Lookup(pb.LookupRequest(tokens=np.asarray([1, 2, 3], dtype="<u4").tobytes()), timeout=30)
        assert hit.tokens == 0
