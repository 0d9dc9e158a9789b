"""Memory planner: the bytes one GPU holds in each phase of a GRPO step, for a config and a cluster.

    python -m lwz.memory --config configs/qwen2.5-32b.toml [--nodes 8 --gpus-per-node 8 --gpu-mem-gib 80]
                         [--reserve-gib 6] [--shapes FILE] [--rm-shapes FILE] [--json PATH] [--a.b=v ...]
    plan = plan_memory(cfg, Cluster(nodes=8))  # MemoryPlan: phases -> items -> bytes, the limits

Model shapes come from the model folder's config.json (lwz.model.ModelConfig); when the folder is
not on this machine, from assets/shapes/ by the folder's name (or --shapes / --rm-shapes).
Parameter counts are exact: the model (and the quality reward model) is built on the meta device
and FSDP2's dim-0 sharding is applied to every parameter (ceil(rows / shards) rows each).

Phases (each a peak of that phase on the busiest GPU: one that also hosts the quality RM):
  rollout   training state kept across the step (master weights + AdamW in model.dtype, the
            reference model, the RM shard), the generation weights in distributed.param_dtype
            (every parameter gathered when rollout.tp_size = 1; this rank's TP shard otherwise:
            heads, MLP columns and vocabulary rows / tp_size, KV heads replicated when fewer),
            the KV cache of the rows x (max_prompt_tokens + max_new_tokens) slots (Transformer.kv_bytes
            on the TP shard's config; + the CUDA graphs' spare row), the CUDA graphs' logits of each
            captured batch size and their pool, the sampling temporaries ([rows, V] fp32 a few times)
            and a prefill of the admitted prompts.
  reward    the quality RM on its hosts (rewards.quality_ranks, whole or FSDP2-sharded as
            rewards.quality_fsdp decides) scoring a packed batch of its max_tokens_per_batch tokens.
  training  one micro-batch of grpo.max_tokens_per_microbatch tokens through forward + backward
            with activation checkpointing: sharded gradients, the gathered blocks and root in the
            compute dtype and their unsharded gradients before the reduce-scatter, every block's
            checkpointed input, one block's recomputed activations (or the fused log-prob
            backward's scratch, grpo.logprob_scratch_mib, whichever is larger).
The old / reference log-prob recomputation (a forward without autograd over the same micro-batches)
stays below the training peak and is not listed. The largest rollout rows and micro-batch tokens
that fit are searched with the same functions.
Estimates of activations are formulas per token (see _block_train_bytes_per_token); the device
check compares the training estimate with torch.cuda.max_memory_allocated of bench/profile_step.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from lwz.config import Config, ConfigError, die_on_config_error, parse_args
from lwz.model import ModelConfig, ModelLoadError, Transformer
from lwz.distributed import check_tp
from lwz.tp import local_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_DIR = os.path.join(ROOT, "assets", "shapes")
GIB = 2 ** 30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    # never seen by torch's allocator counters: CUDA context, NCCL buffers, allocator fragmentation
    reserve_gib: float = 6.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def budget(self) -> int:
        """Bytes the planner lets torch's allocator hold on one GPU."""
        return int((self.gpu_mem_gib - self.reserve_gib) * GIB)


@dataclass
class Phase:
    name: str
    items: dict  # label -> bytes on one GPU

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclass
class MemoryPlan:
    cluster: Cluster
    model: str  # where the policy's shapes came from
    num_params: int
    phases: list  # [Phase]
    rows: int  # KV-cache rows per GPU the rollout uses (every rank of a TP group holds them)
    max_rows: int  # the most rows that fit (0: not even one)
    microbatch_tokens: int
    max_microbatch_tokens: int  # the most micro-batch tokens that fit (0: none)
    advice: list = field(default_factory=list)  # one line per change an unfittable config needs
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.advice

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict:
        return dict(cluster=dataclasses.asdict(self.cluster), budget_bytes=self.cluster.budget, model=self.model,
                    num_params=self.num_params, fits=self.fits, rows=self.rows, max_rows=self.max_rows,
                    microbatch_tokens=self.microbatch_tokens, max_microbatch_tokens=self.max_microbatch_tokens,
                    phases={p.name: dict(p.items, total=p.total) for p in self.phases},
                    advice=self.advice, notes=self.notes)


# ---- shapes -------------------------------------------------------------------------------------

def shape_file_for(path: str) -> str | None:
    """The shipped shape file for a model folder's name: <name>.json, else the longest shape name
    the folder's name starts with (Qwen2.5-72B-writing-rm -> qwen2.5-72b.json); None if none."""
    name = os.path.basename(os.path.normpath(path)).lower()
    names = sorted((f[:-5] for f in os.listdir(SHAPES_DIR) if f.endswith(".json")), key=len, reverse=True) \
        if os.path.isdir(SHAPES_DIR) else []
    hit = next((n for n in names if name == n), None) or next((n for n in names if name.startswith(n)), None)
    return os.path.join(SHAPES_DIR, hit + ".json") if hit else None


def load_shapes(path: str, key: str, shapes: str | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, where it came from) of the model at `path` (config key `key`): `shapes` (a
    config.json, a folder, or a shape name in assets/shapes) when given, else path/config.json,
    else the shipped shape file named like the folder. One-line ModelLoadError otherwise."""
    if shapes:
        f = shapes if os.path.exists(shapes) else os.path.join(SHAPES_DIR, shapes.lower().removesuffix(".json") + ".json")
        if not os.path.exists(f):
            raise ModelLoadError(f"shape file '{shapes}' not found (a config.json, or one of {_shipped()})")
        return ModelConfig.from_hf(f), os.path.relpath(f) if f.startswith(ROOT) else f
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelConfig.from_hf(path), os.path.join(path, "config.json")
    f = shape_file_for(path)
    if f is None:
        raise ModelLoadError(f"{key} = '{path}': no config.json there and no shape file named like it in "
                             f"assets/shapes ({_shipped()}); pass the shapes with --shapes / --rm-shapes")
    return ModelConfig.from_hf(f), os.path.relpath(f, ROOT) + f" ({key} not on this machine)"


def _shipped() -> str:
    return ", ".join(sorted(f[:-5] for f in os.listdir(SHAPES_DIR) if f.endswith(".json"))) \
        if os.path.isdir(SHAPES_DIR) else "none"


@dataclass
class Params:
    """Parameter shapes of a model: one decoder block's (all blocks are alike), the root's (embeddings,
    final norm, heads) and the block count."""
    block: list  # [shape]
    root: list  # [shape]
    layers: int

    def numel(self, shards: int = 1) -> int:
        """Elements one rank holds with FSDP2 dim-0 sharding over `shards` ranks (padded rows)."""
        return self.layers * _numel(self.block, shards) + _numel(self.root, shards)

    def tensors(self) -> int:
        return self.layers * len(self.block) + len(self.root)


def _numel(shapes, shards: int) -> int:
    return sum(-(-s[0] // shards) * math.prod(s[1:]) for s in shapes)


_PARAMS: dict = {}  # (config, reward model) -> Params: a 72B model takes seconds to build even on meta


def model_params(mcfg: ModelConfig, reward_model: bool = False) -> Params:
    """The parameter shapes of our Transformer (or the quality reward model) for this config, read
    off the model built on the meta device."""
    key = (json.dumps(dataclasses.asdict(mcfg), sort_keys=True, default=str), reward_model)
    if key not in _PARAMS:
        _PARAMS[key] = _build_params(mcfg, reward_model)
    return _PARAMS[key]


def _build_params(mcfg: ModelConfig, reward_model: bool) -> Params:
    with torch.device("meta"):
        if reward_model:
            from lwz.rewards.quality import QualityRewardModel
            m = QualityRewardModel(mcfg)
            layers = m.model.layers
        else:
            m = Transformer(mcfg)
            layers = m.layers
    in_blocks = {id(p) for p in layers.parameters()}
    block = [tuple(p.shape) for p in layers[0].parameters()] if len(layers) else []
    root = [tuple(p.shape) for p in m.parameters() if id(p) not in in_blocks]
    return Params(block, root, len(layers))


def check_sizes(cfg: Config, mcfg: ModelConfig, cluster: Cluster) -> None:
    """One-line ConfigError for a layout the trainer would refuse (before any planning)."""
    tp, world = cfg.rollout.tp_size, cluster.world
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                          f"world size {world} ({cluster.nodes} nodes x {cluster.gpus_per_node} GPUs)")
    check_tp(tp, world, cluster.gpus_per_node, mcfg.num_attention_heads, mcfg.num_key_value_heads,
             mcfg.intermediate_size)
    if world > 1 and not cfg.distributed.fsdp:
        raise ConfigError(f"distributed.fsdp=false with {world} GPUs: the trainer needs FSDP2 on several GPUs")


# ---- activations (formulas per token) -----------------------------------------------------------

def _block_saved_bytes_per_token(mcfg: ModelConfig, cb: int) -> int:
    """What autograd saves in one decoder block's forward, per token (cb = bytes of the compute
    dtype): each RMSNorm's fp32 input (4H) and output, q/k/v and their RoPE rotations and outputs,
    the attention output and its fp32 log-sum-exp per head, the o_proj and residual outputs, and the
    MLP's gate / silu / up / product."""
    H, I = mcfg.hidden_size, mcfg.intermediate_size
    q, kv = mcfg.num_attention_heads * mcfg.head_dim, mcfg.num_key_value_heads * mcfg.head_dim
    return 8 * H + cb * (2 * H + (q + 2 * kv) + 2 * (q + kv) + q + 3 * H + 4 * I) + 4 * mcfg.num_attention_heads


def _block_train_bytes_per_token(mcfg: ModelConfig, cb: int) -> int:
    """One block recomputed with autograd in backward, per token: what it saves plus the transients
    of its backward (the gradients of gate and up at once, an fp32 [H] gradient in the norms)."""
    return _block_saved_bytes_per_token(mcfg, cb) + cb * 2 * mcfg.intermediate_size + 8 * mcfg.hidden_size


def _block_infer_bytes_per_token(mcfg: ModelConfig, cb: int) -> int:
    """One block's forward without autograd, per token: the residual stream, the normed input and
    its fp32 temporaries, q/k/v, and gate / up / silu output alive together in the MLP."""
    H, I = mcfg.hidden_size, mcfg.intermediate_size
    q, kv = mcfg.num_attention_heads * mcfg.head_dim, mcfg.num_key_value_heads * mcfg.head_dim
    return 8 * H + cb * (3 * H + q + 2 * kv + 3 * I)


def _logprob_backward_bytes(tokens: int, mcfg: ModelConfig, cb: int, scratch_bytes: int) -> int:
    """The fused log-prob backward beyond the head's gradient: its dX output [N, H] and the scratch
    its walk plan (kernels.logprob._bwd_plan, the kernel's own) takes within the budget."""
    from kernels.logprob import _bwd_plan
    H, V = mcfg.hidden_size, mcfg.vocab_size
    acc_row = 4 * H if cb != 4 else 0
    p = _bwd_plan(tokens, V, cb, acc_row, 64, 64, scratch_bytes)
    scratch = max(p.tc * acc_row + p.tc * p.vc * cb, tokens * p.vc_dw * cb if p.tc < tokens else 0)
    return tokens * H * cb + scratch


# ---- phases -------------------------------------------------------------------------------------

@dataclass
class TrainLayout:
    """How the policy's training state is laid out on one GPU."""
    shards: int  # ranks the FSDP2 shards span (1: whole)
    fsdp: bool
    master_bytes: int  # model.dtype
    compute_bytes: int  # distributed.param_dtype
    reduce_bytes: int  # distributed.reduce_dtype
    reshard_after_forward: bool = True
    activation_checkpointing: bool = True
    scratch_bytes: int = 1 << 30  # grpo.logprob_scratch_mib
    accumulate_unsharded: bool = False
    grads_persist: bool = True  # several micro-batches per optimizer step: the sharded grads stay between them


def layout_of(cfg: Config, cluster: Cluster) -> TrainLayout:
    d = cfg.distributed
    shards = (cluster.gpus_per_node if d.hsdp and cluster.nodes > 1 else cluster.world) if d.fsdp else 1
    return TrainLayout(shards=shards, fsdp=d.fsdp, master_bytes=_BYTES[cfg.model.dtype],
                       compute_bytes=_BYTES[d.param_dtype], reduce_bytes=_BYTES[d.reduce_dtype],
                       reshard_after_forward=d.reshard_after_forward,
                       activation_checkpointing=cfg.model.activation_checkpointing,
                       scratch_bytes=cfg.grpo.logprob_scratch_mib << 20,
                       accumulate_unsharded=d.accumulate_unsharded)


def state_items(p: Params, lay: TrainLayout) -> dict:
    """Training state kept across the whole step: master weights and AdamW's two moments (+ its
    fp32 step counter per tensor)."""
    n = p.numel(lay.shards)
    tag = f"1/{lay.shards}" if lay.shards > 1 else "whole"
    return {f"master weights ({tag})": n * lay.master_bytes,
            f"AdamW state ({tag})": 2 * n * lay.master_bytes + 4 * p.tensors()}


def train_items(mcfg: ModelConfig, p: Params, lay: TrainLayout, tokens: int, extra: dict | None = None) -> dict:
    """Peak of forward + backward of one micro-batch of `tokens` tokens (state and `extra`, the other
    resident models, included): the larger of the backward's start (every checkpoint held, the
    working set of one block or of the log-prob backward) and its end (every gradient, no
    activations). Gradients that do not persist between micro-batches (grads_persist False) fill up
    as the checkpoints drain, about as fast, so the start counts only the head's."""
    cb, L, H = lay.compute_bytes, p.layers, mcfg.hidden_size
    out = {**state_items(p, lay), **(extra or {})}
    blk, root = _numel(p.block, 1), _numel(p.root, 1)
    grads_sharded = p.numel(lay.shards) * lay.master_bytes
    if lay.fsdp and lay.shards > 1:
        gathered = (p.numel(1) if not lay.reshard_after_forward else root + 2 * blk) * cb
        # a block's grads in the compute dtype and their reduce-dtype copy for the reduce-scatter; the
        # root's (head, embeddings) in the compute dtype from the log-prob backward to the end
        unsharded = blk * (cb + lay.reduce_bytes) + root * cb
        if lay.accumulate_unsharded:
            unsharded += p.numel(1) * lay.reduce_bytes
    else:  # one whole copy in the compute dtype: nothing gathered; grads appear in the dtype of the weights
        gathered, unsharded = 0, 0
    ckpt = (L + 1) * tokens * H * cb + 2 * tokens * mcfg.head_dim * cb if lay.activation_checkpointing else 0
    blk_ws = tokens * _block_train_bytes_per_token(mcfg, cb) * (1 if lay.activation_checkpointing else L)
    lp_ws = _logprob_backward_bytes(tokens, mcfg, cb, lay.scratch_bytes)
    start = dict(out)
    if lay.fsdp and lay.shards > 1 or lay.grads_persist:
        start["gradients (sharded)" if lay.shards > 1 else "gradients"] = grads_sharded
    else:
        start["head / embedding gradient"] = _numel(p.root, 1) * lay.master_bytes  # the log-prob backward's dW first
    if gathered:
        start["gathered weights (compute dtype)"] = gathered
    if unsharded:
        start["unsharded gradients"] = unsharded
    if lay.activation_checkpointing:
        start["checkpointed activations"] = ckpt
        start["block recompute" if blk_ws >= lp_ws else "log-prob backward"] = max(blk_ws, lp_ws)
    else:
        start["activations (every block)"] = blk_ws + lp_ws
    # the end of backward / the optimizer step: every gradient, and a foreach AdamW's temporary
    # (sqrt of the second moment) the size of the state's shard
    end = dict(out)
    end["gradients" + (" (sharded)" if lay.shards > 1 else "")] = grads_sharded + unsharded + gathered
    end["AdamW step temporary"] = p.numel(lay.shards) * lay.master_bytes
    return start if sum(start.values()) >= sum(end.values()) else end


def rollout_items(mcfg: ModelConfig, p: Params, cfg: Config, lay: TrainLayout, rows: int, state: dict) -> dict:
    """Peak of generation with `rows` KV-cache rows (every rank of a TP group holds its shard of them)."""
    r, cb = cfg.rollout, lay.compute_bytes
    tp = r.tp_size
    lc = local_config(mcfg, tp)
    if tp == 1 and not lay.fsdp:  # one GPU without FSDP generates with the training weights themselves
        cb = lay.master_bytes
    dtype = {2: torch.bfloat16, 4: torch.float32}[cb]
    out = dict(state)
    if tp == 1 and lay.fsdp:
        out["generation weights (all, gathered)"] = p.numel(1) * cb
    else:
        out[f"generation weights (TP shard 1/{tp})"] = model_params(lc).numel(1) * cb
    S = _cache_slots(cfg)
    spare = 1  # the engine's padding row (Transformer.setup_caches gets rows + 1)
    kv_token = 2 * lc.num_hidden_layers * lc.num_key_value_heads * lc.head_dim * torch.empty((), dtype=dtype).element_size()
    out[f"KV cache ({rows}+{spare} rows x {S})"] = kv_token * (rows + spare) * S if rows else 0
    V = mcfg.vocab_size
    logits_row = V * 4 * (2 if tp > 1 else 1)  # under TP: the [tp*B, V/tp] gather buffer and the [B, V] logits
    if r.cuda_graphs and rows:
        sizes = sorted({min(1 << k, rows) for k in range(rows.bit_length() + 1)})
        out["CUDA graphs (logits + pool)"] = sum(sizes) * logits_row \
            + sizes[-1] * _block_infer_bytes_per_token(lc, cb)
    out["sampling ([rows, V] fp32 x5)"] = 5 * rows * V * 4
    prompts = max(1, -(-rows // r.group_size)) if rows else 0
    out["prefill"] = prompts * cfg.data.max_prompt_tokens * (_block_infer_bytes_per_token(lc, cb) + 2 * lc.hidden_size * cb)
    return out


def _cache_slots(cfg: Config) -> int:
    """Cache slots per row as the engine sizes them for the longest prompt (rollout._cache_len),
    rounded to the 256-token pages of the flash / varlen kernels that "auto" picks on a GPU."""
    from lwz.rollout import _cache_len
    kernel = cfg.rollout.decode_kernel if cfg.rollout.decode_kernel != "auto" else "flash"
    S = _cache_len(kernel, [cfg.data.max_prompt_tokens], [cfg.rollout.max_new_tokens])
    P = cfg.rollout.page_size
    return -(-S // P) * P if P else S


def reward_items(rm: ModelConfig, cfg: Config, cluster: Cluster, state: dict) -> tuple[dict, int]:
    """Peak of scoring on a host of the quality RM: (items, hosts)."""
    from lwz.rewards.quality import QualityRewardModel
    w = cfg.rewards
    hosts = len(set(w.quality_ranks)) or cluster.world
    cb = _BYTES[cfg.distributed.param_dtype]
    p = model_params(rm, reward_model=True)
    shard = w.quality_fsdp == "on" or (w.quality_fsdp == "auto" and hosts > 1
                                       and p.numel(1) * cb >= w.quality_fsdp_min_gib * GIB)
    shards = hosts if shard else 1
    batch = inspect.signature(QualityRewardModel.__init__).parameters["max_tokens_per_batch"].default
    out = dict(state)
    out[f"quality RM weights ({'1/' + str(shards) if shards > 1 else 'whole'})"] = p.numel(shards) * cb
    if shards > 1:
        out["quality RM gathered blocks + root"] = (2 * _numel(p.block, 1) + _numel(p.root, 1)) * cb
    out[f"quality RM forward ({batch} tokens)"] = batch * (_block_infer_bytes_per_token(rm, cb) + rm.hidden_size * cb)
    return out, hosts


def rm_resident(rm: ModelConfig, cfg: Config, cluster: Cluster) -> dict:
    items, _ = reward_items(rm, cfg, cluster, {})
    return {k: v for k, v in items.items() if k.startswith("quality RM weights")}


# ---- the plan -----------------------------------------------------------------------------------

def _largest(fn, hi: int, budget: int) -> int:
    """The largest x in [0, hi] with fn(x) <= budget (fn non-decreasing); 0 when even 1 does not fit."""
    if fn(1) > budget:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fn(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_memory(cfg: Config, cluster: Cluster, mcfg: ModelConfig | None = None, rm: ModelConfig | None = None,
                model_source: str = "") -> MemoryPlan:
    """Per-GPU bytes of every phase of `cfg` on `cluster`, the largest rows / micro-batch tokens that
    fit, and one line of advice per thing that does not fit. mcfg / rm: the policy's and the quality
    RM's shapes (default: read from model.path / rewards.quality_path, see load_shapes)."""
    if mcfg is None:
        mcfg, model_source = load_shapes(cfg.model.path, "model.path")
    if rm is None and cfg.rewards.quality:
        rm, _ = load_shapes(cfg.rewards.quality_path, "rewards.quality_path")
    check_sizes(cfg, mcfg, cluster)
    r, g = cfg.rollout, cfg.grpo
    budget = cluster.budget
    p = model_params(mcfg)
    lay = layout_of(cfg, cluster)
    extra = {}  # resident beside the policy's state: the reference model, this host's RM shard
    if g.kl_coef > 0:
        extra[f"reference model ({'1/' + str(lay.shards) if lay.shards > 1 else 'whole'})"] = \
            p.numel(lay.shards) * lay.compute_bytes
    if rm is not None:
        extra.update(rm_resident(rm, cfg, cluster))
    state = {**state_items(p, lay), **extra}

    samples = r.prompts_per_step // cluster.world * r.tp_size * r.group_size  # what one TP group decodes
    def roll(rows):
        return sum(rollout_items(mcfg, p, cfg, lay, rows, state).values())
    max_rows = _largest(roll, samples, budget)
    rows = min(r.batch_size, samples) if r.batch_size > 0 else max(max_rows, 1)

    def train_state(tokens):
        return train_items(mcfg, p, lay, tokens, extra)
    longest = cfg.data.max_prompt_tokens + r.max_new_tokens
    max_tok = _largest(lambda t: sum(train_state(t).values()), 1 << 22, budget)
    phases = [Phase("rollout", rollout_items(mcfg, p, cfg, lay, rows, state))]
    hosts = 0
    if rm is not None:
        items, hosts = reward_items(rm, cfg, cluster, {k: v for k, v in state.items() if k not in extra
                                                       or not k.startswith("quality")})
        phases.append(Phase("reward", items))
    phases.append(Phase("training", train_state(g.max_tokens_per_microbatch)))

    advice, notes = [], []
    gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    if max_rows == 0:
        fixed = roll(0)
        tp_ok = [t for t in (2, 4, 8) if t > r.tp_size and cluster.gpus_per_node % t == 0
                 and mcfg.num_attention_heads % t == 0 and mcfg.intermediate_size % t == 0
                 and (mcfg.num_key_value_heads % t == 0 or t % mcfg.num_key_value_heads == 0)]
        fix = f"set rollout.tp_size = {tp_ok[0]} (or larger)" if tp_ok else "use more GPUs or a smaller model"
        advice.append(f"rollout: weights and training state take {gib(fixed)} of {gib(budget)} before one "
                      f"KV-cache row: {fix}")
    elif r.batch_size > 0 and rows > max_rows:
        advice.append(f"rollout: rollout.batch_size = {r.batch_size} rows need {gib(roll(rows))} of {gib(budget)}: "
                      f"set rollout.batch_size <= {max_rows} (or 0: as many as fit)")
    if rm is not None and phases[1].total > budget:
        sharded = any(k.startswith("quality RM gathered") for k in phases[1].items)
        fix = ("set rewards.quality_fsdp = 'on'" if not sharded and hosts > 1 else
               "host it on more ranks (rewards.quality_ranks = [] is all)" if hosts < cluster.world else
               "use more GPUs or a smaller reward model")
        advice.append(f"reward: the quality RM on its {hosts} host(s) needs {gib(phases[1].total)} of {gib(budget)}: "
                      f"{fix}")
    if max_tok < g.max_tokens_per_microbatch:
        if max_tok >= longest:
            advice.append(f"training: grpo.max_tokens_per_microbatch = {g.max_tokens_per_microbatch} needs "
                          f"{gib(phases[-1].total)} of {gib(budget)}: set it <= {max_tok}")
        else:
            advice.append(f"training: even one longest sequence ({longest} tokens) needs "
                          f"{gib(sum(train_state(longest).values()))} of {gib(budget)}: shard the state over more "
                          f"GPUs (distributed.hsdp = false, more nodes) or shorten rollout.max_new_tokens")
    if lay.fsdp and lay.shards < cluster.world:
        notes.append(f"HSDP: training state sharded over the {lay.shards} GPUs of a node, replicated across nodes")
    if rm is not None and set(cfg.rewards.quality_ranks):
        notes.append("rollout / training are planned for a rank that hosts the quality RM (the busiest)")
    if r.page_size:
        notes.append("rollout.page_size > 0: rows x full length is the worst case; the paged pool takes "
                     "rollout.cache_mem_fraction of the free memory instead")
    return MemoryPlan(cluster, model_source, p.numel(1), phases, rows, max_rows, g.max_tokens_per_microbatch,
                      max_tok, advice, notes)


def format_plan(plan: MemoryPlan, config_name: str = "") -> str:
    """The plan as a plain-text table (GiB per GPU, phase by phase) and the limits."""
    c = plan.cluster
    lines = [f"lwz memory plan{' for ' + config_name if config_name else ''}: {c.nodes} node(s) x "
             f"{c.gpus_per_node} GPUs of {c.gpu_mem_gib:g} GiB ({c.budget / GIB:.1f} GiB usable, "
             f"{c.reserve_gib:g} reserved for CUDA/NCCL)",
             f"policy shapes: {plan.model} ({plan.num_params / 1e9:.2f}B parameters)" if plan.num_params >= 1e8
             else f"policy shapes: {plan.model} ({plan.num_params / 1e6:.2f}M parameters)"]
    w = max(len(k) for p in plan.phases for k in p.items) + 2
    for p in plan.phases:
        lines.append(f"{p.name:<10}{'':<{w}}{'GiB':>8}")
        for k, v in p.items.items():
            lines.append(f"{'':<10}{k:<{w}}{v / GIB:8.2f}")
        ok = "fits" if p.total <= c.budget else "DOES NOT FIT"
        lines.append(f"{'':<10}{'total':<{w}}{p.total / GIB:8.2f}  {ok}")
    lines.append(f"largest that fit: {plan.max_rows} KV-cache rows, rollout.batch_size (using {plan.rows}); "
                 f"{plan.max_microbatch_tokens} micro-batch tokens (using {plan.microbatch_tokens})")
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"does not fit: {a}" for a in plan.advice] or ["fits"]
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------

_FLAGS = {"--nodes": int, "--gpus-per-node": int, "--gpu-mem-gib": float, "--reserve-gib": float,
          "--shapes": str, "--rm-shapes": str, "--json": str}


def _split_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """The planner's own flags (`--nodes 8` or `--nodes=8`), the rest left for lwz.config.parse_args."""
    mine, rest, i = {}, [], 0
    while i < len(argv):
        flag, eq, v = argv[i].partition("=")
        i += 1
        if flag not in _FLAGS:
            rest.append(argv[i - 1])
            continue
        if not eq:
            if i >= len(argv):
                raise ConfigError(f"{flag}: missing value")
            v, i = argv[i], i + 1
        try:
            mine[flag[2:].replace("-", "_")] = _FLAGS[flag](v)
        except ValueError:
            raise ConfigError(f"{flag} = {v!r}: expected {_FLAGS[flag].__name__}") from None
    for k in ("nodes", "gpus_per_node"):
        if k in mine and mine[k] < 1:
            raise ConfigError(f"--{k.replace('_', '-')} = {mine[k]}: expected >= 1")
    if mine.get("gpu_mem_gib", 1) <= mine.get("reserve_gib", 0) or mine.get("gpu_mem_gib", 1) <= 0:
        raise ConfigError("--gpu-mem-gib must be > 0 and more than --reserve-gib")
    return mine, rest


def _config_path(argv: list[str]) -> str:
    """The --config / -c value of a command line that parse_args accepted ('' when absent)."""
    for i, a in enumerate(argv):
        flag, eq, v = a.partition("=")
        if flag in ("--config", "-c"):
            return v if eq else argv[i + 1]
    return ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[1])
        return 0
    with die_on_config_error():
        flags, rest = _split_flags(argv)
        cfg = parse_args(rest)
        cluster = Cluster(**{k: flags[k] for k in ("nodes", "gpus_per_node", "gpu_mem_gib", "reserve_gib")
                             if k in flags})
        try:
            mcfg, src = load_shapes(cfg.model.path, "model.path", flags.get("shapes"))
            rm = load_shapes(cfg.rewards.quality_path, "rewards.quality_path", flags.get("rm_shapes"))[0] \
                if cfg.rewards.quality else None
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        plan = plan_memory(cfg, cluster, mcfg, rm, src)
    print(format_plan(plan, _config_path(rest)))
    if flags.get("json"):
        with open(flags["json"], "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
