"""Node loss in the chaos harness (``ghostserve chaos --nodes 2 --kill-node STEP``):
a real Mooncake master and two real daemons on loopback, real worker processes,
node A lost whole, its requests looked up and fetched from the store on node B,
every fetched byte checked by the harness (ghostserve/chaos/nodes.py); these
tests check its verdicts, its refusals and the slotted workload it runs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from rich.console import Console
from test_chaos import chaos_cli

from ghostserve import shm
from ghostserve.chaos.harness import ChaosResult, NodeLoss, render
from ghostserve.chaos.workload import Shape, Workload, token_ids
from ghostserve.daemon.layout import Layout
from ghostserve.errors import MissingExtra
from ghostserve.extras import importable

needs_mooncake = pytest.mark.skipif(not importable("mooncake.store"),
                                    reason="the ghostserve[mooncake] extra is not installed")


@needs_mooncake
def test_a_lost_nodes_requests_resume_from_the_store_byte_exact():
    out = chaos_cli("--json", "--nodes", "2", "--kill-node", "20", "--steps", "40", "--step-ms", "20",
                    timeout=150)
    assert out.returncode == 0, out.stderr[-3000:]
    d = json.loads(out.stdout)
    n = d["node_loss"]
    assert d["ok"] is True and d["errors"] == [], d["errors"]
    assert n["source"] == "store"
    assert d["mismatched_bytes"] == 0 and d["garbage_bytes"] == 0
    assert n["restored_blocks"] > 0 and n["requests_restored"] > 0
    assert d["verified_bytes"] == d["restored_bytes"] > 0   # every fetched byte was checked
    assert n["restored_blocks"] + n["recompute_blocks"] == n["blocks"]
    assert n["recompute_blocks"] == n["tail_blocks"] + n["unmirrored_blocks"] + n["unrecoverable_blocks"]
    # the mirror's lag at the loss, as the daemon's status gave it
    assert n["committed_step"] == 19 and n["mirrored_step"] <= n["protected_step"] <= 19
    assert n["mirror_lag_steps"] == (n["protected_step"] - n["mirrored_step"] if n["mirrored_step"] >= 0
                                     else n["protected_step"] + 1)
    # the run went on on node B and every live token there is right
    assert d["final_verified_bytes"] > 0 and d["final_mismatched_bytes"] == 0
    (f,) = d["faults"]
    assert (f["kind"], f["node"], f["step"]) == ("kill-node", "a", 20)
    assert f["outcome"] in ("restored", "partly restored")
    # nothing of the run is left: no segment of either node, no socket
    assert shm.list_names(d["shm_prefix"]) == []
    assert set(n["nodes"]) == {"a", "b"}
    for node in n["nodes"].values():
        assert node["shm_prefix"].startswith(d["shm_prefix"]) and not os.path.exists(node["socket"])
    # the table names the same figures
    console = Console(record=True, width=200)
    for table in render(ChaosResult(**{**d, "node_loss": NodeLoss(**n)}), Shape(steps=40)):
        console.print(table)
    text = console.export_text()
    assert "2 nodes: ok" in text and "restored from" in text and "│ store" in text
    assert f"{n['restored_blocks']} of {n['blocks']} blocks" in text and "kill node a" in text


@pytest.mark.parametrize("args, message", [
    (("--nodes", "3", "--kill-node", "5"), "--nodes 3: only 2 nodes for now"),
    (("--kill-node", "5"), "--kill-node 5: needs --nodes 2"),
    (("--nodes", "2"), "--nodes 2: give --kill-node STEP"),
    (("--nodes", "2", "--kill-node", "60"), "--kill-node 60: step 60 is outside 1..59"),
    (("--nodes", "2", "--kill-node", "0"), "--kill-node 0: step 0 is outside 1..59"),
    (("--nodes", "2", "--kill-node", "5", "--device", "cuda"), "--device cuda with --nodes"),
    (("--nodes", "2", "--kill-node", "5", "--kill", "1@3"), "--kill with --nodes"),
    (("--nodes", "2", "--kill-node", "5", "--socket", "/tmp/x.sock"), "--socket /tmp/x.sock with --nodes"),
])
def test_bad_node_options_are_refused_naming_the_value(args, message):
    out = chaos_cli("--json", *args, timeout=60)
    assert out.returncode == 2, out.stderr
    d = json.loads(out.stdout)
    assert d["ok"] is False and message in d["error"] and "Traceback" not in out.stderr


def test_node_loss_without_mooncake_names_the_extra(monkeypatch):
    from ghostserve.chaos import nodes

    monkeypatch.setattr(nodes, "importable", lambda module: False)
    with pytest.raises(MissingExtra, match=r"ghostserve\[mooncake\]"):
        nodes.NodeChaos(Shape(steps=10), 5)


@needs_mooncake
@pytest.mark.parametrize("restored, source, ok", [(3, "store", True), (0, "", False), (3, "node", False)])
def test_node_verdict_needs_bytes_from_the_store(restored, source, ok):
    from ghostserve.chaos.nodes import NodeChaos

    c = NodeChaos(Shape(steps=10), 5)  # not run: only its verdict on a result
    try:
        c.loss.restored_blocks, c.loss.source = restored, source
        c.result.final_verified_bytes = 1
        c._verdict()
    finally:
        shutil.rmtree(c.tmp)
    assert c.result.ok is ok
    if not restored:
        assert "nothing was restored from the store" in c.result.errors[0]


@pytest.mark.parametrize("seed", [0, 3])
def test_slotted_commits_rebuild_every_request_and_its_blocks(seed):
    """Replaying the slotted commits' records, fills and finished requests gives,
    after every step, each live request's token ids and block table; a resume
    commit holds the same at once. The layout is one the daemon accepts."""
    shape = Shape(steps=50, seed=seed, slotted=True)
    work, bs = Workload(shape), shape.block_size
    index: dict[str, tuple[list[int], list[int]]] = {}
    fill: dict[int, int] = {}
    for st in work.steps:
        sc = work.slot_commit(st.step)
        assert [b for b, _, _ in sc.dirty] == list(sc.fills) and all(e == shape.block_bytes for _, _, e in sc.dirty)
        for rec in sc.records:
            if rec.reset:
                index[rec.request] = ([], [])
            index[rec.request][0].extend(rec.tokens)
            index[rec.request][1].extend(rec.blocks)
        fill.update(sc.fills)
        for name in st.finished:
            del index[name]
        assert sc.lengths == st.lengths
        live = {f"req{rid}": (token_ids(shape, rid, 0, n), blocks) for rid, (n, blocks) in st.tables.items()}
        assert index == live
        for n, blocks in st.tables.values():
            assert [fill[b] for b in blocks] == [min(bs, n - i * bs) for i in range(len(blocks))]
        resume = work.resume_commit(st.step)
        assert {r.request: (r.tokens, r.blocks) for r in resume.records} == live
        assert all(r.reset for r in resume.records) and resume.lengths == {k: len(v[0]) for k, v in live.items()}
    # every request's first block is its own: no two share a prefix key in the store
    firsts = {tuple(token_ids(shape, rid, 0, bs)) for rid in range(40)}
    assert len(firsts) == 40
    lay = shape.layout()
    assert (lay["chunk_bytes"], lay["block_slots"]) == (shape.block_bytes, bs)
    layout = Layout.from_dict({k: v for k, v in lay.items() if k != "slot_map"})
    assert layout.problems() == [] and layout.slot_map_problems(lay["slot_map"]) == []
    # a token's K and V bytes are its slot's, as the chaos generator writes them
    kv = np.zeros(shape.block_bytes, dtype=np.uint8)
    kv[(shape.slot_map() == 3)] = 1
    view = kv.reshape(2, bs, shape.token_bytes)
    assert view[:, 3].all() and view.sum() == 2 * shape.token_bytes
    # the single-node layout is untouched
    assert Shape().layout() == dict(num_layers=4, num_blocks=64, block_bytes=Shape().block_bytes,
                                    chunk_bytes=Shape().token_bytes, layer_stride=64 * Shape().block_bytes,
                                    block_stride=Shape().block_bytes, offset=0)
