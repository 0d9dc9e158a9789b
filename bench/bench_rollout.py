"""Benchmark of the rollout engine (lwz.rollout.generate) against transformers.generate.

    python -m bench.bench_rollout [--prompts 64] [--new-tokens 512] [--model auto|tiny|qwen2.5-1.5b]
                                  [--repeats 2] [--threads N] [--no-hf] [--out PATH]

Decode throughput = prompts * new_tokens / wall time of the whole generate call (prefill included),
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
from lwz.rollout import generate  # noqa: E402

QWEN25_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                   num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                   rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True,
                   max_position_embeddings=32768, eos_token_id=151643, pad_token_id=151643)


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    if name == "tiny":
        cfg = ModelConfig.from_hf(os.path.join(ROOT, "assets", "tiny-model"))
    elif name == "qwen2.5-1.5b":
        cfg = ModelConfig(**QWEN25_1_5B)
    else:
        raise ValueError(f"--model: expected tiny | qwen2.5-1.5b | auto, got {name!r}")
    with torch.device(device):  # random init directly on the device (1.5B params on CPU are slow)
        model = Transformer(cfg)
    model.init_weights(0)
    return model.to(dtype=dtype).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_lwz(model, prompts, new_tokens, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    _sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, temperature=0.8, top_p=1.0, generator=g)
    _sync(device)
    dt = time.perf_counter() - t
    assert int(out.response_lengths.sum()) == len(prompts) * new_tokens
    return dt


def run_hf(hf, prompts, new_tokens, device, pad_id, seed=0):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), L), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(seed)
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.8, top_p=1.0,
                          top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    _sync(device)
    dt = time.perf_counter() - t
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
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/rollout-<gpu|cpu>.json)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    name = args.model if args.model != "auto" else ("qwen2.5-1.5b" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.repeats = args.repeats or (1 if device.type == "cuda" else 2)
    model = build_model(name, device, dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 129, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    warm = prompts[: min(4, len(prompts))]

    row = dict(model=name, dtype=str(dtype).replace("torch.", ""), prompts=args.prompts,
               new_tokens=args.new_tokens, repeats=args.repeats, threads=torch.get_num_threads(), mean_prompt_len=sum(lens) / len(lens))
    from lwz.attention import decode_backend
    row["decode_attn"] = decode_backend(model.layers[0].self_attn.backend, device)
    tokens = args.prompts * args.new_tokens
    run_lwz(model, warm, min(8, args.new_tokens), device)
    row["lwz_s"] = min(run_lwz(model, prompts, args.new_tokens, device, seed=r) for r in range(args.repeats))
    row["lwz_tokens_per_s"] = tokens / row["lwz_s"]
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
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    import transformers
    info = env_info()
    result = {"bench": "rollout", **info, "transformers": transformers.__version__,
              "device": info.get("gpu") or "cpu", "results": [row]}
    path = write_json(args.out or f"rollout-{gpu_tag()}.json", result)
    print(format_table([row]))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
