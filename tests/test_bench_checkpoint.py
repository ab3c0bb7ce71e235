"""benchmarks/checkpoint.py in quick mode: it runs a real daemon process, restores a
rank byte-exactly (it asserts that itself) and reports one JSON object. No timing
is asserted; only what cannot vary."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoint.py"


def test_checkpoint_benchmark_quick_json(capsys):
    main = runpy.run_path(str(BENCH), run_name="bench")["main"]
    assert main(["--quick", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    dec, res = d["decode"], d["restore"]
    assert dec["steps"] == 40 and dec["commit_us_median"] > 0 and dec["lag_steps_max"] >= 0
    assert res["code"] == "4+2" and res["parity_over_replication"] == 2 / 4
    assert res["restored_bytes"] == 4 * 8 * 64 * 1024  # every protected byte of the lost rank
    assert set(d["targets"]) == {"commit_median_le_100us", "lag_le_1_step_p99", "restore_ge_half_memcpy"}
