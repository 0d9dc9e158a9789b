"""Tune the Triton log-prob kernels' launch configs on a GPU at one size (bf16, H=5120, V=152064).

    python -m bench.tune_logprob [--tokens 16384] [--fwd CFG;CFG...] [--bwd CFG;CFG...]
                                 [--out JSON] [--table kernels/logprob_configs.json]

A config is "BTxBVxBH:wW:sS[:gG]:tma|ptr[:flat]" (kernels.logprob.parse_config): tile sizes,
warps, stages, token-block group of the backward, whether hidden/weight tiles come through TMA
tensor descriptors or pointer loads, and whether the loops are flattened (persistent programs in
the backward). Steps, each timed with triton.testing.do_bench (median):
  1. every forward config: forward time (no grad), TFLOP/s and % of the bf16 GEMM measured in the
     same run, the logp error against an fp32 oracle of the same bf16 inputs (first 256 tokens)
     and the largest logp difference from the first config;
  2. every backward config, behind the fastest correct forward: forward + backward time and the
     largest relative difference of dX and dW from the first configs' gradients.
A config whose results leave the tolerances (logp 1e-3 from the oracle; dX, dW 2e-2 relative) is
marked wrong and never chosen. Writes JSON (bench/results/tune_logprob-<gpu>.json by default), a
table, and with --table the fastest correct pair into that launch-config table under this GPU's
name (kernels/logprob_configs.json: the kernels read it at import).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import kernels.logprob as lp  # noqa: E402
from kernels.reference import logprobs_reference  # noqa: E402

from bench.common import env_info, format_table, gpu_tag, matmul_seconds, time_call, write_json  # noqa: E402

# the first of each list is the baseline the others are compared with: the pointer-load 128 x 128
# configs shipped before the TMA tuning. The ":flat" ones (one flattened tile x H loop; persistent
# programs in the backward) are not yet timed on a GPU; tests/test_kernel_report.py compiles them
# for sm_90 (spill-free under triton 3.6 and 3.8).
FWD = ("128x128x64:w8:s3:ptr;256x128x64:w8:s3:tma;256x128x64:w8:s4:tma;128x256x64:w8:s3:tma;128x128x64:w8:s3:tma;"
       "256x128x64:w8:s3:tma:flat")
BWD = ("128x128x64:w8:s3:g8:ptr;128x128x64:w8:s4:g8:tma;128x128x64:w8:s4:g4:tma;128x128x64:w8:s3:g8:tma;"
       "128x128x64:w8:s4:g8:tma:flat;128x128x64:w8:s2:g8:tma:flat")
LOGP_TOL, GRAD_TOL = 1e-3, 2e-2


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# kernels.logprob settings the tuning sets while it runs; main restores them (in-process callers)
_SETTINGS = ("CONFIGS", "INTERP_CONFIG", "INTERP_BWD_CONFIG")


def write_table(path, gpu, fwd, bwd, source):
    """Set entry `gpu` of the launch-config table at `path` (kernels.logprob.load_configs' form) to
    the configs fwd / bwd, keeping the other entries; checked by reading it back."""
    with open(path) as f:
        table = json.load(f)
    table[gpu] = {"fwd": fwd, "bwd": bwd, "source": source}
    with open(path, "w") as f:
        json.dump(table, f, indent=2)
        f.write("\n")
    lp.load_configs(path)


def main(argv=None):
    saved = {k: getattr(lp, k) for k in _SETTINGS}
    try:
        return _tune(argv)
    finally:
        for k, v in saved.items():
            setattr(lp, k, v)


def _tune(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.tune_logprob", description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    ap.add_argument("--tokens", type=int, default=16384 if cuda else 200)
    ap.add_argument("--hidden", type=int, default=5120 if cuda else 64)
    ap.add_argument("--vocab", type=int, default=152064 if cuda else 1000)
    ap.add_argument("--fwd", default=FWD, help="';'-separated forward configs (the first is the baseline)")
    ap.add_argument("--bwd", default=BWD, help="';'-separated backward configs (the first is the baseline)")
    ap.add_argument("--rep", type=int, default=1000,
                    help="do_bench repetition time, ms (>= 5 timed calls of a ~0.2 s fwd+bwd)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", default=None,
                    help="write the chosen pair into this launch-config table under the GPU's name "
                         "(kernels/logprob_configs.json)")
    a = ap.parse_args(argv)
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("tune_logprob: needs a CUDA GPU (or TRITON_INTERPRET=1 for a dry run of the flow)")
    if cuda:
        from triton.testing import do_bench
    else:  # the interpreter: checks the flow and the results, times nothing meaningful
        def do_bench(fn, rep, return_mode):
            return time_call(fn, 1, False, warmup=0) * 1e3

    if a.table:
        lp.load_configs(a.table)  # a broken table stops here, before any GPU time is spent
    fwd_base, bwd_base = lp.CONFIGS["default"]
    fwd_cfgs = [lp.parse_config(c, fwd_base, "--fwd") for c in a.fwd.split(";") if c]
    bwd_cfgs = [lp.parse_config(c, bwd_base, "--bwd") for c in a.bwd.split(";") if c]

    def use(fwd_c, bwd_c):  # the configs every launch of this process takes
        if cuda:
            lp.CONFIGS = {"default": (fwd_c, bwd_c)}
        else:
            lp.INTERP_CONFIG, lp.INTERP_BWD_CONFIG = fwd_c, bwd_c

    env = env_info()
    out = a.out or os.path.join(ROOT, "bench", "results", f"tune_logprob-{gpu_tag(env.get('gpu'))}.json")
    dev = torch.device("cuda" if cuda else "cpu")
    T, H, V, temp = a.tokens, a.hidden, a.vocab, 0.8
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 dots are wrong
    g = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, H, generator=g).to(dev, dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H) * 2).to(dev, dtype)
    t = torch.randint(0, V, (T,), generator=g).to(dev)
    t[::17] = -100
    gl, ge = torch.randn(T, generator=g).to(dev), torch.randn(T, generator=g).to(dev)
    n_err = min(T, 256)
    with torch.no_grad():
        ref_lp, _ = logprobs_reference(x[:n_err].float(), w.float(), t[:n_err], temp, compute_dtype=torch.float32)
    mm = 2 * 8192 ** 3 / matmul_seconds(8192) / 1e12 if cuda else float("nan")
    fl_f, fl_fb = 2 * T * H * V, 8 * T * H * V
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return lp.fused_logprobs(x, w, t, temp, return_entropy=True, impl="triton")

    def fb():
        xr.grad = wr.grad = None
        logp, ent = lp.fused_logprobs(xr, wr, t, temp, return_entropy=True, impl="triton")
        ((logp * gl).sum() + (ent * ge).sum()).backward()

    rows, result = [], {"bench": "tune_logprob", "gpu": env.get("gpu"), "env": env, "tokens": T, "H": H,
                        "V": V, "matmul_tflops": mm, "logp_tol": LOGP_TOL, "grad_tol": GRAD_TOL}

    def save(complete):
        result.update(rows=rows, complete=complete)
        write_json(out, result)

    def record(row, measure):
        """row.update(measure()) (a failure: ok False and its message), then keep and save it."""
        try:
            row.update(measure())
        except Exception as e:  # a config that does not compile or launch here: report, go on
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        rows.append(row)
        print(row, flush=True)
        save(False)

    base_lp = []  # the first config's logp

    def measure_fwd():
        logp = fwd()[0]
        base_lp.append(logp)
        ms = do_bench(fwd, rep=a.rep, return_mode="median")
        err = (logp[:n_err] - ref_lp).abs().max().item()
        diff = (logp - base_lp[0]).abs().max().item()
        return dict(ms=ms, tflops=fl_f / ms / 1e9, pct_matmul=100 * fl_f / ms / 1e9 / mm, err_logp=err,
                    diff_vs_first=diff, ok=err <= LOGP_TOL and diff <= LOGP_TOL)

    for c in fwd_cfgs:
        use(c, bwd_cfgs[0])
        record(dict(step="fwd", config=lp.format_config(c)), measure_fwd)
    good = [r for r in rows if r["step"] == "fwd" and r.get("ok")]
    best_fwd = min(good, key=lambda r: r["ms"]) if good else None
    best_fwd_cfg = lp.parse_config(best_fwd["config"], fwd_cfgs[0]) if best_fwd else fwd_cfgs[0]

    base = []  # the baseline pair's gradients

    def measure_fb():
        fb()
        grads = (xr.grad.clone(), wr.grad.clone())
        base.append(grads)
        ms = do_bench(fb, rep=a.rep, return_mode="median")
        dx, dw = _rel(grads[0], base[0][0]), _rel(grads[1], base[0][1])
        return dict(ms=ms, tflops=fl_fb / ms / 1e9, pct_matmul=100 * fl_fb / ms / 1e9 / mm,
                    diff_dx=dx, diff_dw=dw, ok=dx <= GRAD_TOL and dw <= GRAD_TOL)

    # the baseline pair (the first configs of both lists), then every backward config behind the
    # fastest correct forward
    for k, c in enumerate([bwd_cfgs[0]] + bwd_cfgs):
        fwd_c = fwd_cfgs[0] if k == 0 else best_fwd_cfg
        use(fwd_c, c)
        record(dict(step="baseline" if k == 0 else "fwd+bwd", config=lp.format_config(c),
                    fwd_config=lp.format_config(fwd_c)), measure_fb)
        del base[1:]  # keep the baseline's gradients only
    good = [r for r in rows if r["step"] == "fwd+bwd" and r.get("ok")]
    best_bwd = min(good, key=lambda r: r["ms"]) if good else None
    result["best"] = {"fwd": best_fwd and best_fwd["config"], "bwd": best_bwd and best_bwd["config"]}

    first = [r for r in rows if r["step"] == "baseline" and r.get("ok")]
    if best_fwd and best_bwd and first:
        result["headline"] = {"best_fwd_pct_matmul": best_fwd["pct_matmul"],
                              "best_fwd_bwd_pct_matmul": best_bwd["pct_matmul"],
                              "speedup_fwd_bwd_vs_baseline": first[0]["ms"] / best_bwd["ms"]}
    save(True)
    print(format_table(rows, ["step", "config", "fwd_config", "ms", "tflops", "pct_matmul", "err_logp", "diff_vs_first",
                              "diff_dx", "diff_dw", "ok", "error"]))
    print(f"best: fwd {result['best']['fwd']}  bwd {result['best']['bwd']}  (GEMM {mm:.0f} TFLOP/s this run)")
    if a.table and best_fwd and best_bwd:
        gpu = torch.cuda.get_device_name() if cuda else "interpreter"
        write_table(a.table, gpu, best_fwd["config"], best_bwd["config"],
                    f"bench/tune_logprob.py at {T} tokens, H={H}, V={V}, commit {env.get('commit')}")
        print(f"{a.table}: {gpu} -> fwd {best_fwd['config']}, bwd {best_bwd['config']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
