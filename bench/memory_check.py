"""The memory planner's training estimate against a measured step: bench/profile_step.py's packed
step (one process, weights / gradients / AdamW state in the compute dtype, activation
checkpointing, the fused log-prob backward at its default scratch), torch.cuda.max_memory_allocated
over its steps vs lwz.memory.train_items for the same model, tokens and layout. Goal: within 15%.

    python -m bench.memory_check                       # CUDA: Qwen2.5-1.5B shape, 14336-token long tail
    python -m bench.memory_check --preset tiny --seq-len 128   # CPU: the prediction only (nothing to measure)

Writes bench/results/memory_check-<gpu|cpu>.json: predicted and measured bytes, their ratio, the
predicted items.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import profile_step  # noqa: E402
from bench.common import RESULTS_DIR, env_info, gpu_tag, write_json  # noqa: E402
from kernels.logprob import BWD_SCRATCH_BYTES  # noqa: E402
from lwz.memory import GIB, TrainLayout, model_params, train_items  # noqa: E402

GOAL = 0.15


def profile_step_layout(dtype_bytes: int, activation_checkpointing: bool) -> TrainLayout:
    """profile_step's training layout: one whole model whose weights, gradients and AdamW moments
    are all in the compute dtype, one micro-batch per optimizer step."""
    return TrainLayout(shards=1, fsdp=False, master_bytes=dtype_bytes, compute_bytes=dtype_bytes,
                       reduce_bytes=dtype_bytes, activation_checkpointing=activation_checkpointing,
                       scratch_bytes=BWD_SCRATCH_BYTES, grads_persist=False)


def predict(preset: str, tokens: int, dtype_bytes: int, ac: bool) -> dict:
    mcfg = profile_step.model_config(preset, None)
    items = train_items(mcfg, model_params(mcfg), profile_step_layout(dtype_bytes, ac), tokens)
    return dict(items=items, total=sum(items.values()))


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.memory_check", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-1.5b" if cuda else "tiny", choices=sorted(profile_step.PRESETS))
    ap.add_argument("--seq-len", type=int, default=14336 if cuda else 128)
    ap.add_argument("--tokens-per-step", type=int, default=None, help="default: 2x the sequence length")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    tokens = a.tokens_per_step or 2 * a.seq_len
    pargs = profile_step.parse_args(["--preset", a.preset, "--seq-lens", str(a.seq_len), "--tokens-per-step",
                                     str(tokens), "--no-padded", "--warmup", "1", "--iters", "2",
                                     "--out", os.devnull])
    measured = None
    if cuda:
        res = profile_step.run(pargs)
        case = res["cases"][0]
        lengths, measured = case["lengths"], case["packed"].get("peak_mem_bytes")
        ac, dtype_bytes = res["activation_checkpointing"], 2
    else:  # CPU: profile_step runs fp32 without checkpointing there; only the prediction is made
        lengths = profile_step.sample_lengths(a.seq_len, tokens, pargs.lengths_mix, pargs.seed + a.seq_len)
        ac, dtype_bytes = False, 4
    pred = predict(a.preset, sum(lengths), dtype_bytes, ac)
    ratio = pred["total"] / measured if measured else None
    out = dict(bench="memory_check", env=env_info(), preset=a.preset, seq_len=a.seq_len, tokens=sum(lengths),
               lengths=lengths, activation_checkpointing=ac, predicted_bytes=pred["total"], measured_bytes=measured,
               predicted_over_measured=ratio, goal=f"|predicted / measured - 1| <= {GOAL}",
               goal_met=None if ratio is None else abs(ratio - 1) <= GOAL, predicted_items=pred["items"],
               status="ok" if measured else "prediction only: no CUDA to measure",
               headline=dict(predicted_gib=pred["total"] / GIB, measured_gib=measured / GIB if measured else None,
                             predicted_over_measured=ratio))
    path = a.out or os.path.join(RESULTS_DIR, f"memory_check-{gpu_tag()}.json")
    write_json(path, out)
    print(f"memory_check: {a.preset}, {sum(lengths)} tokens ({len(lengths)} seqs, longest {max(lengths)}): "
          f"predicted {pred['total'] / GIB:.2f} GiB, measured "
          f"{'n/a' if measured is None else f'{measured / GIB:.2f} GiB'}"
          + ("" if ratio is None else f", predicted/measured {ratio:.3f} (goal within {GOAL:.0%}: "
                                       f"{'met' if out['goal_met'] else 'NOT met'})"))
    for k, v in pred["items"].items():
        print(f"  {k:<36}{v / GIB:8.3f} GiB")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
