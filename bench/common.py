"""Shared helpers of the bench scripts: environment facts, JSON results, tables, GPU ceilings.

    python -m bench.common env                      print device / versions / commit as JSON
    python -m bench.common ceilings [--json PATH]   bf16 8192^3 matmul TFLOP/s and device-to-device
                                                    copy GB/s (CUDA only; "skipped" elsewhere)
    python -m bench.common run MODULE [ARGS...]     import MODULE and call its main(ARGS); exit 0
                                                    unless main returns a non-zero int or raises
    python -m bench.common collect --steps TSV --since FILE [--results-dir DIR] --out PREFIX
                                                    merge the step table and every JSON written
                                                    under bench/results/ after FILE into
                                                    PREFIX.json + PREFIX.md (used by device_check.sh)

Nothing here needs a GPU to import; everything that touches CUDA checks for it first.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


# ---------------------------------------------------------------------------- environment

def git_commit() -> str | None:
    """$LWZ_COMMIT when set (a copied tree, e.g. the GPU machine's, whose .git may be absent or
    stale: device_check is started with LWZ_COMMIT=<commit>), else the checkout's commit (+ "-dirty")."""
    if os.environ.get("LWZ_COMMIT"):
        return os.environ["LWZ_COMMIT"]
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return None


def _version(mod: str) -> str | None:
    try:
        return importlib.import_module(mod).__version__
    except Exception:
        return None


def gpu_name() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def gpu_tag(name: str | None = None) -> str:
    """Short lowercase tag for file names: "h100", "h200", "a100", ... or "cpu"."""
    name = name if name is not None else gpu_name()
    if not name:
        return "cpu"
    for key in ("H200", "H100", "H800", "A100", "A800", "L40S", "L4", "A10G", "V100", "T4"):
        if key in name.upper():
            return key.lower()
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "gpu"


def env_info() -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "flash_attn": _version("flash_attn"),
        "device": "cpu",
        "gpu": None,
        "cuda": None,
        "driver": None,
        "cpu_threads": None,
    }
    try:
        import torch
        info["cpu_threads"] = torch.get_num_threads()
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["device"] = "cuda"
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as e:  # a broken torch install is itself a fact to report
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import pynvml
        pynvml.nvmlInit()
        d = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = d.decode() if isinstance(d, bytes) else d
    except Exception:
        pass
    return info


# ---------------------------------------------------------------------------- results

def sanitize(x):
    """JSON-safe copy: NaN/inf -> None, tensors -> lists/numbers, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): sanitize(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [sanitize(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return sanitize(x.tolist())
    return x


def write_json(path_or_name: str, data: dict) -> str:
    """Write data (sanitised) to a path, or to bench/results/<name> when given a bare file name."""
    path = path_or_name if os.sep in path_or_name else os.path.join(RESULTS_DIR, path_or_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(sanitize(data), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def format_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """Plain fixed-width table of dict rows (missing keys print '-')."""
    if not rows:
        return "(no rows)"
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


# ---------------------------------------------------------------------------- ceilings

def time_call(fn, iters: int, cuda: bool, warmup: int = 2, stat=None) -> float:
    """Seconds of one call of `fn`: the median (or `stat`) of `iters` timed calls after `warmup`
    untimed ones. CUDA: events around each call; CPU: perf_counter."""
    import statistics
    import torch
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return (stat or statistics.median)(times)


def _time_cuda(fn, iters: int) -> float:
    import torch
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def matmul_seconds(n: int = 8192, iters: int = 20) -> float:
    """Seconds of one bf16 n x n x n matmul on the current GPU (the compute ceiling: 2n^3 FLOPs)."""
    import torch
    dev = torch.device("cuda")
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
    return _time_cuda(lambda: torch.matmul(a, b, out=c), iters)


def ceilings(n: int = 8192, copy_bytes: int = 2 * 2**30, iters: int = 20) -> dict:
    """The two roofline ceilings of the GPU: bf16 n^3 matmul FLOP/s and device-to-device copy
    bandwidth (bytes read + bytes written per second)."""
    import torch
    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA device", "matmul_tflops": None, "copy_gbps": None}
    dev = torch.device("cuda")

    def copy_s():
        src = torch.empty(copy_bytes, device=dev, dtype=torch.uint8)
        dst = torch.empty_like(src)
        return _time_cuda(lambda: dst.copy_(src), iters)

    t_mm = matmul_seconds(n, iters)
    t_cp = copy_s()
    torch.cuda.empty_cache()
    return {"status": "ok", "gpu": torch.cuda.get_device_name(0), "matmul_n": n, "matmul_dtype": "bf16",
            "matmul_s": t_mm, "matmul_tflops": 2 * n**3 / t_mm / 1e12,
            "copy_bytes": copy_bytes, "copy_s": t_cp, "copy_gbps": 2 * copy_bytes / t_cp / 1e9}


# ---------------------------------------------------------------------------- runner / collector

def run_module(module: str, args: list[str]) -> int:
    sys.path.insert(0, ROOT)
    mod = importlib.import_module(module)
    if not hasattr(mod, "main"):
        print(f"{module}: has no main(argv)", file=sys.stderr)
        return 2
    rc = mod.main(args)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


# Keys worth showing in one summary cell, most telling first.
KEY_FIELDS = ("packed_over_padded_time", "matmul_tflops", "copy_gbps", "speedup", "tokens_per_s",
              "tflops", "gbps", "padding_waste", "median_ms", "ms", "fwd_bwd_s", "median_s")


def _find_keys(obj, out: dict, depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in KEY_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in out:
                out[k] = v
            else:
                _find_keys(v, out, depth + 1)
    elif isinstance(obj, list):
        for v in obj[:64]:
            _find_keys(v, out, depth + 1)


def key_number(obj) -> str:
    """A short "name=value" string: every field of the result's own "headline" dict when it has one
    (the numbers its goal is judged by, ratios to the baselines included), else the first two
    recognised fields of the JSON."""
    head = obj.get("headline") if isinstance(obj, dict) else None
    if isinstance(head, dict) and head:
        return " ".join(f"{k}={fmt(v)}" for k, v in head.items())
    found: dict = {}
    _find_keys(obj, found)
    parts = [f"{k}={fmt(found[k])}" for k in KEY_FIELDS if k in found][:2]
    return " ".join(parts)


def _pytest_tail(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if any(w in ln for w in (" passed", " failed", " error", " skipped", "no tests ran")):
            return ln.strip("= ")[:80]
    return lines[-1][:80] if lines else ""


def collect(steps_tsv: str, since: str | None, out_prefix: str, results_dir: str | None = None) -> dict:
    """Merge device_check.sh's step table (name, status, seconds, log, json) and every result JSON
    written after `since` into <out_prefix>.json and <out_prefix>.md; return the merged dict."""
    t0 = os.path.getmtime(since) if since and os.path.exists(since) else 0.0
    steps = []
    if os.path.exists(steps_tsv):
        with open(steps_tsv) as f:
            for ln in f:
                parts = ln.rstrip("\n").split("\t")
                if len(parts) < 3:
                    continue
                name, status, secs = parts[:3]
                log = parts[3] if len(parts) > 3 else ""
                jpath = parts[4] if len(parts) > 4 else ""
                row = {"step": name, "status": status, "seconds": int(float(secs)) if secs else None, "key": ""}
                if jpath and os.path.exists(jpath):
                    try:
                        with open(jpath) as jf:
                            data = json.load(jf)
                        row["key"] = key_number(data)
                        st = data.get("status") if isinstance(data, dict) else None
                        if isinstance(st, str) and st != "ok" and not row["key"]:
                            row["key"] = st
                    except Exception as e:
                        row["key"] = f"bad json: {e}"[:60]
                elif name.startswith("tests") and log:
                    row["key"] = _pytest_tail(log)
                row["log"] = log
                steps.append(row)
    results = {}
    out_base = os.path.abspath(out_prefix)
    rdir = results_dir or RESULTS_DIR
    if os.path.isdir(rdir):
        for fn in sorted(os.listdir(rdir)):
            p = os.path.join(rdir, fn)
            if not fn.endswith(".json") or os.path.abspath(p) == out_base + ".json":
                continue
            if os.path.getmtime(p) < t0:
                continue
            try:
                with open(p) as f:
                    results[fn] = json.load(f)
            except Exception as e:
                results[fn] = {"error": f"unreadable: {e}"}
    env = env_info()
    merged = {"env": env, "steps": steps, "results": results}
    write_json(out_base + ".json", merged)
    table = format_table(steps, ["step", "status", "seconds", "key"])
    md = [f"# Device check {env['date']}", "",
          f"- GPU: {env.get('gpu') or 'none'} (driver {env.get('driver') or '-'}, CUDA {env.get('cuda') or '-'})",
          f"- torch {env.get('torch')}, triton {env.get('triton')}, flash-attn {env.get('flash_attn') or 'absent'}",
          f"- commit {env.get('commit')}", "",
          "| step | status | seconds | key number |", "|---|---|---|---|"]
    for s in steps:
        md.append(f"| {s['step']} | {s['status']} | {fmt(s['seconds'])} | {s['key']} |")
    md += ["", f"Result files merged: {', '.join(results) or 'none'}", ""]
    with open(out_base + ".md", "w") as f:
        f.write("\n".join(md))
    merged["table"] = table
    return merged


def main(argv=None) -> int:
    import argparse
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after the module name belongs to the module
        if len(argv) < 2:
            print("usage: python -m bench.common run MODULE [ARGS...]", file=sys.stderr)
            return 2
        return run_module(argv[1], argv[2:])
    ap = argparse.ArgumentParser(prog="python -m bench.common", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    c = sub.add_parser("ceilings")
    c.add_argument("--json", default=None)
    c.add_argument("--n", type=int, default=8192)
    c.add_argument("--copy-mib", type=int, default=2048)
    k = sub.add_parser("collect")
    k.add_argument("--steps", required=True)
    k.add_argument("--since", default=None)
    k.add_argument("--results-dir", default=None, help="where the result JSONs are (default bench/results)")
    k.add_argument("--out", required=True, help="output prefix; writes PREFIX.json and PREFIX.md")
    a = ap.parse_args(argv)
    if a.cmd == "env":
        print(json.dumps(env_info(), indent=2))
        return 0
    if a.cmd == "ceilings":
        t = time.perf_counter()
        r = ceilings(a.n, a.copy_mib * 2**20)
        r["env"] = env_info()
        r["wall_s"] = time.perf_counter() - t
        print(f"ceilings: {r['status']}  bf16 matmul {fmt(r['matmul_tflops'])} TFLOP/s  "
              f"d2d copy {fmt(r['copy_gbps'])} GB/s")
        if a.json:
            write_json(a.json, r)
        return 0
    merged = collect(a.steps, a.since, a.out, a.results_dir)
    print(merged["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
