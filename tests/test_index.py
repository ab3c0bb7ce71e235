"""The request index (watermarks, Lookup records, releases) in its SQLite file on
/dev/shm: what one process writes, a new one reads back, whatever the sequence of
steps and releases; a resent step is not applied twice; a SIGKILL in the middle
of a transaction leaves the state of the last whole one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostserve import shm
from ghostserve.daemon.index import Record, RequestIndex, StepNews, index_names

REQS = ["a", "b", "c"]


class Model:
    """The index's meaning, in plain dictionaries (the oracle)."""

    def __init__(self):
        self.marks: dict[str, int] = {}
        self.reqs: dict[str, tuple[list[int], list[int]]] = {}
        self.forgotten: dict[str, int] = {}
        self.unprotected: set[str] = set()
        self.step = -1

    def apply(self, n: StepNews) -> None:
        if n.step is not None and n.step <= self.step:
            return
        gone = n.finished | set(n.forget)
        blocked = self.unprotected | n.unprotect
        for r, t in n.watermarks.items():
            if not (t and r in blocked):
                self.marks[r] = t
        for r in n.unprotect | gone:
            self.marks[r] = 0
        self.marks = {r: t for r, t in self.marks.items() if t}
        for rec in n.records:
            if rec.reset:
                self.reqs[rec.request] = ([], [])
            elif rec.request not in self.reqs:
                continue
            self.reqs[rec.request][0].extend(rec.tokens)
            self.reqs[rec.request][1].extend(rec.blocks)
        self.unprotected |= n.unprotect - gone
        for r in gone:
            self.reqs.pop(r, None)
            self.unprotected.discard(r)
        for r, s in n.forget.items():
            self.forgotten[r] = max(s, self.forgotten.get(r, s))
        if n.prune_before is not None:
            self.forgotten = {r: s for r, s in self.forgotten.items() if s >= n.prune_before}
        if n.step is not None:
            self.step = n.step


req = st.sampled_from(REQS)
record = st.builds(Record, req, st.lists(st.integers(0, 2**32 - 1), max_size=4),
                   st.lists(st.integers(0, 1000), max_size=2), st.booleans())
news = st.builds(
    StepNews, st.one_of(st.none(), st.integers(0, 12)),
    watermarks=st.dictionaries(req, st.integers(0, 50), max_size=3),
    records=st.lists(record, max_size=3), finished=st.sets(req, max_size=1),
    forget=st.dictionaries(req, st.integers(0, 12), max_size=1), unprotect=st.sets(req, max_size=1),
    prune_before=st.one_of(st.none(), st.integers(0, 12)))


def state(ix: RequestIndex) -> tuple:
    return (ix.watermarks, ix.requests, ix.forgotten, ix.unprotected, ix.index_step)


def model_state(m: Model) -> tuple:
    return (m.marks, m.reqs, m.forgotten, m.unprotected, m.step)


# create=True starts every example afresh, so the prefix fixture may be shared
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(news, max_size=12))
def test_index_matches_its_model_and_reopens_the_same(shm_prefix, seq):
    ix = RequestIndex.open(shm_prefix, "g", create=True)
    model = Model()
    try:
        for n in seq:
            ix.apply(n)
            model.apply(n)
            assert state(ix) == model_state(model)
        ix.close()
        again = RequestIndex.open(shm_prefix, "g")
        assert state(again) == model_state(model)
        again.close()
    finally:
        for name in index_names(shm_prefix, "g"):
            shm.unlink(name)


def test_resent_step_is_ignored_and_match_is_capped(shm_prefix):
    ix = RequestIndex.open(shm_prefix, "g", create=True)
    ix.apply(StepNews(step=0, watermarks={"a": 5}, records=[Record("a", [1, 2, 3, 4, 5, 6], [7, 8], True)]))
    # a step resent after a daemon restart: already applied, not appended twice
    assert ix.apply(StepNews(step=0, watermarks={"a": 6}, records=[Record("a", [9], [], False)])) == {}
    assert ix.requests["a"] == ([1, 2, 3, 4, 5, 6], [7, 8])
    tokens = np.array([1, 2, 3, 4, 5, 6, 7], dtype=np.uint32)
    assert ix.match(tokens, block_slots=4) == ("a", 5, [7, 8])        # capped at the watermark
    assert ix.match(np.array([1, 2, 9], dtype=np.uint32), 4) == ("a", 2, [7])
    ix.apply(StepNews(step=None, forget={"a": 3}))                     # a Release before step 3
    assert ix.match(tokens, 4) is None and ix.void("a", 2) and not ix.void("a", 3)
    ix.close()


def test_sigkill_mid_transaction_keeps_the_last_whole_step(shm_prefix, tmp_path):
    """A process applies steps in a loop and is SIGKILLed at a random moment; the
    index it leaves opens, and holds a prefix of its steps, each whole."""
    code = f"""
import sys
from ghostserve.daemon.index import Record, RequestIndex, StepNews
ix = RequestIndex.open({shm_prefix!r}, "g", create=True)
step = 0
while True:
    ix.apply(StepNews(step=step, watermarks={{"a": step + 1, "b": step + 1}},
                      records=[Record("a", [step], [step], step == 0)]))
    if step == 0:
        print("ready", flush=True)
    step += 1
"""
    rng = np.random.default_rng(3)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        try:
            proc.wait(timeout=float(rng.uniform(0.05, 0.3)))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        ix = RequestIndex.open(shm_prefix, "g")
        last = ix.index_step
        assert last >= 0
        # every step up to the last is there, whole: records and both watermarks agree
        assert ix.requests["a"] == (list(range(last + 1)), list(range(last + 1)))
        assert ix.watermarks == {"a": last + 1, "b": last + 1}
        ix.close()
    for name in index_names(shm_prefix, "g"):
        shm.unlink(name)
