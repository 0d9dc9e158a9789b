"""Benchmark of the rollout engine's decode attention: one new query per live sequence against its
cached keys/values, the live sequences' rows scattered over the cache (some sequences finished).

    python -m bench.bench_decode_attention [--batch 64] [--context 14336] [--out PATH]

Shape (CUDA default): Qwen2.5-1.5B's attention (12 query heads, 2 kv heads, head dim 128, bf16), a
cache of --rows rows x --context slots, --batch live sequences on random rows with contexts spread
between half and all of --context. Kernels in the same run:
  triton      kernels.decode_attention (split-K, rows read in place)
  sdpa_rows   masked SDPA after gathering the live rows (what the SDPA path pays per layer when
              it reads rows in place instead of compacting)
  varlen      torch varlen_attn, paged cache with one page per row (when this torch has it)
  flash       flash-attn's flash_attn_with_kvcache(cache_batch_idx) (when installed)
GB/s counts the keys and values a kernel must read (2 * sum(lengths) * Hkv * D * bytes), against a
device-to-device copy of the same bytes measured in the same run. Without CUDA a small fp32 case
runs (triton only under TRITON_INTERPRET=1). Writes bench/results/decode_attention-<gpu|cpu>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import env_info, format_table, gpu_tag, time_call, write_json  # noqa: E402


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.bench_decode_attention", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64 if cuda else 4, help="live sequences")
    ap.add_argument("--rows", type=int, default=96 if cuda else 6, help="cache rows (>= batch)")
    ap.add_argument("--context", type=int, default=14336 if cuda else 256, help="cache slots per row")
    ap.add_argument("--heads", default="12,2,128", help="query heads, kv heads, head dim")
    ap.add_argument("--iters", type=int, default=50 if cuda else 3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from kernels.decode_attention import decode_attention_reference
    from lwz import attention as A

    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    Hq, Hkv, D = (int(x) for x in a.heads.split(","))
    if a.rows < a.batch:
        raise SystemExit(f"--rows ({a.rows}) must be >= --batch ({a.batch})")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(a.rows, a.context, Hkv, D, generator=g).to(device=dev, dtype=dtype)
    v = torch.randn(a.rows, a.context, Hkv, D, generator=g).to(device=dev, dtype=dtype)
    q = torch.randn(a.batch, Hq, D, generator=g).to(device=dev, dtype=dtype)
    rows = torch.randperm(a.rows, generator=g)[:a.batch].to(dev)
    lengths = torch.randint(a.context // 2, a.context + 1, (a.batch,), generator=g).to(dev)
    max_len = int(lengths.max())
    scale = D ** -0.5
    kv_bytes = 2 * int(lengths.sum()) * Hkv * D * k.element_size()

    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = time_call(lambda: dst.copy_(src), a.iters, cuda)
    copy_gbps = 2 * src.numel() / t_copy / 1e9
    src = dst = None  # free the copy buffers

    kernels = {"sdpa_rows": lambda: A._decode_sdpa(q, k, v, lengths, scale, rows, max_len)}
    if cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from kernels.decode_attention import decode_attention_triton
        kernels = {"triton": lambda: decode_attention_triton(q, k, v, lengths, scale, rows=rows,
                                                             max_length=max_len), **kernels}
    if cuda and {"block_table", "seqused_k", "enable_gqa"} <= A._VARLEN_PARAMS and a.context % 256 == 0:
        kernels["varlen"] = lambda: A._decode_varlen_paged(q, k, v, lengths, scale, rows)
    if cuda and A._flash_kvcache is not None:
        kernels["flash"] = lambda: A.decode_attention(q, k, v, lengths, scale, rows=rows, backend="flash")

    # fp64 check of the first sequences (on the CPU case only: the CUDA cache is large)
    ref = None if cuda else decode_attention_reference(q[:4].double(), k.double(), v.double(), lengths[:4],
                                                       scale, rows=rows[:4])
    results, base = [], None
    for name, fn in kernels.items():
        row = {"kernel": name}
        try:
            out = fn()
            secs = time_call(fn, a.iters, cuda)
        except Exception as e:  # report, keep going
            row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            results.append(row)
            continue
        if ref is not None:
            row["max_err_vs_fp64"] = (out[:4].double().cpu() - ref).abs().max().item()
        row.update(status="ok", ms=secs * 1e3, gbps=kv_bytes / secs / 1e9,
                   pct_of_copy=100 * kv_bytes / secs / 1e9 / copy_gbps)
        if name == "sdpa_rows":
            base = secs
        results.append(row)
    for row in results:
        if row.get("status") == "ok" and base:
            row["speedup_vs_sdpa_rows"] = base / (row["ms"] / 1e3)

    env = env_info()
    result = {"bench": "decode_attention", "device": dev.type, "gpu": env.get("gpu"), "torch": torch.__version__,
              "git_commit": env.get("commit"), "env": env, "dtype": str(dtype).replace("torch.", ""),
              "batch": a.batch, "rows": a.rows, "context": a.context, "heads": [Hq, Hkv, D],
              "kv_bytes": kv_bytes, "copy": {"ms": t_copy * 1e3, "gbps": copy_gbps}, "results": results}
    out = a.out or os.path.join(ROOT, "bench", "results", f"decode_attention-{gpu_tag(env.get('gpu'))}.json")
    write_json(out, result)
    print(f"decode attention: {a.batch} live sequences, contexts {a.context // 2}..{a.context}, "
          f"heads {Hq}/{Hkv}x{D} {result['dtype']}; K/V read {kv_bytes / 1e6:.1f} MB; "
          f"d2d copy {copy_gbps:.1f} GB/s")
    print(format_table(results, ["kernel", "status", "ms", "gbps", "pct_of_copy", "speedup_vs_sdpa_rows",
                                 "max_err_vs_fp64"]))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
