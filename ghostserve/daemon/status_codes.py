"""The one table from ghostserve errors to gRPC status codes."""

from __future__ import annotations

import grpc

from ghostserve import errors

GRPC_STATUS: dict[type[errors.GhostServeError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownGroup: grpc.StatusCode.NOT_FOUND,
    errors.UnknownRank: grpc.StatusCode.NOT_FOUND,
    errors.DuplicateRank: grpc.StatusCode.ALREADY_EXISTS,
    errors.BlockOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RegionRefused: grpc.StatusCode.PERMISSION_DENIED,
    errors.RegionInUse: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    errors.GpuUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DaemonUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: errors.GhostServeError) -> grpc.StatusCode:
    """The status code of ``exc``: the entry of its nearest class in the table."""
    for cls in type(exc).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]
    return grpc.StatusCode.INTERNAL  # not in the table: a GhostServeError nobody mapped is a bug
