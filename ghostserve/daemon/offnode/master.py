"""A Mooncake master on loopback, for the chaos harness, tests and benchmarks.

Production runs its own master (highly available: docs/scale-out.md); this one
starts ``mooncake_master`` from the ``ghostserve[mooncake]`` extra on free
loopback ports, can be SIGKILLed and restarted on the same ports (what a master
without HA does to its clients), and says where it listens as a ``--store`` URL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from ghostserve.daemon.offnode.store import free_port
from ghostserve.errors import StoreError


def master_binary() -> str:
    """``mooncake_master`` beside this Python (the extra installs it there), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mooncake_master")
    found = here if os.access(here, os.X_OK) else shutil.which("mooncake_master")
    if not found:
        raise StoreError("mooncake_master not found: pip install 'ghostserve[mooncake]'")
    return found


class LocalMaster:
    """``start()`` / ``kill()`` / ``start()`` again / ``stop()``; ``url`` for ``--store``."""

    def __init__(self, host: str = "127.0.0.1", lease_ms: int = 200, client_ttl: int = 3):
        self.host = host
        self.rpc_port, self.admin_port = free_port(host), free_port(host)
        self.lease_ms, self.client_ttl = lease_ms, client_ttl
        self.dir = tempfile.mkdtemp(prefix="ghostserve-mooncake-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mooncake://{self.host}:{self.rpc_port}?admin={self.host}:{self.admin_port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "master.log")

    def start(self, timeout: float = 30.0) -> LocalMaster:
        cmd = [master_binary(), f"--rpc_address={self.host}", f"--rpc_port={self.rpc_port}",
               f"--metrics_host={self.host}", f"--metrics_port={self.admin_port}",
               f"--default_kv_lease_ttl={self.lease_ms}", f"--client_ttl={self.client_ttl}",
               "--enable_metric_reporting=false"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "MC_TCP_BIND_ADDRESS": self.host})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ready once both ports accept
            if self.proc.poll() is not None:
                raise StoreError(f"mooncake_master exited with {self.proc.returncode}; see {self.log_path}")
            if all(_accepts(self.host, p) for p in (self.rpc_port, self.admin_port)):
                return self
            time.sleep(0.05)
        self.kill()
        raise StoreError(f"mooncake_master did not listen within {timeout} s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL (a master without HA that crashes forgets every object)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalMaster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


__all__ = ["LocalMaster", "master_binary"]
