"""Running the model over a TP group of processes (gloo on the CPU, loopback only).

:func:`greedy_rank` is one rank's whole life for a simple greedy generation; the
full engine (continuous batching, paged KV in shared memory, failure handling)
builds on the same process-group setup.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ghostserve.engine.model import DictKV, ModelConfig, TPModel, init_weights, shard


def init_group(rank: int, tp: int, port: int) -> None:
    """Join TP group of ``tp`` ranks on 127.0.0.1:``port`` with gloo."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def greedy_rank(rank: int, tp: int, port: int, cfg_json: str, seed: int, prompt: list[int],
                new_tokens: int, chunk: int, out: Any) -> None:
    """Prefill ``prompt`` in chunks, then decode ``new_tokens`` greedily; rank 0 puts
    (tokens, last logits) on ``out`` as plain lists.

    Plain data, not tensors: a tensor on a multiprocessing queue travels as a
    handle to this process's shared memory, which the reader can only open while
    this process lives; a rank that exits before the parent reads would leave it
    an ``EOFError`` in ``rebuild_storage_fd``."""
    import json  # noqa: PLC0415

    torch.set_num_threads(1)
    cfg = ModelConfig(**json.loads(cfg_json))
    init_group(rank, tp, port)
    try:
        model = TPModel(cfg, shard(init_weights(cfg, seed), cfg, rank, tp), rank, tp, all_reduce)
        tokens, kv = list(prompt), DictKV()
        logits = None
        for start in range(0, len(prompt), chunk):
            logits = model.forward("s", torch.tensor(prompt[start : start + chunk]), start, kv)
        for _ in range(new_tokens):
            nxt = int(logits[-1].argmax())
            tokens.append(nxt)
            logits = model.forward("s", torch.tensor([nxt]), len(tokens) - 1, kv)
        if rank == 0:
            out.put((tokens, logits[-1].tolist()))
    finally:
        dist.destroy_process_group()
