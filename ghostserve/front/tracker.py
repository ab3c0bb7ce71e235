"""Which engine generations still have requests that may need their KV.

A request that ran on engine generation g may be resumed from g's KV (kept by
the ghostserve daemon after g died) until it produced output on another
engine (a restarted one, or another replica's): that engine fetched the KV
before computing that output. So g's ghostserve group can be dropped once
every request that ran on it has either ended or produced output on another
generation: :meth:`Tracker.settled`. Generations are numbered across replicas;
their order means nothing here.
"""

from __future__ import annotations

import asyncio


class Ticket:
    """One request's hold on the generations it ran on. Made by :meth:`Tracker.ticket`."""

    def __init__(self, tracker: Tracker):
        self._tracker = tracker
        self.generations: set[int] = set()

    def ran_on(self, generation: int) -> None:
        """Output came from ``generation``: the request no longer needs any other."""
        for g in [g for g in self.generations if g != generation]:
            self._tracker._release(self, g)
        if generation not in self.generations:
            self.generations.add(generation)
            self._tracker._hold(self, generation)

    def attempt(self, generation: int) -> None:
        """A submission goes to ``generation`` (its KV will be there if it dies)."""
        if generation not in self.generations:
            self.generations.add(generation)
            self._tracker._hold(self, generation)

    def end(self) -> None:
        for g in list(self.generations):
            self._tracker._release(self, g)


class Tracker:
    """Tickets by generation; an event per generation for when none is left.
    Used from the event loop's thread only."""

    def __init__(self) -> None:
        self._held: dict[int, set[Ticket]] = {}
        self._empty: dict[int, asyncio.Event] = {}

    def ticket(self) -> Ticket:
        return Ticket(self)

    def _event(self, generation: int) -> asyncio.Event:
        if generation not in self._empty:
            self._empty[generation] = asyncio.Event()
            if not self._held.get(generation):
                self._empty[generation].set()
        return self._empty[generation]

    def _hold(self, ticket: Ticket, generation: int) -> None:
        self._held.setdefault(generation, set()).add(ticket)
        self._event(generation).clear()

    def _release(self, ticket: Ticket, generation: int) -> None:
        ticket.generations.discard(generation)
        held = self._held.get(generation)
        if held is not None:
            held.discard(ticket)
            if not held:
                del self._held[generation]
                self._event(generation).set()

    def pending(self, generation: int) -> int:
        """Requests that may still need ``generation``'s KV."""
        return len(self._held.get(generation, ()))

    async def settled(self, generation: int) -> None:
        """Returns once no request may need ``generation``'s KV any more."""
        await self._event(generation).wait()
        self._empty.pop(generation, None)
