"""The one module that calls CUDA: the runtime operations the CUDA data path needs.

:class:`CudaRuntime` is the interface; :class:`CupyRuntime` implements it with
CuPy (``cupy.cuda.runtime``, CuPy streams and events, and the kernels of
``cuda/``: ``rs_kernels.cu`` through :mod:`ghostserve.codec.cupy_backend`,
``checksum_kernels.cu`` through :mod:`ghostserve.codec.gpu_checksum`). Nothing
else in the daemon imports CuPy, and this module imports it only when a
:class:`CupyRuntime` is made, i.e. when the first CUDA region registers.

Pointers are plain integers (device addresses, or host addresses of pinned
memory: CUDA's unified addressing lets one ``copy`` take either). Every
operation that takes a ``stream`` is queued on it and returns at once; a
:class:`Event` recorded on a stream says when what came before is done.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ghostserve.errors import GpuUnavailable

INSTALL = ("pip install 'ghostserve[gpu-cuda13]' (or [gpu-cuda12]: CuPy and cuda-bindings for the "
           "machine's CUDA major version) and run the daemon where the GPUs are")

# cudaHostRegisterPortable: the pinning is seen by every CUDA context. CuPy's runtime
# module names none of cudaHostRegister's flags, so the value is CUDA's own.
HOST_REGISTER_PORTABLE = 1


class Event(Protocol):
    def synchronize(self) -> None: ...


class CudaRuntime(Protocol):
    """See the module doc. Thread-safe."""

    def device_of(self, uuid: bytes) -> int:
        """The ordinal, in this process, of the device with this 16-byte UUID."""

    def open_ipc(self, handle: bytes, device: int) -> int:
        """Map an IPC allocation (lazy peer access), once per process: later opens of
        the same handle return the same base and count a reference."""

    def close_ipc(self, handle: bytes) -> None:
        """Drop one reference; the last one unmaps it."""

    def register_host(self, addr: int, nbytes: int) -> None:
        """Pin host memory (``cudaHostRegister``, portable) for asynchronous copies."""

    def unregister_host(self, addr: int) -> None: ...

    def stream(self, device: int) -> Any:
        """A non-blocking stream of the daemon's own on ``device`` (one per device)."""

    def alloc(self, device: int, nbytes: int) -> tuple[int, Any]:
        """(pointer, owner) of device memory; freed when the owner is dropped."""

    def copy(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        """Any direction (unified addressing): device, peer or pinned host memory."""

    def memset(self, ptr: int, value: int, nbytes: int, stream: Any) -> None: ...

    def open_event(self, handle: bytes, device: int) -> Event:
        """An interprocess event a worker recorded on ``device`` (``cudaIpcOpenEventHandle``)."""

    def wait(self, stream: Any, event: Event) -> None:
        """Work queued on ``stream`` after this waits for ``event``."""

    def record(self, stream: Any) -> Event:
        """An event recorded on ``stream`` now."""

    def matmul(self, device: int, coeffs: np.ndarray, src: Sequence[Sequence[int]], dst: Sequence[Sequence[int]],
               nbytes: int, stream: Any) -> None:
        """For each set i: dst[i] rows = coeffs (r x k) * src[i] rows over GF(2^8),
        ``nbytes`` each; all sets in one launch, queued on ``stream`` (no host wait)."""

    def checksums(self, device: int, chunks: Sequence[Any], stream: Any) -> list[int]:
        """sum64 of every chunk (:class:`ghostserve.codec.gpu_checksum.Chunk`), waited for."""


def device_uuids(count: int) -> list[bytes]:
    """The 16-byte UUID of each device, by ordinal, from cuda-bindings. Not from
    CuPy: its ``getDeviceProperties()["uuid"]`` converts a char array to bytes and
    so stops at the first NUL, a wrong key for some GPUs."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError as exc:
        raise GpuUnavailable(f"a CUDA region needs cuda-bindings, which this daemon lacks ({exc}): {INSTALL}") from None
    out = []
    for d in range(count):
        err, prop = cudart.cudaGetDeviceProperties(d)
        if int(err) != 0:
            raise GpuUnavailable(f"cannot read device {d}'s properties: {err!r}")
        out.append(bytes(prop.uuid.bytes))
    return out


class CupyRuntime:
    """:class:`CudaRuntime` on CuPy. Raises :class:`GpuUnavailable` without CuPy,
    cuda-bindings or a device.

    Devices: a CUDA call acts on the calling thread's current device, so every
    call here that creates or records an event, sets memory or launches a kernel
    runs under the device of the stream it is queued on (an event created on one
    device and recorded on another's stream fails; a 1-GPU run would not show it).
    ``cupy`` and ``uuids`` replace the real module and :func:`device_uuids` (the
    tests' stand-in of CuPy, on a machine without a GPU)."""

    def __init__(self, cupy: Any = None, uuids: Any = None) -> None:
        if cupy is None:
            try:
                cupy = importlib.import_module("cupy")
            except ImportError as exc:
                raise GpuUnavailable(f"a CUDA region needs CuPy, which this daemon lacks ({exc}): {INSTALL}") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver
            raise GpuUnavailable(f"a CUDA region needs a CUDA device; the driver says {exc}: {INSTALL}") from None
        if count < 1:
            raise GpuUnavailable(f"a CUDA region needs a CUDA device; this machine has none: {INSTALL}")
        self.cp, self.rt = cupy, cupy.cuda.runtime
        self._uuids = {u: d for d, u in enumerate((uuids or device_uuids)(count))}
        self._rs: dict[int, Any] = {}     # device -> CupyBackend, made on first use
        self._sums: dict[int, Any] = {}   # device -> GpuChecksum, made on first use
        self._streams: dict[int, Any] = {}
        self._ipc: dict[bytes, list[int]] = {}  # handle -> [base, references]
        self._lock = threading.Lock()

    def device_of(self, uuid: bytes) -> int:
        try:
            return self._uuids[bytes(uuid)]
        except KeyError:
            raise GpuUnavailable(f"no device with UUID {bytes(uuid).hex()} on the daemon's machine "
                                 f"(it has {len(self._uuids)}): run the daemon beside the engine") from None

    def open_ipc(self, handle: bytes, device: int) -> int:
        with self._lock:
            hit = self._ipc.get(handle)
            if hit is None:
                with self.cp.cuda.Device(device):
                    base = self.rt.ipcOpenMemHandle(handle, self.rt.cudaIpcMemLazyEnablePeerAccess)
                hit = self._ipc[handle] = [int(base), 0, device]
            hit[1] += 1
            return hit[0]

    def close_ipc(self, handle: bytes) -> None:
        with self._lock:
            hit = self._ipc.get(handle)
            if hit is None:
                return
            hit[1] -= 1
            if hit[1] <= 0:
                del self._ipc[handle]
                with self.cp.cuda.Device(hit[2]):
                    self.rt.ipcCloseMemHandle(hit[0])

    def register_host(self, addr: int, nbytes: int) -> None:
        self.rt.hostRegister(addr, nbytes, HOST_REGISTER_PORTABLE)

    def unregister_host(self, addr: int) -> None:
        self.rt.hostUnregister(addr)

    def stream(self, device: int) -> Any:
        with self._lock:
            s = self._streams.get(device)
            if s is None:
                with self.cp.cuda.Device(device):
                    s = self._streams[device] = self.cp.cuda.Stream(non_blocking=True)
            return s

    def alloc(self, device: int, nbytes: int) -> tuple[int, Any]:
        with self.cp.cuda.Device(device):
            mem = self.cp.cuda.alloc(nbytes)
        return int(mem.ptr), mem

    def copy(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        with self.cp.cuda.Device(stream.device_id):
            self.rt.memcpyAsync(dst, src, nbytes, self.rt.memcpyDefault, stream.ptr)

    def memset(self, ptr: int, value: int, nbytes: int, stream: Any) -> None:
        with self.cp.cuda.Device(stream.device_id):
            self.rt.memsetAsync(ptr, value, nbytes, stream.ptr)

    def open_event(self, handle: bytes, device: int) -> Event:
        ev = self.cp.cuda.Event.__new__(self.cp.cuda.Event)  # wraps a raw handle; destroyed with it
        with self.cp.cuda.Device(device):
            ev.ptr = self.rt.ipcOpenEventHandle(handle)
        return ev

    def wait(self, stream: Any, event: Event) -> None:
        with self.cp.cuda.Device(stream.device_id):
            stream.wait_event(event)

    def record(self, stream: Any) -> Event:
        with self.cp.cuda.Device(stream.device_id):
            ev = self.cp.cuda.Event(disable_timing=True)
            ev.record(stream)
        return ev

    def _backend(self, device: int) -> Any:
        with self._lock:
            hit = self._rs.get(device)
        if hit is None:
            from ghostserve.codec.cupy_backend import CupyBackend  # noqa: PLC0415

            made = CupyBackend(device=device)  # compiles: outside the lock
            with self._lock:
                hit = self._rs.setdefault(device, made)
        return hit

    def matmul(self, device: int, coeffs: np.ndarray, src: Sequence[Sequence[int]], dst: Sequence[Sequence[int]],
               nbytes: int, stream: Any) -> None:
        self._backend(device).launch(coeffs, src, dst, nbytes, stream)

    def checksums(self, device: int, chunks: Sequence[Any], stream: Any) -> list[int]:
        from ghostserve.codec.gpu_checksum import GpuChecksum  # noqa: PLC0415

        with self._lock:
            kern = self._sums.get(device)
        if kern is None:
            made = GpuChecksum(device)
            with self._lock:
                kern = self._sums.setdefault(device, made)
        with self.cp.cuda.Device(device), stream:
            out = kern.checksums(chunks)
            stream.synchronize()
            return [int(x) for x in self.cp.asnumpy(out)]


__all__ = ["HOST_REGISTER_PORTABLE", "INSTALL", "CudaRuntime", "CupyRuntime", "Event", "device_uuids"]
