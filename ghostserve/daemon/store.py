"""The parity store: parity and its metadata in named shared memory.

Everything a restore needs lives here, outside the daemon's heap, so a daemon
that is SIGKILLed and restarted re-attaches and loses nothing protected:

* ``{prefix}{group}.parity``: parity bytes, shape (layers, m, blocks, block_bytes)
  (a parity row of a layer is contiguous across blocks: a restore decodes many
  blocks in one call),
  allocated up front (``posix_fallocate``: a full ``/dev/shm`` is an error at
  registration, never a SIGBUS while encoding);
* ``{prefix}{group}.meta``: a manifest (JSON: code, layout, ranks and their
  regions), the protected step, and two arrays: ``chunk_step[block, chunk]``
  (step at which a chunk was last protected, -1 if not) and
  ``crc[block, chunk, rank]`` (CRC32C of that rank's bytes of the chunk,
  chained over layers, taken at encode time); for slot-addressed layouts also
  ``fill[block]`` (slots covered by that block's checksums and parity) and the
  layout's ``slot_map``;
* ``{prefix}{group}.index``: the request index and watermarks
  (:mod:`ghostserve.daemon.index`).

Crash consistency: the manifest is double-buffered with a sequence number
(a torn write leaves the older copy valid); a chunk is marked unprotected
before its parity is rewritten and protected again only after parity and
checksums are in place. Only the group's encoder thread writes step records;
readers (restore, scrub, status) run under the group's lock.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.daemon import index
from ghostserve.daemon.layout import Layout
from ghostserve.errors import ForeignStore

MAGIC = b"GSMETA03"
_HDR = 64  # [magic 8][manifest slot bytes u64]


def manifest_slot(n: int) -> int:
    """Bytes of one manifest copy: room for every rank's region name and pid."""
    return (16 << 10) + 512 * n


def checksum_width(manifest: dict[str, Any]) -> int:
    """Bytes of one chunk checksum, as the group's data path said at its creation
    (CRC32C: 4; sum64: 8). Stores made before the manifest recorded it: 8 for CUDA."""
    return int(manifest.get("checksum_width") or (8 if manifest.get("kind") == "cuda" else 4))


def names(prefix: str, group: str) -> tuple[str, str]:
    return f"{prefix}{group}.meta", f"{prefix}{group}.parity"


class ParityStore:
    """The shared-memory state of one group. Create with :meth:`create` or :meth:`open`."""

    def __init__(self, meta: shm.Segment, parity: shm.Segment, manifest: dict[str, Any]):
        self.meta, self.parity_seg = meta, parity
        self.manifest = manifest
        self.index: index.RequestIndex | None = None  # set by create() and open()
        self.layout = Layout.from_dict(manifest["layout"])
        n, m = manifest["world_size"], manifest["parity"]
        lay = self.layout
        self.k, self.m = n, m
        self._slot = manifest_slot(n)
        off = _HDR + 2 * self._slot
        self._protected = meta.array(np.int64, off, 1)
        off += 8
        cs = lay.num_blocks * lay.chunks
        self.chunk_step = meta.array(np.int64, off, cs).reshape(lay.num_blocks, lay.chunks)
        off += 8 * cs
        # CRC32C (host groups) or sum64 (CUDA groups: ghostserve.codec.gpu_checksum)
        dtype = np.uint64 if checksum_width(manifest) == 8 else np.uint32
        self.crc = meta.array(dtype, off, cs * n).reshape(lay.num_blocks, lay.chunks, n)
        off += self.crc.nbytes
        # slot-addressed layouts only (zero-length otherwise)
        self.fill = meta.array(np.int32, off, lay.num_blocks if lay.block_slots else 0)
        off += self.fill.nbytes
        self.slot_map = meta.array(np.uint16, off, lay.block_bytes if lay.block_slots else 0)
        self.parity = parity.array().reshape(lay.num_layers, m, lay.num_blocks, lay.block_bytes)

    @staticmethod
    def sizes(layout: Layout, n: int, m: int, width: int = 4) -> tuple[int, int]:
        """(metadata, parity) bytes of a store; ``width``: bytes of one checksum."""
        cs = layout.num_blocks * layout.chunks
        meta = _HDR + 2 * manifest_slot(n) + 8 + 8 * cs + width * cs * n
        if layout.block_slots:
            meta += 4 * layout.num_blocks + 2 * layout.block_bytes
        return meta, layout.kv_bytes() * m

    @classmethod
    def create(cls, prefix: str, group: str, manifest: dict[str, Any], slot_map: bytes = b"") -> ParityStore:
        layout = Layout.from_dict(manifest["layout"])
        meta_size, parity_size = cls.sizes(layout, manifest["world_size"], manifest["parity"],
                                           checksum_width(manifest))
        meta_name, parity_name = names(prefix, group)
        cls.destroy(prefix, group)  # leftovers of a group never completed
        parity = meta = None
        try:
            parity = shm.Segment.create(parity_name, parity_size, reserve=True)
            meta = shm.Segment.create(meta_name, meta_size, reserve=True)
            store = cls(meta, parity, manifest)
            store.index = index.RequestIndex.open(prefix, group, create=True)
        except BaseException:
            for seg in (parity, meta):
                if seg is not None:
                    seg.close()
            cls.destroy(prefix, group)
            raise
        store.chunk_step[:] = -1
        store._protected[0] = -1
        if layout.block_slots:
            store.slot_map[:] = np.frombuffer(slot_map, dtype="<u2")
        struct.pack_into("<Q", meta.buf, 8, store._slot)
        store.write_manifest(manifest)
        meta.buf[0:8] = MAGIC  # last: a meta segment without magic is incomplete
        return store

    @classmethod
    def open(cls, prefix: str, group: str) -> ParityStore:
        """Re-attach after a daemon restart. Raises ValueError if incomplete."""
        meta_name, parity_name = names(prefix, group)
        meta = shm.Segment.attach(meta_name)
        try:
            if bytes(meta.buf[0:8]) != MAGIC:
                raise ValueError(f"{meta_name}: not a complete ghostserve meta segment")
            (slot,) = struct.unpack_from("<Q", meta.buf, 8)
            manifest = _read_record(meta, _HDR, slot)
            if manifest is None or slot != manifest_slot(manifest["world_size"]):
                raise ValueError(f"{meta_name}: no valid manifest")
            if manifest.get("shm_prefix", prefix) != prefix:
                raise ForeignStore(f"{meta_name} belongs to the daemon of prefix {manifest['shm_prefix']!r}")
            layout = Layout.from_dict(manifest["layout"])
            _, parity_size = cls.sizes(layout, manifest["world_size"], manifest["parity"])
            parity = shm.Segment.attach(parity_name, parity_size)
        except BaseException:
            meta.close()
            raise
        store = cls(meta, parity, manifest)
        try:
            store.index = index.RequestIndex.open(prefix, group)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def groups(cls, prefix: str) -> list[str]:
        return [n[len(prefix) : -len(".meta")] for n in shm.list_names(prefix) if n.endswith(".meta")]

    @classmethod
    def destroy(cls, prefix: str, group: str) -> None:
        """Unlink every segment of the group's store (those that exist)."""
        for name in names(prefix, group):
            shm.unlink(name)
        index.destroy(prefix, group)

    def nbytes(self) -> int:
        """Shared memory this store holds: parity, metadata and index."""
        return self.parity_seg.size + self.meta.size + (self.index.nbytes() if self.index else 0)

    # ---------------------------------------------------------------- records

    @property
    def protected_step(self) -> int:
        return int(self._protected[0])

    @protected_step.setter
    def protected_step(self, step: int) -> None:
        self._protected[0] = step

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest. Raises ValueError if it outgrows its slot (then the old one stays)."""
        _write_record(self.meta, _HDR, self._slot, manifest)
        self.manifest = manifest

    def protected_chunks(self) -> int:
        return int((self.chunk_step >= 0).sum())

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
        self.meta.close()
        self.parity_seg.close()


# A record slot: [seq u64][len u64][json]; two slots, the valid one with the higher seq wins.
_REC = struct.Struct("<QQ")


def _write_record(seg: shm.Segment, base: int, slot: int, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) + _REC.size > slot:
        raise ValueError(f"record of {len(data)} bytes exceeds its {slot}-byte slot")
    seqs = [_REC.unpack_from(seg.buf, base + i * slot)[0] for i in (0, 1)]
    target = 0 if seqs[0] <= seqs[1] else 1
    at = base + target * slot
    _REC.pack_into(seg.buf, at, 0, 0)  # invalidate, then fill, then publish the seq
    seg.buf[at + _REC.size : at + _REC.size + len(data)] = data
    _REC.pack_into(seg.buf, at, max(seqs) + 1, len(data))


def _read_record(seg: shm.Segment, base: int, slot: int) -> Any:
    best = None
    for i in (0, 1):
        at = base + i * slot
        seq, length = _REC.unpack_from(seg.buf, at)
        if seq == 0 or length == 0 or length > slot - _REC.size:
            continue
        try:
            obj = json.loads(bytes(seg.buf[at + _REC.size : at + _REC.size + length]))
        except ValueError:
            continue
        if best is None or seq > best[0]:
            best = (seq, obj)
    return best[1] if best else None
