"""The training-loop pieces GRPO (lwz/train.py), continual pretraining (lwz/pretrain.py) and the
reward model (lwz.rewards.train_rm) share: the sharded model and its optimizer, one optimizer step
over micro-batches with a globally normalised loss, checkpoints, metrics, the HF export, and the
entry point's error handling.

Global normalisation: each micro-batch's loss is already divided by the whole step's count (tokens,
sequences or pairs over every micro-batch of every rank), so the gradients summed over micro-batches
and ranks are the step's mean. FSDP2 averages gradients over ranks, hence backward of loss x world.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import torch

from lwz import checkpoint as ckpt
from lwz.config import ConfigError, parse_args
from lwz.distributed import (DTYPES, PeerFailed, agree_on_errors, die_with_launcher, init_distributed,
                             report_error, set_grad_sync, shard_model, shutdown_distributed)
from lwz.model import Transformer


def build_policy(cfg, d, for_reference: bool = False, mesh=None) -> Transformer:
    """The trained model (master weights in model.dtype), or the frozen reference model (stored in
    the compute dtype distributed.param_dtype: it has no optimizer, so no reason for fp32 shards).
    fp32 on CPU. `cfg` needs the model, distributed and seed settings (Config or CPTConfig). mesh: the
    FSDP2 mesh (lwz.distributed.Groups.fsdp_mesh; None = all ranks)."""
    m = cfg.model
    dtype = DTYPES[cfg.distributed.param_dtype if for_reference else m.dtype] if d.device.type == "cuda" \
        else torch.float32
    ac = m.activation_checkpointing and not for_reference
    cuda = d.device.type == "cuda"

    def shard(model):
        return shard_model(model, DTYPES[cfg.distributed.param_dtype] if cuda else None,
                           DTYPES[cfg.distributed.reduce_dtype] if cuda else None,
                           cfg.distributed.reshard_after_forward, mesh=mesh)

    if m.init == "pretrained":  # sharded before allocation: each rank reads only its shard
        model = Transformer.from_pretrained(m.path, dtype=dtype, device=d.device, attn_backend=m.attn_backend,
                                            activation_checkpointing=ac,
                                            shard_fn=shard if cfg.distributed.fsdp else None)
    else:  # random init, identical on every rank (same seed) before sharding
        model = Transformer.from_config(m.path, dtype=dtype, device=d.device, seed=cfg.seed,
                                        attn_backend=m.attn_backend, activation_checkpointing=ac)
        if cfg.distributed.fsdp:
            shard(model)
    if for_reference:
        model.requires_grad_(False).eval()
    return model


def lr_lambda(cfg):
    """The learning-rate factor of step k: linear warmup over optim.warmup_steps, then constant or
    cosine down to optim.min_lr_ratio at cfg.steps."""
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_optimizer(model, cfg):
    """(AdamW over every parameter with the optim settings, its LambdaLR scheduler)."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def backward_microbatches(model, items, loss_fn, d, accumulate_unsharded: bool = False) -> None:
    """For each item: loss = loss_fn(item) (a scalar already divided by the step's global count),
    backward of loss x world size. Gradients are reduce-scattered after every micro-batch, or with
    accumulate_unsharded only after the last (full gradients kept in between). Every rank must pass
    the same number of items (FSDP's collectives)."""
    n = len(items)
    for k, item in enumerate(items):
        set_grad_sync(model, not accumulate_unsharded or k == n - 1)
        loss = loss_fn(item)
        (loss * d.world).backward()  # FSDP2 averages over ranks; the loss is already globally normalised


def optimizer_step(model, optimizer, grad_clip: float) -> tuple[float, bool]:
    """Clip the global gradient norm, step unless it is non-finite (then the update is skipped),
    zero the gradients. Returns (grad norm before clipping, skipped)."""
    params = [p for p in model.parameters() if p.grad is not None]
    gn = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
    skipped = not math.isfinite(gn)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gn, skipped


def resume(path, model, optimizer, scheduler, d, errors) -> dict:
    """Load a training checkpoint (agreed by every rank: a failure is reported once) into the model,
    optimizer and scheduler; returns the checkpoint's `extra` (step, data position, identity)."""
    extra = agree_on_errors(lambda: ckpt.load_training_state(path, model, optimizer, d.rank), d, errors)
    scheduler.load_state_dict(extra["scheduler"])
    if d.is_main:
        print(f"resumed from {path} at step {extra['step']}", flush=True)
    return extra


def save(cfg, step: int, model, optimizer, scheduler, d, **extra) -> None:
    """The checkpoint of step `step` (after it) under run/checkpoints, with the scheduler and `extra`."""
    ckpt.save_training_state(os.path.join(cfg.run_path, "checkpoints"), step, model, optimizer, d.rank,
                             extra=dict(step=step, scheduler=scheduler.state_dict(), **extra),
                             keep=cfg.checkpoint.keep)


def checkpoint_due(cfg, step: int) -> bool:
    """Whether the step just finished (1-based) is saved: every checkpoint.every steps and the last."""
    return bool(cfg.checkpoint.every) and (step % cfg.checkpoint.every == 0 or step == cfg.steps)


def start_run(cfg, d) -> None:
    """Rank 0's first write into the run folder, after every check has passed (see
    lwz.checkpoint.start_run_folder)."""
    if d.is_main:
        moved = ckpt.start_run_folder(cfg)
        if moved:
            print(f"moved the previous run in {cfg.run_path} to {moved}", flush=True)


def export_hf(cfg, d, model, folder: str | None = None) -> None:
    """The model as an HF folder (run/hf by default) with the tokenizer files: in the compute dtype
    on CUDA (bf16 for the paper's models, as HF ships them), fp32 on CPU. Collective."""
    from lwz.distributed import full_state_dict
    from lwz.hf_io import save_hf_model

    sd = full_state_dict(model)
    if d.is_main:
        export_dtype = DTYPES[cfg.distributed.param_dtype] if d.device.type == "cuda" else None
        save_hf_model(sd, model.config, folder or os.path.join(cfg.run_path, "hf"), dtype=export_dtype,
                      tokenizer_path=cfg.tokenizer.path)


def mfu(flops: float, seconds: float, peak: float | None, world: int) -> dict:
    """{"mfu": model FLOPs over the wall time of all GPUs' peak} where the peak is known, else {}."""
    return {"mfu": flops / max(seconds, 1e-9) / (peak * world)} if peak else {}


def first_last(rows: list[dict], key: str) -> tuple[int, float, float]:
    """(k, mean of rows[key] over the first k rows, over the last k) for a run's summary line:
    k = 10, or half the rows when there are fewer than 20 (at least 1)."""
    k = min(10, max(1, len(rows) // 2))
    return k, sum(r[key] for r in rows[:k]) / k, sum(r[key] for r in rows[-k:]) / k


def plot_curves(run_dir: str) -> None:
    """Draw the run's curves; a finished run stays a success without matplotlib (or a display)."""
    try:
        from lwz.plot import plot_run
        print(f"curves: {plot_run(run_dir)}", flush=True)
    except Exception as e:
        print(f"warning: no plot ({type(e).__name__}: {e}); `python -m lwz.plot {run_dir}` redraws it",
              file=sys.stderr, flush=True)


def run_main(argv, run, errors, root=None) -> int:
    """An entry point's body: parse the config (`root`: Config or CPTConfig), join the process
    group, run(cfg, d) -> exit code. A config error or one of `errors` ends the run with one line
    (exit 2, rank 0 says it) and what was written stays; anything else prints its traceback."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv, root)
    except ConfigError as e:
        print(str(e) if str(e).startswith("config error") else f"config error: {e}", file=sys.stderr)
        return 2
    die_with_launcher()
    try:
        d = init_distributed(cfg.distributed.backend)
    except ConfigError as e:  # before any process group: each node's first process says it
        report_error(f"error: {e}", show=os.environ.get("LOCAL_RANK", "0") == "0")
        return 2
    # rank 0 logs (attention backend, packing backend, ...); other ranks only warnings
    logging.basicConfig(level=logging.INFO if d.is_main else logging.WARNING, format="lwz: %(message)s")
    finished = False
    rc = None  # stays None while an unexpected exception propagates (its traceback must print)
    try:
        rc = run(cfg, d)
        finished = True
        return rc
    except PeerFailed as e:  # another rank reports this start-up error
        report_error(f"error: {e}", show=False)
        rc = 2
        return rc
    except errors as e:
        # one clear line instead of a traceback; what was written so far stays on disk
        report_error(f"rank {d.rank}: error: {e}" if d.rank else f"error: {e}")
        rc = 2
        return rc
    finally:
        # several processes: leave right after the group is gone (see shutdown_distributed)
        shutdown_distributed(sync=finished, exit_code=rc if d.world > 1 else None)
