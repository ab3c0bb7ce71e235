"""The run check the daemon's restore uses (ghostserve.codec.crcfold) against ISA-L's
CRC32C itself: the fold identity holds for any geometry, and any corrupted byte
of a run is caught."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.codec.crcfold import horner, pad_left, shift
from ghostserve.codec.isal import crc32c


def crc(buf: np.ndarray, seed: int = 0) -> int:
    buf = np.ascontiguousarray(buf)
    return crc32c(buf.ctypes.data, buf.size, seed)


def chunk_crcs(data: np.ndarray, cb: int) -> np.ndarray:
    """What the daemon stores: per chunk, CRC32C chained over the layers."""
    layers, width = data.shape
    out = np.zeros(width // cb, dtype=np.uint32)
    for c in range(width // cb):
        value = 0
        for layer in range(layers):
            value = crc(data[layer, c * cb : (c + 1) * cb], value)
        out[c] = value
    return out


geometry = st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 70), st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_shift_is_the_seed_part_of_crc32c(g):
    _, _, nbytes, seed = g
    buf = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    s = shift(nbytes)
    assert crc(buf, seed) == int(s(np.array([seed], dtype=np.uint32))[0]) ^ crc(buf, 0)
    # and the CRC of a concatenation follows from its parts
    other = np.random.default_rng(seed + 1).integers(0, 256, nbytes, dtype=np.uint8)
    assert crc(np.concatenate([other, buf])) == int(s(np.array([crc(other)], dtype=np.uint32))[0]) ^ crc(buf)


@settings(max_examples=60, deadline=None)
@given(geometry)
def test_layer_passes_fold_to_the_stored_chunk_checksums(g):
    layers, chunks, cb, seed = g
    data = np.random.default_rng(seed).integers(0, 256, (layers, chunks * cb), dtype=np.uint8)
    passes = np.array([crc(data[layer]) for layer in range(layers)], dtype=np.uint32)
    s = shift(cb)
    assert horner(passes, s) == horner(chunk_crcs(data, cb), s)


@settings(max_examples=60, deadline=None)
@given(geometry, st.data())
def test_any_flipped_byte_breaks_the_fold(g, draw):
    layers, chunks, cb, seed = g
    data = np.random.default_rng(seed).integers(0, 256, (layers, chunks * cb), dtype=np.uint8)
    stored = chunk_crcs(data, cb)
    layer = draw.draw(st.integers(0, layers - 1))
    at = draw.draw(st.integers(0, chunks * cb - 1))
    data[layer, at] ^= draw.draw(st.integers(1, 255))
    passes = np.array([crc(data[x]) for x in range(layers)], dtype=np.uint32)
    s = shift(cb)
    assert horner(passes, s) != horner(stored, s)


def test_left_padding_leaves_a_fold_unchanged():
    s = shift(16)
    rows = [np.array([5, 7, 11], dtype=np.uint32), np.array([3], dtype=np.uint32), np.array([], dtype=np.uint32)]
    padded = horner(pad_left(rows, 5), s)
    assert list(padded) == [int(horner(r[None, :], s)[0]) if len(r) else 0 for r in rows]
