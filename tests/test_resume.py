"""Resume from an ended group: slot-addressed layouts, keep_survivors, Lookup,
Fetch and Drop, on a real daemon over its unix socket (what the vLLM connector
uses; tests/test_vllm.py runs the connector itself on real vLLM).

The layout here scatters each token's bytes over its block the way vLLM's CPU
backend does (a slot owns many small runs), so checksums must be masked by slot.
"""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import pytest
from conftest import status_code
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostserve.client import OperatorClient, WorkerClient, channel, worker_stub
from ghostserve.v1 import ghostserve_pb2 as pb

SLOTS, HEADS, RUN = 8, 2, 4            # 8 tokens a block, 2 heads, 4-byte runs per (head, token)
BLOCK = SLOTS * HEADS * RUN * 4        # 4 runs per token and head: K/V halves, transposed-ish
LAYERS, BLOCKS = 2, 12
# byte i of a block belongs to slot (i // RUN) % SLOTS: runs of different tokens interleave
SLOT_MAP = ((np.arange(BLOCK) // RUN) % SLOTS).astype("<u2")
LAYOUT = dict(num_layers=LAYERS, num_blocks=BLOCKS, block_bytes=BLOCK, chunk_bytes=BLOCK,
              layer_stride=BLOCKS * BLOCK, block_stride=BLOCK, offset=0, block_slots=SLOTS,
              slot_map=SLOT_MAP.tobytes())
SIZE = LAYERS * BLOCKS * BLOCK


class Rank:
    """A fake engine rank over real shared memory and a real WorkerClient."""

    def __init__(self, daemon, region, group: str, rank: int, n: int, m: int):
        self.seg = region(SIZE)
        self.kv = self.seg.array().reshape(LAYERS, BLOCKS, BLOCK)
        self.client = WorkerClient(daemon.sock, group, rank, n, m, LAYOUT, self.seg.name, SIZE,
                                   keep_survivors=True)
        self.client.register()

    def write(self, rng, block: int, slot: int) -> None:
        """The KV of one token (every layer)."""
        mask = SLOT_MAP == slot
        self.kv[:, block, mask] = rng.integers(0, 256, (LAYERS, int(mask.sum())), dtype=np.uint8)


def fill(ranks, rng, step, writes, requests, records, **extra):
    """Write ``writes`` {block: (from_slot, to_slot)} on every rank, then commit step ``step``."""
    for r in ranks:
        for b, (s0, s1) in writes.items():
            for s in range(s0, s1):
                r.write(rng, b, s)
    fills = {b: s1 for b, (_, s1) in writes.items()}
    for i, r in enumerate(ranks):
        r.client.commit(step, [(b, 0, BLOCK) for b in writes], requests=requests, fills=fills,
                        records=records if i == 0 else (), **extra)


def protected_bytes(kv: np.ndarray, blocks: list[int], tokens: int) -> np.ndarray:
    """The bytes of the first ``tokens`` slots of ``blocks`` (every layer), in order."""
    out = []
    for i, b in enumerate(blocks):
        n = min(SLOTS, tokens - i * SLOTS)
        out.append(kv[:, b, SLOT_MAP < n])
    return np.concatenate(out, axis=1)


def end_engine(ranks, lost: int) -> None:
    """Rank ``lost`` dies first; the engine then tears the others down."""
    ranks[lost].client.close()
    for i, r in enumerate(ranks):
        if i != lost:
            r.client.close()


def wait_ended(daemon, group: str, n: int) -> dict[int, str]:
    op = OperatorClient(daemon.sock)
    for _ in range(200):
        (g,) = op.status(group).groups
        states = {r.rank: r.state for r in g.ranks}
        if len(states) == n and all(s in ("lost", "detached") for s in states.values()):
            return states
        time.sleep(0.01)
    raise AssertionError(f"group {group} never ended: {states}")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.integers(1, 30), decode=st.integers(0, 12), lost=st.integers(0, 2),
       seed=st.integers(0, 2**32 - 1))
def test_fetch_delivers_exactly_the_protected_slots(daemon, region, prompt, decode, lost, seed):
    rng = np.random.default_rng(seed)
    name = f"old-{uuid.uuid4().hex[:8]}"
    ranks = [Rank(daemon, region, name, q, 3, 1) for q in range(3)]
    table = list(rng.permutation(BLOCKS)[: -(-(prompt + decode + 1) // SLOTS)].tolist())
    tokens = rng.integers(0, 50000, prompt + decode + 1).tolist()

    def span(a: int, b: int) -> dict[int, tuple[int, int]]:
        """Slots [a, b) of the request, by block."""
        out: dict[int, tuple[int, int]] = {}
        for t in range(a, b):
            blk = table[t // SLOTS]
            s0, _ = out.get(blk, (t % SLOTS, 0))
            out[blk] = (s0, t % SLOTS + 1)
        return out

    fill(ranks, rng, 0, span(0, prompt), {"q": prompt},
         [pb.RequestRecord(request_id="q", tokens=tokens[:prompt], blocks=table[: -(-prompt // SLOTS)], reset=True)])
    for step in range(1, decode + 1):
        t = prompt + step - 1
        new_blocks = [table[t // SLOTS]] if t % SLOTS == 0 else []
        fill(ranks, rng, step, span(t, t + 1), {"q": t + 1},
             [pb.RequestRecord(request_id="q", tokens=[tokens[t]], blocks=new_blocks)])
    assert ranks[0].client.wait_protected(decode)
    before = [r.kv.copy() for r in ranks]
    # the next step is in flight on the survivors when rank `lost` dies: its
    # token lands in slots the protected fill does not cover
    t = prompt + decode
    for q, r in enumerate(ranks):
        if q != lost:
            r.write(rng, table[t // SLOTS], t % SLOTS)
    end_engine(ranks, lost)
    states = wait_ended(daemon, name, 3)
    assert states[lost] == "lost" and all(s == "detached" for q, s in states.items() if q != lost)
    ranks[lost].kv[:] = 0xA5  # its memory is gone

    stub = worker_stub(channel(daemon.sock))
    hit = stub.Lookup(pb.LookupRequest(tokens=np.asarray(tokens + [7], dtype="<u4").tobytes()))
    assert (hit.group, hit.request_id, hit.tokens) == (name, "q", prompt + decode)
    assert list(hit.blocks) == table[: -(-(prompt + decode) // SLOTS)]
    # a prefix that diverges matches only up to the divergence
    other = list(tokens)
    other[prompt // 2] += 1
    assert stub.Lookup(pb.LookupRequest(tokens=np.asarray(other, dtype="<u4").tobytes())).tokens == prompt // 2

    fresh = [Rank(daemon, region, name + "-new", q, 3, 1) for q in range(3)]
    dst = list(range(BLOCKS - len(hit.blocks), BLOCKS))[::-1]
    for q, r in enumerate(fresh):
        resp = r.client.fetch(name, q, hit.blocks, hit.tokens, dst)
        assert list(resp.unrecoverable_blocks) == [] and resp.corrupt_chunks == 0
        assert resp.rebuilt == (q == lost)
        assert resp.fetched_bytes == len(dst) * BLOCK * LAYERS
        assert np.array_equal(protected_bytes(r.kv, dst, hit.tokens),
                              protected_bytes(before[q], list(hit.blocks), hit.tokens))
    for r in fresh:
        r.client.close()
    OperatorClient(daemon.sock).drop(name)


def _one_request(daemon, region, name, n, m, rng, prompt=13):
    ranks = [Rank(daemon, region, name, q, n, m) for q in range(n)]
    writes = {0: (0, SLOTS), 1: (0, prompt - SLOTS)}
    fill(ranks, rng, 0, writes, {"q": prompt},
         [pb.RequestRecord(request_id="q", tokens=list(range(prompt)), blocks=[0, 1], reset=True)])
    assert ranks[0].client.wait_protected(0)
    return ranks


def test_corrupt_survivor_is_repaired_with_two_parity_and_reported_with_one(daemon, region):
    rng = np.random.default_rng(3)
    for m, repaired in ((2, True), (1, False)):
        name = f"c{m}"
        ranks = _one_request(daemon, region, name, 3, m, rng)
        before = [r.kv.copy() for r in ranks]
        end_engine(ranks, 1)
        wait_ended(daemon, name, 3)
        ranks[0].kv[1, 1, np.flatnonzero(SLOT_MAP == 2)[0]] ^= 0x10  # a protected slot of block 1
        dst = Rank(daemon, region, name + "-new", 0, 3, m)
        resp = dst.client.fetch(name, 0, [0, 1], 13, [5, 6])
        assert resp.corrupt_chunks == 1
        if repaired:
            assert list(resp.unrecoverable_blocks) == [] and resp.rebuilt
            assert np.array_equal(protected_bytes(dst.kv, [5, 6], 13), protected_bytes(before[0], [0, 1], 13))
        else:
            assert list(resp.unrecoverable_blocks) == [1]  # block 0 copied, block 1 must be recomputed
            assert np.array_equal(dst.kv[:, 5], before[0][:, 0])
        dst.client.close()


@pytest.mark.parametrize("field", ["released", "freed"])
def test_released_block_is_protected_with_its_new_contents(daemon, region, field):
    rng = np.random.default_rng(5)
    name = f"rel-{field}"
    ranks = [Rank(daemon, region, name, q, 2, 1) for q in range(2)]
    fill(ranks, rng, 0, {3: (0, 5)}, {"a": 5}, [pb.RequestRecord(request_id="a", tokens=[1] * 5, blocks=[3], reset=True)])
    # "a" finishes; the same step gives block 3 to "b", which writes 2 slots. Only
    # "released" (dropped before the step's writes) suits that; "freed" (dropped
    # after) is for engines that reuse a block a step later, and loses b's bytes here
    fill(ranks, rng, 1, {3: (0, 2)}, {"b": 2}, [pb.RequestRecord(request_id="b", tokens=[2, 2], blocks=[3], reset=True)],
         finished=["a"], **{field: [3]})
    assert ranks[0].client.wait_protected(1)
    before = [r.kv.copy() for r in ranks]
    end_engine(ranks, 0)
    wait_ended(daemon, name, 2)
    stub = worker_stub(channel(daemon.sock))
    assert stub.Lookup(pb.LookupRequest(tokens=np.asarray([1] * 5, dtype="<u4").tobytes())).group == ""
    hit = stub.Lookup(pb.LookupRequest(tokens=np.asarray([2, 2, 9], dtype="<u4").tobytes()))
    assert (hit.request_id, hit.tokens, list(hit.blocks)) == ("b", 2, [3])
    dst = Rank(daemon, region, name + "-new", 0, 2, 1)
    resp = dst.client.fetch(name, 0, [3], 2, [0])
    assert resp.rebuilt
    if field == "freed":
        assert list(resp.unrecoverable_blocks) == [3]
        return
    assert list(resp.unrecoverable_blocks) == []
    assert np.array_equal(protected_bytes(dst.kv, [0], 2), protected_bytes(before[0], [3], 2))
    dst.client.close()


def test_scrub_ignores_unfilled_slots_and_finds_a_flipped_protected_byte(daemon, region):
    rng = np.random.default_rng(9)
    ranks = _one_request(daemon, region, "s", 2, 1, rng)
    op = OperatorClient(daemon.sock)
    ranks[1].write(rng, 1, 7)  # the next token, not yet committed
    res = op.scrub("s")
    assert res.chunks_checked == 2 and res.parity_mismatches == 0 and res.checksum_mismatches == 0
    ranks[1].kv[0, 1, np.flatnonzero(SLOT_MAP == 0)[3]] ^= 1
    res = op.scrub("s")
    assert res.parity_checked and res.checksum_mismatches == 1
    assert list(res.bad_blocks) == [1] and list(res.bad_ranks) == [1]
    # once rank 0 is lost, a degraded group with a live rank can't be scrubbed; an
    # ended one checks what its kept ranks hold
    ranks[0].client.close()
    for _ in range(200):
        if op.status("s").groups[0].state == "degraded":
            break
        time.sleep(0.01)
    assert code(op.scrub, "s") == grpc.StatusCode.FAILED_PRECONDITION
    ranks[1].client.close()
    wait_ended(daemon, "s", 2)
    res = op.scrub("s")
    assert not res.parity_checked and res.chunks_checked == 2
    assert res.checksum_mismatches == 1 and list(res.bad_ranks) == [1]


code = status_code


def test_bad_resume_calls_get_specific_codes_and_the_daemon_keeps_serving(daemon, region):
    rng = np.random.default_rng(11)
    live = _one_request(daemon, region, "live", 2, 1, rng)
    ended = _one_request(daemon, region, "gone", 2, 1, rng)
    end_engine(ended, 0)
    wait_ended(daemon, "gone", 2)
    dst = Rank(daemon, region, "dst", 0, 2, 1)
    stub = worker_stub(channel(daemon.sock))
    op = OperatorClient(daemon.sock)

    def fetch(**over):
        f = dict(source_group="gone", source_rank=0, source_blocks=[0, 1], tokens=13, group="dst",
                 rank=0, session=dst.client.session, blocks=[2, 3])
        f.update(over)
        return stub.Fetch(pb.FetchRequest(**f))

    INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    assert code(fetch, source_group="live") == PRECONDITION         # a live engine's KV moves
    assert code(fetch, source_group="nope") == grpc.StatusCode.NOT_FOUND
    assert code(fetch, blocks=[2]) == INVALID
    assert code(fetch, blocks=[2, BLOCKS]) == grpc.StatusCode.OUT_OF_RANGE
    assert code(fetch, source_blocks=[0, BLOCKS + 5]) == grpc.StatusCode.OUT_OF_RANGE
    assert code(fetch, tokens=3 * SLOTS) == INVALID
    assert code(fetch, session="stale") == PRECONDITION
    assert code(fetch, source_rank=7) == grpc.StatusCode.NOT_FOUND
    assert code(stub.Lookup, pb.LookupRequest(tokens=b"abc")) == INVALID
    assert code(op.drop, "live") == PRECONDITION
    seg = region(SIZE)
    bad_layouts = {
        "slot_map length": dict(LAYOUT, slot_map=SLOT_MAP[:-1].tobytes()),
        "slot out of range": dict(LAYOUT, slot_map=(SLOT_MAP * 2).astype("<u2").tobytes()),
        "chunk smaller than block": dict(LAYOUT, chunk_bytes=BLOCK // 2),
        "slot_map without slots": dict(LAYOUT, block_slots=0),
    }
    for why, lay in bad_layouts.items():
        req = pb.RegisterRequest(group=f"bad{len(why)}", rank=0, world_size=2, parity=1,
                                 layout=pb.KVLayout(**lay), region=pb.Region(shm_name=seg.name, size=SIZE),
                                 pid=live[0].client.pid)
        assert code(stub.Register, req) == INVALID, why
    # a different slot map can't join a group, and fills need a slotted layout
    odd = dict(LAYOUT, slot_map=SLOT_MAP[::-1].copy().tobytes())
    req = pb.RegisterRequest(group="dst", rank=1, world_size=2, parity=1, layout=pb.KVLayout(**odd),
                             region=pb.Region(shm_name=seg.name, size=SIZE), pid=live[0].client.pid)
    assert code(stub.Register, req) == INVALID
    # after all that, the good call works and the live group still encodes
    resp = fetch()
    assert list(resp.unrecoverable_blocks) == [] and resp.rebuilt
    fill(live, rng, 1, {1: (5, 6)}, {"q": 14}, [])
    assert live[0].client.wait_protected(1)


def test_drop_forgets_the_group_and_its_memory(daemon, region, shm_prefix):
    from ghostserve import shm

    rng = np.random.default_rng(2)
    ranks = _one_request(daemon, region, "d", 2, 1, rng)
    end_engine(ranks, 1)
    wait_ended(daemon, "d", 2)
    regions = [r.seg.name for r in ranks]
    op = OperatorClient(daemon.sock)
    # the parity arena (allocated up front), metadata and index, and both ranks' regions
    assert op.drop("d", unlink_regions=True).released_bytes >= (1 + 2) * LAYERS * BLOCKS * BLOCK
    assert "d" not in {g.group for g in op.status().groups}
    names = shm.list_names(shm_prefix)
    assert not any(n.startswith(f"{shm_prefix}d.") for n in names)  # parity and meta
    assert not set(regions) & set(names)
    stub = worker_stub(channel(daemon.sock))
    assert stub.Lookup(pb.LookupRequest(tokens=np.arange(13, dtype="<u4").tobytes())).group == ""


def test_drop_command(daemon, region):
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(4)
    ranks = _one_request(daemon, region, "cli", 2, 1, rng)

    def drop(*extra):
        return subprocess.run([sys.executable, "-m", "ghostserve", "drop", "cli", "--socket", daemon.sock,
                               "--json", *extra], capture_output=True, text=True, timeout=60)

    live = drop()
    assert live.returncode == 1 and json.loads(live.stdout)["code"] == "FAILED_PRECONDITION"
    end_engine(ranks, 0)
    wait_ended(daemon, "cli", 2)
    done = drop()
    assert done.returncode == 0
    out = json.loads(done.stdout)
    assert out["ok"] and out["group"] == "cli" and out["released_bytes"] >= LAYERS * BLOCKS * BLOCK
    again = drop()
    assert again.returncode == 1 and json.loads(again.stdout)["code"] == "NOT_FOUND"


def test_release_forgets_before_the_blocks_are_reused_and_old_news_stays_void(daemon, region):
    rng = np.random.default_rng(6)
    ranks = _one_request(daemon, region, "relnow", 2, 1, rng)
    # "q" finished; before step 2 runs the engine releases it and its blocks at once,
    # while its step 1 commit is still on its way
    for r in ranks:
        r.client.release(2, ["q"], [0, 1])
    op = OperatorClient(daemon.sock)
    (g,) = op.status("relnow").groups
    assert list(g.watermarks) == [] and g.protected_bytes == 0
    # news of q from a step before the release (a late watermark, a record) is void
    for i, r in enumerate(ranks):
        r.client.commit(1, [], requests={"q": 14}, records=[pb.RequestRecord(request_id="q", tokens=[99])]
                        if i == 0 else ())
    assert ranks[0].client.wait_protected(1)
    assert list(op.status("relnow").groups[0].watermarks) == []
    end_engine(ranks, 1)
    wait_ended(daemon, "relnow", 2)
    stub = worker_stub(channel(daemon.sock))
    assert stub.Lookup(pb.LookupRequest(tokens=np.arange(13, dtype="<u4").tobytes())).group == ""
    assert code(stub.Release, pb.ReleaseRequest(group="relnow", rank=0, session="stale", step=2)) \
        == grpc.StatusCode.FAILED_PRECONDITION


def test_lookup_is_per_namespace_and_an_ended_group_takes_no_new_ranks(daemon, region):
    rng = np.random.default_rng(8)
    seg_a, seg_b = region(SIZE), region(SIZE)
    ranks = []
    for q, seg in enumerate((seg_a, seg_b)):
        c = WorkerClient(daemon.sock, "ns", q, 2, 1, LAYOUT, seg.name, SIZE, keep_survivors=True,
                         namespace="model-a")
        c.register()
        r = Rank.__new__(Rank)
        r.seg, r.kv, r.client = seg, seg.array().reshape(LAYERS, BLOCKS, BLOCK), c
        ranks.append(r)
    fill(ranks, rng, 0, {0: (0, 6)}, {"q": 6},
         [pb.RequestRecord(request_id="q", tokens=list(range(6)), blocks=[0], reset=True)])
    assert ranks[0].client.wait_protected(0)
    end_engine(ranks, 0)
    wait_ended(daemon, "ns", 2)
    stub = worker_stub(channel(daemon.sock))
    toks = np.arange(7, dtype="<u4").tobytes()
    assert stub.Lookup(pb.LookupRequest(tokens=toks, namespace="model-a")).tokens == 6
    assert stub.Lookup(pb.LookupRequest(tokens=toks, namespace="model-b")).group == ""
    assert stub.Lookup(pb.LookupRequest(tokens=toks)).group == ""
    again = WorkerClient(daemon.sock, "ns", 0, 2, 1, LAYOUT, region(SIZE).name, SIZE, keep_survivors=True,
                         namespace="model-a")
    assert code(again.register) == grpc.StatusCode.FAILED_PRECONDITION
