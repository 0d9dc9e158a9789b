"""What moving the weights into tensor-parallel shards costs per step, against today's gather.

    python -m bench.bench_tp [--world 2] [--tp 2] [--model qwen2.5-1.5b] [--layers 2] [--repeats 3] [--out PATH]

`world` processes on one machine (gloo on the CPU, nccl on GPUs) shard a model shaped like --model
(--layers decoder blocks, random weights) with FSDP2 over all of them, as training leaves it. Then
per step, both ways of getting generation weights:
  gather  full_params_for_generation (FSDP2 unshard): every rank all-gathers the whole model
  tp      lwz.tp.load_tp_shards: every rank gets its TP shard, one all_to_all_single per block
Bytes = what one rank receives from the others (gather: (world - 1) / world of the parameters; tp:
its TP shard less the part it held), in the generation dtype (fp32 on the CPU, bf16 on CUDA); the
time is the best of --repeats. Weights held while generating: the whole model (gather) or the TP
shard (tp). Writes bench/results/tp-weights-<gpu-tag|cpu>.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

PRESETS = {  # (hidden, intermediate, heads, kv heads, vocab); Qwen2.5 shapes
    "tiny": (64, 176, 4, 2, 1024),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 4, 152064),
}


def _config(name: str, layers: int):
    from lwz.model import ModelConfig
    H, I, nh, nkv, V = PRESETS[name]
    return ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                       num_attention_heads=nh, num_key_value_heads=nkv, head_dim=H // nh, attention_bias=True)


def _worker(rank, world, store, args, out_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from lwz.distributed import DTYPES, build_groups, init_distributed, shard_model, shutdown_distributed
    from lwz.model import Transformer
    from lwz.rollout import full_params_for_generation
    from lwz.tp import build_tp_model, load_tp_shards
    d = init_distributed(backend)
    cuda = d.device.type == "cuda"
    gen_dtype = torch.bfloat16 if cuda else torch.float32
    cfg = _config(args.model, args.layers)
    g = build_groups(d, args.tp)
    model = Transformer.from_config(cfg, device=d.device)
    shard_model(model, DTYPES["bfloat16"] if cuda else None, None)
    el = torch.empty((), dtype=gen_dtype).element_size()
    n_params = sum(p.numel() for p in model.parameters())

    def sync():
        if cuda:
            torch.cuda.synchronize()
        torch.distributed.barrier()

    def gather():
        with full_params_for_generation(model):
            sync()

    stats = {}

    def tp():
        shard = build_tp_model(cfg, args.tp, g.tp_rank, g.tp_group, gen_dtype, d.device)
        stats.update(load_tp_shards(shard, model, args.tp, g.tp_rank))
        stats["shard_bytes"] = sum(p.numel() for p in shard.parameters()) * el
        sync()

    rows = []
    for name, fn in (("gather", gather), ("tp", tp)):
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first is a warm-up
            sync()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        recv = (world - 1) * n_params * el // world if name == "gather" else stats["tp_weight_bytes"]
        held = n_params * el if name == "gather" else stats["shard_bytes"]
        rows.append(dict(way=name, recv_mib=recv / 2**20, held_mib=held / 2**20, seconds=best))
    if rank == 0:
        torch.save(dict(rows=rows, params=n_params, device=str(d.device)), out_path)
    shutdown_distributed(exit_code=0)


def main(argv=None) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    from bench.common import env_info, format_table, gpu_tag, write_json
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--model", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), args, out), nprocs=args.world, join=True)
        res = torch.load(out)
    data = dict(bench="tp_weights", world=args.world, tp=args.tp, model=args.model, layers=args.layers,
                params=res["params"], rows=res["rows"], **env_info())
    print(f"{args.model} shapes, {args.layers} layers ({res['params'] / 1e6:.1f}M parameters), world {args.world}, "
          f"tp {args.tp}, per rank and step:")
    print(format_table(res["rows"], ["way", "recv_mib", "held_mib", "seconds"]))
    path = write_json(args.out or f"tp-weights-{gpu_tag() if torch.cuda.is_available() else 'cpu'}.json", data)
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
