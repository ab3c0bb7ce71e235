"""A continuation that starts inside a character.

A byte-level tokenizer splits one character over several tokens. vLLM sends a
token's text only once its bytes form whole characters (a chunk with token ids
and empty text until then). When an engine dies between the tokens of one
character, the continuation's prompt ends inside it, and vLLM's detokenizer,
primed with that prompt (``tokenizers.DecodeStream(ids=prompt)``), gets its
first piece of text wrong: it sends the text of its whole window, not what the
new tokens add. The tokens are right; after that first piece the text is too.

So the front replaces that first piece. It knows where the upstream last sent
text (:attr:`Boundary.clean_at`), so it asks the upstream to detokenize a few
tokens of context before that point, and the same context followed by the
pending tokens and the continuation's tokens so far; the difference is the text
(the way vLLM's own incremental detokenizer computes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTEXT_TOKENS = 6  # before the clean point: enough for a decoder's leading-space rules


@dataclass
class Repair:
    """One continuation's first text to rebuild: ``context`` ends where the
    upstream last sent text, ``pending`` are the generated tokens after it (of
    an unfinished character), ``new`` the continuation's tokens so far."""

    context: list[int]
    pending: list[int]
    new: list[int] = field(default_factory=list)

    def windows(self) -> tuple[list[int], list[int]]:
        """The two token lists to detokenize; the text is the second's minus the first's."""
        return self.context, self.context + self.pending + self.new


class Boundary:
    """Where one request's upstream text last ended; not thread-safe."""

    def __init__(self) -> None:
        self.clean_at = 0  # generated tokens covered by the text the upstream has sent

    def sent(self, tokens: int, text: str) -> None:
        """An upstream chunk left ``tokens`` generated in all, with ``text``."""
        if text:
            self.clean_at = tokens

    def resumed(self, prompt_ids: list[int], tokens: list[int]) -> Repair | None:
        """A continuation of ``prompt_ids`` + ``tokens`` starts: the repair its
        first text needs, or None when the upstream's text ended at ``tokens``."""
        if self.clean_at >= len(tokens):
            return None
        at = len(prompt_ids) + self.clean_at
        context = (list(prompt_ids) + list(tokens))[max(0, at - CONTEXT_TOKENS): at]
        return Repair(context, list(tokens[self.clean_at:]))

    @staticmethod
    def text(before: str, after: str) -> str | None:
        """What the new tokens add: ``after`` past ``before``; None if ``before``
        is not its prefix (a decoder that rewrites earlier text)."""
        return after[len(before):] if after.startswith(before) else None
