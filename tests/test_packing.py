"""Sequence packing ops (lwz._C CPU/CUDA kernels and the pure-torch fallback) and the micro-batch
planner (C++ and Python twins)."""

import itertools
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lwz.packing as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not P.HAVE_EXT, reason=f"lwz._C not built ({P._EXT_ERROR})")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.int64, torch.float32, torch.bfloat16, torch.float64, torch.uint8, torch.bool, torch.int16]
FEATURES = [(), (1,), (3,), (2, 4), (8,)]


# --------------------------------------------------------------------------------------- helpers
def rand_data(shape, dtype, gen=None, device="cpu"):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool().to(device)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype).to(device)
    return torch.randint(0, 100, shape, generator=gen).to(dtype).to(device)


def rand_layout(B, L, gen):
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    starts = (torch.rand(B, generator=gen) * (L - lengths + 1)).long().clamp(max=L - lengths)
    return starts, lengths


def ref_pack(x, starts, lengths):
    """Loop-and-slice reference: (packed, cu_seqlens, position_ids, max_seqlen)."""
    spans = [x[b, int(s):int(s) + int(n)] for b, (s, n) in enumerate(zip(starts, lengths))]
    packed = torch.cat(spans) if spans else x.new_empty((0, *x.shape[2:]))
    cu = torch.zeros(len(spans) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor([int(n) for n in lengths], dtype=torch.int64), 0)
    pos = torch.cat([torch.arange(int(n)) for n in lengths]) if spans else torch.zeros(0, dtype=torch.int64)
    return packed, cu, pos, max([int(n) for n in lengths], default=0)


def ref_unpack(packed, cu, starts, L, fill):
    B = len(cu) - 1
    out = packed.new_full((B, L, *packed.shape[1:]), fill)
    for b in range(B):
        n = int(cu[b + 1]) - int(cu[b])
        out[b, int(starts[b]):int(starts[b]) + n] = packed[int(cu[b]):int(cu[b + 1])]
    return out


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# --------------------------------------------------------------------------------------- build
def test_backend_string_and_build_with_cuda():
    assert isinstance(P.BACKEND, str) and P.BACKEND
    want_cuda = (shutil.which("nvcc") is not None and torch.version.cuda is not None
                 and os.environ.get("LWZ_CUDA", "").strip() not in ("0", "OFF", "off", "false"))
    if want_cuda and os.environ.get("LWZ_NO_EXT") != "1":
        # nvcc is here, so CI compiles csrc/*.cu: a CUDA compile error must not hide behind the
        # CPU-only fallback build.
        assert P.HAVE_EXT, f"lwz._C failed to import: {P._EXT_ERROR}"
        assert P.BUILT_WITH_CUDA, "nvcc exists but lwz._C was built without CUDA (see the pip log)"
        assert torch.ops.lwz.built_with_cuda()
    if P.HAVE_EXT:
        assert torch.ops.lwz.built_with_cuda() == P.BUILT_WITH_CUDA


def test_fallback_import_without_extension():
    code = "import lwz.packing as P; print(P.HAVE_EXT, P.BACKEND)"
    env = dict(os.environ, LWZ_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False torch")


# --------------------------------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feat", FEATURES)
def test_pack_matches_reference(dtype, feat):
    gen = torch.Generator().manual_seed(10 * DTYPES.index(dtype) + FEATURES.index(feat))
    B, L = 5, 9
    x = rand_data((B, L, *feat), dtype, gen)
    starts, lengths = rand_layout(B, L, gen)
    lengths[1] = 0  # an empty row
    want = ref_pack(x, starts, lengths)
    got = P.pack(x, starts, lengths)
    assert same(got[0], want[0]) and same(got[1], want[1]) and same(got[2], want[2])
    assert got[3] == want[3]
    cu, st_ = got[1], starts
    fb = P._pack_torch(x, st_, cu, int(cu[-1]))
    assert same(fb, want[0])
    assert same(P._position_ids_torch(cu, int(cu[-1])), want[2])
    fill = True if dtype == torch.bool else (-100 if not dtype.is_floating_point else -1.5)
    ref_u = ref_unpack(want[0], want[1], starts, L, fill)
    assert same(P.unpack(got[0], cu, starts, L, fill), ref_u)
    assert same(P._unpack_torch(got[0], st_, cu, L, fill), ref_u)
    if P.HAVE_EXT:
        assert same(torch.ops.lwz.pack(x, starts, cu, int(cu[-1])), want[0])
        assert same(torch.ops.lwz.unpack(want[0], starts, cu, L, fill), ref_u)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 6), L=st.integers(1, 12), dtype=st.sampled_from(DTYPES),
       feat=st.sampled_from(FEATURES), seed=st.integers(0, 2**31 - 1), right_pad=st.booleans())
def test_round_trip(B, L, dtype, feat, seed, right_pad):
    gen = torch.Generator().manual_seed(seed)
    starts, lengths = rand_layout(B, L, gen)
    if right_pad:
        starts = None
    fill = False if dtype == torch.bool else 7
    x = rand_data((B, L, *feat), dtype, gen)
    packed, cu, pos, mx = P.pack(x, starts, lengths)
    s = torch.zeros(B, dtype=torch.int64) if starts is None else starts
    # padding of x set to the fill value: unpack(pack(x)) == x exactly
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, int(s[b]):int(s[b]) + int(lengths[b])] = True
    xf = torch.where(mask.view(B, L, *([1] * len(feat))), x, torch.full_like(x, fill))
    assert same(P.unpack(packed, cu, starts, L, fill), xf)
    assert int(cu[-1]) == packed.shape[0] == int(lengths.sum())
    assert mx == (int(lengths.max()) if B else 0)
    # pack(unpack(p)) == p
    assert same(P.pack(P.unpack(packed, cu, starts, L, fill), starts, lengths)[0], packed)


def test_pack_sequences():
    seqs = [torch.arange(n) for n in (3, 0, 5, 1)]
    packed, cu, pos, mx = P.pack_sequences(seqs)
    assert packed.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0] and mx == 5


def test_bad_layout_is_one_clear_error():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="row 1: start 3 \\+ length 2 does not fit in L=4"):
        P.pack(x, [0, 3], [4, 2])
    with pytest.raises(ValueError, match="one entry per row"):
        P.pack(x, None, [1])
    if P.HAVE_EXT:
        cu = torch.tensor([0, 4, 6], dtype=torch.int32)
        with pytest.raises(RuntimeError, match="row 1 does not fit"):
            torch.ops.lwz.pack(x.unsqueeze(-1), torch.tensor([0, 3]), cu, 6)
        with pytest.raises(RuntimeError, match="int32"):
            torch.ops.lwz.pack(x, torch.tensor([0, 0]), cu.long(), 6)


@pytest.mark.parametrize("use_op", [True, False])
def test_gradients_fp64(use_op):
    if use_op and not P.HAVE_EXT:
        pytest.skip("lwz._C not built")
    gen = torch.Generator().manual_seed(0)
    B, L, H = 3, 5, 2
    starts = torch.tensor([1, 0, 2])
    lengths = torch.tensor([3, 5, 0])
    _, _, cu, total, _ = P.make_layout(starts, lengths, B, L)
    pk = (lambda x: torch.ops.lwz.pack(x, starts, cu, total)) if use_op else \
        (lambda x: P._pack_torch(x, starts, cu, total))
    up = (lambda p: torch.ops.lwz.unpack(p, starts, cu, L, 0.5)) if use_op else \
        (lambda p: P._unpack_torch(p, starts, cu, L, 0.5))
    x = torch.randn(B, L, H, dtype=torch.float64, generator=gen, requires_grad=True)
    p = torch.randn(total, H, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(pk, (x,))
    assert torch.autograd.gradcheck(up, (p,))
    assert torch.autograd.gradgradcheck(pk, (x,))
    # backward of pack is unpack with fill 0
    g = torch.randn(total, H, dtype=torch.float64, generator=gen)
    (gx,) = torch.autograd.grad(pk(x), x, g)
    assert torch.equal(gx, ref_unpack(g, cu, starts, L, 0.0))


@pytest.mark.parametrize("use_op", [True, False])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.bfloat16])
def test_one_row_source_gathers_any_spans(use_op, dtype):
    """x[1, L]: every sequence reads the one row, so any subset of a flat stream (in any order,
    overlapping) packs in one call; same as slicing the spans and concatenating them."""
    if use_op and not P.HAVE_EXT:
        pytest.skip("lwz._C not built")
    gen = torch.Generator().manual_seed(3)
    T = 50
    flat = rand_data((T, 3), dtype, gen)
    starts = torch.tensor([41, 0, 7, 7, 30, 49])
    lengths = torch.tensor([9, 5, 12, 3, 0, 1])
    want = torch.cat([flat[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())])
    _, _, cu, total, _ = P.make_layout(starts, lengths, len(starts), T)
    x = flat.unsqueeze(0)
    got = torch.ops.lwz.pack(x, starts, cu, total) if use_op else P._pack_torch(x, starts, cu, total)
    assert same(got, want)
    packed, cu2, pos, mx = P.pack(x, starts, lengths)  # the Python API takes B from lengths
    assert same(packed, want) and torch.equal(cu2, cu) and mx == 12
    assert pos.tolist() == [t for n in lengths.tolist() for t in range(n)]
    with pytest.raises(ValueError, match="row 0: start 41 \\+ length 10 does not fit in L=50"):
        P.pack(x, [41], [10])


@pytest.mark.parametrize("use_op", [True, False])
def test_one_row_source_gradients(use_op):
    """Overlapping spans of one row: the source's gradient sums every span that read it."""
    if use_op and not P.HAVE_EXT:
        pytest.skip("lwz._C not built")
    starts, lengths = torch.tensor([4, 0, 2]), torch.tensor([3, 5, 4])
    _, _, cu, total, _ = P.make_layout(starts, lengths, 3, 8)
    pk = (lambda x: torch.ops.lwz.pack(x, starts, cu, total)) if use_op else \
        (lambda x: P._pack_torch(x, starts, cu, total))
    x = torch.randn(1, 8, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pk, (x,))
    g = torch.arange(total * 2, dtype=torch.float64).view(total, 2)
    (gx,) = torch.autograd.grad(pk(x), x, g)
    want = torch.zeros(8, 2, dtype=torch.float64)
    for s, n, c in zip(starts.tolist(), lengths.tolist(), cu.tolist()):
        want[s:s + n] += g[c:c + n]
    assert torch.equal(gx[0], want)


@needs_ext
def test_opcheck():
    starts = torch.tensor([1, 0, 2])
    cu = torch.tensor([0, 3, 8, 8], dtype=torch.int32)
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    p = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lwz.pack, (x, starts, cu, 8))
    torch.library.opcheck(torch.ops.lwz.unpack, (p, starts, cu, 5, 0.0))
    torch.library.opcheck(torch.ops.lwz.position_ids, (cu, 8))


@needs_ext
def test_fake_tensor_shapes_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 7, 3, dtype=torch.bfloat16)
        starts = torch.zeros(4, dtype=torch.int64)
        cu = torch.zeros(5, dtype=torch.int32)
        p = torch.ops.lwz.pack(x, starts, cu, 11)
        assert p.shape == (11, 3) and p.dtype == torch.bfloat16
        u = torch.ops.lwz.unpack(p, starts, cu, 7, 0)
        assert u.shape == (4, 7, 3)
        assert torch.ops.lwz.position_ids(cu, 11).dtype == torch.int64

    B, L, H = 3, 6, 4
    starts = torch.tensor([2, 0, 1])
    lengths = torch.tensor([4, 6, 2])
    _, _, cu, total, _ = P.make_layout(starts, lengths, B, L)

    def f(x):
        p = torch.ops.lwz.pack(x, starts, cu, total)
        return torch.ops.lwz.unpack(p * 2, starts, cu, L, 0).sum(), torch.ops.lwz.position_ids(cu, total)

    x = torch.randn(B, L, H, requires_grad=True)
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    (s1, pos1), (s2, pos2) = cf(x), f(x)
    assert torch.allclose(s1, s2) and torch.equal(pos1, pos2)
    (g1,) = torch.autograd.grad(s1, x)
    (g2,) = torch.autograd.grad(f(x)[0], x)
    assert torch.equal(g1, g2)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feat", FEATURES + [(5120,)])
def test_cuda_matches_cpu(dtype, feat):
    gen = torch.Generator().manual_seed(1)
    B, L = 6, 33
    starts, lengths = rand_layout(B, L, gen)
    x = rand_data((B, L, *feat), dtype, gen)
    cpu = P.pack(x, starts, lengths)
    gpu = P.pack(x.cuda(), starts.cuda(), lengths.cuda())
    for a, b in zip(cpu[:3], gpu[:3]):
        assert same(a, b.cpu())
    assert cpu[3] == gpu[3]
    fill = True if dtype == torch.bool else 3
    assert same(P.unpack(cpu[0], cpu[1], starts, L, fill),
                P.unpack(gpu[0], gpu[1], starts.cuda(), L, fill).cpu())
    # misaligned views (storage offset) take the narrow-vector path: sliced on the GPU itself (a
    # copy to the GPU would be a fresh, aligned allocation), then unpacked back
    flat = rand_data((B * L * max(1, x[0, 0].numel()) + 1,), dtype, gen)
    xv = flat[1:].reshape(x.shape)
    xg = flat.cuda()[1:].reshape(x.shape)
    assert xg.data_ptr() % 16 != 0
    pv, pg = P.pack(xv, starts, lengths), P.pack(xg, starts.cuda(), lengths.cuda())
    assert same(pv[0], pg[0].cpu())
    buf = torch.empty(pg[0].numel() + 1, dtype=dtype, device="cuda")
    shifted = buf[1:].view(pg[0].shape).copy_(pg[0])  # the packed stream at a misaligned address
    assert same(P.unpack(pv[0], pv[1], starts, L, fill),
                P.unpack(shifted, pg[1], starts.cuda(), L, fill).cpu())


@needs_cuda
def test_cuda_one_row_source_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    flat = rand_data((300, 4), torch.bfloat16, gen)
    starts, lengths = torch.tensor([250, 3, 3, 100, 299]), torch.tensor([50, 97, 1, 0, 1])
    cpu = P.pack(flat.unsqueeze(0), starts, lengths)
    gpu = P.pack(flat.cuda().unsqueeze(0), starts.cuda(), lengths)
    for a, b in zip(cpu[:3], gpu[:3]):
        assert same(a, b.cpu())


@needs_cuda
def test_cuda_gradients():
    B, L, H = 4, 10, 8
    starts, lengths = torch.tensor([0, 3, 1, 9]), torch.tensor([10, 5, 0, 1])
    x = torch.randn(B, L, H, dtype=torch.float64, device="cuda", requires_grad=True)
    _, _, cu, total, _ = P.make_layout(starts, lengths, B, L)
    sd, cd = starts.cuda(), cu.cuda()
    assert torch.autograd.gradcheck(lambda t: P.pack_with_layout(t, sd, cd, total), (x,))
    p = torch.randn(total, H, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: P.unpack_with_layout(t, sd, cd, L, 1.0), (p,))


# --------------------------------------------------------------------------------------- planner
def check_plan(lengths, plan, max_tokens, num_ranks):
    assert len(plan) == num_ranks
    counts = {len(r) for r in plan}
    assert len(counts) == 1, f"unequal micro-batch counts {counts}"
    seen = sorted(i for r in plan for mb in r for i in mb)
    assert seen == list(range(len(lengths))), "each sequence exactly once"
    for r in plan:
        for mb in r:
            assert sum(lengths[i] for i in mb) <= max_tokens


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 120), max_size=60), max_tokens=st.integers(120, 400),
       num_ranks=st.integers(1, 5), coeff=st.sampled_from([None, 37, 10**6]))
def test_planner_properties_and_twins_agree(lengths, max_tokens, num_ranks, coeff):
    # coeff None: token costs (bucket queue in C++); 10**6: costs > 2^16 (binary heap in C++)
    kw = dict(cost="quadratic", attn_coeff=coeff) if coeff is not None else {}
    py = P.plan_microbatches(lengths, max_tokens, num_ranks, backend="python", **kw)
    check_plan(lengths, py, max_tokens, num_ranks)
    if P.HAVE_EXT:
        cpp = P.plan_microbatches(lengths, max_tokens, num_ranks, backend="cpp", **kw)
        assert cpp == py


def brute_force_makespan(costs, k):
    best = None
    for assign in itertools.product(range(k), repeat=len(costs)):
        if assign and assign[0] != 0:  # symmetry: item 0 on rank 0
            continue
        loads = [0] * k
        for c, r in zip(costs, assign):
            loads[r] += c
        best = max(loads) if best is None else min(best, max(loads))
    return best


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=7), k=st.integers(2, 3),
       quadratic=st.booleans())
def test_planner_balance_vs_brute_force(lengths, k, quadratic):
    a = 5
    cost = "quadratic" if quadratic else "tokens"
    plan = P.plan_microbatches(lengths, 60 * 7, k, cost=cost, attn_coeff=a)
    loads = P.rank_costs(lengths, plan, cost, a)
    costs = [a * n + n * n if quadratic else n for n in lengths]
    opt = brute_force_makespan(costs, k)
    # Karmarkar-Karp's worst case for k-way makespan is 4/3 - 1/(3k) of the optimum
    # (Michiels et al., 2007): 3k * max <= (4k - 1) * opt.
    assert 3 * k * max(loads) <= (4 * k - 1) * opt
    assert sum(loads) == sum(costs)


def test_planner_balance_on_large_batches():
    rng = random.Random(0)
    for R, quadratic in ((8, False), (8, True), (3, False), (16, False)):
        lengths = [min(14336, int(rng.lognormvariate(7.3, 1.0))) + 1 for _ in range(1024)]
        a = P.attn_coeff_for(3584, 18944)  # Qwen2.5-7B
        cost = "quadratic" if quadratic else "tokens"
        plan = P.plan_microbatches(lengths, 32768, R, cost=cost, attn_coeff=a)
        check_plan(lengths, plan, 32768, R)
        loads = P.rank_costs(lengths, plan, cost, a)
        costs = [a * n + n * n if quadratic else n for n in lengths]
        lower = max(-(-sum(costs) // R), max(costs))  # no partition beats this
        assert max(loads) <= lower * 1.001, (R, quadratic, max(loads) / lower)
        assert max(loads) - min(loads) <= max(costs)
        if P.HAVE_EXT:
            assert plan == P.plan_microbatches(lengths, 32768, R, cost=cost, attn_coeff=a, backend="python")
    if P.HAVE_EXT:  # a budget too large for the counting sort of the C++ planner
        lengths = [rng.randint(0, 10**6) for _ in range(300)]
        assert P.plan_microbatches(lengths, 10**6, 4) == P.plan_microbatches(lengths, 10**6, 4, backend="python")


def test_planner_budget_is_never_exceeded_where_kk_alone_would():
    # verl's bug: balancing 8 sequences of 7 into ceil(56/8)=7 bins puts 14 tokens in one bin.
    plan = P.plan_microbatches([7] * 8, 8, 1)
    assert len(plan[0]) == 8 and all(len(mb) == 1 for mb in plan[0])
    plan = P.plan_microbatches([7] * 8, 8, 3)
    check_plan([7] * 8, plan, 8, 3)
    assert len(plan[0]) == 3 and plan[2][2] == []


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_planner_errors(backend):
    if backend == "cpp" and not P.HAVE_EXT:
        pytest.skip("lwz._C not built")
    with pytest.raises(ValueError, match=r"sequence 2 has length 9 > max_tokens=8"):
        P.plan_microbatches([1, 8, 9, 10], 8, 2, backend=backend)
    with pytest.raises(ValueError, match="num_ranks"):
        P.plan_microbatches([1], 8, 0, backend=backend)
    with pytest.raises(ValueError, match="negative"):
        P.plan_microbatches([1, -1], 8, 1, backend=backend)
    with pytest.raises(ValueError, match="attn_coeff"):
        P.plan_microbatches([1], 8, 1, cost="quadratic", backend=backend)


def test_planner_edge_cases():
    assert P.plan_microbatches([], 8, 3) == [[], [], []]
    assert P.plan_microbatches([0, 0], 8, 1) == [[[0, 1]]]
    assert P.plan_microbatches(torch.tensor([3, 5, 8]), 8, 1) == [[[2], [0, 1]]]


def test_waste_helpers():
    lengths = [4, 2, 2, 8]
    assert P.padded_to_longest_waste(lengths, 2) == pytest.approx((8 + 16 - 16) / 16)
    plan = [[[3], [0, 1]], [[2], []]]
    assert P.padding_waste(lengths, plan) == pytest.approx((2 * 8 + 2 * 6 - 16) / 16)
    assert P.padding_waste(lengths, plan, max_tokens=8) == pytest.approx((4 * 8 - 16) / 16)


# --------------------------------------------------------------------------------------- bench
def test_bench_small(tmp_path):
    from bench import bench_pack

    out = tmp_path / "pack.json"
    assert bench_pack.main(["--small", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("device", "versions", "commit", "planner", "waste", "pack"):
        assert key in data, key
    assert data["planner"]["n"] > 0 and data["planner"]["python_ms"] > 0
    if P.HAVE_EXT:
        assert data["planner"]["cpp_ms"] > 0 and data["planner"]["plans_equal"]
    assert data["waste"]["packed_microbatches"] <= data["waste"]["padded_to_longest"]
