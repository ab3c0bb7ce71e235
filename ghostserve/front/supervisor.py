"""``ghostserve vllm``: a fault-tolerant vLLM on one node, in one command.

:class:`Supervisor` keeps three things up, in this order:

1. the ghostserve daemon: the one answering on ``--socket``, or one it starts
   there (started again if it exits unasked: parity and the request index
   re-attach from shared memory, the workers rejoin; stopped at the end);
2. vLLM's OpenAI server with the ghostserve connector (:class:`VllmServer`): a
   fresh engine id per start; when it or its engine dies (each death logged with
   its cause) it is killed whole and started again, at once if it had been
   healthy, else after a doubling backoff; at most ``max_restarts`` restarts
   within ``restart_window``;
3. the front (:class:`~ghostserve.front.app.Front`) on ``--port``, which holds
   its clients' requests across the restart and resumes them on the new engine.

A dead engine's ghostserve group is dropped (parity, index and the ranks' KV
memory) as soon as every request that ran on it has resumed or ended
(:class:`~ghostserve.front.tracker.Tracker`) and the daemon has seen its last
worker end; a drop the daemon refuses for now is tried again, backing off, and
logged once per reason. SIGTERM or SIGINT stops
everything in order: the front (in-flight requests get ``drain_seconds``),
vLLM (SIGTERM, then SIGKILL after ``stop_timeout``), then a daemon it started.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import signal
import sys
import time

from prometheus_client import CollectorRegistry

from ghostserve.client import OperatorClient
from ghostserve.errors import (
    DaemonUnavailable,
    EngineFailed,
    GhostServeError,
    UnknownGroup,
    WrongState,
)
from ghostserve.front.app import Front
from ghostserve.front.config import SupervisorConfig
from ghostserve.front.metrics import FrontMetrics
from ghostserve.front.upstream import SupervisedUpstream
from ghostserve.front.vllm_server import Death, VllmServer

log = logging.getLogger("ghostserve.vllm")

# vLLM options under which chat output is parsed (reasoning, tool calls): chat is then not resumed
CHAT_PARSERS = ("--reasoning-parser", "--tool-call-parser", "--enable-auto-tool-choice")


class Supervisor:
    """Runs until stopped (:meth:`request_stop`, or SIGTERM/SIGINT under
    :meth:`run`) or until the restart budget is spent; :meth:`run` returns the
    exit status (0, or 1 when it gave up)."""

    def __init__(self, config: SupervisorConfig, registry: CollectorRegistry | None = None):
        front = config.front
        if any(config.flag_given(f) for f in CHAT_PARSERS) and not front.upstream_parses_chat:
            front = dataclasses.replace(front, upstream_parses_chat=True)
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = FrontMetrics(self.registry)
        self.upstream = SupervisedUpstream(front)
        self.front = Front(front, self.upstream, self.registry, self.metrics)
        self.server: VllmServer | None = None
        self.daemon: asyncio.subprocess.Process | None = None  # one this command started
        self._daemon_keeper: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._drops: set[asyncio.Task] = set()
        self.gave_up: str | None = None
        self.op: OperatorClient | None = None  # one channel for the run: connecting is slow on a busy node

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._ensure_daemon()
            if self.daemon is not None:
                self._daemon_keeper = asyncio.create_task(self._keep_daemon())
            self.op = OperatorClient(self.config.socket, timeout=30)
            port = await self.front.start()
            print(f"front port={port}", flush=True)
            log.info("front on %s:%d; daemon on %s", self.front.config.host, port, self.config.socket)
            keeper = asyncio.create_task(self._keep_engine())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([keeper, stop], return_when=asyncio.FIRST_COMPLETED)
            if keeper.done() and keeper.exception() is not None:
                log.error("ghostserve vllm: %s", keeper.exception())
                self.gave_up = str(keeper.exception())
            log.info("stopping: the front first (in-flight requests get %g s)", self.front.config.drain_seconds)
            self._stop.set()
            if self.upstream.url is None:
                self.upstream.shut()  # no engine up, and none will start: waiting requests end now
            await self.front.stop()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            stop.cancel()
            if self.server is not None:
                log.info("stopping vLLM (engine %d)", self.server.index)
                await self.server.stop(self.config.stop_timeout)
                self._drop_later(self.server, None)  # a clean stop leaves nothing; an unclean one might
            if self._drops:
                await asyncio.wait(list(self._drops), timeout=self.config.stop_timeout)
        finally:
            if self.op is not None:
                self.op.close()
            await self._stop_daemon()
        return 1 if self.gave_up else 0

    # ------------------------------------------------------------------ daemon

    async def _ensure_daemon(self) -> None:
        op = OperatorClient(self.config.socket, timeout=5)
        try:
            if await asyncio.to_thread(op.healthy):
                log.info("using the ghostserve daemon on %s", self.config.socket)
                return
        finally:
            op.close()
        log.info("no daemon answers on %s: starting one", self.config.socket)
        await self._start_daemon()

    async def _start_daemon(self) -> None:
        self.daemon = await asyncio.create_subprocess_exec(
            self.config.python, "-m", "ghostserve", "serve", "--socket", self.config.socket,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE)
        line = (await self.daemon.stdout.readline()).decode()
        if not line.startswith("ready"):
            code = await self.daemon.wait()
            raise EngineFailed(f"ghostserve serve did not start on {self.config.socket} (exit status {code}); "
                               "its log is above")

    async def _keep_daemon(self) -> None:
        """Start the daemon this command started again whenever it exits unasked
        (a crash, a SIGKILL): at once after a daemon that had run a while, else
        after a doubling backoff."""
        quick = 0
        while True:
            started = time.monotonic()
            code = await self.daemon.wait()
            if self._stop.is_set():
                return
            quick = quick + 1 if time.monotonic() - started < 10 else 0
            delay = min(self.config.backoff_max, self.config.backoff * 2 ** (quick - 1)) if quick else 0.0
            log.warning("the ghostserve daemon exited unasked (status %s): starting it again%s", code,
                        f" in {delay:.1f} s" if delay else "")
            if delay:
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
            try:
                await self._start_daemon()
            except EngineFailed as exc:
                log.error("%s", exc)
                continue
            self.metrics.daemon_restarts.inc()
            log.info("ghostserve daemon running again on %s", self.config.socket)

    async def _stop_daemon(self) -> None:
        if self._daemon_keeper is not None:
            self._daemon_keeper.cancel()
            await asyncio.gather(self._daemon_keeper, return_exceptions=True)
        if self.daemon is None or self.daemon.returncode is not None:
            return
        log.info("stopping the ghostserve daemon this command started")
        self.daemon.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.daemon.wait(), self.config.stop_timeout)
        except TimeoutError:
            self.daemon.kill()
            await self.daemon.wait()

    # ------------------------------------------------------------------ engine

    async def _keep_engine(self) -> None:
        restarts: collections.deque[float] = collections.deque()
        quick_deaths = 0
        index = 0
        while not self._stop.is_set():
            index += 1
            server = self.server = VllmServer(self.config, index)
            self.metrics.engine_starts.inc()
            await server.start()
            cause = await server.wait_healthy(self.upstream.session)
            generation = None
            if cause is None:
                seconds = server.start_seconds
                self.metrics.engine_start_seconds.observe(seconds)
                generation = self.upstream.set_ready(server.url)
                log.info("engine %d up in %.1f s (generation %d, group %s)", index, seconds, generation,
                         server.group)
                print(f"engine {index} url={server.url} group={server.group} start_seconds={seconds:.2f}",
                      flush=True)  # for tools that follow restarts
                quick_deaths = 0
                cause = await server.wait_death()
            else:
                quick_deaths += 1
            self.upstream.set_down()
            if self._stop.is_set():
                self.upstream.shut()  # requests waiting for an engine: none is coming
                return  # run() stops the server
            words = server.last_words()
            log.warning("engine %d died: %s%s", index, cause, f"; vLLM said: {words}" if words else "")
            self.metrics.engine_deaths.labels(cause.kind.value).inc()
            t0 = time.monotonic()
            await self._kill(server, cause)
            log.info("engine %d: every process ended %.2f s after its death was seen", index, time.monotonic() - t0)
            self._drop_later(server, generation)
            now = time.monotonic()
            while restarts and restarts[0] < now - self.config.restart_window:
                restarts.popleft()
            if len(restarts) >= self.config.max_restarts:
                raise EngineFailed(f"{len(restarts)} restarts within {self.config.restart_window:g} s "
                                   f"(--max-restarts {self.config.max_restarts}); giving up")
            restarts.append(now)
            delay = 0.0 if quick_deaths == 0 else min(self.config.backoff_max,
                                                      self.config.backoff * 2 ** (quick_deaths - 1))
            if delay:
                log.info("restarting in %.1f s (it died before it was healthy)", delay)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return
                except TimeoutError:
                    pass

    async def _kill(self, server: VllmServer, cause: Death) -> None:
        """End a dead engine's processes. After a worker death, first let the
        daemon mark that rank lost: survivors that end after it are kept
        (detached) as the rebuild source; killed together, they might be lost too."""
        if cause.rank is not None:
            await asyncio.to_thread(self._wait_lost, server.group, cause.rank)
        await server.kill()

    def _wait_lost(self, group: str, rank: int) -> None:
        """Until the daemon has marked ``rank`` of ``group`` lost (its Watch says so;
        within ~50 ms), at most ``lost_wait`` seconds."""
        try:
            self.op.wait_ranks(group, {rank: "lost"}, self.config.lost_wait)
        except TimeoutError:
            log.warning("the daemon did not mark rank %d of %s lost within %g s", rank, group, self.config.lost_wait)
        except GhostServeError:
            return  # no such group (it never registered), or no daemon: nothing to wait for

    # ------------------------------------------------------------------ groups

    def _drop_later(self, server: VllmServer, generation: int | None) -> None:
        task = asyncio.create_task(self._drop(server, generation))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _drop(self, server: VllmServer, generation: int | None) -> None:
        if generation is not None:
            pending = self.front.tracker.pending(generation)
            if pending:
                log.info("group %s: kept until its %d request(s) resumed", server.group, pending)
            await self.front.tracker.settled(generation)
        delay, why = 0.1, ""
        while True:
            try:
                resp = await asyncio.to_thread(self.op.drop, server.group, True)
            except UnknownGroup:
                return  # dropped already (a clean shutdown), or never registered
            except WrongState as exc:
                now = f"the daemon has not seen every worker end ({exc})"
            except DaemonUnavailable:
                now = "the daemon does not answer (restarting?)"
            except GhostServeError as exc:
                log.warning("could not drop group %s: %s", server.group, exc)
                return
            else:
                self.metrics.groups_dropped.inc()
                log.info("dropped group %s (%.1f MiB of shared memory)", server.group, resp.released_bytes / 2**20)
                return
            if now != why:  # once per state, not per attempt
                log.info("group %s not dropped yet: %s; trying again", server.group, now)
                why = now
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)


def run(config: SupervisorConfig) -> int:
    """``ghostserve vllm``: run until SIGTERM/SIGINT; the exit status."""
    logging.basicConfig(level=config.front.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(Supervisor(config).run())
