"""The engine's pure parts, without processes: the scheduler's invariants and the
paged layout's dirty ranges, over generated workloads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

from ghostserve.engine.paged import KVShape  # noqa: E402
from ghostserve.engine.scheduler import Request, Scheduler  # noqa: E402
from ghostserve.errors import SchedulerError  # noqa: E402

requests = st.lists(st.tuples(st.integers(1, 60), st.integers(1, 12), st.integers(0, 8)), min_size=1, max_size=6)


def drive(sched: Scheduler, reqs: list[Request], fail_at: int = -1) -> list:
    """Run the scheduler to the end with fake samples; returns the plans."""
    for r in reqs:
        sched.add(r)
    plans, steps = [], 0
    while not sched.idle or sched.has_releases:
        plan = sched.plan()
        if not plan.segments and not plan.freed and not plan.finished:
            sched.tick()
            continue
        plans.append(plan)
        if steps == fail_at:  # a failed step is planned again, identically (admission is once)
            again = sched.plan()
            assert (again.segments, again.freed, again.finished) == (plan.segments, plan.freed, plan.finished)
        sched.accept(plan, [len(toks) + start for _, toks, start, _ in plan.segments])
        steps += 1
        assert steps < 10_000
    return plans


@settings(max_examples=80, deadline=None)
@given(requests, st.integers(4, 40), st.integers(2, 8), st.integers(-1, 20))
def test_every_request_finishes_and_blocks_are_never_shared_or_reused_early(spec, step_tokens, bt, fail_at):
    reqs = [Request(f"r{i}", list(range(1, p + 1)), n, arrival=a) for i, (p, n, a) in enumerate(spec)]
    blocks = max(-(-(len(r.prompt) + r.max_new) // bt) for r in reqs) + 2
    sched = Scheduler(blocks, bt, step_tokens=max(step_tokens, 4), max_running=4)
    plans = drive(sched, reqs, fail_at)
    assert all(r.done and len(r.generated) == r.max_new for r in reqs)
    owner: dict[int, str] = {}
    told: set[int] = set()
    for i, plan in enumerate(plans):
        assert sum(len(t) for _, t, _, _ in plan.segments) <= sched.step_tokens
        told.update(plan.freed)
        for b in plan.freed:
            owner.pop(b, None)
        for rid, toks, start, _ in plan.segments:
            req = next(r for r in reqs if r.rid == rid)
            for b in req.table:
                # a block is someone else's only after the daemon was told it is free
                assert owner.setdefault(b, rid) == rid, f"block {b} shared at plan {i}"
            assert toks == req.tokens[start:start + len(toks)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=3, max_size=3))
def test_roll_back_then_recovery_recomputes_exactly_what_was_lost(points):
    sched = Scheduler(40, 4, step_tokens=64, max_running=4)
    reqs = [Request(f"r{i}", list(range(3, 30 + i)), 20) for i in range(3)]
    for r in reqs:
        sched.add(r)
    for _ in range(4):
        plan = sched.plan()
        sched.accept(plan, [7] * len(plan.segments))
    before = {r.rid: r.kv_len for r in reqs}
    lost = sched.roll_back({r.rid: p for r, p in zip(reqs, points, strict=True)})
    segs = sched.recovery_segments()
    assert lost == sum(before[r.rid] - min(before[r.rid], p) for r, p in zip(reqs, points, strict=True))
    assert sum(len(t) for _, t, _, _ in segs) == lost
    for rid, toks, start, sample in segs:
        req = next(r for r in reqs if r.rid == rid)
        assert not sample and toks == req.tokens[start:before[rid]]
    sched.recovered()
    assert {r.rid: r.kv_len for r in reqs} == before
    assert sum(r.recomputed for r in reqs) == lost


def test_requests_that_cannot_run_are_refused():
    sched = Scheduler(4, 4)
    with pytest.raises(SchedulerError):
        sched.add(Request("big", list(range(20)), 1))  # needs 6 blocks of 4
    with pytest.raises(SchedulerError):
        Request("empty", [], 3)
    sched.add(Request("a", [1, 2], 1))
    with pytest.raises(SchedulerError):
        sched.add(Request("a", [1, 2], 1))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.sampled_from([1, 2, 4]), st.integers(0, 40), st.integers(1, 40),
       st.permutations(list(range(12))))
def test_dirty_ranges_cover_exactly_the_written_tokens(bt_mul, ct, start, count, perm):
    bt = ct * bt_mul
    shape = KVShape(layers=2, blocks=12, block_tokens=bt, kv_heads=1, head_dim=4, chunk_tokens=ct)
    table = perm[: -(-(start + count) // bt)]
    if len(table) < -(-(start + count) // bt):
        return
    ranges = shape.dirty([(table, start, count)])
    tb, covered = shape.token_bytes, set()
    for b, s, e in ranges:
        assert s % (ct * tb) == 0 and e % (ct * tb) == 0 and 0 <= s < e <= shape.block_bytes
        covered.update((b, x) for x in range(s // tb, e // tb))
    written = {(table[p // bt], p % bt) for p in range(start, start + count)}
    assert written <= covered
    # and nothing beyond the chunks that hold written tokens
    assert covered == {(b, c * ct + i) for b, x in written for c in [x // ct] for i in range(ct)}
