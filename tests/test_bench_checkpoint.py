"""benchmarks/checkpoint.py in quick mode: it runs a real daemon process, restores a
rank byte-exactly for 4+2 and 8+2 (it asserts that itself) and reports one JSON
object. No timing is asserted; only what cannot vary."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoint.py"


def test_checkpoint_benchmark_quick_json(capsys):
    main = runpy.run_path(str(BENCH), run_name="bench")["main"]
    assert main(["--quick", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    dec = d["decode"]
    assert dec["steps"] == 40 and dec["commit_us_median"] > 0 and dec["lag_steps_max"] >= 0
    assert set(d["restore"]) == {"restore_4x2_2MiB", "restore_8x2_2MiB"}
    for name, (k, m) in (("restore_4x2_2MiB", (4, 2)), ("restore_8x2_2MiB", (8, 2))):
        res = d["restore"][name]
        assert res["code"] == f"{k}+{m}" and res["parity_over_replication"] == m / k
        assert res["restored_bytes"] == 4 * 8 * 64 * 1024  # every protected byte of the lost rank
        assert res["runs"] == len(res["restore_gbps_runs"]) == 2
        for key in ("restore_gbps", "memcpy_gbps", "traffic_limit_gbps"):
            assert res[key] > 0
        assert res["traffic_limit_gbps"] == pytest.approx(res["memcpy_gbps"] * 2 / (k + 1))
        assert res["restore_vs_traffic_limit"] == pytest.approx(res["restore_gbps"] / res["traffic_limit_gbps"])
        kern = res["kernel"]  # the fused pass alone, checked byte for byte inside the benchmark
        assert kern["kernel_gbps"] > 0 and kern["kernel_seconds"] > 0
        assert kern["kernel_vs_traffic_limit"] == pytest.approx(kern["kernel_gbps"] / kern["traffic_limit_gbps"])
    assert set(d["targets"]) == {"commit_median_le_100us", "lag_le_1_step_p99",
                                 "restore_4x2_2MiB_ge_half_traffic_limit", "restore_8x2_2MiB_ge_half_traffic_limit"}
