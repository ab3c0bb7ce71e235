"""A rank's KV segment in ``/dev/shm``, shared by the engine integrations.

Engines keep their KV where the daemon can map it: a named POSIX shared-memory
segment, its pages allocated up front so a full ``/dev/shm`` is a clear error at
start-up instead of a SIGBUS in the middle of a forward pass.
"""

from __future__ import annotations

import errno
import logging

import grpc

from ghostserve import shm
from ghostserve.client import OperatorClient, channel, worker_stub
from ghostserve.errors import DaemonUnavailable, ResourceExhausted
from ghostserve.v1 import ghostserve_pb2 as pb

log = logging.getLogger("ghostserve.integrations")


def check_daemon(socket: str, timeout: float = 10.0) -> None:
    """Raise :class:`DaemonUnavailable` unless the daemon on ``socket`` answers
    (gRPC health). Before an engine makes its KV segment: if the engine then
    fails to start, a segment made for a daemon that was never there would
    outlive it (an engine's launcher may SIGKILL a rank mid-start)."""
    op = OperatorClient(socket, timeout=timeout)
    try:
        if not op.healthy():
            raise DaemonUnavailable(f"no ghostserve daemon answers on {socket}")
    finally:
        op.close()


def allocate(socket: str, name: str, size: int) -> shm.Segment:
    """Create segment ``name`` of ``size`` bytes, its pages allocated now. When
    ``/dev/shm`` is short, the daemon on ``socket`` first drops engines that ended
    by failure longer ago (``Reclaim``, oldest first). Raises FileExistsError (a
    segment of that name exists), :class:`ResourceExhausted` (still no room) or
    :class:`DaemonUnavailable`."""
    if shm.free_bytes() < size:
        try:
            resp = worker_stub(channel(socket)).Reclaim(pb.ReclaimRequest(bytes=size), timeout=30)
            log.info("ghostserve: /dev/shm was short; the daemon dropped %s", list(resp.dropped_groups))
        except grpc.RpcError as exc:
            raise DaemonUnavailable(f"ghostserve daemon on {socket}: {exc.details()}") from exc
    try:
        return shm.Segment.create(name, size, reserve=True)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ResourceExhausted(f"/dev/shm for this rank's KV ({size} bytes): "
                                    f"{shm.free_bytes()} free") from None
        raise


__all__ = ["allocate", "check_daemon"]
