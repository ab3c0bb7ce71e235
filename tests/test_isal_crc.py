"""CRC32C as ghostserve computes it (``ghostserve.codec.isal.crc32c``): the routine
chosen for this CPU against a bit-by-bit reference, and the choice itself.

ISA-L's dispatcher does not pick its AVX-512 routine on every CPU that has it
(AMD Zen 4), so ghostserve picks it where the CPU reports what it executes; every
machine the suite runs on checks whichever routine it got."""

from __future__ import annotations

import ctypes

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.codec import isal


def reference(data: bytes, seed: int) -> int:
    """Reflected CRC32C (polynomial 0x82F63B78), bit by bit, with ISA-L's convention:
    ``seed`` in and the register out, no inversion."""
    c = seed
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c


def crc(data: bytes, seed: int = 0, start: int = 0) -> int:
    buf = np.zeros(len(data) + start + 1, dtype=np.uint8)
    buf[start : start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return isal.crc32c(buf.ctypes.data + start, len(data), seed)


def test_known_answer():
    assert crc(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=700), seed=st.integers(0, 2**32 - 1), start=st.integers(0, 63))
def test_equals_the_bitwise_reference(data, seed, start):
    assert crc(data, seed, start) == reference(data, seed)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1000, 70000), cut=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_long_inputs_chain_and_agree_with_the_portable_routine(n, cut, seed):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    k = int(cut * n)
    whole = crc(data, seed)
    assert whole == crc(data[k:], crc(data[:k], seed))
    base = isal.library()["crc32_iscsi_base"]
    base.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    base.restype = ctypes.c_uint32
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    assert whole == base(buf.ctypes.data, n, seed)


def test_the_avx512_routine_is_chosen_exactly_where_the_cpu_has_it():
    has = isal._BY16_FLAGS <= isal.cpu_flags() and hasattr(isal.library(), "crc32_iscsi_by16_10")
    assert (isal.crc32c_name() == "crc32_iscsi_by16_10") == has
    assert isal.crc32c_name() in ("crc32_iscsi_by16_10", "crc32_iscsi")
