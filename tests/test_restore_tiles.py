"""Restore's fused pass (ghostserve.daemon.datapath.tiles) and the daemon's restore around it.

1. The tile routine alone, on numpy memory, against the reference codec: random
   layouts (strides with gaps, offsets, layer- or block-major), erasure patterns,
   tile sizes that do not align with chunks or blocks, corrupted survivors and
   parity. A tile is OK (target bytes == the lost rank's), SUSPECT (a survivor
   failed: nothing written) or REBUILT_BAD (parity failed: nothing written, the
   daemon's slow path redoes them).
2. The daemon's restore with the fused pass against the same restore with it
   off (the chunk-by-chunk path) and against what must come out: byte-exact
   memory of the target and of the survivors, the same result fields; chunks
   with more bad shards than parity are reported and left untouched.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostserve import shm
from ghostserve.client import OperatorClient, WorkerClient
from ghostserve.codec import RSCode
from ghostserve.codec.isal import crc32c
from ghostserve.daemon.datapath import tiles as rebuild
from ghostserve.daemon.store import Layout

POOL = ThreadPoolExecutor(3, thread_name_prefix="test-tiles")


def chained_crc(mem: np.ndarray, lay: Layout, block: int, chunk: int) -> int:
    """What the daemon stores: CRC32C of one chunk, chained over the layers."""
    value = 0
    for layer in range(lay.num_layers):
        at = lay.offset + layer * lay.layer_stride + block * lay.block_stride + chunk * lay.chunk_bytes
        value = crc32c(mem.ctypes.data + at, lay.chunk_bytes, value)
    return value


def shard(mem: np.ndarray, lay: Layout, layer: int, block: int) -> np.ndarray:
    at = lay.offset + layer * lay.layer_stride + block * lay.block_stride
    return mem[at : at + lay.block_bytes]


@st.composite
def layouts(draw, max_layers=3, max_blocks=5):
    layers = draw(st.integers(1, max_layers))
    blocks = draw(st.integers(1, max_blocks))
    cb = draw(st.sampled_from([1, 3, 16, 64, 100, 256]))
    chunks = draw(st.integers(1, 6))
    bb = cb * chunks
    gap, offset = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    if draw(st.booleans()):  # blocks inside layers (vLLM, the demo engine)
        bs = bb + gap
        ls = blocks * bs + draw(st.integers(0, 40))
    else:                    # layers inside blocks
        ls = bb + gap
        bs = layers * ls + draw(st.integers(0, 40))
    return Layout(num_layers=layers, num_blocks=blocks, block_bytes=bb, chunk_bytes=cb,
                  layer_stride=ls, block_stride=bs, offset=offset)


@settings(max_examples=80, deadline=None)
@given(lay=layouts(), code=st.sampled_from([(2, 1), (3, 2), (4, 2), (5, 3), (8, 2)]), data=st.data())
def test_tiles_against_the_reference_codec(lay, code, data):
    n, m = code
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    size = lay.region_bytes()
    mem = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
    ref = RSCode(n, m, "reference")
    parity = np.zeros((lay.num_layers, m, lay.num_blocks, lay.block_bytes), dtype=np.uint8)
    for layer in range(lay.num_layers):
        for b in range(lay.num_blocks):
            parity[layer, :, b] = ref.encode(np.stack([shard(x, lay, layer, b) for x in mem]))
    crc = np.array([[[chained_crc(mem[q], lay, b, c) for q in range(n)] for c in range(lay.chunks)]
                    for b in range(lay.num_blocks)], dtype=np.uint32).reshape(lay.num_blocks, lay.chunks, n)
    # the rank to rebuild, and up to m - 1 more lost ranks
    rank = data.draw(st.integers(0, n - 1))
    others = data.draw(st.lists(st.sampled_from([q for q in range(n) if q != rank]) if n > 1 else st.nothing(),
                                max_size=m - 1, unique=True))
    lost = {rank, *others}
    original = mem[rank].copy()
    previous = rng.integers(0, 256, size, dtype=np.uint8)  # what the target held before
    target = previous.copy()
    mem[rank] = target
    for q in others:
        mem[q][:] = 0x5A  # gone: must never be read
    survivors = {q: mem[q].ctypes.data for q in range(n) if q not in lost}
    # runs of settled chunks: random holes make tiles start and end mid-block
    settled = rng.random((lay.num_blocks, lay.chunks)) < data.draw(st.sampled_from([0.5, 0.9, 1.0]))
    runs = []
    for b in range(lay.num_blocks):
        c = 0
        while c < lay.chunks:
            if settled[b, c]:
                c1 = c
                while c1 < lay.chunks and settled[b, c1]:
                    c1 += 1
                runs.append((b, c, c1))
                c = c1
            else:
                c += 1
    tile = data.draw(st.one_of(st.integers(1, 3 * lay.block_bytes),
                               st.sampled_from([lay.chunk_bytes * 2 + 1, 256 << 10])))
    units = rebuild.tiles(runs, lay, tile)
    pieces = [rebuild.block_runs([u], lay.chunks) for u in units]
    assert sorted((b, c) for p in pieces for b, c0, c1 in p for c in range(c0, c1)) == \
        sorted((b, c) for b, c0, c1 in runs for c in range(c0, c1))
    per = max(1, tile // lay.chunk_bytes)
    assert all(g1 - g0 <= per for g0, g1 in units)
    if lay.block_stride != lay.block_bytes and lay.num_blocks > 1:
        assert all(len(p) == 1 for p in pieces)  # blocks apart in memory: a tile stays in its block
    # corrupt survivors' bytes and parity bytes
    bad_chunks: set[tuple[int, int]] = set()   # (block, chunk) with a bad survivor
    bad_parity: set[tuple[int, int, int]] = set()  # (row, block, chunk)
    flipped: set[tuple] = set()  # a byte flipped twice could be back as it was: flip each once
    for _ in range(data.draw(st.integers(0, 3))):
        layer, b = data.draw(st.integers(0, lay.num_layers - 1)), data.draw(st.integers(0, lay.num_blocks - 1))
        at = data.draw(st.integers(0, lay.block_bytes - 1))
        flip = data.draw(st.integers(1, 255))
        if survivors and data.draw(st.booleans()):
            q = data.draw(st.sampled_from(sorted(survivors)))
            if (q, layer, b, at) in flipped:
                continue
            flipped.add((q, layer, b, at))
            shard(mem[q], lay, layer, b)[at] ^= flip
            bad_chunks.add((b, at // lay.chunk_bytes))
        else:
            j = data.draw(st.integers(0, m - 1))
            if ("p", j, layer, b, at) in flipped:
                continue
            flipped.add(("p", j, layer, b, at))
            parity[layer, j, b, at] ^= flip
            bad_parity.add((j, b, at // lay.chunk_bytes))
    erased = tuple(sorted(lost))
    sources, coeffs = ref.decode_matrix(list(erased))
    row = np.ascontiguousarray(coeffs[[erased.index(rank)]])
    plan = rebuild.TilePlan(lay, rank, target.ctypes.data, survivors, parity.ctypes.data, m, sources,
                            RSCode(n, m, "isal").backend.tables(row), crc, n)
    threads = data.draw(st.sampled_from([1, 3]))
    # the compiled kernel and its own source run as plain Python: the same answers
    kernel = rebuild.tile_kernel() if data.draw(st.booleans()) else rebuild.tile
    old = rebuild.PARALLEL_BYTES
    rebuild.PARALLEL_BYTES = 0  # tiny restores on threads too
    try:
        status = rebuild.run_tiles(plan, units, POOL, threads, kernel)
    finally:
        rebuild.PARALLEL_BYTES = old
    written = np.zeros(size, dtype=bool)
    used_rows = {s - n for s in sources if s >= n}
    for piece, st_ in zip(pieces, status, strict=True):
        chunks = {(b, c) for b, c0, c1 in piece for c in range(c0, c1)}
        if chunks & bad_chunks:
            assert st_ == rebuild.SUSPECT
        elif {(j, b, c) for j in used_rows for b, c in chunks} & bad_parity:
            assert st_ == rebuild.REBUILT_BAD
        else:
            assert st_ == rebuild.OK
        if st_ != rebuild.OK:
            continue  # nothing written: checked below with everything untouched
        for b, c0, c1 in piece:
            for layer in range(lay.num_layers):
                at = lay.offset + layer * lay.layer_stride + b * lay.block_stride
                s, e = at + c0 * lay.chunk_bytes, at + c1 * lay.chunk_bytes
                written[s:e] = True
                if st_ == rebuild.OK:
                    assert np.array_equal(target[s:e], original[s:e])
    assert np.array_equal(target[~written], previous[~written])


def test_tiles_split_runs_and_join_blocks_only_when_back_to_back():
    # blocks of 5 chunks of 100 bytes, 3 layers; tiles of 250 bytes a layer hold 2 chunks
    runs = [(0, 0, 5), (1, 0, 4), (3, 2, 3), (4, 0, 5), (5, 0, 2)]
    apart = Layout(num_layers=3, num_blocks=6, block_bytes=500, chunk_bytes=100, layer_stride=4000,
                   block_stride=600)
    units = rebuild.tiles(runs, apart, 250)
    assert rebuild.block_runs(units, 5) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 0, 2), (1, 2, 4), (3, 2, 3),
                                            (4, 0, 2), (4, 2, 4), (4, 4, 5), (5, 0, 2)]
    assert all(len(rebuild.block_runs([u], 5)) == 1 for u in units)
    # blocks back to back in every layer: a tile may go on into the next block
    joined = Layout(num_layers=3, num_blocks=6, block_bytes=500, chunk_bytes=100, layer_stride=4000,
                    block_stride=500)
    units = rebuild.tiles(runs, joined, 250)
    assert units == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (17, 18), (20, 22), (22, 24), (24, 26), (26, 27)]
    assert rebuild.block_runs([(4, 6)], 5) == [(0, 4, 5), (1, 0, 1)]
    # a tile smaller than one chunk is one chunk; a large one is the whole run
    assert rebuild.tiles([(2, 0, 3)], apart, 10) == [(10, 11), (11, 12), (12, 13)]
    assert rebuild.tiles([(2, 1, 3), (3, 0, 5)], apart, 1 << 20) == [(11, 13), (15, 20)]
    assert rebuild.tiles([(2, 1, 5), (3, 0, 5)], joined, 1 << 20) == [(11, 20)]


def test_shift_tables_equal_the_crcfold_reference():
    from ghostserve.codec import crcfold

    rng = np.random.default_rng(7)
    s = crcfold.shift(64)
    t = rebuild.shift_table(64)
    for x in rng.integers(0, 2**32, 200, dtype=np.uint64).tolist():
        want = int(s(np.array([x], np.uint32))[0])
        assert t[0, x & 255] ^ t[1, x >> 8 & 255] ^ t[2, x >> 16 & 255] ^ t[3, x >> 24] == want


def test_the_kernel_is_compiled():
    """The daemon's restore runs the numba-compiled kernel (numba is a dependency):
    a silent fall-back to Python would cost the threads their overlap."""
    assert hasattr(rebuild.tile_kernel(), "py_func")


# ------------------------------------------------------------------------ the daemon


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles as small as each test asks: a few chunks, not the 64 KiB a layer floor."""
    monkeypatch.setattr(rebuild, "MIN_LAYER_BYTES", 0)


@pytest.fixture
def tiled(tmp_path, shm_prefix):
    """Factory: a started in-process daemon whose restores use tiles of ``tile``
    bytes (``restore_tile_bytes``; 0: the chunk-by-chunk path only), one per size."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from ghostserve.config import Config  # noqa: PLC0415
    from ghostserve.daemon.server import Server  # noqa: PLC0415

    made: dict[int, Server] = {}

    def make(tile: int) -> Server:
        if tile not in made:
            # one daemon per shared-memory prefix: each its own, under the test's
            cfg = Config(socket=str(tmp_path / f"t{tile}.sock"), shm_prefix=f"{shm_prefix}t{tile}-",
                         encode_threads=2, restore_tile_bytes=tile)
            s = Server(cfg, CollectorRegistry())
            s.start()
            s.sock = cfg.socket
            made[tile] = s
        return made[tile]

    yield make
    for s in made.values():
        s.stop(grace=1)


def ranks_of(sock: str, name: str) -> dict:
    """The group's ranks as status reports them (another thread's state: polled)."""
    op = OperatorClient(sock)
    try:
        return {r.rank: r for r in op.status(name).groups[0].ranks}
    finally:
        op.close()


def merged(ranges):
    out = []
    for b, s, e in sorted(ranges):
        if out and out[-1][0] == b and s <= out[-1][2]:
            out[-1] = (b, out[-1][1], max(out[-1][2], e))
        else:
            out.append((b, s, e))
    return out


def run_restore(daemon, region, name: str, spec: dict) -> dict:
    """One scenario on a fresh group of ``daemon``: write, protect step 0, corrupt
    survivors, lose the victims, put step 1 in flight on the survivors, restore
    ``spec["rank"]`` into memory holding other bytes."""
    n, m, lay, seed = spec["n"], spec["m"], spec["layout"], spec["seed"]
    size = Layout(**{k: v for k, v in lay.items() if k != "slot_map"}).region_bytes()
    rng = np.random.default_rng(seed)
    segs = [region(size) for _ in range(n)]
    clients = [WorkerClient(daemon.sock, name, q, n, m, lay, segs[q].name, size) for q in range(n)]
    for c in clients:
        c.register()
    for s in segs:
        s.array()[:] = rng.integers(0, 256, size, dtype=np.uint8)
    originals = [s.array().copy() for s in segs]
    for c in clients:
        c.commit(0, spec["ranges"], {"r": 1}, fills=spec.get("fills"))
    assert clients[0].wait_protected(0, timeout=20)
    victims = spec["victims"]
    for q, at, flip in spec["corrupt"]:
        if q not in victims:
            segs[q].array()[at] ^= flip
    for q in victims:
        clients[q].close()
    OperatorClient(daemon.sock).wait_ranks(name, dict.fromkeys(victims, "lost"), 10)
    alive = [q for q in range(n) if q not in victims]
    for q in alive:  # the next step is in flight: its chunks are recomputed, not restored
        for b, s0, e0 in spec["flux"]:
            for layer in range(lay["num_layers"]):
                at = lay["offset"] + layer * lay["layer_stride"] + b * lay["block_stride"]
                segs[q].array()[at + s0 : at + e0] = rng.integers(0, 256, e0 - s0, dtype=np.uint8)
        clients[q].commit(1, spec["flux"], {"r": 2}, freed=spec["freed"])
    deadline = time.monotonic() + 10
    while any(ranks_of(daemon.sock, name)[q].committed_step < 1 for q in alive):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    fresh = region(size)
    fresh.array()[:] = rng.integers(0, 256, size, dtype=np.uint8)  # the target's previous bytes
    out = dict(previous=fresh.array().copy(), originals=originals,
               before={q: segs[q].array().copy() for q in alive})
    c = WorkerClient(daemon.sock, name, spec["rank"], n, m, lay, fresh.name, size)
    c.register()
    spy = []
    real = rebuild.run_tiles

    def counting(plan, units, *a, **kw):
        status = real(plan, units, *a, **kw)
        spy.append(len(units))
        return status

    rebuild.run_tiles = counting
    try:
        out["resp"] = c.restore()
    finally:
        rebuild.run_tiles = real
    out.update(target=fresh.array().copy(), after={q: segs[q].array().copy() for q in alive}, tiles=spy)
    for x in [*clients, c]:
        x.close()
    return out


@st.composite
def scenarios(draw):
    n, m = draw(st.sampled_from([(2, 1), (3, 1), (3, 2), (4, 2), (5, 2)]))
    lay = draw(layouts(max_layers=3, max_blocks=4))
    layout = dict(num_layers=lay.num_layers, num_blocks=lay.num_blocks, block_bytes=lay.block_bytes,
                  chunk_bytes=lay.chunk_bytes, layer_stride=lay.layer_stride, block_stride=lay.block_stride,
                  offset=lay.offset)
    cb, chunks = lay.chunk_bytes, lay.chunks

    def chunk_ranges(max_size):
        picks = draw(st.lists(st.tuples(st.integers(0, lay.num_blocks - 1), st.integers(0, chunks - 1),
                                        st.integers(1, chunks)), max_size=max_size))
        return merged((b, c * cb, min(chunks, c + w) * cb) for b, c, w in picks)

    ranges = merged(chunk_ranges(6) + [(draw(st.integers(0, lay.num_blocks - 1)), 0, lay.block_bytes)])
    flux = chunk_ranges(2)
    freed = draw(st.lists(st.integers(0, lay.num_blocks - 1), max_size=1))
    rank = draw(st.integers(0, n - 1))
    victims = {rank, *draw(st.lists(st.integers(0, n - 1), max_size=m))}  # may exceed m
    size = lay.region_bytes()
    corrupt = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, size - 1), st.integers(1, 255)),
                            max_size=4))
    return dict(n=n, m=m, layout=layout, seed=draw(st.integers(0, 2**32 - 1)), ranges=ranges, flux=flux,
                freed=freed, rank=rank, victims=sorted(victims), corrupt=corrupt,
                tile=draw(st.integers(1, 3 * lay.block_bytes)))


def expected(spec: dict, got: dict):
    """What a restore must produce, from first principles: (target bytes, survivor
    bytes, restored bytes, unrecoverable bytes, unrecoverable blocks, corrupt chunks)."""
    lay = Layout(**spec["layout"])
    m, rank, victims = spec["m"], spec["rank"], set(spec["victims"])
    originals = got["originals"]
    cb = lay.chunk_bytes
    protected = np.zeros((lay.num_blocks, lay.chunks), dtype=bool)
    for b, s, e in spec["ranges"]:
        protected[b, s // cb : e // cb] = True
    if len(victims) < spec["n"]:  # step 1 is in flight on the survivors (none: nothing in flight)
        for b, s, e in spec["flux"]:
            protected[b, s // cb : e // cb] = False
        protected[spec["freed"]] = False
    target = got["previous"].copy()
    survivors = {q: x.copy() for q, x in got["before"].items()}
    restored = unrecoverable = corrupt = 0
    lost_blocks = set()
    for b, c in zip(*np.nonzero(protected), strict=True):
        spans = [slice(lay.offset + layer * lay.layer_stride + b * lay.block_stride + c * cb,
                       lay.offset + layer * lay.layer_stride + b * lay.block_stride + (c + 1) * cb)
                 for layer in range(lay.num_layers)]
        bad = {q for q in survivors if any(not np.array_equal(survivors[q][sp], originals[q][sp]) for sp in spans)}
        corrupt += len(bad)
        if len(victims | bad) <= m:
            for sp in spans:
                target[sp] = originals[rank][sp]
                for q in bad:  # repaired in place
                    survivors[q][sp] = originals[q][sp]
            restored += cb * lay.num_layers
        else:  # nothing written, the corrupt survivors stay as they are
            unrecoverable += cb * lay.num_layers
            lost_blocks.add(int(b))
    return target, survivors, restored, unrecoverable, sorted(lost_blocks), corrupt


def summary(resp):
    return resp.restored_bytes, resp.unrecoverable_bytes, list(resp.unrecoverable_blocks), resp.corrupt_chunks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=scenarios())
def test_restore_with_tiles_equals_the_chunk_path_and_the_truth(tiled, region, spec):
    base = f"t{uuid.uuid4().hex[:8]}"
    fast = run_restore(tiled(spec["tile"]), region, base + "f", spec)
    slow = run_restore(tiled(0), region, base + "s", spec)
    assert summary(fast["resp"]) == summary(slow["resp"])
    assert np.array_equal(fast["target"], slow["target"])
    assert all(np.array_equal(fast["after"][q], slow["after"][q]) for q in fast["after"])
    target, survivors, restored, unrecoverable, blocks, corrupt = expected(spec, fast)
    assert np.array_equal(fast["target"], target)
    assert all(np.array_equal(fast["after"][q], survivors[q]) for q in survivors)
    assert summary(fast["resp"]) == (restored, unrecoverable, blocks, corrupt)
    assert not slow["tiles"]  # tile_bytes 0: the chunk-by-chunk path only
    if len(spec["victims"]) <= spec["m"] and restored:
        assert fast["tiles"]  # the fused pass ran


@pytest.mark.parametrize("gap", [0, 8])
def test_tiles_that_do_not_align_with_chunks_or_blocks(tiled, region, gap):
    """4+2, 3 layers, blocks of 5 chunks, tiles of 2 chunks (and 50 bytes) a layer: a
    chunk in flight splits block 1's run, so tiles start mid-block (and, with
    blocks back to back, run on into the next one); one corrupt survivor chunk
    is repaired, a chunk with two corrupt survivors (plus the lost rank: 3 > m)
    is reported and left as it was, its tile's other chunk restored."""
    cb, chunks, layers, blocks = 64, 5, 3, 4
    bb = cb * chunks
    layout = dict(num_layers=layers, num_blocks=blocks, block_bytes=bb, chunk_bytes=cb,
                  layer_stride=blocks * (bb + gap) + 16, block_stride=bb + gap, offset=8)
    lay = Layout(**layout)

    def at(layer, b, c, i=0):
        return lay.offset + layer * lay.layer_stride + b * lay.block_stride + c * cb + i

    spec = dict(n=4, m=2, layout=layout, seed=11, ranges=[(b, 0, bb) for b in range(blocks)],
                flux=[(1, 2 * cb, 3 * cb)], freed=[], rank=1, victims=[1],
                corrupt=[(2, at(1, 0, 3, 7), 0x40),                           # repaired
                         (0, at(2, 2, 1, 0), 0x01), (3, at(0, 2, 1, 63), 0x80)],  # 3 erasures: lost
                tile=layers * (2 * cb + 50))  # all layers: 2 chunks and 50 bytes a layer
    got = run_restore(tiled(spec["tile"]), region, f"al{uuid.uuid4().hex[:6]}", spec)
    target, survivors, restored, unrecoverable, lost_blocks, corrupt = expected(spec, got)
    assert (restored, unrecoverable, lost_blocks, corrupt) == ((blocks * chunks - 2) * cb * layers,
                                                                cb * layers, [2], 3)
    assert summary(got["resp"]) == (restored, unrecoverable, lost_blocks, corrupt)
    assert np.array_equal(got["target"], target)
    assert all(np.array_equal(got["after"][q], survivors[q]) for q in survivors)
    # the lost chunk kept the target's previous bytes; its tile's other chunk was restored
    for layer in range(layers):
        assert np.array_equal(got["target"][at(layer, 2, 1) : at(layer, 2, 2)],
                              got["previous"][at(layer, 2, 1) : at(layer, 2, 2)])
        assert np.array_equal(got["target"][at(layer, 2, 0) : at(layer, 2, 1)],
                              got["originals"][1][at(layer, 2, 0) : at(layer, 2, 1)])
    if gap:  # per block: [0,2) [2,4) [4,5), block 1's run split by the chunk in flight
        assert got["tiles"] == [3 + 2 + 3 + 3]
    else:    # chunks 0-6 and 8-19 of the layer: 4 + 6 tiles, the one at 4-6 across blocks 0 and 1
        assert got["tiles"] == [4 + 6]


def test_rebuilt_bytes_that_fail_their_checksum_are_zeroed_and_reported(tiled, region):
    """Parity corrupted after encoding: the decode is wrong, the end-to-end check
    catches it, and the chunk-by-chunk path zeroes it (as it always has)."""
    cb, chunks, layers, blocks = 32, 4, 2, 3
    bb = cb * chunks
    layout = dict(num_layers=layers, num_blocks=blocks, block_bytes=bb, chunk_bytes=cb,
                  layer_stride=blocks * bb, block_stride=bb, offset=0)
    name = f"pc{uuid.uuid4().hex[:6]}"
    size = layers * blocks * bb
    rng = np.random.default_rng(5)
    segs = [region(size) for _ in range(3)]
    daemon = tiled(cb)  # one chunk a tile
    clients = [WorkerClient(daemon.sock, name, q, 3, 1, layout, segs[q].name, size) for q in range(3)]
    for s, c in zip(segs, clients, strict=True):
        c.register()
        s.array()[:] = rng.integers(0, 256, size, dtype=np.uint8)
    before = segs[0].array().copy()
    for c in clients:
        c.commit(0, [(b, 0, bb) for b in range(blocks)], {"r": 1})
    assert clients[0].wait_protected(0)
    # the parity arena in shared memory, (layers, m, blocks, block_bytes): flip layer 1,
    # row 0, block 2, chunk 2 as a bad DIMM would
    parity = shm.Segment.attach(f"{daemon.config.shm_prefix}{name}.parity")
    parity.array()[((1 * 1 + 0) * blocks + 2) * bb + 2 * cb + 5] ^= 0x11
    parity.close()
    clients[0].close()
    OperatorClient(daemon.sock).wait_ranks(name, {0: "lost"}, 10)
    fresh = region(size)
    fresh.array()[:] = 0xEE
    c = WorkerClient(daemon.sock, name, 0, 3, 1, layout, fresh.name, size)
    c.register()
    resp = c.restore()
    assert list(resp.unrecoverable_blocks) == [2] and resp.corrupt_chunks == 0
    assert resp.unrecoverable_bytes == cb * layers and resp.restored_bytes == (blocks * chunks - 1) * cb * layers
    got, want = fresh.array().reshape(layers, blocks, chunks, cb), before.reshape(layers, blocks, chunks, cb)
    assert not got[:, 2, 2].any()
    mask = np.ones((blocks, chunks), dtype=bool)
    mask[2, 2] = False
    assert np.array_equal(got[:, mask], want[:, mask])
    # remembered: a second restore does not claim it either
    assert list(c.restore().unrecoverable_blocks) == [2]
    for x in [*clients, c]:
        x.close()


@pytest.mark.parametrize("tile", [0, 1, 256 << 10])
def test_slot_addressed_blocks_full_and_partly_filled(tiled, region, tile):
    """vLLM-style layout (chunk == block, masked checksums): full blocks take the
    fused pass, partly filled ones the masked chunk path; a corrupt filled slot is
    repaired either way, a flipped unfilled slot is nobody's business."""
    slots, layers, blocks = 8, 2, 4
    bb = slots * 24
    slot_map = ((np.arange(bb) // 4) % slots).astype("<u2")
    layout = dict(num_layers=layers, num_blocks=blocks, block_bytes=bb, chunk_bytes=bb,
                  layer_stride=blocks * bb, block_stride=bb, offset=0, block_slots=slots,
                  slot_map=slot_map.tobytes())
    spec = dict(n=3, m=2, layout=layout, seed=3, ranges=[(b, 0, bb) for b in range(blocks)],
                fills={0: 8, 1: 5, 2: 8, 3: 1}, flux=[], freed=[], rank=0, victims=[0],
                corrupt=[(1, 0 * bb + int(np.flatnonzero(slot_map == 3)[0]), 0x10),         # full block 0
                         (2, blocks * bb + bb + int(np.flatnonzero(slot_map == 2)[1]), 0x20),  # block 1, filled
                         (1, 3 * bb + int(np.flatnonzero(slot_map == 6)[0]), 0x30)])          # block 3, unfilled
    got = run_restore(tiled(tile), region, f"sl{uuid.uuid4().hex[:6]}", spec)
    resp = got["resp"]
    assert list(resp.unrecoverable_blocks) == [] and resp.corrupt_chunks == 2
    assert resp.restored_bytes == blocks * bb * layers
    kv = got["target"].reshape(layers, blocks, bb)
    want = got["originals"][0].reshape(layers, blocks, bb)
    for b, filled in spec["fills"].items():
        keep = slot_map < filled
        assert np.array_equal(kv[:, b, keep], want[:, b, keep])
    for q in (1, 2):  # repaired where covered
        s, w = got["after"][q].reshape(layers, blocks, bb), got["originals"][q].reshape(layers, blocks, bb)
        for b, filled in spec["fills"].items():
            assert np.array_equal(s[:, b, slot_map < filled], w[:, b, slot_map < filled])
    if tile:
        assert got["tiles"] == [2]  # the two full blocks
