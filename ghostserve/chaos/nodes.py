"""``ghostserve chaos --nodes 2 --kill-node STEP``: the loss of a whole node.

Everything runs on loopback: a Mooncake master (:class:`LocalMaster`) and two
nodes, A and B, each a ``ghostserve serve`` (:class:`~ghostserve.sidecar.Sidecar`)
joined to the store with a socket, a shared-memory prefix (under the run's) and
a store segment of its own. The synthetic workers run on node A with a
slot-addressed layout (``Shape.slotted``): their commits carry filled slots and
Lookup records, so node A's daemon mirrors the protected full blocks of every
request of at least one block (``--mirror-min-tokens``) into node B's segment,
asynchronously, as the run goes.

Before STEP's writes node A is lost whole: its daemon and every worker
SIGKILLed, then every shared-memory segment under its prefix unlinked (parity,
index, the workers' KV), so nothing of it survives on the node. A new group
(new worker processes, the same world size, layout and namespace) registers on
node B. For each request node A held, the driver looks its tokens up on node B:
the answer names a ``store:`` group and the prefix's full blocks, which every
rank fetches into the blocks the request had (the run goes on with the same
block tables). Every fetched byte is compared with the generator, and a block
a Fetch reports unrecoverable must be untouched. What did not come back is
recomputed on every rank: each request's tail (never a full block, so never
mirrored), blocks not yet mirrored at the loss (the mirror's lag, which the
report shows), unrecoverable blocks, requests too short to be mirrored. One
commit then gives node B's daemon every live request, and the run finishes on
node B: the final scrub and the byte check of every live token there.

The verdict fails on a mismatched or garbage byte, on bytes from anywhere but
the store, on nothing restored from the store at all, and on whatever fails a
single-node run (a stall, the final check).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

import numpy as np

from ghostserve import shm, wire
from ghostserve.chaos.harness import Chaos, NodeLoss
from ghostserve.chaos.options import KvDevice, check_nodes
from ghostserve.chaos.workload import Shape, expected_and_actual, token_ids
from ghostserve.client import OperatorClient, channel
from ghostserve.daemon.offnode.master import LocalMaster, master_binary
from ghostserve.daemon.offnode.mirror import STORE_GROUP
from ghostserve.daemon.offnode.objects import HEADER_BYTES
from ghostserve.daemon.offnode.store import MIN_SEGMENT_BYTES, StoreUrl
from ghostserve.errors import ChaosError, MissingExtra, StoreError
from ghostserve.extras import importable
from ghostserve.sidecar import Sidecar
from ghostserve.v1 import ghostserve_pb2 as pb

__all__ = ["NodeChaos", "store_segments"]

NODE_A, NODE_B = "a", "b"   # the node lost, and the node its requests resume on
JOIN_SECONDS = 60.0         # both daemons' segments in the store (Mooncake's client joins in ~1 s)


def store_segments(url: str) -> list[str]:
    """The names of the segments the store's master lists (its admin address)."""
    admin = StoreUrl.parse(url).admin
    try:
        with urllib.request.urlopen(f"http://{admin}/get_segments_detail", timeout=2) as resp:
            body = json.loads(resp.read() or b"{}")
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise StoreError(f"the master's admin address {admin} did not answer: {exc}") from None
    return [str(s["segment_name"]) for s in body.get("segments", [])]


class NodeChaos(Chaos):
    """One node-loss run (see the module doc); :meth:`run` returns its
    :class:`~ghostserve.chaos.harness.ChaosResult`, whose ``node_loss`` holds
    what is particular to it."""

    def __init__(self, shape: Shape, kill_node: int, nodes: int = 2, socket: str = "", shm_prefix: str = "",
                 metrics_port: int = 0, progress: Any = None, recover_after: float = 0.0,
                 step_seconds: float = 0.0, stall_seconds: float = 30.0, device: KvDevice = KvDevice.HOST):
        check_nodes(nodes, kill_node, shape.steps, device, socket=socket)
        what = "ghostserve chaos --nodes"
        if not importable("mooncake.store"):
            raise MissingExtra("mooncake", what, "mooncake.store")
        try:
            master_binary()
        except StoreError:
            raise MissingExtra("mooncake", what, "mooncake_master") from None
        super().__init__(replace(shape, slotted=True), shm_prefix=shm_prefix, metrics_port=metrics_port,
                         progress=progress, recover_after=recover_after, step_seconds=step_seconds,
                         stall_seconds=stall_seconds)
        self.kill_step = kill_node
        self.namespace = f"ghostserve-chaos/seed{shape.seed}"
        # one full block: nearly every request of the synthetic workload is mirrored
        self.min_tokens = shape.block_size
        # room for every block of every rank twice over: removals of finished
        # requests' objects wait out the readers' leases
        need = 2 * shape.ranks * shape.blocks * (shape.layers * self.shape.block_bytes + HEADER_BYTES)
        self.segment_bytes = max(MIN_SEGMENT_BYTES, -(-need >> 20) << 20)
        self.master: LocalMaster | None = None
        self.nodes: dict[str, Sidecar] = {}
        self.lost_at = 0.0  # perf_counter at the loss
        self.result.socket = ""  # one per node: node_loss.nodes
        self.result.node_loss = self.loss = NodeLoss(step=kill_node, lost=NODE_A, resumed_on=NODE_B,
                                                     mirror_min_tokens=self.min_tokens)

    # ---------------------------------------------------------------- nodes

    def start_node(self, name: str, metrics_port: int = 0) -> Sidecar:
        """Node ``name``'s daemon, joined to the store, its prefix under the run's."""
        assert self.master is not None
        prefix = f"{self.prefix}{name}-"
        node = Sidecar(prefix=prefix, metrics_port=metrics_port, args=(
            "--store", self.master.url, "--node", name, "--store-segment-bytes", str(self.segment_bytes),
            "--mirror-min-tokens", str(self.min_tokens), "--region-prefix", prefix))
        self.nodes[name] = node  # before it starts: cleanup stops it whatever happens
        node.start()
        self.loss.nodes[name] = {"socket": node.socket, "shm_prefix": prefix}
        return node

    def wait_joined(self) -> None:
        """Until the master lists every node's segment: node A's mirror places a
        block on another node's segment, and one it does not see yet would make
        it back off. The master has no event for a join: its listing is polled."""
        assert self.master is not None
        deadline = time.monotonic() + JOIN_SECONDS
        while len(store_segments(self.master.url)) < len(self.nodes):
            for name, node in self.nodes.items():
                if node.proc is not None and node.proc.poll() is not None:
                    raise ChaosError(f"node {name}'s daemon exited ({node.proc.returncode}) while joining the store")
            if time.monotonic() > deadline:
                raise ChaosError(f"the daemons did not join the store within {JOIN_SECONDS:g} s")
            time.sleep(0.05)

    def use(self, node: Sidecar, group: str, step_offset: int) -> None:
        """Point the driver and new workers at ``node``: its socket, prefix, a group of it."""
        self.socket, self.kv_prefix, self.group, self.step_offset = node.socket, node.prefix, group, step_offset
        if getattr(self, "op", None) is not None:
            self.op.close()
        self.op = OperatorClient(node.socket)
        self.generation = [0] * self.shape.ranks

    def lose_node(self, name: str, step: int) -> None:
        """Node ``name`` goes whole, before ``step``'s writes: how far its mirror
        was, then its daemon and workers SIGKILLed, then its shared memory unlinked."""
        node, n = self.nodes[name], self.loss
        (g,) = self.op.status(self.group).groups
        n.committed_step, n.protected_step = step - 1, g.protected_step
        n.mirrored_step, n.remote_bytes = g.mirrored_step, g.remote_bytes
        n.mirror_lag_steps = g.protected_step - g.mirrored_step if g.mirrored_step >= 0 else g.protected_step + 1
        assert node.proc is not None
        for proc in [node.proc, *self.procs.values()]:  # everything at once, as a node goes
            os.kill(proc.pid, signal.SIGKILL)
        node.kill()  # reaps it
        for rank, proc in list(self.procs.items()):
            proc.join()
            self.conns.pop(rank).close()
        self.procs.clear()
        for seg in shm.list_names(node.prefix):
            shm.unlink(seg)
        left = shm.list_names(node.prefix)
        if left:
            raise ChaosError(f"node {name}'s shared memory outlived it: {left}")
        self.result.faults.append({"kind": "kill-node", "node": name, "step": step})

    # ---------------------------------------------------------------- resume

    def resume(self, step: int) -> None:
        """Node B takes over the requests node A held after ``step - 1``: Lookup
        and Fetch of each, the bytes checked, the rest recomputed, one commit."""
        n = self.loss
        ch = channel(self.socket)
        try:
            redo = self._fetch_all(wire.stub(ch, "Worker"), step)
        finally:
            ch.close()
        n.resume_seconds = time.perf_counter() - self.lost_at
        for rank in range(self.shape.ranks):
            self.conns[rank].send(("resume", step - 1, redo))
        for rank in range(self.shape.ranks):
            self._expect_done(rank)
        outcome = ("not restored" if not n.restored_blocks else "partly restored"
                   if n.unmirrored_blocks or n.unrecoverable_blocks else "restored")
        self.result.faults[-1].update(
            outcome=outcome,
            note=f"{n.restored_blocks} block(s) of {n.requests_restored} request(s) fetched from the "
                 f"{n.source or 'store: none'} on node {n.resumed_on}, {n.recompute_blocks} recomputed; the mirror "
                 f"had {n.mirrored_step} of protected step {n.protected_step} off-node")

    def _fetch_all(self, stub: Any, step: int) -> list[tuple[int, int, int, int]]:
        """Every request node A held after ``step - 1`` fetched as far as the store
        has it, and counted; returns the slots to recompute (rid, token, block, slot)."""
        n, bs = self.loss, self.shape.block_size
        redo: list[tuple[int, int, int, int]] = []
        sources: set[str] = set()
        # what the status said was off-node: each request's full blocks at the mirrored step
        mirrored = self.work.steps[n.mirrored_step].tables if n.mirrored_step >= 0 else {}
        for rid, (tokens, blocks) in sorted(self.work.steps[step - 1].tables.items()):
            # the store holds full blocks of requests of min_tokens or more: look up only those
            hit, got = self.fetch_request(stub, rid, tokens, blocks, sources) if tokens >= self.min_tokens \
                else (0, set())
            then = mirrored.get(rid, (0, []))[0]
            n.overstated_blocks += max(0, (then // bs if then >= self.min_tokens else 0) - hit)
            full = tokens // bs
            n.requests += 1
            n.requests_restored += bool(got)
            n.blocks += len(blocks)
            n.restored_blocks += len(got)
            n.tail_blocks += len(blocks) - full
            n.unmirrored_blocks += full - hit
            n.unrecoverable_blocks += hit - len(got)
            n.restored_tokens += len(got) * bs
            n.recompute_tokens += tokens - len(got) * bs
            redo += [(rid, t, b, t % bs) for i, b in enumerate(blocks) if i not in got
                     for t in range(i * bs, min(tokens, (i + 1) * bs))]
        n.recompute_blocks = n.tail_blocks + n.unmirrored_blocks + n.unrecoverable_blocks
        n.source = ",".join(sorted(sources))
        if n.overstated_blocks:
            self.result.notes.append(
                f"the mirror's status overstated it: node {n.lost} said step {n.mirrored_step} was off-node, but "
                f"{n.overstated_blocks} full block(s) protected by then were not in the store")
        return redo

    def fetch_request(self, stub: Any, rid: int, tokens: int, blocks: list[int],
                      sources: set[str]) -> tuple[int, set[int]]:
        """Look request ``rid``'s tokens up on this node; every rank fetches the
        hit into the request's own blocks. Checks every byte; returns the hit's
        length in blocks and the block positions every rank got."""
        n, bs = self.loss, self.shape.block_size
        ids = np.asarray(token_ids(self.shape, rid, 0, tokens), dtype="<u4")
        hit = stub.Lookup(pb.LookupRequest(tokens=ids.tobytes(), namespace=self.namespace), timeout=30)
        if not hit.group:
            n.lookup_misses += 1
            return 0, set()
        k = len(hit.blocks)
        if not hit.group.startswith(STORE_GROUP):
            raise ChaosError(f"Lookup of req{rid} on node {n.resumed_on} answered group {hit.group!r}, not the store")
        if list(hit.blocks) != list(range(k)) or hit.tokens != k * bs or k > tokens // bs:
            raise ChaosError(f"Lookup of req{rid} ({tokens} tokens): a store hit of {hit.tokens} tokens in "
                             f"blocks {list(hit.blocks)}, not the prefix's full blocks")
        for rank in range(self.shape.ranks):
            self.conns[rank].send(("fetch", hit.group, rank, list(hit.blocks), hit.tokens, blocks[:k]))
        missing: set[int] = set()
        for rank in range(self.shape.ranks):
            msg = self._recv(rank, timeout=600)
            if msg[0] != "fetched":
                raise ChaosError(f"fetch of req{rid} on rank {rank}: {msg[1] if msg[0] == 'error' else msg}")
            resp = pb.FetchResponse.FromString(msg[1])
            sources.add(resp.source)
            self.result.restored_bytes += resp.fetched_bytes
            self.result.corruption_detected += resp.corrupt_chunks
            bad = set(resp.unrecoverable_blocks)
            missing |= bad
            self.check_fetched(rank, rid, tokens, blocks[:k], bad)
        return k, set(range(k)) - missing

    def check_fetched(self, rank: int, rid: int, tokens: int, blocks: list[int], bad: set[int]) -> None:
        """Delivered blocks must hold the generator's bytes in every slot; blocks
        reported unrecoverable must be untouched (the fresh region's zeros)."""
        bs = self.shape.block_size
        kv = self.read_kv(rank)
        for delivered in (True, False):
            slots = [(rid, t, b, t % bs) for i, b in enumerate(blocks) if (i not in bad) == delivered
                     for t in range(i * bs, min(tokens, (i + 1) * bs))]
            if not slots:
                continue
            expected, actual = expected_and_actual(self.shape, kv, rank, slots)
            if delivered:
                self.result.verified_bytes += expected.size
                self.result.mismatched_bytes += int((expected != actual).sum())
            else:
                self.result.garbage_bytes += int((actual != 0).sum())

    # ---------------------------------------------------------------- run

    def _run(self) -> None:
        self.master = LocalMaster().start()
        a = self.start_node(NODE_A, self.metrics_port)
        b = self.start_node(NODE_B)
        self.wait_joined()
        self.use(a, f"chaos-{NODE_A}", 0)
        for rank in range(self.shape.ranks):
            self.start_worker(rank)
        for step in range(self.kill_step):
            self._step(step)
        self.lose_node(NODE_A, self.kill_step)
        self.lost_at = time.perf_counter()
        # node B's group: its step 0 is the resume, standing for the last step node A ran
        self.use(b, f"chaos-{NODE_B}", self.kill_step - 1)
        time.sleep(self.recover_after)  # the other node takes a while to notice
        for rank in range(self.shape.ranks):
            self.result.rejoin_seconds.append(self.start_worker(rank))
        self.resume(self.kill_step)
        for step in range(self.kill_step, self.shape.steps):
            self._step(step)
        self._finish()

    def _verdict(self) -> None:
        r, n = self.result, self.loss
        if not r.errors:
            if not n.restored_blocks:
                r.errors.append(f"nothing was restored from the store: at the loss of node {n.lost} its mirror "
                                f"had step {n.mirrored_step} of protected step {n.protected_step} off-node "
                                f"({n.lookup_misses} Lookup miss(es), {n.unrecoverable_blocks} unrecoverable)")
            elif n.source != "store":
                r.errors.append(f"restored bytes came from {n.source!r}, not from the store alone")
        super()._verdict()

    def cleanup(self) -> None:
        """Workers, then the nodes' daemons and the master (their logs kept with the run's), then the prefix."""
        self.quit_workers()
        if getattr(self, "op", None) is not None:
            self.op.close()
        for name, node in self.nodes.items():
            with open(os.path.join(self.tmp, f"daemon-{name}.log"), "w") as f:
                f.write(node.log)
            node.stop()
        if self.master is not None:
            if os.path.exists(self.master.log_path):
                shutil.copy(self.master.log_path, os.path.join(self.tmp, "master.log"))
            self.master.stop()
        for name in shm.list_names(self.prefix):
            shm.unlink(name)
