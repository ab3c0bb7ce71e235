"""Server-sent events as OpenAI-compatible servers speak them: ``data: <json>``
events separated by a blank line, ending with ``data: [DONE]``.

:class:`SSEDecoder` turns the upstream's byte stream into events without a line
length limit (the first chunk of a long prompt carries every prompt token id);
the ``event``/``data`` encoders write what the client reads.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


class SSEDecoder:
    """Feed bytes as they arrive; get back each complete event's data (the
    ``data:`` lines of the event joined by newlines). Comments and other fields
    are ignored. Not thread-safe (one per upstream response)."""

    def __init__(self) -> None:
        self._buf = b""
        self._cr = b""  # a trailing CR whose LF may come with the next chunk

    def feed(self, chunk: bytes) -> list[str]:
        data, self._cr = self._cr + chunk, b""
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], b"\r"
        self._buf += data.replace(b"\r\n", b"\n")
        events = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                return events
            block, self._buf = self._buf[:end], self._buf[end + 2:]
            data = [line[5:].lstrip(b" ") if line.startswith(b"data:") else None for line in block.split(b"\n")]
            data = [d for d in data if d is not None]
            if data:
                events.append(b"\n".join(data).decode("utf-8", "replace"))

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished event are buffered (a stream cut mid-event)."""
        return bool(self._buf.strip())


def event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_object(message: str, status: int = 503, kind: str = "ServiceUnavailableError") -> dict[str, Any]:
    """The OpenAI error body vLLM uses, mid-stream and in error responses."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_event(message: str, status: int = 503, kind: str = "ServiceUnavailableError") -> bytes:
    """An error event and the end of the stream: OpenAI clients raise ``APIError`` on it."""
    return event(error_object(message, status, kind)) + DONE
