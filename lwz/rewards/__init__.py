"""Rewards and group advantages (paper §2).

Every reward is called as `reward(prompts, answers, meta) -> Tensor[B]` fp32, where `answers`
are extracted answer texts (None when the format is broken) and `meta` holds per-sample fields
("response": the whole generated text, "length_range": (lo, hi) or None, "stopped_at_close": bool
(generation ended on the `</answer>` stop string, which was cut from the text), ...).

    length.LengthReward      rule-based, paper Eq. 3
    format.FormatReward      rule-based, think/answer structure minus a near-duplicate penalty
    quality.QualityRewardModel  Bradley–Terry writing reward model (nn.Module)

The K rewards of a batch are combined by `group_advantages`: each is z-scored inside its GRPO
group, then the K advantages are averaged (the paper averages advantages, not raw rewards).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["group_advantages", "compute_rewards", "batch_meta"]


def batch_meta(name: str, prompts: Sequence[str], answers: Sequence, meta: Optional[Sequence[dict]]) -> Sequence[dict]:
    """The per-sample meta of a reward call ([{}] * B when None), after checking that prompts,
    answers and meta have one entry per sample (a ValueError naming the reward otherwise)."""
    meta = meta if meta is not None else [{}] * len(prompts)
    if not (len(prompts) == len(answers) == len(meta)):
        raise ValueError(f"{name}: prompts/answers/meta lengths differ "
                         f"({len(prompts)}, {len(answers)}, {len(meta)})")
    return meta


def group_advantages(rewards: torch.Tensor, group_size: int,
                     weights: Optional[Sequence[float] | torch.Tensor] = None,
                     std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages [B] fp32 from rewards [K, B] (or [B], taken as K=1).

    Groups are consecutive: group g holds samples g*G .. g*G+G-1 (G = group_size, B % G == 0).
    For each reward k and group: A^k_i = (r^k_i - mean_g(r^k)) / (std_g(r^k) + eps), with the
    population std (unbiased=False). A group whose k-th rewards are all equal gives A^k = 0
    exactly (never NaN). With std_norm=False the division is skipped (Dr.GRPO: mean-centred
    only). The result is sum_k w_k A^k / sum_k w_k, equal weights by default; with K=1 it is
    plain GRPO's advantage.
    """
    r = torch.as_tensor(rewards)
    if r.dim() == 1:
        r = r[None]
    if r.dim() != 2:
        raise ValueError(f"group_advantages: rewards must be [K, B] or [B], got shape {tuple(r.shape)}")
    r = r.to(torch.float32)
    K, B = r.shape
    G = int(group_size)
    if G < 1 or B % G != 0:
        raise ValueError(f"group_advantages: batch size {B} is not a multiple of group_size {G}")
    if not torch.isfinite(r).all():
        raise ValueError("group_advantages: rewards contain NaN or inf")
    g = r.view(K, B // G, G)
    mean = g.mean(dim=-1, keepdim=True)
    centred = g - mean
    constant = (g.amax(dim=-1, keepdim=True) == g.amin(dim=-1, keepdim=True))
    centred = torch.where(constant, torch.zeros_like(centred), centred)
    if std_norm:
        std = g.std(dim=-1, keepdim=True, unbiased=False)
        adv = centred / (std + eps)
    else:
        adv = centred
    adv = adv.reshape(K, B)
    if weights is None:
        return adv.mean(dim=0)
    w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
    if w.numel() != K:
        raise ValueError(f"group_advantages: {w.numel()} weights for {K} rewards")
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"group_advantages: weights must be >= 0 with a positive sum, got {w.tolist()}")
    return (w[:, None] * adv).sum(dim=0) / w.sum()


def compute_rewards(reward_fns: Sequence[Callable], prompts: Sequence[str],
                    answers: Sequence[Optional[str]], meta: Sequence[dict]) -> torch.Tensor:
    """Stack the K rewards of a batch: Tensor[K, B] fp32 (on CPU)."""
    B = len(prompts)
    rows = []
    for fn in reward_fns:
        out = torch.as_tensor(fn(prompts, answers, meta)).detach().to("cpu", torch.float32).reshape(-1)
        if out.numel() != B:
            name = getattr(fn, "name", type(fn).__name__)
            raise ValueError(f"reward {name!r} returned {out.numel()} values for a batch of {B}")
        rows.append(out)
    if not rows:
        return torch.zeros(0, B, dtype=torch.float32)
    return torch.stack(rows)
