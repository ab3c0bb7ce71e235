"""The client's response, in the format it asked for, whichever upstream
requests produced it: streamed chunks (``text_completion`` or
``chat.completion.chunk``) and whole responses (``text_completion`` or
``chat.completion``), shaped as vLLM's OpenAI server shapes them.

A continuation is always a completion upstream; :class:`Shape` writes its
output as chat deltas when the client's request was a chat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Shape:
    """How one client request's output is written. ``want_ids``: the client
    asked for ``return_token_ids`` (otherwise token ids are left out)."""

    chat: bool
    want_ids: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    model: str = ""
    system_fingerprint: str | None = None

    def adopt(self, event: dict[str, Any]) -> None:
        """Take id, time and model from the first upstream event (kept across resumes)."""
        if not self.id and event.get("id"):
            rid = str(event["id"])
            if self.chat and rid.startswith("cmpl-"):
                rid = "chat" + rid
            self.id = rid
            self.created = int(event.get("created") or self.created)
        if not self.model and event.get("model"):
            self.model = str(event["model"])
        if event.get("system_fingerprint"):
            self.system_fingerprint = event["system_fingerprint"]

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def role_chunk(self, prompt_ids: list[int] | None) -> dict[str, Any]:
        """A chat stream's first chunk: the assistant's role (and the prompt's token ids)."""
        out = self._head("chat.completion.chunk")
        out["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}]
        if self.want_ids:
            out["prompt_token_ids"] = prompt_ids
        return out

    def chunk(self, text: str, token_ids: list[int], logprobs: dict | None, finish_reason: str | None,
              stop_reason: Any, extra: dict[str, Any] | None = None,
              prompt_ids: list[int] | None = None) -> dict[str, Any]:
        """One streamed chunk. ``extra``: chat delta fields other than content,
        passed through as the upstream sent them. ``prompt_ids``: a completion
        stream's first chunk carries them (when the client asked for ids)."""
        if self.chat:
            delta: dict[str, Any] = dict(extra or {})
            if text or not extra:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
            if self.want_ids:
                choice["token_ids"] = list(token_ids)
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                      "stop_reason": stop_reason}
            if self.want_ids:
                choice["prompt_token_ids"] = prompt_ids
                choice["token_ids"] = list(token_ids)
            out = self._head("text_completion")
        out["choices"] = [choice]
        return out

    def usage_chunk(self, usage: dict[str, Any], info: dict[str, Any] | None) -> dict[str, Any]:
        """The stream's last chunk, no choices: ``usage`` and/or ghostserve's ``info``."""
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        return self._tail(out, usage, info)

    def _tail(self, out: dict[str, Any], usage: dict[str, Any], info: dict[str, Any] | None) -> dict[str, Any]:
        """What a response ends with: ``usage`` (if any), the fingerprint, ghostserve's ``info``."""
        if usage:
            out["usage"] = usage
        if self.system_fingerprint:
            out["system_fingerprint"] = self.system_fingerprint
        if info:
            out["ghostserve"] = info
        return out

    def whole(self, text: str, token_ids: list[int], logprobs: dict | None, finish_reason: str | None,
              stop_reason: Any, usage: dict[str, Any], prompt_ids: list[int] | None,
              extra: dict[str, Any] | None, info: dict[str, Any] | None) -> dict[str, Any]:
        """A non-streamed response."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            message.update(extra or {})
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": finish_reason, "stop_reason": stop_reason}
            if self.want_ids:
                choice["token_ids"] = list(token_ids)
            out = self._head("chat.completion")
            if self.want_ids:
                out["prompt_token_ids"] = prompt_ids
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                      "stop_reason": stop_reason, "prompt_logprobs": None}
            if self.want_ids:
                choice["prompt_token_ids"] = prompt_ids
                choice["token_ids"] = list(token_ids)
            out = self._head("text_completion")
        out["choices"] = [choice]
        return self._tail(out, usage, info)


class Logprobs:
    """A completion's ``logprobs`` across resumes: a continuation's text offsets
    start at 0, so they are moved to where its text starts in the whole output."""

    KEYS = ("text_offset", "token_logprobs", "tokens", "top_logprobs")

    def __init__(self) -> None:
        self.all: dict[str, list] = {k: [] for k in self.KEYS}
        self.shift = 0
        self.next_offset = 0  # vLLM's: the last token's offset + its length

    def resumed(self) -> None:
        self.shift = self.next_offset

    def add(self, lp: dict[str, Any] | None) -> dict[str, Any] | None:
        """Shift one chunk's logprobs, remember them, return the shifted copy."""
        if not lp:
            return lp
        out = dict(lp)
        out["text_offset"] = [o + self.shift for o in lp.get("text_offset") or []]
        for k in self.KEYS:
            self.all[k].extend(out.get(k) or [])
        if out["text_offset"] and out.get("tokens"):
            self.next_offset = out["text_offset"][-1] + len(out["tokens"][-1])
        return out
