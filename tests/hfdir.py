"""A Hugging Face model directory for tests (config.json + safetensors), from
weights named like Hugging Face Llama; nothing is downloaded."""

from __future__ import annotations

import json

from ghostserve.engine.model import ModelConfig


def save_hf(folder, cfg: ModelConfig, weights: dict, arch: str = "LlamaForCausalLM", tie: bool = False) -> None:
    """A Hugging Face model directory: config.json plus one safetensors file."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": [arch], "vocab_size": cfg.vocab, "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.eps, "tie_word_embeddings": tie}))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
