"""A stand-in for the few CuPy names :class:`~ghostserve.daemon.datapath.cudart.CupyRuntime`
calls (CuPy and CUDA are outside the project, and there is no GPU here), keeping
CUDA's per-thread *current device* and refusing what CUDA refuses about it:

* an event recorded on a stream of another device than the event's own
  (``cudaEventRecord``: cudaErrorInvalidResourceHandle), the event's device
  being the current device when it was created or opened;
* an asynchronous copy or memset queued on a stream of another device than the
  current one, and ``with stream:`` on another device (CuPy's own check);
* an IPC mapping closed under another device than it was opened on;
* a flag that is not an int (CuPy's runtime has no names for cudaHostRegister's flags).

"Device memory" (``Memory``) is host memory, so copies and memsets really move
bytes (ctypes); other pointers are numbers only. tests/test_cupy_names.py checks that
every name this module offers exists in the real ``cupy-cuda13x`` wheel, so the
stand-in cannot grant what CuPy lacks.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from types import SimpleNamespace

import numpy as np


class CudaRuleBroken(AssertionError):
    """What a GPU would answer with an error (or worse, silently get wrong)."""


class FakeCupy:
    """``FakeCupy(devices)`` stands where ``import cupy`` would; ``.cuda`` holds
    ``Device``, ``Stream``, ``Event``, ``alloc`` and ``runtime``."""

    def __init__(self, devices: int = 2):
        self.devices = devices
        self._tls = threading.local()
        self._ids = itertools.count(0x1000, 0x1000)
        self.event_device: dict[int, int] = {}   # event ptr -> device
        self.stream_device: dict[int, int] = {}  # stream ptr -> device
        self.ipc_device: dict[int, int] = {}     # mapped base -> device
        self.calls: list[str] = []
        self.memory: dict[int, tuple[int, int, np.ndarray]] = {}  # ptr -> (bytes, device, host buffer)
        fake = self

        class Device:
            def __init__(self, device: int = -1):
                self.id = fake.current() if device == -1 else device
                if not 0 <= self.id < fake.devices:
                    raise CudaRuleBroken(f"no device {self.id}")

            def __enter__(self):
                fake._stack().append(self.id)
                return self

            def __exit__(self, *exc):
                fake._stack().pop()

        class Stream:
            def __init__(self, null: bool = False, non_blocking: bool = False):
                self.ptr = next(fake._ids)
                self.device_id = fake.current()
                fake.stream_device[self.ptr] = self.device_id

            def __enter__(self):
                if fake.current() != self.device_id:
                    raise CudaRuleBroken(f"with stream: the stream is on device {self.device_id}, "
                                         f"the current device is {fake.current()}")
                return self

            def __exit__(self, *exc):
                pass

            def wait_event(self, event):
                fake.calls.append("streamWaitEvent")

            def synchronize(self):
                pass

        class Event:
            def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False):
                self.ptr = next(fake._ids)
                fake.event_device[self.ptr] = fake.current()

            def record(self, stream=None):
                ev_dev = fake.event_device[self.ptr]
                if stream.device_id != ev_dev:
                    raise CudaRuleBroken(f"event of device {ev_dev} recorded on a stream of device {stream.device_id}")
                fake.calls.append("eventRecord")

            def synchronize(self):
                pass

        class Memory:
            """Host bytes standing for a cudaMalloc on the current device."""

            def __init__(self, nbytes: int):
                self._buf = np.full(max(nbytes, 1), 0xCD, dtype=np.uint8)  # fresh device memory is garbage
                self.ptr = self._buf.ctypes.data
                self.device_id = fake.current()
                fake.memory[self.ptr] = (nbytes, self.device_id, self._buf)

        def alloc(nbytes: int):
            return Memory(nbytes)

        def moves(*ptrs: int) -> bool:
            """Bytes move only where a stand-in allocation is involved (the other side
            is then a real host buffer); bare numbers stay numbers."""
            return any(fake.owner(p) is not None for p in ptrs)

        def copy(dst: int, src: int, n: int, *rest: int) -> None:
            fake.calls.append("memcpy")
            if moves(dst, src):
                ctypes.memmove(dst, src, n)

        def copy_async(dst: int, src: int, n: int, kind: int, stream: int) -> None:
            on_stream("memcpyAsync", stream)
            if moves(dst, src):
                ctypes.memmove(dst, src, n)

        def memset(ptr: int, value: int, n: int) -> None:
            fake.calls.append("memset")
            if moves(ptr):
                ctypes.memset(ptr, value, n)

        def on_stream(name: str, stream_ptr: int) -> None:
            dev = fake.stream_device[stream_ptr]
            if dev != fake.current():
                raise CudaRuleBroken(f"{name} on a stream of device {dev} while device {fake.current()} is current")
            fake.calls.append(name)

        def ipc_open(handle: bytes, flags: int) -> int:
            base = next(fake._ids)
            fake.ipc_device[base] = fake.current()
            return base

        def ipc_close(base: int) -> None:
            if fake.ipc_device.pop(base) != fake.current():
                raise CudaRuleBroken("an IPC mapping closed under another device than it was opened on")

        def open_event(handle: bytes) -> int:
            ptr = next(fake._ids)
            fake.event_device[ptr] = fake.current()
            return ptr

        def host_register(addr: int, nbytes: int, flags: int) -> None:
            if not isinstance(flags, int):
                raise CudaRuleBroken(f"cudaHostRegister flags {flags!r}")
            fake.calls.append("hostRegister")

        runtime = SimpleNamespace(
            getDeviceCount=lambda: fake.devices,
            memcpyDefault=4,
            memcpyHostToDevice=1,
            memcpyDeviceToHost=2,
            memcpy=copy,
            memset=memset,
            ipcGetMemHandle=lambda ptr: ptr.to_bytes(8, "little").ljust(64, b"\0"),
            ipcGetEventHandle=lambda ptr: ptr.to_bytes(8, "little").ljust(64, b"\1"),
            cudaIpcMemLazyEnablePeerAccess=1,
            ipcOpenMemHandle=ipc_open,
            ipcCloseMemHandle=ipc_close,
            ipcOpenEventHandle=open_event,
            hostRegister=host_register,
            hostUnregister=lambda addr: fake.calls.append("hostUnregister"),
            memcpyAsync=copy_async,
            memsetAsync=lambda ptr, value, n, stream: on_stream("memsetAsync", stream),
        )
        self.cuda = SimpleNamespace(Device=Device, Stream=Stream, Event=Event, alloc=alloc, Memory=Memory,
                                    runtime=runtime)

    def _stack(self) -> list[int]:
        stack = getattr(self._tls, "stack", None)
        if stack is None:
            stack = self._tls.stack = []
        return stack

    def owner(self, ptr: int) -> int | None:
        """The stand-in allocation holding ``ptr``, if any."""
        for base, (n, _, _) in self.memory.items():
            if base <= ptr < base + n:
                return base
        return None

    def current(self) -> int:
        """This thread's current device (0 until a ``Device`` context says otherwise)."""
        stack = self._stack()
        return stack[-1] if stack else 0

    def names(self) -> dict[str, list[str]]:
        """What this stand-in offers, by where it lives in CuPy (for the name check)."""
        return {"cupy.cuda": sorted(vars(self.cuda)), "cupy.cuda.runtime": sorted(vars(self.cuda.runtime))}
