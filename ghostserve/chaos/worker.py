"""A synthetic TP worker process for chaos runs.

It owns one KV region, registers it with the daemon, and on the driver's
command writes a step's tokens and commits the step. The region is POSIX shared
memory (:class:`HostKV`, device "host") or an allocation on a GPU
(:class:`CudaKV`, device "cuda": rank r on device r mod the devices, so ranks
may share one), exported over CUDA IPC and written through a host mirror whose
dirty bytes are copied up before each commit, with an interprocess event. A
replacement (generation > 0) restores first and then recomputes what the
daemon did not protect. With a slotted shape (node-loss runs) each commit also
carries filled slots and, from rank 0, Lookup records; a new group on another
node (``step_offset``: the workload step its group's step 0 stands for) first
fetches what the store holds (``fetch``), then commits every live request at
once (``resume``) and goes on with the workload. Commands and replies travel over a pipe; an error
(the daemon refusing the registration, say) goes back over it as
``("error", text)`` before the process exits, so the driver reports it at once.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.chaos.workload import Shape, SlotCommit, Workload, write_tokens
from ghostserve.client import WorkerClient
from ghostserve.errors import GhostServeError
from ghostserve.v1 import ghostserve_pb2 as pb

EVENTS_KEPT = 1024  # CudaKV: steps whose events wait for the daemon (gpukv.StepEvents)
GROUP = "chaos"     # the workers' group (a node-loss run names one per node)


def region_name(prefix: str, rank: int, generation: int) -> str:
    """The shared-memory name of ``rank``'s KV region in its ``generation``-th process."""
    return f"{prefix}kv-r{rank}-g{generation}"


def describe(exc: BaseException) -> str:
    """One line for the driver: a daemon's refusal's code and message, else the exception."""
    if isinstance(exc, GhostServeError) and exc.code:
        return f"{exc.code}: {exc}"
    return f"{type(exc).__name__}: {exc}"


class HostKV:
    """The rank's KV in a shared-memory segment the daemon maps by name; the
    driver reads and damages it there directly."""

    def __init__(self, shape: Shape, name: str):
        self.seg = shm.Segment.create(name, shape.region_bytes, exist_ok=True)
        self.kv = shape.view(self.seg.array())
        self.client_region: dict[str, Any] = dict(region=name, region_size=shape.region_bytes)

    def publish(self, step: int, dirty: list[tuple[int, int, int]]) -> bytes:
        return b""  # written in place

    def protected(self, step: int) -> None:
        pass

    def restored(self) -> None:
        pass

    def dump(self) -> bytes:
        return self.seg.array().tobytes()

    def poke(self, offset: int, data: bytes) -> None:
        self.seg.array()[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        self.seg.close()


class CudaKV:
    """The rank's KV on GPU ``device`` (its own cudaMalloc: CUDA IPC exports an
    allocation's base), written through a host mirror: :meth:`publish` copies a
    step's dirty bytes up on the worker's stream, records an interprocess event
    after them and returns its handle (the daemon waits on it; the worker never
    waits on the daemon). Needs CuPy and cuda-bindings (the gpu extras)."""

    def __init__(self, shape: Shape, device: int):
        import cupy  # noqa: PLC0415

        from ghostserve.integrations import gpukv  # noqa: PLC0415
        from ghostserve.v1 import ghostserve_pb2 as pb  # noqa: PLC0415

        self.cp, self.shape, self.device = cupy, shape, device
        n = shape.region_bytes
        with cupy.cuda.Device(device):
            self.mem = cupy.cuda.Memory(n)
            self.stream = cupy.cuda.Stream(non_blocking=True)
            cupy.cuda.runtime.memset(self.mem.ptr, 0, n)
        self.host = np.zeros(n, dtype=np.uint8)
        self.kv = shape.view(self.host)
        handle = cupy.cuda.runtime.ipcGetMemHandle(self.mem.ptr)
        region = pb.Region(cuda_ipc_handle=bytes(handle), size=n,
                           device_uuid=gpukv.BindingsCuda().device_uuid(device))
        self.client_region = dict(region="", region_size=0, regions=[region])
        self.events = gpukv.StepEvents(self._event, EVENTS_KEPT)

    def _event(self) -> Any:
        with self.cp.cuda.Device(self.device):
            return _IpcEvent(self.cp, self.cp.cuda.Event(disable_timing=True, interprocess=True))

    def _ranges(self, dirty: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        lay = self.shape.layout()
        return [(layer * lay["layer_stride"] + b * lay["block_stride"] + start, end - start)
                for b, start, end in dirty for layer in range(self.shape.layers)]

    def publish(self, step: int, dirty: list[tuple[int, int, int]]) -> bytes:
        rt = self.cp.cuda.runtime
        with self.cp.cuda.Device(self.device):
            for off, n in self._ranges(dirty):
                rt.memcpyAsync(self.mem.ptr + off, self.host.ctypes.data + off, n, rt.memcpyHostToDevice,
                               self.stream.ptr)
            return self.events.record(step, self.stream)

    def protected(self, step: int) -> None:
        self.events.protected(step)

    def _pull(self) -> None:
        rt = self.cp.cuda.runtime
        with self.cp.cuda.Device(self.device):
            self.stream.synchronize()
            rt.memcpy(self.host.ctypes.data, self.mem.ptr, self.host.nbytes, rt.memcpyDeviceToHost)

    def restored(self) -> None:
        """The daemon wrote the device bytes: the mirror takes them."""
        self._pull()

    def dump(self) -> bytes:
        self._pull()
        return self.host.tobytes()

    def poke(self, offset: int, data: bytes) -> None:
        """Damage the device bytes only (silent corruption: the mirror does not know)."""
        rt = self.cp.cuda.runtime
        buf = np.frombuffer(data, dtype=np.uint8).copy()
        with self.cp.cuda.Device(self.device):
            self.stream.synchronize()
            rt.memcpy(self.mem.ptr + offset, buf.ctypes.data, buf.nbytes, rt.memcpyHostToDevice)

    def close(self) -> None:
        with self.cp.cuda.Device(self.device):
            self.stream.synchronize()
        self.mem = None


class _IpcEvent:
    """A CuPy interprocess event with the ``ipc_handle()`` gpukv.StepEvents asks for
    (torch's events have one; CuPy's handle comes from its runtime module)."""

    def __init__(self, cp: Any, event: Any):
        self.cp, self.event = cp, event

    def record(self, stream: Any = None) -> None:
        self.event.record(stream)

    def synchronize(self) -> None:
        self.event.synchronize()

    def ipc_handle(self) -> bytes:
        return bytes(self.cp.cuda.runtime.ipcGetEventHandle(self.event.ptr))


def open_kv(shape: Shape, device: str, name: str, rank: int) -> HostKV | CudaKV:
    """The rank's KV on ``device`` ("host" or "cuda", a KvDevice)."""
    if device == "cuda":
        import cupy  # noqa: PLC0415

        return CudaKV(shape, rank % cupy.cuda.runtime.getDeviceCount())
    return HostKV(shape, name)


def main(conn: Connection, shape: Shape, socket: str, prefix: str, rank: int, generation: int,
         device: str = "host", group: str = GROUP, namespace: str = "", step_offset: int = 0) -> None:
    """The worker process: serve the driver's commands until ``quit``. It commits
    workload step ``s`` as its group's step ``s - step_offset``."""
    try:
        _serve(conn, shape, socket, prefix, rank, generation, device, group, namespace, step_offset)
    except (EOFError, BrokenPipeError):  # the driver is gone
        return
    except BaseException as exc:
        try:
            conn.send(("error", describe(exc)))
        except OSError:
            pass
        raise SystemExit(1) from None


def _records(sc: SlotCommit) -> list[pb.RequestRecord]:
    return [pb.RequestRecord(request_id=r.request, tokens=r.tokens, blocks=r.blocks, reset=r.reset)
            for r in sc.records]


def _serve(conn: Connection, shape: Shape, socket: str, prefix: str, rank: int, generation: int,
           device: str, group: str, namespace: str, step_offset: int) -> None:
    work = Workload(shape)
    memory = open_kv(shape, device, region_name(prefix, rank, generation), rank)
    kv = memory.kv
    client = WorkerClient(socket, group, rank, shape.ranks, shape.parity, shape.layout(), namespace=namespace,
                          **memory.client_region)
    t0 = time.perf_counter()
    conn.send(("registering",))
    client.register(wait=60)  # a daemon still starting (or restarting: --kill-daemon register@STEP)
    conn.send(("registered", client.role, os.getpid(), time.perf_counter() - t0))
    while True:
        cmd, *args = conn.recv()
        if cmd == "step":
            # args: step, recompute: list of (rid, token, block, slot) rewritten by "recompute"
            step, recompute = args
            st = work.steps[step]
            write_tokens(shape, kv, rank, st.writes + recompute)
            slotted: dict[str, Any] = {}
            if shape.slotted:
                sc = work.slot_commit(step, recompute)
                dirty = sc.dirty
                slotted = dict(fills=sc.fills, records=_records(sc) if rank == 0 else ())  # records: once a step
            else:
                dirty = work.dirty(step)
                tb, bs = shape.token_bytes, shape.block_size
                for _, _, b, j in recompute:
                    dirty += [(b, j * tb, (j + 1) * tb), (b, (bs + j) * tb, (bs + j + 1) * tb)]
            t = time.perf_counter()
            memory.protected(client.protected_step)
            event = memory.publish(step - step_offset, dirty)
            client.commit(step - step_offset, dirty, st.lengths, st.freed, st.finished, cuda_event=event,
                          **slotted)
            conn.send(("done", step, time.perf_counter() - t))
        elif cmd == "fetch":
            # args: source group, source rank, source blocks, tokens, this rank's blocks
            resp = client.fetch(*args)
            memory.restored()
            conn.send(("fetched", resp.SerializeToString()))
        elif cmd == "resume":
            # args: the workload step this group takes over after, and the slots to recompute
            # (rid, token, block, slot); then one commit holds every live request
            step, recompute = args
            write_tokens(shape, kv, rank, recompute)
            sc = work.resume_commit(step)
            t = time.perf_counter()
            event = memory.publish(step - step_offset, sc.dirty)
            client.commit(step - step_offset, sc.dirty, sc.lengths, fills=sc.fills,
                          records=_records(sc) if rank == 0 else (), cuda_event=event)
            conn.send(("done", step, time.perf_counter() - t))
        elif cmd == "restore":
            t = time.perf_counter()
            resp = client.restore()
            memory.restored()
            conn.send(("restored", resp.SerializeToString(), time.perf_counter() - t))
        elif cmd == "dump":  # the driver's check of memory it cannot map (a GPU's)
            conn.send(("dump", memory.dump()))
        elif cmd == "poke":  # the driver's silent corruption of such memory
            memory.poke(*args)
            conn.send(("poked",))
        elif cmd == "wait":
            conn.send(("waited", client.wait_protected(args[0], timeout=args[1]), client.protected_step))
        elif cmd == "quit":
            client.goodbye()  # a clean end: the daemon drops the group once every rank has left
            memory.close()
            conn.send(("bye",))
            return
