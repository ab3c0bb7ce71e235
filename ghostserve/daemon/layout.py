"""Where a rank's KV shards lie in its memory (``KVLayout`` in the proto).

The RS shard of stripe (layer, block) on a rank is ``block_bytes`` long. In the
simple case it is one strided piece of one region::

    offset + layer * layer_stride + block * block_stride

Engines that keep K and V apart (vLLM's FlashAttention ``(2, num_blocks, ...)``
and FlashInfer ``(num_blocks, 2, ...)`` layouts, SGLang's ``k_buffer`` and
``v_buffer``) or allocate layers separately (one region each) describe the
shard as :class:`Extent`\\ s: the shard of (L, B) is the concatenation, in order
of ``at``, of the extents that hold layer L, each ``bytes`` long at::

    regions[region] + offset + (L - first_layer) * layer_stride + B * block_stride

Chunks (the checksum unit) may not cross an extent, except in slot-addressed
layouts, whose chunk is the whole block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Extent:
    """One piece of every shard of the layers [first_layer, first_layer + layers)."""

    region: int
    first_layer: int
    layers: int
    offset: int
    layer_stride: int
    block_stride: int
    bytes: int
    at: int  # where in the shard these bytes go

    def footprint(self, num_blocks: int) -> tuple[int, int]:
        """[start, end) of the region bytes this extent can touch."""
        return self.offset, (self.offset + (self.layers - 1) * self.layer_stride
                             + (num_blocks - 1) * self.block_stride + self.bytes)

    def address(self, base: int, layer: int, block: int, start: int = 0) -> int:
        """Address of byte ``start`` of this extent's piece of (layer, block)."""
        return base + self.offset + (layer - self.first_layer) * self.layer_stride + block * self.block_stride + start


@dataclass(frozen=True)
class Layout:
    """A rank's KV layout; every rank of a group has the same one."""

    num_layers: int
    num_blocks: int
    block_bytes: int
    chunk_bytes: int
    layer_stride: int
    block_stride: int
    offset: int = 0
    block_slots: int = 0  # > 0: slot-addressed (see KVLayout.slot_map)
    extents: tuple[Extent, ...] = ()   # empty: one extent from the fields above, in region 0
    _by_layer: tuple[tuple[Extent, ...], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        ext = tuple(e if isinstance(e, Extent) else Extent(**e) for e in self.extents)
        object.__setattr__(self, "extents", ext)
        every = ext or (Extent(0, 0, self.num_layers, self.offset, self.layer_stride, self.block_stride,
                               self.block_bytes, 0),)
        by_layer = tuple(tuple(sorted((e for e in every if e.first_layer <= layer < e.first_layer + e.layers),
                                      key=lambda e: e.at))
                         for layer in range(max(self.num_layers, 0)))
        object.__setattr__(self, "_by_layer", by_layer)

    # ------------------------------------------------------------------ shape

    @property
    def chunks(self) -> int:
        return self.block_bytes // self.chunk_bytes

    @property
    def simple(self) -> bool:
        """One strided piece of region 0 for every shard (the fast paths' case)."""
        return not self.extents

    @property
    def regions(self) -> int:
        """How many regions the layout reads from."""
        return 1 + max((e.region for e in self.extents), default=0)

    def pieces(self, layer: int) -> tuple[Extent, ...]:
        """The extents of ``layer``'s shards, in shard order."""
        return self._by_layer[layer]

    def spans(self, layer: int, start: int, end: int) -> list[tuple[Extent, int, int]]:
        """Bytes [start, end) of a shard of ``layer`` as (extent, first byte in
        the extent's piece, length) pieces, in order."""
        out = []
        for e in self._by_layer[layer]:
            lo, hi = max(start, e.at), min(end, e.at + e.bytes)
            if lo < hi:
                out.append((e, lo - e.at, hi - lo))
        return out

    def region_bytes(self, region: int = 0) -> int:
        """Smallest ``region`` that holds every piece the layout puts there."""
        ends = [e.footprint(self.num_blocks)[1] for layer in self._by_layer for e in layer if e.region == region]
        return max(ends, default=0)

    def kv_bytes(self) -> int:
        return self.num_layers * self.num_blocks * self.block_bytes

    # ------------------------------------------------------------------ wire and manifest

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "_by_layer"}
        d["extents"] = [asdict(e) for e in self.extents]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(**{k: v for k, v in d.items() if k != "_by_layer"})

    @classmethod
    def from_proto(cls, lay: Any) -> Layout:
        return cls(lay.num_layers, lay.num_blocks, lay.block_bytes, lay.chunk_bytes, lay.layer_stride,
                   lay.block_stride, lay.offset, lay.block_slots,
                   tuple(Extent(e.region, e.first_layer, e.layers, e.offset, e.layer_stride, e.block_stride,
                                e.bytes, e.at) for e in lay.extents))

    # ------------------------------------------------------------------ validation

    def problems(self) -> list[str]:
        """Why this layout is unusable (empty: it is usable)."""
        p = []
        if min(self.num_layers, self.num_blocks, self.block_bytes, self.chunk_bytes) < 1:
            return ["num_layers, num_blocks, block_bytes and chunk_bytes must be >= 1"]
        if self.block_bytes % self.chunk_bytes:
            p.append(f"chunk_bytes {self.chunk_bytes} does not divide block_bytes {self.block_bytes}")
        if self.chunks > 4096:
            p.append("more than 4096 chunks per block; use a larger chunk_bytes")
        if self.block_slots and self.chunk_bytes != self.block_bytes:
            p.append("a slot-addressed layout needs chunk_bytes == block_bytes")
        if not 0 <= self.block_slots < 1 << 16:
            p.append("block_slots must be below 65536")
        if self.extents:
            p += self._extent_problems()
        elif not _strided_disjoint(self.num_layers, self.num_blocks, self.layer_stride, self.block_stride,
                                   self.block_bytes):
            p.append("layer_stride/block_stride make shards overlap")
        return p

    def _extent_problems(self) -> list[str]:
        p = []
        if len(self.extents) > 4 * self.num_layers + 16:
            p.append(f"{len(self.extents)} extents: at most 4 per layer")
        for i, e in enumerate(self.extents):
            if e.bytes < 1 or e.layers < 1 or e.first_layer + e.layers > self.num_layers or e.region >= 64:
                p.append(f"extent {i}: bytes and layers >= 1, layers within 0..{self.num_layers - 1}, region < 64")
            elif not _strided_disjoint(e.layers, self.num_blocks, e.layer_stride, e.block_stride, e.bytes):
                p.append(f"extent {i}: its strides make shards overlap")
            elif not self.block_slots and (e.at % self.chunk_bytes or e.bytes % self.chunk_bytes):
                p.append(f"extent {i}: a chunk of {self.chunk_bytes} bytes would cross it")
        if p:
            return p
        for layer, pieces in enumerate(self._by_layer):
            at = 0
            for e in pieces:
                if e.at != at:
                    return [f"layer {layer}: extents leave a gap or overlap at shard byte {at}"]
                at += e.bytes
            if at != self.block_bytes:
                return [f"layer {layer}: extents hold {at} bytes of a {self.block_bytes}-byte shard"]
        # extents sharing a region may interleave (K and V of a block side by side,
        # layers alternating) but no two pieces may overlap
        for r in range(self.regions):
            mine = [e for e in self.extents if e.region == r]
            for i, a in enumerate(mine):
                for b in mine[i + 1 :]:
                    if _overlap(a, b, self.num_blocks):
                        return [f"region {r}: extents at offsets {a.offset} and {b.offset} overlap"]
        return []

    def slot_map_problems(self, slot_map: bytes) -> list[str]:
        """Check a KVLayout.slot_map against this layout."""
        if not self.block_slots:
            return ["slot_map given without block_slots"] if slot_map else []
        if len(slot_map) != 2 * self.block_bytes:
            return [f"slot_map has {len(slot_map)} bytes, not 2 per block byte ({2 * self.block_bytes})"]
        slots = np.frombuffer(slot_map, dtype="<u2")
        if int(slots.max()) >= self.block_slots:
            return [f"slot_map names slot {int(slots.max())} of a {self.block_slots}-slot block"]
        return []


def _overlap(a: Extent, b: Extent, blocks: int) -> bool:
    """Does some block's piece of ``a`` overlap some block's piece of ``b`` (same region)?
    Exact for equal block strides, else by each layer's footprint (conservative)."""
    a0, a1 = a.footprint(blocks)
    b0, b1 = b.footprint(blocks)
    if a1 <= b0 or b1 <= a0:
        return False
    span_a = (blocks - 1) * a.block_stride + a.bytes
    span_b = (blocks - 1) * b.block_stride + b.bytes
    for la in range(a.layers):
        xa = a.offset + la * a.layer_stride
        for lb in range(b.layers):
            xb = b.offset + lb * b.layer_stride
            if xa + span_a <= xb or xb + span_b <= xa:
                continue
            if a.block_stride != b.block_stride or blocks == 1:
                if blocks == 1 and not (xa + a.bytes <= xb or xb + b.bytes <= xa):
                    return True
                if blocks > 1:
                    return True
                continue
            # a's piece k blocks from b's: [xa + k*bs, xa + k*bs + na) against [xb, xb + nb)
            bs, d = a.block_stride, xb - xa
            k = max((d - a.bytes) // bs + 1, 1 - blocks)  # the smallest k with xa + k*bs + na > xb
            if k <= blocks - 1 and k * bs < d + b.bytes:
                return True
    return False


def _strided_disjoint(layers: int, blocks: int, ls: int, bs: int, nbytes: int) -> bool:
    """Pieces of ``nbytes`` at ``l * ls + b * bs`` do not overlap: blocks nested in
    layers, or layers nested in blocks."""
    ls = ls if layers > 1 else 1 << 62
    bs = bs if blocks > 1 else 1 << 62
    if layers == 1 and blocks == 1:
        return True
    return (bs >= nbytes and ls >= bs * blocks) or (ls >= nbytes and bs >= ls * layers) or (
        layers == 1 and bs >= nbytes) or (blocks == 1 and ls >= nbytes)


__all__ = ["Extent", "Layout"]
