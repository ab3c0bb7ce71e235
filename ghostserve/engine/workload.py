"""Request sets for the engine's demo, benchmarks and tests: seeded, so two runs
(failure-free and with faults, or two protection modes) see the same requests."""

from __future__ import annotations

import random

from ghostserve.engine.scheduler import Request


def fixed(n: int, prompt_tokens: int, new_tokens: int, vocab: int, seed: int = 0,
          spread: int = 0, stagger: int = 1) -> list[Request]:
    """``n`` requests; request i has ``prompt_tokens + i * spread`` prompt tokens and
    arrives at step ``i * stagger``."""
    rng = random.Random(seed)
    return [Request(f"req{i}", [rng.randrange(vocab) for _ in range(prompt_tokens + i * spread)], new_tokens,
                    arrival=i * stagger) for i in range(n)]


def poisson(n: int, rate: float, prompt_range: tuple[int, int], new_range: tuple[int, int], vocab: int,
            seed: int = 0) -> list[Request]:
    """``n`` requests with Poisson arrivals at ``rate`` per second (``arrival`` in
    seconds) and uniformly drawn prompt and output lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append(Request(f"req{i}", [rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))],
                           rng.randint(*new_range), arrival=t))
        t += rng.expovariate(rate)
    return out


def copy(requests: list[Request]) -> list[Request]:
    """Fresh, unrun copies (a Request carries its run's state)."""
    return [Request(r.rid, list(r.prompt), r.max_new, r.arrival) for r in requests]


def blocks_needed(requests: list[Request], block_tokens: int) -> int:
    """KV blocks per rank for all of ``requests`` running at once."""
    return sum(-(-(len(r.prompt) + r.max_new) // block_tokens) for r in requests)
