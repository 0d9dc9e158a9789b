"""Draw the reward and length curves of a run: `python -m lwz.plot runs/<name>` -> runs/<name>/curves.png;
and an evaluation's figures (plot_eval, called by lwz.eval)."""

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
# held-out evaluation during training (eval.*): only the steps that ran one have these keys
EVAL_PANELS = [
    ("eval: length score S_l (0-100)", ["eval/length_score"]),
    ("eval: rates", ["eval/in_range_rate", "eval/format_ok_rate", "eval/truncation_rate",
                     "eval/near_duplicate_share"]),
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
    panels += [p for p in EVAL_PANELS if any(k in r for r in rows for k in p[1])]
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


def plot_eval(out_dir: str, rows: list[dict], summary: dict) -> list[str]:
    """An evaluation's figures (rows of samples.jsonl, its summary.json) in out_dir: lengths.png,
    required vs produced words on log-log axes with the y = x line (answers of 0 words drawn at 1);
    length_score_by_bucket.png, mean S_l per required-length bucket with its prompt count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    pts = [(r["required_words"], max(r["words"], 1)) for r in rows if r["required_words"]]
    fig, ax = plt.subplots(figsize=(5, 4.4))
    if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=12, alpha=0.6, label="answers")
        lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("required length (words)")
    ax.set_ylabel("answer length (words; 0 drawn at 1)")
    ax.set_title("length following")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out.append(os.path.join(out_dir, "lengths.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    buckets = [(b, st) for b, st in summary["by_bucket"].items() if st["length_score"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if buckets:
        bars = ax.bar([b for b, _ in buckets], [st["length_score"] for _, st in buckets])
        for bar, (_, st) in zip(bars, buckets):
            ax.annotate(f"n={st['length_scored']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_xlabel("required length (words)")
    ax.set_ylabel("mean S_l")
    ax.set_title("length score by required length")
    fig.tight_layout()
    out.append(os.path.join(out_dir, "length_score_by_bucket.png"))
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lwz.plot runs/<name>")
    try:
        print(plot_run(sys.argv[1]))
    except FileNotFoundError as e:
        sys.exit(str(e))
