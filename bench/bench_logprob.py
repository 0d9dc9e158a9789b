"""Benchmark of kernels.logprob.fused_logprobs (log-probs + entropy of hidden @ W^T / tau).

    python -m bench.bench_logprob [--sizes 4096,8192,16384,32768] [--quick] [--no-compile]
                                  [--impls a,b] [--out PATH]

CUDA: H=5120, V=152064 (Qwen2.5-14B/32B head), bf16, temperature 0.8, entropy on, upstream grads
on both outputs. Median times by triton.testing.do_bench (>= 5 timed calls) for forward (no grad)
and forward + backward, for
  triton          our fused kernels (impl="triton"), default backward scratch budget (1 GiB)
  triton_lowmem   the same with bwd_scratch_bytes = LOW_SCRATCH (88 MiB: under 10^8 bytes beyond
                  the gradients with the forward's statistics on top): the two-walk backward at
                  the goal sizes (each triton row records its plan, kernels.logprob.backward_plan)
  torch_chunked_compiled   the chunked torch path (impl="torch") with its chunk bodies compiled by
                  torch.compile (kernels.logprob.compile_torch_chunks; the loops stay in Python)
  torch_eager     materialised [T, V] logits -> log_softmax -> gather + entropy (skipped, and
                  reported, where its estimated memory would not fit)
  liger_flce      Liger's LigerFusedLinearCrossEntropyLoss (reduction="none", no entropy), if
                  importable
TFLOP/s counts only the projection GEMMs: forward 2*T*H*V; forward + backward with the logits
recomputed in backward 8*T*H*V (2 fwd + 2 recompute + 2 dX + 2 dW), used for every impl so the
numbers compare time. "% of matmul" is against a bf16 8192^3 torch.matmul measured in the same run.
Peak extra memory = max_memory_allocated during fwd+bwd minus the memory held before it; "-grads"
subtracts the gradients dX and dW themselves (outputs every implementation holds), leaving the
working memory (for triton: within bwd_scratch_bytes plus the forward's [T] statistics).
Errors are against an fp32 reference of the same bf16 inputs on the first 256 tokens; the dX /
dW errors ("dX err", "dW err": max |error| / max |reference|) come from a separate fwd+bwd of each
implementation on those tokens with the same random signed per-token upstream gradients
(`grad_errors`), which also checks the baselines' backward.

CPU: a small size (T=512, H=64, V=4099, fp32; --quick: T=256) comparing the chunked torch path
with the eager reference, in seconds (median of a few runs), plus max |logp - fp64 reference|.

Writes bench/results/logprob-<gpu-name|cpu>.json (GPU name, torch/triton versions, git commit) and
prints a table. `main(argv)` returns the JSON dict.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import git_commit, matmul_seconds, time_call, write_json  # noqa: E402
from kernels.logprob import backward_plan, compile_torch_chunks, fused_logprobs  # noqa: E402
from kernels.reference import logprobs_reference  # noqa: E402

FLOPS_FORMULA = "fwd: 2*T*H*V; fwd+bwd (recompute): 8*T*H*V"
LOW_SCRATCH = 88 << 20  # the triton_lowmem row's backward budget: 92.3 MB, under the 100 MB goal
# the rows of our kernels: their backward scratch budget (None: the kernel's default)
TRITON_ROWS = {"triton": None, "triton_lowmem": LOW_SCRATCH}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _versions():
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    return torch.__version__, tv


def _inputs(T, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(T, H, generator=g)).to(device=device, dtype=dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (T,), generator=g).to(device)
    t[::17] = -100
    gl = torch.randn(T, generator=g).to(device)
    ge = torch.randn(T, generator=g).to(device)
    return x, w, t, gl, ge


def _make_impls(temp, on_cuda, compile_torch=True):
    def fused(impl, scratch=None):
        return lambda x, w, t: fused_logprobs(x, w, t, temp, return_entropy=True, impl=impl,
                                              bwd_scratch_bytes=scratch)

    impls = {}
    if on_cuda:
        for name, scratch in TRITON_ROWS.items():
            impls[name] = fused("triton", scratch)
        if compile_torch:  # one graph per chunk shape (a few per token count), not the loops
            compile_torch_chunks(dynamic=False)
            impls["torch_chunked_compiled"] = fused("torch")
    else:
        impls["torch_chunked"] = fused("torch")
    impls["torch_eager"] = lambda x, w, t: logprobs_reference(x, w, t, temp, compute_dtype=x.dtype)
    if on_cuda:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=-100)

            def liger(x, w, t):  # logp = -CE of (x, W / tau); no entropy
                return -ce(w, x / temp, t), None

            impls["liger_flce"] = liger
        except Exception:
            pass
    return impls


def _plan_text(plan, N, V):
    """kernels.logprob.BwdPlan for N tokens in words."""
    if plan.tc >= N:
        return f"one walk: vocabulary chunks of {plan.vc} with the fp32 dX accumulator"
    return (f"two walks: dX in {plan.tc}-token groups ({-(-N // plan.tc)}) over vocabulary chunks of "
            f"{plan.vc}; dW in vocabulary chunks of {plan.vc_dw}")


def _fwd_bwd(fn, x, w, t, gl, ge):
    logp, ent = fn(x, w, t)
    loss = (logp * gl).sum()
    if ent is not None:
        loss = loss + (ent * ge).sum()
    loss.backward()


def _grads(fn, x, w, t, gl, ge):
    """(dX, dW in fp32, whether fn returns entropy) of sum(logp * gl) + sum(entropy * ge)."""
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = fn(xr, wr, t)
    loss = (logp.float() * gl).sum()
    if ent is not None and ge is not None:
        loss = loss + (ent.float() * ge).sum()
    dx, dw = torch.autograd.grad(loss, (xr, wr))
    return dx.float(), dw.float(), ent is not None


def grad_errors(fn, x, w, t, gl, ge, temp, n):
    """Relative max errors (max |got - ref| / max |ref|) of dX and dW on the first n tokens against
    an fp32 (fp64 for fp32 inputs) reference of the same inputs, with random signed per-token upstream
    gradients (the entropy term where fn returns entropy). A baseline whose backward is wrong for
    per-token gradients shows here (Liger's FLCE with reduction="none" scaled every row by
    grad_output[0] before its PR #1298)."""
    xs, ts, gls, ges = x[:n], t[:n], gl[:n], ge[:n]
    dx, dw, has_ent = _grads(fn, xs, w, ts, gls, ges)
    oracle = torch.float64 if x.dtype == torch.float32 else torch.float32
    rx, rw, _ = _grads(lambda a, b, c: logprobs_reference(a, b, c, temp, compute_dtype=oracle),
                       xs.to(oracle), w.to(oracle), ts, gls.to(oracle), ges.to(oracle) if has_ent else None)
    def rel(a, r):
        return ((a.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()

    return rel(dx, rx), rel(dw, rw)


def _step_fns(fn, x, w, t, gl, ge):
    """(forward without grad, forward + backward, the grad-requiring copies of x and w) of one
    implementation on fixed inputs."""
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            fn(x, w, t)

    def fb():
        xr.grad = wr.grad = None
        _fwd_bwd(fn, xr, wr, t, gl, ge)

    return fwd, fb, xr, wr


def run_cpu(quick):
    T, H, V = (256 if quick else 512), 64, 4099
    reps = 3 if quick else 5
    temp = 0.8
    x, w, t, gl, ge = _inputs(T, H, V, torch.float32, "cpu")
    ref_lp, _ = logprobs_reference(x.double(), w.double(), t, temp)
    rows = []
    for name, fn in _make_impls(temp, on_cuda=False).items():
        with torch.no_grad():
            lp, _ = fn(x, w, t)
        err = (lp.double() - ref_lp).abs().max().item()
        fwd, fb, _, _ = _step_fns(fn, x, w, t, gl, ge)
        err_dx, err_dw = grad_errors(fn, x, w, t, gl, ge, temp, T)
        rows.append(dict(T=T, H=H, V=V, dtype="fp32", impl=name, fwd_s=time_call(fwd, reps, False, warmup=1),
                         fwd_bwd_s=time_call(fb, reps, False, warmup=1), max_abs_err_logp=err,
                         rel_err_dx=err_dx, rel_err_dw=err_dw, err_vs="fp64 reference"))
    return rows


def _eager_bytes(T, V):
    # bf16 logits + fp32 copy + log_softmax + exp + grads of each: ~ 24 bytes per logit
    return 24 * T * V


def run_cuda(sizes, quick, compile_torch=True, on_size=None, only=None, device="cuda", H=5120, V=152064,
             dtype=torch.bfloat16):
    """Rows of every size x implementation (or those named in `only`); on_size(rows) after each
    size (partial results). device / H / V / dtype: the goal's shape on a GPU by default (a test
    runs this loop on the CPU under the Triton interpreter at a tiny shape)."""
    from triton.testing import do_bench

    dev = torch.device(device)
    temp = 0.8
    # do_bench repetition time, ms: triton times max(1, rep / one call) calls after its estimate, so
    # at 16k tokens (~0.2 s per fwd+bwd) rep = 20 took the "median" of a single call; >= 5 calls here
    rep = 1200 if quick else 2500
    compile_torch = compile_torch and (not only or "torch_chunked_compiled" in only)
    impls = _make_impls(temp, on_cuda=True, compile_torch=compile_torch)
    if only:
        unknown = set(only) - set(impls)
        if unknown:
            raise SystemExit(f"bench_logprob: --impls {','.join(sorted(unknown))} not available here "
                             f"(have {','.join(impls)})")
        impls = {k: v for k, v in impls.items() if k in only}
    mm_tflops = 2 * 8192 ** 3 / matmul_seconds(8192) / 1e12  # the bf16 GEMM ceiling, this run
    rows = []
    for T in sizes:
        x, w, t, gl, ge = _inputs(T, H, V, dtype, dev, seed=T)
        # error oracle: the same bf16 inputs in fp32 on the first tokens (a full fp32 [T, V] would
        # not fit); both impls are compared with it, so the column says which one is closer
        n_err = min(T, 256)
        with torch.no_grad():
            ref_lp, _ = logprobs_reference(x[:n_err].float(), w.float(), t[:n_err], temp,
                                           compute_dtype=torch.float32)
        for name, fn in impls.items():
            row = dict(T=T, H=H, V=V, dtype=DTYPE_NAMES[dtype], impl=name, matmul_tflops=mm_tflops)
            if name in TRITON_ROWS:
                row["bwd_plan"] = _plan_text(backward_plan(x, w, TRITON_ROWS[name]), T, V)
            if name == "torch_eager":
                free, _ = torch.cuda.mem_get_info()
                need = _eager_bytes(T, V)
                if need > 0.9 * free:
                    row["skipped"] = f"would OOM: needs ~{need / 2**30:.0f} GiB, " \
                                     f"{free / 2**30:.0f} GiB free"
                    rows.append(row)
                    continue
            fwd, fb, xr, wr = _step_fns(fn, x, w, t, gl, ge)
            try:
                with torch.no_grad():
                    lp, _ = fn(x, w, t)
                row["max_abs_err_logp"] = (lp[:n_err].float() - ref_lp).abs().max().item()
                del lp
                row["err_vs"] = f"fp32 reference of the {row['dtype']} inputs, first {n_err} tokens"
                fwd_ms = do_bench(fwd, rep=rep, return_mode="median")
                fb_ms = do_bench(fb, rep=rep, return_mode="median")
                torch.cuda.synchronize()
                xr.grad = wr.grad = None
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fb()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                # the gradients dX [T, H] and dW [V, H] are outputs any implementation must hold;
                # what is left is the working memory (chunks, accumulators, saved statistics)
                grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in (xr, wr) if p.grad is not None)
                fl_f, fl_fb = 2 * T * H * V, 8 * T * H * V
                row.update(fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, fwd_s=fwd_ms / 1e3, fwd_bwd_s=fb_ms / 1e3,
                           tflops_fwd=fl_f / (fwd_ms * 1e-3) / 1e12,
                           tflops_fwd_bwd=fl_fb / (fb_ms * 1e-3) / 1e12,
                           peak_extra_gib=peak / 2**30, peak_beyond_grads_mib=(peak - grad_bytes) / 2**20)
                row["pct_matmul_fwd"] = 100 * row["tflops_fwd"] / mm_tflops
                row["pct_matmul_fwd_bwd"] = 100 * row["tflops_fwd_bwd"] / mm_tflops
            except torch.OutOfMemoryError as e:
                row["skipped"] = f"OOM: {str(e).splitlines()[0]}"
            except Exception as e:  # report and go on (e.g. a compile failure)
                row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del xr, wr
            torch.cuda.empty_cache()
            if "skipped" not in row:  # after the timing: a failure here keeps the row's numbers
                try:
                    row["rel_err_dx"], row["rel_err_dw"] = grad_errors(fn, x, w, t, gl, ge, temp, n_err)
                except Exception as e:
                    row["grad_err_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
            rows.append(row)
        del x, w, t, gl, ge
        torch.cuda.empty_cache()
        if on_size is not None:
            on_size(rows)
    return rows


def format_table(rows):
    out = []
    if rows and "fwd_ms" in rows[0] or any("matmul_tflops" in r for r in rows):
        out.append(f"{'T':>6} {'impl':<24} {'fwd ms':>8} {'f+b ms':>8} {'TF/s f':>7} {'TF/s fb':>7} "
                   f"{'%mm fb':>6} {'peak GiB':>8} {'-grads MiB':>10} {'err':>8} {'dX err':>8} {'dW err':>8}")
        for r in rows:
            if "skipped" in r:
                out.append(f"{r['T']:>6} {r['impl']:<24} skipped: {r['skipped']}")
                continue
            out.append(f"{r['T']:>6} {r['impl']:<24} {r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>8.2f} "
                       f"{r['tflops_fwd']:>7.1f} {r['tflops_fwd_bwd']:>7.1f} "
                       f"{r['pct_matmul_fwd_bwd']:>6.1f} {r['peak_extra_gib']:>8.2f} "
                       f"{r.get('peak_beyond_grads_mib', float('nan')):>10.0f} "
                       f"{r['max_abs_err_logp']:>8.2e} {r.get('rel_err_dx', float('nan')):>8.2e} "
                       f"{r.get('rel_err_dw', float('nan')):>8.2e}")
    else:
        out.append(f"{'T':>6} {'H':>5} {'V':>6} {'impl':<16} {'fwd s':>9} {'fwd+bwd s':>10} {'err':>9} "
                   f"{'dX err':>9} {'dW err':>9}")
        for r in rows:
            out.append(f"{r['T']:>6} {r['H']:>5} {r['V']:>6} {r['impl']:<16} {r['fwd_s']:>9.4f} "
                       f"{r['fwd_bwd_s']:>10.4f} {r['max_abs_err_logp']:>9.2e} {r['rel_err_dx']:>9.2e} "
                       f"{r['rel_err_dw']:>9.2e}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description="fused log-prob benchmark")
    ap.add_argument("--sizes", default="4096,8192,16384,32768", help="token counts T (CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes / repetitions")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the chunked torch path (CUDA)")
    ap.add_argument("--impls", default="", help="comma-separated implementations to run (CUDA; default all)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/logprob-<dev>.json)")
    a = ap.parse_args(argv)
    tv, trv = _versions()
    on_cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    slug = "cpu" if not on_cuda else "".join(c if c.isalnum() else "-" for c in device.lower())
    path = a.out or os.path.join(ROOT, "bench", "results", f"logprob-{slug}.json")

    def save(rows, complete):  # after every size too: a run cut short keeps what it measured
        res = dict(device=device, torch=tv, triton=trv, git_commit=git_commit(), complete=complete,
                   flops_formula=FLOPS_FORMULA, results=rows)
        ours = [r for r in rows if r["impl"] in ("triton", "torch_chunked") and "fwd_bwd_s" in r]
        if complete and ours:  # headline: our implementation at the largest size measured
            r = ours[-1]
            res["headline"] = ({"pct_matmul_fwd_bwd": r["pct_matmul_fwd_bwd"],
                                "beyond_grads_mib": r["peak_beyond_grads_mib"]}
                               if "pct_matmul_fwd_bwd" in r else {"T": r["T"], "fwd_bwd_s": r["fwd_bwd_s"]})
            same_t = {q["impl"]: q for q in rows if q["T"] == r["T"] and "fwd_bwd_s" in q}
            if "triton_lowmem" in same_t:
                low = same_t["triton_lowmem"]
                res["headline"].update(pct_matmul_fwd_bwd_lowmem=low["pct_matmul_fwd_bwd"],
                                       beyond_grads_mb_lowmem=low["peak_beyond_grads_mib"] * 2**20 / 1e6)
            for base in ("torch_chunked_compiled", "liger_flce"):  # fwd+bwd time ratios
                if base in same_t and r["impl"] == "triton":
                    res["headline"][f"speedup_vs_{base}"] = same_t[base]["fwd_bwd_s"] / r["fwd_bwd_s"]
        write_json(path, res)
        return res

    if on_cuda:
        sizes = [int(s) for s in a.sizes.split(",") if s]
        if a.quick:
            sizes = sizes[:2]
        rows = run_cuda(sizes, a.quick, compile_torch=not a.no_compile, on_size=lambda r: save(r, False),
                        only=[s for s in a.impls.split(",") if s])
    else:
        rows = run_cpu(a.quick)
    res = save(rows, True)
    print(f"device: {device}  torch {tv}  triton {trv}  ({FLOPS_FORMULA})")
    print(format_table(rows))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
