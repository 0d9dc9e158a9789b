"""Every setting of lwz as dataclasses, read from a TOML file plus dotted CLI overrides.

    cfg = load_config("configs/tiny.toml", ["--rollout.max_new_tokens=64", "--grpo.kl_coef", "0.01"])
    cfg = parse_args(sys.argv[1:])        # --config X.toml [--a.b=v ...] [--resume auto]
    save_config(cfg, "runs/x/config.toml")  # the resolved config; load_config reads it back equal

Defaults are the paper's settings (LongWriter-Zero, arXiv 2506.18841) scaled to one GPU where
the paper is silent or uses 64. The CPU default lives in configs/tiny.toml.

Each field's annotation (int, float, bool, str, Literal[...], Optional[X], list[X], tuple[X, ...])
says what a TOML value or a CLI string must be. TOML has no null, so an Optional field is None
when its key is absent; on the CLI `none`/`null` sets None.

Any problem is a `ConfigError` (a ValueError) whose message is one line naming the key, the
value and what was expected. Entry points print it as `config error: <message>` and exit 2
(`die_on_config_error`), with no traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import tomli_w


class ConfigError(ValueError):
    """A bad config file, key or value; str(err) is one line without the 'config error:' prefix."""


# --------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig:
    path: str = "assets/tiny-model"  # HF-format folder with config.json (+ safetensors if pretrained)
    init: Literal["pretrained", "random"] = "pretrained"  # load weights, or random init from config.json
    # dtype of the sharded master weights, gradients and optimizer state; compute, rollouts and the KV
    # cache run in distributed.param_dtype. Keep float32: in bf16 an AdamW step at lr ~1e-6 is below
    # half a bf16 ulp of most weights and rounds away.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_backend: Literal["auto", "flash", "varlen", "sdpa"] = "auto"  # varlen attention implementation
    activation_checkpointing: bool = True  # recompute each block in backward (14k-token sequences)


@dataclass
class TokenizerConfig:
    path: str = "assets/tokenizer"  # local HF tokenizer folder (tokenizer.json + tokenizer_config.json)


@dataclass
class DataConfig:
    prompts: str = "data/tiny_prompts.jsonl"  # JSONL, one {"prompt": ..., "length_range": [lo, hi]} a line
    shuffle: bool = True  # reshuffle the prompts every epoch (seeded by Config.seed)
    think: bool = True  # think-then-answer template; False = answer directly (no-think ablation)
    template_en: Optional[str] = None  # replaces the English template; must contain {question}
    template_zh: Optional[str] = None  # replaces the Chinese template; must contain {question}
    max_prompt_tokens: int = 2048  # longer templated prompts stop the run at start-up (or are skipped, below)
    skip_long_prompts: bool = False  # true: drop prompts over max_prompt_tokens at start-up (logged), not stop


@dataclass
class RolloutConfig:
    group_size: int = 32  # G: answers sampled per prompt (paper: 32)
    prompts_per_step: int = 4  # prompts per GRPO step (paper: not stated)
    max_new_tokens: int = 14000  # generation cap per answer (paper: 14k)
    temperature: float = 0.8  # sampling temperature (paper: 0.8)
    top_p: float = 1.0  # nucleus sampling threshold, in (0, 1]; 1 = off (paper: 1.0)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"])  # stop after any of these
    old_logprobs: Literal["recompute", "rollout"] = "recompute"  # pi_old: recomputed by the trainer, or the sampler's
    batch_size: int = 0  # KV-cache rows = most sequences decoded at once (waiting ones take finished rows); 0 = auto: all on CPU, what fits on CUDA
    cache_mem_fraction: float = 0.9  # batch_size = 0 on CUDA: share of the free memory (weights gathered) given to the KV cache
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA decode kernels only; eager if a capture fails)
    # 0 = static KV cache (every row sized for the whole budget); N = paged cache of N-token pages
    # (a multiple of 64 for the Triton kernel, of 256 for flash-attn / torch's paged varlen): memory follows the
    # real lengths, rows (batch_size) only cap the sequences in flight; sequences that cannot grow
    # give their pages back and are recomputed later (logged as rollout_preemptions)
    page_size: int = 0
    # decode step t+1 on the GPU while the host reads step t's tokens (stop checks, admissions); rows read
    # in place only (CUDA kernels); the same samples either way. Off until measured on a GPU.
    overlap: bool = False
    # decode attention kernel: auto = flash-attn when installed, else torch's paged varlen_attn, else
    # our Triton kernel on CUDA, sdpa on the CPU; or one of those forced
    decode_kernel: Literal["auto", "flash", "varlen", "triton", "sdpa"] = "auto"


@dataclass
class GRPOConfig:
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low (paper eps = 0.2)
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high (DAPO clip-higher when > clip_low)
    clip_c: Optional[float] = None  # dual-clip bound for negative advantages (> 1); None = off
    kl_coef: float = 0.0  # KL penalty to the reference model (paper: beta = 0, no reference model)
    kl_type: Literal["k1", "k2", "k3"] = "k3"  # KL estimator when kl_coef > 0
    loss_agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"  # how token losses are reduced to one number
    norm_const: Optional[float] = None  # divisor of seq-mean-token-sum-norm; None = rollout.max_new_tokens
    entropy_coef: float = 0.0  # entropy bonus (0 = off)
    ppo_epochs: int = 1  # passes over each step's rollouts
    mini_batches: int = 1  # optimizer steps per pass (the rollouts are split into this many)
    max_tokens_per_microbatch: int = 16384  # token budget of one packed forward/backward
    pack_cost: Literal["tokens", "quadratic"] = "quadratic"  # cost model balancing micro-batches/ranks
    # memory the fused log-prob backward may hold beyond its gradients: one walk needs an fp32 dX
    # accumulator (micro-batch tokens x hidden x 4 B) + a logits-gradient chunk of >= 1024 columns;
    # below that it walks twice, recomputing the logits for the head's gradient (+25% of its flops);
    # 88 keeps it under 100 MB (10^8 bytes) with the row statistics on top
    logprob_scratch_mib: int = 1024


@dataclass
class RewardsConfig:
    length: bool = True  # length reward (target word range per prompt)
    quality: bool = True  # writing-quality reward model
    format: bool = True  # format reward (one <think> then one <answer>, near-duplicate penalty)
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # length, quality, format advantages
    std_norm: bool = True  # divide each reward's group-centred value by the group std
    length_max_words: int = 12000  # L_max: the length reward reaches 0 here
    default_length_range: list[int] = field(default_factory=lambda: [400, 800])  # prompts with no range
    length_on_broken_format: Literal["zero", "whole_response"] = "zero"  # no answer tags: reward 0, or measure all
    quality_path: Optional[str] = None  # folder of the quality reward model (train.py needs it when quality = true)
    quality_ranks: list[int] = field(default_factory=list)  # ranks hosting the quality model; [] = all
    # FSDP2-shard the quality model over its hosting ranks, wrapped like the policy; auto = when
    # there are several hosts and its weights exceed quality_fsdp_min_gib
    quality_fsdp: Literal["auto", "on", "off"] = "auto"
    quality_fsdp_min_gib: float = 2.0  # size threshold of quality_fsdp = "auto"
    format_repetition_weight: float = 1.0  # weight of the near-duplicate-paragraph penalty in the format reward


@dataclass
class OptimConfig:
    lr: float = 1e-6  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = 0  # linear warmup from 0 over this many steps
    schedule: Literal["cosine", "constant"] = "constant"  # after warmup
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # global gradient-norm clip


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto = nccl with CUDA, else gloo
    fsdp: bool = True  # FSDP2 fully_shard per block + root
    reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3 style)
    param_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # FSDP2 compute dtype of params
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # gradient reduce-scatter dtype
    # True: keep each parameter's full unsharded gradient (reduce_dtype) across a mini-batch's
    # micro-batches and reduce-scatter once (less communication, + 4 bytes per parameter of the WHOLE
    # model on every rank: 28 GB at 7B); False: reduce-scatter after every micro-batch
    accumulate_unsharded: bool = False


@dataclass
class LoggingConfig:
    run_dir: str = "runs"  # runs go to run_dir/name
    progress: bool = True  # progress bar on rank 0
    plot: bool = True  # write metric plots at the end


@dataclass
class CheckpointConfig:
    every: int = 10  # steps between training checkpoints; 0 = off
    keep: int = 2  # newest checkpoints kept; 0 = keep all
    resume: str = "none"  # "none", "auto" (newest in the run dir) or a checkpoint path
    export_hf: bool = True  # write an HF-format model folder at the end
    # a fresh start (resume = "none") in a run folder that holds another run: move that run aside to
    # <run>.old-<time> (never deleted) instead of stopping
    overwrite: bool = False


@dataclass
class Config:
    seed: int = 0  # seeds sampling, shuffling and init
    steps: int = 150  # total GRPO steps (paper: 150)
    name: str = "lwz"  # run name; outputs in logging.run_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def norm_const(self) -> float:
        """Divisor of the seq-mean-token-sum-norm aggregation: grpo.norm_const or max_new_tokens."""
        if self.grpo.norm_const is not None:
            return float(self.grpo.norm_const)
        return float(self.rollout.max_new_tokens)

    @property
    def run_path(self) -> str:
        """Folder of this run: logging.run_dir/name."""
        return os.path.join(self.logging.run_dir, self.name)


@dataclass
class CPTDataConfig:
    # token folders written by `python -m lwz.data tokenize`, mixed by `weights` (a share of the
    # training tokens each, normalised to sum 1): e.g. a writing corpus 0.99 + think-format data 0.01
    sources: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    seq_len: int = 32768  # tokens of one packed micro-batch (documents packed, long ones split)
    tokens_per_step: int = 512 * 32768  # tokens of one optimizer step, all ranks (a multiple of seq_len x world size)
    heldout_share: float = 0.0  # share of each source's documents held out of training (seeded by Config.seed)
    eval_every: int = 0  # steps between held-out losses (and after the last step); 0 = off
    eval_tokens: int = 1 << 20  # held-out tokens per evaluation, at most (the first ones, the same every time)
    logprob_scratch_mib: int = 1024  # the fused log-prob backward's memory budget (see grpo.logprob_scratch_mib)


@dataclass
class CPTConfig:
    """Continual pretraining (lwz/pretrain.py): the GRPO config's model, tokenizer, optim,
    distributed, logging and checkpoint sections plus [cpt]."""
    seed: int = 0  # seeds init, the held-out split and the document order
    steps: int = 1000  # optimizer steps
    name: str = "cpt"  # run name; outputs in logging.run_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cpt: CPTDataConfig = field(default_factory=CPTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_path(self) -> str:
        """Folder of this run: logging.run_dir/name."""
        return os.path.join(self.logging.run_dir, self.name)


# --------------------------------------------------------------------------------------------
# One type-driven walk: TOML values and CLI strings become field values here


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _keys(root=None) -> dict[str, Any]:
    """{dotted key: field type} for every setting of `root` (Config or CPTConfig; sections are one
    level deep)."""
    out = {}
    for name, tp in _hints(root or Config).items():
        if _is_section(tp):
            out.update({f"{name}.{k}": t for k, t in _hints(tp).items()})
        else:
            out[name] = tp
    return out


def _optional_inner(tp):
    """X for Optional[X], else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list or (origin is tuple and args[-1] is Ellipsis):
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} " + "/".join(dict.fromkeys(_type_name(a) for a in args))
    return tp.__name__


def _show(v: Any) -> str:
    """A value as the one-line errors quote it: TOML-like lists and booleans, repr otherwise."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)} is not allowed: must be {allowed}")


def _bad(key: str, value: Any, tp) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)}: expected {_type_name(tp)}")


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}


def _unquote(text: str) -> str:
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        try:
            return tomllib.loads("v = " + s)["v"]
        except tomllib.TOMLDecodeError:
            return s[1:-1]
    return text


def _parse_text(text: str, tp) -> Any:
    """A CLI string as a Python value of type tp (bool, int, float, str); the text where it does not parse."""
    s = text.strip()
    try:
        if tp is bool:
            return _BOOLS.get(s.lower(), text)
        if tp is int:
            try:
                return int(s, 0)
            except ValueError:
                return float(s)  # 1e3; a fractional value then fails the int check
        if tp is float:
            return float(s)
    except ValueError:
        return text
    return _unquote(text)


def _split_list(text: str) -> Any:
    """`[1, 2]` or `["a", "b"]` (TOML arrays), `[a, b]` or `a,b` (bare items); '' is []."""
    s = text.strip()
    if s.startswith("["):
        try:
            return tomllib.loads("v = " + s)["v"]
        except tomllib.TOMLDecodeError:
            if not s.endswith("]"):
                return text
            return [x.strip() for x in s[1:-1].split(",") if x.strip()]  # bare items, trailing comma
    return [x.strip() for x in s.split(",")] if s.strip() else []


def _coerce(key: str, v: Any, tp, cli: bool = False) -> Any:
    """v as field type tp: a TOML/Python value, or with cli=True possibly a CLI string to parse."""
    inner = _optional_inner(tp)
    if inner is not None:
        if v is None or (cli and isinstance(v, str) and v.strip().lower() in ("none", "null")):
            return None
        return _coerce(key, v, inner, cli)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        items = _split_list(v) if cli and isinstance(v, str) else v
        if not isinstance(items, (list, tuple)):
            raise _bad(key, v, tp)
        fixed = origin is tuple and args[-1] is not Ellipsis
        item_types = args if fixed and len(items) == len(args) else [args[0]] * len(items)
        out = [_coerce(f"{key}[{i}]", x, t, cli) for i, (x, t) in enumerate(zip(items, item_types))]
        if fixed and len(out) != len(args):
            raise _bad(key, out, tp)
        return out if origin is list else tuple(out)
    raw = v
    if cli and isinstance(v, str) and origin is Literal:  # every Literal field is of strings
        v = raw = _unquote(v.strip())
    elif cli and isinstance(v, str):
        v = _parse_text(v, tp)
    if origin is Literal:
        if v in args and type(v) is type(args[0]):
            return v
    elif tp is bool:
        if isinstance(v, bool):
            return v
    elif tp in (int, float):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise _fail(key, v, "a finite number")
            if tp is float or isinstance(v, int) or v.is_integer():
                return tp(v)
    elif tp is str:
        if isinstance(v, str):
            return v
    else:
        raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in this file, not in the input
    raise _bad(key, raw, tp)


def _unknown(key: str, table: bool = False, root=None) -> ConfigError:
    """One line for an unknown dotted key (or TOML table), with the closest real name if any."""
    root = root or Config
    head = key.split(".")[0]
    sections = [k for k, tp in _hints(root).items() if _is_section(tp)]
    if table or ("." in key and head not in _hints(root)):
        match = difflib.get_close_matches(head, sections, n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else f" (sections: {', '.join(sections)})"
        return ConfigError(f"unknown section '{head}'" + ("" if table else f" in '{key}'") + hint)
    match = difflib.get_close_matches(key, list(_keys(root)), n=1, cutoff=0.6)
    if not match:  # a misplaced or misspelled field name: compare the last components
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _keys(root)}
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[c] for c in close]
    return ConfigError(f"unknown key '{key}'" + (f" (did you mean '{match[0]}'?)" if match else ""))


def _field_type(key: str, root=None):
    """The type of a dotted key of `root` (default Config); ConfigError for a section or an unknown key."""
    root = root or Config
    if key in _keys(root):
        return _keys(root)[key]
    if _is_section(_hints(root).get(key)):
        raise ConfigError(f"'{key}' is a section, not a key: set its keys in a [{key}] table or as "
                          f"'{key}.<name>', e.g. '{key}.{next(iter(_hints(_hints(root)[key])))}'")
    raise _unknown(key, root=root)


def _set(cfg: Config, key: str, value: Any, cli: bool = False) -> None:
    """Sets the dotted key of cfg to value (a TOML value, or a CLI string when cli) by its type."""
    value = _coerce(key, value, _field_type(key, type(cfg)), cli)
    *path, name = key.split(".")
    setattr(functools.reduce(getattr, path, cfg), name, value)


def _get(cfg: Config, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _toml_items(data: dict, root=None):
    """(dotted key, value) pairs of a parsed TOML document; [section] tables are one level deep."""
    root = root or Config
    for k, v in data.items():
        if isinstance(v, dict) and _is_section(_hints(root).get(k)):
            yield from ((f"{k}.{k2}", v2) for k2, v2 in v.items())
        elif isinstance(v, dict) and k not in _hints(root):
            raise _unknown(k, table=True, root=root)
        else:
            yield k, v


def _cli_items(args: list[str], root=None):
    """(key, text) pairs of `--a.b=v`, `--a.b v`, `a.b=v` and bare `--flag` (= true, bools only)."""
    i = 0
    while i < len(args):
        body = args[i][2:] if args[i].startswith("--") else args[i]
        i += 1
        key, eq, text = body.partition("=")
        key = key.replace("-", "_")  # --rollout.max-new-tokens
        if not key:
            raise ConfigError(f"'{args[i - 1]}': empty override key")
        if not eq:  # `--a.b v`, or a bare `--a.b` (= true) for a bool
            if i >= len(args) or args[i].startswith("--"):
                tp = _field_type(key, root)
                if tp is not bool:
                    raise ConfigError(f"--{key}: missing value (expected {_type_name(tp)})")
                text = "true"
            else:
                text = args[i]
                i += 1
        yield key, text


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `--a.b=v` / `--a.b v` / `a.b=v` overrides to cfg in place (no validation)."""
    for key, text in _cli_items(overrides, type(cfg)):
        _set(cfg, key, text, cli=True)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: every range and cross-field rule of the settings lives here

# key: allowed range, as the error quotes it; a list field's rule applies to each item; None skips
_RANGES = {
    "steps": ">= 1",
    "data.max_prompt_tokens": ">= 1",
    "rollout.group_size": ">= 2",
    "rollout.prompts_per_step": ">= 1",
    "rollout.max_new_tokens": ">= 1",
    "rollout.temperature": "> 0",
    "rollout.top_p": "in (0, 1]",
    "rollout.top_k": ">= 0",
    "rollout.batch_size": ">= 0",
    "rollout.cache_mem_fraction": "in (0, 1]",
    "rollout.page_size": ">= 0",
    "grpo.clip_low": "in [0, 1)",
    "grpo.clip_high": ">= 0",
    "grpo.clip_c": "> 1",
    "grpo.kl_coef": ">= 0",
    "grpo.norm_const": "> 0",
    "grpo.ppo_epochs": ">= 1",
    "grpo.mini_batches": ">= 1",
    "grpo.max_tokens_per_microbatch": "> 0",
    "grpo.logprob_scratch_mib": "> 0",
    "rewards.weights": ">= 0",
    "rewards.length_max_words": ">= 1",
    "rewards.quality_ranks": ">= 0",
    "rewards.quality_fsdp_min_gib": ">= 0",
    "rewards.format_repetition_weight": ">= 0",
    "optim.lr": ">= 0",
    "optim.betas": "in [0, 1)",
    "optim.eps": "> 0",
    "optim.weight_decay": ">= 0",
    "optim.warmup_steps": ">= 0",
    "optim.min_lr_ratio": "in [0, 1]",
    "optim.grad_clip": "> 0",
    "checkpoint.every": ">= 0",
    "checkpoint.keep": ">= 0",
    "cpt.weights": "> 0",
    "cpt.seq_len": ">= 2",
    "cpt.tokens_per_step": ">= 2",
    "cpt.heldout_share": "in [0, 1)",
    "cpt.eval_every": ">= 0",
    "cpt.eval_tokens": ">= 1",
    "cpt.logprob_scratch_mib": "> 0",
}


def _within(v: float, rule: str) -> bool:
    """v satisfies a rule of _RANGES: '>= a', '> a' or an interval 'in (a, b]' / '[a, b)' / ..."""
    op, _, rest = rule.partition(" ")
    if op in (">=", ">"):
        return v >= float(rest) if op == ">=" else v > float(rest)
    lo, hi = (float(x) for x in rest[1:-1].split(","))
    return (v >= lo if rest[0] == "[" else v > lo) and (v <= hi if rest[-1] == "]" else v < hi)


def validate(cfg: Config) -> Config:
    """Checks types, ranges and cross-field rules; raises ConfigError with one line, returns cfg
    with each value in its field's type (cfg may have been edited in Python)."""
    keys = _keys(type(cfg))
    for key in keys:
        _set(cfg, key, _get(cfg, key))
    for key, rule in _RANGES.items():
        if key not in keys:  # a key of the other root (Config / CPTConfig)
            continue
        v = _get(cfg, key)
        items = [(f"{key}[{i}]", x) for i, x in enumerate(v)] if isinstance(v, (list, tuple)) else [(key, v)]
        for k, x in items:
            if x is not None and not _within(x, rule):
                raise _fail(k, x, rule)

    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise _fail("name", cfg.name, "a non-empty name without '/'")
    if isinstance(cfg, CPTConfig):
        return _validate_cpt(cfg)
    for key in ("model.path", "tokenizer.path", "data.prompts", "logging.run_dir", "checkpoint.resume"):
        if not _get(cfg, key):
            raise _fail(key, "", "a non-empty path")  # resume: 'none', 'auto' or a checkpoint folder
    d, r, g, w = cfg.data, cfg.rollout, cfg.grpo, cfg.rewards
    for key, t in (("data.template_en", d.template_en), ("data.template_zh", d.template_zh)):
        if t is not None and "{question}" not in t:
            raise _fail(key, t, "a template containing '{question}'")
    for i, s in enumerate(r.stop_strings):
        if not s:
            raise _fail(f"rollout.stop_strings[{i}]", s, "a non-empty string")
    n_seqs = r.prompts_per_step * r.group_size
    if g.mini_batches > n_seqs:
        raise _fail("grpo.mini_batches", g.mini_batches,
                    f"<= rollout.prompts_per_step * rollout.group_size = {n_seqs}")
    longest = d.max_prompt_tokens + r.max_new_tokens
    if g.max_tokens_per_microbatch < longest:
        raise _fail("grpo.max_tokens_per_microbatch", g.max_tokens_per_microbatch,
                    f">= data.max_prompt_tokens + rollout.max_new_tokens = {longest} (the longest sequence)")

    if len(w.weights) != 3:
        raise _fail("rewards.weights", w.weights, "3 numbers (length, quality, format)")
    enabled = [w.length, w.quality, w.format]
    if not any(enabled):
        raise ConfigError("rewards.length/quality/format are all false: enable at least one reward")
    if not any(e and x > 0 for e, x in zip(enabled, w.weights)):
        raise _fail("rewards.weights", w.weights, "> 0 for at least one enabled reward")
    if w.quality and not w.quality_path:
        raise ConfigError("rewards.quality = true needs rewards.quality_path (a reward-model folder)")
    if len(w.default_length_range) != 2:
        raise _fail("rewards.default_length_range", w.default_length_range, "[lo, hi]")
    lo, hi = w.default_length_range
    if not 0 <= lo <= hi:
        raise _fail("rewards.default_length_range", w.default_length_range, "[lo, hi] with 0 <= lo <= hi")
    if hi >= w.length_max_words:
        raise _fail("rewards.length_max_words", w.length_max_words,
                    f"> rewards.default_length_range upper bound {hi}")
    c = cfg.checkpoint
    if c.overwrite and c.resume != "none":
        raise _fail("checkpoint.overwrite", c.overwrite,
                    f"false with checkpoint.resume = {c.resume!r} (a resume continues the run in place)")
    return cfg


def _validate_cpt(cfg: CPTConfig) -> CPTConfig:
    """CPTConfig's own rules (validate has checked types and _RANGES)."""
    for key in ("model.path", "tokenizer.path", "logging.run_dir", "checkpoint.resume"):
        if not _get(cfg, key):
            raise _fail(key, "", "a non-empty path")
    c = cfg.cpt
    if not c.sources:
        raise ConfigError("cpt.sources is empty: list the token folders of `python -m lwz.data tokenize`")
    for i, s in enumerate(c.sources):
        if not s:
            raise _fail(f"cpt.sources[{i}]", s, "a non-empty path")
    if len(set(c.sources)) != len(c.sources):
        raise _fail("cpt.sources", c.sources, "distinct folders")
    if len(c.weights) != len(c.sources):
        raise _fail("cpt.weights", c.weights, f"{len(c.sources)} numbers, one per cpt.sources entry")
    if c.tokens_per_step % c.seq_len:
        raise _fail("cpt.tokens_per_step", c.tokens_per_step, f"a multiple of cpt.seq_len = {c.seq_len}")
    if c.eval_every and not c.heldout_share:
        raise ConfigError(f"cpt.eval_every = {c.eval_every} needs held-out documents: set cpt.heldout_share > 0 "
                          f"(or cpt.eval_every = 0)")
    if cfg.checkpoint.overwrite and cfg.checkpoint.resume != "none":
        raise _fail("checkpoint.overwrite", cfg.checkpoint.overwrite,
                    f"false with checkpoint.resume = {cfg.checkpoint.resume!r} (a resume continues the run in place)")
    return cfg


# --------------------------------------------------------------------------------------------
# Entry points


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, root=None):
    """Config (or `root`: CPTConfig) from a TOML file (None = defaults), then CLI overrides, then
    validation."""
    root = root or Config
    cfg = root()
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' not found") from None
        except OSError as e:  # a folder, no permission
            raise ConfigError(f"config file '{path}' cannot be read: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid TOML: {str(e).splitlines()[0]}") from None
        try:
            for key, value in _toml_items(data, root):
                _set(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return validate(apply_overrides(cfg, list(overrides or [])))


def parse_args(argv: Optional[list[str]] = None, root=None):
    """`--config X.toml` (`-c X`, `--config=X`) plus overrides; `--resume V` = `--checkpoint.resume=V`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest = None, []
    while argv:
        arg = argv.pop(0)
        flag, eq, v = arg.partition("=")
        if flag not in ("--config", "-c", "--resume"):
            rest.append(arg)
            continue
        if not eq:
            if not argv:
                raise ConfigError(f"{flag}: missing value")
            v = argv.pop(0)
        if flag == "--resume":
            rest.append(f"--checkpoint.resume={v}")
        else:
            path = v
    return load_config(path, rest, root)


@contextlib.contextmanager
def die_on_config_error():
    """`with die_on_config_error(): cfg = parse_args()` prints `config error: ...` and exits 2."""
    try:
        yield
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg) -> dict:
    """Nested plain dict of a config (None values are left out: TOML has no null)."""
    return {f.name: to_dict(v) if dataclasses.is_dataclass(v) else v
            for f in dataclasses.fields(cfg) if (v := getattr(cfg, f.name)) is not None}


def to_toml(cfg: Config) -> str:
    """The config as TOML text: top-level keys, then one [section] table per section."""
    return "# lwz resolved config\n" + tomli_w.dumps(to_dict(cfg))


def save_config(cfg: Config, path: str) -> None:
    """Writes the resolved config as TOML (atomically); load_config(path) gives an equal Config."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(to_toml(cfg))
    os.replace(path + ".tmp", path)


__all__ = [
    "CPTConfig", "CPTDataConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "GRPOConfig",
    "LoggingConfig", "ModelConfig", "OptimConfig", "RewardsConfig", "RolloutConfig",
    "TokenizerConfig", "apply_overrides", "die_on_config_error", "load_config", "parse_args",
    "save_config", "to_dict", "to_toml", "validate",
]
