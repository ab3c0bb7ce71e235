"""The request index of one group, crash-consistent in shared memory.

What a restore or a resume needs to know about requests, kept beside the
group's parity so that a daemon SIGKILLed and restarted between an engine's
death and its resume still answers ``Lookup`` for it:

* ``watermarks``: request -> tokens whose KV is protected;
* ``records``: request -> (tokens, blocks), appended by ``Commit.records``
  (slot-addressed groups: what ``Lookup`` matches a prompt against);
* ``forgotten``: request -> the step of its ``Release``; news of the request
  from older steps is void;
* ``unprotected``: requests a failed step wrote; their watermark stays 0 until
  they finish or are released (their voided chunks are never re-encoded);
* ``index_step``: the newest step whose news was applied, so a step resent
  after a daemon restart is not applied twice.

Storage: one SQLite database on ``/dev/shm`` (``{prefix}{group}.index``, in
WAL mode with exclusive locking, so besides it only ``...index-wal`` exists).
Each step's news is one transaction, so a crash leaves either all of it or
none; ``synchronous=OFF`` because only a process crash is in the fault model
(the pages of a tmpfs file outlive the process, not the machine). The
in-memory copy serves reads; every change goes to both.

Threads: the group's encoder thread and the RPC threads of ``Release`` call
:meth:`apply`, serialised by the stripes' ``io`` lock; readers hold the group's
``lock``. The connection is shared across those threads (``check_same_thread``
off), never used by two at once.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field

import numpy as np

from ghostserve import shm

SHM_DIR = "/dev/shm"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS watermarks (request TEXT PRIMARY KEY, tokens INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (request TEXT NOT NULL, seq INTEGER NOT NULL,
    tokens BLOB NOT NULL, blocks BLOB NOT NULL, PRIMARY KEY (request, seq));
CREATE TABLE IF NOT EXISTS forgotten (request TEXT PRIMARY KEY, step INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS unprotected (request TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class Record:
    """What one step appended to a request (``Commit.records``)."""

    request: str
    tokens: list[int]
    blocks: list[int]
    reset: bool = False      # forget earlier records first (a preempted request restarts)


@dataclass
class StepNews:
    """Every change one step (or one ``Release``) makes to the index."""

    step: int | None  # None: a Release (applied whenever it comes, names no step)
    watermarks: dict[str, int] = field(default_factory=dict)   # new values; 0 drops the request
    records: list[Record] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)            # requests that ended: dropped
    forget: dict[str, int] = field(default_factory=dict)       # request -> release step
    unprotect: set[str] = field(default_factory=set)
    prune_before: int | None = None  # drop forgotten entries older than this step


def index_names(prefix: str, group: str) -> list[str]:
    """The shared-memory files of a group's index (the database and its WAL)."""
    base = f"{prefix}{group}.index"
    return [base, base + "-wal", base + "-shm", base + "-journal"]


class RequestIndex:
    """The durable request index of one group. Open with :meth:`open` (creates it)."""

    def __init__(self, path: str, conn: sqlite3.Connection):
        self.path, self._db = path, conn
        self.watermarks: dict[str, int] = dict(conn.execute("SELECT request, tokens FROM watermarks"))
        self.forgotten: dict[str, int] = dict(conn.execute("SELECT request, step FROM forgotten"))
        self.unprotected: set[str] = {r for (r,) in conn.execute("SELECT request FROM unprotected")}
        row = conn.execute("SELECT value FROM meta WHERE key = 'index_step'").fetchone()
        self.index_step: int = row[0] if row else -1
        self.requests: dict[str, tuple[list[int], list[int]]] = {}
        self._seq: dict[str, int] = {}
        for req, seq, tokens, blocks in conn.execute(
                "SELECT request, seq, tokens, blocks FROM records ORDER BY request, seq"):
            have = self.requests.setdefault(req, ([], []))
            have[0].extend(np.frombuffer(tokens, dtype="<u4").tolist())
            have[1].extend(np.frombuffer(blocks, dtype="<u4").tolist())
            self._seq[req] = seq

    @classmethod
    def open(cls, prefix: str, group: str, create: bool = False) -> RequestIndex:
        """Open the group's index (``create``: start an empty one, replacing leftovers).
        Raises ``sqlite3.DatabaseError`` if it is unreadable."""
        name = index_names(prefix, group)[0]
        shm.check_name(name)
        path = os.path.join(SHM_DIR, name)
        if create:
            destroy(prefix, group)
        elif not os.path.exists(path):
            raise FileNotFoundError(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            os.chmod(path, 0o600)
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")
            conn.executescript(_SCHEMA)
            return cls(path, conn)
        except BaseException:
            conn.close()
            raise

    # ---------------------------------------------------------------- writes

    def apply(self, news: StepNews) -> dict[str, int]:
        """Apply one step's news in one transaction; returns the watermarks that
        changed (0: dropped). News of a step already applied (resent after a
        daemon restart) is ignored. Raises ``sqlite3.Error`` (then nothing
        changed, in memory or on disk)."""
        if news.step is not None and news.step <= self.index_step:
            return {}
        db = self._db
        blocked = self.unprotected | news.unprotect
        marks = {r: t for r, t in news.watermarks.items()
                 if self.watermarks.get(r, 0) != t and not (t and r in blocked)}
        gone = news.finished | set(news.forget)
        for r in news.unprotect | gone:
            if self.watermarks.get(r, 0):
                marks[r] = 0
            elif r in marks:
                del marks[r]
        records = news.records
        seq = dict(self._seq)
        try:
            db.execute("BEGIN IMMEDIATE")
            for r, t in marks.items():
                if t:
                    db.execute("INSERT OR REPLACE INTO watermarks VALUES (?, ?)", (r, t))
                else:
                    db.execute("DELETE FROM watermarks WHERE request = ?", (r,))
            for rec in records:
                if rec.reset:
                    db.execute("DELETE FROM records WHERE request = ?", (rec.request,))
                    seq[rec.request] = -1
                elif rec.request not in seq:
                    continue
                seq[rec.request] += 1
                db.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (
                    rec.request, seq[rec.request], np.asarray(rec.tokens, dtype="<u4").tobytes(),
                    np.asarray(rec.blocks, dtype="<u4").tobytes()))
            for r in news.unprotect - gone:
                db.execute("INSERT OR IGNORE INTO unprotected VALUES (?)", (r,))
            for r in gone:
                db.execute("DELETE FROM records WHERE request = ?", (r,))
                db.execute("DELETE FROM unprotected WHERE request = ?", (r,))
            for r, step in news.forget.items():
                db.execute("INSERT INTO forgotten VALUES (?, ?) ON CONFLICT(request) "
                           "DO UPDATE SET step = max(step, excluded.step)", (r, step))
            if news.prune_before is not None:
                db.execute("DELETE FROM forgotten WHERE step < ?", (news.prune_before,))
            if news.step is not None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('index_step', ?)", (news.step,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # the transaction is in: mirror it in memory
        for r, t in marks.items():
            if t:
                self.watermarks[r] = t
            else:
                self.watermarks.pop(r, None)
        for rec in records:
            if rec.reset:
                self.requests[rec.request] = ([], [])
            elif rec.request not in self.requests:
                continue  # its start was never seen (a restarted daemon before this index): unusable
            have = self.requests[rec.request]
            have[0].extend(rec.tokens)
            have[1].extend(rec.blocks)
        self._seq = seq
        self.unprotected |= news.unprotect - gone
        for r in gone:
            self.requests.pop(r, None)
            self._seq.pop(r, None)
            self.unprotected.discard(r)
        for r, step in news.forget.items():
            self.forgotten[r] = max(step, self.forgotten.get(r, step))
        if news.prune_before is not None:
            self.forgotten = {r: s for r, s in self.forgotten.items() if s >= news.prune_before}
        if news.step is not None:
            self.index_step = news.step
        return marks

    def unprotect_in_memory(self, requests: set[str]) -> dict[str, int]:
        """When :meth:`apply` itself fails: stop claiming ``requests`` in this
        process at least (the durable copy could not be changed)."""
        marks = {r: 0 for r in requests if self.watermarks.pop(r, 0)}
        self.unprotected |= requests
        return marks

    # ---------------------------------------------------------------- reads

    def void(self, request: str, step: int) -> bool:
        """Is news of ``request`` from ``step`` older than its release?"""
        return step < self.forgotten.get(request, -1)

    def match(self, tokens: np.ndarray, block_slots: int) -> tuple[str, int, list[int]] | None:
        """The request whose protected KV covers the longest prefix of ``tokens``:
        (request, tokens covered, its blocks for them), or None. Capped at the
        request's watermark and at what its blocks hold."""
        best: tuple[str, int, list[int]] | None = None
        for req, (have, blocks) in self.requests.items():
            n = min(len(have), len(tokens), self.watermarks.get(req, 0), len(blocks) * block_slots)
            if n <= 0:
                continue
            eq = np.asarray(have[:n], dtype=np.uint32) == tokens[:n]
            n = n if eq.all() else int(np.argmin(eq))
            if n > 0 and (best is None or n > best[1]):
                best = (req, n, blocks[: -(-n // block_slots)])
        return best

    def nbytes(self) -> int:
        """Bytes of shared memory the index files take."""
        total = 0
        for path in (self.path, self.path + "-wal"):
            try:
                total += os.stat(path).st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def close(self) -> None:
        self._db.close()


def destroy(prefix: str, group: str) -> None:
    """Remove a group's index files (those that exist)."""
    for name in index_names(prefix, group):
        shm.unlink(name)

