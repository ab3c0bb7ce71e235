"""Configuration, the crash-safe records of the parity store, shared memory, and
the generated gRPC code against its .proto."""

from __future__ import annotations

import dataclasses
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from ghostserve import shm
from ghostserve.config import Config
from ghostserve.daemon.index import Record, StepNews
from ghostserve.daemon.store import Layout, ParityStore, _read_record, _write_record
from ghostserve.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_config_defaults_env_and_flags():
    cfg = Config.from_env({"GHOSTSERVE_SHM_PREFIX": "envp-", "GHOSTSERVE_METRICS_PORT": "9100"},
                          metrics_port=9200, socket="/tmp/x.sock")
    assert (cfg.shm_prefix, cfg.metrics_port, cfg.socket) == ("envp-", 9200, "/tmp/x.sock")
    with pytest.raises(ConfigError) as info:
        Config.from_env({"GHOSTSERVE_METRICS_PORT": "http"})
    assert info.value.field == "metrics_port"
    for bad in (dict(shm_prefix="a/b"), dict(metrics_port=70000), dict(encode_threads=-1),
                dict(listen="0.0.0.0:50051"), dict(listen="10.1.2.3:50051", insecure=True),
                dict(listen="nohost"), dict(tls_cert="c.pem"), dict(log_level="loud")):
        with pytest.raises(ConfigError):
            Config(**bad)
    assert Config(listen="127.0.0.1:50051", insecure=True).listen
    assert Config(listen="[::1]:50051", insecure=True).listen
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().socket = "x"


def test_records_survive_a_torn_write(shm_prefix):
    seg = shm.Segment.create(shm_prefix + "rec", 4096)
    _write_record(seg, 0, 1024, {"v": 1})
    _write_record(seg, 0, 1024, {"v": 2})
    assert _read_record(seg, 0, 1024) == {"v": 2}
    # a crash in the middle of the next write: its slot is invalidated, half filled
    seg.buf[0:16] = b"\0" * 16  # the slot that write 3 would use (lower seq) is slot 0
    seg.buf[16:20] = b"{\"v\""
    assert _read_record(seg, 0, 1024) == {"v": 2}
    with pytest.raises(ValueError):
        _write_record(seg, 0, 1024, {"x": "y" * 2000})


def test_store_reopens_with_everything(shm_prefix):
    layout = Layout(2, 4, 512, 128, 2048, 512)
    manifest = {"world_size": 3, "parity": 2, "layout": layout.to_dict(), "ranks": {"0": {"regions": ["a"], "pid": 1}}}
    store = ParityStore.create(shm_prefix, "grp", manifest)
    store.parity[1, 1, 2, :] = 7
    store.chunk_step[3, 1] = 42
    store.crc[3, 1, 2] = 0xDEADBEEF
    store.protected_step = 42
    store.index.apply(StepNews(step=42, watermarks={"r": 9}, records=[Record("r", [5, 6], [3], reset=True)]))
    store.close()
    again = ParityStore.open(shm_prefix, "grp")
    assert again.manifest == manifest and again.protected_step == 42
    assert (again.parity[1, 1, 2] == 7).all() and again.chunk_step[3, 1] == 42
    assert again.crc[3, 1, 2] == 0xDEADBEEF and again.index.watermarks == {"r": 9}
    assert again.index.requests == {"r": ([5, 6], [3])} and again.index.index_step == 42
    assert ParityStore.groups(shm_prefix) == ["grp"]
    assert again.parity.nbytes == layout.kv_bytes() * 2  # m of N: parity only
    again.close()


def test_layout_validation():
    assert Layout(2, 4, 512, 128, 2048, 512).problems() == []
    assert Layout(2, 4, 512, 128, 512, 1024).problems() == []  # layers inside blocks
    assert Layout(2, 4, 512, 100, 2048, 512).problems()
    assert Layout(2, 4, 512, 128, 1024, 512).problems()  # layers overlap blocks
    assert Layout(0, 4, 512, 128, 2048, 512).problems()


def test_shm_segments_are_not_reaped_by_a_tracker(shm_prefix):
    name = shm_prefix + "keep"
    code = (f"from ghostserve import shm; s = shm.Segment.create({name!r}, 4096); s.array()[:3] = 9")
    subprocess.run([sys.executable, "-c", code], check=True)
    seg = shm.Segment.attach(name)  # outlived its creator
    assert list(seg.array()[:4]) == [9, 9, 9, 0]
    with pytest.raises(ValueError):
        shm.Segment.attach(name, 1 << 20)
    with pytest.raises(ValueError):
        shm.check_name("a/b")
    seg.close()
    assert shm.unlink(name) and not shm.exists(name)


def test_generated_grpc_code_is_not_stale(tmp_path):
    pytest.importorskip("grpc_tools")
    proto = ROOT / "proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    str(proto / "ghostserve/v1/ghostserve.proto")], check=True)
    for name in ("ghostserve_pb2.py", "ghostserve_pb2_grpc.py", "ghostserve_pb2.pyi"):
        fresh, committed = tmp_path / "ghostserve/v1" / name, ROOT / "ghostserve/v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), (
            f"{committed} is stale: regenerate it (see the header of the .proto)")


def test_parity_memory_is_m_over_n_of_the_kv():
    layout = Layout(4, 100, 4096, 256, 409600, 4096)
    meta, parity = ParityStore.sizes(layout, 8, 2)
    assert parity == layout.kv_bytes() * 2 and parity / (layout.kv_bytes() * 8) == 0.25
    assert meta < parity  # metadata is small next to parity
