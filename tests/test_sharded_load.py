"""FSDP2-sharded loading and the sharded quality reward model, in real multi-process gloo groups.

Each rank must end up with exactly its dim-0 rows of every tensor (uneven shards, empty shards),
and a sharded reward model must score exactly as the whole model does, even when the ranks of the
shard group hold different numbers of texts (or none)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from lwz.distributed import shutdown_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")


def _join(rank, world, store):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from lwz.distributed import init_distributed
    return init_distributed("gloo")


def _tiny_cfg(**over):
    from lwz.model import ModelConfig
    raw = dict(model_type="qwen2", vocab_size=1024, hidden_size=48, intermediate_size=80,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
               tie_word_embeddings=False, eos_token_id=0, pad_token_id=1, max_position_embeddings=512)
    raw.update(over)
    return ModelConfig.from_hf(raw)


def _probe(model):
    """Hidden states of two packed sequences (9 and 14 tokens)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 1021, (23,), generator=g)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    pos = torch.cat([torch.arange(9), torch.arange(14)])
    with torch.no_grad():
        return model(ids, pos, cu, 14)


def _policy_worker(rank, world, store, folder, out):
    from lwz.distributed import full_state_dict, shard_model
    from lwz.model import Transformer
    from torch.distributed.tensor import DTensor
    _join(rank, world, store)
    model = Transformer.from_pretrained(folder, shard_fn=lambda m: shard_model(m, None, None))
    assert all(isinstance(p, DTensor) for p in model.parameters())
    local = sum(p.to_local().numel() for p in model.parameters())
    full0 = full_state_dict(model)  # rank 0 only
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # on every rank
    assert (rank == 0) == bool(full0) and all(torch.equal(full0[k], full[k]) for k in full0)
    hidden = _probe(model)
    torch.save(dict(full=full, local=local, hidden=hidden), f"{out}.{rank}")
    shutdown_distributed(exit_code=0)


@pytest.mark.parametrize("world", [2, 3])
def test_policy_loads_sharded(tmp_path, world):
    """from_pretrained(shard_fn=FSDP2) gives every rank its own rows only (vocab 1021 and hidden 48
    split unevenly over 3 ranks), and gathering them gives back the saved weights bit for bit."""
    from lwz.model import Transformer
    folder = str(tmp_path / "policy")
    ref = Transformer.from_config(_tiny_cfg(vocab_size=1021), seed=5)
    ref.save_pretrained(folder)
    out = str(tmp_path / "res")
    mp.spawn(_policy_worker, args=(world, str(tmp_path / "store"), folder, out), nprocs=world, join=True)
    want = ref.state_dict()
    total = sum(p.numel() for p in ref.parameters())
    locals_ = []
    for r in range(world):
        res = torch.load(f"{out}.{r}")
        assert set(res["full"]) == set(want)
        for k, v in want.items():
            assert torch.equal(res["full"][k], v), k
        locals_.append(res["local"])
    # each rank holds about 1/world of the weights, and together exactly all of them
    assert sum(locals_) == total
    assert max(locals_) < total / world + 2 * 1021
    # and computes what the whole model computes
    hidden = _probe(ref)
    for r in range(world):
        torch.testing.assert_close(torch.load(f"{out}.{r}")["hidden"], hidden, rtol=1e-5, atol=1e-5)


def _rm_worker(rank, world, store, folder, out, texts_per_rank, budget):
    from lwz.rewards.quality import QualityRewardModel
    from torch.distributed.tensor import DTensor
    _join(rank, world, store)
    rm = QualityRewardModel.from_pretrained(folder, max_tokens_per_batch=budget,
                                            shard_fn=lambda m: QualityRewardModel.shard(m)).eval()
    assert isinstance(rm.score.weight, DTensor) and rm.shard_group is not None
    prompts, answers = texts_per_rank[rank]
    got = rm(prompts, answers, [{}] * len(prompts))
    torch.save(got, f"{out}.{rank}")
    shutdown_distributed(exit_code=0)


def _texts(n, seed, with_broken=True):
    import random
    rnd = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while rivers run to the sea".split()
    prompts = [" ".join(rnd.choices(words, k=rnd.randint(3, 9))) for _ in range(n)]
    answers = [" ".join(rnd.choices(words, k=rnd.randint(1, 60))) for _ in range(n)]
    if with_broken and n > 2:
        answers[1] = None
    return prompts, answers


def test_quality_model_sharded_scores_equal_whole(tmp_path):
    """Two ranks share one sharded reward model. Rank 0 scores 7 texts in several micro-batches,
    rank 1 scores one text (fewer forwards) and then nothing at all: every score equals the whole
    model's, and the ranks never deadlock on FSDP's collectives."""
    from lwz.rewards.quality import QualityRewardModel
    from lwz.tokenizer import load_tokenizer
    folder = str(tmp_path / "rm")
    tok = load_tokenizer(TOKENIZER, require_eos=False, pad_from_eos=False)
    whole = QualityRewardModel.from_config(_tiny_cfg(), tokenizer=tok, template="plain", seed=2)
    with torch.no_grad():
        whole.score.weight.mul_(50.0)  # O(1) scores
    whole.save_pretrained(folder)
    whole = QualityRewardModel.from_pretrained(folder, max_tokens_per_batch=64).eval()
    texts = {0: _texts(7, 0), 1: _texts(1, 1, with_broken=False)}
    out = str(tmp_path / "res")
    mp.spawn(_rm_worker, args=(2, str(tmp_path / "store"), folder, out, texts, 64), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        want = whole(*texts[r], [{}] * len(texts[r][0]))
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (r, got, want)
    assert texts[0][1][1] is None and torch.load(f"{out}.0")[1] == torch.load(f"{out}.0").min()
    # a rank with no texts at all still takes part
    texts = {0: _texts(4, 3), 1: ([], [])}
    mp.spawn(_rm_worker, args=(2, str(tmp_path / "store2"), folder, out, texts, 40), nprocs=2, join=True)
    assert torch.load(f"{out}.1").numel() == 0
    want = QualityRewardModel.from_pretrained(folder, max_tokens_per_batch=40).eval()(*texts[0], [{}] * 4)
    assert torch.allclose(torch.load(f"{out}.0"), want, atol=1e-5, rtol=1e-5)


def _hosted_worker(rank, world, store, folder, out, fsdp):
    from lwz.config import load_config
    from lwz.train import build_rewards
    from torch.distributed.tensor import DTensor
    d = _join(rank, world, store)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.toml"),
                      ["rewards.quality=true", f"rewards.quality_path={folder}",
                       "rewards.quality_ranks=[1,2]", f"rewards.quality_fsdp={fsdp}",
                       "rewards.quality_fsdp_min_gib=0.0001", "rewards.length=false", "rewards.format=false"])
    (fn,), _ = build_rewards(cfg, d)
    model = fn.model
    if rank == 0:
        assert model is None  # not a host: loads nothing
    elif fsdp == "off":
        assert not isinstance(model.score.weight, DTensor) and model.shard_group is None
    else:  # "on", or "auto" with the model above the (tiny) threshold
        assert isinstance(model.score.weight, DTensor) and model.score.weight.device_mesh.size() == 2
    prompts, answers = _texts(3 + 2 * rank, 10 + rank)
    torch.save(fn(prompts, answers, [{}] * len(prompts)), f"{out}.{rank}")
    shutdown_distributed(exit_code=0)


@pytest.mark.parametrize("fsdp", ["on", "auto", "off"])
def test_quality_model_sharded_over_some_ranks(tmp_path, fsdp):
    """rewards.quality_ranks = [1, 2]: sharded (quality_fsdp on, or auto above the size threshold)
    over ranks 1 and 2 only, or whole on each (off); rank 0 holds nothing, and every rank gets the
    whole model's scores for its texts, broken answers floored within its own batch."""
    from lwz.rewards.quality import QualityRewardModel
    from lwz.tokenizer import load_tokenizer
    folder = str(tmp_path / "rm")
    tok = load_tokenizer(TOKENIZER, require_eos=False, pad_from_eos=False)
    whole = QualityRewardModel.from_config(_tiny_cfg(), tokenizer=tok, template="plain", seed=4)
    with torch.no_grad():
        whole.score.weight.mul_(50.0)
    whole.save_pretrained(folder)
    whole = QualityRewardModel.from_pretrained(folder).eval()
    out = str(tmp_path / "res")
    mp.spawn(_hosted_worker, args=(3, str(tmp_path / "store"), folder, out, fsdp), nprocs=3, join=True)
    for r in range(3):
        prompts, answers = _texts(3 + 2 * r, 10 + r)
        want = whole(prompts, answers, [{}] * len(prompts))
        assert torch.allclose(torch.load(f"{out}.{r}"), want, atol=1e-5, rtol=1e-5), r
