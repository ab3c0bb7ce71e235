"""The daemon's CUDA path end to end, on a real GPU (``gpu``-marked: bin/gpu-check
runs it; skipped without CuPy and a CUDA device).

Worker **processes** (tests/gpu_worker.py) hold their KV in torch CUDA tensors in
FlashAttention's layout, export it over CUDA IPC with the connector's own code
(ghostserve.integrations.gpukv) and commit with interprocess events; the real
daemon (CupyRuntime, the kernels, pinned parity) protects it. Then: SIGKILL a
worker, a replacement process restores its rank; SIGKILL the engine, a new
engine's workers fetch every rank's blocks (the lost one rebuilt from parity).
Every restored and fetched block is compared with the original by digest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ghostserve.client import OperatorClient
from ghostserve.codec.backends import cuda_device_present
from ghostserve.config import Config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_device_present(), reason="needs CuPy and a CUDA device")]

WORKER = Path(__file__).with_name("gpu_worker.py")
N, M = 3, 1


def start(sock, group, rank, mode, out, *extra, layout="flash-attn"):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]),
           "GS_LAYOUT": layout}
    return subprocess.Popen([sys.executable, str(WORKER), sock, group, str(rank), str(N), str(M), mode, str(out),
                             *extra], stdin=subprocess.PIPE, env=env)


def result(proc, out, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while not out.exists():  # the worker writes it once, atomically
        assert proc.poll() is None, f"worker exited {proc.returncode}"
        assert time.monotonic() < deadline, "worker too slow"
        time.sleep(0.05)
    return json.loads(out.read_text())


@pytest.fixture
def cuda_daemon(tmp_path, shm_prefix):
    from ghostserve.daemon.server import Server  # noqa: PLC0415

    cfg = Config(socket=str(tmp_path / "gs.sock"), shm_prefix=shm_prefix, encode_threads=2)
    server = Server(cfg, CollectorRegistry())  # the real CUDA runtime (CuPy)
    server.start()
    server.sock = cfg.socket
    yield server
    server.stop(grace=1)


# K and V apart and permuted (FlashAttention, HND), and side by side (FlashInfer): the
# other two are the same code (tests/test_gpukv.py checks all four on the CPU); each
# case starts 7 worker processes, and bin/gpu-check has minutes
@pytest.mark.parametrize("layout", ["flash-attn-hnd", "flashinfer"])
def test_worker_processes_kv_restored_and_fetched_byte_exact(cuda_daemon, tmp_path, layout):
    """vLLM's GPU KV layouts, viewed as vLLM views them, through the connector's export."""
    d = cuda_daemon
    op = OperatorClient(d.sock)
    g = f"gpu-{uuid.uuid4().hex[:6]}"
    procs, outs = [], []
    try:
        for q in range(N):
            outs.append(tmp_path / f"r{q}.json")
            procs.append(start(d.sock, g, q, "commit", outs[q], layout=layout))
        before = [result(p, o) for p, o in zip(procs, outs, strict=True)]
        assert all("error" not in r for r in before), before
        status = op.status(g).groups[0]
        assert status.protected_step == 3 and status.state == "healthy"
        # a worker dies; a replacement process restores its rank on the GPU
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        op.wait_ranks(g, {1: "lost"}, 10)
        out = tmp_path / "r1-restored.json"
        procs[1] = start(d.sock, g, 1, "restore", out, layout=layout)
        restored = result(procs[1], out)
        assert restored["unrecoverable"] == [] and restored["restored_bytes"] > 0
        assert restored["digests"] == before[1]["digests"]
        # the engine dies (rank 1 first, so it is the lost one); a new engine fetches
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        op.wait_ranks(g, {1: "lost"}, 10)
        for q in (0, 2):
            procs[q].send_signal(signal.SIGKILL)
            procs[q].wait()
        op.wait_ended(g, 10)
        g2 = f"gpu2-{uuid.uuid4().hex[:6]}"
        fetchers = [start(d.sock, g2, q, "fetch", tmp_path / f"f{q}.json", g, layout=layout) for q in range(N)]
        procs += fetchers
        got = [result(p, tmp_path / f"f{q}.json") for q, p in enumerate(fetchers)]
        for q in range(N):
            assert got[q]["unrecoverable"] == [] and got[q]["fetched_bytes"] > 0, got[q]
            assert got[q]["rebuilt"] == (q == 1)
            assert got[q]["digests"] == before[q]["digests"], q
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
