"""One client generation request served by the front, across engine failures.

:class:`Job` sends the request upstream (always streamed, with token ids),
turns what comes back into the client's response (:mod:`ghostserve.front.output`,
:mod:`ghostserve.front.text`), and when the engine fails under it, waits for the
upstream to come back, or moves to another healthy one at once, and sends the
continuation there (:mod:`ghostserve.front.resume`).
A request the front cannot continue faithfully ends with an error instead.

Contract with the app: :meth:`Job.run` writes a streaming response through the
sink as it goes and returns None, or returns a :class:`Reply` the app sends as a
whole (a non-streaming response, or any error before the stream started).
Cancellation (a client that went away) propagates; leaving the upstream
request's context closes its connection, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ghostserve.errors import ResumeFailed, ResumeRefused, UpstreamFailure, UpstreamRejected
from ghostserve.front import resume
from ghostserve.front.boundary import Boundary, Repair
from ghostserve.front.config import FrontConfig
from ghostserve.front.metrics import FrontMetrics
from ghostserve.front.output import Logprobs, Shape
from ghostserve.front.sse import DONE, error_event, error_object, event
from ghostserve.front.text import TextStream
from ghostserve.front.tracker import Ticket
from ghostserve.front.upstream import Upstream, Upstreams

log = logging.getLogger("ghostserve.front")


class Sink(Protocol):
    """Where a streamed response goes; ``started`` once its headers were sent."""

    started: bool

    async def send(self, data: bytes) -> None: ...


@dataclass
class Reply:
    """A whole response: ``status``, a JSON ``body`` (or raw bytes), extra headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


class Job:
    """One request to ``path`` (completions or chat) with JSON ``body``."""

    def __init__(self, path: str, body: dict[str, Any], headers: dict[str, str], config: FrontConfig,
                 upstreams: Upstreams, metrics: FrontMetrics, ticket: Ticket, sink: Sink | None):
        self.path, self.body, self.headers = path, body, headers
        self.config, self.upstreams, self.metrics, self.ticket = config, upstreams, metrics, ticket
        self.at: Upstream = upstreams.members[0]  # where the current submission goes
        self._how = "restarted"               # how the last resume went on (the resume_seconds label)
        self.sink = sink                      # None: the client did not ask for a stream
        self.chat = path == resume.CHAT
        self.want_usage = bool((body.get("stream_options") or {}).get("include_usage")) if sink else True
        self.shape = Shape(chat=self.chat, want_ids=bool(body.get("return_token_ids")))
        stops = resume.stop_strings(body)
        self.text = TextStream(stops, bool(body.get("include_stop_str_in_output")), int(body.get("min_tokens") or 0),
                               forced_include=bool(stops) and not body.get("include_stop_str_in_output"))
        self.logprobs = Logprobs()
        self.boundary = Boundary()
        self.repair: Repair | None = None     # a continuation whose first text the front rebuilds
        self.again = False                    # resubmit at once: the upstream stopped on text it misdecoded
        self.refused: str | None = None       # why this request cannot go on faithfully (found mid-stream)
        self.prompt_ids: list[int] | None = None
        self.tokens: list[int] = []
        self.extra: dict[str, Any] = {}       # chat delta fields other than content, accumulated
        self.unresumable = resume.refusal(path, body, config.upstream_parses_chat)
        self.finish: tuple[str, Any] | None = None
        self.usage: dict[str, Any] | None = None  # the upstream's, for a request never resumed
        self.prompt_details: dict[str, Any] | None = None
        self.resumes: list[dict[str, Any]] = []
        self.sent_role = False
        self.sent_prompt_ids = False
        self.last_out = time.monotonic()      # the client's last output (for the gap of a resume)
        self._gap_from: float | None = None  # set while an outage lasts: the client's last output
        self._deadline = 0.0
        self.cut = False

    # ------------------------------------------------------------------ running

    async def run(self) -> Reply | None:
        submissions, tries = 0, 0
        loop = asyncio.get_running_loop()
        upstream = self.upstreams.pick()
        if upstream is None:
            return self._down(UpstreamFailure("no upstream is up", accepted=False))
        while True:
            self.at = upstream
            generation = upstream.generation
            if not self.tokens:
                path, body = self.path, resume.first_submission(self.path, self.body)
            else:
                path, body = resume.COMPLETIONS, await self._continuation()
            self.ticket.attempt(generation)
            submissions += 1
            try:
                with upstream.submitted():
                    async with contextlib.aclosing(upstream.events(path, body, self.headers)) as events:
                        async for obj in events:
                            await self._absorb(obj, generation, continuation=submissions > 1)
                            if self.cut or self.again or self.refused:
                                break  # the front ended it (a stop string across the resume), or goes on elsewhere
                if self.refused:
                    return await self._fail("unresumable", str(ResumeRefused(self.refused)))
                if self.again:
                    self.again = False
                    self.text.resumed()
                    self.logprobs.resumed()
                    continue
                return await self._done()
            except UpstreamRejected as exc:
                return await self._rejected(exc, continuation=submissions > 1)
            except UpstreamFailure as exc:
                if self.finish is not None:  # everything was generated; only the usage chunk was lost
                    return await self._done()
                if submissions == 1 and not exc.accepted:
                    # never reached an engine: another upstream may take it, else 503
                    tries += 1
                    other = self.upstreams.pick(avoid=upstream)
                    if other is None or tries >= len(self.upstreams.members):
                        return self._down(exc)
                    submissions, upstream = 0, other
                    continue
                log.warning("front: upstream %s failed under %s after %d tokens: %s", upstream.name,
                            self.shape.id or "a request", len(self.tokens), exc.reason)
                if self.tokens and self.prompt_ids is None:
                    self.unresumable = self.unresumable or "the upstream did not report the prompt's token ids"
                if self.unresumable:
                    return await self._fail("unresumable", str(ResumeRefused(self.unresumable)))
                if len(self.resumes) >= self.config.max_moves:
                    return await self._fail("resume_limit", str(ResumeFailed(
                        "resume_limit", f"the engine failed {len(self.resumes) + 1} times under this request "
                        f"(--max-moves {self.config.max_moves})")))
                if self._gap_from is None:  # a new outage (not a resubmission that failed again)
                    self._gap_from = self.last_out
                    self._deadline = loop.time() + self.config.resume_wait
                seen = time.monotonic()
                nxt = await self.upstreams.next_after(upstream, generation, max(0.0, self._deadline - loop.time()))
                if nxt is None:
                    if self.upstreams.closed:
                        return await self._fail("shutdown", "the server is stopping (or gave up restarting "
                                                "the engine): the request cannot be resumed")
                    return await self._fail("resume_timeout", str(ResumeFailed(
                        "resume_timeout", f"no upstream came back within {self.config.resume_wait:g} s")))
                self._how = "restarted" if nxt is upstream else "moved"
                if nxt is not upstream:
                    self.metrics.moves_out.labels(upstream.name).inc()
                    self.metrics.moves_in.labels(nxt.name).inc()
                # seen / resubmitted: seconds from the client's last output to the failure
                # seen, and to the resubmission (the parts of gap_seconds); seen_at: this
                # host's CLOCK_MONOTONIC then (to line it up with a fault injected on the host)
                self.resumes.append({"after_tokens": len(self.tokens), "failure": exc.reason,
                                     "from": upstream.name, "to": nxt.name, "seen_at": round(seen, 4),
                                     "seen_seconds": round(seen - self._gap_from, 4),
                                     "resubmitted_seconds": round(time.monotonic() - self._gap_from, 4)})
                upstream = nxt
                if self.tokens:
                    self.text.resumed()
                    self.logprobs.resumed()
                    self.repair = self.boundary.resumed(self.prompt_ids or [], self.tokens)

    async def _continuation(self) -> dict[str, Any]:
        model_len = None
        if self.chat and self.body.get("max_tokens") is None and self.body.get("max_completion_tokens") is None:
            model_len = await self.at.max_model_len(self.headers)  # a chat's default is the rest of it
        return resume.continuation(self.path, self.body, self.prompt_ids or [], self.tokens, model_len)

    # ------------------------------------------------------------------ events

    async def _absorb(self, obj: dict[str, Any], generation: int, continuation: bool) -> None:
        self.shape.adopt(obj)
        choices = obj.get("choices") or []
        if not choices:
            self._usage(obj.get("usage"), continuation)
            return
        choice = choices[0]
        if self.prompt_ids is None:
            ids = obj.get("prompt_token_ids") if self.chat else choice.get("prompt_token_ids")
            if ids is not None:
                self.prompt_ids = list(ids)
        if self.chat and not self.sent_role:
            self.sent_role = True
            await self._emit(self.shape.role_chunk(self.prompt_ids))
        if "delta" in choice:
            delta = dict(choice.get("delta") or {})
            text = delta.pop("content", None) or ""
            delta.pop("role", None)
            extra = {k: v for k, v in delta.items() if v not in (None, [], "")}
        else:
            text, extra = choice.get("text") or "", {}
        if extra:  # reasoning or tool calls: parsed from the text by the upstream, so not resumable
            self.unresumable = self.unresumable or f"the output carries {sorted(extra)[0]!r}"
            for k, v in extra.items():
                self.extra[k] = self.extra.get(k, "") + v if isinstance(v, str) else v
        new = list(choice.get("token_ids") or [])
        if new:
            self.ticket.ran_on(generation)
        lp = self.logprobs.add(choice.get("logprobs")) if not self.chat else None
        fr, sr = choice.get("finish_reason"), choice.get("stop_reason")
        if self.text.finished:
            return
        if self.repair is not None:
            self.repair.new += new
            if text:
                text, fr, sr = await self._repaired(text, fr, sr)
                if self.refused:
                    return
        self.tokens += new
        self.boundary.sent(len(self.tokens), text)
        delta = self.text.add(text, len(new), fr, sr)
        if delta.finish_reason is not None:
            self.finish = (delta.finish_reason, delta.stop_reason)
            self.cut = delta.cut
        if not (delta.text or new or delta.finish_reason or extra or lp):
            return
        prompt_ids = None
        if not self.chat and not self.sent_prompt_ids:
            self.sent_prompt_ids, prompt_ids = True, self.prompt_ids
        await self._emit(self.shape.chunk(delta.text, new, lp, delta.finish_reason, delta.stop_reason,
                                          extra, prompt_ids=prompt_ids))

    async def _repaired(self, text: str, fr: str | None, sr: Any) -> tuple[str, str | None, Any]:
        """The continuation's first text, rebuilt (:mod:`ghostserve.front.boundary`),
        with its finish: a stop string the upstream found only in its misdecoded
        text is no stop, so the request is resubmitted from here (the tokens are right)."""
        repair, self.repair = self.repair, None
        before, after = repair.windows()
        model = self.body.get("model")
        a = await self.at.detokenize(before, model, self.headers)
        b = await self.at.detokenize(after, model, self.headers) if a is not None else None
        fixed = Boundary.text(a, b) if a is not None and b is not None else None
        if fixed is None:
            self.refused = ("the engine died inside a character and the upstream could not detokenize "
                            "the tokens around it (/detokenize)")
            return text, fr, sr
        if fr == "stop" and isinstance(sr, str):
            seen = self.text.text
            if sr not in seen[max(0, len(seen) - len(sr) + 1):] + fixed:
                self.again = True
                return fixed, None, None
        return fixed, fr, sr

    def _usage(self, usage: dict[str, Any] | None, continuation: bool) -> None:
        if not usage:
            return
        if not continuation:
            self.usage = usage
            self.prompt_details = usage.get("prompt_tokens_details")
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        self.metrics.resume_prompt_tokens.inc(prompt)
        self.metrics.resume_cached_tokens.inc(cached)
        if self.resumes:
            self.resumes[-1].update(prompt_tokens=prompt, cached_tokens=cached)

    async def _emit(self, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._gap_from is not None and (self.tokens or self.finish):
            gap = now - self._gap_from
            self.metrics.resume_seconds.labels(self._how).observe(gap)
            self.metrics.resumed.labels(self.path).inc()
            if self.resumes:
                self.resumes[-1]["gap_seconds"] = round(gap, 4)
            self._gap_from = None
        self.last_out = now
        if self.sink is not None:
            await self.sink.send(event(obj))

    # ------------------------------------------------------------------ endings

    def _final_usage(self) -> dict[str, Any]:
        if self.usage is not None and not self.resumes:
            return self.usage  # the upstream's own, untouched
        prompt = len(self.prompt_ids or [])
        if self.usage is not None:
            prompt = int(self.usage.get("prompt_tokens") or prompt)
        out: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + len(self.tokens),
                               "completion_tokens": len(self.tokens)}
        if self.prompt_details is not None:
            out["prompt_tokens_details"] = self.prompt_details
        return out

    def _info(self) -> dict[str, Any] | None:
        if not self.config.resume_info:
            return None
        return {"resumes": self.resumes}

    async def _done(self) -> Reply | None:
        if self.finish is None:  # the upstream ended the stream without finishing the request
            return await self._fail("upstream_error", "the upstream ended the request without finishing it")
        if self._gap_from is not None and self.resumes:  # resumed, and the rest came in the last chunk
            self._gap_from = None
        usage, info = self._final_usage(), self._info()
        if self.sink is None:
            lp = self.logprobs.all if not self.chat and self.body.get("logprobs") is not None else None
            return Reply(200, self.shape.whole(self.text.text, self.tokens, lp, self.finish[0], self.finish[1], usage,
                                               self.prompt_ids, self.extra or None, info))
        if self.want_usage or info:
            await self.sink.send(event(self.shape.usage_chunk(usage if self.want_usage else {}, info)))
        await self.sink.send(DONE)
        return None

    def _down(self, exc: UpstreamFailure) -> Reply:
        self.metrics.failed.labels("upstream_down").inc()
        return Reply(503, error_object(f"the upstream is not up ({exc.reason}); retry later"),
                     {"Retry-After": str(self.config.retry_after)})

    async def _rejected(self, exc: UpstreamRejected, continuation: bool) -> Reply | None:
        self.metrics.failed.labels("upstream_error").inc()
        if continuation:
            log.warning("front: the continuation of %s was refused: %s", self.shape.id, exc.body[:300])
        if self.sink is not None and self.sink.started:
            await self.sink.send(event(exc.error) + DONE)
            return None
        if exc.streamed:
            return Reply(exc.status if exc.status >= 400 else 500, exc.error)
        return Reply(exc.status, exc.body, content_type=exc.content_type or "application/json")

    async def _fail(self, reason: str, message: str) -> Reply | None:
        self.metrics.failed.labels(reason).inc()
        log.warning("front: request %s failed (%s): %s", self.shape.id or "?", reason, message)
        if self.sink is not None and self.sink.started:
            await self.sink.send(error_event(message))
            return None
        return Reply(503, error_object(message))
