"""What README.md and docs/operations.md say about the command line is true."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from ghostserve.config import Config
from ghostserve.demo_options import parse_modes
from ghostserve.integrations.sglang.options import ENV, PluginOptions

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def test_the_count_of_things_that_must_hold_matches_its_table():
    m = re.search(r"(\w+) things must hold:\n\n((?:\|.*\n)+)", OPERATIONS)
    assert m, "the deployment requirements table"
    rows = m.group(2).strip().splitlines()[2:]  # after the header and the rule
    assert WORDS[m.group(1)] == len(rows)


def test_every_environment_variable_the_readme_names_is_read():
    config = {f"GHOSTSERVE_{f.name.upper()}" for f in fields(Config)}
    config |= {ENV} | {f"{ENV}_{f.name.upper()}" for f in fields(PluginOptions)}  # the SGLang plug-in's
    elsewhere = {"GHOSTSERVE_BENCHMARKS", "GHOSTSERVE_CUDA_DIR", "GHOSTSERVE_PYTHON_SGLANG"}
    named = set(re.findall(r"GHOSTSERVE_[A-Z_]+[A-Z]", README))
    short = {f"GHOSTSERVE{s}" for s in re.findall(r"`(_[A-Z_]+[A-Z])`", README)}  # `_LISTEN`, ...
    assert named and short
    unknown = {v for v in named | short if v not in config | elsewhere and not v.endswith("_TLS")}
    assert unknown == set()
    for name in elsewhere:
        assert any(name in p.read_text() for p in (ROOT / "ghostserve").rglob("*.py")), name


def test_the_demo_modes_the_readme_names_are_accepted():
    quick_start = README.split("## Quick start")[1].split("##")[0]
    for mode in re.findall(r"`(recompute|none|replicate|ec)`", quick_start):
        assert parse_modes(mode)[-1] in ("none", "replicate", "ec")
    assert "--modes recompute,ec" in quick_start and parse_modes("recompute,ec") == ["none", "ec"]
