"""The reference TP engine's driver: rank processes, steps, failures, recovery.

:class:`Engine` starts ``tp`` rank processes (:mod:`ghostserve.engine.worker`),
forms their gloo group, and runs requests with continuous batching
(:mod:`ghostserve.engine.scheduler`) in lock step: each step is sent to every
rank, every rank runs its shard of the forward pass over its paged KV in shared
memory and hands the written byte ranges to its protection mode
(:mod:`ghostserve.engine.protect`); rank 0's greedy picks are the step's tokens.

A rank that dies (its process exits; :class:`Kill` SIGKILLs one at a chosen
point) fails the step on the others at their next collective. The driver then:

1. waits until the daemon has marked the rank lost (``ec``), and destroys the
   dead rank's KV memory, as a GPU's memory is gone with the GPU;
2. starts a replacement rank process (or wakes a hot spare) and re-forms the
   process group on a new port (``rejoin`` = start-up + re-form);
3. has the replacement bring back what its mode kept (``ec``: the daemon
   rebuilds its shard from the survivors and parity; ``replicate``: copy back
   from the host replica; ``none``: nothing), giving per request the tokens
   whose KV every rank holds again;
4. recomputes the rest in one recovery step, then decoding resumes.

``recovery_seconds`` runs from the end of 2 to the end of 4: from the group
being re-formed until the engine can decode its next token.

The driver is single-threaded: ``run`` is not reentrant and an Engine is used
from one thread. Processes are started with ``spawn``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.engine import worker
from ghostserve.engine.model import ModelConfig
from ghostserve.engine.paged import KVShape
from ghostserve.engine.protect import MODES, REPLICA_HEADER
from ghostserve.engine.scheduler import Request, Scheduler
from ghostserve.errors import EngineConfigError, EngineError

#: Name of each mode in reports: ``none`` recovers by recomputing.
REPORT_NAME = {"none": "recompute", "replicate": "replicate", "ec": "ec"}


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine run depends on; validated at construction."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tp: int = 4
    mode: str = "ec"                  # none | replicate | ec
    parity: int = 1                   # ec: parity shards per stripe (m)
    seed: int = 0                     # seeded random weights
    weights_dir: str = ""             # a local Hugging Face safetensors directory instead
    block_tokens: int = 16
    blocks: int = 256                 # KV blocks per rank
    chunk_tokens: int = 1             # daemon checksum granularity, in tokens
    step_tokens: int = 256            # token budget of a step (prefill chunking)
    max_running: int = 8
    spares: int = 0                   # hot spare rank processes kept ready
    socket: str = ""                  # ec: the daemon; "" = start a private one
    shm_prefix: str = ""              # KV regions and replicas; "" = a fresh prefix
    collective_timeout: float = 30.0  # gloo timeout of one collective
    step_timeout: float = 300.0       # the driver's wait for one step's replies

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise EngineConfigError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.tp < 1:
            raise EngineConfigError("tp must be >= 1")
        self.model.check_tp(self.tp)
        if not 1 <= self.parity <= max(1, self.tp):
            raise EngineConfigError(f"parity {self.parity}: must be in 1..{self.tp} (the TP size)")
        for name in ("block_tokens", "blocks", "chunk_tokens", "step_tokens", "max_running"):
            if getattr(self, name) < 1:
                raise EngineConfigError(f"{name} must be >= 1")
        if self.block_tokens % self.chunk_tokens:
            raise EngineConfigError(f"chunk_tokens {self.chunk_tokens} must divide block_tokens {self.block_tokens}")
        if self.step_tokens < self.max_running:
            raise EngineConfigError("step_tokens must be >= max_running (one decode token each)")
        if self.spares < 0:
            raise EngineConfigError("spares must be >= 0")
        if self.shm_prefix:
            shm.check_name(self.shm_prefix)

    @property
    def shape(self) -> KVShape:
        return KVShape(self.model.layers, self.blocks, self.block_tokens, self.model.kv_heads // self.tp,
                       self.model.head_dim, self.chunk_tokens)


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``rank`` in the first step that starts once ``tokens`` tokens have
    been generated in all (every request counted), or at scheduler step
    ``step``. ``phase``: ``mid`` kills it in the middle of the forward pass (after
    its middle layer wrote KV; the step fails on every rank), ``post`` after the
    forward and before its commit (the step completes on the survivors, so the
    victim's share of it is an unprotected tail)."""

    rank: int
    tokens: int | None = None
    step: int | None = None
    phase: str = "mid"

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.step is None):
            raise EngineConfigError("a Kill needs exactly one of tokens= or step=")
        if self.rank < 0 or (self.tokens or 0) < 0 or (self.step or 0) < 0:
            raise EngineConfigError(f"{self}: rank, tokens and step must be >= 0")
        if self.phase not in worker.PAUSES:
            raise EngineConfigError(f"kill phase {self.phase!r}: choose one of {', '.join(worker.PAUSES)}")

    @classmethod
    def parse(cls, text: str, phase: str = "mid") -> Kill:
        """``RANK@TOKEN`` (tokens generated in all) or ``RANK@sSTEP`` (engine step)."""
        try:
            rank, at = text.split("@")
            if at.startswith("s"):
                return cls(int(rank), step=int(at[1:]), phase=phase)
            return cls(int(rank), tokens=int(at), phase=phase)
        except ValueError:
            raise EngineConfigError(f"--kill {text!r}: expected RANK@TOKEN or RANK@sSTEP, e.g. 1@40") from None

    def due(self, generated: int, step: int) -> bool:
        return generated >= self.tokens if self.tokens is not None else step >= self.step


@dataclass
class StepRecord:
    step: int                  # the engine's dispatch number (what the ranks commit)
    kind: str                  # prefill (has a chunk of > 1 token), decode, recovery, idle
    seconds: float             # driver wall time: sent to all ranks .. every answer in
    tokens: int                # token rows in the batch
    forward_seconds: float     # slowest rank's forward pass
    commit_seconds: float      # slowest rank's hand-off to its protection mode


@dataclass
class FailureRecord:
    step: int                       # dispatch number of the step it hit
    ranks: list[int]
    phase: str
    generated: int                  # tokens generated in all when it hit
    step_completed: bool            # the step's results survived (post-phase kill)
    detect_seconds: float = 0.0     # kill -> the driver saw every dead rank
    daemon_detect_seconds: float = 0.0  # kill -> the daemon marked them lost (ec)
    startup_seconds: float = 0.0    # replacement process(es) up
    reform_seconds: float = 0.0     # process group re-formed
    rejoin_seconds: float = 0.0     # from the failure seen to the group re-formed
    restore_seconds: float = 0.0    # replacement(s) brought back what the mode kept
    recompute_seconds: float = 0.0  # the recovery step
    recovery_seconds: float = 0.0   # restore + recompute: re-formed -> can decode
    restored_bytes: int = 0
    recomputed_tokens: int = 0
    held_tokens: int = 0            # tokens of live requests before the failure
    unrecoverable_blocks: list[int] = field(default_factory=list)
    corrupt_chunks: int = 0
    points: dict[str, int] = field(default_factory=dict)


@dataclass
class RunResult:
    mode: str
    outputs: dict[str, list[int]]
    steps: list[StepRecord]
    failures: list[FailureRecord]
    latency_seconds: dict[str, float]      # arrival -> last token
    ttft_seconds: dict[str, float]         # arrival -> first token
    recomputed_tokens: dict[str, int]
    wall_seconds: float
    kv_bytes: int                          # the KV pools of all ranks
    host_bytes: int                        # host memory the mode holds for protection

    def step_seconds(self, *kinds: str) -> float:
        return sum(s.seconds for s in self.steps if not kinds or s.kind in kinds)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """Start with :meth:`start` (or ``with``); :meth:`run` a batch of requests as
    often as wanted; :meth:`stop` ends the ranks and removes their memory."""

    def __init__(self, config: EngineConfig):
        self.cfg = config
        self.shape = config.shape
        self.prefix = config.shm_prefix or f"gse{uuid.uuid4().hex[:8]}-"
        self.group = f"engine-{uuid.uuid4().hex[:8]}"
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.spares: list[tuple[Any, Any]] = []
        self.generation = [0] * config.tp
        self.dispatched = 0                 # the next step number
        self.sidecar = None
        self.socket = config.socket
        self.op = None
        self.replicas: dict[int, shm.Segment] = {}
        self.lens_history: dict[int, dict[str, int]] = {}   # step -> wire id -> tokens
        self.started = False
        self._runs = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        """Start the ranks and form the group; returns self."""
        return self.launch().ready()

    def launch(self) -> Engine:
        """Start the rank processes without waiting for them (so several engines
        can start at once); :meth:`ready` waits."""
        cfg = self.cfg
        if cfg.mode == "ec":
            from ghostserve.client import OperatorClient  # noqa: PLC0415
            from ghostserve.sidecar import Sidecar  # noqa: PLC0415

            if not self.socket:
                self.sidecar = Sidecar().start()
                self.socket = self.sidecar.socket
            self.op = OperatorClient(self.socket)
        if cfg.mode == "replicate":  # owned here, so a replica outlives its rank
            for r in range(cfg.tp):
                self.replicas[r] = shm.Segment.create(f"{self.prefix}replica{r}",
                                                      REPLICA_HEADER + self.shape.region_bytes)
                self.replicas[r].array(np.int64, 0, 1)[0] = -1
        try:
            for r in range(cfg.tp):
                self._spawn(r)
            for _ in range(cfg.spares):
                self._spawn_spare()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> Engine:
        """Wait until every rank is up, then form the process group."""
        try:
            for r in range(self.cfg.tp):
                self._expect(r, "up", timeout=120)
            self._reform()
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def stop(self) -> None:
        for conn in list(self.conns.values()):
            try:
                conn.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
        for proc in list(self.procs.values()):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for proc, conn in self.spares:
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.procs.clear()
        self.conns.clear()
        self.spares.clear()
        for seg in self.replicas.values():
            seg.close()
        self.replicas.clear()
        for name in shm.list_names(self.prefix):
            shm.unlink(name)
        if self.op is not None:
            self.op.close()
            self.op = None
        if self.sidecar is not None:
            self.sidecar.stop()
            self.sidecar = None
        self.started = False

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def region_name(self, rank: int) -> str:
        return f"{self.prefix}r{rank}g{self.generation[rank]}"

    def _spec(self, rank: int) -> worker.RankSpec:
        cfg = self.cfg
        return worker.RankSpec(rank=rank, tp=cfg.tp, model=cfg.model.to_json(), seed=cfg.seed,
                               weights_dir=cfg.weights_dir, shape=self.shape, region=self.region_name(rank),
                               mode=cfg.mode, socket=self.socket, group=self.group, parity=cfg.parity,
                               replica=f"{self.prefix}replica{rank}" if cfg.mode == "replicate" else "",
                               collective_timeout=cfg.collective_timeout)

    def _spawn(self, rank: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker.main, args=(child, self._spec(rank)), daemon=True,
                                name=f"gs-rank{rank}")
        proc.start()
        child.close()
        self.procs[rank], self.conns[rank] = proc, parent

    def _spawn_spare(self) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker.main, args=(child, None), daemon=True, name="gs-spare")
        proc.start()
        child.close()
        self.spares.append((proc, parent))

    def _recv(self, rank: int, timeout: float) -> tuple:
        conn = self.conns[rank]
        if not conn.poll(timeout):
            raise EngineError(f"rank {rank} did not answer in {timeout:.0f} s")
        try:
            msg = conn.recv()
        except EOFError:
            raise EngineError(f"rank {rank} died (exit {self.procs[rank].exitcode})") from None
        if msg[0] == "error":
            raise EngineError(f"rank {rank} failed:\n{msg[1]}")
        return msg

    def _expect(self, rank: int, what: str, timeout: float) -> tuple:
        msg = self._recv(rank, timeout)
        if msg[0] != what:
            raise EngineError(f"rank {rank}: expected {what!r}, got {msg!r}")
        return msg

    def _reform(self) -> None:
        port = free_port()
        for conn in self.conns.values():
            conn.send(("reform", port))
        for r in self.conns:
            self._expect(r, "reformed", timeout=self.cfg.collective_timeout + 30)

    # ---------------------------------------------------------------- figures

    @property
    def kv_bytes(self) -> int:
        return self.cfg.tp * self.shape.region_bytes

    @property
    def host_bytes(self) -> int:
        if self.cfg.mode == "ec":
            g = self.op.status(self.group).groups[0]
            return int(g.parity_arena_bytes)
        if self.cfg.mode == "replicate":
            return sum(seg.size for seg in self.replicas.values())
        return 0

    def rank_kv(self, rank: int, table: Sequence[int], upto: int) -> bytes:
        """A copy of rank ``rank``'s KV bytes of positions [0, upto) of a sequence
        with block table ``table``, every layer (for checks)."""
        self.conns[rank].send(("kv", "_", list(table), upto))
        return self._expect(rank, "kv", timeout=60)[1]

    # ---------------------------------------------------------------- running

    def run(self, requests: Iterable[Request], kills: Sequence[Kill] = (), clock: str = "steps",
            progress: Callable[[int, int], None] | None = None,
            on_step: Callable[[Engine, StepRecord], None] | None = None) -> RunResult:
        """Run ``requests`` to completion, applying ``kills``. ``clock``: ``steps``
        (a request's ``arrival`` is a scheduler step: deterministic batching) or
        ``seconds`` (wall-clock seconds since the run began, for load tests).
        ``progress(generated, total)`` after each step; ``on_step`` too."""
        if not self.started:
            raise EngineError("start the engine first")
        if clock not in ("steps", "seconds"):
            raise EngineConfigError(f"clock {clock!r}: steps or seconds")
        cfg = self.cfg
        for k in kills:
            if k.rank >= cfg.tp:
                raise EngineConfigError(f"kill rank {k.rank}: the engine has ranks 0..{cfg.tp - 1}")
        sched = Scheduler(cfg.blocks, cfg.block_tokens, cfg.step_tokens, cfg.max_running)
        reqs = list(requests)
        for req in reqs:
            sched.add(req)
        total = sum(r.max_new for r in reqs)
        pending = list(kills)
        self._steps: list[StepRecord] = []
        self._failures: list[FailureRecord] = []
        self._runs += 1
        t_start = time.perf_counter()
        # the last step's releases go out too, so the daemon drops that parity
        while not sched.idle or sched.has_releases:
            now = sched.step if clock == "steps" else time.perf_counter() - t_start
            for req in sched.waiting:
                if req.arrival <= now and not req.arrived_s:
                    req.arrived_s = t_start + req.arrival if clock == "seconds" else time.perf_counter()
            plan = sched.plan(now)
            if not plan.segments and not plan.freed and not plan.finished:
                if clock == "seconds" and sched.next_arrival is not None:
                    time.sleep(max(0.0, min(0.05, sched.next_arrival - now)))
                else:
                    sched.tick()
                continue
            generated = sum(len(r.generated) for r in reqs)
            fire = [k for k in pending if plan.segments and k.due(generated, sched.step)]
            for k in fire:
                pending.remove(k)
            lens = sched.lens_after(plan)
            kind = "prefill" if any(len(s[1]) > 1 for s in plan.segments) else (
                "decode" if plan.segments else "idle")
            replies, dead, killed_at = self._dispatch(plan.segments, sched, lens, plan.freed, plan.finished,
                                                      {k.rank: k.phase for k in fire}, kind)
            if not dead:
                self._accept(sched, plan, replies[0][2])
            else:
                completed = 0 not in dead and replies[0][0] == "done"
                if completed:
                    self._accept(sched, plan, replies[0][2])
                phase = fire[0].phase if fire else "unplanned"
                self._recover(sched, dead, killed_at, phase, generated, completed)
            if progress is not None:
                progress(sum(len(r.generated) for r in reqs), total)
            if on_step is not None and self._steps:
                on_step(self, self._steps[-1])
        if pending:
            raise EngineConfigError(f"kills never fired (the run ended first): {pending}")
        return RunResult(
            mode=cfg.mode, outputs={r.rid: r.generated for r in reqs}, steps=self._steps,
            failures=self._failures,
            latency_seconds={r.rid: r.finished_s - r.arrived_s for r in reqs},
            ttft_seconds={r.rid: r.first_token_s - r.arrived_s for r in reqs},
            recomputed_tokens={r.rid: r.recomputed for r in reqs},
            wall_seconds=time.perf_counter() - t_start, kv_bytes=self.kv_bytes, host_bytes=self.host_bytes)

    def _accept(self, sched: Scheduler, plan, tokens: list[int | None]) -> None:
        now = time.perf_counter()
        done = sched.accept(plan, tokens)
        for req in sched.running + done:
            if req.generated and not req.first_token_s:
                req.first_token_s = now
        for req in done:
            req.finished_s = now

    def _wire(self, rid: str) -> str:
        """The id the ranks and the daemon know a request by: unique per run, so a
        request id reused in a later run never meets an earlier run's watermark."""
        return f"{rid}#{self._runs}"

    def _dispatch(self, segments, sched: Scheduler, lens: dict[str, int], freed, finished,
                  pauses: dict[int, str], kind: str) -> tuple[dict[int, tuple], list[int], float]:
        """Send one step to every rank; SIGKILL the ``pauses`` ranks at their pause
        point. Returns (replies by rank, dead ranks, kill time)."""
        step = self.dispatched
        self.dispatched += 1
        by_id = {r.rid: r for r in sched.running}
        tables = {s[0]: by_id[s[0]].table for s in segments}
        lens = {self._wire(rid): n for rid, n in lens.items()}
        finished = [self._wire(rid) for rid in finished]
        t0 = time.perf_counter()
        for r, conn in self.conns.items():
            conn.send(("step", step, segments, tables, lens, freed, finished, pauses.get(r)))
        killed_at = 0.0
        for r in pauses:
            self._expect(r, "paused", timeout=self.cfg.step_timeout)
        for r in pauses:
            os.kill(self.procs[r].pid, signal.SIGKILL)
        if pauses:
            killed_at = time.perf_counter()
        replies = self._collect(self.cfg.step_timeout)
        dead = sorted(r for r in self.conns if r not in replies)
        seconds = time.perf_counter() - t0
        done = [m for m in replies.values() if m[0] == "done"]
        if not dead:
            bad = [f"rank {r}: {m}" for r, m in replies.items() if m[0] != "done"]
            if bad:
                raise EngineError(f"step {step} failed with every rank alive: {'; '.join(bad)}")
        if len(done) == len(replies):  # the survivors committed it
            self.lens_history[step] = dict(lens)
        self._steps.append(StepRecord(step, kind, seconds, sum(len(s[1]) for s in segments),
                                      max((m[3] for m in done), default=0.0),
                                      max((m[4] for m in done), default=0.0)))
        return replies, dead, killed_at

    def _collect(self, timeout: float) -> dict[int, tuple]:
        """Every live rank's reply to a step; a rank whose process ends is left out."""
        replies: dict[int, tuple] = {}
        waiting = dict(self.conns)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"ranks {sorted(waiting)} did not finish a step in {timeout:.0f} s")
            ready = mp_wait([*waiting.values(), *(self.procs[r].sentinel for r in waiting)], left)
            for r, conn in list(waiting.items()):
                if conn in ready or self.procs[r].sentinel in ready:
                    try:
                        if conn.poll():
                            msg = conn.recv()
                            if msg[0] == "error":
                                raise EngineError(f"rank {r} failed:\n{msg[1]}")
                            replies[r] = msg
                            del waiting[r]
                        elif not self.procs[r].is_alive():
                            del waiting[r]
                    except (EOFError, ConnectionResetError):
                        del waiting[r]
        return replies

    # ---------------------------------------------------------------- recovery

    def _recover(self, sched: Scheduler, dead: list[int], killed_at: float, phase: str,
                 generated: int, completed: bool) -> None:
        seen = time.perf_counter()
        rec = FailureRecord(step=self.dispatched - 1, ranks=dead, phase=phase, generated=generated,
                            step_completed=completed,
                            detect_seconds=seen - killed_at if killed_at else 0.0,
                            held_tokens=sum(r.kv_len for r in sched.running))
        self._failures.append(rec)
        if self.op is not None:
            self._await_daemon_lost(dead)
            rec.daemon_detect_seconds = time.perf_counter() - killed_at if killed_at else 0.0
        for r in dead:
            self.procs.pop(r).join(timeout=5)
            self.conns.pop(r).close()
            self._destroy_memory(r)
            self.generation[r] += 1
        t = time.perf_counter()
        for r in dead:
            if self.spares:
                proc, conn = self.spares.pop(0)
                conn.send(("become", self._spec(r)))
                self.procs[r], self.conns[r] = proc, conn
            else:
                self._spawn(r)
        for r in dead:
            self._expect(r, "up", timeout=120)
        rec.startup_seconds = time.perf_counter() - t
        t = time.perf_counter()
        self._reform()
        rec.reform_seconds = time.perf_counter() - t
        rec.rejoin_seconds = time.perf_counter() - seen
        t_rec = time.perf_counter()
        self._restore(sched, dead, rec)
        rec.restore_seconds = time.perf_counter() - t_rec
        rec.recomputed_tokens = sched.roll_back(rec.points)
        t = time.perf_counter()
        segments = sched.recovery_segments()
        if segments:
            lens = {r.rid: r.kv_len for r in sched.running}
            lens.update({rid: start + len(toks) for rid, toks, start, _ in segments})
            replies, again, killed = self._dispatch(segments, sched, lens, [], [], {}, "recovery")
            if again:  # lost another rank while recovering: recover from that
                self._recover(sched, again, killed, "unplanned", generated, False)
                return
        sched.recovered()
        rec.recompute_seconds = time.perf_counter() - t
        rec.recovery_seconds = time.perf_counter() - t_rec
        for _ in range(len(dead) if self.cfg.spares else 0):
            self._spawn_spare()  # back to strength, off the recovery clock

    def _await_daemon_lost(self, dead: list[int], timeout: float = 10.0) -> None:
        """The daemon must stop reading a dead rank before its memory is destroyed."""
        try:
            self.op.wait_ranks(self.group, dict.fromkeys(dead, "lost"), timeout)
        except TimeoutError as exc:
            raise EngineError(f"the daemon did not mark ranks {dead} lost within {timeout} s: {exc}") from None

    def _destroy_memory(self, rank: int) -> None:
        """A dead GPU's memory is gone: zero the rank's pool, then unlink it."""
        name = self.region_name(rank)
        try:
            seg = shm.Segment.attach(name)
        except FileNotFoundError:
            return
        seg.array()[:] = 0
        seg.close()
        shm.unlink(name)

    def _restore(self, sched: Scheduler, dead: list[int], rec: FailureRecord) -> None:
        """Each replacement brings back what its mode kept; ``rec.points`` gets, per
        request, the tokens whose KV every rank holds again."""
        live: dict[int, dict[str, tuple[list[int], int]]] = {}
        for r in dead:
            hint: dict[str, int] = {}
            if self.cfg.mode == "replicate":
                step = int(self.replicas[r].array(np.int64, 0, 1)[0])
                hint = self.lens_history.get(step, {})
            live[r] = {self._wire(q.rid): (q.table, min(hint.get(self._wire(q.rid), 0), q.kv_len))
                       for q in sched.running}
            self.conns[r].send(("restore", live[r]))
        points = {q.rid: q.kv_len for q in sched.running}
        rid_of = {self._wire(q.rid): q.rid for q in sched.running}
        for r in dead:
            info = self._expect(r, "restored", timeout=600)[1]
            for wid, p in info["points"].items():
                points[rid_of[wid]] = min(points[rid_of[wid]], p)
            rec.restored_bytes += int(info.get("restored_bytes", 0))
            rec.unrecoverable_blocks = sorted(set(rec.unrecoverable_blocks) | set(info.get("unrecoverable_blocks", [])))
            rec.corrupt_chunks += int(info.get("corrupt_chunks", 0))
        rec.points = points
