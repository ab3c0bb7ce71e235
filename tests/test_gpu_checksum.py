"""sum64, the GPU path's chunk checksum: compiles, matches its numpy oracle, detects
what its docstring says, and (with a GPU) runs.

(a) ``cuda/checksum_kernels.cu`` builds with nvcc for sm_90, warnings (and
    register spills, local memory) as errors; ``cuda/checksum_host.cpp`` builds
    as plain C++ and in nvcc's host pass; the exact source CuPy compiles goes
    through NVRTC when a library is found (tests/test_cuda.py builds every
    ``cuda/*.cu`` too).
(b) ``cuda/checksum_host.cpp``, built with g++, runs the kernel's per-thread
    code (``gs_sum_thread`` of checksum64.cuh) for every thread of an emulated
    launch, adding into the outputs as the kernel's atomics do; its results are
    compared, as 64-bit integers, with :func:`gpu_checksum.reference` (numpy), and
    that with a plain-int Python version, on random chunks: random piece splits,
    lengths not multiples of 8 (or 4, or 2), unaligned pieces, slot masks, seeds,
    grids. Misaligned loads, which a GPU could not make, are counted and fail.
(c) The properties the module docstring claims, on the reference.
(d) The launcher (``GpuChecksum``) against an emulated CuPy: host arrays posing as
    device arrays, a RawModule whose kernel checks the launch (grid, block,
    argument types and sizes, a zeroed output) and then runs the host build
    (``gs_host_checksum_launch``). What is emulated: CuPy itself, NVRTC (the
    source is checked for its kernel and for having no includes left; (a) compiles
    it) and the GPU's execution (the host build). Not emulated, so checked only in
    (e): warp shuffles and atomics, real device memory.
(e) ``@pytest.mark.gpu``: the same scenarios with the real CuPy on a CUDA device,
    plus a throughput figure (recorded as a junit property); skipped without one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.codec import gpu_checksum as gcs
from ghostserve.codec.backends import cuda_device_present
from ghostserve.errors import BackendUnavailable

CUDA_DIR = Path(__file__).resolve().parents[1] / "ghostserve" / "cuda"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
NVCC_WARN = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
M64 = (1 << 64) - 1


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def _assert_clean(proc: subprocess.CompletedProcess, what: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed:\n{out}"
    assert "warning" not in out.lower(), f"{what} warned:\n{out}"


# ------------------------------------------------------------------ (a) compile


@needs_nvcc
def test_kernel_builds_without_warnings_or_spills(tmp_path):
    cubin = tmp_path / "checksum_kernels.cubin"
    proc = _run([NVCC, "-arch=sm_90", *NVCC_WARN, "-Xptxas", "-warn-spills,-warn-lmem-usage", "-I", str(CUDA_DIR),
                 "--cubin", "-o", str(cubin), str(CUDA_DIR / "checksum_kernels.cu")])
    _assert_clean(proc, "nvcc checksum_kernels.cu")
    assert gcs.KERNEL.encode() in cubin.read_bytes()


@needs_nvcc
@pytest.mark.parametrize("as_cuda", [False, True], ids=["c++", "cuda-host-pass"])
def test_host_build_in_host_only_translation_units(as_cuda, tmp_path):
    cmd = [NVCC, *(["-arch=sm_90", "-x", "cu"] if as_cuda else []), "-std=c++17", *NVCC_WARN, "-I", str(CUDA_DIR),
           "-c", "-o", str(tmp_path / "o.o"), str(CUDA_DIR / "checksum_host.cpp")]
    _assert_clean(_run(cmd), f"nvcc {'-x cu ' if as_cuda else ''}checksum_host.cpp")


def _find_nvrtc() -> str | None:  # as tests/test_cuda.py
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
    """The text GpuChecksum hands to cupy.RawModule, through NVRTC with CuPy's flags."""
    path = _find_nvrtc()
    if path is None:
        pytest.skip("no NVRTC library found (pip install nvidia-cuda-nvrtc, or set GHOSTSERVE_TEST_NVRTC)")
    nvrtc = ctypes.CDLL(path)
    vp = ctypes.c_void_p
    nvrtc.nvrtcCreateProgram.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, vp, vp]
    nvrtc.nvrtcCompileProgram.argtypes = [vp, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    nvrtc.nvrtcGetProgramLogSize.argtypes = [vp, ctypes.POINTER(ctypes.c_size_t)]
    nvrtc.nvrtcGetProgramLog.argtypes = [vp, ctypes.c_char_p]
    nvrtc.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(vp)]
    source = gcs.kernel_source()
    prog = vp()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), gcs.SOURCE.encode(), 0, None, None) == 0
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


def test_kernel_source_is_self_contained(monkeypatch, tmp_path):
    source = gcs.kernel_source()
    assert '#include "' not in source
    assert "GHOSTSERVE_CHECKSUM64_CUH" in source and "GHOSTSERVE_GF256_CUH" in source
    assert f"void __launch_bounds__(gs::GS_SUM_THREADS)\n    {gcs.KERNEL}(" in source
    monkeypatch.setenv("GHOSTSERVE_CUDA_DIR", str(tmp_path))
    with pytest.raises(OSError):
        gcs.kernel_source()


# ------------------------------------------------------- (b) host build vs numpy


@pytest.fixture(scope="session")
def sumlib(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    out = tmp_path_factory.mktemp("gssum") / "libgssum.so"
    proc = _run([GXX, "-O2", "-shared", "-fPIC", "-std=c++17", "-Wall", "-Wextra", "-Werror",
                 "-I", str(CUDA_DIR), str(CUDA_DIR / "checksum_host.cpp"), "-o", str(out)])
    _assert_clean(proc, "g++ checksum_host.cpp")
    lib = ctypes.CDLL(str(out))
    u64, vp = ctypes.c_uint64, ctypes.c_void_p
    lib.gs_host_sum_mix.argtypes = [u64]
    lib.gs_host_sum_mix.restype = u64
    lib.gs_host_sum_term.argtypes = [u64, u64, u64]
    lib.gs_host_sum_term.restype = u64
    for fn in (lib.gs_host_sum_threads, lib.gs_host_sum_chunk_fields, lib.gs_host_sum_piece_fields):
        fn.restype = ctypes.c_int
    lib.gs_host_sum_thread.argtypes = [vp, vp, u64, u64, ctypes.POINTER(ctypes.c_int)]
    lib.gs_host_sum_thread.restype = u64
    lib.gs_host_checksum_launch.argtypes = [vp, vp, u64, vp, u64, u64, u64]
    lib.gs_host_checksum_launch.restype = ctypes.c_int
    return lib


def host_launch(lib, chunks: list[gcs.Chunk], gx: int, gy: int, block: int = gcs.THREADS) -> tuple[int, list[int]]:
    """(return code, sums) of an emulated gs_checksum64 launch over host memory."""
    desc, pieces = gcs.descriptors(chunks)
    desc = np.ascontiguousarray(desc.reshape(-1))
    pieces = np.ascontiguousarray(pieces.reshape(-1)) if pieces.size else np.zeros(2, np.uint64)
    out = np.zeros(max(1, len(chunks)), np.uint64)
    rc = lib.gs_host_checksum_launch(desc.ctypes.data, pieces.ctypes.data, len(chunks), out.ctypes.data, gx, gy,
                                     block)
    return rc, [int(x) for x in out[: len(chunks)]]


def int_reference(data: bytes, keep: list[bool] | None, seed: int) -> int:
    """sum64 in plain Python ints, straight from the definition (checks the numpy one)."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * gcs.MIX1) & M64
        z = ((z ^ (z >> 27)) * gcs.MIX2) & M64
        return z ^ (z >> 31)

    b = bytes(x if keep is None or keep[p] else 0 for p, x in enumerate(data))
    b += bytes(-len(b) % 8)
    total = 0
    for i in range(len(b) // 8):
        w = int.from_bytes(b[8 * i : 8 * i + 8], "little")
        total = (total + mix(w ^ (((seed + i) * gcs.KEY) & M64))) & M64
    return total


def placed(data: np.ndarray, offset: int, keep: list) -> np.ndarray:
    """A copy of ``data`` starting ``offset`` bytes past a 64-byte boundary, kept alive in ``keep``."""
    buf = np.full(data.size + 128, 0xEE, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    view = buf[start : start + data.size]
    view[:] = data
    keep.append(buf)
    return view


@st.composite
def chunk_specs(draw):
    """A chunk: layers x chunk_bytes, each layer cut into 1-4 pieces (empty ones too),
    each piece at its own offset from a 64-byte boundary; maybe a slot mask; a seed."""
    layers = draw(st.integers(1, 4))
    cb = draw(st.integers(0, 70))
    cuts = []
    for _ in range(layers):
        inner = sorted(draw(st.lists(st.integers(0, cb), max_size=3)))
        bounds = [0, *inner, cb]
        cuts.append([(bounds[j], bounds[j + 1], draw(st.integers(0, 15))) for j in range(len(bounds) - 1)])
    mask = None
    if cb and draw(st.booleans()):
        period = draw(st.one_of(st.just(cb), st.integers(1, cb + 9)))
        nslots = draw(st.integers(1, 12))
        mask = (period, nslots, draw(st.integers(0, nslots + 1)), draw(st.sampled_from([0, 2, 6])))
    seed = draw(st.one_of(st.just(0), st.integers(0, M64)))
    return layers, cb, cuts, mask, seed


def build_chunk(spec, rng: np.random.Generator, keep: list):
    """(Chunk over host memory, its bytes, slot map, fill) for a spec of chunk_specs."""
    layers, cb, cuts, mask, seed = spec
    data = rng.integers(0, 256, layers * cb, dtype=np.uint8)
    pieces = []
    for layer, layer_cuts in enumerate(cuts):
        for lo, hi, off in layer_cuts:
            view = placed(data[layer * cb + lo : layer * cb + hi], off, keep)
            pieces.append((view.ctypes.data, hi - lo))
    if mask is None:
        return gcs.Chunk(pieces, seed=seed, total=layers * cb), data, None, 0
    period, nslots, fill, map_off = mask
    slots = rng.integers(0, nslots, period, dtype=np.uint16)
    raw = placed(slots.view(np.uint8), map_off, keep)
    chunk = gcs.Chunk(pieces, slot_map=raw.ctypes.data, fill=fill, period=period, seed=seed, total=layers * cb)
    return chunk, data, slots, fill


def test_constants_match_header(sumlib):
    assert sumlib.gs_host_sum_threads() == gcs.THREADS
    assert sumlib.gs_host_sum_chunk_fields() == gcs.CHUNK_FIELDS
    assert sumlib.gs_host_sum_piece_fields() == gcs.PIECE_FIELDS


def test_mix_and_terms_match_header(sumlib):
    rng = np.random.default_rng(1)
    xs = np.concatenate([rng.integers(0, 2**64, 2000, dtype=np.uint64, endpoint=False),
                         np.array([0, 1, 2**63, M64, gcs.KEY], dtype=np.uint64)])
    assert [int(v) for v in gcs.mix64(xs)] == [sumlib.gs_host_sum_mix(int(x)) for x in xs]
    for seed in (0, 1, M64, int(rng.integers(0, 2**63))):
        words = rng.integers(0, 2**64, 300, dtype=np.uint64, endpoint=False)
        want = [sumlib.gs_host_sum_term(seed, 1000 + i, int(w)) for i, w in enumerate(words)]
        assert [int(t) for t in gcs.terms(words, seed, start=1000)] == want


@settings(max_examples=250, deadline=None)
@given(
    specs=st.lists(chunk_specs(), min_size=1, max_size=5),
    gx=st.sampled_from([1, 1, 2, 3, 5]),
    gy=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_host_build_matches_reference(sumlib, specs, gx, gy, seed):
    rng = np.random.default_rng(seed)
    keep: list = []
    built = [build_chunk(s, rng, keep) for s in specs]
    rc, got = host_launch(sumlib, [b[0] for b in built], gx, gy)
    assert rc == 0, "misaligned load" if rc == -2 else rc
    for (chunk, data, slots, fill), value in zip(built, got, strict=True):
        ref = reference_of(chunk, data, slots, fill)
        assert value == ref
        mask = None if slots is None else [int(slots[p % chunk.period]) < fill for p in range(data.size)]
        assert ref == int_reference(data.tobytes(), mask, chunk.seed)


def reference_of(chunk: gcs.Chunk, data: np.ndarray, slots, fill) -> int:
    if slots is None:
        return gcs.reference(data, seed=chunk.seed)
    return gcs.reference(data, slot_map=slots, fill=fill, period=chunk.period, seed=chunk.seed)


@pytest.mark.parametrize("offset", [0, 1, 2, 4, 6])
@pytest.mark.parametrize("masked", [False, True])
def test_host_build_realistic_chunk(sumlib, offset, masked):
    """32 layers of a 64 KiB chunk, 4 pieces a layer, the grid the launcher picks for
    an H100-sized device (132 SMs, 8 blocks each)."""
    rng = np.random.default_rng(offset)
    layers, cb = 32, 64 * 1024
    data = rng.integers(0, 256, layers * cb, dtype=np.uint8)
    keep: list = []
    pieces = []
    for layer in range(layers):
        for q in range(4):
            lo, hi = layer * cb + q * cb // 4, layer * cb + (q + 1) * cb // 4
            view = placed(data[lo:hi], offset if q % 2 else 0, keep)
            pieces.append((view.ctypes.data, hi - lo))
    slots = fill = None
    kw = {}
    if masked:
        slots = (np.arange(cb) // 1024).astype(np.uint16)  # 64 slots of 1 KiB
        fill = 37
        raw = placed(slots.view(np.uint8), 0, keep)
        kw = dict(slot_map=raw.ctypes.data, fill=fill, period=cb)
    chunk = gcs.Chunk(pieces, seed=gcs.seed_of(3, 0, 1), total=layers * cb, **kw)
    gx, gy = gcs.grid(1, layers * cb // 8, 132 * 8)
    assert gx > 1
    rc, (value,) = host_launch(sumlib, [chunk], gx, gy)
    assert rc == 0
    assert value == reference_of(chunk, data, slots, fill)


def test_full_mask_equals_no_mask_and_masked_bytes_do_not_count(sumlib):
    rng = np.random.default_rng(7)
    cb, layers = 96, 3
    data = rng.integers(0, 256, cb * layers, dtype=np.uint8)
    slots = rng.integers(0, 6, cb, dtype=np.uint16)
    keep: list = []
    view = placed(data, 0, keep)
    raw = placed(slots.view(np.uint8), 0, keep)

    def value(buf_fill: int | None) -> int:
        kw = {} if buf_fill is None else dict(slot_map=raw.ctypes.data, fill=buf_fill, period=cb)
        rc, (v,) = host_launch(sumlib, [gcs.Chunk([(view.ctypes.data, view.size)], **kw)], 2, 1)
        assert rc == 0
        return v

    plain = value(None)
    assert value(6) == value(2**64 - 1) == plain
    partial = value(3)
    assert partial != plain
    outside = np.nonzero(slots[np.arange(data.size) % cb] >= 3)[0]
    view[outside] ^= 0x5A  # bytes in unfilled slots: not covered
    assert value(3) == partial and value(None) != plain
    view[np.nonzero(slots[np.arange(data.size) % cb] < 3)[0][0]] ^= 1
    assert value(3) != partial


def test_emulated_launch_refuses_what_the_gpu_would(sumlib):
    data = np.arange(64, dtype=np.uint8)
    ok = gcs.Chunk([(data.ctypes.data, 64)])
    assert host_launch(sumlib, [ok], 1, 1)[0] == 0
    assert host_launch(sumlib, [ok], 1, 1, block=128)[0] == -3  # not the kernel's block
    assert host_launch(sumlib, [ok], 0, 1)[0] == -3
    assert host_launch(sumlib, [ok], 1, 65536)[0] == -3
    # descriptors the kernel traps on (built by hand: descriptors() refuses them)
    for patch in ({2: 63}, {2: 65}, {3: data.ctypes.data + 1, 5: 8}, {3: data.ctypes.data, 5: 0}):
        desc, pieces = gcs.descriptors([ok])
        for f, v in patch.items():
            desc[0, f] = v
        d, p = desc.reshape(-1).copy(), pieces.reshape(-1).copy()
        out = np.zeros(1, np.uint64)
        assert sumlib.gs_host_checksum_launch(d.ctypes.data, p.ctypes.data, 1, out.ctypes.data, 1, 1, 256) == -4


def test_odd_slot_map_is_refused(sumlib):
    """A slot map at an odd address would fault the kernel's 16-bit loads: the thread
    code flags it (the kernel traps) for any thread, and descriptors() refuses it."""
    data = np.arange(64, dtype=np.uint8)
    desc, pieces = gcs.descriptors([gcs.Chunk([(data.ctypes.data, 64)])])
    bad = ctypes.c_int()
    for first in range(3):
        d = desc[0].copy()
        d[3], d[4], d[5] = data.ctypes.data | 1, 1, 8
        assert sumlib.gs_host_sum_thread(d.ctypes.data, pieces.ctypes.data, first, 3, ctypes.byref(bad)) == 0
        assert bad.value == 1
    with pytest.raises(ValueError):
        gcs.descriptors([gcs.Chunk([(data.ctypes.data, 64)], slot_map=data.ctypes.data | 1, fill=1, period=8)])


def test_descriptors_and_grid():
    a = gcs.Chunk([(4096, 10), (8192, 0), (9000, 6)], seed=5)
    b = gcs.Chunk([], slot_map=64, fill=3, period=16)
    desc, pieces = gcs.descriptors([a, b])
    assert desc.tolist() == [[0, 3, 16, 0, 0, 0, 5], [3, 0, 0, 64, 3, 16, 0]]
    assert pieces.tolist() == [[4096, 10], [8192, 0], [9000, 6]]
    for bad in (gcs.Chunk([(0, 5)], total=6), gcs.Chunk([(1, 5)], slot_map=3, period=4),
                gcs.Chunk([(1, 5)], slot_map=4, period=0), gcs.Chunk([(-1, 5)]), gcs.Chunk([(M64, 2)])):
        with pytest.raises(ValueError):
            gcs.descriptors([bad])
    assert gcs.grid(1, 1, 1056) == (1, 1)
    assert gcs.grid(1, 10**9, 1056) == (2112, 1)
    assert gcs.grid(100, 4096, 1056) == (1, 100)
    assert gcs.grid(10**6, 10**9, 1056) == (1, gcs.MAX_GRID_Y)
    assert gcs.grid(4, 256 * 16 * 10, 1056) == (10, 4)


# --------------------------------------------------------- (c) the properties


def _unxorshift(y: np.ndarray, s: int) -> np.ndarray:
    x = y.copy()
    for _ in range(64 // s + 1):
        x = y ^ (x >> np.uint64(s))
    return x


def unmix64(y: np.ndarray) -> np.ndarray:
    y = _unxorshift(np.asarray(y, np.uint64), 31) * np.uint64(pow(gcs.MIX2, -1, 1 << 64))
    y = _unxorshift(y, 27) * np.uint64(pow(gcs.MIX1, -1, 1 << 64))
    return _unxorshift(y, 30)


def test_mix_is_a_bijection():
    """mix has an inverse (xor-shifts undone by iteration, odd multipliers by their
    inverses mod 2^64): so each term is a bijection of its word."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.integers(0, 2**64, 100_000, dtype=np.uint64, endpoint=False),
                        np.array([0, 1, M64, 2**63], np.uint64)])
    assert np.array_equal(unmix64(gcs.mix64(x)), x)
    assert gcs.KEY % 2 == gcs.MIX1 % 2 == gcs.MIX2 % 2 == 1


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 300), where=st.integers(0, 10**6), delta=st.integers(1, M64), seed=st.integers(0, M64),
       data_seed=st.integers(0, 2**32 - 1))
def test_any_change_within_one_word_is_detected(n, where, delta, seed, data_seed):
    data = np.random.default_rng(data_seed).integers(0, 256, n, dtype=np.uint8)
    i = where % ((n + 7) // 8)
    delta &= (1 << 8 * min(8, n - 8 * i)) - 1  # only bytes of the chunk
    bad = np.concatenate([data, np.zeros(-n % 8, np.uint8)])
    bad[8 * i : 8 * i + 8].view("<u8")[0] ^= np.uint64(delta or 1)
    assert not bad[n:].any()
    assert gcs.reference(bad[:n], seed=seed) != gcs.reference(data, seed=seed)


def _naive(words: np.ndarray) -> int:
    """The rejected design: SUM w_i * K(i) with K(i) odd."""
    k = gcs.mix64(np.arange(words.size, dtype=np.uint64)) | np.uint64(1)
    return int((words * k).sum(dtype=np.uint64))


def test_structured_two_word_errors_are_caught():
    """Bit 63 flipped in two words: 2^63 (K(i) + K(j)) = 0 mod 2^64 for any odd K,
    so a plain multiplicative sum misses it every time; sum64 misses none of these,
    nor random corruption of 2-16 words, nor swaps of two distinct words."""
    rng = np.random.default_rng(3)
    misses_naive = misses = 0
    trials = 2000
    for _ in range(trials):
        words = rng.integers(0, 2**64, 512, dtype=np.uint64, endpoint=False)
        i, j = rng.choice(512, 2, replace=False)
        bad = words.copy()
        bad[[i, j]] ^= np.uint64(1 << 63)
        misses_naive += _naive(bad) == _naive(words)
        misses += gcs.reference(bad) == gcs.reference(words)
        many = words.copy()
        hit = rng.choice(512, int(rng.integers(2, 17)), replace=False)
        many[hit] = rng.integers(0, 2**64, hit.size, dtype=np.uint64, endpoint=False)
        misses += gcs.reference(many) == gcs.reference(words) and not np.array_equal(many, words)
        swapped = words.copy()
        swapped[[i, j]] = swapped[[j, i]]
        misses += gcs.reference(swapped) == gcs.reference(words)
    assert misses_naive == trials
    assert misses == 0


def test_position_and_seed_dependence():
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 4096, dtype=np.uint8)
    base = gcs.reference(data)
    assert gcs.reference(np.roll(data, 8)) != base  # every word moved one position
    assert gcs.reference(data[::-1]) != base
    assert gcs.reference(data, seed=1) != base
    # all-zero chunks of different lengths (in words) differ; zero padding to a word does not
    zeros = [gcs.reference(np.zeros(n, np.uint8)) for n in (8, 16, 24)]
    assert len(set(zeros)) == 3 and gcs.reference(np.zeros(13, np.uint8)) == zeros[1]
    seeds = {gcs.seed_of(b, c, r) for b in range(20) for c in range(4) for r in range(8)}
    assert len(seeds) == 20 * 4 * 8


def test_split_does_not_matter():
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 1000, dtype=np.uint8)
    assert gcs.reference([data[:3], data[3:500], data[500:501], data[501:]]) == gcs.reference(data.tobytes())


# --------------------------------------------------- (d) launcher, emulated CuPy


class _Ptr:
    def __init__(self, ptr: int):
        self.ptr = ptr


class FakeDeviceArray(np.ndarray):
    """Host memory posing as a CuPy array."""

    @property
    def data(self):
        return _Ptr(self.ctypes.data)


FakeDeviceArray.__module__ = "cupy"


class FakeCupy(types.ModuleType):
    """What GpuChecksum uses of CuPy; its kernel checks the launch, then runs the host build."""

    SM_COUNT = 3

    def __init__(self, lib):
        super().__init__("cupy")
        self.lib = lib
        self.launches: list[dict] = []
        self.uint8, self.uint16, self.uint64 = np.uint8, np.uint16, np.uint64
        self.ndarray = FakeDeviceArray
        fake = self

        class Device:
            def __init__(self, device=None):
                self.id = 0 if device is None else device
                assert self.id == 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        class Kernel:
            def __call__(self, grid, block, args, *, shared_mem=0):
                fake.check_launch(grid, block, args, shared_mem)

        class RawModule:
            def __init__(self, code=None, *, options=()):
                assert '#include "' not in code and any(o.startswith("-I") for o in options)
                self.code = code

            def get_function(self, name):
                assert name == gcs.KERNEL and f"__launch_bounds__(gs::GS_SUM_THREADS)\n    {name}(" in self.code
                return Kernel()

        rt = types.SimpleNamespace(getDeviceCount=lambda: 1, cudaDevAttrMultiProcessorCount=16,
                                   cudaDevAttrMaxThreadsPerMultiProcessor=39)
        rt.deviceGetAttribute = lambda attr, dev: {16: self.SM_COUNT, 39: 2048}[attr]
        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(runtime=rt, Device=Device)

    def empty(self, shape, dtype=np.uint8):
        return np.full(shape, 0xCD, dtype=dtype).view(FakeDeviceArray)  # garbage, not zeros

    def zeros(self, shape, dtype=np.uint8):
        return np.zeros(shape, dtype=dtype).view(FakeDeviceArray)

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeDeviceArray) and dtype is None:
            return a
        return np.array(a, dtype=dtype).view(FakeDeviceArray)

    def asnumpy(self, a):
        return np.array(a)

    def check_launch(self, grid, block, args, shared_mem) -> None:
        assert isinstance(grid, tuple) and len(grid) == 2 and block == (gcs.THREADS,) and shared_mem == 0
        gx, gy = grid
        chunks, pieces, n, out = args
        assert type(n) is np.uint64  # CuPy passes numpy scalars by their size
        n = int(n)
        for a, size in ((chunks, n * gcs.CHUNK_FIELDS), (out, n)):
            assert isinstance(a, FakeDeviceArray) and a.dtype == np.uint64 and a.shape == (size,)
            assert a.flags.c_contiguous
        assert isinstance(pieces, FakeDeviceArray) and pieces.dtype == np.uint64 and pieces.ndim == 1
        assert pieces.size == gcs.PIECE_FIELDS * int(chunks.reshape(-1, gcs.CHUNK_FIELDS)[:, 1].sum())
        assert not out.any(), "the kernel adds into out: it must be zeroed"
        assert 1 <= gx * gy <= max(2 * self.SM_COUNT * 8, gy)  # about two waves at most
        rc = self.lib.gs_host_checksum_launch(chunks.ctypes.data, pieces.ctypes.data, n, out.ctypes.data, gx, gy,
                                              block[0])
        assert rc == 0, f"gs_host_checksum_launch: {rc}"
        self.launches.append(dict(grid=grid, n=n))


@pytest.fixture
def fake_cp(sumlib, monkeypatch):
    fake = FakeCupy(sumlib)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def scenario_random_chunks(cp, gc: gcs.GpuChecksum, sizes, seed: int = 0) -> None:
    """Chunks of layers x chunk_bytes in device memory, pieces at every offset mod 8,
    some masked, several per launch; compared with the reference."""
    rng = np.random.default_rng(seed)
    for cb, layers in sizes:
        pool = cp.zeros(4 * layers * (cb + 64) + 64, dtype=cp.uint8)
        chunks, want = [], []
        at = 0
        for c in range(4):
            host = rng.integers(0, 256, cb * layers, dtype=np.uint8)
            pieces = []
            for layer in range(layers):
                at += int(rng.integers(0, 8))
                cut = int(rng.integers(0, cb + 1))
                for lo, hi in ((0, cut), (cut, cb)):
                    view = pool[at : at + hi - lo]
                    view[...] = cp.asarray(host[layer * cb + lo : layer * cb + hi])
                    pieces.append(view)
                    at += hi - lo
            seed_c = gcs.seed_of(c, 0, 1)
            if c % 2:
                slots = (np.arange(cb) * 7 // max(cb, 1)).astype(np.uint16)
                fill = int(rng.integers(0, 8))
                chunks.append(gcs.Chunk.of(pieces, slot_map=cp.asarray(slots), fill=fill, seed=seed_c,
                                           total=cb * layers))
                want.append(gcs.reference(host, slot_map=slots, fill=fill, seed=seed_c))
            else:
                chunks.append(gcs.Chunk.of(pieces, seed=seed_c, total=cb * layers))
                want.append(gcs.reference(host, seed=seed_c))
        got = gc.checksums_host(chunks)
        assert got == want, (cb, layers)
        again = gc.checksums(chunks, out=cp.empty(len(chunks), dtype=cp.uint64))  # garbage out: zeroed
        assert [int(x) for x in cp.asnumpy(again)] == want


def scenario_many_chunks(cp, gc: gcs.GpuChecksum, n: int) -> None:
    """More chunks than a grid has rows (65535): each block row takes several."""
    rng = np.random.default_rng(n)
    host = rng.integers(0, 256, 8 * n, dtype=np.uint8)
    dev = cp.asarray(host)
    seeds = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    base = int(dev.data.ptr)
    chunks = [gcs.Chunk([(base + 8 * c, 5), (base + 8 * c + 5, 3)], seed=int(seeds[c])) for c in range(n)]
    want = gcs.mix64(host.view("<u8") ^ (seeds * np.uint64(gcs.KEY)))
    got = cp.asnumpy(gc.checksums(chunks))
    assert np.array_equal(got, want)


def test_emulated_random_chunks(fake_cp):
    gc = gcs.GpuChecksum()
    assert gc.resident == FakeCupy.SM_COUNT * 8
    scenario_random_chunks(fake_cp, gc, [(1, 1), (5, 3), (8, 2), (1027, 4), (64 * 1024, 3)])
    assert any(launch["grid"][0] > 1 for launch in fake_cp.launches)


def test_emulated_many_chunks(fake_cp):
    scenario_many_chunks(fake_cp, gcs.GpuChecksum(), gcs.MAX_GRID_Y + 1000)
    assert fake_cp.launches[-1]["grid"] == (1, gcs.MAX_GRID_Y)


def test_emulated_empty_inputs(fake_cp):
    gc = gcs.GpuChecksum()
    assert gc.checksums_host([]) == []
    assert gc.checksums_host([gcs.Chunk([]), gcs.Chunk([(4096, 0)])]) == [0, 0]
    assert fake_cp.launches == []
    with pytest.raises(ValueError):
        gc.checksums([gcs.Chunk([])], out=fake_cp.zeros(2, dtype=np.uint64))


def test_unavailable_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(BackendUnavailable, match="CuPy is not installed"):
        gcs.GpuChecksum()


# ------------------------------------------------------------------ (e) on a GPU

gpu = pytest.mark.skipif(not cuda_device_present(), reason="needs CuPy and a CUDA device")


@pytest.fixture(scope="module")
def cp():
    import cupy  # noqa: PLC0415

    return cupy


@pytest.mark.gpu
@gpu
def test_gpu_random_chunks(cp):
    gc = gcs.GpuChecksum()
    scenario_random_chunks(cp, gc, [(1, 1), (5, 3), (8, 2), (1027, 4), (64 * 1024, 3), (1 << 20, 5)], seed=1)


@pytest.mark.gpu
@gpu
def test_gpu_many_chunks(cp):
    scenario_many_chunks(cp, gcs.GpuChecksum(), gcs.MAX_GRID_Y + 1000)


@pytest.mark.gpu
@gpu
def test_gpu_throughput_and_determinism(cp, record_property):
    """256 MiB as 64 chunks of 32 layers x 128 KiB, one launch; repeated launches give
    the same values; throughput recorded (GB/s of chunk bytes), not asserted."""
    gc = gcs.GpuChecksum()
    layers, cb, n = 32, 128 * 1024, 64
    buf = cp.asarray(np.random.default_rng(6).integers(0, 256, layers * cb * n, dtype=np.uint8))
    view = buf.reshape(layers, n, cb)  # [layer][chunk][byte]: a chunk is one piece per layer
    chunks = [gcs.Chunk.of([view[layer, c] for layer in range(layers)], seed=c) for c in range(n)]
    first = cp.asnumpy(gc.checksums(chunks))
    host = cp.asnumpy(view)
    for c in (0, n - 1):
        assert int(first[c]) == gcs.reference([host[layer, c] for layer in range(layers)], seed=c)
    cp.cuda.Device().synchronize()
    runs = 10
    start = time.perf_counter()
    for _ in range(runs):
        out = gc.checksums(chunks)
    cp.cuda.Device().synchronize()
    seconds = (time.perf_counter() - start) / runs
    assert np.array_equal(cp.asnumpy(out), first)
    gbps = buf.nbytes / seconds / 1e9
    record_property("sum64_GBps", round(gbps, 1))
    print(f"sum64: {gbps:.1f} GB/s over {buf.nbytes >> 20} MiB in {n} chunks")
