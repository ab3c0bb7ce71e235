"""SGLang plug-in: every TP rank's KV checkpointed by the ghostserve daemon, and a
restarted server's resubmitted requests served from it instead of prefilled.

Installed with ghostserve (entry point ``ghostserve`` in the group
``sglang.srt.plugins``, which SGLang loads in every process), and off unless
``GHOSTSERVE_SGLANG=1``; then ``GHOSTSERVE_SGLANG_SOCKET`` (or
``GHOSTSERVE_SOCKET``) names the daemon, and the other ``GHOSTSERVE_SGLANG_*``
variables (:class:`~.options.PluginOptions`) tune it. ``docs/sglang.md`` has the
operator's view.

* :mod:`.kvpool`: the rank's K/V buffers as views of one shared-memory segment
  (or, on a GPU, of one allocation exported over CUDA IPC), and the daemon
  layout that describes them;
* :mod:`.rank`: registration and one commit per forward (written slots, request
  lengths, freed pages, Lookup records);
* :mod:`.resume`: rank 0 looks new requests up, every rank fetches its shard of
  the protected prefix and inserts it into the radix cache;
* :mod:`.hooks`: where those attach to SGLang (``HookRegistry``).

A set-up the plug-in cannot protect (the overlap scheduler, MLA or
hybrid pools, speculative decoding, pipeline parallelism) or a daemon that does
not answer fails SGLang's start-up with the reason: never a server that runs
unprotected while the operator believes otherwise.
"""

from __future__ import annotations

import logging

log = logging.getLogger("ghostserve.sglang")


def plugin() -> None:
    """SGLang's entry point (``sglang.srt.plugins``): register the hooks when
    enabled. Runs in every SGLang process; imports SGLang only when enabled."""
    from ghostserve.errors import ConfigError  # noqa: PLC0415
    from ghostserve.integrations.sglang import hooks  # noqa: PLC0415
    from ghostserve.integrations.sglang.options import PluginOptions  # noqa: PLC0415

    try:
        options = PluginOptions.from_env()
    except ConfigError as exc:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: PLC0415

        log.error("ghostserve: %s", exc)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.__init__", hooks.refuse(exc),
                              HookType.BEFORE)
        return
    if options is None:
        return
    hooks.register(options)
    log.info("ghostserve: SGLang plug-in on (daemon %s, parity %d)", options.socket, options.parity)


__all__ = ["plugin"]
