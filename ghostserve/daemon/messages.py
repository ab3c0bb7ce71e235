"""What a group tells a worker's stream: the items of a rank's outbox.

The group puts them on the outbox (a ``queue.Queue``) from any thread; the
stream's handler thread takes them off in order and turns them into
``DaemonMessage``s. :data:`SUPERSEDED` ends the stream from the daemon's side
(a newer stream of the rank took over, the group was dropped or the daemon is
draining); :data:`STREAM_END` is put by the stream's own reader when the
worker's side ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum


@dataclass(frozen=True)
class Ack:
    """Step ``step`` is protected; ``watermarks`` are the requests whose protected
    tokens changed (0: dropped)."""

    step: int
    watermarks: dict[str, int] = field(default_factory=dict)


class EventKind(StrEnum):
    """``GroupEvent.Kind`` names (the proto enum's)."""

    RANK_LOST = "RANK_LOST"
    RANK_RESTORED = "RANK_RESTORED"
    STEP_FAILED = "STEP_FAILED"


@dataclass(frozen=True)
class Event:
    """Something happened to the group (``GroupEvent``)."""

    kind: EventKind
    rank: int = 0
    detail: str = ""


class _Marker(Enum):
    SUPERSEDED = "superseded"
    STREAM_END = "stream_end"


SUPERSEDED = _Marker.SUPERSEDED
STREAM_END = _Marker.STREAM_END

OutboxItem = Ack | Event | _Marker

__all__ = ["STREAM_END", "SUPERSEDED", "Ack", "Event", "EventKind", "OutboxItem"]
