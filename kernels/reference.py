"""Plain-torch references of the lwz kernels: the ground truth for tests and the baselines of
the benchmarks. They materialise everything (e.g. [T, V] logits) and favour clarity over speed."""

import torch

# ---- fused log-probs (kernels/logprob.py) ---------------------------------------------------
def logprobs_reference(hidden, weight, targets, temperature=1.0, compute_dtype=torch.float64):
    """Materialised reference of kernels.logprob.fused_logprobs (autograd-able).

    hidden [N, H], weight [V, H], targets int64 [N] (-100 = ignored -> logp 0, entropy 0, no grad).
    The [N, V] logits are formed in `compute_dtype` (fp64 default: the test oracle; pass
    hidden.dtype for "plain torch in the same dtype", where the GEMM runs in that dtype and the
    softmax math in fp32). Returns (logp [N], entropy [N]) in fp32 or fp64.
    """
    if compute_dtype in (torch.float16, torch.bfloat16):
        z = (hidden.to(compute_dtype) @ weight.to(compute_dtype).t()).float()
    else:
        z = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != -100
    lp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


# ---- GRPO loss (kernels/grpo_loss.py) ---------------------------------------------------------
def grpo_loss_reference(logp, old_logp, advantages, mask, ref_logp=None, *, clip_low, clip_high,
                        clip_c=None, kl_coef=0.0, kl_type="k3", loss_agg="token-mean",
                        global_tokens=None, global_seqs=None, cu_seqlens=None, norm_const=None,
                        entropy=None, entropy_coef=0.0, impl="torch"):
    """Plain-torch GRPO loss (autograd-able); the semantics of kernels.grpo_loss.grpo_loss, whose
    module docstring gives the formulas. Per-token inputs are [N] (fp32, or fp64 for an oracle),
    mask [N] (active = != 0), cu_seqlens [B+1] int32 for the seq-* modes. `impl` is ignored.
    Returns (loss 0-d, stats dict of detached 0-d tensors) in logp's dtype.
    """
    act = mask != 0
    zero = logp.new_zeros(())
    # Masked tokens are replaced by 0 before any arithmetic: NaN/inf there can't leak into the
    # loss or (through 0 * inf in a backward) into the gradient.
    lp = torch.where(act, logp, zero)
    old = torch.where(act, old_logp.detach(), zero)
    adv = torch.where(act, advantages.detach(), zero)

    log_ratio = torch.clamp(lp - old, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv)
    pg_single_clip = pg
    if clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -clip_c * adv), pg)

    kl = torch.zeros_like(lp)
    if ref_logp is not None:
        d = torch.clamp(torch.where(act, ref_logp.detach(), zero) - lp, -20.0, 20.0)
        if kl_type == "k1":
            k = -d  # = logp - ref
        elif kl_type == "k2":
            k = 0.5 * d * d
        elif kl_type == "k3":
            k = torch.exp(d) - d - 1.0
        else:
            raise ValueError(f"grpo_loss_reference: unknown kl_type {kl_type!r}")
        kl = torch.where(act, torch.clamp(k, -10.0, 10.0), zero)
    ent = torch.zeros_like(lp) if entropy is None else torch.where(act, entropy, zero)

    pg = torch.where(act, pg, zero)
    n_tok = act.sum().to(lp.dtype)
    if loss_agg == "token-mean":
        den = n_tok if global_tokens is None else torch.as_tensor(global_tokens, dtype=lp.dtype, device=lp.device)
        agg = lambda x: x.sum()  # noqa: E731
    else:
        if cu_seqlens is None:
            raise ValueError(f"grpo_loss_reference: loss_agg={loss_agg!r} needs cu_seqlens")
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=lp.device), lengths)
        n_i = torch.zeros(lengths.numel(), dtype=lp.dtype, device=lp.device).index_add_(0, seq_id, act.to(lp.dtype))
        n_seq = (n_i > 0).sum().to(lp.dtype)
        den = n_seq if global_seqs is None else torch.as_tensor(global_seqs, dtype=lp.dtype, device=lp.device)
        if loss_agg == "seq-mean-token-mean":
            inv_n = torch.where(n_i > 0, 1.0 / n_i.clamp_min(1.0), torch.zeros_like(n_i))

            def agg(x):  # sum over sequences of the per-sequence token mean
                return (torch.zeros_like(n_i).index_add(0, seq_id, x) * inv_n).sum()
        elif loss_agg in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
            agg = lambda x: x.sum()  # noqa: E731
            if loss_agg == "seq-mean-token-sum-norm":
                den = den * float(norm_const)
        else:
            raise ValueError(f"grpo_loss_reference: unknown loss_agg {loss_agg!r}")
    den = den.reshape(())
    scale = torch.where(den > 0, 1.0 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))

    policy_loss = agg(pg) * scale
    kl_loss = agg(kl_coef * kl) * scale
    entropy_loss = agg(-entropy_coef * ent) * scale
    loss = policy_loss + kl_loss + entropy_loss

    def mean(x):  # local mean over the active tokens of this micro-batch
        return torch.where(act, x, zero).sum().detach() / n_tok.clamp_min(1.0)

    neg = act & (adv < 0)
    dual = torch.zeros_like(lp) if clip_c is None else (neg & (pg_single_clip > -clip_c * adv)).to(lp.dtype)
    stats = {
        "policy_loss": policy_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "entropy_loss": entropy_loss.detach(),
        "clip_frac_low": mean((neg & (ratio < 1.0 - clip_low)).to(lp.dtype)),
        "clip_frac_high": mean((act & (adv > 0) & (ratio > 1.0 + clip_high)).to(lp.dtype)),
        "dual_clip_frac": mean(dual),
        "ratio_mean": mean(ratio),
        "kl_mean": mean(kl),
        "approx_kl": mean(0.5 * log_ratio * log_ratio),
        "entropy_mean": mean(ent),
        "n_tokens": n_tok.detach(),
    }
    return loss, stats
