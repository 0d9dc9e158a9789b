"""Train the writing-quality reward model with the Bradley–Terry loss (paper §2).

    python -m lwz.rewards.train_rm --data pairs.jsonl --init <folder | config.json> --out <folder>
        [--config configs/rm_tiny.toml] [--tokenizer <folder>] [--steps 200] [--lr 1e-4] ...
    torchrun --nproc_per_node=8 -m lwz.rewards.train_rm ...     (the same flags, on GPUs)

Data: JSONL, one {"prompt": str, "chosen": str, "rejected": str} a line (blank lines skipped).
--init: an HF ...ForSequenceClassification folder (continue training), a causal-LM folder (backbone
loaded, new head) or a config.json (random init). The tokenizer comes from --tokenizer, else from
the --init folder. Loss: mean over pairs of -log σ(r_chosen - r_rejected); each step packs
--batch-pairs pairs (chosen and rejected in one stream) into micro-batches of at most --max-tokens
tokens, AdamW with linear warmup then cosine decay, grad-norm clip. A held-out split (--eval-frac)
reports pair accuracy (r_chosen > r_rejected) and loss; the final folder is HF format.
--config: a TOML file whose keys are these flags' names (dashes or underscores); flags on the
command line win.

Several processes (torchrun) or a GPU: the model is FSDP2-sharded (bf16 compute, fp32 master
weights and reduction on CUDA; --activation-checkpointing for long pairs), every rank reads and
splits the data the same way, and each step's pairs are balanced over the ranks into packed
micro-batches (lwz.packing.plan_microbatches; a pair's chosen and rejected texts stay in one
micro-batch). The loss of each micro-batch is divided by the step's pair count (lwz.loop: the same
update on 1 or N ranks); accuracy, loss and margin are summed over ranks. Rank 0 writes the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lwz import loop
from lwz.distributed import all_reduce_sum, full_state_dict, init_distributed, shard_model, shutdown_distributed
from lwz.model import ModelLoadError
from lwz.packing import plan_microbatches
from lwz.prompts import iter_jsonl
from lwz.tokenizer import TokenizerError
from lwz.rewards.quality import QualityRewardModel, has_tokenizer, load_tokenizer, pack_token_lists


class RMDataError(ValueError):
    """A malformed preference file; the message is `path:line: what is wrong`."""


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    line: int


def load_pairs(path: str) -> list[Pair]:
    """Read a JSONL of {prompt, chosen, rejected}; any bad line raises RMDataError(path:line: ...)."""
    pairs = []
    for n, obj in iter_jsonl(path, RMDataError, "preference file"):
        if not isinstance(obj, dict):
            raise RMDataError(f"{path}:{n}: expected an object with prompt/chosen/rejected, "
                              f"got {type(obj).__name__}")
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(k), str):
                got = "missing" if k not in obj else type(obj[k]).__name__
                raise RMDataError(f"{path}:{n}: field {k!r} must be a string ({got})")
        pairs.append(Pair(obj["prompt"], obj["chosen"], obj["rejected"], n))
    if not pairs:
        raise RMDataError(f"{path}: no preference pairs")
    return pairs


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: mean of -log σ(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def _plan(enc, d, max_tokens: int) -> list[list[int]]:
    """This rank's micro-batches (pair indices into `enc`) of a global list of pairs, balanced over
    the ranks by tokens; every rank gets the same number (some possibly empty)."""
    plans = plan_microbatches([len(c) + len(r) for c, r in enc], max(max_tokens, max(len(c) + len(r) for c, r in enc)),
                              num_ranks=d.world)
    return plans[d.rank]


def _device(rm) -> torch.device:
    return rm.score.weight.device


def _score_pairs(rm, enc, idx: list[int]):
    """(r_chosen [k], r_rejected [k]) of pairs `idx` in one packed forward; no pairs: one dummy
    token's forward (FSDP needs every rank to run as many) and two empty tensors."""
    if not idx:
        s = rm.score_packed(*pack_token_lists([[0]], device=_device(rm)))
        return s[:0] + 0 * s.sum(), s[:0]
    seqs = [enc[i][0] for i in idx] + [enc[i][1] for i in idx]
    s = rm.score_packed(*pack_token_lists(seqs, device=_device(rm)))
    return s[:len(idx)], s[len(idx):]


def _sums(rc: torch.Tensor, rr: torch.Tensor) -> list[float]:
    """[pairs, correct, summed loss, summed margin] of scored pairs."""
    return [float(rc.numel()), float((rc > rr).sum()), float(-F.logsigmoid(rc - rr).sum()), float((rc - rr).sum())]


@torch.no_grad()
def evaluate(rm: QualityRewardModel, enc, max_tokens: int, d=None) -> dict:
    """Held-out pair accuracy (r_chosen > r_rejected), mean loss and margin, over every rank's share."""
    if not enc:
        return {"acc": float("nan"), "loss": float("nan"), "n": 0}
    d = d or _single()
    was = rm.training
    rm.eval()
    tot = [0.0] * 4
    for idx in _plan(enc, d, max_tokens):
        tot = [a + b for a, b in zip(tot, _sums(*(x.detach().float() for x in _score_pairs(rm, enc, idx))))]
    rm.train(was)
    n, correct, loss, margin = all_reduce_sum(tot, _device(rm)) if d.world > 1 else tot
    return {"acc": correct / n, "loss": loss / n, "n": int(n), "margin": margin / n}


def _single():
    from types import SimpleNamespace
    return SimpleNamespace(rank=0, world=1)


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_model(init: str, tokenizer_path: str | None, seed: int, **kw) -> QualityRewardModel:
    """The model to train: from --init (see module doc) with the tokenizer of --tokenizer or --init."""
    src = tokenizer_path or (init if os.path.isdir(init) else None)
    if src is None or (tokenizer_path is None and not has_tokenizer(src)):
        raise ModelLoadError(f"{init}: no tokenizer files in this folder; pass --tokenizer <folder>")
    tok = load_tokenizer(src, require_eos=False, pad_from_eos=False)
    if os.path.isdir(init) and any(f.endswith(".safetensors") for f in os.listdir(init)):
        return QualityRewardModel.from_pretrained(init, tokenizer=tok, allow_new_head=True, seed=seed, **kw)
    return QualityRewardModel.from_config(init, tokenizer=tok, seed=seed, **kw)


def train(args, d=None) -> dict:
    """Run training from parsed arguments on the process group `d` (lwz.distributed.Dist; None = one
    CPU process); returns the final metrics (also printed as JSON lines by rank 0)."""
    d = d or init_distributed()  # a world of one when not under torchrun
    cuda = d.device.type == "cuda"
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    pairs = load_pairs(args.data)
    rm = build_model(args.init, args.tokenizer, args.seed, max_length=args.max_length,
                     template=args.template, activation_checkpointing=args.activation_checkpointing,
                     device=d.device)
    if d.world > 1 or cuda:  # bf16 compute with fp32 master weights and reduction on GPUs
        from torch.distributed.fsdp import register_fsdp_forward_method
        shard_model(rm, torch.bfloat16 if cuda else None, torch.float32 if cuda else None, layers=rm.model.layers)
        register_fsdp_forward_method(rm, "score_packed")  # training calls it, not forward: gather around it
    rm.train()
    # every rank encodes and splits the same way (same seed), so the steps' pair lists agree
    enc = [(rm.encode(p.prompt, p.chosen), rm.encode(p.prompt, p.rejected)) for p in pairs]
    order = list(range(len(enc)))
    rng.shuffle(order)
    n_eval = int(round(len(enc) * args.eval_frac)) if len(enc) > 1 else 0
    eval_enc = [enc[i] for i in order[:n_eval]]
    train_enc = [enc[i] for i in order[n_eval:]]
    if not train_enc:
        raise RMDataError(f"{args.data}: no pairs left for training after the held-out split")
    if not eval_enc and args.eval_frac > 0 and d.is_main:  # too few pairs for round(n * eval_frac) >= 1
        print(f"note: {args.data}: {len(enc)} pair(s) x --eval-frac {args.eval_frac:g} hold out none; "
              f"training on all of them, no eval accuracy is reported", file=sys.stderr, flush=True)

    decay = [p for n, p in rm.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in rm.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def log(row):
        if d.is_main:
            print(json.dumps(row), flush=True)

    t0 = time.time()
    cursor, perm = 0, list(range(len(train_enc)))
    rng.shuffle(perm)
    for step in range(args.steps):
        batch = []
        while len(batch) < min(args.batch_pairs, len(train_enc)):
            if cursor == len(perm):
                rng.shuffle(perm)
                cursor = 0
            batch.append(train_enc[perm[cursor]])
            cursor += 1
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.steps, args.lr, args.warmup)
        tot = [0.0] * 4

        def loss_of(idx):
            nonlocal tot
            rc, rr = _score_pairs(rm, batch, idx)
            tot = [a + b for a, b in zip(tot, _sums(rc.detach().float(), rr.detach().float()))]
            return -F.logsigmoid(rc - rr).sum() / len(batch)  # divided by the step's pair count

        loop.backward_microbatches(rm, _plan(batch, d, args.max_tokens), loss_of, d)
        gnorm, skipped = loop.optimizer_step(rm, opt, args.grad_clip)
        n, correct, loss, _ = all_reduce_sum(tot, d.device) if d.world > 1 else tot
        if (step + 1) % args.log_every == 0 or step == 0:
            log({"step": step + 1, "loss": loss / n, "acc": correct / n, "grad_norm": gnorm,
                 "skipped": skipped, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 2)})
        if eval_enc and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            log({"step": step + 1, **{f"eval_{k}": v for k, v in evaluate(rm, eval_enc, args.max_tokens, d).items()}})
    evaluated = evaluate(rm, eval_enc, args.max_tokens, d) if eval_enc else {}
    final = {"step": args.steps, **{f"eval_{k}": v for k, v in evaluated.items()},
             "train_pairs": len(train_enc), "elapsed_s": round(time.time() - t0, 2)}
    log(final)
    rm.eval()
    sd = full_state_dict(rm) if d.world > 1 or cuda else None  # rank 0 gets the full weights
    if d.is_main:
        rm.save_pretrained(args.out, state_dict=sd)
        with open(os.path.join(args.out, "train_rm_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
    return final


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lwz.rewards.train_rm",
                                description="Bradley-Terry reward-model training on {prompt, chosen, rejected} JSONL.")
    p.add_argument("--config", help="TOML file of defaults for the flags below")
    p.add_argument("--data", help="JSONL of {prompt, chosen, rejected}")
    p.add_argument("--init", help="HF folder (seq-cls or causal LM) or config.json for random init")
    p.add_argument("--out", help="output folder (HF ...ForSequenceClassification format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the --init folder)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--batch-pairs", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16384, help="token budget of one packed micro-batch")
    p.add_argument("--max-length", type=int, default=4096, help="longest prompt+answer in tokens")
    p.add_argument("--template", default="auto", help="auto | chat | plain | string with {prompt} and {answer}")
    p.add_argument("--eval-frac", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward (long pairs on GPUs)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is); 1 is fastest for tiny models on a busy CPU")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        import tomllib
        try:
            with open(pre.config, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            p.error(f"{pre.config}: config file not found")
        except tomllib.TOMLDecodeError as e:
            p.error(f"{pre.config}: not valid TOML ({e})")
        known = {a.dest for a in p._actions}
        defaults = {}
        for k, v in table.items():
            key = k.replace("-", "_")
            if key not in known or key == "config":
                p.error(f"{pre.config}: unknown key {k!r}")
            defaults[key] = v
        p.set_defaults(**defaults)
    args = p.parse_args(argv)
    for k in ("data", "init", "out"):
        if not getattr(args, k):
            p.error(f"--{k} is required (on the command line or in --config)")
    checks = [("steps", args.steps >= 1), ("lr", args.lr > 0), ("batch_pairs", args.batch_pairs >= 1),
              ("max_tokens", args.max_tokens >= 2), ("max_length", args.max_length >= 32),
              ("eval_frac", 0 <= args.eval_frac < 1), ("warmup", args.warmup >= 1)]
    for name, ok in checks:
        if not ok:
            p.error(f"--{name.replace('_', '-')}: invalid value {getattr(args, name)!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    d = init_distributed()
    rc = None
    try:
        train(args, d)
        rc = 0
    except (RMDataError, ModelLoadError, TokenizerError) as e:
        if d.is_main:  # every rank reads the same data and fails the same way: say it once
            print(f"error: {e}", file=sys.stderr)
        rc = 2
    finally:
        torch.set_num_threads(threads)
        # several processes: leave right after the group is gone (see shutdown_distributed)
        shutdown_distributed(sync=rc is not None, exit_code=rc if d.world > 1 else None)
    return rc


if __name__ == "__main__":
    sys.exit(main())
