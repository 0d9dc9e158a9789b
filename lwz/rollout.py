"""Rollout engine: batched sampling with a KV cache, returning tokens and sampling log-probs.

    batch = generate(model, prompt_ids, n=8, max_new_tokens=14000, temperature=0.8,
                     stop_strings=("</answer>",), tokenizer=tok, generator=g)
    # training takes the batch on through lwz.batch: from_rollout(batch, advantages), microbatch(...)

How it runs (one rollout batch of B = prompts * n samples, `batch_size` = R cache rows):
  1. A static KV cache [R, S, Hkv, D] per layer is allocated once (S = the longest prompt + its
     token budget - 1); R = batch_size, or B when batch_size is 0.
  2. Continuous admission: samples wait in a queue (prompt by prompt) and enter free rows. A
     prompt is prefilled once, as part of ONE packed varlen batch of the admitted prompts, through
     the same blocks as training (model.prefill), into its first sample's row; its other samples
     get a copy of those rows (the prompt is never recomputed while a sibling is still decoding).
  3. Decode loop: one token per live sequence per step (model.decode_step). A sequence that
     finishes frees its row and a waiting sample takes it before the next token is drawn, so the
     batch stays full until the queue runs dry: with R < B the decode does not wait, batch after
     batch, for the longest answer of each (a 14k-token answer keeps one row busy, not R).
     On CPU/SDPA the live rows are kept contiguous (a survivor beyond the new end moves into a
     finished row: only those rows are copied); on CUDA the live rows' indices are passed to the
     kernel (flash-attn's cache_batch_idx, torch varlen_attn's paged cache with one page per row,
     or our Triton split-K kernel, kernels/decode_attention.py), so nothing is copied, and each
     decode step is replayed from a CUDA graph (one per power-of-two batch size, the batch padded
     with a spare row; _DecodeGraphs), so a small model's decode is not bound by launch overhead.

Log-probs. Every sampled token gets two numbers:
  logprobs        log softmax(logits / temperature)[token], BEFORE top-k / top-p truncation.
                  This is what the trainer recomputes with kernels.logprob.fused_logprobs at the
                  same temperature, so with top_p = 1 and top_k = 0 (the paper's setting) it is
                  exactly the sampling distribution's log-prob, and old/new ratios are consistent.
  trunc_logprobs  the log-prob under the distribution actually sampled from when top_k > 0 or
                  top_p < 1: the truncated distribution renormalised. Equals `logprobs` when
                  nothing is truncated. Greedy decoding gives 0 here (a point mass) and the
                  temperature-T log-prob (T = 1 when temperature is 0) in `logprobs`.

Sampling noise. Each step draws uniform noise for all R rows (live or not), turns it into Exp(1)
noise E and picks argmax(log p - log E) (the exponential race = sampling from p). A sample uses
the noise row of the slot it was admitted to (the smallest free one), whatever cache row holds it,
so compacted and indexed layouts draw the same samples; with batch_size 0 sample s always uses
row s. The same seed and batch_size give the same samples; another batch_size gives other
(equally valid) samples, since the admission schedule changes which noise a sample meets.

Stop conditions, checked after every token, the finishing token kept in the response:
  "stop_token"   the token is in stop_token_ids (e.g. eos),
  "stop_string"  the decoded response now contains a stop string (matched across token
                 boundaries on a tail window of the recent tokens, decoded only after tokens
                 that can complete a string; the response is cut right after the token that
                 completes it, so the string itself, e.g. "</answer>", is kept in the tokens);
                 `stopped_by[s]` names the string, and `strip_stop_string` cuts it (and
                 whatever the completing token added after it) from the decoded text,
  "length"       max_new_tokens generated, or the context (max_context) is full: truncated=True.

FSDP2. Wrap generation in `full_params_for_generation(model)`: every FSDP module (each
fully_shard'ed block and the root) is unsharded for the duration and resharded afterwards.
Memory while generating: one full copy of the parameters in the param dtype (e.g. 3.1 GB for
a 1.5B model in bf16) on every rank, plus the KV cache 2 * layers * R * S * Hkv * D * bytes
(Qwen2.5-1.5B, bf16: 28 KiB per token, so 64 sequences x 15k tokens = 27 GB).

Static cache (page_size 0): every row is sized for the longest sample's budget (prompt +
max_new_tokens) up front; batch_size bounds it (KVCache.nbytes_for(cfg, R, S, dtype) gives the
size), and on CUDA batch_size = 0 sizes R to the free memory (cache_rows).
Paged cache (page_size P > 0): a pool of P-token pages (sized to the free memory on CUDA,
cache_pages) and a block table per row. An admitted sample gets pages for its prompt (a sibling's
prompt pages are copied), a row gets one more page when its newest token starts one, and a
finished row gives its pages back, so memory follows the real lengths and R (batch_size, or every
sample) only caps the sequences in flight. Admission keeps ~1% of the pages free for growth; when
the live rows still need more pages than are free, the latest admitted sequence gives its pages
back and returns to the queue (vLLM's recompute preemption): readmitted, it prefills its prompt
and the tokens it already drew, then draws on (result field `preemptions`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
from dataclasses import dataclass, field

import torch

from lwz.attention import decode_backend
from lwz.model import KVCache
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


def _sample(logits, noise, temperature, top_k, top_p, greedy):
    """logits fp32 [B, V]; noise U[0, 1) [B, V] or None -> (tokens [B], logp [B], trunc_logp [B]).

    E = -log(1 - U) is Exp(1) and argmax(log p - log E) is a sample from p (the exponential race,
    i.e. the Gumbel-max trick); torch.rand is several times faster than exponential_ on the CPU."""
    t = temperature if temperature > 0 else 1.0
    scaled = logits / t
    logp_all = torch.log_softmax(scaled, dim=-1)
    if greedy:
        tok = torch.argmax(logits, dim=-1)
        trunc = torch.zeros(tok.shape, dtype=torch.float32, device=tok.device)
    else:
        truncated = (top_k and top_k < logits.shape[-1]) or top_p < 1.0
        trunc_all = torch.log_softmax(_truncate(scaled, top_k, top_p), dim=-1) if truncated else logp_all
        race = torch.log1p(noise.neg()).neg_().clamp_min_(1e-30).log_()  # log E, E ~ Exp(1)
        tok = torch.argmax(trunc_all - race, dim=-1)
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


@torch.no_grad()
def generate(model, prompt_ids, *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, greedy: bool = False, stop_token_ids=(),
             stop_strings=(), tokenizer=None, generator: torch.Generator | None = None,
             max_context: int | None = None, batch_size: int = 0, cache_mem_fraction: float = 0.9,
             compact: str | bool = "auto", cuda_graphs: bool = True, page_size: int = 0, num_pages: int = 0,
             overlap: bool = False, decode_kernel: str = "auto", pad_id: int | None = None) -> RolloutBatch:
    """Sample `n` responses for each prompt (lists of token ids) with a KV cache.

    temperature 0 means greedy. top_k = 0 and top_p = 1 disable truncation. stop_token_ids end a
    response with that token kept; stop_strings (needs `tokenizer`, an HF tokenizer or a
    tokenizers.Tokenizer) end it after the token completing the string. max_context (default
    the model's max_position_embeddings) bounds prompt + response; a prompt that leaves no room
    for one new token raises ValueError. batch_size > 0 decodes at most that many sequences at a
    time (cache rows), admitting waiting samples into rows as others finish; batch_size = 0 means
    all of them on the CPU and, on CUDA, as many as fit in `cache_mem_fraction` of the free memory
    (see cache_rows; the result's `cache_rows` says how many). compact: True = copy the survivors' cache rows
    when sequences finish, False = keep the cache and pass the survivors' row indices to attention,
    "auto" = copy on the SDPA path, indices on CUDA kernels. cuda_graphs: replay each decode step
    from a CUDA graph where the kernel allows (see _DecodeGraphs; falls back to eager decoding, with
    a warning, if a capture fails). page_size > 0: a paged KV cache of `page_size`-token pages
    (a multiple of 64; of 256 with flash-attn or torch's paged varlen kernel), num_pages of them
    (0: on CUDA what fits in cache_mem_fraction of the free memory, on the CPU every row's whole
    budget); rows then only bound how many sequences decode at once, and memory follows the real
    lengths. overlap: launch each next decode step before reading this step's tokens on the host
    (rows read in place only; see _decode_all); the same samples either way. decode_kernel: the
    decode attention kernel, "auto" or one of lwz.attention.DECODE_KERNELS (decode_backend).
    Returns a RolloutBatch (CPU tensors).
    """
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0, got {top_k}")
    if not 0.0 < cache_mem_fraction <= 1.0:
        raise ValueError(f"generate: cache_mem_fraction must be in (0, 1], got {cache_mem_fraction}")
    if page_size < 0 or num_pages < 0:
        raise ValueError(f"generate: page_size and num_pages must be >= 0, got {page_size}, {num_pages}")
    greedy = greedy or temperature == 0
    cfg = model.config
    max_context = int(max_context or cfg.max_position_embeddings)
    pad_id = int(pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0))
    prompts = [list(map(int, p)) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if len(p) + 1 > max_context:
            raise ValueError(f"generate: prompt {i} has {len(p)} tokens; with at least 1 new token it "
                             f"needs {len(p) + 1} > max_context={max_context}")
    stopper = _StopStrings(stop_strings, tokenizer)
    params = dict(n=n, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                  top_k=int(top_k), greedy=greedy, stop_token_ids=tuple(int(t) for t in stop_token_ids),
                  stopper=stopper, generator=generator, max_context=max_context, compact=compact,
                  cuda_graphs=cuda_graphs, overlap=bool(overlap))
    num = len(prompts) * n
    samples, rows, rounds, preemptions = [], 0, 0, 0
    if num:
        device, dtype = _model_device_dtype(model)
        backend = model.layers[0].self_attn.backend if len(model.layers) else "sdpa"
        kernel = decode_backend(backend, device, dtype, decode_kernel)
        params["kernel"] = kernel
        params["compact"] = kernel == "sdpa" and not page_size if compact == "auto" else bool(compact)
        if page_size and params["compact"]:
            raise ValueError("generate: a paged cache (page_size > 0) reads rows in place; compact must be False")
        params["cuda_graphs"] = _want_graphs(device, kernel, params["compact"], cuda_graphs)
        S = _cache_len(kernel, [len(p) for p in prompts], max_new_tokens, max_context)
        if page_size:
            multiple = 256 if kernel in ("flash", "varlen") else 64 if kernel == "triton" else 1
            if page_size % multiple:
                raise ValueError(f"rollout.page_size={page_size}: the {kernel} decode kernel needs a multiple "
                                 f"of {multiple}")
            rows = min(batch_size, num) if batch_size > 0 else num
            params["num_pages"] = cache_pages(model.config, S, page_size, dtype, rows + params["cuda_graphs"],
                                              _least_free(model, _free_bytes(device)), cache_mem_fraction, num_pages)
            params["page_size"] = page_size
        else:
            rows = cache_rows(model.config, S, dtype, num, batch_size, _least_free(model, _free_bytes(device)),
                              cache_mem_fraction, spare=int(params["cuda_graphs"]))
        samples, rounds, preemptions = _decode_all(model, prompts, rows, S, **params)
    out = _assemble(samples, prompts, n, pad_id, params)
    out.cache_rows, out.rounds, out.preemptions = rows, rounds, preemptions
    return out


def cache_pages(cfg, S: int, page: int, dtype, rows: int, free_bytes: int | None, mem_fraction: float,
                num_pages: int = 0) -> int:
    """Pages of a paged KV cache: num_pages when given; else every row's whole budget on the CPU
    (free_bytes None: nothing is ever preempted), or what fits in mem_fraction of the free memory on
    CUDA (less the scratch page). Raises ValueError when the pool cannot hold one whole sequence."""
    per_seq = -(-S // page)
    page_bytes = KVCache.nbytes_for(cfg, 1, page, dtype)
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


def cache_rows(cfg, S: int, dtype, num: int, batch_size: int, free_bytes: int | None,
               mem_fraction: float, spare: int = 0) -> int:
    """KV-cache rows for `num` samples with S cache slots each (plus `spare` rows the engine
    allocates besides them: the CUDA graphs' padding row).

    batch_size > 0: that many (at most num); it must fit in the free memory when that is known.
    batch_size = 0: all num on the CPU (free_bytes None); on CUDA as many as fit in
    mem_fraction of the free memory (measured with the full parameters already gathered; the
    rest is left to prefill/decode activations and the logits). Raises ValueError, naming the
    setting, when not even the requested rows (or one row) fit."""
    row = KVCache.nbytes_for(cfg, 1, S, dtype)
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


def _cache_len(kernel: str, prompt_lens, max_new_tokens, max_context) -> int:
    """Cache slots per row: the longest prompt + its token budget - 1 (the last token is never
    fed back), rounded up to 256 for the paged CUDA kernels (flash, varlen) that want such pages."""
    S = max(max(lp + min(max_new_tokens, max_context - lp) - 1, lp) for lp in prompt_lens)
    if kernel in ("flash", "varlen"):
        S = -(-S // 256) * 256
    return S


def _compact_order(keep: list[int], old: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Compacted layout: live sequence i sits in cache row i. After the sequences not in `keep`
    (sorted indices into the old live list of length `old`) finish, the survivors must fill rows
    0..len(keep)-1. Survivors already there stay; each one beyond moves into a hole (a finished row)
    so only those rows are copied. Returns (perm, moves): perm[j] = old index now in row j,
    moves = (src row, dst row) pairs."""
    k = len(keep)
    stay = {i for i in keep if i < k}
    movers = [i for i in keep if i >= k]
    holes = [j for j in range(k) if j not in stay]
    perm = list(range(k))
    for j, i in zip(holes, movers):
        perm[j] = i
    return perm, list(zip(movers, holes))


class _Pages:
    """Host-side allocator of a paged KV cache: the free pages, each row's pages in order, and the
    device block table kept in step with them (unassigned entries point at a scratch page that no
    row owns, so a padded or stale read never touches another sequence's keys)."""

    def __init__(self, cache, pages: int, rows: int):
        self.table, self.P, self.scratch = cache.block_table, cache.k[0].shape[1], pages
        self.free = list(range(pages - 1, -1, -1))  # pop() hands out the low pages first
        self.of: dict[int, list[int]] = {}
        # left free at admission for the live sequences to grow, unless every row's whole budget fits
        self.watermark = 0 if pages >= rows * self.table.shape[1] else max(1, pages // 100)
        self.table.fill_(pages)

    def need(self, length: int) -> int:
        return -(-length // self.P)

    def short(self, rows: list[int], lengths: list[int]) -> list[int]:
        """Positions i whose row rows[i] holds fewer pages than lengths[i] tokens need (one page
        short at most: the rows grow a token a step)."""
        return [i for i, (r, L) in enumerate(zip(rows, lengths)) if self.need(L) > len(self.of[r])]

    def give(self, grants: list[tuple[int, int]]) -> None:
        """grants: (row, pages to add) pairs; one block-table write for all of them."""
        rows, cols, got = [], [], []
        for row, k in grants:
            have = self.of.setdefault(row, [])
            for _ in range(k):
                rows.append(row), cols.append(len(have)), got.append(self.free.pop())
                have.append(got[-1])
        if got:
            dev = self.table.device
            self.table[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = torch.tensor(
                got, dtype=torch.int32, device=dev)

    def release(self, row: int) -> None:
        self.free.extend(self.of.pop(row, []))
        self.table[row] = self.scratch


def _admit(model, cache, prompts, n, new, new_rows, live, live_rows, prompt_hidden, device,
           resumed=None, pages=None):
    """Write the new samples `new` (sample ids) into cache rows `new_rows` and return the logits of
    their next token [len(new), V].

    A fresh sample's prompt is prefilled (all such prompts as one packed varlen batch) only when no
    live sibling (another sample of the same prompt) holds it already; otherwise the sibling's
    cache rows (pages, for a paged cache, whose pages the caller has granted) are copied. The final
    hidden state of each prompt's last token is kept in `prompt_hidden`, so every sample of a prompt
    starts from the same logits. `resumed` maps a sample that was preempted (paged cache) to the
    tokens it generated: it comes back by prefilling its prompt and those tokens."""
    resumed = resumed or {}
    holder = {}  # prompt -> a cache row that holds (or, once prefilled, will hold) its k/v
    for b, r in zip(live, live_rows):
        holder.setdefault(b // n, r)
    fill, copies = [], []  # (key, tokens, row) to prefill; (src row, dst row, prompt length) to copy
    for b, r in zip(new, new_rows):
        p = b // n
        if b in resumed:
            fill.append((("s", b), prompts[p] + resumed[b], r))
        elif p in holder:
            copies.append((holder[p], r, len(prompts[p])))
        else:
            holder[p] = r
            fill.append((("p", p), prompts[p], r))
    own = {}  # resumed sample -> hidden state of its last token
    if fill:
        ids, pos, cu, max_len = pack_token_lists([t for _, t, _ in fill], device=device)
        rows = torch.tensor([r for _, _, r in fill], dtype=torch.int64, device=device)
        hidden = model.prefill(ids, pos, cu, max_len, cache, rows)
        last = hidden[(cu[1:] - 1).long()]
        for i, ((kind, key), _, _) in enumerate(fill):
            (prompt_hidden if kind == "p" else own)[key] = last[i]
    if copies:  # fan a held prompt out to more samples (a copy of its rows, not a recompute)
        if pages is None:
            src, dst = [s for s, _, _ in copies], [d for _, d, _ in copies]
            upto = max(L for _, _, L in copies)
        else:  # whole pages; the last may carry the sibling's newer tokens, which are rewritten
            src = [pg for s, _, L in copies for pg in pages.of[s][:pages.need(L)]]
            dst = [pg for _, d, L in copies for pg in pages.of[d][:pages.need(L)]]
            upto = 0
        cache.copy_rows(torch.tensor(src, device=device), torch.tensor(dst, device=device), upto)
    keys = [("s", b) if b in resumed else ("p", b // n) for b in new]
    distinct = sorted(set(keys))
    where = {k: i for i, k in enumerate(distinct)}
    logits = model.logits(torch.stack([own[k] if kind == "s" else prompt_hidden[k] for kind, k in distinct]))
    return logits[torch.tensor([where[k] for k in keys], device=device)]


_GRAPHS_FAILED: list = []  # set after a capture failed: later rollouts run eagerly at once


class _DecodeGraphs:
    """Decode steps replayed from CUDA graphs: one graph per padded batch size (powers of two and
    the row count), captured on first use and dropped with the rollout (the parameters gathered
    for generation must keep their storage while the graphs live).

    A graph fixes its kernels' shapes and launch grids, so the live batch (B sequences) is padded to
    the graph's size with a spare cache row `pad_row` at position 0 whose outputs are dropped, and
    the attention splits are sized for the whole cache (max_length = S) instead of the longest live
    context. Replaying one graph launches the whole step (~30 kernels per layer) from the GPU: the
    decode of a small model stops being bound by Python's launch overhead.

    capture=False runs exactly the same padded steps eagerly (how the CPU tests check the padding).
    """

    def __init__(self, model, cache, S: int, pad_row: int, capture: bool, kernel: str = "auto"):
        self.model, self.cache, self.S, self.pad_row, self.capture = model, cache, S, pad_row, capture
        self.kernel = kernel  # the decode attention kernel (decode_backend)
        self.device = cache.k[0].device
        self.states: dict = {}  # padded size -> (tok, pos, rows, graph or None, logits or None)
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _step(self, tok, pos, rows):
        hidden = self.model.decode_step(tok, pos, self.cache, rows=rows, max_length=self.S, kernel=self.kernel)
        return self.model.logits(hidden)

    def _size(self, B: int) -> int:
        return min(1 << (B - 1).bit_length(), self.pad_row)  # pad_row == the rows sequences may use

    def _state(self, size: int):
        st = self.states.get(size)
        if st is None:
            tok = torch.zeros(size, dtype=torch.int64, device=self.device)
            pos = torch.zeros(size, dtype=torch.int64, device=self.device)
            rows = torch.full((size,), self.pad_row, dtype=torch.int64, device=self.device)
            graph = logits = None
            if self.capture:
                # warm up on a side stream (Triton compiles, cuBLAS workspaces), then capture
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._step(tok, pos, rows)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    logits = self._step(tok, pos, rows)
            st = self.states[size] = (tok, pos, rows, graph, logits)
        return st

    def __call__(self, tok, positions, rows):
        """tok, positions, rows int64 [B] (rows: cache rows, < pad_row) -> logits fp32 [B, V]."""
        B = tok.shape[0]
        t, p, r, graph, logits = self._state(self._size(B))
        t[:B].copy_(tok)
        p[:B].copy_(positions)
        r[:B].copy_(rows)
        if B < t.shape[0]:  # padding: the spare row at position 0 (earlier steps may have left live rows)
            t[B:].zero_()
            p[B:].zero_()
            r[B:].fill_(self.pad_row)
        if graph is None:
            return self._step(t, p, r)[:B]
        graph.replay()
        return logits[:B]


def _want_graphs(device, kernel: str, compact: bool, cuda_graphs: bool) -> bool:
    """Graphs need CUDA, a kernel that reads cache rows in place (not the compacted SDPA layout),
    cuda_graphs on, and no capture failure earlier in this process."""
    return bool(cuda_graphs) and not compact and kernel != "sdpa" and device.type == "cuda" and not _GRAPHS_FAILED


class _LiveRows:
    """The sequences decoding now, in batch order: their sample ids and slots on the host (for the
    bookkeeping) and the same two lists on the device (every step gathers with them). In compact
    mode sequence i sits in cache row i; otherwise in cache row slots[i]."""

    def __init__(self, device):
        self.device = device
        self.samples: list[int] = []
        self.slots: list[int] = []
        self.samples_t = torch.zeros(0, dtype=torch.int64, device=device)
        self.slots_t = torch.zeros(0, dtype=torch.int64, device=device)

    def __len__(self) -> int:
        return len(self.samples)

    def extend(self, samples: list[int], slots: list[int]) -> None:
        self.samples, self.slots = self.samples + samples, self.slots + slots
        self.samples_t = torch.cat([self.samples_t, torch.tensor(samples, dtype=torch.int64, device=self.device)])
        self.slots_t = torch.cat([self.slots_t, torch.tensor(slots, dtype=torch.int64, device=self.device)])

    def select(self, perm: list[int]) -> torch.Tensor:
        """Keep the sequences at positions perm, in that order; returns perm on the device for the
        caller's other per-sequence tensors."""
        perm_t = torch.tensor(perm, dtype=torch.int64, device=self.device)
        self.samples_t, self.slots_t = self.samples_t[perm_t], self.slots_t[perm_t]
        self.samples, self.slots = [self.samples[i] for i in perm], [self.slots[i] for i in perm]
        return perm_t

    def pop(self) -> tuple[int, int]:
        """Drop the last sequence; returns its (sample, slot)."""
        self.samples_t, self.slots_t = self.samples_t[:-1], self.slots_t[:-1]
        return self.samples.pop(), self.slots.pop()


def _decode_all(model, prompts, slots, S, *, n, max_new_tokens, temperature, top_p, top_k, greedy,
                stop_token_ids, stopper, generator, max_context, compact, cuda_graphs, page_size=0, num_pages=0,
                overlap=False, kernel="auto"):
    """Generate all len(prompts) * n samples through `slots` cache rows with continuous admission
    (compact: the live rows kept contiguous, for SDPA; cuda_graphs: replay the decode steps):
    whenever sequences finish, waiting samples are admitted into the freed rows at once (their
    prompt prefilled or copied from a live sibling), so the decode batch stays full until the
    queue runs dry. page_size > 0: a paged cache of num_pages pages; a row gets pages as its
    sequence grows, and when none is left the latest admitted sequences give theirs back and wait
    in the queue (recomputed from their tokens when readmitted). overlap (rows read in place, not
    compact): each step's decode of the next token is launched before the host reads this step's
    tokens, so the GPU computes step t+1 while the host checks stops and admits; the rows that
    finished at step t computed one step for nothing (their outputs are dropped, their cache row
    or pages are free again). Returns (per-sample dicts in sample order (sample b is prompt b // n's),
    sampling rounds, preemptions). kernel: the decode attention kernel (decode_backend)."""
    device, dtype = _model_device_dtype(model)
    B = len(prompts) * n
    plen = [len(prompts[b // n]) for b in range(B)]
    cap = [min(max_new_tokens, max_context - lp) for lp in plen]  # new-token budget per sample
    extra = 1 if cuda_graphs else 0  # the graphs' padding row (cuda_graphs decided by generate)
    pages = None
    if page_size:  # + a scratch page for the block-table entries no row owns
        cache = KVCache.allocate_paged(model.config, num_pages + 1, page_size, slots + extra, S, dtype, device)
        pages = _Pages(cache, num_pages, slots)
    else:
        cache = KVCache.allocate(model.config, slots + extra, S, dtype, device)
    graphs = _DecodeGraphs(model, cache, S, pad_row=slots, capture=device.type == "cuda",
                           kernel=kernel) if cuda_graphs else None

    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.int64, device=device)
    max_cap = max(cap)
    out_tok = torch.zeros(B, max_cap, dtype=torch.int64, device=device)
    out_lp = torch.zeros(B, max_cap, dtype=torch.float32, device=device)
    out_tlp = torch.zeros(B, max_cap, dtype=torch.float32, device=device)
    cap_t = torch.tensor(cap, dtype=torch.int64, device=device)
    plen_t = torch.tensor(plen, dtype=torch.int64, device=device)
    count_t = torch.zeros(B, dtype=torch.int64, device=device)  # tokens sampled so far, per sample
    count = [0] * B
    resp: list[list[int]] = [[] for _ in range(B)]  # host copies (stop strings need them)
    reasons = [None] * B
    stopped_by = [None] * B  # the stop string that ended each sample

    gen = generator
    same = gen is not None and gen.device.type == device.type and gen.device.index in (None, device.index)
    if gen is not None and not same and not greedy:
        # draw the noise where the logits live: a device generator seeded from the given one
        gen = torch.Generator(device=device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
    may_complete = None
    pending = list(range(B))[::-1]  # a stack: the next sample to admit is pending[-1]
    free = list(range(slots))  # free slots (min-heap); a slot picks the noise row, and the cache row in index mode
    prompt_hidden: dict = {}
    cur = _LiveRows(device)
    tok = logits = None
    rounds = preemptions = 0
    overlap = overlap and not compact
    # page-locked host memory for each step's tokens and flags, so their copy runs asynchronously
    flags_host = torch.empty(4 * slots, dtype=torch.int64, pin_memory=True) if overlap and device.type == "cuda" \
        else None

    def decode(tok, positions, max_len):
        """Logits [B, V] of the next position of every live sequence (a graph replay where possible)."""
        nonlocal graphs
        if graphs is not None:
            try:
                return graphs(tok, positions, cur.slots_t)
            except Exception as e:  # a kernel that cannot be captured: this and later rollouts run eagerly
                _GRAPHS_FAILED.append(f"{type(e).__name__}: {e}")
                logging.getLogger("lwz").warning("rollout: CUDA graph capture failed (%s); decoding eagerly",
                                                 _GRAPHS_FAILED[-1][:200])
                graphs = None
                torch.cuda.synchronize(device)
        view = cache.head(len(cur)) if compact else cache
        hidden = model.decode_step(tok, positions, view, rows=None if compact else cur.slots_t, max_length=max_len,
                                   kernel=kernel)
        return model.logits(hidden)

    while True:
        new, need = [], []
        if pending and len(cur) < slots:
            spare_pages = len(pages.free) if pages is not None else 0
            while pending and len(cur) + len(new) < slots:
                if pages is not None:  # room for its tokens so far, and a reserve for the live ones to grow
                    k = pages.need(plen[pending[-1]] + count[pending[-1]])
                    if k > spare_pages - (pages.watermark if len(cur) or new else 0):
                        break
                    spare_pages -= k
                    need.append(k)
                new.append(pending.pop())
        if new:
            new_slots = [heapq.heappop(free) for _ in new]
            rows = list(range(len(cur), len(cur) + len(new))) if compact else new_slots
            live_rows = range(len(cur)) if compact else cur.slots
            if pages is not None:
                pages.give(list(zip(rows, need)))
            resumed = {b: resp[b] for b in new if count[b]}
            new_logits = _admit(model, cache, prompts, n, new, rows, cur.samples, live_rows, prompt_hidden, device,
                                resumed, pages)
            logits = new_logits if logits is None else torch.cat([logits, new_logits])
            cur.extend(new, new_slots)
            if may_complete is None and stopper.strings:
                may_complete = stopper.may_complete(logits.shape[-1], device)
        noise = None
        if not greedy:
            noise = torch.rand((slots, logits.shape[-1]), dtype=torch.float32, device=device, generator=gen)
            noise = noise[cur.slots_t] if len(cur) < slots or cur.slots != list(range(slots)) else noise
        tok, lp, tlp = _sample(logits, noise, temperature, top_k, top_p, greedy)
        rounds += 1
        active = cur.samples_t
        step = count_t[active]
        out_tok[active, step] = tok
        out_lp[active, step] = lp
        out_tlp[active, step] = tlp
        count_t[active] = step + 1
        done = step + 1 >= cap_t[active]
        is_stop = torch.isin(tok, stop_ids) if stop_ids.numel() else torch.zeros_like(done)
        check = may_complete[tok] & ~is_stop if may_complete is not None else ~is_stop
        flags = torch.stack([tok, done | is_stop, is_stop, check])
        ahead = None  # logits of the next step, decoded before this step's tokens reach the host
        if overlap:
            # lengths with this step's token; a sequence at its budget ends now whatever it drew, so
            # its step ahead (computed for nothing) is written at position 0 of its own row, which
            # it gives back right after: never past the cache, never into a page it lacks
            lens = [1 if count[b] + 1 >= cap[b] else plen[b] + count[b] + 1 for b in cur.samples]
            needy = [] if pages is None else pages.short(cur.slots, lens)
            if pages is None or len(needy) <= len(pages.free):  # else: the plain path, which can preempt
                if pages is not None:
                    pages.give([(cur.slots[i], 1) for i in needy])
                if flags_host is not None:  # queue the copy before the next step, and wait for the copy only
                    flags = flags_host[:flags.numel()].view(flags.shape).copy_(flags, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                ahead = decode(tok, torch.where(done, 0, plen_t[active] + count_t[active] - 1), max(lens))
                if flags_host is not None:
                    ready.synchronize()
        # the one host sync per step
        tok_l, done_l, stop_l, check_l = flags.tolist()
        for i, b in enumerate(cur.samples):
            resp[b].append(tok_l[i])
            count[b] += 1
        str_hit = [None] * len(cur)
        if stopper.strings:
            check = [i for i in range(len(cur)) if check_l[i]]
            hits = stopper.hits([resp[cur.samples[i]][-stopper.window:] for i in check])
            for i, h in zip(check, hits):
                str_hit[i] = h
        keep = []
        for i, b in enumerate(cur.samples):
            if stop_l[i]:
                reasons[b] = "stop_token"
            elif str_hit[i] is not None:
                reasons[b] = "stop_string"
                stopped_by[b] = str_hit[i]
            elif done_l[i]:
                reasons[b] = "length"
            else:
                keep.append(i)
        if len(keep) < len(cur):
            for i in set(range(len(cur))) - set(keep):
                heapq.heappush(free, cur.slots[i])
                if pages is not None:
                    pages.release(cur.slots[i])
            if compact:
                perm, moves = _compact_order(keep, len(cur))
                if moves:  # a row holds k/v up to (not including) its newest token
                    cache.copy_rows(torch.tensor([s for s, _ in moves], device=device),
                                    torch.tensor([d for _, d in moves], device=device),
                                    max(plen[cur.samples[s]] + count[cur.samples[s]] - 1 for s, _ in moves))
            else:
                perm = keep
            perm_t = cur.select(perm)
            tok = tok[perm_t]
            if ahead is not None:
                ahead = ahead[perm_t]
        if pages is not None and len(cur) and ahead is None:
            # a sequence whose newest token starts a page needs one now; while the pool cannot give
            # them all, the latest admitted sequence gives its pages back and waits in the queue
            while True:
                needy = pages.short(cur.slots, [plen[b] + count[b] for b in cur.samples])
                if len(needy) <= len(pages.free):
                    break
                b, slot = cur.pop()
                pages.release(slot)
                heapq.heappush(free, slot)
                pending.append(b)
                preemptions += 1
                tok = tok[:-1]
            pages.give([(cur.slots[i], 1) for i in needy])
        if not len(cur):
            if not pending:
                break
            logits = None
            continue
        if ahead is not None:
            logits = ahead
            continue
        # the newest token of sample b sits at position plen + count - 1 (the graphs read the whole
        # cache; max_len bounds the eager attention)
        logits = decode(tok, plen_t[cur.samples_t] + count_t[cur.samples_t] - 1,
                        max(plen[b] + count[b] for b in cur.samples))

    out_tok, out_lp, out_tlp = out_tok.cpu(), out_lp.cpu(), out_tlp.cpu()
    return [dict(prompt_index=b // n, response=out_tok[b, :count[b]], logp=out_lp[b, :count[b]],
                 tlogp=out_tlp[b, :count[b]], reason=reasons[b], stopped_by=stopped_by[b])
            for b in range(B)], rounds, preemptions


def _assemble(samples, prompts, n, pad_id, params) -> RolloutBatch:
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
        temperature=params["temperature"],
        top_p=params["top_p"],
        top_k=params["top_k"],
        greedy=params["greedy"],
        pad_id=pad_id,
    )
