"""What a non-editable install holds: the CUDA kernels are package data (the
daemon compiles them at run time with NVRTC), so ``pip install ghostserve`` from a
wheel finds them where :func:`ghostserve.codec.cupy_backend.cuda_dir` looks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_cuda_kernels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ghostserve", src / "ghostserve", ignore=shutil.ignore_patterns("__pycache__", "*.nbi",
                                                                                              "*.nbc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("ghostserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ghostserve" / "cuda").iterdir()
               if p.suffix in (".cu", ".cuh", ".cpp")}
    assert {"ghostserve/cuda/rs_kernels.cu", "ghostserve/cuda/gf256.cuh",
            "ghostserve/cuda/checksum_kernels.cu"} <= kernels
    assert kernels <= names, sorted(kernels - names)
