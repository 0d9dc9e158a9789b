"""Benchmark of kernels.grpo_loss.grpo_loss (fused GRPO loss), forward + backward.

    python -m bench.bench_grpo_loss [--tokens 262144] [--big-tokens 16777216] [--seq-len 2048]
                                    [--modes a,b] [--no-compile] [--iters N] [--out PATH]

Workload: N packed tokens in sequences of --seq-len tokens, ~80% of them active, clip 0.2/0.28,
dual clip c=3, k3 KL (coef 0.001) against ref_logp, entropy bonus (coef 0.001), so every input
and both gradients are live. Timed: loss + stats forward and the backward (torch.autograd.grad of
the loss with respect to logp and entropy), for
    triton         our kernels (CUDA; on CPU only under TRITON_INTERPRET=1, as a smoke run)
    torch_eager    kernels.reference.grpo_loss_reference
    torch_compile  torch.compile of the same reference (CUDA by default; --no-compile skips it)
    d2d_copy       one device-to-device copy of the minimal bytes (below), as the bandwidth bar

Bytes (the formula the GB/s columns use):
    minimal  = N * (5*4 + 1 + 2*4) = 29 B/token: read logp, old_logp, advantages, ref_logp,
               entropy (fp32) and the mask (bool) once, write dlogp and dentropy (fp32) once.
    triton   = N * (21 + 8 + 8 + 8) = 45 B/token (+9 in seq-mean-token-mean: an int32 cumsum
               of the mask for n_i, 1 B read + 4 B written, and a 4-byte 1/n_i lookup per token):
               the forward also writes the two unscaled per-token gradients, which the
               backward reads and rescales ("gradient in forward", Liger style).
GB/s = bytes / time; "% copy" = minimal-bytes GB/s / the copy's GB/s, where the copy moves the
minimal bytes (it reads 29/2 and writes 29/2 B/token, GB/s counting read + write).
At 256k tokens the op moves ~7.6 MB, a few microseconds of HBM time: timed from Python it is
launch-bound (triton: 3 forward launches incl. the finalize, 1 backward; eager: dozens), so on CUDA
every row is also timed replayed from a CUDA graph (graph_* columns: the GPU's own time, no host
overhead), and a second, bandwidth-bound size runs (--big-tokens, default 16M tokens on CUDA).

Writes bench/results/grpo_loss-<gpu|cpu>.json (GPU name, versions, git commit, per-impl times)
and prints a table. `main(argv)` returns the result dict.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels.grpo_loss as grpo_mod  # noqa: E402
from kernels.grpo_loss import count_normalisers, grpo_loss  # noqa: E402
from kernels.reference import grpo_loss_reference  # noqa: E402

from bench.common import env_info, format_table, gpu_tag, time_call, write_json  # noqa: E402

MIN_BYTES_PER_TOKEN = 5 * 4 + 1 + 2 * 4
BYTES_FORMULA = ("minimal = N*(5*4 + 1 + 2*4) B (read logp, old_logp, advantages, ref_logp, entropy "
                 "fp32 + mask bool; write dlogp, dentropy fp32); triton actual = N*45 B (+1N in "
                 "seq-mean-token-mean: the per-sequence count reads the mask)")
LOSS_KW = dict(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=1e-3, kl_type="k3", entropy_coef=1e-3,
               norm_const=4096.0)


def make_inputs(n, seq_len, device, seed=0):
    """Packed inputs of n tokens: dict of [n] tensors + cu_seqlens [B+1] int32."""
    g = torch.Generator().manual_seed(seed)
    lens = [seq_len] * (n // seq_len) + ([n % seq_len] if n % seq_len else [])
    lengths = torch.tensor(lens)
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    adv = torch.repeat_interleave(torch.randn(len(lens), generator=g), lengths)
    logp = -torch.rand(n, generator=g) * 3.0
    d = dict(logp=logp, old_logp=logp + 0.3 * torch.randn(n, generator=g), advantages=adv,
             mask=torch.rand(n, generator=g) > 0.2, ref_logp=logp + 0.3 * torch.randn(n, generator=g),
             entropy=torch.rand(n, generator=g) * 2.0, cu_seqlens=cu)
    # the global normalisers as the trainer passes them: Python ints counted once per mini-batch
    tokens, seqs = count_normalisers(d["mask"], cu)
    globals_ = dict(global_tokens=int(tokens), global_seqs=int(seqs))
    d = {k: v.to(device) for k, v in d.items()}
    d["globals"] = globals_
    return d


def _step_fn(fn, x, mode):
    logp = x["logp"].clone().requires_grad_()
    ent = x["entropy"].clone().requires_grad_()

    def step():
        loss, stats = fn(logp, x["old_logp"], x["advantages"], x["mask"], x["ref_logp"], loss_agg=mode,
                         cu_seqlens=x["cu_seqlens"], entropy=ent, **x["globals"], **LOSS_KW)
        return torch.autograd.grad(loss, (logp, ent))

    return step


def graph_seconds(fn, iters):
    """Seconds of one call of `fn` replayed from a CUDA graph (the GPU time without the host's
    launch overhead). fn must not synchronise with the host; capture errors propagate."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotune, autograd buffers) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_call(graph.replay, iters, True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_grpo_loss", description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--tokens", type=int, default=262144 if cuda else 4096)
    ap.add_argument("--big-tokens", type=int, default=16 * 2**20 if cuda else 0,
                    help="a second, bandwidth-bound size (0: none)")
    ap.add_argument("--seq-len", type=int, default=2048 if cuda else 512)
    ap.add_argument("--modes", default="token-mean,seq-mean-token-mean")
    ap.add_argument("--iters", type=int, default=50 if cuda else 5)
    ap.add_argument("--fwd-tiles", type=int, default=None,
                    help="tiles per forward program on large batches (tuning; default: the shipped FWD_TILES)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--compile", action="store_true", help="run torch.compile on CPU too (slow to build)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/grpo_loss-<gpu|cpu>.json)")
    a = ap.parse_args(argv)

    dev = torch.device("cuda" if cuda else "cpu")
    if a.fwd_tiles is not None:
        if a.fwd_tiles < 1:
            raise SystemExit(f"bench_grpo_loss: --fwd-tiles must be >= 1, got {a.fwd_tiles}")
        grpo_mod.FWD_TILES = a.fwd_tiles
    env = env_info()
    n = a.tokens
    sizes = [n] + ([a.big_tokens] if a.big_tokens > 0 and a.big_tokens != n else [])

    impls = {"torch_eager": grpo_loss_reference}
    run_triton = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if run_triton:
        impls = {"triton": lambda *args, **kw: grpo_loss(*args, impl="triton", **kw), **impls}
    if not a.no_compile and (cuda or a.compile):
        impls["torch_compile"] = torch.compile(grpo_loss_reference)

    out = a.out or os.path.join(ROOT, "bench", "results", f"grpo_loss-{gpu_tag(env.get('gpu'))}.json")
    copies = {}

    def save(rows, complete):  # after every mode too: a run cut short keeps what it measured
        result = {"bench": "grpo_loss", "device": "cuda" if cuda else "cpu", "gpu": env.get("gpu"),
                  "torch": torch.__version__, "triton": env.get("triton"), "git_commit": env.get("commit"),
                  "env": env, "tokens": n, "sizes": sizes, "fwd_tiles": grpo_mod.FWD_TILES,
                  "seq_len": a.seq_len, "iters": a.iters,
                  "loss_kwargs": LOSS_KW, "bytes_formula": BYTES_FORMULA, "min_bytes": n * MIN_BYTES_PER_TOKEN,
                  "complete": complete, "copy": copies.get(n), "copy_by_tokens": copies, "results": rows}
        # headline: the triton token-mean row at the largest size (GPU time where a graph was timed)
        top = [r for r in rows if r["impl"] == "triton" and r["mode"] == "token-mean" and r.get("status") == "ok"
               and r["tokens"] == sizes[-1]]
        if complete and top:
            r = top[0]
            result["headline"] = {"pct_of_copy": r.get("graph_actual_pct_of_copy", r["pct_of_copy"]),
                                  "speedup_vs_eager": r["speedup_vs_eager"]}
            comp = [q for q in rows if q["impl"] == "torch_compile" and q["mode"] == r["mode"]
                    and q["tokens"] == r["tokens"] and q.get("status") == "ok"]
            if comp:  # GPU time (graph replay) where both have it
                key = "graph_ms" if "graph_ms" in r and "graph_ms" in comp[0] else "ms"
                result["headline"]["speedup_vs_compile"] = comp[0][key] / r[key]
            seq = [q for q in rows if q["impl"] == "triton" and q["mode"] == "seq-mean-token-mean"
                   and q["tokens"] == r["tokens"] and q.get("status") == "ok"]
            if seq:
                q = seq[0]
                result["headline"]["pct_of_copy_seq_mean"] = q.get("graph_actual_pct_of_copy", q["pct_of_copy"])
        write_json(out, result)
        return result

    rows = []
    for size in sizes:
        x = make_inputs(size, a.seq_len, dev)
        min_bytes = size * MIN_BYTES_PER_TOKEN
        # bandwidth bar: a device-to-device copy moving the minimal bytes (half read, half written)
        src = torch.empty(min_bytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_copy = time_call(lambda: dst.copy_(src), a.iters, cuda)
        copy = {"bytes_read_plus_written": 2 * (min_bytes // 2), "ms": t_copy * 1e3,
                "gbps": 2 * src.numel() / t_copy / 1e9}
        if cuda:
            tg = graph_seconds(lambda: dst.copy_(src), a.iters)
            copy.update(graph_ms=tg * 1e3, graph_gbps=2 * src.numel() / tg / 1e9)
        copies[size] = copy
        src = dst = None  # free the copy buffers before the loss runs
        for mode in a.modes.split(","):
            ref_loss = None
            eager_s = None
            for name, fn in impls.items():
                row = {"mode": mode, "impl": name, "tokens": size}
                moved = size * (45 + (1 if mode == "seq-mean-token-mean" else 0)) if name == "triton" else None
                try:
                    step = _step_fn(fn, x, mode)
                    secs = time_call(step, a.iters, cuda)
                    loss = fn(x["logp"], x["old_logp"], x["advantages"], x["mask"], x["ref_logp"], loss_agg=mode,
                              cu_seqlens=x["cu_seqlens"], entropy=x["entropy"], **x["globals"],
                              **LOSS_KW)[0].item()
                except Exception as e:  # report, keep benchmarking the others
                    row.update(status=f"error: {type(e).__name__}: {str(e)[:200]}")
                    rows.append(row)
                    continue
                if name == "torch_eager":
                    eager_s, ref_loss = secs, loss
                row.update(status="ok", ms=secs * 1e3, gbps=min_bytes / secs / 1e9,
                           pct_of_copy=100 * (min_bytes / secs / 1e9) / copy["gbps"],
                           actual_gbps=None if moved is None else moved / secs / 1e9, loss=loss)
                if cuda:
                    try:
                        tg = graph_seconds(step, a.iters)
                        row.update(graph_ms=tg * 1e3, graph_gbps=min_bytes / tg / 1e9,
                                   graph_pct_of_copy=100 * (min_bytes / tg / 1e9) / copy["graph_gbps"],
                                   graph_actual_gbps=None if moved is None else moved / tg / 1e9,
                                   graph_actual_pct_of_copy=None if moved is None else
                                   100 * (moved / tg / 1e9) / copy["graph_gbps"])
                    except Exception as e:  # e.g. a host sync in the reference: no graph for it
                        row["graph_status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
            for row in rows:
                if row["tokens"] == size and row["mode"] == mode and row.get("status") == "ok":
                    row["speedup_vs_eager"] = eager_s / (row["ms"] / 1e3) if eager_s else None
                    row["loss_diff_vs_eager"] = abs(row["loss"] - ref_loss) if ref_loss is not None else None
            save(rows, False)
        del x
    result = save(rows, True)

    cols = ["tokens", "mode", "impl", "status", "ms", "gbps", "pct_of_copy", "actual_gbps", "speedup_vs_eager",
            "loss_diff_vs_eager"] + (["graph_ms", "graph_pct_of_copy", "graph_actual_pct_of_copy"] if cuda else [])
    for size, c in copies.items():
        graph = f", from a CUDA graph {c['graph_gbps']:.1f} GB/s" if "graph_gbps" in c else ""
        print(f"grpo_loss fwd+bwd, {size} tokens, {env.get('gpu') or 'cpu'}; d2d copy {c['gbps']:.1f} GB/s "
              f"({c['ms']:.4f} ms){graph}")
    print(BYTES_FORMULA)
    print(format_table(rows, cols))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
