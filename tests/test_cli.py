"""The command line against real daemons: status (text, JSON, no daemon), demo,
bench dispatch, option checks and help, and Prometheus exposition over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ghostserve.client import WorkerClient
from ghostserve.config import Config
from ghostserve.metrics import metric_names

LAYOUT = dict(num_layers=1, num_blocks=4, block_bytes=512, chunk_bytes=512,
              layer_stride=2048, block_stride=512, offset=0)


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ghostserve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


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
    # 64-bit fields are JSON numbers, not the proto3 mapping's strings
    assert g["protected_step"] == 0 and g["protected_bytes"] == 2 * 512
    assert g["parity_bytes"] == 512 and g["watermarks"] == [{"request_id": "req-a", "tokens": 7}]
    assert [r["state"] for r in g["ranks"]] == ["alive", "alive"]
    assert all(isinstance(r["pid"], int) and r["pid"] > 0 for r in g["ranks"])
    table = cli("status", "--socket", daemon.sock)
    assert table.returncode == 0 and "grp" in table.stdout and "2+1" in table.stdout
    for c in clients:
        c.close()


def test_status_at_80_columns_cuts_nothing(daemon, region):
    """Long group and region names, big numbers: every value is shown whole
    (wrapped if need be) in an 80-column terminal."""
    group = "g" * 60 + "-end"
    segs = [region(2048, f"{'r' * 40}{r}") for r in range(2)]
    clients = [WorkerClient(daemon.sock, group, r, 2, 1, LAYOUT, segs[r].name, 2048) for r in range(2)]
    for c in clients:
        c.register()
    for step in range(3):
        for c in clients:
            c.commit(step, [(step, 0, 512)], {f"req-{step}": 100 + step})
    assert clients[0].wait_protected(2)
    out = cli("status", "--socket", daemon.sock, env=dict(os.environ, COLUMNS="80"))
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout and "..." not in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) <= 80
    flat = "".join(out.stdout.split())  # wrapped values joined up again
    assert group in flat and "2+1" in flat and "healthy" in flat
    for seg in segs:
        assert seg.name in flat
    assert "protectedstep2" in flat and "3withprotectedtokens" in flat
    for c in clients:
        c.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                          st.integers(-2**63, 2**63 - 1)), min_size=1, max_size=3))
def test_status_json_gives_every_integer_as_a_number(values):
    from ghostserve.status import to_json
    from ghostserve.v1 import ghostserve_pb2 as pb

    resp = pb.StatusResponse(version="x")
    for step, nbytes, rank, pid in values:
        g = resp.groups.add(group="g", protected_step=step, held_bytes=nbytes, parity_bytes=nbytes)
        g.ranks.add(rank=rank, pid=pid, committed_step=step)
        g.watermarks.add(request_id="r", tokens=nbytes)
        g.last_restore.restored_bytes = nbytes
    back = json.loads(json.dumps(to_json(resp)))
    for g, (step, nbytes, rank, pid) in zip(back["groups"], values, strict=True):
        assert g["protected_step"] == step and g["held_bytes"] == nbytes and g["parity_bytes"] == nbytes
        assert g["ranks"][0] == {"rank": rank, "state": "", "pid": pid, "committed_step": step, "region": "",
                                 "process_ended": False}
        assert g["watermarks"][0]["tokens"] == nbytes and g["last_restore"]["restored_bytes"] == nbytes
        assert g["lag_steps"] == 0 and isinstance(g["kv_bytes"], int)


def test_status_shows_an_ended_groups_age_and_bytes_held():
    from rich.console import Console

    from ghostserve.status import render
    from ghostserve.v1 import ghostserve_pb2 as pb

    resp = pb.StatusResponse(version="x")
    resp.groups.add(group="old", world_size=2, parity=1, state="ended", ended_seconds=192.4,
                    held_bytes=3 << 30, expires_seconds=707).ranks.add(rank=0, state="left")
    resp.groups.add(group="live", world_size=2, parity=1, state="healthy")
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(resp))
    text = console.export_text()
    assert "ended 3m 12s ago, holds 3.0 GiB, dropped in 11m 47s" in " ".join(text.split())
    assert "ended" not in text.split("live")[1]  # a live group has no such line
    assert "left" in text


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
    # bad values are usage errors: exit status 2, the option and the value named
    bad = cli("demo", "--json", "--kill", "one@two")
    assert bad.returncode == 2 and json.loads(bad.stdout)["type"] == "EngineConfigError"
    bad = cli("demo", "--json", *SMALL_DEMO, "--kill", "1@12")  # 2 x 6 tokens: never reached
    assert bad.returncode == 2 and "generates only 12" in json.loads(bad.stdout)["error"]
    bad = cli("demo", "--tp", "3")
    assert bad.returncode == 2 and "TP 3 must divide" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (("--parity", "0"), "--parity 0: must be in 1..4"),
    (("--tp", "2", "--parity", "3"), "--parity 3: must be in 1..2"),
    (("--tp", "0"), "--tp 0: must be >= 1"),
    (("--new-tokens", "0"), "--new-tokens 0: must be >= 1"),
    (("--modes", "ec,fast"), "unknown mode 'fast'"),
])
def test_demo_names_the_bad_value(args, message):
    out = cli("demo", "--json", *args, timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in json.loads(out.stdout)["error"] and message in out.stderr


def test_demo_modes_accept_recompute_and_none():
    from ghostserve.demo_options import parse_modes

    assert parse_modes("recompute,ec") == parse_modes("none,ec") == ["none", "ec"]
    assert parse_modes("ec") == ["none", "ec"]  # the reference always runs, first
    assert parse_modes("ec,replicate,recompute") == ["none", "replicate", "ec"]


def test_bench_dispatch_errors():
    out = cli("bench", "nope")
    assert out.returncode == 2 and "checkpoint" in out.stderr


def test_serve_refuses_bad_configuration(tmp_path):
    out = cli("serve", "--socket", str(tmp_path / "s.sock"), "--listen", "10.0.0.1:5000", "--insecure", timeout=30)
    assert out.returncode == 2 and "non-loopback" in out.stderr


def test_serve_refuses_missing_tls_files_and_leaves_nothing(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not really a certificate")
    sock = tmp_path / "run" / "gs.sock"
    for c, k in ((tmp_path / "nope.pem", cert), (cert, tmp_path / "nokey.pem"), (cert, tmp_path)):
        out = cli("serve", "--socket", str(sock), "--listen", f"127.0.0.1:{free_port()}", "--tls-cert", str(c),
                  "--tls-key", str(k), timeout=30)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert "configuration error: tls_" in out.stderr and (str(c) if c != cert else str(k)) in out.stderr
        assert not (tmp_path / "run").exists()  # no socket, no directory


def test_log_level_lists_the_allowed_values(tmp_path):
    out = cli("serve", "--socket", str(tmp_path / "s.sock"), "--log-level", "verbose", timeout=30)
    assert out.returncode == 2
    assert "'verbose': choose one of debug, info, warning, error" in out.stderr
    env = dict(os.environ, GHOSTSERVE_LOG_LEVEL="loud")
    out = cli("serve", "--socket", str(tmp_path / "s.sock"), env=env, timeout=30)
    assert out.returncode == 2 and "'loud': choose one of debug, info, warning, error" in out.stderr


def _subcommands():
    from ghostserve.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("name", ["serve", "status", "drop", "chaos", "demo", "bench"])
def test_every_option_has_help_and_shows_its_default(name):
    import argparse

    p = _subcommands()[name]
    text = " ".join(p.format_help().split())
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.dest} has no help"
        d = action.default
        if action.option_strings and d is not None and d is not False and d not in ("", []):
            assert f"(default: {action.default})" in text, f"{name} {action.dest}: default not shown"
    assert "(default: None)" not in text


def test_unexpected_error_with_json_is_still_one_object(tmp_path):
    (tmp_path / "boom.py").write_text("def main(argv):\n    raise RuntimeError('boom ' + ' '.join(argv))\n")
    out = cli("bench", "boom", "--json", env=dict(os.environ, GHOSTSERVE_BENCHMARKS=str(tmp_path)))
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"ok": False, "error": "boom --json", "type": "RuntimeError"}
    assert "Traceback" in out.stderr and "RuntimeError: boom" in out.stderr


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


def test_status_and_drop_read_only_the_socket_from_the_environment(daemon):
    # settings only the daemon reads (a TLS file of its container, a bad log level) do not matter here
    env = dict(os.environ, GHOSTSERVE_SOCKET=daemon.sock, GHOSTSERVE_TLS_CERT="/nonexistent.pem",
               GHOSTSERVE_TLS_KEY="/nonexistent.key", GHOSTSERVE_LOG_LEVEL="loud")
    out = cli("status", "--json", env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["groups"] == []
    out = cli("drop", "nothing-here", "--json", env=env, timeout=30)
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == "NOT_FOUND"


def test_refusals_are_logged_as_docs_operations_says(tmp_path, shm_prefix):
    """docs/operations.md: each refusal at WARNING with method, message and code."""

    from ghostserve.client import OperatorClient
    from ghostserve.errors import UnknownGroup

    sock = str(tmp_path / "r.sock")
    proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "serve", "--socket", sock, "--shm-prefix",
                             shm_prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        with pytest.raises(UnknownGroup):
            OperatorClient(sock).status("nope")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "WARNING ghostserve.daemon: refused Status: unknown group 'nope' (NOT_FOUND)" in err


def test_a_command_line_that_does_not_parse_still_answers_json():
    out = cli("chaos", "--json", "--kill", "one", timeout=30)
    assert out.returncode == 2
    assert json.loads(out.stdout) == {"ok": False, "type": "UsageError",
                                      "error": "argument --kill: 'one': expected RANK@STEP, e.g. 1@20"}
    assert "usage: ghostserve chaos" in out.stderr
    out = cli("status", "--watch", "soon", timeout=30)  # without --json: argparse's own message only
    assert out.returncode == 2 and out.stdout == "" and "invalid float value: 'soon'" in out.stderr
