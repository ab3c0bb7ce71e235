"""What the daemon is asked and answers, as types: the wire's messages translated.

:mod:`ghostserve.daemon.service` turns each gRPC request into one of these (and
each answer back into protobuf); :class:`~ghostserve.daemon.daemon.Daemon` and
the groups see nothing of the wire. Results of restore, fetch and scrub are
:mod:`ghostserve.daemon.recovery`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ghostserve.daemon.datapath import RegionSpec
from ghostserve.daemon.layout import Layout
from ghostserve.daemon.ranks import Role


@dataclass(frozen=True)
class Registration:
    """A rank registering its KV (RegisterRequest); checked by the daemon."""

    group: str
    rank: int
    world_size: int
    parity: int
    layout: Layout
    slot_map: bytes
    regions: tuple[RegionSpec, ...]   # in the layout's region order
    pid: int
    keep_survivors: bool = False
    namespace: str = ""
    last_step: int | None = None       # the newest step the worker committed (None: none)


@dataclass(frozen=True)
class Registered:
    """The answer to a registration (RegisterResponse)."""

    role: Role
    session: str
    protected_step: int


@dataclass(frozen=True)
class LookupHit:
    """The ended group holding protected KV for the longest prefix (LookupResponse)."""

    group: str
    request_id: str
    tokens: int
    blocks: list[int]
    block_slots: int


@dataclass(frozen=True)
class FetchCall:
    """Deliver an ended group's blocks into a registered rank's blocks (FetchRequest)."""

    source_group: str
    source_rank: int
    source_blocks: list[int]
    tokens: int
    group: str
    rank: int
    session: str
    blocks: list[int]


@dataclass(frozen=True)
class MirrorView:
    """A group as the mirror sees it (a snapshot, :meth:`Group.mirror_view`): the
    requests with enough protected tokens, and (tokens, full blocks) up to the
    watermark of those with full blocks the mirror has not seen."""

    protected_step: int
    namespace: str
    layout: Layout
    world_size: int
    present: set[str]
    requests: dict[str, tuple[list[int], list[int]]]


@dataclass(frozen=True)
class RankView:
    """One rank, as status shows it."""

    rank: int
    state: str
    pid: int
    committed_step: int
    region: str
    process_ended: bool


@dataclass(frozen=True)
class GroupView:
    """A snapshot of one group for status (GroupStatus)."""

    group: str
    world_size: int
    parity: int
    state: str                       # healthy, degraded, stalled, ended
    protected_step: int
    newest_step: int
    lag_steps: int
    lag_seconds: float
    kv_bytes: int
    protected_bytes: int
    parity_bytes: int
    parity_arena_bytes: int
    layout: Layout
    ranks: list[RankView]
    watermarks: dict[str, int]
    last_restore: dict[str, Any] | None = None
    ended_seconds: float = 0.0
    held_bytes: int = 0
    expires_seconds: float = 0.0
    mirrored_step: int = -1           # newest step whose full blocks are all off-node (-1: none, no store)
    remote_bytes: int = 0             # bytes of this group's KV held in other nodes' segments




class NoticeKind(StrEnum):
    """``WatchEvent.Kind`` names."""

    SNAPSHOT = "SNAPSHOT"              # the group as a watch starts
    RANK_STATE = "RANK_STATE"          # a rank changed state
    RANK_RESTORED = "RANK_RESTORED"    # a replacement's restore finished
    STEP_PROTECTED = "STEP_PROTECTED"  # the protected step advanced
    GROUP_ENDED = "GROUP_ENDED"        # the group's engine ended
    GROUP_DROPPED = "GROUP_DROPPED"    # the group is gone


@dataclass(frozen=True)
class Notice:
    """What a watcher hears about a group (``WatchEvent``)."""

    kind: NoticeKind
    group: str
    protected_step: int
    state: str                         # the group's: healthy, degraded, stalled, ended
    rank: int = 0
    rank_state: str = ""
    process_ended: bool = False
    detail: str = ""
    ranks: tuple[RankView, ...] = ()   # SNAPSHOT only


__all__ = ["FetchCall", "GroupView", "LookupHit", "MirrorView", "Notice", "NoticeKind", "RankView", "Registered", "Registration"]
