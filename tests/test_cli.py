"""The command line against real daemons: status (table, JSON, no daemon), demo,
bench dispatch, and Prometheus exposition over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ghostserve.client import WorkerClient
from ghostserve.config import Config
from ghostserve.metrics import metric_names

LAYOUT = dict(num_layers=1, num_blocks=4, block_bytes=512, chunk_bytes=512,
              layer_stride=2048, block_stride=512, offset=0)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ghostserve", *args], capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_json_and_table_against_a_live_daemon(daemon, region):
    segs = [region(2048, f"s{r}") for r in range(2)]
    clients = [WorkerClient(daemon.sock, "grp", r, 2, 1, LAYOUT, segs[r].name, 2048) for r in range(2)]
    for c in clients:
        c.register()
    for c in clients:
        c.commit(0, [(1, 0, 512)], {"req-a": 7})
    assert clients[0].wait_protected(0)
    out = cli("status", "--socket", daemon.sock, "--json")
    assert out.returncode == 0, out.stderr
    g = json.loads(out.stdout)["groups"][0]
    assert (g["group"], g["world_size"], g["parity"], g["state"]) == ("grp", 2, 1, "healthy")
    assert int(g["protected_step"]) == 0 and int(g["protected_bytes"]) == 2 * 512
    assert int(g["parity_bytes"]) == 512 and g["watermarks"] == [{"request_id": "req-a", "tokens": "7"}]
    assert [r["state"] for r in g["ranks"]] == ["alive", "alive"]
    table = cli("status", "--socket", daemon.sock)
    assert table.returncode == 0 and "grp" in table.stdout and "2+1" in table.stdout
    for c in clients:
        c.close()


def test_status_without_a_daemon_says_so(tmp_path):
    out = cli("status", "--socket", str(tmp_path / "none.sock"), "--json", timeout=30)
    assert out.returncode == 1
    assert "no ghostserve daemon answers" in json.loads(out.stdout)["error"]


SMALL_DEMO = ("--tp", "2", "--requests", "2", "--prompt-tokens", "40", "--new-tokens", "6", "--rounds", "1")


def test_demo_json_is_one_object_with_the_promised_keys():
    out = cli("demo", "--json", *SMALL_DEMO, "--kill", "1@4", "--kill", "0@8", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["tokens_identical"] is True
    assert set(d["recovery_seconds"]) == {"ec", "replicate", "recompute"}
    assert set(d["step_overhead"]) == set(d["host_bytes"]) == {"ec", "replicate"}
    assert d["rejoin_seconds"] > 0 and d["kv_bytes"] > 0
    assert d["host_bytes"]["ec"] * 2 == d["kv_bytes"] and d["host_bytes"]["replicate"] >= d["kv_bytes"]
    assert d["recomputed_tokens"]["recompute"] == d["held_tokens"]["recompute"] > 0
    assert d["recomputed_tokens"]["ec"] < d["held_tokens"]["ec"]
    assert [len(v) for v in d["failures"].values()] == [2, 2, 2]


def test_demo_table_and_bad_arguments():
    out = cli("demo", *SMALL_DEMO, "--modes", "ec", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens identical" in out.stdout and "ec 2+1" in out.stdout and "recompute" in out.stdout
    bad = cli("demo", "--json", "--kill", "one@two")
    assert bad.returncode == 1 and json.loads(bad.stdout)["type"] == "EngineConfigError"
    bad = cli("demo", "--json", *SMALL_DEMO, "--kill", "1@12")  # 2 x 6 tokens: never reached
    assert bad.returncode == 1 and "generates only 12" in json.loads(bad.stdout)["error"]
    bad = cli("demo", "--tp", "3")
    assert bad.returncode == 1 and "TP 3 must divide" in bad.stderr


def test_bench_dispatch_errors():
    out = cli("bench", "nope")
    assert out.returncode == 2 and "checkpoint" in out.stderr


def test_serve_refuses_bad_configuration(tmp_path):
    out = cli("serve", "--socket", str(tmp_path / "s.sock"), "--listen", "10.0.0.1:5000", "--insecure", timeout=30)
    assert out.returncode == 2 and "non-loopback" in out.stderr


def test_metrics_are_exposed_over_http(tmp_path, shm_prefix, region):
    from ghostserve.daemon.server import Server

    port = free_port()
    server = Server(Config(socket=str(tmp_path / "m.sock"), shm_prefix=shm_prefix, metrics_port=port,
                           metrics_host="127.0.0.1"), CollectorRegistry())
    server.start()
    try:
        segs = [region(2048, f"m{r}") for r in range(2)]
        clients = [WorkerClient(server.config.socket, "mg", r, 2, 1, LAYOUT, segs[r].name, 2048) for r in range(2)]
        for c in clients:
            c.register()
        segs[0].array()[:] = np.arange(2048) % 251
        for c in clients:
            c.commit(0, [(0, 0, 512), (2, 0, 512)], {})
        assert clients[0].wait_protected(0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples
                   if s.labels.get("group") == "mg"}
        assert samples["ghostserve_encoded_bytes_total"].value == 2 * 512 * 2
        assert samples["ghostserve_protected_bytes"].value == 2 * 512 * 2
        assert samples["ghostserve_parity_bytes"].value == 2 * 512
        assert samples["ghostserve_checkpoint_lag_steps"].value == 0
        exported = {s.name for f in text_string_to_metric_families(body) for s in f.samples}
        assert {n for n in exported if n.startswith("ghostserve_")} <= metric_names()
        for c in clients:
            c.close()
    finally:
        server.stop(grace=1)


@pytest.mark.skipif(not os.path.exists("/dev/shm"), reason="needs /dev/shm")
def test_shm_prefix_from_environment(tmp_path):
    env = dict(os.environ, GHOSTSERVE_SHM_PREFIX="bad/prefix")
    out = subprocess.run([sys.executable, "-m", "ghostserve", "serve", "--socket", str(tmp_path / "e.sock")],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2 and "shm_prefix" in out.stderr


def test_sigterm_drains_keeps_parity_and_tcp_loopback_works(tmp_path, shm_prefix, region):
    import signal
    import time

    from ghostserve import shm
    from ghostserve.client import OperatorClient

    sock, port = str(tmp_path / "t.sock"), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "serve", "--socket", sock, "--shm-prefix",
                             shm_prefix, "--listen", f"127.0.0.1:{port}", "--insecure"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        segs = [region(2048, f"t{r}") for r in range(2)]
        clients = [WorkerClient(sock, "tg", r, 2, 1, LAYOUT, segs[r].name, 2048) for r in range(2)]
        for c in clients:
            c.register()
            c.commit(0, [(0, 0, 512)], {})
        assert clients[0].wait_protected(0)
        tcp = OperatorClient(f"127.0.0.1:{port}")
        assert tcp.healthy() and tcp.status().groups[0].group == "tg"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - start < 4.5  # streams are ended, not waited out (grace is 5 s)
        assert not os.path.exists(sock)
        assert shm.exists(f"{shm_prefix}tg.parity") and shm.exists(f"{shm_prefix}tg.meta")
        for c in clients:
            c.reconnect = False
            c.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_status_watch_refreshes(daemon):
    proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "status", "--socket", daemon.sock,
                             "--watch", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        for line in proc.stdout:
            seen += "group(s)" in line
            if seen >= 3:
                break
        assert seen >= 3
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs the openssl command")
def test_tls_on_tcp(tmp_path, shm_prefix):
    import grpc

    from ghostserve.client import operator_stub
    from ghostserve.daemon.server import Server
    from ghostserve.v1 import ghostserve_pb2 as pb

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = Server(Config(socket=str(tmp_path / "tls.sock"), shm_prefix=shm_prefix, listen=f"127.0.0.1:{port}",
                           tls_cert=str(cert), tls_key=str(key)), CollectorRegistry())
    server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        secure = grpc.secure_channel(f"127.0.0.1:{port}", creds)
        assert operator_stub(secure).Status(pb.StatusRequest(), timeout=10).version
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):
            operator_stub(plain).Status(pb.StatusRequest(), timeout=3)
    finally:
        server.stop(grace=1)
