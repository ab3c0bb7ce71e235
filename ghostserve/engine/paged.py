"""The paged KV cache of one rank, in POSIX shared memory the daemon can map.

Layout of a rank's region (bfloat16 elements)::

    [layer][block][token in block][K or V][kv head of this rank][head_dim]

so the shard of stripe (layer, block) is one contiguous ``block_bytes`` run, and
each token's K and V in a block are one contiguous ``token_bytes`` run: a decode
step dirties exactly the bytes it wrote. The daemon's commit and checksum
granularity (``chunk_bytes``) is ``chunk_tokens`` tokens; with the default of one,
a token slot is written once between allocation and free, so a chunk never holds
protected bytes while it is rewritten.

Block tables (which physical blocks hold a sequence's positions) are the
driver's; a rank learns them with every step (:meth:`PagedKV.bind`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ghostserve import shm


@dataclass(frozen=True)
class KVShape:
    """Geometry of one rank's KV pool."""
    layers: int
    blocks: int
    block_tokens: int
    kv_heads: int          # on this rank
    head_dim: int
    chunk_tokens: int = 1  # commit/checksum granularity, in tokens

    def __post_init__(self) -> None:
        for f in ("layers", "blocks", "block_tokens", "kv_heads", "head_dim", "chunk_tokens"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1")
        if self.block_tokens % self.chunk_tokens:
            raise ValueError(f"chunk_tokens {self.chunk_tokens} must divide block_tokens {self.block_tokens}")

    @property
    def token_bytes(self) -> int:
        return 2 * self.kv_heads * self.head_dim * 2

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.token_bytes

    @property
    def region_bytes(self) -> int:
        return self.layers * self.blocks * self.block_bytes

    def layout(self) -> dict[str, int]:
        """The daemon's ``KVLayout`` for this pool."""
        return {"num_layers": self.layers, "num_blocks": self.blocks, "block_bytes": self.block_bytes,
                "chunk_bytes": self.chunk_tokens * self.token_bytes,
                "layer_stride": self.blocks * self.block_bytes, "block_stride": self.block_bytes, "offset": 0}

    def dirty(self, writes: Iterable[tuple[Sequence[int], int, int]]) -> list[tuple[int, int, int]]:
        """Chunk-aligned (block, start byte, end byte) ranges written by
        ``(block_table, start position, count)`` writes, in every layer."""
        out: list[tuple[int, int, int]] = []
        bt, ct, tb = self.block_tokens, self.chunk_tokens, self.token_bytes
        for table, start, count in writes:
            pos, end = start, start + count
            while pos < end:
                i, off = divmod(pos, bt)
                stop = min(end, (i + 1) * bt)
                lo = off // ct * ct
                hi = -(-(stop - i * bt) // ct) * ct
                out.append((table[i], lo * tb, hi * tb))
                pos = stop
        return out

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)


class PagedKV:
    """One rank's KV pool over a shared-memory segment; implements ``KVCache``.

    ``kv`` is a torch view of the segment, shape (layers, blocks * block_tokens,
    2, kv_heads, head_dim): writes go straight to the shared memory the daemon
    encodes from. Not thread-safe: the rank's step loop is its only user.
    """

    def __init__(self, seg: shm.Segment, shape: KVShape):
        if seg.size < shape.region_bytes:
            raise ValueError(f"segment {seg.name} has {seg.size} bytes, the pool needs {shape.region_bytes}")
        self.seg, self.shape = seg, shape
        self.bytes = seg.array()[: shape.region_bytes]
        flat = torch.from_numpy(self.bytes.view(np.int16)).view(torch.bfloat16)
        self.kv = flat.view(shape.layers, shape.blocks * shape.block_tokens, 2, shape.kv_heads, shape.head_dim)
        self.tables: dict[str, Sequence[int]] = {}
        self._slots: dict[tuple[str, int, int], torch.Tensor] = {}

    def bind(self, tables: Mapping[str, Sequence[int]]) -> None:
        """Block tables for the coming step (sequence -> physical blocks)."""
        self.tables = tables
        self._slots = {}

    def slots(self, seq: str, start: int, count: int) -> torch.Tensor:
        """Pool slots of positions start..start+count-1 (the same in every layer,
        so computed once per step)."""
        key = (seq, start, count)
        s = self._slots.get(key)
        if s is None:
            bt = self.shape.block_tokens
            pos = torch.arange(start, start + count)
            table = torch.as_tensor(self.tables[seq], dtype=torch.long)
            s = self._slots[key] = table[pos // bt] * bt + pos % bt
        return s

    def write(self, layer: int, seq: str, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        s = self.slots(seq, start, k.shape[0])
        self.kv[layer, s, 0] = k.to(torch.bfloat16)
        self.kv[layer, s, 1] = v.to(torch.bfloat16)

    def read(self, layer: int, seq: str, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.kv[layer, self.slots(seq, 0, upto)]
        return kv[:, 0], kv[:, 1]

    def token_bytes_of(self, seq: str, upto: int) -> np.ndarray:
        """Every layer's bytes of positions [0, upto) of ``seq`` (a copy, for checks)."""
        s = self.slots(seq, 0, upto)
        return self.kv[:, s].contiguous().view(torch.int16).numpy().view(np.uint8).copy()
