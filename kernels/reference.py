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
