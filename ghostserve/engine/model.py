"""A small Llama-architecture decoder with tensor parallelism (the reference engine's model).

Per layer, pre-norm: ``h = x + Attn(RMSNorm(x))``, ``out = h + MLP(RMSNorm(h))``, with
rotary position embeddings, grouped-query attention and a SwiGLU MLP. Tensor
parallelism is Megatron's: rank r of TP owns query heads ``[r*H/TP, (r+1)*H/TP)``
and the KV heads they use; ``q, k, v, gate, up`` are column shards, ``o`` and
``down`` row shards, and one all-reduce after each sums the partial outputs.
Embedding, norms and the LM head are replicated.

Computation runs in float32 on the CPU; the KV cache holds 2-byte elements
(``kv_dtype``, bfloat16 by default), as a serving engine's would. This slice keeps
each sequence's KV in a :class:`KVCache` given by the caller; the paged,
shared-memory cache that ghostserve protects plugs in through the same interface.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ghostserve.errors import GhostServeError


class ModelConfigError(GhostServeError, ValueError):
    """A model configuration that cannot run (or cannot be split over ``tp`` ranks)."""


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 1024
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 32
    ffn: int = 768
    rope_theta: float = 10000.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name} must be >= 1")
        if self.heads % self.kv_heads:
            raise ModelConfigError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ModelConfigError("head_dim must be even (rotary embeddings rotate pairs)")

    def check_tp(self, tp: int) -> None:
        if tp < 1 or self.kv_heads % tp or self.heads % tp or self.ffn % tp:
            raise ModelConfigError(f"TP {tp} must divide kv_heads {self.kv_heads}, heads {self.heads} "
                                   f"and ffn {self.ffn}")

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """From a Hugging Face Llama/Qwen2 ``config.json`` (local file or directory)."""
        p = Path(path)
        c = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        heads = c["num_attention_heads"]
        return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, ffn=c["intermediate_size"],
                   rope_theta=float(c.get("rope_theta", 10000.0)), eps=float(c.get("rms_norm_eps", 1e-5)))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def init_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) seeded random weights, named like Hugging Face Llama."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (1.0 / math.sqrt(shape[-1]))

    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": torch.randn(cfg.vocab, cfg.hidden, generator=g),
           "model.norm.weight": torch.ones(cfg.hidden), "lm_head.weight": w(cfg.vocab, cfg.hidden)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": torch.ones(cfg.hidden),
                p + "post_attention_layernorm.weight": torch.ones(cfg.hidden),
                p + "self_attn.q_proj.weight": w(q, cfg.hidden), p + "self_attn.k_proj.weight": w(kv, cfg.hidden),
                p + "self_attn.v_proj.weight": w(kv, cfg.hidden), p + "self_attn.o_proj.weight": w(cfg.hidden, q),
                p + "mlp.gate_proj.weight": w(cfg.ffn, cfg.hidden), p + "mlp.up_proj.weight": w(cfg.ffn, cfg.hidden),
                p + "mlp.down_proj.weight": w(cfg.hidden, cfg.ffn)}
    return out


def shard(weights: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of every weight (copies; the full dict can be dropped)."""
    cfg.check_tp(tp)
    hd = cfg.head_dim
    qs, kvs, fs = cfg.heads // tp * hd, cfg.kv_heads // tp * hd, cfg.ffn // tp
    cols = {"q_proj": qs, "k_proj": kvs, "v_proj": kvs, "gate_proj": fs, "up_proj": fs}
    rows = {"o_proj": qs, "down_proj": fs}
    out = {}
    for name, t in weights.items():
        kind = name.split(".")[-2]
        if kind in cols:
            n = cols[kind]
            t = t[rank * n : (rank + 1) * n]
        elif kind in rows:
            n = rows[kind]
            t = t[:, rank * n : (rank + 1) * n]
        out[name] = t.contiguous().clone()
    return out


class KVCache(Protocol):
    """Where one rank keeps its K and V: ``write`` stores positions of a sequence,
    ``read`` returns all positions ``[0, upto)`` as (upto, kv_heads_local, head_dim)."""

    def write(self, layer: int, seq: str, start: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def read(self, layer: int, seq: str, upto: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class DictKV:
    """The simplest KV cache: one growing tensor per (layer, sequence). For tests."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.k: dict[tuple[int, str], torch.Tensor] = {}
        self.v: dict[tuple[int, str], torch.Tensor] = {}

    def write(self, layer, seq, start, k, v):
        for store, t in ((self.k, k), (self.v, v)):
            old = store.get((layer, seq))
            if old is None or old.shape[0] < start:
                if start:
                    raise ValueError(f"write at {start} of an empty or shorter sequence {seq!r}")
                old = t.new_zeros((0, *t.shape[1:]), dtype=self.dtype)
            store[(layer, seq)] = torch.cat([old[:start], t.to(self.dtype)])

    def read(self, layer, seq, upto):
        return self.k[(layer, seq)][:upto], self.v[(layer, seq)][:upto]


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half form) of x: (n, heads, head_dim)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(0, half, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class TPModel:
    """One rank's part of the model. ``all_reduce`` sums a tensor over the TP group
    in place (identity for TP 1; ``torch.distributed.all_reduce`` otherwise)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], rank: int = 0, tp: int = 1,
                 all_reduce: Callable[[torch.Tensor], object] | None = None):
        cfg.check_tp(tp)
        self.cfg, self.rank, self.tp = cfg, rank, tp
        self.w = weights
        self.heads, self.kv_heads = cfg.heads // tp, cfg.kv_heads // tp
        self.all_reduce = all_reduce or (lambda t: t)

    @torch.no_grad()
    def forward(self, seq: str, tokens: torch.Tensor, start: int, kv: KVCache) -> torch.Tensor:
        """Logits (n, vocab) for ``tokens`` at positions ``start..start+n-1`` of ``seq``;
        writes their K and V into ``kv`` (a prefill chunk, or one decode token)."""
        cfg, w, hd = self.cfg, self.w, self.cfg.head_dim
        n = tokens.shape[0]
        positions = torch.arange(start, start + n)
        x = w["model.embed_tokens.weight"][tokens]
        causal = torch.arange(start + n)[None, :] <= positions[:, None]  # (n, start+n)
        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, self.heads, hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, self.kv_heads, hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, self.kv_heads, hd)
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
            kv.write(i, seq, start, k, v)
            keys, values = kv.read(i, seq, start + n)
            group = self.heads // self.kv_heads
            keys = keys.float().repeat_interleave(group, dim=1)      # (T, heads, hd)
            values = values.float().repeat_interleave(group, dim=1)
            scores = torch.einsum("nhd,thd->hnt", q, keys) / math.sqrt(hd)
            scores = scores.masked_fill(~causal[None], float("-inf"))
            attn = torch.einsum("hnt,thd->nhd", scores.softmax(-1), values).reshape(n, self.heads * hd)
            o = attn @ w[p + "self_attn.o_proj.weight"].T
            self.all_reduce(o)
            x = x + o
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.eps)
            mlp = (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T))
            d = mlp @ w[p + "mlp.down_proj.weight"].T
            self.all_reduce(d)
            x = x + d
        x = rms_norm(x, w["model.norm.weight"], cfg.eps)
        return x @ w["lm_head.weight"].T
