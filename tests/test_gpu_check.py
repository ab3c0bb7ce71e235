"""bin/gpu-check: fails fast and says what is missing; its requirement lists follow
pyproject.toml; the prepared wheel folder (when there) is complete and small enough
to travel. The full run needs a CUDA device (see README, "GPU check")."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from ghostserve.codec.backends import cuda_device_present

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bin" / "gpu-check"


def load_script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gc = load_script()


def run_script(*args: str, env_extra: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess,
                                                                                          float]:
    env = {**os.environ, **(env_extra or {})}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    return proc, time.monotonic() - start


def test_without_wheels_it_says_so_and_exits_2(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc, seconds = run_script("--wheels", str(tmp_path / "none"), env_extra={"OUT": str(out)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert seconds < 60
    assert "bin/gpu-check --prepare" in proc.stdout and "MISSING-PREREQUISITES" in proc.stdout
    result = json.loads((out / "gpu-check.json").read_text())  # $OUT/gpu-check.json without --json
    assert result["status"] == "missing-prerequisites" and result["exit"] == 2
    assert any(p.startswith("wheels:") for p in result["problems"])
    if not cuda_device_present():
        assert any(p.startswith(("cupy:", "cuda:")) for p in result["problems"])
    assert [s["stage"] for s in result["stages"]] == ["prerequisites"]  # nothing else was run


FAKE_CUPY = '''
import os, time, types
__version__ = "0.0+fake"
def _count():
    if os.environ.get("FAKE_CUDA") == "hang":
        time.sleep(600)
    raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=_count))
'''


@pytest.mark.parametrize("mode", ["nodriver", "hang"])
def test_without_a_device_it_says_so_and_does_not_hang(tmp_path, mode):
    """CuPy installed but no device (or a driver that hangs): named, exit 2, within
    the budget (the probe is killed)."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(FAKE_CUPY)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc, seconds = run_script("--wheels", str(wheels), "--budget", "10", "--json", str(tmp_path / "r.json"),
                               env_extra={"PYTHONPATH": str(tmp_path), "FAKE_CUDA": mode, "OUT": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert seconds < 45
    problems = json.loads((tmp_path / "r.json").read_text())["problems"]
    cuda = [p for p in problems if p.startswith("cuda:")]
    assert cuda, problems
    assert ("timed out" in cuda[0]) if mode == "hang" else ("no usable CUDA driver" in cuda[0])


def test_requirements_follow_pyproject():
    download, machine = gc.wanted_requirements()
    names = {gc.req_name(r) for r in download}
    assert {"pyeclib", "grpcio", "protobuf", "grpcio-health-checking", "grpcio-reflection", "cuda-bindings",
            "pytest", "pytest-timeout", "pyyaml", "setuptools", "wheel"} <= names
    present = {gc.canon(p) for p in gc.PRESENT}
    assert not names & present
    assert {gc.req_name(r) for r in machine} <= present
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for req in data["project"]["dependencies"]:  # every runtime dependency is covered one way or the other
        assert gc.req_name(req) in names | present, req


def test_closure_leaves_out_what_the_machine_has():
    def node(name, version, *deps):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(deps)}}

    report = {"install": [
        node("grpcio-health-checking", "1.85.1", "grpcio>=1.85.1", "protobuf<8,>=7.35.1"),
        node("grpcio", "1.85.3", "typing-extensions>=4"),
        node("typing_extensions", "4.16.0"),
        node("protobuf", "7.36.2"),
        node("pyeclib", "1.7.0", "numpy>=1.26", "psutil>=5"),
        node("numpy", "2.4.6"),
        node("pytest", "9.2.0", "pluggy<2,>=1.6", 'colorama>=0.4; sys_platform == "win32"',
             'tomli>=2; python_version < "3.11"'),
        node("pluggy", "1.7.0"),
        node("colorama", "0.4.6"),
    ]}
    keep, on_present = gc.closure(report, ["grpcio-health-checking==1.85.1", "pytest==9.2.0", "pyeclib==1.7.0"])
    # grpcio and protobuf are downloaded whatever the GPU machine has (its versions may be older)
    assert keep == {"grpcio-health-checking": "1.85.1", "grpcio": "1.85.3", "typing-extensions": "4.16.0",
                    "protobuf": "7.36.2", "pytest": "9.2.0", "pluggy": "1.7.0", "pyeclib": "1.7.0"}
    assert on_present == ["numpy>=1.26", "psutil>=5"]


def test_junit_parsing(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="ok"><properties><property name="sum64_GBps" value="3.5"/>'
        "</properties></testcase>"
        '<testcase classname="tests.a" name="bad"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.a" name="boom"><error message="fixture">x</error></testcase>'
        '<testcase classname="tests.a" name="skip"><skipped message="no"/></testcase>'
        "</testsuite></testsuites>")
    res = gc.parse_junit(xml)
    assert (res["passed"], res["failed"], res["errors"], res["skipped"]) == (1, 1, 1, 1)
    assert res["properties"] == {"ok:sum64_GBps": "3.5"}
    assert [f["test"] for f in res["failures"]] == ["tests.a::bad", "tests.a::boom"]
    assert gc.parse_junit(tmp_path / "missing.xml")["junit"] is False


def test_prepared_wheels_are_complete_and_small():
    manifest_path = gc.WHEELS / gc.MANIFEST
    if not manifest_path.is_file():
        pytest.skip("no .gpu-wheels here (bin/gpu-check --prepare makes it)")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["python"] == gc.TARGET_PYTHON
    files = {p.name for p in gc.WHEELS.glob("*.whl")}
    assert set(manifest["wheels"]) == files
    assert sum((gc.WHEELS / f).stat().st_size for f in files) < gc.CARRY_LIMIT
    wheel_names = {gc.canon(f.split("-")[0]) for f in files}
    download, _ = gc.wanted_requirements()
    assert {gc.req_name(r) for r in download} <= wheel_names
    assert not wheel_names & {gc.canon(p) for p in gc.PRESENT}
    reqs = (gc.WHEELS / gc.REQUIREMENTS).read_text().split()
    assert {gc.req_name(r) for r in reqs} <= wheel_names and all("==" in r for r in reqs)


def test_benchmark_stage(tmp_path, monkeypatch):
    """benchmarks/gpu.py, when there, runs with --json --quick and its JSON is kept;
    one that fails fails the stage."""
    bench = tmp_path / "gpu.py"
    bench.write_text('import json, sys\nassert sys.argv[1:] == ["--json", "--quick"]\n'
                     'print("warming up")\nprint(json.dumps({"sum64_GBps": 1.0}))\n')
    monkeypatch.setattr(gc, "BENCH", bench)
    run = gc.Run(60, tmp_path)
    assert gc.run_bench(run, Path(sys.executable))
    assert run.stages[-1]["status"] == "ok" and run.stages[-1]["result"] == {"sum64_GBps": 1.0}
    bench.write_text("raise SystemExit(3)\n")
    assert not gc.run_bench(run, Path(sys.executable))
    assert run.stages[-1]["status"] == "fail"
    monkeypatch.setattr(gc, "BENCH", tmp_path / "absent.py")
    assert gc.run_bench(run, Path(sys.executable)) and run.stages[-1]["status"] == "skipped"


@pytest.mark.skipif(cuda_device_present(), reason="a CUDA device is present: the gpu tests would run")
def test_gpu_tests_that_all_skip_fail_the_check(tmp_path):
    """Without a device every gpu test skips: the check must not call that a pass."""
    run = gc.Run(120, tmp_path)
    assert not gc.run_pytest(run, Path(sys.executable), ["-k", "test_gpu_many_chunks"], 0)
    row = run.stages[-1]
    assert row["status"] == "fail" and row["pytest"]["passed"] == 0 and row["pytest"]["skipped"] >= 1
    assert "no gpu test ran" in row["detail"]


def test_gpu_benchmark_says_what_it_needs_without_a_gpu():
    """benchmarks/gpu.py is run by bin/gpu-check on a GPU machine; here (no CuPy, no
    device) it must refuse in one line, and with --json still print one object."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--json", "--quick"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    result = json.loads(out.stdout)
    assert result["ok"] is False and ("CuPy" in result["error"] or "CUDA device" in result["error"])
