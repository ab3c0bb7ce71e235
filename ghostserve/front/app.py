"""The front's HTTP server (aiohttp): OpenAI-compatible routes in front of one
or more upstream vLLM OpenAI servers (:class:`~ghostserve.front.upstream.Upstreams`).

* ``POST /v1/completions``, ``POST /v1/chat/completions``: a resumable request
  (:func:`ghostserve.front.resume.refusal` is None) is a :class:`Job`; any other
  is relayed as it is and, if the engine fails under it, ended with an error.
* ``GET /health``: 200 while some upstream takes requests, else 503 with
  ``Retry-After`` (a readiness probe); ``GET /metrics``: the front's Prometheus text.
* Every other path and method is relayed unchanged to a healthy upstream.

Handlers are cancelled when their client disconnects (``handler_cancellation``);
that closes the upstream connection, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ghostserve.errors import ResumeRefused
from ghostserve.front import resume
from ghostserve.front.config import FrontConfig
from ghostserve.front.job import Job, Reply
from ghostserve.front.metrics import FrontMetrics
from ghostserve.front.sse import DONE, SSEDecoder, error_event, error_object
from ghostserve.front.tracker import Tracker
from ghostserve.front.upstream import CONNECTION_ERRORS, Upstream, Upstreams

log = logging.getLogger("ghostserve.front")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
# of a generation request, the headers sent upstream (the front makes its own body)
FORWARDED = ("authorization", "x-request-id", "openai-organization", "openai-project")


class StreamSink:
    """A client's SSE response, started (headers sent) at the first event."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None
        self.started = False

    async def send(self, data: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                                    "Cache-Control": "no-cache"})
            await self.response.prepare(self.request)
            self.started = True
        await self.response.write(data)


class Front:
    """The front. ``start()`` binds ``config.host:config.port`` and returns the
    port; ``stop()`` stops listening, gives in-flight requests
    ``config.drain_seconds`` and ends the rest with an error event."""

    def __init__(self, config: FrontConfig, upstreams: Upstreams, registry: CollectorRegistry | None = None,
                 metrics: FrontMetrics | None = None):
        self.config, self.upstreams = config, upstreams
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = metrics or FrontMetrics(self.registry)
        for u in upstreams.members:
            self.metrics.add_upstream(u.name)
        self.tracker = Tracker()
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        app = web.Application(client_max_size=1 << 30)  # prompts may be long
        app.router.add_post(resume.COMPLETIONS, self.generate)
        app.router.add_post(resume.CHAT, self.generate)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_route("*", "/{tail:.*}", self.relay)
        self.app = app

    async def start(self) -> int:
        await self.upstreams.start()
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await self._site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        self.stopping = True
        if self._site is not None:
            await self._site.stop()  # no new connections
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.config.drain_seconds)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self.upstreams.shut()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.upstreams.close()

    # ------------------------------------------------------------------ routes

    async def health(self, request: web.Request) -> web.Response:
        if self.upstreams.accepting() and not self.stopping:
            return web.Response(status=200)
        return web.Response(status=503, headers={"Retry-After": str(self.config.retry_after)})

    async def metrics_page(self, request: web.Request) -> web.Response:
        for u in self.upstreams.members:
            self.metrics.upstream_up.labels(u.name).set(1 if u.up else 0)
            self.metrics.upstream_streams.labels(u.name).set(u.open_streams)
            self.metrics.upstream_in_flight.labels(u.name).set(u.in_flight)
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self.metrics.failed.labels("bad_request").inc()
            return _json(400, error_object(f"the request body is not a JSON object: {exc}", 400, "BadRequestError"))
        stream = bool(body.get("stream"))
        self.metrics.requests.labels(request.path, "true" if stream else "false").inc()
        if self.stopping or not self.upstreams.accepting():
            self.metrics.failed.labels("upstream_down").inc()
            return self._unavailable("the upstream is not up (an engine is starting); retry later")
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        refusal = resume.refusal(request.path, body, self.config.upstream_parses_chat)
        ticket = self.tracker.ticket()
        task = asyncio.current_task()
        self._tasks.add(task)
        self.metrics.in_flight.inc()
        sink = StreamSink(request) if stream else None
        try:
            if refusal is not None:
                return await self._relay_generation(request, body, headers, refusal, ticket)
            job = Job(request.path, body, headers, self.config, self.upstreams, self.metrics, ticket, sink)
            reply = await job.run()
            if reply is None:
                return sink.response
            return _reply(reply)
        except asyncio.CancelledError:
            if not self.stopping:
                self.metrics.failed.labels("client_disconnect").inc()
                raise
            self.metrics.failed.labels("shutdown").inc()
            if sink is not None and sink.started:
                await sink.send(error_event("the server is shutting down"))
                return sink.response
            return self._unavailable("the server is shutting down")
        except ConnectionResetError:  # the client went away while we wrote to it
            self.metrics.failed.labels("client_disconnect").inc()
            return sink.response if sink is not None and sink.response is not None else web.Response(status=499)
        finally:
            ticket.end()
            self._tasks.discard(task)
            self.metrics.in_flight.dec()

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """Any other path: sent upstream as it came, answered as the upstream answered."""
        upstream = self.upstreams.pick()
        url = upstream.url if upstream is not None else None
        if upstream is None or url is None:
            return self._unavailable("the upstream is not up; retry later")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with upstream.session.request(request.method, url + request.rel_url.path_qs,
                                                     data=await request.read(), headers=headers) as resp:
                out = web.StreamResponse(status=resp.status, headers={
                    k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP})
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except CONNECTION_ERRORS:
            return self._unavailable("the upstream is not up; retry later")

    # ------------------------------------------------------------------ helpers

    async def _relay_generation(self, request: web.Request, body: dict[str, Any], headers: dict[str, str],
                                refusal: str, ticket: Any) -> web.StreamResponse:
        """A request the front cannot continue: sent as it is; if the engine dies
        under it, the client gets an error saying why it was not continued."""
        upstream = self.upstreams.pick()
        failed = str(ResumeRefused(refusal))
        if upstream is None or upstream.url is None:
            return self._unavailable("the upstream is not up; retry later")
        ticket.attempt(upstream.generation)
        with upstream.submitted():
            return await self._relay_stream(request, upstream, upstream.url, body, headers, failed)

    async def _relay_stream(self, request: web.Request, upstream: Upstream, url: str, body: dict[str, Any],
                            headers: dict[str, str], failed: str) -> web.StreamResponse:
        out: web.StreamResponse | None = None
        try:
            async with upstream.session.post(url + request.path, json=body, headers=headers) as resp:
                if resp.status != 200 or "text/event-stream" not in resp.headers.get("Content-Type", ""):
                    data = await resp.read()
                    if resp.status >= 500 and not await upstream.healthy():
                        self.metrics.failed.labels("unresumable").inc()
                        return _json(503, error_object(failed))
                    return web.Response(status=resp.status, body=data,
                                        content_type=resp.content_type or "application/json")
                out = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                              "Cache-Control": "no-cache"})
                await out.prepare(request)
                decoder = SSEDecoder()
                with upstream.streaming():
                    async for chunk in resp.content.iter_any():
                        for data in decoder.feed(chunk):
                            if data.strip() == "[DONE]":
                                await out.write(DONE)
                                return out
                            if '"error"' in data[:20] and not await upstream.healthy():
                                raise ConnectionError("the engine died")
                            await out.write(b"data: " + data.encode() + b"\n\n")
                raise ConnectionError("the stream ended early")
        except CONNECTION_ERRORS:
            self.metrics.failed.labels("unresumable").inc()
            if out is None:
                return _json(503, error_object(failed))
            await out.write(error_event(failed))
            return out

    def _unavailable(self, message: str) -> web.Response:
        return _json(503, error_object(message), {"Retry-After": str(self.config.retry_after)})


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj).encode(), headers=headers,
                        content_type="application/json")


def _reply(reply: Reply) -> web.Response:
    if isinstance(reply.body, bytes | bytearray):
        return web.Response(status=reply.status, body=bytes(reply.body), headers=reply.headers,
                            content_type=reply.content_type.split(";")[0])
    return _json(reply.status, reply.body, reply.headers)
