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
"""

from __future__ import annotations

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

    @property
    def token_bytes(self) -> int:
        return self.heads * self.head_dim * 2

    @property
    def block_bytes(self) -> int:
        return 2 * self.block_size * self.token_bytes

    def layout(self) -> dict[str, int]:
        return dict(num_layers=self.layers, num_blocks=self.blocks, block_bytes=self.block_bytes,
                    chunk_bytes=self.token_bytes, layer_stride=self.blocks * self.block_bytes,
                    block_stride=self.block_bytes, offset=0)

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
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x7FB5D329728EA185)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x81DADEF4BC2DD44D)
        x ^= x >> np.uint64(33)
    return (x & np.uint64(0xFF)).astype(np.uint8)


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
