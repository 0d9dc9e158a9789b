"""CPU benchmark entry: `python -m bench` (or `make bench`).

Runs everything measurable without a GPU, at small sizes, each piece in its own subprocess under a
time limit (a failing or missing piece is reported, never fatal):
  pack          padding waste and planner speed (bench/bench_pack.py --small)
  profile_step  packed vs padded tiny-model GRPO step, long-tail lengths (goal: packed <= 0.6x padded)
  kernel_report ahead-of-time sm_90 compile: registers, spills, shared memory (goal: no spills)
  logprob       fused log-prob CPU sizes (bench/bench_logprob.py --quick)
  grpo_loss     GRPO loss CPU sizes (bench/bench_grpo_loss.py)
  rollout       tiny-model decode vs transformers.generate, and the long-tail scenario: static
                batches vs continuous admission vs the paged cache (bench/bench_rollout.py, 1 thread)
  decode_attn   decode attention kernels on the CPU case (bench/bench_decode_attention.py)
  data_path     a 1M-token step's data path, tensors vs pickled objects, 2 gloo ranks (goal >= 10x)
Prints a compact summary table and writes bench/results/cpu-summary.json.

    python -m bench [--only profile_step,pack] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import RESULTS_DIR, env_info, fmt, format_table, key_number, write_json  # noqa: E402


def _r(name: str) -> str:
    return os.path.join(RESULTS_DIR, name)


# name -> (file that must exist, argv after the python executable, result JSON)
PIECES = {
    "pack": ("bench/bench_pack.py",
             ["-m", "bench.common", "run", "bench.bench_pack", "--small", "--out", _r("pack-cpu.json")],
             _r("pack-cpu.json")),
    "profile_step": ("bench/profile_step.py",
                     ["-m", "bench.profile_step", "--device", "cpu", "--out", _r("profile_step-cpu.json")],
                     _r("profile_step-cpu.json")),
    "kernel_report": ("kernels/report.py",
                      ["-m", "kernels.report", "--json", _r("kernel_report-sm90.json")],
                      _r("kernel_report-sm90.json")),
    "logprob": ("bench/bench_logprob.py",
                ["-m", "bench.common", "run", "bench.bench_logprob", "--quick", "--out", _r("logprob-cpu.json")],
                _r("logprob-cpu.json")),
    "grpo_loss": ("bench/bench_grpo_loss.py",
                  ["-m", "bench.common", "run", "bench.bench_grpo_loss", "--out", _r("grpo_loss-cpu.json")],
                  _r("grpo_loss-cpu.json")),
    "rollout": ("bench/bench_rollout.py",
                ["-m", "bench.common", "run", "bench.bench_rollout", "--threads", "1", "--out", _r("rollout-cpu.json")],
                _r("rollout-cpu.json")),
    "decode_attn": ("bench/bench_decode_attention.py",
                    ["-m", "bench.common", "run", "bench.bench_decode_attention", "--out",
                     _r("decode_attention-cpu.json")],
                    _r("decode_attention-cpu.json")),
    "data_path": ("bench/bench_data_path.py",
                  ["-m", "bench.common", "run", "bench.bench_data_path", "--tokens", "1000000", "--iters", "1",
                   "--out", _r("data_path-cpu.json")],
                  _r("data_path-cpu.json")),
}


def _key(name: str, data) -> str:
    if name == "kernel_report" and isinstance(data, dict):
        rows = data.get("rows", [])
        spills = sum(1 for r in rows if r.get("stack"))
        errors = sum(1 for r in rows if r.get("error"))
        return f"kernels={len(rows)} spills={spills} errors={errors}" + (" (goal met)" if not spills and not errors
                                                                          else "")
    if name == "profile_step" and isinstance(data, dict):
        parts = []
        for c in data.get("cases", []):
            parts.append(f"L{c['seq_len']}: packed/padded={fmt(c.get('packed_over_padded_time'))}")
        return "; ".join(parts) + " (goal <= 0.6)"
    if name == "rollout" and isinstance(data, dict):
        rows = {r.get("scenario"): r for r in data.get("results", [])}
        fixed, tail = rows.get("fixed-length", {}), rows.get("long-tail", {})
        return (f"vs transformers={fmt(fixed.get('speedup'))} continuous/static={fmt(tail.get('continuous_vs_static'))} "
                f"paged/static={fmt(tail.get('paged_vs_static'))}")
    return key_number(data)


def run_piece(name: str, timeout: float) -> dict:
    need, argv, json_path = PIECES[name]
    row = {"piece": name, "status": None, "seconds": 0.0, "key": "", "json": json_path, "output_tail": []}
    if not os.path.exists(os.path.join(ROOT, need)):
        row["status"] = f"skipped: {need} not present"
        return row
    before = os.path.getmtime(json_path) if os.path.exists(json_path) else None
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, (p.stdout or "") + (p.stderr or "")
        status = "ok" if rc == 0 else f"failed (rc={rc})"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"timeout ({timeout:.0f}s)"
    row["seconds"] = time.perf_counter() - t
    row["status"] = status
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith(("USDT:", "ERROR:"))]
    row["output_tail"] = lines[-25:]
    fresh = os.path.exists(json_path) and os.path.getmtime(json_path) != before
    if fresh:
        try:
            with open(json_path) as f:
                row["result"] = json.load(f)
            row["key"] = _key(name, row["result"])
        except Exception as e:
            row["key"] = f"unreadable JSON: {e}"[:80]
    elif status == "ok":
        row["status"] = "ok (no JSON written)"
    if status != "ok" and lines:
        row["key"] = lines[-1][:100]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(PIECES)}")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per piece")
    ap.add_argument("--out", default=_r("cpu-summary.json"))
    a = ap.parse_args(argv)
    names = list(PIECES) if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    bad = [n for n in names if n not in PIECES]
    if bad:
        print(f"--only: unknown piece(s) {bad}; expected some of {list(PIECES)}", file=sys.stderr)
        return 2
    rows = []
    for n in names:
        print(f"== {n} ...", flush=True)
        r = run_piece(n, a.timeout)
        for ln in r.get("output_tail", [])[-12:]:
            print("   " + ln)
        rows.append(r)
    write_json(a.out, {"env": env_info(), "pieces": rows})
    print()
    print(format_table(rows, ["piece", "status", "seconds", "key"]))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
