"""The upstream OpenAI servers, as the front sees them: where each is, whether
it takes requests, and its streamed responses as parsed events.

:class:`Upstream` is one server (one vLLM engine at a time behind it; its
``generation`` names the engine, and changes when a new one is ready).
:class:`Upstreams` is the set the front sends to: a new request goes to the
healthy one with the fewest requests in flight (:meth:`Upstreams.pick`); a
request whose upstream failed under it goes on at once on another healthy one,
or waits for one to come back (:meth:`Upstreams.next_after`).

Two ways to know which are up:

* *static* (``ghostserve front --upstream URL ...``): each ``/health`` is polled
  every ``health_interval`` by one task;
* *supervised* (``ghostserve vllm``): the supervisor calls :meth:`Upstreams.set_ready`
  when a replica's engine is up, :meth:`Upstreams.set_down` when it died, and
  :meth:`Upstreams.handed_over` once the dead engine's ghostserve group has ended
  (only then may another engine load its KV). Waiting is on events, not polls.

A failure of the *engine* (connection refused or reset, a stream cut, a 5xx or
an error event while ``/health`` fails) is :class:`UpstreamFailure`: the front
resumes the request. An error about the *request* (any status or error event
while the upstream is healthy) is :class:`UpstreamRejected`: the client gets it.

Everything here runs on the front's event loop; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from enum import StrEnum
from typing import Any

import aiohttp

from ghostserve.errors import ConfigError, UpstreamFailure, UpstreamRejected
from ghostserve.front.config import FrontConfig
from ghostserve.front.sse import SSEDecoder

log = logging.getLogger("ghostserve.front")

# exceptions of a connection that went away or never came up
CONNECTION_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, OSError)


class UpstreamState(StrEnum):
    """Whether an upstream takes requests."""

    UP = "up"              # healthy: new requests and moved ones may go there
    DOWN = "down"          # dead, starting, or not answering /health
    STOPPED = "stopped"    # given up on, or the front is stopping: never up again


class Upstream:
    """One upstream server. ``name`` is stable (its URL, or ``r<i>`` for a
    supervised replica); ``url`` is None while no engine answers; ``in_flight``
    counts the front's requests submitted to it and not yet ended there;
    ``open_streams`` those it answered 200 and is still streaming."""

    def __init__(self, name: str, url: str | None, session_of: Any, config: FrontConfig):
        self.name, self.url, self.config = name, url, config
        self._session_of = session_of  # the pool: its session exists only once started
        self.state = UpstreamState.UP if url else UpstreamState.DOWN
        self.generation = 0
        self.in_flight = 0
        self.open_streams = 0
        self.model: str | None = None  # what /v1/models said (a mixed pool is refused)
        self._model_len: dict[int, int | None] = {}
        self._responses: set[aiohttp.ClientResponse] = set()  # streams open now (cut when it dies)

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, {self.state.value}, generation {self.generation})"

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session_of.session

    @property
    def up(self) -> bool:
        return self.state == UpstreamState.UP and self.url is not None

    @contextlib.contextmanager
    def submitted(self) -> Iterator[None]:
        """Counts, in ``in_flight``, a request sent here until it ends or moves."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def cut(self) -> None:
        """Its engine is known dead: end every stream from it now (each request
        then sees an :class:`UpstreamFailure` and moves), rather than wait for
        the connections to break when its processes are killed."""
        for resp in list(self._responses):
            resp.close()

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Counts, in ``open_streams``, a generation the upstream is streaming."""
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1

    async def healthy(self) -> bool:
        """Does it answer 200 on /health now?"""
        url = self.url
        if url is None or self._session_of.session is None:
            return False
        try:
            async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(
                    total=self.config.connect_timeout)) as resp:
                return resp.status == 200
        except CONNECTION_ERRORS:
            return False

    async def served_model(self, headers: dict[str, str] | None = None) -> tuple[str, int | None] | None:
        """(model id, max_model_len) from /v1/models; None if it does not answer."""
        if self.url is None:
            return None
        try:
            async with self.session.get(self.url + "/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(
                    total=self.config.connect_timeout)) as resp:
                data = (await resp.json(content_type=None))["data"][0]
            length = data.get("max_model_len")
            return str(data["id"]), int(length) if length is not None else None
        except (*CONNECTION_ERRORS, ValueError, KeyError, IndexError, TypeError):
            return None

    async def max_model_len(self, headers: dict[str, str]) -> int | None:
        """The served model's context length (/v1/models), cached per engine."""
        gen = self.generation
        if gen not in self._model_len:
            served = await self.served_model(headers)
            if served is None:
                return None
            self._model_len[gen] = served[1]
        return self._model_len[gen]

    async def detokenize(self, tokens: list[int], model: str | None, headers: dict[str, str]) -> str | None:
        """The text of ``tokens`` (vLLM's /detokenize); None if the upstream refuses
        (it has no such endpoint). Raises :class:`UpstreamFailure` if it cannot
        answer at all (it died again: the request resumes again)."""
        url = self.url
        if url is None:
            raise UpstreamFailure("no upstream is up", accepted=True)
        body: dict[str, Any] = {"tokens": tokens}
        if model is not None:
            body["model"] = model
        try:
            async with self.session.post(url + "/detokenize", json=body, headers=headers) as resp:
                if resp.status != 200:
                    return None
                return str((await resp.json(content_type=None))["prompt"])
        except (*CONNECTION_ERRORS, ValueError, KeyError, TypeError) as exc:
            raise UpstreamFailure(f"/detokenize: {type(exc).__name__}: {exc}", accepted=True) from exc

    async def events(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[dict]:
        """POST ``body`` to ``path`` (a streaming request) and yield each event's
        JSON until ``[DONE]``. Raises :class:`UpstreamFailure` or
        :class:`UpstreamRejected`. Closing the iterator early closes the
        connection, which makes vLLM abort the request."""
        url = self.url
        if url is None:
            raise UpstreamFailure("no upstream is up", accepted=False)
        accepted = False
        try:
            async with self.session.post(url + path, json=body, headers=headers) as resp:
                if resp.status != 200:
                    data = await resp.read()
                    if resp.status >= 500 and not await self.healthy():
                        raise UpstreamFailure(f"HTTP {resp.status} from an unhealthy upstream", accepted=False)
                    raise UpstreamRejected(resp.status, data, resp.content_type)
                accepted = True
                self._responses.add(resp)
                with self.streaming(), contextlib.ExitStack() as done:
                    done.callback(self._responses.discard, resp)
                    decoder = SSEDecoder()
                    async for chunk in resp.content.iter_any():
                        for data in decoder.feed(chunk):
                            if data.strip() == "[DONE]":
                                return
                            try:
                                obj = json.loads(data)
                            except ValueError:
                                raise UpstreamFailure(f"malformed event {data[:80]!r}", accepted=True) from None
                            if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
                                if not await self.healthy():
                                    message = str((obj.get("error") or {}).get("message", ""))[:200]
                                    raise UpstreamFailure(f"error event from a dead engine: {message}", accepted=True)
                                err = obj["error"] if isinstance(obj["error"], dict) else {}
                                code = err.get("code")
                                raise UpstreamRejected(code if isinstance(code, int) else 500,
                                                       json.dumps(obj).encode(), streamed=True)
                            yield obj
                    raise UpstreamFailure("the stream ended without [DONE]", accepted=True)
        except CONNECTION_ERRORS as exc:
            if not self.up and accepted:
                raise UpstreamFailure("its engine died", accepted=True) from None
            raise UpstreamFailure(f"{type(exc).__name__}: {exc}".rstrip(": "), accepted=accepted) from None


class Upstreams:
    """The upstreams behind one front. ``supervised``: ``ghostserve vllm`` says
    which are up; else each ``config.upstream`` URL is polled. Generations are
    numbered across all upstreams (a number names one engine), from 1."""

    def __init__(self, config: FrontConfig, supervised: int = 0):
        self.config = config
        self.supervised = supervised > 0
        self.session: aiohttp.ClientSession | None = None
        if self.supervised:
            self.members = [Upstream(f"r{i}", None, self, config) for i in range(supervised)]
        else:
            self.members = [Upstream(url, url, self, config) for url in config.upstream_urls]
        self._generations = 0
        for u in self.members:
            if u.url is not None:
                u.generation = self._next_generation()
        self.closed = False
        self._changed = asyncio.Event()
        self._released: dict[int, asyncio.Event] = {}  # supervised: a dead engine's group ended
        self._poller: asyncio.Task | None = None
        self.on_state: Any = None  # called with (upstream) on every state change (metrics)

    def _next_generation(self) -> int:
        self._generations += 1
        return self._generations

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout)
        # no pool limit: every client request holds one upstream connection for its stream
        self.session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                             auto_decompress=False)
        if not self.supervised:
            await self.check_models()
            self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        self.shut()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def shut(self) -> None:
        """No upstream will come back: waiting requests give up now."""
        self.closed = True
        for u in self.members:
            self._set(u, UpstreamState.STOPPED)
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set(self, u: Upstream, state: UpstreamState) -> None:
        if u.state == UpstreamState.STOPPED or u.state == state:
            return
        u.state = state
        log.info("front: upstream %s is %s (generation %d)", u.name, state.value, u.generation)
        if self.on_state is not None:
            self.on_state(u)

    # ------------------------------------------------------------ choosing

    def accepting(self) -> bool:
        """May a new request be sent now? (False: answer 503 without trying.)"""
        return not self.closed and any(u.up for u in self.members)

    def pick(self, avoid: Upstream | None = None) -> Upstream | None:
        """The healthy upstream with the fewest requests in flight (the first of
        equals), other than ``avoid``; None if there is none."""
        live = [u for u in self.members if u.up and u is not avoid]
        return min(live, key=lambda u: u.in_flight) if live and not self.closed else None

    async def next_after(self, failed: Upstream, generation: int, timeout: float) -> Upstream | None:
        """Where a request goes on after ``failed`` (at ``generation``) failed
        under it, within ``timeout`` s: another healthy upstream at once (once
        the dead engine's KV may be loaded elsewhere: :meth:`handover`), or
        ``failed`` itself when its engine was restarted, or when it turns out
        healthy (a connection lost on the way, not the engine). None: none came
        within ``timeout``, or the front is stopping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed:
            dead = failed.generation != generation or not failed.up
            if not dead and await failed.healthy():
                return failed
            other = self.pick(avoid=failed)
            if failed.up and failed.generation != generation and (other is None or failed.in_flight <= other.in_flight):
                other = failed  # restarted since
            if other is not None:
                await self.handover(generation, max(0.0, deadline - loop.time()))
                return other
            left = deadline - loop.time()
            if left <= 0:
                return None
            changed = self._changed
            # the supervisor says when an engine changes; while the failed one still
            # looks up, look again at its /health now and then
            wait = min(left, self.config.health_interval) if failed.up else left
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
        return None

    async def handover(self, generation: int, timeout: float) -> bool:
        """Wait (at most ``timeout`` s, and at most ``handover_wait``) until the
        engine of ``generation`` has ended for ghostserve, so another engine can
        load its KV. Static upstreams: nothing to wait for (their engines' groups
        are not the front's to know)."""
        if not self.supervised or generation == 0:
            return True
        event = self._released.setdefault(generation, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), min(timeout, self.config.handover_wait))
            return True
        except TimeoutError:
            log.warning("front: engine generation %d not handed over within %g s; moving on "
                        "(its KV may be recomputed)", generation, min(timeout, self.config.handover_wait))
            return False

    # ------------------------------------------------------------ supervised

    def set_ready(self, index: int, url: str) -> int:
        """Replica ``index``'s new engine answers on ``url``; returns its generation."""
        u = self.members[index]
        u.url, u.generation = url, self._next_generation()
        self._set(u, UpstreamState.UP)
        self._pulse()
        return u.generation

    def set_down(self, index: int) -> None:
        """Replica ``index``'s engine died: no request goes there, and the
        streams it had open end now (their requests move)."""
        u = self.members[index]
        u.url = None
        self._set(u, UpstreamState.DOWN)
        u.cut()
        self._pulse()

    def set_stopped(self, index: int) -> None:
        """Replica ``index`` is given up on."""
        u = self.members[index]
        u.url = None
        self._set(u, UpstreamState.STOPPED)
        if all(m.state == UpstreamState.STOPPED for m in self.members):
            self.closed = True
        self._pulse()

    def handed_over(self, generation: int) -> None:
        """The engine of ``generation`` is gone for ghostserve (its group ended):
        its requests' KV can be loaded by another engine now."""
        self._released.setdefault(generation, asyncio.Event()).set()

    def forget(self, generation: int) -> None:
        """No request will ask about ``generation`` any more."""
        self._released.pop(generation, None)

    # ------------------------------------------------------------ static

    async def check_models(self) -> None:
        """Refuse a pool whose upstreams serve different models or context
        lengths (a moved request's KV fits only an engine of the same layout).
        Upstreams that do not answer now are checked when they come up."""
        for u in self.members:
            await self._check_model(u)

    async def _check_model(self, u: Upstream) -> bool:
        served = await u.served_model()
        if served is None:
            return False
        others = {m.model for m in self.members if m.model is not None and m is not u}
        u.model = f"{served[0]} (max_model_len {served[1]})"
        if others and others != {u.model}:
            raise ConfigError("upstream", f"{u.name} serves {u.model}, the others {sorted(others)[0]}: "
                              "every upstream of a front must serve the same model with the same layout")
        return True

    async def _poll(self) -> None:
        """Static upstreams: /health of each, every ``health_interval``."""
        while not self.closed:
            for u in self.members:
                if u.state == UpstreamState.STOPPED:
                    continue
                ok = await u.healthy()
                if ok and u.model is None:
                    try:
                        await self._check_model(u)
                    except ConfigError as exc:
                        log.error("front: %s; it gets no requests", exc)
                        self._set(u, UpstreamState.STOPPED)
                        continue
                if ok and u.state == UpstreamState.DOWN:
                    u.generation = self._next_generation()  # came back: maybe another engine
                    self._set(u, UpstreamState.UP)
                    self._pulse()
                elif not ok and u.state == UpstreamState.UP:
                    self._set(u, UpstreamState.DOWN)
                    self._pulse()
            await asyncio.sleep(self.config.health_interval)
