"""What the engine integrations (the vLLM connector, the SGLang plug-in) share.

* :class:`ShardMap`: TP ranks to the group's data shards when KV heads are
  replicated over ranks (fewer KV heads than TP ranks: ranks holding the same
  heads hold the same KV, so only the first of each replica set is a shard).
* :func:`fills_of`: which slots of each block (page) a step's writes filled.
* :func:`namespace_of`: the Lookup scope of a model and its numerics.
* :func:`register`: registration that waits out a restarting daemon and, if it
  stays away, lets the engine run unprotected and says so.

No engine is imported here (the SGLang plug-in loads this in every SGLang process).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ghostserve import shm
from ghostserve.errors import ConfigError, DaemonUnavailable

log = logging.getLogger("ghostserve.integrations")

MAX_SHARDS = 255  # data + parity shards of one stripe: GF(2^8)


@dataclass(frozen=True)
class ShardMap:
    """``tp`` ranks over ``kv_heads`` KV heads: ranks r and r' hold the same KV
    when ``r // replicas == r' // replicas``."""

    tp: int
    replicas: int

    @classmethod
    def of(cls, tp: int, kv_heads: int) -> ShardMap:
        return cls(tp, tp // kv_heads if 0 < kv_heads < tp else 1)

    @property
    def shards(self) -> int:
        """Data shards of the group: one per distinct KV."""
        return self.tp // self.replicas

    def shard(self, rank: int) -> int:
        """The group rank of TP rank ``rank``'s KV."""
        return rank // self.replicas

    def primary(self, rank: int) -> int:
        """The rank whose KV ``rank``'s equals (itself unless a replica)."""
        return rank - rank % self.replicas

    def is_replica(self, rank: int) -> bool:
        """Holds a copy of another rank's KV: it needs no parity and registers nothing."""
        return rank % self.replicas != 0

    def check_parity(self, parity: int, field: str) -> None:
        """Raise :class:`ConfigError` (naming ``field``) unless the code fits GF(2^8)."""
        if self.shards + parity > MAX_SHARDS:
            raise ConfigError(field, f"{parity}: with {self.shards} data shards (TP {self.tp}) at most "
                              f"{MAX_SHARDS - self.shards} parity shards fit")


def fills_of(slots: np.ndarray, block_slots: int) -> dict[int, int]:
    """block -> filled slots, for the slots a step wrote (a block fills in slot order)."""
    if not slots.size:
        return {}
    blocks, offs = np.divmod(slots, block_slots)
    order = np.lexsort((offs, blocks))
    blocks, offs = blocks[order], offs[order]
    last = np.r_[blocks[1:] != blocks[:-1], True]
    return dict(zip(blocks[last].tolist(), (offs[last] + 1).tolist(), strict=True))


def namespace_of(parts: Sequence[Any]) -> str:
    """The Lookup scope of a KV: a hash of what it was computed with (model,
    revision, dtypes, quantisation, block size, TP size, ...)."""
    return hashlib.sha256(repr(list(parts)).encode()).hexdigest()[:32]


def register(client: Any, wait: float, rank: int, region: str) -> bool:
    """Register ``client`` (a :class:`~ghostserve.client.WorkerClient`), waiting up
    to ``wait`` seconds for a daemon that does not answer. True if protected. If
    no daemon came, the engine must not die for it: the rank runs unprotected,
    says so at ERROR level, and its KV segment ``region`` ("" for GPU KV) is unlinked at once
    (nobody will map it by name: it goes with the process). A daemon that
    refuses the rank raises its error (a misconfiguration fails the start)."""
    try:
        client.register(wait=wait)
        return True
    except DaemonUnavailable as exc:
        if region:  # GPU KV has no segment: its memory goes with the process anyway
            shm.unlink(region)
        log.error("ghostserve: rank %d runs UNPROTECTED: %s. Its KV is not checkpointed; a failure of this "
                  "engine recomputes its requests", rank, exc)
        return False


__all__ = ["MAX_SHARDS", "ShardMap", "fills_of", "namespace_of", "register"]
