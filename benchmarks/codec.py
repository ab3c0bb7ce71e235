"""Codec benchmark: ghostserve's ``RSCode`` (ISA-L backend) against raw ISA-L and pyeclib.

    python benchmarks/codec.py [--json] [--quick] [--shapes 8x2,...] [--sizes 64KiB,1MiB,16MiB]

Every figure is a throughput in GB/s (1e9 bytes/s) of *data* bytes (k * L per
call, L the shard length), measured in this process against baselines measured
in the same process:

* ``encode_KxM_SIZE``: parity of a (k, L) uint8 array.
  ours = ``RSCode(k, m, "isal", threads=1).encode_into(data, parity)``;
  raw = ISA-L ``ec_encode_data`` called straight through ctypes with pointer
  arrays and tables built beforehand (the limit: no Python work but the call);
  pyeclib = ``ECDriver(k, m, "isa_l_rs_cauchy").encode(bytes)`` of the same k * L
  bytes (what a Python user would reach for).
* ``reconstruct_KxM_SIZE``: m data shards erased. ours = ``RSCode.reconstruct``;
  raw = ``ec_encode_data`` with the decode matrix from ``RSCode.decode_matrix``;
  pyeclib = ``ECDriver.decode`` of k surviving fragments (payload reconstruct).
* ``encode_KxM_SIZE_threadsN``: ours with ``threads=N`` (N = 1, 2, cpu count) on the
  largest shape and size asked for, against raw ISA-L on N threads too (the
  shard length split into N 64-byte aligned column ranges, one per thread of an
  N-thread pool: ``raw_threads``); ``speedup`` is ours against ours with threads=1.
  Ours runs one thread below 1 MiB per shard (``parallel_min_bytes``), so at small
  sizes ours/raw shows what that threshold costs or saves.

Implementations are timed in interleaved rounds (order rotated every round),
each measurement a loop of enough calls to last ``--min-time``; reported
throughputs are medians over rounds and ratios are medians of the per-round
ratios. Ours and raw ISA-L work on the very same buffers. Once per shape and
size the outputs are checked byte for byte: our parity against raw ISA-L's
(built from ISA-L's own Cauchy matrix) and against pyeclib's fragment payloads
(after their 80-byte header); reconstructed shards (ours, raw, pyeclib's
payload) against the originals. Each row records ``verified``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ghostserve.codec import RSCode, isal

PYECLIB_HEADER = 80  # liberasurecode's fragment_header_t
DEFAULT_SHAPES = "4x1,4x2,8x2"
DEFAULT_SIZES = "64KiB,1MiB,16MiB"
QUICK_SHAPES = "4x2,8x2"
QUICK_SIZES = "64KiB,1MiB"
TARGET_VS_RAW = 0.9
TARGET_VS_PYECLIB = 5.0
TARGET_MIN_SIZE = 1 << 20

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}


# ----------------------------------------------------------------------------- parsing


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64KiB, 1MiB, 16MiB, 4096)")
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[x+]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad shape {text!r} (e.g. 8x2 or 8+2)")
    k, m = int(match.group(1)), int(match.group(2))
    if k < 1 or m < 1 or k + m > 255:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: need k, m >= 1 and k + m <= 255")
    return k, m


def size_label(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def csv(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse_list(text: str) -> list[Any]:
        items = [parse(part) for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return list(dict.fromkeys(items))  # drop duplicates, keep order

    return parse_list


# ----------------------------------------------------------------------------- timing


def _time_loop(fn: Callable[[], Any], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return time.perf_counter() - start


def calibrate(fn: Callable[[], Any], min_time: float) -> int:
    """Calls per measurement so that one measurement lasts at least ``min_time``."""
    fn()  # warm up: tables, pools, page faults
    iters = 1
    while True:
        elapsed = _time_loop(fn, iters)
        if elapsed >= min_time:
            return iters
        if elapsed >= min_time / 8:
            return max(iters + 1, math.ceil(iters * min_time * 1.1 / elapsed))
        iters *= 8 if elapsed < min_time / 64 else 2


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, min_time: float) -> dict[str, list[float]]:
    """Seconds per call of every function, one sample per round, in rotated order."""
    iters = {name: calibrate(fn, min_time) for name, fn in fns.items()}
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_loop(fns[name], iters[name]) / iters[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def ratio(ours: list[float], base: list[float]) -> float:
    """Median over rounds of ours' throughput / the baseline's (paired by round)."""
    return statistics.median(b / o for o, b in zip(ours, base, strict=True))


# ----------------------------------------------------------------------------- raw ISA-L


class RawIsal:
    """``ec_encode_data`` with pointer arrays and tables built once: the floor."""

    def __init__(self, coeffs: np.ndarray, src_addrs: list[int], dst_addrs: list[int], length: int):
        self.lib = isal.library()
        self.tables = isal.init_tables(coeffs)
        self.tptr = self.tables.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))
        self.src = (ctypes.c_void_p * len(src_addrs))(*src_addrs)
        self.dst = (ctypes.c_void_p * len(dst_addrs))(*dst_addrs)
        self.args = (length, len(src_addrs), len(dst_addrs), self.tptr, self.src, self.dst)

    def __call__(self) -> None:
        self.lib.ec_encode_data(*self.args)


class RawIsalThreads:
    """Raw ISA-L on ``threads`` threads: the shard length split into that many
    64-byte aligned column ranges, each encoded by one thread of a pool of that
    size (the baseline for ours with the same ``threads``)."""

    def __init__(self, coeffs: np.ndarray, src_addrs: list[int], dst_addrs: list[int], length: int,
                 threads: int):
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        chunk = ((-(-length // threads)) + 63) & ~63
        self.parts = [RawIsal(coeffs, [a + off for a in src_addrs], [a + off for a in dst_addrs],
                              min(chunk, length - off)) for off in range(0, length, chunk)]
        self.pool = ThreadPoolExecutor(max_workers=threads) if len(self.parts) > 1 else None

    def __call__(self) -> None:
        if self.pool is None:
            self.parts[0]()
            return
        for f in [self.pool.submit(part) for part in self.parts]:
            f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def rows_addrs(a: np.ndarray, rows: Any) -> list[int]:
    return [a.ctypes.data + i * a.strides[0] for i in rows]


# ----------------------------------------------------------------------------- pyeclib


def prime_malloc() -> bool:
    """Raise glibc's dynamic mmap threshold to its 32 MiB ceiling (one malloc/free).

    pyeclib allocates fresh aligned buffers on every call. In a fresh process glibc
    serves those above 128 KiB with mmap, so each call page-faults its output in
    (about 15x slower at 1 MiB shards here); once the process has freed a large
    mmapped chunk, glibc raises the threshold and reuses heap memory instead. Which
    state pyeclib runs in would then depend on what ran before it, so this puts the
    process in the warm state of a long-running one, pyeclib's best case."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        malloc, free = libc.malloc, libc.free
    except (OSError, AttributeError):
        return False
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    chunk = malloc(31 << 20)  # mmapped, and under the 32 MiB DEFAULT_MMAP_THRESHOLD_MAX
    if not chunk:
        return False
    free(chunk)
    return True


# ----------------------------------------------------------------------------- benchmarks


def make_driver(k: int, m: int):
    from pyeclib.ec_iface import ECDriver  # noqa: PLC0415

    return ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")


def row(name: str, op: str, k: int, m: int, length: int, threads: int, samples: dict[str, list[float]],
        rounds: int, verified: bool) -> dict[str, Any]:
    nbytes = k * length
    ours = samples["ours"]
    return {
        "name": name, "op": op, "k": k, "m": m, "shard_bytes": length, "data_bytes": nbytes,
        "threads": threads,
        "raw_threads": threads if "raw" in samples else None,  # raw ISA-L on as many threads as ours
        "ours_gbps": gbps(nbytes, ours),
        "raw_gbps": gbps(nbytes, samples["raw"]) if "raw" in samples else None,
        "pyeclib_gbps": gbps(nbytes, samples["pyeclib"]) if "pyeclib" in samples else None,
        "ours_vs_raw": ratio(ours, samples["raw"]) if "raw" in samples else None,
        "ours_vs_pyeclib": ratio(ours, samples["pyeclib"]) if "pyeclib" in samples else None,
        "speedup_vs_threads1": None,
        "ours_us_per_call": statistics.median(ours) * 1e6,
        "raw_us_per_call": statistics.median(samples["raw"]) * 1e6 if "raw" in samples else None,
        "overhead_us_per_call": (statistics.median(o - b for o, b in zip(ours, samples["raw"], strict=True)) * 1e6
                                 if "raw" in samples else None),
        "rounds": rounds,
        "verified": verified,
    }


def bench_shape(k: int, m: int, length: int, rng: np.random.Generator, args) -> list[dict[str, Any]]:
    """encode_ and reconstruct_ rows for one shape and shard size.

    Ours and raw ISA-L read and write the very same buffers: where rows sit
    relative to each other (cache-set and 4K aliasing at power-of-two strides)
    moves ISA-L's speed by more than Python's overhead, so separate output
    buffers would compare memory layouts, not code."""
    label = f"{k}x{m}_{size_label(length)}"
    code = RSCode(k, m, "isal", threads=1)
    driver = make_driver(k, m)
    data = rng.integers(0, 256, (k, length), dtype=np.uint8)
    payload = data.tobytes()
    parity = np.empty((m, length), dtype=np.uint8)

    # ---- encode: verify once (raw from ISA-L's own generator, not ours), then time
    raw_encode = RawIsal(isal.cauchy1_matrix(k, m)[k:], rows_addrs(data, range(k)),
                         rows_addrs(parity, range(m)), length)
    raw_encode()
    expected = parity.copy()
    parity.fill(0)
    code.encode_into(data, parity)
    fragments = driver.encode(payload)
    ok_encode = bool(np.array_equal(parity, expected)) and len(fragments) == k + m
    for i, frag in enumerate(fragments):
        want = data[i] if i < k else expected[i - k]
        body = np.frombuffer(frag, dtype=np.uint8, offset=PYECLIB_HEADER)
        ok_encode = ok_encode and len(body) >= length and bool(np.array_equal(body[:length], want))

    enc = interleaved({
        "ours": lambda: code.encode_into(data, parity),
        "raw": raw_encode,
        "pyeclib": lambda: driver.encode(payload),
    }, args.rounds, args.min_time)
    rows = [row(f"encode_{label}", "encode", k, m, length, 1, enc, args.rounds, ok_encode)]

    # ---- reconstruct m erased shards (data shards first), in place in one stripe
    erased = [*range(min(m, k)), *range(k, k + m - min(m, k))]
    survivors, coeffs = code.decode_matrix(erased)
    stripe = np.concatenate([data, expected])
    lost = stripe[erased].copy()
    raw_rec = RawIsal(np.ascontiguousarray(coeffs), rows_addrs(stripe, survivors),
                      rows_addrs(stripe, erased), length)
    surviving_fragments = [fragments[i] for i in survivors]
    del fragments
    stripe[erased] = 0
    raw_rec()
    ok_rec = bool(np.array_equal(stripe[erased], lost))
    stripe[erased] = 0
    code.reconstruct(stripe, erased)
    ok_rec = ok_rec and bool(np.array_equal(stripe[erased], lost))
    ok_rec = ok_rec and driver.decode(surviving_fragments) == payload
    del lost

    rec = interleaved({
        "ours": lambda: code.reconstruct(stripe, erased),
        "raw": raw_rec,
        "pyeclib": lambda: driver.decode(surviving_fragments),
    }, args.rounds, args.min_time)
    rows.append(row(f"reconstruct_{label}", "reconstruct", k, m, length, 1, rec, args.rounds, ok_rec))
    return rows


def bench_threads(k: int, m: int, length: int, rng: np.random.Generator, args) -> list[dict[str, Any]]:
    """encode_..._threadsN rows: ours with a thread pool against raw ISA-L on as
    many threads, all writing the same parity."""
    label = f"{k}x{m}_{size_label(length)}"
    counts = list(dict.fromkeys([1, 2, os.cpu_count() or 1]))
    data = rng.integers(0, 256, (k, length), dtype=np.uint8)
    parity = np.empty((m, length), dtype=np.uint8)
    coeffs = isal.cauchy1_matrix(k, m)[k:]
    src, dst = rows_addrs(data, range(k)), rows_addrs(parity, range(m))
    raws = {t: RawIsalThreads(coeffs, src, dst, length, t) for t in counts}
    fns: dict[str, Callable[[], Any]] = {}
    verified: dict[int, bool] = {}
    raws[1]()
    expected = parity.copy()
    for t in counts:
        parity.fill(0)
        raws[t]()
        verified[t] = bool(np.array_equal(parity, expected))
        code = RSCode(k, m, "isal", threads=t)
        parity.fill(0)
        code.encode_into(data, parity)
        verified[t] = verified[t] and bool(np.array_equal(parity, expected))
        fns[f"t{t}"] = (lambda c: lambda: c.encode_into(data, parity))(code)
        fns[f"raw{t}"] = raws[t]
    del expected
    try:
        samples = interleaved(fns, args.rounds, args.min_time)
    finally:
        for raw in raws.values():
            raw.close()
    rows = []
    for t in counts:
        r = row(f"encode_{label}_threads{t}", "encode_threads", k, m, length, t,
                {"ours": samples[f"t{t}"], "raw": samples[f"raw{t}"]}, args.rounds, verified[t])
        r["speedup_vs_threads1"] = ratio(samples[f"t{t}"], samples["t1"])
        rows.append(r)
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["op"] != "encode" or r["shard_bytes"] < TARGET_MIN_SIZE:
            continue
        for metric, threshold in (("ours_vs_raw", TARGET_VS_RAW), ("ours_vs_pyeclib", TARGET_VS_PYECLIB)):
            out.append({"row": r["name"], "metric": metric, "value": r[metric], "threshold": threshold,
                        "met": r[metric] >= threshold})
    return out


def machine_info() -> dict[str, Any]:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        pyeclib_version = version("pyeclib")
    except Exception:  # pragma: no cover - metadata missing
        pyeclib_version = None
    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "isal_library": isal.library().path,
        "numpy_version": np.__version__,
        "pyeclib_version": pyeclib_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# ----------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="ghostserve codec vs raw ISA-L vs pyeclib (GB/s of data bytes)",
                  caption="raw: ISA-L's ec_encode_data called directly, on the row's thread count "
                          "(the shard split into that many column ranges); pyeclib: one thread. "
                          "vs threads=1: ours against ours on one thread.")
    for col in ("name", "threads", "ours GB/s", "raw GB/s", "pyeclib GB/s", "ours/raw (same threads)",
                "ours/pyeclib", "vs threads=1", "ok"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in result["rows"]:
        table.add_row(
            r["name"], str(r["threads"]), _fmt(r["ours_gbps"], ".2f"), _fmt(r["raw_gbps"], ".2f"),
            _fmt(r["pyeclib_gbps"], ".2f"),
            _fmt(r["ours_vs_raw"], ".3f", "x"), _fmt(r["ours_vs_pyeclib"], ".1f", "x"),
            _fmt(r["speedup_vs_threads1"], ".2f", "x"), "yes" if r["verified"] else "NO",
        )
    console = Console(width=140)
    console.print(table)
    info = result["machine"]
    cfg = result["config"]
    console.print(f"machine: {info['cpu_count']} cpus ({info['cpu_model']}), numpy {info['numpy_version']}, "
                  f"pyeclib {info['pyeclib_version']}, ISA-L {info['isal_library']}")
    console.print(f"rounds {cfg['rounds']}, >= {cfg['min_time_s'] * 1e3:.0f} ms per measurement, "
                  f"glibc mmap threshold primed: {cfg['malloc_primed']}, wall {result['wall_s']:.1f} s")
    for t in result["targets"]:
        mark = "met" if t["met"] else "NOT met"
        console.print(f"target {t['row']} {t['metric']} >= {t['threshold']}: {t['value']:.3f} ({mark})")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer shapes, sizes and shorter measurements")
    parser.add_argument("--shapes", type=csv(parse_shape), default=None,
                        help=f"k x m list (default {DEFAULT_SHAPES}; --quick {QUICK_SHAPES})")
    parser.add_argument("--sizes", type=csv(parse_size), default=None,
                        help=f"bytes per shard (default {DEFAULT_SIZES}; --quick {QUICK_SIZES})")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; --quick 5)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds per measurement (default 0.05; --quick 0.003)")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread-scaling rows")
    parser.add_argument("--cold-malloc", action="store_true",
                        help="do not pre-raise glibc's mmap threshold (pyeclib's worst case; see prime_malloc)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = csv(parse_shape)(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.sizes is None:
        args.sizes = csv(parse_size)(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.rounds is None:
        args.rounds = 5 if args.quick else 9
    if args.min_time is None:
        args.min_time = 0.003 if args.quick else 0.05
    if args.rounds < 1 or args.min_time <= 0:
        parser.error("--rounds must be >= 1 and --min-time > 0")

    def progress(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    primed = False if args.cold_malloc else prime_malloc()
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    for k, m in args.shapes:
        for length in args.sizes:
            progress(f"encode/reconstruct {k}x{m} {size_label(length)} ...")
            rows += bench_shape(k, m, length, rng, args)
    if not args.no_threads:
        k, m = max(args.shapes, key=lambda s: (s[0] + s[1], s[0]))
        length = max(args.sizes)
        progress(f"thread scaling {k}x{m} {size_label(length)} ...")
        rows += bench_threads(k, m, length, rng, args)

    result = {
        "benchmark": "codec",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/codec.py", *(sys.argv[1:] if argv is None else argv)]),
        "units": "GB/s = 1e9 data bytes (k * shard_bytes) per second; ratios are medians of per-round ratios",
        "machine": machine_info(),
        "config": {
            "shapes": [f"{k}x{m}" for k, m in args.shapes],
            "sizes": [size_label(s) for s in args.sizes],
            "rounds": args.rounds,
            "min_time_s": args.min_time,
            "quick": args.quick,
            "malloc_primed": primed,
        },
        "rows": rows,
        "targets": check_targets(rows),
        "all_verified": all(r["verified"] for r in rows),
        "wall_s": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["all_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
