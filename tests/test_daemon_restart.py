"""A daemon SIGKILLed and restarted at the moments a real crash can pick, through a
real daemon process (``ghostserve serve``), real worker processes' pids and real
shared memory: while a dead engine's last worker is still exiting, between a
rank's re-registration and the commits it resends, while a new rank registers
and makes its first commits, and for longer than a worker can hold its commits.
What must hold: the dead engine's group ends and serves Lookup and Fetch, a
restore never takes a survivor's unsent rewrite for corruption, an engine's
registration waits the daemon out, and a stalled protection shows."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_resume import BLOCK, LAYOUT, SIZE, SLOT_MAP, SLOTS, fill, protected_bytes

from ghostserve import shm
from ghostserve.client import Link, OperatorClient, WorkerClient, channel, worker_stub
from ghostserve.errors import DaemonUnavailable
from ghostserve.sidecar import Sidecar
from ghostserve.v1 import ghostserve_pb2 as pb


def sleeper() -> subprocess.Popen:
    """A process standing in for a worker: the daemon watches its pid."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def end(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def status(sock: str, group: str) -> pb.GroupStatus:
    op = OperatorClient(sock, timeout=30)
    try:
        return op.status(group).groups[0]
    finally:
        op.close()


@pytest.fixture
def sidecar():
    with Sidecar(log_level="info") as d:
        yield d


# ---------------------------------------------------------------- a dead engine's last worker


@pytest.mark.parametrize("last_worker_ends", ["while_the_daemon_is_down", "after_it_restarted"])
def test_a_dead_engine_s_group_ends_when_its_last_worker_ends_unseen(sidecar, region, last_worker_ends):
    """vLLM's TP rank 1 dies; the daemon is SIGKILLed while rank 0's worker is still
    exiting, and that worker never rejoins. The restarted daemon must see it end
    (pidfd, or at its start), end the group, serve Lookup and Fetch from it and let
    it be dropped with its shared memory. It used to keep rank 0 'detached' for
    ever: Lookup skipped the group and every drop was refused."""
    rng = np.random.default_rng(11)
    workers = [sleeper(), sleeper()]
    segs = [region(SIZE) for _ in range(2)]
    kv = [s.array().reshape(-1, 12, BLOCK) for s in segs]
    clients = [WorkerClient(sidecar.socket, "dead", r, 2, 1, LAYOUT, segs[r].name, SIZE, pid=workers[r].pid,
                            keep_survivors=True, reconnect=False) for r in range(2)]
    try:
        for c in clients:
            c.register()

        class R:  # what test_resume.fill writes through
            def __init__(self, i):
                self.client, self.kv = clients[i], kv[i]

            def write(self, rng, block, slot):
                mask = SLOT_MAP == slot
                self.kv[:, block, mask] = rng.integers(0, 256, (self.kv.shape[0], int(mask.sum())), dtype=np.uint8)

        ranks = [R(0), R(1)]
        tokens = list(range(100, 120))
        fill(ranks, rng, 0, {0: (0, SLOTS), 1: (0, SLOTS), 2: (0, 4)}, {"q": 20},
             [pb.RequestRecord(request_id="q", tokens=tokens, blocks=[0, 1, 2], reset=True)])
        assert clients[0].wait_protected(0) and clients[1].wait_protected(0)
        want = [protected_bytes(k, [0, 1, 2], 20) for k in kv]
        end(workers[1])  # rank 1 dies: its stream ends with it
        clients[1].close()
        OperatorClient(sidecar.socket).wait_ranks("dead", {1: "lost"}, 10)
        sidecar.kill()   # SIGKILL, while rank 0's worker is still "exiting" (it never rejoins)
        if last_worker_ends == "while_the_daemon_is_down":
            end(workers[0])
        sidecar.start()  # re-attaches from shared memory
        if last_worker_ends == "after_it_restarted":
            g = status(sidecar.socket, "dead")
            assert g.state != "ended" and {r.rank: r.state for r in g.ranks} == {0: "detached", 1: "lost"}
            end(workers[0])
        OperatorClient(sidecar.socket).wait_ended("dead", 10)
        g = status(sidecar.socket, "dead")
        assert {r.rank: (r.state, r.process_ended) for r in g.ranks} == {0: ("detached", True), 1: ("lost", False)}

        stub = worker_stub(channel(sidecar.socket))
        hit = stub.Lookup(pb.LookupRequest(tokens=np.asarray(tokens + [7], dtype="<u4").tobytes()), timeout=30)
        assert (hit.group, hit.tokens, list(hit.blocks)) == ("dead", 20, [0, 1, 2])
        for r in (0, 1):  # rank 0 copied from its kept memory, rank 1 rebuilt from parity
            seg = region(SIZE)
            dst = WorkerClient(sidecar.socket, f"new{r}", r, 2, 1, LAYOUT, seg.name, SIZE, keep_survivors=True)
            dst.register()
            resp = dst.fetch("dead", r, hit.blocks, hit.tokens, [5, 6, 7])
            assert resp.rebuilt == (r == 1) and list(resp.unrecoverable_blocks) == []
            got = seg.array().reshape(-1, 12, BLOCK)
            assert np.array_equal(protected_bytes(got, [5, 6, 7], 20), want[r])
            dst.goodbye(release_region=False)
        dropped = OperatorClient(sidecar.socket).drop("dead", unlink_regions=True)
        assert dropped.released_bytes > 0
        assert not [s.name for s in segs if os.path.exists("/dev/shm/" + s.name)]
    finally:
        for w in workers:
            if w.poll() is None:
                end(w)
        for c in clients:
            c.close()


# ---------------------------------------------------------------- a restore and resent commits

N3 = dict(num_layers=2, num_blocks=8, block_bytes=1024, chunk_bytes=256, layer_stride=8 * 1024,
          block_stride=1024, offset=0)
SIZE3 = 2 * 8 * 1024


def write_chunk(seg: shm.Segment, block: int, rng) -> None:
    """Chunk 0 of ``block`` in every layer."""
    kv = seg.array()
    for layer in range(2):
        at = layer * N3["layer_stride"] + block * N3["block_stride"]
        kv[at : at + 256] = rng.integers(0, 256, 256, dtype=np.uint8)


def register_request(group, rank, seg, pid, last_step=None) -> pb.RegisterRequest:
    return pb.RegisterRequest(group=group, rank=rank, world_size=3, parity=1, layout=pb.KVLayout(**N3),
                              region=pb.Region(shm_name=seg.name, size=SIZE3), pid=pid, last_step=last_step)


def test_a_restore_waits_for_the_commits_a_rejoined_survivor_resends(sidecar, region):
    """The interleaving behind a rare chaos failure (issue: 'protection stopped at
    step 2 after a daemon restart; 6 blocks unrecoverable'). The daemon is
    SIGKILLed while steps 4-7 are in flight; after the restart both survivors
    register again but their resent commits have not arrived, and the victim
    dies before it rejoined. A restore must not run yet: the survivors rewrote
    chunks protected at steps 0-3, and without their commits those chunks fail
    their checksums and are taken for corruption (with m = 1 and a rank lost:
    unrecoverable). It waits for them, then rebuilds everything settled: blocks 2
    and 3 (not rewritten) byte for byte; blocks 0 and 1 are in flux (steps 4-7
    are not encoded, rank 2 missed them) and left to the engine's recompute."""
    rng = np.random.default_rng(3)
    victim = sleeper()
    me = os.getpid()
    segs = [region(SIZE3) for _ in range(3)]
    pids = [me, me, victim.pid]
    clients = [WorkerClient(sidecar.socket, "rs", r, 3, 1, N3, segs[r].name, SIZE3, pid=pids[r], reconnect=False)
               for r in range(3)]
    streams: list[queue.Queue] = []
    try:
        for c in clients:
            c.register()
        for step in range(4):  # block `step`, chunk 0: protected at step 0..3
            for r in range(3):
                write_chunk(segs[r], step, rng)
                clients[r].commit(step, [(step, 0, 256)], {"q": step + 1})
        assert all(c.wait_protected(3) for c in clients)
        at_3 = segs[2].array().copy()
        sidecar.kill()
        later: dict[int, list[pb.WorkerMessage]] = {0: [], 1: []}
        for step in range(4, 8):  # rewrite blocks 0 and 1 (chunk 0) on every rank; the daemon is away
            block = step % 2
            for r in range(3):
                write_chunk(segs[r], block, rng)
            for r in (0, 1):
                later[r].append(pb.WorkerMessage(commit=pb.Commit(
                    step=step, dirty=np.asarray([(block, 0, 256)], dtype="<u8").tobytes(),
                    request_ids=["q"], request_tokens=[step + 1])))
        for c in clients:
            c.close()
        sidecar.start()
        stub = worker_stub(channel(sidecar.socket))
        sessions = {r: stub.Register(register_request("rs", r, segs[r], me, last_step=7), timeout=30)
                    for r in (0, 1)}
        assert {s.role for s in sessions.values()} == {pb.RegisterResponse.REJOINED}
        end(victim)  # it dies before it rejoined: its steps 4-7 never come
        OperatorClient(sidecar.socket).wait_ranks("rs", {2: "lost"}, 10)
        fresh = region(SIZE3)
        new = WorkerClient(sidecar.socket, "rs", 2, 3, 1, N3, fresh.name, SIZE3)
        assert new.register().role == pb.RegisterResponse.REPLACEMENT
        done: dict = {}
        restore = threading.Thread(target=lambda: done.update(resp=new.restore(), at=time.monotonic()))
        restore.start()
        time.sleep(1.0)
        assert "resp" not in done, "the restore ran before the survivors' resent commits arrived"
        resent = time.monotonic()
        calls = []
        for r in (0, 1):  # now the resends arrive, on the survivors' new streams
            q: queue.Queue = queue.Queue()
            streams.append(q)
            q.put(pb.WorkerMessage(hello=pb.Hello(group="rs", rank=r, session=sessions[r].session)))
            for msg in later[r]:
                q.put(msg)
            calls.append(stub.Stream(iter(q.get, None)))
        restore.join(30)
        resp = done["resp"]
        assert done["at"] >= resent
        assert list(resp.unrecoverable_blocks) == [] and resp.corrupt_chunks == 0
        assert resp.protected_step == 3 and resp.restored_bytes == 2 * 2 * 256  # blocks 2, 3; two layers
        got = fresh.array()
        for layer in range(2):
            for block in range(4):
                at = layer * N3["layer_stride"] + block * N3["block_stride"]
                want = at_3[at : at + 256] if block >= 2 else 0  # in flux: not restored
                assert np.array_equal(got[at : at + 256], np.broadcast_to(want, 256)), (layer, block)
        new.close()
    finally:
        for q in streams:
            q.put(None)
        if victim.poll() is None:
            end(victim)


# ---------------------------------------------------------------- registration and first commits


def test_registration_and_first_commits_wait_out_a_restarting_daemon(sidecar, region):
    """A new engine's rank registers while its daemon is down (SIGKILLed, coming
    back): the registration waits for it instead of failing the engine. Then the
    daemon dies again under the first commits: they are resent and protected."""
    seg = region(SIZE3)
    c = WorkerClient(sidecar.socket, "b", 0, 1, 1, N3, seg.name, SIZE3)
    try:
        sidecar.kill()
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(resp=c.register(wait=60)))
        t.start()
        time.sleep(1.0)
        assert "resp" not in out  # waiting, not failed
        sidecar.start()
        t.join(60)
        assert out["resp"].role == pb.RegisterResponse.NEW and c.link == Link.PROTECTED
        rng = np.random.default_rng(1)
        for step in range(3):
            write_chunk(seg, step, rng)
            c.commit(step, [(step, 0, 256)], {"q": step + 1})
        sidecar.kill()
        for step in range(3, 6):
            write_chunk(seg, step, rng)
            c.commit(step, [(step, 0, 256)], {"q": step + 1})
        sidecar.start()
        assert c.wait_protected(5, timeout=60), c.protected_step
        g = status(sidecar.socket, "b")
        assert g.protected_step == 5 and {w.request_id: w.tokens for w in g.watermarks} == {"q": 6}
        assert c.link == Link.PROTECTED
    finally:
        c.close()


def test_no_daemon_within_the_wait_is_daemon_unavailable(tmp_path, region):
    seg = region(SIZE3)
    c = WorkerClient(str(tmp_path / "nobody.sock"), "x", 0, 1, 1, N3, seg.name, SIZE3)
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable, match="within 0.5 s"):
        c.register(wait=0.5)
    assert 0.4 < time.monotonic() - t0 < 10
    c.close()


def test_a_daemon_away_longer_than_the_client_can_hold_ends_protection_not_the_engine(sidecar, region):
    seg = region(SIZE3)
    c = WorkerClient(sidecar.socket, "away", 0, 1, 1, N3, seg.name, SIZE3, max_unacked=8)
    try:
        c.register()
        c.commit(0, [(0, 0, 256)])
        assert c.wait_protected(0)
        sidecar.kill()
        for step in range(1, 30):  # never blocks, never raises
            c.commit(step, [(step % 8, 0, 256)])
        assert c.link == Link.UNPROTECTED and len(c._unacked) == 0
    finally:
        c.close()


# ---------------------------------------------------------------- a stalled protection shows


def test_protection_lag_grows_in_status_and_metrics_while_a_rank_is_missing(region, monkeypatch):
    monkeypatch.setenv("GHOSTSERVE_STALL_SECONDS", "0.5")
    with Sidecar(metrics_port=_free_port()) as d:
        segs = [region(SIZE3) for _ in range(3)]
        clients = [WorkerClient(d.socket, "lag", r, 3, 1, N3, segs[r].name, SIZE3) for r in range(3)]
        try:
            for c in clients:
                c.register()
            for step in range(2):
                for c in clients:
                    c.commit(step, [(step, 0, 256)])
            assert clients[0].wait_protected(1)
            assert status(d.socket, "lag").lag_seconds == 0
            for c in clients[:2]:  # rank 2 never commits step 2: protection stops at 1
                c.commit(2, [(2, 0, 256)])
            time.sleep(1.0)
            g = status(d.socket, "lag")
            # the daemon's clock starts when the commit arrives, a moment after it was sent
            assert (g.protected_step, g.lag_steps) == (1, 1) and g.lag_seconds >= 0.5
            assert g.state == "stalled"  # not healthy: a step has waited longer than stall_seconds
            import urllib.request  # noqa: PLC0415

            text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=30).read().decode()
            (value,) = [float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith('ghostserve_checkpoint_lag_seconds{group="lag"}')]
            assert value >= 0.5
            clients[2].commit(2, [(2, 0, 256)])
            assert clients[2].wait_protected(2)
            g = status(d.socket, "lag")
            assert g.lag_seconds == 0 and g.state == "healthy"
        finally:
            for c in clients:
                c.close()


def _free_port() -> int:
    from ghostserve.front.vllm_server import free_port  # noqa: PLC0415

    return free_port()



# ---------------------------------------------------------------- Operator.Watch


def test_watch_tells_what_happens_as_it_happens(sidecar, region):
    """A snapshot first, then rank states, protected steps, the engine's end and the
    drop; an unknown group is NOT_FOUND; a daemon that stops ends every watch."""
    from ghostserve.errors import UnknownGroup  # noqa: PLC0415

    op = OperatorClient(sidecar.socket, timeout=30)
    with pytest.raises(UnknownGroup):
        next(op.watch("nobody", timeout=5))
    worker = sleeper()
    segs = [region(SIZE3) for _ in range(2)]
    clients = [WorkerClient(sidecar.socket, "w", r, 2, 1, N3, segs[r].name, SIZE3, keep_survivors=True,
                            pid=worker.pid if r == 1 else None) for r in range(2)]
    try:
        clients[0].register()
        events = op.watch("w", timeout=60)
        first = next(events)
        assert pb.WatchEvent.Kind.Name(first.kind) == "SNAPSHOT" and [r.rank for r in first.ranks] == [0]
        clients[1].register()
        ev = next(events)
        assert (pb.WatchEvent.Kind.Name(ev.kind), ev.rank, ev.rank_state) == ("RANK_STATE", 1, "alive")
        for step in range(50):
            for c in clients:
                c.commit(step, [(step % 8, 0, 256)])
        assert clients[0].wait_protected(49)
        time.sleep(0.2)
        steps = []
        while True:
            ev = next(events)
            assert pb.WatchEvent.Kind.Name(ev.kind) == "STEP_PROTECTED"
            steps.append(ev.protected_step)
            if ev.protected_step == 49:
                break
        assert steps == sorted(set(steps))
        end(worker)  # rank 1's process ends: lost; rank 0 then ends too: kept, the engine ended
        ev = next(events)
        assert (pb.WatchEvent.Kind.Name(ev.kind), ev.rank, ev.rank_state, ev.state) == (
            "RANK_STATE", 1, "lost", "degraded")
        clients[0].close()
        kinds = []
        while "GROUP_ENDED" not in kinds:
            ev = next(events)
            kinds.append(pb.WatchEvent.Kind.Name(ev.kind))
        assert kinds == ["RANK_STATE", "GROUP_ENDED"] and ev.state == "ended"
        op.drop("w")
        ev = next(events)
        assert (pb.WatchEvent.Kind.Name(ev.kind), ev.detail) == ("GROUP_DROPPED", "operator")
        everything = op.watch("", timeout=60)  # every group: none left, so nothing until the daemon stops
        t0 = time.monotonic()
        sidecar.stop()
        try:
            assert list(everything) == []  # the stream ended with the daemon...
        except DaemonUnavailable:
            pass  # ...or was cut off by its shutdown: either way at once, not at the timeout
        assert time.monotonic() - t0 < 30
    finally:
        if worker.poll() is None:
            end(worker)
        for c in clients:
            c.close()


def test_a_slow_watcher_gets_the_newest_protected_step_not_every_one():
    from ghostserve.daemon.calls import Notice, NoticeKind  # noqa: PLC0415
    from ghostserve.daemon.watch import Watchers  # noqa: PLC0415

    hub = Watchers()
    mine, every = hub.subscribe("g"), hub.subscribe("")
    for t in range(1000):
        hub.publish(Notice(NoticeKind.STEP_PROTECTED, "g", t, "healthy"))
    hub.publish(Notice(NoticeKind.RANK_STATE, "g", 999, "degraded", rank=1, rank_state="lost"))
    hub.publish(Notice(NoticeKind.STEP_PROTECTED, "other", 5, "healthy"))
    got = [mine.get(0) for _ in range(3)]
    assert [(n.kind, n.protected_step) for n in got if n] == [("STEP_PROTECTED", 999), ("RANK_STATE", 999)]
    assert [n.group for n in (every.get(0), every.get(0), every.get(0))] == ["g", "g", "other"]
    hub.close()
    assert mine.closed and mine.get(5) is None  # closed: no wait
