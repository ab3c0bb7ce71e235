"""The pid watcher: real processes, real pidfds, a real daemon. It reports an
ended process (a SIGKILLed one, not yet reaped) without polling, wakes on a kick,
and an idle daemon's watcher thread does not wake at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ghostserve.client import OperatorClient, WorkerClient
from ghostserve.daemon.pidwatch import PidWatch

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds on this OS: the daemon polls")

LAYOUT = dict(num_layers=2, num_blocks=8, block_bytes=1024, chunk_bytes=256,
              layer_stride=8 * 1024, block_stride=1024, offset=0)
SIZE = 2 * 8 * 1024


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_a_killed_process_is_reported_once_and_a_live_one_never():
    w = PidWatch()
    a, b = sleeper(), sleeper()
    try:
        w.sync([a.pid, b.pid])
        assert w.events
        assert w.wait(0.2) == set()
        a.kill()  # a zombie until reaped below: ended all the same
        t0 = time.monotonic()
        assert w.wait(30) == {a.pid}
        assert time.monotonic() - t0 < 10
        assert w.wait(0.1) == set()  # reported once; b still runs
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        w.close()


def test_a_pid_with_no_process_is_reported_and_a_dropped_pid_is_not():
    w = PidWatch()
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # reaped: no process has this pid now
    live = sleeper()
    try:
        w.sync([done.pid, live.pid])
        assert w.wait(5) == {done.pid}
        w.sync([])  # nobody asks for it any more: its end is nobody's business
        live.kill()
        live.wait()
        assert w.wait(0.3) == set()
    finally:
        live.kill()
        live.wait()
        w.close()


def test_an_ended_pid_still_asked_for_is_not_reported_again():
    """The daemon keeps asking for the pids of detached ranks (a failed engine's
    survivors, kept for a resume) after their workers end: reporting such a pid on
    every sync made the watcher thread spin at full speed until the group was dropped."""
    w = PidWatch()
    a = sleeper()
    try:
        w.sync([a.pid])
        a.kill()
        a.wait()  # reaped too: a pidfd can no longer be opened for it
        assert w.wait(30) == {a.pid}
        for _ in range(3):
            w.sync([a.pid])
            t0 = time.monotonic()
            assert w.wait(0.2) == set()
            assert time.monotonic() - t0 >= 0.15  # it slept
        w.sync([])
        w.sync([a.pid])  # asked for anew after it was dropped: reported anew
        assert w.wait(5) == {a.pid}
    finally:
        w.close()


def test_kick_wakes_a_wait_without_a_deadline():
    w = PidWatch()
    out: list[set[int]] = []
    t = threading.Thread(target=lambda: out.append(w.wait(None)))
    t.start()
    w.kick()
    t.join(10)
    assert not t.is_alive() and out == [set()]
    w.kick()
    w.kick()  # two pending kicks: one wait returns, the next one sleeps again
    assert w.wait(None) == set()
    t0 = time.monotonic()
    assert w.wait(0.2) == set() and time.monotonic() - t0 >= 0.15
    w.close()
    w.kick()  # after close: nothing is written anywhere


def _wakeups(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


@pytest.fixture(params=["pidfds", "polling"])
def watched_daemon(request, tmp_path, shm_prefix, monkeypatch):
    """A started daemon whose watcher uses pidfds, or polls (as where the kernel has none)."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from ghostserve.config import Config  # noqa: PLC0415
    from ghostserve.daemon import pidwatch  # noqa: PLC0415
    from ghostserve.daemon.server import Server  # noqa: PLC0415

    if request.param == "polling":
        real = pidwatch.PidWatch.__init__

        def no_pidfds(self):
            real(self)
            self.events = False
        monkeypatch.setattr(pidwatch.PidWatch, "__init__", no_pidfds)
    registry = CollectorRegistry()
    server = Server(Config(socket=str(tmp_path / "gs.sock"), shm_prefix=shm_prefix), registry)
    server.start()
    server.sock, server.registry, server.mode = str(tmp_path / "gs.sock"), registry, request.param
    yield server
    server.stop(grace=1)


def test_a_killed_worker_is_lost_and_an_idle_watcher_sleeps(watched_daemon, region):
    """The rank's stream stays open: only the pid watcher can see the worker go."""
    daemon = watched_daemon
    seg = region(SIZE, "r0")
    worker = sleeper()
    c = WorkerClient(daemon.sock, "p", 0, 2, 1, LAYOUT, seg.name, SIZE, pid=worker.pid)
    op = OperatorClient(daemon.sock)
    try:
        c.register()
        tid = daemon.daemon._watcher.native_id
        before = _wakeups(tid)
        time.sleep(1.0)
        if daemon.mode == "pidfds":
            assert _wakeups(tid) - before <= 2  # polling every 50 ms woke it about 50 times a second
        worker.kill()
        t0 = time.monotonic()
        while {r.rank: r.state for r in op.status("p").groups[0].ranks}.get(0) != "lost":
            assert time.monotonic() - t0 < 10, "the killed worker's rank is not lost"
            time.sleep(0.01)
        failures = daemon.registry.get_sample_value("ghostserve_failures_total", {"group": "p", "kind": "pid_gone"})
        assert failures == 1
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        c.close()
        op.close()
