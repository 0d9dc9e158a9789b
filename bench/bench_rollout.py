"""Benchmark of the rollout engine (lwz.rollout.generate) against transformers.generate.

    python -m bench.bench_rollout [--prompts 64] [--new-tokens 512] [--model auto|tiny|qwen2.5-1.5b]
                                  [--grid 64x512,256x512,...] [--sync-every 16]
                                  [--repeats 2] [--threads N] [--no-hf] [--no-tail] [--out PATH]

Decode throughput = prompts * new_tokens / wall time of the whole generate call (prefill included;
on CUDA also without CUDA graphs, `graphs_speedup`),
sampling at temperature 0.8 / top-p 1.0 with no stop token, so every sequence produces exactly
`new_tokens` tokens on both sides. Prompt lengths are random in [16, 128] (the same prompts for
both engines; transformers gets them left-padded with an attention mask, the usual batched use).
The fastest of --repeats timed runs counts (default 2 on CPU, where shared cores are noisy; 1 on
CUDA).
  CPU:  the tiny default model (assets/tiny-model config, random weights, fp32).
  CUDA: a model shaped like Qwen2.5-1.5B (random weights, bf16, nothing downloaded).
Transformers runs the same weights: our model is saved with save_pretrained into a temporary
folder and loaded with AutoModelForCausalLM.from_pretrained (its default SDPA attention and
dynamic cache). Each engine runs once untimed (a small warm-up) and then timed.

Long tail (second table): RL answers have very unequal lengths. --tail-prompts prompts x
--tail-group samples with --tail-rows cache rows, a stop-token set sized so that an answer stops
with probability ~1/--tail-mean per token (geometric lengths, capped at --tail-max-new): lwz's
continuous admission (one generate call, batch_size = rows) against static batches of whole
groups (one generate call per batch, each decoding until its longest answer ends, as an engine
without admission does), and a paged cache (--tail-page tokens a page) holding as many tokens as
the static rows but shared by 4x the rows (what paging buys for the same memory), same run.
Throughput = response tokens / wall time; rounds = decode steps; fill = response tokens /
(rounds * rows), the share of the static rows' steps doing work (above 1 for the paged run). On a
GPU a decode step costs about the same at any fill (it reads the weights once), so the rounds
ratio is what continuous admission saves there; on a CPU a step's cost follows the live rows.

Decode grid (one row per --grid entry BATCHxNEW_TOKENS; default 64x512, 256x512, 64x8192,
256x8192 on CUDA, 4x16 on the CPU): the engine (rounds on the device, CUDA graphs, the host
looking every --sync-every rounds) against the plain loop in the same run (sync_every = 1, no
graphs: the host reads every round's state), tokens/s and ms per round for both, and
decode_roofline_fraction = (bytes one round must read / copy bandwidth) / measured round time,
where the bytes are the weights plus the live KV cache (batch x mean context x k/v bytes per
token, averaged over the rounds) and the copy bandwidth is measured in the same run (a device
copy of --copy-mib MiB: (read + written bytes) / time).

Log-prob mismatch (--mismatch SAMPLESxTOKENS, off by default): a bf16 model's sampled-token
log-probs against the trainer's recomputation (the fused log-prob kernel on the packed sequences),
and against the value the CUDA kernel accumulates in fp32 (the fp64 log-prob of the bf16 operands,
kernels.reference; on the CPU the trainer's torch path runs its GEMM in bf16, so both are shown),
per response-length bucket (lwz.rollout.logprob_mismatch), for the engine's fp32-accumulated
sampling logits ("after") and for logits rounded to bf16 before the softmax ("before",
F.linear(bf16, bf16).float(), the earlier engine), same prompts and seed. Random weights give
flat logits that hide the rounding; --logit-scale multiplies the output head (embedding when
tied) so the logits spread like a trained model's (default 5: logit std ~2, max ~10 on "mid").
On the CPU the model is --mismatch-model (default "mid": 4 layers, hidden 512, vocab 32768).

Writes bench/results/rollout-<gpu-tag|cpu>.json (device, versions, commit) and prints a table.
`main(argv)` returns the JSON dict.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import env_info, format_table, gpu_tag, write_json  # noqa: E402
from lwz.model import ModelConfig, Transformer  # noqa: E402
from lwz.rollout import EngineSettings, SamplingParams, generate  # noqa: E402

QWEN25_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                   rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True,
                   max_position_embeddings=32768, eos_token_id=151643, pad_token_id=151643)


MID = dict(model_type="qwen2", vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, attention_bias=True,
           max_position_embeddings=4096, eos_token_id=0, pad_token_id=0)


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    if name == "tiny":
        cfg = ModelConfig.from_hf(os.path.join(ROOT, "assets", "tiny-model"))
    elif name == "mid":
        cfg = ModelConfig(**MID)
    elif name == "qwen2.5-1.5b":
        cfg = ModelConfig(**QWEN25_1_5B)
    else:
        raise ValueError(f"--model: expected tiny | mid | qwen2.5-1.5b | auto, got {name!r}")
    return Transformer.from_config(cfg, dtype=dtype, device=device, seed=0).eval()


def _timed(device, fn):
    """(wall seconds, fn()) of one call, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def run_lwz(model, prompts, new_tokens, device, seed=0, **engine):
    """Wall seconds of one fixed-length generate call (every answer new_tokens long) and its result."""
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_p=1.0, seed=seed)
    dt, out = _timed(device, lambda: generate(model, prompts, sp, EngineSettings(**engine)))
    assert int(out.response_lengths.sum()) == len(prompts) * new_tokens
    return dt, out


def copy_bandwidth(device, mib: int) -> float:
    """Bytes per second (read + written) of a device-to-device copy of `mib` MiB, best of 5."""
    a = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(device, lambda: b.copy_(a))[0] for _ in range(5))
    return 2 * a.numel() / best


def decode_grid(model, cfg, device, args, bw: float) -> list[dict]:
    """One row per (batch, new tokens) of --grid: the engine and the plain loop, same prompts."""
    rows = []
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tok_bytes = model.kv_bytes(1)
    for batch, new in args.grid:
        g = torch.Generator().manual_seed(3)
        lens = torch.randint(16, 129, (batch,), generator=g).tolist()
        prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
        mean_ctx = sum(lens) / batch + (new - 1) / 2  # a round's mean context, over the rounds
        round_bytes = weight_bytes + batch * mean_ctx * tok_bytes
        row = dict(scenario="decode", batch=batch, new_tokens=new, sync_every=args.sync_every,
                   weight_gb=weight_bytes / 1e9, kv_gb_per_round=batch * mean_ctx * tok_bytes / 1e9,
                   copy_gb_per_s=bw / 1e9, roofline_ms=1e3 * round_bytes / bw)
        modes = (("engine", dict(sync_every=args.sync_every)), ("plain", dict(sync_every=1, cuda_graphs=False)))
        for name, eng in modes:
            run_lwz(model, prompts[:2], 4, device, **eng)  # warm-up (and graph capture)
            dt, out = min((run_lwz(model, prompts, new, device, seed=r, **eng) for r in range(args.repeats)),
                          key=lambda x: x[0])
            row[f"{name}_tokens_per_s"] = batch * new / dt
            row[f"{name}_ms_per_round"] = 1e3 * dt / out.rounds
            row[f"{name}_host_syncs"] = out.host_syncs
            row[f"{name}_roofline_fraction"] = row["roofline_ms"] / row[f"{name}_ms_per_round"]
        row["decode_roofline_fraction"] = row["engine_roofline_fraction"]
        row["engine_vs_plain"] = row["engine_tokens_per_s"] / row["plain_tokens_per_s"]
        rows.append(row)
    return rows


def mismatch(model, cfg, device, samples: int, new: int, scale: float) -> list[dict]:
    """Sampled-token log-prob mismatch, bf16-rounded logits ("before") vs fp32-accumulated ("after")."""
    import types

    import torch.nn.functional as F

    from kernels.logprob import fused_logprobs
    from kernels.reference import logprobs_reference
    from lwz.batch import from_rollout, microbatch, padded_responses
    from lwz.rollout import logprob_mismatch
    with torch.no_grad():
        model.lm_head_weight.mul_(scale)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 129, (samples // 4,), generator=g)]
    # answers of many lengths: stop tokens hit with probability ~1/(new/3) per token
    stops = tuple(torch.randperm(cfg.vocab_size, generator=g)[:max(1, cfg.vocab_size * 3 // new)].tolist())
    sp = SamplingParams(n=4, max_new_tokens=new, temperature=0.8, stop_token_ids=stops, seed=1)
    buckets = tuple(new * k // 8 for k in (1, 2, 4)) + (new,)
    rows = []
    for name in ("before", "after"):
        if name == "before":  # the earlier engine's logits: the bf16 product rounded, then fp32
            model.logits = types.MethodType(lambda self, h: F.linear(h, self.lm_head_weight).float(), model)
        else:
            del model.logits
        out = generate(model, prompts, sp, EngineSettings(batch_size=32))
        batch = from_rollout(out, torch.zeros(len(out)), device)
        mb = microbatch(batch, list(range(len(out))), out.pad_id)  # the trainer's packed forward
        with torch.no_grad():
            h = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen)
            # the trainer's kernel on this device (on the CPU its torch path: a GEMM in bf16), and
            # the value the CUDA kernel accumulates in fp32: the fp64 log-prob of the bf16 operands
            logp, _ = fused_logprobs(h, model.lm_head_weight, mb.targets, temperature=0.8)
            exact = logprobs_reference(h[mb.resp_index], model.lm_head_weight, mb.targets[mb.resp_index],
                                       temperature=0.8)[0]
        row = dict(scenario="logprob-mismatch", logits=name, dtype=str(model.lm_head_weight.dtype).split(".")[-1],
                   samples=len(out), new_tokens=new, logit_scale=scale,
                   trainer_impl="triton" if device.type == "cuda" else "torch")
        for key, ref in (("vs_fp32acc", exact), ("vs_trainer", logp[mb.resp_index])):
            trainer = padded_responses(batch, ref.float(), mb.seqs).cpu()
            st = logprob_mismatch(out.response_logprobs, trainer, out.response_mask, out.response_lengths, buckets)
            row.update({f"{key}/{k}": v for k, v in st.items() if not k.startswith("tokens/")})
        rows.append(row)
    with torch.no_grad():
        model.lm_head_weight.div_(scale)
    return rows


def run_tail(model, prompts, n, rows, max_new, stop_ids, device, mode, page=0, seed=0):
    """Seconds, response lengths, rounds and preemptions of the long-tail scenario (see the module
    docstring). mode: "static" batches of whole groups, "continuous" admission into `rows` rows, or
    "paged": a paged cache holding as many tokens as `rows` static rows, shared by 4x the rows."""
    sp = SamplingParams(n=n, max_new_tokens=max_new, temperature=0.8, top_p=1.0, stop_token_ids=tuple(stop_ids),
                        seed=seed)

    def run():
        if mode == "continuous":
            return [generate(model, prompts, sp, EngineSettings(batch_size=rows))]
        if mode == "paged":
            S = max(len(p) for p in prompts) + max_new - 1
            return [generate(model, prompts, sp, EngineSettings(batch_size=4 * rows, page_size=page,
                                                                num_pages=rows * -(-S // page)))]
        per = max(1, rows // n)
        return [generate(model, prompts[i:i + per], sp) for i in range(0, len(prompts), per)]

    dt, outs = _timed(device, run)
    return (dt, torch.cat([o.response_lengths for o in outs]), sum(o.rounds for o in outs),
            sum(o.preemptions for o in outs))


def long_tail(model, cfg, device, args) -> dict:
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 129, (args.tail_prompts,), generator=g)]
    k = max(1, round(cfg.vocab_size / args.tail_mean))
    stop_ids = torch.linspace(2, cfg.vocab_size - 1, k).long().unique().tolist()
    row = dict(scenario="long-tail", samples=args.tail_prompts * args.tail_group, group=args.tail_group,
               rows=args.tail_rows, max_new_tokens=args.tail_max_new, stop_ids=len(stop_ids), page_size=args.tail_page)
    for mode in ("static", "continuous", "paged"):
        run_tail(model, prompts[:1], args.tail_group, args.tail_rows, 4, stop_ids, device, mode,
                 args.tail_page)  # warm-up (and CUDA graph capture)
        best = None
        for _ in range(args.repeats):
            # the same seed every repeat: the same answers, only the timing varies
            dt, lens, rounds, pre = run_tail(model, prompts, args.tail_group, args.tail_rows, args.tail_max_new,
                                             stop_ids, device, mode, args.tail_page)
            tps = float(lens.sum()) / dt
            if best is None or tps > best[0]:
                best = (tps, dt, lens, rounds, pre)
        tps, dt, lens, rounds, pre = best
        row[f"{mode}_s"], row[f"{mode}_tokens_per_s"], row[f"{mode}_rounds"] = dt, tps, rounds
        row[f"{mode}_fill"] = float(lens.sum()) / (rounds * args.tail_rows)  # work per round / static rows
        row[f"{mode}_mean_len"], row[f"{mode}_max_len"] = float(lens.float().mean()), int(lens.max())
        if mode == "paged":
            row["paged_preemptions"] = pre
    row["continuous_vs_static"] = row["continuous_tokens_per_s"] / row["static_tokens_per_s"]
    row["paged_vs_static"] = row["paged_tokens_per_s"] / row["static_tokens_per_s"]
    return row


def run_hf(hf, prompts, new_tokens, device, pad_id, seed=0):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), L), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(seed)
    with torch.no_grad():
        dt, out = _timed(device, lambda: hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=1.0, top_k=0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id))
    assert out.shape[1] - L == new_tokens
    return dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--model", default="auto", help="auto (CUDA: qwen2.5-1.5b, CPU: tiny) | tiny | qwen2.5-1.5b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=0, help="timed runs per engine, fastest counts (0: 2 on CPU, 1 on CUDA)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers.generate")
    ap.add_argument("--no-tail", action="store_true", help="skip the long-tail scenario")
    ap.add_argument("--tail-prompts", type=int, default=8)
    ap.add_argument("--tail-group", type=int, default=4, help="samples per prompt in the long-tail scenario")
    ap.add_argument("--tail-rows", type=int, default=8, help="cache rows (batch_size) in the long-tail scenario")
    ap.add_argument("--tail-max-new", type=int, default=0, help="0: 512 on CUDA, 128 on CPU")
    ap.add_argument("--tail-mean", type=float, default=0, help="target mean answer length; 0: 64 on CUDA, 32 on CPU")
    ap.add_argument("--tail-page", type=int, default=0, help="page size of the paged run; 0: 256 on CUDA, 16 on CPU")
    ap.add_argument("--grid", default="", help="decode rows BATCHxNEW,...; default 64x512,256x512,64x8192,256x8192 "
                                                "on CUDA, 4x16 on the CPU; 'none' skips them")
    ap.add_argument("--sync-every", type=int, default=16, help="the engine's rollout.sync_every in the decode rows")
    ap.add_argument("--copy-mib", type=int, default=0, help="copy-bandwidth probe size; 0: 2048 on CUDA, 256 on CPU")
    ap.add_argument("--mismatch", default="", help="SAMPLESxTOKENS: the log-prob mismatch scenario (bf16)")
    ap.add_argument("--mismatch-model", default="", help="its model; default the run's model on CUDA, mid on CPU")
    ap.add_argument("--logit-scale", type=float, default=5.0, help="output-head scale in the mismatch scenario")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/rollout-<gpu|cpu>.json)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    name = args.model if args.model != "auto" else ("qwen2.5-1.5b" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.repeats = args.repeats or (1 if device.type == "cuda" else 2)
    args.tail_max_new = args.tail_max_new or (512 if device.type == "cuda" else 128)
    args.tail_mean = args.tail_mean or (64 if device.type == "cuda" else 32)
    args.tail_page = args.tail_page or (256 if device.type == "cuda" else 16)
    grid = args.grid or ("64x512,256x512,64x8192,256x8192" if device.type == "cuda" else "4x16")
    try:
        args.grid = [] if grid == "none" else [tuple(int(x) for x in g.split("x")) for g in grid.split(",")]
        assert all(len(g) == 2 and min(g) > 0 for g in args.grid)
    except (ValueError, AssertionError):
        raise SystemExit(f"--grid: expected BATCHxNEW_TOKENS[,...] (e.g. 64x512), got {grid!r}") from None
    args.copy_mib = args.copy_mib or (2048 if device.type == "cuda" else 256)
    model = build_model(name, device, dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 129, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    warm = prompts[: min(4, len(prompts))]

    row = dict(scenario="fixed-length", model=name, dtype=str(dtype).replace("torch.", ""), prompts=args.prompts,
               new_tokens=args.new_tokens, repeats=args.repeats, threads=torch.get_num_threads(), mean_prompt_len=sum(lens) / len(lens))
    from lwz.attention import decode_backend
    row["decode_attn"] = decode_backend(model.layers[0].self_attn.backend, device, dtype)
    tokens = args.prompts * args.new_tokens
    run_lwz(model, warm, min(8, args.new_tokens), device)
    row["lwz_s"] = min(run_lwz(model, prompts, args.new_tokens, device, seed=r)[0] for r in range(args.repeats))
    row["lwz_tokens_per_s"] = tokens / row["lwz_s"]
    if device.type == "cuda":  # the same without CUDA graphs: what replaying the decode step saves
        import lwz.rollout as ro
        row["cuda_graphs"] = not ro._GRAPHS_FAILED and row["decode_attn"] != "sdpa"
        run_lwz(model, warm, min(8, args.new_tokens), device, cuda_graphs=False)
        row["lwz_eager_s"] = min(run_lwz(model, prompts, args.new_tokens, device, seed=r, cuda_graphs=False)[0]
                                 for r in range(args.repeats))
        row["graphs_speedup"] = row["lwz_eager_s"] / row["lwz_s"]
    if not args.no_hf:
        import transformers as tf
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        hf.generation_config.eos_token_id = None
        run_hf(hf, warm, min(8, args.new_tokens), device, pad)
        row["hf_s"] = min(run_hf(hf, prompts, args.new_tokens, device, pad, seed=r) for r in range(args.repeats))
        row["hf_tokens_per_s"] = tokens / row["hf_s"]
        row["speedup"] = row["lwz_tokens_per_s"] / row["hf_tokens_per_s"]
        del hf
    rows = [row]
    if args.grid:
        rows += decode_grid(model, cfg, device, args, copy_bandwidth(device, args.copy_mib))
    if not args.no_tail:
        rows.append(long_tail(model, cfg, device, args))
    if args.mismatch:
        n_s, n_t = (int(x) for x in args.mismatch.split("x"))
        mname = args.mismatch_model or (name if device.type == "cuda" else "mid")
        mm = model if mname == name and dtype == torch.bfloat16 else build_model(mname, device, torch.bfloat16)
        rows += mismatch(mm, mm.config, device, n_s, n_t, args.logit_scale)
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    import transformers
    info = env_info()
    result = {"bench": "rollout", **info, "transformers": transformers.__version__,
              "device": info.get("gpu") or "cpu", "results": rows}
    dec = [r for r in rows if r["scenario"] == "decode"]
    if dec:  # the goal: >= 0.6 of the roofline at batch 64
        result["headline"] = {f"roofline_b{r['batch']}_n{r['new_tokens']}": r["decode_roofline_fraction"] for r in dec}
        result["headline"].update({f"vs_plain_b{r['batch']}_n{r['new_tokens']}": r["engine_vs_plain"] for r in dec})
    path = write_json(args.out or f"rollout-{gpu_tag()}.json", result)
    for kind in dict.fromkeys(r["scenario"] for r in rows):  # the scenarios have different columns
        print(format_table([r for r in rows if r["scenario"] == kind]))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
