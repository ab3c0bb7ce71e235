"""The generated text of one request, as the client must see it, across resumes.

The front asks the upstream to keep stop strings in its output
(``include_stop_str_in_output``) and does vLLM's stop-string work itself, so
that when an engine dies no generated text is hidden in it:

* while streaming, the last ``max(len(stop)) - 1`` characters are held back
  (what vLLM does when stop strings are excluded from the output);
* a stop string the engine matched is cut off the end again, unless the client
  asked to include it; a stop *token*'s text is dropped the same way;
* after a resume, the new engine only sees its own text, so a stop string that
  began before the resume and ends after it is matched here, with vLLM's rule
  (the match that completes earliest; ties by list order; not before
  ``min_tokens`` tokens).

Per-token boundaries are those of the upstream's chunks: one token per chunk
unless ``stream_interval`` is set (refused with stop strings in ``resume``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Delta:
    """What one upstream chunk adds for the client: ``text`` to emit now, and,
    if the request ended here, its ``finish_reason`` and ``stop_reason``."""

    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cut: bool = False  # the front ended the request (a stop string across a resume): cancel upstream


class TextStream:
    """One request's text. Feed every upstream chunk to :meth:`add`; call
    :meth:`resumed` when a continuation starts. Not thread-safe."""

    def __init__(self, stop: list[str], include_stop: bool, min_tokens: int, forced_include: bool):
        self.stop = list(stop)
        self.include = include_stop
        self.forced = forced_include  # upstream includes stop strings because the front asked it to
        self.min_tokens = min_tokens
        self.hold = max(len(s) for s in self.stop) - 1 if self.stop and not include_stop else 0
        self.text = ""               # all generated text so far (a matched stop string cut per the client)
        self.emitted = 0             # characters of it the client has been given
        self.tokens = 0
        self.attempt_start = 0       # where the current upstream attempt's text begins
        self.finished = False

    def resumed(self) -> None:
        self.attempt_start = len(self.text)

    def add(self, text: str, ntokens: int, finish_reason: str | None, stop_reason: int | str | None) -> Delta:
        if self.finished:
            return Delta("")
        prev_len = len(self.text)
        self.text += text
        self.tokens += ntokens
        candidates = []  # (end, list order, stop string, start)
        if self.attempt_start and text and self.tokens > self.min_tokens:
            for order, s in enumerate(self.stop):
                # vLLM searches from where this step's new text starts, minus the string's length
                at = self.text.find(s, max(0, prev_len - len(s) + 1))
                if at != -1 and at < self.attempt_start:  # begins before the resume: the engine cannot see it
                    candidates.append((at + len(s), order, s, at))
        if finish_reason == "stop" and isinstance(stop_reason, str) and stop_reason in self.stop:
            # the engine matched it; with stop strings the upstream always keeps them in its text
            end = len(self.text)
            candidates.append((end, self.stop.index(stop_reason), stop_reason, end - len(stop_reason)))
        if candidates:
            end, _, s, start = min(candidates)
            self.text = self.text[: end if self.include else start]
            self.finished = True
            return Delta(self._take(), "stop", s, cut=finish_reason is None)
        if finish_reason is not None:
            if finish_reason == "stop" and self.forced and ntokens == 1:
                # a stop token (EOS, stop_token_ids): vLLM leaves its text out unless asked to include it
                self.text = self.text[:prev_len]
            self.finished = True
            return Delta(self._take(), finish_reason, stop_reason)
        return Delta(self._take())

    def _take(self) -> str:
        limit = len(self.text) if self.finished else len(self.text) - self.hold
        if limit <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:limit], limit
        return out
