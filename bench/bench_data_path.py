"""Benchmark of a GRPO step's data path: rollout -> every rank's batch -> plan -> packed micro-batches
-> recomputed log-probs back to every rank. The tensor path (lwz.batch) against the pickled-object
path it replaced (kept here as the baseline), in the same run.

    python -m bench.bench_data_path [--small] [--tokens 1000000,4000000] [--ranks 2] [--out PATH]

A synthetic step: each rank holds a RolloutBatch (left-padded prompts of 64..512 tokens, right-padded
answers with log-normal lengths capped at 14336 tokens a sequence) of about tokens / ranks tokens.
`--ranks` gloo processes on the CPU time, per path, the phases
  exchange   rollout -> every rank holds every sequence (new: from_rollout + one int32 all-gather;
             old: token lists in dicts, all_gather_object, one Sample per sequence)
  plan       the planner on every sequence (same planner, quadratic cost of Qwen2.5-7B)
  pack       every micro-batch of this rank (new: the pack op + index arithmetic; old: per-sample
             targets / advantages / log-probs, torch.cat)
  logp_back  recomputed log-probs of this rank's micro-batches to every rank (new: one fp32
             all-gather + index arithmetic; old: per-sample slices, all_gather_object, setattr)
(each phase ends at a barrier; median of --iters), and the bytes each rank receives per token of
the step. With CUDA it also times the same phases in one process on the GPU (world of one, the
largest size), and, when bench/results/profile_step-<gpu>.json exists, the path's share of that
measured training step (per token). Writes bench/results/data_path-<device>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import RESULTS_DIR, env_info, gpu_tag, write_json  # noqa: E402
from lwz.batch import exchange, from_rollout, gather_response_values, microbatch  # noqa: E402
from lwz.distributed import all_gather_objects  # noqa: E402
from lwz.packing import attn_coeff_for, pack_sequences, plan_microbatches  # noqa: E402
from lwz.rollout import RolloutBatch  # noqa: E402

CAP = 14336  # longest sequence (prompt + answer)
VOCAB = 152064
PAD = 151643
COEFF = attn_coeff_for(3584, 18944)  # Qwen2.5-7B
PHASES = ("exchange", "plan", "pack", "logp_back")


def synthetic_rollout(tokens: int, seed: int, mu: float, cap: int = CAP) -> RolloutBatch:
    """A RolloutBatch of about `tokens` tokens (prompt + answer), padded as the engine returns it."""
    rng = random.Random(seed)
    plen, rlen, total = [], [], 0
    while total < tokens:
        p = rng.randint(min(64, cap // 4), min(512, cap // 2))
        r = max(1, min(cap - p, int(rng.lognormvariate(mu, 0.8))))
        plen.append(p)
        rlen.append(r)
        total += p + r
    S, Lp, Lr = len(plen), max(plen), max(rlen)
    g = torch.Generator().manual_seed(seed)
    pl, rl = torch.tensor(plen), torch.tensor(rlen)
    prompt = torch.randint(0, VOCAB, (S, Lp), generator=g)
    prompt[torch.arange(Lp)[None, :] < (Lp - pl)[:, None]] = PAD
    resp = torch.randint(0, VOCAB, (S, Lr), generator=g)
    mask = torch.arange(Lr)[None, :] < rl[:, None]
    resp[~mask] = PAD
    logp = -torch.rand(S, Lr, generator=g) * 5 * mask
    return RolloutBatch(prompt_index=torch.arange(S), prompt_tokens=prompt, prompt_starts=Lp - pl, prompt_lengths=pl,
                        response_tokens=resp, response_lengths=rl, response_logprobs=logp,
                        response_trunc_logprobs=logp, truncated=torch.zeros(S, dtype=torch.bool), pad_id=PAD)


# ---- the pickled-object path (the trainer's data path before lwz.batch), kept as the baseline ------

@dataclass
class Sample:
    tokens: torch.Tensor  # [Lp + Lr] int64
    n_prompt: int
    advantage: float
    rollout_logp: torch.Tensor  # [Lr] fp32
    old_logp: torch.Tensor | None = None


def old_pack_samples(samples, device, pad_id: int):
    if not samples:
        z = torch.zeros(1, device=device)
        return dict(ids=torch.tensor([pad_id], device=device), pos=torch.zeros(1, dtype=torch.long, device=device),
                    cu=torch.tensor([0, 1], dtype=torch.int32, device=device), max_len=1,
                    targets=torch.full((1,), -100, device=device), adv=z, old=z)
    tgt, adv, old = [], [], []
    for s in samples:
        L, P = s.tokens.numel(), s.n_prompt
        t = torch.full((L,), -100, dtype=torch.long)
        t[P - 1:L - 1] = s.tokens[P:]
        tgt.append(t)
        a = torch.zeros(L)
        a[P - 1:L - 1] = s.advantage
        adv.append(a)
        x = torch.zeros(L)
        x[P - 1:L - 1] = s.old_logp
        old.append(x)
    ids, cu, pos, max_len = pack_sequences([s.tokens.to(device) for s in samples])
    cat = lambda xs: torch.cat(xs).to(device)  # noqa: E731
    return dict(ids=ids, pos=pos, cu=cu, max_len=max_len, targets=cat(tgt), adv=cat(adv), old=cat(old))


def old_path(rb, adv, world, rank, device, max_tokens, timer):
    # exchange: rollout() built token lists per sample, every rank gathered them pickled
    payload = [dict(tokens=p + r, n_prompt=len(p), adv=float(a), logp=torch.tensor(lp, dtype=torch.float32))
               for p, r, lp, a in zip(rb.prompt_ids, rb.response_ids, rb.logprobs, adv.tolist())]
    parts = all_gather_objects(payload, world)
    samples = [Sample(torch.tensor(p["tokens"]), p["n_prompt"], p["adv"], p["logp"]) for part in parts for p in part]
    for s in samples:
        s.old_logp = s.rollout_logp  # rollout mode, so that pack moves the same fields as the new path
    timer("exchange")
    plan = plan_microbatches([s.tokens.numel() for s in samples], max_tokens, world, cost="quadratic",
                             attn_coeff=COEFF)
    timer("plan")
    mbs = [old_pack_samples([samples[i] for i in mb], device, PAD) for mb in plan[rank]]
    timer("pack")
    mine = {}
    for mb_idx, mb in zip(plan[rank], mbs):  # the old log-probs' stand-in: the packed rollout ones
        starts = mb["cu"].tolist()
        for i, st in zip(mb_idx, starts):
            s = samples[i]
            mine[i] = mb["old"][st + s.n_prompt - 1: st + s.tokens.numel() - 1].detach().float().cpu()
    for part in all_gather_objects(mine, world):
        for i, lp in part.items():
            samples[i].old_logp = lp
    timer("logp_back")
    sent = [len(pickle.dumps(payload)), len(pickle.dumps(mine))]  # what all_gather_object sent (untimed)
    return sent, sum(s.tokens.numel() for s in samples), mbs


def new_path(rb, adv, world, rank, device, max_tokens, timer):
    mine = from_rollout(rb, adv, device)
    sent = [4 * (3 + 3 * len(mine) + mine.tokens.numel() + mine.num_response_tokens)]
    batch = exchange(mine, world)
    batch.old_logp = batch.rollout_logp
    timer("exchange")
    plan = plan_microbatches(batch.lengths, max_tokens, world, cost="quadratic", attn_coeff=COEFF)
    timer("plan")
    mbs = [microbatch(batch, seqs, PAD) for seqs in plan[rank]]
    timer("pack")
    vals = torch.cat([mb.old_logp[mb.resp_index] for mb in mbs])
    sent.append(4 * vals.numel())
    back = gather_response_values(batch, plan, vals, world, rank)
    timer("logp_back")
    assert torch.equal(back, batch.rollout_logp)
    return sent, batch.tokens.numel(), mbs


def _same_microbatches(new, old) -> bool:
    return all(torch.equal(n.input_ids, o["ids"]) and torch.equal(n.targets, o["targets"])
               and torch.equal(n.advantages, o["adv"]) and torch.equal(n.old_logp, o["old"])
               and torch.equal(n.cu_seqlens, o["cu"]) for n, o in zip(new, old))


def run_paths(rb, adv, world, rank, device, max_tokens, iters) -> dict:
    """Per path: phase -> seconds (max over ranks, median over iters), bytes received per rank."""
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    out = {}
    mbs = {}
    for name, fn in (("new", new_path), ("old", old_path)):
        runs = []
        for _ in range(iters):
            t = {}
            if world > 1:
                dist.barrier()
            sync()
            last = [time.perf_counter()]

            def timer(phase):  # a phase ends when the slowest rank is done with it
                sync()
                if world > 1:
                    dist.barrier()
                now = time.perf_counter()
                t[phase] = now - last[0]
                last[0] = now

            sent, tokens, mbs[name] = fn(rb, adv, world, rank, device, max_tokens, timer)
            vals = torch.tensor([t[p] for p in PHASES] + [float(x) for x in sent], dtype=torch.float64)
            if world > 1:
                vals_all = [torch.zeros_like(vals) for _ in range(world)]
                dist.all_gather(vals_all, vals)
                vals = torch.stack(vals_all)
            else:
                vals = vals[None]
            runs.append(vals)
        med = torch.stack(runs).median(0).values  # [world, phases + 2]
        times = med[:, :len(PHASES)].max(0).values.tolist()
        # an all-gather (of objects too) pads every rank's part to the largest: each rank receives
        # world x the largest part
        recv = [world * float(med[:, len(PHASES) + k].max()) for k in range(2)]
        out[name] = dict(seconds={p: s for p, s in zip(PHASES, times)}, total_s=sum(times),
                         bytes_per_token={"exchange": recv[0] / tokens, "logp_back": recv[1] / tokens})
        out["tokens"], out["sequences"] = tokens, None
    out["same_microbatches"] = _same_microbatches(mbs["new"], mbs["old"])
    out["speedup"] = out["old"]["total_s"] / out["new"]["total_s"]
    return out


def _worker(rank, world, store, tokens, mu, max_tokens, iters, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rb = synthetic_rollout(tokens // world, seed=100 + rank, mu=mu)
    adv = torch.randn(len(rb), generator=torch.Generator().manual_seed(rank))
    res = run_paths(rb, adv, world, rank, torch.device("cpu"), max_tokens, iters)
    n = torch.tensor([len(rb)])
    dist.all_reduce(n)
    res["sequences"] = int(n)
    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(tokens: int, world: int, mu: float, max_tokens: int, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), tokens, mu, max_tokens, iters, out),
                 nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def step_share(res: dict, tag: str) -> dict | None:
    """The new path's share of a measured training step, per token (profile_step's tokens/s)."""
    path = os.path.join(RESULTS_DIR, f"profile_step-{tag}.json")
    try:
        import json
        with open(path) as f:
            tps = json.load(f)["tokens_per_s"]
    except (OSError, KeyError, ValueError):
        return None
    per_token = res["new"]["total_s"] / res["tokens"]
    return {"profile_step_tokens_per_s": tps, "data_path_s_per_token": per_token,
            "pct_of_step": 100 * per_token * tps, "from": os.path.basename(path)}


def _fmt_row(label: str, r: dict) -> str:
    s = "  ".join(f"{p} {1e3 * r['seconds'][p]:9.1f}" for p in PHASES)
    b = r["bytes_per_token"]
    return (f"  {label:<4} {s}  total {1e3 * r['total_s']:9.1f} ms   bytes/token exchange {b['exchange']:6.2f} "
            f"logp_back {b['logp_back']:6.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="one tiny size (tests, CI)")
    ap.add_argument("--tokens", default=None, help="comma-separated step sizes in tokens (default 1M,4M on CPU)")
    ap.add_argument("--ranks", type=int, default=2, help="gloo processes on the CPU")
    ap.add_argument("--max-tokens", type=int, default=32768, help="micro-batch token budget")
    ap.add_argument("--mu", type=float, default=8.6, help="log of the median answer length")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--gpu-tokens", type=int, default=None,
                    help="size of the one-process GPU run (default: the largest --tokens)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/data_path-<device>.json)")
    a = ap.parse_args(argv)
    if a.ranks < 1 or a.iters < 1:
        print("bench_data_path: --ranks and --iters must be >= 1", file=sys.stderr)
        return 2
    try:
        sizes = [int(float(x)) for x in (a.tokens or ("20000" if a.small else "1000000,4000000")).split(",")]
    except ValueError:
        print(f"bench_data_path: --tokens must be comma-separated numbers, got {a.tokens!r}", file=sys.stderr)
        return 2
    mu = math.log(300) if a.small else a.mu
    max_tokens = 4096 if a.small and a.max_tokens == 32768 else a.max_tokens
    iters = 1 if a.small else a.iters
    cap_note = CAP if not a.small else None

    cuda = torch.cuda.is_available()
    tag = gpu_tag() if cuda else "cpu"
    res = {"bench": "data_path", "env": env_info(), "ranks": a.ranks, "max_tokens": max_tokens, "mu": mu,
           "cap": cap_note, "sizes": []}
    print(f"data path, {a.ranks} gloo ranks on the CPU (ms, max over ranks; median of {iters})")
    for tokens in sizes:
        r = run_ranks(tokens, a.ranks, mu, max_tokens, iters)
        r["requested_tokens"] = tokens
        res["sizes"].append(r)
        print(f"{r['tokens']} tokens, {r['sequences']} sequences: new {r['speedup']:.1f}x faster, "
              f"micro-batches equal: {r['same_microbatches']}")
        print(_fmt_row("new", r["new"]))
        print(_fmt_row("old", r["old"]))
    if cuda:
        tokens = a.gpu_tokens or max(sizes)
        rb = synthetic_rollout(tokens, seed=7, mu=mu)
        adv = torch.randn(len(rb), generator=torch.Generator().manual_seed(0))
        g = run_paths(rb, adv, 1, 0, torch.device("cuda"), max_tokens, iters)
        g["sequences"] = len(rb)
        g["step_share"] = step_share(g, tag)
        res["gpu"] = g
        print(f"GPU, one process: {g['tokens']} tokens, new {g['speedup']:.1f}x faster")
        print(_fmt_row("new", g["new"]))
        print(_fmt_row("old", g["old"]))
        if g["step_share"]:
            print(f"  new path = {g['step_share']['pct_of_step']:.3f}% of a measured step "
                  f"({g['step_share']['from']}, per token)")
    big = res["sizes"][-1]
    res["headline"] = {"speedup_largest": big["speedup"], "new_ms_largest": 1e3 * big["new"]["total_s"],
                       "new_bytes_per_token": big["new"]["bytes_per_token"]["exchange"],
                       "old_bytes_per_token": big["old"]["bytes_per_token"]["exchange"]}
    if cuda and res["gpu"].get("step_share"):
        res["headline"]["gpu_pct_of_step"] = res["gpu"]["step_share"]["pct_of_step"]
    out = a.out or os.path.join(RESULTS_DIR, f"data_path-{tag}.json")
    write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
