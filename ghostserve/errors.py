"""Every error ghostserve raises on purpose.

One base class, :class:`GhostServeError`, and subclasses that carry the
failing rank, block, shard or erasure pattern as attributes. :data:`STATUS` is
the one table between these classes and gRPC status codes, used both ways: the
daemon answers a refusal with its class's code (``ghostserve.wire.status_for``)
and a client raises the class of the code it got back (:func:`from_status`),
so a caller catches the same class on either side of the wire.

Each class says who raises it. This module imports nothing (the codec and the
inert SGLang plug-in load it): code names are strings here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class GhostServeError(Exception):
    """Base of every ghostserve error. Catch this to catch them all. An error a
    client rebuilt from a daemon's answer has ``code`` (the gRPC status code's
    name) and the daemon's message; its other attributes are None."""

    code: str | None = None


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


class StoreError(DaemonError):
    """The off-node store (Mooncake Store, ``--store``) could not be reached or
    refused an operation. Raised by ``ghostserve.daemon.offnode.store``; the mirror
    counts it and goes on (local protection never depends on the store), and a
    Fetch from the store answers UNAVAILABLE."""


class ForeignStore(GhostServeError):
    """Segments under this daemon's prefix belong to another daemon: one whose
    shared-memory prefix is longer and starts with this one's (a chaos run under
    the node's prefix). Raised by ``ParityStore.open``; a re-attaching daemon
    leaves such groups alone."""


class DaemonUnavailable(GhostServeError):
    """The client found no daemon on the socket (or it went away). Raised by
    ``ghostserve.client`` and ``ghostserve status``."""


class DaemonInternalError(DaemonError):
    """The daemon failed on a valid request: a daemon bug, logged there with its
    traceback (gRPC ``INTERNAL``). Raised by ``ghostserve.client``."""


class DaemonStartError(GhostServeError):
    """The daemon cannot start here: another daemon serves the socket or the
    shared-memory prefix. Raised by ``ghostserve.daemon.server.Server.start``;
    nothing is changed."""


class SidecarError(GhostServeError):
    """A private daemon subprocess did not start. Raised by
    ``ghostserve.sidecar.Sidecar.start``."""


# --------------------------------------------------------------------------- configuration and command line


class ConfigError(GhostServeError, ValueError):
    """A configuration value is invalid. ``field`` names it. Raised by
    ``ghostserve.config.Config()`` and the other configuration dataclasses."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UsageError(GhostServeError):
    """The command line does not parse; ``parser`` is the (sub)parser that said so.
    Raised by ``ghostserve.cli.ArgumentParser`` instead of exiting, so ``main`` can
    still answer ``--json`` with one object."""

    def __init__(self, parser: Any, message: str):
        self.parser, self.message = parser, message
        super().__init__(message)


class MissingExtra(GhostServeError):
    """A command needs an optional extra that is not installed. ``extra`` names
    it, ``module`` the module that could not be found. Raised by
    ``ghostserve.extras.require``; the CLI prints it as one line and exits 2."""

    def __init__(self, extra: str, what: str, module: str):
        self.extra, self.what, self.module = extra, what, module
        super().__init__(f"{what} needs the {extra!r} extra ({module} is not installed): "
                         f"pip install 'ghostserve[{extra}]'")


class DemoOptionError(GhostServeError, ValueError):
    """A ``ghostserve demo`` option has a value the demo cannot run with; the
    message names the option and the value. Raised by
    ``ghostserve.demo_options.check_demo_args``."""


class ChaosError(GhostServeError):
    """The chaos harness itself could not run (the daemon did not start, a worker
    could not register or died unasked), or protection stalled. Raised by
    ``ghostserve.chaos.harness.Chaos``."""


class ChaosOptionError(ChaosError, ValueError):
    """A chaos option has a value the run cannot use; the message names the option
    and the value. Raised before anything is started (the CLI exits 2)."""


# --------------------------------------------------------------------------- reference engine


class EngineError(GhostServeError):
    """The reference engine cannot go on: a rank reported an error, did not
    answer in time, or a failure could not be recovered. Raised by
    ``ghostserve.engine.Engine`` methods."""


class EngineConfigError(EngineError, ValueError):
    """An ``EngineConfig`` or ``Kill`` that cannot run. Raised at construction."""


class ModelConfigError(GhostServeError, ValueError):
    """A model configuration that cannot run (or cannot be split over ``tp`` ranks),
    or a weights directory that does not match it. Raised by
    ``ghostserve.engine.model.ModelConfig`` and ``load_weights``."""


class SchedulerError(GhostServeError, ValueError):
    """A request that can never run (longer than the pool), or a bad request.
    Raised by ``ghostserve.engine.scheduler``."""


class ProtectionError(GhostServeError):
    """A protection mode could not start or restore (daemon refused, replica
    missing). Raised by ``ghostserve.engine.protect``."""


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


class UpstreamFailure(FrontError):
    """The engine failed under a request (see ``ghostserve.front.upstream``).
    ``accepted``: the upstream had answered 200 before it failed."""

    def __init__(self, reason: str, accepted: bool):
        self.reason, self.accepted = reason, accepted
        super().__init__(reason)


class UpstreamRejected(FrontError):
    """A healthy upstream refused or failed this request. ``status`` and ``body``
    (bytes, ``content_type``) are its response; ``streamed`` if it came as an error
    event after a 200. Raised by ``ghostserve.front.upstream``."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json", streamed: bool = False):
        self.status, self.body, self.content_type, self.streamed = status, body, content_type, streamed
        super().__init__(f"upstream answered {status}")


class EngineFailed(FrontError):
    """``ghostserve vllm`` could not keep an engine up: it did not start within
    ``--startup-timeout``, or the restart budget is spent. Raised by
    ``ghostserve.front.supervisor``; the command exits 1."""


# --------------------------------------------------------------------------- the wire

# The one table between errors and gRPC status codes. A daemon answers a refusal
# with the code of the error's nearest class here (anything else is a bug:
# INTERNAL); a client raises, for a code, the first class listed with it (the
# more specific classes after it on the same code exist only on the daemon's side).
STATUS: dict[type[GhostServeError], str] = {
    InvalidRequest: "INVALID_ARGUMENT",
    CodecError: "INVALID_ARGUMENT",
    UnknownGroup: "NOT_FOUND",
    UnknownRank: "NOT_FOUND",
    DuplicateRank: "ALREADY_EXISTS",
    RegionInUse: "ALREADY_EXISTS",
    BlockOutOfRange: "OUT_OF_RANGE",
    WrongState: "FAILED_PRECONDITION",
    GpuUnavailable: "FAILED_PRECONDITION",
    RegionRefused: "PERMISSION_DENIED",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
    Unsupported: "UNIMPLEMENTED",
    DaemonInternalError: "INTERNAL",
    DaemonUnavailable: "UNAVAILABLE",
    StoreError: "UNAVAILABLE",
}
# codes no daemon answers on purpose but a client sees: the connection's
_TRANSPORT = {"DEADLINE_EXCEEDED": DaemonUnavailable, "CANCELLED": DaemonUnavailable, "UNKNOWN": DaemonInternalError}


def status_name(exc: GhostServeError) -> str:
    """The status code's name for ``exc``: its nearest class's in :data:`STATUS`,
    else INTERNAL (an error nobody mapped is a bug)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return "INTERNAL"


def _classes(base: type[GhostServeError] = GhostServeError) -> dict[str, type[GhostServeError]]:
    out: dict[str, type[GhostServeError]] = {base.__name__: base}
    for sub in base.__subclasses__():
        out.update(_classes(sub))
    return out


def from_status(code: str, message: str, name: str | None = None) -> GhostServeError:
    """The error a client raises for a daemon's answer ``code`` (a status code's
    name) with ``message``: the class the daemon named (``name``) if it is one of
    these with that code, else the first class :data:`STATUS` lists for the code."""
    named = _classes().get(name or "")
    cls: type[GhostServeError]
    if named is not None and status_name(named.__new__(named)) == code:
        cls = named
    else:
        cls = next((c for c, s in STATUS.items() if s == code), None) or _TRANSPORT.get(code, DaemonError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.code = code
    for attr in _CARRIED:  # what the daemon's instance carried is in the message
        setattr(exc, attr, None)
    return exc


# the attributes the classes above carry (None on an error rebuilt from the wire)
_CARRIED = ("group", "rank", "block", "region", "what", "index", "expected", "got", "erased", "rows", "backend")
