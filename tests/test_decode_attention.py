"""Triton split-K decode attention (kernels/decode_attention.py) against an fp64 reference, on
awkward shapes, under the interpreter on CPU (fp32, fp16); and the rollout engine decoding through
it. The compiled bf16 kernel on CUDA is tested in test_kernels_cuda.py."""

import os

import pytest
import torch

from kernels.decode_attention import decode_attention_reference, decode_attention_triton
from lwz.attention import _decode_sdpa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [  # B, Hq, Hkv, D, R, S
    (3, 6, 2, 12, 5, 200),    # 3 query heads per kv head, D not a power of two
    (1, 4, 4, 16, 1, 70),     # no grouping, one sequence
    (4, 7, 1, 48, 6, 130),    # 7 query heads on one kv head
    (2, 2, 2, 128, 3, 257),   # full head dim, S one past a tile multiple
]


def _case(shape, dtype, seed):
    B, Hq, Hkv, D, R, S = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(R, S, Hkv, D, generator=g) * 2.0  # peaky softmax: the online max matters
    v = torch.randn(R, S, Hkv, D, generator=g)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S  # a full row
    if B > 1:
        lengths[1] = 1  # a sequence with one key
    rows = torch.randperm(R, generator=g)[:B]
    return q.to(dtype), k.to(dtype), v.to(dtype), lengths, rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits", [1, 3, None])
def test_matches_reference(shape, dtype, splits):
    """Error vs fp64 no worse than twice torch's own (masked SDPA in the same dtype), with a floor
    of a few units of the output's last place (fp32 errors here are ~1e-7 on both sides)."""
    q, k, v, lengths, rows = _case(shape, dtype, seed=sum(shape))
    scale = shape[3] ** -0.5
    out = decode_attention_triton(q, k, v, lengths, scale, rows=rows, max_length=int(lengths.max()),
                                  num_splits=splits)
    assert out.dtype == dtype and out.shape == q.shape
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, scale, rows=rows)
    torch_out = _decode_sdpa(q, k, v, lengths, scale, rows, int(lengths.max()))
    err = (out.double() - ref).abs().max().item()
    err_torch = (torch_out.double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= 2 * err_torch + 4 * ulp, (err, err_torch, ulp)


def _paged(k, v, rows, page, g):
    """The rows' caches cut into `page`-slot pages scattered over a shuffled pool with spare pages:
    (k_pages, v_pages, block_table int32 [B, S // page]) holding the same keys and values."""
    R, S, Hkv, D = k.shape
    n = S // page
    B = rows.numel()
    order = torch.randperm(B * n + 3, generator=g)  # 3 pages nobody uses
    table = order[:B * n].reshape(B, n).to(torch.int32)
    kp = torch.randn(B * n + 3, page, Hkv, D, generator=g).to(k.dtype)  # garbage where no row points
    vp = torch.randn(B * n + 3, page, Hkv, D, generator=g).to(k.dtype)
    for b in range(B):
        for j in range(n):
            kp[table[b, j]] = k[rows[b], j * page:(j + 1) * page]
            vp[table[b, j]] = v[rows[b], j * page:(j + 1) * page]
    return kp, vp, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_cache_reads_the_same_keys(dtype, splits):
    """A paged cache (pages scattered in the pool, rows sharing none) gives what the static rows
    give, in the Triton kernel and in the SDPA path; a page size the kernel cannot tile is refused."""
    from lwz.attention import decode_attention
    q, k, v, lengths, rows = _case((3, 6, 2, 12, 5, 256), dtype, seed=4)
    lengths[2] = 130  # ends inside the third page
    g = torch.Generator().manual_seed(5)
    kp, vp, table = _paged(k, v, rows, 64, g)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths, 0.3, rows=rows)
    static = decode_attention_triton(q, k, v, lengths, 0.3, rows=rows, num_splits=splits)
    paged = decode_attention_triton(q, kp, vp, lengths, 0.3, block_table=table, num_splits=splits)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(paged, static, atol=tol, rtol=tol)
    torch.testing.assert_close(paged.double(), ref, atol=10 * tol, rtol=10 * tol)
    sd = decode_attention(q, kp, vp, lengths, 0.3, block_table=table, max_length=int(lengths.max()), kernel="sdpa")
    torch.testing.assert_close(sd.double(), ref, atol=10 * tol, rtol=10 * tol)
    kp2, vp2, table2 = _paged(k, v, rows, 32, g)
    with pytest.raises(ValueError, match="page size 32 must be a multiple of 64"):
        decode_attention_triton(q, kp2, vp2, lengths, 0.3, block_table=table2)


def test_rows_and_splits_do_not_change_the_result():
    """Reading rows in place = reading a compacted copy; 1 split = many splits (to rounding)."""
    q, k, v, lengths, rows = _case((3, 6, 2, 12, 5, 200), torch.float32, seed=1)
    a = decode_attention_triton(q, k, v, lengths, 0.3, rows=rows, num_splits=4)
    b = decode_attention_triton(q, k[rows].contiguous(), v[rows].contiguous(), lengths, 0.3, num_splits=1)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention_triton(q[:, :5], k, v, lengths, 0.3, rows=rows)


def test_generation_through_the_triton_kernel(monkeypatch):
    """The rollout engine decoding with the Triton kernel (rows read in place) samples the same
    tokens with the same log-probs as the SDPA path (the draws depend only on the seed, the sample
    and the position)."""
    from lwz.model import Transformer
    from lwz.rollout import EngineSettings, SamplingParams, generate
    model = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(5.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (5, 17, 2)]
    sp = SamplingParams(n=2, max_new_tokens=12, temperature=1.0, stop_token_ids=(0, *range(8, 60)), seed=0)
    ref = generate(model, prompts, sp)
    import kernels.decode_attention as mod
    calls = []
    real = mod.decode_attention_triton
    monkeypatch.setattr(mod, "decode_attention_triton", lambda *a, **k: calls.append(k["rows"]) or real(*a, **k))
    out = generate(model, prompts, sp, EngineSettings(decode_kernel="triton"))
    assert calls and all(r is not None for r in calls)  # every decode round, rows read in place
    assert len(set(ref.response_lengths.tolist())) > 1  # sequences left the batch at different steps
    assert out.response_ids == ref.response_ids
    torch.testing.assert_close(out.response_logprobs, ref.response_logprobs, atol=1e-5, rtol=1e-5)
    # a paged cache with 64-token pages: the kernel reads through the block table
    paged = generate(model, prompts, sp, EngineSettings(decode_kernel="triton", page_size=64))
    assert paged.response_ids == ref.response_ids
    torch.testing.assert_close(paged.response_logprobs, ref.response_logprobs, atol=1e-5, rtol=1e-5)


def test_bad_forced_kernel_is_one_clear_error():
    from lwz.attention import decode_backend
    with pytest.raises(ValueError, match="rollout.decode_kernel: got 'paged'"):
        decode_backend("auto", torch.device("cpu"), kernel="paged")


def test_bench_cpu_case(tmp_path):
    """bench.bench_decode_attention's CPU case: every kernel ran, finite numbers, fp64 check."""
    import json
    from bench.bench_decode_attention import main
    out = tmp_path / "da.json"
    main(["--context", "96", "--batch", "3", "--rows", "5", "--heads", "6,2,16", "--iters", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["kernel"] for r in res["results"]] == ["triton", "sdpa_rows"]
    for r in res["results"]:
        assert r["status"] == "ok" and r["gbps"] > 0 and r["max_err_vs_fp64"] < 1e-5, r
    assert res["kv_bytes"] > 0 and res["copy"]["gbps"] > 0
