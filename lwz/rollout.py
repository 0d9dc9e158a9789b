"""Rollout engine: batched sampling with a KV cache, returning tokens and sampling log-probs.

    params = SamplingParams(n=8, max_new_tokens=14000, temperature=0.8, stop_token_ids=(eos,),
                            stop_strings=("</answer>",), seed=step_seed)
    batch = generate(model, prompt_ids, params, EngineSettings(sync_every=16), tokenizer=tok)
    # training takes the batch on through lwz.batch: from_rollout(batch, advantages), microbatch(...)
    # (SamplingParams.from_config / EngineSettings.from_config build both from a RolloutConfig)

How it runs (B = prompts * n samples through R cache rows, R = batch_size or what fits):
  1. Transformer.setup_caches gives every attention layer its KV cache (static [R + 1, S] or a
     pool of pages with one block table); the extra row R pads the batch buckets.
  2. Rounds (_Engine._round) run on the device only, over the occupied rows of a power-of-two
     bucket: the round's input token of each row goes through the same Block.forward as training
     (the cache written and read through CacheBatch), model.logits makes fp32 logits, a token is
     drawn, its log-probs written to the sample's output row, the row's count, stop token,
     stop strings (token-suffix match against the row's last K tokens) and budget checked. On CUDA
     each bucket's round is one CUDA graph. Nothing is read by the host.
  3. Every sync_every rounds (_Engine._sync) the host reads, in one copy (pinned memory on CUDA),
     each occupied row's finished flag, finish code, count and the tokens of the window. It checks
     the stop strings exactly on the decoded text (a string may end inside a token: only tokens
     that can complete one are decoded), ends samples, and admits waiting samples into the freed
     rows: a prompt is prefilled (minus its last token, the first round's input) as one packed
     varlen batch, or its rows are copied from a live sibling. A row that finished between two
     syncs keeps running harmlessly (its writes go to scratch slots) until the host frees it.
     Paged cache: each live row is granted the pages its next window needs; when the pool is
     short, the latest admitted sequence gives its pages back and waits (vLLM's recompute
     preemption: readmitted, it prefills its prompt and tokens and draws on; `preemptions`).

Sampling noise. The token at response position t of sample s is drawn by inverse CDF on the
(truncated) distribution with u = counter_uniform(seed, s, t), a hash of the three integers: the
samples do not depend on sync_every, the batch size, cache rows, admission order or padding.

Log-probs. Every sampled token gets two numbers:
  logprobs        log softmax(logits / temperature)[token], BEFORE top-k / top-p truncation.
                  This is what the trainer recomputes with kernels.logprob.fused_logprobs at the
                  same temperature (the logits accumulated in fp32 the same way), so with top_p = 1
                  and top_k = 0 (the paper's setting) it is exactly the sampling distribution's
                  log-prob, and old/new ratios are consistent.
  trunc_logprobs  the log-prob under the distribution actually sampled from when top_k > 0 or
                  top_p < 1: the truncated distribution renormalised. Equals `logprobs` when
                  nothing is truncated. Greedy decoding (temperature 0) gives 0 here (a point
                  mass) and the temperature-1 log-prob in `logprobs`.

Stop conditions, the finishing token kept in the response:
  "stop_token"   the token is in stop_token_ids (e.g. eos),
  "stop_string"  the decoded response now contains a stop string that ends in this token (the
                 response is cut right after it, so the string itself, e.g. "</answer>", is kept
                 in the tokens); `stopped_by[s]` names the string, and `strip_stop_string` cuts it
                 (and whatever the completing token added after it) from the decoded text,
  "length"       max_new_tokens generated, or the context (max_context) is full: truncated=True.

FSDP2. Wrap generation in `full_params_for_generation(model)`: every FSDP module (each
fully_shard'ed block and the root) is unsharded for the duration and resharded afterwards.
Memory while generating: one full copy of the parameters in the param dtype (e.g. 3.1 GB for
a 1.5B model in bf16) on every rank, plus the KV cache (Transformer.kv_bytes(1) per position:
Qwen2.5-1.5B, bf16: 28 KiB per token, so 64 sequences x 15k tokens = 27 GB in static rows).
Static cache: every row is sized for the longest sample's budget (prompt + max_new_tokens);
batch_size bounds it, and on CUDA batch_size = 0 sizes R to the free memory (cache_rows).
Paged cache (page_size P > 0): a pool of P-token pages (sized to the free memory on CUDA,
cache_pages); memory follows the real lengths and R (batch_size, or every sample) only caps the
sequences in flight.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
from dataclasses import dataclass, field

import torch

from lwz.attention import decode_backend
from lwz.model import CacheBatch
from lwz.packing import pack_token_lists

FINISH_REASONS = ("stop_token", "stop_string", "length")


# ---- results ---------------------------------------------------------------------------------------

@dataclass
class RolloutBatch:
    """S sampled sequences (prompt p's n samples are consecutive: sample s belongs to prompt_index[s]).

    Tensors are on the CPU, laid out for the packing op (lwz.packing.pack):
      prompt_tokens    int64 [S, Lp] left-padded with pad_id; real tokens at [prompt_starts[s]:]
      prompt_starts    int64 [S]     Lp - prompt_lengths
      prompt_lengths   int64 [S]
      response_tokens  int64 [S, Lr] right-padded with pad_id; real tokens at [:response_lengths[s]]
      response_lengths int64 [S]
      response_logprobs       fp32 [S, Lr] log softmax(logits / T) at the sampled token (0 in padding)
      response_trunc_logprobs fp32 [S, Lr] log-prob under the truncated (top-k/top-p) distribution
      truncated        bool [S]     finished by length (max_new_tokens or the context)
    finish_reasons[s] is one of FINISH_REASONS; stopped_by[s] is the stop string that ended sample
    s (finish reason "stop_string"; the first in stop_strings' order when several end at its last
    token), else None.
    `cat([prompt_tokens, response_tokens], 1)` holds each whole sequence contiguously from
    prompt_starts[s] for prompt_lengths[s] + response_lengths[s] tokens (sequence_tokens & co).
    """

    prompt_index: torch.Tensor
    prompt_tokens: torch.Tensor
    prompt_starts: torch.Tensor
    prompt_lengths: torch.Tensor
    response_tokens: torch.Tensor
    response_lengths: torch.Tensor
    response_logprobs: torch.Tensor
    response_trunc_logprobs: torch.Tensor
    truncated: torch.Tensor
    finish_reasons: list = field(default_factory=list)
    stopped_by: list = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    pad_id: int = 0
    cache_rows: int = 0  # KV-cache rows the engine decoded through (sequences at once)
    rounds: int = 0  # sampling rounds (one token for every live sequence each)
    preemptions: int = 0  # paged cache: sequences that gave their pages back and were recomputed
    host_syncs: int = 0  # times the host read the engine's state (once per sync_every rounds at most)

    def __len__(self) -> int:
        return int(self.prompt_index.numel())

    @property
    def num_samples(self) -> int:
        return len(self)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [row[s:].tolist() for row, s in zip(self.prompt_tokens, self.prompt_starts.tolist())]

    @property
    def response_ids(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.response_tokens, self.response_lengths.tolist())]

    @property
    def logprobs(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.response_logprobs, self.response_lengths.tolist())]

    @property
    def trunc_logprobs(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.response_trunc_logprobs, self.response_lengths.tolist())]

    @property
    def response_mask(self) -> torch.Tensor:
        """bool [S, Lr]: True on real response tokens."""
        Lr = self.response_tokens.shape[1]
        return torch.arange(Lr)[None, :] < self.response_lengths[:, None]

    @property
    def sequence_tokens(self) -> torch.Tensor:
        """int64 [S, Lp + Lr]: prompt (left-padded) then response (right-padded)."""
        return torch.cat([self.prompt_tokens, self.response_tokens], dim=1)

    @property
    def sequence_starts(self) -> torch.Tensor:
        return self.prompt_starts

    @property
    def sequence_lengths(self) -> torch.Tensor:
        return self.prompt_lengths + self.response_lengths


def logprob_mismatch(rollout_logp, trainer_logp, response_mask, lengths,
                     buckets=(256, 1024, 4096, 16384)) -> dict:
    """|rollout log-prob - trainer log-prob| over response tokens, overall and per length bucket.

    rollout_logp, trainer_logp [S, L] (e.g. batch.response_logprobs and lwz.batch.padded_responses
    of the trainer's [R] log-probs); response_mask bool [S, L]; lengths [S] (each sample's
    response length, which picks its bucket: "len<=256", "len<=1024", ..., "len>16384").
    Returns a flat dict for the metrics log: mean, max, tokens, and mean/<bucket>, max/<bucket>,
    tokens/<bucket> for every non-empty bucket.
    """
    d = (rollout_logp.float() - trainer_logp.float().to(rollout_logp.device)).abs()
    mask = response_mask.to(d.device).bool()
    lengths = torch.as_tensor(lengths).to(d.device)

    def stats(m):
        vals = d[m]
        if vals.numel() == 0:
            return 0.0, 0.0, 0
        return vals.mean().item(), vals.max().item(), int(vals.numel())

    out = {}
    out["mean"], out["max"], out["tokens"] = stats(mask)
    lo = -1
    edges = list(buckets) + [math.inf]
    for hi in edges:
        rows = (lengths > lo) & (lengths <= hi)
        name = f"len<={hi}" if hi != math.inf else f"len>{buckets[-1]}"
        mean, mx, n = stats(mask & rows[:, None])
        if n:
            out[f"mean/{name}"], out[f"max/{name}"], out[f"tokens/{name}"] = mean, mx, n
        lo = hi
    return out


# ---- FSDP2 --------------------------------------------------------------------------------------

@contextlib.contextmanager
def full_params_for_generation(model: torch.nn.Module):
    """Gather the full parameters of an FSDP2-sharded model for generation, reshard on exit.

    Calls unshard() on every FSDPModule inside `model` (each fully_shard'ed block and the root) and
    reshard() afterwards; a plain module passes through untouched. Cost while inside: one full
    copy of the parameters in the FSDP param dtype on each rank (plus the rollout's KV cache).
    generate() calls the submodules directly (no FSDP hooks fire), so nothing reshards midway.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # torch built without distributed
        FSDPModule = ()
    mods = [m for m in model.modules() if FSDPModule and isinstance(m, FSDPModule)]
    if not mods:
        yield model
        return
    # root first, then the blocks: the root's lazy init must see the whole tree
    done = []
    try:
        for m in mods:
            m.unshard()
            done.append(m)
        yield model
    finally:
        for m in reversed(done):
            m.reshard()


# ---- sampling -------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply rounds) of x in [0, 2**32): a Python int or an
    int64 tensor. The multipliers stay below 2**31, so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & _M32
    return x ^ (x >> 14)


def counter_uniform(seed: int, sample: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """U(0, 1) fp32 [B], a pure function of (seed, sample[b], position[b]) (int64 [B], >= 0):
    a counter-based generator, so what a sample draws at a position does not depend on the batch
    it is decoded in, its cache row, the admission order or when the host looks. 24 random bits
    per draw (the resolution of an fp32 cumulative probability)."""
    key = _mix32(_mix32((seed & _M32) ^ 0x9E3779B9) ^ ((seed >> 32) & _M32))
    h = _mix32((sample & _M32) ^ key)
    h = _mix32(h ^ (position & _M32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature-scaled logits [B, V] -> same with tokens outside top-k / top-p set to -inf."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -math.inf)
    return scaled


def _sample(logits, u, temperature, top_k, top_p):
    """logits fp32 [B, V]; u U(0, 1) fp32 [B], or None for greedy -> (tokens int64 [B], logp [B],
    trunc_logp [B]).

    Inverse-CDF sampling on the truncated distribution: the token is the first whose cumulative
    probability exceeds u * total (a token of probability 0 can never be picked). Greedy takes the
    argmax, with trunc_logp 0 (a point mass) and logp at temperature 1 when temperature is 0."""
    t = temperature if temperature > 0 else 1.0
    scaled = logits / t
    logp_all = torch.log_softmax(scaled, dim=-1)
    if u is None:
        tok = torch.argmax(logits, dim=-1)
        trunc = torch.zeros(tok.shape, dtype=torch.float32, device=tok.device)
    else:
        truncated = (top_k and top_k < logits.shape[-1]) or top_p < 1.0
        trunc_all = torch.log_softmax(_truncate(scaled, top_k, top_p), dim=-1) if truncated else logp_all
        cdf = trunc_all.exp().cumsum(-1)
        tok = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp_(max=logits.shape[-1] - 1)
        trunc = trunc_all.gather(-1, tok[:, None])[:, 0]
    return tok, logp_all.gather(-1, tok[:, None])[:, 0], trunc


_MAY_COMPLETE: dict = {}  # (tokenizer id, stop strings, vocab size) -> bool table


class _StopStrings:
    """Matches stop strings on the decoded tail of each response (across token boundaries)."""

    def __init__(self, stop_strings, tokenizer):
        self.strings = tuple(s for s in stop_strings if s)
        if self.strings and tokenizer is None:
            raise ValueError("generate: stop_strings needs a tokenizer to decode the responses")
        self.tok = tokenizer
        # a token contributes >= 1 character except partial UTF-8 bytes / special tokens: a window of
        # 4 tokens per character (a character is at most 4 bytes) + 8 always holds a whole stop
        # string that ends in the newest token
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 8

    def may_complete(self, vocab_size: int, device) -> torch.Tensor | None:
        """bool [vocab_size]: tokens that can complete a stop string (decoded alone they contain the
        last character of one, or a partial UTF-8 byte, or nothing); only those trigger the tail
        decode. The token completing a string adds its last character, so nothing is missed. None
        (check every token) when a stop string ends in whitespace, which decoders may strip."""
        if not self.strings or any(s[-1].isspace() for s in self.strings):
            return None
        key = (id(self.tok), self.strings, vocab_size)
        table = _MAY_COMPLETE.get(key)
        if table is None:
            n_tok = min(vocab_size, len(self.tok) if hasattr(self.tok, "__len__") else self.tok.get_vocab_size())
            lasts = {s[-1] for s in self.strings}
            texts = self._decode([[i] for i in range(n_tok)])
            table = torch.ones(vocab_size, dtype=torch.bool)  # ids the tokenizer lacks: always check
            table[:n_tok] = torch.tensor([t == "" or "\ufffd" in t or any(c in t for c in lasts) for t in texts])
            if len(_MAY_COMPLETE) > 8:
                _MAY_COMPLETE.clear()
            _MAY_COMPLETE[key] = table
        return table.to(device)

    def token_suffixes(self, device):
        """The stop strings as token sequences for the device's suffix match: (ids int64 [nS, K]
        right-aligned, pad bool [nS, K] True left of each string), each string's own encoding; or
        None without stop strings. A string the sampled tokens spell differently (or that ends
        mid-token) is still found by the host's exact check (hits)."""
        if not self.strings:
            return None
        encs = []
        for s in self.strings:
            e = self.tok.encode(s, add_special_tokens=False)
            encs.append(list(getattr(e, "ids", e)))
        K = max(len(e) for e in encs)
        ids = torch.full((len(encs), K), -2, dtype=torch.int64)
        for i, e in enumerate(encs):
            if e:
                ids[i, K - len(e):] = torch.tensor(e)
            else:
                ids[i] = -3  # never matches
        return ids.to(device), (ids == -2).to(device)

    def _decode(self, seqs):
        if hasattr(self.tok, "batch_decode"):
            return self.tok.batch_decode(seqs, skip_special_tokens=False)
        return self.tok.decode_batch(seqs, skip_special_tokens=False)  # a raw tokenizers.Tokenizer

    def hits(self, tails: list[list[int]]) -> list[str | None]:
        """tails: the last tokens of each response (newest last). For each, the stop string that
        ends in the newest token (it is in the tail's text but not in the text without the newest
        token), the first in self.strings' order when several do; None where none does."""
        if not self.strings or not tails:
            return [None] * len(tails)
        texts = self._decode(tails)
        found = [[s for s in self.strings if s in t] for t in texts]
        idx = [i for i, f in enumerate(found) if f and len(tails[i]) > 1]
        if idx:  # a hit already present without the newest token belongs to the window's past
            prev = self._decode([tails[i][:-1] for i in idx])
            for i, t in zip(idx, prev):
                found[i] = [s for s in found[i] if s not in t]
        return [f[0] if f else None for f in found]


def strip_stop_string(text: str, stop: str | None) -> str:
    """The decoded response `text` without the stop string `stop` that ended it (batch.stopped_by[s])
    and whatever the completing token added after it: text up to the string's last occurrence. The
    text unchanged when stop is None or not in it (e.g. decoded without special tokens)."""
    if not stop:
        return text
    at = text.rfind(stop)
    return text if at < 0 else text[:at]


# ---- generate -------------------------------------------------------------------------------------

def _model_device_dtype(model):
    w = model.embed_tokens.weight
    if hasattr(w, "to_local"):  # a DTensor (FSDP2) outside full_params_for_generation
        raise ValueError("generate: the model's parameters are sharded; wrap the call in "
                         "full_params_for_generation(model)")
    return w.device, w.dtype


@dataclass
class SamplingParams:
    """What to sample: n answers per prompt, each of at most max_new_tokens (and prompt + answer
    <= max_context; None: the model's max_position_embeddings). temperature 0 = greedy; top_k 0
    and top_p 1 = no truncation. A response ends after a stop token (kept) or after the token that
    completes a stop string (needs generate's tokenizer). seed keys every draw (counter_uniform)."""

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple = ()
    stop_strings: tuple = ()
    seed: int = 0
    max_context: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, r, stop_token_ids=(), seed: int = 0) -> "SamplingParams":
        """From a RolloutConfig (lwz.config) and the tokenizer's stop tokens."""
        return cls(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                   top_k=r.top_k, stop_token_ids=tuple(stop_token_ids), stop_strings=tuple(r.stop_strings),
                   seed=seed)


@dataclass
class EngineSettings:
    """How to run it (never what is sampled, except through the logits' rounding):
    batch_size          KV-cache rows = sequences decoded at once; 0 = all on the CPU, what fits in
                        cache_mem_fraction of the free memory on CUDA
    page_size           0 = static cache (each row sized for the longest budget); P = paged cache of
                        P-token pages (num_pages of them; 0 = sized to the free memory on CUDA,
                        every row's budget on the CPU)
    sync_every          decode rounds between two host looks at the finished flags (admission,
                        stop strings that can end mid-token, page grants)
    cuda_graphs         replay each round from a CUDA graph per batch bucket (CUDA kernels only)
    decode_kernel       "auto" or one of lwz.attention.DECODE_KERNELS
    """

    batch_size: int = 0
    cache_mem_fraction: float = 0.9
    page_size: int = 0
    num_pages: int = 0
    sync_every: int = 16
    cuda_graphs: bool = True
    decode_kernel: str = "auto"

    @classmethod
    def from_config(cls, r) -> "EngineSettings":
        return cls(batch_size=r.batch_size, cache_mem_fraction=r.cache_mem_fraction, page_size=r.page_size,
                   sync_every=r.sync_every, cuda_graphs=r.cuda_graphs, decode_kernel=r.decode_kernel)


def _check(sp: SamplingParams, es: EngineSettings) -> None:
    for name, ok, want in (
            ("n", sp.n >= 1, ">= 1"), ("max_new_tokens", sp.max_new_tokens >= 1, ">= 1"),
            ("temperature", sp.temperature >= 0, ">= 0"), ("top_p", 0.0 < sp.top_p <= 1.0, "in (0, 1]"),
            ("top_k", sp.top_k >= 0, ">= 0"), ("cache_mem_fraction", 0.0 < es.cache_mem_fraction <= 1.0, "in (0, 1]"),
            ("page_size", es.page_size >= 0, ">= 0"), ("num_pages", es.num_pages >= 0, ">= 0"),
            ("sync_every", es.sync_every >= 1, ">= 1"), ("batch_size", es.batch_size >= 0, ">= 0")):
        if not ok:
            value = getattr(sp, name) if hasattr(sp, name) else getattr(es, name)
            raise ValueError(f"generate: {name} must be {want}, got {value}")


@torch.no_grad()
def generate(model, prompt_ids, params: SamplingParams, engine: EngineSettings | None = None,
             tokenizer=None) -> RolloutBatch:
    """Sample params.n responses for each prompt (lists of token ids) with the KV-cache engine
    (see the module docstring). tokenizer (an HF tokenizer or a tokenizers.Tokenizer) is needed for
    stop strings. A prompt that leaves no room for one new token raises ValueError. Returns a
    RolloutBatch (CPU tensors)."""
    sp, es = params, engine or EngineSettings()
    _check(sp, es)
    cfg = model.config
    max_context = int(sp.max_context or cfg.max_position_embeddings)
    pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    prompts = [list(map(int, p)) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if len(p) + 1 > max_context:
            raise ValueError(f"generate: prompt {i} has {len(p)} tokens; with at least 1 new token it "
                             f"needs {len(p) + 1} > max_context={max_context}")
    stopper = _StopStrings(sp.stop_strings, tokenizer)
    num = len(prompts) * sp.n
    samples, rows, rounds, preemptions, syncs = [], 0, 0, 0, 0
    if num:
        device, dtype = _model_device_dtype(model)
        backend = model.layers[0].self_attn.backend if len(model.layers) else "sdpa"
        kernel = decode_backend(backend, device, dtype, es.decode_kernel)
        graphs = _want_graphs(device, kernel, es.cuda_graphs)
        caps = [min(sp.max_new_tokens, max_context - len(p)) for p in prompts]
        S = _cache_len(kernel, [len(p) for p in prompts], caps)
        per_token = model.kv_bytes(1)
        pages = 0
        if es.page_size:
            multiple = 256 if kernel in ("flash", "varlen") else 64 if kernel == "triton" else 1
            if es.page_size % multiple:
                raise ValueError(f"rollout.page_size={es.page_size}: the {kernel} decode kernel needs a multiple "
                                 f"of {multiple}")
            rows = min(es.batch_size, num) if es.batch_size > 0 else num
            pages = cache_pages(per_token, S, es.page_size, rows, _least_free(model, _free_bytes(device)), es.cache_mem_fraction,
                                es.num_pages)
        else:
            rows = cache_rows(per_token, S, num, es.batch_size, _least_free(model, _free_bytes(device)), es.cache_mem_fraction, spare=1)
        eng = _Engine(model, prompts, caps, sp, es, stopper, rows, S, pages, kernel, graphs)
        try:
            samples = eng.run()
        finally:
            model.clear_caches()
        rounds, preemptions, syncs = eng.rounds, eng.preemptions, eng.syncs
    out = _assemble(samples, prompts, pad_id, sp)
    out.cache_rows, out.rounds, out.preemptions, out.host_syncs = rows, rounds, preemptions, syncs
    return out


def cache_pages(token_bytes: int, S: int, page: int, rows: int, free_bytes: int | None, mem_fraction: float,
                num_pages: int = 0) -> int:
    """Pages of a paged KV cache (token_bytes: k/v bytes of one position, all layers): num_pages
    when given; else every row's whole budget on the CPU (free_bytes None: nothing is ever
    preempted), or what fits in mem_fraction of the free memory on CUDA (less the scratch page).
    Raises ValueError when the pool cannot hold one whole sequence."""
    per_seq = -(-S // page)
    page_bytes = token_bytes * page
    if num_pages:
        pages = num_pages
    elif free_bytes is None:
        pages = rows * per_seq
    else:
        pages = int(free_bytes * mem_fraction) // page_bytes - 1
    if pages < per_seq:
        have = "" if free_bytes is None else f" ({free_bytes / 2**30:.1f} GiB free)"
        raise ValueError(f"rollout: a KV-cache pool of {max(pages, 0)} pages of {page} tokens{have} cannot hold one "
                         f"sequence of {S} tokens ({per_seq} pages); shorten rollout.max_new_tokens or free memory")
    return pages


def _free_bytes(device) -> int | None:
    """Memory a CUDA allocation can get, in bytes: the driver's free memory plus what torch's caching
    allocator holds but does not use (the previous step's cache and activations). None elsewhere:
    the CPU cache is not budgeted."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _least_free(model, free: int | None) -> int | None:
    """`free` bytes, or for a tensor-parallel shard (lwz.tp: model.tp_group) the least of its group,
    so that every rank of the group sizes the same KV cache and runs the same schedule."""
    group = getattr(model, "tp_group", None)
    if free is None or group is None:
        return free
    t = torch.tensor([free], dtype=torch.int64, device=model.embed_tokens.weight.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
    return int(t.item())


def cache_rows(token_bytes: int, S: int, num: int, batch_size: int, free_bytes: int | None,
               mem_fraction: float, spare: int = 0) -> int:
    """KV-cache rows for `num` samples with S cache slots each (token_bytes: k/v bytes of one
    position, all layers), plus `spare` rows the engine allocates besides them (the padding row).

    batch_size > 0: that many (at most num); it must fit in the free memory when that is known.
    batch_size = 0: all num on the CPU (free_bytes None); on CUDA as many as fit in
    mem_fraction of the free memory (measured with the full parameters already gathered; the
    rest is left to prefill/decode activations and the logits). Raises ValueError, naming the
    setting, when not even the requested rows (or one row) fit."""
    row = token_bytes * S
    gib = 2 ** 30
    if batch_size > 0:
        rows = min(batch_size, num)
        if free_bytes is not None and (rows + spare) * row > free_bytes:
            raise ValueError(f"rollout.batch_size={batch_size}: {rows} KV-cache rows of {S} tokens need "
                             f"{rows * row / gib:.1f} GiB, {free_bytes / gib:.1f} GiB free on the device; "
                             f"lower it (0 sizes it to the free memory)")
        return rows
    if free_bytes is None:
        return num
    rows = min(num, int(free_bytes * mem_fraction) // row - spare)
    if rows < 1:
        raise ValueError(f"rollout.batch_size=0 (auto): one KV-cache row of {S} tokens needs {row / gib:.2f} GiB, "
                         f"but rollout.cache_mem_fraction={mem_fraction} of the {free_bytes / gib:.1f} GiB free "
                         f"is less; shorten rollout.max_new_tokens or free memory")
    return rows


def _cache_len(kernel: str, prompt_lens, caps) -> int:
    """Cache slots per row: the longest prompt + its token budget - 1 (the last token is never
    fed back), rounded up to 256 for the paged CUDA kernels (flash, varlen) that want such pages."""
    S = max(lp + c - 1 for lp, c in zip(prompt_lens, caps))
    if kernel in ("flash", "varlen"):
        S = -(-S // 256) * 256
    return S


def _want_graphs(device, kernel: str, cuda_graphs: bool) -> bool:
    """Graphs need CUDA, a kernel that reads cache rows in place (not SDPA's gather), cuda_graphs
    on, and no capture failure earlier in this process."""
    return bool(cuda_graphs) and kernel != "sdpa" and device.type == "cuda" and not _GRAPHS_FAILED


_GRAPHS_FAILED: list = []  # set after a capture failed: later rollouts run eagerly at once


class _Pages:
    """Host-side allocator of a paged KV cache: the free pages, each row's pages in order, and the
    device block table kept in step with them (unassigned entries point at a scratch page that no
    row owns, so a padded or stale read never touches another sequence's keys)."""

    def __init__(self, table, page: int, pages: int):
        self.table, self.P, self.scratch = table, page, pages
        self.free = list(range(pages - 1, -1, -1))  # pop() hands out the low pages first
        self.of: dict[int, list[int]] = {}
        self.table.fill_(pages)

    def need(self, length: int) -> int:
        return -(-length // self.P)

    def grant(self, row: int, length: int, rows: list, cols: list, got: list) -> None:
        """Pages so that `row` covers `length` positions; the table writes are collected."""
        have = self.of.setdefault(row, [])
        while len(have) < self.need(length):
            rows.append(row), cols.append(len(have)), got.append(self.free.pop())
            have.append(got[-1])

    def write(self, rows, cols, got) -> None:
        if got:
            dev = self.table.device
            self.table[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = torch.tensor(
                got, dtype=torch.int32, device=dev)

    def release(self, row: int) -> None:
        self.free.extend(self.of.pop(row, []))
        self.table[row] = self.scratch


def _host_read(t: torch.Tensor, pinned: torch.Tensor | None) -> list:
    """The engine's one device->host read per sync: t (int64, on the device) as nested lists.
    On CUDA through a page-locked buffer and an event (waits for this copy, nothing else)."""
    if pinned is None:
        return t.tolist()
    buf = pinned[:t.numel()].view(t.shape)
    buf.copy_(t, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    ev.synchronize()
    return buf.tolist()


_STOP_TOKEN, _STOP_STRING, _LENGTH = 1, 2, 3  # device finish codes (0: not finished)


class _Engine:
    """One generate call. Per cache row r (R rows + a padding row R) the device holds the round's
    input token and position, the sample it decodes, tokens drawn, budget, alive flag, finish code
    (and, with stop strings, its last K tokens); each sample's tokens and log-probs go to
    [samples + 1, longest budget] buffers (the last row absorbs the writes of finished rows).

    A round (_round) runs only on the device over the rows idx of a batch bucket (power of two,
    padded with row R): forward, sampling, log-probs, stop tokens, token-suffix stop strings,
    budgets. sync() is the host's look every sync_every rounds: one read of the finished flags,
    counts and the window's tokens; exact stop-string checks on the host; freed rows refilled
    (prefill of prompt[:-1], or a copy of a live sibling's rows: the last prompt token is the
    first round's input); pages granted for the next window (paged)."""

    def __init__(self, model, prompts, caps, sp, es, stopper, R, S, pages, kernel, graphs):
        self.model, self.prompts, self.sp, self.es, self.stopper = model, prompts, sp, es, stopper
        self.R, self.S, self.kernel, self.graphs = R, S, kernel, graphs
        self.device, dtype = _model_device_dtype(model)
        dev = self.device
        n = sp.n
        self.B = B = len(prompts) * n
        self.cap = [caps[b // n] for b in range(B)]
        self.plen = [len(prompts[b // n]) for b in range(B)]
        self.page = es.page_size
        table = model.setup_caches(R + 1, S, es.page_size, pages + 1 if es.page_size else 0)
        self.table = table
        self.pages = _Pages(table, es.page_size, pages) if es.page_size else None
        z = lambda *shape, dt=torch.int64: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
        self.tok, self.pos, self.count, self.capt, self.mark = z(R + 1), z(R + 1), z(R + 1), z(R + 1), z(R + 1)
        self.sample = torch.full((R + 1,), B, dtype=torch.int64, device=dev)
        self.alive, self.reason, self.which = z(R + 1, dt=torch.bool), z(R + 1), z(R + 1)
        L = max(self.cap)
        self.out_tok, self.out_lp, self.out_tlp = z(B + 1, L), z(B + 1, L, dt=torch.float32), z(B + 1, L, dt=torch.float32)
        # a membership table, not torch.isin: isin's sorting path (many stop ids) calls unique, whose
        # output size the host must read
        # the sampled vocabulary: a tensor-parallel shard (lwz.tp) holds V / tp rows of it
        V = getattr(model, "full_config", model.config).vocab_size
        ids = [t for t in set(sp.stop_token_ids) if 0 <= t < V]
        self.stop_table = torch.zeros(V, dtype=torch.bool, device=dev)
        if ids:
            self.stop_table[torch.tensor(ids, device=dev)] = True
        self.any_stop = bool(ids)
        self.enc = stopper.token_suffixes(dev)  # (ids [nS, K] right-aligned, pad mask) or None
        K = self.enc[0].shape[1] if self.enc is not None else 0
        self.tail = torch.full((R + 1, K), -1, dtype=torch.int64, device=dev)
        may = stopper.may_complete(V, "cpu") if stopper.strings else None
        self.may = None if may is None else may.tolist()
        self.max_length = S
        self.idx: dict = {}  # bucket size -> (idx buffer, graph or None)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.pinned = torch.empty((R + 1) * (4 + es.sync_every), dtype=torch.int64, pin_memory=True) \
            if dev.type == "cuda" else None
        self.rounds = self.preemptions = self.syncs = 0

    # -- the device round ----------------------------------------------------------------------------
    def _round(self, idx):
        sp, m = self.sp, self.model
        tok, pos = self.tok[idx], self.pos[idx]
        batch = CacheBatch.build(self.table, self.page, idx, pos, decode=True, max_length=self.max_length,
                                 kernel=self.kernel)
        logits = m.logits(m.hidden_states(tok, pos, None, 0, batch))
        sample, count, alive = self.sample[idx], self.count[idx], self.alive[idx]
        u = None if sp.greedy else counter_uniform(sp.seed, sample, count)
        new, lp, tlp = _sample(logits, u, sp.temperature, sp.top_k, sp.top_p)
        at = (torch.where(alive, sample, self.B), torch.where(alive, count, 0))
        self.out_tok.index_put_(at, new)
        self.out_lp.index_put_(at, lp)
        self.out_tlp.index_put_(at, tlp)
        count = count + alive
        code = torch.where(count >= self.capt[idx], _LENGTH, 0)
        if self.enc is not None:
            ids, pad = self.enc
            tail = torch.cat([self.tail[idx][:, 1:], new[:, None]], 1)
            match = ((tail[:, None, :] == ids[None]) | pad[None]).all(-1)  # [b, strings]
            self.which[idx] = torch.where(alive, match.to(torch.int8).argmax(-1), self.which[idx])
            code = torch.where(match.any(-1), _STOP_STRING, code)
            self.tail[idx] = torch.where(alive[:, None], tail, self.tail[idx])
        if self.any_stop:
            code = torch.where(self.stop_table[new], _STOP_TOKEN, code)
        done = alive & (code > 0)
        go = alive & ~done
        self.reason[idx] = torch.where(done, code, self.reason[idx])
        self.count[idx] = count
        self.alive[idx] = go
        self.tok[idx] = torch.where(go, new, tok)
        self.pos[idx] = pos + go

    def _bucket(self, rows: list[int]):
        """The idx buffer (and graph) of the smallest bucket holding `rows`, filled with them."""
        size = min(1 << max(len(rows) - 1, 0).bit_length(), self.R)
        st = self.idx.get(size)
        if st is None:
            buf = torch.full((size,), self.R, dtype=torch.int64, device=self.device)
            graph = None
            if self.graphs:
                graph = self._capture(buf)
            st = self.idx[size] = (buf, graph)
        buf, _ = st
        buf.copy_(torch.tensor(rows + [self.R] * (size - len(rows)), dtype=torch.int64), non_blocking=False)
        return st

    def _capture(self, buf):
        """A CUDA graph of one round over `buf` (warmed up on a side stream on the padding row,
        which only ever writes its own scratch slots); None, with a warning, if capture fails."""
        dev = self.device
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._round(buf)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._round(buf)
            return graph
        except Exception as e:  # a kernel that cannot be captured: this and later rollouts run eagerly
            _GRAPHS_FAILED.append(f"{type(e).__name__}: {e}")
            logging.getLogger("lwz").warning("rollout: CUDA graph capture failed (%s); decoding eagerly",
                                             _GRAPHS_FAILED[-1][:200])
            self.graphs = False
            torch.cuda.synchronize(dev)
            return None

    # -- the host side -------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        B, R, sp = self.B, self.R, self.sp
        self.pending = list(range(B))[::-1]  # a stack: the next sample to admit is pending[-1]
        self.free = list(range(R))  # min-heap of free rows
        self.row_of: dict[int, int] = {}  # sample -> row, in admission order
        self.resp: list[list[int]] = [[] for _ in range(B)]  # host copies of the tokens drawn
        self.final: list = [None] * B  # (length, reason, stop string) once finished
        while True:
            k = self._sync()
            if not self.row_of:
                break
            if not self.graphs:
                self.max_length = min(self.S, max(self.plen[b] + len(self.resp[b]) for b in self.row_of) + k)
            buf, graph = self._bucket(sorted(self.row_of.values()))
            for _ in range(k):
                if graph is not None:
                    graph.replay()
                else:
                    self._round(buf)
            self.rounds += k
        tok, lp, tlp = self.out_tok.cpu(), self.out_lp.cpu(), self.out_tlp.cpu()
        out = []
        for b in range(B):
            n, reason, stop = self.final[b]
            out.append(dict(prompt_index=b // sp.n, response=tok[b, :n], logp=lp[b, :n], tlogp=tlp[b, :n],
                            reason=reason, stopped_by=stop))
        return out

    def _sync(self) -> int:
        """Read what the last rounds did, finish, admit, grant pages; returns the rounds to run next."""
        dev, strings = self.device, self.stopper.strings
        kill = []
        if self.row_of:
            rows_t = torch.tensor(sorted(self.row_of.values()), dtype=torch.int64, device=dev)
            W = self.es.sync_every
            cols = (self.mark[rows_t][:, None] + torch.arange(W, device=dev)).clamp_(max=self.out_tok.shape[1] - 1)
            win = self.out_tok[self.sample[rows_t][:, None], cols]
            state = torch.stack([self.alive[rows_t].long(), self.reason[rows_t], self.which[rows_t],
                                 self.count[rows_t]], 1)
            flat = _host_read(torch.cat([state, win], 1), self.pinned)
            self.syncs += 1
            self.mark[rows_t] = self.count[rows_t]  # the next window starts at the current counts
            by_row = {r: v for r, v in zip(sorted(self.row_of.values()), flat)}
            checks = []  # (sample, response position) to decode on the host
            dev_end = {}
            for b, r in list(self.row_of.items()):
                alive, reason, which, count, *w = by_row[r]
                old = len(self.resp[b])
                self.resp[b].extend(w[:count - old])
                if not alive:
                    dev_end[b] = (count, reason, which)
                if strings:
                    last = count - 1 if not alive and reason == _STOP_TOKEN else count
                    checks += [(b, j) for j in range(old, last) if self.may is None or self.may[self.resp[b][j]]]
            hit = {}
            if checks:
                found = self.stopper.hits([self.resp[b][max(0, j + 1 - self.stopper.window):j + 1]
                                           for b, j in checks])
                for (b, j), s in zip(checks, found):
                    if s is not None and b not in hit:
                        hit[b] = (j + 1, s)
            for b, r in list(self.row_of.items()):
                end = dev_end.get(b)
                if b in hit and (end is None or hit[b][0] <= end[0]):
                    self.final[b] = (hit[b][0], "stop_string", hit[b][1])
                    if end is None:
                        kill.append(r)
                elif end is not None:
                    count, reason, which = end
                    name = {_STOP_TOKEN: "stop_token", _STOP_STRING: "stop_string", _LENGTH: "length"}[reason]
                    self.final[b] = (count, name, strings[which] if reason == _STOP_STRING else None)
                else:
                    continue
                del self.row_of[b]
                heapq.heappush(self.free, r)
                if self.pages is not None:
                    self.pages.release(r)
        k = self._admit(kill)
        return k

    def _admit(self, kill: list) -> int:
        """Fill free rows from the queue, grant the window's pages (preempting the latest admitted
        sequences while the pool is short); returns the rounds to run before the next sync."""
        dev = self.device
        pg = self.pages
        length = lambda b: self.plen[b] + len(self.resp[b])  # noqa: E731  (positions held after the window's input)
        new = []
        while self.pending and self.free:
            b = self.pending[-1]
            if pg is not None:
                live_need = sum(pg.need(length(c) + self.es.sync_every) - len(pg.of.get(r, []))
                                for c, r in self.row_of.items())
                if pg.need(min(length(b) + self.es.sync_every, self.S)) + max(live_need, 0) > len(pg.free):
                    break
            self.pending.pop()
            r = heapq.heappop(self.free)
            self.row_of[b] = r
            new.append(b)
        k = min(self.es.sync_every, max((self.cap[b] - len(self.resp[b]) for b in self.row_of), default=0))
        if pg is not None:  # every live row needs its positions through this window
            while True:
                short = sum(max(pg.need(min(length(b) + k, self.S)) - len(pg.of.get(r, [])), 0)
                            for b, r in self.row_of.items())
                if short <= len(pg.free) or len(self.row_of) <= 1:
                    break
                b = next(reversed(self.row_of))  # the latest admitted gives its pages back
                r = self.row_of.pop(b)
                pg.release(r)
                heapq.heappush(self.free, r)
                kill.append(r)
                if b in new:
                    new.remove(b)
                else:
                    self.preemptions += 1
                self.pending.append(b)
            grants = ([], [], [])
            for b, r in self.row_of.items():
                pg.grant(r, min(length(b) + k, self.S), *grants)
            pg.write(*grants)
        if new:
            self._fill(new)
        live = set(self.row_of.values())
        kill = [r for r in kill if r not in live]
        if kill:
            self.alive[torch.tensor(kill, device=dev)] = False
        return k

    def _fill(self, new: list[int]) -> None:
        """Cache and device state of the newly admitted samples `new`."""
        n, dev = self.sp.n, self.device
        holder = {}  # prompt -> a live row holding its k/v (positions < prompt length - 1)
        for b, r in self.row_of.items():
            if b not in new:
                holder.setdefault(b // n, r)
        fill, copies = [], []
        for b in new:
            r, p = self.row_of[b], b // n
            seq = self.prompts[p] + self.resp[b]
            if self.resp[b]:
                fill.append((seq[:-1], r))
            elif p in holder:
                copies.append((holder[p], r, self.plen[b] - 1))
            else:
                holder[p] = r
                fill.append((seq[:-1], r))
        fill = [(t, r) for t, r in fill if t]
        if fill:
            ids, pos, cu, max_len = pack_token_lists([t for t, _ in fill], device=dev)
            lens = torch.tensor([len(t) for t, _ in fill], device=dev)
            rows = torch.repeat_interleave(torch.tensor([r for _, r in fill], device=dev), lens)
            batch = CacheBatch.build(self.table, self.page, rows, pos, decode=False, kernel=self.kernel)
            self.model.hidden_states(ids, pos, cu, max_len, batch)
        copies = [c for c in copies if c[2] > 0]
        if copies:  # fan a held prompt out to more samples (a copy of its rows, not a recompute)
            if self.pages is None:
                src, dst = [s for s, _, _ in copies], [d for _, d, _ in copies]
                upto = max(L for _, _, L in copies)
            else:
                need = self.pages.need
                src = [pg for s, _, L in copies for pg in self.pages.of[s][:need(L)]]
                dst = [pg for _, d, L in copies for pg in self.pages.of[d][:need(L)]]
                upto = 0
            for c in self.model.caches():
                c.copy_rows(torch.tensor(src, device=dev), torch.tensor(dst, device=dev), upto)
        K = self.tail.shape[1]
        vals = []
        for b in new:
            seq = self.prompts[b // n] + self.resp[b]
            t = self.resp[b][-K:] if K else []
            vals.append([self.row_of[b], seq[-1], len(seq) - 1, b, len(self.resp[b]), self.cap[b]]
                        + [-1] * (K - len(t)) + t)
        v = torch.tensor(vals, dtype=torch.int64, device=dev)
        r = v[:, 0]
        self.tok[r], self.pos[r], self.sample[r], self.count[r], self.capt[r] = v[:, 1], v[:, 2], v[:, 3], v[:, 4], v[:, 5]
        self.mark[r] = v[:, 4]
        self.alive[r] = True
        self.reason[r] = 0
        if K:
            self.tail[r] = v[:, 6:]


def _assemble(samples, prompts, pad_id, sp: SamplingParams) -> RolloutBatch:
    S = len(samples)
    Lp = max((len(prompts[s["prompt_index"]]) for s in samples), default=0)
    Lr = max((len(s["response"]) for s in samples), default=0)
    prompt_tokens = torch.full((S, Lp), pad_id, dtype=torch.int64)
    response_tokens = torch.full((S, Lr), pad_id, dtype=torch.int64)
    lp_t = torch.zeros(S, Lr, dtype=torch.float32)
    tlp_t = torch.zeros(S, Lr, dtype=torch.float32)
    plens = torch.zeros(S, dtype=torch.int64)
    rlens = torch.zeros(S, dtype=torch.int64)
    for i, s in enumerate(samples):
        p = prompts[s["prompt_index"]]
        plens[i], rlens[i] = len(p), len(s["response"])
        prompt_tokens[i, Lp - len(p):] = torch.tensor(p, dtype=torch.int64)
        response_tokens[i, :rlens[i]] = s["response"]
        lp_t[i, :rlens[i]] = s["logp"]
        tlp_t[i, :rlens[i]] = s["tlogp"]
    reasons = [s["reason"] for s in samples]
    return RolloutBatch(
        prompt_index=torch.tensor([s["prompt_index"] for s in samples], dtype=torch.int64),
        prompt_tokens=prompt_tokens,
        prompt_starts=Lp - plens,
        prompt_lengths=plens,
        response_tokens=response_tokens,
        response_lengths=rlens,
        response_logprobs=lp_t,
        response_trunc_logprobs=tlp_t,
        truncated=torch.tensor([r == "length" for r in reasons], dtype=torch.bool),
        finish_reasons=reasons,
        stopped_by=[s["stopped_by"] for s in samples],
        temperature=float(sp.temperature),
        top_p=float(sp.top_p),
        top_k=int(sp.top_k),
        greedy=sp.greedy,
        pad_id=pad_id,
    )
