"""benchmarks/serving.py in quick mode: real engines under all three modes, real
kills; the benchmark itself refuses to report if any run's tokens differ from the
failure-free run. Only what cannot vary is asserted, never a timing."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "serving.py"


def test_serving_benchmark_quick_json_and_plots(capsys, tmp_path):
    main = runpy.run_path(str(BENCH), run_name="bench")["main"]
    assert main(["--quick", "--json", "--plots", str(tmp_path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["overhead"]["modes"]) == {"recompute", "replicate", "ec"}
    assert "decode_overhead" in d["overhead"]["modes"]["ec"]
    rows = d["recovery"]["rows"]
    assert [r["context_tokens"] for r in rows] == [64, 256]
    for r in rows:  # recompute redoes the whole context; ec rebuilds it from parity
        assert r["recompute"]["recomputed_tokens"] >= r["context_tokens"]
        assert r["ec"]["restored_bytes"] > 0 and r["ec"]["recomputed_tokens"] < r["context_tokens"]
    lat = d["latency"]["rows"]
    assert [r["failures"] for r in lat] == [0, 2]
    assert all(r[m]["p99_seconds"] >= r[m]["p50_seconds"] > 0 for r in lat for m in ("recompute", "ec"))
    assert lat[1]["recompute"]["recomputed_tokens"] > lat[1]["ec"]["recomputed_tokens"]
    for png in d["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
