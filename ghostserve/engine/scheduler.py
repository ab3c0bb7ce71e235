"""Continuous batching for the reference engine: requests, blocks, step plans.

Each step decodes one token for every request past its prompt and fills the rest
of a token budget with prefill chunks (FIFO). A request's blocks are allocated
when it is admitted (prompt + every token it will generate, so nothing is ever
preempted) and go back to the pool one step after it finishes: the step that
carries the ``freed`` list to the daemon is dispatched before any reuse.

Planning is a pure function of the scheduler's state (admission aside, which
is idempotent), so a step that failed is planned again identically after
recovery; :meth:`Scheduler.accept` is the only thing that advances a step.

After a rank failure the engine rolls each running request back to the tokens
whose KV the ranks hold again (:meth:`Scheduler.roll_back`), runs one recovery
step that recomputes the rest (:meth:`Scheduler.recovery_segments`), and marks
it done (:meth:`Scheduler.recovered`). Not thread-safe: the engine's driver
thread is its only user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ghostserve.errors import SchedulerError


@dataclass
class Request:
    rid: str
    prompt: list[int]
    max_new: int
    arrival: float = 0               # when it arrives, in the clock passed to plan()
    tokens: list[int] = field(default_factory=list)   # prompt + generated
    kv_len: int = 0                  # positions whose KV the ranks hold
    table: list[int] = field(default_factory=list)
    done: bool = False
    admitted_step: int = -1
    finished_step: int = -1
    recover_to: int = 0              # after a failure: kv_len before it
    recomputed: int = 0              # tokens recomputed after failures, in all
    arrived_s: float = 0.0           # wall-clock marks set by the engine
    first_token_s: float = 0.0
    finished_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.prompt or self.max_new < 1:
            raise SchedulerError(f"request {self.rid}: needs a prompt and max_new >= 1")
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def prefilling(self) -> bool:
        return self.kv_len < len(self.prompt)


@dataclass
class Plan:
    """One step: (rid, tokens, start, sample) segments, and what it tells the daemon."""
    segments: list[tuple[str, list[int], int, bool]]
    freed: list[int]
    finished: list[str]
    admitted: list[str]

    @property
    def decode_only(self) -> bool:
        return all(len(s[1]) == 1 for s in self.segments)


class Scheduler:
    def __init__(self, blocks: int, block_tokens: int, step_tokens: int = 256, max_running: int = 8):
        if step_tokens < max_running:
            raise SchedulerError("step_tokens must be at least max_running (one decode token each)")
        self.block_tokens, self.step_tokens, self.max_running = block_tokens, step_tokens, max_running
        self.free = list(range(blocks))
        self.blocks = blocks
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.step = 0                   # steps accepted
        self._to_free: list[int] = []   # freed by the last accepted step; told to the daemon next
        self._finished_ids: list[str] = []

    def add(self, req: Request) -> None:
        if any(r.rid == req.rid for r in (*self.waiting, *self.running, *self.finished)):
            raise SchedulerError(f"request id {req.rid!r} is already in this run")
        need = -(-(len(req.prompt) + req.max_new) // self.block_tokens)
        if need > self.blocks:
            raise SchedulerError(f"request {req.rid} needs {need} blocks; the pool has {self.blocks}")
        self.waiting.append(req)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def has_releases(self) -> bool:
        """Blocks or requests finished by the last step that no step has told yet."""
        return bool(self._to_free or self._finished_ids)

    def plan(self, now: float | None = None) -> Plan:
        """The next step (admits requests with ``arrival <= now``, default the step
        count; allocation is idempotent)."""
        now = self.step if now is None else now
        admitted = []
        for req in sorted(self.waiting, key=lambda r: r.arrival):
            if req.arrival > now or len(self.running) >= self.max_running:
                break
            need = -(-(len(req.prompt) + req.max_new) // self.block_tokens)
            if need > len(self.free):
                break
            req.table, self.free = self.free[:need], self.free[need:]
            req.admitted_step = self.step
            self.waiting.remove(req)
            self.running.append(req)
            admitted.append(req.rid)
        segments = []
        budget = self.step_tokens
        for req in self.running:
            if not req.prefilling:
                segments.append((req.rid, [req.tokens[req.kv_len]], req.kv_len, True))
                budget -= 1
        for req in self.running:
            if req.prefilling and budget > 0:
                n = min(budget, len(req.prompt) - req.kv_len)
                segments.append((req.rid, req.prompt[req.kv_len:req.kv_len + n], req.kv_len,
                                 req.kv_len + n == len(req.prompt)))
                budget -= n
        return Plan(segments, list(self._to_free), list(self._finished_ids), admitted)

    def accept(self, plan: Plan, sampled: list[int | None]) -> list[Request]:
        """Apply a completed step's results; returns requests that finished in it."""
        by_id = {r.rid: r for r in self.running}
        for (rid, toks, start, sample), tok in zip(plan.segments, sampled, strict=True):
            req = by_id[rid]
            req.kv_len = start + len(toks)
            if sample:
                req.tokens.append(int(tok))
        self.free = sorted(self.free + plan.freed)  # the daemon has been told: reusable now
        self._to_free, self._finished_ids = [], []
        done = []
        for req in list(self.running):
            if len(req.generated) >= req.max_new:
                req.done, req.finished_step = True, self.step
                self.running.remove(req)
                self.finished.append(req)
                self._to_free += req.table
                self._finished_ids.append(req.rid)
                done.append(req)
        self.step += 1
        return done

    def tick(self) -> None:
        """A step with nothing to run (waiting for an arrival)."""
        self.step += 1

    def lens(self) -> dict[str, int]:
        return {r.rid: r.kv_len for r in self.running}

    def lens_after(self, plan: Plan) -> dict[str, int]:
        """Tokens of every running request valid on all ranks once ``plan`` ran."""
        out = self.lens()
        for rid, toks, start, _ in plan.segments:
            out[rid] = start + len(toks)
        return out

    @property
    def next_arrival(self) -> float | None:
        return min((r.arrival for r in self.waiting), default=None)

    # ---------------------------------------------------------------- recovery

    def roll_back(self, points: dict[str, int]) -> int:
        """A failure: request ``rid``'s KV is valid on every rank for its first
        ``points[rid]`` tokens (absent: none). Returns the tokens to recompute."""
        total = 0
        for req in self.running:
            req.recover_to = max(req.recover_to, req.kv_len)
            req.kv_len = min(req.kv_len, max(points.get(req.rid, 0), 0))
            total += req.recover_to - req.kv_len
        return total

    def recovery_segments(self) -> list[tuple[str, list[int], int, bool]]:
        """One step recomputing every rolled-back request up to where it was
        (nothing is sampled: those tokens are known)."""
        return [(r.rid, r.tokens[r.kv_len:r.recover_to], r.kv_len, False)
                for r in self.running if r.kv_len < r.recover_to]

    def recovered(self) -> None:
        for req in self.running:
            if req.kv_len < req.recover_to:
                req.recomputed += req.recover_to - req.kv_len
                req.kv_len = req.recover_to
            req.recover_to = 0
