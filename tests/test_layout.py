"""Layouts with several extents: K and V apart (vLLM FlashAttention, SGLang's
k_buffer/v_buffer), K and V of a block side by side (FlashInfer), and layers in
regions of their own. The validation against brute force, then the whole daemon
(commit, lose a rank, restore, scrub, fetch into an engine with another layout)
through its real gRPC server, byte for byte on the logical shards."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostserve.client import OperatorClient, WorkerClient, channel, worker_stub
from ghostserve.daemon.layout import Extent, Layout, _overlap, _strided_disjoint
from ghostserve.errors import InvalidRequest
from ghostserve.v1 import ghostserve_pb2 as pb

# ---------------------------------------------------------------------- validation


@st.composite
def extent_pairs(draw):
    blocks = draw(st.integers(1, 4))

    def one():
        return Extent(0, 0, draw(st.integers(1, 2)), draw(st.integers(0, 60)), draw(st.integers(0, 80)),
                      draw(st.sampled_from([8, 16, 24])), draw(st.integers(1, 12)), 0)

    return one(), one(), blocks


def cells(e: Extent, blocks: int) -> set[int]:
    return {e.offset + layer * e.layer_stride + b * e.block_stride + i
            for layer in range(e.layers) for b in range(blocks) for i in range(e.bytes)}


@settings(max_examples=400, deadline=None)
@given(extent_pairs())
def test_overlap_of_two_extents_against_brute_force(case):
    a, b, blocks = case
    for e in (a, b):
        if not _strided_disjoint(e.layers, blocks, e.layer_stride, e.block_stride, e.bytes):
            return  # refused (conservatively: shards nested neither way)
        assert len(cells(e, blocks)) == e.layers * blocks * e.bytes  # accepted: its pieces are apart
    truth = bool(cells(a, blocks) & cells(b, blocks))
    got = _overlap(a, b, blocks)
    if a.block_stride == b.block_stride:
        assert got == truth
    else:
        assert got or not truth  # conservative: never misses an overlap


def kv_apart(layers: int, blocks: int, half: int, regions_per_layer: bool = False) -> Layout:
    """(2, blocks, half) per layer: K of every block, then V of every block. One
    region for all layers, or one region per layer."""
    ext = []
    for layer in range(layers):
        region, first, base = (layer, layer, 0) if regions_per_layer else (0, 0, layer * 2 * blocks * half)
        if regions_per_layer or layer == 0:
            n = 1 if regions_per_layer else layers
            ext.append(Extent(region, first, n, base, 2 * blocks * half, half, half, 0))
            ext.append(Extent(region, first, n, base + blocks * half, 2 * blocks * half, half, half, half))
    return Layout(layers, blocks, 2 * half, half, 0, 0, extents=tuple(ext))


def kv_side_by_side(layers: int, blocks: int, half: int) -> Layout:
    """FlashInfer: (blocks, 2, half) per layer, layers one after another."""
    ls = blocks * 2 * half
    return Layout(layers, blocks, 2 * half, half, 0, 0, extents=(
        Extent(0, 0, layers, 0, ls, 2 * half, half, 0), Extent(0, 0, layers, half, ls, 2 * half, half, half)))


def test_layouts_of_real_engines_are_valid_and_bad_ones_named():
    for lay in (kv_apart(3, 5, 64), kv_apart(3, 5, 64, regions_per_layer=True), kv_side_by_side(3, 5, 64)):
        assert lay.problems() == [], lay
    assert kv_apart(3, 5, 64, regions_per_layer=True).regions == 3
    assert kv_apart(2, 4, 64).region_bytes(0) == 2 * 2 * 4 * 64
    e = kv_apart(2, 4, 64).extents
    gap = Layout(2, 4, 192, 64, 0, 0, extents=(e[0], Extent(0, 0, 2, 4 * 64, 512, 64, 64, 128)))
    assert "gap or overlap" in gap.problems()[0]
    overlapping = Layout(2, 4, 128, 64, 0, 0, extents=(e[0], Extent(0, 0, 2, 32, 512, 64, 64, 64)))
    assert "overlap" in " ".join(overlapping.problems())
    crossing = Layout(2, 4, 128, 128, 0, 0, extents=e)  # a 128-byte chunk over K and V
    assert "cross" in " ".join(crossing.problems())
    short = Layout(2, 4, 192, 64, 0, 0, extents=e)
    assert "hold 128 bytes" in " ".join(short.problems())
    # a slot-addressed layout's chunk is the whole block: it may span K and V
    assert Layout(2, 4, 128, 128, 0, 0, block_slots=2, extents=e).problems() == []
    assert Layout.from_dict(kv_apart(2, 4, 64).to_dict()) == kv_apart(2, 4, 64)


# ---------------------------------------------------------------------- through the daemon


def logical(lay: Layout, mems: list[np.ndarray], layer: int, block: int) -> np.ndarray:
    """The (layer, block) shard of a rank, gathered from its regions by the extents."""
    parts = []
    for e in sorted((e for e in (lay.extents or ()) if e.first_layer <= layer < e.first_layer + e.layers),
                    key=lambda e: e.at):
        at = e.offset + (layer - e.first_layer) * e.layer_stride + block * e.block_stride
        parts.append(mems[e.region][at : at + e.bytes])
    if not lay.extents:
        at = lay.offset + layer * lay.layer_stride + block * lay.block_stride
        parts.append(mems[0][at : at + lay.block_bytes])
    return np.concatenate(parts)


class MultiRank:
    """A rank whose KV lies in the layout's regions, over a real WorkerClient."""

    def __init__(self, daemon, region, group: str, rank: int, n: int, m: int, lay: Layout):
        self.lay = lay
        self.segs = [region(max(lay.region_bytes(i), 1)) for i in range(lay.regions)]
        self.mems = [s.array() for s in self.segs]
        regions = [(s.name, s.size) for s in self.segs]
        self.client = WorkerClient(daemon.sock, group, rank, n, m, lay.to_dict(), regions[0][0], regions[0][1],
                                   regions=regions, keep_survivors=True)
        self.client.register()

    def write(self, rng, block: int) -> None:
        for layer in range(self.lay.num_layers):
            for e, off, n in self.lay.spans(layer, 0, self.lay.block_bytes):
                at = e.offset + (layer - e.first_layer) * e.layer_stride + block * e.block_stride + off
                self.mems[e.region][at : at + n] = rng.integers(0, 256, n, dtype=np.uint8)

    def shards(self) -> list[np.ndarray]:
        return [logical(self.lay, self.mems, layer, b) for layer in range(self.lay.num_layers)
                for b in range(self.lay.num_blocks)]


LAYOUTS = {"kv-apart": kv_apart(3, 6, 64), "regions-per-layer": kv_apart(3, 6, 64, regions_per_layer=True),
           "kv-side-by-side": kv_side_by_side(3, 6, 64)}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(LAYOUTS)), lost=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_extents_are_protected_restored_and_scrubbed_byte_for_byte(daemon, region, name, lost, seed):
    lay, rng = LAYOUTS[name], np.random.default_rng(seed)
    group = f"x-{uuid.uuid4().hex[:8]}"
    ranks = [MultiRank(daemon, region, group, q, 3, 1, lay) for q in range(3)]
    written = sorted(rng.choice(lay.num_blocks, 4, replace=False).tolist())
    for step, b in enumerate(written):
        for r in ranks:
            r.write(rng, b)
            r.client.commit(step, [(b, 0, lay.block_bytes)], {"q": step + 1})
    assert ranks[0].client.wait_protected(len(written) - 1)
    op = OperatorClient(daemon.sock)
    scrub = op.scrub(group)
    assert scrub.chunks_checked == len(written) * lay.chunks and scrub.parity_mismatches == 0
    assert scrub.checksum_mismatches == 0
    before = ranks[lost].shards()
    ranks[lost].client.close()
    deadline = time.monotonic() + 5
    while op.status(group).groups[0].state != "degraded":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    fresh = MultiRank(daemon, region, group, lost, 3, 1, lay)  # new regions, zeroed
    resp = fresh.client.restore()
    assert resp.restored_bytes == len(written) * lay.block_bytes * lay.num_layers
    after = fresh.shards()
    for layer in range(lay.num_layers):
        for b in range(lay.num_blocks):
            i = layer * lay.num_blocks + b
            expect = before[i] if b in written else np.zeros(lay.block_bytes, dtype=np.uint8)
            assert np.array_equal(after[i], expect), (name, layer, b)
    for r in (*ranks[:lost], *ranks[lost + 1 :], fresh):
        r.client.goodbye()


def test_fetch_between_engines_of_different_layouts(daemon, region):
    """An ended engine's blocks, laid out K and V apart in regions per layer, fetched
    into a new engine whose KV is one simple region: same logical bytes. The lost
    rank's are rebuilt from parity, the kept rank's copied."""
    old = LAYOUTS["regions-per-layer"]
    slots = Layout(3, 6, 128, 128, 0, 0, block_slots=2, extents=old.extents)  # chunk = block, 2 tokens
    new_slots = Layout(3, 6, 128, 128, 6 * 128, 128, block_slots=2)
    slot_map = ((np.arange(128) // 64) % 2).astype("<u2").tobytes()  # K holds slot 0, V slot 1
    rng = np.random.default_rng(7)
    name = f"old-{uuid.uuid4().hex[:6]}"

    def with_map(lay: Layout) -> dict:
        return {**lay.to_dict(), "slot_map": slot_map}

    olds = []
    for q in range(2):
        r = MultiRank.__new__(MultiRank)
        r.lay = slots
        r.segs = [region(slots.region_bytes(i)) for i in range(slots.regions)]
        r.mems = [s.array() for s in r.segs]
        regions = [(s.name, s.size) for s in r.segs]
        r.client = WorkerClient(daemon.sock, name, q, 2, 1, with_map(slots), regions[0][0], regions[0][1],
                                regions=regions, keep_survivors=True)
        r.client.register()
        olds.append(r)
    for r in olds:
        r.write(rng, 2)
        r.write(rng, 4)
    for i, r in enumerate(olds):
        r.client.commit(0, [(2, 0, 128), (4, 0, 128)], {"q": 4}, fills={2: 2, 4: 2},
                        records=[pb.RequestRecord(request_id="q", tokens=[1, 2, 3, 4], blocks=[2, 4], reset=True)]
                        if i == 0 else [])
    assert olds[0].client.wait_protected(0)
    before = [r.shards() for r in olds]
    olds[1].client.close()  # dies first; the engine then goes down
    olds[0].client.close()
    deadline = time.monotonic() + 5
    while OperatorClient(daemon.sock).status(name).groups[0].state != "ended":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    hit = worker_stub(channel(daemon.sock)).Lookup(pb.LookupRequest(tokens=np.arange(1, 6, dtype="<u4").tobytes()))
    assert (hit.group, hit.tokens, list(hit.blocks)) == (name, 4, [2, 4])
    for q in range(2):
        seg = region(new_slots.region_bytes())
        c = WorkerClient(daemon.sock, name + "-new", q, 2, 1, with_map(new_slots), seg.name, seg.size)
        c.register()
        resp = c.fetch(name, q, [2, 4], 4, [0, 5])
        assert list(resp.unrecoverable_blocks) == [] and resp.rebuilt == (q == 1)
        got = [logical(new_slots, [seg.array()], layer, b) for layer in range(3) for b in range(6)]
        for layer in range(3):
            for src, dst in ((2, 0), (4, 5)):
                assert np.array_equal(got[layer * 6 + dst], before[q][layer * 6 + src]), (q, layer, src)
        c.goodbye()
    OperatorClient(daemon.sock).drop(name)


@pytest.mark.parametrize("regions, message", [
    (1, "1 regions given, the layout's extents name 3"),
])
def test_a_multi_region_layout_needs_its_regions(daemon, region, regions, message):
    lay = LAYOUTS["regions-per-layer"]
    segs = [region(lay.region_bytes(i)) for i in range(regions)]
    c = WorkerClient(daemon.sock, "mr", 0, 2, 1, lay.to_dict(), segs[0].name, segs[0].size,
                     regions=[(s.name, s.size) for s in segs])
    with pytest.raises(InvalidRequest) as info:
        c.register()
    assert message in str(info.value)
