"""The SGLang plug-in's parts that need no SGLang: its settings, the KV segment's
geometry and the daemon layout describing it, and the page bookkeeping of
commits. (tests/test_sglang.py runs the plug-in inside real SGLang.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.daemon.layout import Layout
from ghostserve.errors import ConfigError
from ghostserve.integrations.common import fills_of
from ghostserve.integrations.sglang.kvpool import PoolGeometry, kv_buffers, pages_of
from ghostserve.integrations.sglang.options import PluginOptions


def test_options_are_off_unless_asked_for_and_validated():
    assert PluginOptions.from_env({}) is None
    assert PluginOptions.from_env({"GHOSTSERVE_SGLANG": "0", "GHOSTSERVE_SGLANG_PARITY": "x"}) is None
    on = PluginOptions.from_env({"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_SOCKET": "/run/gs.sock"})
    assert (on.socket, on.parity, on.resume, on.shm_prefix, on.group) == ("/run/gs.sock", 1, True, "gs-", "")
    own = PluginOptions.from_env({"GHOSTSERVE_SGLANG": "yes", "GHOSTSERVE_SOCKET": "/a.sock",
                                  "GHOSTSERVE_SGLANG_SOCKET": "/b.sock", "GHOSTSERVE_SGLANG_PARITY": "2",
                                  "GHOSTSERVE_SGLANG_RESUME": "off", "GHOSTSERVE_SGLANG_GROUP": "svc-a"})
    assert (own.socket, own.parity, own.resume, own.group) == ("/b.sock", 2, False, "svc-a")
    bad = {
        "GHOSTSERVE_SGLANG": {"GHOSTSERVE_SGLANG": "maybe"},
        "GHOSTSERVE_SGLANG_SOCKET": {"GHOSTSERVE_SGLANG": "1"},
        "GHOSTSERVE_SGLANG_PARITY": {"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_SOCKET": "s", "GHOSTSERVE_SGLANG_PARITY": "0"},
        "GHOSTSERVE_SGLANG_SHM_PREFIX": {"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_SOCKET": "s",
                                         "GHOSTSERVE_SGLANG_SHM_PREFIX": "a/b"},
        "GHOSTSERVE_SGLANG_SOCKT": {"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_SOCKET": "s",
                                    "GHOSTSERVE_SGLANG_SOCKT": "x"},
    }
    for field, env in bad.items():
        with pytest.raises(ConfigError) as info:
            PluginOptions.from_env(env)
        assert info.value.field == field
    with pytest.raises(ConfigError, match="PARITY"):
        PluginOptions.from_env({"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_SOCKET": "s", "GHOSTSERVE_SGLANG_PARITY": "two"})


geometries = st.builds(PoolGeometry, layers=st.integers(1, 4), rows=st.integers(2, 200), page=st.sampled_from([1, 2, 16]),
                       heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8]), itemsize=st.sampled_from([1, 2]))


@settings(max_examples=40, deadline=None)
@given(geom=geometries, data=st.data())
def test_sglang_buffers_and_the_daemon_layout_name_the_same_bytes(geom, data):
    """Writing a token's K or V through SGLang's view changes exactly the bytes the
    layout says belong to that slot's page (in that plane), nothing else."""
    torch = pytest.importorskip("torch")
    lay = Layout.from_dict({k: v for k, v in geom.layout().items() if k != "slot_map"})
    assert lay.problems() == [] and lay.simple
    assert lay.slot_map_problems(geom.layout()["slot_map"]) == []
    assert lay.num_blocks * lay.block_bytes == geom.plane_bytes and geom.size == lay.num_layers * geom.plane_bytes
    on_tensor = data.draw(st.booleans())  # a GPU pool's buffers are views of one uint8 tensor
    buf = bytearray(geom.size)
    dtype = {1: torch.uint8, 2: torch.bfloat16}[geom.itemsize]
    k, v = kv_buffers(torch.frombuffer(buf, dtype=torch.uint8) if on_tensor else buf, geom, dtype)
    assert len(k) == len(v) == geom.layers and k[0].shape == (geom.rows, geom.heads, geom.head_dim)
    layer = data.draw(st.integers(0, geom.layers - 1))
    slot = data.draw(st.integers(0, geom.rows - 1))
    which = data.draw(st.sampled_from(["k", "v"]))
    (k if which == "k" else v)[layer][slot].view(torch.uint8).fill_(0xFF)
    raw = np.frombuffer(buf, dtype=np.uint8)
    plane = 2 * layer + (which == "v")
    page, off = divmod(slot, geom.page)
    at = lay.offset + plane * lay.layer_stride + page * lay.block_stride
    slot_map = np.frombuffer(geom.layout()["slot_map"], dtype="<u2")
    want = np.zeros_like(raw)
    want[at : at + lay.block_bytes][slot_map == off] = 0xFF
    assert np.array_equal(raw, want)
    assert (at, lay.block_bytes) == geom.page_spans(page)[plane]


@given(page=st.sampled_from([1, 4, 16]), pages=st.lists(st.integers(1, 50), min_size=1, max_size=8, unique=True),
       length=st.integers(1, 8 * 16))
def test_pages_and_fills_of_a_request(page, pages, length):
    length = min(length, len(pages) * page)
    slots = np.concatenate([np.arange(p * page, (p + 1) * page) for p in pages])[:length]
    assert pages_of(slots, page).tolist() == pages[: -(-length // page)]
    fills = fills_of(slots, page)
    assert set(fills) == set(pages[: -(-length // page)])
    assert all(f == page for p, f in fills.items() if p != pages[(length - 1) // page])
    assert fills[pages[(length - 1) // page]] == (length - 1) % page + 1
    assert fills_of(np.zeros(0, dtype=np.int64), page) == {}


def test_geometry_refuses_what_the_daemon_cannot_describe():
    with pytest.raises(ValueError):
        PoolGeometry(layers=0, rows=8, page=1, heads=1, head_dim=8, itemsize=2)
    with pytest.raises(ValueError):
        PoolGeometry(layers=1, rows=8, page=1 << 16, heads=1, head_dim=8, itemsize=2)


@given(prompt=st.lists(st.integers(0, 9), max_size=12), out=st.lists(st.integers(10, 19), max_size=12),
       a=st.integers(0, 30), b=st.integers(0, 30))
def test_token_slice_is_a_slice_of_prompt_plus_output(prompt, out, a, b):
    from array import array
    from types import SimpleNamespace

    from ghostserve.integrations.sglang.rank import token_slice

    req = SimpleNamespace(origin_input_ids=array("q", prompt), output_ids=array("q", out))
    assert token_slice(req, a, b) == (prompt + out)[a:b]


def test_the_plugin_does_nothing_and_imports_nothing_heavy_when_off():
    """SGLang loads every installed plug-in in each of its processes: with
    GHOSTSERVE_SGLANG unset, ghostserve's must neither hook nor import SGLang or torch."""
    import os
    import subprocess
    import sys

    code = ("import sys; from ghostserve.integrations.sglang import plugin; plugin(); "
            "bad = [m for m in ('torch', 'sglang', 'grpc') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_SGLANG")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
