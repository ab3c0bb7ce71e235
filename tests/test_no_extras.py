"""``pip install ghostserve`` without extras: the daemon, status, drop, chaos and
every ``--help`` work without torch; demo and the engine benchmarks say in one
line which extra they need.

CI installs every extra (bin/setup), so a no-extras install is simulated: a
``sitecustomize`` on PYTHONPATH installs a meta-path finder that raises
ModuleNotFoundError for torch and vllm, as an environment without them would.
It stands in for the no-extras install; every process the CLI starts (daemon,
chaos workers) inherits it through the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ghostserve import shm
from ghostserve.client import OperatorClient, WorkerClient

SITECUSTOMIZE = '''
import importlib.abc
import sys


class NoExtras(importlib.abc.MetaPathFinder):
    """torch and vllm are not installed (a no-extras ghostserve install)."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "vllm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoExtras())
'''

LAYOUT = dict(num_layers=1, num_blocks=4, block_bytes=512, chunk_bytes=512,
              layer_stride=2048, block_stride=512, offset=0)
COMMANDS = ("serve", "status", "drop", "chaos", "demo", "bench")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("no-extras")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, COLUMNS="120")


def cli(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ghostserve", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_the_stand_in_really_hides_torch(env):
    out = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 1 and "No module named 'torch'" in out.stderr


def test_daemon_client_codec_and_cli_do_not_import_torch():
    code = ("import sys, ghostserve.daemon.server, ghostserve.client, ghostserve.codec, ghostserve.cli\n"
            "ghostserve.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'mooncake')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_of_every_command(env):
    top = cli(env, "--help")
    assert top.returncode == 0, top.stderr
    for command in COMMANDS:
        assert command in top.stdout
        out = cli(env, command, "--help")
        assert out.returncode == 0, (command, out.stderr)
        assert out.stdout.startswith(f"usage: ghostserve {command}")


def test_serve_status_and_drop(env, tmp_path):
    prefix = f"gsn{uuid.uuid4().hex[:8]}-"
    sock = str(tmp_path / "gs.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "ghostserve", "serve", "--socket", sock, "--shm-prefix",
                               prefix, "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
    seg = None
    try:
        line = daemon.stdout.readline()
        assert line.startswith("ready"), daemon.stderr.read() if daemon.poll() is not None else line
        with grpc.insecure_channel("unix:" + sock) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=10, wait_for_ready=True)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # a group whose only rank is gone: status shows it, drop forgets it
        seg = shm.Segment.create(f"{prefix}kv0", 2048)
        worker = WorkerClient(sock, "solo", 0, 1, 1, LAYOUT, seg.name, 2048, reconnect=False)
        worker.register()
        worker.commit(0, [(0, 0, 512)], {"r": 1})
        assert worker.wait_protected(0)
        worker.close()
        op = OperatorClient(sock)
        deadline = time.monotonic() + 10
        while op.status("solo").groups[0].ranks[0].state == "alive" and time.monotonic() < deadline:
            time.sleep(0.02)
        status = cli(env, "status", "--socket", sock)
        assert status.returncode == 0, status.stderr
        assert "solo" in status.stdout and "1+1" in status.stdout
        as_json = cli(env, "status", "--socket", sock, "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["groups"][0]["group"] == "solo"
        drop = cli(env, "drop", "solo", "--socket", sock, "--json")
        assert drop.returncode == 0, drop.stderr
        assert json.loads(drop.stdout)["ok"] is True
        assert op.status().groups == []
    finally:
        daemon.terminate()
        daemon.wait(timeout=20)
        if seg is not None:
            seg.close()
        for name in shm.list_names(prefix):
            shm.unlink(name)


def test_chaos_runs(env):
    out = cli(env, "chaos", "--json", "--steps", "14", "--kill", "1@6", "--corrupt", "2@9", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["ok"] is True and result["final_verified_bytes"] > 0
    assert [f["kind"] for f in result["faults"]] == ["kill", "corrupt"]


@pytest.mark.parametrize("args, extra", [
    (("demo",), "engine"),
    (("demo", "--json", "--tp", "2"), "engine"),
    (("bench", "serving", "--quick"), "engine"),
    (("bench", "vllm_resume", "--quick"), "vllm"),
])
def test_engine_commands_name_the_extra_in_one_line(env, args, extra):
    out = cli(env, *args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"pip install 'ghostserve[{extra}]'" in lines[0]
    if "--json" in args:
        assert json.loads(out.stdout)["ok"] is False
    else:
        assert out.stdout == ""


def test_the_dockerfile_smoke_check_passes_without_torch(env, tmp_path):
    """deploy/Dockerfile's build step installs without extras and then runs a smoke
    check; its commands (everything after the pip installs) must pass here too."""
    text = (Path(__file__).resolve().parents[1] / "deploy" / "Dockerfile").read_text()
    run = next(block for block in text.replace("\\\n", " ").splitlines()
               if block.startswith("RUN") and "pip install" in block)
    steps = [s.strip() for s in run[len("RUN"):].split("&&")]
    checks = [s for s in steps if not s.startswith("pip ")]
    assert any(s.startswith("python -c") for s in checks) and any("ghostserve" in s for s in checks)
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, command in (("python", f'"{sys.executable}"'), ("ghostserve", f'"{sys.executable}" -m ghostserve')):
        (shims / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')  # this venv's, as the image's
        (shims / name).chmod(0o755)
    shell_env = dict(env, PATH=f"{shims}{os.pathsep}{env['PATH']}")
    out = subprocess.run(["sh", "-c", " && ".join(checks)], capture_output=True, text=True, env=shell_env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
