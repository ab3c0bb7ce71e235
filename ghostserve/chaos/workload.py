"""A deterministic synthetic serving workload and its KV bytes.

Every process of a chaos run (driver, workers, replacements) builds the same
:class:`Workload` from the same options and so agrees on every step: which
requests run, which tokens each step writes into which block slots, which
blocks are freed and reused. KV bytes are a pure function of
(seed, rank, request, token, layer, K/V, byte), so the expected content of any
slot can be recomputed at any time for byte-exact checks.

Per-rank KV layout (paged, 2-byte elements): ``(layers, blocks, 2 [K, V],
block_size, heads * head_dim * 2 bytes)``. A token's K (or V) bytes of one
layer are one checksum chunk.

A slotted shape (``Shape.slotted``, the node-loss runs) keeps those bytes but
declares the layout slot-addressed, as vLLM's paged KV is: a block is one chunk,
its ``slot_map`` names the slot (token) of every byte, and commits carry filled
slots and Lookup records, so the daemon's request index, its mirror and
``Lookup`` see each request's token prefix. Token ids are a pure function of
(seed, request, token) too (:func:`token_ids`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Shape:
    ranks: int = 4
    parity: int = 1
    layers: int = 4
    blocks: int = 64
    block_size: int = 16
    heads: int = 2          # KV heads per rank
    head_dim: int = 64
    steps: int = 60
    requests: int = 6       # concurrent requests
    prefill_chunk: int = 32
    seed: int = 0
    slotted: bool = False   # a slot-addressed layout with Lookup records (see the module doc)

    @property
    def token_bytes(self) -> int:
        return self.heads * self.head_dim * 2

    @property
    def block_bytes(self) -> int:
        return 2 * self.block_size * self.token_bytes

    def layout(self) -> dict[str, int | bytes]:
        out: dict[str, int | bytes] = dict(
            num_layers=self.layers, num_blocks=self.blocks, block_bytes=self.block_bytes,
            chunk_bytes=self.token_bytes, layer_stride=self.blocks * self.block_bytes,
            block_stride=self.block_bytes, offset=0)
        if self.slotted:  # one chunk a block; its bytes' slots: K of slots 0..bs-1, then V of them
            out.update(chunk_bytes=self.block_bytes, block_slots=self.block_size, slot_map=self.slot_map().tobytes())
        return out

    def slot_map(self) -> np.ndarray:
        """The slot of every byte of a block (``KVLayout.slot_map``, little-endian uint16)."""
        return ((np.arange(self.block_bytes) // self.token_bytes) % self.block_size).astype("<u2")

    @property
    def region_bytes(self) -> int:
        return self.layers * self.blocks * self.block_bytes

    def view(self, buf: np.ndarray) -> np.ndarray:
        """The region as (layers, blocks, 2, block_size, token_bytes)."""
        return buf[: self.region_bytes].reshape(self.layers, self.blocks, 2, self.block_size, self.token_bytes)


@dataclass
class Request:
    rid: int
    prompt: int
    generate: int
    tokens: int = 0
    blocks: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"req{self.rid}"

    @property
    def total(self) -> int:
        return self.prompt + self.generate


@dataclass
class Step:
    step: int
    writes: list[tuple[int, int, int, int]]       # (rid, token, block, slot)
    lengths: dict[str, int]                       # request -> tokens after this step
    freed: list[int]
    finished: list[str]
    tables: dict[int, tuple[int, list[int]]]      # live rid -> (tokens, blocks) after this step


@dataclass(frozen=True)
class RecordNews:
    """One request's Lookup record in a commit (``pb.RequestRecord``'s fields)."""

    request: str
    tokens: list[int]       # token ids appended (all of them with ``reset``)
    blocks: list[int]       # blocks appended
    reset: bool             # the request starts here: earlier records are forgotten


@dataclass(frozen=True)
class SlotCommit:
    """What a slotted shape's commit carries besides the step's freed blocks and
    finished requests: whole dirty blocks, their filled slots, the requests'
    lengths, and (rank 0 sends them) the Lookup records."""

    dirty: list[tuple[int, int, int]]
    fills: dict[int, int]
    lengths: dict[str, int]
    records: list[RecordNews]


class Workload:
    """All steps of a run, computed once (cheap: bookkeeping only)."""

    def __init__(self, shape: Shape):
        self.shape = shape
        rng = np.random.default_rng([shape.seed, 7])
        free = list(range(shape.blocks))
        active: list[Request] = []
        next_rid = 0
        self.steps: list[Step] = []
        bs = shape.block_size
        for s in range(shape.steps):
            while len(active) < shape.requests:
                prompt = int(rng.integers(8, 4 * shape.prefill_chunk))
                gen = int(rng.integers(4, 40))
                need = -(-(prompt + gen) // bs)
                if need > len(free):
                    break
                active.append(Request(next_rid, prompt, gen))
                next_rid += 1
            writes = []
            for req in active:
                n = min(shape.prefill_chunk, req.prompt - req.tokens) if req.tokens < req.prompt else 1
                for t in range(req.tokens, req.tokens + n):
                    if t // bs >= len(req.blocks):
                        req.blocks.append(free.pop(0))
                    writes.append((req.rid, t, req.blocks[t // bs], t % bs))
                req.tokens += n
            lengths = {r.name: r.tokens for r in active}
            done = [r for r in active if r.tokens >= r.total]
            tables = {r.rid: (r.tokens, list(r.blocks)) for r in active if r.tokens < r.total}
            freed = sorted(b for r in done for b in r.blocks)
            free = sorted(free + freed)  # lowest first: freed blocks are reused soon
            active = [r for r in active if r.tokens < r.total]
            self.steps.append(Step(s, writes, lengths, freed, [r.name for r in done], tables))

    def dirty(self, step: int, only_blocks: set[int] | None = None) -> list[tuple[int, int, int]]:
        """Byte ranges (block, start, end) that ``step`` writes: each token's K and V."""
        tb, bs = self.shape.token_bytes, self.shape.block_size
        out = []
        for _, _, block, slot in self.steps[step].writes:
            if only_blocks is None or block in only_blocks:
                out.append((block, slot * tb, (slot + 1) * tb))
                out.append((block, (bs + slot) * tb, (bs + slot + 1) * tb))
        return out

    def slot_commit(self, step: int, extra: Iterable[tuple[int, int, int, int]] = ()) -> SlotCommit:
        """The commit of ``step`` for a slotted shape: the blocks its writes (and
        ``extra`` ones, recomputed) touch, whole; records of the tokens and new
        blocks of each request it wrote (a request's first tokens reset it)."""
        st, bb = self.steps[step], self.shape.block_bytes
        fills: dict[int, int] = {}
        written: dict[int, list[tuple[int, int, int]]] = {}   # rid -> (token, block, slot), in order
        for rid, t, b, j in st.writes:
            written.setdefault(rid, []).append((t, b, j))
        for _, _, b, j in [*st.writes, *extra]:
            fills[b] = max(fills.get(b, 0), j + 1)  # a request's tokens fill its blocks in order
        records = [RecordNews(f"req{rid}", token_ids(self.shape, rid, ws[0][0], ws[-1][0] + 1),
                              [b for _, b, j in ws if j == 0], reset=ws[0][0] == 0)
                   for rid, ws in written.items()]
        return SlotCommit([(b, 0, bb) for b in fills], fills, dict(st.lengths), records)

    def resume_commit(self, step: int) -> SlotCommit:
        """A new group's first commit, holding every request live after ``step``
        (fetched or recomputed): all their blocks, filled as far as their tokens
        go, and a record of each that starts it afresh."""
        bs, bb = self.shape.block_size, self.shape.block_bytes
        fills: dict[int, int] = {}
        records, lengths = [], {}
        for rid, (n, blocks) in self.steps[step].tables.items():
            for i, b in enumerate(blocks):
                fills[b] = min(bs, n - i * bs)
            records.append(RecordNews(f"req{rid}", token_ids(self.shape, rid, 0, n), list(blocks), reset=True))
            lengths[f"req{rid}"] = n
        return SlotCommit([(b, 0, bb) for b in fills], fills, lengths, records)


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64's): every input bit reaches every output bit."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x7FB5D329728EA185)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x81DADEF4BC2DD44D)
        x ^= x >> np.uint64(33)
    return x


def token_ids(shape: Shape, rid: int, first: int, last: int) -> list[int]:
    """Token ids of tokens [first, last) of request ``rid``: a hash of (seed,
    request, token), 31 bits, so two requests' blocks never share a prefix key."""
    t = np.arange(first, last, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (np.uint64(shape.seed) * np.uint64(0xD1B54A32D192ED03) + np.uint64(rid) * np.uint64(0xAEF17502108EF2D9)
             + t * np.uint64(0xF1357AEA2E62A9C5) + np.uint64(0x632BE59BD9B4E019))
    return (_mix(x) >> np.uint64(33)).astype(np.int64).tolist()


def content(shape: Shape, rank: int, rids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Expected KV bytes of tokens, shape (n, layers, 2, token_bytes): a hash of
    (seed, rank, request, token, layer, K/V, byte)."""
    rids = np.asarray(rids, dtype=np.uint64)[:, None, None, None]
    tokens = np.asarray(tokens, dtype=np.uint64)[:, None, None, None]
    layer = np.arange(shape.layers, dtype=np.uint64)[None, :, None, None]
    kv = np.arange(2, dtype=np.uint64)[None, None, :, None]
    byte = np.arange(shape.token_bytes, dtype=np.uint64)[None, None, None, :]
    with np.errstate(over="ignore"):
        x = (np.uint64(shape.seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(rank) * np.uint64(0xBF58476D1CE4E5B9)
             + rids * np.uint64(0x94D049BB133111EB) + tokens * np.uint64(0x2545F4914F6CDD1D)
             + layer * np.uint64(0x9E6C63D0676A9A99) + kv * np.uint64(0xD6E8FEB86659FD93) + byte)
    return (_mix(x) & np.uint64(0xFF)).astype(np.uint8)


def write_tokens(shape: Shape, kv: np.ndarray, rank: int, writes: list[tuple[int, int, int, int]]) -> None:
    """Write the expected bytes of ``writes`` (rid, token, block, slot) into ``kv``."""
    if not writes:
        return
    w = np.array(writes, dtype=np.int64)
    data = content(shape, rank, w[:, 0], w[:, 1])               # (n, L, 2, tb)
    # two advanced indices split by a slice: numpy puts their axis first, (n, L, 2, tb)
    kv[:, w[:, 2], :, w[:, 3], :] = data


def expected_and_actual(shape: Shape, kv: np.ndarray, rank: int, slots: list[tuple[int, int, int, int]]):
    """(expected, actual) bytes of ``slots`` (rid, token, block, slot), as arrays."""
    w = np.array(slots, dtype=np.int64)
    expected = content(shape, rank, w[:, 0], w[:, 1])
    actual = kv[:, w[:, 2], :, w[:, 3], :]
    return expected, actual
