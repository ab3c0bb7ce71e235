"""A rank's step commit, validated against the group's layout, and byte-range merging."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ghostserve.daemon.index import Record
from ghostserve.daemon.layout import Layout
from ghostserve.errors import BlockOutOfRange, InvalidRequest

Range = tuple[int, int, int]  # (block, start, end): bytes of a shard, in every layer


@dataclass
class CommitRecord:
    """A step commit of one rank (plain Python, no proto): what it wrote and what it
    says about requests. Built by the gRPC layer, checked by :func:`validate`."""

    step: int
    ranges: list[Range]                         # chunk-aligned
    requests: list[tuple[str, int]] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    fills: dict[int, int] = field(default_factory=dict)   # block -> filled slots (slot layouts)
    released: list[int] = field(default_factory=list)     # dropped before this step's writes
    records: list[Record] = field(default_factory=list)
    event: bytes = b""  # CUDA ranks: IPC handle of the event after the step's KV writes


def validate(rec: CommitRecord, layout: Layout, group: str, rank: int) -> None:
    """Raise :class:`BlockOutOfRange` or :class:`InvalidRequest` unless every
    range, block and request id of ``rec`` fits ``layout``; nothing is changed."""
    lay = layout
    for block, start, end in rec.ranges:
        if block >= lay.num_blocks:
            raise BlockOutOfRange(group, rank, block, f"outside 0..{lay.num_blocks - 1}")
        if not 0 <= start < end <= lay.block_bytes:
            raise BlockOutOfRange(group, rank, block, f"byte range [{start}, {end}) outside 0..{lay.block_bytes}")
        if start % lay.chunk_bytes or end % lay.chunk_bytes:
            raise InvalidRequest(f"byte range [{start}, {end}) of block {block} is not aligned "
                                 f"to chunk_bytes {lay.chunk_bytes}")
    for block in (*rec.freed, *rec.released):
        if block >= lay.num_blocks:
            raise BlockOutOfRange(group, rank, block, "freed block outside the layout")
    if rec.fills and not lay.block_slots:
        raise InvalidRequest("fills are for slot-addressed layouts (block_slots > 0)")
    for block, filled in rec.fills.items():
        if block >= lay.num_blocks:
            raise BlockOutOfRange(group, rank, block, "filled block outside the layout")
        if not 0 < filled <= lay.block_slots:
            raise InvalidRequest(f"block {block}: {filled} filled slots of {lay.block_slots}")
    for record in rec.records:
        if not record.request or len(record.request) > 256:
            raise InvalidRequest("request ids must be 1-256 characters")
        if any(b >= lay.num_blocks for b in record.blocks):
            raise BlockOutOfRange(group, rank, max(record.blocks), "request record block outside the layout")
    for req, _ in rec.requests:
        if not req or len(req) > 256:
            raise InvalidRequest("request ids must be 1-256 characters")


def merge(ranges: Iterable[Range]) -> list[Range]:
    """(block, start, end) ranges, sorted, overlapping or touching ones joined."""
    out: list[Range] = []
    for block, s, e in sorted(ranges):
        if out and out[-1][0] == block and s <= out[-1][2]:
            out[-1] = (block, out[-1][1], max(out[-1][2], e))
        else:
            out.append((block, s, e))
    return out
