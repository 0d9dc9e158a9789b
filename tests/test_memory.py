"""The memory planner (lwz.memory): its parameter / gradient / AdamW / KV-cache bytes against the
storages of real tensors (a Transformer + AdamW after one step, FSDP2 shards on two gloo ranks,
the KV cache generate() allocates), its training estimate against the peaks profile_step recorded
on GPUs, and the CLI."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from lwz import memory
from lwz.config import load_config
from lwz.memory import Cluster, TrainLayout, model_params, plan_memory, rollout_items, state_items, train_items
from lwz.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a scaled-down Qwen2.5: GQA, q/k/v biases, untied head, a vocabulary that does not split evenly
SMALL = dict(model_type="qwen2", vocab_size=1001, hidden_size=96, intermediate_size=264, num_hidden_layers=3,
             num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
             attention_bias=True, max_position_embeddings=512)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _one_step(model, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=g)
    pos = torch.cat([torch.arange(25), torch.arange(15)])
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    targets = torch.cat([ids[1:25], torch.tensor([-100]), ids[26:], torch.tensor([-100])])
    logp, _ = model(ids, pos, cu, 25, targets=targets)  # the head used inside forward, as FSDP2 needs
    (-logp.float().mean()).backward()
    opt.step()


def _within(pred, real, tol=0.05):
    return abs(pred / real - 1) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_match_a_real_model_and_adamw(dtype):
    mcfg = ModelConfig(**SMALL)
    model = Transformer(mcfg).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _one_step(model, opt)
    real_params = _storage_bytes(model.parameters())
    real_grads = _storage_bytes(p.grad for p in model.parameters())
    real_adam = _storage_bytes(t for s in opt.state.values() for t in s.values())
    el = torch.empty((), dtype=dtype).element_size()
    lay = TrainLayout(shards=1, fsdp=False, master_bytes=el, compute_bytes=el, reduce_bytes=el)
    p = model_params(mcfg)
    items = state_items(p, lay)
    assert _within(items["master weights (whole)"], real_params)
    assert _within(items["AdamW state (whole)"], real_adam)
    assert _within(p.numel(1) * el, real_grads)
    assert p.numel(1) == model.num_params()  # exact, from the meta-device build


def _fsdp_worker(rank, world, store, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from lwz.distributed import shard_model, shutdown_distributed
    torch.manual_seed(0)
    model = shard_model(Transformer(ModelConfig(**SMALL)), None, None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _one_step(model, opt)
    local = [p.to_local() for p in model.parameters()]
    got = dict(params=_storage_bytes(local), grads=_storage_bytes(p.grad.to_local() for p in model.parameters()),
               adam=_storage_bytes(t.to_local() if hasattr(t, "to_local") else t
                                   for s in opt.state.values() for t in s.values()))
    torch.save(got, f"{out}.{rank}")
    shutdown_distributed(exit_code=0)


def test_fsdp_shard_bytes_match_two_gloo_ranks(tmp_path):
    """FSDP2 over 2 ranks: every rank's parameter, gradient and AdamW storages are what the planner
    predicts for a 1/2 shard (dim 0 padded to whole rows per rank)."""
    out = str(tmp_path / "x")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    p = model_params(ModelConfig(**SMALL))
    items = state_items(p, TrainLayout(shards=2, fsdp=True, master_bytes=4, compute_bytes=4, reduce_bytes=4))
    for r in range(2):
        got = torch.load(f"{out}.{r}")
        assert _within(items["master weights (1/2)"], got["params"]), (r, got)
        assert _within(p.numel(2) * 4, got["grads"]), (r, got)
        assert _within(items["AdamW state (1/2)"], got["adam"]), (r, got)
    whole = p.numel(1) * 4
    assert not _within(items["master weights (1/2)"], whole)  # a shard really is half


def test_kv_cache_bytes_match_what_generate_allocates(monkeypatch):
    """The rollout's KV-cache item for R rows equals the storages of the cache generate() builds for
    a config with that batch_size (prompt + max_new_tokens - 1 slots)."""
    from lwz import rollout
    mcfg = ModelConfig(**SMALL)
    model = Transformer.from_config(mcfg, seed=0)
    caches = []
    real_setup = Transformer.setup_caches

    def spy(self, *a, **kw):
        table = real_setup(self, *a, **kw)
        caches.append(self.caches())
        return table
    monkeypatch.setattr(Transformer, "setup_caches", spy)
    prompt_len, new, rows = 7, 9, 3
    rollout.generate(model, [list(range(2, 2 + prompt_len))],
                     rollout.SamplingParams(n=4, max_new_tokens=new, temperature=1.0, seed=0),
                     rollout.EngineSettings(batch_size=rows, decode_kernel="sdpa"))
    assert len(caches) == 1
    real = _storage_bytes([t for c in caches[0] for t in (c.k, c.v)])
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.toml"),
                      [f"--data.max_prompt_tokens={prompt_len}", f"--rollout.max_new_tokens={new}",
                       "--grpo.max_tokens_per_microbatch=64", f"--rollout.batch_size={rows}",
                       "--rollout.decode_kernel=sdpa", "--rollout.cuda_graphs=false"])
    lay = memory.layout_of(cfg, Cluster(1, 1))
    items = rollout_items(mcfg, model_params(mcfg), cfg, lay, rows, {})
    kv = next(v for k, v in items.items() if k.startswith("KV cache"))
    assert kv == real


def test_training_estimate_matches_recorded_gpu_peaks():
    """profile_step's packed step as recorded on H100 / H200 (bench/results): the planner's training
    estimate for the same model, tokens and layout is within 15% of torch.cuda.max_memory_allocated."""
    from bench.memory_check import predict
    seen = 0
    for name in ("profile_step-h200.json", "profile_step-fixed-h100.json", "profile_step-8k-h100.json"):
        d = json.load(open(os.path.join(ROOT, "bench", "results", name)))
        for c in d["cases"]:
            measured = c["packed"]["peak_mem_bytes"]
            pred = predict(d["model"]["preset"], c["tokens"], 2, d["activation_checkpointing"])["total"]
            assert abs(pred / measured - 1) <= 0.15, (name, c["tokens"], pred, measured)
            seen += 1
    assert seen >= 3


def test_activations_grow_with_tokens_and_limits_are_consistent():
    cfg = load_config(os.path.join(ROOT, "configs", "qwen2.5-7b.toml"))
    plan = plan_memory(cfg, Cluster(nodes=8))
    budget = plan.cluster.budget
    mcfg, _ = memory.load_shapes(cfg.model.path, "model.path")
    p, lay = model_params(mcfg), memory.layout_of(cfg, plan.cluster)
    small, big = (sum(train_items(mcfg, p, lay, t).values()) for t in (16384, 32768))
    assert big > small
    # the largest micro-batch that fits fits, one token more does not (with the resident RM shard)
    extra = {k: v for k, v in plan.phase("training").items.items() if k.startswith("quality RM")}
    at = lambda t: sum(train_items(mcfg, p, lay, t, extra).values())  # noqa: E731
    assert at(plan.max_microbatch_tokens) <= budget < at(plan.max_microbatch_tokens + 1)


@pytest.mark.parametrize("name", ["qwen2.5-32b", "qwen2.5-7b"])
def test_shipped_configs_fit_eight_nodes(name):
    """The paper's configs fit 8 x 8 GPUs of 80 GB with 14k-token rollouts and group 32."""
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.toml"))
    assert cfg.rollout.max_new_tokens >= 14000 and cfg.rollout.group_size == 32 and cfg.rewards.quality
    plan = plan_memory(cfg, Cluster(nodes=8, gpus_per_node=8, gpu_mem_gib=80))
    assert plan.fits, plan.advice
    assert all(ph.total <= plan.cluster.budget for ph in plan.phases)


def test_cli_prints_the_table(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = memory.main(["--config", os.path.join(ROOT, "configs", "qwen2.5-32b.toml"), "--nodes", "8",
                      "--gpu-mem-gib=80", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    for word in ("rollout", "reward", "training", "KV cache", "generation weights (TP shard 1/8)",
                 "largest that fit", "fits"):
        assert word in text, (word, text)
    d = json.loads(out.read_text())
    assert d["fits"] and d["max_rows"] >= d["rows"] > 0 and d["phases"]["training"]["total"] <= d["budget_bytes"]


def test_cli_unfittable_config_says_what_to_change(capsys):
    rc = memory.main(["--config", os.path.join(ROOT, "configs", "qwen2.5-32b.toml"), "--nodes", "8",
                      "--rollout.tp_size=1"])
    text = capsys.readouterr().out
    assert rc == 1
    lines = [ln for ln in text.splitlines() if ln.startswith("does not fit:")]
    assert len(lines) == 1 and "set rollout.tp_size = " in lines[0], text


@pytest.mark.parametrize("args, expect", [
    (["--rollout.tp_size=3"], "config error: rollout.tp_size = 3 must divide the processes per node (LOCAL_WORLD_SIZE = 8)"),
    (["--rollout.bogus=1"], "config error: unknown key"),
    (["--nodes", "zero"], "config error: --nodes = 'zero': expected int"),
    (["--model.path=/nowhere/Mystery-9B"], "error: model.path = '/nowhere/Mystery-9B': no config.json there"),
    (["--shapes", "nope"], "error: shape file 'nope' not found"),
])
def test_cli_bad_input_is_one_line(capsys, args, expect):
    try:
        rc = memory.main(["--config", os.path.join(ROOT, "configs", "qwen2.5-32b.toml"), "--nodes", "8"] + args)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(expect) and len(err.strip().splitlines()) == 1, err


def test_memory_check_bench_runs_on_the_cpu(tmp_path):
    """bench/memory_check.py (device_check.sh's step) at the tiny size: the prediction is written; on
    the CPU there is nothing to measure, and the JSON says so."""
    from bench import memory_check
    out = tmp_path / "m.json"
    assert memory_check.main(["--preset", "tiny", "--seq-len", "64", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    if torch.cuda.is_available():  # the tiny model measured on the GPU
        assert d["measured_bytes"] > 0 and d["status"] == "ok"
    else:
        assert d["measured_bytes"] is None and d["status"].startswith("prediction only")
    assert d["predicted_bytes"] == sum(d["predicted_items"].values()) > 0 and d["tokens"] >= 64


def test_block_activation_formula_matches_what_autograd_saves():
    """One bf16 decoder block's forward with autograd: the bytes of the tensors autograd saves (its
    own weights and the shared cos/sin left out) are what the planner's per-token formula says."""
    from lwz.memory import _block_saved_bytes_per_token
    from lwz.model import Block, rope_cos_sin, rope_inv_freq
    mcfg = ModelConfig(**dict(SMALL, hidden_size=256, intermediate_size=704, num_attention_heads=8, head_dim=32))
    block = Block(mcfg).to(torch.bfloat16)
    N = 512
    x = torch.randn(N, mcfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(rope_inv_freq(mcfg), torch.arange(N), torch.bfloat16)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        block(x, cos, sin, torch.tensor([0, N], dtype=torch.int32), N)
    skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    real = sum(v for k, v in saved.items() if k not in skip)
    assert _within(N * _block_saved_bytes_per_token(mcfg, 2), real, tol=0.10), (real / N)
