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
                   the groups in its dtype;
      "borrow":    the one walk with the fp32 dX accumulator in dX's buffer and dW's last rows
                   (fp16; fp32 has no accumulator), those rows walked for dX, then for dW; its
                   first chunks' dA in dW's rows after them (up to 3 such chunks at H = 80).
    The torch path takes several token chunks."""
    def plan(N, V, elem, acc_row, block_t, block_v, budget, exact_dw=True, dw_row=0):
        if walk == "borrow":
            tail = lp_mod.borrowed_rows(N, V, acc_row, dw_row)
            return lp_mod.BwdPlan(1, N, V, block_v, tail, lp_mod.dw_room_chunks(N, V - tail, elem, dw_row,
                                                                                block_v, block_v))
        if walk in ("1pass", "groups"):
            return lp_mod.BwdPlan(1, (N if walk == "1pass" else block_t), V, block_v)
        return lp_mod.BwdPlan(2, block_t, (V if walk == "2pass" else 2 * block_v), block_v)

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
                                           ("triton", "groups", False), ("triton", "borrow", True),
                                           ("torch", "1pass", False)],
                         ids=["triton-1pass", "triton-2pass-acc", "triton-2pass-tma", "triton-2pass-acc-tma-flat",
                              "triton-groups", "triton-borrow-tma", "torch"])
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


def test_bwd_plan_stays_within_budget():
    """The backward's scratch plan: one walk with the fp32 dX accumulator while it and a chunk of
    >= ONE_PASS_MIN_VC columns fit the budget; else the same walk with the accumulator in dX's
    buffer and dW's last rows while dW can hold it; else two walks whose chunks each fit the budget (the dX walk in long
    token chunks over vocabulary blocks when whole-vocabulary chunks get short), or with exact_dw
    False one walk per token group."""
    plan = lp_mod._bwd_plan
    N, H, V, bf16 = 16384, 5120, 152064, 2
    row, dw_row = H * 4, H * 2  # fp32 dX accumulator / bf16 dW bytes per token / row
    assert plan(N, V, bf16, row, 128, 128, 1 << 30, True, dw_row) == (1, N, V, 16384, 0, ())  # chunk capped at 512 MiB
    p = plan(2 * N, V, bf16, row, 128, 128, 1 << 30, True, dw_row)  # 32k: what the budget leaves
    assert p.passes == 1 and p.tail == 0 and p.vc % 128 == 0 and 2 * N * row + 2 * N * p.vc * bf16 <= 1 << 30 \
        < 2 * N * row + 2 * N * (p.vc + 128) * bf16
    # 88 MiB at 16k (the benchmark's <= 100 MB row): the 320 MiB accumulator's first half in dX's
    # buffer, the other in dW's last 16384 rows (10.8% of the vocabulary recomputed); the first 11
    # chunks' dA in dW's rows after them (5 x 16384 columns, then narrower), the rest 2816 wide (88
    # MiB of dA)
    low = plan(N, V, bf16, row, 128, 128, 88 << 20, True, dw_row)
    assert low[:5] == (1, N, V, 2816, 16384) and len(low.room) == 11 and low.room[:5] == (16384,) * 5
    assert plan(N, V, bf16, row, 128, 128, 88 << 20, False, dw_row) == low  # exact anyway
    assert plan(4 * N, V, bf16, row, 128, 128, 1 << 30, True, dw_row).tail == 65536  # 64k: acc = 1.25 GiB
    assert plan(8 * N, V, bf16, row, 128, 128, 1 << 30, True, dw_row).tail == 131072  # 128k: 86% of the rows
    assert plan(16 * N, V, bf16, row, 128, 128, 1 << 30, True, dw_row).passes == 2  # 256k: more than dW holds
    assert plan(N, V, bf16, row, 128, 128, 16 << 20, True, dw_row).passes == 2  # 16 MiB: not even a 1024 chunk
    # without dW to borrow (a frozen head): two walks within the budget
    for budget in (96 << 20, N * row):  # under 100 MB; the one-walk accumulator alone
        passes, tc, vcx, vc, tail = plan(N, V, bf16, row, 128, 128, budget)[:5]
        assert passes == 2 and tail == 0 and tc % 128 == 0 and vcx % 128 == 0 and vc % 128 == 0
        assert tc * (vcx * bf16 + row) <= budget and N * vc * bf16 <= budget and vc >= 128
        whole_vocab_tc = budget // (V * bf16) // 128 * 128  # 256 tokens at 96 MiB
        assert vcx < V and tc >= 4 * whole_vocab_tc, (budget, tc, vcx)
    # 96 MiB at 16k: 2688-token chunks over 8192-column blocks (52.5 MiB accumulator + 42 MiB of dA)
    assert plan(N, V, bf16, row, 128, 128, 96 << 20) == (2, 2688, 8192, 3072, 0, ())
    assert plan(N, V, 4, 0, 64, 128, 96 << 20, True, 4 * H) == (1, N, V, 1536, 0, ())  # fp32: dX is its own accumulator
    # a budget a single block exceeds: the smallest footprint (one block per chunk, <= N rows)
    assert plan(3, 1237, 4, 0, 64, 256, 1) == (2, 3, 256, 256, 0, ())
    assert plan(3, 1237, 4, 0, 64, 256, 1 << 30) == (1, 3, 1237, 1237, 0, ())  # everything in one chunk
    # exact_dw False where nothing can be borrowed: one walk per token group instead of two walks
    for budget in (88 << 20, 24 << 20):
        passes, tg, vcx, vc, _ = plan(N, V, bf16, row, 128, 128, budget, False)[:5]
        assert passes == 1 and vcx == V and tg < N and tg % 128 == 0 and vc % 128 == 0
        assert tg * (row + vc * bf16) <= budget, (budget, tg, vc)
    assert plan(N, V, bf16, row, 128, 128, 88 << 20, False) == (1, 2432, V, 8192, 0, ())  # 7 groups at 16k
    assert plan(N, V, bf16, row, 128, 128, 1 << 30, False) == plan(N, V, bf16, row, 128, 128, 1 << 30)


def test_borrowed_rows_hold_the_accumulator():
    """dW's borrowed tail starts on a row that is a multiple of 8 and holds the fp32 accumulator's
    rows that dX's own buffer does not (the last N - N // 2), at any N, V and H (odd ones too);
    nothing is borrowed without an accumulator, without dW, or where dW is too small to hold them."""
    for N, V, H in ((1, 4099, 48), (333, 1237, 80), (97, 4099, 7), (16384, 152064, 5120), (2000, 2103, 33),
                    (3001, 3017, 5)):
        for acc_row, dw_row in ((4 * H, 2 * H), (4 * H, 4 * H)):
            tail = lp_mod.borrowed_rows(N, V, acc_row, dw_row)
            half = N - N // 2  # the accumulator's rows past those dX's own buffer holds
            assert 0 < tail < V and (V - tail) % 8 == 0 and tail * dw_row >= half * acc_row, (N, V, H, tail)
            assert (tail - 8) * dw_row < half * acc_row  # no more rows than that
    assert lp_mod.borrowed_rows(100, 1000, 0, 200) == 0 and lp_mod.borrowed_rows(100, 1000, 400, 0) == 0
    assert lp_mod.borrowed_rows(1000, 1000, 400, 200) == 0  # N = V: no row left before the tail


def test_dw_room_chunks_fit_before_the_tail():
    """The borrowed walk's first chunks: each one's dA fits in dW's rows between its end and the
    tail, widths in whole blocks, never wider than BWD_MAX_CHUNK_BYTES allows, non-increasing, all
    wider than the budget's chunk, and the next one would not be."""
    for N, v_end, elem, dw_row, block_v, vc in ((16384, 135680, 2, 10240, 128, 2816),
                                               (32768, 119296, 2, 10240, 128, 1408),
                                               (97, 4000, 4, 160, 256, 256), (4000, 5000, 2, 512, 128, 1024)):
        room = lp_mod.dw_room_chunks(N, v_end, elem, dw_row, block_v, vc)
        v0 = 0
        for w in room:
            assert w % block_v == 0 and vc < w and N * w * elem <= lp_mod.BWD_MAX_CHUNK_BYTES
            assert N * w * elem <= (v_end - v0 - w) * dw_row, (N, v0, w)
            v0 += w
        assert list(room) == sorted(room, reverse=True)
        nxt = (v_end - v0) * dw_row // (N * elem + dw_row) // block_v * block_v
        assert nxt <= vc or N * nxt * elem > lp_mod.BWD_MAX_CHUNK_BYTES
    assert len(lp_mod.dw_room_chunks(32768, 119296, 2, 10240, 128, 1408)) == 19  # instead of 85 chunks of 1408
    assert lp_mod.dw_room_chunks(4000, 5000, 2, 512, 128, 1024) == ()  # long sequences, narrow head: none


BORROW_BUDGET = 333 * 1024 * 4 + 1000  # N = 333 below: one 1024-column fp32 dA chunk, not the accumulator


@pytest.mark.parametrize("budget,passes,exact_dw", [(48 << 10, 2, True), (48 << 10, 1, False),
                                                    (BORROW_BUDGET, 1, True), (1 << 30, 1, True)],
                         ids=["2pass", "groups", "borrow", "1pass"])
def test_scratch_budget_walks(budget, passes, exact_dw, monkeypatch):
    """The real plan at a budget that forces two walks over several uneven chunks of tokens and
    vocabulary (fp16: the one-pass walk would need an fp32 dX accumulator; the dX walk sums
    vocabulary blocks in its [tc, H] accumulator), the same budget with exact_dw False (one walk
    per token group, dW added up over the groups in fp16), at one that holds a 1024-column chunk
    but not the accumulator (its first half in dX's buffer, the rest in dW's last 339 rows: uneven
    chunks before and in the tail), and at one that takes a single chunk: all match the fp64
    reference like plain fp16 torch. (The whole-vocabulary dX chunks of the two-walk plan win only
    at vocabularies small next to the budget; tested with a fixed plan in
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
    _, tc, vcx, vc, tail = seen[0][:5]
    assert (tail > 0) == (budget == BORROW_BUDGET), seen[0]
    if passes == 2:
        assert N % tc and tc < N and V % vc and vc < V and V % vcx and vcx < V, seen[0]
    if not exact_dw:  # several token groups, the last one short
        assert N % tc and tc < N and V % vc and vc < V and vcx == V, seen[0]
    if tail:
        assert tail == 339 and vc == 1024 and tc == N and (V - tail) % vc and tail < vc, seen[0]
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
                row(16384, "triton_lowmem", 250.0, 52.0, 90.0), row(16384, "triton_lowmem_two_walks", 300.0, 43.0, 90.0),
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
    assert h["speedup_lowmem_vs_two_walks"] == pytest.approx(1.2)
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
    for budget, need_dx, need_dw in ((1 << 30, True, True), (1 << 20, True, True), (8_300_000, True, True),
                                     (8_300_000, True, False), (1 << 20, False, True)):
        assert lp_mod.backward_plan(x, w, budget, need_dx, need_dw=need_dw) == \
            lp_mod._bwd_plan(2000, 5000, 4, 64 * 4 if need_dx else 0, c["BLOCK_T"], c["BLOCK_V"], budget, True,
                             64 * 2 if need_dw else 0)
    assert lp_mod.backward_plan(x, w, 8_300_000).tail == 2000  # the chunk fits, the accumulator does not
    assert lp_mod.backward_plan(x, w, 8_300_000, need_dw=False).passes == 2  # no dW to hold it
    P = lp_mod.BwdPlan
    assert _plan_text(P(1, 16384, 152064, 16384), 16384, 152064) == \
        "one walk: vocabulary chunks of 16384 with the fp32 dX accumulator"
    assert _plan_text(P(1, 16384, 152064, 2816, 16384), 16384, 152064) == \
        ("one walk: vocabulary chunks of 2816 with the fp32 dX accumulator in dX's buffer and dW's last 16384 rows "
         "(their logits recomputed)")
    assert _plan_text(P(1, 16384, 152064, 2816, 16384, (16384, 12800, 3200)), 16384, 152064).endswith(
        "(their logits recomputed); the first 3 chunks (16384 down to 3200 columns) with their dA in dW's unwritten rows")
    assert _plan_text(P(2, 2688, 8192, 3072), 16384, 152064) == ("two walks: dX in 2688-token chunks over 8192-column "
                                                          "blocks (fp32 [2688, H] accumulator); dW in vocabulary chunks of 3072")
    assert "256-token chunks over the whole vocabulary" in _plan_text(P(2, 256, 152064, 3072), 16384, 152064)
    assert _plan_text(P(1, 2432, 152064, 8192), 16384, 152064).startswith("one walk per 2432-token group (7 groups)")
    # the bench's comparison rows: their settings hold while they run (plan included) and are restored
    from bench import bench_logprob as bl

    big_x = torch.empty(16384, 5120, dtype=torch.bfloat16, device="meta")
    big_w = torch.empty(152064, 5120, dtype=torch.bfloat16, device="meta")
    real = lp_mod.borrowed_rows
    with bl._settings("triton_lowmem_two_walks"):
        assert lp_mod.borrowed_rows is not real
        two = lp_mod.backward_plan(big_x, big_w, bl.LOW_SCRATCH)
    assert lp_mod.borrowed_rows is real
    assert two.passes == 2 and lp_mod.backward_plan(big_x, big_w, bl.LOW_SCRATCH).tail > 0
    assert bl._with_settings("triton_lowmem_groups", lambda: lp_mod.backward_plan(big_x, big_w, bl.LOW_SCRATCH,
                                                                                  exact_dw=False))().tc < 16384


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
    monkeypatch.setattr(lp_mod, "_bwd_plan", lambda *a: seen.append(real(*a)) or seen[-1])
    borrow = lp_mod.borrowed_rows
    # triton_lowmem: a 1024-column chunk fits, the accumulator does not (borrowed from dW); the
    # comparison rows, with nothing borrowed, at a budget that leaves them several token chunks
    low = {"triton_lowmem": 70 * 1024 * 4 + 100}
    monkeypatch.setattr(bl, "TRITON_ROWS", {name: dict(spec, scratch=spec["scratch"] and low.get(name, 60_000))
                                            for name, spec in bl.TRITON_ROWS.items()})
    rows = bl.run_cuda([70], quick=True, compile_torch=False, device="cpu", H=48, V=1237, dtype=torch.float16)
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"triton", "triton_lowmem", "triton_lowmem_two_walks", "triton_lowmem_groups",
                       "torch_eager"}, list(by)
    for r in rows:
        assert "skipped" not in r and "grad_err_error" not in r, r
        assert r["dtype"] == "fp16" and r["fwd_ms"] == 2.0 and r["peak_beyond_grads_mib"] < 3
        assert r["rel_err_dx"] < 1e-2 and r["rel_err_dw"] < 1e-2 and r["max_abs_err_logp"] < 1e-2, r
    assert by["triton"]["bwd_plan"].startswith("one walk: vocabulary chunks of 1237 with")
    assert "in dX's buffer and dW's last 77 rows" in by["triton_lowmem"]["bwd_plan"]
    assert by["triton_lowmem_two_walks"]["bwd_plan"].startswith("two walks")
    assert by["triton_lowmem_groups"]["bwd_plan"].startswith("one walk per ")
    # the comparison rows' backwards ran with nothing borrowed, the others as shipped
    assert lp_mod.BwdPlan(1, 70, 1237, 1024, 77) in seen and any(p.passes == 2 for p in seen)
    assert lp_mod.borrowed_rows is borrow


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
    interp_before, interp_bwd_before = dict(lp_mod.INTERP_CONFIG), dict(lp_mod.INTERP_BWD_CONFIG)

    def fake_time(fn, *a, **k):  # the interpreter's clock means nothing: the second backward config wins
        fn()
        return 0.002 if lp_mod.INTERP_BWD_CONFIG["BLOCK_H"] == 32 else 0.003

    monkeypatch.setattr(tune_logprob, "time_call", fake_time)
    tune_logprob.main(["--tokens", "70", "--hidden", "48", "--vocab", "300", "--out", str(out), "--env", str(env),
                       "--fwd", "64x256x64:w4:s1:ptr;64x128x64:w4:s1:tma;64x128x16:w4:s1:ptr",
                       "--bwd", "64x256x64:w4:s1:g2:ptr;64x128x32:w4:s1:g2:tma"])
    data = json.loads(out.read_text())
    assert data["complete"] and [r["step"] for r in data["rows"]] == ["fwd"] * 3 + ["baseline"] + ["fwd+bwd"] * 2
    for r in data["rows"]:
        assert r["ok"], r  # tiny blocks (BLOCK_H 16 < H) are correct too
        assert r["ms"] > 0 and (r.get("err_logp", 0) <= 1e-3)
    # the module's settings are back as they were (the run sets configs as it goes)
    assert lp_mod.INTERP_CONFIG == interp_before and lp_mod.INTERP_BWD_CONFIG == interp_bwd_before
    lines = dict(line.split("=", 1) for line in env.read_text().split())
    assert set(lines) == {"LWZ_LOGPROB_FWD_CONFIG", "LWZ_LOGPROB_BWD_CONFIG"}
    assert data["best"]["bwd"] == lines["LWZ_LOGPROB_BWD_CONFIG"] == "64x128x32:w4:s1:g2:tma"
    assert lines["LWZ_LOGPROB_FWD_CONFIG"] in data["best"]["fwd"]
    lp_mod.parse_config(lines["LWZ_LOGPROB_BWD_CONFIG"], lp_mod.GPU_BWD_CONFIG)
    # a backward config that fails to run is reported with its error and never chosen
    real = lp_mod.triton_backward

    def failing(*args, **kw):
        if lp_mod.INTERP_BWD_CONFIG["GROUP_T"] == 3:
            raise RuntimeError("out of resources")
        return real(*args, **kw)

    monkeypatch.setattr(lp_mod, "triton_backward", failing)
    tune_logprob.main(["--tokens", "70", "--hidden", "48", "--vocab", "300", "--out", str(out),
                       "--fwd", "64x256x64:w4:s1:ptr", "--bwd", "64x256x64:w4:s1:g2:ptr;64x64x32:w4:s1:g3:ptr"])
    data = json.loads(out.read_text())
    bad = data["rows"][-1]
    assert bad["ok"] is False and "out of resources" in bad["error"], bad
    assert data["best"]["bwd"] == "64x256x64:w4:s1:g2:ptr"


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 129, 1000])
def test_fp32_rows_to_half_in_place(n):
    """The borrowed accumulator's first rows are fp32 rows stored in dX's own half-precision buffer;
    converting them in place must read every fp32 row before a half row lands on its bytes, with
    no copy whose source and destination overlap (a GPU copies in parallel, so the CPU's in-order
    copy would hide that): every read and write of the conversion is recorded and checked."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def span(t):  # byte range of a contiguous tensor in out's storage (None: elsewhere)
        if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            return None
        start = t.storage_offset() * t.element_size()
        return start, start + t.numel() * t.element_size()

    events = []  # (read span, written span or None), in order

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                events.append((span(args[1]), span(args[0])))
            elif func is torch.ops.aten.clone.default:
                events.append((span(args[0]), None))
            return func(*args, **(kwargs or {}))

    H = 6
    out = torch.full((2 * n + 1, H), 7.0, dtype=torch.float16)
    rows32 = out.view(-1)[: 2 * n * H].view(torch.float32).view(n, H)
    rows32.copy_(torch.randn(n, H, generator=torch.Generator().manual_seed(n)) * 100)
    want = rows32.clone().half()
    with Record():
        lp_mod._fp32_rows_to_half_in_place(rows32, out[:n])
    assert torch.equal(out[:n], want)
    assert (out[2 * n:] == 7.0).all()  # nothing past the fp32 rows' bytes was touched
    reads = [r for r, _ in events]
    assert sum(e - s for s, e in filter(None, reads)) == 4 * n * H  # every fp32 byte read once
    for i, (_, wrote) in enumerate(events):
        for r in reads[i:] if wrote else ():  # this copy's own source, and every later read
            assert r is None or wrote[1] <= r[0] or r[1] <= wrote[0], (i, wrote, r)


@pytest.mark.parametrize("budget", [None, BORROW_BUDGET], ids=["default", "borrow"])
def test_row_strided_hidden(budget):
    """hidden may be a view with row stride > H (the contract asks only for a unit last stride): the
    Triton path gives the same log-probs and gradients as for a contiguous copy, in the default
    walk and in the one whose dX buffer holds fp32 accumulator rows (dX is contiguous either way)."""
    N, H, V, temp = 333, 48, 4099, 0.9
    x, w, t = _make(N, H, V, torch.float16, seed=12)
    gen = torch.Generator().manual_seed(3)
    g_lp, g_en = (torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(2))
    big = torch.cat([x, torch.randn(N, 5).half()], 1).requires_grad_()
    wr = w.clone().requires_grad_()
    logp, ent = fused_logprobs(big[:, :H], wr, t, temp, True, impl="triton", bwd_scratch_bytes=budget)
    ((logp.double() * g_lp).sum() + (ent.double() * g_en).sum()).backward()
    fn = lambda x, w, t, temp: fused_logprobs(x, w, t, temp, True, impl="triton",  # noqa: E731
                                              bwd_scratch_bytes=budget)
    want = _run(fn, x, w, t, temp, g_lp, g_en)
    assert torch.equal(logp.double(), want[0]) and torch.equal(ent.double(), want[1])
    assert torch.equal(big.grad[:, :H].double(), want[2]) and (big.grad[:, H:] == 0).all()
    assert torch.equal(wr.grad.double(), want[3])
