"""A stand-in for CUDA (outside the project, and there is no GPU here), so that the
daemon's CUDA data path runs on the CPU: the same
:class:`~ghostserve.daemon.datapath.cudart.CudaRuntime` interface, over host memory.

* Devices are numbered 0..N-1 with UUIDs ``bytes([d]) * 16``.
* "Device memory" is host memory: a worker's KV region is a POSIX shared-memory
  segment whose name, padded to 64 bytes, is its "IPC handle" (:func:`ipc_handle`);
  ``alloc`` gives a numpy buffer. Every pointer remembers its device.
* Work runs at once, in order; what the stand-in checks is what would go wrong on
  a GPU: a kernel (``matmul``, ``checksums``) may read and write only memory of
  its own device (so the data path must stage peer and host bytes first), a copy
  to or from the parity arena needs it registered (pinned), and a kernel or copy
  that reads a rank's region must run on a stream that waited for the event the
  worker recorded after its last writes (:meth:`HostCuda.worker_event`; tests
  keep one step in flight at a time, so "last" is the step being read).
* The arithmetic is the project's references: ISA-L for the GF(2^8) kernel,
  :func:`ghostserve.codec.gpu_checksum.reference` for sum64.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

from ghostserve import shm
from ghostserve.codec import RSCode
from ghostserve.codec.gpu_checksum import reference
from ghostserve.codec.isal import encode_raw
from ghostserve.errors import GpuUnavailable


def ipc_handle(name: str) -> bytes:
    """The stand-in's IPC handle of shared-memory segment ``name``."""
    raw = name.encode()
    assert len(raw) <= 64
    return raw.ljust(64, b"\0")


def uuid_of(device: int) -> bytes:
    return bytes([device + 1]) * 16


@dataclass
class SimEvent:
    recorded: bool = True
    serial: int = 0

    def synchronize(self) -> None:
        assert self.recorded, "synchronize on an event never recorded"


@dataclass
class SimStream:
    device: int
    waited: set[int] = field(default_factory=set)  # serials of worker events waited on


class HostCuda:
    """See the module doc. ``log`` counts the operations (tests look at it)."""

    def __init__(self, devices: int = 2):
        self.devices = devices
        self._ipc: dict[bytes, list] = {}        # handle -> [segment, base, refs, device]
        self._mem: list[tuple[int, int, int]] = []  # (start, end, device) of device memory
        self._keep: list[np.ndarray] = []
        self.pinned: list[tuple[int, int]] = []
        self._streams: dict[int, SimStream] = {}
        self._worker_events: dict[bytes, SimEvent] = {}
        self._pending: dict[str, SimEvent] = {}  # region -> last worker event
        self._serial = itertools.count(1)
        self._isal = RSCode(2, 1, "isal").backend
        self.lock = threading.Lock()
        self.log: dict[str, int] = {}

    # ------------------------------------------------------------------ worker side (tests)

    def worker_event(self, *regions: str) -> bytes:
        """A worker wrote ``regions`` (on one stream) and recorded one interprocess
        event after those writes: its handle."""
        ev = SimEvent(serial=next(self._serial))
        handle = ev.serial.to_bytes(8, "little").ljust(64, b"\0")
        with self.lock:
            self._worker_events[handle] = ev
            for region in regions:
                self._pending[region] = ev
        return handle

    # ------------------------------------------------------------------ CudaRuntime

    def _count(self, op: str) -> None:
        self.log[op] = self.log.get(op, 0) + 1

    def device_of(self, uuid: bytes) -> int:
        for d in range(self.devices):
            if uuid_of(d) == bytes(uuid):
                return d
        raise GpuUnavailable(f"no device with UUID {bytes(uuid).hex()}")

    def open_ipc(self, handle: bytes, device: int) -> int:
        with self.lock:
            hit = self._ipc.get(handle)
            if hit is None:
                seg = shm.Segment.attach(handle.rstrip(b"\0").decode())
                base = seg.array().ctypes.data
                hit = self._ipc[handle] = [seg, base, 0, device]
                self._mem.append((base, base + seg.size, device))
            assert hit[3] == device, "an allocation opened on another device than it lives on"
            hit[2] += 1
            return hit[1]

    def close_ipc(self, handle: bytes) -> None:
        with self.lock:
            hit = self._ipc[handle]
            hit[2] -= 1
            if hit[2] == 0:
                del self._ipc[handle]
                self._mem.remove((hit[1], hit[1] + hit[0].size, hit[3]))

    def open_count(self) -> int:
        return len(self._ipc)

    def register_host(self, addr: int, nbytes: int) -> None:
        self.pinned.append((addr, addr + nbytes))

    def unregister_host(self, addr: int) -> None:
        self.pinned = [p for p in self.pinned if p[0] != addr]

    def stream(self, device: int) -> SimStream:
        with self.lock:
            return self._streams.setdefault(device, SimStream(device))

    def alloc(self, device: int, nbytes: int) -> tuple[int, np.ndarray]:
        buf = np.zeros(nbytes, dtype=np.uint8)
        with self.lock:
            self._keep.append(buf)
            self._mem.append((buf.ctypes.data, buf.ctypes.data + nbytes, device))
        return buf.ctypes.data, buf

    def _device_of_ptr(self, ptr: int, n: int) -> int | None:
        for a, b, d in self._mem:
            if a <= ptr and ptr + n <= b:
                return d
        return None

    def _region_of(self, ptr: int) -> str | None:
        for seg, base, _, _ in self._ipc.values():
            if base <= ptr < base + seg.size:
                return seg.name
        return None

    def _check_ready(self, stream: SimStream, ptrs) -> None:
        for p in ptrs:
            region = self._region_of(p)
            ev = self._pending.get(region) if region else None
            assert ev is None or ev.serial in stream.waited, \
                f"a kernel read {region} before waiting for the worker's event"

    def copy(self, dst: int, src: int, nbytes: int, stream: SimStream) -> None:
        self._count("copy")
        for p in (dst, src):
            if self._device_of_ptr(p, nbytes) is None:
                in_arena = any(a <= p and p + nbytes <= b for a, b in self.pinned)
                assert in_arena or self._is_host_scratch(p), "copy to or from unpinned host memory"
        self._check_ready(stream, [src])
        ctypes.memmove(dst, src, nbytes)

    def _is_host_scratch(self, p: int) -> bool:
        return True  # pageable host memory is legal for a (synchronous) copy; the arena must be pinned

    def memset(self, ptr: int, value: int, nbytes: int, stream: SimStream) -> None:
        assert self._device_of_ptr(ptr, nbytes) == stream.device, "memset on another device's memory"
        ctypes.memset(ptr, value, nbytes)

    def open_event(self, handle: bytes, device: int) -> SimEvent:
        assert 0 <= device < self.devices
        return self._worker_events[handle]

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        stream.waited.add(event.serial)

    def record(self, stream: SimStream) -> SimEvent:
        return SimEvent()

    def matmul(self, device, coeffs, src, dst, nbytes, stream) -> None:
        """One launch over every (sources, destinations) set: a destination may not
        overlap any buffer of the launch (the sets run at once on a GPU; all spans
        are ``nbytes`` long, so checking neighbours in address order finds any overlap)."""
        self._count("matmul")
        self.log["sets"] = self.log.get("sets", 0) + len(src)
        assert stream.device == device
        assert len(src) == len(dst) and src
        spans = sorted((p, p + nbytes, j >= len(s)) for s, d in zip(src, dst, strict=True)
                       for j, p in enumerate([*s, *d]))
        for (_, a1, w0), (b0, _, w1) in zip(spans, spans[1:], strict=False):
            assert a1 <= b0 or not (w0 or w1), \
                "a kernel's output overlaps another buffer of the same launch"
        for s, d in zip(src, dst, strict=True):
            for p in (*s, *d):
                assert self._device_of_ptr(p, nbytes) == device, "a kernel touched memory of another device or the host"
            self._check_ready(stream, s)
        tables = self._isal.tables(np.ascontiguousarray(coeffs, dtype=np.uint8))
        for s, d in zip(src, dst, strict=True):
            encode_raw(tables, nbytes, list(s), list(d))

    def checksums(self, device, chunks, stream) -> list[int]:
        self._count("checksums")
        out = []
        for ch in chunks:
            data = []
            for addr, n in ch.pieces:
                assert self._device_of_ptr(addr, n) == device, "a checksum of another device's memory"
                data.append(np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr)).copy())
            self._check_ready(stream, [a for a, _ in ch.pieces])
            slot_map = None
            if ch.slot_map:
                assert self._device_of_ptr(ch.slot_map, 2 * ch.period) == device
                slot_map = np.ctypeslib.as_array((ctypes.c_uint16 * ch.period).from_address(ch.slot_map)).copy()
            out.append(reference(data, slot_map=slot_map, fill=ch.fill, period=ch.period or None, seed=ch.seed))
        return out
