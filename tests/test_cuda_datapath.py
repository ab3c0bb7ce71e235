"""The daemon's CUDA data path on the CPU: everything but the CUDA calls themselves.

CUDA is outside the project and there is no GPU here, so the runtime is
tests/cudasim.py's stand-in (host memory as device memory, shared-memory names as
IPC handles), which checks what a GPU would punish: kernels touching another
device's memory or the host's, copies to an unpinned arena, reading a rank's KV
before waiting for the worker's event. The rest is real: the gRPC server on its
socket, registration, the step encoder, recovery, sum64 checksums, staging
rings, parity in the shared-memory arena. Marked-gpu tests run the same path
on a real device (bin/gpu-check).
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from cudasim import HostCuda, ipc_handle, uuid_of
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_layout import kv_apart, logical

from ghostserve import shm
from ghostserve.client import OperatorClient, WorkerClient
from ghostserve.config import Config
from ghostserve.daemon.datapath.cuda import StagingBuffer
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.server import Server
from ghostserve.errors import GpuUnavailable, ResourceExhausted
from ghostserve.v1 import ghostserve_pb2 as pb

# ---------------------------------------------------------------------- the staging ring


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 700), st.booleans()), max_size=60))
def test_staging_never_hands_out_bytes_of_the_open_unit(ops):
    """Takes of one unit never overlap each other; a take that would not fit is
    refused (and ``fits`` said so first); after ``seal`` the bytes are handed out again."""
    staging = StagingBuffer(1024)
    unit: list[tuple[int, int]] = []
    for size, seal in ops:
        n = (size + 255) & ~255
        if not staging.fits(size):
            with pytest.raises(ResourceExhausted):
                staging.take(size)
            staging.seal()
            unit = []
        at = staging.take(size)
        assert 0 <= at and at + n <= 1024 and at % 256 == 0
        for a, b in unit:
            assert at + n <= a or b <= at, "overlap with bytes of the open unit"
        unit.append((at, at + n))
        if seal:
            staging.seal()
            unit = []
    with pytest.raises(ResourceExhausted):
        StagingBuffer(1024).take(1025)


def test_staging_fits_counts_several_takes():
    staging = StagingBuffer(1024)
    assert staging.fits(256, 4) and not staging.fits(256, 5)
    staging.take(300)  # 512 with alignment
    assert staging.fits(256, 2) and not staging.fits(256, 3)
    staging.seal()
    assert staging.fits(256, 4)


# ---------------------------------------------------------------------- through the daemon


class GpuRank:
    """A worker rank whose KV is on 'device' ``device`` (shared memory standing in
    for GPU memory), registered by IPC handle, recording an event per step."""

    def __init__(self, d, region, group, rank, n, m, lay: Layout, device: int, slot_map: bytes = b"",
                 keep_survivors: bool = False):
        self.d, self.lay = d, lay
        self.segs = [region(max(lay.region_bytes(i), 1)) for i in range(lay.regions)]
        self.mems = [s.array() for s in self.segs]
        regions = [pb.Region(cuda_ipc_handle=ipc_handle(s.name), size=s.size, device_uuid=uuid_of(device))
                   for s in self.segs]
        layout = {**lay.to_dict(), **({"slot_map": slot_map} if slot_map else {})}
        self.client = WorkerClient(d.sock, group, rank, n, m, layout, "gpu", 0, regions=regions,
                                   keep_survivors=keep_survivors)
        self.client.register()

    def write(self, rng, block):
        for layer in range(self.lay.num_layers):
            for e, off, n in self.lay.spans(layer, 0, self.lay.block_bytes):
                at = e.offset + (layer - e.first_layer) * e.layer_stride + block * e.block_stride + off
                self.mems[e.region][at : at + n] = rng.integers(0, 256, n, dtype=np.uint8)

    def commit(self, step, blocks, marks, **kw):
        events = [self.d.sim.worker_event(s.name) for s in self.segs]
        self.client.commit(step, [(b, 0, self.lay.block_bytes) for b in blocks], marks, cuda_event=events[-1], **kw)

    def shards(self):
        return [logical(self.lay, self.mems, layer, b) for layer in range(self.lay.num_layers)
                for b in range(self.lay.num_blocks)]


def wait_state(d, group, state):
    op = OperatorClient(d.sock)
    deadline = time.monotonic() + 5
    while op.status(group).groups[0].state != state:
        assert time.monotonic() < deadline, f"{group} never {state}"
        time.sleep(0.005)


@pytest.mark.parametrize("name, lay", [("simple", Layout(2, 6, 512, 128, 6 * 512, 512)),
                                       ("kv-apart", kv_apart(2, 6, 128))])
def test_gpu_ranks_protected_restored_and_scrubbed(gpu_daemon, region, name, lay):
    """4+2 over two devices (ranks 0, 1 on device 0; 2, 3 on device 1): stripes
    encode on rank block mod 4's device, staging the others' bytes; two ranks lost
    and rebuilt on their devices; a corrupt survivor found by scrub and repaired."""
    d, rng = gpu_daemon, np.random.default_rng(1)
    g = f"gpu-{name}-{uuid.uuid4().hex[:6]}"
    ranks = [GpuRank(d, region, g, q, 4, 2, lay, device=q // 2) for q in range(4)]
    blocks = [0, 1, 2, 3, 5]
    for step, b in enumerate(blocks):
        for r in ranks:
            r.write(rng, b)
            r.commit(step, [b], {"q": step + 1})
        # one step at a time: the stand-in's check of "read only after the worker's
        # event" is exact only when no newer writes are in flight meanwhile
        assert ranks[0].client.wait_protected(step)
    op = OperatorClient(d.sock)
    s = op.scrub(g)
    assert s.chunks_checked == len(blocks) * lay.chunks and s.parity_mismatches == 0 and s.checksum_mismatches == 0
    assert d.sim.log["sets"] >= len(blocks) * lay.num_layers and d.sim.log["checksums"] >= 1
    before = [r.shards() for r in ranks]
    for lost in (1, 2):
        ranks[lost].client.close()
    wait_state(d, g, "degraded")
    for lost in (1, 2):
        ranks[lost] = GpuRank(d, region, g, lost, 4, 2, lay, device=lost // 2)
        resp = ranks[lost].client.restore()
        assert resp.restored_bytes == len(blocks) * lay.block_bytes * lay.num_layers
        assert all(np.array_equal(a, b) for a, b in zip(ranks[lost].shards(), before[lost], strict=True))
    wait_state(d, g, "healthy")
    # silent corruption of a survivor: scrub names it, a restore repairs it (m = 2)
    e = (lay.extents or [None])[0]
    at = (e.offset if e else lay.offset) + 3 * (e.block_stride if e else lay.block_stride)
    ranks[0].mems[0][at] ^= 0x40
    s = op.scrub(g)
    assert s.checksum_mismatches == 1 and list(s.bad_ranks) == [0] and list(s.bad_blocks) == [3]
    resp = op.restore(g, 0)
    assert list(resp.unrecoverable_blocks) == [] and resp.corrupt_chunks == 0  # rebuilt from the others
    assert all(np.array_equal(a, b) for a, b in zip(ranks[0].shards(), before[0], strict=True))
    assert op.scrub(g).checksum_mismatches == 0
    for r in ranks:
        r.client.goodbye()
    deadline = time.monotonic() + 5
    while g in {x.group for x in op.status().groups}:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert d.sim.open_count() == 0 and d.sim.pinned == []  # every IPC mapping closed, arena unpinned


def test_stripes_longer_than_the_staging_buffer_are_cut_and_still_exact(tmp_path, shm_prefix, region):
    """A 64 KiB staging buffer and 64 KiB blocks, 4+2 over two devices: each
    stripe needs 4 x 64 KiB staged (two peer sources, two parity rows), so it is
    cut into pieces of 8 KiB and the batches flush as the buffer fills; parity and a rebuild
    stay byte-exact (the stand-in runs work in stream order, so a unit reusing its
    own bytes would corrupt them, and its kernel check refuses overlapping outputs)."""
    sim = HostCuda(devices=2)
    cfg = Config(socket=str(tmp_path / "gs.sock"), shm_prefix=shm_prefix, encode_threads=2,
                 cuda_staging_bytes=64 << 10)
    server = Server(cfg, CollectorRegistry(), cuda_runtime=sim)
    server.start()
    server.sock, server.sim = cfg.socket, sim
    try:
        rng, lay = np.random.default_rng(5), Layout(2, 4, 64 << 10, 16 << 10, 4 * (64 << 10), 64 << 10)
        g = f"cut-{uuid.uuid4().hex[:6]}"
        ranks = [GpuRank(server, region, g, q, 4, 2, lay, device=q // 2) for q in range(4)]
        for r in ranks:
            for b in range(4):
                r.write(rng, b)
            r.commit(0, list(range(4)), {"q": 1})
        assert ranks[0].client.wait_protected(0)
        assert sim.log["sets"] == 4 * 2 * 8  # (block, layer) stripes, each cut in 8 (half the buffer / 4)
        assert sim.log["matmul"] < sim.log["sets"]  # several per launch
        op = OperatorClient(server.sock)
        s = op.scrub(g)
        assert s.parity_mismatches == 0 and s.checksum_mismatches == 0
        before = ranks[3].shards()
        ranks[3].client.close()
        wait_state(server, g, "degraded")
        ranks[3] = GpuRank(server, region, g, 3, 4, 2, lay, device=1)
        assert ranks[3].client.restore().restored_bytes == 4 * 2 * (64 << 10)
        assert all(np.array_equal(a, b) for a, b in zip(ranks[3].shards(), before, strict=True))
        for r in ranks:
            r.client.goodbye()
    finally:
        server.stop(grace=1)


def test_fetch_from_an_ended_gpu_engine(gpu_daemon, region):
    """vLLM-style: slot-addressed blocks, the engine dies after one rank; a new
    engine fetches: the lost rank's blocks rebuilt on its device, the kept one's copied."""
    d, rng = gpu_daemon, np.random.default_rng(2)
    lay = Layout(2, 6, 256, 256, 6 * 256, 256, block_slots=4)
    slot_map = (np.arange(256) // 64).astype("<u2").tobytes()
    old = f"old-{uuid.uuid4().hex[:6]}"
    ranks = [GpuRank(d, region, old, q, 2, 1, lay, device=q, slot_map=slot_map, keep_survivors=True)
             for q in range(2)]
    for r in ranks:
        r.write(rng, 4)
    for i, r in enumerate(ranks):
        r.commit(0, [4], {"q": 3}, fills={4: 3},
                 records=[pb.RequestRecord(request_id="q", tokens=[7, 8, 9], blocks=[4], reset=True)] if i == 0 else [])
    assert ranks[0].client.wait_protected(0)
    before = [r.shards() for r in ranks]
    ranks[1].client.close()
    ranks[0].client.close()
    wait_state(d, old, "ended")
    for q in range(2):
        new = GpuRank(d, region, old + "-new", q, 2, 1, lay, device=1 - q, slot_map=slot_map)
        resp = new.client.fetch(old, q, [4], 3, [1])
        assert list(resp.unrecoverable_blocks) == [] and resp.rebuilt == (q == 1)
        got = new.shards()
        keep = np.frombuffer(slot_map, "<u2") < 3
        for layer in range(2):
            assert np.array_equal(got[layer * 6 + 1][keep], before[q][layer * 6 + 4][keep]), (q, layer)
        new.client.goodbye()
    OperatorClient(d.sock).drop(old)


def test_the_encoder_waits_for_the_workers_event(gpu_daemon, region):
    """A commit whose writes are still in flight (its event not yet waited on by
    the daemon) would be read too early: the stand-in would fail the kernel. The
    same commit without the event handle is exactly that case, and is caught."""
    d, rng = gpu_daemon, np.random.default_rng(3)
    lay = Layout(1, 2, 256, 256, 512, 256)
    g = f"ev-{uuid.uuid4().hex[:6]}"
    ranks = [GpuRank(d, region, g, q, 2, 1, lay, device=0) for q in range(2)]
    for r in ranks:
        r.write(rng, 0)
        d.sim.worker_event(r.segs[0].name)  # recorded, but not sent with the commit
        r.client.commit(0, [(0, 0, 256)], {"q": 1})
    assert ranks[0].client.wait_protected(0)
    event = ranks[0].client.events.get(timeout=5)  # the event follows the step's ack
    assert event.kind == pb.GroupEvent.STEP_FAILED  # failed visibly, not read early
    for r in ranks:
        r.write(rng, 1)
        r.commit(1, [1], {"p": 1})  # with events: encoded
    assert ranks[0].client.wait_protected(1)
    assert {w.request_id for w in OperatorClient(d.sock).status(g).groups[0].watermarks} == {"p"}


def test_cuda_regions_without_a_gpu_runtime_say_what_to_install(daemon, region):
    seg = region(4096)
    c = WorkerClient(daemon.sock, "nogpu", 0, 1, 1, dict(num_layers=1, num_blocks=1, block_bytes=4096,
                     chunk_bytes=4096, layer_stride=4096, block_stride=4096), "gpu", 0,
                     regions=[pb.Region(cuda_ipc_handle=ipc_handle(seg.name), size=4096, device_uuid=uuid_of(0))])
    with pytest.raises(GpuUnavailable) as info:  # the daemon's class, rebuilt by the client
        c.register()
    assert info.value.code == "FAILED_PRECONDITION"
    assert "pip install 'ghostserve[gpu-cuda13]'" in str(info.value)
    assert not [n for n in shm.list_names(daemon.config.shm_prefix) if "nogpu" in n]  # nothing left behind
