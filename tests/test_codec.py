"""The codec against its oracles: ISA-L's own matrix and encoder, pyeclib's
payloads, and the numpy reference backend."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.codec import RSCode, backends, gf, isal
from ghostserve.errors import (
    BackendUnavailable,
    InvalidCodeParameters,
    ShardError,
    ShardSizeMismatch,
    SingularMatrixError,
    TooManyErasures,
)

CPU_BACKENDS = ["isal", "reference"]


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def raw_isal_parity(k: int, m: int, data: np.ndarray) -> np.ndarray:
    """Parity through ISA-L's own matrix and ec_encode_data, nothing of ours."""
    tables = isal.init_tables(isal.cauchy1_matrix(k, m)[k:])
    parity = np.zeros((m, data.shape[1]), dtype=np.uint8)
    data = np.ascontiguousarray(data)
    isal.encode_raw(tables, data.shape[1], [data[i].ctypes.data for i in range(k)],
                    [parity[j].ctypes.data for j in range(m)])
    return parity


# ----------------------------------------------------------------------------- GF(2^8)


@pytest.mark.parametrize("k,m", [(1, 1), (4, 1), (4, 2), (8, 2), (8, 3), (10, 4), (32, 8), (200, 55)])
def test_cauchy_matrix_equals_isal(k, m):
    assert np.array_equal(gf.cauchy_matrix(k, m), isal.cauchy1_matrix(k, m))


def test_field_axioms_on_every_element():
    for a in range(1, 256):
        assert gf.mul(a, gf.inv(a)) == 1
        assert gf.mul(a, 1) == a and gf.mul(a, 0) == 0
    t = gf.mul_table()
    assert np.array_equal(t, t.T)
    # x * 2 is a shift reduced by 0x11D
    for a in range(256):
        expected = (a << 1) ^ (0x11D if a & 0x80 else 0)
        assert t[a, 2] == expected


def test_invert_gives_identity_and_reports_singular():
    g = gf.cauchy_matrix(6, 3)
    sub = g[[0, 2, 5, 6, 7, 8]]
    assert np.array_equal(gf.matmul(sub, gf.invert(sub)), np.eye(6, dtype=np.uint8))
    singular = np.array([[1, 2], [1, 2]], dtype=np.uint8)
    with pytest.raises(SingularMatrixError) as info:
        gf.invert(singular, rows=(3, 4))
    assert info.value.rows == (3, 4)


# ----------------------------------------------------------------------------- encode


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("k,m,length", [(1, 1, 1), (4, 1, 7), (4, 2, 4096), (8, 2, 1000), (8, 3, 65537), (12, 4, 33)])
def test_encode_equals_raw_isal(backend, k, m, length):
    rng = np.random.default_rng(k * 100 + m)
    data = rand(rng, k, length)
    assert np.array_equal(RSCode(k, m, backend).encode(data), raw_isal_parity(k, m, data))


@pytest.mark.parametrize("k,m,length", [(4, 2, 4000), (8, 2, 1 << 16), (6, 3, 12345), (10, 4, 999)])
def test_parity_equals_pyeclib_payloads(k, m, length):
    pyeclib = pytest.importorskip("pyeclib.ec_iface")
    driver = pyeclib.ECDriver(k=k, m=m, ec_type="isa_l_rs_cauchy")
    payload = rand(np.random.default_rng(length), k * length).tobytes()
    fragments = [f[80:] for f in driver.encode(payload)]  # strip liberasurecode's header
    frag_len = len(fragments[0])
    data = np.stack([np.frombuffer(f, dtype=np.uint8) for f in fragments[:k]])
    parity = RSCode(k, m, "isal").encode(data)
    assert parity.shape == (m, frag_len)
    for j in range(m):
        assert parity[j].tobytes() == fragments[k + j]


def test_encode_into_writes_in_place_without_new_arrays():
    rng = np.random.default_rng(1)
    data, parity = rand(rng, 8, 5000), np.zeros((2, 5000), dtype=np.uint8)
    code = RSCode(8, 2, "isal")
    code.encode_into(data, parity)
    assert np.array_equal(parity, raw_isal_parity(8, 2, data))


def test_encode_accepts_buffer_sequences_of_every_kind():
    rng = np.random.default_rng(2)
    data = rand(rng, 4, 333)
    expected = raw_isal_parity(4, 2, data)
    big = rand(rng, 4 * 400 + 3)
    for i in range(4):  # odd offsets inside one larger region, like KV shards
        big[3 + i * 400 : 3 + i * 400 + 333] = data[i]
    views = [big[3 + i * 400 : 3 + i * 400 + 333] for i in range(4)]
    kinds = [
        list(data),
        [memoryview(data[i].tobytes()) for i in range(4)],
        [bytes(data[i]) for i in range(4)],
        [bytearray(data[i].tobytes()) for i in range(4)],
        views,
    ]
    out = bytearray(2 * 333)
    parity_views = [memoryview(out)[:333], memoryview(out)[333:]]
    for kind in kinds:
        assert np.array_equal(RSCode(4, 2, "isal").encode(kind), expected)
        RSCode(4, 2, "isal").encode_into(kind, parity_views)
        assert bytes(out) == expected.tobytes()


def test_torch_cpu_tensors_are_accepted_without_copy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    data = rand(rng, 4, 100)
    tensors = [torch.from_numpy(data[i].copy()) for i in range(4)]
    parity = [torch.zeros(100, dtype=torch.uint8) for _ in range(2)]
    RSCode(4, 2, "isal").encode_into(tensors, parity)
    assert np.array_equal(np.stack([p.numpy() for p in parity]), raw_isal_parity(4, 2, data))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encode_range_costs_and_touches_only_that_range(backend):
    rng = np.random.default_rng(4)
    code = RSCode(5, 2, backend)
    data = rand(rng, 5, 4096)
    parity = code.encode(data)
    data[:, 1000:1100] = rand(rng, 5, 100)  # a "decode step" writes 100 bytes of each shard
    sentinel = parity.copy()
    code.encode_range(data, parity, 1000, 1100)
    assert np.array_equal(parity, code.encode(data))
    assert np.array_equal(parity[:, :1000], sentinel[:, :1000])
    assert np.array_equal(parity[:, 1100:], sentinel[:, 1100:])
    with pytest.raises(ShardError):
        code.encode_range(data, parity, 100, 5000)


def test_threaded_encode_equals_single_threaded():
    rng = np.random.default_rng(5)
    data = rand(rng, 8, (3 << 20) + 17)  # not a multiple of the chunk
    one = RSCode(8, 3, "isal", threads=1).encode(data)
    many = RSCode(8, 3, "isal", threads=3, parallel_min_bytes=1 << 16).encode(data)
    assert np.array_equal(one, many)


# ----------------------------------------------------------------------------- reconstruct


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("m", range(1, 4))
def test_every_erasure_pattern_up_to_m(k, m):
    rng = np.random.default_rng(k * 10 + m)
    code = RSCode(k, m, "isal")
    data = rand(rng, k, 37)
    full = np.concatenate([data, code.encode(data)])
    for count in range(1, m + 1):
        for erased in itertools.combinations(range(k + m), count):
            shards = full.copy()
            shards[list(erased)] = rng.integers(0, 256, (count, 37), dtype=np.uint8)
            code.reconstruct(shards, erased)
            assert np.array_equal(shards, full), erased


def test_reference_backend_reconstructs_like_isal():
    rng = np.random.default_rng(6)
    ref, fast = RSCode(6, 3, "reference"), RSCode(6, 3, "isal")
    data = rand(rng, 6, 501)
    full = np.concatenate([data, fast.encode(data)])
    for erased in [(0,), (1, 7), (2, 4, 8), (6, 7, 8)]:
        a, b = full.copy(), full.copy()
        a[list(erased)] = 0
        b[list(erased)] = 0
        ref.reconstruct(a, erased)
        fast.reconstruct(b, erased)
        assert np.array_equal(a, full) and np.array_equal(b, full)


def test_decode_matrices_are_cached_per_pattern():
    code = RSCode(8, 2, "isal")
    first = code.decode_matrix([3, 1])
    assert code.decode_matrix([1, 3]) is first
    assert code.decode_matrix([0]) is not first


def test_verify_detects_any_flipped_byte():
    rng = np.random.default_rng(7)
    code = RSCode(4, 2, "isal")
    data = rand(rng, 4, 256)
    full = np.concatenate([data, code.encode(data)])
    assert code.verify(full)
    for row in range(6):
        bad = full.copy()
        bad[row, rng.integers(256)] ^= 1 + rng.integers(255)
        assert not code.verify(bad)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 12),
    m=st.integers(1, 5),
    length=st.integers(1, 3000),
    offset=st.integers(0, 7),
    stride=st.sampled_from([1, 1, 2, 3]),
    seed=st.integers(0, 2**32 - 1),
    data_ok=st.data(),
)
def test_property_roundtrip_on_offset_and_strided_views(k, m, length, offset, stride, seed, data_ok):
    rng = np.random.default_rng(seed)
    code = RSCode(k, m, "isal")
    region = rand(rng, k + m, offset + length * stride + 5)
    views = [region[i, offset : offset + length * stride : stride] for i in range(k + m)]
    code.encode_into(views[:k], views[k:])
    packed = np.stack([v.copy() for v in views])
    assert np.array_equal(packed[k:], raw_isal_parity(k, m, packed[:k]))
    assert np.array_equal(packed[k:], RSCode(k, m, "reference").encode(packed[:k]))
    erased = data_ok.draw(st.lists(st.integers(0, k + m - 1), min_size=1, max_size=m, unique=True))
    before = region.copy()
    for e in erased:
        views[e][:] = rng.integers(0, 256, length, dtype=np.uint8)
    code.reconstruct(views, erased)
    assert np.array_equal(np.stack(views), packed)
    assert np.array_equal(region, before)  # nothing outside the views was touched
    assert code.verify(views)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("k,m", [(0, 1), (1, 0), (-1, 2), (200, 56), (255, 1), (2.0, 1), (True, 1)])
def test_bad_code_parameters(k, m):
    with pytest.raises(InvalidCodeParameters):
        RSCode(k, m, "isal")


def test_bad_shards_raise_documented_errors_and_write_nothing():
    code = RSCode(4, 2, "isal")
    good = np.zeros((4, 16), dtype=np.uint8)
    parity = np.full((2, 16), 7, dtype=np.uint8)
    with pytest.raises(ShardError):
        code.encode(good.astype(np.uint16))
    with pytest.raises(ShardError):
        code.encode(np.zeros((3, 16), dtype=np.uint8))
    with pytest.raises(ShardSizeMismatch) as info:
        code.encode([np.zeros(16, np.uint8)] * 3 + [np.zeros(15, np.uint8)])
    assert info.value.index == 3 and info.value.expected == 16 and info.value.got == 15
    with pytest.raises(ShardSizeMismatch):
        code.encode_into(good, np.zeros((2, 8), dtype=np.uint8))
    with pytest.raises(ShardSizeMismatch):
        code.encode(np.zeros((4, 0), dtype=np.uint8))
    with pytest.raises(ShardError):
        code.encode_into(good, [bytes(16), bytes(16)])  # read-only output
    with pytest.raises(ShardError):
        code.encode("not shards")
    with pytest.raises(ShardError):
        code.encode([np.zeros((2, 8), np.uint8)] * 4)
    assert (parity == 7).all()


def test_too_many_or_bad_erasures():
    code = RSCode(4, 2, "isal")
    shards = np.zeros((6, 10), dtype=np.uint8)
    with pytest.raises(TooManyErasures) as info:
        code.reconstruct(shards, [0, 1, 2])
    assert info.value.erased == (0, 1, 2) and info.value.m == 2
    for bad in ([6], [-1], [1, 1]):
        with pytest.raises(TooManyErasures):
            code.reconstruct(shards, bad)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailable) as info:
        RSCode(4, 2, "nope")
    assert "reference" in str(info.value)
    assert set(backends.names()) >= {"auto", "isal", "reference", "cupy"}


def test_auto_picks_isal_without_a_device():
    if backends.cuda_device_present():
        pytest.skip("a CUDA device is present; auto picks cupy")
    assert RSCode(4, 2).backend.name == "isal"


def test_rebuild_writes_only_wanted_rows_without_buffers_for_the_rest():
    rng = np.random.default_rng(8)
    code = RSCode(5, 3, "isal")
    data = rand(rng, 5, 300)
    full = np.concatenate([data, code.encode(data)])
    shards: list = [row.copy() for row in full]
    shards[1] = None  # lost, no replacement memory yet
    shards[3] = np.zeros(300, np.uint8)  # the replacement
    shards[6] = np.zeros(300, np.uint8)  # a parity row we also rebuild
    code.rebuild(shards, erased=[1, 3, 6], want=[3, 6])
    assert np.array_equal(shards[3], full[3]) and np.array_equal(shards[6], full[6])
    with pytest.raises(ShardError):
        code.rebuild(shards, erased=[1], want=[2])
