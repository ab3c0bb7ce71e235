"""The stripe scheduler and encoder of one group.

Ranks commit steps in order; step t is encoded once every rank has committed it
and all are alive (:class:`Pending`, which the group owns under its lock).
:class:`StepEncoder` encodes one step into the group's
:class:`~ghostserve.daemon.stripes.Stripes`: void the blocks it released, mark
the chunks it touched unprotected, have the data path encode its byte ranges
(parity and checksums), and only once that completion has finished, mark them
protected at t. It sees no group: it gets the step's commits, the ranks'
memories and a callback that says whether those memories are still the ranks'.
The group then applies the result (:func:`news` into its request index, the
protected step, metrics, an acknowledgement to every rank).

Threads: the group's encoder thread (``gs-encode-<group>``) calls
:meth:`StepEncoder.encode`; it holds the stripes' ``io`` lock while bytes are
encoded and never the group's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ghostserve.daemon.commits import CommitRecord, Range, merge
from ghostserve.daemon.index import StepNews
from ghostserve.daemon.stripes import Stripes


class Pending:
    """Commits of the steps not yet encoded, step -> rank -> commit. Owned by a
    group and guarded by its lock."""

    def __init__(self) -> None:
        self._steps: dict[int, dict[int, CommitRecord]] = {}

    def add(self, rank: int, rec: CommitRecord) -> None:
        self._steps.setdefault(rec.step, {})[rank] = rec

    def drop_rank(self, rank: int) -> None:
        """Forget the commits of a rank that is gone (lost, left, detached)."""
        for commits in self._steps.values():
            commits.pop(rank, None)

    def ready(self, protected: int, n: int, alive: Callable[[int], bool]) -> int | None:
        """The next step to encode (``protected`` + 1) if all ``n`` ranks committed
        it and are alive, else None."""
        t = protected + 1
        commits = self._steps.get(t)
        if commits is None or len(commits) < n or not all(alive(q) for q in range(n)):
            return None
        return t

    def take(self, t: int) -> dict[int, CommitRecord]:
        return self._steps.pop(t)

    def take_run(self, protected: int, n: int, alive: Callable[[int], bool], most: int) -> list[
            tuple[int, dict[int, CommitRecord]]]:
        """Steps ``protected`` + 1, + 2, ... while each is ready (at most ``most``):
        what one encode covers when the encoder is behind."""
        run: list[tuple[int, dict[int, CommitRecord]]] = []
        while len(run) < most and (t := self.ready(protected + len(run), n, alive)) is not None:
            run.append((t, self.take(t)))
        return run

    def put_back(self, t: int, commits: Mapping[int, CommitRecord]) -> None:
        """A step whose encode was dropped: its live ranks' commits wait for the rest again."""
        self._steps.setdefault(t, {}).update(commits)

    def in_flux(self, chunk_bytes: int) -> tuple[set[tuple[int, int]], set[int]]:
        """Chunks written, and blocks freed, by steps not yet encoded: a restore
        neither restores them nor calls them corrupt (the engine recomputes them)."""
        flux: set[tuple[int, int]] = set()
        freed: set[int] = set()
        for commits in self._steps.values():
            for c in commits.values():
                for b, s, e in c.ranges:
                    flux.update((b, ch) for ch in range(s // chunk_bytes, e // chunk_bytes))
                freed.update(c.freed)
        return flux, freed


class StepEncoder:
    """Encodes one step at a time into a group's stripes (see the module doc)."""

    def __init__(self, stripes: Stripes):
        self.stripes = stripes

    def encode(self, t: int, commits: Mapping[int, CommitRecord], mems: Mapping[int, Any],
               current: Callable[[], bool]) -> int | None:
        """Encode step ``t`` from ``mems`` (every rank's memory). Returns the data
        bytes encoded, or None when ``current()`` said, after the bytes were read,
        that a rank's memory is no longer its own (it was lost meanwhile): then
        nothing is marked protected, and the caller has put the step back."""
        st = self.stripes
        ranges = merge(rg for c in commits.values() for rg in c.ranges)
        fills: dict[int, int] = {}
        for c in commits.values():
            for b, f in c.fills.items():
                fills[b] = max(f, fills.get(b, 0))
        with st.io:
            st.begin(ranges, fills, {b for c in commits.values() for b in c.released})
            ready = {q: c.event for q, c in commits.items() if c.event}
            nbytes = st.data.encode(ranges, mems, ready).result()
            if not current():
                return None
            st.protect(t, ranges, {b for c in commits.values() for b in c.freed})
        return nbytes

    def fail(self, commits: Mapping[int, CommitRecord]) -> None:
        """A step that could not be encoded (a daemon bug): void every chunk it touched."""
        with self.stripes.io:
            self.stripes.fail(merge(rg for c in commits.values() for rg in c.ranges),
                              {b for c in commits.values() for b in (*c.released, *c.freed)})


def coalesce(run: Sequence[tuple[int, Mapping[int, CommitRecord]]]) -> dict[int, CommitRecord]:
    """One commit per rank that encodes what the consecutive steps of ``run`` wrote,
    as the last of them (its memory is read once, after all of them): every range;
    each block's fill as the last step that filled it leaves it; the blocks
    released by any step (voided before the encode; what earlier steps wrote there
    is dropped); the blocks freed by a step and not written or released by a later one. Requests and
    records stay with each step (the index takes them step by step)."""
    out: dict[int, CommitRecord] = {}
    for _, commits in run:
        for q, c in commits.items():
            m = out.get(q)
            if m is None:
                m = out[q] = CommitRecord(c.step, [], fills={}, event=c.event)
            released = set(c.released)
            live = {b for b, _, _ in c.ranges} | released
            m.freed = [b for b in m.freed if b not in live] + list(c.freed)
            # a released block's earlier contents belong to no one: only what this step writes counts
            m.ranges = [r for r in m.ranges if r[0] not in released] + list(c.ranges)
            for b in released:
                m.fills.pop(b, None)
            m.fills.update(c.fills)
            m.released += c.released
            m.step, m.event = c.step, c.event or m.event
    return out


def news(t: int, commits: Mapping[int, CommitRecord], void: Callable[[str, int], bool]) -> StepNews:
    """What encoded step ``t`` tells the request index: tokens written on every
    rank (the minimum across ranks) become protected; records of requests not
    released since (``void(request, step)``); finished requests are dropped."""
    marks: dict[str, int] = {}
    for c in commits.values():
        for req, tokens in c.requests:
            if not void(req, c.step):
                marks[req] = min(tokens, marks.get(req, tokens))
    records = [rec for c in commits.values() for rec in c.records if not void(rec.request, c.step)]
    finished = {req for c in commits.values() for req in c.finished}
    # a release at step s voids news of steps < s; once t is encoded no such news can come
    return StepNews(step=t, watermarks=marks, records=records, finished=finished, prune_before=t + 2)


def failed_news(t: int, commits: Mapping[int, CommitRecord]) -> StepNews:
    """What a failed step tells the index: the requests it wrote lose their
    watermark for good (their voided chunks are never re-encoded), finished ones go."""
    victims = {req for c in commits.values() for req, _ in c.requests}
    victims |= {rec.request for c in commits.values() for rec in c.records}
    finished = {req for c in commits.values() for req in c.finished}
    return StepNews(step=t, unprotect=victims - finished, finished=finished)


__all__ = ["Pending", "Range", "StepEncoder", "coalesce", "failed_news", "news"]
