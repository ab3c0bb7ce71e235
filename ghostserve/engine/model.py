"""A small Llama-architecture decoder with tensor parallelism (the reference engine's model).

Per layer, pre-norm: ``h = x + Attn(RMSNorm(x))``, ``out = h + MLP(RMSNorm(h))``, with
rotary position embeddings, grouped-query attention and a SwiGLU MLP. Tensor
parallelism is Megatron's: rank r of TP owns query heads ``[r*H/TP, (r+1)*H/TP)``
and the KV heads they use; ``q, k, v, gate, up`` are column shards, ``o`` and
``down`` row shards, and one all-reduce after each sums the partial outputs.
Embedding, norms and the LM head are replicated.

Arithmetic runs on the CPU in ``dtype`` (float64 by default) while the KV cache
holds 2-byte elements (bfloat16), as a serving engine's would. float64 makes a
token's result independent of how it was batched (a prefill chunk, a decode
step, a recompute after a failure) to far below bfloat16's rounding, which is
what lets a recovered run be compared token for token with a failure-free one.
The KV cache is given by the caller (:class:`KVCache`): a dict for tests, the
paged shared-memory cache (:mod:`ghostserve.engine.paged`) in the engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ghostserve.errors import ModelConfigError

QUERY_BLOCK = 512  # query rows per attention block (bounds a long recompute's memory)


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
    tie_embeddings: bool = False

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
        arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
            raise ModelConfigError(f"{arch}: only Llama-architecture models (Llama, Qwen2, Mistral) run here")
        scaling = c.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ModelConfigError(f"rope_scaling {scaling} is not implemented (plain RoPE only)")
        heads = c["num_attention_heads"]
        return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, ffn=c["intermediate_size"],
                   rope_theta=float(c.get("rope_theta", 10000.0)), eps=float(c.get("rms_norm_eps", 1e-5)),
                   tie_embeddings=bool(c.get("tie_word_embeddings", False)))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))

    def kv_token_bytes(self, tp: int = 1) -> int:
        """Bytes of K and V for one token in one layer on one rank (bfloat16)."""
        return 2 * (self.kv_heads // tp) * self.head_dim * 2


def init_weights(cfg: ModelConfig, seed: int = 0, meta: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) seeded random weights, named like Hugging Face Llama
    (``meta``: shapes only, no memory)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        if meta:
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * (1.0 / math.sqrt(shape[-1]))

    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    ones = (lambda n: torch.empty(n, device="meta")) if meta else torch.ones
    out = {"model.embed_tokens.weight": w(cfg.vocab, cfg.hidden) * math.sqrt(cfg.hidden),
           "model.norm.weight": ones(cfg.hidden), "lm_head.weight": w(cfg.vocab, cfg.hidden)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": ones(cfg.hidden),
                p + "post_attention_layernorm.weight": ones(cfg.hidden),
                p + "self_attn.q_proj.weight": w(q, cfg.hidden), p + "self_attn.k_proj.weight": w(kv, cfg.hidden),
                p + "self_attn.v_proj.weight": w(kv, cfg.hidden), p + "self_attn.o_proj.weight": w(cfg.hidden, q),
                p + "mlp.gate_proj.weight": w(cfg.ffn, cfg.hidden), p + "mlp.up_proj.weight": w(cfg.ffn, cfg.hidden),
                p + "mlp.down_proj.weight": w(cfg.hidden, cfg.ffn)}
    return out


def load_weights(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full weights from a local Hugging Face safetensors directory (no downloads).
    Raises ModelConfigError when a tensor is missing or has the wrong shape."""
    from safetensors.torch import load_file  # noqa: PLC0415

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"no *.safetensors files in {path}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    want = init_shapes(cfg)
    for name, shape in want.items():
        if name not in out:
            raise ModelConfigError(f"{path}: tensor {name} is missing")
        if tuple(out[name].shape) != shape:
            raise ModelConfigError(f"{path}: {name} has shape {tuple(out[name].shape)}, expected {shape}")
    return {k: v for k, v in out.items() if k in want or k.endswith("_proj.bias")}


def init_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every weight the model needs."""
    return {k: tuple(v.shape) for k, v in init_weights(cfg, 0, meta=True).items()}


def shard(weights: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of every weight (copies; the full dict can be dropped).
    Biases (Qwen2's q/k/v) are split like their weights' rows."""
    cfg.check_tp(tp)
    hd = cfg.head_dim
    qs, kvs, fs = cfg.heads // tp * hd, cfg.kv_heads // tp * hd, cfg.ffn // tp
    cols = {"q_proj": qs, "k_proj": kvs, "v_proj": kvs, "gate_proj": fs, "up_proj": fs}
    rows = {"o_proj": qs, "down_proj": fs}
    out = {}
    for name, t in weights.items():
        kind = name.split(".")[-2]
        if kind in cols:  # a weight's rows or a bias's entries
            n = cols[kind]
            t = t[rank * n : (rank + 1) * n]
        elif kind in rows:
            n = rows[kind]
            t = t[:, rank * n : (rank + 1) * n]
        out[name] = t.contiguous().clone()
    return out


class KVCache(Protocol):
    """Where one rank keeps its K and V: ``write`` stores positions ``start..start+n-1``
    of a sequence, ``read`` returns positions ``[0, upto)`` as two
    (upto, kv_heads_local, head_dim) tensors. Called on the engine's thread only."""

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


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a batched step: ``tokens`` at positions ``start..``."""
    seq: str
    tokens: Sequence[int]
    start: int


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (Llama's rotate-half form) of x: (n, heads, head_dim)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(0, half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class TPModel:
    """One rank's part of the model. ``all_reduce`` sums a tensor over the TP group
    in place (identity for TP 1; ``torch.distributed.all_reduce`` otherwise).
    Weights are converted to ``dtype`` once; the caller's dict is not kept."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], rank: int = 0, tp: int = 1,
                 all_reduce: Callable[[torch.Tensor], object] | None = None,
                 dtype: torch.dtype = torch.float64):
        cfg.check_tp(tp)
        self.cfg, self.rank, self.tp, self.dtype = cfg, rank, tp, dtype
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        self.heads, self.kv_heads = cfg.heads // tp, cfg.kv_heads // tp
        self.all_reduce = all_reduce or (lambda t: t)

    def _proj(self, h: torch.Tensor, name: str) -> torch.Tensor:
        out = h @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return out if bias is None else out + bias

    @torch.no_grad()
    def forward(self, seq: str, tokens: torch.Tensor, start: int, kv: KVCache) -> torch.Tensor:
        """Logits (n, vocab) for ``tokens`` at positions ``start..start+n-1`` of ``seq``;
        writes their K and V into ``kv`` (a prefill chunk, or one decode token)."""
        return self._run([Segment(seq, tokens.tolist(), start)], kv, last_only=False)

    @torch.no_grad()
    def forward_batch(self, segments: Sequence[Segment], kv: KVCache,
                      after_kv_write: Callable[[int], None] | None = None) -> torch.Tensor:
        """One engine step over several sequences (prefill chunks and decode tokens
        together): the linear layers run on all rows at once, attention per
        sequence. Returns the logits of each segment's last row, (len(segments), vocab).
        ``after_kv_write(layer)`` runs once each layer's K and V are in ``kv``, before
        that layer's first all-reduce (the engine's fault injection pauses there)."""
        return self._run(segments, kv, last_only=True, after_kv_write=after_kv_write)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Causal grouped-query attention of q (n, heads, hd) at ``positions`` over
        keys/values (T, kv_heads, hd): query head h reads KV head h // group. In
        blocks of query rows, so a long recompute needs O(QUERY_BLOCK * T) memory."""
        hd, out = self.cfg.head_dim, []
        group = self.heads // self.kv_heads
        cols = torch.arange(keys.shape[0])
        for a in range(0, q.shape[0], QUERY_BLOCK):
            qb, pb = q[a : a + QUERY_BLOCK], positions[a : a + QUERY_BLOCK]
            t = int(pb[-1]) + 1  # positions rise within a segment: later keys are all masked
            qg = qb.reshape(qb.shape[0], self.kv_heads, group, hd)
            scores = torch.einsum("nkgd,tkd->kgnt", qg, keys[:t]) / math.sqrt(hd)
            scores = scores.masked_fill(~(cols[None, :t] <= pb[:, None]), float("-inf"))
            out.append(torch.einsum("kgnt,tkd->nkgd", scores.softmax(-1), values[:t]).reshape(qb.shape[0], -1))
        return torch.cat(out)

    def _run(self, segments: Sequence[Segment], kv: KVCache, last_only: bool,
             after_kv_write: Callable[[int], None] | None = None) -> torch.Tensor:
        cfg, w, hd = self.cfg, self.w, self.cfg.head_dim
        tokens = torch.tensor([t for s in segments for t in s.tokens], dtype=torch.long)
        positions = torch.cat([torch.arange(s.start, s.start + len(s.tokens)) for s in segments])
        bounds = [0]
        for s in segments:
            bounds.append(bounds[-1] + len(s.tokens))
        n = tokens.shape[0]
        x = w["model.embed_tokens.weight"][tokens]
        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.eps)
            q = rope(self._proj(h, p + "self_attn.q_proj").view(n, self.heads, hd), positions, cfg.rope_theta)
            k = rope(self._proj(h, p + "self_attn.k_proj").view(n, self.kv_heads, hd), positions, cfg.rope_theta)
            v = self._proj(h, p + "self_attn.v_proj").view(n, self.kv_heads, hd)
            for j, s in enumerate(segments):
                kv.write(i, s.seq, s.start, k[bounds[j] : bounds[j + 1]], v[bounds[j] : bounds[j + 1]])
            if after_kv_write is not None:
                after_kv_write(i)
            outs = []
            for j, s in enumerate(segments):
                a, b = bounds[j], bounds[j + 1]
                keys, values = kv.read(i, s.seq, s.start + b - a)
                outs.append(self._attend(q[a:b], keys.to(self.dtype), values.to(self.dtype), positions[a:b]))
            o = torch.cat(outs) @ w[p + "self_attn.o_proj.weight"].T
            self.all_reduce(o)
            x = x + o
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.eps)
            mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
            d = mlp @ w[p + "mlp.down_proj.weight"].T
            self.all_reduce(d)
            x = x + d
        if last_only:
            x = x[[b - 1 for b in bounds[1:]]]
        x = rms_norm(x, w["model.norm.weight"], cfg.eps)
        return x @ w["lm_head.weight"].T
