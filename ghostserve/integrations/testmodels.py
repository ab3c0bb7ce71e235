"""Small models for tests and benchmarks, made on the spot: a Llama config, a
tokenizer trained here and seeded random weights. Nothing is downloaded; any
engine (vLLM, SGLang, the reference engine's loader) can serve them."""

from __future__ import annotations

import json
import os
from typing import Any

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 1024,
              "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "torch_dtype": "bfloat16", "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}


def make_model(path: str, **config: Any) -> str:
    """A model directory with only config.json (vLLM's load_format="dummy" needs no weights)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(TINY_LLAMA, **config), f)
    return path


# a chat template for the test tokenizer: role-tagged turns, the assistant's turn opened
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def make_tokenizer(path: str, vocab_size: int = 1024) -> str:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, trained here
    (the ``tokenizers`` library, a fraction of a second) on seeded made-up words
    with accents and CJK, so any token id decodes (multi-byte characters split over
    tokens included). ``<unk>``, ``<s>``, ``</s>`` are ids 0, 1, 2 (the models'
    bos and eos); ``tokenizer_config.json`` carries :data:`CHAT_TEMPLATE`."""
    import random  # noqa: PLC0415

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiouéü"] + ["日", "本", "語", "🙂"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randrange(1, 4))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"the tokenizer came out with {tok.get_vocab_size()} tokens, not {vocab_size}")
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE}, f)
    return path


def make_weights(path: str, std: float = 0.5, seed: int = 0) -> str:
    """Seeded random weights for the Llama of ``path``/config.json, as
    model.safetensors. Why not vLLM's dummy load: its tiny uniform weights make
    greedy decoding fall into a two-token loop, where a continuation that went
    wrong could still look right; these give varied tokens, so comparisons mean
    something."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=torch.bfloat16)

    w = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": ones(), "lm_head.weight": rand(vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": rand(heads * hd, h), p + "self_attn.k_proj.weight": rand(kv * hd, h),
                  p + "self_attn.v_proj.weight": rand(kv * hd, h), p + "self_attn.o_proj.weight": rand(h, heads * hd),
                  p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                  p + "mlp.down_proj.weight": rand(h, inter), p + "input_layernorm.weight": ones(),
                  p + "post_attention_layernorm.weight": ones()})
    save_file(w, os.path.join(path, "model.safetensors"))
    return path


def make_served_model(path: str, **config: Any) -> str:
    """A model directory an OpenAI server can serve with text and chat prompts:
    config.json (:func:`make_model`), a tokenizer of the model's vocabulary
    (:func:`make_tokenizer`) and random weights (:func:`make_weights`). Nothing is downloaded."""
    make_model(path, **config)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    make_tokenizer(path, vocab)
    return make_weights(path)
