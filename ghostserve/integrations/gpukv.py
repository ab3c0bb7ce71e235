"""A TP worker's GPU KV handed to the daemon: the CUDA allocations that hold it
(exported over CUDA IPC), where each layer's blocks lie in them, which slot
(token of a block) each byte holds, and one interprocess event per step.

Engines allocate each layer's KV as its own tensor, in the attention backend's
shape, often as a view permuted into the backend's stride order:

* FlashAttention: ``(2, num_blocks, block_size, kv_heads, head_size)``: a
  block's K and V lie apart (two runs per block);
* FlashInfer: ``(num_blocks, 2, block_size, kv_heads, head_size)``: one run;
* either with heads before slots in memory (an ``HND`` stride order).

Nothing here asks the attention backend: a block's bytes and their slots follow
from the tensor's shape and strides (:func:`block_runs`, :func:`slot_map`), the
same answer the CPU connector's probe learns by writing through the backend
(tests/test_gpukv.py checks one against the other).

The daemon maps memory by allocation, as torch's own IPC does: the base of the
allocation holding a layer (``cuMemGetAddressRange``), its IPC handle
(``cudaIpcGetMemHandle``), the layer's offset in it, the device by UUID. Memory
that plain CUDA IPC cannot export (the caching allocator's expandable segments)
is refused at start-up, naming the setting.

Contracts: :func:`export` runs once, on the worker's main thread, before any
request; :class:`StepEvents` is used from that thread only (the worker never
waits on the daemon: an event is only recorded and kept alive until the step is
protected, i.e. the daemon has opened it).
"""

from __future__ import annotations

import collections
import ctypes
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ghostserve.errors import Unsupported

EXPANDABLE = ("the KV is in the caching allocator's expandable segments, which CUDA IPC cannot export: "
              "start the engine with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False")


class CudaApi(Protocol):
    """What the worker side asks of CUDA (the real one: :class:`BindingsCuda`)."""

    def allocation(self, ptr: int) -> tuple[int, int]:
        """(base, size) of the device allocation holding ``ptr``."""

    def ipc_handle(self, base: int) -> bytes:
        """The 64-byte IPC handle of the allocation at ``base``; raises
        :class:`Unsupported` for memory plain IPC cannot export."""

    def device_uuid(self, device: int) -> bytes:
        """The 16-byte UUID of device ``device`` (this process's ordinal)."""


class BindingsCuda:
    """:class:`CudaApi` on cuda-bindings (the ``gpu-cuda12``/``gpu-cuda13`` extra)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver, runtime  # noqa: PLC0415
        except ImportError as exc:
            raise Unsupported(f"GPU KV needs cuda-bindings ({exc}): pip install 'ghostserve[gpu-cuda13]' "
                              "(or [gpu-cuda12])") from None
        self.cudrv, self.cudart = driver, runtime

    def allocation(self, ptr: int) -> tuple[int, int]:
        err, base, size = self.cudrv.cuMemGetAddressRange(ptr)
        if int(err) != 0:
            raise Unsupported(f"cannot find the allocation of KV at {ptr:#x}: {err!r}")
        return int(base), int(size)

    def ipc_handle(self, base: int) -> bytes:
        err, handle = self.cudart.cudaIpcGetMemHandle(base)
        if int(err) != 0:  # memory made with the VMM API (expandable segments) has no such handle
            raise Unsupported(f"{EXPANDABLE} (cudaIpcGetMemHandle: {err!r})")
        return ctypes.string_at(handle.getPtr(), 64)

    def device_uuid(self, device: int) -> bytes:
        err, prop = self.cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            raise Unsupported(f"cannot read device {device}'s properties: {err!r}")
        return bytes(prop.uuid.bytes)


def expandable_segments(environ: dict[str, str] | None = None) -> bool:
    """Does the caching allocator's configuration ask for expandable segments?"""
    env = os.environ if environ is None else environ
    conf = ",".join(env.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def _element_offsets(shape: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """The offset, in elements, of every element of a strided view (row-major order)."""
    off = np.zeros((), dtype=np.int64)
    for n, s in zip(shape, strides, strict=True):
        off = off[..., None] + np.arange(n, dtype=np.int64) * s
    return off.reshape(-1)


def _block_view(shape: tuple[int, ...], strides: tuple[int, ...], block_dim: int
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return (shape[:block_dim] + shape[block_dim + 1:], strides[:block_dim] + strides[block_dim + 1:])


def block_runs(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, block_dim: int
               ) -> list[tuple[int, int]]:
    """The bytes of one block as (offset from the block's first element, length)
    runs, in address order. Raises :class:`Unsupported` when two elements share
    bytes (a broadcast view)."""
    sub_shape, sub_strides = _block_view(shape, strides, block_dim)
    offs = np.sort(_element_offsets(sub_shape, sub_strides))
    if offs.size and offs[0] < 0:
        raise Unsupported("a KV view with negative strides")
    if np.any(np.diff(offs) < 1):
        raise Unsupported("a KV view whose elements overlap")
    cuts = np.flatnonzero(np.diff(offs) != 1) + 1
    runs = []
    for piece in np.split(offs, cuts):
        runs.append((int(piece[0]) * itemsize, int(piece.size) * itemsize))
    return runs


def slot_map(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, block_dim: int, slot_dim: int
             ) -> np.ndarray:
    """The slot of every byte of one block, the block's runs laid end to end in
    address order (the daemon's logical block), as little-endian uint16."""
    sub_shape, sub_strides = _block_view(shape, strides, block_dim)
    sdim = slot_dim - (slot_dim > block_dim)
    offs = _element_offsets(sub_shape, sub_strides)
    slots = np.broadcast_to(np.arange(sub_shape[sdim]).reshape([-1 if i == sdim else 1 for i in range(len(sub_shape))]),
                            sub_shape).reshape(-1)
    order = np.argsort(offs, kind="stable")
    return np.repeat(slots[order], itemsize).astype("<u2")


def find_dims(shape: tuple[int, ...], num_blocks: int, block_size: int) -> tuple[int, int]:
    """(block dim, slot dim) of a backend's logical KV shape: blocks are dim 0 or 1
    (the first of ``num_blocks`` entries); a dim of 2 beside them is K/V
    (FlashAttention's dim 0, FlashInfer's dim 1); slots are the first later dim of
    ``block_size`` entries (slots come before heads in every backend's shape)."""
    block_dim = next((d for d in (0, 1) if d < len(shape) and shape[d] == num_blocks), None)
    if block_dim is None:
        raise Unsupported(f"KV of shape {tuple(shape)} has no dim of {num_blocks} blocks among its first two")
    kv_dim = 0 if block_dim == 1 else (1 if len(shape) >= 5 and shape[1] == 2 else -1)
    slot_dim = next((d for d in range(block_dim + 1, len(shape)) if d != kv_dim and shape[d] == block_size), None)
    if slot_dim is None:
        raise Unsupported(f"KV of shape {tuple(shape)} has no dim of {block_size} slots after its block dim")
    return block_dim, slot_dim


@dataclass(frozen=True)
class Allocation:
    """One CUDA allocation holding KV, as the daemon will map it."""

    base: int
    size: int
    handle: bytes
    device_uuid: bytes


@dataclass(frozen=True)
class KvExport:
    """What a rank registers: its allocations (regions, in order) and the layout
    (:class:`~ghostserve.daemon.layout.Layout` fields, extents included)."""

    allocations: tuple[Allocation, ...]
    layout: dict[str, Any]
    device: int


def export(tensors: list[Any], num_blocks: int, block_size: int, cuda: CudaApi,
           environ: dict[str, str] | None = None) -> KvExport:
    """Describe a rank's per-layer KV tensors (torch CUDA tensors, or anything with
    ``shape``, ``stride()``, ``element_size()``, ``data_ptr()``, ``dtype`` and
    ``device.index``) for the daemon. Every layer must have one shape, stride
    order and dtype, on one device. Raises :class:`Unsupported` otherwise."""
    if expandable_segments(environ):
        raise Unsupported(EXPANDABLE)
    if not tensors:
        raise Unsupported("no KV tensors")
    first = tensors[0]
    shape, strides, es = tuple(first.shape), tuple(first.stride()), first.element_size()
    for t in tensors:
        if tuple(t.shape) != shape or tuple(t.stride()) != strides or t.dtype != first.dtype:
            raise Unsupported("KV layers differ in shape, stride or dtype")
        if t.device.index != first.device.index:
            raise Unsupported("KV layers on two devices; one rank, one device")
    block_dim, slot_dim = find_dims(shape, num_blocks, block_size)
    runs = block_runs(shape, strides, es, block_dim)
    block_bytes = sum(n for _, n in runs)
    block_stride = strides[block_dim] * es
    uuid = cuda.device_uuid(first.device.index)
    allocations: list[Allocation] = []
    index: dict[int, int] = {}
    extents = []
    for layer, t in enumerate(tensors):
        ptr = t.data_ptr()
        base, size = cuda.allocation(ptr)
        if base not in index:
            index[base] = len(allocations)
            allocations.append(Allocation(base, size, cuda.ipc_handle(base), uuid))
        at = 0
        for off, n in runs:
            extents.append(dict(region=index[base], first_layer=layer, layers=1, offset=ptr - base + off,
                                layer_stride=0, block_stride=block_stride, bytes=n, at=at))
            at += n
        end = ptr - base + (num_blocks - 1) * block_stride + max(o + n for o, n in runs)
        if end > size:
            raise Unsupported(f"layer {layer}'s KV runs past its allocation ({end} > {size} bytes)")
    layout = dict(num_layers=len(tensors), num_blocks=num_blocks, block_bytes=block_bytes, chunk_bytes=block_bytes,
                  layer_stride=0, block_stride=0, offset=0, block_slots=block_size,
                  slot_map=slot_map(shape, strides, es, block_dim, slot_dim).tobytes(), extents=extents)
    return KvExport(tuple(allocations), layout, first.device.index)


class StepEvents:
    """One interprocess CUDA event per committed step, recorded after the step's
    KV writes on the stream that made them, and kept alive until the daemon has
    used it (the step is protected). Beyond ``keep`` held events the oldest is
    let go, but only after the GPU has passed it (its writes are done, so a
    daemon that opens it late cannot read early; one that cannot open it fails
    that step visibly). ``new_event`` makes one (the real one:
    ``torch.cuda.Event(interprocess=True)``, whose ``ipc_handle()`` is 64 bytes)."""

    def __init__(self, new_event: Any, keep: int):
        self._new, self._keep = new_event, keep
        self._held: collections.deque[tuple[int, Any]] = collections.deque()

    def record(self, step: int, stream: Any = None) -> bytes:
        """Record this step's event on ``stream`` (None: the current one); its handle."""
        ev = self._new()
        ev.record(stream)
        self._held.append((step, ev))
        while len(self._held) > self._keep:  # the daemon is far behind: the oldest goes once the GPU passed it
            self._held.popleft()[1].synchronize()
        return bytes(ev.ipc_handle())

    def protected(self, step: int) -> None:
        """The daemon has encoded every step up to ``step``: their events may go."""
        while self._held and self._held[0][0] <= step:
            self._held.popleft()

    def __len__(self) -> int:
        return len(self._held)


__all__ = ["EXPANDABLE", "Allocation", "BindingsCuda", "CudaApi", "KvExport", "StepEvents", "block_runs",
           "expandable_segments", "export", "find_dims", "slot_map"]
