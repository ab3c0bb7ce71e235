"""How a rank protects its KV against its own death: the three modes compared.

- ``none``: nothing; after a failure the engine re-prefills every request the
  failure touched (recompute).
- ``replicate``: DejaVu-style. A copier thread copies every byte range a step
  wrote into a host replica (shared memory owned by the engine driver, so it
  outlives the rank) and then publishes the step in the replica's header. A
  replacement copies the replica back. Host memory: all of the KV.
- ``ec``: ghostserve. The rank commits each step's byte ranges to the daemon,
  which encodes m parity shards per stripe; a replacement asks the daemon to
  rebuild its KV from the survivors and parity. Host memory: m/N of the KV.

Every method runs on the rank's step thread (the replicate copier is the only
other thread and touches only the replica). ``commit`` never waits for the
protection to finish: that is what "in the shadow of decoding" means.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.client import WorkerClient
from ghostserve.engine.paged import PagedKV
from ghostserve.errors import DaemonUnavailable, DuplicateRank, GhostServeError, ProtectionError

MODES = ("none", "replicate", "ec")
REPLICA_HEADER = 64  # int64 replicated step at byte 0


class Protection:
    """Mode ``none``; the base of the others."""

    name = "none"

    def __init__(self, kv: PagedKV):
        self.kv = kv

    def commit(self, step: int, dirty: Sequence[tuple[int, int, int]], lens: Mapping[str, int],
               freed: Iterable[int] = (), finished: Iterable[str] = ()) -> None:
        """Step ``step`` wrote ``dirty`` (block, start, end) in every layer; ``lens``
        are the tokens of every live request valid on all ranks after it."""

    def restore(self, live: Mapping[str, tuple[Sequence[int], int]]) -> dict[str, Any]:
        """On a replacement: bring back what the mode kept. ``live`` maps each live
        request to (block table, tokens to bring back, or -1 for "as many as the
        mode has"). Returns ``points`` (request -> tokens now valid here) and figures."""
        return {"points": {rid: 0 for rid in live}, "restored_bytes": 0, "unrecoverable_blocks": []}

    def close(self) -> None:
        pass


class Replicate(Protection):
    """Copies every written range to a host replica on a background thread."""

    name = "replicate"

    def __init__(self, kv: PagedKV, replica: str):
        super().__init__(kv)
        sh = kv.shape
        self.seg = shm.Segment.attach(replica, REPLICA_HEADER + sh.region_bytes)
        self.step = self.seg.array(np.int64, 0, 1)
        body = self.seg.array(np.uint8, REPLICA_HEADER, sh.region_bytes)
        self.replica = body.reshape(sh.layers, sh.blocks, sh.block_bytes)
        self.live = kv.bytes.reshape(sh.layers, sh.blocks, sh.block_bytes)
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._copy, name="gs-replicate", daemon=True)
        self.thread.start()

    def commit(self, step, dirty, lens, freed=(), finished=()):
        self.q.put((step, list(dirty)))

    def _copy(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            step, dirty = item
            for b, s, e in dirty:
                self.replica[:, b, s:e] = self.live[:, b, s:e]
            self.step[0] = step  # after the bytes: a reader never sees a step claimed early

    def restore(self, live):
        """``live`` gives each request's tokens to copy back (the driver read them
        off the replica's step); whole blocks are copied."""
        t = time.perf_counter()
        nbytes = 0
        bt = self.kv.shape.block_tokens
        for table, tokens in live.values():
            for b in table[: -(-max(tokens, 0) // bt)]:
                self.live[:, b] = self.replica[:, b]
                nbytes += self.live[:, b].nbytes
        return {"points": {rid: max(tok, 0) for rid, (_, tok) in live.items()}, "restored_bytes": nbytes,
                "unrecoverable_blocks": [], "seconds": time.perf_counter() - t}

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=10)
        del self.step, self.replica, self.live
        self.seg.close()


class ErasureCoded(Protection):
    """Commits to the ghostserve daemon; a replacement restores from it."""

    name = "ec"

    def __init__(self, kv: PagedKV, socket: str, group: str, rank: int, tp: int, parity: int,
                 register_timeout: float = 20.0):
        super().__init__(kv)
        self.client = WorkerClient(socket, group, rank, tp, parity, kv.shape.layout(), kv.seg.name,
                                   kv.shape.region_bytes)
        deadline = time.monotonic() + register_timeout
        while True:
            try:
                resp = self.client.register(wait=max(0.0, deadline - time.monotonic()))
                break
            except DaemonUnavailable as exc:  # waited register_timeout for it
                raise ProtectionError(f"rank {rank}: {exc}") from None
            except DuplicateRank as exc:
                # the old worker's pid may outlive its SIGKILL for a moment: the daemon
                # answers ALREADY_EXISTS until it is gone
                if time.monotonic() > deadline:
                    raise ProtectionError(f"rank {rank}: the daemon refused registration: {exc}") from None
                time.sleep(0.02)
            except GhostServeError as exc:
                raise ProtectionError(f"rank {rank}: the daemon refused registration: {exc.code}: {exc}") from None
        self.role = self.client.role
        self.last = resp.next_step - 1

    def commit(self, step, dirty, lens, freed=(), finished=()):
        # A replacement, or a survivor whose last step failed, is behind the
        # group's step count: empty commits (with what it holds) catch it up.
        for t in range(self.last + 1, step):
            self.client.commit(t, (), lens)
        self.client.commit(step, dirty, lens, freed, finished)
        self.last = step

    def restore(self, live):
        t = time.perf_counter()
        try:
            resp = self.client.restore()
        except GhostServeError as exc:
            raise ProtectionError(f"restore refused: {exc.code}: {exc}") from None
        self.last = resp.protected_step
        marks = {w.request_id: w.tokens for w in resp.watermarks}
        bt, ct = self.kv.shape.block_tokens, self.kv.shape.chunk_tokens
        lost = set(resp.unrecoverable_blocks)
        points = {}
        for rid, (table, _) in live.items():
            # a chunk re-encoded after the protected step was not rebuilt: start
            # at its first token (a no-op with one-token chunks)
            w = marks.get(rid, 0) // ct * ct
            for i, b in enumerate(table):
                if b in lost and i * bt < w:
                    w = i * bt
                    break
            points[rid] = w
        return {"points": points, "restored_bytes": resp.restored_bytes,
                "unrecoverable_blocks": sorted(lost), "corrupt_chunks": resp.corrupt_chunks,
                "protected_step": resp.protected_step, "daemon_seconds": resp.seconds,
                "seconds": time.perf_counter() - t}

    def close(self) -> None:
        """The rank shuts down cleanly: a goodbye, so the daemon drops the group's
        parity once every rank has left (the driver owns and unlinks the KV)."""
        self.client.goodbye()
