"""benchmarks/codec.py runs, prints one JSON object, and its outputs are byte-exact
(ours against raw ISA-L and pyeclib). Never asserts on timing."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "codec.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("pyeclib")
    spec = importlib.util.spec_from_file_location("ghostserve_bench_codec", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_json(bench, capsys):
    rc = bench.main(["--quick", "--json", "--shapes", "4x2", "--sizes", "64KiB"])
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON document: trailing text would fail here
    assert isinstance(result, dict)
    assert rc == 0

    rows = {r["name"]: r for r in result["rows"]}
    assert {"encode_4x2_64KiB", "reconstruct_4x2_64KiB",
            "encode_4x2_64KiB_threads1", "encode_4x2_64KiB_threads2"} <= set(rows)
    for r in rows.values():
        assert r["verified"] is True, r["name"]
        for key in ("ours_gbps", "raw_gbps"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
    for name in ("encode_4x2_64KiB", "reconstruct_4x2_64KiB"):
        r = rows[name]
        assert r["k"] == 4 and r["m"] == 2 and r["shard_bytes"] == 64 * 1024
        for key in ("pyeclib_gbps", "ours_vs_raw", "ours_vs_pyeclib"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
    assert rows["encode_4x2_64KiB_threads1"]["speedup_vs_threads1"] == pytest.approx(1.0)
    # every row's raw ISA-L baseline ran on as many threads as ours did
    for r in rows.values():
        assert r["raw_threads"] == r["threads"], r["name"]
    assert rows["encode_4x2_64KiB_threads2"]["threads"] == 2
    assert result["all_verified"] is True

    machine = result["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["isal_library"]
    assert machine["numpy_version"]


def test_parsing(bench):
    assert bench.parse_size("64KiB") == 65536
    assert bench.parse_size("16MiB") == 16 << 20
    assert bench.parse_size("4096") == 4096
    assert bench.parse_shape("8x2") == (8, 2) == bench.parse_shape("8+2")
    assert bench.size_label(1 << 20) == "1MiB"
    assert bench.size_label(1000) == "1000B"


def test_threads_baseline_is_raw_isal_on_as_many_threads(bench):
    import numpy as np

    from ghostserve.codec import isal

    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 100_000), dtype=np.uint8)
    one, two = np.zeros((2, 100_000), dtype=np.uint8), np.zeros((2, 100_000), dtype=np.uint8)
    coeffs = isal.cauchy1_matrix(4, 2)[4:]
    raws = [bench.RawIsalThreads(coeffs, bench.rows_addrs(data, range(4)), bench.rows_addrs(out, range(2)),
                                 100_000, t) for out, t in ((one, 1), (two, 2))]
    for raw in raws:
        raw()
        raw.close()
    assert len(raws[0].parts) == 1 and len(raws[1].parts) == 2  # two column ranges, two threads
    assert raws[1].pool is not None and raws[1].pool._max_workers == 2
    assert np.array_equal(one, two) and one.any()  # same parity either way


def test_table_says_what_the_baselines_are(bench, capsys):
    assert bench.main(["--quick", "--shapes", "4x2", "--sizes", "64KiB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ours/raw (same threads)" in out
    assert "raw: ISA-L's ec_encode_data called directly, on the row's thread count" in out
