"""Shared fixtures: a real daemon on a real unix socket, with its own shared-memory
prefix and a fresh Prometheus registry; cleaned up afterwards."""

from __future__ import annotations

import os
import uuid

import pytest
from prometheus_client import CollectorRegistry

from ghostserve import shm
from ghostserve.config import Config


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run scenarios marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow scenario: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shm_prefix():
    prefix = f"gst{uuid.uuid4().hex[:8]}-"
    yield prefix
    for name in shm.list_names(prefix):
        shm.unlink(name)


@pytest.fixture
def daemon(tmp_path, shm_prefix):
    """A started ``Server``; ``.sock`` is its socket path, ``.registry`` its metrics."""
    from ghostserve.daemon.server import Server

    registry = CollectorRegistry()
    config = Config(socket=str(tmp_path / "gs.sock"), shm_prefix=shm_prefix, encode_threads=2)
    server = Server(config, registry)
    server.start()
    server.sock = config.socket
    server.registry = registry
    yield server
    server.stop(grace=1)


@pytest.fixture
def region(shm_prefix):
    """Factory: a zeroed shared-memory region of ``size`` bytes, named under the prefix."""
    made = []

    def make(size: int, tag: str = "") -> shm.Segment:
        seg = shm.Segment.create(f"{shm_prefix}{tag or uuid.uuid4().hex[:6]}", size)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()


def pid() -> int:
    return os.getpid()


def status_code(call, *args, **kwargs):
    """The gRPC status code a call is refused with: a raw stub's ``grpc.RpcError``,
    or the ghostserve error a client raises for it (whose class the test may check too)."""
    import grpc  # noqa: PLC0415

    from ghostserve.errors import GhostServeError  # noqa: PLC0415

    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    except GhostServeError as exc:
        assert exc.code, f"{exc!r} did not come from the daemon"
        return grpc.StatusCode[exc.code]
    raise AssertionError(f"{call} was not refused")


@pytest.fixture
def gpu_daemon(tmp_path, shm_prefix):
    """A started ``Server`` whose CUDA runtime is tests/cudasim.py's stand-in, with
    2 devices (no GPU here); ``.sock`` its socket, ``.sim`` the stand-in."""
    from cudasim import HostCuda

    from ghostserve.daemon.server import Server

    sim = HostCuda(devices=2)
    cfg = Config(socket=str(tmp_path / "gs.sock"), shm_prefix=shm_prefix, encode_threads=2)
    server = Server(cfg, CollectorRegistry(), cuda_runtime=sim)
    server.start()
    server.sock, server.sim = cfg.socket, sim
    yield server
    server.stop(grace=1)
