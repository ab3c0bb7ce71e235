"""The SGLang plug-in's settings, from the environment.

SGLang gives general plug-ins no configuration of their own (``SGLANG_PLUGINS``
only chooses which load), so the plug-in reads ``GHOSTSERVE_SGLANG_*``
variables, set where SGLang is started; every scheduler process inherits them.
Installing ghostserve registers the plug-in in every SGLang process of that
environment, so it does nothing unless ``GHOSTSERVE_SGLANG`` turns it on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from ghostserve import shm
from ghostserve.config import CONNECT_WAIT_SECONDS
from ghostserve.errors import ConfigError

ENV = "GHOSTSERVE_SGLANG"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(name, f"{value!r}: use 1/0, true/false, yes/no or on/off")


@dataclasses.dataclass(frozen=True)
class PluginOptions:
    """Validated at construction (raises :class:`ConfigError` naming the variable)."""

    socket: str                      # the daemon's unix socket (or host:port)
    parity: int = 1                  # m: parity shards per stripe
    group: str = ""                  # daemon group; default sglang-<launch id>, new for every start
    shm_prefix: str = "gs-"          # names of the ranks' KV segments: <prefix><group>-r<rank>
    resume: bool = True              # load new requests' prefixes from ended servers' KV
    namespace: str = ""              # Lookup scope; default: a hash of the model and its numerics
    # seconds start-up waits for a daemon that does not answer (one restarting); then
    # SGLang runs unprotected and says so in its log
    daemon_wait: float = CONNECT_WAIT_SECONDS

    def __post_init__(self) -> None:
        if not self.socket:
            raise ConfigError(f"{ENV}_SOCKET", "missing: give the ghostserve daemon's socket "
                              f"({ENV}_SOCKET or GHOSTSERVE_SOCKET)")
        if not 1 <= self.parity <= 254:
            raise ConfigError(f"{ENV}_PARITY", f"{self.parity}: an integer from 1 to 254")
        if len(self.group) > 64:
            raise ConfigError(f"{ENV}_GROUP", f"{self.group!r}: at most 64 characters")
        try:
            shm.check_name(self.shm_prefix + "x")
        except ValueError:
            raise ConfigError(f"{ENV}_SHM_PREFIX", f"{self.shm_prefix!r}: use letters, digits and ._-") from None
        if not 0 <= self.daemon_wait <= 3600:
            raise ConfigError(f"{ENV}_DAEMON_WAIT", f"{self.daemon_wait}: seconds, from 0 to 3600")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginOptions | None:
        """The options, or None when ``GHOSTSERVE_SGLANG`` is unset or off."""
        env = os.environ if env is None else env
        if not _flag(ENV, env.get(ENV, "")):
            return None
        known = {f"{ENV}_{f.name.upper()}" for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in env if k.startswith(ENV + "_") and k not in known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting; known: {', '.join(sorted(known))}")
        parity = env.get(f"{ENV}_PARITY", "1")
        try:
            m = int(parity)
        except ValueError:
            raise ConfigError(f"{ENV}_PARITY", f"{parity!r}: an integer from 1 to 254") from None
        wait = env.get(f"{ENV}_DAEMON_WAIT", str(CONNECT_WAIT_SECONDS))
        try:
            daemon_wait = float(wait)
        except ValueError:
            raise ConfigError(f"{ENV}_DAEMON_WAIT", f"{wait!r}: seconds, from 0 to 3600") from None
        return cls(socket=env.get(f"{ENV}_SOCKET") or env.get("GHOSTSERVE_SOCKET", ""), parity=m,
                   group=env.get(f"{ENV}_GROUP", ""), shm_prefix=env.get(f"{ENV}_SHM_PREFIX", "gs-"),
                   resume=_flag(f"{ENV}_RESUME", env.get(f"{ENV}_RESUME", "1")),
                   namespace=env.get(f"{ENV}_NAMESPACE", ""), daemon_wait=daemon_wait)


__all__ = ["ENV", "PluginOptions"]
