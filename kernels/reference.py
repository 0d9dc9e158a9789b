"""Plain-torch references of the lwz kernels: the ground truth for tests and the baselines of
the benchmarks. They materialise everything (e.g. [T, V] logits) and favour clarity over speed."""

import torch

# ---- fused log-probs (kernels/logprob.py) ---------------------------------------------------

# ---- GRPO loss (kernels/grpo_loss.py) ---------------------------------------------------------
