"""Tensor-parallel generation (lwz/tp.py) on gloo: tp_size = 2 (2 processes) and tp_size = 2 x dp = 2
(4 processes) give transformers' greedy tokens and tp_size = 1's samples and log-probs, with static
and paged caches and stop strings; TP shards come from FSDP2 / HSDP training layouts; one-line
errors for sizes that do not split."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import transformers as tf

from lwz.config import ConfigError
from lwz.distributed import check_tp, shutdown_distributed
from lwz.model import Transformer
from lwz.rollout import EngineSettings, SamplingParams, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 12
PROMPT_LENS = [5, 11, 1, 7]


def _hf_models():
    """GQA with 2 KV heads (qwen2: q/k/v bias, untied head) and with 1 KV head, which TP 2 replicates
    (llama with attention/MLP biases, so o_proj/down_proj carry the row-parallel biases; tied).
    Vocabulary 203: the last vocabulary shard is padded."""
    common = dict(vocab_size=203, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, max_position_embeddings=256)
    torch.manual_seed(0)
    a = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2, rope_theta=1e4))
    b = tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                           tie_word_embeddings=True))
    out = {}
    for name, m in (("kv2", a), ("kv1", b)):
        with torch.no_grad():  # larger random weights and biases: peaky, varied distributions
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) * (0.1 if n.endswith("bias") else 0.12))
        out[name] = m.float().eval()
    return out


def _prompts(vocab=203):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _tokenizer():
    from lwz.tokenizer import load_tokenizer
    return load_tokenizer(os.path.join(ROOT, "assets/tokenizer"))


def _runs(model, prompts, seed, stop, tok):
    """The three generations every process runs: greedy (static cache), sampled with n = 3 through
    4 rows of a paged cache (continuous admission), greedy with a stop string."""
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.0))
    sampled = generate(model, prompts, SamplingParams(n=3, max_new_tokens=NEW, temperature=0.9, seed=seed),
                       EngineSettings(page_size=8, batch_size=4))
    stopped = generate(model, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.0, stop_strings=(stop,)),
                       tokenizer=tok)
    return dict(greedy=greedy.response_ids, sampled=sampled.response_ids, logp=sampled.logprobs,
                stopped=stopped.response_ids, reasons=stopped.finish_reasons)


def _worker(rank, world, store, folders, stops, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from lwz.distributed import build_groups, init_distributed, shard_model
        from lwz.tp import build_tp_model, load_tp_shards
        d = init_distributed("gloo")
        tok = _tokenizer()
        out = {}
        for name, folder in folders.items():
            # kv1 on 4 processes trains under HSDP (2 "nodes" of 2): shards come from the own node;
            # otherwise FSDP over all ranks (with 4, a TP group's rows are spread over both groups)
            g = build_groups(d, 2, hsdp=name == "kv1")
            full = Transformer.from_pretrained(folder)
            policy = shard_model(Transformer.from_pretrained(folder), None, None, mesh=g.fsdp_mesh)
            shard = build_tp_model(policy.config, 2, g.tp_rank, g.tp_group, torch.float32, d.device)
            stats = load_tp_shards(shard, policy, 2, g.tp_rank)
            res = _runs(shard, _prompts(), 100 + g.dp_rank, stops[name], tok)
            # cache rows sized to the free memory (as on CUDA): the least of the group decides, so its
            # ranks run one schedule (here rank 0 has room for 3 rows of this rank's KV heads, rank 1 for 4;
            # one of them is the engine's padding row)
            import lwz.rollout as ro
            row = shard.kv_bytes(max(PROMPT_LENS) + NEW - 1)
            real, ro._free_bytes = ro._free_bytes, lambda device: (3 + g.tp_rank) * row
            try:
                sized = generate(shard, _prompts(), SamplingParams(max_new_tokens=NEW, temperature=0.0),
                                 EngineSettings(cache_mem_fraction=1.0))
            finally:
                ro._free_bytes = real
            res.update(sized_rows=sized.cache_rows, sized=sized.response_ids)
            res.update(stats=stats, tp_rank=g.tp_rank, dp_rank=g.dp_rank,
                       shard={k: v.clone() for k, v in shard.state_dict().items()},
                       full={k: v.clone() for k, v in full.state_dict().items()})
            out[name] = res
        torch.save(out, os.path.join(out_dir, f"r{rank}.pt"))
        shutdown_distributed(exit_code=0)
    finally:
        shutdown_distributed(sync=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """HF folders, transformers' greedy tokens and tp_size = 1's runs for both models (1 thread, as
    the workers)."""
    tmp = tmp_path_factory.mktemp("tp")
    tok = _tokenizer()
    prompts = _prompts()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ref = {}
    try:
        for name, hf in _hf_models().items():
            folder = str(tmp / name)
            hf.save_pretrained(folder)
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
            with torch.no_grad():
                hf_greedy = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW,
                                         min_new_tokens=NEW)[0, len(p):].tolist() for p in prompts]
            ours = Transformer.from_pretrained(folder)
            free = generate(ours, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.0)).response_ids[0]
            # a stop string spanning response tokens 3..5 of prompt 0
            stop = tok.decode(free)[len(tok.decode(free[:3])):len(tok.decode(free[:6]))]
            assert stop.strip(), "degenerate stop string"
            runs = {dp: _runs(ours, prompts, 100 + dp, stop, tok) for dp in (0, 1)}
            assert runs[0]["reasons"][0] == "stop_string" and len(runs[0]["stopped"][0]) < NEW
            assert runs[0]["sampled"] != runs[1]["sampled"]  # the seeds matter
            ref[name] = dict(folder=folder, hf=hf_greedy, runs=runs, stop=stop)
    finally:
        torch.set_num_threads(threads)
    return ref


def _check_shard(res, name):
    """The TP shard holds exactly the heads / rows / columns of rank t (written out by hand here)."""
    t, full, sh = res["tp_rank"], res["full"], res["shard"]
    D = 8
    hq = 3 * D  # 6 heads / 2 ranks
    close = torch.testing.assert_close
    for i in range(2):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        close(sh[a + "q_proj.weight"], full[a + "q_proj.weight"][t * hq:(t + 1) * hq])
        close(sh[a + "o_proj.weight"], full[a + "o_proj.weight"][:, t * hq:(t + 1) * hq])
        kv = full[a + "k_proj.weight"]
        # kv2: one KV head each; kv1: the single KV head on both ranks
        close(sh[a + "k_proj.weight"], kv[t * D:(t + 1) * D] if name == "kv2" else kv)
        close(sh[m + "down_proj.weight"], full[m + "down_proj.weight"][:, t * 40:(t + 1) * 40])
        if name == "kv1":  # the row-parallel biases are added once: rank 0 holds them
            b = full[m + "down_proj.bias"]
            close(sh[m + "down_proj.bias"], b if t == 0 else torch.zeros_like(b))
    emb = full["embed_tokens.weight"]
    rows = emb[t * 102:(t + 1) * 102]
    torch.testing.assert_close(sh["embed_tokens.weight"][:len(rows)], rows)
    assert (sh["embed_tokens.weight"][len(rows):] == 0).all()


@pytest.mark.parametrize("world", [2, 4])
def test_tp_generation_matches_tp1_and_transformers(tmp_path, reference, world):
    folders = {k: v["folder"] for k, v in reference.items()}
    stops = {k: v["stop"] for k, v in reference.items()}
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), folders, stops, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"r{r}.pt") for r in range(world)]
    for name, ref in reference.items():
        for rank, out in enumerate(results):
            res = out[name]
            want = ref["runs"][res["dp_rank"]]
            assert res["greedy"] == ref["hf"] == want["greedy"], (name, rank)
            assert res["sized_rows"] == 2 and res["sized"] == want["greedy"], (name, rank)
            assert res["stopped"] == want["stopped"] and res["reasons"] == want["reasons"], (name, rank)
            assert res["sampled"] == want["sampled"], (name, rank)
            for a, b in zip(res["logp"], want["logp"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
            _check_shard(res, name)
            # a rank receives at most its TP shard (fp32 here), never the model
            shard_bytes = sum(v.numel() * 4 for v in res["shard"].values())
            assert 0 < res["stats"]["tp_weight_bytes"] < shard_bytes, (name, rank, res["stats"])
            if world == 2:  # FSDP rows = TP rows: only o_proj/down_proj (half their columns' rows), the
                # norms, and with 1 KV head the other half of k/v and the row-parallel biases move
                per_layer = 24 * 24 + 24 * 40 + 2 * 24 + (0 if name == "kv2" else 2 * (4 * 48 + 4) + 2 * 24)
                assert res["stats"]["tp_weight_bytes"] == 4 * (2 * per_layer + 24), (name, res["stats"])


def test_sizes_that_do_not_split_are_one_line_errors():
    check_tp(1, 3, 3, 7, 7, 11)  # tp 1: anything goes
    check_tp(8, 16, 8, 40, 8, 27648)  # Qwen2.5-32B on 2 nodes of 8
    check_tp(4, 8, 8, 12, 2, 8960)  # 1.5B: 2 KV heads replicated twice
    cases = [((3, 8, 8, 12, 2, 8960), "processes per node (LOCAL_WORLD_SIZE = 8)"),
             ((2, 3, 2, 12, 2, 8960), "divide the world size 3"),
             ((8, 8, 8, 28, 4, 18944), "attention heads (28)"),
             ((4, 4, 4, 12, 3, 8960), "3 KV heads or be a multiple"),
             ((4, 4, 4, 12, 2, 8962), "intermediate_size = 8962")]
    for args, words in cases:
        with pytest.raises(ConfigError, match="rollout.tp_size") as e:
            check_tp(*args)
        assert words in str(e.value) and "\n" not in str(e.value)
