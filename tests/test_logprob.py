"""kernels.logprob.fused_logprobs against the materialised fp64 reference, for both impls.

Triton runs under the interpreter on CPU machines (tests/conftest.py), in fp32/fp16 only (bf16
tl.dot is garbage in the interpreter). Error rule: |kernel - fp64| <= 2 x |torch same dtype - fp64|
+ a tiny absolute floor (for quantities that are exactly zero or exact in both)."""

import json
import math

import pytest
import torch

import kernels.logprob as lp_mod
from kernels.logprob import fused_logprobs
from kernels.reference import logprobs_reference

IMPLS = ["triton", "torch"]


def _make(N, H, V, dtype, seed=0, scale=1.0, mask_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g) * scale
    w = torch.randn(V, H, generator=g) / math.sqrt(H) * 3.0
    t = torch.randint(0, V, (N,), generator=g)
    if mask_every:
        t[1::mask_every] = -100
    return x.to(dtype), w.to(dtype), t


def _run(fn, x, w, t, temp, g_lp, g_en):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    logp, ent = fn(x, w, t, temp)
    loss = 0.0
    if g_lp is not None:
        loss = loss + (logp.double() * g_lp).sum()
    if g_en is not None:
        loss = loss + (ent.double() * g_en).sum()
    dx, dw = torch.autograd.grad(loss, (x, w))
    return logp.detach().double(), ent.detach().double(), dx.double(), dw.double()


def _kernel(impl):
    return lambda x, w, t, temp: fused_logprobs(x, w, t, temp, return_entropy=True, impl=impl)


def _ref(dtype):
    return lambda x, w, t, temp: logprobs_reference(x, w, t, temp, compute_dtype=dtype)


def _err(a, b):
    return (a - b).abs().max().item()


def _small_chunks(monkeypatch, walk):
    """Several backward chunks, the last one narrower. The Triton backward walks
      "1pass":     vocabulary chunks of BLOCK_V with the fp32 [N, H] dX accumulator;
      "2pass":     token chunks of BLOCK_T for dX, each one GEMM over the whole vocabulary, then
                   vocabulary chunks of BLOCK_V for dW;
      "2pass-acc": the same, but each token chunk's dX sums vocabulary blocks of 2 BLOCK_V in an
                   fp32 [BLOCK_T, H] accumulator (dX itself for fp32);
      "groups":    the one walk per token group of BLOCK_T rows (exact_dw False), dW added up over
                   the groups in its dtype.
    The torch path takes several token chunks."""
    def plan(N, V, elem, acc_row, block_t, block_v, budget, exact_dw=True):
        if walk in ("1pass", "groups"):
            return 1, (N if walk == "1pass" else block_t), V, block_v
        return 2, block_t, (V if walk == "2pass" else 2 * block_v), block_v

    monkeypatch.setattr(lp_mod, "_bwd_plan", plan)
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_ELEMS", 40_000)


CASES = [  # (N, H, V, temperature, grads) -- covers N {1, 97, 333}, H {48, 80}, V {1237, 4099}
    (1, 80, 4099, 1.3, "both"),
    (97, 48, 1237, 0.7, "logp"),
    (333, 80, 1237, 1.0, "entropy"),
    (97, 80, 4099, 0.7, "both"),
    (333, 48, 4099, 1.3, "both"),
]


# fp16 runs on every shape but the largest (covered by the smaller ones; interpreter time)
DTYPE_CASES = [pytest.param(dt, *c, id=f"{name}-{'-'.join(map(str, c))}") for c in CASES
               for dt, name in ((torch.float32, "fp32"), (torch.float16, "fp16"))
               if not (dt == torch.float16 and c[0] == 333 and c[2] == 4099)]


@pytest.mark.parametrize("impl,walk,tma", [("triton", "1pass", False), ("triton", "2pass-acc", False),
                                           ("triton", "2pass", True), ("triton", "2pass-acc", "flat"),
                                           ("triton", "groups", False), ("torch", "1pass", False)],
                         ids=["triton-1pass", "triton-2pass-acc", "triton-2pass-tma", "triton-2pass-acc-tma-flat",
                              "triton-groups", "torch"])
@pytest.mark.parametrize("dtype,N,H,V,temp,grads", DTYPE_CASES)
def test_matches_fp64_reference(impl, walk, tma, dtype, N, H, V, temp, grads, monkeypatch):
    """tma: the kernels read hidden and weight through tensor descriptors (out-of-bounds rows and
    columns zero-filled by the descriptor instead of masked loads; in the backward the columns past
    a vocabulary chunk read real weights and must be masked out). "flat": the FLAT configs too (the
    forward's vocab loop written for flattening; the backward's persistent programs, 3 here, each
    walking several tiles of a chunk)."""
    _small_chunks(monkeypatch, walk)
    if tma:
        assert lp_mod._cfg(torch.device("cpu"), dtype)["TMA"] is False
        flat = tma == "flat"
        monkeypatch.setattr(lp_mod, "INTERP_CONFIG", dict(lp_mod.INTERP_CONFIG, TMA=True, FLAT=flat))
        monkeypatch.setattr(lp_mod, "INTERP_BWD_CONFIG", dict(lp_mod.INTERP_BWD_CONFIG, TMA=True, FLAT=flat))
        x0, w0, _ = _make(3, H, 5, dtype)
        assert lp_mod._operands(x0, w0, lp_mod.INTERP_CONFIG)[2], "descriptors expected"
    x, w, t = _make(N, H, V, dtype, seed=N + V)
    gen = torch.Generator().manual_seed(1)
    g_lp = torch.randn(N, generator=gen, dtype=torch.float64) if grads in ("logp", "both") else None
    g_en = torch.randn(N, generator=gen, dtype=torch.float64) if grads in ("entropy", "both") else None

    got = _run(_kernel(impl), x, w, t, temp, g_lp, g_en)
    ref = _run(_ref(torch.float64), x.double(), w.double(), t, temp, g_lp, g_en)
    same = _run(_ref(dtype), x, w, t, temp, g_lp, g_en)  # plain torch in the same dtype
    names = ["logp", "entropy", "d_hidden", "d_weight"]
    floor = 1e-7 if dtype == torch.float32 else 1e-5
    for name, a, r, s in zip(names, got, ref, same):
        e_k, e_t = _err(a, r), _err(s, r)
        scale = 1.0 + r.abs().max().item()
        assert e_k <= 2 * e_t + floor * scale, f"{impl} {name}: err {e_k:.3g} vs torch {e_t:.3g}"
        assert torch.isfinite(a).all()

    logp, ent, dx, _ = got
    masked = t == -100
    assert (logp[masked] == 0).all() and (ent[masked] == 0).all()
    assert (dx[masked] == 0).all(), "ignored rows must get no gradient"
    assert (logp <= 0).all()
    assert (ent >= -1e-6).all() and (ent <= math.log(V) + 1e-4).all()


def test_bwd_plan_stays_within_budget(monkeypatch):
    """The backward's scratch plan: one walk with the fp32 dX accumulator while it and a chunk of
    >= ONE_PASS_MIN_VC columns fit the budget, else two walks whose chunks each fit it; the dX
    walk takes long token chunks over vocabulary blocks when whole-vocabulary chunks get short."""
    plan = lp_mod._bwd_plan
    N, H, V, bf16 = 16384, 5120, 152064, 2
    row = H * 4  # fp32 dX accumulator bytes per token
    assert plan(N, V, bf16, row, 128, 128, 1 << 30) == (1, N, V, 16384)  # 1 GiB at 16k: chunk capped at 512 MiB
    passes, _, _, vc = plan(2 * N, V, bf16, row, 128, 128, 1 << 30)  # 32k: what the budget leaves
    assert passes == 1 and vc % 128 == 0 and 2 * N * row + 2 * N * vc * bf16 <= 1 << 30 \
        < 2 * N * row + 2 * N * (vc + 128) * bf16
    for budget in (96 << 20, N * row):  # under 100 MB; the one-walk accumulator alone
        passes, tc, vcx, vc = plan(N, V, bf16, row, 128, 128, budget)
        assert passes == 2 and tc % 128 == 0 and vcx % 128 == 0 and vc % 128 == 0
        assert tc * (vcx * bf16 + row) <= budget and N * vc * bf16 <= budget and vc >= 128
        whole_vocab_tc = budget // (V * bf16) // 128 * 128  # 256 tokens at 96 MiB
        assert vcx < V and tc >= 4 * whole_vocab_tc, (budget, tc, vcx)
    # 96 MiB at 16k: 2688-token chunks over 8192-column blocks (52.5 MiB accumulator + 42 MiB of dA)
    assert plan(N, V, bf16, row, 128, 128, 96 << 20) == (2, 2688, 8192, 3072)
    assert plan(4 * N, V, bf16, row, 128, 128, 1 << 30)[0] == 2  # 64k tokens: acc = 1.25 GiB
    assert plan(N, V, 4, 0, 64, 128, 96 << 20)[0] == 1  # fp32 hidden: dX is its own accumulator
    # a budget a single block exceeds: the smallest footprint (one block per chunk, <= N rows)
    assert plan(3, 1237, 4, 0, 64, 256, 1) == (2, 3, 256, 256)
    assert plan(3, 1237, 4, 0, 64, 256, 1 << 30) == (1, 3, 1237, 1237)  # everything in one chunk
    # DX_BLOCK (LWZ_LOGPROB_DX_BLOCK, what the tuning exports) fixes the dX width; >= V: whole vocabulary
    monkeypatch.setattr(lp_mod, "DX_BLOCK", 4096)
    tc, _ = lp_mod.dx_chunk_tokens(4096, N, V, bf16, row, 128, 88 << 20)
    assert plan(N, V, bf16, row, 128, 128, 88 << 20) == (2, tc, 4096, 2816) and tc == 3200
    monkeypatch.setattr(lp_mod, "DX_BLOCK", 1 << 40)
    assert plan(N, V, bf16, row, 128, 128, 88 << 20) == (2, 256, V, 2816)
    assert plan(N, V, bf16, row, 128, 128, 1 << 30)[0] == 1  # the one-walk plan is not affected
    # exact_dw False: one walk per token group instead of two walks (dW added up over the groups)
    monkeypatch.setattr(lp_mod, "DX_BLOCK", 0)
    for budget in (88 << 20, 24 << 20):
        passes, tg, vcx, vc = plan(N, V, bf16, row, 128, 128, budget, False)
        assert passes == 1 and vcx == V and tg < N and tg % 128 == 0 and vc % 128 == 0
        assert tg * (row + vc * bf16) <= budget, (budget, tg, vc)
    assert plan(N, V, bf16, row, 128, 128, 88 << 20, False) == (1, 2432, V, 8192)  # 7 groups at 16k
    assert plan(N, V, bf16, row, 128, 128, 1 << 30, False) == plan(N, V, bf16, row, 128, 128, 1 << 30)


@pytest.mark.parametrize("budget,passes,exact_dw", [(48 << 10, 2, True), (48 << 10, 1, False), (1 << 30, 1, True)],
                         ids=["2pass", "groups", "1pass"])
def test_scratch_budget_walks(budget, passes, exact_dw, monkeypatch):
    """The real plan at a budget that forces two walks over several uneven chunks of tokens and
    vocabulary (fp16: the one-pass walk would need an fp32 dX accumulator; the dX walk sums
    vocabulary blocks in its [tc, H] accumulator), the same budget with exact_dw False (one walk
    per token group, dW added up over the groups in fp16), and at one that takes a single chunk:
    all match the fp64 reference like plain fp16 torch. (The whole-vocabulary dX chunks of the
    two-walk plan win only at vocabularies small next to the budget; tested with a fixed plan in
    test_matches_fp64_reference.)"""
    N, H, V, temp = 333, 48, 4099, 0.9
    seen = []
    real = lp_mod._bwd_plan
    monkeypatch.setattr(lp_mod, "_bwd_plan", lambda *a: seen.append(real(*a)) or seen[-1])
    x, w, t = _make(N, H, V, torch.float16, seed=9)
    gen = torch.Generator().manual_seed(2)
    g_lp, g_en = (torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(2))
    fn = lambda x, w, t, temp: fused_logprobs(x, w, t, temp, True, impl="triton",  # noqa: E731
                                              bwd_scratch_bytes=budget, exact_dw=exact_dw)
    got = _run(fn, x, w, t, temp, g_lp, g_en)
    assert seen and seen[0][0] == passes, seen
    _, tc, vcx, vc = seen[0]
    if passes == 2:
        assert N % tc and tc < N and V % vc and vc < V and V % vcx and vcx < V, seen[0]
    if not exact_dw:  # several token groups, the last one short
        assert N % tc and tc < N and V % vc and vc < V and vcx == V, seen[0]
    ref = _run(_ref(torch.float64), x.double(), w.double(), t, temp, g_lp, g_en)
    same = _run(_ref(torch.float16), x, w, t, temp, g_lp, g_en)
    for name, a, r, s in zip(["d_hidden", "d_weight"], got[2:], ref[2:], same[2:]):
        e_k, e_t = _err(a, r), _err(s, r)
        assert e_k <= 2 * e_t + 1e-5 * (1.0 + r.abs().max().item()), f"{name}: {e_k:.3g} vs torch {e_t:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_half_gemms(dtype, monkeypatch):
    """The torch backward as it runs on a GPU with half inputs (dA rounded to the input dtype, GEMMs
    with fp32 accumulation), forced on the CPU: within twice plain torch's error in that dtype."""
    monkeypatch.setattr(lp_mod, "_half_gemms", lambda h: h.dtype in (torch.float16, torch.bfloat16))
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_ELEMS", 40_000)  # several vocabulary chunks
    seen, real_acc_mm = [], lp_mod._acc_mm
    monkeypatch.setattr(lp_mod, "_acc_mm", lambda out, a, b: seen.append(a.dtype) or real_acc_mm(out, a, b))
    N, H, V, temp = 97, 48, 1237, 0.9
    x, w, t = _make(N, H, V, dtype, seed=5)
    gen = torch.Generator().manual_seed(3)
    g_lp, g_en = (torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(2))
    got = _run(_kernel("torch"), x, w, t, temp, g_lp, g_en)
    ref = _run(_ref(torch.float64), x.double(), w.double(), t, temp, g_lp, g_en)
    same = _run(_ref(dtype), x, w, t, temp, g_lp, g_en)
    for name, a, r, s in zip(["d_hidden", "d_weight"], got[2:], ref[2:], same[2:]):
        e_k, e_t = _err(a, r), _err(s, r)
        assert e_k <= 2 * e_t, f"{name}: {e_k:.3g} vs torch {e_t:.3g}"
    assert seen and all(dt == dtype for dt in seen)  # dX went through the half-input GEMM per chunk


def test_compiled_torch_chunks_trace_whole(monkeypatch):
    """compile_torch_chunks (the benchmark's torch.compile baseline): each chunk body traces as one
    graph (fullgraph: no graph break), the vocabulary offset does not force a recompile per chunk,
    and the results equal the eager torch path's."""
    import torch._dynamo

    monkeypatch.setattr(lp_mod, "_fwd_chunk", lp_mod._fwd_chunk)  # restored after the test
    monkeypatch.setattr(lp_mod, "_dA_chunk", lp_mod._dA_chunk)
    monkeypatch.setattr(lp_mod, "TORCH_CHUNK_ELEMS", 40_000)
    N, H, V = 97, 48, 1237
    x, w, t = _make(N, H, V, torch.float32, seed=4)
    g = torch.randn(N, dtype=torch.float64)
    want = _run(_kernel("torch"), x, w, t, 0.9, g, g)
    torch._dynamo.reset()
    lp_mod.compile_torch_chunks(backend="aot_eager", fullgraph=True, dynamic=False)
    got = _run(_kernel("torch"), x, w, t, 0.9, g, g)
    for a, b in zip(got, want):  # fp32 round-off of the traced decompositions
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # 97 rows in chunks of 32 (+1) and 1237 columns in chunks of 412 (+1): two shapes each
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list
    frames = [len(entries(fn._torchdynamo_orig_callable.__code__)) for fn in (lp_mod._fwd_chunk, lp_mod._dA_chunk)]
    assert frames == [2, 2], frames
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_do_not_touch_weight_grad(impl):
    N, H, V = 97, 48, 1237
    x, w, t = _make(N, H, V, torch.float32, seed=3, mask_every=3)
    g = torch.randn(N, dtype=torch.float64)
    g2 = g.clone()
    g2[t == -100] = 1e6  # upstream grads of ignored rows must be dropped entirely
    a = _run(_kernel(impl), x, w, t, 1.0, g, g)
    b = _run(_kernel(impl), x, w, t, 1.0, g2, g2)
    assert torch.equal(a[3], b[3]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked(impl):
    x, w, t = _make(7, 48, 1237, torch.float32)
    t[:] = -100
    x.requires_grad_()
    w.requires_grad_()
    logp, ent = fused_logprobs(x, w, t, 1.0, True, impl=impl)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", [1e2, 1e4, -1e4])
def test_shift_invariance(impl, c):
    """Append a feature 1 to hidden and a column c to weight: every logit shifts by c/tau, and
    log-probs / entropy must not change. Compared in fp32 against the fp64 reference of the same
    shifted inputs (2x torch fp32), and against the unshifted fp64 values within what fp32 can
    represent at |z| ~ c (a few ulps of c)."""
    N, H, V, temp = 97, 48, 1237, 0.7
    x, w, t = _make(N, H, V, torch.float32, seed=5)
    xs = torch.cat([x, torch.ones(N, 1)], 1)
    ws = torch.cat([w, torch.full((V, 1), c)], 1)
    g = torch.randn(N, dtype=torch.float64)
    got = _run(_kernel(impl), xs, ws, t, temp, g, g)
    ref = _run(_ref(torch.float64), xs.double(), ws.double(), t, temp, g, g)
    same = _run(_ref(torch.float32), xs, ws, t, temp, g, g)
    base = _run(_ref(torch.float64), x.double(), w.double(), t, temp, g, g)
    ulp_c = abs(c) / temp * 2.0 ** -23
    for i, name in enumerate(["logp", "entropy", "d_hidden"]):
        e_k, e_t = _err(got[i], ref[i]), _err(same[i], ref[i])
        assert e_k <= 2 * e_t + 1e-6, f"{name}: {e_k:.3g} vs torch {e_t:.3g}"
        assert _err(got[i][:, :H] if i == 2 else got[i], base[i][:, :H] if i == 2 else base[i]) \
            <= 64 * ulp_c * (1 + base[i].abs().max().item()) + 1e-5, name
    assert (got[0] <= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_and_confident_logits(impl):
    """Huge logits (|z| ~ 1e4, p_target ~ 1 on some rows) give no NaN/inf, logp <= 0, and the
    true-class gradient (1 - p, cancellation-prone) still matches fp64 to 2x torch fp32."""
    N, H, V = 97, 48, 1237
    x, w, t = _make(N, H, V, torch.float32, seed=7)
    w = w * 300.0
    conf = torch.arange(0, N, 4)  # confident rows: hidden aligned with the target's weight row
    ok = t[conf] != -100
    conf = conf[ok]
    x[conf] = w[t[conf]] / w[t[conf]].norm(dim=1, keepdim=True) * 0.05
    g = torch.randn(N, dtype=torch.float64)
    got = _run(_kernel(impl), x, w, t, 1.0, g, g)
    ref = _run(_ref(torch.float64), x.double(), w.double(), t, 1.0, g, g)
    same = _run(_ref(torch.float32), x, w, t, 1.0, g, g)
    for a in got:
        assert torch.isfinite(a).all()
    assert (got[0] <= 0).all()
    assert (ref[0][conf].exp() > 0.999).any(), "test needs confident rows"
    for i, name in enumerate(["logp", "entropy", "d_hidden", "d_weight"]):
        e_k, e_t = _err(got[i], ref[i]), _err(same[i], ref[i])
        assert e_k <= 2 * e_t + 1e-6 * (1 + ref[i].abs().max().item()), f"{name}: {e_k:.3g} vs {e_t:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_saves_nothing_of_size_NxV(impl):
    N, H, V = 97, 48, 1237
    x, w, t = _make(N, H, V, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    sizes = []

    def pack(tensor):
        sizes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda z: z):
        logp, ent = fused_logprobs(x, w, t, 0.9, True, impl=impl)
    assert sizes, "expected saved tensors"
    for s in sizes:
        assert math.prod(s) < N * V, f"saved tensor of shape {s} is as big as the logits"
    (logp.sum() + ent.sum()).backward()
    assert x.grad is not None and w.grad is not None


def test_no_grad_paths_and_auto():
    x, w, t = _make(33, 48, 1237, torch.float32)
    with torch.no_grad():
        a, e = fused_logprobs(x, w, t)  # auto -> torch on CPU
        assert e is None and a.dtype == torch.float32 and a.shape == (33,)
    # gradient for weight only (hidden frozen), and N = 0
    wr = w.clone().requires_grad_()
    lp_, _ = fused_logprobs(x, wr, t, impl="triton")
    lp_.sum().backward()
    assert wr.grad is not None and torch.isfinite(wr.grad).all()
    for impl in IMPLS:
        z, ze = fused_logprobs(x[:0], w, t[:0], return_entropy=True, impl=impl)
        assert z.shape == (0,) and ze.shape == (0,)


@pytest.mark.parametrize("bad,msg", [
    (dict(hidden=torch.zeros(4, 8, 2)), "hidden must be a 2-D"),
    (dict(weight=torch.zeros(10, 9)), "hidden sizes must match"),
    (dict(targets=torch.zeros(4, dtype=torch.int32)), "int64"),
    (dict(targets=torch.zeros(5, dtype=torch.int64)), "targets must be"),
    (dict(targets=torch.tensor([0, 1, 10, 2])), "outside"),
    (dict(weight=torch.zeros(10, 8, dtype=torch.float16)), "same dtype"),
    (dict(temperature=0.0), "temperature"),
    (dict(impl="cuda"), "impl must be"),
    (dict(weight=torch.zeros(8, 10).t()), "contiguous"),
    (dict(bwd_scratch_bytes=-1), "bwd_scratch_bytes must be an int >= 0"),
    (dict(exact_dw="no"), "exact_dw must be True or False"),
])
def test_clear_errors(bad, msg):
    args = dict(hidden=torch.zeros(4, 8), weight=torch.zeros(10, 8),
                targets=torch.tensor([0, 1, -100, 9]), temperature=1.0, impl="triton")
    args.update(bad)
    with pytest.raises(ValueError, match=msg):
        fused_logprobs(args["hidden"], args["weight"], args["targets"], args["temperature"],
                       impl=args["impl"], bwd_scratch_bytes=args.get("bwd_scratch_bytes"),
                       exact_dw=args.get("exact_dw", True))


def test_cpu_bench_writes_json(tmp_path):
    from bench import bench_logprob

    out = tmp_path / "logprob-cpu.json"
    res = bench_logprob.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert res == data
    for k in ("device", "torch", "triton", "git_commit", "results"):
        assert k in data, k
    assert data["results"]
    for row in data["results"]:
        for k in ("T", "H", "V", "impl", "fwd_s", "fwd_bwd_s"):
            assert k in row, k
        for k in ("fwd_s", "fwd_bwd_s", "max_abs_err_logp"):
            assert math.isfinite(row[k]) and row[k] >= 0, (k, row)
        assert row["rel_err_dx"] < 1e-5 and row["rel_err_dw"] < 1e-5, row  # fp32 vs the fp64 reference


def test_bench_grad_errors_catch_a_wrong_backward():
    """The bench's gradient check of each implementation: near zero for the fused kernel; large for
    a backward that scales every row by the first row's upstream gradient (the bug Liger's FLCE
    with reduction="none" had before its PR #1298), and for one that drops the entropy term."""
    from bench.bench_logprob import _inputs, grad_errors

    x, w, t, gl, ge = _inputs(96, 48, 1237, torch.float32, "cpu", seed=4)
    good = lambda a, b, c: fused_logprobs(a, b, c, 0.8, return_entropy=True, impl="torch")  # noqa: E731
    assert max(grad_errors(good, x, w, t, gl, ge, 0.8, 64)) < 1e-5

    class FirstRowScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            return g[:1].expand_as(g).clone()

    def buggy(a, b, c):
        lp, _ = fused_logprobs(a, b, c, 0.8, impl="torch")
        return FirstRowScale.apply(lp), None

    assert min(grad_errors(buggy, x, w, t, gl, ge, 0.8, 64)) > 0.1

    def no_entropy_grad(a, b, c):
        lp, en = fused_logprobs(a, b, c, 0.8, return_entropy=True, impl="torch")
        return lp, en.detach()

    assert min(grad_errors(no_entropy_grad, x, w, t, gl, ge, 0.8, 64)) > 0.01


def test_gpu_bench_headline_and_impl_filter(tmp_path, monkeypatch):
    """The CUDA report path without a GPU (run_cuda replaced by rows of the shape it returns): the
    headline takes our kernel at the largest size and its ratios to the baselines of that size;
    --impls reaches run_cuda; an unknown name there is one clear line."""
    from bench import bench_logprob as bl

    def row(T, impl, fb_ms, pct, mib):
        return dict(T=T, H=5120, V=152064, dtype="bf16", impl=impl, fwd_ms=fb_ms / 3, fwd_bwd_ms=fb_ms,
                    fwd_s=fb_ms / 3e3, fwd_bwd_s=fb_ms / 1e3, tflops_fwd=1.0, tflops_fwd_bwd=1.0,
                    pct_matmul_fwd_bwd=pct, peak_extra_gib=1.0, peak_beyond_grads_mib=mib, max_abs_err_logp=1e-4)

    seen = {}

    def fake_run_cuda(sizes, quick, compile_torch=True, on_size=None, only=None):
        seen.update(sizes=sizes, only=only, compile_torch=compile_torch)
        return [row(4096, "triton", 50.0, 60.0, 300.0), row(16384, "triton", 200.0, 65.0, 830.0),
                row(16384, "triton_lowmem", 250.0, 52.0, 90.0), row(16384, "triton_lowmem_whole_vocab", 300.0, 43.0, 90.0),
                row(16384, "triton_lowmem_groups", 210.0, 62.0, 89.0),
                row(16384, "torch_chunked_compiled", 400.0, 32.5, 700.0),
                dict(T=16384, impl="torch_eager", skipped="would OOM")]

    monkeypatch.setattr(bl.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bl.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    real_run_cuda = bl.run_cuda
    monkeypatch.setattr(bl, "run_cuda", fake_run_cuda)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    res = bl.main(["--sizes", "4096,16384", "--impls", "triton,torch_chunked_compiled", "--out", str(tmp_path / "x.json")])
    assert seen == dict(sizes=[4096, 16384], only=["triton", "torch_chunked_compiled"], compile_torch=True)
    h = res["headline"]
    assert h["pct_matmul_fwd_bwd"] == 65.0 and h["beyond_grads_mib"] == 830.0
    assert h["pct_matmul_fwd_bwd_lowmem"] == 52.0 and h["beyond_grads_mb_lowmem"] == pytest.approx(94.37, abs=0.01)
    assert h["speedup_vs_torch_chunked_compiled"] == pytest.approx(2.0) and "speedup_vs_liger_flce" not in h
    assert h["speedup_lowmem_vs_whole_vocab"] == pytest.approx(1.2)
    assert h["pct_matmul_fwd_bwd_lowmem_groups"] == 62.0 and h["beyond_grads_mb_lowmem_groups"] == pytest.approx(93.32, abs=0.01)
    with pytest.raises(SystemExit, match="--impls nope not available here"):  # checked before any GPU work
        real_run_cuda([16], True, only=["nope", "triton"])


def test_backward_plan_and_its_bench_text():
    """backward_plan is the plan triton_backward walks (fp32 dA off the GPU, so elem = 4 here),
    and the bench's words for it name each walk's chunks."""
    from bench.bench_logprob import _plan_text

    x = torch.empty(2000, 64, dtype=torch.float16, device="meta")
    w = torch.empty(5000, 64, dtype=torch.float16, device="meta")
    c = lp_mod._cfg(torch.device("cpu"), torch.float16, bwd=True)
    for budget, need_dx in ((1 << 30, True), (1 << 20, True), (1 << 20, False)):
        assert lp_mod.backward_plan(x, w, budget, need_dx) == \
            lp_mod._bwd_plan(2000, 5000, 4, 64 * 4 if need_dx else 0, c["BLOCK_T"], c["BLOCK_V"], budget)
    assert _plan_text((1, 16384, 152064, 16384), 16384, 152064) == \
        "one walk: vocabulary chunks of 16384 with the fp32 dX accumulator"
    assert _plan_text((2, 2688, 8192, 3072), 16384, 152064) == ("two walks: dX in 2688-token chunks over 8192-column "
                                                         "blocks (fp32 [2688, H] accumulator); dW in vocabulary chunks of 3072")
    assert "256-token chunks over the whole vocabulary" in _plan_text((2, 256, 152064, 3072), 16384, 152064)
    assert _plan_text((1, 2432, 152064, 8192), 16384, 152064).startswith("one walk per 2432-token group (7 groups)")
    # the bench's comparison row: its settings hold while it runs (plan included) and are restored
    from bench import bench_logprob as bl

    assert lp_mod.DX_BLOCK == 0
    big_x = torch.empty(16384, 5120, dtype=torch.float16, device="meta")
    big_w = torch.empty(152064, 5120, dtype=torch.float16, device="meta")
    with bl._settings("triton_lowmem_whole_vocab"):
        assert lp_mod.DX_BLOCK >= 152064
        whole = lp_mod.backward_plan(big_x, big_w, bl.LOW_SCRATCH)
    assert lp_mod.DX_BLOCK == 0
    assert whole[0] == 2 and whole[2] == 152064 and lp_mod.backward_plan(big_x, big_w, bl.LOW_SCRATCH)[2] < 152064
    assert bl._with_settings("triton_lowmem_whole_vocab", lambda: lp_mod.DX_BLOCK)() >= 152064


def test_gpu_bench_loop_on_cpu(monkeypatch):
    """run_cuda's loop itself (plans, per-row settings, gradient checks, memory and timing fields)
    on the CPU under the interpreter at a tiny fp16 shape, CUDA calls replaced by stand-ins: what
    the GPU run does besides timing, checked before any device time is spent on it."""
    import triton.testing

    from bench import bench_logprob as bl

    for fn in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(bl.torch.cuda, fn, lambda *a, **k: None)
    monkeypatch.setattr(bl.torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(bl.torch.cuda, "max_memory_allocated", lambda *a: 3 << 20)
    monkeypatch.setattr(bl.torch.cuda, "mem_get_info", lambda *a: (1 << 40, 1 << 40))
    monkeypatch.setattr(bl, "matmul_seconds", lambda n: 1.0)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, rep, return_mode: (fn(), 2.0)[1])
    seen = []
    real = lp_mod._bwd_plan
    monkeypatch.setattr(lp_mod, "_bwd_plan", lambda *a: seen.append((lp_mod.DX_BLOCK == 0, real(*a))) or seen[-1][1])
    low = 100_000  # two walks at this shape: dX over 256-column blocks, or whole-vocabulary 64-token chunks
    monkeypatch.setattr(bl, "TRITON_ROWS", {name: dict(spec, scratch=spec["scratch"] and low)
                                            for name, spec in bl.TRITON_ROWS.items()})
    rows = bl.run_cuda([70], quick=True, compile_torch=False, device="cpu", H=48, V=1237, dtype=torch.float16)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"triton", "triton_lowmem", "triton_lowmem_groups", "triton_lowmem_whole_vocab",
                       "torch_eager"}, list(by)
    for r in rows:
        assert "skipped" not in r and "grad_err_error" not in r, r
        assert r["dtype"] == "fp16" and r["fwd_ms"] == 2.0 and r["peak_beyond_grads_mib"] < 3
        assert r["rel_err_dx"] < 1e-2 and r["rel_err_dw"] < 1e-2 and r["max_abs_err_logp"] < 1e-2, r
    assert by["triton"]["bwd_plan"].startswith("one walk")
    assert "blocks" in by["triton_lowmem"]["bwd_plan"] and "whole vocabulary" in by["triton_lowmem_whole_vocab"]["bwd_plan"]
    assert by["triton_lowmem_groups"]["bwd_plan"].startswith("one walk per 64-token group (2 groups)")
    # the whole-vocabulary row's backward ran with the blocks off, the others with them on
    assert (False, (2, 64, 1237, 256)) in seen and (True, (2, 64, 256, 256)) in seen
    assert lp_mod.DX_BLOCK == 0


def test_parse_config_round_trip_and_errors():
    base = dict(lp_mod.GPU_BWD_CONFIG)
    c = lp_mod.parse_config("128x256x64:w8:s4:g4:tma", base)
    assert (c["BLOCK_T"], c["BLOCK_V"], c["BLOCK_H"], c["num_warps"], c["num_stages"], c["GROUP_T"], c["TMA"]) == \
        (128, 256, 64, 8, 4, 4, True)
    assert lp_mod.parse_config(lp_mod.format_config(c), base) == c
    assert lp_mod.parse_config("64x64x32", base)["num_warps"] == base["num_warps"]  # the rest from base
    flat = lp_mod.parse_config("128x128x64:w8:s4:g8:tma:flat", base)
    assert flat["FLAT"] and c["FLAT"] is False and lp_mod.format_config(flat) == "128x128x64:w8:s4:g8:tma:flat"
    assert lp_mod.parse_config("128x128x64:tma", flat)["FLAT"] is False  # the loop form is not inherited
    for bad in ("128x256", "128x100x64", "128x128x64:q3", "8x8x8", "64x64x64:w3", "64x64x64:s0", "64x64x64:g0"):
        with pytest.raises(ValueError, match="LWZ_LOGPROB_FWD_CONFIG=.*expected BTxBVxBH"):
            lp_mod.parse_config(bad, base, "LWZ_LOGPROB_FWD_CONFIG")


def test_tune_flow_under_interpreter(tmp_path, monkeypatch):
    """bench/tune_logprob.py end to end on a tiny shape (interpreter, fp16): every config is checked
    against the oracle and the baseline, the fastest correct pair goes to the env file in the form
    the kernels read back, and a config that fails is reported, not chosen."""
    from bench import tune_logprob

    out, env = tmp_path / "tune.json", tmp_path / "tune.env"
    interp_before = dict(lp_mod.INTERP_CONFIG)

    def fake_time(fn, *a, **k):  # the interpreter's clock means nothing: 128-column dX blocks win
        fn()
        forced = lp_mod._bwd_plan() if lp_mod._bwd_plan.__name__ == "<lambda>" else None
        return 0.002 if forced and forced[2] == 128 else 0.003

    monkeypatch.setattr(tune_logprob, "time_call", fake_time)
    tune_logprob.main(["--tokens", "70", "--hidden", "48", "--vocab", "300", "--out", str(out), "--env", str(env),
                       "--fwd", "64x256x64:w4:s1:ptr;64x128x64:w4:s1:tma;64x128x16:w4:s1:ptr",
                       "--bwd", "64x256x64:w4:s1:g2:ptr;64x128x32:w4:s1:g2:tma",
                       "--lowmem-bytes", "60000", "--dx-blocks", "128,200"])
    data = json.loads(out.read_text())
    assert data["complete"] and [r["step"] for r in data["rows"]] == \
        ["fwd"] * 3 + ["baseline"] + ["fwd+bwd"] * 2 + ["lowmem"] * 3  # dX blocks 128, 200, whole (300)
    for r in data["rows"]:
        assert r["ok"], r  # tiny blocks (BLOCK_H 16 < H) are correct too; forced dX chunks too
        assert r["ms"] > 0 and (r.get("err_logp", 0) <= 1e-3)
    low = [r for r in data["rows"] if r["step"] == "lowmem"]
    plan = data["lowmem"]["plan"]
    assert plan[0] == 2 and sum(r["plan_pick"] for r in low) == 1  # the plan's pick is one of the widths
    assert [r["config"] for r in low if r["plan_pick"]] == [f"dX {plan[1]}x{plan[2]}, dW 70x{plan[3]}"]
    assert plan[2] != 128 and data["lowmem"]["pick_vs_fastest"] == pytest.approx(1.5)
    # the module's settings are back as they were (the run sets configs and plans as it goes)
    assert lp_mod.INTERP_CONFIG == interp_before and lp_mod.DX_BLOCK == 0 and lp_mod._bwd_plan.__name__ == "_bwd_plan"
    lines = dict(line.split("=", 1) for line in env.read_text().split())
    # ... and the dX width that beat the plan's pick by > 1% is exported for the later steps
    assert set(lines) == {"LWZ_LOGPROB_FWD_CONFIG", "LWZ_LOGPROB_BWD_CONFIG", "LWZ_LOGPROB_DX_BLOCK"}
    assert lines["LWZ_LOGPROB_DX_BLOCK"] == "128" and data["lowmem"]["dx_block"] == 128
    assert lines["LWZ_LOGPROB_FWD_CONFIG"] in data["best"]["fwd"] and data["best"]["bwd"] == lines["LWZ_LOGPROB_BWD_CONFIG"]
    lp_mod.parse_config(lines["LWZ_LOGPROB_BWD_CONFIG"], lp_mod.GPU_BWD_CONFIG)
    # a backward config that fails to run is reported with its error and never chosen
    real = lp_mod.triton_backward

    def failing(*args, **kw):
        if lp_mod.INTERP_BWD_CONFIG["GROUP_T"] == 3:
            raise RuntimeError("out of resources")
        return real(*args, **kw)

    monkeypatch.setattr(lp_mod, "triton_backward", failing)
    tune_logprob.main(["--tokens", "70", "--hidden", "48", "--vocab", "300", "--out", str(out), "--lowmem-bytes", "0",
                       "--fwd", "64x256x64:w4:s1:ptr", "--bwd", "64x256x64:w4:s1:g2:ptr;64x64x32:w4:s1:g3:ptr"])
    data = json.loads(out.read_text())
    bad = data["rows"][-1]
    assert bad["ok"] is False and "out of resources" in bad["error"], bad
    assert data["best"]["bwd"] == "64x256x64:w4:s1:g2:ptr"
