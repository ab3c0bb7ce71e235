"""One TP rank of the reference engine: a process the driver starts, commands over
a pipe, and SIGKILLs in fault runs.

The rank owns its model shard and its paged KV pool in shared memory, joins the
TP group (gloo) when told to, and runs steps: forward, then hand the written
byte ranges to its protection mode. A rank started without a spec is a hot
spare: it has paid for the interpreter and torch import and waits for
``("become", spec)`` before loading its shard. Commands (tuples) and replies:

- ``("become", spec)`` -> ``("up", pid, seconds, role)`` (a spare taking a rank);
- ``("reform", port)`` -> ``("reformed",)``: (re)join the group on a new port;
- ``("step", step, segments, tables, lens, freed, finished, pause)`` ->
  ``("done", step, tokens or None, forward_s, commit_s)``, or ``("failed", step, why)``
  when a peer died under a collective (the group must be re-formed). ``pause``
  (``"mid"``: after the middle layer's KV write; ``"post"``: after the forward,
  before the commit) makes the rank answer ``("paused", step)`` there and wait
  for the SIGKILL that the driver sends next;
- ``("restore", live)`` -> ``("restored", info)`` on a replacement;
- ``("kv", seq, table, upto)`` -> ``("kv", bytes)``: a copy of a sequence's KV (tests);
- ``("quit",)`` -> ``("bye",)``.
Anything unexpected is answered ``("error", traceback)``.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ghostserve import shm
from ghostserve.engine.model import ModelConfig, Segment, TPModel, init_weights, load_weights, shard
from ghostserve.engine.paged import KVShape, PagedKV
from ghostserve.engine.protect import ErasureCoded, Protection, Replicate

PAUSES = ("mid", "post")


@dataclass(frozen=True)
class RankSpec:
    rank: int
    tp: int
    model: str              # ModelConfig as JSON
    seed: int
    weights_dir: str        # "" for seeded random weights
    shape: KVShape
    region: str             # shared-memory name of this rank's KV pool
    mode: str               # none | replicate | ec
    socket: str = ""        # ec: the daemon
    group: str = ""         # ec: the daemon's group
    parity: int = 1
    replica: str = ""       # replicate: the host replica segment
    collective_timeout: float = 60.0


def _protection(spec: RankSpec, kv: PagedKV) -> Protection:
    if spec.mode == "ec":
        return ErasureCoded(kv, spec.socket, spec.group, spec.rank, spec.tp, spec.parity)
    if spec.mode == "replicate":
        return Replicate(kv, spec.replica)
    return Protection(kv)


class _Rank:
    def __init__(self, conn: Connection, spec: RankSpec):
        self.conn, self.spec = conn, spec
        cfg = ModelConfig.from_json(spec.model)
        full = load_weights(spec.weights_dir, cfg) if spec.weights_dir else init_weights(cfg, spec.seed)
        self.model = TPModel(cfg, shard(full, cfg, spec.rank, spec.tp), spec.rank, spec.tp, _all_reduce)
        del full
        self.seg = shm.Segment.create(spec.region, spec.shape.region_bytes)
        self.kv = PagedKV(self.seg, spec.shape)
        self.protection = _protection(spec, self.kv)
        self.pause_layer = cfg.layers // 2

    def step(self, step, segments, tables, lens, freed, finished, pause):
        """segments: (seq, tokens, start, sample) tuples."""
        kv, spec = self.kv, self.spec
        kv.bind(tables)

        def at_layer(layer: int) -> None:
            if pause == "mid" and layer == self.pause_layer:
                self._await_kill(step)

        t = time.perf_counter()
        if not segments:  # only tells the daemon about freed blocks
            self.protection.commit(step, (), lens, freed, finished)
            return ("done", step, [], 0.0, time.perf_counter() - t)
        try:
            logits = self.model.forward_batch([Segment(s, tok, st) for s, tok, st, _ in segments], kv,
                                              after_kv_write=at_layer)
        except RuntimeError as exc:  # gloo: a peer died under a collective
            if "gloo" not in str(exc).lower() and "connection" not in str(exc).lower():
                raise
            # Close our sockets now: a survivor waiting on *us* (not on the dead
            # rank) would otherwise sit out the whole collective timeout.
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass  # already torn down by gloo: the reform starts a new one either way
            return ("failed", step, str(exc).splitlines()[0][:200])
        forward_s = time.perf_counter() - t
        tokens = None
        if spec.rank == 0:
            picks = logits.argmax(-1).tolist()
            tokens = [p if segments[i][3] else None for i, p in enumerate(picks)]
        if pause == "post":
            self._await_kill(step)
        dirty = spec.shape.dirty((tables[s], st, len(tok)) for s, tok, st, _ in segments)
        t = time.perf_counter()
        self.protection.commit(step, dirty, lens, freed, finished)
        return ("done", step, tokens, forward_s, time.perf_counter() - t)

    def _await_kill(self, step: int) -> None:
        self.conn.send(("paused", step))
        self.conn.recv()  # the driver answers with SIGKILL
        raise RuntimeError("fault injection: resumed instead of killed")

    def reform(self, port: int) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=self.spec.rank,
                                world_size=self.spec.tp,
                                timeout=datetime.timedelta(seconds=self.spec.collective_timeout))

    def close(self) -> None:
        self.protection.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        del self.kv
        self.seg.close()


def main(conn: Connection, spec: RankSpec | None) -> None:
    """The rank process. ``spec`` None: a hot spare, waiting for ``("become", spec)``."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t0 = time.perf_counter()
    if spec is None:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] != "become":
            conn.send(("error", f"a spare expects 'become', not {msg[0]!r}"))
            return
        t0, spec = time.perf_counter(), msg[1]
    try:
        rank = _Rank(conn, spec)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("up", os.getpid(), time.perf_counter() - t0, getattr(rank.protection, "role", "")))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        cmd = msg[0]
        try:
            if cmd == "step":
                conn.send(rank.step(*msg[1:]))
            elif cmd == "reform":
                rank.reform(msg[1])
                conn.send(("reformed",))
            elif cmd == "restore":
                conn.send(("restored", rank.protection.restore(msg[1])))
            elif cmd == "kv":
                rank.kv.bind({msg[1]: msg[2]})
                conn.send(("kv", rank.kv.token_bytes_of(msg[1], msg[3]).tobytes()))
            elif cmd == "quit":
                rank.close()
                conn.send(("bye",))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t
