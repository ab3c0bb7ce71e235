"""The upstream OpenAI server, as the front sees it: where it is, whether it is
up, and its streamed responses as parsed events.

Two kinds: :class:`StaticUpstream` (``ghostserve front --upstream URL``: its
``/health`` is polled while a request waits for it) and
:class:`SupervisedUpstream` (``ghostserve vllm`` tells it when a new engine is
ready and when one died; waiting is an event, not a poll).

A failure of the *engine* (connection refused or reset, a stream cut, a 5xx or
an error event while ``/health`` fails) is :class:`UpstreamFailure`: the front
resumes the request. An error about the *request* (any status or error event
while the upstream is healthy) is :class:`UpstreamRejected`: the client gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp

from ghostserve.errors import UpstreamFailure, UpstreamRejected
from ghostserve.front.config import FrontConfig
from ghostserve.front.sse import SSEDecoder

# exceptions of a connection that went away or never came up
CONNECTION_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError, OSError)


class Upstream:
    """Base: the HTTP session, probes and streamed requests. ``url`` is None
    while there is no upstream to send to; ``generation`` counts the engines
    (it changes when a new one is ready)."""

    def __init__(self, config: FrontConfig):
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.url: str | None = None
        self.generation = 0
        self.closed = False
        self.open_streams = 0  # requests the upstream answered 200 whose stream has not ended
        self._model_len: dict[int, int | None] = {}

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout)
        # no pool limit: every client request holds one upstream connection for its stream
        self.session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                             auto_decompress=False)

    async def close(self) -> None:
        self.closed = True
        if self.session is not None:
            await self.session.close()

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Counts, in ``open_streams``, a generation the upstream is streaming."""
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1

    def accepting(self) -> bool:
        """May a new request be sent now? (False: answer 503 without trying.)"""
        return self.url is not None and not self.closed

    async def healthy(self, url: str | None = None) -> bool:
        """Does ``url`` (default: the current upstream) answer 200 on /health now?"""
        url = url or self.url
        if url is None or self.session is None:
            return False
        try:
            async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(
                    total=self.config.connect_timeout)) as resp:
                return resp.status == 200
        except CONNECTION_ERRORS:
            return False

    async def wait_ready(self, failed_generation: int, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until an upstream is up to take a
        resubmission after generation ``failed_generation`` failed."""
        raise NotImplementedError

    async def max_model_len(self, headers: dict[str, str]) -> int | None:
        """The served model's context length (/v1/models), cached per engine."""
        gen = self.generation
        if gen not in self._model_len:
            try:
                async with self.session.get(self.url + "/v1/models", headers=headers) as resp:
                    data = await resp.json(content_type=None)
                self._model_len[gen] = int(data["data"][0]["max_model_len"])
            except (*CONNECTION_ERRORS, ValueError, KeyError, IndexError, TypeError):
                return None
        return self._model_len[gen]

    async def detokenize(self, tokens: list[int], model: str | None, headers: dict[str, str]) -> str | None:
        """The text of ``tokens`` (vLLM's /detokenize); None if the upstream refuses
        (it has no such endpoint). Raises :class:`UpstreamFailure` if it cannot
        answer at all (it died again: the request resumes again)."""
        url = self.url
        if url is None or self.session is None:
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
        if url is None or self.session is None:
            raise UpstreamFailure("no upstream is up", accepted=False)
        accepted = False
        try:
            async with self.session.post(url + path, json=body, headers=headers) as resp:
                if resp.status != 200:
                    data = await resp.read()
                    if resp.status >= 500 and not await self.healthy(url):
                        raise UpstreamFailure(f"HTTP {resp.status} from an unhealthy upstream", accepted=False)
                    raise UpstreamRejected(resp.status, data, resp.content_type)
                accepted = True
                with self.streaming():
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
                                if not await self.healthy(url):
                                    message = str((obj.get("error") or {}).get("message", ""))[:200]
                                    raise UpstreamFailure(f"error event from a dead engine: {message}", accepted=True)
                                err = obj["error"] if isinstance(obj["error"], dict) else {}
                                code = err.get("code")
                                raise UpstreamRejected(code if isinstance(code, int) else 500,
                                                       json.dumps(obj).encode(), streamed=True)
                            yield obj
                    raise UpstreamFailure("the stream ended without [DONE]", accepted=True)
        except CONNECTION_ERRORS as exc:
            raise UpstreamFailure(f"{type(exc).__name__}: {exc}".rstrip(": "), accepted=accepted) from None


class StaticUpstream(Upstream):
    """A fixed URL (``ghostserve front --upstream``); its /health is polled
    every ``health_interval`` while a request waits for it."""

    def __init__(self, config: FrontConfig):
        super().__init__(config)
        self.url = config.upstream_url

    async def wait_ready(self, failed_generation: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed:
            if await self.healthy():
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(self.config.health_interval, left))
        return False


class SupervisedUpstream(Upstream):
    """An upstream that ``ghostserve vllm`` starts and restarts: it calls
    :meth:`set_ready` when an engine is up and :meth:`set_down` when it died."""

    def __init__(self, config: FrontConfig):
        super().__init__(config)
        self._changed = asyncio.Event()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def set_ready(self, url: str) -> int:
        """A new engine answers on ``url``; returns its generation."""
        self.url = url
        self.generation += 1
        self._pulse()
        return self.generation

    def set_down(self) -> None:
        self.url = None
        self._pulse()

    def shut(self) -> None:
        """No upstream will come back: waiting requests give up now."""
        self.closed = True
        self.url = None
        self._pulse()

    async def wait_ready(self, failed_generation: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed:
            if self.url is not None and self.generation != failed_generation:
                return True
            if self.url is not None and await self.healthy():
                return True  # the same engine is fine (a connection lost on the way, not the engine)
            left = deadline - loop.time()
            if left <= 0:
                return False
            changed = self._changed
            # the supervisor says when the engine changes; while it still calls this
            # engine up, look again at its /health now and then
            wait = min(left, self.config.health_interval) if self.url is not None else left
            try:
                await asyncio.wait_for(changed.wait(), wait)
            except TimeoutError:
                pass
        return False
