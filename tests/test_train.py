"""The GRPO loop: world-size invariance of an update, a 2-process run of the tiny config, exact
resume, and a checkpoint killed mid-write."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from lwz.distributed import shutdown_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _join(rank, world, store):
    """Join a gloo group through a file store (no port to race for), then lwz's own init."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from lwz.distributed import init_distributed
    return init_distributed("gloo")


def _fixed_batch(vocab=1024):
    """Rollouts of different lengths with signed advantages and perturbed old log-probs."""
    from lwz.batch import Batch
    g = torch.Generator().manual_seed(7)
    toks, adv, old, pl = [], [], [], []
    for p, r in [(9, 5), (4, 17), (12, 1), (6, 30), (3, 11), (15, 8), (7, 22)]:
        toks.append(torch.randint(2, vocab, (p + r,), generator=g))
        adv.append(float(torch.randn(1, generator=g)))
        old.append(-7.0 + 0.3 * torch.randn(r, generator=g))
        pl.append(p)
    cu = torch.tensor([0] + [len(t) for t in toks]).cumsum(0).to(torch.int32)
    old = torch.cat(old)
    return Batch(tokens=torch.cat(toks).to(torch.int32), cu_seqlens=cu, prompt_lengths=torch.tensor(pl),
                 advantages=torch.tensor(adv), rollout_logp=torch.zeros_like(old), old_logp=old)


def _plan_all(batch, cfg, world, model):
    from lwz.train import plan
    return plan(batch, list(range(len(batch))), cfg, world, model.config)


def _update_worker(rank, world, store, out_path, loss_agg, accumulate_unsharded, tp=1):
    torch.set_num_threads(1)
    from lwz.config import load_config
    from lwz.distributed import build_groups, full_state_dict
    from lwz.train import build_policy, train_minibatch
    cfg = load_config(os.path.join(ROOT, "configs/tiny.toml"),
                      [f"--model.path={ROOT}/assets/tiny-model", "--grpo.max_tokens_per_microbatch=40", "--data.max_prompt_tokens=20", "--rollout.max_new_tokens=20",
                       f"--grpo.loss_agg={loss_agg}", f"--distributed.accumulate_unsharded={accumulate_unsharded}"])
    if tp > 1:  # 2 "nodes" of 2 processes: HSDP shards inside each, TP groups {0, 1} and {2, 3}
        os.environ["LOCAL_WORLD_SIZE"] = "2"
    d = _join(rank, world, store)
    groups = build_groups(d, tp, hsdp=tp > 1)
    assert (groups.fsdp_mesh is not None and groups.fsdp_mesh.ndim == 2) == (tp > 1)
    model = build_policy(cfg, d, mesh=groups.fsdp_mesh)
    # eps well above fp32 summation noise: Adam divides by |g|, which would turn 1e-12 reordering
    # differences in near-zero gradients into full-size steps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.0)
    batch = _fixed_batch()
    plans = _plan_all(batch, cfg, world, model)
    assert all(len(p) == len(plans[0]) for p in plans)
    stats = train_minibatch(model, opt, batch, plans, cfg, d, pad_id=1)
    shard = None
    if tp > 1:  # the updated weights as TP shards, straight from the HSDP layout
        from lwz.tp import build_tp_model, load_tp_shards
        tp_model = build_tp_model(model.config, tp, groups.tp_rank, groups.tp_group, torch.float32, d.device)
        load_tp_shards(tp_model, model, tp, groups.tp_rank)
        shard = tp_model.state_dict()
    sd = full_state_dict(model)
    if rank == 0:
        torch.save({"sd": sd, "stats": stats}, out_path)
    if shard is not None:
        torch.save(shard, f"{out_path}.tp{rank}")
    shutdown_distributed(exit_code=0)


@pytest.mark.parametrize("loss_agg,accumulate_unsharded,world,tp", [
    ("token-mean", False, 2, 1), ("seq-mean-token-mean", False, 2, 1), ("token-mean", True, 2, 1),
    ("token-mean", False, 4, 2)])
def test_world_size_invariance(tmp_path, loss_agg, accumulate_unsharded, world, tp):
    """One mini-batch over several micro-batches: the same update on 1 and `world` ranks, with a
    reduce-scatter per micro-batch (the default) or one per mini-batch (accumulate_unsharded). With
    tp = 2 on 4 ranks: HSDP over 2 "nodes" of 2, and each rank's TP shard of the updated weights
    (moved out of the HSDP layout) equals the same slice of the 1-process model."""
    results = []
    for w in (1, world):
        out = str(tmp_path / f"w{w}.pt")
        mp.spawn(_update_worker, args=(w, str(tmp_path / f"store{w}"), out, loss_agg, accumulate_unsharded,
                                       tp if w > 1 else 1), nprocs=w, join=True)
        results.append(torch.load(out))
    a, b = results
    assert a["stats"]["grad_norm"] > 0
    assert a["stats"]["grad_norm"] == pytest.approx(b["stats"]["grad_norm"], rel=1e-5)
    moved = 0.0
    for k in a["sd"]:
        torch.testing.assert_close(a["sd"][k], b["sd"][k], rtol=0, atol=1e-6, msg=k)
    # the update really changed the weights (so equality above is not vacuous)
    from lwz.model import Transformer
    init = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0).state_dict()
    moved = max((a["sd"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-4
    if tp > 1:
        from lwz.tp import build_tp_model, load_tp_shards
        one = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"))
        one.load_state_dict(a["sd"])
        for r in range(world):
            want = build_tp_model(one.config, tp, r % tp, None, torch.float32, "cpu")
            load_tp_shards(want, one, tp, r % tp)  # a whole model: plain slicing, no exchange
            got = torch.load(f"{tmp_path / f'w{world}.pt'}.tp{r}")
            for k, v in want.state_dict().items():
                torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def _torchrun_cmd(tmp_path, name, extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "lwz/train.py"), "--config", os.path.join(ROOT, "configs/tiny.toml"),
           f"--logging.run_dir={tmp_path}", f"--name={name}", "--logging.plot=false",
           "--rollout.max_new_tokens=16", "--rollout.prompts_per_step=2", "--rollout.group_size=4"] + extra
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return cmd, env


def _torchrun(tmp_path, name, extra, nproc=2, timeout=600):
    cmd, env = _torchrun_cmd(tmp_path, name, extra, nproc)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(tmp_path, name):
    with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_two_process_run_and_exact_resume(tmp_path):
    # steps long enough to kill one mid-run; the paged KV cache in a real run
    slow = ["--rollout.max_new_tokens=64", "--rollout.group_size=8", "--rollout.page_size=16"]
    full = _torchrun(tmp_path, "full", ["--steps=6", "--checkpoint.every=3", "--checkpoint.export_hf=true"] + slow)
    assert full.returncode == 0, full.stderr[-3000:]
    rows = _metrics(tmp_path, "full")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for k in ("reward_total", "reward_length", "reward_format", "grad_norm", "entropy", "clip_frac_low",
                  "response_tokens_mean", "truncation_rate", "time_rollout", "tokens_per_s", "padding_waste",
                  "rollout_cache_rows"):
            assert k in r and r[k] == r[k] and abs(r[k]) != float("inf"), (k, r)
        assert r["logp_mismatch_mean"] < 1e-3, r  # recomputed old log-probs vs the sampler's
        assert r["rollout_cache_rows"] == 1 * 8  # CPU, batch_size 0: all of the rank's 1 prompt x 8 answers
        assert r["rollout_preemptions"] == 0  # the CPU pool holds every row's whole budget
    # the HF export loads in transformers
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "hf"))

    # run 6 steps with a checkpoint every 3, kill the whole process group as soon as the step-3
    # checkpoint is complete, `--resume auto` to 6: identical metrics
    # (except timings) and parameters
    import signal
    import time
    cmd, env = _torchrun_cmd(tmp_path, "part", ["--steps=6", "--checkpoint.every=3"] + slow)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log = tmp_path / "part" / "metrics.jsonl"
    done3 = tmp_path / "part" / "checkpoints" / "step_00000003" / "COMPLETE"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not done3.exists():
        time.sleep(0.02)
    # torchrun's workers may sit in their own process groups: kill every process of this run
    os.killpg(proc.pid, signal.SIGKILL)
    pattern = f"--logging.run_dir={tmp_path} --name=part"
    subprocess.run(["pkill", "-KILL", "-f", "--", pattern], check=False)
    proc.wait()
    time.sleep(0.5)
    assert subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True).stdout == b"", "workers survived"
    assert len(log.read_text().splitlines()) < 6, "the run finished before it could be killed"
    res = _torchrun(tmp_path, "part", ["--steps=6", "--checkpoint.every=3", "--resume", "auto",
                                       "--checkpoint.export_hf=true"] + slow)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step_00000003" in res.stdout
    a, b = _metrics(tmp_path, "full"), _metrics(tmp_path, "part")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for k in ra:
            if not (k.startswith("time_") or k in ("tokens_per_s", "mfu")):
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "full" / "hf" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "hf" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_checkpoint_killed_mid_write_keeps_previous(tmp_path):
    from lwz.checkpoint import latest_checkpoint
    r = _torchrun(tmp_path, "k", ["--steps=2", "--checkpoint.every=1", "--checkpoint.keep=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "k" / "checkpoints"
    good = latest_checkpoint(str(root))
    assert good.endswith("step_00000002")
    # a write of step 3 killed half-way: the tmp folder exists with partial files
    shutil.copytree(good, str(root / "step_00000003.tmp"))
    (root / "step_00000003.tmp" / "COMPLETE").unlink()
    for f in (root / "step_00000003.tmp").iterdir():
        if f.suffix == ".distcp":
            f.write_bytes(f.read_bytes()[:10])
    # and a step folder renamed without its marker (cannot happen with our writer, but be safe)
    shutil.copytree(good, str(root / "step_00000004"))
    (root / "step_00000004" / "COMPLETE").unlink()
    assert latest_checkpoint(str(root)) == good
    res = _torchrun(tmp_path, "k", ["--steps=3", "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step_00000002" in res.stdout


def test_bad_config_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "lwz/train.py"), "--config",
                        os.path.join(ROOT, "configs/tiny.toml"), "--rollout.group_sise=4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown key 'rollout.group_sise'" in r.stderr and "group_size" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fsdp_off_with_several_processes_is_refused(tmp_path):
    r = _torchrun(tmp_path, "nofsdp", ["--distributed.fsdp=false", "--steps=1"])
    assert r.returncode != 0
    assert "distributed.fsdp=false with 2 processes would train 2 unsynchronised copies" in r.stderr


def test_tensor_parallel_rollout_run(tmp_path):
    """torchrun, 2 processes as one TP group (rollout.tp_size = 2): the run trains and logs what
    moving the weights into TP shards cost; a tp_size that does not divide the node is one line."""
    r = _torchrun(tmp_path, "tp", ["--rollout.tp_size=2", "--steps=2", "--checkpoint.every=0",
                                   "--checkpoint.export_hf=false"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _metrics(tmp_path, "tp")
    assert len(rows) == 2 and all(x["tp_weight_bytes"] > 0 and x["time_tp_weights"] >= 0 for x in rows)
    assert all(math.isfinite(x["reward_total"]) and x["grad_norm"] > 0 for x in rows)
    bad = _torchrun(tmp_path, "tp3", ["--rollout.tp_size=3", "--steps=1"])
    assert bad.returncode != 0
    assert "rollout.tp_size = 3 must divide the processes per node (LOCAL_WORLD_SIZE = 2)" in bad.stderr
    assert f'File "{ROOT}/lwz' not in bad.stderr  # no worker traceback (the launcher prints its own)


def test_tiny_default_learns(tmp_path):
    """GRPO from a random model (configs/tiny.toml, `make train` without its CPT stage) raises the
    mean total reward of the last 10 steps over the first 10 by at least 0.2."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "lwz/train.py"), "--config", os.path.join(ROOT, "configs/tiny.toml"),
           f"--logging.run_dir={tmp_path}", "--checkpoint.every=0"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _metrics(tmp_path, "tiny")
    first = sum(x["reward_total"] for x in rows[:10]) / 10
    last = sum(x["reward_total"] for x in rows[-10:]) / 10
    assert last >= first + 0.2, (first, last)
    assert "mean total reward: first 10 steps" in r.stdout
    assert os.path.isfile(os.path.join(tmp_path, "tiny", "curves.png"))


class _ScoreByLength:
    """Stands in for a reward model: NaN for a broken answer, whose floor is the batch minimum."""
    broken_score = "min"

    def score_valid(self, prompts, answers, meta):
        return torch.tensor([float("nan") if a is None else len(p) + 0.5 * len(a) + m["k"]
                             for p, a, m in zip(prompts, answers, meta)])

    def __call__(self, prompts, answers, meta):
        from lwz.rewards.quality import fill_broken
        return fill_broken(self.score_valid(prompts, answers, meta), self.broken_score)


def _hosted_worker(rank, world, store, out_path):
    from lwz.rewards.hosting import HostedReward
    d = _join(rank, world, store)
    n = 3 + 2 * rank  # ranks hold different numbers of samples
    prompts = [f"prompt {rank}-{i}" * (i + 1) for i in range(n)]
    answers = [None if i == 1 else "answer" * i for i in range(n)]
    meta = [{"k": 10 * rank + i} for i in range(n)]
    # only rank 1 hosts the model; rank 0 has none and must still get its scores
    fn = HostedReward(_ScoreByLength() if rank == 1 else None, [1], d)
    got = fn(prompts, answers, meta)
    torch.save({"got": got, "want": _ScoreByLength()(prompts, answers, meta)}, f"{out_path}.{rank}")
    shutdown_distributed(exit_code=0)


def test_quality_reward_hosted_on_one_rank(tmp_path):
    """rewards.quality_ranks: only the host ranks load the reward model; every rank gets the
    scores of its own samples, equal to scoring them locally."""
    out = str(tmp_path / "hosted")
    mp.spawn(_hosted_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(f"{out}.{r}")
        assert torch.equal(res["got"], res["want"].float())


def test_pretrained_policy_and_sharded_quality_model_in_a_run(tmp_path):
    """torchrun, 2 processes: the policy loads from an HF folder (sharded before allocation), a
    quality reward model is FSDP2-sharded over both ranks, and the run scores and updates."""
    from lwz.model import Transformer
    from lwz.rewards.quality import QualityRewardModel
    from lwz.tokenizer import load_tokenizer
    Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=1).save_pretrained(str(tmp_path / "pol"))
    tok = load_tokenizer(os.path.join(ROOT, "assets/tokenizer"), require_eos=False, pad_from_eos=False)
    rm = QualityRewardModel.from_config(os.path.join(ROOT, "assets/tiny-model"), tokenizer=tok, template="plain")
    rm.save_pretrained(str(tmp_path / "rm"))
    r = _torchrun(tmp_path, "rm", ["--steps=2", "--model.init=pretrained", f"--model.path={tmp_path / 'pol'}",
                                   "--rewards.quality=true", f"--rewards.quality_path={tmp_path / 'rm'}",
                                   "--rewards.quality_fsdp=on", "--rewards.weights=[1.0,1.0,1.0]",
                                   "--rollout.old_logprobs=rollout", "--grpo.mini_batches=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _metrics(tmp_path, "rm")
    assert [x["step"] for x in rows] == [1, 2]
    for x in rows:
        assert x["reward_quality"] == x["reward_quality"] and x["grad_norm"] > 0, x
        # rollout mode: the first mini-batch's update forward measures the sampler/trainer mismatch
        # (half the sequences with 2 mini-batches); fp32 on CPU, the two paths agree closely
        assert 0 < x["logp_mismatch_tokens"] < x["response_tokens_mean"] * 8, x
        assert x["logp_mismatch_mean"] < 1e-3, x


def test_non_finite_grad_norm_skips_the_update():
    """A NaN advantage makes the gradient non-finite: the optimizer step is skipped and counted,
    the weights stay as they were, and the next finite mini-batch updates normally."""
    from lwz.config import load_config
    from lwz.distributed import Dist
    from lwz.train import build_policy, train_minibatch
    cfg = load_config(os.path.join(ROOT, "configs/tiny.toml"),
                      [f"--model.path={ROOT}/assets/tiny-model", "--distributed.fsdp=false"])
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), backend="none")
    model = build_policy(cfg, d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _fixed_batch()
    batch.advantages[2] = float("nan")
    plans = _plan_all(batch, cfg, 1, model)
    out = train_minibatch(model, opt, batch, plans, cfg, d, pad_id=1)
    assert out["skipped"] == 1.0 and not (out["grad_norm"] == out["grad_norm"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    batch.advantages[2] = 0.5
    out = train_minibatch(model, opt, batch, plans, cfg, d, pad_id=1)
    assert out["skipped"] == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_logprob_scratch_budget_reaches_the_kernel(monkeypatch):
    """grpo.logprob_scratch_mib is the fused log-prob backward's budget in the training forward."""
    import kernels.logprob as lp_mod
    from lwz.config import load_config
    from lwz.distributed import Dist
    from lwz.train import build_policy, train_minibatch
    cfg = load_config(os.path.join(ROOT, "configs/tiny.toml"),
                      [f"--model.path={ROOT}/assets/tiny-model", "--distributed.fsdp=false",
                       "--grpo.logprob_scratch_mib=3"])
    seen = []
    real = lp_mod.fused_logprobs

    def spy(*a, **kw):
        seen.append(kw.get("bwd_scratch_bytes"))
        return real(*a, **kw)

    monkeypatch.setattr(lp_mod, "fused_logprobs", spy)
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), backend="none")
    model = build_policy(cfg, d)
    batch = _fixed_batch()
    train_minibatch(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batch, _plan_all(batch, cfg, 1, model),
                    cfg, d, pad_id=1)
    assert seen and all(b == 3 << 20 for b in seen), seen


def test_shutdown_exit_code_keeps_output():
    """shutdown_distributed(exit_code=...) leaves at once with that code, after flushing what the
    process printed (block-buffered into a pipe) and with the group destroyed first."""
    code = ("import torch.distributed as dist, tempfile, os\n"
            "from lwz.distributed import shutdown_distributed\n"
            "f = os.path.join(tempfile.mkdtemp(), 's')\n"
            "dist.init_process_group('gloo', init_method='file://' + f, rank=0, world_size=1)\n"
            "print('row written')\n"
            "shutdown_distributed(exit_code=3)\n"
            "print('never')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout == "row written\n"


def test_tis_weights_fold_exactly_into_the_advantages():
    """grpo.tis_cap: min(pi_old / pi_rollout, C) per token, as the trainer applies it (the weight
    multiplies each token's advantage, placed by token_weights) == a plain per-token formula
    w * policy-gradient term, value and gradient, with clipping and a dual clip active."""
    from kernels.grpo_loss import grpo_loss
    from lwz.batch import microbatch
    from lwz.train import tis_weights, token_weights
    batch = _fixed_batch()
    g = torch.Generator().manual_seed(1)
    R = batch.rollout_logp.numel()
    batch.rollout_logp = batch.old_logp + 0.4 * torch.randn(R, generator=g)
    cap = 1.5
    w = tis_weights(batch.old_logp, batch.rollout_logp, cap)
    plain_w = torch.minimum(torch.exp(batch.old_logp) / torch.exp(batch.rollout_logp), torch.tensor(cap))
    torch.testing.assert_close(w, plain_w)
    assert (w == cap).any() and (w < 1).any()
    seqs = [3, 0, 6, 1]  # a micro-batch out of order
    mb = microbatch(batch, seqs, 0)
    # placement: the same positions the micro-batch gives old_logp (its own packing of a [R] tensor)
    tw = token_weights(batch, mb, w)
    placed = microbatch(type(batch)(**{**batch.__dict__, "old_logp": w}), seqs, 0).old_logp
    assert torch.equal(tw[mb.mask], placed[mb.mask]) and (tw[~mb.mask] == 1).all()
    logp = (mb.old_logp + 0.3 * torch.randn(mb.old_logp.shape, generator=g)).requires_grad_()
    n = int(mb.mask.sum())
    kw = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, loss_agg="token-mean", global_tokens=n, impl="torch")
    loss, _ = grpo_loss(logp, mb.old_logp, mb.advantages * tw, mb.mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    # the plain formula
    lp = logp.detach().clone().requires_grad_()
    A, m = mb.advantages, mb.mask.float()
    r = torch.exp(lp - mb.old_logp)
    pg = torch.maximum(-A * r, -A * r.clamp(1 - 0.2, 1 + 0.28))
    pg = torch.where(A < 0, torch.minimum(pg, -3.0 * A), pg)
    ref = (tw * pg * m).sum() / n
    (ref_grad,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    # the weights matter: unweighted differs
    assert not torch.allclose(grpo_loss(logp, mb.old_logp, mb.advantages, mb.mask, **kw)[0], ref)


def test_tis_cap_needs_recomputed_old_logprobs():
    from lwz.config import ConfigError, load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs/tiny.toml"), ["--grpo.tis_cap=2.0"])
    assert cfg.grpo.tis_cap == 2.0
    with pytest.raises(ConfigError, match="grpo.tis_cap = 2.0 is not allowed: must be None unless rollout.old_logprobs"):
        load_config(os.path.join(root, "configs/tiny.toml"), ["--grpo.tis_cap=2.0", "--rollout.old_logprobs=rollout"])
    with pytest.raises(ConfigError, match="grpo.tis_cap"):
        load_config(os.path.join(root, "configs/tiny.toml"), ["--grpo.tis_cap=0"])
