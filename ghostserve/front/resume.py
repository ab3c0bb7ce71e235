"""Which requests the front can continue after an engine failure, and how.

A request is *resumable* when its continuation depends only on the prompt's
token ids and the tokens generated so far: then the front resubmits it as a
completion whose prompt is those token ids, asking for the rest
(:func:`continuation`), and the new engine's ghostserve connector loads the KV
instead of prefilling it. Greedy requests continue token for token; seeded
sampling continues validly but with a fresh random stream.

Everything else is passed through unchanged and, if the engine fails under it,
ended with an error (:func:`refusal` says why). The list is an allow-list:
a parameter this module does not know (a newer vLLM's) makes a request
unresumable rather than risk continuing it wrongly.
"""

from __future__ import annotations

from typing import Any

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# Parameters whose effect on token t depends only on the tokens before it (or
# nothing), so prompt + generated tokens carry all the state; copied as given.
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop_token_ids", "ignore_eos",
             "logit_bias", "allowed_token_ids", "repetition_penalty",  # vLLM: over prompt + output alike
             "skip_special_tokens", "spaces_between_special_tokens", "priority", "user", "cache_salt",
             "stream_interval", "session_id")
_COMMON = {"model", "stream", "stream_options", "max_tokens", "min_tokens", "stop", "include_stop_str_in_output",
           "return_token_ids", "request_id", "n", "frequency_penalty", "presence_penalty",
           "truncate_prompt_tokens", "truncation_side", "add_special_tokens", "response_format",
           *_SAMPLING}
_ALLOWED = {
    COMPLETIONS: _COMMON | {"prompt", "logprobs", "logprob_token_ids", "return_tokens_as_token_ids", "echo"},
    CHAT: _COMMON | {"messages", "max_completion_tokens", "chat_template", "chat_template_kwargs",
                     "add_generation_prompt", "continue_final_message", "tools", "tool_choice", "logprobs",
                     "top_logprobs", "echo", "documents"},
}


def refusal(path: str, body: dict[str, Any], upstream_parses_chat: bool = False) -> str | None:
    """Why ``body`` (a request to ``path``) cannot be continued faithfully after a
    failure, or None if it can."""
    unknown = sorted(k for k in body if k not in _ALLOWED[path] and body[k] is not None)
    if unknown:
        return f"parameter {unknown[0]!r} (the front continues only requests whose parameters it knows)"
    if body.get("n", 1) not in (1, None):
        return "n > 1"
    if body.get("echo"):
        return "echo"
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name):  # counts generated tokens only: they would become prompt tokens
            return f"{name} (it counts generated tokens, which a continuation sees as prompt)"
    fmt = body.get("response_format")
    if fmt and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        return "structured output (response_format): the grammar's state is not in the tokens"
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or any(v for k, v in opts.items() if k != "include_usage")):
        return "stream_options other than include_usage"
    if not isinstance(body.get("stop", None) or [], str | list):
        return "stop is neither a string nor a list"
    if body.get("stop") and body.get("stream_interval"):
        return "stop strings with stream_interval"  # a chunk's text could not be split by token
    if path == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) != 1:
            return "several prompts in one request"
        if body.get("logprob_token_ids") and body.get("logprobs") is None:
            return "logprob_token_ids without logprobs"
        return None
    if upstream_parses_chat:
        return "the upstream parses chat output (a reasoning or tool-call parser)"
    if body.get("tools") and body.get("tool_choice", "auto") != "none":
        return "tools (tool calls are parsed from the output)"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "chat logprobs"
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return "non-text message content (images, audio, files)"
    return None


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def first_submission(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The request as the front sends it upstream the first time: streaming with
    usage and token ids (so the front knows what was generated), and stop
    strings kept in the output (the front holds back and strips them itself, so
    that no generated text is hidden inside the engine when it dies)."""
    up = dict(body, stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    if stop_strings(body):
        up["include_stop_str_in_output"] = True
    return up


def max_new_tokens(path: str, body: dict[str, Any], prompt_tokens: int, max_model_len: int | None) -> int | None:
    """How many tokens the request may generate in all (vLLM's defaults: 16 for
    a completion, the rest of the context for a chat). None if unknown."""
    for name in ("max_completion_tokens", "max_tokens") if path == CHAT else ("max_tokens",):
        if body.get(name) is not None:
            value = int(body[name])
            return value if max_model_len is None else min(value, max_model_len - prompt_tokens)
    if path == COMPLETIONS:
        return 16
    return None if max_model_len is None else max_model_len - prompt_tokens


def continuation(path: str, body: dict[str, Any], prompt_ids: list[int], generated: list[int],
                 max_model_len: int | None) -> dict[str, Any]:
    """The completion request that continues ``body`` after ``generated``: prompt
    + generated token ids as the prompt, the same sampling parameters, the
    remaining token budget (and ``min_tokens``). Streaming, with usage and token
    ids, like :func:`first_submission`."""
    up: dict[str, Any] = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    up.update(model=body.get("model"), prompt=list(prompt_ids) + list(generated), stream=True,
              stream_options={"include_usage": True}, return_token_ids=True, add_special_tokens=False)
    if up["model"] is None:
        del up["model"]
    total = max_new_tokens(path, body, len(prompt_ids), max_model_len)
    if total is not None:
        up["max_tokens"] = max(1, total - len(generated))
    if body.get("min_tokens"):
        up["min_tokens"] = max(0, int(body["min_tokens"]) - len(generated))
    if stop_strings(body):
        up["stop"] = stop_strings(body)
        up["include_stop_str_in_output"] = True
    if path == COMPLETIONS:
        for k in ("logprobs", "logprob_token_ids", "return_tokens_as_token_ids"):
            if body.get(k) is not None:
                up[k] = body[k]
    return up
