"""The worker side of GPU KV (ghostserve/integrations/gpukv.py) on the CPU.

There is no GPU here, so "CUDA tensors" are CPU tensors over shared-memory
segments that tests/cudasim.py's stand-in treats as device memory (a segment's
name is its IPC handle), wrapped to report a CUDA device; CUDA's allocation
queries are answered from those segments. The rest is real: the export code,
the daemon (gRPC on its socket, the CUDA data path over the stand-in), commits
with events, a lost rank rebuilt and compared byte for byte through the very
tensor views vLLM's backends use.

Oracle for the layouts: writing one slot of one block through torch indexing
of the backend's logical view must change exactly the bytes the exported
layout says belong to that slot of that block.
"""

from __future__ import annotations

import ctypes
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from cudasim import ipc_handle, uuid_of
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve import shm
from ghostserve.client import OperatorClient, WorkerClient
from ghostserve.daemon.layout import Layout
from ghostserve.errors import Unsupported
from ghostserve.integrations import gpukv
from ghostserve.v1 import ghostserve_pb2 as pb

BLOCKS, SLOTS, HEADS, DIM = 6, 4, 2, 8


@dataclass
class FakeDevice:
    index: int
    type: str = "cuda"


class FakeCudaTensor:
    """A CPU tensor standing for a CUDA one: what the export reads of a tensor."""

    def __init__(self, t: torch.Tensor, device: int):
        self.t, self.device = t, FakeDevice(device)
        self.shape, self.dtype = t.shape, t.dtype

    def stride(self):
        return self.t.stride()

    def element_size(self):
        return self.t.element_size()

    def data_ptr(self):
        return self.t.data_ptr()


class SegmentCuda:
    """gpukv.CudaApi over shared-memory segments (the stand-in's device memory)."""

    def __init__(self, segments: list[shm.Segment]):
        self.segs = {s.array().ctypes.data: s for s in segments}

    def allocation(self, ptr):
        for base, s in self.segs.items():
            if base <= ptr < base + s.size:
                return base, s.size
        raise AssertionError(f"{ptr:#x} is in no allocation")

    def ipc_handle(self, base):
        return ipc_handle(self.segs[base].name)

    def device_uuid(self, device):
        return uuid_of(device)


# the backends' logical shapes, and the memory orders their stride orders give
LAYOUTS = {
    "flash-attn": ((2, BLOCKS, SLOTS, HEADS, DIM), (0, 1, 2, 3, 4)),
    "flash-attn-hnd": ((2, BLOCKS, SLOTS, HEADS, DIM), (0, 1, 3, 2, 4)),
    "flashinfer": ((BLOCKS, 2, SLOTS, HEADS, DIM), (0, 1, 2, 3, 4)),
    "flashinfer-hnd": ((BLOCKS, 2, SLOTS, HEADS, DIM), (0, 1, 3, 2, 4)),
}


def layer_view(buf: torch.Tensor, offset: int, shape, order) -> torch.Tensor:
    """The backend's view of one layer: memory in ``order``, permuted back to ``shape``
    (as vLLM allocates and views its KV)."""
    physical = [shape[i] for i in order]
    n = int(np.prod(shape))
    raw = buf[offset : offset + n * 2].view(torch.bfloat16).view(physical)
    inverse = [order.index(i) for i in range(len(order))]
    return raw.permute(*inverse)


def logical_block(lay: Layout, bases: list[int], layer: int, block: int) -> np.ndarray:
    out = np.empty(lay.block_bytes, dtype=np.uint8)
    for e, off, n in lay.spans(layer, 0, lay.block_bytes):
        out[e.at + off : e.at + off + n] = np.frombuffer(
            ctypes.string_at(e.address(bases[e.region], layer, block, off), n), dtype=np.uint8)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_s_slots_are_where_torch_writes_them(region, name):
    shape, order = LAYOUTS[name]
    per_layer = int(np.prod(shape)) * 2
    seg = region(3 * per_layer + 512)  # three layers in one allocation, not at its start
    buf = torch.frombuffer(seg.buf, dtype=torch.uint8)
    views = [layer_view(buf, 512 + i * per_layer, shape, order) for i in range(3)]
    cuda = SegmentCuda([seg])
    out = gpukv.export([FakeCudaTensor(v, 0) for v in views], BLOCKS, SLOTS, cuda)
    lay = Layout.from_dict({k: v for k, v in out.layout.items() if k != "slot_map"})
    assert lay.problems() == [] and len(out.allocations) == 1 and lay.block_bytes == per_layer // BLOCKS
    slot_of = np.frombuffer(out.layout["slot_map"], "<u2")
    bases = [out.allocations[0].base]
    rng = np.random.default_rng(0)
    block_dim, slot_dim = gpukv.find_dims(shape, BLOCKS, SLOTS)
    for layer, b, s in [(0, 0, 0), (2, BLOCKS - 1, SLOTS - 1), (1, 3, 2)]:
        before = [logical_block(lay, bases, q, bb) for q in range(3) for bb in range(BLOCKS)]
        index = [slice(None)] * len(shape)
        index[block_dim], index[slot_dim] = b, s
        target = views[layer][tuple(index)]
        target.copy_(torch.from_numpy(rng.standard_normal(target.shape).astype(np.float32)).to(torch.bfloat16) + 1)
        after = [logical_block(lay, bases, q, bb) for q in range(3) for bb in range(BLOCKS)]
        for i, (x, y) in enumerate(zip(before, after, strict=True)):
            changed = x != y
            if i == layer * BLOCKS + b:
                assert changed.any() and set(slot_of[changed]) == {s}, name
            else:
                assert not changed.any(), f"{name}: layer/block {divmod(i, BLOCKS)} changed"


def test_runs_follow_the_memory_not_the_logical_order():
    # FlashAttention: K and V of a block lie apart, at the K/V dim's stride
    shape, order = LAYOUTS["flash-attn"]
    strides = torch.empty([shape[i] for i in order]).permute(*[order.index(i) for i in range(5)]).stride()
    runs = gpukv.block_runs(shape, strides, 2, 1)
    half = SLOTS * HEADS * DIM * 2
    assert runs == [(0, half), (BLOCKS * half, half)]
    shape, order = LAYOUTS["flashinfer-hnd"]
    strides = torch.empty([shape[i] for i in order]).permute(*[order.index(i) for i in range(5)]).stride()
    assert gpukv.block_runs(shape, strides, 2, 0) == [(0, 2 * half)]


@settings(max_examples=60, deadline=None)
@given(st.permutations([0, 1, 2, 3]), st.integers(1, 4), st.integers(1, 3))
def test_a_block_s_runs_cover_its_bytes_once_and_every_slot(order, blocks, heads):
    """Any stride order of (blocks, slots, heads, dim): the runs hold every byte of
    a block once, and each slot owns heads*dim elements of it."""
    shape = (blocks, SLOTS, heads, DIM)
    t = torch.empty([shape[i] for i in order]).permute(*[list(order).index(i) for i in range(4)])
    runs = gpukv.block_runs(shape, t.stride(), 4, 0)
    assert sum(n for _, n in runs) == SLOTS * heads * DIM * 4
    assert all(a + n <= b for (a, n), (b, _) in zip(runs, runs[1:], strict=False))
    sm = gpukv.slot_map(shape, t.stride(), 4, 0, 1)
    assert np.array_equal(np.bincount(sm, minlength=SLOTS), np.full(SLOTS, heads * DIM * 4))


def test_dims_of_the_backends_shapes():
    assert gpukv.find_dims((2, 100, 16, 8, 128), 100, 16) == (1, 2)
    assert gpukv.find_dims((100, 2, 16, 8, 128), 100, 16) == (0, 2)
    assert gpukv.find_dims((100, 2, 2, 8, 128), 100, 2) == (0, 2)  # block_size 2: dim 1 is still K/V
    with pytest.raises(Unsupported, match="blocks"):
        gpukv.find_dims((2, 3, 16, 8, 128), 100, 16)
    with pytest.raises(Unsupported, match="slots"):
        gpukv.find_dims((2, 100, 32, 8, 128), 100, 16)


def test_expandable_segments_are_refused_naming_the_setting(region):
    seg = region(4096)
    t = FakeCudaTensor(torch.frombuffer(seg.buf, dtype=torch.uint8)[:2 * BLOCKS * SLOTS * 2].view(
        torch.bfloat16).view(2, BLOCKS, SLOTS, 1, 1), 0)
    with pytest.raises(Unsupported, match="expandable_segments:False"):
        gpukv.export([t], BLOCKS, SLOTS, SegmentCuda([seg]),
                     environ={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512, expandable_segments:True"})

    class NoIpc(SegmentCuda):
        def ipc_handle(self, base):
            raise Unsupported(gpukv.EXPANDABLE)

    with pytest.raises(Unsupported, match="PYTORCH_CUDA_ALLOC_CONF"):
        gpukv.export([t], BLOCKS, SLOTS, NoIpc([seg]), environ={})


def test_layers_must_agree(region):
    seg = region(1 << 16)
    buf = torch.frombuffer(seg.buf, dtype=torch.uint8)
    a = layer_view(buf, 0, *LAYOUTS["flash-attn"])
    b = layer_view(buf, 8192, *LAYOUTS["flash-attn-hnd"])
    with pytest.raises(Unsupported, match="shape, stride or dtype"):
        gpukv.export([FakeCudaTensor(a, 0), FakeCudaTensor(b, 0)], BLOCKS, SLOTS, SegmentCuda([seg]), environ={})
    with pytest.raises(Unsupported, match="two devices"):
        gpukv.export([FakeCudaTensor(a, 0), FakeCudaTensor(layer_view(buf, 8192, *LAYOUTS["flash-attn"]), 1)],
                     BLOCKS, SLOTS, SegmentCuda([seg]), environ={})


def test_step_events_live_until_their_step_is_protected():
    made = []

    class Ev:
        def __init__(self):
            self.recorded_on = "unset"
            made.append(self)

        def record(self, stream=None):
            self.recorded_on = stream

        def ipc_handle(self):
            return bytes([len(made)]) * 64

        def synchronize(self):
            self.synced = True

    events = gpukv.StepEvents(Ev, keep=3)
    handles = [events.record(step, stream="s") for step in range(3)]
    assert handles[2] == bytes([3]) * 64 and all(e.recorded_on == "s" for e in made)
    events.protected(0)
    assert len(events) == 2
    events.record(3)
    events.record(4)
    assert len(events) == 3  # beyond ``keep``: the oldest goes, once the GPU has passed it
    assert getattr(made[1], "synced", False) and not getattr(made[2], "synced", False)
    events.protected(10)
    assert len(events) == 0


# ---------------------------------------------------------------------- through the daemon


class ExportedRank:
    """A TP rank of 3 layers in the FlashAttention HND layout, one allocation per
    layer (as vLLM allocates), on stand-in device ``device``, registered from the export."""

    def __init__(self, d, region, group, rank, n, m, device, name="flash-attn-hnd"):
        shape, order = LAYOUTS[name]
        per_layer = int(np.prod(shape)) * 2
        self.segs = [region(per_layer + 256) for _ in range(3)]
        self.views = [layer_view(torch.frombuffer(s.buf, dtype=torch.uint8), 256, shape, order) for s in self.segs]
        self.export = gpukv.export([FakeCudaTensor(v, device) for v in self.views], BLOCKS, SLOTS,
                                   SegmentCuda(self.segs), environ={})
        self.d = d
        regions = [pb.Region(cuda_ipc_handle=a.handle, size=a.size, device_uuid=a.device_uuid)
                   for a in self.export.allocations]
        self.client = WorkerClient(d.sock, group, rank, n, m, self.export.layout, "gpu", 0, regions=regions,
                                   keep_survivors=True)
        self.client.register()

    def write(self, rng, block):
        for v in self.views:
            part = v[:, block]
            part.copy_(torch.from_numpy(rng.standard_normal(part.shape).astype(np.float32)).to(torch.bfloat16))

    def commit(self, step, blocks, marks):
        event = self.d.sim.worker_event(*[s.name for s in self.segs])  # one, after every layer's writes
        self.client.commit(step, [(b, 0, self.export.layout["block_bytes"]) for b in blocks], marks, cuda_event=event,
                           fills={b: SLOTS for b in blocks})

    def blocks(self):
        return [v[:, b].clone() for v in self.views for b in range(BLOCKS)]


def test_exported_gpu_ranks_lose_nothing_to_a_killed_worker(gpu_daemon, region):
    """3+1 over two stand-in devices, each rank's KV in vLLM's per-layer
    allocations and HND layout: commit, lose rank 1, rebuild it into a new
    worker's allocations on its device; every block equal through torch's own view."""
    d, rng = gpu_daemon, np.random.default_rng(7)
    g = f"exp-{uuid.uuid4().hex[:6]}"
    ranks = [ExportedRank(d, region, g, q, 3, 1, device=q % 2) for q in range(3)]
    assert len(ranks[0].export.allocations) == 3
    for step, b in enumerate([0, 2, 5]):
        for r in ranks:
            r.write(rng, b)
            r.commit(step, [b], {"q": step + 1})
        assert ranks[0].client.wait_protected(step)
    before = ranks[1].blocks()
    ranks[1].client.close()
    op = OperatorClient(d.sock)
    op.wait(g, lambda w: w.state == "degraded", 5, "rank 1 lost")
    ranks[1] = ExportedRank(d, region, g, 1, 3, 1, device=1)
    resp = ranks[1].client.restore()
    assert list(resp.unrecoverable_blocks) == []
    after = ranks[1].blocks()
    for i, (x, y) in enumerate(zip(before, after, strict=True)):
        if i % BLOCKS in (0, 2, 5):
            assert torch.equal(x.view(torch.int16), y.view(torch.int16)), i
    for r in ranks:
        r.client.goodbye()


# ---------------------------------------------------------------------- the vLLM connector's GPU branch


def test_the_vllm_connector_protects_and_resumes_gpu_kv(gpu_daemon, region, monkeypatch):
    """The vLLM connector's worker side with "CUDA" KV (FlashAttention HND, one
    allocation per layer, TP 2 on two stand-in devices): it registers the export,
    commits with an interprocess event after each step, and after the engine dies
    a new engine's ranks fetch a request's block into their own GPU blocks: equal
    through vLLM's view, the killed rank's rebuilt from parity."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace  # noqa: PLC0415

    import vllm.distributed.parallel_state as ps  # noqa: PLC0415

    from ghostserve.integrations import common  # noqa: PLC0415
    from ghostserve.integrations import vllm as gv  # noqa: PLC0415

    d = gpu_daemon
    shape, order = LAYOUTS["flash-attn-hnd"]
    per_layer = int(np.prod(shape)) * 2
    current = {"rank": 0, "segs": []}

    class Event:  # torch.cuda.Event(interprocess=True) on the stand-in: one per step, after every layer
        def __init__(self, interprocess=False):
            assert interprocess
            self.handle = b""

        def record(self, stream=None):
            self.handle = d.sim.worker_event(*[s.name for s in current["segs"]])

        def ipc_handle(self):
            return self.handle

        def synchronize(self):
            pass

    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: current["rank"])
    monkeypatch.setattr(gpukv, "BindingsCuda", lambda: SegmentCuda(current["segs"]))
    monkeypatch.setattr(torch.cuda, "Event", Event)

    def engine(group, views_of):
        setup = gv.Setup(gv.ConnectorOptions(socket=d.sock, parity=1), group, "t", "ns", SLOTS,
                         common.ShardMap.of(2, 2))
        sides = []
        for rank in range(2):
            segs = [region(per_layer + 512) for _ in range(3)]
            views = [layer_view(torch.frombuffer(s.buf, dtype=torch.uint8), 512, shape, order) for s in segs]
            current.update(rank=rank, segs=segs)
            side = gv.WorkerSide(setup, SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=BLOCKS)))
            side.register_kv_caches({f"model.layers.{i}.attn": FakeCudaTensor(v, rank) for i, v in enumerate(views)})
            assert side._client is not None and side._client.regions[0].device_uuid == uuid_of(rank)
            views_of[rank] = (side, segs, views)
            sides.append(side)
        return sides

    old: dict = {}
    g = f"vgpu-{uuid.uuid4().hex[:6]}"
    engine(g, old)
    rng = np.random.default_rng(11)
    for rank, (side, segs, views) in old.items():
        current.update(rank=rank, segs=segs)
        for v in views:
            part = v[:, 2]
            part.copy_(torch.from_numpy(rng.standard_normal(part.shape).astype(np.float32)).to(torch.bfloat16))
        slots = SimpleNamespace(slot_mapping=torch.arange(2 * SLOTS, 3 * SLOTS), num_actual_tokens=SLOTS)
        side.save_kv_layer("model.layers.0.attn", slots)
        side.wait_for_save(gv.GhostServeMetadata(requests={"q": SLOTS}, records=[("q", list(range(SLOTS)), [2], True)]))
        assert len(side._events) == 1
    assert old[0][0]._client.wait_protected(0)
    op = OperatorClient(d.sock)
    assert op.status(g).groups[0].protected_step == 0
    before = {rank: [v[:, 2].clone() for v in views] for rank, (_, _, views) in old.items()}
    old[1][0]._client.close()  # the engine dies: rank 1 first (lost), then rank 0 (kept)
    op.wait_ranks(g, {1: "lost"}, 5)
    old[0][0]._client.close()
    op.wait_ended(g, 5)
    new: dict = {}
    engine(f"{g}-new", new)
    for rank, (side, segs, views) in new.items():
        current.update(rank=rank, segs=segs)
        side.start_load_kv(gv.GhostServeMetadata(loads=[gv.Load("q", g, [2], [5], SLOTS)]))
        assert side.get_block_ids_with_load_errors() == set() and side.stats.data["fetched_bytes"] > 0
        for v, want in zip(views, before[rank], strict=True):
            assert torch.equal(v[:, 5].view(torch.int16), want.view(torch.int16)), rank
        side.shutdown()
    op.drop(g)
