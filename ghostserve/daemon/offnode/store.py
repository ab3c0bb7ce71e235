"""The store the mirror writes to: a small interface and its Mooncake Store client.

:class:`RemoteStore` is all the mirror asks of a store. :class:`MooncakeStore`
implements it over Mooncake's Python client (``mooncake.store``, from the
``ghostserve[mooncake]`` extra), imported only when a daemon is given
``--store``. The daemon joins the cluster as a client that also contributes a
segment of its host memory; objects are placed on other nodes' segments by a
preference, which Mooncake treats as a hint, so :meth:`RemoteStore.put` reports
where the replica really landed.

Mooncake's calls answer integers (0: done, negative: an error code); they are
turned into :class:`StoreError` (or an outcome) here and nowhere else.
Threads: one client, used by the mirror's thread and by Lookup/Fetch handlers;
Mooncake's client is thread-safe.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from ghostserve.errors import ConfigError, StoreError

log = logging.getLogger("ghostserve.offnode")

# Mooncake's error codes seen from its Python client (the ones ghostserve acts on)
OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706   # read recently: removable once the lease (master's default_kv_lease_ttl) ends
RPC_FAIL = -900           # the master did not answer
_NAMES = {OBJECT_NOT_FOUND: "object not found", OBJECT_HAS_LEASE: "object has a lease", RPC_FAIL: "master unreachable",
          -200: "no segment has room"}
MIN_SEGMENT_BYTES = 16 << 20  # Mooncake refuses smaller segments


def describe(code: int) -> str:
    return f"mooncake error {code} ({_NAMES.get(code, 'see Mooncake error codes')})"


class PutOutcome(StrEnum):
    """What :meth:`RemoteStore.put` did."""

    STORED = "stored"        # on another node's segment
    LOCAL = "local"          # Mooncake placed it on this node's own segment: removed again, not mirrored
    NO_ROOM = "no_room"      # no other node's segment could take it
    HELD_HERE = "held_here"  # another node's copy lies on this node's own segment (a request resumed here)


@dataclass(frozen=True)
class StoreUrl:
    """``mooncake://HOST:PORT[?metadata=URL&admin=HOST:PORT]``: the master's RPC
    address; its metadata service (default ``P2PHANDSHAKE``: none) and its admin
    HTTP address (default HOST:9003, the master's ``--metrics_port``)."""

    master: str
    metadata: str
    admin: str

    @classmethod
    def parse(cls, url: str) -> StoreUrl:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "mooncake" or not u.hostname or not u.port:
            raise ConfigError("store", f"{url!r}: give mooncake://HOST:PORT")
        q = dict(urllib.parse.parse_qsl(u.query))
        unknown = set(q) - {"metadata", "admin"}
        if unknown:
            raise ConfigError("store", f"{url!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
        return cls(f"{u.hostname}:{u.port}", q.get("metadata", "P2PHANDSHAKE"), q.get("admin", f"{u.hostname}:9003"))


@dataclass(frozen=True)
class Segment:
    """One node's segment as the master lists it."""

    name: str
    capacity: int
    used: int
    endpoint: str = ""   # its transfer endpoint: what replica descriptors name


class RemoteStore(Protocol):
    """What the mirror needs of a store. Every method raises :class:`StoreError`
    when the store cannot be reached or refuses for another reason."""

    segment: str   # this node's own segment (objects placed there do not survive the node)

    def put(self, key: str, data: bytes, target: str) -> PutOutcome:
        """Store ``data`` under ``key``, preferably on segment ``target``; an existing
        object under ``key`` is left as it is (same key: same bytes)."""

    def exists(self, keys: list[str]) -> list[bool]: ...

    def locate(self, key: str) -> list[str] | None:
        """The segments (as replica descriptors name them) holding ``key`` (None: absent)."""

    def own_names(self) -> set[str]:
        """The names replica descriptors give this node's own segment."""

    def size(self, key: str) -> int:
        """Bytes of ``key``'s object (0 if absent)."""

    def get(self, key: str) -> bytes | None:
        """The object's bytes (None: no such object)."""

    def remove(self, key: str) -> bool:
        """True once ``key`` is gone; False while it cannot be removed yet (a lease)."""

    def segments(self) -> list[Segment]:
        """Every node's segment the master knows."""

    def close(self) -> None: ...


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MooncakeStore:
    """A daemon's membership in a Mooncake Store cluster (see the module doc)."""

    def __init__(self, url: StoreUrl, address: str, segment_bytes: int, buffer_bytes: int = MIN_SEGMENT_BYTES):
        os.environ.setdefault("GLOG_minloglevel", "1")  # Mooncake's INFO lines would flood the daemon's log
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as exc:
            raise ConfigError("store", f"Mooncake's client is not installed ({exc}): "
                                       "pip install 'ghostserve[mooncake]'") from None
        self._replicate = ReplicateConfig
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
        host = host or "127.0.0.1"
        self.segment = f"{host}:{port or free_port(host)}"
        self._endpoint = ""
        self.url = url
        # Mooncake's transfer engine picks an interface itself unless told (loopback in tests)
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", host)
        self._client = MooncakeDistributedStore()
        rc = self._client.setup(self.segment, url.metadata, segment_bytes, buffer_bytes, "tcp", "", url.master)
        if rc != 0:
            raise StoreError(f"joining the store at {url.master} as {self.segment} failed: {describe(rc)}")
        log.info("joined Mooncake Store %s as %s with a segment of %d bytes", url.master, self.segment, segment_bytes)

    def put(self, key: str, data: bytes, target: str) -> PutOutcome:
        cfg = self._replicate()
        cfg.replica_num = 1
        cfg.with_hard_pin = True   # mirrors are removed with their request, never evicted
        if target:
            cfg.preferred_segment = target
        rc = self._client.put(key, data, cfg)
        if rc == -200:
            return PutOutcome.NO_ROOM
        if rc != 0:
            raise StoreError(f"put {key}: {describe(rc)}")
        where = self.where(key)
        if where and all(w in self.own_names() for w in where):
            self.remove(key)
            return PutOutcome.LOCAL
        return PutOutcome.STORED

    def locate(self, key: str) -> list[str] | None:
        """Where ``key``'s replicas are (None: no such object)."""
        return self.where(key) if self.exists([key])[0] else None

    def size(self, key: str) -> int:
        n = self._client.get_size(key)
        return max(0, int(n))

    def own_names(self) -> set[str]:
        """This node's segment as descriptors name it (its transfer endpoint: with
        Mooncake's P2P handshake not the segment's name)."""
        if not self._endpoint:
            self._endpoint = next((s.endpoint for s in self.segments() if s.name == self.segment), "")
        return {self.segment, self._endpoint} - {""}

    def where(self, key: str) -> list[str]:
        """The segments holding ``key``'s replicas (its replica descriptors)."""
        out = []
        for r in self._client.get_replica_desc(key):
            if r.is_memory_replica():
                out.append(str(r.get_memory_descriptor().buffer_descriptor.transport_endpoint))
        return out

    def exists(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        codes = self._client.batch_is_exist(keys)
        if any(c < 0 for c in codes):
            raise StoreError(f"exists: {describe(min(codes))}")
        return [c == 1 for c in codes]

    def get(self, key: str) -> bytes | None:
        data = self._client.get(key)
        if data:
            return bytes(data)
        size = self._client.get_size(key)
        if size == OBJECT_NOT_FOUND or size == 0:
            return None
        raise StoreError(f"get {key}: {describe(size) if size < 0 else 'no bytes came'}")

    def remove(self, key: str) -> bool:
        rc = self._client.remove(key, True)  # force: past a reader's lease (ours to remove; a reader then misses)
        if rc in (0, OBJECT_NOT_FOUND):
            return True
        if rc == OBJECT_HAS_LEASE:
            return False
        raise StoreError(f"remove {key}: {describe(rc)}")

    def segments(self) -> list[Segment]:
        try:
            with urllib.request.urlopen(f"http://{self.url.admin}/get_segments_detail", timeout=2) as resp:
                body = json.loads(resp.read() or b"{}")
        except (OSError, ValueError, urllib.error.URLError) as exc:
            raise StoreError(f"the master's admin address {self.url.admin} did not answer: {exc}") from None
        return [Segment(s["segment_name"], int(s.get("allocator_capacity_bytes", 0)),
                        int(s.get("allocator_used_bytes", 0)), str(s.get("te_endpoint", ""))) for s in body.get("segments", [])]

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # leaving a cluster whose master is gone
            log.debug("closing the Mooncake client failed", exc_info=True)


def open_store(url: str, address: str, segment_bytes: int) -> Any:
    """Join the store named by ``url`` (:class:`StoreUrl`). Raises ConfigError, StoreError."""
    return MooncakeStore(StoreUrl.parse(url), address, segment_bytes)


__all__ = ["MIN_SEGMENT_BYTES", "MooncakeStore", "PutOutcome", "RemoteStore", "Segment", "StoreUrl", "open_store"]
