"""A synthetic TP worker process for chaos runs.

It owns one KV region in POSIX shared memory, registers it with the daemon,
and on the driver's command writes a step's tokens and commits the step. A
replacement (generation > 0) restores first and then recomputes what the
daemon did not protect. Commands and replies travel over a pipe; an error
(the daemon refusing the registration, say) goes back over it as
``("error", text)`` before the process exits, so the driver reports it at once.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

from ghostserve import shm
from ghostserve.chaos.workload import Shape, Workload, write_tokens
from ghostserve.client import WorkerClient
from ghostserve.errors import GhostServeError


def region_name(prefix: str, rank: int, generation: int) -> str:
    """The shared-memory name of ``rank``'s KV region in its ``generation``-th process."""
    return f"{prefix}kv-r{rank}-g{generation}"


def describe(exc: BaseException) -> str:
    """One line for the driver: a daemon's refusal's code and message, else the exception."""
    if isinstance(exc, GhostServeError) and exc.code:
        return f"{exc.code}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def main(conn: Connection, shape: Shape, socket: str, prefix: str, rank: int, generation: int) -> None:
    """The worker process: serve the driver's commands until ``quit``."""
    try:
        _serve(conn, shape, socket, prefix, rank, generation)
    except (EOFError, BrokenPipeError):  # the driver is gone
        return
    except BaseException as exc:
        try:
            conn.send(("error", describe(exc)))
        except OSError:
            pass
        raise SystemExit(1) from None


def _serve(conn: Connection, shape: Shape, socket: str, prefix: str, rank: int, generation: int) -> None:
    work = Workload(shape)
    name = region_name(prefix, rank, generation)
    seg = shm.Segment.create(name, shape.region_bytes, exist_ok=True)
    kv = shape.view(seg.array())
    client = WorkerClient(socket, "chaos", rank, shape.ranks, shape.parity, shape.layout(), name,
                          shape.region_bytes)
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
            dirty = work.dirty(step)
            tb, bs = shape.token_bytes, shape.block_size
            for _, _, b, j in recompute:
                dirty += [(b, j * tb, (j + 1) * tb), (b, (bs + j) * tb, (bs + j + 1) * tb)]
            t = time.perf_counter()
            client.commit(step, dirty, st.lengths, st.freed, st.finished)
            conn.send(("done", step, time.perf_counter() - t))
        elif cmd == "restore":
            t = time.perf_counter()
            resp = client.restore()
            conn.send(("restored", resp.SerializeToString(), time.perf_counter() - t))
        elif cmd == "wait":
            conn.send(("waited", client.wait_protected(args[0], timeout=args[1]), client.protected_step))
        elif cmd == "quit":
            client.goodbye()  # a clean end: the daemon drops the group once every rank has left
            seg.close()
            conn.send(("bye",))
            return
