"""Our decoder for the Hugging Face Qwen2 / Qwen2.5 / Qwen3 / Llama architectures.

The training forward takes a packed stream (sequences laid end to end, no padding):
    forward(input_ids[N] int64, position_ids[N] int64, cu_seqlens[B+1] int32, max_seqlen) -> hidden[N, H]
and returns the final-normed hidden states; it never computes logits (the fused log-prob kernel
consumes `hidden` and `lm_head_weight`). Module names mirror the HF checkpoints, without the
leading "model." (see lwz/hf_io.py for the mapping).

Architecture differences handled here:
  qwen2 (Qwen2 / Qwen2.5): q/k/v projections with bias; tied or untied embeddings.
  qwen3: RMSNorm on each head of q and k before RoPE, explicit head_dim, no bias.
  llama: optional attention/MLP bias, rope_scaling of type "llama3".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _activation_checkpoint

from lwz.attention import decode_attention, varlen_attention
from lwz.hf_io import ModelLoadError, load_state_into, save_hf_model

ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


@dataclass
class ModelConfig:
    model_type: str  # "qwen2" | "qwen3" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (always on for qwen2)
    attention_out_bias: bool = False  # bias on o_proj (llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other HF fields, written back unchanged

    @classmethod
    def from_hf(cls, cfg: dict | str, source: str = "config") -> "ModelConfig":
        """Build from an HF config.json (a dict, a path to the file, or a folder holding it)."""
        if isinstance(cfg, (str, os.PathLike)):
            path = str(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ModelLoadError(f"{path}: config.json not found")
            try:
                with open(path) as f:
                    cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
            source = path
        mt = cfg.get("model_type")
        if mt not in ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: unknown architecture model_type={mt!r}; supported: {sorted(ARCHITECTURES)}")
        try:
            H, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope = cfg.get("rope_parameters") or {}
            scaling = cfg.get("rope_scaling") or None
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            if rope and rope.get("rope_type", "default") not in ("default", None):
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if scaling is not None:
                rtype = scaling.get("rope_type", scaling.get("type"))
                if rtype in ("default", None):
                    scaling = None
                elif rtype != "llama3":
                    raise ModelLoadError(f"{source}: rope scaling type {rtype!r} is not supported (only llama3)")
            known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                     "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
                     "max_position_embeddings", "initializer_range", "bos_token_id", "eos_token_id",
                     "pad_token_id", "architectures", "transformers_version", "torch_dtype", "dtype"}
            return cls(
                model_type=mt,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=H,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=nh,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or nh),
                head_dim=int(cfg.get("head_dim") or H // nh),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=True if mt == "qwen2" else bool(cfg.get("attention_bias", False)),
                attention_out_bias=mt == "llama" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=mt == "qwen3",
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                initializer_range=float(cfg.get("initializer_range", 0.02)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
                extra={k: v for k, v in cfg.items() if k not in known},
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json transformers reads back (both the legacy and the rope_parameters fields)."""
        d = dict(self.extra)
        d.update({
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default",
                                **(self.rope_scaling or {})},
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        })
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_out_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen3":
            d["attention_bias"] = False
        return d


# ---- building blocks ----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 and cast back (as HF does, so bf16 runs agree)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] fp32, with llama3 frequency scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = cfg.rope_scaling
    if s is not None:  # llama3: keep high frequencies, divide low ones by `factor`, blend in between
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, blended, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos/sin [N, head_dim] for the given positions (fp32 angles, cast to the activations' dtype)."""
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [N, heads, D]; HF's half-rotation convention (first half / second half of D)."""
    d = x.shape[-1] // 2
    rot = torch.cat([-x[..., d:], x[..., :d]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


# ---- KV cache (the rollout engine, lwz/rollout.py) --------------------------------------------------

@dataclass
class KVCache:
    """One attention layer's key/value cache, in the model's dtype; set on `Attention.kv_cache` by
    Transformer.setup_caches, so prefill, decode and training run the same Block.forward.

    Static (block_table None): k, v [R, S, Hkv, D]; row r holds one sequence, slot s the key/value
    of its token at position s.
    Paged: k, v [pages, P, Hkv, D] and block_table int32 [R, ceil(S / P)] (one tensor shared by
    every layer) maps row r's positions [j*P, (j+1)*P) to page block_table[r, j].
    """

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor | None = None

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [N, Hkv, D] at input_pos = CacheBatch.where (an index pair into k/v)."""
        self.k.index_put_(input_pos, k)
        self.v.index_put_(input_pos, v)

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, upto: int) -> None:
        """Static: cache[dst, :upto] = cache[src, :upto] (fan a prefilled prompt out to its other
        samples). Paged: src/dst are page indices and whole pages are copied (upto unused)."""
        for t in (self.k, self.v):
            if self.block_table is None:
                t[dst, :upto] = t[src, :upto]
            else:
                t[dst] = t[src]


@dataclass
class CacheBatch:
    """How one forward uses the layers' caches: every token's k/v is written at (rows[t],
    position_ids[t]); `lengths` None = prefill (packed varlen attention among the new tokens, the
    training path), else decode (one query per row attends to its first lengths[b] cached keys).

    where       the (row, slot) or (page, offset) index pair of every token (KVCache.update)
    rows        int32 [N] cache rows (decode kernels)
    lengths     int32 [N] or None
    block_table int32 [N, pages per row] (paged) or None
    max_length  host bound on lengths (lets the SDPA path read only the filled part), or None
    kernel      the decode attention kernel (lwz.attention.decode_backend)
    """

    where: tuple
    rows: torch.Tensor
    lengths: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    max_length: int | None = None
    kernel: str = "auto"

    @classmethod
    def build(cls, table: torch.Tensor | None, page: int, rows: torch.Tensor, positions: torch.Tensor,
              decode: bool, max_length: int | None = None, kernel: str = "auto") -> "CacheBatch":
        """rows, positions int64 [N]; table: the shared block table (paged) or None; page: P."""
        if table is None:
            where, bt = (rows, positions), None
        else:
            where = (table[rows, positions // page].long(), positions % page)
            bt = table.index_select(0, rows) if decode else None
        return cls(where, rows.to(torch.int32), (positions + 1).to(torch.int32) if decode else None, bt,
                   max_length, kernel)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim ** -0.5
        self.backend = "auto"
        self.kv_cache: KVCache | None = None  # set for generation (Transformer.setup_caches)

    def qkv(self, x, cos, sin):
        """x [N, H] -> q [N, Hq, D], k/v [N, Hkv, D] with q/k norm (qwen3) and RoPE applied."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(N, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(N, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache: CacheBatch | None = None):
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            self.kv_cache.update(cache.where, k, v)
        if cache is None or cache.lengths is None:
            o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale, self.backend)
        else:
            c = self.kv_cache
            o = decode_attention(q, c.k, c.v, cache.lengths, self.scale, rows=cache.rows,
                                 block_table=cache.block_table, max_length=cache.max_length,
                                 backend=self.backend, kernel=cache.kernel)
        return self.o_proj(o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(H, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, H, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache: CacheBatch | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---- the model ------------------------------------------------------------------------------------

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto", activation_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Not a buffer: it must survive meta-device construction and is cheap to keep on CPU.
        self.inv_freq = rope_inv_freq(cfg)
        self.activation_checkpointing = activation_checkpointing
        self.set_attn_backend(attn_backend)

    def set_attn_backend(self, backend: str) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin [N, head_dim] for `position_ids`. The inverse frequencies move to the device once
        (a decode step must not pay a host-to-device copy)."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        return rope_cos_sin(self.inv_freq, position_ids, dtype)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [V, H] output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, seed: int | None = None) -> None:
        """Random init from the config (normal(0, initializer_range), norms 1, biases 0), drawn on
        the parameters' device (a model built on the GPU never goes through host memory)."""
        dev = self.embed_tokens.weight.device
        g = torch.Generator(device=dev)
        if seed is not None:
            g.manual_seed(seed)
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=dev) * std)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, targets=None,
                temperature: float = 1.0, return_entropy: bool = False, logprob_scratch_bytes=None):
        """input_ids/position_ids [N] int64, cu_seqlens [B+1] int32 -> final-normed hidden [N, H].

        With `targets` [N] int64 (-100 = ignored) it returns `(logp [N] fp32, entropy [N] fp32 | None)`
        from the fused log-prob kernel instead. Computing them inside forward matters under FSDP2:
        the head weight is only guaranteed unsharded while the root module's forward runs.
        logprob_scratch_bytes: the log-prob backward's memory budget (None: the kernel's default)."""
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        if targets is None:
            return hidden
        from kernels.logprob import fused_logprobs
        return fused_logprobs(hidden, self.lm_head_weight, targets, temperature=temperature,
                              return_entropy=return_entropy, bwd_scratch_bytes=logprob_scratch_bytes)

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, cache: CacheBatch | None = None):
        """The decoder stack: [N] ids -> final-normed hidden [N, H]. With `cache` (generation, after
        setup_caches) every token's k/v is also written to the layers' caches, and a decode batch
        attends to them (cu_seqlens/max_seqlen unused then)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = _activation_checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, cache, use_reentrant=False)
            elif cache is not None:
                # generation calls the block's forward without module hooks: FSDP2's would lazily
                # initialise a block before the root (full_params_for_generation unsharded them all)
                x = layer.forward(x, cos, sin, cu_seqlens, max_seqlen, cache)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, V] fp32: the one place sampling logits are made. Accumulated and returned
        in fp32 without a half-precision rounding of the product, as the trainer's fused log-prob
        kernel computes them (kernels.logprob._acc_mm)."""
        from kernels.logprob import _acc_mm
        w = self.lm_head_weight
        out = torch.zeros(hidden.shape[0], w.shape[0], dtype=torch.float32, device=hidden.device)
        _acc_mm(out, hidden, w.t())
        return out

    def setup_caches(self, rows: int, max_len: int, page_size: int = 0, pages: int = 0) -> torch.Tensor | None:
        """Give every attention layer a KV cache in the parameters' dtype and device: static [rows,
        max_len] (page_size 0), or `pages` pages of page_size slots with one block table int32
        [rows, ceil(max_len / page_size)] shared by all layers (returned; entries point at page 0
        until the caller assigns pages). Head counts come from each Attention module."""
        w = self.embed_tokens.weight
        table = None
        if page_size:
            table = torch.zeros(rows, -(-max_len // page_size), dtype=torch.int32, device=w.device)
        for layer in self.layers:
            a = layer.self_attn
            shape = (pages, page_size, a.n_kv, a.head_dim) if page_size else (rows, max_len, a.n_kv, a.head_dim)
            a.kv_cache = KVCache(torch.zeros(shape, dtype=w.dtype, device=w.device),
                                 torch.zeros(shape, dtype=w.dtype, device=w.device), table)
        return table

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def caches(self) -> list:
        return [layer.self_attn.kv_cache for layer in self.layers]

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of cached k/v for `tokens` positions of one sequence, all layers, in the
        parameters' dtype (head counts from each Attention module)."""
        el = self.embed_tokens.weight.element_size()
        return sum(2 * tokens * l.self_attn.n_kv * l.self_attn.head_dim * el for l in self.layers)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    # -- Hugging Face folders (tensor I/O in lwz/hf_io.py) --
    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu", attn_backend: str = "auto",
                        activation_checkpointing: bool = False, shard_fn=None) -> "Transformer":
        """Load an HF folder: config.json + safetensors.

        shard_fn: optional callable applied to the model while it is still on the meta device (e.g.
        FSDP2 wrapping by lwz.distributed.shard_model); each rank then allocates and reads only its
        shard, so the full model is never materialised on one rank."""
        if not os.path.isdir(path):
            raise ModelLoadError(f"{path}: model folder not found")
        cfg = ModelConfig.from_hf(path)
        with torch.device("meta"):
            model = cls(cfg, attn_backend=attn_backend, activation_checkpointing=activation_checkpointing).to(dtype)
        if shard_fn is not None:
            shard_fn(model)
        model = model.to_empty(device=device)
        # A checkpoint saved untied but configured tied (or the reverse) is a mismatch the tensor names
        # reveal. A tied model's folder may still carry an lm_head.weight (some re-saved checkpoints
        # do): as in transformers, the tie wins and that copy is skipped.
        load_state_into(model, path, ignore=("lm_head.weight",) if cfg.tie_word_embeddings else ())
        return model

    @classmethod
    def from_config(cls, path_or_cfg, dtype=torch.float32, device="cpu", seed: int = 0, **kw) -> "Transformer":
        """Randomly initialised model from a config.json (folder, file or ModelConfig)."""
        cfg = path_or_cfg if isinstance(path_or_cfg, ModelConfig) else ModelConfig.from_hf(path_or_cfg)
        with torch.device(device):  # built and drawn on the device: a 1.5B model takes ~30 s on a CPU
            model = cls(cfg, **kw)
        model.init_weights(seed)
        return model.to(dtype=dtype)

    def save_pretrained(self, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
        save_hf_model(self.state_dict(), self.config, path, max_shard_bytes=max_shard_bytes)


def model_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) for sequences of length seq_len.

    Matmuls with weights: 6 * (non-embedding matmul params + lm head), i.e. 2 FLOPs per
    multiply-add, x3 for fwd+bwd. Attention scores and values: a token at position p (1-based)
    attends to p keys; QK^T and PV cost 4 * heads * head_dim * p FLOPs forward. Averaged over a
    causal sequence, p = (seq_len + 1) / 2, so fwd+bwd adds 12 * layers * heads * head_dim * (seq_len + 1) / 2.
    """
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = H * qd + 2 * H * kvd + qd * H + 3 * H * I
    dense = L * per_layer + H * cfg.vocab_size
    attn = 12 * L * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1) / 2
    return 6 * dense + attn
