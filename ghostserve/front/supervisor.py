"""``ghostserve vllm``: a fault-tolerant vLLM on one node, in one command.

:class:`Supervisor` keeps three things up, in this order:

1. the ghostserve daemon: the one answering on ``--socket``, or one it starts
   there (started again if it exits unasked: parity and the request index
   re-attach from shared memory, the workers rejoin; stopped at the end);
2. ``--replicas`` vLLM OpenAI servers with the ghostserve connector
   (:class:`VllmServer`), each on its own devices (:func:`placements`): a fresh
   engine id (so a fresh ghostserve group) per start; when one or its engine dies
   (each death logged with its cause) it is killed whole and started again, at
   once if it had been healthy, else after a doubling backoff; at most
   ``max_restarts`` restarts within ``restart_window``, per replica;
3. the front (:class:`~ghostserve.front.app.Front`) on ``--port``. When a replica
   dies, its requests move at once to a live one, which loads their KV from the
   dead engine's group (once the daemon has seen that engine end: the
   supervisor then *hands it over*); with one replica they wait for the restart.

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
import os
import re
import signal
import sys
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from ghostserve.client import OperatorClient
from ghostserve.errors import (
    ConfigError,
    DaemonUnavailable,
    EngineFailed,
    GhostServeError,
    UnknownGroup,
    WrongState,
)
from ghostserve.front.app import Front
from ghostserve.front.config import SupervisorConfig
from ghostserve.front.metrics import FrontMetrics
from ghostserve.front.upstream import Upstreams
from ghostserve.front.vllm_server import Death, VllmServer

log = logging.getLogger("ghostserve.vllm")

# vLLM options under which chat output is parsed (reasoning, tool calls): chat is then not resumed
CHAT_PARSERS = ("--reasoning-parser", "--tool-call-parser", "--enable-auto-tool-choice")


def visible_gpus(environ: Mapping[str, str], dev: str = "/dev") -> list[str]:
    """The GPUs a replica may be given: ``CUDA_VISIBLE_DEVICES`` if set, else
    the NVIDIA devices present (``/dev/nvidiaN``); none on a CPU machine."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()]
    try:
        found = sorted(int(m.group(1)) for n in os.listdir(dev) if (m := re.fullmatch(r"nvidia(\d+)", n)))
    except OSError:
        return []
    return [str(i) for i in found]


def placements(config: SupervisorConfig, environ: Mapping[str, str]) -> list[dict[str, str]]:
    """Each replica's environment additions: ``CUDA_VISIBLE_DEVICES`` (``--devices``,
    or the visible GPUs split by the TP size when there are several replicas) and
    ``VLLM_CPU_OMP_THREADS_BIND`` (``--cpu-binds``). ConfigError when the GPUs do
    not go round."""
    out: list[dict[str, str]] = [{} for _ in range(config.replicas)]
    if config.devices:
        for env, ids in zip(out, config.devices, strict=True):
            env["CUDA_VISIBLE_DEVICES"] = ids
    elif config.replicas > 1 and (gpus := visible_gpus(environ)):
        need = config.replicas * config.tp_size
        if len(gpus) < need:
            raise ConfigError("replicas", f"{config.replicas} replicas of TP {config.tp_size} need {need} GPUs; "
                              f"{len(gpus)} are visible ({','.join(gpus)}); give --devices or fewer replicas")
        for r, env in enumerate(out):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[r * config.tp_size:(r + 1) * config.tp_size])
    for env, bind in zip(out, config.cpu_binds, strict=False):
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return out


class Supervisor:
    """Runs until stopped (:meth:`request_stop`, or SIGTERM/SIGINT under
    :meth:`run`) or until the restart budget is spent; :meth:`run` returns the
    exit status (0, or 1 when it gave up)."""

    def __init__(self, config: SupervisorConfig, registry: CollectorRegistry | None = None,
                 environ: Mapping[str, str] | None = None):
        front = config.front
        if any(config.flag_given(f) for f in CHAT_PARSERS) and not front.upstream_parses_chat:
            front = dataclasses.replace(front, upstream_parses_chat=True)
        self.config = config
        self.placements = placements(config, os.environ if environ is None else environ)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = FrontMetrics(self.registry)
        self.upstreams = Upstreams(front, supervised=config.replicas)
        self.front = Front(front, self.upstreams, self.registry, self.metrics)
        self.servers: list[VllmServer | None] = [None] * config.replicas
        self._engines = 0  # engines started, all replicas: each start's index
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
            keepers = [asyncio.create_task(self._keep_replica(r)) for r in range(self.config.replicas)]
            everyone = asyncio.gather(*keepers, return_exceptions=True)
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([everyone, stop], return_when=asyncio.FIRST_COMPLETED)
            if everyone.done() and not self._stop.is_set():  # every replica gave up
                self.gave_up = "; ".join(str(e) for e in everyone.result() if isinstance(e, BaseException))
            log.info("stopping: the front first (in-flight requests get %g s)", self.front.config.drain_seconds)
            self._stop.set()
            if not self.upstreams.accepting():
                self.upstreams.shut()  # no engine up, and none will start: waiting requests end now
            await self.front.stop()
            for k in keepers:
                k.cancel()
            await asyncio.gather(everyone, return_exceptions=True)
            stop.cancel()
            servers = [s for s in self.servers if s is not None]
            for server in servers:
                log.info("stopping vLLM (engine %d)", server.index)
            await asyncio.gather(*(s.stop(self.config.stop_timeout) for s in servers))
            for server in servers:
                self._drop_later(server, None)  # a clean stop leaves nothing; an unclean one might
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

    async def _keep_replica(self, r: int) -> None:
        """Replica ``r``: start its engine, and start it again each time it dies,
        until stopped or its restart budget is spent (then it is given up on,
        EngineFailed; the others go on)."""
        try:
            await self._keep_engine(r)
        except EngineFailed as exc:
            log.error("ghostserve vllm: replica %d: %s", r, exc)
            self.upstreams.set_stopped(r)
            raise

    async def _keep_engine(self, r: int) -> None:
        restarts: collections.deque[float] = collections.deque()
        quick_deaths = 0
        while not self._stop.is_set():
            self._engines += 1
            index = self._engines
            server = self.servers[r] = VllmServer(self.config, index, replica=r, env=self.placements[r])
            self.metrics.engine_starts.inc()
            await server.start()
            cause = await server.wait_healthy(self.upstreams.session)
            generation = None
            if cause is None:
                seconds = server.start_seconds
                self.metrics.engine_start_seconds.observe(seconds)
                generation = self.upstreams.set_ready(r, server.url)
                log.info("engine %d (replica %d) up in %.1f s (generation %d, group %s)", index, r, seconds,
                         generation, server.group)
                print(f"engine {index} url={server.url} group={server.group} start_seconds={seconds:.2f} "
                      f"replica={r} pid={server.proc.pid}", flush=True)  # for tools that follow restarts
                quick_deaths = 0
                cause = await server.wait_death()
            else:
                quick_deaths += 1
            self.upstreams.set_down(r)
            if self._stop.is_set():
                return  # run() stops the server
            words = server.last_words()
            log.warning("engine %d (replica %d) died: %s%s", index, r, cause, f"; vLLM said: {words}" if words else "")
            self.metrics.engine_deaths.labels(cause.kind.value).inc()
            t0 = time.monotonic()
            # the hand-over waits for the daemon to see the engine end, not for the kill's tidying
            hand_over = asyncio.create_task(self._hand_over(server, generation)) if generation is not None else None
            await self._kill(server, cause)
            log.info("engine %d: every process ended %.2f s after its death was seen", index, time.monotonic() - t0)
            if hand_over is not None:
                await hand_over
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

    async def _hand_over(self, server: VllmServer, generation: int) -> None:
        """Once the daemon has seen every process of a dead engine end (its group
        ended; Lookup finds only ended groups' KV), the front may send its
        requests to another engine, which then loads their KV. Runs beside
        :meth:`_kill`, which ends those processes."""
        t0, bound = time.monotonic(), self.config.lost_wait + self.config.stop_timeout
        try:
            await asyncio.to_thread(self.op.wait_ended, server.group, bound)
            log.info("engine %d handed over %.2f s after its death was seen (group %s ended)", server.index,
                     time.monotonic() - t0, server.group)
        except TimeoutError:
            log.warning("the daemon did not see engine %d's group %s end within %g s", server.index, server.group,
                        bound)
        except GhostServeError:
            pass  # never registered, or no daemon: nothing to wait for
        self.upstreams.handed_over(generation)

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
            self.upstreams.forget(generation)
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
