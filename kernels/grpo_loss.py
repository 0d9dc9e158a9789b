"""Fused GRPO loss: ratio, decoupled clip, dual clip, KL to a reference policy, entropy bonus and
the four loss aggregations, forward and backward, in Triton (plus the torch reference path).

Public API
----------
`grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, *, clip_low, clip_high, clip_c=None,
kl_coef=0.0, kl_type="k3", loss_agg="token-mean", global_tokens=None, global_seqs=None,
cu_seqlens=None, norm_const=None, entropy=None, entropy_coef=0.0, impl="auto")` -> (loss, stats)

Inputs (all packed 1-D over the N tokens of one micro-batch, the same layout as the packed stream):
    logp        [N] fp32, requires grad: log-probs of the sampled tokens under the current policy.
    old_logp    [N] fp32: log-probs under the rollout policy (no gradient).
    advantages  [N] fp32: per-token advantage. GRPO advantages are per sequence; the trainer
                broadcasts each sequence's advantage to all of its tokens (repeat_interleave over
                cu_seqlens) so that this kernel stays purely per-token.
    mask        [N] bool (or any float/int dtype, where "active" means != 0): which tokens are
                trained on (response tokens). Masked tokens contribute nothing to the loss, the
                gradient or the stats, whatever values (even NaN/inf) their inputs hold.
    ref_logp    [N] fp32 or None: reference-policy log-probs; needed when kl_coef > 0. When given
                with kl_coef == 0 the KL is still measured (stats) but adds nothing to the loss.
    entropy     [N] fp32 or None: per-token policy entropy; gets the gradient -entropy_coef * w_t.
    cu_seqlens  [B+1] int32: sequence boundaries; required by the seq-* modes.

Per active token t (log-ratio clamped to [-20, 20] before exp, as verl does, so exp never
overflows; outside that window the ratio has no gradient, exactly like torch.clamp):
    r      = exp(clamp(logp - old_logp, -20, 20))
    pg     = -min(r*A, clip(r, 1 - clip_low, 1 + clip_high)*A)
    pg     = min(pg, -clip_c*A)                if clip_c is not None and A < 0   (dual clip)
    d      = clamp(ref_logp - logp, -20, 20)
    kl     = clamp(k, -10, 10) with k = -d (k1), d^2/2 (k2) or exp(d) - d - 1 (k3)
    loss_t = pg + kl_coef*kl - entropy_coef*entropy

Aggregation: loss = sum_t w_t * loss_t with
    "token-mean"               w_t = 1 / global_tokens
    "seq-mean-token-mean"      w_t = 1 / (n_i * global_seqs)      n_i = active tokens of t's seq
    "seq-mean-token-sum"       w_t = 1 / global_seqs
    "seq-mean-token-sum-norm"  w_t = 1 / (global_seqs * norm_const)   (Dr.GRPO: norm_const is a
                               fixed constant such as the maximum response length, so the loss is
                               sum_i sum_t loss_it / (B * L_max), the TRL/verl "dr_grpo" form)
`global_tokens` / `global_seqs` are the normalisers of the whole optimisation batch (all
micro-batches of all ranks): get the local parts with `count_normalisers`, sum them over
micro-batches and all-reduce them over ranks. Python numbers or 0-d tensors (on the device: no
host sync) are accepted. With them, summing the losses (and gradients) of any split of the batch
into whole sequences gives the whole-batch loss. When None, this micro-batch's own counts are used
(tokens with mask != 0, resp. sequences with >= 1 active token). Fully masked sequences contribute
0 in every mode and are *not* counted in the default global_seqs or in `count_normalisers`. A
normaliser of 0 (fully masked micro-batch) gives loss 0 and gradient 0, never NaN.

Stats: dict of 0-d fp32 tensors, computed by the same forward launch.
    policy_loss, kl_loss, entropy_loss   the aggregated parts (same normalisers as the loss, so
                                         they add up to `loss` and sum over micro-batches).
    clip_frac_low   fraction with A < 0 and r < 1 - clip_low   (lower clip active)
    clip_frac_high  fraction with A > 0 and r > 1 + clip_high  (upper clip active)
    dual_clip_frac  fraction with A < 0 and the dual-clip cap -clip_c*A active (0 without clip_c)
    ratio_mean      mean r
    kl_mean         mean kl (after the clamps; 0 without ref_logp)
    approx_kl       mean of 0.5 * (clamped log-ratio)^2
    entropy_mean    mean entropy (0 without entropy)
    n_tokens        number of active tokens of this micro-batch
The means are LOCAL: over this micro-batch's active tokens. Weight them by n_tokens to combine
micro-batches or ranks.

Triton implementation (Liger-style "gradient in forward"): the loss is a scalar, so the per-token
gradient is known in the forward pass up to the upstream scalar and the normaliser.
    forward  = `_grpo_fwd_kernel` (one program per TILES x BLOCK tokens in every mode, so a
               batch of a few very long sequences still fills the GPU) writes the unscaled per-token
               gradients and per-program partial sums [G, 16], then the one-program
               `_grpo_finalize_kernel` sums the partials in a fixed order (deterministic, no
               atomics), applies the normaliser and writes loss and stats. seq-mean-token-mean
               weights each token by 1/n_i: the active-token counts n_i [B] int32 come from
               `_seq_count_kernel` (one launch; programs per sequence, integer atomics: exact and
               deterministic); each forward program finds its first token's sequence by one scalar
               binary search over cu_seqlens, and each tile walks the sequence boundaries inside it,
               carrying the current sequence, its next bound and its weight from tile to tile (a
               tile inside one sequence loads nothing extra; a per-token search only for tiles with
               more than SEQ_WALK boundaries). A seq-* mode without global_seqs counts the active
               sequences from the same counts.
    backward = `_grpo_bwd_kernel`: dlogp = g_t * grad_output * scale (and the same for entropy).
All float hyper-parameters are tl.constexpr (they are fixed for a run) and the per-step
normaliser travels in an fp32 tensor: no Python float reaches a runtime kernel argument, which
Inductor would turn into fp64 (Liger-Kernel hit this: its PRs #1362 / #1366).
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

from kernels.reference import grpo_loss_reference

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = {"k1": 1, "k2": 2, "k3": 3}

# Width of the per-program partial sums (fwd kernel -> finalize kernel; the kernels index the slots).
_NSLOT = 16
# Slots of the finalized stats vector.
STAT_NAMES = ("policy_loss", "kl_loss", "entropy_loss", "clip_frac_low", "clip_frac_high",
              "dual_clip_frac", "ratio_mean", "kl_mean", "approx_kl", "entropy_mean", "n_tokens")
_O_SCALE = 12  # 1/denominator, kept for the backward kernel

# Shipped launch configuration (also what AOT_SPECS compiles).
FWD_BLOCK, FWD_WARPS = 1024, 8  # 4 warps: 128 regs (seq-mean+k3+entropy) and an 8-byte stack at sm_90
# Tiles per forward program: at most FWD_TILES, and only as many as keep >= FWD_MIN_PROGRAMS
# programs (~8 per SM), so a 256k-token batch still spreads over the GPU. More tiles per program
# were faster up to 16 at 16M tokens (bench/results/grpo_loss-tiles-h200.json).
FWD_TILES, FWD_MIN_PROGRAMS = 16, 1024


def _fwd_tiles(n: int) -> int:
    """Tiles per forward program for n tokens: a power of two in [1, FWD_TILES]."""
    t = 1
    while t < FWD_TILES and n >= 2 * t * FWD_BLOCK * FWD_MIN_PROGRAMS:
        t *= 2
    return t
# seq-mean-token-mean: sequence boundaries a 1024-token tile walks before it falls back to a
# per-token binary search (a tile holding more sequences than this averages < 64 tokens each).
SEQ_WALK = 16
FIN_ROWS, FIN_WARPS = 128, 4
BWD_BLOCK, BWD_WARPS = 1024, 4
# Active-token counts per sequence: CNT_BLOCK mask bytes per step, up to CNT_MAX_SPLIT programs per
# sequence (long sequences of a small batch are split so that the count does not run on a few SMs).
CNT_BLOCK, CNT_WARPS, CNT_MAX_SPLIT = 1024, 4, 64


# ------------------------------------------------------------------------------------- kernels

@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _seq_search(cu_ptr, t, lo, hi, steps, mask):
    """Largest s in [lo, hi] with cu[s] <= t (t, lo, hi scalars or [BLOCK] vectors; cu_seqlens is
    non-decreasing and cu[lo] <= t): the sequence of packed token t, past empty sequences."""
    for _ in range(steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_ptr + mid, mask=mask, other=0) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _inv_count(cnt_ptr, s, mask):
    """1 / n_s in fp32, correctly rounded (as torch's 1.0 / counts), for sequence index s (scalar
    or vector); sequences without active tokens give 1 (their tokens are masked anyway)."""
    n = tl.load(cnt_ptr + s, mask=mask, other=1)
    return tl.math.div_rn(tl.full(n.shape, 1.0, tl.float32), tl.maximum(n, 1).to(tl.float32))


@triton.jit
def _seq_count_kernel(mask_ptr, cu_ptr, cnt_ptr, SPLIT, BLOCK: tl.constexpr):
    """cnt[i] += active tokens (mask != 0) of sequence i in the blocks j, j + SPLIT, ... of it;
    grid (B, SPLIT), cnt [B] int32 zeroed beforehand."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    lo = tl.load(cu_ptr + i)
    hi = tl.load(cu_ptr + i + 1)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for a in range(lo + j * BLOCK, hi, SPLIT * BLOCK):
        offs = a + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + offs, mask=offs < hi, other=0)
        acc += (m != 0).to(tl.int32)
    tl.atomic_add(cnt_ptr + i, tl.sum(acc, axis=0), sem="relaxed")


@triton.jit
def _grpo_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, cu_ptr, cnt_ptr,  # [N] / [B+1] / [B]
    glogp_ptr, gent_ptr, part_ptr,  # outputs: unscaled grads [N], partial sums [G, 16]
    N, NSEQ, SEARCH_STEPS,
    R_LO: tl.constexpr, R_HI: tl.constexpr,  # 1 - clip_low, 1 + clip_high
    HAS_DUAL: tl.constexpr, CLIP_C: tl.constexpr,
    HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr, KL_COEF: tl.constexpr,
    HAS_ENT: tl.constexpr, ENT_COEF: tl.constexpr,
    SEQ_MEAN: tl.constexpr,  # weight each token by 1/n_i, n_i = cnt[i] (seq-mean-token-mean)
    WALK: tl.constexpr,  # SEQ_MEAN: sequence boundaries per tile walked one by one before searching
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,  # BLOCK-token tiles per program: the block-wide sums run once per program
):
    pid = tl.program_id(0)
    # Per-lane running sums over the program's tiles; reduced across the block once at the end
    # (each tl.sum is a shared-memory round trip with barriers: eleven of them per 1024 tokens
    # cost more than the loads).
    s_pol = tl.zeros([BLOCK], dtype=tl.float32)
    s_kl = tl.zeros([BLOCK], dtype=tl.float32)
    s_ent = tl.zeros([BLOCK], dtype=tl.float32)
    s_tok = tl.zeros([BLOCK], dtype=tl.float32)
    s_clo = tl.zeros([BLOCK], dtype=tl.float32)
    s_chi = tl.zeros([BLOCK], dtype=tl.float32)
    s_dual = tl.zeros([BLOCK], dtype=tl.float32)
    s_ratio = tl.zeros([BLOCK], dtype=tl.float32)
    s_klraw = tl.zeros([BLOCK], dtype=tl.float32)
    s_akl = tl.zeros([BLOCK], dtype=tl.float32)
    s_entraw = tl.zeros([BLOCK], dtype=tl.float32)
    # SEQ_MEAN, carried from tile to tile: s, a sequence no later than the current token's (the
    # current token's once the tile's walk is done), nxt = cu[s + 1] its end, ws = 1/n_s its weight
    s = tl.full([], 0, tl.int32)
    nxt = tl.full([], 0, tl.int32)
    ws = tl.full([], 0.0, tl.float32)
    if SEQ_MEAN:  # one scalar binary search per program, for its first token
        s = _seq_search(cu_ptr, pid * TILES * BLOCK, s, NSEQ - 1, SEARCH_STEPS, True)
        nxt = tl.load(cu_ptr + s + 1)  # s + 1 <= NSEQ: s only grows past bounds < N = cu[NSEQ]
        ws = _inv_count(cnt_ptr, s, True)
    for i in range(TILES):
        a = (pid * TILES + i) * BLOCK  # the tile's first token
        offs = a + tl.arange(0, BLOCK)
        inb = offs < N
        m = tl.load(mask_ptr + offs, mask=inb, other=0)
        act = inb & (m != 0)
        # Loads are masked by the (contiguous) bounds only, so they stay 16-byte vector loads; the
        # masked lanes are zeroed by a select, so their values (possibly NaN/inf) never enter the
        # arithmetic.
        lp = tl.where(act, tl.load(logp_ptr + offs, mask=inb, other=0.0), 0.0)
        old = tl.where(act, tl.load(old_ptr + offs, mask=inb, other=0.0), 0.0)
        adv = tl.where(act, tl.load(adv_ptr + offs, mask=inb, other=0.0), 0.0)
        w = act.to(tl.float32)  # the token's weight in the loss sums: 1, or 1/n_i in SEQ_MEAN
        if SEQ_MEAN:
            # The tile's tokens [a, t_end) lie in sequences s, s+1, ...: walk the boundaries
            # cu[s+1], cu[s+2], ... that fall inside the tile (two scalar loads each, ~1 per tile
            # for sequences of >= 1k tokens; a tile inside one sequence loads nothing) instead of a
            # per-token binary search (log2(B) dependent gathers per token: at 8k sequences that
            # latency, not the HBM traffic, bounded the kernel). A tile with more than WALK
            # boundaries (many short sequences) finds the rest by a per-token binary search. Empty
            # sequences (equal bounds) are stepped over: a token's sequence is the largest s with
            # cu[s] <= t, and the last bound a token passes sets its weight.
            t_end = tl.minimum(a + BLOCK, N)
            w = tl.zeros([BLOCK], dtype=tl.float32) + ws
            nb = tl.full([], 0, tl.int32)
            while (nxt < t_end) & (nb < WALK):
                s += 1
                ws = _inv_count(cnt_ptr, s, True)
                w = tl.where(offs >= nxt, ws, w)
                nxt = tl.load(cu_ptr + s + 1)
                nb += 1
            if nxt < t_end:
                late = act & (offs >= nxt)
                seq = tl.zeros([BLOCK], dtype=tl.int32) + s
                seq = tl.where(late, _seq_search(cu_ptr, offs, seq, seq * 0 + (NSEQ - 1), SEARCH_STEPS, late), seq)
                w = tl.where(late, _inv_count(cnt_ptr, seq, late), w)
                # the next tile starts its walk from the last active token's sequence (any s up to
                # its first token's is correct; a later one saves steps)
                s = tl.max(seq, axis=0)
                nxt = tl.load(cu_ptr + s + 1)
                ws = _inv_count(cnt_ptr, s, True)
            w = tl.where(act, w, 0.0)

        lr_raw = lp - old
        lr = _clamp(lr_raw, -20.0, 20.0)
        lr_in = (lr_raw >= -20.0) & (lr_raw <= 20.0)  # torch.clamp passes grad on [lo, hi]
        r = tl.exp(lr)
        s1 = r * adv
        s2 = _clamp(r, R_LO, R_HI) * adv
        pg0 = -tl.minimum(s1, s2)
        r_in = ((r >= R_LO) & (r <= R_HI)).to(tl.float32)
        # d(-min(s1, s2))/dr: s1 path gives A, s2 path gives A only inside the clip window; on a
        # tie torch splits the gradient half/half between the two arguments.
        sel = tl.where(s1 < s2, 1.0, tl.where(s1 == s2, 0.5 + 0.5 * r_in, 0.0))
        dpg = tl.where(lr_in, -adv * r * sel, 0.0)
        pg = pg0
        if HAS_DUAL:
            neg = adv < 0.0
            cap = -CLIP_C * adv
            pg = tl.where(neg, tl.minimum(pg0, cap), pg0)
            dsel = tl.where(pg0 < cap, 1.0, tl.where(pg0 == cap, 0.5, 0.0))
            dpg = tl.where(neg, dpg * dsel, dpg)
            s_dual += (act & neg & (pg0 > cap)).to(tl.float32)

        g = dpg
        if HAS_REF:
            ref = tl.where(act, tl.load(ref_ptr + offs, mask=inb, other=0.0), 0.0)
            d_raw = ref - lp
            d = _clamp(d_raw, -20.0, 20.0)
            d_in = ((d_raw >= -20.0) & (d_raw <= 20.0)).to(tl.float32)
            if KL_TYPE == 1:
                k = -d
                dk = d_in  # d(-d)/dlogp = +1 inside the clamp
            elif KL_TYPE == 2:
                k = 0.5 * d * d
                dk = -d * d_in
            else:
                e = tl.exp(d)
                k = e - d - 1.0
                dk = (1.0 - e) * d_in
            kl = _clamp(k, -10.0, 10.0)
            dkl = tl.where((k >= -10.0) & (k <= 10.0), dk, 0.0)
            kl = tl.where(act, kl, 0.0)
            s_klraw += kl
            if KL_COEF != 0.0:
                g = g + KL_COEF * dkl
                s_kl += KL_COEF * kl * w
        if HAS_ENT:
            ent = tl.where(act, tl.load(ent_ptr + offs, mask=inb, other=0.0), 0.0)
            s_entraw += ent
            if ENT_COEF != 0.0:
                s_ent += -ENT_COEF * ent * w
            tl.store(gent_ptr + offs, tl.where(act, -ENT_COEF * w, 0.0), mask=inb)

        tl.store(glogp_ptr + offs, tl.where(act, g * w, 0.0), mask=inb)
        s_pol += tl.where(act, pg * w, 0.0)
        s_tok += act.to(tl.float32)
        s_clo += (act & (adv < 0.0) & (r < R_LO)).to(tl.float32)
        s_chi += (act & (adv > 0.0) & (r > R_HI)).to(tl.float32)
        s_ratio += tl.where(act, r, 0.0)
        s_akl += tl.where(act, 0.5 * lr * lr, 0.0)

    # One 16-wide store per program; slots 11..15 are written as 0 (the finalize sums all 16).
    cols = tl.arange(0, 16)
    v = tl.where(cols == 0, tl.sum(s_pol, axis=0), 0.0)
    v = tl.where(cols == 3, tl.sum(s_tok, axis=0), v)
    v = tl.where(cols == 4, tl.sum(s_clo, axis=0), v)
    v = tl.where(cols == 5, tl.sum(s_chi, axis=0), v)
    v = tl.where(cols == 7, tl.sum(s_ratio, axis=0), v)
    v = tl.where(cols == 9, tl.sum(s_akl, axis=0), v)
    if HAS_REF:
        v = tl.where(cols == 8, tl.sum(s_klraw, axis=0), v)
        if KL_COEF != 0.0:
            v = tl.where(cols == 1, tl.sum(s_kl, axis=0), v)
    if HAS_DUAL:
        v = tl.where(cols == 6, tl.sum(s_dual, axis=0), v)
    if HAS_ENT:
        v = tl.where(cols == 10, tl.sum(s_entraw, axis=0), v)
        if ENT_COEF != 0.0:
            v = tl.where(cols == 2, tl.sum(s_ent, axis=0), v)
    tl.store(part_ptr + pid * 16 + cols, v)


@triton.jit
def _pick(v, cols, k):
    return tl.sum(tl.where(cols == k, v, 0.0), axis=0)


@triton.jit
def _grpo_finalize_kernel(
    part_ptr, den_ptr, loss_ptr, out_ptr, G,
    HAS_DEN: tl.constexpr,  # den_ptr holds the full denominator; else den = local tokens (token-mean)
    ROWS: tl.constexpr,
):
    cols = tl.arange(0, 16)
    acc = tl.zeros([16], dtype=tl.float32)
    # Fixed-order reduction over the program partials: bitwise reproducible run to run.
    for r0 in range(0, G, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        tile = tl.load(part_ptr + rows[:, None] * 16 + cols[None, :], mask=rows[:, None] < G, other=0.0)
        acc += tl.sum(tile, axis=0)
    n_tok = _pick(acc, cols, 3)
    den = tl.load(den_ptr)
    if not HAS_DEN:
        den = den * n_tok
    scale = tl.where(den > 0.0, 1.0 / tl.where(den > 0.0, den, 1.0), 0.0)
    inv_tok = 1.0 / tl.maximum(n_tok, 1.0)
    pol = _pick(acc, cols, 0) * scale
    kl = _pick(acc, cols, 1) * scale
    ent = _pick(acc, cols, 2) * scale
    tl.store(loss_ptr, pol + kl + ent)
    # out[0:3] aggregated parts, out[3:10] local means, out[10] n_tokens, out[12] scale.
    means = acc * inv_tok
    out = tl.where(cols == 0, pol, 0.0)
    out = tl.where(cols == 1, kl, out)
    out = tl.where(cols == 2, ent, out)
    # the means: partial slots 4..10 -> out slots 3..9
    for k in tl.static_range(3, 10):
        out = tl.where(cols == k, _pick(means, cols, k + 1), out)
    out = tl.where(cols == 10, n_tok, out)
    out = tl.where(cols == 12, scale, out)
    tl.store(out_ptr + cols, out)


@triton.jit
def _grpo_bwd_kernel(glogp_ptr, gent_ptr, gout_ptr, scale_ptr, dlogp_ptr, dent_ptr, N,
                     HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    c = tl.load(gout_ptr) * tl.load(scale_ptr)
    tl.store(dlogp_ptr + offs, tl.load(glogp_ptr + offs, mask=inb, other=0.0) * c, mask=inb)
    if HAS_ENT:
        tl.store(dent_ptr + offs, tl.load(gent_ptr + offs, mask=inb, other=0.0) * c, mask=inb)


# ------------------------------------------------------------------------------------ launcher

def count_normalisers(mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """Local normalisers of one micro-batch, to be summed over micro-batches and all-reduced over
    ranks, then passed as global_tokens / global_seqs.

    mask [N] bool/float (active = != 0); cu_seqlens [B+1] int32 or None.
    Returns (tokens, seqs): 0-d int64 tensors on mask's device (no host sync). tokens = active
    tokens; seqs = sequences with at least one active token (fully masked sequences are not
    counted); seqs is None when cu_seqlens is None.
    """
    tokens = (mask != 0).sum()
    if cu_seqlens is None:
        return tokens, None
    return tokens, (_seq_active_counts(mask, cu_seqlens) > 0).sum()


def _seq_active_counts(mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Active tokens (mask != 0) per sequence [B] int32, no host sync. On CUDA (and under the
    interpreter) one `_seq_count_kernel` launch; elsewhere an exact integer cumsum of the mask, with
    a leading 0, read at the sequence bounds (int32 suffices: cu_seqlens is int32)."""
    nseq = cu_seqlens.numel() - 1
    if (mask.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and nseq > 0 and mask.numel() > 0:
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        cnt = torch.zeros(nseq, dtype=torch.int32, device=mask.device)
        # programs per sequence: about two blocks each for an average sequence
        split = max(1, min(CNT_MAX_SPLIT, mask.numel() // (nseq * 2 * CNT_BLOCK)))
        _seq_count_kernel[(nseq, split)](m.contiguous(), cu_seqlens.contiguous(), cnt, split,
                                         BLOCK=CNT_BLOCK, num_warps=CNT_WARPS)
        return cnt
    act = mask if mask.dtype == torch.bool else mask != 0
    csum = torch.zeros(act.numel() + 1, dtype=torch.int32, device=act.device)
    torch.cumsum(act, 0, dtype=torch.int32, out=csum[1:])
    return csum[cu_seqlens[1:]] - csum[cu_seqlens[:-1]]


def _check_vec(name, t, n, dtypes):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"grpo_loss: {name} must be a 1-D tensor of {n} tokens, got {shape}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"grpo_loss: {name} must be {'/'.join(str(d) for d in dtypes)}, got {t.dtype}")


def _validate(logp, old_logp, advantages, mask, ref_logp, entropy, cu_seqlens, kl_coef, kl_type,
              loss_agg, norm_const, clip_low, clip_high, clip_c):
    if not isinstance(logp, torch.Tensor) or logp.dim() != 1:
        raise ValueError("grpo_loss: logp must be a 1-D packed [N] fp32 tensor")
    n = logp.shape[0]
    f32 = (torch.float32,)
    _check_vec("logp", logp, n, f32)
    _check_vec("old_logp", old_logp, n, f32)
    _check_vec("advantages", advantages, n, f32)
    _check_vec("mask", mask, n, None)
    if ref_logp is not None:
        _check_vec("ref_logp", ref_logp, n, f32)
    if entropy is not None:
        _check_vec("entropy", entropy, n, f32)
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask),
                    ("ref_logp", ref_logp), ("entropy", entropy), ("cu_seqlens", cu_seqlens)):
        if t is not None and t.device != logp.device:
            raise ValueError(f"grpo_loss: {name} is on {t.device}, logp on {logp.device}")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"grpo_loss: loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"grpo_loss: kl_type must be one of {tuple(KL_TYPES)}, got {kl_type!r}")
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("grpo_loss: kl_coef > 0 needs ref_logp")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"grpo_loss: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if clip_c is not None and not clip_c > 1.0:
        raise ValueError(f"grpo_loss: clip_c (dual clip) must be > 1, got {clip_c}")
    if loss_agg != "token-mean":
        if cu_seqlens is None:
            raise ValueError(f"grpo_loss: loss_agg={loss_agg!r} needs cu_seqlens [B+1] int32")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 1:
            raise ValueError(f"grpo_loss: cu_seqlens must be 1-D int32 [B+1], got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        # Checking the values needs a device->host sync: only done off the GPU.
        if not cu_seqlens.is_cuda and (int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n):
            raise ValueError(f"grpo_loss: cu_seqlens must start at 0 and end at N={n}, got "
                             f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    if loss_agg == "seq-mean-token-sum-norm" and not (norm_const is not None and norm_const > 0):
        raise ValueError("grpo_loss: loss_agg='seq-mean-token-sum-norm' needs norm_const > 0 "
                         "(e.g. the maximum response length)")


def _denominator(loss_agg, global_tokens, global_seqs, norm_const, counts, device):
    """(den tensor [1] fp32, has_den): the full denominator of the loss sums, or (1.0, False) for
    token-mean without global_tokens, where the finalize kernel uses the local token count. A seq-*
    mode without global_seqs counts this micro-batch's sequences with an active token from
    `counts` (active tokens per sequence, on the device: no host sync)."""
    g = global_tokens if loss_agg == "token-mean" else global_seqs
    mult = float(norm_const) if loss_agg == "seq-mean-token-sum-norm" else 1.0
    if g is None:
        if loss_agg == "token-mean":
            return torch.ones(1, dtype=torch.float32, device=device), False
        g = (counts > 0).sum()
    if isinstance(g, torch.Tensor):
        den = g.detach().reshape(1).to(device=device, dtype=torch.float32)
        return (den * mult if mult != 1.0 else den.contiguous()), True
    return torch.full((1,), float(g) * mult, dtype=torch.float32, device=device), True


_DUMMIES: dict = {}


def _dummy_i32(device):
    """A cached 1-element int32 tensor for the unused cu_seqlens pointer (no fill launch per call)."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old_logp, advantages, mask, ref_logp, cu_seqlens, counts, den, cfg):
        n = logp.shape[0]
        dev = logp.device
        seq_mean = counts is not None and n > 0  # no tokens: no weights to look up (and no cu[1])
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # free reinterpretation; the kernel tests != 0
        tiles = _fwd_tiles(n)
        grid_n = max(triton.cdiv(n, FWD_BLOCK * tiles), 1)
        if seq_mean:  # per-sequence weights 1/n_i from the counts n_i, looked up by the kernel
            nseq = cu_seqlens.numel() - 1
            cu, steps = cu_seqlens, max(nseq, 1).bit_length()
        else:
            nseq, steps = 0, 0
            cu = _dummy_i32(dev) if cu_seqlens is None else cu_seqlens  # not read in this mode
            counts = cu  # not read either
        has_ref = ref_logp is not None
        has_ent = entropy is not None
        glogp = torch.empty(n, dtype=torch.float32, device=dev)
        gent = torch.empty(n, dtype=torch.float32, device=dev) if has_ent else glogp
        part = torch.empty((grid_n, _NSLOT), dtype=torch.float32, device=dev)
        _grpo_fwd_kernel[(grid_n,)](
            logp, old_logp, advantages, mask, ref_logp if has_ref else logp,
            entropy if has_ent else logp, cu, counts, glogp, gent, part, n, nseq, steps,
            R_LO=1.0 - cfg["clip_low"], R_HI=1.0 + cfg["clip_high"],
            HAS_DUAL=cfg["clip_c"] is not None, CLIP_C=float(cfg["clip_c"] or 0.0),
            HAS_REF=has_ref, KL_TYPE=KL_TYPES[cfg["kl_type"]], KL_COEF=float(cfg["kl_coef"]),
            HAS_ENT=has_ent, ENT_COEF=float(cfg["entropy_coef"]),
            SEQ_MEAN=seq_mean, WALK=SEQ_WALK, BLOCK=FWD_BLOCK, TILES=tiles, num_warps=FWD_WARPS,
        )
        loss = torch.empty((), dtype=torch.float32, device=dev)
        out = torch.empty(_NSLOT, dtype=torch.float32, device=dev)
        _grpo_finalize_kernel[(1,)](part, den, loss, out, grid_n, HAS_DEN=cfg["has_den"],
                                    ROWS=FIN_ROWS, num_warps=FIN_WARPS)
        ctx.save_for_backward(glogp, gent if has_ent else None, out)
        ctx.has_ent = has_ent
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx, grad_loss, _grad_out):
        glogp, gent, out = ctx.saved_tensors
        n = glogp.shape[0]
        dlogp = torch.empty_like(glogp)
        dent = torch.empty_like(gent) if ctx.has_ent else None
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=glogp.device)
        go = grad_loss.detach().to(torch.float32).contiguous()
        if n > 0:
            _grpo_bwd_kernel[(triton.cdiv(n, BWD_BLOCK),)](
                glogp, gent if ctx.has_ent else glogp, go, out[_O_SCALE:], dlogp,
                dent if ctx.has_ent else dlogp, n, HAS_ENT=ctx.has_ent, BLOCK=BWD_BLOCK,
                num_warps=BWD_WARPS)
        return dlogp, dent, None, None, None, None, None, None, None, None


def _stats_from_out(out: torch.Tensor) -> dict:
    # one unbind (one dispatch) instead of an indexing per stat: this runs once per micro-batch
    # from Python, where small batches are launch- and dispatch-bound
    return dict(zip(STAT_NAMES, out.unbind(0)))


def grpo_loss(logp, old_logp, advantages, mask, ref_logp=None, *, clip_low, clip_high, clip_c=None,
              kl_coef=0.0, kl_type="k3", loss_agg="token-mean", global_tokens=None, global_seqs=None,
              cu_seqlens=None, norm_const=None, entropy=None, entropy_coef=0.0, impl="auto"):
    """GRPO/PPO clipped policy loss with optional dual clip, KL and entropy bonus; see the module
    docstring for shapes, formulas, aggregation modes and stats.

    Returns (loss 0-d fp32, differentiable in logp and entropy; stats dict of 0-d fp32 tensors).
    impl: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the plain reference) or
    "auto" (triton on CUDA tensors, torch otherwise).
    """
    _validate(logp, old_logp, advantages, mask, ref_logp, entropy, cu_seqlens, kl_coef, kl_type,
              loss_agg, norm_const, clip_low, clip_high, clip_c)
    if impl == "auto":
        impl = "triton" if logp.is_cuda else "torch"
    if impl == "torch":
        return grpo_loss_reference(
            logp, old_logp, advantages, mask, ref_logp, clip_low=clip_low, clip_high=clip_high,
            clip_c=clip_c, kl_coef=kl_coef, kl_type=kl_type, loss_agg=loss_agg,
            global_tokens=global_tokens, global_seqs=global_seqs, cu_seqlens=cu_seqlens,
            norm_const=norm_const, entropy=entropy, entropy_coef=entropy_coef)
    if impl != "triton":
        raise ValueError(f"grpo_loss: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if not logp.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("grpo_loss: impl='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                         "(set before triton is imported); use impl='torch' or 'auto'")
    counts = None  # active tokens per sequence, computed once for the weights and the denominator
    if loss_agg == "seq-mean-token-mean" or (loss_agg != "token-mean" and global_seqs is None):
        counts = _seq_active_counts(mask, cu_seqlens)
    den, has_den = _denominator(loss_agg, global_tokens, global_seqs, norm_const, counts, logp.device)
    cfg = dict(clip_low=float(clip_low), clip_high=float(clip_high),
               clip_c=None if clip_c is None else float(clip_c), kl_coef=float(kl_coef),
               kl_type=kl_type, entropy_coef=float(entropy_coef), loss_agg=loss_agg, has_den=has_den)
    loss, out = _GRPOLossFunction.apply(
        logp.contiguous(), None if entropy is None else entropy.contiguous(),
        old_logp.detach().contiguous(), advantages.detach().contiguous(), mask.detach().contiguous(),
        None if ref_logp is None else ref_logp.detach().contiguous(),
        None if cu_seqlens is None else cu_seqlens.contiguous(),
        counts if loss_agg == "seq-mean-token-mean" else None, den, cfg)
    return loss, _stats_from_out(out)


# ------------------------------------------------------------------- ahead-of-time compile specs

def _fwd_spec(name, seq_mean, has_ref, kl_type, has_ent, dual):
    sig = {"logp_ptr": "*fp32", "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*u8",
           "ref_ptr": "*fp32", "ent_ptr": "*fp32", "cu_ptr": "*i32", "cnt_ptr": "*i32", "glogp_ptr": "*fp32",
           "gent_ptr": "*fp32", "part_ptr": "*fp32", "N": "i32", "NSEQ": "i32", "SEARCH_STEPS": "i32"}
    consts = dict(R_LO=0.8, R_HI=1.28, HAS_DUAL=dual, CLIP_C=3.0 if dual else 0.0, HAS_REF=has_ref,
                  KL_TYPE=kl_type, KL_COEF=0.001 if has_ref else 0.0, HAS_ENT=has_ent,
                  ENT_COEF=0.001 if has_ent else 0.0, SEQ_MEAN=seq_mean, WALK=SEQ_WALK,
                  BLOCK=FWD_BLOCK, TILES=FWD_TILES)
    sig.update({k: "constexpr" for k in consts})
    return dict(name=name, fn=_grpo_fwd_kernel, signature=sig, constexprs=consts,
                num_warps=FWD_WARPS, num_stages=3)


# Each Triton kernel at its shipped block size; the forward in its lightest and heaviest
# specialisations (token-mean without extras; seq-mean-token-mean with k3 KL, entropy, dual clip).
AOT_SPECS = [
    _fwd_spec("grpo_fwd_token_mean", False, False, 3, False, False),
    _fwd_spec("grpo_fwd_seq_mean_k3_ent_dual", True, True, 3, True, True),
    dict(name="grpo_finalize", fn=_grpo_finalize_kernel,
         signature={"part_ptr": "*fp32", "den_ptr": "*fp32", "loss_ptr": "*fp32", "out_ptr": "*fp32",
                    "G": "i32", "HAS_DEN": "constexpr", "ROWS": "constexpr"},
         constexprs=dict(HAS_DEN=True, ROWS=FIN_ROWS), num_warps=FIN_WARPS, num_stages=1),
    dict(name="grpo_bwd", fn=_grpo_bwd_kernel,
         signature={"glogp_ptr": "*fp32", "gent_ptr": "*fp32", "gout_ptr": "*fp32", "scale_ptr": "*fp32",
                    "dlogp_ptr": "*fp32", "dent_ptr": "*fp32", "N": "i32", "HAS_ENT": "constexpr",
                    "BLOCK": "constexpr"},
         constexprs=dict(HAS_ENT=True, BLOCK=BWD_BLOCK), num_warps=BWD_WARPS, num_stages=1),
    dict(name="grpo_seq_count", fn=_seq_count_kernel,
         signature={"mask_ptr": "*u8", "cu_ptr": "*i32", "cnt_ptr": "*i32", "SPLIT": "i32",
                    "BLOCK": "constexpr"},
         constexprs=dict(BLOCK=CNT_BLOCK), num_warps=CNT_WARPS, num_stages=1),
]
