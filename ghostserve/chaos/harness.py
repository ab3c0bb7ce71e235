"""``ghostserve chaos``: a real daemon, real worker processes, real faults.

The driver starts ``ghostserve serve`` as a subprocess and N worker processes
(:mod:`ghostserve.chaos.worker`), then runs the workload in lock step: before
each step it applies the fault plan (SIGKILL a worker and destroy its memory,
SIGKILL and restart the daemon, flip protected bytes), then has every live
worker write and commit the step.

A killed rank is replaced by a new process with fresh memory, which restores
from the daemon and then recomputes what was not protected (it replays the
steps after the protected one; blocks reported unrecoverable are recomputed on
every rank). Every restored byte is compared with the generator, bytes the
daemon called unrecoverable must be untouched, and at the end a scrub finds
silent corruption, a restore repairs it, and every live token on every rank is
compared byte for byte.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.chaos import worker
from ghostserve.chaos.workload import Shape, Workload, expected_and_actual
from ghostserve.client import OperatorClient
from ghostserve.errors import GhostServeError
from ghostserve.v1 import ghostserve_pb2 as pb


@dataclass
class ChaosResult:
    ok: bool = False
    steps: int = 0
    faults: list[dict[str, Any]] = field(default_factory=list)
    restored_bytes: int = 0
    verified_bytes: int = 0
    mismatched_bytes: int = 0
    garbage_bytes: int = 0
    final_verified_bytes: int = 0
    final_mismatched_bytes: int = 0
    unrecoverable_ranges: list[dict[str, int]] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    rejoin_seconds: list[float] = field(default_factory=list)
    detect_seconds: list[float] = field(default_factory=list)
    corruption_detected: int = 0
    corruption_repaired: int = 0
    parity_bytes: int = 0
    parity_arena_bytes: int = 0
    kv_bytes: int = 0
    max_lag_steps: int = 0
    commit_us_median: float = 0.0
    commit_us_p99: float = 0.0
    daemon_restarts: int = 0
    wall_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class ChaosError(GhostServeError):
    """The harness itself could not run (daemon did not start, a worker died unasked)."""


class Chaos:
    def __init__(self, shape: Shape, kills: list[tuple[int, int]] = (), daemon_kills: list[int] = (),
                 corrupts: list[tuple[int, int]] = (), socket: str = "", shm_prefix: str = "",
                 metrics_port: int = 0, progress: Any = None, recover_after: float = 0.0,
                 step_seconds: float = 0.0):
        if shape.ranks < 1 or shape.parity < 1 or shape.steps < 1:
            raise ChaosError("need ranks >= 1, parity >= 1, steps >= 1")
        for rank, step in [*kills, *corrupts]:
            if not 0 <= rank < shape.ranks or not 0 < step < shape.steps:
                raise ChaosError(f"fault {rank}@{step}: rank must be in 0..{shape.ranks - 1}, "
                                 f"step in 1..{shape.steps - 1}")
        for step in daemon_kills:
            if not 0 < step < shape.steps:
                raise ChaosError(f"--kill-daemon {step}: step must be in 1..{shape.steps - 1}")
        self.shape, self.work = shape, Workload(shape)
        self.kills: dict[int, list[int]] = defaultdict(list)
        for rank, step in kills:
            self.kills[step].append(rank)
        self.corrupts: dict[int, list[int]] = defaultdict(list)
        for rank, step in corrupts:
            self.corrupts[step].append(rank)
        self.daemon_kills = set(daemon_kills)
        self.tmp = tempfile.mkdtemp(prefix="ghostserve-chaos-")
        self.socket = socket or os.path.join(self.tmp, "gs.sock")
        self.prefix = shm_prefix or f"gsc{uuid.uuid4().hex[:8]}-"
        self.metrics_port = metrics_port
        self.progress = progress
        self.recover_after = recover_after  # seconds between a fault and its recovery
        self.step_seconds = step_seconds    # pace: at least this long per step
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.generation = [0] * shape.ranks
        self.daemon: subprocess.Popen | None = None
        self.result = ChaosResult(steps=shape.steps)
        self.commit_seconds: list[float] = []
        self.recompute: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)

    # ---------------------------------------------------------------- processes

    def start_daemon(self) -> None:
        cmd = [sys.executable, "-m", "ghostserve", "serve", "--socket", self.socket,
               "--shm-prefix", self.prefix, "--metrics-port", str(self.metrics_port),
               "--metrics-host", "127.0.0.1", "--log-level", "warning"]
        log = open(os.path.join(self.tmp, "daemon.log"), "ab")
        self.daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        line = self.daemon.stdout.readline().decode()
        if not line.startswith("ready"):
            raise ChaosError(f"daemon did not start: {line!r}; see {log.name}")
        self.op = OperatorClient(self.socket)

    def kill_daemon(self) -> None:
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()

    def start_worker(self, rank: int) -> float:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker.main, args=(child, self.shape, self.socket, self.prefix,
                                                          rank, self.generation[rank]), daemon=True)
        t0 = time.perf_counter()
        proc.start()
        self.procs[rank], self.conns[rank] = proc, parent
        msg = self._recv(rank, timeout=60)
        if msg[0] != "registered":
            raise ChaosError(f"worker {rank} failed to register: {msg}")
        return time.perf_counter() - t0

    def _recv(self, rank: int, timeout: float = 60) -> tuple:
        conn = self.conns[rank]
        if not conn.poll(timeout):
            raise ChaosError(f"worker {rank} did not answer in {timeout} s")
        try:
            return conn.recv()
        except EOFError:
            raise ChaosError(f"worker {rank} died unasked (exit {self.procs[rank].exitcode})") from None

    def kill_worker(self, rank: int) -> float:
        """SIGKILL the worker; once the daemon has noticed, destroy its memory (zero
        it, then unlink it) so no restore can read the old bytes. Returns the
        seconds from the kill to the daemon reporting the rank lost."""
        proc = self.procs.pop(rank)
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        self.conns.pop(rank).close()
        detected = float("nan")
        while time.perf_counter() - t0 < 10:
            ranks = self.op.status("chaos").groups[0].ranks
            if any(r.rank == rank and r.state == "lost" for r in ranks):
                detected = time.perf_counter() - t0
                break
            time.sleep(0.002)
        name = worker.region_name(self.prefix, rank, self.generation[rank])
        seg = shm.Segment.attach(name)
        seg.array()[:] = 0
        seg.close()
        shm.unlink(name)
        self.generation[rank] += 1
        return detected

    def region(self, rank: int) -> tuple[shm.Segment, np.ndarray]:
        seg = shm.Segment.attach(worker.region_name(self.prefix, rank, self.generation[rank]))
        return seg, self.shape.view(seg.array())

    # ---------------------------------------------------------------- faults

    def corrupt(self, rank: int, step: int) -> None:
        """Flip bytes of an old, protected token of a live request on ``rank``."""
        status = self.op.status("chaos").groups[0]
        marks = {w.request_id: w.tokens for w in status.watermarks}
        tables = self.work.steps[step - 1].tables
        # the request that lives longest, so the damage is still there to be found
        last_seen = {rid: st.step for st in self.work.steps for rid in st.tables}
        candidates = sorted(tables, key=lambda rid: (-last_seen[rid], rid))
        for rid in candidates:
            if marks.get(f"req{rid}", 0) >= 1:
                block = tables[rid][1][0]
                break
        else:
            self.result.faults.append({"kind": "corrupt", "rank": rank, "step": step, "skipped": True})
            return
        seg, kv = self.region(rank)
        kv[0, block, 0, 0, :16] ^= 0xFF  # layer 0, K of the request's first token
        del kv
        seg.close()
        self.result.faults.append({"kind": "corrupt", "rank": rank, "step": step, "block": int(block)})

    def fail_ranks(self, ranks: list[int], step: int) -> None:
        t_kill = time.perf_counter()
        for rank in ranks:
            detected = self.kill_worker(rank)
            self.result.detect_seconds.append(detected)
            self.result.faults.append({"kind": "kill", "rank": rank, "step": step})
        unrecoverable: set[int] = set()
        protected = {}
        time.sleep(self.recover_after)  # the replacement device takes a while to come up
        for rank in ranks:
            self.result.rejoin_seconds.append(self.start_worker(rank))
            self.conns[rank].send(("restore",))
            msg = self._recv(rank, timeout=600)
            resp = pb.RestoreResponse.FromString(msg[1])
            self.result.recovery_seconds.append(msg[2])
            self.result.restored_bytes += resp.restored_bytes
            protected[rank] = resp
            self.result.corruption_detected += resp.corrupt_chunks
            unrecoverable |= set(resp.unrecoverable_blocks)
            for b in resp.unrecoverable_blocks:
                self.result.unrecoverable_ranges.append({"rank": rank, "block": int(b), "step": step})
            self.verify_restore(rank, step, resp)
        self.result.faults[-1]["detect_to_restored_seconds"] = time.perf_counter() - t_kill
        # recompute: the replacements replay every step after the protected one...
        for rank in ranks:
            for t in range(protected[rank].protected_step + 1, step):
                self.conns[rank].send(("step", t, []))
                self._expect_done(rank)
        # ...and every rank recomputes live tokens of unrecoverable blocks
        if unrecoverable:
            last = self.work.steps[step - 1]
            redo = [(rid, t, blocks[t // self.shape.block_size], t % self.shape.block_size)
                    for rid, (tokens, blocks) in last.tables.items() for t in range(tokens)
                    if blocks[t // self.shape.block_size] in unrecoverable]
            for rank in range(self.shape.ranks):
                self.recompute[rank] += redo

    def verify_restore(self, rank: int, step: int, resp: pb.RestoreResponse) -> None:
        """Bytes below each request's watermark must equal the generator; bytes of
        unrecoverable blocks must be untouched (still zero in the fresh memory)."""
        marks = {w.request_id: w.tokens for w in resp.watermarks}
        bad = set(resp.unrecoverable_blocks)
        bs = self.shape.block_size
        slots = []
        for rid, (tokens, blocks) in self.work.steps[step - 1].tables.items():
            for t in range(min(tokens, marks.get(f"req{rid}", 0))):
                if blocks[t // bs] not in bad:
                    slots.append((rid, t, blocks[t // bs], t % bs))
        # live tokens in unrecoverable blocks: the fresh memory must hold zeros or,
        # where a chunk of the block was recoverable, the right bytes: never garbage
        lost = [(rid, t, blocks[t // bs], t % bs)
                for rid, (tokens, blocks) in self.work.steps[step - 1].tables.items()
                for t in range(tokens) if blocks[t // bs] in bad]
        seg, kv = self.region(rank)
        if slots:
            expected, actual = expected_and_actual(self.shape, kv, rank, slots)
            self.result.verified_bytes += expected.size
            self.result.mismatched_bytes += int((expected != actual).sum())
        if lost:
            expected, actual = expected_and_actual(self.shape, kv, rank, lost)
            self.result.garbage_bytes += int(((actual != 0) & (actual != expected)).sum())
        del kv
        seg.close()

    def final_check(self) -> None:
        last = self.work.steps[-1]
        bs = self.shape.block_size
        slots = [(rid, t, blocks[t // bs], t % bs)
                 for rid, (tokens, blocks) in last.tables.items() for t in range(tokens)]
        for rank in range(self.shape.ranks):
            seg, kv = self.region(rank)
            if slots:
                expected, actual = expected_and_actual(self.shape, kv, rank, slots)
                self.result.final_verified_bytes += expected.size
                self.result.final_mismatched_bytes += int((expected != actual).sum())
            del kv
            seg.close()

    # ---------------------------------------------------------------- run

    def _expect_done(self, rank: int) -> None:
        msg = self._recv(rank)
        if msg[0] != "done":
            raise ChaosError(f"worker {rank}: {msg}")
        self.commit_seconds.append(msg[2])

    def _lag(self, step: int) -> None:
        g = self.op.status("chaos").groups
        if g:
            self.result.max_lag_steps = max(self.result.max_lag_steps, step - g[0].protected_step)

    def run(self) -> ChaosResult:
        started = time.perf_counter()
        try:
            self._run()
        except GhostServeError as exc:
            self.result.errors.append(str(exc))
        finally:
            self.cleanup()
        r = self.result
        r.wall_seconds = time.perf_counter() - started
        if self.commit_seconds:
            us = sorted(s * 1e6 for s in self.commit_seconds)
            r.commit_us_median = statistics.median(us)
            r.commit_us_p99 = us[min(len(us) - 1, int(0.99 * len(us)))]
        r.ok = (not r.errors and r.mismatched_bytes == 0 and r.garbage_bytes == 0
                and r.final_mismatched_bytes == 0 and r.final_verified_bytes > 0)
        if r.ok:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            r.errors.append(f"daemon log kept in {self.tmp}")
        return r

    def _run(self) -> None:
        self.start_daemon()
        for rank in range(self.shape.ranks):
            self.start_worker(rank)
        for step in range(self.shape.steps):
            for rank in self.corrupts.get(step, []):
                self.corrupt(rank, step)
            if step in self.daemon_kills:
                self.kill_daemon()
                time.sleep(self.recover_after)
                self.start_daemon()
                self.result.daemon_restarts += 1
                self.result.faults.append({"kind": "kill-daemon", "step": step})
            if self.kills.get(step):
                self.fail_ranks(self.kills[step], step)
            t_step = time.perf_counter()
            for rank in range(self.shape.ranks):
                self.conns[rank].send(("step", step, self.recompute.pop(rank, [])))
            for rank in range(self.shape.ranks):
                self._expect_done(rank)
            self._lag(step)
            time.sleep(max(0.0, self.step_seconds - (time.perf_counter() - t_step)))
            if self.progress:
                self.progress(step + 1, self.shape.steps)
        deadline = time.monotonic() + 60
        while self.op.status("chaos").groups[0].protected_step < self.shape.steps - 1:
            if time.monotonic() > deadline:
                raise ChaosError("the last step was not protected within 60 s")
            time.sleep(0.01)
        scrub = self.op.scrub("chaos")
        self.result.corruption_detected += scrub.checksum_mismatches
        for rank in scrub.bad_ranks:  # a checksum names the bad rank: restore repairs it
            resp = self.op.restore("chaos", rank)
            self.result.corruption_repaired += 0 if resp.unrecoverable_blocks else 1
        g = self.op.status("chaos").groups[0]
        self.result.parity_bytes, self.result.kv_bytes = g.parity_bytes, g.protected_bytes
        self.result.parity_arena_bytes = g.parity_arena_bytes
        self.final_check()

    def cleanup(self) -> None:
        for rank in list(self.conns):
            try:
                self.conns[rank].send(("quit",))
                self._recv(rank, timeout=10)
            except (ChaosError, OSError, BrokenPipeError):
                pass
        for proc in self.procs.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        for name in shm.list_names(self.prefix):
            shm.unlink(name)


def shape_from(args: Any) -> Shape:
    return Shape(ranks=args.ranks, parity=args.parity, layers=args.layers, blocks=args.blocks,
                 block_size=args.block_size, heads=args.heads, head_dim=args.head_dim,
                 steps=args.steps, requests=args.requests, seed=args.seed)


def run_cli(args: Any) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    shape = shape_from(args)
    console = Console(stderr=True)
    if args.json:
        result = Chaos(shape, args.kill, args.kill_daemon, args.corrupt, args.socket, args.shm_prefix,
                       args.metrics_port, recover_after=args.recover_after, step_seconds=args.step_ms / 1000).run()
        print(json.dumps(asdict(result)))
        return 0 if result.ok else 1
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("chaos", total=shape.steps)
        result = Chaos(shape, args.kill, args.kill_daemon, args.corrupt, args.socket, args.shm_prefix,
                       args.metrics_port, progress=lambda done, total: progress.update(task, completed=done),
                       recover_after=args.recover_after, step_seconds=args.step_ms / 1000).run()
    table = Table(title=f"ghostserve chaos: {shape.ranks}+{shape.parity}, {shape.steps} steps")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in asdict(result).items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = json.dumps(value) if len(json.dumps(value)) < 100 else f"{len(value)} entries"
        table.add_row(key, str(value))
    Console().print(table)
    return 0 if result.ok else 1
