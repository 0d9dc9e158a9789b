"""Long-sequence policy-update step profiler: packed (lwz) vs padded (naive) in the same run.

One step = pack the batch -> model forward (varlen attention) -> fused log-probs (no [T, V]
logits) -> GRPO loss -> backward -> AdamW step. The padded baseline runs the same model on the
batch padded to its longest sequence (right padding, a padding mask in the loss), materialises
the logits [B * Lmax, V] in fp32, then log_softmax -> gather. Both paths see the same sequences,
so the ratios packed / padded (time and peak memory) are the numbers to read, not the absolute ones.

    python -m bench.profile_step                                   # CPU: tiny preset, 64..256 tokens
    python -m bench.profile_step --preset qwen2.5-1.5b --seq-lens 14336 --tokens-per-step 28672
    python -m bench.profile_step --model-config path/to/config.json --lengths-mix fixed --trace t.json
    python -m bench.profile_step --loss cpt --preset qwen2.5-1.5b --seq-lens 32768 --tokens-per-step 32768 --no-padded

--loss cpt profiles a continual-pretraining step (lwz/pretrain.py) instead: documents of a long-tail
length mix packed into one micro-batch, next-token cross-entropy (-logp from the fused kernel,
divided by the target count) in place of the GRPO loss.

MFU = model FLOPs of the real tokens / step time / peak bf16 FLOP/s of the GPU, where a sequence of
length L costs L * lwz.model.model_flops_per_token(cfg, L) (6 x matmul params + lm head per token,
plus causal attention 12 * layers * heads * head_dim * (L + 1) / 2 per token). Padding tokens are
never counted, so the padded baseline's MFU shows the work it wastes. Peak: lwz.metrics.PEAK_BF16
by GPU name; None on CPU or an unknown GPU.

Length mixes: "fixed" = every sequence exactly the max length; "longtail" = log-normal lengths
(median max/8, sigma 1) capped at the max length, at least 16 tokens, drawn until tokens-per-step
is reached (the last one trimmed, the longest set to the max), seeded. Goal: packed <= 0.6x padded step time on "longtail".
On CUDA: bf16 weights, activation checkpointing, AdamW; on CPU fp32 without checkpointing.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import RESULTS_DIR, env_info, fmt, format_table, gpu_tag, write_json  # noqa: E402
from lwz.model import ModelConfig, Transformer, model_flops_per_token  # noqa: E402

# Public Qwen2.5 shapes (config.json of the HF repos); random weights, nothing is downloaded.
PRESETS = {
    "tiny": dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=176,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       tie_word_embeddings=False, rope_theta=1000000.0, max_position_embeddings=32768),
}
for _p in PRESETS.values():
    _p["attention_bias"] = True  # qwen2 always has q/k/v biases

MFU_FORMULA = ("MFU = sum_seq L * model_flops_per_token(cfg, L) / step_time / peak_bf16;  "
               "model_flops_per_token = 6 * (L_layers * (H*q + 2*H*kv + q*H + 3*H*I) + H*V) "
               "+ 12 * L_layers * heads * head_dim * (L + 1) / 2")

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def model_config(preset: str | None, config_path: str | None) -> ModelConfig:
    if config_path:
        return ModelConfig.from_hf(config_path)
    if preset not in PRESETS:
        raise SystemExit(f"--preset: got {preset!r}, expected one of {sorted(PRESETS)}")
    return ModelConfig(**PRESETS[preset])


def sample_lengths(max_len: int, tokens: int, mix: str, seed: int, min_len: int = 16) -> list[int]:
    """Sequence lengths of one step: `fixed` = max_len each; `longtail` = log-normal, median
    max_len / 8, sigma 1, clipped to [min_len, max_len], the longest one set to max_len so every
    case has its tail; both total about `tokens` (at least one sequence)."""
    min_len = min(min_len, max_len)
    if mix == "fixed":
        return [max_len] * max(1, tokens // max_len)
    if mix != "longtail":
        raise SystemExit(f"--lengths-mix: got {mix!r}, expected 'fixed' or 'longtail'")
    g = torch.Generator().manual_seed(seed)
    mu, out, total = math.log(max(max_len / 8, 1)), [], 0
    while total < tokens:
        z = float(torch.randn((), generator=g))
        n = int(min(max_len, max(min_len, round(math.exp(mu + z)))))
        n = min(n, tokens - total) if out else n
        if n < min_len and out:
            break
        out.append(n)
        total += n
    # Make sure the long tail is present: the longest sequence reaches the cap.
    if max(out) < max_len and len(out) > 1:
        i = max(range(len(out)), key=out.__getitem__)
        out[i] = max_len
    return out


def fill_exactly(lengths: list[int], tokens: int) -> list[int]:
    """Document lengths packed into exactly `tokens` tokens: the last one that fits is cut, and a
    shortfall becomes one more document."""
    out, room = [], tokens
    for n in lengths:
        if not room:
            break
        out.append(min(n, room))
        room -= out[-1]
    return out + ([room] if room else [])


def make_batch(lengths: list[int], vocab: int, seed: int):
    """Per-sequence token ids, old log-probs and per-sequence advantages (what a rollout hands over)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    old = [-(torch.rand(n, generator=g) * 4 + 5) for n in lengths]  # around log(1/V): untrained model
    adv = torch.randn(len(lengths), generator=g)
    return seqs, old, adv


def pack(seqs, old, adv, device):
    """Packed stream: ids, position ids restarting per sequence, int32 cu_seqlens, next-token
    targets (-100 at the last token of each sequence), per-token advantages and old log-probs."""
    lengths = [s.numel() for s in seqs]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lengths])
    tgt = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    a = torch.repeat_interleave(adv, torch.tensor(lengths))
    o = torch.cat(old)
    mask = tgt != -100
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return dict(ids=to(ids), pos=to(pos), cu=to(cu), max_len=max(lengths), tgt=to(tgt), adv=to(a),
                old=to(o), mask=to(mask))


def pad(seqs, old, adv, device):
    """Padded batch [B, Lmax] (right padding), flattened for the model as B sequences of Lmax."""
    B, Lmax = len(seqs), max(s.numel() for s in seqs)
    ids = torch.zeros(B, Lmax, dtype=torch.long)
    tgt = torch.full((B, Lmax), -100, dtype=torch.long)
    o = torch.zeros(B, Lmax)
    for i, s in enumerate(seqs):
        n = s.numel()
        ids[i, :n] = s
        tgt[i, :n - 1] = s[1:]
        o[i, :n] = old[i]
    pos = torch.arange(Lmax).repeat(B)
    cu = torch.arange(0, (B + 1) * Lmax, Lmax, dtype=torch.int32)
    a = adv[:, None].expand(B, Lmax).reshape(-1).contiguous()
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    tgt = tgt.reshape(-1)
    return dict(ids=to(ids.reshape(-1)), pos=to(pos), cu=to(cu), max_len=Lmax, tgt=to(tgt), adv=to(a),
                old=to(o.reshape(-1)), mask=to(tgt != -100))


def _grpo_loss(logp, b, kind: str = "grpo"):
    """The step's loss: GRPO (token-mean, clipped ratios) or, kind "cpt", next-token cross-entropy."""
    if kind == "cpt":
        return -(logp * b["mask"]).sum() / b["mask"].sum().clamp(min=1)
    from kernels.grpo_loss import grpo_loss
    loss, _ = grpo_loss(logp, b["old"], b["adv"], b["mask"], clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                        loss_agg="token-mean")
    return loss


def packed_step(model, opt, seqs, old, adv, device, loss_kind: str = "grpo"):
    from kernels.logprob import fused_logprobs
    b = pack(seqs, old, adv, device)
    hidden = model(b["ids"], b["pos"], b["cu"], b["max_len"])
    logp, _ = fused_logprobs(hidden, model.lm_head_weight, b["tgt"])
    loss = _grpo_loss(logp, b, loss_kind)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def padded_step(model, opt, seqs, old, adv, device, loss_kind: str = "grpo"):
    b = pad(seqs, old, adv, device)
    hidden = model(b["ids"], b["pos"], b["cu"], b["max_len"])
    logits = model.logits(hidden)  # [B * Lmax, V] fp32, materialised
    lsm = torch.log_softmax(logits, dim=-1)
    logp = lsm.gather(1, b["tgt"].clamp(min=0)[:, None]).squeeze(1) * b["mask"]
    loss = _grpo_loss(logp, b, loss_kind)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _nvml_used(device) -> int | None:
    if device.type != "cuda":
        return None
    try:
        import pynvml
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None


def _peak_flops(device):
    try:
        from lwz.metrics import peak_flops
        return peak_flops(device)
    except Exception:
        return None


def measure(paths: dict, model, opt, batch, device, warmup: int, iters: int) -> dict:
    """Median wall time of `iters` steps after `warmup` for each path, the paths interleaved step by
    step so that load from other processes hits all of them alike; peak torch memory (reset before
    each step) and NVML used memory per path. A CUDA out-of-memory is a result ("oom") for that path,
    not a crash."""
    res = {name: {"status": "ok", "times_s": [], "cpu_times_s": [], "peak_mem_bytes": None, "nvml_used_bytes": None}
           for name in paths}
    for i in range(warmup + iters):
        for name, step_fn in paths.items():
            r = res[name]
            if r["status"] != "ok":
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                loss = step_fn(model, opt, *batch, device)
                _sync(device)
                dt, dc = time.perf_counter() - t, time.process_time() - c
            except torch.OutOfMemoryError as e:
                opt.zero_grad(set_to_none=True)
                loss = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                r.update(status="oom", error=str(e).splitlines()[0][:200])
                continue
            except Exception as e:  # report, keep the other path (and the other cases) running
                opt.zero_grad(set_to_none=True)
                loss = None
                r.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
                continue
            if not torch.isfinite(loss).item():
                r["status"] = "error: non-finite loss"
                continue
            if i >= warmup:
                r["times_s"].append(dt)
                r["cpu_times_s"].append(dc)
            if device.type == "cuda":
                r["peak_mem_bytes"] = max(r["peak_mem_bytes"] or 0, torch.cuda.max_memory_allocated(device))
            used = _nvml_used(device)
            if used is not None:
                r["nvml_used_bytes"] = max(r["nvml_used_bytes"] or 0, used)
    for r in res.values():
        if r["status"] == "ok":
            r["median_s"] = statistics.median(r["times_s"])
            r["median_cpu_s"] = statistics.median(r["cpu_times_s"])
    return res


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = model_config(args.preset, args.model_config)
    if args.threads:
        torch.set_num_threads(args.threads)
    ac = cuda if args.activation_checkpointing is None else args.activation_checkpointing
    model = Transformer.from_config(cfg, dtype=dtype, device=device, seed=args.seed,
                                    attn_backend=args.attn_backend, activation_checkpointing=ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, foreach=cuda)
    peak = _peak_flops(device)
    rows, cases = [], []
    for S in args.seq_lens:
        tokens = args.tokens_per_step or (2 * S if args.lengths_mix == "fixed" else 4 * S)
        lengths = sample_lengths(S, tokens, args.lengths_mix, args.seed + S)
        if args.loss == "cpt":  # the pretraining stream's micro-batch: documents cut to exactly `tokens`
            lengths = fill_exactly(lengths, tokens)
        seqs, old, adv = make_batch(lengths, cfg.vocab_size, args.seed + S)
        real = sum(lengths)
        padded_tokens = len(lengths) * max(lengths)
        flops = sum(n * model_flops_per_token(cfg, n) for n in lengths)
        case = {"seq_len": S, "lengths_mix": args.lengths_mix, "num_seqs": len(lengths), "tokens": real,
                "padded_tokens": padded_tokens, "padding_waste": 1 - real / padded_tokens,
                "model_flops": flops, "lengths": lengths}
        paths = {"packed": functools.partial(packed_step, loss_kind=args.loss)}
        if not args.no_padded:
            paths["padded"] = functools.partial(padded_step, loss_kind=args.loss)
        res = measure(paths, model, opt, (seqs, old, adv), device, args.warmup, args.iters)
        res.setdefault("padded", {"status": "skipped: --no-padded"})
        for name, r in res.items():
            if r["status"] == "ok":
                r["tokens_per_s"] = real / r["median_s"]
                r["achieved_tflops"] = flops / r["median_s"] / 1e12
                r["mfu"] = flops / r["median_s"] / peak if peak else None
            case[name] = r
        p, q = case["packed"], case["padded"]
        ok = p.get("status") == "ok" and q.get("status") == "ok"
        case["packed_over_padded_time"] = p["median_s"] / q["median_s"] if ok else None
        case["speedup"] = q["median_s"] / p["median_s"] if ok else None
        # Process CPU time: on a shared CPU host this ratio is less disturbed by other load.
        case["packed_over_padded_cpu_time"] = (p["median_cpu_s"] / q["median_cpu_s"]
                                               if ok and q["median_cpu_s"] > 0 else None)
        pm, qm = p.get("peak_mem_bytes"), q.get("peak_mem_bytes")
        case["packed_over_padded_mem"] = pm / qm if ok and pm and qm else None
        case["goal_met"] = (case["packed_over_padded_time"] <= 0.6) if case["packed_over_padded_time"] else None
        cases.append(case)
        for name in ("packed", "padded"):
            r = case[name]
            rows.append({"seq_len": S, "path": name, "seqs": len(lengths), "tokens": real,
                         "status": r.get("status"), "step_ms": r["median_s"] * 1e3 if "median_s" in r else None,
                         "tok/s": r.get("tokens_per_s"), "TFLOP/s": r.get("achieved_tflops"), "MFU": r.get("mfu"),
                         "peak_GiB": r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else None,
                         "nvml_GiB": r["nvml_used_bytes"] / 2**30 if r.get("nvml_used_bytes") else None})
    if args.trace:
        S = args.seq_lens[0]
        lengths = sample_lengths(S, args.tokens_per_step or 4 * S, args.lengths_mix, args.seed + S)
        batch = make_batch(lengths, cfg.vocab_size, args.seed + S)
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=False) as prof:
            packed_step(model, opt, *batch, device, loss_kind=args.loss)
            _sync(device)
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
        prof.export_chrome_trace(args.trace)
    first = cases[0] if cases else {}
    return {
        "bench": "profile_step", "loss": args.loss,
        "env": env_info(),
        "model": {"preset": None if args.model_config else args.preset, "config": args.model_config,
                  "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size,
                  "tie_word_embeddings": cfg.tie_word_embeddings, "num_params": model.num_params()},
        "dtype": str(dtype).replace("torch.", ""), "activation_checkpointing": ac,
        "attn_backend": args.attn_backend, "device": str(device), "peak_flops": peak,
        "cpu_threads": torch.get_num_threads(),
        "mfu_formula": MFU_FORMULA, "warmup": args.warmup, "iters": args.iters,
        "goal": "packed <= 0.6x padded step time on a long-tail length mix",
        "cases": cases, "table": rows,
        # Headline numbers of the first case, for summaries.
        "step_time_s": first.get("packed", {}).get("median_s"),
        "tokens_per_s": first.get("packed", {}).get("tokens_per_s"),
        "packed_over_padded_time": first.get("packed_over_padded_time"),
        "packed_over_padded_mem": first.get("packed_over_padded_mem"),
        "packed_over_padded_cpu_time": first.get("packed_over_padded_cpu_time"),
        "trace": args.trace,
    }


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 2:
        raise argparse.ArgumentTypeError(f"expected lengths >= 2, got {s!r}")
    return out


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-1.5b" if cuda else "tiny", choices=sorted(PRESETS))
    ap.add_argument("--model-config", default=None, help="HF config.json (file or folder); overrides --preset")
    ap.add_argument("--seq-lens", type=_int_list, default="4096,8192,14336,32768" if cuda else "128,256",
                    help="max sequence length of each case")
    ap.add_argument("--lengths-mix", default="longtail", choices=("longtail", "fixed"))
    ap.add_argument("--tokens-per-step", type=int, default=None,
                    help="real tokens per step (default: 4x the max length for longtail, 2x for fixed)")
    ap.add_argument("--warmup", type=int, default=2 if cuda else 1)
    ap.add_argument("--iters", type=int, default=5 if cuda else 3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true",
                    default=None)
    ap.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    ap.add_argument("--no-padded", action="store_true", help="skip the padded baseline")
    ap.add_argument("--loss", default="grpo", choices=("grpo", "cpt"),
                    help="grpo: the GRPO policy update; cpt: a continual-pretraining step (next-token CE)")
    ap.add_argument("--threads", type=int, default=None if cuda else 1,
                    help="torch CPU threads (CPU default 1: OpenMP spin-waits make multi-thread timings "
                         "erratic on a shared host)")
    ap.add_argument("--trace", default=None, help="write a torch profiler (chrome) trace of one packed step")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/profile_step-<gpu|cpu>.json)")
    a = ap.parse_args(argv)
    if isinstance(a.seq_lens, str):
        a.seq_lens = _int_list(a.seq_lens)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    out = args.out or os.path.join(RESULTS_DIR, f"profile_step-{gpu_tag()}.json")
    write_json(out, res)
    m = res["model"]
    print(f"profile_step: {res['device']} {res['dtype']} AC={res['activation_checkpointing']} "
          f"model H={m['hidden_size']} L={m['num_hidden_layers']} V={m['vocab_size']} "
          f"({m['num_params'] / 1e6:.1f}M params), mix={args.lengths_mix}, loss={args.loss}")
    print(format_table(res["table"]))
    print(MFU_FORMULA + f"  (peak {fmt(res['peak_flops'])} FLOP/s)")
    for c in res["cases"]:
        print(f"seq_len {c['seq_len']}: {c['num_seqs']} seqs, padding waste {c['padding_waste']:.2f}; "
              f"packed/padded time {fmt(c['packed_over_padded_time'])} (speed-up {fmt(c['speedup'])}x; "
              f"process CPU time {fmt(c['packed_over_padded_cpu_time'])}), "
              f"packed/padded peak mem {fmt(c['packed_over_padded_mem'])}; "
              f"goal packed <= 0.6x padded: {'met' if c['goal_met'] else 'NOT met' if c['goal_met'] is False else 'n/a'}")
    print(f"wrote {out}" + (f", trace {args.trace}" if args.trace else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
