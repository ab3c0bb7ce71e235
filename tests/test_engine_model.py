"""The reference engine's model: chunked prefill and decode equal one full pass, and
tensor parallelism over real gloo processes equals a single rank."""

from __future__ import annotations

import socket

import pytest

torch = pytest.importorskip("torch")

from hfdir import save_hf  # noqa: E402

from ghostserve.engine.model import (  # noqa: E402
    DictKV,
    ModelConfig,
    ModelConfigError,
    TPModel,
    init_weights,
    load_weights,
    shard,
)
from ghostserve.engine.tp import greedy_rank  # noqa: E402

CFG = ModelConfig(vocab=512, hidden=128, layers=3, heads=8, kv_heads=4, head_dim=16, ffn=256)


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_chunked_prefill_and_decode_equal_one_full_pass():
    model = TPModel(CFG, init_weights(CFG, 0))
    t = tokens(40)
    full = model.forward("a", t, 0, DictKV(torch.float32))
    kv = DictKV(torch.float32)
    parts = [model.forward("b", t[s : s + 16], s, kv) for s in range(0, 32, 16)]
    parts += [model.forward("b", t[i : i + 1], i, kv) for i in range(32, 40)]  # decode steps
    assert torch.allclose(torch.cat(parts), full, atol=1e-4)
    # a different sequence in the same cache is independent
    other = model.forward("c", t[:5], 0, kv)
    assert torch.allclose(other, full[:5], atol=1e-4)


def test_shards_partition_every_weight():
    w = init_weights(CFG, 3)
    for name, full_w in w.items():
        parts = [shard(w, CFG, r, 2)[name] for r in range(2)]
        if parts[0].shape == full_w.shape:
            assert all(torch.equal(p, full_w) for p in parts)  # replicated
        else:
            dim = 0 if parts[0].shape[1] == full_w.shape[1] else 1
            assert torch.equal(torch.cat(parts, dim=dim), full_w)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_over_gloo_processes_equals_one_rank(tp):
    mp = torch.multiprocessing.get_context("spawn")
    prompt = tokens(37, seed=5).tolist()
    single = mp.Queue()
    greedy_rank(0, 1, free_port(), CFG.to_json(), 7, prompt, 12, 16, single)
    want_tokens, want_logits = single.get(timeout=60)
    out = mp.Queue()
    port = free_port()
    procs = [mp.Process(target=greedy_rank, args=(r, tp, port, CFG.to_json(), 7, prompt, 12, 16, out))
             for r in range(tp)]
    for p in procs:
        p.start()
    # every rank has exited before the result is read: what rank 0 put on the queue
    # must not depend on it being alive (a tensor would: EOFError in rebuild_storage_fd)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    got_tokens, got_logits = out.get(timeout=10)
    assert got_tokens == want_tokens  # greedy continuation identical
    assert torch.allclose(torch.tensor(got_logits), torch.tensor(want_logits), atol=1e-3)


def test_configs_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ModelConfigError):
        ModelConfig(heads=6, kv_heads=4)
    with pytest.raises(ModelConfigError):
        ModelConfig(head_dim=15)
    with pytest.raises(ModelConfigError):
        CFG.check_tp(3)
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,'
        ' "num_key_value_heads": 2, "intermediate_size": 512, "rope_theta": 500000.0}')
    cfg = ModelConfig.from_hf(tmp_path)
    assert (cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 64, 500000.0)


def tp_forward(shards: list[dict], cfg: ModelConfig, t: torch.Tensor) -> torch.Tensor:
    """TP over threads with an in-process all-reduce; rank 0's logits."""
    import threading

    n, slots, out = len(shards), [None] * len(shards), [None] * len(shards)
    barrier = threading.Barrier(n)

    def reducer(r):
        def all_reduce(x):
            slots[r] = x.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()
            x.copy_(total)
            return x
        return all_reduce

    def run(r):
        out[r] = TPModel(cfg, shards[r], r, n, reducer(r)).forward("a", t, 0, DictKV())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out[0]


def test_a_hugging_face_directory_loads_to_the_same_model(tmp_path):
    w = init_weights(CFG, 11)
    save_hf(tmp_path / "llama", CFG, w)
    cfg = ModelConfig.from_hf(tmp_path / "llama")
    assert cfg == CFG
    loaded = load_weights(tmp_path / "llama", cfg)
    assert loaded.keys() == w.keys() and all(torch.equal(loaded[k], w[k]) for k in w)
    # Qwen2: q/k/v biases, tied embeddings (no lm_head tensor in the file)
    qw = dict(w)
    del qw["lm_head.weight"]
    for i in range(CFG.layers):
        for proj, n in (("q", CFG.heads), ("k", CFG.kv_heads), ("v", CFG.kv_heads)):
            qw[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.randn(n * CFG.head_dim)
    save_hf(tmp_path / "qwen", CFG, qw, "Qwen2ForCausalLM", tie=True)
    qcfg = ModelConfig.from_hf(tmp_path / "qwen")
    qloaded = load_weights(tmp_path / "qwen", qcfg)
    assert qcfg.tie_embeddings and torch.equal(qloaded["lm_head.weight"], w["model.embed_tokens.weight"])
    t = tokens(20)
    want = TPModel(qcfg, qloaded).forward("a", t, 0, DictKV())
    got = tp_forward([shard(qloaded, qcfg, r, 2) for r in range(2)], qcfg, t)
    assert torch.allclose(got, want, atol=1e-9)  # the biases were split with their weights
    (tmp_path / "qwen" / "model.safetensors").unlink()
    bad = dict(w)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_hf(tmp_path / "qwen", CFG, bad)
    with pytest.raises(ModelConfigError, match="up_proj"):
        load_weights(tmp_path / "qwen", CFG)
    with pytest.raises(ModelConfigError, match="safetensors"):
        load_weights(tmp_path, CFG)
