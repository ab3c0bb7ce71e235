"""The CUDA code: compiles cleanly, computes what ISA-L computes, and (with a GPU) runs.

(a) Every ``cuda/*.cu`` builds with nvcc for sm_90 with warnings as errors, and
    ``gf256.cuh`` builds in host-only translation units (g++ through nvcc, and
    nvcc's host pass of a CUDA TU). Optionally the exact source CuPy compiles
    goes through NVRTC with CuPy's flags (when an NVRTC library is found).
(b) ``cuda/host_lib.cpp``, built with g++, runs the kernels' per-thread
    function (``gs_apply_slice`` of gf256.cuh) on the CPU; its output is
    compared byte for byte with ISA-L for encode and reconstruct over many
    shapes, lengths and pointer alignments, for both kernels' multipliers
    (product tables and log/exp) and for emulated grids of many threads. The
    CuPy backend's host-side mirrors (shared-memory size, split, tables) are
    compared with the C ones.
(c) ``@pytest.mark.gpu``: the CuPy backend itself against ISA-L; skipped
    without a CUDA device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import threading
import types
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.codec import RSCode, cupy_backend, gf
from ghostserve.codec.backends import cuda_device_present, load
from ghostserve.codec.isal import IsalBackend
from ghostserve.codec.reference import ReferenceBackend
from ghostserve.errors import BackendUnavailable, ShardError

CUDA_DIR = Path(__file__).resolve().parents[1] / "ghostserve" / "cuda"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
NVCC_WARN = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]

LENGTHS = (1, 3, 4, 5, 63, 64, 1000, 4097)
# Per-shard byte offsets from a 64-byte boundary: the same for all (word path with
# a head of 0..3 bytes) or mixed (byte path).
ALIGNMENTS = ("0", "1", "2", "3", "mixed")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def _assert_clean(proc: subprocess.CompletedProcess, what: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed:\n{out}"
    assert "warning" not in out.lower(), f"{what} warned:\n{out}"


# ------------------------------------------------------------------ (a) compile


def test_sources_present():
    assert (CUDA_DIR / "gf256.cuh").is_file()
    assert (CUDA_DIR / "rs_kernels.cu").is_file()
    assert (CUDA_DIR / "host_lib.cpp").is_file()


@needs_nvcc
@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cu")), ids=lambda p: p.name)
def test_nvcc_builds_without_warnings(source, tmp_path):
    cubin = tmp_path / (source.stem + ".cubin")
    proc = _run([NVCC, "-arch=sm_90", *NVCC_WARN, "-I", str(CUDA_DIR), "--cubin", "-o", str(cubin), str(source)])
    _assert_clean(proc, f"nvcc {source.name}")
    if source.name == "rs_kernels.cu":
        image = cubin.read_bytes()
        assert b"gs_matmul_tables" in image and b"gs_matmul_logexp" in image


HOST_TU = r"""
#include "gf256.cuh"
// Every host-visible piece of the header, instantiated outside any kernel.
unsigned char probe(const unsigned char* const* src, unsigned char* const* dst, unsigned long long len) {
    unsigned char coeffs[2] = {3, 0};
    static unsigned char tables[2 * 256];
    static unsigned char blob[800];
    gs::gs_build_product_tables(coeffs, 2, 1, tables);
    gs::gs_build_logexp_blob(coeffs, 2, 1, blob);
    const gs::GsTableMul t = {tables, 1};
    const gs::GsLogExpMul l = {blob, 1};
    gs::gs_apply_range(t, 2, 1, src, dst, len);
    gs::gs_apply_range(l, 2, 1, src, dst, len);
    return static_cast<unsigned char>(gs::gs_mul_slow(7, 9) ^ gs::gs_smem_bytes(2, 1, true));
}
"""


@needs_nvcc
@pytest.mark.parametrize("as_cuda", [False, True], ids=["c++", "cuda-host-pass"])
def test_header_in_host_only_translation_unit(as_cuda, tmp_path):
    """gf256.cuh as plain C++ through nvcc (no __CUDACC__) and in nvcc's host pass of
    a CUDA TU (GS_HD = __host__ __device__, memcpy branch), warnings as errors."""
    tu = tmp_path / ("probe.cu" if as_cuda else "probe.cpp")
    tu.write_text(HOST_TU)
    lang = ["-arch=sm_90"] if as_cuda else []
    for source in (tu, CUDA_DIR / "host_lib.cpp"):
        cmd = [NVCC, *lang, "-std=c++17", *NVCC_WARN, "-I", str(CUDA_DIR), "-c", "-o", str(tmp_path / "o.o")]
        if as_cuda:
            cmd += ["-x", "cu"]
        proc = _run([*cmd, str(source)])
        _assert_clean(proc, f"nvcc {'-x cu ' if as_cuda else ''}{source.name}")


def _find_nvrtc() -> str | None:
    env = os.environ.get("GHOSTSERVE_TEST_NVRTC")
    if env:
        return env
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    patterns = [os.path.join(p, "nvidia", "*", "lib", "libnvrtc.so*") for p in sys.path if p]
    patterns += ["/usr/local/cuda/lib64/libnvrtc.so*"]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if "builtins" not in path and "alt" not in os.path.basename(path):
                return path
    return None


def test_kernel_source_compiles_with_nvrtc():
    """The very text CupyBackend hands to cupy.RawModule, through NVRTC with the flags
    CuPy adds (--device-as-default-execution-space, -ftz=true, C++17, sm_90).
    Set GHOSTSERVE_TEST_NVRTC to a libnvrtc.so to force a library."""
    path = _find_nvrtc()
    if path is None:
        pytest.skip("no NVRTC library found (pip install nvidia-cuda-nvrtc, or set GHOSTSERVE_TEST_NVRTC)")
    try:
        nvrtc = ctypes.CDLL(path)
    except OSError as exc:
        pytest.skip(f"cannot load {path}: {exc}")
    vp = ctypes.c_void_p
    nvrtc.nvrtcCreateProgram.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, vp, vp]
    nvrtc.nvrtcCompileProgram.argtypes = [vp, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    nvrtc.nvrtcGetProgramLogSize.argtypes = [vp, ctypes.POINTER(ctypes.c_size_t)]
    nvrtc.nvrtcGetProgramLog.argtypes = [vp, ctypes.c_char_p]
    nvrtc.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(vp)]
    source = cupy_backend.kernel_source()
    assert '#include "' not in source
    prog = vp()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"rs_kernels.cu", 0, None, None) == 0
    opts = [b"-I" + str(CUDA_DIR).encode(), b"--device-as-default-execution-space", b"-ftz=true",
            b"-std=c++17", b"-arch=sm_90"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value + 1)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    assert rc == 0, text
    assert "warning" not in text.lower(), text


# ------------------------------------------------------- (b) host library vs ISA-L


@pytest.fixture(scope="session")
def hostlib(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    out = tmp_path_factory.mktemp("gshost") / "libgshost.so"
    proc = _run([GXX, "-O2", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wextra", "-Werror",
                 "-I", str(CUDA_DIR), str(CUDA_DIR / "host_lib.cpp"), "-o", str(out)])
    _assert_clean(proc, "g++ host_lib.cpp")
    lib = ctypes.CDLL(str(out))
    vp, pp, u64 = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint64
    for fn in (lib.gs_host_matmul, lib.gs_host_matmul_logexp):
        fn.argtypes = [vp, ctypes.c_int, ctypes.c_int, pp, pp, u64]
        fn.restype = ctypes.c_int
    lib.gs_host_matmul_grid.argtypes = [vp, ctypes.c_int, ctypes.c_int, pp, pp, u64, ctypes.c_int, u64]
    lib.gs_host_matmul_grid.restype = ctypes.c_int
    for fn in (lib.gs_host_mul, lib.gs_host_mul_slow):
        fn.argtypes = [ctypes.c_uint8, ctypes.c_uint8]
        fn.restype = ctypes.c_uint8
    lib.gs_host_split.argtypes = [pp, pp, ctypes.c_int, ctypes.c_int, u64,
                                  ctypes.POINTER(u64), ctypes.POINTER(u64)]
    lib.gs_host_split.restype = None
    lib.gs_host_smem_bytes.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.gs_host_smem_bytes.restype = u64
    lib.gs_host_block_threads.restype = ctypes.c_int
    for fn in (lib.gs_host_product_tables, lib.gs_host_logexp_blob):
        fn.argtypes = [vp, ctypes.c_int, ctypes.c_int, vp]
        fn.restype = None
    return lib


def _ptrs(views) -> ctypes.Array:
    return (ctypes.c_void_p * len(views))(*[v.ctypes.data for v in views])


def host_apply(lib, coeffs, src, dst, *, logexp=False, threads=1) -> None:
    """dst = coeffs * src with the host build of the kernels' code."""
    c = np.ascontiguousarray(coeffs, dtype=np.uint8)
    r, k = c.shape
    args = (c.ctypes.data, r, k, _ptrs(src), _ptrs(dst), len(src[0]))
    if threads == 1:
        rc = (lib.gs_host_matmul_logexp if logexp else lib.gs_host_matmul)(*args)
    else:
        rc = lib.gs_host_matmul_grid(*args, int(logexp), threads)
    assert rc == 0


def offsets_for(mode: str, n: int, rng: np.random.Generator) -> list[int]:
    if mode != "mixed":
        return [int(mode)] * n
    offs = [int(x) for x in rng.integers(0, 4, n)]
    if n > 1 and len(set(offs)) == 1:
        offs[-1] = (offs[-1] + 1) % 4
    return offs


def views(offsets, length: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """One view of ``length`` bytes per offset, starting ``offset`` bytes past a 64-byte
    boundary; random bytes, or 0xA5 garbage (outputs) without ``rng``."""
    out = []
    for off in offsets:
        buf = np.empty(length + 128, dtype=np.uint8)
        start = (-buf.ctypes.data) % 64 + off
        v = buf[start : start + length]
        v[:] = rng.integers(0, 256, length, dtype=np.uint8) if rng is not None else 0xA5
        out.append(v)
    return out


@cache
def isal_code(k: int, m: int) -> RSCode:
    return RSCode(k, m, "isal")


def erasure_patterns(k: int, m: int, rng: np.random.Generator) -> list[list[int]]:
    n = k + m
    pats = [list(range(m)), list(range(k, n)), [n - 1], sorted(rng.choice(n, m, replace=False).tolist())]
    return [list(p) for p in {tuple(p) for p in pats}]


def check_code(lib, k, m, length, mode, rng, *, logexp, threads=1) -> None:
    """Encode and reconstruct with the host build against ISA-L (parity) and the
    original shards (reconstruction)."""
    code = isal_code(k, m)
    data = views(offsets_for(mode, k, rng), length, rng)
    expected = code.encode(data)  # ISA-L, from the same (possibly unaligned) views
    parity = views(offsets_for(mode, m, rng), length)
    host_apply(lib, code.parity_matrix, data, parity, logexp=logexp, threads=threads)
    for j in range(m):
        assert np.array_equal(parity[j], expected[j]), f"parity {j} k={k} m={m} L={length} {mode}"
    shards = data + parity
    for erased in erasure_patterns(k, m, rng):
        survivors, coeffs = code.decode_matrix(erased)
        out = views(offsets_for(mode, len(erased), rng), length)
        host_apply(lib, coeffs, [shards[s] for s in survivors], out, logexp=logexp, threads=threads)
        for j, e in enumerate(sorted(erased)):
            assert np.array_equal(out[j], shards[e]), f"shard {e} of {erased} k={k} m={m} L={length} {mode}"


@pytest.mark.parametrize("m", range(1, 5))
@pytest.mark.parametrize("k", range(1, 11))
def test_host_build_matches_isal(hostlib, k, m):
    rng = np.random.default_rng(1000 * k + m)
    for length in LENGTHS:
        for mode in ALIGNMENTS:
            for logexp in (False, True):
                check_code(hostlib, k, m, length, mode, rng, logexp=logexp)


@pytest.mark.parametrize("threads", [2, 7, 256, 5000])
@pytest.mark.parametrize("logexp", [False, True])
def test_emulated_grid_covers_every_byte(hostlib, threads, logexp):
    """The work cut among many kernel threads (first = thread id, step = grid size)
    still writes every output byte, right."""
    rng = np.random.default_rng(threads)
    for k, m in ((1, 1), (4, 2), (10, 4)):
        for length in (1, 5, 1000, 4097):
            for mode in ("0", "3", "mixed"):
                check_code(hostlib, k, m, length, mode, rng, logexp=logexp, threads=threads)


@pytest.mark.parametrize("r,k", [(1, 1), (8, 3), (9, 5), (16, 2), (17, 30), (3, 200)])
def test_many_rows_and_zero_coefficients(hostlib, r, k):
    """r above the 8 outputs kept in registers per pass (several passes), and zero
    coefficients (the log/exp sentinel), against ISA-L and the reference backend."""
    rng = np.random.default_rng(r * 1000 + k)
    coeffs = rng.integers(0, 256, (r, k), dtype=np.uint8)
    coeffs[rng.random((r, k)) < 0.3] = 0
    coeffs[0, 0] = 1
    for length in (1, 7, 1001):
        for mode in ("0", "1", "mixed"):
            src = views(offsets_for(mode, k, rng), length, rng)
            want = [np.empty(length, np.uint8) for _ in range(r)]
            IsalBackend().matmul(coeffs, src, want)
            ref = [np.empty(length, np.uint8) for _ in range(r)]
            ReferenceBackend().matmul(coeffs, src, ref)
            assert all(np.array_equal(a, b) for a, b in zip(want, ref, strict=True))
            for logexp in (False, True):
                out = views(offsets_for(mode, r, rng), length)
                host_apply(hostlib, coeffs, src, out, logexp=logexp)
                assert all(np.array_equal(a, b) for a, b in zip(out, want, strict=True)), (logexp, mode, length)


@settings(max_examples=150, deadline=None)
@given(
    k=st.integers(1, 12),
    m=st.integers(1, 5),
    length=st.integers(1, 3000),
    offsets=st.lists(st.integers(0, 7), min_size=17, max_size=17),
    logexp=st.booleans(),
    threads=st.sampled_from([1, 1, 3, 64, 1024]),
    seed=st.integers(0, 2**32 - 1),
)
def test_host_build_random(hostlib, k, m, length, offsets, logexp, threads, seed):
    rng = np.random.default_rng(seed)
    code = isal_code(k, m)
    data = views(offsets[:k], length, rng)
    parity = views(offsets[k : k + m], length)
    host_apply(hostlib, code.parity_matrix, data, parity, logexp=logexp, threads=threads)
    expected = code.encode(data)
    assert all(np.array_equal(parity[j], expected[j]) for j in range(m))
    shards = data + parity
    erased = sorted(rng.choice(k + m, int(rng.integers(1, m + 1)), replace=False).tolist())
    survivors, coeffs = code.decode_matrix(erased)
    out = views(offsets[-len(erased):], length)
    host_apply(hostlib, coeffs, [shards[s] for s in survivors], out, logexp=logexp, threads=threads)
    assert all(np.array_equal(out[j], shards[e]) for j, e in enumerate(erased))


def test_gf_mul_matches_python(hostlib):
    table = gf.mul_table()
    got = np.array([[hostlib.gs_host_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    slow = np.array([[hostlib.gs_host_mul_slow(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    assert np.array_equal(got, table)
    assert np.array_equal(slow, table)


# ------------------------------------------ CuPy backend's host-side mirrors of the C


def test_launch_constants_match_header(hostlib):
    assert cupy_backend.BLOCK_THREADS == hostlib.gs_host_block_threads()
    for r in (1, 2, 4, 8, 9, 64, 254):
        for k in (1, 3, 10, 60, 128, 200, 254, 3000):
            for logexp in (0, 1):
                assert cupy_backend.smem_bytes(r, k, bool(logexp)) == hostlib.gs_host_smem_bytes(r, k, logexp)
            # whichever kernel is picked, its shared memory fits the default 48 KiB: all
            # r rows at once for any Reed-Solomon shape (r + k <= 255), else in chunks
            rows = cupy_backend.rows_per_launch(r, k)
            assert rows == r or r + k > 255
            assert 1 <= rows <= r
            assert cupy_backend.smem_bytes(rows, k, cupy_backend.uses_logexp(rows, k)) <= cupy_backend.SMEM_LIMIT
            if rows < r:
                assert cupy_backend.smem_bytes(rows + 1, k, True) > cupy_backend.SMEM_LIMIT


@pytest.mark.parametrize("r,k", [(1, 1), (4, 10), (3, 200), (17, 5)])
def test_device_tables_match_header(hostlib, r, k):
    rng = np.random.default_rng(r + k)
    coeffs = rng.integers(0, 256, (r, k), dtype=np.uint8)
    coeffs[0, -1] = 0
    tables = np.empty(r * k * 256, np.uint8)
    hostlib.gs_host_product_tables(coeffs.ctypes.data, r, k, tables.ctypes.data)
    assert np.array_equal(cupy_backend.product_tables(coeffs), tables)
    blob = cupy_backend.logexp_blob(coeffs)
    assert blob.size % 16 == 0 and blob.size == hostlib.gs_host_smem_bytes(r, k, 1) - ((8 * (r + k) + 15) & ~15)
    cblob = np.full(blob.size, 0x5A, np.uint8)
    hostlib.gs_host_logexp_blob(coeffs.ctypes.data, r, k, cblob.ctypes.data)
    assert np.array_equal(blob[1:], cblob[1:])
    # byte 512 is log(0): never read; both builders happen to store 0 there
    assert blob[cupy_backend.BLOB_LOG_OFFSET] == cblob[cupy_backend.BLOB_LOG_OFFSET] == 0


@settings(max_examples=200, deadline=None)
@given(
    addrs=st.lists(st.integers(0, 2**48), min_size=2, max_size=12),
    same=st.booleans(),
    length=st.integers(1, 100),
)
def test_split_matches_header(hostlib, addrs, same, length):
    if same:
        addrs = [a - (a % 4) + addrs[0] % 4 for a in addrs]
    k = len(addrs) // 2
    src, dst = addrs[:k], addrs[k:]
    head, nwords = ctypes.c_uint64(), ctypes.c_uint64()
    hostlib.gs_host_split((ctypes.c_void_p * k)(*src), (ctypes.c_void_p * len(dst))(*dst), len(dst), k, length,
                          ctypes.byref(head), ctypes.byref(nwords))
    assert cupy_backend.split(addrs, length) == (head.value, nwords.value)
    h, n = head.value, nwords.value
    assert h + 4 * n <= length and (n == 0 or (addrs[0] + h) % 4 == 0)


def test_grid_sizing():
    assert cupy_backend.grid_blocks(1, 1056) == 1
    assert cupy_backend.grid_blocks(256, 1056) == 1
    assert cupy_backend.grid_blocks(257, 1056) == 2
    assert cupy_backend.grid_blocks(10**9, 1056) == 1056
    assert cupy_backend.grid_blocks(0, 1056) == 1
    # H100: 132 SMs, 228 KiB and 2048 threads an SM
    assert cupy_backend.resident_blocks(132, 233472, 2048, 10 * 1024 + 112) == 132 * 8
    assert cupy_backend.resident_blocks(132, 233472, 2048, 48 * 1024) == 132 * 4
    assert cupy_backend.resident_blocks(1, 1024, 1024, 48 * 1024) == 1


def test_kernel_source_and_cuda_dir(monkeypatch, tmp_path):
    source = cupy_backend.kernel_source()
    assert '#include "' not in source
    assert source.count("GHOSTSERVE_GF256_CUH") >= 2
    assert 'extern "C" __global__' in source
    assert cupy_backend.cuda_dir() == CUDA_DIR
    monkeypatch.setenv("GHOSTSERVE_CUDA_DIR", str(tmp_path))
    assert cupy_backend.cuda_dir() == tmp_path


@pytest.mark.skipif(cuda_device_present(), reason="a CUDA device is present")
def test_cupy_backend_unavailable_without_device():
    with pytest.raises(BackendUnavailable) as err:
        load("cupy")
    assert err.value.backend == "cupy"
    assert RSCode(3, 2, "auto", threads=1).backend.name == "isal"


def test_cupy_backend_unavailable_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(BackendUnavailable, match="CuPy is not installed"):
        cupy_backend.CupyBackend()


# ------------------------------------- the CuPy backend: scenarios, emulated and real
#
# Each scenario takes a CuPy module. On the CPU it gets FakeCupy below: host
# arrays that claim to be CuPy arrays, and a RawModule whose kernels run
# ``gs_host_launch`` (the kernels' per-thread code over the launch's grid) after
# checking the launch itself: argument types and order, block size, grid, the
# shared memory asked for, the size of the table buffer, and that it is queued on
# the backend's stream after waiting for the caller's. On a GPU (marked gpu) the
# same scenarios run with the real CuPy.


def scenario_encode_reconstruct(cp, code: RSCode, lengths) -> None:
    k, m = code.k, code.m
    ref = isal_code(k, m)
    rng = np.random.default_rng(k * 10 + m)
    for length in lengths:
        data = rng.integers(0, 256, (k, length), dtype=np.uint8)
        parity = ref.encode(data)
        got = code.encode(cp.asarray(data))
        assert isinstance(got, cp.ndarray)
        assert np.array_equal(cp.asnumpy(got), parity), (k, m, length)
        full = np.concatenate([data, parity])
        assert code.verify(cp.asarray(full))
        for erased in erasure_patterns(k, m, rng):
            dev = cp.asarray(full)
            dev[erased] = 0
            code.reconstruct(dev, erased)
            assert np.array_equal(cp.asnumpy(dev), full), (k, m, length, erased)


def scenario_numpy_arrays(code: RSCode, lengths) -> None:
    k, m = code.k, code.m
    ref = isal_code(k, m)
    rng = np.random.default_rng(k * 7 + m)
    for length in lengths:
        data = rng.integers(0, 256, (k, length), dtype=np.uint8)
        parity = code.encode(data)
        assert isinstance(parity, np.ndarray)
        assert np.array_equal(parity, ref.encode(data))
        full = np.concatenate([data, parity])
        for erased in erasure_patterns(k, m, rng):
            work = full.copy()
            work[erased] = 0xEE
            code.reconstruct(work, erased)
            assert np.array_equal(work, full)
        # strided and unaligned host views, in and out
        wide = np.zeros((m, 2 * length + 1), np.uint8)
        code.encode_into([d[:] for d in data], [wide[j, 1::2] for j in range(m)])
        assert np.array_equal(wide[:, 1::2], ref.encode(data))
        assert not wide[:, 0::2].any()


def scenario_device_views(cp, code: RSCode, mode: str, lengths) -> None:
    k, m = code.k, code.m
    ref = isal_code(k, m)
    rng = np.random.default_rng(len(mode) + k)
    for length in lengths:
        offs = offsets_for(mode, k + m, rng)
        pool = cp.zeros((k + m, length + 64), dtype=cp.uint8)
        shards = [pool[i, offs[i] : offs[i] + length] for i in range(k + m)]
        data = rng.integers(0, 256, (k, length), dtype=np.uint8)
        for i in range(k):
            shards[i][...] = cp.asarray(data[i])
        code.encode_into(shards[:k], shards[k:])
        parity = ref.encode(data)
        assert all(np.array_equal(cp.asnumpy(shards[k + j]), parity[j]) for j in range(m))
        erased = sorted({0, k, k + m - 1})[:m]
        for e in erased:
            shards[e][...] = 0
        code.reconstruct(shards, erased)
        assert all(np.array_equal(cp.asnumpy(shards[i]), data[i]) for i in range(k))
        assert all(np.array_equal(cp.asnumpy(shards[k + j]), parity[j]) for j in range(m))
        # non-contiguous device views (step 2) in and out; a host shard among device ones
        strided = cp.zeros((m, 2 * length), dtype=cp.uint8)
        wide = cp.asarray(np.repeat(data, 2, axis=1))
        mixed = [wide[i, ::2] for i in range(k)]
        mixed[0] = data[0]
        code.encode_into(mixed, [strided[j, ::2] for j in range(m)])
        assert np.array_equal(cp.asnumpy(strided[:, ::2]), parity)
        assert not cp.asnumpy(strided[:, 1::2]).any()


def scenario_many_rows(cp, backend, r: int, k: int, lengths) -> None:
    """r above the 8 outputs of one pass; r*k beyond what one launch holds."""
    rng = np.random.default_rng(r + k)
    coeffs = rng.integers(0, 256, (r, k), dtype=np.uint8)
    coeffs[rng.random((r, k)) < 0.3] = 0
    for length in lengths:
        src = rng.integers(0, 256, (k, length), dtype=np.uint8)
        want = [np.empty(length, np.uint8) for _ in range(r)]
        ReferenceBackend().matmul(coeffs, list(src), want)
        out = cp.full((r, length), 0xA5, dtype=cp.uint8)
        backend.matmul(coeffs, list(cp.asarray(src)), list(out))
        assert np.array_equal(cp.asnumpy(out), np.stack(want)), (r, k, length)


def scenario_streams_and_threads(cp, code: RSCode, length: int) -> None:
    k, m = code.k, code.m
    ref = isal_code(k, m)
    host = np.random.default_rng(5).integers(0, 256, (k, length), dtype=np.uint8)
    with cp.cuda.Stream(non_blocking=True):
        data = cp.asarray(host)
        data *= 3  # queued on the caller's stream right before the encode
        parity = code.encode(data)
    assert np.array_equal(cp.asnumpy(parity), ref.encode(host * np.uint8(3)))

    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            local = np.random.default_rng(seed).integers(0, 256, (k, length // 7 + 3), dtype=np.uint8)
            for _ in range(3):
                assert np.array_equal(cp.asnumpy(code.encode(cp.asarray(local))), ref.encode(local))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors


SHAPES = [(1, 1), (3, 2), (8, 3), (10, 4), (60, 4), (100, 50)]  # (60, 4) and up: log/exp kernel
EMU_LENGTHS = [1, 3, 4, 5, 63, 64, 1000, 4097, 65_539]
GPU_LENGTHS = [*EMU_LENGTHS, (1 << 20) + 3, 1 << 24]


# ---------------------------------------------------------------- the emulated CuPy


class _Ptr:
    def __init__(self, ptr: int):
        self.ptr = ptr


class _Dev:
    def __init__(self, id: int = 0):  # noqa: A002 - CuPy's name
        self.id = id


class FakeDeviceArray(np.ndarray):
    """Host memory posing as a CuPy array (``type(a).__module__`` is "cupy")."""

    @property
    def data(self):  # CuPy: a MemoryPointer whose .ptr includes the view's offset
        return _Ptr(self.ctypes.data)

    @property
    def device(self):
        return _Dev(0)

    def set(self, arr, stream=None):
        assert self.flags.c_contiguous and isinstance(arr, np.ndarray) and arr.shape == self.shape
        self[...] = arr

    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is None:
            return np.array(self)
        assert isinstance(out, np.ndarray) and out.flags.c_contiguous and out.shape == self.shape
        out[...] = self
        return out


FakeDeviceArray.__module__ = "cupy"


class FakeCupy(types.ModuleType):
    """The part of CuPy that cupy_backend and the scenarios use, on the host."""

    SM_COUNT = 3

    def __init__(self, lib):
        super().__init__("cupy")
        self.lib = lib
        self.launches: list[dict] = []
        self.log: list[tuple] = []
        self.uint8, self.uint64 = np.uint8, np.uint64
        self.ndarray = FakeDeviceArray
        local = threading.local()
        fake = self

        class Stream:
            def __init__(self, null=False, non_blocking=False):
                self.non_blocking = non_blocking
                self.device_id = 0

            def __enter__(self):
                local.__dict__.setdefault("stack", []).append(self)
                return self

            def __exit__(self, *exc):
                local.stack.pop()

            def synchronize(self):
                fake.log.append(("sync", self))

            def wait_event(self, event):
                fake.log.append(("wait", self, event.stream))

        null = Stream(null=True)

        def current():
            stack = local.__dict__.get("stack") or [null]
            return stack[-1]

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False):
                self.stream = None

            def record(self, stream=None):
                self.stream = current() if stream is None else stream

        class Device:
            def __init__(self, device=None):
                self.id = 0 if device is None else device
                assert self.id == 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        class Kernel:
            def __init__(self, name):
                self.name = name

            def __call__(self, grid, block, args, *, shared_mem=0):
                fake.check_launch(self.name, grid, block, args, shared_mem, current())

        class RawModule:
            def __init__(self, code=None, *, options=()):
                assert '#include "' not in code and any(o.startswith("-I") for o in options)
                self.code = code

            def get_function(self, name):
                assert f"void __launch_bounds__(gs::GS_BLOCK_THREADS)\n    {name}(" in self.code
                return Kernel(name)

        rt = types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            cudaDevAttrMultiProcessorCount=16,
            cudaDevAttrMaxSharedMemoryPerMultiprocessor=81,
            cudaDevAttrMaxThreadsPerMultiProcessor=39,
        )
        attrs = {16: self.SM_COUNT, 81: 233472, 39: 2048}
        rt.deviceGetAttribute = lambda attr, dev: attrs[attr]
        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(
            runtime=rt, Device=Device, Stream=Stream, Event=Event, get_current_stream=current,
        )

    # array functions: fresh device memory is garbage, not zeros
    def empty(self, shape, dtype=np.uint8):
        return np.full(shape, 0xCD, dtype=dtype).view(FakeDeviceArray)

    def zeros(self, shape, dtype=np.uint8):
        return np.zeros(shape, dtype=dtype).view(FakeDeviceArray)

    def full(self, shape, value, dtype=np.uint8):
        return np.full(shape, value, dtype=dtype).view(FakeDeviceArray)

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeDeviceArray) and dtype is None:
            return a
        return np.array(a, dtype=dtype).view(FakeDeviceArray)

    def ascontiguousarray(self, a):
        return np.array(a, order="C").view(FakeDeviceArray)

    def asnumpy(self, a):
        return np.array(a)

    def check_launch(self, name, grid, block, args, shared_mem, stream) -> None:
        assert name in ("gs_matmul_tables", "gs_matmul_logexp")
        logexp = name == "gs_matmul_logexp"
        assert isinstance(grid, tuple) and len(grid) in (1, 2) and isinstance(block, tuple) and len(block) == 1
        blocks, threads = grid[0], block[0]
        sets = grid[1] if len(grid) == 2 else 1
        assert 1 <= sets <= cupy_backend.MAX_GRID_Y
        table, addrs, r, k, length = args
        # CuPy passes numpy scalars by their own size: int32, int32, uint64 as declared
        assert (type(r), type(k), type(length)) == (np.int32, np.int32, np.uint64)
        assert isinstance(table, FakeDeviceArray) and table.dtype == np.uint8 and table.ndim == 1
        assert table.flags.c_contiguous and table.ctypes.data % 16 == 0
        assert isinstance(addrs, FakeDeviceArray) and addrs.dtype == np.uint64 and addrs.ndim == 1
        assert addrs.shape[0] >= sets * (k + r) and addrs.flags.c_contiguous
        ptr_bytes = (8 * (int(r) + int(k)) + 15) & ~15
        assert table.size == self.lib.gs_host_smem_bytes(int(r), int(k), int(logexp)) - ptr_bytes
        resident = cupy_backend.resident_blocks(self.SM_COUNT, 233472, 2048, shared_mem)
        assert 1 <= blocks <= resident
        assert stream.non_blocking, "launched on the caller's stream, not the backend's"
        for y in range(sets):  # blocks with blockIdx.y = y take set y (rs_kernels.cu)
            rc = self.lib.gs_host_launch(int(logexp), table.ctypes.data, addrs.ctypes.data + 8 * y * (int(k) + int(r)),
                                         int(r), int(k), int(length), blocks, threads, shared_mem)
            assert rc == 0, f"gs_host_launch: {rc}"
        self.launches.append(dict(name=name, r=int(r), k=int(k), length=int(length), blocks=blocks,
                                  threads=threads, smem=shared_mem, sets=sets))
        self.log.append(("launch", stream))


@pytest.fixture
def fake_cp(hostlib, monkeypatch):
    lib = hostlib
    lib.gs_host_launch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64]
    lib.gs_host_launch.restype = ctypes.c_int
    fake = FakeCupy(lib)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def test_emulated_launch_is_checked(fake_cp):
    """gs_host_launch refuses what the GPU would refuse."""
    lib = fake_cp.lib
    buf = np.zeros(4 * 256, np.uint8)
    a = np.zeros((3, 8), np.uint8)
    addrs = np.array([a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data], np.uint64)
    need = lib.gs_host_smem_bytes(1, 2, 0)
    call = lambda blocks, threads, smem: lib.gs_host_launch(  # noqa: E731
        0, buf.ctypes.data, addrs.ctypes.data, 1, 2, 8, blocks, threads, smem)
    assert call(1, 256, need) == 0
    assert call(1, 257, need) == -3  # above __launch_bounds__
    assert call(0, 256, need) == -3
    assert call(1, 256, need - 1) == -3  # the kernel would trap
    assert call(1, 256, 48 * 1024 + 1) == -3  # needs an opt-in the backend does not make


@pytest.mark.parametrize("k,m", SHAPES)
def test_emulated_cupy_encode_reconstruct(fake_cp, k, m):
    code = RSCode(k, m, "cupy")
    assert code.backend.name == "cupy" and code.backend.accepts_device_arrays()
    scenario_encode_reconstruct(fake_cp, code, EMU_LENGTHS)
    for launch in fake_cp.launches:
        logexp = cupy_backend.uses_logexp(launch["r"], launch["k"])
        assert launch["name"] == ("gs_matmul_logexp" if logexp else "gs_matmul_tables")
    assert any(launch["name"] == "gs_matmul_logexp" for launch in fake_cp.launches) == (k * m * 256 > 48_000)
    assert all(launch["threads"] == 256 for launch in fake_cp.launches)
    # device inputs: the backend's stream waits for the caller's, launches, and the
    # caller's stream waits for it in turn: no host wait
    kinds = [entry[0] for entry in fake_cp.log]
    assert kinds[:3] == ["wait", "launch", "wait"] and "sync" not in kinds[:3]
    caller = fake_cp.cuda.get_current_stream()
    first, then = fake_cp.log[0], fake_cp.log[2]
    assert first[2] is caller and first[1] is not caller and then[1] is caller and then[2] is first[1]


@pytest.mark.parametrize("k,m", [(1, 1), (10, 4), (60, 4)])
def test_emulated_cupy_numpy_arrays(fake_cp, k, m):
    scenario_numpy_arrays(RSCode(k, m, "cupy"), [1, 3, 4097, 65_539])
    assert "wait" not in [entry[0] for entry in fake_cp.log]  # host-only calls need no wait


@pytest.mark.parametrize("mode", ALIGNMENTS)
def test_emulated_cupy_device_views(fake_cp, mode):
    scenario_device_views(fake_cp, RSCode(6, 3, "cupy"), mode, [1, 3, 63, 4097, 65_539])


@pytest.mark.parametrize("r,k", [(9, 5), (17, 30), (4, 200), (300, 180)])
def test_emulated_cupy_many_rows(fake_cp, r, k):
    backend = load("cupy")
    scenario_many_rows(fake_cp, backend, r, k, [1, 37, 1001])
    per_call = -(-r // cupy_backend.rows_per_launch(r, k))
    assert len(fake_cp.launches) == 3 * per_call
    assert per_call == 1 or r + k > 255


def test_emulated_cupy_streams_and_threads(fake_cp):
    scenario_streams_and_threads(fake_cp, RSCode(8, 3, "cupy"), 100_003)


@pytest.mark.parametrize("k,m,sets,length", [(4, 2, 7, 4097), (8, 3, 3, 65_539), (10, 4, 1, 1)])
def test_emulated_cupy_launch_batches_sets(fake_cp, k, m, sets, length):
    """The daemon's path: raw addresses, every set in one launch (grid y), on the
    caller's stream, no host wait; each set's parity equals ISA-L's."""
    backend = load("cupy")
    rng = np.random.default_rng(sets)
    data = [fake_cp.asarray(rng.integers(0, 256, (k, length), dtype=np.uint8)) for _ in range(sets)]
    parity = [fake_cp.empty((m, length)) for _ in range(sets)]
    coeffs = RSCode(k, m, "reference").parity_matrix
    stream = fake_cp.cuda.Stream(non_blocking=True)
    backend.launch(coeffs, [[d[i].ctypes.data for i in range(k)] for d in data],
                   [[p[j].ctypes.data for j in range(m)] for p in parity], length, stream)
    assert [launch["sets"] for launch in fake_cp.launches] == [sets] * len(fake_cp.launches)
    assert len(fake_cp.launches) == -(-m // cupy_backend.rows_per_launch(m, k))
    assert "sync" not in [entry[0] for entry in fake_cp.log]
    for d, p in zip(data, parity, strict=True):
        assert np.array_equal(np.asarray(p), RSCode(k, m, "isal").encode(np.asarray(d)))
    with pytest.raises(ShardError):
        backend.launch(coeffs, [[0] * (k - 1)], [[0] * m], length, stream)


def test_emulated_cupy_grid_is_capped(fake_cp):
    code = RSCode(4, 2, "cupy")
    code.encode(fake_cp.zeros((4, 1 << 20)))
    (launch,) = fake_cp.launches
    assert launch["blocks"] == cupy_backend.resident_blocks(FakeCupy.SM_COUNT, 233472, 2048, launch["smem"])


# ------------------------------------------------------------------ (c) on a GPU

gpu = pytest.mark.skipif(not cuda_device_present(), reason="needs CuPy and a CUDA device")


@pytest.fixture(scope="module")
def cp():
    import cupy  # noqa: PLC0415

    return cupy


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k,m", SHAPES)
def test_gpu_encode_reconstruct(cp, k, m):
    scenario_encode_reconstruct(cp, RSCode(k, m, "cupy"), GPU_LENGTHS)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k,m", [(1, 1), (10, 4), (60, 4)])
def test_gpu_numpy_arrays(k, m):
    scenario_numpy_arrays(RSCode(k, m, "cupy"), [1, 5, 4097, 300_001])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ALIGNMENTS)
def test_gpu_device_views(cp, mode):
    scenario_device_views(cp, RSCode(6, 3, "cupy"), mode, [1, 3, 63, 4097, 65_539, 1 << 20])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("r,k", [(9, 5), (17, 30), (4, 200), (300, 180)])
def test_gpu_many_rows(cp, r, k):
    scenario_many_rows(cp, load("cupy"), r, k, [1, 1001, 65_536])


@pytest.mark.gpu
@gpu
def test_gpu_streams_and_threads(cp):
    scenario_streams_and_threads(cp, RSCode(8, 3, "cupy"), 1 << 22)
