"""Benchmark of sequence packing and the micro-batch planner.

    python -m bench.bench_pack [--small] [--out PATH] [--seqs 4096] [--ranks 8] [--max-tokens 32768]

1. pack / unpack (lwz ops) of a rollout batch, by default 256k tokens x 5120 bf16 on CUDA, against a
   device-to-device copy of the same bytes and torch index_select / index_copy_ in the same run.
   Without CUDA it runs a small fp32 case on the CPU (marked as such).
2. Planner time for 4096 sequences: C++ op (lwz._C) vs the pure-Python twin (goal: <= 1 ms for C++).
3. Padding waste (padded tokens / real tokens) on a long-tail log-normal length mix capped at 14k:
   rows padded to the longest of fixed-size batches vs our planned micro-batches (goal: <= 3%).

Writes bench/results/pack-<gpu-name-or-cpu>.json (device, versions, commit, numbers) and prints a
table. ``main(argv)`` returns 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lwz.packing as P  # noqa: E402
from bench.common import git_commit, time_call  # noqa: E402

CAP = 14336  # longest rollout (prompt + 14k answer budget)


def _device_tag() -> tuple[str, str]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return platform.processor() or platform.machine() or "cpu", "cpu"


def lognormal_lengths(n: int, seed: int = 0, mu: float = 7.6, sigma: float = 1.0) -> list[int]:
    """Long-tail answer lengths: log-normal (median e^mu ~ 2000 tokens), capped at CAP, >= 16."""
    rng = random.Random(seed)
    return [max(16, min(CAP, int(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def bench_pack(tokens: int, hidden: int, dtype: torch.dtype, device: str, iters: int) -> dict:
    cuda = device == "cuda"
    rng = random.Random(1)
    lengths, starts, total = [], [], 0
    while total < tokens:  # rows of a padded rollout batch, left offsets as for left-padded prompts
        n = min(tokens - total, max(16, min(CAP, int(rng.lognormvariate(7.6, 1.0)))))
        lengths.append(n)
        starts.append(rng.randint(0, CAP - n))
        total += n
    B, L = len(lengths), CAP
    x = torch.randn(B, L, hidden, device=device, dtype=dtype)
    starts_h, _, cu_h, total, _ = P.make_layout(starts, lengths, B, L)
    st, cu = starts_h.to(device), cu_h.to(device)
    elt = torch.tensor([], dtype=dtype).element_size()
    packed_bytes = total * hidden * elt
    padded_bytes = B * L * hidden * elt
    idx = P._flat_index(st, cu, L, total)
    xf = x.view(B * L, hidden)
    packed = P.pack_with_layout(x, st, cu, total)
    flat_src = torch.empty(total * hidden, dtype=dtype, device=device)
    flat_dst = torch.empty_like(flat_src)

    res = {"tokens": total, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""), "rows": B, "L": L,
           "device": device, "backend": P.BACKEND if (P.HAVE_EXT and (not cuda or P.BUILT_WITH_CUDA))
           else "torch fallback"}
    t = {
        "pack_lwz": time_call(lambda: P.pack_with_layout(x, st, cu, total), iters, cuda),
        "pack_index_select": time_call(lambda: xf.index_select(0, idx), iters, cuda),
        "copy_d2d": time_call(lambda: flat_dst.copy_(flat_src), iters, cuda),
        "unpack_lwz": time_call(lambda: P.unpack_with_layout(packed, st, cu, L, 0), iters, cuda),
        "unpack_index_copy": time_call(lambda: packed.new_zeros(B * L, hidden).index_copy_(0, idx, packed),
                                   iters, cuda),
    }
    # Every variant allocates its output (as a caller would), except the reference copy.
    # bytes moved: pack reads and writes the packed tokens; unpack reads them and writes B x L rows
    moved = {"pack_lwz": 2 * packed_bytes, "pack_index_select": 2 * packed_bytes, "copy_d2d": 2 * packed_bytes,
             "unpack_lwz": packed_bytes + padded_bytes, "unpack_index_copy": packed_bytes + padded_bytes}
    res["ms"] = {k: v * 1e3 for k, v in t.items()}
    res["GBps"] = {k: moved[k] / t[k] / 1e9 for k in t}
    res["pack_vs_copy"] = res["GBps"]["pack_lwz"] / res["GBps"]["copy_d2d"]
    res["unpack_vs_copy"] = res["GBps"]["unpack_lwz"] / res["GBps"]["copy_d2d"]
    return res


def bench_planner(n: int, ranks: int, max_tokens: int, iters: int) -> dict:
    lengths = lognormal_lengths(n)
    out = {"n": n, "ranks": ranks, "max_tokens": max_tokens}
    t0 = time.perf_counter()
    py = P.plan_microbatches(lengths, max_tokens, ranks, backend="python")
    out["python_ms"] = (time.perf_counter() - t0) * 1e3
    if P.HAVE_EXT:
        lt = torch.tensor(lengths, dtype=torch.int64)
        out["cpp_ms"] = time_call(lambda: P.plan_microbatches(lt, max_tokens, ranks, backend="cpp"), iters, False) * 1e3
        out["cpp_ms_from_list"] = time_call(lambda: P.plan_microbatches(lengths, max_tokens, ranks, backend="cpp"),
                                        iters, False) * 1e3
        out["cpp_op_only_ms"] = time_call(lambda: torch.ops.lwz.plan_microbatches(lt, max_tokens, ranks, -1),
                                      iters, False) * 1e3
        out["cpp_ms_min"] = time_call(lambda: P.plan_microbatches(lt, max_tokens, ranks, backend="cpp"), 5 * iters,
                                  False, stat=min) * 1e3
        out["plans_equal"] = P.plan_microbatches(lengths, max_tokens, ranks, backend="cpp") == py
        out["speedup"] = out["python_ms"] / out["cpp_ms"]
    return out


def bench_waste(n: int, ranks: int, max_tokens: int) -> dict:
    lengths = lognormal_lengths(n, seed=2)
    plan = P.plan_microbatches(lengths, max_tokens, ranks)
    mean = sum(lengths) / n
    # padded baseline with the same average tokens per micro-batch: rows per batch ~ budget / mean
    rows = max(1, int(max_tokens // mean))
    res = {"n": n, "ranks": ranks, "max_tokens": max_tokens, "mean_len": mean, "max_len": max(lengths),
           "microbatches_per_rank": len(plan[0]),
           "padded_to_longest": P.padded_to_longest_waste(lengths, rows), "padded_rows_per_batch": rows,
           "padded_to_longest_bs8": P.padded_to_longest_waste(lengths, 8),
           "packed_microbatches": P.padding_waste(lengths, plan),
           "packed_microbatches_static_budget": P.padding_waste(lengths, plan, max_tokens)}
    return res


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/pack-<device>.json)")
    ap.add_argument("--seqs", type=int, default=4096)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=None, help="packed tokens of the pack benchmark")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device_name, tag = _device_tag()
    if a.small:
        seqs, tokens, hidden, iters = 256, 4096, 64, 3
    else:
        seqs, iters = a.seqs, a.iters
        tokens, hidden = (262144, 5120) if cuda else (32768, 256)
    tokens = a.tokens or tokens
    hidden = a.hidden or hidden
    dtype = torch.bfloat16 if cuda else torch.float32

    res = {
        "bench": "pack", "device": device_name, "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "lwz_backend": P.BACKEND},
        "pack": bench_pack(tokens, hidden, dtype, "cuda" if cuda else "cpu", iters),
        "planner": bench_planner(seqs, a.ranks, a.max_tokens, iters),
        "waste": bench_waste(seqs, a.ranks, a.max_tokens),
    }
    # the goal numbers: bandwidth on a GPU; on the CPU (small sizes, overhead-bound) the planner's speed-up
    res["headline"] = {"pack_pct_of_copy": 100 * res["pack"]["pack_vs_copy"],
                       "unpack_pct_of_copy": 100 * res["pack"]["unpack_vs_copy"]} if cuda else \
        {"planner_speedup": res["planner"].get("speedup"), "pack_pct_of_copy": 100 * res["pack"]["pack_vs_copy"]}
    out = a.out or os.path.join(ROOT, "bench", "results", f"pack-{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)

    pk, pl, w = res["pack"], res["planner"], res["waste"]
    rows = [("device", f"{device_name}  ({pk['device']}, {P.BACKEND})"),
            ("pack shape", f"{pk['tokens']} tokens x {pk['hidden']} {pk['dtype']}, {pk['rows']} rows of {pk['L']}")]
    for k in pk["ms"]:
        rows.append((k, f"{pk['ms'][k]:9.3f} ms  {pk['GBps'][k]:8.1f} GB/s"))
    rows.append(("pack / d2d copy", f"{pk['pack_vs_copy']:.2f}"))
    rows.append((f"planner n={pl['n']} R={pl['ranks']}", f"python {pl['python_ms']:.2f} ms"
                 + (f", C++ {pl['cpp_ms']:.3f} ms (op only {pl['cpp_op_only_ms']:.3f} ms, from a list "
                    f"{pl['cpp_ms_from_list']:.3f} ms; best {pl['cpp_ms_min']:.3f} ms), equal={pl['plans_equal']}" if "cpp_ms" in pl else "")))
    rows.append(("waste padded-to-longest", f"{100 * w['padded_to_longest']:.1f}% ({w['padded_rows_per_batch']} rows/batch),"
                 f" {100 * w['padded_to_longest_bs8']:.1f}% (8 rows/batch)"))
    rows.append(("waste packed micro-batches", f"{100 * w['packed_microbatches']:.2f}% lockstep, "
                 f"{100 * w['packed_microbatches_static_budget']:.2f}% padded to the budget "
                 f"({w['microbatches_per_rank']} per rank)"))
    print(_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
