"""Checkpoint benchmark: what protection costs a worker, how far encoding lags, how
fast a restore is, and how much host memory parity takes. Each figure is a ratio
against a baseline measured in the same run.

    python benchmarks/checkpoint.py [--json] [--quick]

1. commit cost: ``WorkerClient.commit`` per decode step (median, p99 microseconds)
   against a no-op baseline (appending the same arguments to a list);
2. encode lag: N ranks decode at a fixed step rate; after every step, how many steps
   the protected step trails (max, p99);
3. restore, for 4+2 and 8+2 (``restore_4x2_16MiB``, ...): a lost rank's protected KV
   (16 MiB) rebuilt into fresh memory (daemon-reported seconds, median of
   ``--restore-runs``) against ``numpy.copyto`` of the same bytes. Rebuilding L bytes
   reads k shards and writes one, (k + 1) L of traffic against a copy's 2 L, so the
   bound is ``memcpy_gbps * 2 / (k + 1)``; ``restore_vs_traffic_limit`` is the
   fraction of it reached. ``kernel``: the same pass (``ghostserve.daemon.datapath.tiles``)
   called in this process on the same bytes and threads, with no daemon around it:
   what the kernel reaches alone, against which the daemon's figure shows what its
   bookkeeping and thread scheduling cost;
4. memory: parity bytes against the bytes full replication would hold.

The daemon runs as its own process (``ghostserve serve``), as in deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

from ghostserve import shm
from ghostserve.client import OperatorClient, WorkerClient
from ghostserve.config import Config

TILE_DEFAULT = Config.__dataclass_fields__["restore_tile_bytes"].default


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Daemon:
    def __init__(self, threads: int, tile_bytes: int = 0):
        self.tmp = tempfile.mkdtemp(prefix="gs-bench-")
        self.sock = os.path.join(self.tmp, "gs.sock")
        self.prefix = f"gsb{uuid.uuid4().hex[:6]}-"
        env = dict(os.environ)
        if tile_bytes:
            env["GHOSTSERVE_RESTORE_TILE_BYTES"] = str(tile_bytes)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ghostserve", "serve", "--socket", self.sock, "--shm-prefix", self.prefix,
             "--encode-threads", str(threads), "--log-level", "error"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        if not self.proc.stdout.readline().startswith(b"ready"):
            raise RuntimeError("daemon did not start")
        self.segs: list[shm.Segment] = []

    def region(self, name: str, size: int) -> shm.Segment:
        seg = shm.Segment.create(self.prefix + name, size)
        self.segs.append(seg)
        return seg

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        for name in shm.list_names(self.prefix):
            shm.unlink(name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def make_group(d: Daemon, name: str, n: int, m: int, layout: dict, size: int):
    segs = [d.region(f"{name}-r{r}", size) for r in range(n)]
    clients = [WorkerClient(d.sock, name, r, n, m, layout, segs[r].name, size) for r in range(n)]
    for c in clients:
        c.register()
    return segs, clients


def bench_decode(d: Daemon, args) -> dict:
    """N ranks, R requests decoding one token per step at ``--step-ms``."""
    n, m, layers, blocks, bs = 4, 1, args.layers, 256, 16
    token = 8 * 128 * 2 // n  # 8 KV heads of 128 over 4 ranks, 2-byte elements
    block_bytes = 2 * bs * token
    layout = dict(num_layers=layers, num_blocks=blocks, block_bytes=block_bytes, chunk_bytes=token,
                  layer_stride=blocks * block_bytes, block_stride=block_bytes, offset=0)
    size = layers * blocks * block_bytes
    segs, clients = make_group(d, "decode", n, m, layout, size)
    rng = np.random.default_rng(0)
    kv = [s.array().reshape(layers, blocks, 2, bs, token) for s in segs]
    requests = args.requests
    lengths = [0] * requests
    commit_us, noop_us, lag = [], [], []
    sink: list = []
    period = args.step_ms / 1000
    next_t = time.perf_counter()
    for step in range(args.steps):
        dirty = []
        for q in range(requests):
            t = lengths[q]
            block, slot = (q * 16 + t // bs) % blocks, t % bs
            dirty += [(block, slot * token, (slot + 1) * token), (block, (bs + slot) * token, (bs + slot + 1) * token)]
            for r in range(n):
                kv[r][:, block, :, slot, :] = rng.integers(0, 256, (layers, 2, token), dtype=np.uint8)
            lengths[q] += 1
        marks = {f"r{q}": lengths[q] for q in range(requests)}
        for c in clients:
            t0 = time.perf_counter_ns()
            c.commit(step, dirty, marks)
            commit_us.append((time.perf_counter_ns() - t0) / 1e3)
            t0 = time.perf_counter_ns()
            sink.append((step, tuple(dirty), dict(marks)))  # the no-op baseline: keep the arguments
            noop_us.append((time.perf_counter_ns() - t0) / 1e3)
        next_t += period
        time.sleep(max(0.0, next_t - time.perf_counter()))
        lag.append(step - clients[0].protected_step)
    clients[0].wait_protected(args.steps - 1, timeout=30)
    for c in clients:
        c.close()
    return {
        "commit_us_median": statistics.median(commit_us), "commit_us_p99": pct(commit_us, 0.99),
        "noop_us_median": statistics.median(noop_us), "noop_us_p99": pct(noop_us, 0.99),
        "commit_over_noop_median": statistics.median(commit_us) / max(statistics.median(noop_us), 1e-3),
        "lag_steps_max": max(lag), "lag_steps_p99": pct(lag, 0.99), "lag_steps_median": statistics.median(lag),
        "step_ms": args.step_ms, "steps": args.steps, "requests": requests, "layers": layers,
        "bytes_per_step_per_rank": requests * 2 * token * layers,
    }


def shape_name(n: int, m: int, nbytes: int) -> str:
    """klauspost/reedsolomon-style benchmark names: restore_4x2_16MiB."""
    size = f"{nbytes >> 20}MiB" if nbytes >= 1 << 20 and not nbytes % (1 << 20) else f"{nbytes >> 10}KiB"
    return f"restore_{n}x{m}_{size}"


def restore_layout(args) -> tuple[dict, int]:
    """The restore benchmarks' rank layout (4 layers of ``--restore-blocks`` blocks of
    64 KiB, 16 KiB chunks) and the bytes of one rank."""
    layers, blocks, block_bytes = 4, args.restore_blocks, 64 << 10
    layout = dict(num_layers=layers, num_blocks=blocks, block_bytes=block_bytes, chunk_bytes=16 << 10,
                  layer_stride=blocks * block_bytes, block_stride=block_bytes, offset=0)
    return layout, layers * blocks * block_bytes


def copy_seconds(dst: np.ndarray, src: np.ndarray) -> float:
    """The memcpy baseline: three back-to-back copies, as a plain copy loop runs (the
    first warms ``dst``); the median of the last two."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_restore(d: Daemon, args, n: int, m: int) -> dict:
    """A lost rank's protected KV rebuilt into fresh (touched) memory, ``--restore-runs``
    times, each checked byte for byte, each followed by :func:`copy_seconds` of the
    same bytes."""
    layout, size = restore_layout(args)
    blocks, block_bytes = layout["num_blocks"], layout["block_bytes"]
    name = f"restore{n}x{m}"
    segs, clients = make_group(d, name, n, m, layout, size)
    rng = np.random.default_rng(1)
    for seg, c in zip(segs, clients, strict=True):
        seg.array()[:] = rng.integers(0, 256, size, dtype=np.uint8)
        c.commit(0, [(b, 0, block_bytes) for b in range(blocks)], {"r": 1})
    clients[0].wait_protected(0, timeout=120)
    op = OperatorClient(d.sock)
    g = op.status(name).groups[0]
    before = segs[1].array().copy()
    clients[1].close()
    while op.status(name).groups[0].state != "degraded":
        time.sleep(0.002)
    fresh = d.region(f"{name}-r1b", size)
    c = WorkerClient(d.sock, name, 1, n, m, layout, fresh.name, size)
    c.register()
    dst = np.empty_like(before)
    seconds, copies, restored = [], [], 0
    for _ in range(args.restore_runs):
        fresh.array()[:] = 0  # an engine's new KV cache is allocated and touched before use
        resp = c.restore()
        assert np.array_equal(fresh.array(), before), "restore is not byte-exact"
        assert not resp.unrecoverable_blocks and resp.corrupt_chunks == 0
        seconds.append(resp.seconds)
        restored = resp.restored_bytes
        copies.append(copy_seconds(dst, before))
    for x in [*clients, c]:
        x.close()
    restore_s, copy_s = statistics.median(seconds), statistics.median(copies)
    restore_gbps, memcpy_gbps = restored / restore_s / 1e9, size / copy_s / 1e9
    # rebuilding L bytes reads k shards and writes one: (k + 1) L of memory traffic
    limit_gbps = memcpy_gbps * 2 / (n + 1)
    return {
        "code": f"{n}+{m}", "k": n, "m": m, "shard_bytes": size, "runs": len(seconds),
        "restored_bytes": restored, "restore_seconds": restore_s,
        "restore_gbps": restore_gbps, "restore_gbps_runs": [restored / x / 1e9 for x in seconds],
        "first_restore_gbps": restored / seconds[0] / 1e9,
        "memcpy_gbps": memcpy_gbps, "traffic_limit_gbps": limit_gbps,
        "restore_vs_traffic_limit": restore_gbps / limit_gbps,
        "restore_over_memcpy": restore_gbps / memcpy_gbps,
        "parity_bytes": g.parity_bytes, "replication_bytes": g.protected_bytes,
        "parity_over_replication": g.parity_bytes / g.protected_bytes,
    }


CODES = ((4, 2), (8, 2))


def bench_kernel(args, n: int, m: int) -> dict:
    """Restore's fused pass alone: rank 1 of an n+m group with the layout of
    :func:`bench_restore`, in shared memory, rebuilt ``--restore-runs`` times by
    ``rebuild.rebuild_runs`` on ``--threads`` threads (the caller and a pool), each
    checked byte for byte, each followed by :func:`copy_seconds`."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from ghostserve.codec import RSCode  # noqa: PLC0415
    from ghostserve.codec.isal import crc32c  # noqa: PLC0415
    from ghostserve.daemon.datapath import tiles as rebuild  # noqa: PLC0415
    from ghostserve.daemon.layout import Layout  # noqa: PLC0415

    spec, size = restore_layout(args)
    lay = Layout(**spec)
    layers, blocks, bb, cb = lay.num_layers, lay.num_blocks, lay.block_bytes, lay.chunk_bytes
    prefix = f"gsk{uuid.uuid4().hex[:6]}-"
    segs = [shm.Segment.create(f"{prefix}r{q}", size) for q in range(n + 1)]  # n ranks, then the target
    pool = ThreadPoolExecutor(max(1, args.threads - 1), thread_name_prefix="bench-kernel")
    try:
        rng = np.random.default_rng(1)
        mem = [x.array() for x in segs[:n]]
        for x in mem:
            x[:] = rng.integers(0, 256, size, dtype=np.uint8)
        code = RSCode(n, m, "isal")
        parity = np.zeros((layers, m, blocks, bb), dtype=np.uint8)
        crc = np.zeros((blocks, lay.chunks, n), dtype=np.uint32)
        for layer in range(layers):
            for b in range(blocks):
                at = layer * lay.layer_stride + b * bb
                parity[layer, :, b] = code.encode([x[at : at + bb] for x in mem])
        for q in range(n):
            for b in range(blocks):
                for c in range(lay.chunks):
                    v = 0
                    for layer in range(layers):
                        v = crc32c(mem[q].ctypes.data + layer * lay.layer_stride + b * bb + c * cb, cb, v)
                    crc[b, c, q] = v
        rank, target = 1, segs[n].array()
        sources, coeffs = code.decode_matrix([rank])
        plan = rebuild.TilePlan(lay, rank, target.ctypes.data, {q: mem[q].ctypes.data for q in range(n) if q != rank},
                                parity.ctypes.data, m, sources, code.backend.tables(np.ascontiguousarray(coeffs[[0]])),
                                crc, n)
        runs = [(b, 0, lay.chunks) for b in range(blocks)]
        tile = args.tile_bytes or TILE_DEFAULT
        rebuild.tile_kernel()  # compiled (or loaded) before the clock starts, as the daemon warms it
        dst, seconds, copies = np.empty(size, dtype=np.uint8), [], []
        for _ in range(args.restore_runs):
            target[:] = 0
            t0 = time.perf_counter()
            done, retry = rebuild.rebuild_runs(plan, runs, tile, pool, args.threads)
            seconds.append(time.perf_counter() - t0)
            assert not retry and np.array_equal(target, mem[rank]), "the kernel's restore is not byte-exact"
            copies.append(copy_seconds(dst, mem[rank]))
    finally:
        pool.shutdown()
        for x in segs:
            x.close()
            shm.unlink(x.name)
    gbps, memcpy_gbps = size / statistics.median(seconds) / 1e9, size / statistics.median(copies) / 1e9
    limit = memcpy_gbps * 2 / (n + 1)
    return {"kernel_gbps": gbps, "memcpy_gbps": memcpy_gbps, "traffic_limit_gbps": limit,
            "kernel_vs_traffic_limit": gbps / limit, "kernel_seconds": statistics.median(seconds),
            "kernel_gbps_runs": [size / x / 1e9 for x in seconds]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--step-ms", type=float, default=20.0, help="decode step period (50 tok/s)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--restore-blocks", type=int, default=64, help="64 KiB blocks per layer (4 layers): 16 MiB a rank")
    p.add_argument("--restore-runs", type=int, default=7, help="restores per code (median reported)")
    p.add_argument("--threads", type=int, default=2, help="daemon encode threads")
    p.add_argument("--tile-bytes", type=int, default=0,
                   help=f"the daemon's restore_tile_bytes (0: its default, {TILE_DEFAULT})")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.restore_blocks, args.layers, args.restore_runs = 40, 8, 4, 2
    d = Daemon(args.threads, args.tile_bytes)
    try:
        result = {"decode": bench_decode(d, args), "restore": {}}
        for n, m in CODES:
            res = bench_restore(d, args, n, m)
            res["tile_bytes"] = args.tile_bytes or TILE_DEFAULT
            res["threads"] = args.threads
            res["kernel"] = bench_kernel(args, n, m)
            result["restore"][shape_name(n, m, res["shard_bytes"])] = res
    finally:
        d.close()
    result["targets"] = {
        "commit_median_le_100us": result["decode"]["commit_us_median"] <= 100,
        "lag_le_1_step_p99": result["decode"]["lag_steps_p99"] <= 1,
        **{f"{name}_ge_half_traffic_limit": res["restore_vs_traffic_limit"] >= 0.5
           for name, res in result["restore"].items()},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    dec = result["decode"]
    t = Table(title=f"checkpoint: 4 ranks, {dec['requests']} requests decoding every {dec['step_ms']:g} ms, "
                    f"{dec['layers']} layers")
    for col in ("measure", "ghostserve", "baseline", "ratio"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    t.add_row("commit per step, median us", f"{dec['commit_us_median']:.1f}", f"{dec['noop_us_median']:.1f} (no-op)",
              f"{dec['commit_over_noop_median']:.1f}x")
    t.add_row("commit per step, p99 us", f"{dec['commit_us_p99']:.1f}", f"{dec['noop_us_p99']:.1f} (no-op)", "")
    t.add_row("encode lag, steps (median / p99 / max)",
              f"{dec['lag_steps_median']:g} / {dec['lag_steps_p99']:g} / {dec['lag_steps_max']:g}", "", "")
    for res in result["restore"].values():
        t.add_row(f"host memory {res['code']}, bytes", f"{res['parity_bytes']:,} (parity)",
                  f"{res['replication_bytes']:,} (replica)", f"{res['parity_over_replication']:.2f}x")
    Console().print(t)
    r = Table(title="restore: a lost rank rebuilt into fresh memory, GB/s of rebuilt KV "
                    f"(median of {args.restore_runs}; {args.threads} threads, tiles of "
                    f"{(args.tile_bytes or TILE_DEFAULT) >> 10} KiB); limit = memcpy x 2/(k+1)")
    r.add_column("name", no_wrap=True)
    for col in ("restore GB/s", "memcpy GB/s", "limit GB/s", "/ limit", "kernel alone / its limit"):
        r.add_column(col, justify="right")
    for name, res in result["restore"].items():
        r.add_row(name, f"{res['restore_gbps']:.2f}", f"{res['memcpy_gbps']:.2f}", f"{res['traffic_limit_gbps']:.2f}",
                  f"{res['restore_vs_traffic_limit']:.2f}x", f"{res['kernel']['kernel_vs_traffic_limit']:.2f}x")
    Console().print(r)
    Console().print(f"targets: {result['targets']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
