"""GPU benchmark: what the CUDA data path's pieces cost on one device, each against
a baseline measured in the same run (run by ``bin/gpu-check``; needs CuPy and a
CUDA device, and says so otherwise with exit status 2).

    python benchmarks/gpu.py [--json] [--quick]

* ``encode_KxM_SIZE``: the RS kernel (``cuda/rs_kernels.cu``) on k shards of SIZE
  on the device, GB/s of data, against a device-to-device copy of the same k*SIZE
  bytes (target >= 0.8x);
* ``parity_d2h_SIZE``: m*SIZE of parity copied from the device into a shared-memory
  segment registered as pinned memory (the parity arena) against the same copy
  into CuPy's own pinned memory (target >= 0.9x);
* ``sum64_SIZE``: the chunk checksum kernel, GB/s, against the device copy;
* ``step_ec_vs_replication_KxM``: the device and PCIe work of checkpointing one
  decode step (64 tokens of a 70B-like model's KV per rank, 40 KiB each: 2.5 MiB
  per rank) under ec (encode + parity D2H, m/N of the bytes) against full
  replication (all N ranks' bytes D2H), for 4+1 and 8+2;
* ``launch_KxM_SETSxSIZE``: the daemon's encode path (:meth:`CupyBackend.launch`:
  raw device addresses, many (layer, block) stripes in one launch, queued on a
  stream without a host wait) against a device copy of the same bytes;
* ``worker_commit_us``: what a worker adds per step: recording an interprocess
  event and building the commit (target <= 50 us).

Every device figure is a median of repeats timed with CUDA events on the stream
the work is queued on. A row that fails is reported with its error and the rest
go on: the JSON keeps every figure measured before a failure (``ok`` is then false).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid


def _fail(args, message: str) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": message}))
    print(f"benchmarks/gpu.py: {message}", file=sys.stderr)
    return 2


def _timed(cp, fn, repeats: int) -> float:
    """Median seconds of ``fn`` (queued on the current stream), timed with events."""
    fn()  # warm up (compiles, allocations)
    out = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(out)


def run(args) -> dict:
    import cupy as cp  # noqa: PLC0415

    repeats = 5 if args.quick else 20
    size = (4 << 20) if args.quick else (16 << 20)
    label = f"{size >> 20}MiB"
    rows: dict[str, dict] = {}

    def section(name: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # one row's failure: the others are still measured
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}

    for k, m in ((4, 1), (8, 2)):
        section(f"codec_{k}x{m}", lambda k=k, m=m: _codec_rows(rows, k, m, size, label, repeats))
        section(f"launch_{k}x{m}", lambda k=k, m=m: _launch_rows(rows, k, m, repeats))
    section(f"sum64_{label}", lambda: _sum_rows(rows, size, label, repeats))
    section("worker_commit_us", lambda: _commit_rows(rows, args.quick))
    return {"ok": not any("error" in r for r in rows.values()),
            "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "rows": rows, "quick": args.quick}


def _codec_rows(rows: dict, k: int, m: int, size: int, label: str, repeats: int) -> None:
    """The codec's encode against a device copy; the parity D2H into the pinned arena
    against CuPy's pinned memory; one decode step under ec against replication."""
    import cupy as cp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ghostserve import shm  # noqa: PLC0415
    from ghostserve.codec import RSCode  # noqa: PLC0415
    from ghostserve.daemon.datapath.cudart import HOST_REGISTER_PORTABLE  # noqa: PLC0415
    code = RSCode(k, m, "cupy")
    data = cp.random.randint(0, 256, (k, size), dtype=cp.uint8)
    parity = cp.empty((m, size), dtype=cp.uint8)
    copy_dst = cp.empty_like(data)
    t_enc = _timed(cp, lambda code=code, data=data, parity=parity: code.encode_into(data, parity), repeats)
    t_copy = _timed(cp, lambda d=data, c=copy_dst: cp.copyto(c, d), repeats)
    assert np.array_equal(cp.asnumpy(parity), RSCode(k, m, "isal").encode(cp.asnumpy(data))), "parity differs"
    rows[f"encode_{k}x{m}_{label}"] = {"gbps": k * size / t_enc / 1e9, "baseline_gbps": k * size / t_copy / 1e9,
                                        "baseline": "device copy", "ratio": t_copy / t_enc, "target": 0.8}
    # parity D2H: into a pinned shared-memory segment (the arena) vs CuPy's pinned memory
    name = f"gsbench-{uuid.uuid4().hex[:8]}"
    seg = shm.Segment.create(name, m * size)
    try:
        arena = seg.array()
        cp.cuda.runtime.hostRegister(arena.ctypes.data, arena.nbytes, HOST_REGISTER_PORTABLE)
        pinned = cp.cuda.alloc_pinned_memory(m * size)
        host = np.frombuffer(pinned, dtype=np.uint8, count=m * size)
        nbytes = m * size

        def to_arena(p=parity, a=arena, n=nbytes):
            cp.cuda.runtime.memcpyAsync(a.ctypes.data, p.data.ptr, n, cp.cuda.runtime.memcpyDeviceToHost,
                                        cp.cuda.get_current_stream().ptr)

        def to_pinned(p=parity, h=host, n=nbytes):
            cp.cuda.runtime.memcpyAsync(h.ctypes.data, p.data.ptr, n, cp.cuda.runtime.memcpyDeviceToHost,
                                        cp.cuda.get_current_stream().ptr)

        t_arena, t_pinned = _timed(cp, to_arena, repeats), _timed(cp, to_pinned, repeats)
        rows[f"parity_d2h_{m}x{label}"] = {"gbps": nbytes / t_arena / 1e9, "baseline_gbps": nbytes / t_pinned / 1e9,
                                            "baseline": "pinned copy", "ratio": t_pinned / t_arena, "target": 0.9}
        cp.cuda.runtime.hostUnregister(arena.ctypes.data)
    finally:
        del arena
        seg.close()
        shm.unlink(name)
    # one decode step: ec (encode + m/N of it D2H) vs replication (all of it D2H)
    step = 64 * 40 << 10
    kv = cp.random.randint(0, 256, (k, step), dtype=cp.uint8)
    spar = cp.empty((m, step), dtype=cp.uint8)
    pinned_step = cp.cuda.alloc_pinned_memory(k * step)
    hstep = np.frombuffer(pinned_step, dtype=np.uint8, count=k * step)

    def ec(kv=kv, spar=spar, code=code, h=hstep, m=m, step=step):
        code.encode_into(kv, spar)
        cp.cuda.runtime.memcpyAsync(h.ctypes.data, spar.data.ptr, m * step, cp.cuda.runtime.memcpyDeviceToHost,
                                    cp.cuda.get_current_stream().ptr)

    def replicate(kv=kv, h=hstep, k=k, step=step):
        cp.cuda.runtime.memcpyAsync(h.ctypes.data, kv.data.ptr, k * step, cp.cuda.runtime.memcpyDeviceToHost,
                                    cp.cuda.get_current_stream().ptr)

    t_ec, t_rep = _timed(cp, ec, repeats), _timed(cp, replicate, repeats)
    rows[f"step_ec_vs_replication_{k}x{m}"] = {"ec_us": t_ec * 1e6, "replication_us": t_rep * 1e6,
                                               "ratio": t_rep / t_ec, "bytes_per_rank": step}


def _launch_rows(rows: dict, k: int, m: int, repeats: int) -> None:
    """The daemon's encode: 64 stripes of 256 KiB (k sources, m parity rows each) in one launch."""
    import cupy as cp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ghostserve.codec import RSCode  # noqa: PLC0415
    from ghostserve.codec.cupy_backend import CupyBackend  # noqa: PLC0415

    sets, n = 64, 256 << 10
    backend = CupyBackend()
    data = cp.random.randint(0, 256, (sets, k, n), dtype=cp.uint8)
    parity = cp.empty((sets, m, n), dtype=cp.uint8)
    copy_dst = cp.empty_like(data)
    coeffs = RSCode(k, m, "reference").parity_matrix
    src = [[int(data[i, j].data.ptr) for j in range(k)] for i in range(sets)]
    dst = [[int(parity[i, j].data.ptr) for j in range(m)] for i in range(sets)]
    stream = cp.cuda.get_current_stream()
    t_launch = _timed(cp, lambda: backend.launch(coeffs, src, dst, n, stream), repeats)
    t_copy = _timed(cp, lambda: cp.copyto(copy_dst, data), repeats)
    want = RSCode(k, m, "isal").encode(cp.asnumpy(data[3]))
    assert np.array_equal(cp.asnumpy(parity[3]), want), "parity differs"
    nbytes = sets * k * n
    rows[f"launch_{k}x{m}_{sets}x{n >> 10}KiB"] = {
        "gbps": nbytes / t_launch / 1e9, "baseline_gbps": nbytes / t_copy / 1e9, "baseline": "device copy",
        "ratio": t_copy / t_launch, "target": 0.8}


def _sum_rows(rows: dict, size: int, label: str, repeats: int) -> None:
    """sum64 of the chunks of one shard against the device copy of it."""
    import cupy as cp  # noqa: PLC0415

    from ghostserve.codec.gpu_checksum import Chunk, GpuChecksum  # noqa: PLC0415
    buf = cp.random.randint(0, 256, size, dtype=cp.uint8)
    other = cp.empty_like(buf)
    sums = GpuChecksum()
    chunk = 256 << 10
    chunks = [Chunk([(int(buf.data.ptr) + i, chunk)]) for i in range(0, size, chunk)]
    t_sum = _timed(cp, lambda: sums.checksums(chunks), repeats)
    t_copy = _timed(cp, lambda: cp.copyto(other, buf), repeats)
    rows[f"sum64_{label}"] = {"gbps": size / t_sum / 1e9, "baseline_gbps": size / t_copy / 1e9,
                              "baseline": "device copy", "ratio": t_copy / t_sum}


def _commit_rows(rows: dict, quick: bool) -> None:
    """What a worker adds per step: an interprocess event and the commit message."""
    import cupy as cp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ghostserve.v1 import ghostserve_pb2 as pb  # noqa: PLC0415
    costs = []
    for step in range(200 if not quick else 50):
        t0 = time.perf_counter()
        ev = cp.cuda.Event(disable_timing=True, interprocess=True)
        ev.record()
        handle = cp.cuda.runtime.ipcGetEventHandle(ev.ptr)
        pb.WorkerMessage(commit=pb.Commit(step=step, dirty=np.zeros(3 * 16, "<u8").tobytes(), cuda_event=handle))
        costs.append((time.perf_counter() - t0) * 1e6)
    rows["worker_commit_us"] = {"median_us": statistics.median(costs), "target_us": 50}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="smaller shards, fewer repeats (bin/gpu-check)")
    args = p.parse_args(argv)
    try:
        import cupy  # noqa: PLC0415
    except ImportError:
        return _fail(args, "needs CuPy: pip install 'ghostserve[gpu-cuda13]' (or [gpu-cuda12]) on a machine with a CUDA device")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return _fail(args, "needs a CUDA device; this machine has none")
    except Exception as exc:  # CUDARuntimeError: no driver
        return _fail(args, f"needs a CUDA device; the driver says {exc}")
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"GPU benchmark on {result['device']}")
    for name, row in result["rows"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
