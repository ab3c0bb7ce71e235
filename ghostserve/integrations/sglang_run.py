"""Run a real SGLang server (``python -m sglang.launch_server``) for tests and
benchmarks: start it in its own session, wait for its ready line, send it
token-id requests through its native ``/generate`` API, find its TP scheduler
processes to kill one, stop it the way an operator would, and remove the
``/dev/shm`` segments a killed SGLang leaves behind.

SGLang runs in an environment of its own (``GHOSTSERVE_PYTHON_SGLANG``, else
``.venv-sglang`` beside the source tree, which ``bin/setup`` makes): its pins
(torch, transformers) differ from the vLLM extra's. This module itself needs
neither; it only starts processes.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

READY = "The server is fired up and ready to roll"
# what SGLang (and Python's multiprocessing under it) leaves in /dev/shm when killed
LEFTOVERS = ("sgl_shm_mq_", "sglang_loads_", "sem.mp-")


def default_python() -> str:
    """SGLang's interpreter: ``GHOSTSERVE_PYTHON_SGLANG``, else ``.venv-sglang/bin/python``
    of the source checkout this module lives in."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get("GHOSTSERVE_PYTHON_SGLANG") or os.path.join(root, ".venv-sglang", "bin", "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(tmp: str, kernel_stub: str | None = None, bind: str = "0|1", **extra: str) -> dict[str, str]:
    """Environment for SGLang's CPU engine on a small machine, TP ranks pinned by
    ``bind`` (one core list per rank). ``kernel_stub``: a folder with a stand-in
    ``sgl_kernel`` module (the CPU kernel library is not published; the tests'
    stand-in makes SGLang take its native torch paths) put first on PYTHONPATH.
    NCCL is pointed at a missing file (else the CUDA build of torch tries it)."""
    os.makedirs(tmp, exist_ok=True)
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", SGLANG_CPU_OMP_THREADS_BIND=bind, TMPDIR=tmp,
               SGLANG_NCCL_SO_PATH=os.path.join(tmp, "no-nccl", "libnccl.so"), **extra)
    if kernel_stub:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (kernel_stub, os.environ.get("PYTHONPATH")) if p)
    return env


def cpu_args(model: str, tp: int = 2, max_total_tokens: int = 8192) -> list[str]:
    """``launch_server`` options for the CPU engine: torch-native attention, no
    overlap scheduler (the plug-in refuses it), token-id requests only."""
    return ["--model-path", model, "--device", "cpu", "--attention-backend", "torch_native",
            "--disable-overlap-schedule", "--tp", str(tp), "--max-total-tokens", str(max_total_tokens),
            "--skip-tokenizer-init", "--disable-cuda-graph", "--disable-custom-all-reduce", "--random-seed", "0"]


class SGLangServer:
    """One ``sglang.launch_server`` process tree. Not thread-safe, except the
    request methods (one HTTP connection per call)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: str, port: int | None = None,
                 python: str | None = None):
        self.port = port or free_port()
        self.cmd = [python or default_python(), "-m", "sglang.launch_server", *args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.ready = threading.Event()
        self.ended = threading.Event()
        self._shm_before: set[str] = set()
        self.started_at = 0.0
        self.ready_seconds = 0.0

    # ------------------------------------------------------------------ life

    def start(self) -> SGLangServer:
        self._shm_before = set(os.listdir("/dev/shm"))
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, text=True, errors="replace")
        threading.Thread(target=self._read, name="sglang-log", daemon=True).start()
        return self

    def _read(self) -> None:
        with open(self.log_path, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                if READY in line and not self.ready.is_set():
                    self.ready_seconds = time.monotonic() - self.started_at
                    self.ready.set()
        self.ended.set()

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from start to SGLang's ready line; RuntimeError (with the log's
        tail) if the server exits or is not ready within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.ready.is_set():
            if self.ended.wait(min(1.0, max(0.0, deadline - time.monotonic()))) and not self.ready.is_set():
                raise RuntimeError(f"SGLang exited ({self.proc.wait()}) before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"SGLang not ready within {timeout} s:\n{self.tail()}")
        return self.ready_seconds

    def wait_exit(self, timeout: float = 120) -> int:
        """The exit status once the server ends (it ends alone after a rank died)."""
        rc = self.proc.wait(timeout=timeout)
        self.ended.wait(10)
        return rc

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM (SGLang's graceful shutdown: schedulers release their resources),
        SIGKILL of the whole session after ``timeout``; then the leftovers go."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.cleanup()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> list[str]:
        """Remove what SGLang left in /dev/shm since :meth:`start` (after its
        processes are gone: a live server still uses them). Returns the names."""
        self._wait_children_gone()
        gone = [n for n in set(os.listdir("/dev/shm")) - self._shm_before if n.startswith(LEFTOVERS)]
        for n in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", n))
        return gone

    def _wait_children_gone(self, timeout: float = 30) -> None:
        import psutil  # noqa: PLC0415

        procs = [p for p in psutil.process_iter() if self._ours(p)]
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def _ours(self, p: Any) -> bool:
        """Still alive from this server's session (its own process may be gone)."""
        try:
            return os.getsid(p.pid) == self.proc.pid and p.pid != os.getpid()
        except (ProcessLookupError, PermissionError):
            return False

    def schedulers(self) -> dict[int, Any]:
        """TP rank -> psutil.Process of its scheduler (``sglang::scheduler_TP<r>``)."""
        import psutil  # noqa: PLC0415

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                m = re.search(r"scheduler_TP(\d+)\b", " ".join(child.cmdline()))
                if m:
                    out[int(m.group(1))] = child
        return out

    def tail(self, n: int = 80) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ requests

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, rid: str | None = None,
                 timeout: float = 600, **sampling: Any) -> dict[str, Any]:
        """One greedy (unless ``sampling`` says otherwise) request: SGLang's response
        (``output_ids``, ``meta_info`` with ``cached_tokens``), plus ``seconds``."""
        body = {"input_ids": list(input_ids), "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True, **sampling}}
        if rid:
            body["rid"] = rid
        started = time.monotonic()
        out = json.loads(self._post("/generate", body, timeout))
        out["seconds"] = time.monotonic() - started
        return out

    def _post(self, path: str, body: Any = None, timeout: float = 60) -> bytes:
        """POST ``body`` (JSON) to ``path``; the response body. RuntimeError unless 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path} answered {resp.status}: {data[:500]!r}")
            return data
        finally:
            conn.close()

    def flush_cache(self) -> None:
        """Empty SGLang's radix cache (``/flush_cache``; it refuses while requests run)."""
        self._post("/flush_cache")

    def stream(self, input_ids: Sequence[int], max_new_tokens: int, rid: str | None = None,
               on_tokens: Callable[[list[int]], None] | None = None, timeout: float = 600) -> tuple[list[int], bool]:
        """Stream one greedy request: (tokens received, whether it finished). A
        server that dies mid-stream ends it early (finished False); ``on_tokens``
        sees the tokens so far after every event."""
        body = {"input_ids": list(input_ids), "stream": True, "sampling_params": {
            "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        if rid:
            body["rid"] = rid
        got: list[int] = []
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                return got, False
            for raw in resp:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                if line == "data: [DONE]":
                    return got, len(got) >= max_new_tokens
                event = json.loads(line[5:])
                if "error" in event:
                    return got, False
                ids, done = event.get("output_ids") or [], event["meta_info"].get("completion_tokens", 0)
                got = list(ids) if len(ids) == done else got + list(ids)  # cumulative or incremental
                if on_tokens is not None:
                    on_tokens(got)
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            return got, False
        finally:
            conn.close()
        return got, len(got) >= max_new_tokens


__all__ = ["LEFTOVERS", "READY", "SGLangServer", "cpu_args", "cpu_env", "default_python", "free_port"]
