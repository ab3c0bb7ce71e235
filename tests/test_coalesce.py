"""Steps encoded together (``coalesce_steps``) protect exactly what the same steps
encoded one by one protect: the same chunks and watermarks, and every protected
chunk's checksum true to the memory with the parity matching it (scrub). Two real daemons, one encoding step by step, one merging up to 8
ready steps (it waits for the next step to make runs likely), fed the same
random commits: writes filling blocks slot by slot, blocks released and reused
by another request in the same step, blocks freed, requests finishing."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_resume import BLOCK, BLOCKS, SLOTS, Rank, end_engine, wait_ended

from ghostserve.client import OperatorClient
from ghostserve.config import Config
from ghostserve.daemon.server import Server


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("coalesce")
    servers = []
    for name, steps, wait in (("one", 1, 0.0), ("many", 8, 0.3)):
        cfg = Config(socket=str(root / f"{name}.sock"), shm_prefix=f"gsco{name}{uuid.uuid4().hex[:4]}-",
                     encode_threads=1, coalesce_steps=steps, coalesce_wait_seconds=wait)
        srv = Server(cfg, CollectorRegistry())
        srv.start()
        srv.sock = cfg.socket
        servers.append(srv)
    yield servers
    for srv in servers:
        srv.stop(grace=1)


def plan(draw_ops: list[tuple[int, int]], seed: int) -> list[dict]:
    """The steps: op 0 writes ``n`` more tokens of the current request; op 1
    finishes it and starts the next in its last block (released before the step's
    writes: reused at once, filled from slot 0 again); op 2 also frees an unused
    block after the step."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(BLOCKS).tolist())
    steps, req, tokens, blocks, n_req = [], "r0", 0, [], 0
    for op, n in draw_ops:
        s: dict = {"writes": {}, "released": [], "freed": [], "finished": [], "marks": {}}
        if op == 1 and blocks:
            s["finished"].append(req)
            reuse = blocks[-1]
            s["released"].append(reuse)
            n_req += 1
            req, tokens, blocks = f"r{n_req}", 0, [reuse]
        elif op == 2 and len(free) > 2:
            s["freed"].append(free.pop())
        for _ in range(n):
            if tokens % SLOTS == 0 and tokens // SLOTS >= len(blocks):
                if not free:
                    break
                blocks.append(free.pop())
            b = blocks[tokens // SLOTS]
            s0, _ = s["writes"].get(b, (tokens % SLOTS, 0))
            s["writes"][b] = (s0, tokens % SLOTS + 1)
            tokens += 1
        s["marks"][req] = tokens
        steps.append(s)
    return steps


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, 2]), st.integers(1, 11)), min_size=3, max_size=14),
       seed=st.integers(0, 2**31))
def test_coalesced_steps_protect_what_single_steps_protect(pair, region, ops, seed):
    steps = plan(ops, seed)
    name = f"co{uuid.uuid4().hex[:6]}"
    views = []
    for srv in pair:
        rng = np.random.default_rng(seed)   # the same bytes on both
        ranks = [Rank(srv, region, name, q, 2, 1) for q in range(2)]
        for t, s in enumerate(steps):
            for r in ranks:
                for b, (s0, s1) in s["writes"].items():
                    for slot in range(s0, s1):
                        r.write(rng, b, slot)
            fills = {b: s1 for b, (_, s1) in s["writes"].items()}
            for r in ranks:
                r.client.commit(t, [(b, 0, BLOCK) for b in s["writes"]], requests=s["marks"], fills=fills,
                                released=s["released"], freed=s["freed"], finished=s["finished"])
        assert ranks[0].client.wait_protected(len(steps) - 1)
        op = OperatorClient(srv.sock)
        (g,) = op.status(name).groups
        scrub = op.scrub(name)
        assert scrub.checksum_mismatches == 0 and scrub.parity_mismatches == 0
        views.append((g.protected_bytes, {w.request_id: w.tokens for w in g.watermarks}, scrub.chunks_checked))
        encodes = srv.daemon.registry.get_sample_value("ghostserve_encodes_total", {"group": name})
        if srv is pair[1]:
            assert encodes < len(steps)   # it did merge
        else:
            assert encodes == len(steps)
        end_engine(ranks, 0)
        wait_ended(srv, name, 2)
        op.drop(name)
    assert views[0] == views[1]
