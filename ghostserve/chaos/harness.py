"""``ghostserve chaos``: a real daemon, real worker processes, real faults.

The driver starts ``ghostserve serve`` as a subprocess and N worker processes
(:mod:`ghostserve.chaos.worker`), then runs the workload in lock step: before
each step it applies the fault plan (SIGKILL a worker and destroy its memory,
SIGKILL and restart the daemon, flip protected bytes), then has every live
worker write and commit the step. A daemon kill lands at one of three moments
(:class:`~ghostserve.chaos.options.DaemonMoment`): before a step's writes,
right after a worker's death (before the daemon may have seen it), or while
the dead worker's replacement registers.

The workers' KV is POSIX shared memory (``--device host``, the CPU data path)
or a GPU allocation exported over CUDA IPC (``--device cuda``, the CUDA data
path); the driver reads GPU KV through the worker (a dump) and damages it the
same way, and every check is the same.

A killed rank is replaced by a new process with fresh memory, which restores
from the daemon and then recomputes what was not protected (it replays the
steps after the protected one; blocks reported unrecoverable are recomputed on
every rank). Every restored byte is compared with the generator, bytes the
daemon called unrecoverable must be untouched, and at the end a scrub finds
silent corruption, a restore repairs it, and every live token on every rank is
compared byte for byte.

Every fault gets an outcome. A corruption is followed until something checks
it: ``corrected`` (a restore or the final scrub found it and the bytes were
rebuilt), ``detected`` (found, but its stripe had more bad shards than m: the
block was reported unrecoverable and recomputed), ``gone`` (its bytes stopped
being protected data before any check: the request finished and its block was
freed, or the rank was killed and its memory destroyed), or ``undetected``
(still protected at the final scrub, and not found), which fails the run. An
unrecoverable block is ``expected`` when the ranks lost together plus the
corrupt survivors of its stripe exceed m; one that is not fails the run. So
does protection that stalls: a committed step not protected within
``stall_seconds`` (the daemon's ``lag_seconds``), whatever comes of it later.
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
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.chaos import worker
from ghostserve.chaos.options import (
    DaemonMoment,
    KvDevice,
    as_daemon_kill,
    check_args,
    check_plan,
    private_prefix,
)
from ghostserve.chaos.workload import Shape, Workload, content, expected_and_actual
from ghostserve.client import OperatorClient
from ghostserve.errors import ChaosError, ChaosOptionError, GhostServeError
from ghostserve.sidecar import NETWORK_ENV  # the private daemon never opens TCP
from ghostserve.v1 import ghostserve_pb2 as pb

__all__ = ["Chaos", "ChaosResult", "NodeLoss", "run_cli", "shape_from"]

CORRUPT_BYTES = 16  # flipped at the start of layer 0's K of the request's first token


@dataclass
class NodeLoss:
    """What a ``--kill-node`` run found (:mod:`ghostserve.chaos.nodes`): how far the
    mirror was at the loss, and what node B got back from where. Blocks count
    block positions of requests (a position is restored when every rank fetched
    it, byte-checked); the rest is recomputed on node B: each request's tail (not
    a full block: never mirrored), blocks not yet mirrored at the loss, blocks a
    Fetch reported unrecoverable, and requests too short to be mirrored."""

    step: int                     # node A was lost before this step's writes
    lost: str = "a"               # the node lost, and the node its requests resumed on
    resumed_on: str = "b"
    source: str = ""              # where the restored bytes came from (FetchResponse.source): "store"
    committed_step: int = -1      # at the loss: the newest step node A's workers had committed,
    protected_step: int = -1      # the newest its daemon had protected (just before the loss),
    mirrored_step: int = -1       # and the newest whose full blocks were all off-node (-1: none)
    mirror_lag_steps: int = 0     # protected_step - mirrored_step (protected_step + 1 if none)
    remote_bytes: int = 0         # node A's KV in other nodes' store segments
    requests: int = 0             # requests node A held at the loss
    requests_restored: int = 0    # of them, with at least one block from the store
    lookup_misses: int = 0        # of them, long enough to be mirrored, whose Lookup found nothing
    blocks: int = 0               # their blocks, tails included
    restored_blocks: int = 0
    recompute_blocks: int = 0     # tail + unmirrored + unrecoverable
    tail_blocks: int = 0          # the requests' last blocks, not full: never mirrored
    unmirrored_blocks: int = 0    # full blocks not off-node at the loss (the mirror's lag, short requests)
    unrecoverable_blocks: int = 0  # named by a store hit, not delivered by a Fetch (missing or corrupt)
    # full blocks that were protected by mirrored_step (so off-node by the status's word) and that
    # Lookup did not find: the mirror's status ran ahead of its copies (a note, not a failure)
    overstated_blocks: int = 0
    restored_tokens: int = 0
    recompute_tokens: int = 0
    resume_seconds: float = 0.0   # from the loss to every rank of node B holding what the store had
    mirror_min_tokens: int = 0
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> socket, shm_prefix


@dataclass
class ChaosResult:
    """What a run found; ``ok`` is the verdict (see the module docstring)."""

    ok: bool = False
    steps: int = 0
    device: str = "host"     # where the workers' KV lived (KvDevice)
    faults: list[dict[str, Any]] = field(default_factory=list)
    restored_bytes: int = 0
    verified_bytes: int = 0
    mismatched_bytes: int = 0
    garbage_bytes: int = 0
    final_verified_bytes: int = 0
    final_mismatched_bytes: int = 0
    unrecoverable_ranges: list[dict[str, Any]] = field(default_factory=list)
    expected_unrecoverable: bool = False  # there were unrecoverable ranges, and every one was expected
    recovery_seconds: list[float] = field(default_factory=list)
    rejoin_seconds: list[float] = field(default_factory=list)
    detect_seconds: list[float] = field(default_factory=list)
    corruption_detected: int = 0          # the daemon's count: restores' corrupt chunks + scrub mismatches
    corruption_repaired: int = 0
    parity_bytes: int = 0
    parity_arena_bytes: int = 0
    kv_bytes: int = 0
    max_lag_steps: int = 0
    max_lag_seconds: float = 0.0          # the longest a committed step waited to be protected
    commit_us_median: float = 0.0
    commit_us_p99: float = 0.0
    daemon_restarts: int = 0
    wall_seconds: float = 0.0
    shm_prefix: str = ""                  # the private daemon's, and its workers' regions'
    socket: str = ""
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    node_loss: NodeLoss | None = None     # --nodes 2 --kill-node STEP


@dataclass
class Corruption:
    """One injected corruption, followed until an outcome is known."""

    rank: int
    step: int
    block: int
    rid: int
    fault: dict[str, Any]  # its entry in ChaosResult.faults

    @property
    def pending(self) -> bool:
        return "outcome" not in self.fault

    def settle(self, outcome: str, note: str, by: str = "") -> None:
        self.fault.update(outcome=outcome, note=note)
        if by:
            self.fault["detected_by"] = by


class Chaos:
    """One chaos run; :meth:`run` returns its :class:`ChaosResult`."""

    def __init__(self, shape: Shape, kills: list[tuple[int, int]] = (),
                 daemon_kills: list[int | tuple[DaemonMoment, int]] = (),
                 corrupts: list[tuple[int, int]] = (), socket: str = "", shm_prefix: str = "",
                 metrics_port: int = 0, progress: Any = None, recover_after: float = 0.0,
                 step_seconds: float = 0.0, stall_seconds: float = 30.0, device: KvDevice = KvDevice.HOST):
        sizes = {"--layers": shape.layers, "--blocks": shape.blocks, "--block-size": shape.block_size,
                 "--heads": shape.heads, "--head-dim": shape.head_dim, "--requests": shape.requests}
        check_plan(shape.ranks, shape.parity, shape.steps, sizes, kills, daemon_kills, corrupts,
                   recover_after, step_seconds, metrics_port, stall_seconds)
        if socket and os.path.exists(socket) and OperatorClient(socket, timeout=2).healthy():
            raise ChaosOptionError(f"--socket {socket}: a daemon answers there; chaos runs a daemon of its "
                                   "own and would take the socket over: give a fresh path")
        if shm_prefix:
            try:
                shm.check_name(shm_prefix + "x")
            except ValueError:
                raise ChaosOptionError(f"--shm-prefix {shm_prefix!r}: use letters, digits and ._-") from None
            taken = shm.list_names(shm_prefix)
            if taken:
                raise ChaosOptionError(f"--shm-prefix {shm_prefix!r}: {len(taken)} segments already use it "
                                       f"(e.g. {taken[0]}); chaos removes everything under its prefix at "
                                       "the end: give an unused prefix")
        self.shape, self.work = shape, Workload(shape)
        self.kills: dict[int, list[int]] = defaultdict(list)
        for rank, step in kills:
            self.kills[step].append(rank)
        self.corrupts: dict[int, list[int]] = defaultdict(list)
        for rank, step in corrupts:
            self.corrupts[step].append(rank)
        self.daemon_kills: dict[int, set[DaemonMoment]] = defaultdict(set)
        for moment, step in map(as_daemon_kill, daemon_kills):
            self.daemon_kills[step].add(moment)
        self.device = KvDevice(device)  # where the workers' KV lives (worker.HostKV / worker.CudaKV)
        if self.device == KvDevice.CUDA:
            from ghostserve.codec.backends import cuda_device_present  # noqa: PLC0415

            if not cuda_device_present():
                raise ChaosOptionError("--device cuda needs CuPy and a CUDA device: pip install "
                                       "'ghostserve[gpu-cuda13]' (or [gpu-cuda12]) on a machine with a GPU")
        self.stall_seconds = stall_seconds
        self.prefix = shm_prefix or private_prefix()
        # the daemon the workers talk to, their group, and where their KV lives (a
        # node-loss run moves these from node A to node B; workload step s is
        # the group's step s - step_offset)
        self.group, self.namespace, self.kv_prefix, self.step_offset = worker.GROUP, "", self.prefix, 0
        self.tmp = tempfile.mkdtemp(prefix="ghostserve-chaos-")
        self.socket = socket or os.path.join(self.tmp, "gs.sock")
        self.metrics_port = metrics_port
        self.progress = progress
        self.recover_after = recover_after  # seconds between a fault and its recovery
        self.step_seconds = step_seconds    # pace: at least this long per step
        self.ctx = mp.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}
        self.generation = [0] * shape.ranks
        self.daemon: subprocess.Popen | None = None
        self.result = ChaosResult(steps=shape.steps, shm_prefix=self.prefix, socket=self.socket,
                                  device=str(self.device))
        self.commit_seconds: list[float] = []
        self.recompute: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
        # what each step rewrote besides its own writes (rank -> slots): a replay writes it again
        self.rewrote: dict[int, dict[int, list[tuple[int, int, int, int]]]] = defaultdict(dict)
        self.corruptions: list[Corruption] = []

    # ---------------------------------------------------------------- processes

    def start_daemon(self) -> None:
        cmd = [sys.executable, "-m", "ghostserve", "serve", "--socket", self.socket,
               "--shm-prefix", self.prefix, "--region-prefix", self.prefix,
               "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1", "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if k not in NETWORK_ENV}
        with open(os.path.join(self.tmp, "daemon.log"), "ab") as log:
            self.daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                           env=env)
        line = self.daemon.stdout.readline().decode()
        if not line.startswith("ready"):
            raise ChaosError(f"daemon did not start: {line!r}; see {log.name}")
        self.op = OperatorClient(self.socket)

    def kill_daemon(self) -> None:
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()

    def start_worker(self, rank: int) -> float:
        """Start rank's worker and wait until it has registered; returns the seconds it took."""
        t0 = self.spawn_worker(rank)
        return self.registered(rank, t0)

    def spawn_worker(self, rank: int) -> float:
        """Start rank's worker (it registers on its own); returns when it started."""
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker.main, args=(child, self.shape, self.socket, self.kv_prefix,
                                                          rank, self.generation[rank], self.device), daemon=True,
                                kwargs=dict(group=self.group, namespace=self.namespace, step_offset=self.step_offset))
        t0 = time.perf_counter()
        proc.start()
        child.close()  # the worker holds its end: EOF here once it exits
        self.procs[rank], self.conns[rank] = proc, parent
        return t0

    def registering(self, rank: int) -> None:
        """Wait until a spawned worker is about to register."""
        msg = self._recv(rank, timeout=90)
        if msg[0] != "registering":
            raise ChaosError(f"worker {rank} did not start: {msg[1] if msg[0] == 'error' else msg}")

    def registered(self, rank: int, t0: float) -> float:
        """Wait for a spawned worker's registration; the seconds since ``t0``."""
        msg = self._recv(rank, timeout=90)
        if msg[0] == "registering":
            msg = self._recv(rank, timeout=90)
        if msg[0] != "registered":
            raise ChaosError(f"worker {rank} could not register: {msg[1] if msg[0] == 'error' else msg}")
        return time.perf_counter() - t0

    def _recv(self, rank: int, timeout: float = 60) -> tuple:
        """The worker's next message; a worker that exits instead is reported at once."""
        conn, proc = self.conns[rank], self.procs[rank]
        if not mp_wait([conn, proc.sentinel], timeout):
            raise ChaosError(f"worker {rank} did not answer in {timeout} s")
        try:
            if conn.poll():
                return conn.recv()
        except (EOFError, OSError):
            pass
        proc.join(timeout=5)
        raise ChaosError(f"worker {rank} died unasked (exit {proc.exitcode})")

    def kill_worker(self, rank: int, step: int, daemon_too: bool = False) -> float:
        """SIGKILL the worker; once the daemon has noticed, destroy its memory (zero
        it, then unlink it) so no restore can read the old bytes. Returns the
        seconds from the kill to the daemon reporting the rank lost. With
        ``daemon_too`` the daemon is SIGKILLed right after the worker (the memory
        zeroed first, unlinked once the new daemon has the rank lost) and the
        seconds are NaN: the new daemon finds the death at its start. (Memory is
        destroyed only once no daemon maps it, as a GPU allocation a daemon holds
        an IPC mapping of outlives its process: a daemon still encoding the dead
        rank's step reads its last bytes, not garbage. On a GPU the allocation
        goes when the daemon unmaps the lost rank: nothing to destroy here.)"""
        proc = self.procs.pop(rank)
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        self.conns.pop(rank).close()
        name = worker.region_name(self.kv_prefix, rank, self.generation[rank])
        host = self.device == KvDevice.HOST
        if daemon_too:
            # the memory goes once nobody maps it: the old daemon's mapping died with it,
            # the new daemon maps the zeros (and must find the worker gone)
            self.restart_daemon(DaemonMoment.DEATH, step, f"right after rank {rank}'s SIGKILL",
                                then=(lambda: self._zero(name)) if host else None)
        try:
            self.op.wait_ranks(self.group, {rank: "lost"}, timeout=30)
        except TimeoutError as exc:
            raise ChaosError(f"the daemon did not mark rank {rank} lost within 30 s of its SIGKILL: {exc}") from None
        detected = time.perf_counter() - t0
        if host:
            self._zero(name)
            shm.unlink(name)
        self.generation[rank] += 1
        for c in self.corruptions:
            if c.pending and c.rank == rank:
                c.settle("gone", f"rank {rank} was killed before step {step} and its memory destroyed "
                                 "before any check")
        return float("nan") if daemon_too else detected

    @staticmethod
    def _zero(name: str) -> None:
        seg = shm.Segment.attach(name)
        seg.array()[:] = 0
        seg.close()

    def restart_daemon(self, moment: DaemonMoment, step: int, note: str, then: Any = None) -> None:
        """SIGKILL the daemon; ``then()`` while none runs; ``recover_after``; start it again."""
        self.kill_daemon()
        if then is not None:
            then()
        time.sleep(self.recover_after)
        self.start_daemon()
        self.result.daemon_restarts += 1
        self.result.faults.append({"kind": "kill-daemon", "moment": str(moment), "step": step,
                                   "outcome": "restarted",
                                   "note": f"{note}; parity re-attached from shared memory; workers rejoin"})

    def read_kv(self, rank: int) -> np.ndarray:
        """A copy of a live rank's KV, as (layers, blocks, 2, block_size, token_bytes):
        read from its shared memory, or (GPU) dumped by the worker."""
        if self.device == KvDevice.HOST:
            seg = shm.Segment.attach(worker.region_name(self.kv_prefix, rank, self.generation[rank]))
            try:
                return self.shape.view(seg.array()).copy()
            finally:
                seg.close()
        self.conns[rank].send(("dump",))
        msg = self._recv(rank)
        if msg[0] != "dump":
            raise ChaosError(f"worker {rank} did not dump its KV: {msg[1] if msg[0] == 'error' else msg}")
        return self.shape.view(np.frombuffer(msg[1], dtype=np.uint8))

    def damage(self, rank: int, offset: int, data: bytes) -> None:
        """Overwrite ``data`` at byte ``offset`` of a live rank's KV, behind its back."""
        if self.device == KvDevice.HOST:
            seg = shm.Segment.attach(worker.region_name(self.kv_prefix, rank, self.generation[rank]))
            arr = seg.array()
            arr[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
            del arr
            seg.close()
            return
        self.conns[rank].send(("poke", offset, data))
        msg = self._recv(rank)
        if msg[0] != "poked":
            raise ChaosError(f"worker {rank} could not corrupt its KV: {msg[1] if msg[0] == 'error' else msg}")

    # ---------------------------------------------------------------- faults

    def wait_protected(self, step: int, timeout: float = 60) -> bool:
        """Wait until the daemon has protected ``step`` (after a daemon restart: until
        the workers have rejoined and resent); False on timeout."""
        try:
            self.op.wait_protected(self.group, step - self.step_offset, timeout)
            return True
        except TimeoutError:
            return False

    def corrupt(self, rank: int, step: int) -> None:
        """Flip bytes of an old, protected token of a live request on ``rank``."""
        fault: dict[str, Any] = {"kind": "corrupt", "rank": rank, "step": step}
        self.result.faults.append(fault)
        # the daemon's watermarks say which tokens are protected: let it catch up first
        # (after a daemon restart the workers rejoin and resend), so they are current
        caught_up = self.wait_protected(step - 1)
        status = self.op.status(self.group).groups[0]
        marks = {w.request_id: w.tokens for w in status.watermarks}
        tables = self.work.steps[step - 1].tables
        # the request that lives longest, so the damage is still there to be found
        last_seen = {rid: st.step for st in self.work.steps for rid in st.tables}
        candidates = sorted(tables, key=lambda rid: (-last_seen[rid], rid))
        rid = next((r for r in candidates if marks.get(f"req{r}", 0) >= 1), None)
        if rid is None:
            fault.update(outcome="not_injected", note="no live request had a protected token yet"
                         + ("" if caught_up else f" (the daemon had protected only step {status.protected_step})"))
            return
        block = int(tables[rid][1][0])
        # layer 0, K of the request's first token
        bad = self.read_kv(rank)[0, block, 0, 0, :CORRUPT_BYTES] ^ 0xFF
        self.damage(rank, block * self.shape.block_bytes, bad.tobytes())
        fault.update(block=block, request=f"req{rid}")
        self.corruptions.append(Corruption(rank, step, block, rid, fault))

    def _corruption_fixed(self, c: Corruption) -> bool:
        """Do the corrupted bytes hold the right content again?"""
        actual = self.read_kv(c.rank)[0, c.block, 0, 0, :CORRUPT_BYTES]
        want = content(self.shape, c.rank, np.array([c.rid]), np.array([0]))[0, 0, 0, :CORRUPT_BYTES]
        return bool(np.array_equal(actual, want))

    def _after_step(self, step: int) -> None:
        """Corruptions whose block ``step`` freed are no longer protected data."""
        freed = set(self.work.steps[step].freed)
        for c in self.corruptions:
            if c.pending and c.block in freed:
                c.settle("gone", f"block {c.block} was freed at step {step} (req{c.rid} finished) and "
                                 "reused before any check: its bytes were no longer protected data")

    def fail_ranks(self, ranks: list[int], step: int) -> None:
        t_kill = time.perf_counter()
        moments = self.daemon_kills.get(step, set())
        kill_faults = {}
        for rank in ranks:
            kill_faults[rank] = {"kind": "kill", "rank": rank, "step": step}
            self.result.faults.append(kill_faults[rank])
            detected = self.kill_worker(rank, step, daemon_too=DaemonMoment.DEATH in moments and rank == ranks[-1])
            if detected == detected:  # not NaN
                self.result.detect_seconds.append(detected)
        unrecoverable: set[int] = set()
        protected = {}
        if DaemonMoment.REGISTER in moments:  # the replacements start while no daemon runs
            started: dict[int, float] = {}

            def spawn() -> None:
                for r in ranks:
                    started[r] = self.spawn_worker(r)
                for r in ranks:
                    self.registering(r)

            self.restart_daemon(DaemonMoment.REGISTER, step, f"while the replacements of ranks {ranks} registered",
                                then=spawn)
            for rank in ranks:
                self.result.rejoin_seconds.append(self.registered(rank, started[rank]))
        else:
            time.sleep(self.recover_after)  # the replacement device takes a while to come up
            for rank in ranks:
                self.result.rejoin_seconds.append(self.start_worker(rank))
        for rank in ranks:
            self.conns[rank].send(("restore",))
            msg = self._recv(rank, timeout=600)
            if msg[0] != "restored":
                raise ChaosError(f"restore of rank {rank}: {msg[1] if msg[0] == 'error' else msg}")
            resp = pb.RestoreResponse.FromString(msg[1])
            self.result.recovery_seconds.append(msg[2])
            self.result.restored_bytes += resp.restored_bytes
            protected[rank] = resp
            self.result.corruption_detected += resp.corrupt_chunks
            self._judge_restore(rank, step, len(ranks), resp)
            n_bad = len(resp.unrecoverable_blocks)
            kill_faults[rank].update(
                outcome="restored" if not n_bad else "partly restored",
                note=f"{resp.restored_bytes:,} bytes rebuilt from step {resp.protected_step}'s protection"
                     + (f", {n_bad} block(s) unrecoverable" if n_bad else ""))
            unrecoverable |= set(resp.unrecoverable_blocks)
            self.verify_restore(rank, step, resp)
        self.result.faults[-1]["detect_to_restored_seconds"] = time.perf_counter() - t_kill
        # recompute: the replacements replay every step after the protected one (with what
        # that step recomputed, if anything)...
        for rank in ranks:
            for t in range(protected[rank].protected_step + 1, step):
                self.conns[rank].send(("step", t, self.rewrote.get(t, {}).get(rank, [])))
                self._expect_done(rank)
        # ...and every rank recomputes live tokens of unrecoverable blocks
        if unrecoverable:
            last = self.work.steps[step - 1]
            redo = [(rid, t, blocks[t // self.shape.block_size], t % self.shape.block_size)
                    for rid, (tokens, blocks) in last.tables.items() for t in range(tokens)
                    if blocks[t // self.shape.block_size] in unrecoverable]
            for rank in range(self.shape.ranks):
                self.recompute[rank] += redo
            for c in self.corruptions:
                if c.pending and c.block in unrecoverable:
                    c.settle("gone", f"block {c.block} was unrecoverable at step {step} for lost ranks "
                                     "alone and was recomputed on every rank")

    def _judge_restore(self, rank: int, step: int, lost: int, resp: pb.RestoreResponse) -> None:
        """Outcomes of the corruptions this restore checked, and whether each
        unrecoverable block was to be expected (``lost`` ranks failed together)."""
        m = self.shape.parity
        bad = set(resp.unrecoverable_blocks)
        corrupt_in = defaultdict(set)  # block -> survivors with a live corruption there
        for c in self.corruptions:
            if c.pending and c.rank != rank:
                corrupt_in[c.block].add(c.rank)
        for b in sorted(bad):
            n_bad = len(corrupt_in[b])
            expected = lost + n_bad > m
            why = f"{lost} rank(s) lost at step {step}" + (f" + {n_bad} corrupt survivor(s)" if n_bad else "")
            why += f" {'>' if expected else '<='} m={m}"
            self.result.unrecoverable_ranges.append({"rank": rank, "block": int(b), "step": step,
                                                     "expected": expected, "why": why})
        budget = resp.corrupt_chunks  # a corruption is only "detected" if the daemon counted it
        for c in self.corruptions:
            if not c.pending or c.rank == rank:
                continue
            by = f"restore of rank {rank} at step {step}"
            if self._corruption_fixed(c):
                c.settle("corrected", "the restore found the corrupt survivor and rebuilt its bytes", by)
                budget -= 1
            elif c.block in bad and budget > 0:
                c.settle("detected", f"found by the checksums; block {c.block} unrecoverable "
                                     f"({lost} lost + corrupt rank {c.rank} > m={m}) and recomputed", by)
                budget -= 1

    def verify_restore(self, rank: int, step: int, resp: pb.RestoreResponse) -> None:
        """Bytes below each request's watermark must equal the generator; bytes of
        unrecoverable blocks must be untouched (still zero in the fresh memory).
        Slots a step after the protected one recomputed are in flux (rewritten
        since): not restored, the replacement replays them."""
        marks = {w.request_id: w.tokens for w in resp.watermarks}
        bad = set(resp.unrecoverable_blocks)
        bs = self.shape.block_size
        flux = {(b, j) for t in range(resp.protected_step + 1, step)
                for _, _, b, j in self.rewrote.get(t, {}).get(rank, [])}
        slots = []
        for rid, (tokens, blocks) in self.work.steps[step - 1].tables.items():
            for t in range(min(tokens, marks.get(f"req{rid}", 0))):
                if blocks[t // bs] not in bad and (blocks[t // bs], t % bs) not in flux:
                    slots.append((rid, t, blocks[t // bs], t % bs))
        # live tokens in unrecoverable blocks: the fresh memory must hold zeros or,
        # where a chunk of the block was recoverable, the right bytes: never garbage
        lost = [(rid, t, blocks[t // bs], t % bs)
                for rid, (tokens, blocks) in self.work.steps[step - 1].tables.items()
                for t in range(tokens) if blocks[t // bs] in bad]
        kv = self.read_kv(rank)
        if slots:
            expected, actual = expected_and_actual(self.shape, kv, rank, slots)
            self.result.verified_bytes += expected.size
            self.result.mismatched_bytes += int((expected != actual).sum())
        if lost:
            expected, actual = expected_and_actual(self.shape, kv, rank, lost)
            self.result.garbage_bytes += int(((actual != 0) & (actual != expected)).sum())

    def final_scrub(self) -> None:
        """Check every protected byte against its checksum; repair the bad ranks;
        settle every corruption still pending."""
        scrub = self.op.scrub(self.group)
        self.result.corruption_detected += scrub.checksum_mismatches
        repaired: dict[int, pb.RestoreResponse] = {}
        for rank in scrub.bad_ranks:  # a checksum names the bad rank: restore repairs it
            resp = repaired[rank] = self.op.restore(self.group, rank)
            self.result.corruption_repaired += 0 if resp.unrecoverable_blocks else 1
        bad_blocks, bad_ranks = set(scrub.bad_blocks), set(scrub.bad_ranks)
        for c in self.corruptions:
            if not c.pending:
                continue
            if c.block in bad_blocks and c.rank in bad_ranks:
                if self._corruption_fixed(c):
                    c.settle("corrected", f"rank {c.rank} restored from the others and parity", "final scrub")
                else:
                    c.settle("detected", "found, but the repair could not rebuild it "
                             f"(unrecoverable blocks {list(repaired[c.rank].unrecoverable_blocks)})",
                             "final scrub")
            else:
                c.settle("undetected", f"block {c.block} was still protected data at the end, "
                                       "and the final scrub did not find the corruption")

    def final_check(self) -> None:
        last = self.work.steps[-1]
        bs = self.shape.block_size
        slots = [(rid, t, blocks[t // bs], t % bs)
                 for rid, (tokens, blocks) in last.tables.items() for t in range(tokens)]
        for rank in range(self.shape.ranks):
            kv = self.read_kv(rank)
            if slots:
                expected, actual = expected_and_actual(self.shape, kv, rank, slots)
                self.result.final_verified_bytes += expected.size
                self.result.final_mismatched_bytes += int((expected != actual).sum())

    # ---------------------------------------------------------------- run

    def _expect_done(self, rank: int) -> None:
        msg = self._recv(rank)
        if msg[0] != "done":
            raise ChaosError(f"worker {rank}: {msg[1] if msg[0] == 'error' else msg}")
        self.commit_seconds.append(msg[2])

    def _lag(self, step: int) -> None:
        """Protection lag after ``step``; a step waiting longer than ``stall_seconds`` fails the run."""
        g = self.op.status(self.group).groups
        if not g:
            return
        r = self.result
        done = g[0].protected_step + self.step_offset  # in workload steps
        r.max_lag_steps = max(r.max_lag_steps, step - done)
        r.max_lag_seconds = max(r.max_lag_seconds, g[0].lag_seconds)
        if g[0].lag_seconds > self.stall_seconds:
            raise ChaosError(f"protection stalled: after step {step} the daemon had protected only step "
                             f"{done}, and step {done + 1} had waited "
                             f"{g[0].lag_seconds:.1f} s (--stall-seconds {self.stall_seconds:g})")

    def run(self) -> ChaosResult:
        """Run the plan; never raises for what goes wrong in the run (see ``errors``)."""
        started = time.perf_counter()
        try:
            self._run()
        except GhostServeError as exc:
            self.result.errors.append(str(exc))
        except Exception as exc:  # a bug, or the daemon refused something: keep the result
            traceback.print_exc()
            self.result.errors.append(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            self.cleanup()
        r = self.result
        r.wall_seconds = time.perf_counter() - started
        if self.commit_seconds:
            us = sorted(s * 1e6 for s in self.commit_seconds)
            r.commit_us_median = statistics.median(us)
            r.commit_us_p99 = us[min(len(us) - 1, int(0.99 * len(us)))]
        self._verdict()
        if r.ok:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            r.errors.append(f"daemon log kept in {self.tmp}")
        return r

    def _verdict(self) -> None:
        r = self.result
        undetected = [f for f in r.faults if f.get("outcome") == "undetected"]
        unexpected = [u for u in r.unrecoverable_ranges if not u["expected"]]
        r.expected_unrecoverable = bool(r.unrecoverable_ranges) and not unexpected
        if r.unrecoverable_ranges:
            blocks = {(u["rank"], u["block"]) for u in r.unrecoverable_ranges}
            whys = sorted({u["why"] for u in r.unrecoverable_ranges})
            r.notes.append(f"{len(blocks)} unrecoverable block(s), "
                           + ("all expected: " if not unexpected else f"{len(unexpected)} NOT expected: ")
                           + "; ".join(whys))
        for f in r.faults:
            if f["kind"] == "corrupt":
                r.notes.append(f"corrupt {f['rank']}@{f['step']}: {f.get('outcome')}: {f.get('note', '')}")
        for f in undetected:
            r.errors.append(f"corruption {f['rank']}@{f['step']} (block {f['block']}) was not detected")
        for u in unexpected:
            r.errors.append(f"block {u['block']} of rank {u['rank']} unrecoverable at step {u['step']} "
                            f"although {u['why']}")
        r.ok = (not r.errors and r.mismatched_bytes == 0 and r.garbage_bytes == 0
                and r.final_mismatched_bytes == 0 and r.final_verified_bytes > 0)

    def _run(self) -> None:
        self.start_daemon()
        for rank in range(self.shape.ranks):
            self.start_worker(rank)
        for step in range(self.shape.steps):
            for rank in self.corrupts.get(step, []):
                self.corrupt(rank, step)
            if DaemonMoment.STEP in self.daemon_kills.get(step, ()):
                self.restart_daemon(DaemonMoment.STEP, step, "before the step's writes")
            if self.kills.get(step):
                self.fail_ranks(self.kills[step], step)
            self._step(step)
        self._finish()

    def _step(self, step: int) -> None:
        """Every worker writes and commits ``step`` (and what it recomputes); then the lag, and the pace."""
        t_step = time.perf_counter()
        for rank in range(self.shape.ranks):
            redo = self.recompute.pop(rank, [])
            if redo:
                self.rewrote[step][rank] = redo
            self.conns[rank].send(("step", step, redo))
        for rank in range(self.shape.ranks):
            self._expect_done(rank)
        self._after_step(step)
        self._lag(step)
        time.sleep(max(0.0, self.step_seconds - (time.perf_counter() - t_step)))
        if self.progress:
            self.progress(step + 1, self.shape.steps)

    def _finish(self) -> None:
        """After the last step: its protection, the final scrub, the figures, the final check."""
        if not self.wait_protected(self.shape.steps - 1):
            raise ChaosError("the last step was not protected within 60 s")
        self._lag(self.shape.steps - 1)
        self.final_scrub()
        g = self.op.status(self.group).groups[0]
        self.result.parity_bytes, self.result.kv_bytes = g.parity_bytes, g.protected_bytes
        self.result.parity_arena_bytes = g.parity_arena_bytes
        self.final_check()

    def quit_workers(self) -> None:
        """Every live worker says goodbye and exits (else is killed)."""
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

    def cleanup(self) -> None:
        self.quit_workers()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        for name in shm.list_names(self.prefix):
            shm.unlink(name)


def shape_from(args: Any) -> Shape:
    """The workload shape of parsed ``ghostserve chaos`` options."""
    return Shape(ranks=args.ranks, parity=args.parity, layers=args.layers, blocks=args.blocks,
                 block_size=args.block_size, heads=args.heads, head_dim=args.head_dim,
                 steps=args.steps, requests=args.requests, seed=args.seed)


def _fault_label(f: dict[str, Any]) -> str:
    if f["kind"] == "kill-daemon":
        return "kill daemon" + (f" at {f['moment']}" if f.get("moment", "step") != "step" else "")
    if f["kind"] == "kill-node":
        return f"kill node {f['node']}"
    return f"{f['kind']} rank {f['rank']}"


def _node_rows(n: NodeLoss) -> list[tuple[str, str]]:
    """The summary rows of a node-loss run."""
    lag = f"{n.mirror_lag_steps} step(s) behind protection" if n.mirrored_step >= 0 else "nothing mirrored yet"
    why = (f"{n.tail_blocks} tails (never a full block), {n.unmirrored_blocks} not off-node at the loss "
           f"({n.lookup_misses} request(s) not in the store at all; none under {n.mirror_min_tokens} tokens is), "
           f"{n.unrecoverable_blocks} unrecoverable")
    return [
        ("node loss", f"node {n.lost} lost before step {n.step}: its {n.requests} request(s) resumed on node "
                      f"{n.resumed_on}"),
        ("mirror at the loss", f"step {n.committed_step} committed, {n.protected_step} protected, "
                               f"{n.mirrored_step} mirrored off-node ({lag}); {n.remote_bytes:,} bytes in the store"),
        ("restored from", n.source or "[red]nothing[/]"),
        ("restored", f"{n.requests_restored} of {n.requests} request(s), {n.restored_blocks} of {n.blocks} "
                     f"blocks ({n.restored_tokens:,} tokens)"),
        ("to recompute", f"{n.recompute_blocks} blocks ({n.recompute_tokens:,} tokens): {why}"),
        ("resume (s)", f"{n.resume_seconds:.3f} (loss to every rank holding the store's blocks)"),
    ]


def render(result: ChaosResult, shape: Shape) -> list[Any]:
    """The result as rich tables: the verdict and figures, then one row per fault."""
    from rich.table import Table  # noqa: PLC0415

    r = result
    verdict = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
    nodes = ", 2 nodes" if r.node_loss is not None else ""
    summary = Table(title=f"ghostserve chaos: {shape.ranks}+{shape.parity}, {shape.steps} steps{nodes}: {verdict}")
    summary.add_column("what")
    summary.add_column("value", overflow="fold")
    unrec = "none"
    if r.unrecoverable_ranges:
        n = len({(u["rank"], u["block"]) for u in r.unrecoverable_ranges})
        unrec = f"{n} block(s), " + ("expected (more than m shards lost)" if r.expected_unrecoverable
                                     else "[red]NOT all expected[/]")
    rows = _node_rows(r.node_loss) if r.node_loss is not None else []
    rows += [
        ("restored bytes", f"{r.restored_bytes:,} ({r.verified_bytes:,} verified, {r.mismatched_bytes:,} "
                           f"mismatched, {r.garbage_bytes:,} garbage)"),
        ("final check", f"{r.final_verified_bytes:,} bytes verified, {r.final_mismatched_bytes:,} mismatched"),
        ("unrecoverable", unrec),
        ("corruption (daemon)", f"{r.corruption_detected} detected, {r.corruption_repaired} rank(s) repaired"),
        ("recovery (s)", ", ".join(f"{s:.3f}" for s in r.recovery_seconds) or "-"),
        ("failure seen after (ms)", ", ".join(f"{s * 1e3:.0f}" for s in r.detect_seconds) or "-"),
        ("parity / protected KV", f"{r.parity_bytes:,} / {r.kv_bytes:,} bytes (arena {r.parity_arena_bytes:,})"),
        ("max lag", f"{r.max_lag_steps} steps, {r.max_lag_seconds:.2f} s"),
        ("commit (us)", f"median {r.commit_us_median:.0f}, p99 {r.commit_us_p99:.0f}"),
        ("daemon restarts", str(r.daemon_restarts)),
        ("wall (s)", f"{r.wall_seconds:.1f}"),
    ]
    if r.node_loss is not None:  # no rank restores or daemon restarts: the node's rows say it all
        rows = [(k, v) for k, v in rows if k not in ("unrecoverable", "recovery (s)", "failure seen after (ms)",
                                                     "daemon restarts")]
        rows += [("[yellow]note[/]", note) for note in r.notes]
    for key, value in rows:
        summary.add_row(key, value)
    for e in r.errors:
        summary.add_row("[red]error[/]", e)
    faults = Table(title="faults")
    for col in ("step", "fault", "block", "outcome", "note"):
        faults.add_column(col, overflow="fold")
    lines = []  # (step, order, cells): a fault's unrecoverable blocks right after it
    for i, f in enumerate(r.faults):
        outcome = f.get("outcome", "")
        style = {"undetected": "red", "corrected": "green", "restored": "green", "detected": "yellow",
                 "partly restored": "yellow", "not restored": "red"}.get(outcome)
        lines.append((f["step"], i, (str(f["step"]), _fault_label(f), str(f.get("block", "")),
                                     f"[{style}]{outcome}[/]" if style else outcome,
                                     f.get("note", "") + (f" ({f['detected_by']})" if f.get("detected_by") else ""))))
    for u in r.unrecoverable_ranges:
        lines.append((u["step"], len(r.faults), (
            str(u["step"]), f"restore rank {u['rank']}", str(u["block"]),
            "unrecoverable" if u["expected"] else "[red]unrecoverable[/]",
            ("expected: " if u["expected"] else "NOT expected: ") + u["why"])))
    for _, _, cells in sorted(lines, key=lambda x: (x[0], x[1])):
        faults.add_row(*cells)
    return [summary, faults] if r.faults else [summary]


def run_cli(args: Any) -> int:
    """``ghostserve chaos``: check the options, run, print the tables (or one JSON
    object); exit status 0 if the run is ok."""
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress  # noqa: PLC0415

    check_args(args)
    shape = shape_from(args)
    kw = dict(socket=args.socket, shm_prefix=args.shm_prefix, metrics_port=args.metrics_port,
              recover_after=args.recover_after, step_seconds=args.step_ms / 1000, stall_seconds=args.stall_seconds,
              device=args.device)

    def make(progress: Any = None) -> Chaos:
        if args.nodes:
            from ghostserve.chaos.nodes import NodeChaos  # noqa: PLC0415

            return NodeChaos(shape, args.kill_node, nodes=args.nodes, progress=progress, **kw)
        return Chaos(shape, args.kill, args.kill_daemon, args.corrupt, progress=progress, **kw)

    if args.json:
        result = make().run()
        print(json.dumps(asdict(result)))
        return 0 if result.ok else 1
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("chaos", total=shape.steps)
        chaos = make(lambda done, total: progress.update(task, completed=done))
        result = chaos.run()
    console = Console()
    for table in render(result, chaos.shape):
        console.print(table)
    return 0 if result.ok else 1
