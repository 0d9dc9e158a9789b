"""Tensor-parallel generation: a copy of the policy split over the `tp` ranks of a TP group.

    tp_model = build_tp_model(policy.config, tp, tp_rank, tp_group, dtype, device)  # this rank's shard
    stats = load_tp_shards(tp_model, policy, tp, tp_rank)  # from the training layout, every step
    batch = generate(tp_model, prompts, ...)  # every rank of the TP group: the same samples

The split (Megatron / gpt-fast style), for TP rank t of `tp`:
  q_proj              output rows of heads [t*Hq/tp, (t+1)*Hq/tp)            (column parallel)
  k_proj, v_proj      output rows of KV heads [t*Hkv/tp, ...) when Hkv >= tp; when Hkv < tp (tp a
                      multiple of Hkv) each KV head is replicated on tp/Hkv consecutive ranks: rank t
                      holds KV head t // (tp/Hkv), the one its query heads use (query head h reads KV
                      head h // (Hq/Hkv), as in HF)
  o_proj              input columns of the same query heads, then one all-reduce  (row parallel)
  gate/up_proj        output rows [t*I/tp, (t+1)*I/tp)                        (column parallel)
  down_proj           the same input columns, then one all-reduce            (row parallel)
  embed_tokens        vocabulary rows [t*Vs, (t+1)*Vs), Vs = ceil(V/tp) (the last shard zero-padded):
                      masked lookup, then one all-reduce
  lm_head (or the tied embedding)  the same vocabulary rows; model.logits all-gathers the [N, Vs]
                      shards into the exact [N, V] logits, so sampling is the one of tp = 1
  norms, q/k norms    replicated; the biases of o_proj/down_proj live on rank 0 only (added once)
The KV cache follows: the model's config holds this rank's head counts (num_attention_heads = Hq/tp,
num_key_value_heads = the local KV heads, intermediate_size = I/tp, vocab_size = Vs), so the rollout
engine allocates [.., Hkv_local, D] per layer. Reductions run in fp32 (half-precision activations are
upcast for the all-reduce), so the sums do not lose bits the single-GPU matmul keeps.

Weights (load_tp_shards): the training layout is FSDP2's (or HSDP's) dim-0 sharding over the shard
group (all ranks, or a node's ranks under distributed.hsdp). A TP shard is a rectangle of the full
tensor (rows for column-parallel and vocabulary weights, columns for row-parallel ones); each rank
sends every rank of the shard group the part of that rectangle inside its own FSDP rows, with one
all_to_all_single per decoder block (and one for the root's parameters). No rank ever holds more
than its FSDP shard, its TP shard and one block's send/receive buffers; each receives at most its
TP shard (in the TP dtype) less the rows it already holds: when the TP group is the shard group
(HSDP with tp = GPUs per node) a column shard is the rank's own FSDP rows, and only o_proj,
down_proj, the norms (and KV heads replicated across ranks) move.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lwz.distributed import _gather_single
from lwz.model import ModelConfig, Transformer


# ---- the split ------------------------------------------------------------------------------------

def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The model config of one TP rank's shard (head counts, MLP width and vocabulary rows per rank).
    Expects the sizes check_tp_sizes accepts."""
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=max(1, cfg.num_key_value_heads // tp),
                               intermediate_size=cfg.intermediate_size // tp, vocab_size=-(-cfg.vocab_size // tp))


def shard_rect(name: str, shape: tuple, cfg: ModelConfig, tp: int, t: int):
    """Where TP rank t's shard of the training parameter `name` (full shape `shape`) lies:
    (r0, r1, c0, c1, rows) = full[r0:r1, c0:c1] (c0 = c1 = None for 1-D tensors, or all columns),
    stored in a tensor of `rows` rows (> r1 - r0 for the zero-padded last vocabulary shard)."""
    D = cfg.head_dim
    n = shape[0]
    full = (0, n, None, None, n)
    if tp == 1:
        return full
    hq = cfg.num_attention_heads // tp
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return (t * hq * D, (t + 1) * hq * D, None, None, hq * D)
    if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        nkv = cfg.num_key_value_heads
        h0, k = (t * (nkv // tp), nkv // tp) if nkv >= tp else (t // (tp // nkv), 1)
        return (h0 * D, (h0 + k) * D, None, None, k * D)
    if name.endswith("o_proj.weight"):
        return (0, n, t * hq * D, (t + 1) * hq * D, n)
    if name.endswith(("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias")):
        i = cfg.intermediate_size // tp
        return (t * i, (t + 1) * i, None, None, i)
    if name.endswith("down_proj.weight"):
        i = cfg.intermediate_size // tp
        return (0, n, t * i, (t + 1) * i, n)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        vs = -(-cfg.vocab_size // tp)
        return (min(t * vs, n), min((t + 1) * vs, n), None, None, vs)
    return full  # norms, o_proj/down_proj biases (kept on rank 0 only, see load_tp_shards)


_ROW_BIASES = ("o_proj.bias", "down_proj.bias")


# ---- the TP modules -------------------------------------------------------------------------------

def _all_reduce_fp32(x: torch.Tensor, group) -> torch.Tensor:
    """Sum x over the group, accumulating in fp32; returns a tensor of x's dtype."""
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    dist.all_reduce(y, group=group)
    return y.to(x.dtype) if y is not x else y


class VocabShardEmbedding(nn.Module):
    """Embedding rows [start, start + rows) of the vocabulary: ids outside give 0, and an all-reduce
    over the group sums the ranks' lookups into the full embedding. weight [rows, H]."""

    def __init__(self, rows: int, dim: int, start: int, group):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        hit = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * hit[..., None].to(self.weight.dtype)
        return _all_reduce_fp32(x, self.group)


def _gathered_logits(weight: torch.Tensor, vocab: int, tp: int, group, hidden: torch.Tensor) -> torch.Tensor:
    """[N, H] -> the full [N, vocab] fp32 logits: each rank's vocabulary shard (weight [Vs, H]),
    all-gathered."""
    local = F.linear(hidden, weight).float()  # [N, Vs]
    N, vs = local.shape
    out = local.new_empty(tp * N, vs)
    _gather_single(out, local, group=group)
    return out.view(tp, N, vs).permute(1, 0, 2).reshape(N, tp * vs)[:, :vocab]


def _reduce_output(group):
    def hook(module, args, out):
        return _all_reduce_fp32(out, group)
    return hook


def build_tp_model(cfg: ModelConfig, tp: int, tp_rank: int, group, dtype: torch.dtype, device,
                   attn_backend: str = "auto") -> Transformer:
    """TP rank `tp_rank`'s shard of a model with the full config `cfg`, parameters allocated on
    `device` in `dtype` but not filled (load_tp_shards fills them). Its submodules are the
    Transformer's, at the local sizes, with an all-reduce after o_proj and down_proj, a vocabulary
    shard embedding, and `logits` gathering the vocabulary shards (exact full-vocabulary logits)."""
    lc = local_config(cfg, tp)
    with torch.device("meta"):
        model = Transformer(lc, attn_backend=attn_backend)
        model.embed_tokens = VocabShardEmbedding(lc.vocab_size, cfg.hidden_size, tp_rank * lc.vocab_size, group)
    model = model.to(dtype).to_empty(device=device)  # (inv_freq is a plain CPU tensor: untouched)
    model.requires_grad_(False).eval()
    if tp > 1:
        for layer in model.layers:
            layer.self_attn.o_proj.register_forward_hook(_reduce_output(group))
            layer.mlp.down_proj.register_forward_hook(_reduce_output(group))
        # bound to the head's weight, not the module: no reference cycle keeps a dropped shard alive
        model.logits = functools.partial(_gathered_logits, model.lm_head_weight, cfg.vocab_size, tp, group)
    # tp_group: generate() sizes the KV cache on the least free memory of the group (same schedule)
    model.tp_size, model.tp_rank, model.tp_group, model.full_config = tp, tp_rank, group if tp > 1 else None, cfg
    return model


# ---- weights from the training layout ------------------------------------------------------------

def _source(p: torch.Tensor):
    """(local rows tensor, first full row, shard group or None, index in it, group size) of a
    training parameter: an FSDP2 DTensor sharded on dim 0 over one mesh dimension, or a plain
    (whole) tensor."""
    if not hasattr(p, "to_local"):
        return p.detach(), 0, None, 0, 1
    from torch.distributed.tensor import Shard
    dims = [i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(dims) != 1 or p.placements[dims[0]].dim != 0:
        raise ValueError(f"tensor-parallel weights: expected FSDP2's dim-0 sharding, got {p.placements}")
    mesh = p.device_mesh
    group = mesh.get_group(dims[0])
    L, i = mesh.size(dims[0]), mesh.get_local_rank(dims[0])
    local = p.to_local().detach()
    return local, _chunk(p.shape[0], L, i)[0], group, i, L


def _chunk(n: int, L: int, i: int) -> tuple[int, int]:
    """Rows [s0, s1) of a dim of n rows that shard i of L holds (torch.chunk's split, as FSDP2's)."""
    c = -(-n // L)
    s0 = min(i * c, n)
    return s0, min(s0 + c, n)


def _units(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by decoder block (one all-to-all each), the root's last."""
    blocks: dict = {}
    root = []
    for n in names:
        if n.startswith("layers."):
            blocks.setdefault(int(n.split(".")[1]), []).append(n)
        else:
            root.append(n)
    return [blocks[k] for k in sorted(blocks)] + ([root] if root else [])


def _target_name(name: str, tied: bool) -> str:
    return "embed_tokens.weight" if tied and name == "lm_head.weight" else name


@torch.no_grad()
def load_tp_shards(tp_model: Transformer, policy: nn.Module, tp: int, tp_rank: int) -> dict:
    """Fill tp_model (build_tp_model's) with this rank's TP shard of the training `policy`'s
    current weights. Collective over the policy's FSDP shard group (every rank calls it). Each rank
    of that group is TP rank (global rank % tp). Returns {"tp_weight_bytes": bytes this rank received
    from the others, "tp_weight_sent_bytes": bytes it sent, "time_tp_weights": seconds}."""
    t0 = time.time()
    cfg = tp_model.full_config
    dst = dict(tp_model.named_parameters())
    dtype = next(iter(dst.values())).dtype
    src = dict(policy.named_parameters())
    tied = cfg.tie_word_embeddings
    recv_bytes = sent_bytes = 0
    for unit in _units(list(src)):
        plain, sharded = [], []
        for name in unit:
            local, s0, group, i, L = _source(src[name])
            (plain if group is None else sharded).append((name, local, s0, group, i, L))
        for name, full, _, _, _, _ in plain:  # the whole tensor is here: slice it
            r0, r1, c0, c1, rows = shard_rect(name, tuple(full.shape), cfg, tp, tp_rank)
            out = dst[_target_name(name, tied)]
            out[:r1 - r0].copy_(full[r0:r1] if c0 is None else full[r0:r1, c0:c1])
            out[r1 - r0:].zero_()
        if sharded:
            r, s = _exchange(sharded, dst, src, cfg, tp, tp_rank, dtype, tied)
            recv_bytes, sent_bytes = recv_bytes + r, sent_bytes + s
    if tp_rank != 0:
        for name, p in dst.items():
            if name.endswith(_ROW_BIASES):
                p.zero_()
    return dict(tp_weight_bytes=recv_bytes, tp_weight_sent_bytes=sent_bytes, time_tp_weights=time.time() - t0)


def _exchange(items, dst, src, cfg, tp, tp_rank, dtype, tied) -> tuple[int, int]:
    """One all_to_all_single over the shard group for the parameters `items` (name, local rows,
    first row, group, index, size): rank j of the group gets, from every rank, the rows of its TP
    rectangle that rank holds (this rank's own part is copied in place, not sent). Returns (bytes
    received, bytes sent)."""
    group, me, L = items[0][3], items[0][4], items[0][5]
    ranks = dist.get_process_group_ranks(group)
    el = torch.empty((), dtype=dtype).element_size()
    send, send_sizes = [], []
    for j in range(L):
        tj = ranks[j] % tp
        n = 0
        for name, local, s0, _, _, _ in items:
            r0, r1, c0, c1, _ = shard_rect(name, tuple(src[name].shape), cfg, tp, tj)
            a, b = max(r0, s0), min(r1, s0 + local.shape[0])
            if a < b:
                part = local[a - s0:b - s0] if c0 is None else local[a - s0:b - s0, c0:c1]
                if j == me:
                    dst[_target_name(name, tied)][a - r0:b - r0].copy_(part)
                else:
                    send.append(part.reshape(-1).to(dtype))
                    n += part.numel()
        send_sizes.append(n)
    recv_sizes, plan = [], []
    for i in range(L):
        n = 0
        for name, local, _, _, _, _ in items:
            shape = tuple(src[name].shape)
            r0, r1, c0, c1, _ = shard_rect(name, shape, cfg, tp, tp_rank)
            s0, s1 = _chunk(shape[0], L, i)
            a, b = max(r0, s0), min(r1, s1)
            if a < b and i != me:
                width = 1 if len(shape) == 1 else (shape[1] if c0 is None else c1 - c0)
                plan.append((name, a - r0, b - r0, (b - a) * width))
                n += (b - a) * width
        recv_sizes.append(n)
    device = items[0][1].device
    inp = torch.cat(send) if send else torch.zeros(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(out, inp, recv_sizes, send_sizes, group=group)
    o = 0
    for name, a, b, k in plan:
        t = dst[_target_name(name, tied)]
        t[a:b].copy_(out[o:o + k].view(t[a:b].shape))
        o += k
    for name, local, _, _, _, _ in items:  # the padded vocabulary rows of the last shard
        r0, r1, _, _, rows = shard_rect(name, tuple(src[name].shape), cfg, tp, tp_rank)
        if rows > r1 - r0:
            dst[_target_name(name, tied)][r1 - r0:].zero_()
    return sum(recv_sizes) * el, sum(send_sizes) * el


# ---- the step's samples -------------------------------------------------------------------------

def take_prompts(batch, lo: int, hi: int):
    """The samples of prompts [lo, hi) of a RolloutBatch (prompt_index renumbered from 0), as a
    RolloutBatch: a TP rank keeps its own prompts' samples of the group's rollout."""
    keep = ((batch.prompt_index >= lo) & (batch.prompt_index < hi)).nonzero()[:, 0]
    S = len(batch)
    fields = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == S:
            fields[f.name] = v[keep]
        elif isinstance(v, list) and len(v) == S:
            fields[f.name] = [v[k] for k in keep.tolist()]
    fields["prompt_index"] = fields["prompt_index"] - lo
    return dataclasses.replace(batch, **fields)
