"""Fetch's fused path on a real daemon: many small blocks (SGLang's token pages,
one slot each), copied from a kept rank or rebuilt from parity tile by tile,
into destination blocks that run on in places and jump in others. Byte-exact
against what was protected; corruption found by the tiles' checks goes the
block-by-block way and is repaired or reported, never delivered."""

from __future__ import annotations

import time
import uuid

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostserve.client import OperatorClient, WorkerClient
from ghostserve.v1 import ghostserve_pb2 as pb

PLANES, SLOT = 4, 64      # K and V of two layers; 64 bytes per token per plane


def layout(page: int, blocks: int) -> dict:
    bb = page * SLOT
    return dict(num_layers=PLANES, num_blocks=blocks, block_bytes=bb, chunk_bytes=bb, layer_stride=blocks * bb,
                block_stride=bb, offset=0, block_slots=page,
                slot_map=(np.arange(bb) // SLOT).astype("<u2").tobytes())


class Rank:
    def __init__(self, daemon, region, group, rank, n, m, page, blocks):
        lay = layout(page, blocks)
        self.seg = region(PLANES * blocks * lay["block_bytes"])
        self.kv = self.seg.array().reshape(PLANES, blocks, lay["block_bytes"])
        self.client = WorkerClient(daemon.sock, group, rank, n, m, lay, self.seg.name, self.seg.size,
                                   keep_survivors=True)
        self.client.register()


def ended(daemon, group, n):
    op = OperatorClient(daemon.sock)
    for _ in range(400):
        (g,) = op.status(group).groups
        if len(g.ranks) == n and all(r.state in ("lost", "detached") for r in g.ranks):
            return
        time.sleep(0.01)
    raise AssertionError("the group never ended")


def protect(daemon, region, rng, n, m, page, blocks, pages):
    """An engine of ``n`` ranks that wrote ``pages`` (whole) and was protected, then
    died (rank 1 first). Returns (group, ranks, their bytes as protected)."""
    name = f"ft-{uuid.uuid4().hex[:8]}"
    ranks = [Rank(daemon, region, name, q, n, m, page, blocks) for q in range(n)]
    for r in ranks:
        r.kv[:, pages] = rng.integers(0, 256, r.kv[:, pages].shape, dtype=np.uint8)
    tokens = list(range(len(pages) * page))
    for q, r in enumerate(ranks):
        r.client.commit(0, [(p, 0, page * SLOT) for p in pages], requests={"q": len(tokens)},
                        fills=dict.fromkeys(pages, page),
                        records=[pb.RequestRecord(request_id="q", tokens=tokens, blocks=pages, reset=True)] if q == 0
                        else ())
    assert ranks[0].client.wait_protected(0)
    before = [r.kv.copy() for r in ranks]
    ranks[1].client.close()
    for q, r in enumerate(ranks):
        if q != 1:
            r.client.close()
    ended(daemon, name, n)
    ranks[1].kv[:] = 0xA5  # the lost rank's memory is gone
    return name, ranks, before


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page=st.sampled_from([1, 4]), count=st.integers(1, 300), cuts=st.lists(st.integers(1, 299), max_size=6),
       corrupt=st.sampled_from(["none", "kept", "other"]), seed=st.integers(0, 2**32 - 1))
def test_fetch_of_many_small_blocks_is_byte_exact(daemon, region, page, count, cuts, corrupt, seed):
    rng = np.random.default_rng(seed)
    blocks = 700
    pages = sorted(rng.choice(np.arange(1, blocks), count, replace=False).tolist())
    # destination: runs of consecutive blocks with jumps at `cuts`, somewhere else
    dst, at = [], 2
    for i in range(count):
        if i in cuts:
            at += 3
        dst.append(at)
        at += 1
    if dst[-1] >= blocks:
        return
    name, ranks, before = protect(daemon, region, rng, 3, 2, page, blocks, pages)
    victim = int(rng.integers(0, count))
    bad_rank = {"none": None, "kept": 0, "other": 2}[corrupt]  # a survivor with one bad byte
    if bad_rank is not None:
        ranks[bad_rank].kv[int(rng.integers(0, PLANES)), pages[victim], int(rng.integers(0, page * SLOT))] ^= 0x40
    fresh = [Rank(daemon, region, name + "-new", q, 3, 2, page, blocks) for q in range(3)]
    found = 0
    try:
        for q, r in enumerate(fresh):
            resp = r.client.fetch(name, q, pages, count * page, dst)
            # rank 1 is rebuilt from the survivors; with m = 2 a bad survivor is one more
            # erasure, repaired where it lies once found (so a later fetch may copy it)
            assert list(resp.unrecoverable_blocks) == []
            assert resp.rebuilt or q != 1
            found += resp.corrupt_chunks
            assert np.array_equal(r.kv[:, dst], before[q][:, pages])
    finally:
        for r in fresh:
            r.client.close()
    assert 1 <= found <= 2 if bad_rank is not None else found == 0
    OperatorClient(daemon.sock).drop(name)


def test_fetch_beyond_the_code_reports_instead_of_delivering(daemon, region):
    rng = np.random.default_rng(1)
    pages = list(range(10, 60))
    name, ranks, before = protect(daemon, region, rng, 2, 1, 1, 64, pages)
    ranks[0].kv[1, 30, 0] ^= 0xFF  # rank 1 is lost: a bad kept byte on rank 0 is one erasure too many
    fresh = Rank(daemon, region, name + "-new", 0, 2, 1, 1, 64)
    try:
        resp = fresh.client.fetch(name, 0, pages, len(pages), list(range(1, 51)))
        assert list(resp.unrecoverable_blocks) == [30] and resp.corrupt_chunks == 1
        good = [i for i, p in enumerate(pages) if p != 30]
        assert np.array_equal(fresh.kv[:, [1 + i for i in good]], before[0][:, [pages[i] for i in good]])
        assert not fresh.kv[:, 1 + pages.index(30)].any()  # nothing delivered there
    finally:
        fresh.client.close()
    OperatorClient(daemon.sock).drop(name)


def test_fetch_into_blocks_that_never_run_on(daemon, region):
    """Destinations backwards: no tile may span two blocks (each would land on the wrong one)."""
    rng = np.random.default_rng(7)
    pages = list(range(3, 203))
    name, _, before = protect(daemon, region, rng, 2, 1, 1, 256, pages)
    fresh = [Rank(daemon, region, name + "-new", q, 2, 1, 1, 256) for q in range(2)]
    dst = list(range(255, 55, -1))
    try:
        for q, r in enumerate(fresh):
            resp = r.client.fetch(name, q, pages, len(pages), dst)
            assert list(resp.unrecoverable_blocks) == [] and resp.rebuilt == (q == 1)
            assert np.array_equal(r.kv[:, dst], before[q][:, pages])
    finally:
        for r in fresh:
            r.client.close()
    OperatorClient(daemon.sock).drop(name)
