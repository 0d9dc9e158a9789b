"""Continual pretraining (the paper's stage 1): `torchrun lwz/pretrain.py --config configs/cpt-X.toml [--a.b=v ...]`.

One step, top to bottom:
  1. the step's cpt.tokens_per_step tokens come from the mixed stream (lwz.corpus.CPTStream) as
     micro-batches of exactly cpt.seq_len tokens: documents packed end to end, long ones split,
     every piece its own sequence (cu_seqlens: no attention across pieces; positions restart);
     every rank plans the whole step from the document index alone and reads the tokens of its
     own micro-batches (rank r takes micro-batches r, r + world, ...)
  2. each micro-batch goes through lwz.batch's pack op (a 1-token "prompt" per piece, the rest
     its targets) -> forward -> fused log-probs of the next tokens -> loss = -sum(logp) / the
     step's target count over every micro-batch and rank (the same number on 1 or N ranks)
  3. clip, AdamW step (a non-finite grad norm skips it), warmup + cosine schedule (lwz.loop)
  4. metrics (cpt_loss, tokens/s, MFU, NVML), a held-out loss every cpt.eval_every steps, an atomic
     checkpoint with the stream's position every checkpoint.every steps, the HF folder (with the
     tokenizer) at the end
The config is lwz.config.CPTConfig; the token folders come from `python -m lwz.data tokenize`.
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # `torchrun lwz/pretrain.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from lwz import checkpoint as ckpt
from lwz import loop
from lwz.batch import Batch, microbatch
from lwz.config import ConfigError, CPTConfig, to_dict
from lwz.corpus import CorpusError, CPTStream, Piece, open_corpus, targets_in, tokenizer_identity
from lwz.distributed import agree_on_errors, all_reduce_sum
from lwz.metrics import NVML, MetricsLog, peak_flops, read_metrics
from lwz.model import ModelLoadError, model_flops_per_token
from lwz.tokenizer import TokenizerError, check_fits_model, load_tokenizer, pad_id

# errors that end a run with one line (their messages name the file or key)
STARTUP_ERRORS = (ConfigError, ModelLoadError, TokenizerError, CorpusError, FileNotFoundError, ValueError)


def micro_count(cfg, world: int) -> int:
    """Micro-batches per rank per step (ConfigError unless the step's tokens split evenly)."""
    n = cfg.cpt.tokens_per_step // cfg.cpt.seq_len
    if n % world:
        raise ConfigError(f"cpt.tokens_per_step = {cfg.cpt.tokens_per_step} is {n} micro-batches of cpt.seq_len = "
                          f"{cfg.cpt.seq_len}: must be a multiple of the world size {world} (every rank trains the "
                          f"same number)")
    return n // world


def open_sources(cfg, vocab_size: int):
    """The token folders of cpt.sources, checked against the run's tokenizer and the model."""
    want = tokenizer_identity(cfg.tokenizer.path)
    out = []
    for k, path in enumerate(cfg.cpt.sources):
        c = open_corpus(path)
        if c.meta["identity"]["tokenizer"] != want:
            raise CorpusError(f"cpt.sources[{k}] = {path} was tokenised with {c.meta.get('tokenizer_path')}, whose "
                              f"files differ from tokenizer.path = {cfg.tokenizer.path}; tokenize it again")
        if c.meta["max_token_id"] >= vocab_size:
            raise CorpusError(f"cpt.sources[{k}] = {path} holds token id {c.meta['max_token_id']}, beyond the "
                              f"model's vocabulary ({vocab_size})")
        out.append(c)
    return out


def to_batch(stream: CPTStream, pieces: list[Piece], device) -> Batch:
    """Packed pieces as a lwz.batch.Batch whose targets are every next token within a piece: each
    piece is a 1-token prompt plus a "response" of the rest."""
    arrs = stream.tokens(pieces)
    tokens = torch.from_numpy(np.concatenate(arrs).astype(np.int32)).to(device)
    lengths = torch.tensor([p.length for p in pieces], dtype=torch.int64)
    cu = torch.zeros(len(pieces) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    n_targets = int((lengths - 1).sum())
    return Batch(tokens=tokens, cu_seqlens=cu, prompt_lengths=torch.ones(len(pieces), dtype=torch.int64),
                 advantages=torch.zeros(len(pieces), device=device),
                 rollout_logp=torch.zeros(n_targets, device=device))


def nll_sum(model, stream: CPTStream, pieces: list[Piece], pad: int, d, scratch_bytes=None) -> torch.Tensor:
    """Summed next-token negative log-likelihood (fp32 scalar) of packed pieces; no pieces: one
    masked dummy token (every rank runs the same number of forwards, as FSDP needs)."""
    batch = to_batch(stream, pieces, d.device) if pieces else None
    mb = microbatch(batch, list(range(len(pieces))), pad) if pieces else microbatch(_empty_batch(d.device), [], pad)
    logp, _ = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, targets=mb.targets,
                    logprob_scratch_bytes=scratch_bytes)
    return -torch.where(mb.mask, logp, 0.0).sum()


def _empty_batch(device) -> Batch:
    z = torch.zeros(0, device=device)
    return Batch(tokens=torch.zeros(0, dtype=torch.int32, device=device), cu_seqlens=torch.zeros(1, dtype=torch.int32),
                 prompt_lengths=torch.zeros(0, dtype=torch.int64), advantages=z, rollout_logp=z)


def train_step(model, optimizer, stream: CPTStream, mine: list[list[Piece]], n_targets: int, cfg, d, pad) -> dict:
    """One optimizer step over this rank's micro-batches `mine`; n_targets: the step's target count
    over every rank. Returns {cpt_loss (mean nats per target token, all ranks), grad_norm, skipped}."""
    total = [0.0]

    def loss_of(pieces):
        nll = nll_sum(model, stream, pieces, pad, d, cfg.cpt.logprob_scratch_mib << 20)
        total[0] += float(nll.detach())
        return nll / n_targets

    loop.backward_microbatches(model, mine, loss_of, d, cfg.distributed.accumulate_unsharded)
    loss = all_reduce_sum(total, d.device)[0] / n_targets
    gn, skipped = loop.optimizer_step(model, optimizer, cfg.optim.grad_clip)
    return dict(cpt_loss=loss, grad_norm=gn, skipped=float(skipped))


@torch.no_grad()
def heldout_loss(model, stream: CPTStream, cfg, d, pad) -> dict:
    """{cpt_eval_loss, cpt_eval_tokens}: mean next-token loss over the held-out micro-batches
    (the same every time; each rank forwards its share); {} without held-out documents."""
    mbs = stream.heldout_microbatches(cfg.cpt.eval_tokens)
    if not mbs:
        return {}
    model.eval()
    mine = mbs[d.rank::d.world]
    rounds = -(-len(mbs) // d.world)
    nll, n = 0.0, 0
    for i in range(rounds):
        pieces = mine[i] if i < len(mine) else []
        nll += float(nll_sum(model, stream, pieces, pad, d))
        n += targets_in(pieces)
    model.train()
    nll, n = all_reduce_sum([nll, float(n)], d.device)
    return dict(cpt_eval_loss=nll / max(n, 1.0), cpt_eval_tokens=n)


def _startup_checks(cfg, d):
    """Every check before any work or write: world-size rules, tokenizer and model config, the
    token folders, the run folder / checkpoint (lwz.checkpoint.check_run_start). Returns
    (tokenizer, corpora, micro-batches per rank, checkpoint path or None, run identity)."""
    if not cfg.distributed.fsdp and d.world > 1:
        raise ConfigError(f"distributed.fsdp=false with {d.world} processes would train {d.world} unsynchronised "
                          f"copies (there is no DDP path); use distributed.fsdp=true")
    n_mine = micro_count(cfg, d.world)
    tok = load_tokenizer(cfg.tokenizer.path)
    from lwz.model import ModelConfig
    mc = ModelConfig.from_hf(cfg.model.path)
    check_fits_model(tok, cfg.tokenizer.path, mc.vocab_size, cfg.model.path)
    if cfg.cpt.seq_len > mc.max_position_embeddings and d.is_main:
        print(f"warning: cpt.seq_len = {cfg.cpt.seq_len} is longer than the model's max_position_embeddings "
              f"({mc.max_position_embeddings}): positions past it are outside what the model was trained on",
              file=sys.stderr, flush=True)
    corpora = open_sources(cfg, mc.vocab_size)
    identity = dict(config=to_dict(cfg), corpora=[c.meta["identity"] for c in corpora])
    return tok, corpora, n_mine, ckpt.check_run_start(cfg, identity), identity


def _run(cfg, d) -> int:
    torch.manual_seed(cfg.seed + d.rank)
    tok, corpora, n_mine, resume_path, identity = agree_on_errors(lambda: _startup_checks(cfg, d), d, STARTUP_ERRORS)
    pad = pad_id(tok)
    stream = agree_on_errors(lambda: CPTStream(corpora, cfg.cpt.weights, cfg.cpt.seq_len, cfg.cpt.heldout_share,
                                               cfg.seed), d, STARTUP_ERRORS)
    model = loop.build_policy(cfg, d)
    optimizer, scheduler = loop.build_optimizer(model, cfg)
    start = 0
    if resume_path is not None:
        extra = loop.resume(resume_path, model, optimizer, scheduler, d, STARTUP_ERRORS)
        stream.load_state_dict(extra["stream"])
        start = extra["step"]
    loop.start_run(cfg, d)
    run_dir = cfg.run_path
    log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), d.is_main, cfg.logging.progress, cfg.steps,
                     shown=("cpt_loss", "cpt_eval_loss", "grad_norm"))
    log.truncate_after(start)
    nvml, peak = NVML(d.device), peak_flops(d.device)
    mcfg = model.config
    model.train()
    skipped_total = 0
    if d.is_main and start == 0:
        sizes = ", ".join(f"{c.path}: {len(s)} train / {len(h)} held-out documents"
                          for c, s, h in zip(corpora, stream.train_docs, stream.heldout_docs))
        print(f"cpt: {cfg.cpt.tokens_per_step} tokens a step in {n_mine * d.world} micro-batches of "
              f"{cfg.cpt.seq_len} ({sizes})", flush=True)

    for step in range(start, cfg.steps):
        t0 = time.time()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        before = [s["consumed"] for s in stream.state]
        mbs = stream.next_microbatches(n_mine * d.world)  # the whole step, on every rank (index only)
        n_targets = max(sum(targets_in(p) for p in mbs), 1)
        row = dict(step=step + 1)
        row.update(train_step(model, optimizer, stream, mbs[d.rank::d.world], n_targets, cfg, d, pad))
        scheduler.step()
        dt = time.time() - t0
        skipped_total += int(row["skipped"])
        lengths = [p.length for mb in mbs for p in mb]
        flops = sum(model_flops_per_token(mcfg, n) * n for n in lengths)
        step_tokens = sum(lengths)
        row.update(lr=scheduler.get_last_lr()[0], skipped_total=skipped_total, tokens=step_tokens,
                   tokens_per_s=step_tokens / dt, time_step=dt, sequences=len(lengths),
                   **{f"source_share_{k}": (s["consumed"] - b) / step_tokens
                      for k, (s, b) in enumerate(zip(stream.state, before))})
        row.update(loop.mfu(flops, dt, peak, d.world))
        row.update(nvml.read())
        if d.device.type == "cuda":
            row["gpu_peak_alloc_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        if cfg.cpt.eval_every and ((step + 1) % cfg.cpt.eval_every == 0 or step + 1 == cfg.steps):
            row.update(heldout_loss(model, stream, cfg, d, pad))
        log.write(row)
        if loop.checkpoint_due(cfg, step + 1):
            loop.save(cfg, step + 1, model, optimizer, scheduler, d, stream=stream.state_dict(), identity=identity)

    if cfg.checkpoint.export_hf and start < cfg.steps:
        loop.export_hf(cfg, d, model)
    if d.is_main:
        summarize(run_dir, cfg)
    return 0


def summarize(run_dir: str, cfg) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(path) if os.path.isfile(path) else []
    if not rows:
        return
    k, a, b = loop.first_last(rows, "cpt_loss")
    print(f"cpt loss: first {k} steps {a:.3f} -> last {k} steps {b:.3f}", flush=True)
    ev = [r for r in rows if "cpt_eval_loss" in r]
    if ev:
        print(f"  held-out loss: step {ev[0]['step']} {ev[0]['cpt_eval_loss']:.3f} -> step {ev[-1]['step']} "
              f"{ev[-1]['cpt_eval_loss']:.3f}", flush=True)
    if cfg.logging.plot:
        loop.plot_curves(run_dir)


def main(argv=None) -> int:
    return loop.run_main(argv, _run, STARTUP_ERRORS, root=CPTConfig)


if __name__ == "__main__":
    sys.exit(main())
