"""Node loss: protected KV mirrored off-node into a real Mooncake Store, and a
lost node's requests fetched on another node (docs/scale-out.md).

Everything runs on loopback: a Mooncake master (``LocalMaster``) and two
"nodes", each a ``ghostserve serve`` process with its own socket, shared-memory
prefix and store segment. A node loss is the SIGKILL of its daemon plus the
unlinking of every shared-memory segment it held (parity, index, the ranks' KV),
so nothing of it survives locally. The engine ranks are test processes' shared
memory and real ``WorkerClient``s (tests/test_resume.py's layout: vLLM's CPU
slot scatter); tests/test_node_loss_vllm.py runs real vLLM.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest

pytest.importorskip("mooncake.store", reason="the ghostserve[mooncake] extra is not installed")

from test_resume import BLOCK, LAYERS, LAYOUT, SLOTS, Rank, fill, protected_bytes  # noqa: E402

from ghostserve import shm  # noqa: E402
from ghostserve.client import OperatorClient, WorkerClient, channel, worker_stub  # noqa: E402
from ghostserve.daemon.layout import Layout  # noqa: E402
from ghostserve.daemon.offnode.master import LocalMaster  # noqa: E402
from ghostserve.daemon.offnode.objects import KeySpace  # noqa: E402
from ghostserve.daemon.offnode.store import MooncakeStore, StoreUrl, free_port  # noqa: E402
from ghostserve.sidecar import Sidecar  # noqa: E402
from ghostserve.v1 import ghostserve_pb2 as pb  # noqa: E402

NAMESPACE = "test-model/bf16/8/tp2"
MIN_TOKENS = 16
PROMPT = 5 * SLOTS + 3       # 5 full blocks and a tail


@pytest.fixture
def master():
    m = LocalMaster().start()
    yield m
    m.stop()


class Node:
    """One node: a daemon joined to the store, and the ranks of its engine."""

    def __init__(self, master: LocalMaster, name: str, segment_bytes: int = 16 << 20):
        self.metrics_port = free_port("127.0.0.1")
        self.daemon = Sidecar(log_level="info", metrics_port=self.metrics_port, encode_threads=1, args=(
            "--store", master.url, "--node", name, "--store-segment-bytes", str(segment_bytes),
            "--mirror-min-tokens", str(MIN_TOKENS))).start()
        self.sock = self.daemon.socket
        self.master = master
        self.made: list[shm.Segment] = []

    def region(self, size: int) -> shm.Segment:
        seg = shm.Segment.create(f"{self.daemon.prefix}kv{uuid.uuid4().hex[:6]}", size)
        self.made.append(seg)
        return seg

    def ranks(self, group: str, n: int = 2) -> list[Rank]:
        out = []
        for q in range(n):
            r = Rank.__new__(Rank)
            r.seg = self.region(LAYERS * 12 * BLOCK)
            r.kv = r.seg.array().reshape(LAYERS, 12, BLOCK)
            r.client = WorkerClient(self.sock, group, q, n, 1, LAYOUT, r.seg.name, LAYERS * 12 * BLOCK,
                                    keep_survivors=True, namespace=NAMESPACE)
            r.client.register()
            out.append(r)
        return out

    def status(self, group: str) -> pb.GroupStatus:
        (g,) = OperatorClient(self.sock).status(group).groups
        return g

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def store_exists(self, keys: list[str]) -> list[bool]:
        probe = MooncakeStore(StoreUrl.parse(self.master.url), "127.0.0.1", 0)
        try:
            return probe.exists(keys)
        finally:
            probe.close()

    def lose(self) -> None:
        """The whole node goes: its daemon SIGKILLed, every segment it held unlinked."""
        self.daemon.kill()
        for seg in self.made:
            seg.close()
        for name in shm.list_names(self.daemon.prefix):
            shm.unlink(name)

    def stop(self) -> None:
        for seg in self.made:
            seg.close()
        self.daemon.stop()


@pytest.fixture
def nodes(master):
    made: list[Node] = []

    def make(name: str, **kw) -> Node:
        made.append(Node(master, name, **kw))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def run_request(ranks, rng, tokens: list[int], blocks: list[int], steps: int = 0) -> None:
    """Prefill ``tokens`` into ``blocks`` (step 0), then ``steps`` decode steps."""
    def write(step, first, last, records):
        writes: dict[int, tuple[int, int]] = {}
        for t in range(first, last):
            b = blocks[t // SLOTS]
            s0, _ = writes.get(b, (t % SLOTS, 0))
            writes[b] = (s0, t % SLOTS + 1)
        fill(ranks, rng, step, writes, {"q": last}, records)
    n = len(tokens) - steps
    write(0, 0, n, [pb.RequestRecord(request_id="q", tokens=tokens[:n], blocks=blocks[: -(-n // SLOTS)],
                                     reset=True)])
    for step in range(1, steps + 1):
        t = n + step - 1
        new = [blocks[t // SLOTS]] if t % SLOTS == 0 else []
        write(step, t, t + 1, [pb.RequestRecord(request_id="q", tokens=[tokens[t]], blocks=new)])
    assert ranks[0].client.wait_protected(steps)


def wait_for(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def lookup(node: Node, tokens) -> pb.LookupResponse:
    return worker_stub(channel(node.sock)).Lookup(
        pb.LookupRequest(tokens=np.asarray(tokens, dtype="<u4").tobytes(), namespace=NAMESPACE))


def test_a_lost_nodes_request_is_fetched_on_another_node_byte_exact(nodes):
    a, b = nodes("a"), nodes("b")
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 50000, PROMPT + 12).tolist()
    table = [9, 2, 7, 0, 11, 4, 5, 1]
    ranks = a.ranks("eng-a")
    run_request(ranks, rng, tokens, table, steps=12)   # 55 tokens: 6 full blocks, 7 in the tail
    g = wait_for(lambda: (s := a.status("eng-a")).mirrored_step >= 12 and s)
    full = len(tokens) // SLOTS
    assert g.remote_bytes >= full * 2 * LAYERS * BLOCK
    assert a.metric("ghostserve_mirrored_bytes_total") == full * 2 * LAYERS * BLOCK
    before = [r.kv.copy() for r in ranks]
    a.lose()

    fresh = b.ranks("eng-b")
    hit = lookup(b, tokens + [1, 2])
    assert hit.group.startswith("store:") and hit.tokens == full * SLOTS and list(hit.blocks) == list(range(full))
    dst = [3, 8, 1, 10, 6, 0]
    for q, r in enumerate(fresh):
        resp = r.client.fetch(hit.group, q, hit.blocks, hit.tokens, dst)
        assert resp.source == "store" and list(resp.unrecoverable_blocks) == [] and resp.corrupt_chunks == 0
        assert resp.fetched_bytes == full * LAYERS * BLOCK
        assert np.array_equal(protected_bytes(r.kv, dst, hit.tokens), protected_bytes(before[q], table, hit.tokens))
    assert b.metric("ghostserve_store_fetched_bytes_total") == 2 * full * LAYERS * BLOCK
    # a prefix that diverges in block 3 matches blocks 0-2 only
    other = list(tokens)
    other[3 * SLOTS + 1] += 1
    assert lookup(b, other).tokens == 3 * SLOTS
    # b runs the request on: the copies a left in b's segment are now b's request's (no other
    # node can take them), and go from the store when b's request is released
    for i, r in enumerate(fresh):   # the loaded blocks protected on b (as the connector re-protects them)
        r.client.commit(0, [(d, 0, BLOCK) for d in dst], requests={"q": full * SLOTS},
                        fills=dict.fromkeys(dst, SLOTS), records=[pb.RequestRecord(
                            request_id="q", tokens=tokens[:full * SLOTS], blocks=dst, reset=True)] if i == 0 else ())
    assert fresh[0].client.wait_protected(0)
    wait_for(lambda: b.metric('ghostserve_mirror_refused_total{reason="held_here"}') >= 1)
    space = _space()
    keys = [space.key(h, q) for h in space.chain(tokens[:full * SLOTS]) for q in range(2)]
    assert b.store_exists(keys) == [True] * len(keys)
    for r in fresh:
        r.client.release(1, ["q"])
    wait_for(lambda: b.store_exists(keys) == [False] * len(keys))


def test_short_requests_are_not_mirrored_and_a_released_request_leaves_the_store(nodes, master):
    a, _ = nodes("a"), nodes("b")
    rng = np.random.default_rng(8)
    ranks = a.ranks("eng-a")
    run_request(ranks, rng, rng.integers(0, 50000, MIN_TOKENS - 1).tolist(), [0, 1])
    long = rng.integers(0, 50000, 3 * SLOTS).tolist()
    for r in ranks:
        r.client.release(1, ["q"])
    # the same request id starts anew (a second request): long enough this time
    for r in ranks:
        for b in (2, 3, 4):
            for s in range(SLOTS):
                r.write(rng, b, s)
    for i, r in enumerate(ranks):
        r.client.commit(1, [(b, 0, BLOCK) for b in (2, 3, 4)], requests={"q2": 3 * SLOTS},
                        fills=dict.fromkeys((2, 3, 4), SLOTS),
                        records=[pb.RequestRecord(request_id="q2", tokens=long, blocks=[2, 3, 4], reset=True)]
                        if i == 0 else ())
    assert ranks[0].client.wait_protected(1)
    wait_for(lambda: a.status("eng-a").mirrored_step >= 1)
    assert a.metric("ghostserve_mirrored_bytes_total") == 3 * 2 * LAYERS * BLOCK  # q (15 tokens) was not
    space = _space()
    keys = [space.key(h, q) for h in space.chain(long) for q in range(2)]
    probe = MooncakeStore(StoreUrl.parse(master.url), "127.0.0.1", 16 << 20)
    try:
        assert probe.exists(keys) == [True] * 6
        for r in ranks:
            r.client.release(2, ["q2"])
        wait_for(lambda: probe.exists(keys) == [False] * 6)
        assert a.status("eng-a").remote_bytes == 0
    finally:
        probe.close()


def _space() -> KeySpace:
    return KeySpace.of(NAMESPACE, Layout(**{k: v for k, v in LAYOUT.items() if k != "slot_map"}), 2)


def test_a_corrupt_mirrored_object_is_detected_and_never_served(nodes, master):
    a, b = nodes("a"), nodes("b")
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, 50000, 4 * SLOTS).tolist()
    table = [5, 6, 7, 8]
    ranks = a.ranks("eng-a")
    run_request(ranks, rng, tokens, table)
    wait_for(lambda: a.status("eng-a").mirrored_step >= 0)
    before = [r.kv.copy() for r in ranks]
    a.lose()
    # one byte of rank 1's block 2 flips where the store keeps it
    key = _space().key(_space().chain(tokens)[2], 1)
    probe = MooncakeStore(StoreUrl.parse(master.url), "127.0.0.1", 0)  # holds nothing itself
    try:
        bad = bytearray(probe.get(key))
        bad[-5] ^= 0x40
        assert probe.remove(key)
        # on b's segment: once the master has forgotten the lost node's (its client TTL)
        (b_segment,) = wait_for(lambda: [x.name for x in probe.segments()] if len(probe.segments()) == 1 else None)
        assert probe.put(key, bytes(bad), b_segment) == "stored"
    finally:
        probe.close()
    fresh = b.ranks("eng-b")
    hit = lookup(b, tokens)
    assert hit.tokens == 4 * SLOTS
    dst = [0, 1, 2, 3]
    for q, r in enumerate(fresh):
        r.kv[:] = 0x5A
        resp = r.client.fetch(hit.group, q, hit.blocks, hit.tokens, dst)
        assert list(resp.unrecoverable_blocks) == ([2] if q == 1 else [])
        assert resp.corrupt_chunks == (1 if q == 1 else 0)
        for i in range(4):
            got = protected_bytes(r.kv, [dst[i]], SLOTS)
            if q == 1 and i == 2:
                assert (got == 0x5A).all()       # never written: the engine recomputes it
            else:
                assert np.array_equal(got, protected_bytes(before[q], [table[i]], SLOTS))


def test_a_full_segment_refuses_mirrors_and_local_protection_goes_on(nodes, master):
    a = nodes("a")
    probe = MooncakeStore(StoreUrl.parse(master.url), "127.0.0.1", 0)  # gives the store no memory
    try:
        before = {x.name for x in probe.segments()}
        b = nodes("b")                   # its segment: 16 MiB, Mooncake's least
        (b_segment,) = {x.name for x in probe.segments()} - before
        for i in range(16):
            probe.put(f"filler{i}", b"\0" * (1 << 20), b_segment)
        assert [x.used == x.capacity for x in probe.segments() if x.name == b_segment] == [True]  # b is full
        rng = np.random.default_rng(10)
        ranks = a.ranks("eng-a")
        run_request(ranks, rng, rng.integers(0, 50000, 3 * SLOTS).tolist(), [0, 1, 2])
        wait_for(lambda: a.metric("ghostserve_mirror_refused_total") >= 1)
        g = a.status("eng-a")
        assert g.mirrored_step == -1 and g.remote_bytes == 0
        assert a.metric("ghostserve_mirrored_bytes_total") == 0
        # local protection is untouched: the next step is protected and acknowledged
        for r in ranks:
            r.write(rng, 3, 0)
        for i, r in enumerate(ranks):
            r.client.commit(1, [(3, 0, BLOCK)], requests={"q": 3 * SLOTS + 1}, fills={3: 1},
                            records=[pb.RequestRecord(request_id="q", tokens=[1], blocks=[3])] if i == 0 else ())
        assert ranks[0].client.wait_protected(1)
        # room again: the mirror catches up on its own
        for i in range(16):
            assert probe.remove(f"filler{i}")
        wait_for(lambda: a.status("eng-a").mirrored_step >= 1)
        assert a.metric("ghostserve_mirrored_bytes_total") == 3 * 2 * LAYERS * BLOCK
        assert b.daemon.proc.poll() is None and a.daemon.proc.poll() is None
    finally:
        probe.close()


def test_a_master_restart_loses_the_store_and_the_mirror_recovers(nodes, master):
    a, b = nodes("a"), nodes("b")
    rng = np.random.default_rng(11)
    ranks = a.ranks("eng-a")
    tokens = rng.integers(0, 50000, 4 * SLOTS + 6).tolist()
    run_request(ranks, rng, tokens, [0, 1, 2, 3, 4], steps=6)
    wait_for(lambda: a.status("eng-a").mirrored_step >= 6)
    mirrored = a.metric("ghostserve_mirrored_bytes_total")
    master.kill()                         # forgets every object
    # while the master is away the engine goes on and stays protected locally
    for step in range(7, 12):
        t = 4 * SLOTS + step - 1
        for r in ranks:
            r.write(rng, 4 if t < 5 * SLOTS else 5, t % SLOTS)
        for i, r in enumerate(ranks):
            r.client.commit(step, [(4 if t < 5 * SLOTS else 5, 0, BLOCK)], requests={"q": t + 1},
                            fills={4 if t < 5 * SLOTS else 5: t % SLOTS + 1},
                            records=[pb.RequestRecord(request_id="q", tokens=[7],
                                                      blocks=[5] if t % SLOTS == 0 else [])] if i == 0 else ())
    assert ranks[0].client.wait_protected(11)
    master.start()
    # the mirror notices the lost objects and writes them again; B serves them
    wait_for(lambda: a.metric("ghostserve_mirrored_bytes_total") > mirrored, timeout=60)
    wait_for(lambda: a.status("eng-a").mirrored_step >= 11, timeout=60)
    assert a.metric("ghostserve_store_errors_total") >= 1
    full = len(tokens + [7] * 5) // SLOTS
    b.ranks("eng-b")
    assert lookup(b, tokens[: 4 * SLOTS + 6] + [7] * 5).tokens == full * SLOTS


def test_a_daemon_without_a_store_never_imports_mooncake(tmp_path):
    code = ("import sys\n"
            "from prometheus_client import CollectorRegistry\n"
            "from ghostserve.config import Config\n"
            "from ghostserve.daemon.server import Server\n"
            f"s = Server(Config(socket={str(tmp_path / 'gs.sock')!r}, shm_prefix='gsnomc-'), CollectorRegistry())\n"
            "s.start(); s.stop(grace=0)\n"
            "print(sorted(m for m in sys.modules if m.startswith('mooncake')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_bad_store_url_is_refused_at_start():
    from ghostserve.config import Config
    from ghostserve.errors import ConfigError
    for url in ("redis://x:1", "mooncake://host", "mooncake://h:1?colour=red"):
        with pytest.raises(ConfigError):
            Config(socket="/tmp/x.sock", store=url)
    with pytest.raises(ConfigError):
        Config(socket="/tmp/x.sock", store="mooncake://127.0.0.1:1", store_segment_bytes=1 << 20)


def test_gpu_kv_goes_off_node_and_back_through_the_cuda_data_path(master, tmp_path, region):
    """The CUDA data path's read_block/write_block (the mirror's copy and a store
    fetch), on tests/cudasim.py's stand-in of CUDA (no GPU here): node A's GPU
    group is mirrored, node B fetches it into GPU blocks on other devices."""
    from cudasim import HostCuda
    from prometheus_client import CollectorRegistry
    from test_cuda_datapath import GpuRank

    from ghostserve.config import Config
    from ghostserve.daemon.server import Server

    servers = []
    try:
        for name in ("a", "b"):
            cfg = Config(socket=str(tmp_path / f"{name}.sock"), shm_prefix=f"gsg{name}{uuid.uuid4().hex[:6]}-",
                         encode_threads=1, store=master.url, mirror_min_tokens=4, store_segment_bytes=16 << 20)
            srv = Server(cfg, CollectorRegistry(), cuda_runtime=HostCuda(devices=2))
            srv.start()
            srv.sock, srv.sim = cfg.socket, srv.daemon.cuda_runtime
            servers.append(srv)
        a, b = servers
        rng = np.random.default_rng(12)
        lay = Layout(2, 6, 256, 256, 6 * 256, 256, block_slots=4)
        slot_map = (np.arange(256) // 64).astype("<u2").tobytes()
        ranks = [GpuRank(a, region, "gpu-a", q, 2, 1, lay, device=q, slot_map=slot_map) for q in range(2)]
        tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
        for r in ranks:
            for blk in (1, 2, 3):
                r.write(rng, blk)
        for i, r in enumerate(ranks):
            r.commit(0, [1, 2, 3], {"q": 12}, fills=dict.fromkeys((1, 2, 3), 4),
                     records=[pb.RequestRecord(request_id="q", tokens=tokens, blocks=[1, 2, 3], reset=True)]
                     if i == 0 else [])
        assert ranks[0].client.wait_protected(0)
        op = OperatorClient(a.sock)
        wait_for(lambda: op.status("gpu-a").groups[0].mirrored_step >= 0)
        before = [r.shards() for r in ranks]
        fresh = [GpuRank(b, region, "gpu-b", q, 2, 1, lay, device=1 - q, slot_map=slot_map) for q in range(2)]
        # the key space is that of b's engines of the namespace: b's group must exist first
        hit = worker_stub(channel(b.sock)).Lookup(pb.LookupRequest(tokens=np.asarray(tokens, "<u4").tobytes()))
        assert hit.group.startswith("store:") and hit.tokens == 12
        for q, new in enumerate(fresh):
            resp = new.client.fetch(hit.group, q, hit.blocks, hit.tokens, [5, 0, 4])
            assert resp.source == "store" and list(resp.unrecoverable_blocks) == []
            got = new.shards()
            for layer in range(2):
                for src, dst in zip((1, 2, 3), (5, 0, 4), strict=True):
                    assert np.array_equal(got[layer * 6 + dst], before[q][layer * 6 + src]), (q, layer, src)
            new.client.goodbye()
        for r in ranks:
            r.client.goodbye()
    finally:
        for srv in servers:
            srv.stop(grace=1)
            for name in shm.list_names(srv.daemon.config.shm_prefix):
                shm.unlink(name)
