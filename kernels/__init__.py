"""Triton kernels of lwz (fused log-probs, GRPO loss) and their plain-torch references."""
