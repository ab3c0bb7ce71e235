"""A group's ranks: their states, registration roles, and what the daemon holds of each.

States (``RankStatus.state`` on the wire):

* ``alive``: registered, its stream open (or about to be);
* ``replacing``: fresh memory for a lost rank, registered, not yet restored;
* ``lost``: failed (stream broken, pid gone); its memory is unmapped and never read;
* ``detached``: known and mapped, no stream: from before a daemon restart (its
  worker will rejoin, unless its process has ended), or kept after its engine
  ended by failure (a source for Fetch; ``process_ended`` is then set);
* ``left``: said goodbye (a clean shutdown); still mapped until the group's end is known.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from enum import StrEnum

from ghostserve.daemon.datapath import RankMemory, RegionSpec


class RankState(StrEnum):
    """A rank's state; compares equal to its wire name."""

    ALIVE = "alive"
    LOST = "lost"
    DETACHED = "detached"
    REPLACING = "replacing"
    LEFT = "left"


class Role(StrEnum):
    """What a registration was (``RegisterResponse.Role``)."""

    NEW = "NEW"                  # first registration of this rank
    REJOINED = "REJOINED"        # same memory again (worker reconnect, daemon restart)
    REPLACEMENT = "REPLACEMENT"  # fresh memory for a lost rank: restore next


@dataclass
class Rank:
    """One rank as the group knows it. Guarded by the group's ``lock``."""

    rank: int
    state: RankState
    pid: int
    specs: tuple[RegionSpec, ...]          # its regions, in the layout's region order
    session: str = ""
    memory: RankMemory | None = None       # mapped by the group's data path
    idents: tuple[tuple[int, int], ...] = ()  # identity of each region when mapped (kept after unmap)
    committed: int = -1
    outbox: queue.Queue | None = None      # items of ghostserve.daemon.messages
    release_region: bool = False           # said goodbye: unlink the region when the group is dropped
    # its worker process ended (or said goodbye): it will never rejoin (persisted)
    process_ended: bool = False
    pid_start: float = 0.0                 # the process's start time (a reused pid is another process)
    # registered again after a daemon restart or a broken stream: its commits up to
    # this step are being resent; until they have arrived it is catching up
    resend_through: int = -1

    @property
    def catching_up(self) -> bool:
        """Alive, but its resent commits have not all arrived: the chunks it wrote
        since the protected step are not all known yet."""
        return self.state == RankState.ALIVE and self.committed < self.resend_through

    @property
    def may_return(self) -> bool:
        """Detached with its worker possibly still running: it may rejoin."""
        return self.state == RankState.DETACHED and not self.process_ended

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def region(self) -> str:
        """The first region's name (the only one of a simple layout)."""
        return self.regions[0]

    @property
    def mapped(self) -> bool:
        return self.memory is not None

    def unmap(self) -> None:
        """Forget the memory: a lost rank's bytes must never feed a restore (work
        already in flight holds its own reference and checks ``memory`` after)."""
        if self.memory is not None:
            self.memory.close()
            self.memory = None


__all__ = ["Rank", "RankState", "Role"]
