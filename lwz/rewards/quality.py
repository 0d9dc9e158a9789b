"""Writing-quality reward: a Bradley–Terry reward model (paper §2, "Writing RM").

`QualityRewardModel` is our `lwz.model.Transformer` backbone (module `model`, no LM head) plus a
scalar head `score = Linear(H, 1, bias=False)` read at the last token of each sequence. The
parameter names are exactly those of Hugging Face's `Qwen2/Qwen3/LlamaForSequenceClassification`
(`model.*`, `score.weight`), so HF folders load and save without renaming.

Last-token rule. Over a packed stream we read the last real token of each sequence. HF reads the
rightmost token whose id is not `pad_token_id`; the two agree whenever the text does not end in
the pad id. The text path (`forward`) strips trailing pad ids from each encoded text
(`strip_trailing_pad=True`), which gives HF's result even when pad == eos and the template ends
with eos.

Text path. `forward(prompts, answers, meta)`: the question is meta["question"] when present (the
untemplated user request), else the prompt. prompt + answer are rendered with the model's own
template ("chat": the tokenizer's chat template as a user/assistant exchange; "plain":
"{prompt}\\n\\n{answer}"; any string with {prompt} and {answer}; "auto": chat when the tokenizer has
one), tokenized with the model's own tokenizer, truncated to `max_length` tokens (keeping the
first max_length - 16 and the last 16, so the end-of-turn tokens the score is read at stay),
grouped into packed micro-batches of at most `max_tokens_per_batch` tokens, and scored under
torch.inference_mode(). An answer of None (broken format) gets the floor score `broken_score`:
"min" = the lowest score of the batch's valid answers (0.0 when none is valid), or a number.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from lwz.hf_io import _shard_files, load_state_into, save_hf_model
from lwz.model import ModelConfig, ModelLoadError, Transformer
from lwz.packing import pack_token_lists
from lwz.rewards import batch_meta
from lwz.tokenizer import has_tokenizer, load_tokenizer

SEQ_CLS_ARCHITECTURES = {
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}
RM_SETTINGS_NAME = "lwz_reward_model.json"  # template / max_length, next to config.json
_KEEP_TAIL = 16
PLAIN_TEMPLATE = "{prompt}\n\n{answer}"


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of total length <= max_tokens (a longer item goes alone),
    longest first, so similar lengths share a batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, size = [], [], 0
    for i in order:
        if cur and size + lengths[i] > max_tokens:
            batches.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def fill_broken(scores: torch.Tensor, broken_score) -> torch.Tensor:
    """Give the NaN entries of `scores` [B] (answers that are None) the floor score: "min" = the
    lowest of the batch's other scores (0.0 when there are none), or a number."""
    broken = torch.isnan(scores)
    if broken.any():
        if broken_score == "min":
            floor = float(scores[~broken].min()) if not broken.all() else 0.0
        else:
            floor = float(broken_score)
        scores = scores.masked_fill(broken, floor)
    return scores


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


class QualityRewardModel(nn.Module):
    """Scalar reward model: Transformer backbone + `score` head at the last token.

    Args:
      cfg: backbone config (lwz.model.ModelConfig).
      tokenizer: HF tokenizer (or any object with `encode(text, add_special_tokens=...)`);
        only the text path needs it.
      template: "auto" | "chat" | "plain" | a string containing {prompt} and {answer}.
      max_length: longest encoded text in tokens (longer ones are truncated, see module doc).
      max_tokens_per_batch: token budget of one packed forward in the text path.
      broken_score: "min" or a number: the score of an answer of None.
      strip_trailing_pad: drop trailing pad ids from encoded texts (HF's last-token rule).
    """

    name = "quality"

    def __init__(self, cfg: ModelConfig, tokenizer=None, template: str = "auto", max_length: int = 16384,
                 max_tokens_per_batch: int = 32768, broken_score="min", strip_trailing_pad: bool = True,
                 attn_backend: str = "auto", activation_checkpointing: bool = False):
        super().__init__()
        if cfg.model_type not in SEQ_CLS_ARCHITECTURES:
            raise ModelLoadError(f"reward model: unsupported model_type {cfg.model_type!r}")
        if max_length < 2 * _KEEP_TAIL:
            raise ValueError(f"reward model max_length: expected >= {2 * _KEEP_TAIL}, got {max_length}")
        if not (broken_score == "min" or isinstance(broken_score, (int, float))):
            raise ValueError(f"reward model broken_score: expected 'min' or a number, got {broken_score!r}")
        self.model = Transformer(cfg, attn_backend=attn_backend,
                                 activation_checkpointing=activation_checkpointing)
        self.model.lm_head = None  # sequence classification: no LM head
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = int(max_length)
        self.max_tokens_per_batch = int(max_tokens_per_batch)
        self.broken_score = broken_score
        self.strip_trailing_pad = strip_trailing_pad
        self.shard_group = None  # the process group of an FSDP2-sharded model (set by `shard`)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def pad_token_id(self) -> Optional[int]:
        """config.json's pad_token_id (the id transformers' last-token rule uses), else the
        tokenizer's."""
        if self.config.pad_token_id is not None:
            return int(self.config.pad_token_id)
        tok = self.tokenizer
        if tok is not None and getattr(tok, "pad_token_id", None) is not None:
            return int(tok.pad_token_id)
        return None

    def init_weights(self, seed: int = 0) -> None:
        """Random init: backbone as lwz.model does, head normal(0, initializer_range)."""
        self.model.init_weights(seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=g)
                                    * self.config.initializer_range)

    # ---- scoring --------------------------------------------------------------------------------

    def score_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Packed stream -> rewards [B] fp32, read at the last token of each sequence
        (cu_seqlens[b+1] - 1). Differentiable; sequences must be non-empty."""
        hidden = self.model(input_ids, position_ids, cu_seqlens, max_seqlen)
        last = cu_seqlens[1:].to(torch.int64) - 1
        return self.score(hidden.index_select(0, last)).squeeze(-1).float()

    def score_tokens(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token lists -> rewards [B] fp32 on CPU, packed in micro-batches of the token budget.
        Runs under the caller's grad mode.

        Sharded (FSDP2), every forward is a collective over the shard group, so every member must
        call this together, even with no sequences: all run as many forwards as the busiest member,
        padding with one-token dummy batches whose scores are dropped."""
        out = torch.empty(len(seqs), dtype=torch.float32)
        device = self.score.weight.device
        batches = token_budget_batches([len(s) for s in seqs], self.max_tokens_per_batch) if seqs else []
        group = self.shard_group
        n = len(batches)
        if group is not None:
            t = torch.tensor([n], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
            n = int(t.item())
        for b in range(n):
            if b < len(batches):
                idx = batches[b]
                packed = pack_token_lists([seqs[i] for i in idx], device=device)
                out[torch.tensor(idx)] = self.score_packed(*packed).detach().float().cpu()
            else:
                self.score_packed(*pack_token_lists([[0]], device=device))
        return out

    # ---- text path ------------------------------------------------------------------------------

    def _template_kind(self) -> str:
        if self.template == "auto":
            return "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"
        return self.template

    def render(self, prompt: str, answer: str) -> str:
        kind = self._template_kind()
        if kind == "chat":
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        tmpl = PLAIN_TEMPLATE if kind == "plain" else kind
        if "{prompt}" not in tmpl or "{answer}" not in tmpl:
            raise ValueError(f"reward model template must be 'auto', 'chat', 'plain' or contain "
                             f"{{prompt}} and {{answer}}: got {tmpl!r}")
        return tmpl.replace("{prompt}", prompt).replace("{answer}", answer)

    def encode(self, prompt: str, answer: str) -> list[int]:
        """Token ids of the rendered prompt + answer, trailing pad ids stripped, truncated."""
        if self.tokenizer is None:
            raise ModelLoadError("reward model has no tokenizer: pass tokenizer=... or load a folder "
                                 "that contains one")
        text = self.render(prompt, answer)
        special = self._template_kind() != "chat"  # chat templates carry their own special tokens
        try:
            ids = list(self.tokenizer.encode(text, add_special_tokens=special))
        except TypeError:
            ids = list(self.tokenizer.encode(text))
        pad = self.pad_token_id
        if self.strip_trailing_pad and pad is not None:
            while len(ids) > 1 and ids[-1] == pad:
                ids.pop()
        if not ids:
            raise ValueError("reward model: the rendered text encodes to no tokens")
        if len(ids) > self.max_length:
            ids = ids[:self.max_length - _KEEP_TAIL] + ids[-_KEEP_TAIL:]
        return ids

    def score_valid(self, prompts: Sequence[str], answers: Sequence[Optional[str]],
                    meta: Optional[Sequence[dict]] = None) -> torch.Tensor:
        """Rewards [B] fp32 (CPU) of the texts, NaN where the answer is None. Sharded (FSDP2), call
        the module itself instead (its forward hooks gather the root's parameters), on every
        member of the shard group together, even with no texts (see score_tokens)."""
        meta = batch_meta("QualityRewardModel", prompts, answers, meta)
        valid = [i for i, a in enumerate(answers) if a is not None]
        out = torch.full((len(prompts),), float("nan"), dtype=torch.float32)
        seqs = [self.encode(meta[i].get("question") or prompts[i], answers[i]) for i in valid]
        # FSDP2 writes its unsharded parameters in place, which inference tensors forbid
        with torch.inference_mode() if self.shard_group is None else torch.no_grad():
            scores = self.score_tokens(seqs)  # called even when empty: a sharded model needs every member
        if valid:
            out[torch.tensor(valid)] = scores
        return out

    def forward(self, prompts: Sequence[str], answers: Sequence[Optional[str]],
                meta: Optional[Sequence[dict]] = None) -> torch.Tensor:
        """Rewards [B] fp32 (CPU) for texts; see the module docstring for template, truncation,
        batching and the score of answers that are None."""
        return fill_broken(self.score_valid(prompts, answers, meta), self.broken_score)

    # ---- HF folders -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str, dtype=torch.float32, device="cpu", tokenizer=None,
                        allow_new_head: bool = False, seed: int = 0, shard_fn=None,
                        **kw) -> "QualityRewardModel":
        """Load an HF ...ForSequenceClassification folder with one label (`model.*` + `score.weight`)
        and, when present, its tokenizer and our settings file (template, max_length).

        allow_new_head=True also accepts a causal-LM folder (`model.*` [+ `lm_head.weight`], no
        `score.weight`): the backbone is loaded and the head is freshly initialised (for training).
        shard_fn: applied on the meta device before allocation (FSDP2, see `shard`), so each rank
        allocates and reads only its shard. Keyword arguments override the constructor's settings."""
        if not os.path.isdir(folder):
            raise ModelLoadError(f"{folder}: reward model folder not found")
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelLoadError(f"{cfg_path}: config.json not found")
        raw = _read_json(cfg_path)
        archs = raw.get("architectures") or []
        is_cls = any(a.endswith("ForSequenceClassification") for a in archs)
        labels = raw.get("id2label")
        # transformers leaves id2label out of config.json when it is its default of 2 labels
        n_labels = len(labels) if isinstance(labels, dict) else raw.get("num_labels", 2)
        if is_cls and n_labels != 1:
            raise ModelLoadError(f"{cfg_path}: a reward model needs one label, this one has {n_labels}")
        cfg = ModelConfig.from_hf(raw, source=cfg_path)
        settings_path = os.path.join(folder, RM_SETTINGS_NAME)
        settings = _read_json(settings_path) if os.path.isfile(settings_path) else {}
        for k in ("template", "max_length"):
            if k in settings:
                kw.setdefault(k, settings[k])
        if tokenizer is None and has_tokenizer(folder):
            tokenizer = load_tokenizer(folder, require_eos=False, pad_from_eos=False)

        with torch.device("meta"):
            rm = cls(cfg, tokenizer=tokenizer, **kw).to(dtype)
        if shard_fn is not None:
            if allow_new_head:
                raise ValueError("reward model: shard_fn cannot be combined with allow_new_head")
            shard_fn(rm)
        rm = rm.to_empty(device=device)
        new_head = False
        if not is_cls and allow_new_head:
            from safetensors import safe_open
            names = set()
            for path in _shard_files(folder):
                with safe_open(path, framework="pt", device="cpu") as f:
                    names.update(f.keys())
            new_head = "score.weight" not in names
        if new_head:
            rm.init_weights(seed)  # head (and anything not in the folder) random; backbone loaded below
            load_state_into(rm.model, folder, ignore=("lm_head.weight",))
        else:
            load_state_into(rm, folder, name_map=lambda k: k)
        return rm

    @staticmethod
    def shard(rm: "QualityRewardModel", mesh=None, reshard_after_forward: bool = True) -> "QualityRewardModel":
        """FSDP2-wrap like the policy (each decoder block, then the root with the head) over `mesh`
        (a 1-D DeviceMesh, default all ranks). Inference only: no gradient reduction."""
        from lwz.distributed import shard_model
        shard_model(rm, None, None, reshard_after_forward, mesh=mesh, layers=rm.model.layers)
        # Known from here on: inside forward FSDP2 swaps in unsharded plain tensors, so the
        # parameters cannot tell whether the model is sharded.
        rm.shard_group = mesh.get_group() if mesh is not None else torch.distributed.group.WORLD
        return rm

    @classmethod
    def from_config(cls, config, tokenizer=None, dtype=torch.float32, device="cpu", seed: int = 0,
                    **kw) -> "QualityRewardModel":
        """Randomly initialised reward model from an HF config.json (folder, file, dict or ModelConfig)."""
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
        rm = cls(cfg, tokenizer=tokenizer, **kw)
        rm.init_weights(seed)
        return rm.to(device=device, dtype=dtype)

    def hf_config(self) -> dict:
        """config.json for transformers' ...ForSequenceClassification with one label."""
        d = self.config.to_hf()
        for k in ("num_labels", "id2label", "label2id", "problem_type"):
            d.pop(k, None)
        d["architectures"] = [SEQ_CLS_ARCHITECTURES[self.config.model_type]]
        d["id2label"] = {"0": "LABEL_0"}
        d["label2id"] = {"LABEL_0": 0}
        pad = self.pad_token_id
        if pad is None:
            eos = self.config.eos_token_id
            pad = eos[0] if isinstance(eos, list) and eos else eos
        d["pad_token_id"] = int(pad) if pad is not None else 0
        return d

    def save_pretrained(self, folder: str, dtype: Optional[torch.dtype] = None,
                        state_dict: Optional[dict] = None) -> None:
        """Write an HF folder that transformers loads as ...ForSequenceClassification (num_labels=1,
        pad_token_id set), plus the tokenizer and our settings file. state_dict: the full weights
        to write (an FSDP2-sharded model's lwz.distributed.full_state_dict), default this module's."""

        state = dict(self.state_dict() if state_dict is None else state_dict)
        save_hf_model(state, self.config, folder, dtype=dtype, name_map=lambda k: k,
                      config_dict=self.hf_config())
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, RM_SETTINGS_NAME), "w") as f:
            json.dump({"template": self.template, "max_length": self.max_length}, f, indent=2)
