"""Our model against transformers: packed forward == per-sequence HF logits, both directions of
checkpoint conversion, exact packing, and one-line errors for bad model folders."""

import json

import pytest
import torch
import transformers as tf

from lwz.model import ModelConfig, ModelLoadError, Transformer, model_flops_per_token

LENGTHS = [7, 13, 1, 30]  # different, non-power-of-two lengths


def tiny_hf(kind: str, tied: bool = False):
    common = dict(vocab_size=203, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tied,
                  max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1e4)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16)
        model = tf.Qwen3ForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        model = tf.LlamaForCausalLM(cfg)
    # random (not default-init) biases and norm weights so a missed bias or norm would show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return model.float().eval()


def packed_batch(vocab: int, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return seqs, ids, pos, cu, max(lengths)


def hf_logits(model, seqs):
    with torch.no_grad():
        return [model(input_ids=s[None]).logits[0].float() for s in seqs]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", False)]


@pytest.mark.parametrize("kind,tied", CASES)
def test_parity_hf_to_ours_and_back(tmp_path, kind, tied):
    hf = tiny_hf(kind, tied)
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert (ours.lm_head is None) == tied
    seqs, ids, pos, cu, mx = packed_batch(hf.config.vocab_size)
    with torch.no_grad():
        logits = ours.logits(ours(ids, pos, cu, mx))
    ref = hf_logits(hf, seqs)
    for i, r in enumerate(ref):
        assert rel_err(logits[cu[i]:cu[i + 1]], r) <= 1e-4

    # reverse direction: our save_pretrained loads in transformers with the same logits
    ours.save_pretrained(str(tmp_path / "ours"))
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    for r, b in zip(ref, hf_logits(back, seqs)):
        assert rel_err(b, r) <= 1e-5


def test_sharded_save_and_load(tmp_path):
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(str(tmp_path / "hf"))
    ours.save_pretrained(str(tmp_path / "sharded"), max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = Transformer.from_pretrained(str(tmp_path / "sharded"))
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"), dtype=torch.float32).eval()
    seqs, *_ = packed_batch(hf.config.vocab_size)
    for r, b in zip(hf_logits(hf, seqs), hf_logits(back, seqs)):
        assert rel_err(b, r) <= 1e-6


def test_packing_is_exact():
    cfg = ModelConfig.from_hf(tiny_hf("qwen3").config.to_dict())
    model = Transformer.from_config(cfg, seed=3).eval()
    seqs, ids, pos, cu, mx = packed_batch(cfg.vocab_size, lengths=[5, 17, 2, 11])
    with torch.no_grad():
        packed = model(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            alone = model(s, torch.arange(len(s)), torch.tensor([0, len(s)], dtype=torch.int32), len(s))
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_grads():
    cfg = ModelConfig.from_hf(tiny_hf("qwen2").config.to_dict())
    a = Transformer.from_config(cfg, seed=0)
    b = Transformer.from_config(cfg, seed=0, activation_checkpointing=True)
    _, ids, pos, cu, mx = packed_batch(cfg.vocab_size)
    w = torch.randn(len(ids), cfg.hidden_size)
    (a(ids, pos, cu, mx) * w).sum().backward()
    (b(ids, pos, cu, mx) * w).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_flops_formula_counts_causal_attention():
    cfg = ModelConfig.from_hf(tiny_hf("qwen2").config.to_dict())
    f1, f2 = model_flops_per_token(cfg, 1023), model_flops_per_token(cfg, 2047)
    # doubling the length adds exactly 12 * L * h * d * 1024 / 2 per token
    assert f2 - f1 == pytest.approx(12 * 2 * 6 * 8 * 1024 / 2)


# ---- bad inputs: one clear line ----

def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        Transformer.from_pretrained(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        Transformer.from_pretrained(str(tmp_path / "nope"))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="unknown architecture model_type='gpt2'"):
        Transformer.from_pretrained(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    tiny_hf("qwen2").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


def test_tied_checkpoint_with_an_lm_head_copy_loads(tmp_path):
    """A tied model whose folder also holds lm_head.weight loads (the copy is skipped, the head is
    the embedding); an untied model without lm_head.weight is still a clear error."""
    from safetensors.torch import load_file, save_file
    tiny_hf("qwen2", tied=True).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, tmp_path / "model.safetensors")
    m = Transformer.from_pretrained(str(tmp_path))
    torch.testing.assert_close(m.lm_head_weight, sd["model.embed_tokens.weight"])
    untied = tmp_path / "untied"
    tiny_hf("qwen2", tied=False).save_pretrained(untied)
    sd = load_file(untied / "model.safetensors")
    sd.pop("lm_head.weight")
    save_file(sd, untied / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        Transformer.from_pretrained(str(untied))


def test_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_hf("qwen2").save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("model.norm.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing tensors \\['model.norm.weight'\\]"):
        Transformer.from_pretrained(str(tmp_path))
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="'model.norm.weight' has shape \\(7,\\)"):
        Transformer.from_pretrained(str(tmp_path))
