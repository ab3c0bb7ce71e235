"""A private ``ghostserve serve`` subprocess: for the demo, the engine's benchmarks
and tests, which need a real daemon on a socket and shared-memory prefix of
their own. The daemon is a separate process, as in production, so killing a
rank never touches it and its encoding competes for the CPU honestly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

from ghostserve import shm
from ghostserve.errors import SidecarError

NETWORK_ENV = ("GHOSTSERVE_LISTEN", "GHOSTSERVE_TLS_CERT", "GHOSTSERVE_TLS_KEY", "GHOSTSERVE_INSECURE")


class Sidecar:
    """Start with :meth:`start` (or ``with``); :meth:`stop` ends the daemon and
    removes its socket directory and every shared-memory segment under its prefix."""

    def __init__(self, prefix: str = "", encode_threads: int = 0, log_level: str = "warning",
                 metrics_port: int = 0, args: tuple[str, ...] = ()):
        self.dir = tempfile.mkdtemp(prefix="ghostserve-")
        self.socket = os.path.join(self.dir, "gs.sock")
        self.prefix = prefix or f"gs{uuid.uuid4().hex[:8]}-"
        self.encode_threads, self.log_level = encode_threads, log_level
        self.metrics_port = metrics_port  # 0: no Prometheus endpoint
        self.args = tuple(args)           # more `ghostserve serve` flags (--store ..., say)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Sidecar:
        cmd = [sys.executable, "-m", "ghostserve", "serve", "--socket", self.socket,
               "--shm-prefix", self.prefix, "--metrics-port", str(self.metrics_port), "--log-level", self.log_level,
               "--encode-threads", str(self.encode_threads), *self.args]
        log = open(os.path.join(self.dir, "daemon.log"), "ab")  # noqa: SIM115 - the child owns it
        # a private daemon: never the node's TCP listener or TLS identity
        env = {k: v for k, v in os.environ.items() if k not in NETWORK_ENV}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        line = self.proc.stdout.readline().decode()
        if not line.startswith("ready"):
            self.stop()
            raise SidecarError(f"ghostserve serve did not start: {line!r}; see {self.dir}/daemon.log")
        return self

    def kill(self) -> None:
        """SIGKILL the daemon (a crash): its socket and shared memory stay; ``start()`` again re-attaches."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "daemon.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in shm.list_names(self.prefix):
            shm.unlink(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
