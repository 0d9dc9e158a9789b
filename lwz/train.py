"""GRPO for LongWriter-Zero: `torchrun lwz/train.py --config configs/X.toml [--a.b=v ...]`.

One step, top to bottom:
  1. take `prompts_per_step` prompts (the cursor is training state); each rank takes its share
  2. rollout: `group_size` answers per prompt with the KV-cache engine (full params gathered)
  3. rewards (length, quality, format) per group on the rank that sampled it; advantages are each
     reward's group z-score, averaged (the paper's formula)
  4. one flat tensor batch (lwz.batch: tokens, cu_seqlens, advantages, per-response-token
     log-probs) exchanged across ranks as tensors; the planner splits it into token-budget
     micro-batches balanced across ranks, the pack op builds each one
  5. old log-probs: recomputed by the policy before the update (default) or the sampler's; the
     reference model's likewise when grpo.kl_coef > 0; written into the batch's tensors
  6. for ppo_epochs x mini-batches: forward over packed micro-batches -> fused log-probs ->
     GRPO loss normalised by the whole mini-batch's token/sequence counts -> backward;
     clip, AdamW step (a non-finite grad norm skips the update)
  7. metrics (rank 0) and an atomic checkpoint every N steps; HF export at the end
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # `torchrun lwz/train.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from kernels.grpo_loss import grpo_loss
from lwz import checkpoint as ckpt
from lwz import loop
from lwz.batch import Batch, exchange, from_rollout, gather_response_values, microbatch, padded_responses
from lwz.config import ConfigError, to_dict
from lwz.distributed import DTYPES, agree_on_errors, all_reduce_sum, build_groups, check_tp, local_world_size
from lwz.loop import backward_microbatches, build_optimizer, build_policy, lr_lambda, optimizer_step  # noqa: F401
from lwz.eval import training_eval, training_eval_set
from lwz.metrics import NVML, MetricsLog, peak_flops
from lwz.model import ModelLoadError, model_flops_per_token
from lwz.packing import attn_coeff_for, padding_waste, plan_microbatches
from lwz.prompts import (ANSWER_CLOSE, PromptCursor, PromptDataError, extract_answer, extract_think,
                         load_prompts, long_prompts_message, template_prompt, tokenize_prompts)
from lwz.rewards import group_advantages
from lwz.rewards.format import FormatReward
from lwz.rewards.hosting import HostedReward, load_quality_model
from lwz.rewards.length import LengthReward, count_words
from lwz.rollout import (EngineSettings, SamplingParams, full_params_for_generation, generate, logprob_mismatch,
                         strip_stop_string)
from lwz.tokenizer import TokenizerError, check_fits_model, load_tokenizer, pad_id


# ---- building blocks ---------------------------------------------------------------------------

def build_rewards(cfg, d):
    """The enabled rewards, in the order length, quality, format (matching rewards.weights)."""
    r = cfg.rewards
    fns, weights = [], []
    if r.length:
        fns.append(LengthReward(max_words=r.length_max_words, default_range=tuple(r.default_length_range),
                                on_broken=r.length_on_broken_format))
        weights.append(r.weights[0])
    if r.quality:
        hosts = sorted(set(r.quality_ranks))
        bad = [h for h in hosts if h >= d.world]
        if bad:
            raise ConfigError(f"rewards.quality_ranks = {hosts}: ranks {bad} do not exist (world size {d.world})")
        model = load_quality_model(cfg, d, hosts)
        fns.append(HostedReward(model, hosts, d) if hosts else model)
        weights.append(r.weights[1])
    if r.format:
        fns.append(FormatReward(penalty_weight=r.format_repetition_weight))
        weights.append(r.weights[2])
    return fns, weights


def policy_logprobs(model, mb, temperature: float, entropy: bool, scratch_bytes: int | None = None):
    """(logp [N] fp32, entropy [N] fp32 or None) of a MicroBatch's targets."""
    return model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, targets=mb.targets,
                 temperature=temperature, return_entropy=entropy, logprob_scratch_bytes=scratch_bytes)


def plan(batch: Batch, seqs: list[int], cfg, world: int, mcfg) -> list[list[list[int]]]:
    """Rank -> micro-batch -> indices into `batch` of the sequences `seqs` (a mini-batch), balanced
    on the planner's cost (the quadratic one weighs the gated MLP by mcfg.intermediate_size)."""
    g = cfg.grpo
    coeff = attn_coeff_for(mcfg.hidden_size, mcfg.intermediate_size) if g.pack_cost == "quadratic" else None
    local = plan_microbatches(batch.lengths[seqs], g.max_tokens_per_microbatch, num_ranks=world, cost=g.pack_cost,
                              attn_coeff=coeff)
    return [[[seqs[i] for i in mb] for mb in rank] for rank in local]


@torch.no_grad()
def recompute_logprobs(model, batch: Batch, full_plan, cfg, d, pad_id) -> torch.Tensor:
    """Per-response-token log-probs [R] of the whole batch under `model` (the policy before the
    update, or the reference): each rank computes its share of the plan, then all ranks gather."""
    mine = []
    for seqs in full_plan[d.rank]:
        mb = microbatch(batch, seqs, pad_id)
        logp, _ = policy_logprobs(model, mb, cfg.rollout.temperature, False)
        mine.append(logp[mb.resp_index])
    return gather_response_values(batch, full_plan, torch.cat(mine) if mine else torch.zeros(0), d.world, d.rank)


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weights [R] fp32: min(pi_old / pi_rollout, cap) per response
    token, from the trainer's recomputed log-probs and the sampler's."""
    return torch.exp(old_logp.float() - rollout_logp.float()).clamp(max=cap)


def token_weights(batch: Batch, mb, w: torch.Tensor) -> torch.Tensor:
    """Per-response-token values w [R] of `batch` -> [N] at the micro-batch's packed positions that
    predict those tokens (1 elsewhere; those positions are masked anyway)."""
    rc = batch.resp_cu
    idx = torch.cat([torch.arange(int(rc[s]), int(rc[s + 1])) for s in mb.seqs]) if mb.seqs else \
        torch.zeros(0, dtype=torch.int64)
    out = torch.ones(mb.input_ids.shape[0], dtype=torch.float32, device=mb.input_ids.device)
    out[mb.resp_index] = w.to(out.device)[idx.to(out.device)]
    return out


def train_minibatch(model, optimizer, batch: Batch, plans, cfg, d, pad_id, keep_logp: bool = False,
                    tis: torch.Tensor | None = None) -> dict:
    """One optimizer step over one mini-batch: the sequences of `plans` (rank -> micro-batch ->
    indices into `batch`, which every rank holds whole); each rank trains its share.
    keep_logp: store the forward's log-probs in batch.trainer_logp (on every rank; NaN for the
    sequences outside this mini-batch). tis: truncated importance-sampling weights [R] (tis_weights)
    or None. A token's weight w > 0 multiplies its advantage, which is exact for the clipped
    policy-gradient term (every branch of it, dual clip included, is positively homogeneous in the
    advantage) and leaves the KL and entropy terms unweighted."""
    g = cfg.grpo
    resp = batch.response_lengths[[i for rank in plans for mb in rank for i in mb]]
    n_tokens, n_seqs = int(resp.sum()), int((resp > 0).sum())  # the global normalisers, exact on every rank
    sums, kept = {}, []

    def loss_of(seqs):
        mb = microbatch(batch, seqs, pad_id)
        mask = mb.mask
        logp, ent = policy_logprobs(model, mb, cfg.rollout.temperature, True, g.logprob_scratch_mib << 20)
        if keep_logp:
            kept.append(logp.detach()[mb.resp_index])
        adv = mb.advantages if tis is None else mb.advantages * token_weights(batch, mb, tis)
        loss, stats = grpo_loss(logp, mb.old_logp, adv, mask, mb.ref_logp if g.kl_coef > 0 else None,
                                clip_low=g.clip_low, clip_high=g.clip_high, clip_c=g.clip_c, kl_coef=g.kl_coef,
                                kl_type=g.kl_type, loss_agg=g.loss_agg, global_tokens=max(n_tokens, 1),
                                global_seqs=max(n_seqs, 1), cu_seqlens=mb.cu_seqlens, norm_const=cfg.norm_const,
                                entropy=ent if g.entropy_coef > 0 else None, entropy_coef=g.entropy_coef)
        # stats are means over this micro-batch's unmasked tokens: re-weight to global sums
        n_mb = float(mask.sum())
        sums["tokens"] = sums.get("tokens", 0.0) + n_mb
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        sums["entropy"] = sums.get("entropy", 0.0) + float((ent.detach() * mask).sum())
        for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "kl_mean", "approx_kl"):
            if key in stats:
                sums[key] = sums.get(key, 0.0) + float(stats[key]) * n_mb
        return loss

    # reduce-scatter every micro-batch (sharded accumulation) unless asked to keep full gradients
    backward_microbatches(model, plans[d.rank], loss_of, d, cfg.distributed.accumulate_unsharded)
    if keep_logp:
        batch.trainer_logp = gather_response_values(batch, plans, torch.cat(kept) if kept else torch.zeros(0),
                                                    d.world, d.rank)
    keys = sorted(sums)
    tot = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], d.device)))
    gn, skipped = optimizer_step(model, optimizer, cfg.optim.grad_clip)
    nt = max(tot.get("tokens", 0.0), 1.0)
    out = {k: tot[k] / nt for k in keys if k not in ("tokens", "loss")}
    out.update(loss=tot.get("loss", 0.0), grad_norm=gn, skipped=float(skipped))
    return out


def rollout(policy, tok, records, cfg, d, step, groups=None):
    """Generate this rank's share of the step's prompts. Returns (per-sample dicts of texts for the
    rewards, the RolloutBatch (tokens and sampling log-probs as tensors), engine metrics: the
    KV-cache rows decoded through and the paged cache's preemptions).

    groups (lwz.distributed.Groups) with tp > 1: `records` are the prompts of this rank's whole TP
    group (its ranks' shares in TP-rank order, equal sizes); the group decodes them together with a
    tensor-parallel copy of the policy (lwz.tp) and each rank keeps the samples of its own share."""
    r = cfg.rollout
    tp = groups.tp if groups is not None else 1
    prompt_ids = [rec.token_ids.tolist() for rec in records]  # tokenised once, at start-up (_run)
    policy.eval()
    # one seed per TP group (the dp rank; = the rank without TP): its ranks draw the same samples
    seed = cfg.seed * 1_000_003 + step * 1009 + (groups.dp_rank if groups is not None else d.rank)
    sp, es = SamplingParams.from_config(r, [tok.eos_token_id], seed), EngineSettings.from_config(r)
    engine = {}
    if tp > 1:
        from lwz import tp as tpar
        dtype = DTYPES[cfg.distributed.param_dtype] if d.device.type == "cuda" else policy.lm_head_weight.dtype
        shard = tpar.build_tp_model(policy.config, tp, groups.tp_rank, groups.tp_group, dtype, d.device,
                                    attn_backend=cfg.model.attn_backend)
        engine.update(tpar.load_tp_shards(shard, policy, tp, groups.tp_rank))
        batch = generate(shard, prompt_ids, sp, es, tokenizer=tok)
        del shard
        k = len(records) // tp
        lo = groups.tp_rank * k
        batch, records = tpar.take_prompts(batch, lo, lo + k), records[lo:lo + k]
    else:
        with full_params_for_generation(policy):
            batch = generate(policy, prompt_ids, sp, es, tokenizer=tok)
    policy.train()
    texts = [template_prompt(rec.prompt, cfg.data) for rec in records]
    out = []
    for j, (pi, resp_ids) in enumerate(zip(batch.prompt_index.tolist(), batch.response_ids)):
        rec = records[pi]
        # drop eos/pad, keep the tags; the stop string that ended the sample is cut from the text,
        # so an answer never contains one and only `</answer>` closes an answer
        stop = batch.stopped_by[j]
        resp = strip_stop_string(tok.decode(resp_ids, skip_special_tokens=True), stop)
        out.append(dict(question=rec.prompt, prompt=texts[pi], response=resp,
                        truncated=bool(batch.truncated[j]), stopped_at_close=stop == ANSWER_CLOSE,
                        length_range=rec.length_range))
    engine.update(rollout_cache_rows=batch.cache_rows, rollout_preemptions=batch.preemptions)
    return out, batch, engine


def score(samples, reward_fns, weights, cfg):
    """Rewards [K, B] and advantages [B] of this rank's samples (whole groups are local)."""
    answers = [extract_answer(s["response"], stopped_at_close=s["stopped_at_close"]) for s in samples]
    meta = [dict(response=s["response"], length_range=s["length_range"], stopped_at_close=s["stopped_at_close"],
                 question=s["question"]) for s in samples]
    prompts = [s["question"] for s in samples]
    R = torch.stack([fn(prompts, answers, meta).float().cpu() for fn in reward_fns])
    adv = group_advantages(R, cfg.rollout.group_size, weights=weights, std_norm=cfg.rewards.std_norm)
    return R, adv, answers


def _startup_checks(cfg, d):
    """What must hold before any work or any write: tokenizer, world-size rules, the tokenizer
    against the model's vocabulary and context (cheap checks first), the prompt file, and the run
    folder / checkpoint to resume (lwz.checkpoint.check_run_start). Returns (tokenizer, prompt
    records, checkpoint path or None, the run identity a checkpoint saves)."""
    tok = load_tokenizer(cfg.tokenizer.path)
    if cfg.rollout.prompts_per_step % d.world:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a "
                          f"multiple of the world size {d.world} (each rank samples whole groups)")
    if not cfg.distributed.fsdp and d.world > 1:
        raise ConfigError(f"distributed.fsdp=false with {d.world} processes would train {d.world} unsynchronised "
                          f"copies (there is no DDP path); use distributed.fsdp=true")
    from lwz.model import ModelConfig
    mc = ModelConfig.from_hf(cfg.model.path)
    L = local_world_size(d.world)
    check_tp(cfg.rollout.tp_size, d.world, L, mc.num_attention_heads, mc.num_key_value_heads, mc.intermediate_size)
    if cfg.distributed.hsdp and d.world % L:
        raise ConfigError(f"distributed.hsdp = true needs the same processes on every node: the world size "
                          f"{d.world} is not a multiple of LOCAL_WORLD_SIZE = {L}")
    check_fits_model(tok, cfg.tokenizer.path, mc.vocab_size, cfg.model.path)
    room = mc.max_position_embeddings - cfg.data.max_prompt_tokens
    if room < 1:
        raise ConfigError(f"data.max_prompt_tokens = {cfg.data.max_prompt_tokens} leaves no room for an answer in "
                          f"the model's {mc.max_position_embeddings}-token context (max_position_embeddings)")
    if cfg.rollout.max_new_tokens > room and d.is_main:
        print(f"warning: rollout.max_new_tokens = {cfg.rollout.max_new_tokens} is more than the context leaves "
              f"after data.max_prompt_tokens ({mc.max_position_embeddings} - {cfg.data.max_prompt_tokens} = {room}): "
              f"an answer gets at most {mc.max_position_embeddings} minus its prompt's tokens (effective "
              f"max_new_tokens: {room} for the longest prompts)", file=sys.stderr, flush=True)
    records = load_prompts(cfg.data.prompts)
    # then every prompt templated and tokenised once, before step 1: an over-long one stops the run
    # now, not at the step that reaches it (and again on every resume); skipped ones are left out of
    # the cursor, which then runs over the kept records only
    n_read = len(records)
    records, too_long = tokenize_prompts(records, tok, cfg.data)
    if too_long:
        msg = long_prompts_message(cfg.data.prompts, too_long, cfg.data.max_prompt_tokens)
        if not cfg.data.skip_long_prompts:
            raise PromptDataError(f"{msg}; shorten or drop them, or set data.skip_long_prompts=true")
        if not records:
            raise PromptDataError(f"{cfg.data.prompts}: every prompt is longer than "
                                  f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
        if d.is_main:
            print(f"data: skipped {len(too_long)} of {n_read} prompts (data.skip_long_prompts): {msg}", flush=True)
    identity = dict(config=to_dict(cfg), prompts=ckpt.file_identity(cfg.data.prompts))
    return tok, records, ckpt.check_run_start(cfg, identity), identity


# ---- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    return loop.run_main(argv, _run, STARTUP_ERRORS)


# errors that end a run with one line (their messages name the file or key)
STARTUP_ERRORS = (ConfigError, ModelLoadError, PromptDataError, TokenizerError, FileNotFoundError, ValueError)


def _run(cfg, d) -> int:
    torch.manual_seed(cfg.seed + d.rank)
    run_dir = cfg.run_path
    # every check that can fail before work starts, agreed by all ranks (reported once)
    tok, records, resume_path, identity = agree_on_errors(lambda: _startup_checks(cfg, d), d, STARTUP_ERRORS)
    eval_set = agree_on_errors(lambda: training_eval_set(cfg, tok, records, d.is_main), d, STARTUP_ERRORS)
    pad = pad_id(tok)
    cursor = PromptCursor(len(records), seed=cfg.seed, shuffle=cfg.data.shuffle)
    if d.device.type == "cuda" and cfg.model.dtype != "float32" and d.is_main:
        print(f"warning: model.dtype={cfg.model.dtype} keeps the master weights and AdamW state in "
              f"{cfg.model.dtype}: updates smaller than half an ulp (most at lr={cfg.optim.lr:g}) round away; "
              f"model.dtype=float32 with distributed.param_dtype=bfloat16 computes in bf16 without that loss",
              file=sys.stderr, flush=True)
    groups = build_groups(d, cfg.rollout.tp_size, cfg.distributed.hsdp)
    policy = build_policy(cfg, d, mesh=groups.fsdp_mesh)
    ref = build_policy(cfg, d, for_reference=True, mesh=groups.fsdp_mesh) if cfg.grpo.kl_coef > 0 else None
    reward_fns, weights = build_rewards(cfg, d)
    # the ranges length_in_range_rate measures against: the length reward's own, or, with that
    # reward off, the same rules (record, request in the question, default) from the config
    length_fn = next((f for f in reward_fns if isinstance(f, LengthReward)), None) or \
        LengthReward(max_words=cfg.rewards.length_max_words, default_range=tuple(cfg.rewards.default_length_range))
    optimizer, scheduler = build_optimizer(policy, cfg)
    start = 0
    if resume_path is not None:
        extra = loop.resume(resume_path, policy, optimizer, scheduler, d, STARTUP_ERRORS)
        cursor.load_state_dict(extra["cursor"])
        start = extra["step"]
    loop.start_run(cfg, d)  # the first write into the run folder: every check above has passed
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), d.is_main, cfg.logging.progress, cfg.steps)
    log.truncate_after(start)
    nvml, peak = NVML(d.device), peak_flops(d.device)
    mcfg = policy.config
    skipped_total = 0

    for step in range(start, cfg.steps):
        t0 = time.time()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        step_records = cursor.next(records, cfg.rollout.prompts_per_step)
        # this rank's share; under TP its group's ranks' shares, which the group decodes together
        mine = [rec for t in range(groups.tp) for rec in step_records[groups.dp_rank * groups.tp + t::d.world]]
        local, rolled, engine = rollout(policy, tok, mine, cfg, d, step, groups)
        t_roll = time.time()
        R, adv, answers = score(local, reward_fns, weights, cfg)
        t_rew = time.time()

        # every rank gets every sequence as one flat tensor batch, so the plan is global and exact
        batch = exchange(from_rollout(rolled, adv, d.device), d.world)
        everything = list(range(len(batch)))
        full_plan = plan(batch, everything, cfg, d.world, mcfg)

        if cfg.rollout.old_logprobs == "recompute":
            batch.old_logp = recompute_logprobs(policy, batch, full_plan, cfg, d, pad)
        if cfg.rollout.old_logprobs == "rollout":
            batch.old_logp = batch.rollout_logp
        if ref is not None:
            batch.ref_logp = recompute_logprobs(ref, batch, full_plan, cfg, d, pad)
        tis = None
        if cfg.grpo.tis_cap is not None:
            tis = tis_weights(batch.old_logp, batch.rollout_logp, cfg.grpo.tis_cap)
        t_old = time.time()

        upd = []
        n_mini = cfg.grpo.mini_batches
        for _ in range(cfg.grpo.ppo_epochs):
            for m in range(n_mini):
                mini = everything[m::n_mini]
                # in rollout mode the first update's forward sees the sampling policy's weights:
                # its log-probs measure the rollout/trainer mismatch at no extra cost
                first = not upd and cfg.rollout.old_logprobs == "rollout"
                upd.append(train_minibatch(policy, optimizer, batch, plan(batch, mini, cfg, d.world, mcfg),
                                           cfg, d, pad, keep_logp=first, tis=tis))
        scheduler.step()
        t_upd = time.time()
        skipped_total += int(sum(u["skipped"] for u in upd))

        # metrics: sums over ranks of this rank's rollouts
        row = step_metrics(step + 1, local, rolled.response_lengths.tolist(), R, answers, reward_fns, weights, d,
                           length_fn)
        row.update({k: sum(u[k] for u in upd) / len(upd) for k in upd[0]})
        if cfg.rollout.old_logprobs == "recompute":
            row.update(logprob_mismatch_stats(batch, batch.old_logp, everything))
        else:
            row.update(logprob_mismatch_stats(batch, batch.trainer_logp, everything[0::n_mini]))
        row["skipped_total"] = skipped_total
        if tis is not None:  # every rank holds the whole batch: these are global
            row.update(tis_weight_mean=float(tis.mean()) if tis.numel() else 1.0,
                       tis_capped_frac=float((tis >= cfg.grpo.tis_cap).float().mean()) if tis.numel() else 0.0)
        # rank 0's rows (batch_size = 0 sizes them to the free memory) and preemptions; under TP the
        # bytes it received for its weight shards and the time that took
        row.update(engine)
        row["lr"] = scheduler.get_last_lr()[0]
        lengths = batch.lengths.tolist()
        # forward+backward per PPO epoch, plus one forward (1/3 of fwd+bwd) per recomputation
        passes = cfg.grpo.ppo_epochs + (cfg.rollout.old_logprobs == "recompute") / 3 + (ref is not None) / 3
        flops = passes * sum(model_flops_per_token(mcfg, n) * n for n in lengths)
        row.update(time_rollout=t_roll - t0, time_reward=t_rew - t_roll, time_old_logprob=t_old - t_rew,
                   time_update=t_upd - t_old, time_step=t_upd - t0, tokens_per_s=sum(lengths) / (t_upd - t0),
                   padding_waste=padding_waste(lengths, full_plan))
        row.update(loop.mfu(flops, t_upd - t_rew, peak, d.world))  # the training passes' model FLOPs
        row.update(nvml.read())
        if d.device.type == "cuda":  # this rank's peak of the step (rollout cache, training activations)
            row["gpu_peak_alloc_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        if eval_set is not None and (step + 1 == cfg.steps or (cfg.eval.every and (step + 1) % cfg.eval.every == 0)):
            t_ev = time.time()
            row.update(training_eval(policy, tok, eval_set, cfg, d, reward_fns, step + 1))
            row["time_eval"] = time.time() - t_ev
        log.write(row)
        if loop.checkpoint_due(cfg, step + 1):
            loop.save(cfg, step + 1, policy, optimizer, scheduler, d, cursor=cursor.state_dict(), identity=identity)

    if cfg.checkpoint.export_hf and start < cfg.steps:
        loop.export_hf(cfg, d, policy)
    if d.is_main:
        summarize(run_dir, cfg)
    return 0


def logprob_mismatch_stats(batch: Batch, trainer_logp: torch.Tensor | None, seqs: list[int]) -> dict:
    """Rollout-vs-trainer log-prob mismatch over the sequences `seqs`, whose values in
    `trainer_logp` [R] are the trainer's under the sampling weights (the recomputed old log-probs,
    or the first mini-batch's update forward in rollout mode)."""
    seqs = [i for i, n in zip(seqs, batch.response_lengths[seqs].tolist()) if n > 0] if seqs else []
    if trainer_logp is None or not seqs:
        return {}
    a, b = padded_responses(batch, batch.rollout_logp, seqs), padded_responses(batch, trainer_logp, seqs)
    lengths = batch.response_lengths[seqs]
    mask = torch.arange(a.shape[1])[None, :] < lengths[:, None]
    out = logprob_mismatch(a, b, mask, lengths)
    return {f"logp_mismatch_{k}": float(v) for k, v in out.items() if isinstance(v, (int, float))}


def step_metrics(step, local, resp_tok: list[int], R, answers, reward_fns, weights, d, length_fn) -> dict:
    """The step's reward and response metrics, summed over ranks: `local` this rank's sample dicts,
    resp_tok their response lengths in tokens. length_in_range_rate: the share of samples with an
    answer (format kept) whose word count (count_words) lies inside its prompt's own range
    (length_fn.target_range: the record's length_range, else the question's request, else the
    default); a broken format never counts, whatever the length of the whole response."""
    names = [getattr(f, "name", "quality") for f in reward_fns]
    n = len(local)
    w = torch.tensor(weights)
    total = (w[:, None] * R).sum(0)  # weighted sum of the raw rewards
    words = [count_words(a) if a is not None else count_words(s["response"]) for s, a in zip(local, answers)]
    thinks = [extract_think(s["response"]) for s in local]
    ranges = [length_fn.target_range(s["question"], s) for s in local]
    in_range = sum(a is not None and lo <= w <= hi for a, w, (lo, hi) in zip(answers, words, ranges))
    vals = [n, float(total.sum())] + [float(R[k].sum()) for k in range(len(names))] + [
        float(sum(resp_tok)), float(sum(words)), float(sum(a is not None for a in answers)),
        float(sum(s["truncated"] for s in local)), float(sum(len(t.split()) for t in thinks if t)), float(in_range)]
    tot = all_reduce_sum(vals, d.device)
    N = max(tot[0], 1)
    row = {"step": step, "reward_total": tot[1] / N}
    for k, name in enumerate(names):
        row[f"reward_{name}"] = tot[2 + k] / N
    j = 2 + len(names)
    row.update(response_tokens_mean=tot[j] / N, answer_words_mean=tot[j + 1] / N, format_ok_rate=tot[j + 2] / N,
               truncation_rate=tot[j + 3] / N, think_words_mean=tot[j + 4] / N, length_in_range_rate=tot[j + 5] / N)
    mx = torch.tensor([max(resp_tok or [0]), max(words or [0])], dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    row["response_tokens_max"], row["answer_words_max"] = mx.tolist()
    return row


def summarize(run_dir, cfg) -> None:
    from lwz.metrics import read_metrics
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        return
    k, first, last = loop.first_last(rows, "reward_total")
    print(f"mean total reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} "
          f"(change {last - first:+.3f})", flush=True)
    for key in ("reward_length", "reward_format", "answer_words_mean", "format_ok_rate", "truncation_rate",
                "length_in_range_rate"):
        if key in rows[0]:
            _, a, b = loop.first_last(rows, key)
            print(f"  {key}: {a:.3f} -> {b:.3f}", flush=True)
    if cfg.logging.plot:
        loop.plot_curves(run_dir)


if __name__ == "__main__":
    sys.exit(main())
