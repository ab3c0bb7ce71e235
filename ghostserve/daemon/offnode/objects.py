"""Keys and objects of mirrored KV in the store.

A key names one TP rank's shard of one full block of a token prefix:
``gs1/<space>/<chain>/r<rank>``. ``space`` hashes what makes two engines' KV
interchangeable (the integration's namespace: model, dtypes, block size, TP
size; and the shard format of the layout: layers, block bytes, slots, how the
extents order a shard), not where the engine keeps its blocks, so two nodes
whose engines have different block counts still share keys. ``chain`` is the
block's position in a hash chain over the prefix's tokens (block i's hash
covers tokens [0, (i + 1) * slots)), as vLLM's prefix cache keys blocks.

An object is a 32-byte header and the shard's bytes, layer after layer
(``num_layers * block_bytes``): what the data path's ``read_block`` gathers and
``write_block`` scatters. The header's CRC32C covers the payload; the mirror
checked, when it copied the bytes, that they are the protected ones (the same
CRC32C the daemon recorded when it encoded them, on host KV).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np

from ghostserve.daemon.layout import Layout

MAGIC = b"GSKVBLK1"
_HEADER = struct.Struct("<8sIIIIII")   # magic, layers, block bytes, fill, rank, world size, crc32c
HEADER_BYTES = _HEADER.size


@dataclass(frozen=True)
class KeySpace:
    """Where one kind of KV lives in the store (see the module doc)."""

    prefix: str
    world_size: int
    block_slots: int

    @classmethod
    def of(cls, namespace: str, layout: Layout, world_size: int) -> KeySpace:
        shard = {"layers": layout.num_layers, "block_bytes": layout.block_bytes, "slots": layout.block_slots,
                 "chunk": layout.chunk_bytes,
                 "extents": [(e.first_layer, e.layers, e.bytes, e.at) for e in layout.extents]}
        text = json.dumps([namespace, world_size, shard], sort_keys=True)
        return cls("gs1/" + hashlib.sha256(text.encode()).hexdigest()[:24], world_size, layout.block_slots)

    def chain(self, tokens: np.ndarray | list[int], start: int = 0, seed: str = "") -> list[str]:
        """Hashes of the full blocks of ``tokens`` from block ``start`` on; ``seed``
        is block ``start - 1``'s hash ("" for block 0)."""
        s = self.block_slots
        arr = np.asarray(tokens, dtype="<u4")
        out, h = [], seed
        for i in range(start, len(arr) // s):
            h = hashlib.blake2b(h.encode() + arr[i * s:(i + 1) * s].tobytes(), digest_size=16).hexdigest()
            out.append(h)
        return out

    def key(self, chain: str, rank: int) -> str:
        return f"{self.prefix}/{chain}/r{rank}"


@dataclass(frozen=True)
class BlockObject:
    """One mirrored shard as the store holds it."""

    num_layers: int
    block_bytes: int
    fill: int
    rank: int
    world_size: int
    crc: int

    def pack(self, payload: memoryview | bytes) -> bytes:
        return _HEADER.pack(MAGIC, self.num_layers, self.block_bytes, self.fill, self.rank, self.world_size,
                            self.crc) + bytes(payload)

    @classmethod
    def unpack(cls, data: bytes) -> tuple[BlockObject, memoryview]:
        """(header, payload). Raises ValueError for what is not a mirrored block."""
        if len(data) < HEADER_BYTES:
            raise ValueError(f"{len(data)} bytes: shorter than a header")
        magic, layers, block_bytes, fill, rank, n, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a ghostserve block object")
        payload = memoryview(data)[HEADER_BYTES:]
        if len(payload) != layers * block_bytes:
            raise ValueError(f"payload of {len(payload)} bytes, header says {layers} x {block_bytes}")
        return cls(layers, block_bytes, fill, rank, n, crc), payload


__all__ = ["HEADER_BYTES", "BlockObject", "KeySpace"]
