"""``ghostserve front`` with several upstreams, without an engine: where new
requests go, a request moved at once when its upstream dies under it, the
limit on moves, a pool of different models refused, and the choosing logic of
:class:`Upstreams` for ``ghostserve vllm``'s replicas (hand-over of a dead
engine's KV, a restarted replica, all down).

The upstreams are scripted stand-ins for vLLM's OpenAI server (fakes: vLLM
cannot be made to die at a chosen token here), over real HTTP, talked to by
the real front process and the real ``openai`` client. Their "model" makes
each next token a function of every token before it, so a continuation from
any point gives the failure-free tokens only if the front resubmitted exactly
prompt + tokens sent."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

web = pytest.importorskip("aiohttp.web", reason="the front extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed")

from ghostserve.errors import ConfigError  # noqa: E402
from ghostserve.front.config import FrontConfig, SupervisorConfig  # noqa: E402
from ghostserve.front.supervisor import placements, visible_gpus  # noqa: E402
from ghostserve.front.tracker import Tracker  # noqa: E402
from ghostserve.front.upstream import Upstreams, UpstreamState  # noqa: E402


def next_token(seq: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(seq[-16:])) * 7 + len(seq)) % 997 + 3


def generate(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def piece(token: int) -> str:
    return f"<{token}>"


class Stand:
    """One scripted upstream. ``die_after``: the first submission it gets is cut
    after that many tokens and the server then answers 503 on /health (dead)
    until :meth:`revive`; ``cut_every``: every submission is cut after that many
    tokens while /health stays 200 (an engine that keeps failing)."""

    def __init__(self, model: str = "m", die_after: int | None = None, cut_every: int | None = None,
                 delay: float = 0.005):
        self.model, self.die_after, self.cut_every, self.delay = model, die_after, cut_every, delay
        self.alive = True
        self.submissions: list[dict] = []
        self.open = 0

    def revive(self) -> None:
        self.alive = True

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def health(self, request):
        return web.Response(status=200 if self.alive else 503)

    async def models(self, request):
        return web.json_response({"data": [{"id": self.model, "max_model_len": 4096}]})

    async def detokenize(self, request):
        return web.json_response({"prompt": "".join(piece(t) for t in (await request.json())["tokens"])})

    async def completions(self, request):
        if not self.alive:
            return web.json_response({"error": {"message": "engine dead"}}, status=500)
        body = await request.json()
        self.submissions.append(body)
        prompt = body["prompt"]
        todo = generate(prompt, body["max_tokens"])
        cut = self.cut_every
        if self.die_after is not None:
            cut, self.die_after = self.die_after, None
            dying = True
        else:
            dying = False
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.open += 1
        try:
            for i, t in enumerate(todo):
                if cut is not None and i == cut:
                    if dying:
                        self.alive = False
                    request.transport.close()
                    return resp
                last = i == len(todo) - 1
                choice = {"index": 0, "text": piece(t), "token_ids": [t], "finish_reason": "length" if last else None,
                          "stop_reason": None, **({"prompt_token_ids": prompt} if i == 0 else {})}
                await resp.write(b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0,
                                                         "model": self.model, "choices": [choice]}).encode() + b"\n\n")
                await asyncio.sleep(self.delay)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(todo),
                     "total_tokens": len(prompt) + len(todo)}
            await resp.write(b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0,
                                                     "model": self.model, "choices": [], "usage": usage}).encode()
                             + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.open -= 1


class Served:
    """Stand-ins on their own event loop thread, and a real ``ghostserve front`` process before them."""

    def __init__(self, stands: list[Stand], *front_args: str):
        self.stands = stands
        self.loop = asyncio.new_event_loop()
        self.runners, self.urls = [], []
        for s in stands:
            runner = web.AppRunner(s.app())
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.runners.append(runner)
            self.urls.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        args = [a for u in self.urls for a in ("--upstream", u)]
        self.proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "front", *args, "--port", "0",
                                      "--host", "127.0.0.1", "--resume-info", "--health-interval", "0.1",
                                      *front_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.started = line.startswith("front port=")
        self.base = f"http://127.0.0.1:{int(line.split('=')[1])}" if self.started else ""

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="x", max_retries=0, timeout=60)

    def metrics(self) -> str:
        return urllib.request.urlopen(self.base + "/metrics", timeout=30).read().decode()

    def close(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        err = self.proc.stderr.read()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for r in self.runners:
            self.loop.run_until_complete(r.cleanup())
        self.loop.close()
        return code, err


def stream(client: openai.OpenAI, prompt: list[int], n: int) -> dict:
    out = {"tokens": [], "text": "", "info": None, "finish": None, "arrivals": []}
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=n, stream=True,
                                           extra_body={"return_token_ids": True}):
        out["info"] = (chunk.model_extra or {}).get("ghostserve") or out["info"]
        if chunk.choices:
            out["tokens"] += chunk.choices[0].token_ids or []
            out["text"] += chunk.choices[0].text
            out["finish"] = chunk.choices[0].finish_reason or out["finish"]
            out["arrivals"].append(time.monotonic())
    return out


def metric(text: str, name: str, upstream: str) -> float:
    m = re.search(rf'^{name}{{upstream="{re.escape(upstream)}"}} (\S+)$', text, re.M)
    assert m, (name, upstream, text[:2000])
    return float(m.group(1))


def test_a_request_whose_upstream_dies_moves_at_once_and_the_client_sees_each_token_once():
    """Two requests at once go one to each upstream (fewest in flight); the one
    whose upstream dies after 7 tokens goes on at once on the other, token for
    token (no repeat, no gap), without waiting for the dead one to come back;
    the other is untouched. Metrics count the move per upstream; a new request
    then goes to the live upstream only."""
    a, b = Stand(die_after=7), Stand()
    s = Served([a, b], "--resume-wait", "60")
    try:
        assert s.started, s.proc.stderr.read()
        c = s.client()
        p1, p2 = [5, 6, 7, 8], [9, 10, 11]
        results: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda k, p: results.__setitem__(k, stream(c, p, 60)), args=(k, p))
                   for k, p in (("one", p1), ("two", p2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(a.submissions) >= 1 and len(b.submissions) >= 2  # one each, then the move to b
        first = {tuple(x["prompt"]) for x in a.submissions}
        moved, other = ("one", "two") if tuple(p1) in first else ("two", "one")
        prompt = p1 if moved == "one" else p2
        r = results[moved]
        assert r["tokens"] == generate(prompt, 60) and r["finish"] == "length"
        assert r["text"] == "".join(piece(t) for t in r["tokens"])
        (resume,) = r["info"]["resumes"]
        assert (resume["after_tokens"], resume["from"], resume["to"]) == (7, s.urls[0], s.urls[1])
        assert results[other]["info"]["resumes"] == []
        assert results[other]["tokens"] == generate(p1 if other == "one" else p2, 60)
        cont = b.submissions[-1] if b.submissions[-1]["prompt"][:len(prompt)] == prompt else b.submissions[-2]
        assert cont["prompt"] == prompt + generate(prompt, 7) and cont["max_tokens"] == 53
        text = s.metrics()
        assert metric(text, "ghostserve_front_moves_out_total", s.urls[0]) == 1
        assert metric(text, "ghostserve_front_moves_in_total", s.urls[1]) == 1
        assert metric(text, "ghostserve_front_upstream_up", s.urls[0]) == 0
        assert metric(text, "ghostserve_front_upstream_up", s.urls[1]) == 1
        assert 'ghostserve_front_resume_seconds_count{how="moved"} 1.0' in text
        before = len(a.submissions)
        assert stream(c, [1, 2], 5)["tokens"] == generate([1, 2], 5)
        assert len(a.submissions) == before  # the dead upstream gets nothing
        a.revive()  # it comes back (a new engine behind the URL): it gets requests again
        deadline = time.monotonic() + 10
        while metric(s.metrics(), "ghostserve_front_upstream_up", s.urls[0]) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        together = [threading.Thread(target=stream, args=(c, [3, i], 30)) for i in range(2)]
        for t in together:
            t.start()
        for t in together:
            t.join(60)
        assert len(a.submissions) == before + 1
    finally:
        code, err = s.close()
    assert code == 0, err[-3000:]


def test_a_request_moves_at_most_max_moves_times_then_ends_with_an_error_event():
    """Upstreams that cut every stream (and say they are healthy) move a request
    back and forth; after --max-moves the client gets an error event, not a hang
    and not a wrong text."""
    s = Served([Stand(cut_every=3), Stand(cut_every=3)], "--max-moves", "2")
    try:
        assert s.started, s.proc.stderr.read()
        got, err = [], None
        try:
            for chunk in s.client().completions.create(model="m", prompt=[4, 4], max_tokens=40, stream=True,
                                                       extra_body={"return_token_ids": True}):
                if chunk.choices:
                    got += chunk.choices[0].token_ids or []
        except openai.APIError as exc:
            err = exc
        assert err is not None and "max-moves 2" in str(err)
        assert got == generate([4, 4], 9)  # three submissions of three tokens, then the limit
        assert 'ghostserve_front_requests_failed_total{reason="resume_limit"} 1.0' in s.metrics()
    finally:
        code, err_text = s.close()
    assert code == 0, err_text[-3000:]


def test_every_upstream_down_answers_503_with_retry_after():
    a, b = Stand(), Stand()
    a.alive = b.alive = False
    s = Served([a, b], "--retry-after", "9")
    try:
        assert s.started, s.proc.stderr.read()
        deadline = time.monotonic() + 10
        while "ghostserve_front_upstream_up" not in s.metrics() or \
                metric(s.metrics(), "ghostserve_front_upstream_up", s.urls[1]) != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as info:
            s.client().completions.create(model="m", prompt=[1], max_tokens=3)
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "9"
    finally:
        code, err = s.close()
    assert code == 0, err[-3000:]


def test_upstreams_serving_different_models_are_refused_at_start():
    s = Served([Stand(model="llama"), Stand(model="qwen")])
    try:
        assert not s.started
        code, err = s.close()
        assert code == 2 and "same model" in err and "llama" in err and "qwen" in err
    finally:
        if s.proc.poll() is None:
            s.close()


# ------------------------------------------------------------ the choosing logic, in-process


def supervised(n: int, **kw) -> Upstreams:
    return Upstreams(FrontConfig(health_interval=0.05, handover_wait=kw.pop("handover_wait", 5.0), **kw),
                     supervised=n)


def test_a_moved_request_waits_for_the_hand_over_of_the_dead_engine_s_kv():
    """Replica 0 dies: a request that failed there goes to replica 1, but only
    once the supervisor handed generation 1 over (its group ended, so its KV can
    be loaded); a new request meanwhile goes to replica 1 at once."""
    async def scenario():
        ups = supervised(2)
        g0, g1 = ups.set_ready(0, "http://127.0.0.1:1"), ups.set_ready(1, "http://127.0.0.1:2")
        assert (g0, g1) == (1, 2) and ups.pick() is ups.members[0]
        with ups.members[0].submitted():
            assert ups.pick() is ups.members[1]  # the fewest in flight
        ups.set_down(0)
        moving = asyncio.create_task(ups.next_after(ups.members[0], g0, 10))
        await asyncio.sleep(0.2)
        assert not moving.done() and ups.pick() is ups.members[1]
        ups.handed_over(g0)
        assert await asyncio.wait_for(moving, 1) is ups.members[1]
        # the restarted replica 0 (a new generation) may take requests again
        g2 = ups.set_ready(0, "http://127.0.0.1:3")
        assert g2 == 3 and ups.pick() is ups.members[0]
    asyncio.run(scenario())


def test_with_every_replica_down_a_request_waits_for_the_first_back():
    async def scenario():
        ups = supervised(2)
        g0 = ups.set_ready(0, "http://127.0.0.1:1")
        ups.set_down(0)
        ups.handed_over(g0)
        waiting = asyncio.create_task(ups.next_after(ups.members[0], g0, 10))
        await asyncio.sleep(0.1)
        assert not waiting.done() and not ups.accepting()
        ups.set_ready(1, "http://127.0.0.1:2")
        assert await asyncio.wait_for(waiting, 1) is ups.members[1]
        ups.set_down(1)
        assert await ups.next_after(ups.members[1], 2, 0.2) is None  # none back within the wait
        ups.shut()
        assert await ups.next_after(ups.members[1], 2, 5) is None and ups.closed
    asyncio.run(scenario())


def test_a_hand_over_that_never_comes_is_waited_for_only_handover_wait():
    async def scenario():
        ups = supervised(2, handover_wait=0.3)
        g0 = ups.set_ready(0, "http://127.0.0.1:1")
        ups.set_ready(1, "http://127.0.0.1:2")
        ups.set_down(0)
        t0 = time.monotonic()
        assert await ups.next_after(ups.members[0], g0, 10) is ups.members[1]
        assert 0.25 < time.monotonic() - t0 < 3
    asyncio.run(scenario())


def test_a_replica_given_up_on_never_takes_requests_and_the_last_closes_the_pool():
    async def scenario():
        ups = supervised(2)
        ups.set_ready(0, "http://127.0.0.1:1")
        ups.set_stopped(1)
        assert ups.members[1].state == UpstreamState.STOPPED and ups.accepting()
        ups.set_ready(1, "http://127.0.0.1:2")  # a stopped replica stays stopped
        assert ups.pick(avoid=ups.members[0]) is None
        ups.set_stopped(0)
        assert ups.closed and not ups.accepting()
    asyncio.run(scenario())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4)), max_size=12))
def test_a_request_releases_every_generation_but_the_one_it_last_produced_on(events):
    """Replicas' generations have no order: output on any generation releases all
    the others the request ran on (their KV was loaded or is not needed)."""
    async def scenario():
        tr = Tracker()
        tickets = [tr.ticket() for _ in range(3)]
        last: dict[int, int] = {}
        attempted: dict[int, set[int]] = {i: set() for i in range(3)}
        for who, gen in events:
            if gen % 2:
                tickets[who].attempt(gen)
                attempted[who].add(gen)
            else:
                tickets[who].ran_on(gen)
                attempted[who] = {gen}
                last[who] = gen
        for g in range(1, 5):
            assert tr.pending(g) == sum(1 for i in range(3) if g in attempted[i])
        for t in tickets:
            t.end()
        for g in range(1, 5):
            await asyncio.wait_for(tr.settled(g), 1)
    asyncio.run(scenario())


# ------------------------------------------------------------ replicas' configuration


def test_replicas_devices_and_cpu_binds_are_checked_and_placed(tmp_path):
    args = ("--model", "m", "--tensor-parallel-size", "2")
    for kw, field in [({"replicas": 0}, "replicas"), ({"replicas": 2, "devices": "0,1"}, "devices"),
                      ({"replicas": 2, "devices": "0:1"}, "devices"), ({"replicas": 2, "devices": "0,1:1,2"}, "devices"),
                      ({"replicas": 2, "cpu_binds": "0|1"}, "cpu_binds")]:
        with pytest.raises(ConfigError) as info:
            SupervisorConfig(vllm_args=args, **kw)
        assert info.value.field == field, kw
    cfg = SupervisorConfig(vllm_args=args, replicas=2, devices="0,1:2,3", cpu_binds="0|1:2|3")
    assert cfg.tp_size == 2 and cfg.devices == ("0,1", "2,3")
    assert placements(cfg, {}) == [{"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                                   {"CUDA_VISIBLE_DEVICES": "2,3", "VLLM_CPU_OMP_THREADS_BIND": "2|3"}]
    two = SupervisorConfig(vllm_args=args, replicas=2)
    assert placements(two, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == [{"CUDA_VISIBLE_DEVICES": "4,5"},
                                                                    {"CUDA_VISIBLE_DEVICES": "6,7"}]
    with pytest.raises(ConfigError, match="need 4 GPUs"):
        placements(two, {"CUDA_VISIBLE_DEVICES": "0,1,2"})
    for n in (0, 1, 2, 3):
        (tmp_path / f"nvidia{n}").touch()
    (tmp_path / "nvidiactl").touch()
    assert visible_gpus({}, str(tmp_path)) == ["0", "1", "2", "3"]
    assert placements(two, {"CUDA_VISIBLE_DEVICES": ""}) == [{}, {}]  # none visible: vLLM's CPU build
    assert SupervisorConfig(vllm_args=("--model", "m", "-tp=4")).tp_size == 4
    assert FrontConfig(upstream="http://a:1, http://b:2").upstream == ("http://a:1", "http://b:2")
    with pytest.raises(ConfigError, match="twice"):
        FrontConfig(upstream=("http://a:1", "http://a:1/"))


def test_a_replica_marked_down_ends_its_open_streams_at_once():
    """ghostserve vllm marks a replica down the moment it sees a process die; the
    front then ends that replica's streams itself (their requests move now),
    rather than wait for the connections to break when the engine is killed."""
    from ghostserve.errors import UpstreamFailure  # noqa: PLC0415

    stand = Stand(delay=0.05)
    served = Served([stand])  # only for its HTTP server thread; this test drives Upstreams itself
    try:
        async def scenario():
            ups = supervised(1)
            await ups.start()
            ups.set_ready(0, served.urls[0])
            got = []

            async def consume_events():
                async for obj in ups.members[0].events("/v1/completions", {"prompt": [1, 2], "max_tokens": 200},
                                                       {}):
                    got.append(obj)

            task = asyncio.create_task(consume_events())
            while len(got) < 3:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            ups.set_down(0)
            with pytest.raises(UpstreamFailure, match="its engine died") as info:
                await asyncio.wait_for(task, 5)
            assert info.value.accepted and time.monotonic() - t0 < 1 and len(got) < 50
            assert ups.members[0].open_streams == 0
            await ups.close()
        asyncio.run(scenario())
    finally:
        served.close()
