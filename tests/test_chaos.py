"""Fault injection through real processes: a daemon subprocess, worker processes
killed with SIGKILL, real shared memory. Every restored byte is checked against
the generator by the harness; these tests check its verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ghostserve.chaos.harness import Chaos
from ghostserve.chaos.workload import Shape, Workload


def run(steps=40, **kw):
    shape_kw = {k: kw.pop(k) for k in list(kw) if k in Shape.__dataclass_fields__}
    return Chaos(Shape(steps=steps, **shape_kw), **kw).run()


def assert_clean(r):
    assert r.ok, r
    assert r.errors == [] and r.mismatched_bytes == 0 and r.garbage_bytes == 0
    assert r.final_mismatched_bytes == 0 and r.final_verified_bytes > 0


def test_kill_each_rank_in_turn():
    r = run(steps=56, kills=[(0, 10), (1, 22), (2, 34), (3, 46)])
    assert_clean(r)
    assert [f["rank"] for f in r.faults] == [0, 1, 2, 3]
    assert len(r.recovery_seconds) == 4 and r.verified_bytes > 0 and r.restored_bytes > 0
    assert r.unrecoverable_ranges == []
    # measured 6-50 ms here (see benchmarks/RESULTS.md); the bound only catches a dead
    # detector without flaking on a loaded machine
    assert all(d < 0.5 for d in r.detect_seconds), r.detect_seconds


def test_m_ranks_at_once_with_m_2():
    r = run(parity=2, kills=[(0, 15), (3, 15)])
    assert_clean(r)
    assert r.unrecoverable_ranges == [] and len(r.recovery_seconds) == 2


def test_daemon_restart_then_kill_loses_nothing():
    r = Chaos(Shape(steps=40), kills=[(2, 20)], daemon_kills=[10]).run()
    assert_clean(r)
    assert r.daemon_restarts == 1 and r.unrecoverable_ranges == [] and r.verified_bytes > 0


def test_corrupt_survivor_with_m_1_is_reported_unrecoverable():
    r = Chaos(Shape(steps=40), kills=[(2, 20)], corrupts=[(1, 15)]).run()
    assert_clean(r)
    assert r.corruption_detected >= 1
    assert r.unrecoverable_ranges, "a corrupt survivor plus a lost rank exceed m=1"


def test_corrupt_survivor_with_m_2_is_corrected():
    r = Chaos(Shape(steps=40, parity=2), kills=[(2, 20)], corrupts=[(1, 15)]).run()
    assert_clean(r)
    assert r.corruption_detected >= 1 and r.unrecoverable_ranges == []


def test_silent_corruption_alone_is_found_by_scrub_and_repaired():
    r = Chaos(Shape(steps=40), corrupts=[(3, 15)]).run()
    assert_clean(r)
    assert r.corruption_detected == 1 and r.corruption_repaired == 1


def test_more_than_m_failures_are_reported_and_nothing_garbage_is_written():
    r = Chaos(Shape(steps=40, parity=1), kills=[(0, 15), (1, 15)]).run()
    assert_clean(r)  # garbage_bytes == 0: unrecoverable bytes were left untouched
    assert {u["rank"] for u in r.unrecoverable_ranges} == {0, 1}


def test_kill_right_after_blocks_are_freed_and_reused():
    shape = Shape(steps=40)
    work = Workload(shape)
    freed_at = next(s.step for s in work.steps if s.freed)
    reused = set(work.steps[freed_at].freed) & {b for _, _, b, _ in work.steps[freed_at + 1].writes}
    assert reused, "the workload must reuse freed blocks right away"
    r = Chaos(shape, kills=[(1, freed_at + 2)]).run()
    assert_clean(r)
    assert r.unrecoverable_ranges == []


@pytest.mark.slow
def test_long_run_with_every_fault():
    r = Chaos(Shape(steps=300, parity=2, blocks=128, requests=10), kills=[(0, 50), (1, 50), (3, 120)],
              daemon_kills=[80, 200], corrupts=[(2, 150)]).run()
    assert_clean(r)


def test_cli_prints_one_json_object_and_exit_status():
    out = subprocess.run([sys.executable, "-m", "ghostserve", "chaos", "--json", "--steps", "20",
                          "--kill", "1@8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("ok", "steps", "faults", "restored_bytes", "mismatched_bytes", "unrecoverable_ranges",
                "recovery_seconds", "parity_bytes", "kv_bytes", "max_lag_steps"):
        assert key in d
    assert d["ok"] is True and d["steps"] == 20 and d["faults"][0]["kind"] == "kill"
    # parity is m/N of the protected KV
    assert d["parity_bytes"] * 4 == d["kv_bytes"]
    bad = subprocess.run([sys.executable, "-m", "ghostserve", "chaos", "--json", "--kill", "9@5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
