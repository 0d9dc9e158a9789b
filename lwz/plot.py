"""Draw the reward and length curves of a run: `python -m lwz.plot runs/<name>` -> runs/<name>/curves.png."""

from __future__ import annotations

import os
import sys

from lwz.metrics import read_metrics

PANELS = [
    ("rewards", ["reward_total", "reward_length", "reward_format", "reward_quality"]),
    ("rates", ["format_ok_rate", "truncation_rate", "length_in_range_rate"]),
    ("lengths (words / tokens)", ["answer_words_mean", "response_tokens_mean", "think_words_mean"]),
    ("policy", ["entropy", "clip_frac_low", "clip_frac_high", "kl_mean", "logp_mismatch_mean"]),
    ("pretraining loss (nats / token)", ["cpt_loss", "cpt_eval_loss"]),
]


def plot_run(run_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics to plot")
    rows = read_metrics(path)
    steps = [r["step"] for r in rows]
    panels = [(t, keys) for t, keys in PANELS if any(k in r for r in rows for k in keys)] or PANELS[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            if any(k in r for r in rows):  # a key logged on some steps only (held-out loss) as points
                xy = [(s, r[k]) for s, r in zip(steps, rows) if k in r]
                ax.plot(*zip(*xy), label=k, marker="o" if len(xy) < len(rows) else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lwz.plot runs/<name>")
    try:
        print(plot_run(sys.argv[1]))
    except FileNotFoundError as e:
        sys.exit(str(e))
