"""The daemon through its real gRPC server on a real unix socket: the happy path,
restore byte-exactness, and bad input on every RPC getting a specific status code
while the daemon keeps serving everyone else."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ghostserve.client import OperatorClient, WorkerClient, channel, operator_stub, worker_stub
from ghostserve.v1 import ghostserve_pb2 as pb

N, M = 4, 2
LAYOUT = dict(num_layers=2, num_blocks=8, block_bytes=1024, chunk_bytes=256,
              layer_stride=8 * 1024, block_stride=1024, offset=0)
SIZE = 2 * 8 * 1024


def shard(kv: np.ndarray, layer: int, block: int) -> np.ndarray:
    base = layer * LAYOUT["layer_stride"] + block * LAYOUT["block_stride"]
    return kv[base : base + LAYOUT["block_bytes"]]


@pytest.fixture
def group(daemon, region):
    """N registered ranks of group "g" with their regions and clients."""
    segs = [region(SIZE, f"r{r}") for r in range(N)]
    clients = [WorkerClient(daemon.sock, "g", r, N, M, LAYOUT, segs[r].name, SIZE) for r in range(N)]
    for c in clients:
        c.register()
    yield segs, clients
    for c in clients:
        c.close()


def write_steps(segs, clients, steps, rng, start=0):
    """Each step writes one block (all layers) on every rank and commits it."""
    for step in range(start, start + steps):
        for _r, (seg, c) in enumerate(zip(segs, clients, strict=True)):
            kv = seg.array()
            for layer in range(LAYOUT["num_layers"]):
                shard(kv, layer, step % 8)[:] = rng.integers(0, 256, 1024, dtype=np.uint8)
            c.commit(step, [(step % 8, 0, 1024)], {"req": step + 1})
    assert clients[0].wait_protected(start + steps - 1, timeout=10)


def test_commits_are_protected_and_restore_is_byte_exact(daemon, group, region):
    segs, clients = group
    write_steps(segs, clients, 6, np.random.default_rng(0))
    assert clients[2].wait_protected(5) and clients[2].watermarks == {"req": 6}
    op = OperatorClient(daemon.sock)
    scrub = op.scrub("g")
    assert scrub.chunks_checked == 6 * 4 and scrub.parity_mismatches == 0 and scrub.checksum_mismatches == 0
    before = [s.array().copy() for s in segs]
    clients[1].close()  # the stream ending means the rank is gone
    clients[3].close()
    deadline = time.monotonic() + 2
    while op.status("g").groups[0].state != "degraded":
        assert time.monotonic() < deadline, "loss not detected"
        time.sleep(0.005)
    for lost in (1, 3):
        segs[lost].array()[:] = 0xAA  # the old memory is gone; nothing may come from it
        fresh = region(SIZE, f"r{lost}b")
        c = WorkerClient(daemon.sock, "g", lost, N, M, LAYOUT, fresh.name, SIZE)
        assert c.register().role == pb.RegisterResponse.REPLACEMENT
        res = c.restore()
        assert res.protected_step == 5 and not res.unrecoverable_blocks
        assert res.restored_bytes == 6 * 1024 * 2
        assert np.array_equal(fresh.array(), before[lost])
        clients[lost] = c
    status = op.status("g").groups[0]
    assert status.state == "healthy" and status.last_restore.restored_bytes == 6 * 1024 * 2
    reg = daemon.registry
    assert reg.get_sample_value("ghostserve_restores_total", {"group": "g", "outcome": "ok"}) == 2
    assert reg.get_sample_value("ghostserve_failures_total", {"group": "g", "kind": "stream_closed"}) == 2
    assert reg.get_sample_value("ghostserve_encoded_bytes_total", {"group": "g"}) == 6 * 1024 * 2 * N


def test_encoding_covers_only_the_dirty_bytes(daemon, group):
    segs, clients = group
    for r, (seg, c) in enumerate(zip(segs, clients, strict=True)):
        seg.array()[:] = r + 1
        c.commit(0, [(3, 256, 512)], {})
    assert clients[0].wait_protected(0)
    reg = daemon.registry
    assert reg.get_sample_value("ghostserve_encoded_bytes_total", {"group": "g"}) == 256 * 2 * N
    assert reg.get_sample_value("ghostserve_protected_bytes", {"group": "g"}) == 256 * 2 * N
    assert reg.get_sample_value("ghostserve_parity_bytes", {"group": "g"}) == 256 * 2 * M


def test_silent_corruption_is_found_by_scrub_and_repaired(daemon, group):
    segs, clients = group
    write_steps(segs, clients, 3, np.random.default_rng(1))
    good = segs[2].array().copy()
    shard(segs[2].array(), 1, 1)[10:20] ^= 0x5A
    op = OperatorClient(daemon.sock)
    scrub = op.scrub("g")
    assert scrub.checksum_mismatches == 1 and list(scrub.bad_ranks) == [2] and list(scrub.bad_blocks) == [1]
    res = op.restore("g", 2)
    assert not res.unrecoverable_blocks
    assert np.array_equal(segs[2].array(), good)
    assert op.scrub("g").checksum_mismatches == 0


def test_status_health_reflection_and_socket_mode(daemon, group):
    assert stat.S_IMODE(os.stat(daemon.sock).st_mode) == 0o600
    ch = channel(daemon.sock)
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="ghostserve.v1.Worker"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"ghostserve.v1.Worker", "ghostserve.v1.Operator", "grpc.health.v1.Health"} <= names
    g = OperatorClient(daemon.sock).status().groups[0]
    assert (g.group, g.world_size, g.parity, len(g.ranks)) == ("g", N, M, N)
    assert all(r.state == "alive" for r in g.ranks)


# ---------------------------------------------------------------------------- bad input


def code_of(call, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code()


def reg_req(seg_name: str, **over) -> pb.RegisterRequest:
    fields = dict(group="g", rank=0, world_size=N, parity=M, layout=pb.KVLayout(**LAYOUT),
                  region=pb.Region(shm_name=seg_name, size=SIZE), pid=os.getpid())
    fields.update(over)
    return pb.RegisterRequest(**fields)


def test_bad_registrations_get_specific_codes_and_the_daemon_keeps_serving(daemon, group, region):
    segs, clients = group
    stub = worker_stub(channel(daemon.sock))
    other = region(SIZE, "other")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    INVALID, C = grpc.StatusCode.INVALID_ARGUMENT, code_of
    cases = {
        "bad group name": (reg_req(other.name, group="bad/name"), INVALID),
        "zero world": (reg_req(other.name, group="h", world_size=0), INVALID),
        "rank >= N": (reg_req(other.name, rank=N), INVALID),
        "parity too big": (reg_req(other.name, group="h", parity=252), INVALID),
        "chunk does not divide": (reg_req(other.name, group="h", layout=pb.KVLayout(**{**LAYOUT, "chunk_bytes": 300})), INVALID),
        "overlapping shards": (reg_req(other.name, group="h", layout=pb.KVLayout(**{**LAYOUT, "block_stride": 10})), INVALID),
        "missing region": (reg_req("nope-does-not-exist", group="h"), INVALID),
        "region too small": (reg_req(other.name, group="h", region=pb.Region(shm_name=other.name, size=100)), INVALID),
        "bad shm name": (reg_req("../etc/passwd", group="h"), INVALID),
        "no region": (reg_req(other.name, group="h", region=pb.Region(size=SIZE)), INVALID),
        # no CuPy here: the daemon says what to install (tests/test_cuda_datapath.py runs the path)
        "cuda region": (reg_req(other.name, group="h", region=pb.Region(
            cuda_ipc_handle=b"x" * 64, size=SIZE, device_uuid=b"u" * 16)), grpc.StatusCode.FAILED_PRECONDITION),
        "cuda region without its device": (reg_req(other.name, group="h", region=pb.Region(
            cuda_ipc_handle=b"x" * 64, size=SIZE)), INVALID),
        "dead pid": (reg_req(other.name, group="h", pid=dead.pid), INVALID),
        "mismatched code": (reg_req(other.name, parity=1), INVALID),
        "duplicate live rank": (reg_req(other.name, rank=1, pid=1), grpc.StatusCode.ALREADY_EXISTS),
    }
    for name, (req, expected) in cases.items():
        assert C(stub.Register, req) == expected, name
    raw = channel(daemon.sock).unary_unary("/ghostserve.v1.Worker/Register")
    assert C(raw, b"\xff\xff\xff") == INVALID  # not a protobuf message
    # nothing was created for the refused group, and "g" still works
    op = OperatorClient(daemon.sock)
    assert [g.group for g in op.status().groups] == ["g"]
    write_steps(segs, clients, 2, np.random.default_rng(2))
    rejected = daemon.registry.get_sample_value(
        "ghostserve_rejected_requests_total", {"method": "Register", "code": "INVALID_ARGUMENT"})
    assert rejected == sum(1 for _, e in cases.values() if e == INVALID) + 1


def stream_codes(sock: str, messages: list[pb.WorkerMessage]) -> grpc.StatusCode:
    call = worker_stub(channel(sock)).Stream(iter(messages))
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    return info.value.code()


def test_bad_stream_messages(daemon, group):
    segs, clients = group
    clients[0].reconnect = False  # our test streams displace its stream; no auto-rejoin
    sess = clients[0].session
    hello = pb.WorkerMessage(hello=pb.Hello(group="g", rank=0, session=sess))

    def commit(step, block=0, start=0, end=256, freed=(), dirty=None, ids=(), tokens=()):
        packed = np.array([(block, start, end)], dtype="<u8").tobytes() if dirty is None else dirty
        return pb.WorkerMessage(commit=pb.Commit(step=step, dirty=packed, freed_blocks=freed,
                                                 request_ids=ids, request_tokens=tokens))

    cases = [
        ([commit(0)], grpc.StatusCode.INVALID_ARGUMENT),  # no hello
        ([pb.WorkerMessage(hello=pb.Hello(group="nope", rank=0, session=sess))], grpc.StatusCode.NOT_FOUND),
        ([pb.WorkerMessage(hello=pb.Hello(group="g", rank=9, session=sess))], grpc.StatusCode.NOT_FOUND),
        ([pb.WorkerMessage(hello=pb.Hello(group="g", rank=0, session="stale"))], grpc.StatusCode.FAILED_PRECONDITION),
        ([hello, commit(0, block=8)], grpc.StatusCode.OUT_OF_RANGE),
        ([hello, commit(0, end=2048)], grpc.StatusCode.OUT_OF_RANGE),
        ([hello, commit(0, start=10, end=256)], grpc.StatusCode.INVALID_ARGUMENT),
        ([hello, commit(0, freed=[99])], grpc.StatusCode.OUT_OF_RANGE),
        ([hello, commit(5)], grpc.StatusCode.FAILED_PRECONDITION),  # steps must be consecutive
        ([hello, commit(-1)], grpc.StatusCode.INVALID_ARGUMENT),
        ([hello, hello], grpc.StatusCode.INVALID_ARGUMENT),
        ([hello, commit(0, dirty=b"\x01" * 23)], grpc.StatusCode.INVALID_ARGUMENT),  # not triples
        ([hello, commit(0, ids=["a", "b"], tokens=[1])], grpc.StatusCode.INVALID_ARGUMENT),
        ([hello, commit(0, block=1 << 40)], grpc.StatusCode.INVALID_ARGUMENT),
        ([hello, commit(0, ids=[""], tokens=[3])], grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for messages, expected in cases:
        assert stream_codes(daemon.sock, messages) == expected, messages
        # a refused message does not make the rank lost: the worker may retry
        assert all(r.state != "lost" for r in OperatorClient(daemon.sock).status("g").groups[0].ranks)
    # the group's real streams were taken over by the test streams (same session):
    # re-register and carry on; everything still works
    for c in clients:
        c.register()
    write_steps(segs, clients, 2, np.random.default_rng(3))


def test_bad_operator_and_restore_calls(daemon, group):
    segs, clients = group
    op = operator_stub(channel(daemon.sock))
    wk = worker_stub(channel(daemon.sock))
    assert code_of(op.Status, pb.StatusRequest(group="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(op.Scrub, pb.ScrubRequest(group="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(op.Restore, pb.RestoreRequest(group="g", rank=7)) == grpc.StatusCode.NOT_FOUND
    assert code_of(wk.Restore, pb.RestoreRequest(group="g", rank=0, session="x")) == grpc.StatusCode.FAILED_PRECONDITION
    clients[3].close()
    deadline = time.monotonic() + 2
    while OperatorClient(daemon.sock).status("g").groups[0].state != "degraded":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert code_of(op.Scrub, pb.ScrubRequest(group="g")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(op.Restore, pb.RestoreRequest(group="g", rank=3)) == grpc.StatusCode.FAILED_PRECONDITION
    raw = channel(daemon.sock).unary_unary("/ghostserve.v1.Operator/Status")
    assert code_of(raw, b"\x0a\xff") == grpc.StatusCode.INVALID_ARGUMENT


def test_more_failures_than_parity_are_reported_never_garbage(daemon, region):
    layout = {**LAYOUT}
    segs = [region(SIZE, f"x{r}") for r in range(3)]
    clients = [WorkerClient(daemon.sock, "x", r, 3, 1, layout, segs[r].name, SIZE) for r in range(3)]
    for c in clients:
        c.register()
    rng = np.random.default_rng(4)
    for _r, (seg, c) in enumerate(zip(segs, clients, strict=True)):
        seg.array()[:] = rng.integers(0, 256, SIZE, dtype=np.uint8)
        c.commit(0, [(b, 0, 1024) for b in range(8)], {"a": 10})
    assert clients[0].wait_protected(0)
    clients[0].close()
    clients[1].close()
    time.sleep(0.2)
    fresh = region(SIZE, "x0b")
    c = WorkerClient(daemon.sock, "x", 0, 3, 1, layout, fresh.name, SIZE)
    c.register()
    res = c.restore()
    assert list(res.unrecoverable_blocks) == list(range(8))
    assert res.unrecoverable_bytes == SIZE and res.restored_bytes == 0
    assert not fresh.array().any()  # nothing written
    assert daemon.registry.get_sample_value("ghostserve_restores_total", {"group": "x", "outcome": "partial"}) == 1
