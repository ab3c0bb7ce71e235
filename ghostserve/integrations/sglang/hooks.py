"""The hooks the plug-in registers with SGLang's ``HookRegistry``, and the one
:class:`~ghostserve.integrations.sglang.rank.RankState` of this process.

Each hook is a thin adapter from an SGLang call to the rank state; SGLang runs
them on the scheduler's thread. Targets (SGLang 0.5.23):

==============================================================  ======  ==========================
target                                                          type    does
==============================================================  ======  ==========================
``MHATokenToKVPool._create_buffers_normal``                     around  K/V in a shm segment
``Scheduler.__init__``                                          after   checks, daemon registration
``SchedulerRequestReceiver._broadcast_reqs_across_ranks``       before  rank 0: Lookup, resume plan
``Scheduler.process_input_requests``                            before  every rank: fetch, radix insert
``Scheduler.run_batch``                                         after   slots written, KV lengths
``Scheduler.process_batch_result``                              after   the step's commit
``TokenToKVPoolAllocator.free``, ``PagedTokenToKVPoolAllocator.
_release_page_ids``                                             before  pages given back
``Scheduler.release_host_resources``                            after   goodbye (graceful shutdown)
==============================================================  ======  ==========================
"""

from __future__ import annotations

import logging
from typing import Any

from ghostserve.errors import Unsupported
from ghostserve.integrations.sglang.options import PluginOptions

log = logging.getLogger("ghostserve.sglang")

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_POOL = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool"
_RECV = "sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver"

_options: PluginOptions | None = None
_targets: list[str] = []
_state: Any = None     # RankState of this scheduler process, made with its KV pool
_planner: Any = None   # rank 0's resume planner


def state() -> Any:
    """This process's rank state (None outside a scheduler, or before its KV pool)."""
    return _state


def kv_pool(original: Any, pool: Any, *args: Any, **kwargs: Any) -> None:
    """Around ``_create_buffers_normal``: build the pool's buffers in shared memory."""
    global _state
    from sglang.srt.runtime_context import get_parallel  # noqa: PLC0415

    from ghostserve.integrations.sglang.rank import RankState, launch_group  # noqa: PLC0415

    if _state is None:
        par = get_parallel()
        _state = RankState(_options, par.tp_rank, par.tp_size, _options.group or launch_group())
    _state.make_buffers(pool)


def scheduler_ready(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """After ``Scheduler.__init__``: register this rank (start-up fails if it cannot)."""
    global _planner
    from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: PLC0415

    missing = [t for t in _targets if t not in HookRegistry._patched]
    if missing:  # SGLang logs a hook it could not apply and goes on: this release moved it
        raise Unsupported(f"SGLang has no {', '.join(missing)}: this SGLang release does not fit the "
                          "plug-in (tested on the release the 'sglang' extra pins)")
    if _state is None:
        raise Unsupported("the scheduler's KV pool is not an MHA token pool (MLA, hybrid, sliding-window "
                          "and quantised pools are not supported by the SGLang plug-in)")
    _state.attach(scheduler)
    if _state.rank == 0 and _state.can_resume:
        from ghostserve.integrations.sglang.resume import Planner  # noqa: PLC0415

        _planner = Planner(_state)


def broadcast(receiver: Any, recv_reqs: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Before SGLang broadcasts rank 0's new requests: append rank 0's resume plan."""
    if _planner is None or not recv_reqs:
        return None
    plan = _planner.plan(recv_reqs)
    if plan is None:
        return None
    return (receiver, [plan, *recv_reqs], *args), kwargs


def process_inputs(scheduler: Any, recv_reqs: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Before SGLang queues the received requests: carry out the plans in them."""
    from ghostserve.integrations.sglang import resume  # noqa: PLC0415

    if _state is None or not recv_reqs:
        return None
    rest, plans = resume.take_plans(recv_reqs)
    if not plans:
        return None
    for plan in plans:
        resume.load(_state, plan)
    return (scheduler, rest, *args), kwargs


def batch_ran(result: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    if _state is not None:
        _state.capture(batch)


def batch_done(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    if _state is not None:
        _state.commit()


def token_free(allocator: Any, free_index: Any, *args: Any, **kwargs: Any) -> None:
    """Before ``TokenToKVPoolAllocator.free`` (one slot per page): unless a free
    group defers it (it then frees the lot through here again)."""
    if _state is not None and allocator.free_group is None and free_index.numel():
        _state.note_freed(free_index.cpu().numpy())


def page_release(allocator: Any, *page_ids: Any) -> None:
    """Before ``PagedTokenToKVPoolAllocator._release_page_ids``: where paged frees end."""
    if _state is not None:
        for ids in page_ids:
            _state.note_freed(ids.cpu().numpy())


def shutdown(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """After ``release_host_resources`` (SGLang's graceful shutdown only)."""
    if _state is not None:
        _state.goodbye()


def refuse(error: Exception) -> Any:
    """A BEFORE hook for ``Scheduler.__init__`` that fails start-up with ``error``
    (SGLang only logs exceptions raised while plug-ins load)."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    return fail


def register(options: PluginOptions) -> None:
    """Register every hook of the table above."""
    global _options
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

    _options = options
    for target, fn, kind in (
        (f"{_POOL}._create_buffers_normal", kv_pool, HookType.AROUND),
        (f"{_SCHED}.__init__", scheduler_ready, HookType.AFTER),
        (f"{_RECV}._broadcast_reqs_across_ranks", broadcast, HookType.BEFORE),
        (f"{_SCHED}.process_input_requests", process_inputs, HookType.BEFORE),
        (f"{_SCHED}.run_batch", batch_ran, HookType.AFTER),
        (f"{_SCHED}.process_batch_result", batch_done, HookType.AFTER),
        ("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free", token_free, HookType.BEFORE),
        ("sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator._release_page_ids", page_release,
         HookType.BEFORE),
        (f"{_SCHED}.release_host_resources", shutdown, HookType.AFTER),
    ):
        HookRegistry.register(target, fn, kind)
        _targets.append(target)


__all__ = ["register", "state"]
