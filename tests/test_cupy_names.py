"""The CUDA path against the real CuPy, without a GPU.

(a) Every CuPy and cuda-bindings name the package (the daemon's CUDA runtime,
    the GPU codec, the worker side's GPU KV export, the GPU benchmark and check) calls exists in the real ``cupy-cuda13x`` 14.2 and ``cuda-bindings`` 13
    wheels, the GPU machine's, installed by bin/setup in ``.venv-cupy`` (they import
    without a device). A name that does not exist there (``cudaHostRegisterPortable``
    did not) would fail every CUDA Register on the first real run.
(b) The CuPy stand-in of tests/fakecupy.py offers only names the real wheel has.
(c) :class:`CupyRuntime` on that stand-in keeps CUDA's current-device rules: events
    are created and recorded, memory set and copied, IPC mappings opened and closed
    under the device of the stream or allocation concerned, whichever device the
    calling thread has current (a 1-GPU run would not show a breach).
(d) ``chaos --device cuda``'s worker memory on that stand-in: dirty bytes up,
    dumps and damage through the worker, the mirror refreshed after a restore.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fakecupy import CudaRuleBroken, FakeCupy

from ghostserve.daemon.datapath.cudart import HOST_REGISTER_PORTABLE, CupyRuntime

ROOT = Path(__file__).resolve().parents[1]
CUPY_PYTHON = ROOT / ".venv-cupy" / "bin" / "python"

# Where CuPy is reached from, by the text of the expression before the name.
ROOTS = {"cupy": "cupy", "cp": "cupy", "self.cp": "cupy", "self._cp": "cupy",
         "rt": "cupy.cuda.runtime", "self.rt": "cupy.cuda.runtime", "cudart": "cuda.bindings.runtime",
         "self.cudart": "cuda.bindings.runtime", "self.cudrv": "cuda.bindings.driver"}
# Files that call CuPy (in ghostserve/daemon/datapath/cuda.py ``rt`` is the project's
# own CudaRuntime, not CuPy's module, so it is not scanned).
FILES = ["ghostserve/daemon/datapath/cudart.py", "ghostserve/codec/cupy_backend.py",
         "ghostserve/codec/gpu_checksum.py", "ghostserve/codec/__init__.py", "ghostserve/codec/backends.py",
         "ghostserve/codec/shards.py", "ghostserve/integrations/gpukv.py", "ghostserve/chaos/worker.py",
         "benchmarks/gpu.py", "bin/gpu-check"]


def used_names() -> dict[str, set[str]]:
    """{"cupy.cuda.runtime.memcpyAsync", ...} by file: every attribute chain whose
    root is one of ROOTS, as far as it goes by plain names."""
    out: dict[str, set[str]] = {}
    for rel in FILES:
        tree = ast.parse((ROOT / rel).read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            parts: list[str] = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name):
                continue
            parts.append(cur.id)
            chain = list(reversed(parts))
            for n in (2, 1):  # "self.rt" before "self"
                root = ".".join(chain[:n])
                if root in ROOTS and len(chain) > n:
                    found.add(".".join([ROOTS[root], *chain[n:]]))
                    break
        out[rel] = found
    return out


CHECK = """
import importlib, json, sys
missing = []
for full in json.load(sys.stdin):
    for mod in ("cuda.bindings.runtime", "cuda.bindings.driver", "cupy.cuda.runtime", "cupy.cuda", "cupy"):
        if full.startswith(mod + "."):
            obj = importlib.import_module(mod)
            for part in full[len(mod) + 1:].split("."):
                if not hasattr(obj, part):
                    missing.append(full)
                    break
                obj = getattr(obj, part)
            break
print(json.dumps(missing))
"""


def missing_in_the_wheel(names: set[str]) -> list[str]:
    if not CUPY_PYTHON.exists():
        pytest.fail(f"{CUPY_PYTHON} is missing: bin/setup makes it (the real cupy-cuda13x wheel)")
    out = subprocess.run([str(CUPY_PYTHON), "-c", CHECK], input=json.dumps(sorted(names)), text=True,
                         capture_output=True, timeout=120, check=True)
    return json.loads(out.stdout)


def test_every_cuda_name_the_package_calls_exists_in_the_real_wheels():
    by_file = used_names()
    assert "cupy.cuda.runtime.hostRegister" in by_file["ghostserve/daemon/datapath/cudart.py"]  # the scan works
    assert "cuda.bindings.runtime.cudaGetDeviceProperties" in by_file["ghostserve/daemon/datapath/cudart.py"]
    assert "cuda.bindings.driver.cuMemGetAddressRange" in by_file["ghostserve/integrations/gpukv.py"]
    everything = set().union(*by_file.values())
    missing = missing_in_the_wheel(everything)
    where = {n: [f for f, names in by_file.items() if n in names] for n in missing}
    assert not missing, f"not in cupy-cuda13x 14.2 / cuda-bindings 13: {where}"


def test_the_scan_would_catch_a_missing_name():
    assert missing_in_the_wheel({"cupy.cuda.runtime.cudaHostRegisterPortable", "cupy.cuda.runtime.hostRegister"}) \
        == ["cupy.cuda.runtime.cudaHostRegisterPortable"]


def test_the_stand_in_offers_only_names_cupy_has():
    names = {f"{where}.{n}" for where, ns in FakeCupy().names().items() for n in ns}
    assert not missing_in_the_wheel(names)


# ---------------------------------------------------------------------- current-device rules


def runtime(devices: int = 2) -> tuple[CupyRuntime, FakeCupy]:
    fake = FakeCupy(devices)
    return CupyRuntime(cupy=fake, uuids=lambda n: [bytes([d + 1]) * 16 for d in range(n)]), fake


def test_events_memsets_and_copies_run_under_their_stream_s_device():
    """The calling thread has device 0 current; every call about device 1 still
    works, because the runtime sets the device around it (the old code created
    the event on device 0 and recorded it on device 1's stream: refused)."""
    rt, fake = runtime()
    s1 = rt.stream(1)
    assert s1.device_id == 1 and fake.current() == 0
    ev = rt.record(s1)
    assert fake.event_device[ev.ptr] == 1
    rt.memset(0x5000, 0, 256, s1)
    rt.copy(0x6000, 0x7000, 256, s1)
    opened = rt.open_event(b"\1" * 64, 1)
    assert fake.event_device[opened.ptr] == 1
    rt.wait(rt.stream(0), opened)
    base = rt.open_ipc(b"\2" * 64, 1)
    assert rt.open_ipc(b"\2" * 64, 1) == base  # once per process, counted
    rt.close_ipc(b"\2" * 64)
    rt.close_ipc(b"\2" * 64)
    assert not fake.ipc_device  # unmapped, under its device
    assert fake.current() == 0  # and the caller's device is as it was
    assert rt.device_of(bytes([2]) * 16) == 1


def test_the_stand_in_refuses_what_cuda_refuses():
    """The checks above could fail: the stand-in refuses each breach."""
    fake = FakeCupy(2)
    with fake.cuda.Device(1):
        s1 = fake.cuda.Stream(non_blocking=True)
    ev = fake.cuda.Event(disable_timing=True)  # on device 0
    with pytest.raises(CudaRuleBroken):
        ev.record(s1)
    with pytest.raises(CudaRuleBroken):
        fake.cuda.runtime.memsetAsync(0x5000, 0, 256, s1.ptr)
    with pytest.raises(CudaRuleBroken):
        fake.cuda.runtime.memcpyAsync(0x5000, 0x6000, 256, 4, s1.ptr)
    with pytest.raises(CudaRuleBroken), s1:
        pass
    with fake.cuda.Device(1):
        base = fake.cuda.runtime.ipcOpenMemHandle(b"\0" * 64, 1)
    with pytest.raises(CudaRuleBroken):
        fake.cuda.runtime.ipcCloseMemHandle(base)
    with pytest.raises(CudaRuleBroken):
        fake.cuda.runtime.hostRegister(0x1000, 4096, object())


def test_host_memory_is_pinned_with_cuda_s_portable_flag():
    rt, fake = runtime()
    rt.register_host(0x10000, 1 << 20)
    assert HOST_REGISTER_PORTABLE == 1 and fake.calls[-1] == "hostRegister"


def test_the_current_device_is_per_thread():
    """Another thread inside a Device(1) block does not move this thread's device."""
    fake = FakeCupy(2)
    inside, leave = threading.Event(), threading.Event()

    def other():
        with fake.cuda.Device(1):
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(5)
    assert fake.current() == 0
    leave.set()
    t.join()


def test_a_missing_cuda_bindings_says_what_to_install(monkeypatch):
    from ghostserve.daemon.datapath import cudart  # noqa: PLC0415
    from ghostserve.errors import GpuUnavailable  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(GpuUnavailable, match=r"cuda-bindings.*ghostserve\[gpu-cuda13\]"):
        cudart.device_uuids(1)


def test_chaos_gpu_worker_kv_goes_up_dirty_only_and_comes_back(monkeypatch):
    """chaos --device cuda's worker memory (ghostserve.chaos.worker.CudaKV) on the
    CuPy stand-in: a step's dirty bytes are copied up (and only those), with an
    event handle; a dump reads the device; a poke damages the device only; after a
    restore the mirror takes the device's bytes."""
    import numpy as np  # noqa: PLC0415

    from ghostserve.chaos import worker  # noqa: PLC0415
    from ghostserve.chaos.workload import Shape, Workload, write_tokens  # noqa: PLC0415
    from ghostserve.integrations import gpukv  # noqa: PLC0415

    fake = FakeCupy(2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(gpukv.BindingsCuda, "__init__", lambda self: None)
    monkeypatch.setattr(gpukv.BindingsCuda, "device_uuid", lambda self, d: bytes([d + 1]) * 16)
    shape = Shape(ranks=2, layers=2, blocks=32, block_size=4, heads=1, head_dim=8, steps=8, requests=2, prefill_chunk=4)
    kv = worker.open_kv(shape, "cuda", "unused", rank=3)
    assert kv.device == 1 and kv.client_region["regions"][0].device_uuid == bytes([2]) * 16
    device = fake.memory[kv.mem.ptr][2][: shape.region_bytes]
    assert not device.any()  # zeroed at start
    work = Workload(shape)
    step = next(s for s in work.steps if s.writes)
    write_tokens(shape, kv.kv, 3, step.writes)
    dirty = work.dirty(step.step)
    handle = kv.publish(step.step, dirty)
    assert len(handle) == 64 and len(kv.events) == 1
    mirror = kv.host
    changed = np.flatnonzero(device != 0)
    assert changed.size and np.array_equal(device, np.where(device != 0, mirror, 0))
    # only dirty bytes went up: a mirror byte outside them stays on the host
    inside = np.zeros(shape.region_bytes, dtype=bool)
    for off, n in kv._ranges(dirty):
        inside[off : off + n] = True
    kv.host[~inside] = 0x77
    kv.publish(step.step + 1, dirty)
    assert not (device[~inside] == 0x77).any()
    assert np.frombuffer(kv.dump(), dtype=np.uint8)[~inside].max(initial=0) == 0  # dump reads the device
    kv.protected(step.step + 1)
    assert len(kv.events) == 0
    o = int(changed[0])
    before = kv.host[o : o + 2].copy()
    kv.poke(o, b"\x00\x01")
    assert list(device[o : o + 2]) == [0, 1] and np.array_equal(kv.host[o : o + 2], before)  # behind its back
    device[:16] = 0x42  # as if the daemon restored these bytes
    kv.restored()
    assert (kv.host[:16] == 0x42).all()
    kv.close()
