"""SGLang's MHA KV pool of one rank, in one shared-memory segment the daemon maps.

SGLang (``MHATokenToKVPool``, NHD layout) keeps, per attention layer, K and V as
the two halves of one ``(2, padded_rows, heads, head_dim)`` allocation, rows
indexed by token slot (slot 0's page absorbs padded tokens' writes). The plug-in
builds the same tensors as views of one segment, layers back to back::

    segment = [layer][K|V][padded_rows][heads][head_dim]

so each K or V half is a *plane* of ``padded_rows`` slots at a uniform stride,
and a page of ``page_size`` slots is contiguous in every plane. For the daemon a
plane is a layer and a page is a block: a stripe is one page of one plane on
every rank (a simple, strided layout), slot-addressed so that a page that keeps
filling after it was encoded is checked only over its filled slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """The shape of one rank's pool (what ``MHATokenToKVPool`` was asked for)."""

    layers: int       # attention layers held by this rank's pool
    rows: int         # token slots per K or V buffer: pool size + one page
    page: int         # slots per page (SGLang's --page-size)
    heads: int        # KV heads on this rank
    head_dim: int
    itemsize: int     # bytes per element of the stored dtype

    def __post_init__(self) -> None:
        if min(self.layers, self.rows, self.page, self.heads, self.head_dim, self.itemsize) < 1:
            raise ValueError(f"every dimension of {self} must be >= 1")
        if self.page >= 1 << 16:
            raise ValueError(f"page size {self.page}: at most 65535 slots per page")

    @property
    def padded(self) -> int:
        """Rows rounded up to whole pages (SGLang pads NHD rows the same way)."""
        return -(-self.rows // self.page) * self.page

    @property
    def slot_bytes(self) -> int:
        return self.heads * self.head_dim * self.itemsize

    @property
    def page_bytes(self) -> int:
        """One page of one plane: the RS shard of a stripe."""
        return self.page * self.slot_bytes

    @property
    def plane_bytes(self) -> int:
        return self.padded * self.slot_bytes

    @property
    def num_pages(self) -> int:
        return self.padded // self.page

    @property
    def size(self) -> int:
        """Bytes of the segment: every layer's K and V planes."""
        return self.layers * 2 * self.plane_bytes

    def layout(self) -> dict[str, Any]:
        """``KVLayout`` fields for ``WorkerClient``: planes as layers, pages as blocks."""
        slot_map = (np.arange(self.page_bytes) // self.slot_bytes).astype("<u2")
        return dict(num_layers=2 * self.layers, num_blocks=self.num_pages, block_bytes=self.page_bytes,
                    chunk_bytes=self.page_bytes, layer_stride=self.plane_bytes, block_stride=self.page_bytes,
                    offset=0, block_slots=self.page, slot_map=slot_map.tobytes())

    def page_spans(self, page: int) -> list[tuple[int, int]]:
        """(offset, length) of ``page`` in every plane of the segment, plane order."""
        return [(p * self.plane_bytes + page * self.page_bytes, self.page_bytes) for p in range(2 * self.layers)]


def kv_buffers(buf: Any, geom: PoolGeometry, dtype: Any) -> tuple[list[Any], list[Any]]:
    """SGLang's ``k_buffer`` and ``v_buffer`` lists as torch views of ``buf`` (a
    writable buffer of at least ``geom.size`` bytes, which must outlive them; or
    a uint8 torch tensor of them, a GPU's)."""
    import torch  # noqa: PLC0415

    raw = buf[: geom.size] if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8,
                                                                                 count=geom.size)
    fused = raw.view(dtype).view(geom.layers, 2, geom.padded, geom.heads, geom.head_dim)
    return ([fused[i, 0, : geom.rows] for i in range(geom.layers)],
            [fused[i, 1, : geom.rows] for i in range(geom.layers)])


def pages_of(slots: np.ndarray, page: int) -> np.ndarray:
    """The pages of a request's slot row (one entry per page, in token order): a
    request's pages are filled from their first slot, so every ``page``-th slot
    starts one."""
    return slots[::page] // page if page > 1 else slots


__all__ = ["PoolGeometry", "kv_buffers", "pages_of"]
