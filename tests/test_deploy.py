"""deploy/: manifests parse; Kubernetes objects validate offline against the API
schema (the official client's models) with no unknown fields; the pods are wired
the way the daemon needs (socket, /dev/shm, pids, UID, probes, ports); the metrics
Service and ServiceMonitor select each other; the dashboard and the alert rules
use only metrics the daemon exports; the health check of the image and of the
probes answers against a live daemon; the systemd unit is hardened and valid.

Needs PyYAML (skipped without it); the schema checks need the ``kubernetes``
client; promtool and systemd-analyze checks run where those tools are installed.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ghostserve.metrics import Metrics, metric_names

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
UNIT = DEPLOY / "systemd" / "ghostserve.service"
OPERATIONS = ROOT / "docs" / "operations.md"

EXPECTED = [
    "Dockerfile",
    "kubernetes/vllm-pod-sidecar.yaml",
    "kubernetes/daemonset.yaml",
    "kubernetes/servicemonitor.yaml",
    "prometheus/prometheus.yml",
    "prometheus/prometheus-local.yml",
    "prometheus/alerts.yml",
    "grafana/dashboard.json",
    "grafana/provisioning/dashboards/ghostserve.yaml",
    "grafana/provisioning/datasources/prometheus.yaml",
    "systemd/ghostserve.service",
]
BUILTIN_METRICS = {"up"}
TARGET_LABELS = {"job", "instance", "node", "pod", "namespace", "service", "container", "endpoint"}
GIB = 1 << 30


# ------------------------------------------------------------------ helpers


def _structured_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _load(path: Path) -> list:
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text)]
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d.get('kind')}/{d['metadata']['name']}", d)
            for p in sorted(K8S.glob("*.yaml")) for d in _load(p)]


def _kind(kind: str) -> list[dict]:
    return [d for _, d in _k8s_docs() if d["kind"] == kind]


def _workloads() -> list[dict]:
    return [d for _, d in _k8s_docs() if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


@functools.cache
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _healthcheck_command() -> list[str]:
    (args,) = [a for ins, a in _dockerfile() if ins == "HEALTHCHECK"]
    cmd = json.loads(args[args.index("CMD") + 3:].strip())
    assert isinstance(cmd, list), "HEALTHCHECK should use the exec (JSON) form"
    return cmd


def _image_uid() -> int:
    args = dict(a.split("=", 1) for ins, a in _dockerfile() if ins == "ARG" and "=" in a)
    (user,) = [a for ins, a in _dockerfile() if ins == "USER"]
    uid = user.split(":")[0]
    m = re.fullmatch(r"\$\{?(\w+)\}?", uid)
    return int(args[m.group(1)] if m else uid)


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def _ghostserve(pod: dict) -> dict:
    (c,) = [c for c in _containers(pod) if c["name"] == "ghostserve"]
    return c


def _flag(container: dict, name: str) -> str | None:
    for arg in container.get("args", []):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _env(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def _mount(container: dict, path: str) -> str | None:
    return next((m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == path), None)


def _uid(pod: dict, container: dict) -> int | None:
    return container.get("securityContext", {}).get("runAsUser",
                                                    pod.get("securityContext", {}).get("runAsUser"))


def _quantity(q: str) -> float:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i|[kMGT])?", str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


# ------------------------------------------------------------------ parsing


def test_expected_files_exist():
    missing = [f for f in EXPECTED if not (DEPLOY / f).is_file()]
    assert not missing, f"missing under deploy/: {missing}"
    assert (ROOT / ".dockerignore").is_file()
    assert OPERATIONS.is_file()


@pytest.mark.parametrize("path", _structured_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_and_json_parses(path):
    docs = _load(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document is a mapping"


# ------------------------------------------------------- Kubernetes: schema

BUILTIN_GROUPS = {"core", "apps", "batch", "policy", "autoscaling"}


def _is_builtin(api_version: str) -> bool:
    group = api_version.split("/")[0] if "/" in api_version else "core"
    return group in BUILTIN_GROUPS or group.endswith(".k8s.io")


def _model_name(api_version: str, kind: str) -> str:
    version = api_version.rsplit("/", 1)[-1]
    return version[0].upper() + version[1:] + kind  # apps/v1 Deployment -> V1Deployment


@pytest.fixture(scope="module")
def k8s():
    return pytest.importorskip("kubernetes")


def _deserialize(api, doc: dict, model: str):
    """``ApiClient.deserialize`` as if ``doc`` were a response of the API server."""
    text = json.dumps(doc)
    if "response_text" in inspect.signature(api.deserialize).parameters:  # pydantic-based clients
        return api.deserialize(text, model, "application/json")

    class FakeResponse:  # what older clients read off a urllib3 response
        data = text

    return api.deserialize(FakeResponse(), model)


def _lost(given, parsed, path: str = "") -> list[str]:
    """Paths of ``given`` that did not survive a round trip through the model:
    unknown fields (dropped by the model) and values it changed."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return [f"{path or '/'}: not an object"]
        out = []
        for key, value in given.items():
            if key not in parsed:
                out.append(f"{path}.{key} (unknown field)")
            else:
                out += _lost(value, parsed[key], f"{path}.{key}")
        return out
    if isinstance(given, list):
        if not isinstance(parsed, list) or len(parsed) != len(given):
            return [f"{path}: list changed"]
        return [p for i, (g, q) in enumerate(zip(given, parsed, strict=True)) for p in _lost(g, q, f"{path}[{i}]")]
    return [] if given == parsed else [f"{path}: {given!r} became {parsed!r}"]


def _string_maps(doc, path: str = "") -> list[str]:
    """Labels, annotations, selectors and env values must be strings (YAML turns
    `true` or `4` into other types, which the API server refuses)."""
    bad = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{path}.{key}"
            if key in ("labels", "annotations", "matchLabels", "nodeSelector") and isinstance(value, dict):
                bad += [f"{here}.{k}" for k, v in value.items() if not isinstance(v, str)]
            elif key == "selector" and isinstance(value, dict) and "matchLabels" not in value:
                bad += [f"{here}.{k}" for k, v in value.items() if not isinstance(v, (str, dict, list))]
            elif key == "env" and isinstance(value, list):
                bad += [f"{here}.{e.get('name')}" for e in value if "value" in e and not isinstance(e["value"], str)]
            bad += _string_maps(value, here)
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            bad += _string_maps(item, f"{path}[{i}]")
    return bad


@pytest.mark.parametrize("name,doc", _k8s_docs(), ids=[n for n, _ in _k8s_docs()])
def test_kubernetes_object_matches_api_schema(k8s, name, doc):
    assert {"apiVersion", "kind", "metadata"} <= doc.keys()
    assert not _string_maps(doc), f"{name}: non-string values: {_string_maps(doc)}"
    if not _is_builtin(doc["apiVersion"]):
        _check_custom_resource(k8s, doc)
        return
    model = _model_name(doc["apiVersion"], doc["kind"])
    assert hasattr(k8s.client, model), f"{name}: the kubernetes client has no model {model}"
    api = k8s.client.ApiClient()
    obj = _deserialize(api, doc, model)
    assert type(obj).__name__ == model
    back = api.sanitize_for_serialization(obj)
    lost = _lost(doc, back)
    assert not lost, f"{name}: not in the {model} schema: {lost}"


def test_schema_check_catches_unknown_fields(k8s):
    """The round trip above is what finds a misspelt field: make sure it does."""
    (doc,) = [d for d in _workloads() if d["kind"] == "Deployment"]
    bad = json.loads(json.dumps(doc))
    bad["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    bad["spec"]["template"]["spec"]["shareProcessNamespaces"] = True
    api = k8s.client.ApiClient()
    lost = _lost(bad, api.sanitize_for_serialization(_deserialize(api, bad, "V1Deployment")))
    assert any("restartPolicyy" in p for p in lost) and any("shareProcessNamespaces" in p for p in lost)


# ServiceMonitor fields of the monitoring.coreos.com/v1 CRD (prometheus-operator).
SERVICEMONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "endpoints", "fallbackScrapeProtocol", "jobLabel",
    "keepDroppedTargets", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "namespaceSelector", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
    "podTargetLabels", "sampleLimit", "scrapeClass", "scrapeClassicHistograms",
    "scrapeProtocols", "selector", "selectorMechanism", "targetLabels", "targetLimit",
}
SERVICEMONITOR_ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2",
    "filterRunning", "followRedirects", "honorLabels", "honorTimestamps", "interval",
    "metricRelabelings", "noProxy", "oauth2", "params", "path", "port", "proxyConnectHeader",
    "proxyFromEnvironment", "proxyUrl", "relabelings", "scheme", "scrapeTimeout", "targetPort",
    "tlsConfig", "trackTimestampsStaleness",
}
RELABEL = {"action", "modulus", "regex", "replacement", "separator", "sourceLabels", "targetLabel"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def _check_custom_resource(k8s, doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor", \
        f"no structural check for custom resource {doc['apiVersion']} {doc['kind']}"
    api = k8s.client.ApiClient()
    meta = doc["metadata"]
    assert not _lost(meta, api.sanitize_for_serialization(_deserialize(api, meta, "V1ObjectMeta")))
    spec = doc["spec"]
    assert spec.keys() <= SERVICEMONITOR_SPEC, f"unknown ServiceMonitor fields {spec.keys() - SERVICEMONITOR_SPEC}"
    selector = spec["selector"]
    assert not _lost(selector, api.sanitize_for_serialization(_deserialize(api, selector, "V1LabelSelector")))
    assert spec["endpoints"], "a ServiceMonitor needs endpoints"
    for ep in spec["endpoints"]:
        assert ep.keys() <= SERVICEMONITOR_ENDPOINT, f"unknown endpoint fields {ep.keys() - SERVICEMONITOR_ENDPOINT}"
        assert isinstance(ep.get("port"), str), "endpoints[].port is a Service port name"
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                assert DURATION.match(ep[key]), f"{key}: {ep[key]!r} is not a Prometheus duration"
        for rule in ep.get("relabelings", []) + ep.get("metricRelabelings", []):
            assert rule.keys() <= RELABEL, f"unknown relabel fields {rule.keys() - RELABEL}"


# ------------------------------------------------------- Kubernetes: wiring


def test_pods_mount_only_declared_volumes():
    for wl in _workloads():
        pod = wl["spec"]["template"]["spec"]
        declared = {v["name"] for v in pod.get("volumes", [])}
        for c in _containers(pod):
            used = {m["name"] for m in c.get("volumeMounts", [])}
            assert used <= declared, f"{wl['metadata']['name']}/{c['name']}: undeclared {used - declared}"
        labels = wl["spec"]["template"]["metadata"]["labels"]
        assert wl["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ghostserve_container_in_every_workload():
    for wl in _workloads():
        pod = wl["spec"]["template"]["spec"]
        gs = _ghostserve(pod)
        where = f"{wl['kind']}/{wl['metadata']['name']}"
        socket = _flag(gs, "socket")
        assert socket and _env(gs, "GHOSTSERVE_SOCKET") == socket, f"{where}: probes read GHOSTSERVE_SOCKET"
        assert _mount(gs, os.path.dirname(socket)), f"{where}: socket directory is not a volume"
        assert _mount(gs, "/dev/shm"), f"{where}: /dev/shm must be shared (parity arena)"
        port = int(_flag(gs, "metrics-port"))
        assert {"name": "gs-metrics", "containerPort": port, "protocol": "TCP"} in gs["ports"]
        health = _healthcheck_command()
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # grpc: probes dial TCP only; the daemon's gRPC is on the unix socket
            assert gs[probe]["exec"]["command"] == health, f"{where}: {probe} differs from the image's HEALTHCHECK"
            assert gs[probe]["timeoutSeconds"] >= 4, f"{where}: {probe} timeout below the 3 s RPC deadline"
        res = gs["resources"]
        assert res["requests"]["memory"] == res["limits"]["memory"], \
            f"{where}: parity pages are charged to the daemon: memory request = limit"
        assert _quantity(res["limits"]["memory"]) >= GIB
        assert _uid(pod, gs) == _image_uid(), f"{where}: run as the image's user"
        sc = gs["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_sidecar_pod_shares_socket_shm_pids_and_uid():
    (wl,) = [d for d in _load(K8S / "vllm-pod-sidecar.yaml") if d["kind"] == "Deployment"]
    pod = wl["spec"]["template"]["spec"]
    gs = _ghostserve(pod)
    assert gs in pod["initContainers"] and gs["restartPolicy"] == "Always", "native sidecar"
    assert pod["shareProcessNamespace"] is True, "the daemon watches the workers' pids"
    (engine,) = pod["containers"]
    socket = _flag(gs, "socket")
    assert _env(engine, "GHOSTSERVE_SOCKET") == socket
    assert _mount(engine, os.path.dirname(socket)) == _mount(gs, os.path.dirname(socket))
    assert _mount(engine, "/dev/shm") == _mount(gs, "/dev/shm")
    assert _uid(pod, engine) == _uid(pod, gs), "socket and segments are mode 0600"
    volumes = {v["name"]: v for v in pod["volumes"]}
    dshm = volumes[_mount(gs, "/dev/shm")]["emptyDir"]
    assert dshm["medium"] == "Memory"
    # the tmpfs holds the parity the daemon's memory limit was sized for (limit = parity + ~1 GiB)
    assert _quantity(dshm["sizeLimit"]) >= _quantity(gs["resources"]["limits"]["memory"]) - GIB
    assert "emptyDir" in volumes[_mount(gs, os.path.dirname(socket))]
    args = " ".join(engine["args"])
    config = re.search(r"--kv-transfer-config=(\{.*\})", args)
    assert config and json.loads(config.group(1))["kv_connector_module_path"]
    assert "nvidia.com/gpu" in engine["resources"]["limits"]


def test_api_service_points_at_the_front_which_outlives_engine_restarts():
    docs = _load(K8S / "vllm-pod-sidecar.yaml")
    (wl,) = [d for d in docs if d["kind"] == "Deployment"]
    (api,) = [d for d in docs if d["kind"] == "Service"]
    pod = wl["spec"]["template"]["spec"]
    assert api["spec"]["selector"].items() <= wl["spec"]["template"]["metadata"]["labels"].items()
    (front,) = [c for c in pod["initContainers"] if c["name"] == "front"]
    (engine,) = pod["containers"]
    assert front["restartPolicy"] == "Always", "a native sidecar: up before vLLM, alive across its restarts"
    assert front["command"] == ["ghostserve", "front"]
    (port,) = api["spec"]["ports"]
    front_ports = {p["name"]: p["containerPort"] for p in front["ports"]}
    assert port["targetPort"] in front_ports, "the Service targets the front, not vLLM"
    assert int(_flag(front, "port")) == front_ports[port["targetPort"]]
    engine_port = int(_flag(engine, "port"))
    assert _flag(front, "upstream") == f"http://127.0.0.1:{engine_port}"
    # startup and liveness on the front's own page (vLLM starts after it and restarts under it);
    # readiness follows the upstream
    for probe in ("startupProbe", "livenessProbe"):
        assert front[probe]["httpGet"]["path"] == "/metrics", probe
    assert front["readinessProbe"]["httpGet"]["path"] == "/health"
    # a server whose engine died stays up failing /health: liveness restarts it
    assert engine["livenessProbe"]["httpGet"]["path"] == "/health"
    assert float(_flag(front, "drain-seconds")) < pod["terminationGracePeriodSeconds"]


def test_daemonset_uses_host_socket_shm_and_pids():
    (ds,) = _kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    gs = _ghostserve(pod)
    assert pod["hostPID"] is True, "engines report host pids to a per-node daemon"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[_mount(gs, "/dev/shm")]["hostPath"]["path"] == "/dev/shm"
    socket_dir = os.path.dirname(_flag(gs, "socket"))
    assert volumes[_mount(gs, socket_dir)]["hostPath"]["path"] == socket_dir


def test_metrics_service_and_servicemonitor_select_the_pods():
    (svc,) = [s for s in _kind("Service") if s["metadata"]["name"] == "ghostserve-metrics"]
    (sm,) = _kind("ServiceMonitor")
    (port,) = svc["spec"]["ports"]
    selected = [wl for wl in _workloads()
                if svc["spec"]["selector"].items() <= wl["spec"]["template"]["metadata"]["labels"].items()]
    assert {wl["kind"] for wl in selected} == {"Deployment", "DaemonSet"}, "both variants get scraped"
    for wl in selected:
        names = {p["name"]: p["containerPort"] for c in _containers(wl["spec"]["template"]["spec"])
                 for p in c.get("ports", [])}
        assert names.get(port["targetPort"]) == port["port"], f"{wl['metadata']['name']}: targetPort"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [ep["port"] for ep in sm["spec"]["endpoints"]] == [port["name"]]
    # job label = the Service's label named by jobLabel; alerts and dashboard expect job="ghostserve"
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "ghostserve"


# ------------------------------------------------------------------ image


def test_dockerfile():
    ins = _dockerfile()
    froms = [a for i, a in ins if i == "FROM"]
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    bases = {re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0]) for f in froms}
    assert bases == {"python:3.11-slim"}
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["ghostserve","serve"]']
    assert _image_uid() > 0, "runs as a non-root user"
    assert "GHOSTSERVE_SOCKET=" in " ".join(a for i, a in ins if i == "ENV")
    cmd = _healthcheck_command()
    assert cmd[:2] == ["python", "-c"] and "grpc_health" in cmd[2]
    # every COPY from the context is let through by the .dockerignore allowlist
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allowlist"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for i, a in ins:
        if i == "COPY" and not a.startswith("--from"):
            for src in shlex.split(a)[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
                assert (ROOT / src).exists()


@pytest.mark.timeout(60)
def test_healthcheck_command_against_a_live_daemon(daemon, tmp_path):
    from grpc_health.v1 import health_pb2

    cmd = [sys.executable, *_healthcheck_command()[1:]]

    def probe(socket: str) -> int:
        env = {**os.environ, "GHOSTSERVE_SOCKET": socket}
        return subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode

    assert probe(daemon.sock) == 0
    assert probe(str(tmp_path / "absent.sock")) != 0
    daemon.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what a draining daemon says
    try:
        assert probe(daemon.sock) != 0
    finally:
        daemon.health.set("", health_pb2.HealthCheckResponse.SERVING)


# ------------------------------------------------------------------ PromQL


def _alert_rules() -> list[dict]:
    (doc,) = _load(ALERTS)
    return [r for g in doc["groups"] for r in g["rules"]]


def _dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append((f"variable {var['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def _dashboard_exprs() -> list[str]:
    return [e for _, e in _dashboard_queries()]


def _all_exprs() -> list[tuple[str, str]]:
    return _dashboard_queries() + [(f"alert {r['alert']}", r["expr"]) for r in _alert_rules()]


def _metric_labels() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for collector in Metrics(CollectorRegistry())._collectors():
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            for s in suffixes:
                out[family.name + s] = labels | ({"le"} if s == "_bucket" else set())
    return out


KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def _identifiers(expr: str) -> tuple[set[str], list[tuple[str, set[str]]], set[str]]:
    """(metric names, [(metric, label names in its matcher)], label names in clauses)."""
    expr = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    matchers = [(m.group(1), set(re.findall(r"(\w+)\s*[=!]~?", m.group(2))))
                for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr)]
    clauses = {lbl.strip() for m in CLAUSE.finditer(expr) for lbl in m.group(2).split(",") if lbl.strip()}
    expr = CLAUSE.sub(" ", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    names = {m.group(1) for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)}
    return names - KEYWORDS, matchers, clauses


def test_promql_identifier_extraction():
    names, matchers, clauses = _identifiers(
        'histogram_quantile(0.9, sum by (le, group) (rate(ghostserve_restore_seconds_bucket'
        '{group=~"$group"}[$__rate_interval]))) or up{job="x"} == 0 unless on (instance) '
        'ghostserve_kv_bytes offset 5m')
    assert names == {"ghostserve_restore_seconds_bucket", "up", "ghostserve_kv_bytes"}
    assert ("ghostserve_restore_seconds_bucket", {"group"}) in matchers
    assert clauses == {"le", "group", "instance"}


@pytest.mark.parametrize("where,expr", _all_exprs(), ids=[w for w, _ in _all_exprs()])
def test_promql_uses_only_exported_metrics(where, expr):
    exported = metric_names()
    named = set(re.findall(r"ghostserve_[a-z_]+", expr))
    assert named <= exported, f"not exported by the daemon: {named - exported}"
    names, matchers, clauses = _identifiers(expr)
    assert names, "every query reads a metric"
    assert names <= exported | BUILTIN_METRICS, f"unknown metrics {names - exported - BUILTIN_METRICS}"
    labels = _metric_labels()
    for metric, used in matchers:
        known = labels.get(metric, set()) | TARGET_LABELS
        assert used <= known, f"{metric} has no label {used - known}"
    known = set().union(*(labels.get(n, set()) for n in names)) | TARGET_LABELS
    assert clauses <= known, f"by/on clause names labels no metric here has: {clauses - known}"


# ------------------------------------------------------------------ alerts


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_alert_rules():
    rules = _alert_rules()
    by_name = {r["alert"]: r for r in rules}
    assert len(by_name) == len(rules), "alert names are unique"
    anchors = _anchors(OPERATIONS.read_text())
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert {"summary", "description", "runbook"} <= r["annotations"].keys(), r["alert"]
        doc, _, anchor = r["annotations"]["runbook"].partition("#")
        assert (ROOT / doc) == OPERATIONS and anchor in anchors, f"{r['alert']}: no section #{anchor}"
        if "for" in r:
            assert DURATION.match(r["for"])
    assert re.fullmatch(r'up\{job="ghostserve"\}\s*==\s*0', by_name["GhostserveDown"]["expr"].strip())
    wanted = {
        "GhostserveCheckpointLagGrowing": "ghostserve_checkpoint_lag_steps",
        "GhostserveGroupDegraded": "ghostserve_group_degraded",
        "GhostserveCorruptionDetected": "ghostserve_corruption_detected_total",
        "GhostserveRestoresFailing": "ghostserve_unrecoverable_bytes_total",
    }
    for alert, metric in wanted.items():
        assert metric in by_name[alert]["expr"], alert


def test_prometheus_configs():
    (main,) = _load(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in main["scrape_configs"]}
    assert "ghostserve" in jobs
    for rule_file in main["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    text = (DEPLOY / "prometheus" / "prometheus-local.yml").read_text()
    (local,) = _load(DEPLOY / "prometheus" / "prometheus-local.yml")
    (job,) = local["scrape_configs"]
    assert job["job_name"] == "ghostserve"
    assert job["static_configs"] == [{"targets": ["__TARGET__"]}]
    assert local["global"]["scrape_interval"] == "1s" and text.count("__TARGET__") >= 1


# ------------------------------------------------------------------ promtool

promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@promtool
def test_promtool_checks_configs_and_rules(tmp_path):
    r = _promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    local = tmp_path / "local.yml"
    local.write_text((DEPLOY / "prometheus" / "prometheus-local.yml").read_text()
                     .replace("__TARGET__", "127.0.0.1:9478"))
    r = _promtool("check", "config", str(local))
    assert r.returncode == 0, r.stdout + r.stderr


@promtool
def test_promtool_parses_dashboard_queries(tmp_path):
    """Every dashboard query, with Grafana's variables filled in, is valid PromQL."""
    subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
             "$instance": ".*", "$group": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        expr = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"\1", expr)
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def _series(name: str, values: str, **labels: str) -> dict:
    labels = {"job": "ghostserve", "instance": "n1:9478", **labels}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
            "values": values}


@promtool
def test_alerts_fire_when_they_should(tmp_path):
    """promtool's rule unit tests: each alert fires on the failure it is for, and
    only there (annotations dropped, so the expectations name labels only)."""
    (doc,) = _load(ALERTS)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    inst = {"job": "ghostserve", "instance": "n1:9478"}

    def expect(at: str, alert: str, *labelsets: dict) -> dict:
        return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": ls} for ls in labelsets]}

    crit = {**inst, "severity": "critical"}
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "15s", "tests": [
        {"interval": "15s",
         "input_series": [
             _series("up", "1 1 0x20"),
             # group g loses a rank at 30 s and stays degraded; lag grows meanwhile
             _series("ghostserve_group_degraded", "0 0 1x80", group="g"),
             _series("ghostserve_checkpoint_lag_steps", "0 0 0 0 40+2x80", group="g"),
             # group h is healthy but its encoder falls behind
             _series("ghostserve_group_degraded", "0x84", group="h"),
             _series("ghostserve_checkpoint_lag_steps", "0 0 0 0 40+2x80", group="h"),
             # group k is healthy and keeps up
             _series("ghostserve_group_degraded", "0x84", group="k"),
             _series("ghostserve_checkpoint_lag_steps", "0 1 0 2 1x80", group="k"),
             # g's first restore is partial and found corrupt chunks: new series, already > 0
             _series("ghostserve_corruption_detected_total", "_ _ 3x10", group="g"),
             _series("ghostserve_restores_total", "_ _ 1x10", group="g", outcome="partial"),
             _series("ghostserve_unrecoverable_bytes_total", "_ _ 4096x10", group="g"),
             # k's restores are all fine
             _series("ghostserve_restores_total", "_ _ 1 1 2x10", group="k", outcome="ok"),
             _series("ghostserve_unrecoverable_bytes_total", "_ _ 0x10", group="k"),
             _series("ghostserve_corruption_detected_total", "_ _ 0x10", group="k"),
             _series("ghostserve_failures_total", "_ 1x10", group="g", kind="pid_gone"),
         ],
         "alert_rule_test": [
             expect("30s", "GhostserveDown"),
             expect("2m", "GhostserveDown", crit),
             expect("1m", "GhostserveGroupDegraded"),
             expect("3m", "GhostserveGroupDegraded", {**crit, "group": "g"}),
             expect("1m", "GhostserveCorruptionDetected", {**crit, "group": "g"}),
             expect("1m", "GhostserveRestoresFailing", {**crit, "group": "g"}),
             expect("1m", "GhostserveRankLost", {**inst, "severity": "info", "group": "g", "kind": "pid_gone"}),
             expect("5m", "GhostserveCheckpointLagGrowing"),
             # h only: g is degraded (its own alert covers it), k keeps up
             expect("14m", "GhostserveCheckpointLagGrowing", {**inst, "severity": "warning", "group": "h"}),
         ]},
    ]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    r = _promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ Grafana


def test_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "ghostserve-overview" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    ids, cells = set(), set()
    for p in dash["panels"]:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        area = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"] == ref, f"panel {p['title']!r}: use the datasource variable"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ref and t["expr"].strip()
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ref
    exprs = "\n".join(_dashboard_exprs())
    for needed in (r"ghostserve_protected_bytes", r"ghostserve_parity_bytes",
                   r"ghostserve_checkpoint_lag_steps", r"rate\(ghostserve_encoded_bytes_total",
                   r"histogram_quantile\([^,]+,\s*sum by \(le\) \(increase\(ghostserve_restore_seconds_bucket",
                   r"ghostserve_restores_total", r"ghostserve_failures_total",
                   r"ghostserve_corruption_detected_total", r"ghostserve_rejected_requests_total",
                   r"ghostserve_ranks\{"):
        assert re.search(needed, exprs), f"dashboard lacks a panel on {needed}"


def test_grafana_provisioning():
    (dashboards,) = _load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "ghostserve.yaml")
    (provider,) = dashboards["providers"]
    assert dashboards["apiVersion"] == 1 and provider["type"] == "file" and provider["options"]["path"]
    (datasources,) = _load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = datasources["datasources"]
    assert datasources["apiVersion"] == 1 and source["type"] == "prometheus" and source["url"]


# ------------------------------------------------------------------ systemd


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit():
    svc = _unit()["Service"]

    def one(key: str) -> str:
        (value,) = svc[key]
        return value

    assert one("ExecStart").endswith("ghostserve serve")
    assert one("Restart") == "always" and one("KillSignal") == "SIGTERM"
    runtime = one("RuntimeDirectory")
    env = dict(e.split("=", 1) for e in svc["Environment"])
    assert env["GHOSTSERVE_SOCKET"].startswith(f"%t/{runtime}/"), "socket in the RuntimeDirectory"
    assert one("User") not in ("root", "0")
    assert one("RemoveIPC") == "no", "parity in /dev/shm must outlive the process"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert one(key) == value, key
    assert "DynamicUser" not in svc and "PrivateIPC" not in svc
    assert _unit()["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    unit = tmp_path / "ghostserve.service"  # ExecStart must exist for verify
    unit.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if str(unit) in ln]
    assert r.returncode == 0 and not complaints, "\n".join(complaints) or r.stderr
