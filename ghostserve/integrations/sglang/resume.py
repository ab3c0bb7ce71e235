"""Resume: a restarted SGLang server loads a request's prefix from ghostserve.

SGLang is fail-stop: one dead TP scheduler takes the server down. A front end
resubmits each unfinished request as its prompt plus the tokens already
generated; the new server must then load that KV instead of prefilling it, on
every rank alike (the ranks' schedulers must keep making the same decisions):

1. **Plan** (TP rank 0, :func:`plan`): as SGLang's request receiver pulls new
   requests, rank 0 asks the daemon (``Lookup``, by token prefix, within this
   model's namespace) which of them an ended server left protected, and appends
   a :class:`ResumePlan` to the list SGLang broadcasts to every rank.
2. **Load** (every rank, :func:`load`, before the requests are queued): for each
   entry, what the radix cache already holds is kept; slots for the rest are
   allocated (evicting cached prefixes if needed) and the rank ``Fetch``es its
   shard of those pages (copied from the ended server's kept memory, or rebuilt
   from parity if that rank was lost; every page checked against its encode-time
   checksum). The ranks agree (all-reduce MIN over the TP group) on how many
   tokens every rank received, insert that prefix into the radix cache and free
   the rest. SGLang's own prefix match then serves it: the request reports it as
   cached tokens and prefills only the remainder (at least one token).

Pages that cannot be delivered (more ranks lost than parity, a failed checksum
with no parity left, a fetch error) shorten the prefix on every rank: those
tokens are recomputed, never garbage.

Threads: the scheduler's thread, inside SGLang's receive path (step 1) and just
before its requests are processed (step 2); fetches block that thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from typing import TYPE_CHECKING, Any

import numpy as np

from ghostserve import shm
from ghostserve.errors import GhostServeError
from ghostserve.integrations.sglang.kvpool import pages_of

if TYPE_CHECKING:
    from ghostserve.integrations.sglang.rank import RankState

log = logging.getLogger("ghostserve.sglang")


@dataclasses.dataclass(frozen=True)
class ResumeEntry:
    """One request whose first ``len(tokens)`` tokens an ended server protected."""

    rid: str
    tokens: tuple[int, ...]       # page-aligned, at most the prompt's length - 1
    source_group: str
    source_pages: tuple[int, ...]  # the ended group's pages holding them, in order


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Rank 0's decisions, riding SGLang's request broadcast to every rank."""

    entries: tuple[ResumeEntry, ...]


@dataclasses.dataclass
class LoadResult:
    """What :func:`load` did for one entry on this rank (for logs and tests)."""

    rid: str
    cached: int = 0         # tokens the radix cache already held
    loaded: int = 0         # tokens fetched and inserted (agreed by every rank)
    seconds: float = 0.0


def generate_requests(recv_reqs: list[Any]) -> list[Any]:
    """The tokenized generate requests among what SGLang received (batches unpacked)."""
    from sglang.srt.managers.io_struct import (  # noqa: PLC0415
        BatchTokenizedGenerateReqInput,
        TokenizedGenerateReqInput,
    )

    out = []
    for r in recv_reqs:
        if isinstance(r, TokenizedGenerateReqInput):
            out.append(r)
        elif isinstance(r, BatchTokenizedGenerateReqInput):
            out.extend(x for x in r.batch if isinstance(x, TokenizedGenerateReqInput))
    return out


def resumable(req: Any) -> bool:
    """A tokenized request whose KV follows from its token ids alone."""
    from ghostserve.integrations.sglang.rank import plain  # noqa: PLC0415

    return req.input_ids is not None and plain(req)


class Planner:
    """Rank 0's Lookups, through its own ``WorkerClient`` (rank 0 always registers)."""

    def __init__(self, state: RankState):
        self.state = state

    def plan(self, recv_reqs: list[Any]) -> ResumePlan | None:
        """Look every new resumable request up; None if none has a protected prefix."""
        page = self.state.geometry.page
        entries = []
        for req in generate_requests(recv_reqs):
            if not resumable(req) or len(req.input_ids) <= page:
                continue
            tokens = np.asarray(req.input_ids, dtype="<u4")
            try:
                resp = self.state.client.lookup(tokens)
            except GhostServeError as exc:
                log.warning("ghostserve: lookup failed (%s); %s is prefilled from scratch", exc.code,
                            req.rid)
                continue
            if not resp.group or resp.block_slots != page:
                continue
            usable = min(int(resp.tokens), len(tokens) - 1) // page * page  # SGLang computes >= 1 token
            if usable <= 0:
                continue
            entries.append(ResumeEntry(req.rid, tuple(tokens[:usable].tolist()), resp.group,
                                       tuple(resp.blocks[: usable // page])))
        return ResumePlan(tuple(entries)) if entries else None


def take_plans(recv_reqs: list[Any]) -> tuple[list[Any], list[ResumePlan]]:
    """Split SGLang's received list into its own requests and our plans."""
    plans = [r for r in recv_reqs if isinstance(r, ResumePlan)]
    return ([r for r in recv_reqs if not isinstance(r, ResumePlan)], plans) if plans else (recv_reqs, [])


def load(state: RankState, plan: ResumePlan) -> list[LoadResult]:
    """Step 2 of the module doc, on every rank (collective over the TP group)."""
    import torch  # noqa: PLC0415
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams  # noqa: PLC0415
    from sglang.srt.mem_cache.common import evict_from_tree_cache  # noqa: PLC0415
    from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: PLC0415

    sched = state.scheduler
    tree, alloc = sched.tree_cache, sched.token_to_kv_pool_allocator
    page = state.geometry.page
    results, held, good = [], [], []
    for entry in plan.entries:
        started = time.perf_counter()
        key = RadixKey(array("q", entry.tokens))
        match = tree.match_prefix(MatchPrefixParams(key=key))
        cached = match.device_prefix_len // page * page
        res = LoadResult(entry.rid, cached=cached)
        results.append(res)
        need = len(entry.tokens) - cached
        slots = None
        if need > 0:
            evict_from_tree_cache(tree, need)
            slots = alloc.alloc(need)
        prefix = tree.path_device_indices(match.last_device_node)[:cached] if cached else None
        held.append((key, prefix, slots))
        if slots is None:
            good.append(0)
            continue
        good.append(_fetch(state, entry, cached, slots))
        res.seconds = time.perf_counter() - started
    agreed = torch.tensor(good, dtype=torch.int64)
    if state.tp > 1:
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=sched.tp_cpu_group)
    for (key, prefix, slots), res, n in zip(held, results, agreed.tolist(), strict=True):
        if slots is None:
            continue
        n = n // page * page
        if n and state.replica:
            _copy_from_primary(state, slots[:n])
        if n:
            value = slots[:n] if prefix is None else torch.cat([prefix.to(slots.dtype), slots[:n]])
            ins = tree.insert(InsertParams(key=RadixKey(key.token_ids[: res.cached + n]), value=value.clone()))
            dup = max(0, ins.prefix_len - res.cached)  # already in the tree: our copy is not needed
            if dup:
                alloc.free(slots[:dup])
            state.note_loaded(pages_of(slots[dup:n].cpu().numpy(), page))
        if n < len(slots):
            alloc.free(slots[n:])
        res.loaded = n
        log.info("ghostserve: resumed %s: %d tokens loaded, %d already cached, %d to prefill (%.3f s)",
                 res.rid, n, res.cached, len(key.token_ids) + 1 - res.cached - n, res.seconds)
    return results


def _fetch(state: RankState, entry: ResumeEntry, cached: int, slots: Any) -> int:
    """This rank's shard of the entry's pages after ``cached``, into ``slots``;
    returns how many tokens arrived intact (from the first, in whole pages). A
    replica fetches nothing and claims all (its primary's count decides)."""
    need = len(slots)
    if state.replica:
        return need
    if state.client is None:  # unprotected: nothing to fetch with; every rank then loads nothing
        return 0
    page = state.geometry.page
    first = cached // page
    src = list(entry.source_pages[first : first + need // page])
    dst = pages_of(slots.cpu().numpy(), page).tolist()
    try:
        resp = state.client.fetch(entry.source_group, state.client.rank, src, need, dst)
    except GhostServeError as exc:
        log.warning("ghostserve: fetch for %s failed (%s: %s); it is prefilled", entry.rid, exc.code,
                    exc.details())
        return 0
    bad = set(resp.unrecoverable_blocks)
    if not bad:
        return need
    return next(i for i, p in enumerate(src) if p in bad) * page


def _copy_from_primary(state: RankState, slots: Any) -> None:
    """A replica rank: the primary fetched the same pages into the same slots
    (same scheduling on every rank); copy them from its segment."""
    geom = state.geometry
    region = f"{state.options.shm_prefix}{state.group}-r{state.primary}"
    src = shm.Segment.attach(region, geom.size)
    a, b = src.array(), np.frombuffer(state.segment.buf, dtype=np.uint8)
    for p in pages_of(slots.cpu().numpy(), geom.page).tolist():
        for at, n in geom.page_spans(p):
            b[at : at + n] = a[at : at + n]
    del a  # the mapping goes with its last view
    src.close()


__all__ = ["LoadResult", "Planner", "ResumeEntry", "ResumePlan", "generate_requests", "load", "resumable",
           "take_plans"]
