"""A rank's KV segment in ``/dev/shm``, shared by the engine integrations.

Engines keep their KV where the daemon can map it: a named POSIX shared-memory
segment, its pages allocated up front so a full ``/dev/shm`` is a clear error at
start-up instead of a SIGBUS in the middle of a forward pass.
"""

from __future__ import annotations

import errno
import logging

from ghostserve import shm, wire
from ghostserve.client import OperatorClient, channel
from ghostserve.errors import DaemonUnavailable, GhostServeError, ResourceExhausted
from ghostserve.v1 import ghostserve_pb2 as pb

log = logging.getLogger("ghostserve.integrations")


def check_daemon(socket: str, wait: float = 10.0) -> None:
    """Raise :class:`DaemonUnavailable` unless the daemon on ``socket`` answers
    (gRPC health) within ``wait`` seconds (a restarting one is waited for).
    Before an engine makes its KV segment: a segment made for a daemon that is
    not there would outlive the engine if its start then failed (an engine's
    launcher may SIGKILL a rank mid-start)."""
    op = OperatorClient(socket, timeout=max(0.1, wait))
    try:
        if not op.healthy(wait_for_ready=True):
            raise DaemonUnavailable(f"no ghostserve daemon answered on {socket} within {wait:g} s")
    finally:
        op.close()


def allocate(socket: str, name: str, size: int, ask_daemon: bool = True) -> shm.Segment:
    """Create segment ``name`` of ``size`` bytes, its pages allocated now. When
    ``/dev/shm`` is short, the daemon on ``socket`` first drops engines that ended
    by failure longer ago (``Reclaim``, oldest first; not with ``ask_daemon``
    False; a daemon that does not answer makes no room). Raises FileExistsError
    (a segment of that name exists) or :class:`ResourceExhausted` (no room)."""
    if ask_daemon and shm.free_bytes() < size:
        try:
            resp = wire.stub(channel(socket), "Worker").Reclaim(pb.ReclaimRequest(bytes=size), timeout=30,
                                                                wait_for_ready=True)
            log.info("ghostserve: /dev/shm was short; the daemon dropped %s", list(resp.dropped_groups))
        except GhostServeError as exc:  # no room made: the allocation below says whether it fits anyway
            log.warning("ghostserve: /dev/shm is short and the daemon on %s could not make room (%s)", socket, exc)
    try:
        return shm.Segment.create(name, size, reserve=True)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ResourceExhausted(f"/dev/shm for this rank's KV ({size} bytes): "
                                    f"{shm.free_bytes()} free") from None
        raise


__all__ = ["allocate", "check_daemon"]
