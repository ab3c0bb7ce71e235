"""The gRPC edge, shared by the daemon and its clients.

* :data:`SERVICES`: every RPC of ``ghostserve.v1`` (service, method, request and
  response classes, streaming or not), read from the proto's own descriptor. It
  is the one service description: the clients' stubs (:func:`stub`) and the
  daemon's handlers (``ghostserve.daemon.service``) are both built from it, so a
  method added to the proto is missing from neither without a test failing.
* Errors both ways, over :data:`ghostserve.errors.STATUS`: the daemon answers a
  refusal with :func:`status_for` and names the error's class in the trailing
  metadata (:data:`ERROR_KEY`); a client raises :func:`error_from` (that class,
  with the daemon's message) instead of a bare ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ghostserve import errors
from ghostserve.v1 import ghostserve_pb2 as pb

PACKAGE = "ghostserve.v1"
ERROR_KEY = "ghostserve-error"  # trailing metadata: the class of a refusal


@dataclass(frozen=True)
class Method:
    """One RPC as the proto declares it."""

    service: str               # "Worker", "Operator"
    name: str                  # "Register", ...
    request: Any               # the request message class
    response: Any              # the response message class
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{PACKAGE}.{self.service}/{self.name}"


def _services() -> dict[str, dict[str, Method]]:
    out: dict[str, dict[str, Method]] = {}
    for name, svc in pb.DESCRIPTOR.services_by_name.items():
        out[name] = {m.name: Method(name, m.name, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name),
                                    m.client_streaming, m.server_streaming) for m in svc.methods}
    return out


SERVICES: dict[str, dict[str, Method]] = _services()


def full_name(service: str) -> str:
    return f"{PACKAGE}.{service}"


# ------------------------------------------------------------------ errors


def status_for(exc: errors.GhostServeError) -> grpc.StatusCode:
    """The status code a daemon answers ``exc`` with (:func:`ghostserve.errors.status_name`)."""
    return grpc.StatusCode[errors.status_name(exc)]


def error_from(exc: grpc.RpcError) -> errors.GhostServeError:
    """The ghostserve error a failed call stands for: the class the daemon named
    (trailing metadata), else the class :data:`~ghostserve.errors.STATUS` gives
    the code; the message is the daemon's."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    named = None
    if hasattr(exc, "trailing_metadata"):
        named = next((v for k, v in (exc.trailing_metadata() or ()) if k == ERROR_KEY), None)
    return errors.from_status(code.name, details, named)


class Stub:
    """A service's methods as attributes. Typed (the default): a failed call
    raises :func:`error_from`'s error. Raw: grpc's multicallables, which raise
    ``grpc.RpcError`` (tests of the wire itself, and streams)."""

    def __init__(self, channel: grpc.Channel, service: str, raw: bool = False):
        for name, m in SERVICES[service].items():
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                        (m.client_streaming, m.server_streaming)]
            call = kind(m.path, request_serializer=m.request.SerializeToString,
                        response_deserializer=m.response.FromString)
            setattr(self, name, call if raw or m.client_streaming or m.server_streaming else _typed(call))


def _typed(call: Callable[..., Any]) -> Callable[..., Any]:
    def typed(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except grpc.RpcError as exc:
            raise error_from(exc) from exc
    return typed


def stub(channel: grpc.Channel, service: str, raw: bool = False) -> Any:
    """A :class:`Stub` of ``service`` ("Worker" or "Operator") on ``channel``."""
    return Stub(channel, service, raw)


__all__ = ["ERROR_KEY", "SERVICES", "Method", "Stub", "error_from", "full_name", "status_for", "stub"]
