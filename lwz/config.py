"""Every setting of lwz as dataclasses, read from a TOML file plus dotted CLI overrides.

    cfg = load_config("configs/tiny.toml", ["--rollout.max_new_tokens=64", "--grpo.kl_coef", "0.01"])
    cfg = parse_args(sys.argv[1:])        # --config X.toml [--a.b=v ...] [--resume auto]
    save_config(cfg, "runs/x/config.toml")  # the resolved config; load_config reads it back equal

Defaults are the paper's settings (LongWriter-Zero, arXiv 2506.18841) scaled to one GPU where
the paper is silent or uses 64. The CPU default lives in configs/tiny.toml.

Types drive parsing: each field's annotation (int, float, bool, str, Literal[...] for enums,
Optional[X], list[X], tuple[X, ...]) says what a TOML value or a CLI string must be. TOML has
no null, so an Optional field is None when its key is absent; on the CLI `none`/`null` sets None.

Any problem is a `ConfigError` (a ValueError) whose message is one line naming the key, the
value and what was expected. Entry points print it as `config error: <message>` and exit 2
(`die_on_config_error`), with no traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


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
    max_prompt_tokens: int = 2048  # longer templated prompts are an error


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
    # accumulator (micro-batch tokens x hidden x 4 B) + a logits-gradient chunk; below that the
    # accumulator lives in the gradients' own buffers (the hidden one's and the head's last ~tokens
    # rows, whose logits are recomputed: +2.7% of its flops at 16k tokens, V = 152064), or where the
    # head gradient cannot hold it (tokens >~ vocab, or a frozen head) it walks twice (+25%); 88
    # keeps it under 100 MB (10^8 bytes) with the ~1 MiB of row statistics on top (96 measured
    # 101.7 MB at 16k tokens).
    logprob_scratch_mib: int = 1024
    # false: where even the borrowed accumulator does not fit, walk once per token group and add the
    # head's gradient up over the groups in its dtype (bf16: rounded once per group) instead of
    # recomputing the logits a second time (10 -> 8 x tokens x hidden x vocab flops)
    logprob_exact_dw: bool = True


@dataclass
class RewardsConfig:
    length: bool = True  # length reward (target word range per prompt)
    quality: bool = True  # writing-quality reward model
    format: bool = True  # format reward (one <think> then one <answer>, repetition penalty)
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
    format_repetition_weight: float = 1.0  # weight of the repeated-content penalty in the format reward


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
    log_every: int = 1  # steps between log lines
    progress: bool = True  # progress bar on rank 0
    plot: bool = True  # write metric plots at the end


@dataclass
class CheckpointConfig:
    every: int = 10  # steps between training checkpoints; 0 = off
    keep: int = 2  # newest checkpoints kept; 0 = keep all
    resume: str = "none"  # "none", "auto" (newest in the run dir) or a checkpoint path
    export_hf: bool = True  # write an HF-format model folder at the end


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


# --------------------------------------------------------------------------------------------
# Type-driven conversion


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp):
    """X for Optional[X], else None."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        if len(set(args)) == 1:
            return f"list of {len(args)} {_type_name(args[0])}"
        return f"list of {len(args)} " + "/".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, value: Any, tp) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)}: expected {_type_name(tp)}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else _toml_value(value) if _toml_ok(value) else repr(value)


def _toml_ok(value: Any) -> bool:
    try:
        _toml_value(value)
        return True
    except TypeError:
        return False


def _convert(key: str, value: Any, tp) -> Any:
    """Checks/converts a TOML-typed value (or an already-parsed CLI value) to the field type."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _convert(key, value, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(
                f"{key} = {_show(value)}: expected one of " + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp)
        args = typing.get_args(tp)
        if origin is list:
            return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} = {_show(list(value))}: expected {_type_name(tp)}")
        return tuple(_convert(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise _bad(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, value, tp)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in this file, not in the input


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_scalar(key: str, text: str, tp) -> Any:
    """Parses one CLI string as the scalar type tp (int, float, bool, str, Literal)."""
    s = text.strip()
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _convert(key, _unquote(s), tp)
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ConfigError(f"{key} = {text!r}: expected bool (true/false/1/0)")
    if tp is int:
        try:
            return int(s.replace("_", ""), 0) if s.lower().startswith(("0x", "0o", "0b")) else int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                raise _bad(key, text, tp) from None
            if f.is_integer():
                return int(f)
            raise _bad(key, text, tp) from None
    if tp is float:
        try:
            return float(s)
        except ValueError:
            raise _bad(key, text, tp) from None
    if tp is str:
        return _unquote(text)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _unquote(s: str) -> str:
    s2 = s.strip()
    if len(s2) >= 2 and s2[0] == s2[-1] and s2[0] in "\"'":
        try:
            return tomllib.loads("v = " + s2)["v"]
        except tomllib.TOMLDecodeError:
            return s2[1:-1]
    return s


def _parse_cli_value(key: str, text: str, tp) -> Any:
    """Parses a CLI override string by the field type."""
    inner = _optional_inner(tp)
    if inner is not None:
        if text.strip().lower() in ("none", "null"):
            return None
        return _parse_cli_value(key, text, inner)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        s = text.strip()
        if s.startswith("["):
            try:
                items = tomllib.loads("v = " + s)["v"]
            except tomllib.TOMLDecodeError:
                # unquoted strings inside brackets: [a, b]
                body = s[1:-1] if s.endswith("]") else None
                if body is None:
                    raise _bad(key, text, tp) from None
                items = [p for p in (x.strip() for x in body.split(",")) if p != ""]
        else:
            items = [p.strip() for p in s.split(",")] if s else []
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            elem_types = list(args) if len(items) == len(args) else [args[0]] * len(items)
        else:
            elem_types = [args[0]] * len(items)
        out = []
        for i, (v, et) in enumerate(zip(items, elem_types)):
            out.append(_parse_scalar(f"{key}[{i}]", v, et) if isinstance(v, str) else v)
        return _convert(key, out, tp)
    return _parse_scalar(key, text, tp)


# --------------------------------------------------------------------------------------------
# Building a Config from dicts and overrides


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        full = prefix + name
        if _is_section(tp):
            keys.append(full)
            keys.extend(_all_keys(tp, full + "."))
        else:
            keys.append(full)
    return keys


def _unknown(key: str, table: bool = False) -> ConfigError:
    """One line for an unknown dotted key (or TOML table), with the closest real name if any."""
    parts = key.split(".")
    top = _hints(Config)
    if table or (len(parts) > 1 and parts[0] not in top):
        sections = [k for k, tp in top.items() if _is_section(tp)]
        match = difflib.get_close_matches(parts[0], sections, n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else f" (sections: {', '.join(sections)})"
        return ConfigError(f"unknown section '{parts[0]}' in '{key}'{hint}" if len(parts) > 1 and not table
                           else f"unknown section '{key}'{hint}")
    candidates = [k for k in _all_keys() if not _is_section(_hints_at(k))]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not match:  # a misplaced or misspelled field name: compare the last components
        leaf = parts[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in candidates}
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[close[0]]] if close else []
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return ConfigError(f"unknown key '{key}'{hint}")


def _hints_at(key: str):
    """The annotation of a dotted key (a section class or a field type)."""
    cls = Config
    tp = None
    for part in key.split("."):
        tp = _hints(cls)[part]
        cls = tp
    return tp


def _resolve(key: str):
    """(section object path, field type) for a dotted key, or raises unknown key."""
    parts = key.split(".")
    cls = Config
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(key)
        tp = hints[part]
        if i == len(parts) - 1:
            if _is_section(tp):
                raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. '{key}.{next(iter(_hints(tp)))}'")
            return tp
        if not _is_section(tp):
            raise _unknown(key)
        cls = tp
    raise _unknown(key)


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        full = prefix + name
        if name not in hints:
            raise _unknown(full, table=isinstance(value, dict) and not prefix)
        tp = hints[name]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} = {_show(value)}: expected a [{full}] table")
            kwargs[name] = _from_dict(tp, value, full + ".")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{full}: expected {_type_name(tp)}, got a table")
            kwargs[name] = _convert(full, value, tp)
    return cls(**kwargs)


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    obj = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p)
    setattr(obj, parts[-1], value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies `--a.b=v` / `--a.b v` / `a.b=v` overrides to cfg in place (no validation)."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        i += 1
        body = arg[2:] if arg.startswith("--") else arg
        if "=" in body:
            key, text = body.split("=", 1)
        else:
            key = body
            if i >= len(overrides) or (overrides[i].startswith("--") and not _looks_negative(overrides[i])):
                # a bare flag: only booleans may omit the value
                key = _norm_key(key)
                tp = _resolve(key)
                if tp is bool:
                    _set(cfg, key, True)
                    continue
                raise ConfigError(f"--{key}: missing value (expected {_type_name(tp)})")
            text = overrides[i]
            i += 1
        key = _norm_key(key)
        tp = _resolve(key)
        _set(cfg, key, _parse_cli_value(key, text, tp))
    return cfg


def _looks_negative(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _norm_key(key: str) -> str:
    """Accepts dashes for underscores (`--rollout.max-new-tokens`) when that names a real key."""
    if not key:
        raise ConfigError("empty override key")
    alt = key.replace("-", "_")
    return alt if alt in _all_keys() and key not in _all_keys() else key


# --------------------------------------------------------------------------------------------
# Validation of values


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)} is not allowed: must be {allowed}")


def validate(cfg: Config) -> Config:
    """Checks ranges and cross-field rules; raises ConfigError with one line, returns cfg."""
    # types first (cfg may have been edited in Python)
    for key in _all_keys():
        tp = _resolve_type_only(key)
        if tp is None:
            continue
        obj = cfg
        for p in key.split("."):
            obj = getattr(obj, p)
        _convert(key, obj, tp)

    def ge(key, v, lo):
        if v < lo:
            raise _fail(key, v, f">= {lo}")

    def gt(key, v, lo):
        if not v > lo:
            raise _fail(key, v, f"> {lo}")

    def finite(key, v):
        if isinstance(v, float) and not math.isfinite(v):
            raise _fail(key, v, "a finite number")

    ge("steps", cfg.steps, 0)
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise _fail("name", cfg.name, "a non-empty name without '/'")

    m = cfg.model
    if not m.path:
        raise _fail("model.path", m.path, "a non-empty folder path")
    if not cfg.tokenizer.path:
        raise _fail("tokenizer.path", cfg.tokenizer.path, "a non-empty folder path")

    d = cfg.data
    if not d.prompts:
        raise _fail("data.prompts", d.prompts, "a non-empty JSONL path")
    for k, t in (("data.template_en", d.template_en), ("data.template_zh", d.template_zh)):
        if t is not None and "{question}" not in t:
            raise _fail(k, t, "a template containing '{question}'")
    ge("data.max_prompt_tokens", d.max_prompt_tokens, 1)

    r = cfg.rollout
    ge("rollout.group_size", r.group_size, 2)
    ge("rollout.prompts_per_step", r.prompts_per_step, 1)
    ge("rollout.max_new_tokens", r.max_new_tokens, 1)
    finite("rollout.temperature", r.temperature)
    gt("rollout.temperature", r.temperature, 0)
    if not (0.0 < r.top_p <= 1.0):
        raise _fail("rollout.top_p", r.top_p, "in (0, 1]")
    ge("rollout.top_k", r.top_k, 0)
    for i, s in enumerate(r.stop_strings):
        if not s:
            raise _fail(f"rollout.stop_strings[{i}]", s, "a non-empty string")
    ge("rollout.batch_size", r.batch_size, 0)
    ge("rollout.page_size", r.page_size, 0)
    finite("rollout.cache_mem_fraction", r.cache_mem_fraction)
    if not (0.0 < r.cache_mem_fraction <= 1.0):
        raise _fail("rollout.cache_mem_fraction", r.cache_mem_fraction, "in (0, 1]")

    g = cfg.grpo
    finite("grpo.clip_low", g.clip_low)
    if not (0.0 <= g.clip_low < 1.0):
        raise _fail("grpo.clip_low", g.clip_low, "in [0, 1)")
    finite("grpo.clip_high", g.clip_high)
    ge("grpo.clip_high", g.clip_high, 0)
    if g.clip_c is not None:
        finite("grpo.clip_c", g.clip_c)
        gt("grpo.clip_c", g.clip_c, 1)
    finite("grpo.kl_coef", g.kl_coef)
    ge("grpo.kl_coef", g.kl_coef, 0)
    if g.norm_const is not None:
        finite("grpo.norm_const", g.norm_const)
        gt("grpo.norm_const", g.norm_const, 0)
    finite("grpo.entropy_coef", g.entropy_coef)
    ge("grpo.ppo_epochs", g.ppo_epochs, 1)
    ge("grpo.mini_batches", g.mini_batches, 1)
    gt("grpo.max_tokens_per_microbatch", g.max_tokens_per_microbatch, 0)
    gt("grpo.logprob_scratch_mib", g.logprob_scratch_mib, 0)
    n_seqs = r.prompts_per_step * r.group_size
    if g.mini_batches > n_seqs:
        raise _fail("grpo.mini_batches", g.mini_batches, f"<= rollout.prompts_per_step * rollout.group_size = {n_seqs}")
    longest = d.max_prompt_tokens + r.max_new_tokens
    if g.max_tokens_per_microbatch < longest:
        raise _fail(
            "grpo.max_tokens_per_microbatch",
            g.max_tokens_per_microbatch,
            f">= data.max_prompt_tokens + rollout.max_new_tokens = {longest} (the longest sequence)",
        )

    w = cfg.rewards
    if len(w.weights) != 3:
        raise _fail("rewards.weights", w.weights, "3 numbers (length, quality, format)")
    for i, x in enumerate(w.weights):
        finite(f"rewards.weights[{i}]", x)
        ge(f"rewards.weights[{i}]", x, 0)
    enabled = [w.length, w.quality, w.format]
    if not any(enabled):
        raise ConfigError("rewards.length/quality/format are all false: enable at least one reward")
    if not any(e and x > 0 for e, x in zip(enabled, w.weights)):
        raise _fail("rewards.weights", w.weights, "> 0 for at least one enabled reward")
    ge("rewards.length_max_words", w.length_max_words, 1)
    if len(w.default_length_range) != 2:
        raise _fail("rewards.default_length_range", w.default_length_range, "[lo, hi]")
    lo, hi = w.default_length_range
    if lo < 0 or lo > hi:
        raise _fail("rewards.default_length_range", w.default_length_range, "[lo, hi] with 0 <= lo <= hi")
    if hi >= w.length_max_words:
        raise _fail(
            "rewards.length_max_words", w.length_max_words,
            f"> rewards.default_length_range upper bound {hi}",
        )
    for i, rank in enumerate(w.quality_ranks):
        ge(f"rewards.quality_ranks[{i}]", rank, 0)
    finite("rewards.quality_fsdp_min_gib", w.quality_fsdp_min_gib)
    ge("rewards.quality_fsdp_min_gib", w.quality_fsdp_min_gib, 0)
    finite("rewards.format_repetition_weight", w.format_repetition_weight)
    ge("rewards.format_repetition_weight", w.format_repetition_weight, 0)

    o = cfg.optim
    finite("optim.lr", o.lr)
    ge("optim.lr", o.lr, 0)
    for i, b in enumerate(o.betas):
        if not (0.0 <= b < 1.0):
            raise _fail(f"optim.betas[{i}]", b, "in [0, 1)")
    gt("optim.eps", o.eps, 0)
    ge("optim.weight_decay", o.weight_decay, 0)
    ge("optim.warmup_steps", o.warmup_steps, 0)
    if not (0.0 <= o.min_lr_ratio <= 1.0):
        raise _fail("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    finite("optim.grad_clip", o.grad_clip)
    gt("optim.grad_clip", o.grad_clip, 0)

    if not cfg.logging.run_dir:
        raise _fail("logging.run_dir", cfg.logging.run_dir, "a non-empty folder path")
    ge("logging.log_every", cfg.logging.log_every, 1)

    c = cfg.checkpoint
    ge("checkpoint.every", c.every, 0)
    ge("checkpoint.keep", c.keep, 0)
    if not c.resume:
        raise _fail("checkpoint.resume", c.resume, "'none', 'auto' or a checkpoint path")
    return cfg


def _resolve_type_only(key: str):
    cls = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            return None if _is_section(tp) else tp
        cls = tp
    return None


# --------------------------------------------------------------------------------------------
# Public entry points


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Config from a TOML file (None = defaults), then CLI overrides, then validation."""
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' not found")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
        try:
            cfg = _from_dict(Config, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    else:
        cfg = Config()
    apply_overrides(cfg, list(overrides or []))
    return validate(cfg)


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """`--config X.toml` (or `--config=X.toml`) plus overrides; `--resume V` = `--checkpoint.resume=V`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-c", "--resume"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{a}: missing value")
            v = argv[i + 1]
            i += 2
        elif a.startswith(("--config=", "--resume=")):
            a, v = a.split("=", 1)
            i += 1
        else:
            rest.append(a)
            i += 1
            continue
        if a in ("--config", "-c"):
            path = v
        else:
            rest.append(f"--checkpoint.resume={v}")
    return load_config(path, rest)


@contextlib.contextmanager
def die_on_config_error():
    """`with die_on_config_error(): cfg = parse_args()` prints `config error: ...` and exits 2."""
    try:
        yield
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg) -> dict:
    """Nested plain dict of a config (tuples become lists; None values are left out)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif v is None:
            continue
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


# --------------------------------------------------------------------------------------------
# Minimal TOML writer (strings, numbers, bools, flat arrays, one level of tables)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-trip form, always with '.' or 'e'
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(cfg: Config) -> str:
    """The config as TOML text: top-level keys, then one [section] table per section."""
    d = to_dict(cfg)
    lines = ["# lwz resolved config"]
    tables = []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{name}]")
        for k, v in table.items():
            lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str) -> None:
    """Writes the resolved config as TOML (atomically); load_config(path) gives an equal Config."""
    text = to_toml(cfg)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "GRPOConfig",
    "LoggingConfig", "ModelConfig", "OptimConfig", "RewardsConfig", "RolloutConfig",
    "TokenizerConfig", "apply_overrides", "die_on_config_error", "load_config", "parse_args",
    "save_config", "to_dict", "to_toml", "validate",
]
