"""Every error ghostserve raises on purpose.

One base class, :class:`GhostServeError`, and a few subclasses that carry the
failing rank, block, shard or erasure pattern as attributes. The gRPC layer maps
each class to a status code through :data:`GRPC_STATUS` (one table, in
``ghostserve.daemon.status_codes``), so a client sees the same meaning on the wire.

Each class says who raises it.
"""

from __future__ import annotations

from collections.abc import Sequence


class GhostServeError(Exception):
    """Base of every ghostserve error. Catch this to catch them all."""


# --------------------------------------------------------------------------- codec


class CodecError(GhostServeError):
    """Base of the errors raised by :mod:`ghostserve.codec`."""


class InvalidCodeParameters(CodecError, ValueError):
    """``RSCode(k, m)`` with k < 1, m < 1 or k + m > 255 (GF(2^8) has 255 usable
    evaluation points for a Cauchy matrix). Raised by ``RSCode.__init__``."""

    def __init__(self, k: int, m: int, reason: str):
        self.k, self.m = k, m
        super().__init__(f"invalid Reed-Solomon code k={k}, m={m}: {reason}")


class ShardError(CodecError, ValueError):
    """A shard argument is not usable: wrong dtype, wrong count, not writable,
    not a byte buffer. ``index`` is the offending shard (or None for the whole
    argument). Raised by ``RSCode.encode``, ``encode_into``, ``reconstruct`` and
    ``verify`` before any byte is written."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        super().__init__(message if index is None else f"shard {index}: {message}")


class ShardSizeMismatch(ShardError):
    """Shards of one call differ in length (or are empty). ``index`` is the first
    shard whose length differs from ``expected``. Raised by every ``RSCode`` call."""

    def __init__(self, index: int, expected: int, got: int):
        self.expected, self.got = expected, got
        super().__init__(f"length {got} bytes, expected {expected}", index)


class TooManyErasures(CodecError):
    """More shards are erased than the code has parity (or an erased index is out
    of range). ``erased`` is the pattern asked for, ``m`` the parity count.
    Raised by ``RSCode.reconstruct``. Nothing is written."""

    def __init__(self, erased: Sequence[int], m: int, reason: str | None = None):
        self.erased, self.m = tuple(erased), m
        super().__init__(reason or f"{len(self.erased)} erasures {list(self.erased)} exceed m={m}")


class SingularMatrixError(CodecError):
    """A decode matrix has no inverse over GF(2^8). ``rows`` are the surviving
    shard indices it was built from. Raised by ``gf.invert`` (and so by
    ``RSCode.reconstruct``); never happens for a Cauchy code with <= m erasures,
    but it is reported, never swallowed."""

    def __init__(self, rows: Sequence[int] | None = None):
        self.rows = tuple(rows) if rows is not None else None
        super().__init__(f"decode matrix is singular (survivor rows {self.rows})")


class BackendUnavailable(CodecError):
    """A codec backend cannot be loaded here (no ISA-L, no CuPy, no CUDA device).
    ``backend`` names it. Raised by ``ghostserve.codec.backends.load``."""

    def __init__(self, backend: str, reason: str):
        self.backend = backend
        super().__init__(f"codec backend {backend!r} is unavailable: {reason}")


# --------------------------------------------------------------------------- daemon


class DaemonError(GhostServeError):
    """Base of the errors raised by the daemon for a worker's or operator's request."""


class InvalidRequest(DaemonError):
    """A request is malformed: bad sizes, empty names, inconsistent layout,
    byte ranges outside a block. Raised by the daemon's request handlers."""


class UnknownGroup(DaemonError):
    """No group with this id is registered. ``group`` names it."""

    def __init__(self, group: str):
        self.group = group
        super().__init__(f"unknown group {group!r}")


class UnknownRank(DaemonError):
    """The rank is outside 0..N-1 of its group, or not registered. Carries ``group`` and ``rank``."""

    def __init__(self, group: str, rank: int, reason: str = "is not registered"):
        self.group, self.rank = group, rank
        super().__init__(f"rank {rank} of group {group!r} {reason}")


class DuplicateRank(DaemonError):
    """A live rank registers again. Carries ``group`` and ``rank``."""

    def __init__(self, group: str, rank: int):
        self.group, self.rank = group, rank
        super().__init__(f"rank {rank} of group {group!r} is already registered and alive")


class BlockOutOfRange(DaemonError):
    """A block id, layer or byte range is outside the registered layout. Carries
    ``group``, ``rank`` and ``block``."""

    def __init__(self, group: str, rank: int, block: int, reason: str):
        self.group, self.rank, self.block = group, rank, block
        super().__init__(f"group {group!r} rank {rank} block {block}: {reason}")


class WrongState(DaemonError):
    """The call is valid but not now: a commit from a lost rank, a restore into a
    rank that is not lost, a step that goes backwards. Carries ``group`` and ``rank``."""

    def __init__(self, group: str, rank: int | None, reason: str):
        self.group, self.rank = group, rank
        super().__init__(f"group {group!r} rank {rank}: {reason}")


class RegionRefused(DaemonError):
    """A rank's region is not memory the daemon may map for it: one of the
    daemon's own segments (a group's parity, metadata or index), or a name
    outside the configured ``--region-prefix``. Carries ``region``. Raised by
    registration, before anything is mapped."""

    def __init__(self, region: str, reason: str):
        self.region = region
        super().__init__(f"region {region!r}: {reason}")


class RegionInUse(RegionRefused):
    """The region is already registered by another rank (of this group or of
    another group that still holds it): two engines configured with the same
    names. Carries ``region``, and ``group`` and ``rank`` of the holder. Raised
    by registration; the holder is left untouched."""

    def __init__(self, region: str, group: str, rank: int):
        self.group, self.rank = group, rank
        super().__init__(region, f"already registered as rank {rank} of group {group!r}")


class ResourceExhausted(DaemonError):
    """The parity arena or a registry table is full. Carries ``what``."""

    def __init__(self, what: str):
        self.what = what
        super().__init__(f"out of {what}")


class Unsupported(DaemonError):
    """The request needs something this build does not have (a data path that
    does not exist, a layout it cannot handle). Raised by registration."""


class GpuUnavailable(DaemonError):
    """A CUDA region came to a daemon without CuPy or without a CUDA device (or
    without the device the region is on). The message says what to install or
    where to run. Raised by the CUDA data path when a group is created."""


class ForeignStore(GhostServeError):
    """Segments under this daemon's prefix belong to another daemon: one whose
    shared-memory prefix is longer and starts with this one's (a chaos run under
    the node's prefix). Raised by ``ParityStore.open``; a re-attaching daemon
    leaves such groups alone."""


class DaemonUnavailable(GhostServeError):
    """The client found no daemon on the socket (or it went away). Raised by
    ``ghostserve.client`` and ``ghostserve status``."""


# --------------------------------------------------------------------------- front


class FrontError(GhostServeError):
    """Base of the errors of ``ghostserve front`` and ``ghostserve vllm``
    (:mod:`ghostserve.front`)."""


class UpstreamUnavailable(FrontError):
    """The upstream OpenAI server does not answer, or answers that its engine is
    dead. ``url`` names it. Raised by ``ghostserve.front.upstream``; the front
    answers a new request with 503 and ``Retry-After``, and an accepted one waits
    for the upstream to come back (``--resume-wait``)."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"upstream {url}: {reason}")


class ResumeRefused(FrontError):
    """The upstream failed mid-request and the request cannot be continued
    faithfully (``reason`` says why: n > 1, structured output, a penalty that
    counts generated tokens, ...). Raised by ``ghostserve.front.resume``; the
    client's response ends with an error, never with a wrong continuation."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the engine failed mid-request and this request cannot be continued "
                         f"faithfully: {reason}")


class ResumeFailed(FrontError):
    """A request could not be resumed: the upstream did not come back within
    ``--resume-wait``, the continuation was refused by the new engine (its
    context limit), or the request was resumed too often. ``reason`` is the
    metrics label (``resume_timeout``, ``upstream_error``, ``resume_limit``)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class EngineFailed(FrontError):
    """``ghostserve vllm`` could not keep an engine up: it did not start within
    ``--startup-timeout``, or the restart budget is spent. Raised by
    ``ghostserve.front.supervisor``; the command exits 1."""
