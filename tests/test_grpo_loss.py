"""Fused GRPO loss (kernels/grpo_loss.py) against the plain-torch reference (kernels/reference.py).

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Accuracy rule of the
house: the fp32 kernel's error against an fp64 oracle must be of the order of fp32 torch's error.
"""

import math
import os
import random
import subprocess
import sys
import zlib

import pytest
import torch

from kernels.grpo_loss import AOT_SPECS, STAT_NAMES, count_normalisers, grpo_loss
from kernels.reference import grpo_loss_reference

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
IMPLS = ["triton", "torch"]
CLIPS = {  # name -> (clip_low, clip_high, clip_c)
    "sym": (0.2, 0.2, None),
    "clip_higher": (0.2, 0.28, None),
    "dual": (0.2, 0.28, 3.0),
}
NORM_CONST = 16.0


def make_batch(seed=0, lengths=(1, 7, 3, 12, 1, 9, 5, 1, 14, 6), dtype=torch.float32):
    """A packed micro-batch with sequences of length 1, a fully masked sequence (index 2), random
    masks, per-sequence advantages broadcast to tokens, and a few extreme log-ratios (+-50)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    n = int(lengths.sum())
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    # alternating signs, so the odd sequences (1, 3, ...) have A < 0
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(len(lengths))])
    seq_adv = (torch.randn(len(lengths), generator=g).abs() + 0.1) * signs
    adv = torch.repeat_interleave(seq_adv, lengths)
    logp = -torch.rand(n, generator=g) * 3.0
    old = logp + 0.4 * torch.randn(n, generator=g)  # ratios spread over both clip edges
    ref = logp + 0.5 * torch.randn(n, generator=g)
    ent = torch.rand(n, generator=g) * 2.0
    mask = torch.rand(n, generator=g) > 0.25
    mask[int(cu[2]):int(cu[3])] = False  # a fully masked sequence
    mask[int(cu[0])] = True  # a length-1 sequence that counts
    # extreme log-ratios / KL differences, on active tokens
    ext = [int(cu[3]) + 1, int(cu[3]) + 4, int(cu[5]) + 2, int(cu[8]) + 3]
    mask[ext] = True
    # a moderate dual-clip case: r = e^1.5 > c = 3 with A < 0 (sequence 1)
    mask[int(cu[1]) + 2] = True
    old[int(cu[1]) + 2] = logp[int(cu[1]) + 2] - 1.5
    old[ext[0]] = logp[ext[0]] - 50.0
    old[ext[1]] = logp[ext[1]] + 50.0
    ref[ext[2]] = logp[ext[2]] + 50.0
    ref[ext[3]] = logp[ext[3]] - 50.0
    # garbage on a masked token must not leak
    masked = torch.nonzero(~mask)[0, 0]
    logp[masked], old[masked], ref[masked] = float("nan"), float("inf"), float("-inf")
    conv = lambda t: t.to(dtype)  # noqa: E731
    return dict(logp=conv(logp), old_logp=conv(old), advantages=conv(adv), mask=mask,
                ref_logp=conv(ref), entropy=conv(ent), cu_seqlens=cu)


def run(impl, batch, *, kl_type, clip, loss_agg, entropy_coef=0.01, grad_out=1.0, **kw):
    """Loss, stats and gradients (logp, entropy) of one call."""
    clip_low, clip_high, clip_c = CLIPS[clip]
    logp = batch["logp"].clone().requires_grad_()
    ent = batch["entropy"].clone().requires_grad_()
    fn = grpo_loss_reference if impl == "ref" else grpo_loss
    extra = {} if impl == "ref" else {"impl": impl}
    loss, stats = fn(
        logp, batch["old_logp"], batch["advantages"], batch["mask"],
        None if kl_type == "none" else batch["ref_logp"],
        clip_low=clip_low, clip_high=clip_high, clip_c=clip_c,
        kl_coef=0.0 if kl_type == "none" else 0.1, kl_type="k3" if kl_type == "none" else kl_type,
        loss_agg=loss_agg, cu_seqlens=batch["cu_seqlens"], norm_const=NORM_CONST,
        entropy=ent, entropy_coef=entropy_coef, **extra, **kw)
    (loss * grad_out).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, logp.grad, ent.grad


def assert_like_torch(name, got, ref32, ref64):
    """|got - fp64| must be within a small multiple of fp32 torch's own error (+ a floor)."""
    got, ref32, ref64 = got.double(), ref32.double(), ref64.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite {got}"
    err = (got - ref64).abs().max().item()
    torch_err = (ref32 - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())
    assert err <= 4 * torch_err + floor, f"{name}: err {err:.3g} vs torch fp32 err {torch_err:.3g}"


def check_triton_like_torch(b32, **kw):
    """The Triton path on an fp32 batch against the fp64 reference: loss, every stat and both
    gradients within assert_like_torch of fp32 torch's own error. Returns the fp64 oracle run."""
    b64 = {k: (v.double() if v.is_floating_point() else v) for k, v in b32.items()}
    oracle, torch32, got = run("ref", b64, **kw), run("ref", b32, **kw), run("triton", b32, **kw)
    assert_like_torch("loss", got[0], torch32[0], oracle[0])
    for k in STAT_NAMES:
        assert_like_torch(k, got[1][k], torch32[1][k], oracle[1][k])
    assert_like_torch("dlogp", got[2], torch32[2], oracle[2])
    assert_like_torch("dentropy", got[3], torch32[3], oracle[3])
    return oracle


def loss_by_formula(batch, *, kl_type, clip, loss_agg, entropy_coef=0.01, grad_out=1.0):
    """(loss, dlogp, dentropy) of run()'s settings from the module docstring's per-token formulas,
    token by token in fp64 scalars (independent of kernels.reference): masked tokens are skipped,
    sequences without an active token are not counted."""
    clip_low, clip_high, clip_c = CLIPS[clip]
    kl_coef = 0.0 if kl_type == "none" else 0.1
    logp = batch["logp"].double().clone().requires_grad_()
    ent = batch["entropy"].double().clone().requires_grad_()
    old, adv, ref = (batch[k].double() for k in ("old_logp", "advantages", "ref_logp"))
    mask = batch["mask"]
    cu = batch["cu_seqlens"].tolist()
    seqs = [[t for t in range(a, b) if mask[t]] for a, b in zip(cu[:-1], cu[1:])]
    n_tok, n_seq = sum(map(len, seqs)), sum(1 for s in seqs if s)
    loss = torch.zeros((), dtype=torch.float64)
    for toks in seqs:
        for t in toks:
            A = adv[t]
            r = torch.exp(torch.clamp(logp[t] - old[t], -20, 20))
            pg = -torch.minimum(r * A, torch.clamp(r, 1 - clip_low, 1 + clip_high) * A)
            if clip_c is not None and A < 0:
                pg = torch.minimum(pg, -clip_c * A)
            kl = 0.0
            if kl_coef:
                d = torch.clamp(ref[t] - logp[t], -20, 20)
                k = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl_type]
                kl = torch.clamp(k, -10, 10)
            w = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (len(toks) * n_seq),
                 "seq-mean-token-sum": 1 / n_seq, "seq-mean-token-sum-norm": 1 / (n_seq * NORM_CONST)}[loss_agg]
            loss = loss + w * (pg + kl_coef * kl - entropy_coef * ent[t])
    (loss * grad_out).backward()
    return loss.detach(), logp.grad, ent.grad


# --------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("kl_type", ["none", "k1", "k2", "k3"])
@pytest.mark.parametrize("loss_agg", MODES)
def test_matches_reference(loss_agg, kl_type, clip):
    b32 = make_batch(seed=zlib.crc32(f"{loss_agg}{kl_type}{clip}".encode()) % 1000)
    b64 = {k: (v.double() if v.is_floating_point() else v) for k, v in b32.items()}
    kw = dict(kl_type=kl_type, clip=clip, loss_agg=loss_agg, grad_out=1.7)  # non-unit upstream grad
    oracle = run("ref", b64, **kw)
    torch32 = run("ref", b32, **kw)
    got = run("triton", b32, **kw)
    assert set(got[1]) == set(STAT_NAMES) == set(oracle[1])
    assert_like_torch("loss", got[0], torch32[0], oracle[0])
    for k in STAT_NAMES:
        assert_like_torch(k, got[1][k], torch32[1][k], oracle[1][k])
    assert_like_torch("dlogp", got[2], torch32[2], oracle[2])
    assert_like_torch("dentropy", got[3], torch32[3], oracle[3])
    # the torch path of the public API against the per-token formulas written out in fp64
    t = run("torch", b32, **kw)
    for name, a, b in zip(("loss", "dlogp", "dentropy"), (t[0], t[2], t[3]), loss_by_formula(b64, **kw)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)
    # the batch really exercises the clip branches
    if clip != "sym":
        assert oracle[1]["clip_frac_high"] > 0 and oracle[1]["clip_frac_low"] > 0
    if clip == "dual":
        assert oracle[1]["dual_clip_frac"] > 0


@pytest.mark.parametrize("loss_agg", MODES)
@pytest.mark.parametrize("given_seqs,multi_tile", [(False, False), (True, False), (False, True)])
def test_long_sequences_across_program_blocks(loss_agg, given_seqs, multi_tile, monkeypatch):
    """Sequences longer than a program's block of tokens (1024), sequences starting mid-block and
    an empty sequence: each token still finds its own sequence's 1/n_i, and a seq-* mode with no
    global_seqs counts the active sequences itself. multi_tile: programs of FWD_TILES blocks (as
    on large batches), the last one only partly filled."""
    import kernels.grpo_loss as gl

    if multi_tile:
        monkeypatch.setattr(gl, "FWD_MIN_PROGRAMS", 1)
        assert gl._fwd_tiles(4785) == 4 and 4785 % (4 * gl.FWD_BLOCK) != 0
    else:
        assert gl._fwd_tiles(4785) == 1
    b32 = make_batch(seed=11, lengths=(1500, 7, 3, 1200, 1, 2049, 5, 0, 14, 6))
    kw = dict(kl_type="k3", clip="dual", loss_agg=loss_agg, grad_out=-0.9)
    if given_seqs:
        kw["global_seqs"] = 13  # as if other micro-batches held more sequences
    oracle = check_triton_like_torch(b32, **kw)
    if loss_agg == "seq-mean-token-mean":  # tokens of the longest sequence weigh 1/n of theirs
        cu = b32["cu_seqlens"].long()
        n5 = int(b32["mask"][cu[5]:cu[6]].sum())
        g5 = oracle[3][cu[5]:cu[6]][b32["mask"][cu[5]:cu[6]]]
        assert torch.allclose(g5, g5[:1].expand_as(g5)) and n5 > 1024


@pytest.mark.parametrize("walk", [16, 1])
@pytest.mark.parametrize("multi_tile", [False, True])
def test_seq_mean_many_short_sequences(walk, multi_tile, monkeypatch):
    """seq-mean-token-mean weights where tiles hold more sequence boundaries than the kernel walks
    one by one (bursts of short and empty sequences, one straddling a tile edge), next to long
    sequences spanning tiles: the walk, its binary-search fallback and the hand-over of the
    current sequence from tile to tile all give each token its own 1/n_i."""
    import kernels.grpo_loss as gl

    monkeypatch.setattr(gl, "SEQ_WALK", walk)
    if multi_tile:
        monkeypatch.setattr(gl, "FWD_MIN_PROGRAMS", 1)
    rng = random.Random(5)
    burst = lambda k: [rng.choice([0, 1, 1, 2, 3, 5]) for _ in range(k)]  # noqa: E731
    lengths = [1, 7, 3, 900] + burst(60) + [1100, 0, 0] + burst(40) + [1500] + burst(25) + [2, 0]
    b32 = make_batch(seed=13, lengths=lengths)
    n = int(b32["cu_seqlens"][-1])
    assert n > 3 * gl.FWD_BLOCK and (gl._fwd_tiles(n) > 1) == multi_tile
    check_triton_like_torch(b32, kl_type="k2", clip="dual", loss_agg="seq-mean-token-mean", grad_out=1.3)


@pytest.mark.parametrize("impl", IMPLS)
def test_optional_inputs_absent(impl):
    """No ref_logp, no entropy, mask as float: the stats of the missing parts are 0."""
    b = make_batch(seed=3)
    logp = b["logp"].clone().requires_grad_()
    kw = dict(clip_low=0.2, clip_high=0.28, loss_agg="token-mean")
    loss, st = grpo_loss(logp, b["old_logp"], b["advantages"], b["mask"].float(), impl=impl, **kw)
    loss.backward()
    lr = b["logp"].detach().clone().requires_grad_()
    rl, rst = grpo_loss_reference(lr, b["old_logp"], b["advantages"], b["mask"], **kw)
    rl.backward()
    torch.testing.assert_close(loss, rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.grad, lr.grad, rtol=1e-5, atol=1e-7)
    for k in ("kl_mean", "kl_loss", "entropy_mean", "entropy_loss", "dual_clip_frac"):
        assert st[k] == 0, k


# ------------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_agg", MODES)
def test_fully_masked_microbatch(loss_agg, impl):
    b = make_batch(seed=5)
    b["mask"] = torch.zeros_like(b["mask"])
    b["logp"][3] = float("nan")
    loss, stats, dlogp, dent = run(impl, b, kl_type="k3", clip="dual", loss_agg=loss_agg)
    assert loss.item() == 0.0
    assert torch.equal(dlogp, torch.zeros_like(dlogp)) and torch.equal(dent, torch.zeros_like(dent))
    for k, v in stats.items():
        assert v.item() == 0.0, k
    # with global normalisers from other micro-batches it is still exactly 0
    loss, _, dlogp, _ = run(impl, b, kl_type="k3", clip="dual", loss_agg=loss_agg,
                            global_tokens=100, global_seqs=10)
    assert loss.item() == 0.0 and not dlogp.abs().sum()


def test_empty_microbatch():
    e = torch.empty(0)
    for agg in MODES:
        logp = e.clone().requires_grad_()
        loss, stats = grpo_loss(logp, e, e, e.bool(), e, clip_low=0.2, clip_high=0.2, kl_coef=0.1,
                                loss_agg=agg, cu_seqlens=torch.zeros(1, dtype=torch.int32),
                                norm_const=4.0, impl="triton")
        loss.backward()
        assert loss.item() == 0.0 and logp.grad.shape == (0,)
        assert all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_log_ratios(impl):
    """+-50 log-ratios are clamped to +-20 (finite loss, zero gradient through the clamp)."""
    n = 4
    logp = torch.zeros(n, requires_grad=True)
    old = torch.tensor([-50.0, 50.0, -50.0, 50.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ref = torch.tensor([50.0, -50.0, 0.0, 0.0])
    loss, st = grpo_loss(logp, old, adv, torch.ones(n, dtype=torch.bool), ref, clip_low=0.2,
                         clip_high=0.2, kl_coef=0.1, kl_type="k3", impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in st.values())
    # token 2: A<0, r = e^20 unclipped from above -> pg = r (huge but finite), grad 0 (clamped);
    # the k3 KL of tokens 0/1 is clamped to 10, so its gradient is 0 as well.
    assert logp.grad.abs().max().item() == 0.0
    assert math.isclose(st["kl_mean"].item(), 5.0, rel_tol=1e-6)  # (10 + 10 + 0 + 0) / 4


def test_fwd_tiles_rule():
    """Tiles per program grow with the batch (powers of two, capped) but never below ~8 programs
    per SM: 256k tokens keep one tile per program, 16M tokens get the cap."""
    import kernels.grpo_loss as gl

    assert [gl._fwd_tiles(n) for n in (0, 1, 262144, 2 << 20, 4 << 20, 16 << 20, 1 << 30)] == \
        [1, 1, 1, 2, 4, 16, 16]
    for n in (3 << 20, 5 << 20, 16 << 20):
        assert n // (gl._fwd_tiles(n) * gl.FWD_BLOCK) >= gl.FWD_MIN_PROGRAMS


def test_deterministic():
    b = make_batch(seed=7, lengths=(300, 900, 1200, 50, 1, 400, 3, 2, 100, 500))  # > 1 program
    a = run("triton", b, kl_type="k3", clip="dual", loss_agg="token-mean")
    c = run("triton", b, kl_type="k3", clip="dual", loss_agg="token-mean")
    assert torch.equal(a[0], c[0]) and torch.equal(a[2], c[2])
    assert all(torch.equal(a[1][k], c[1][k]) for k in a[1])


def test_validation_messages():
    b = make_batch()
    base = dict(clip_low=0.2, clip_high=0.2)
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(*args, kl_coef=0.1, **base)
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        grpo_loss(*args, loss_agg="seq-mean-token-mean", **base)
    with pytest.raises(ValueError, match="norm_const"):
        grpo_loss(*args, loss_agg="seq-mean-token-sum-norm", cu_seqlens=b["cu_seqlens"], **base)
    with pytest.raises(ValueError, match="old_logp must be"):
        grpo_loss(b["logp"], b["old_logp"].half(), b["advantages"], b["mask"], **base)
    with pytest.raises(ValueError, match="loss_agg must be"):
        grpo_loss(*args, loss_agg="mean", **base)
    with pytest.raises(ValueError, match="clip_c"):
        grpo_loss(*args, clip_c=0.5, **base)


def test_count_normalisers():
    mask = torch.tensor([1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    cu = torch.tensor([0, 1, 3, 7], dtype=torch.int32)  # second sequence fully masked
    tokens, seqs = count_normalisers(mask, cu)
    assert tokens.item() == 3 and seqs.item() == 2
    assert count_normalisers(mask)[1] is None



@pytest.mark.parametrize("lengths", [[9000, 0, 3, 12000], [1, 0, 5, 2047, 2048, 2049, 0, 700]])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_seq_count_kernel_matches_cumsum(lengths, mask_dtype, monkeypatch):
    """The Triton active-token count per sequence (one launch, several programs per long sequence
    adding into the same count) equals the exact cumsum path, with empty, fully masked and
    one-token sequences and lengths around the block size."""
    import kernels.grpo_loss as gl

    g = torch.Generator().manual_seed(sum(lengths))
    n = sum(lengths)
    mask = (torch.rand(n, generator=g) > 0.3).to(mask_dtype)
    cu = torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    if len(lengths) > 4:
        mask[cu[3]:cu[4]] = 0  # a fully masked sequence
    split = max(1, min(gl.CNT_MAX_SPLIT, n // (len(lengths) * 2 * gl.CNT_BLOCK)))
    assert (split > 1) == (len(lengths) == 4)  # the first case runs several programs per sequence
    got = gl._seq_active_counts(mask, cu)  # the kernel (TRITON_INTERPRET=1 in the tests)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    want = gl._seq_active_counts(mask, cu)  # the cumsum path
    assert got.dtype == want.dtype == torch.int32
    assert torch.equal(got, want)
    assert torch.equal(want, torch.stack([(mask[a:b] != 0).sum() for a, b in zip(cu[:-1], cu[1:])]).int())

# ----------------------------------------------------------------------------- hand-computed

# Two sequences, tokens t0 t1 | t2 t3 (t3 masked, with NaN inputs), clip_low 0.2, clip_high 0.28,
# dual clip c = 3, k3 KL with kl_coef 0.1, no entropy:
#   t0: r = 1,   A = +1: pg = -min(1*1, 1*1)           = -1     d pg/d logp = -A*r = -1
#       d = ref - logp = ln 2: k3 = e^d - d - 1 = 1 - ln 2 = 0.30685282, d k3/d logp = 1 - e^d = -1
#   t1: r = 1.5, A = +2: pg = -min(3, 1.28*2)          = -2.56  (clipped high: gradient 0)
#   t2: r = 4,   A = -1: pg = -min(-4, 0.8*-1) = 4 -> dual clip min(4, 3*1) = 3  (gradient 0)
# Per-token losses L = pg + 0.1*kl: L0 = -0.96931472, L1 = -2.56, L2 = 3; sum = -0.52931472.
# d L0 / d logp = -1 + 0.1*(-1) = -1.1; d L1 = d L2 = 0.
HAND = {
    # mode: (loss, weight of token 0 in the gradient)
    "token-mean": (-0.52931472 / 3, 1 / 3),                      # sum / 3 tokens
    "seq-mean-token-mean": (((-0.96931472 - 2.56) / 2 + 3) / 2, 1 / (2 * 2)),  # mean of seq means
    "seq-mean-token-sum": (-0.52931472 / 2, 1 / 2),              # sum / 2 sequences
    "seq-mean-token-sum-norm": (-0.52931472 / (2 * 4), 1 / 8),   # sum / (2 seqs * norm_const 4)
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_agg", MODES)
def test_hand_computed(loss_agg, impl):
    old = torch.tensor([-1.0, -2.0, -0.5, 0.0])
    logp = (old + torch.tensor([0.0, math.log(1.5), math.log(4.0), 0.0])).requires_grad_()
    ref = logp.detach() + torch.tensor([math.log(2.0), 0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, 2.0, -1.0, 5.0])
    mask = torch.tensor([True, True, True, False])
    with torch.no_grad():
        logp[3] = float("nan")
    ref[3] = float("nan")
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    loss, st = grpo_loss(logp, old, adv, mask, ref, clip_low=0.2, clip_high=0.28, clip_c=3.0,
                         kl_coef=0.1, kl_type="k3", loss_agg=loss_agg, cu_seqlens=cu, norm_const=4.0,
                         impl=impl)
    loss.backward()
    want_loss, w0 = HAND[loss_agg]
    assert math.isclose(loss.item(), want_loss, rel_tol=1e-6, abs_tol=1e-7)
    torch.testing.assert_close(logp.grad, torch.tensor([-1.1 * w0, 0.0, 0.0, 0.0]), rtol=1e-6, atol=1e-7)
    expect = {
        "clip_frac_low": 0.0, "clip_frac_high": 1 / 3, "dual_clip_frac": 1 / 3,
        "ratio_mean": (1 + 1.5 + 4) / 3, "kl_mean": 0.30685282 / 3,
        "approx_kl": 0.5 * (math.log(1.5) ** 2 + math.log(4.0) ** 2) / 3, "n_tokens": 3.0,
        "entropy_mean": 0.0, "entropy_loss": 0.0,
    }
    for k, v in expect.items():
        assert math.isclose(st[k].item(), v, rel_tol=1e-6, abs_tol=1e-7), (k, st[k].item(), v)
    parts = st["policy_loss"] + st["kl_loss"] + st["entropy_loss"]
    assert math.isclose(parts.item(), loss.item(), rel_tol=1e-6, abs_tol=1e-7)


# ------------------------------------------------------------------- micro-batch / rank invariance

def _split(batch, seq_ids):
    """The sub-batch made of whole sequences seq_ids (in order) and its token indices."""
    cu = batch["cu_seqlens"].long()
    idx = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in seq_ids])
    lens = torch.tensor([int(cu[i + 1] - cu[i]) for i in seq_ids])
    sub = {k: v[idx] for k, v in batch.items() if k != "cu_seqlens"}
    sub["cu_seqlens"] = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(torch.int32)
    return sub, idx


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_agg", MODES)
def test_split_invariance(loss_agg, impl):
    batch = make_batch(seed=11)
    nseq = batch["cu_seqlens"].numel() - 1
    kw = dict(kl_type="k3", clip="dual", loss_agg=loss_agg)
    whole_tokens, whole_seqs = count_normalisers(batch["mask"], batch["cu_seqlens"])
    whole = run(impl, batch, **kw, global_tokens=whole_tokens, global_seqs=whole_seqs)
    # with the global normalisers equal to the local counts, it is also the default
    default = run(impl, batch, **kw)
    torch.testing.assert_close(whole[0], default[0], rtol=0, atol=1e-7)

    rng = random.Random(f"{loss_agg}-{impl}")
    for trial in range(3):
        order = list(range(nseq))
        rng.shuffle(order)
        # 2 simulated ranks, each with a random number of micro-batches of whole sequences
        cut = rng.randint(1, nseq - 1)
        ranks = [order[:cut], order[cut:]]
        micro = []
        for seqs in ranks:
            k = rng.randint(1, min(3, len(seqs)))
            bounds = sorted(rng.sample(range(1, len(seqs)), k - 1)) if k > 1 else []
            micro += [seqs[a:b] for a, b in zip([0] + bounds, bounds + [len(seqs)])]
        subs = [_split(batch, m) for m in micro]
        # the normalisers: local counts summed over micro-batches (and "all-reduced" over ranks)
        counts = [count_normalisers(s["mask"], s["cu_seqlens"]) for s, _ in subs]
        g_tok = sum(c[0] for c in counts)
        g_seq = sum(c[1] for c in counts)
        assert g_tok == whole_tokens and g_seq == whole_seqs
        if trial == 1:  # python numbers work as well as device tensors
            g_tok, g_seq = int(g_tok), int(g_seq)
        loss = torch.zeros(())
        dlogp = torch.zeros_like(batch["logp"])
        dent = torch.zeros_like(batch["logp"])
        parts = dict.fromkeys(("policy_loss", "kl_loss", "entropy_loss"), 0.0)
        for s, idx in subs:
            l_, st, gl, ge = run(impl, s, **kw, global_tokens=g_tok, global_seqs=g_seq)
            loss += l_
            dlogp[idx] += gl
            dent[idx] += ge
            for k in parts:
                parts[k] = parts[k] + st[k]
        torch.testing.assert_close(loss, whole[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(dlogp, whole[2], rtol=0, atol=1e-6)
        torch.testing.assert_close(dent, whole[3], rtol=0, atol=1e-6)
        for k in parts:
            torch.testing.assert_close(parts[k], whole[1][k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ ahead-of-time compile

def test_aot_compile_sm90():
    """Every AOT_SPECS entry compiles for sm_90 with the real (non-interpreted) Triton."""
    code = (
        "import triton\n"
        "from triton.compiler import ASTSource\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from kernels.grpo_loss import AOT_SPECS\n"
        "for s in AOT_SPECS:\n"
        "    k = triton.compile(ASTSource(fn=s['fn'], signature=s['signature'], constexprs=s['constexprs']),\n"
        "                       target=GPUTarget('cuda', 90, 32),\n"
        "                       options=dict(num_warps=s['num_warps'], num_stages=s['num_stages']))\n"
        "    assert len(k.asm['cubin']) > 0, s['name']\n"
        "    print(s['name'], 'ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(" ok") == len(AOT_SPECS)
    assert {s["name"] for s in AOT_SPECS} >= {"grpo_finalize", "grpo_bwd"}


# ------------------------------------------------------------------------------------ benchmark

def test_bench_small_cpu(tmp_path):
    """The benchmark runs at a small size and writes a JSON with finite numbers."""
    import json

    from bench.bench_grpo_loss import main

    out = tmp_path / "grpo_loss-test.json"
    res = main(["--tokens", "1024", "--seq-len", "256", "--iters", "2", "--no-compile", "--out", str(out)])
    data = json.loads(out.read_text())
    for k in ("gpu", "torch", "triton", "git_commit", "tokens", "bytes_formula", "copy", "results"):
        assert k in data, k
    assert data["tokens"] == 1024 and math.isfinite(data["copy"]["gbps"])
    impls = {r["impl"] for r in data["results"]}
    assert "torch_eager" in impls and ("triton" in impls) == (os.environ.get("TRITON_INTERPRET") == "1"
                                                               or torch.cuda.is_available())
    for r in data["results"]:
        assert r["status"] == "ok", r
        for k in ("ms", "gbps", "pct_of_copy", "speedup_vs_eager", "loss_diff_vs_eager"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (r["impl"], k, r[k])
        assert r["loss_diff_vs_eager"] < 1e-5
    assert len(res["results"]) == len(data["results"])
