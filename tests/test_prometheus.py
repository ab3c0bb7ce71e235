"""The monitoring side against a real Prometheus server (Debian's ``prometheus``
package; ``.ci/run`` installs it). Prometheus scrapes a daemon while a chaos run
kills a rank, corrupts a survivor and restarts the daemon; then every dashboard
query and every alert expression is evaluated through Prometheus' HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ghostserve.chaos.harness import Chaos
from ghostserve.chaos.workload import Shape

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus is not installed here (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params) -> dict:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def grafana_to_promql(expr: str) -> str:
    """Fill in the dashboard's Grafana variables as Grafana would for 'All'."""
    expr = expr.replace("$__rate_interval", "10s").replace("$__range", "2m").replace("$__interval", "2s")
    return re.sub(r"\$\{?(instance|group)\}?", ".*", expr)


@pytest.fixture
def prometheus(tmp_path):
    metrics_port, web_port = free_port(), free_port()
    config = (ROOT / "deploy/prometheus/prometheus-local.yml").read_text()
    config = config.replace("__TARGET__", f"127.0.0.1:{metrics_port}")
    config += f"rule_files:\n  - {ROOT / 'deploy/prometheus/alerts.yml'}\n"
    (tmp_path / "prom.yml").write_text(config)
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prom.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{web_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "wb"))
    base = f"http://127.0.0.1:{web_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(base + "/-/ready", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()[-2000:]
            time.sleep(0.2)
    yield base, metrics_port
    proc.terminate()
    proc.wait(timeout=10)


def test_dashboard_and_alerts_return_data_from_a_real_prometheus(prometheus):
    base, metrics_port = prometheus
    marks: dict[str, float] = {}

    def progress(done: int, total: int) -> None:
        if done == 1:  # faults only once Prometheus is scraping the daemon
            deadline = time.monotonic() + 30
            while not api(base, "query", query='up{job="ghostserve"} == 1')["data"]["result"]:
                assert time.monotonic() < deadline, "Prometheus never scraped the daemon"
                time.sleep(0.2)
            marks["start"] = time.time()
        if done in (130, 150):  # after the daemon restart: refused requests, in two bursts
            from ghostserve.client import channel, worker_stub
            from ghostserve.v1 import ghostserve_pb2 as pb
            stub = worker_stub(channel(chaos.socket))
            for _ in range(20):
                try:
                    stub.Register(pb.RegisterRequest(group="bad/name"), timeout=5)
                except Exception:
                    pass
        if done == total:
            marks["end"] = time.time()
            time.sleep(2.5)  # let Prometheus scrape the final state before the daemon stops

    chaos = Chaos(Shape(steps=160, parity=2), kills=[(1, 110)], corrupts=[(2, 90)], daemon_kills=[40],
                  metrics_port=metrics_port, progress=progress, recover_after=2.5, step_seconds=0.05)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("r", chaos.run()))
    runner.start()
    runner.join(timeout=240)
    r = result["r"]
    assert r.ok and r.corruption_detected >= 1 and len(r.recovery_seconds) == 1, r
    at = marks["end"] + 2

    # every dashboard query returns data
    dashboard = json.loads((ROOT / "deploy/grafana/dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert len(exprs) >= 10
    for expr in exprs:
        answer = api(base, "query", query=grafana_to_promql(expr), time=at)
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["result"], f"no data for dashboard query {expr}"

    # the restore shows up in the counters
    restores = api(base, "query", query='ghostserve_restores_total{outcome="ok"}', time=at)
    assert float(restores["data"]["result"][0]["value"][1]) >= 1
    failures = api(base, "query", query="ghostserve_failures_total", time=at)
    assert {s["metric"]["kind"] for s in failures["data"]["result"]} >= {"stream_closed"} or \
        {s["metric"]["kind"] for s in failures["data"]["result"]} >= {"pid_gone"}

    # every alert expression evaluates; the ones this run provokes fire at some point
    provoked = {"GhostserveDown", "GhostserveGroupDegraded", "GhostserveCorruptionDetected",
                "GhostserveRankLost", "GhostserveRequestsRejected"}
    import yaml

    rules = [rule for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
             for rule in g["rules"]]
    fired = set()
    for rule in rules:
        answer = api(base, "query_range", query=rule["expr"], start=marks["start"] - 5, end=at, step="0.5")
        assert answer["status"] == "success", (rule["alert"], answer)
        if answer["data"]["result"]:
            fired.add(rule["alert"])
    assert provoked & {r["alert"] for r in rules} <= fired, f"fired: {fired}"
