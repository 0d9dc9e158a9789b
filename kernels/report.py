"""Ahead-of-time resource report of every Triton kernel in kernels/*.py, for sm_90, with no GPU.

    python -m kernels.report [--json PATH] [--logprob-fwd CFG;CFG...] [--logprob-bwd CFG;CFG...]

Each kernel module exposes `AOT_SPECS`: a list of dicts
    {name, fn, signature, constexprs, num_warps, num_stages[, divisible]}
(divisible: names of pointer/integer arguments that are multiples of 16 at the shipped shapes;
signature: Triton type strings per argument, constexpr arguments typed "constexpr"; constexprs:
their values at the shipped block sizes). Each spec is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, the cubin goes to a temp file
and `cuobjdump --dump-resource-usage` (the copy shipped inside the triton package) gives REG,
STACK (> 0 means register spills), SHARED (static) and LOCAL; Triton's own metadata gives the
dynamic shared memory, which is where its pipelined operand buffers live.

The interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on CPU machines) replaces @triton.jit
functions, so compilation then runs in a child process without that variable.
--logprob-fwd / --logprob-bwd compile only the log-prob forward / d-logits kernels, at the given
launch configs (kernels.logprob.parse_config strings, e.g. the candidates bench/tune_logprob.py
times), instead of every shipped spec.
Rows: dicts {module, name, num_warps, num_stages, reg, stack, shared_static, shared_dynamic, local,
error}; `report(json_path=None)` returns them.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

MODULES = ("kernels.logprob", "kernels.grpo_loss", "kernels.decode_attention")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def find_cuobjdump() -> str | None:
    import triton

    base = os.path.dirname(triton.__file__)
    cand = os.path.join(base, "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(cand):
        return cand
    for dirpath, _dirs, files in os.walk(base):
        if "cuobjdump" in files:
            return os.path.join(dirpath, "cuobjdump")
    return None


_RES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_resource_usage(text: str) -> dict:
    """Parse `cuobjdump --dump-resource-usage` output -> {function: {reg, stack, shared, local}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur is not None and "REG:" in line:
            out[cur] = {k.lower(): int(v) for k, v in _RES.findall(line)}
    return out


def _compile_one(spec, cuobjdump):
    import triton
    from triton.backends.compiler import GPUTarget

    # what the JIT would specialise at the shipped shapes: 16-byte aligned pointers and integers
    # divisible by 16 (strides, H); without it loads are not vectorised and not pipelined.
    names = list(spec["fn"].arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.get("divisible", ())}
    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"],
                                    constexprs=spec.get("constexprs") or {}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, spec["name"] + ".cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    usage = parse_resource_usage(res)
    if not usage:
        raise RuntimeError(f"no resource usage in cuobjdump output: {res[:200]!r}")
    u = next(iter(usage.values()))
    return dict(reg=u.get("reg"), stack=u.get("stack"), shared_static=u.get("shared"),
                local=u.get("local"), shared_dynamic=int(getattr(k.metadata, "shared", 0) or 0))


def _logprob_config_specs(fwd=(), bwd=()):
    """The log-prob forward / d-logits specs at launch-config strings (bf16), named by config."""
    from kernels import logprob as lp

    specs = []
    for text in fwd:
        c = lp.parse_config(text, lp.CONFIGS["default"][0], "--logprob-fwd")
        specs += [dict(s, name=f"logprob_fwd[{text}]") for s in lp._aot_specs("bf16", c=c)
                  if s["name"] == "logprob_fwd"]
    for text in bwd:
        b = lp.parse_config(text, lp.CONFIGS["default"][1], "--logprob-bwd")
        specs += [dict(s, name=f"logprob_bwd_dlogits[{text}]") for s in lp._aot_specs("bf16", b=b)
                  if s["name"] == "logprob_bwd_dlogits"]
    return specs


def _compile_all(modules=MODULES, fwd=(), bwd=()):
    cuobjdump = find_cuobjdump()
    rows = []
    if fwd or bwd:
        groups = [("kernels.logprob", _logprob_config_specs(fwd, bwd))]
    else:
        groups = []
        for modname in modules:
            try:
                groups.append((modname, getattr(importlib.import_module(modname), "AOT_SPECS", None) or []))
            except ImportError:
                continue  # kernel file not written yet
    for modname, specs in groups:
        for spec in specs:
            row = dict(module=modname, name=spec["name"], num_warps=spec["num_warps"],
                       num_stages=spec["num_stages"], reg=None, stack=None, shared_static=None,
                       shared_dynamic=None, local=None, error=None)
            try:
                if cuobjdump is None:
                    raise RuntimeError("cuobjdump not found inside the triton package")
                row.update(_compile_one(spec, cuobjdump))
            except Exception as e:  # report, don't abort the table
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
    return rows


def _compile_in_child(modules, fwd=(), bwd=()):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import json, sys; from kernels.report import _compile_all; "
            f"print('@@ROWS@@' + json.dumps(_compile_all({tuple(modules)!r}, {tuple(fwd)!r}, {tuple(bwd)!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("@@ROWS@@"):
            return json.loads(line[len("@@ROWS@@"):])
    raise RuntimeError(f"AOT compile child failed (rc={p.returncode}): {p.stderr[-2000:]}")


def report(json_path=None, modules=MODULES, fwd=(), bwd=()):
    """Compile every AOT spec (or the log-prob kernels at configs fwd / bwd) for sm_90 and return
    one row per kernel (optionally write JSON)."""
    rows = _compile_in_child(modules, fwd, bwd) if _interpreting() else _compile_all(modules, fwd, bwd)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"target": "sm_90", "rows": rows}, f, indent=2)
    return rows


def format_table(rows) -> str:
    head = f"{'kernel':<40} {'warps':>5} {'stages':>6} {'REG':>4} {'STACK':>5} {'SMEM dyn':>9} " \
           f"{'SMEM st':>7}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['module'].split('.')[-1]}.{r['name']}"
        if r.get("error"):
            lines.append(f"{name:<40} {r['num_warps']:>5} {r['num_stages']:>6}  ERROR {r['error']}")
            continue
        note = "SPILLS" if r["stack"] else ""
        lines.append(f"{name:<40} {r['num_warps']:>5} {r['num_stages']:>6} {r['reg']:>4} "
                     f"{r['stack']:>5} {r['shared_dynamic']:>9} {r['shared_static']:>7}  {note}")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--logprob-fwd", default="", help="';'-separated log-prob forward configs to compile instead")
    ap.add_argument("--logprob-bwd", default="", help="';'-separated log-prob d-logits configs to compile instead")
    a = ap.parse_args(argv)
    split = lambda v: tuple(x for x in v.split(";") if x)  # noqa: E731
    rows = report(a.json, fwd=split(a.logprob_fwd), bwd=split(a.logprob_bwd))
    print(format_table(rows))
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
