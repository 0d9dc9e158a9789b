"""The compiled Triton kernels on a GPU (bf16 included), against the plain-torch references.

Runs only on a CUDA machine with the interpreter off: `LWZ_TEST_INTERPRET=0 pytest
tests/test_kernels_cuda.py` (bench/device_check.sh does this). On CPU the same kernels are tested
under the Triton interpreter in test_logprob.py / test_grpo_loss.py."""

import math
import os

import pytest
import torch

from kernels.grpo_loss import grpo_loss
from kernels.logprob import backward_plan, fused_logprobs
from kernels.reference import grpo_loss_reference, logprobs_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA with compiled Triton kernels (LWZ_TEST_INTERPRET=0)")


def _grads(fn, x, w, t, temp, g_lp, g_en):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    lp, en = fn(x, w, t, temp)
    loss = (lp.double() * g_lp).sum() + (en.double() * g_en).sum()
    dx, dw = torch.autograd.grad(loss, (x, w))
    return [v.detach().double() for v in (lp, en, dx, dw)]


@pytest.mark.parametrize("scratch", [None, 8 << 20, 5 << 20, 256 << 10], ids=["default", "8mib", "5mib", "256kib"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,H,V", [(1, 80, 4099), (333, 128, 12289), (2050, 256, 32003)])
def test_logprob_kernel_vs_reference(dtype, N, H, V, scratch):
    """Backward plans (kernels.logprob._bwd_plan): the default budget walks once in one chunk at
    these sizes; 8 MiB walks once over several vocabulary chunks with the fp32 dX accumulator at
    N = 2050; 5 MiB and 256 KiB walk twice there (token groups for dX, each over vocabulary chunks
    into an fp32 accumulator, then vocabulary chunks over all tokens for dW)."""
    if N == 2050 and dtype != torch.float32:
        x = torch.empty(N, H, dtype=dtype, device="cuda")
        p = backward_plan(x, torch.empty(V, H, dtype=dtype, device="cuda"), scratch)
        assert (p.tc == N) == (scratch in (None, 8 << 20)) and (p.vc < V) == (scratch is not None), p
    _check_logprob(dtype, N, H, V, scratch)


@pytest.mark.parametrize("vcx", ["whole", 384], ids=["whole-vocab", "chunks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logprob_two_walk_dx_chunks(dtype, vcx, monkeypatch):
    """The two-walk backward's dX walk, fixed: 640-token groups (the last one short) each in one
    GEMM over the whole vocabulary, or over 384-column chunks (the last one short) into the fp32
    accumulator (bf16) or into dX itself (fp32)."""
    import kernels.logprob as lp

    N, H, V = 2050, 256, 32003
    monkeypatch.setattr(lp, "_bwd_plan", lambda N_, V_, *a: lp.BwdPlan(640, V_ if vcx == "whole" else vcx, 1024))
    _check_logprob(dtype, N, H, V, 1 << 20)


def test_logprob_lowmem_setting_stays_under_100mb():
    """The goal's shape, T=16k, H=5120, V=152064, bf16, at the benchmark's low-memory budget: its
    plan walks twice, everything fwd+bwd holds beyond its inputs and the dX / dW gradients stays
    under 10^8 bytes (the forward's statistics and upstream gradients included), and dX / dW
    match the default plan's (one walk) to bf16 rounding."""
    from bench.bench_logprob import LOW_SCRATCH

    T, H, V = 16384, 5120, 152064
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) / math.sqrt(H) * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (T,), device="cuda", generator=g)
    t[::17] = -100
    gl, ge = torch.randn(2, T, device="cuda", generator=g)
    assert backward_plan(x, w, LOW_SCRATCH).tc < T and backward_plan(x, w).tc == T
    grads = {}
    for name, scratch in (("lowmem", LOW_SCRATCH), ("default", None)):
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logp, ent = fused_logprobs(x, w, t, 0.8, return_entropy=True, impl="triton", bwd_scratch_bytes=scratch)
        ((logp * gl).sum() + (ent * ge).sum()).backward()
        del logp, ent
        torch.cuda.synchronize()
        beyond = torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * 2
        grads[name] = (x.grad.float(), w.grad.float(), beyond)
    assert grads["lowmem"][2] <= 100e6, f"{grads['lowmem'][2] / 1e6:.1f} MB beyond the gradients"
    for i, name in ((0, "dX"), (1, "dW")):
        a, b = grads["lowmem"][i], grads["default"][i]
        assert (a - b).abs().max().item() <= 2 ** -6 * b.abs().max().item(), name
    assert grads["default"][2] > 300e6  # the one walk's fp32 dX accumulator alone is 335 MB


@pytest.mark.parametrize("fwd,bwd", [("128x128x64:w8:s3:tma", "128x128x64:w8:s3:g8:tma"),
                                     ("128x256x64:w8:s3:tma", "128x128x64:w8:s4:g8:tma"),
                                     ("256x128x64:w8:s3:tma", "128x128x128:w8:s3:g8:tma"),
                                     ("256x128x64:w8:s3:tma:flat", "128x128x64:w8:s4:g8:tma:flat")])
@pytest.mark.parametrize("scratch", [None, 256 << 10], ids=["default", "256kib"])
@pytest.mark.parametrize("N,H,V", [(1, 80, 4099), (2050, 256, 32003)])
def test_logprob_tma_configs(fwd, bwd, N, H, V, scratch, monkeypatch):
    """The kernels reading hidden / weight through TMA tensor descriptors (the configs
    bench/tune_logprob.py tries, the flattened / persistent ":flat" ones too), bf16, in both
    backward walks (token-group views of hidden)."""
    import kernels.logprob as lp

    f0, b0 = lp.CONFIGS["default"]
    monkeypatch.setattr(lp, "CONFIGS", {"default": (lp.parse_config(fwd, f0), lp.parse_config(bwd, b0))})
    x = torch.empty(4, H, device="cuda", dtype=torch.bfloat16)
    assert lp._operands(x, x, lp.CONFIGS["default"][0])[2], "descriptors expected"
    _check_logprob(torch.bfloat16, N, H, V, scratch)


def _check_logprob(dtype, N, H, V, scratch):
    g = torch.Generator(device="cuda").manual_seed(N + V)
    x = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) / math.sqrt(H) * 3).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[1::5] = -100
    g_lp = torch.randn(N, device="cuda", dtype=torch.float64, generator=g)
    g_en = torch.randn(N, device="cuda", dtype=torch.float64, generator=g)
    temp = 0.8
    got = _grads(lambda *a: fused_logprobs(*a, return_entropy=True, impl="triton", bwd_scratch_bytes=scratch),
                 x, w, t, temp, g_lp, g_en)
    oracle = _grads(lambda *a: logprobs_reference(*a, compute_dtype=torch.float64), x.double(), w.double(), t,
                    temp, g_lp, g_en)
    same = _grads(lambda *a: logprobs_reference(*a, compute_dtype=dtype), x, w, t, temp, g_lp, g_en)
    for name, a, r, s in zip(["logp", "entropy", "d_hidden", "d_weight"], got, oracle, same):
        e_k, e_t = (a - r).abs().max().item(), (s - r).abs().max().item()
        assert torch.isfinite(a).all(), name
        assert e_k <= 2 * e_t + 1e-6 * (1 + r.abs().max().item()), f"{dtype} {name}: {e_k:.3g} vs torch {e_t:.3g}"
    assert (got[0][t == -100] == 0).all() and (got[0] <= 0).all()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl_type", [None, "k1", "k2", "k3"])
def test_grpo_loss_kernel_vs_reference(loss_agg, kl_type):
    g = torch.Generator(device="cuda").manual_seed(11)
    # long sequences spanning tiles, and a burst of 80 short/empty ones (more boundaries in one
    # 1024-token tile than the seq-mean walk takes before its binary-search fallback)
    lens = [1, 700, 33, 4096, 5] + [(7 * i) % 6 for i in range(80)] + [2999]
    N = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    logp = (-3 * torch.rand(N, device="cuda", generator=g)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(N, device="cuda", generator=g)
    ref = logp.detach() + 0.2 * torch.randn(N, device="cuda", generator=g)
    adv = torch.randn(N, device="cuda", generator=g)
    mask = torch.rand(N, device="cuda", generator=g) > 0.2
    mask[cu[2]:cu[3]] = False  # a fully masked sequence
    kw = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.0 if kl_type is None else 0.05,
              kl_type=kl_type or "k3", loss_agg=loss_agg, cu_seqlens=cu, norm_const=4096.0)
    r = ref if kl_type else None
    out, stats = grpo_loss(logp, old, adv, mask, r, impl="triton", **kw)
    (gk,) = torch.autograd.grad(out * 1.7, logp)
    want, wstats = grpo_loss_reference(logp, old, adv, mask, r, **kw)
    (gr,) = torch.autograd.grad(want * 1.7, logp)
    # fp64 oracle: the kernel's fp32 error may be at most twice plain torch's fp32 error (sums in a
    # different order differ by a few ulps of the largest partial sum, not of each element)
    lp64 = logp.detach().double().requires_grad_()
    o64, _ = grpo_loss_reference(lp64, old.double(), adv.double(), mask, r.double() if kl_type else None, **kw)
    (g64,) = torch.autograd.grad(o64 * 1.7, lp64)
    tiny = 1e-7 * g64.abs().max().item()
    assert (gk.double() - g64).abs().max() <= 2 * (gr.double() - g64).abs().max() + tiny
    assert abs(out.double() - o64).item() <= 2 * abs(want.double() - o64).item() + 1e-7 * abs(o64.item()) + 1e-12
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gk, gr, rtol=1e-3, atol=1e-9)
    for k in wstats:
        torch.testing.assert_close(stats[k].float(), wstats[k].float(), rtol=1e-4, atol=1e-6, msg=k)


# ---- decode attention (kernels/decode_attention.py) ---------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 6, 2, 12, 5, 200), (4, 7, 1, 48, 6, 130), (2, 2, 2, 128, 3, 257),
                                   (64, 12, 2, 128, 64, 14400), (1, 28, 4, 128, 1, 14400)])
def test_decode_attention_bf16(shape):
    """bf16 error vs fp64 no worse than twice masked SDPA's in bf16 (+1% of the output scale);
    Qwen2.5-1.5B/7B head layouts at a 14k context included."""
    from kernels.decode_attention import decode_attention_reference, decode_attention_triton
    from lwz.attention import _decode_sdpa
    B, Hq, Hkv, D, R, S = shape
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(R, S, Hkv, D, generator=g) * 2.0
    v = torch.randn(R, S, Hkv, D, generator=g)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    rows = torch.randperm(R, generator=g)[:B]
    scale = D ** -0.5
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, scale, rows=rows)
    q, k, v, lengths, rows = (t.cuda() for t in (q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths, rows))
    out = decode_attention_triton(q, k, v, lengths, scale, rows=rows, max_length=int(lengths.max()))
    torch_out = _decode_sdpa(q, k, v, lengths, scale, rows, int(lengths.max()))
    err = (out.double().cpu() - ref).abs().max().item()
    err_torch = (torch_out.double().cpu() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-2 * ref.abs().max().item(), (err, err_torch)
