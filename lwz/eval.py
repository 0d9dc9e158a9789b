"""Evaluation: `python -m lwz.eval --model M --prompts P.jsonl --out DIR [--baseline B ...] [--rm R] [--judge J]`.

M: an HF folder, a training checkpoint (run/checkpoints/step_N: the run's config.toml gives the
architecture, tokenizer and templates) or an earlier evaluation's --out folder (re-scored and
re-judged, nothing generated). Generates one answer per prompt with the paper's inference settings
and measures it:

  length score S_l  LongBench-Write's: for required length x and answer length y (words, CJK
                    characters as words, lwz.rewards.length.count_words),
                    100*max(0, 1 - (y/x - 1)/3) if y > x, else 100*max(0, 1 - (x/y - 1)/2);
                    y = 0 (no answer) scores 0. x is the row's `length`, or its range's midpoint.
  in range          the answer's word count lies inside the prompt's range (broken answers never do)
  format ok         exactly one <think> then one <answer> (lwz.rewards.format.split_response); with
                    --no-think: an <answer> was found
  truncated         generation hit the token cap or the context
  near-duplicates   lwz.rewards.format.near_duplicate_share of the answer (the format reward's penalty)
  quality           the --rm reward model's score of (question, answer); broken answers get none

Prompt files: one JSON object a line, detected per line: ours (`prompt`, optional `length_range`
[lo, hi]; without one, an explicit request in the prompt ("a 2,000-word essay") gives the range by
the length reward's rules) or LongBench-Write's (`prompt`, `type`, `length` = required words).

Outputs in --out: samples.jsonl (one row per prompt, file order), summary.json (overall, per
required-length bucket, per language, head-to-head), lengths.png, length_score_by_bucket.png.
Every number of summary.json is recomputed from samples.jsonl by `summarize`.

Head-to-head (--baseline, repeatable: an HF model folder, generated with the same settings, or the
--out folder of an earlier evaluation): each prompt's two answers are compared by the --rm (higher
score wins; identical answers tie) and by the --judge, a local causal LM shown both answers in both
orders (log p("A") - log p("B") at the reply; a win needs both orders to agree, otherwise a tie,
which cancels position bias). A missing answer loses to a present one; two missing answers tie.
Win / tie / loss rates come with 95% bootstrap intervals over prompts; Elo ratings (Bradley-Terry,
Arena-Write style) over all the models' battles, with bootstrap intervals.

Runs under torchrun: every rank generates, scores and judges its share of the prompts (prompt i on
rank i % world); rank 0 writes. The sampling noise depends on the rank, so another world size gives
other (equally valid) samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from lwz.config import ConfigError
from lwz.model import ModelLoadError
from lwz.prompts import PromptDataError, PromptRecord, extract_answer, is_chinese, iter_jsonl, parse_prompt_line
from lwz.rewards.format import near_duplicate_share, split_response
from lwz.rewards.length import count_words, parse_length_request
from lwz.tokenizer import TokenizerError

# The paper's inference settings (shared/reference/paper.md §3 "Decoding", from the authors' model
# card [S1]): temperature 0.6, top_p 0.95, max_tokens 15,500, these stop strings; think prompt.
TEMPERATURE = 0.6
TOP_P = 0.95
MAX_NEW_TOKENS = 15500
STOP_STRINGS = ("<|user|>", "<|endoftext|>", "</answer>")

# Required-length buckets (words), as LongBench-Write's length ranges; "unspecified" = no length.
BUCKETS = (("<500", 0, 500), ("500-2k", 500, 2000), ("2k-5k", 2000, 5000), (">=5k", 5000, math.inf))
UNSPECIFIED = "unspecified"

SAMPLES, SUMMARY, BATTLES = "samples.jsonl", "summary.json", "head_to_head.jsonl"


# ---- prompts ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalPrompt:
    index: int  # position in the file (0-based, blank lines skipped)
    line: int  # 1-based line number
    prompt: str
    length_range: Optional[tuple[int, int]]  # [lo, hi] words, or None
    required: Optional[float]  # x of S_l: LongBench-Write `length`, or the range's midpoint
    type: Optional[str] = None  # LongBench-Write's `type`


def load_eval_prompts(path: str) -> list[EvalPrompt]:
    """Reads a prompt file in either format (see the module doc), detected per line; raises
    PromptDataError `path:line: what is wrong` on the first bad line."""
    out = []
    for lineno, obj in iter_jsonl(path, PromptDataError, "prompt file"):
        where = f"{path}:{lineno}"
        prompt, rng = parse_prompt_line(obj, where)
        required, typ = None, None
        if "length" in obj:  # a LongBench-Write row
            if "length_range" in obj:
                raise PromptDataError(f"{where}: has both 'length' (LongBench-Write) and 'length_range' (ours); "
                                      f"keep one")
            x = obj["length"]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 or not math.isfinite(x):
                raise PromptDataError(f"{where}: 'length' must be a positive number of words, got {json.dumps(x)}")
            required = float(x)
            typ = obj.get("type")
            if typ is not None and not isinstance(typ, str):
                raise PromptDataError(f"{where}: 'type' must be a string, got {type(typ).__name__}")
        else:
            if rng is None:
                rng = parse_length_request(prompt)  # the length reward's rule for prompts without a label
            if rng is not None and rng[1] > 0:
                required = (rng[0] + rng[1]) / 2
        out.append(EvalPrompt(len(out), lineno, prompt, tuple(rng) if rng is not None else None, required, typ))
    if not out:
        raise PromptDataError(f"{path}: no prompts in file")
    return out


def tokenize_eval_prompts(items: list[EvalPrompt], tok, data, path: str) -> list[PromptRecord]:
    """The PromptRecords (token ids of the templated prompt) lwz.train.rollout takes; one line naming
    the prompts longer than data.max_prompt_tokens."""
    from lwz.prompts import long_prompts_message, tokenize_prompts
    recs = [PromptRecord(prompt=it.prompt, length_range=it.length_range, line=it.line) for it in items]
    kept, too_long = tokenize_prompts(recs, tok, data)
    if too_long:
        raise PromptDataError(long_prompts_message(path, too_long, data.max_prompt_tokens))
    return kept


# ---- scores ------------------------------------------------------------------------------------------

def length_score(required: float, words: float) -> float:
    """LongBench-Write's S_l in [0, 100] for required length x > 0 and answer length y >= 0."""
    x, y = float(required), float(words)
    if not x > 0:
        raise ValueError(f"length_score: required length must be > 0, got {required}")
    if y > x:
        return 100.0 * max(0.0, 1.0 - (y / x - 1.0) / 3.0)
    if y == 0:
        return 0.0
    return 100.0 * max(0.0, 1.0 - (x / y - 1.0) / 2.0)


def bucket_of(required: Optional[float]) -> str:
    if required is None:
        return UNSPECIFIED
    return next(name for name, lo, hi in BUCKETS if lo <= required < hi)


def language_of(prompt: str) -> str:
    return "zh" if is_chinese(prompt) else "en"


def sample_row(item: EvalPrompt, response: str, stopped_at_close: bool, truncated: bool,
               response_tokens: int, think: bool = True) -> dict:
    """One row of samples.jsonl (quality left None: quality_scores fills it)."""
    answer = extract_answer(response, stopped_at_close=stopped_at_close)
    fmt = split_response(response, allow_unclosed=stopped_at_close) is not None if think else answer is not None
    words = count_words(answer)
    rng = item.length_range
    return dict(index=item.index, line=item.line, prompt=item.prompt, type=item.type,
                language=language_of(item.prompt), length_range=list(rng) if rng else None,
                required_words=item.required, response=response, answer=answer, words=words,
                format_ok=fmt, truncated=bool(truncated), stopped_at_close=bool(stopped_at_close),
                response_tokens=int(response_tokens),
                length_score=length_score(item.required, words) if item.required else None,
                in_range=(answer is not None and rng[0] <= words <= rng[1]) if rng else None,
                near_duplicate_share=near_duplicate_share(answer) if answer is not None else None,
                quality=None)


def quality_scores(fn, questions: list[str], answers: list[Optional[str]]) -> list[Optional[float]]:
    """Reward-model scores of the answers that exist (None for the others). fn is called as every
    reward is, `fn(prompts, answers, meta)`, with the existing answers only: collective rewards
    (lwz.rewards.hosting.HostedReward) need every rank to call, even with nothing."""
    valid = [i for i, a in enumerate(answers) if a is not None]
    qs = [questions[i] for i in valid]
    got = fn(qs, [answers[i] for i in valid], [{"question": q} for q in qs]).tolist() if (valid or
                                                                                        _collective(fn)) else []
    out: list[Optional[float]] = [None] * len(answers)
    for i, s in zip(valid, got):
        out[i] = float(s)
    return out


def _collective(fn) -> bool:
    from lwz.rewards.hosting import HostedReward
    return isinstance(fn, HostedReward) or getattr(fn, "shard_group", None) is not None


# ---- summary -----------------------------------------------------------------------------------------

def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def group_stats(rows: list[dict]) -> dict:
    """The figures of a set of samples.jsonl rows; a mean over nothing is None."""
    scored = [r["length_score"] for r in rows if r["length_score"] is not None]
    ranged = [r["in_range"] for r in rows if r["in_range"] is not None]
    dup = [r["near_duplicate_share"] for r in rows if r["answer"] is not None]
    qual = [r["quality"] for r in rows if r["quality"] is not None]
    return dict(n=len(rows), length_score=_mean(scored), length_scored=len(scored),
                in_range_rate=_mean(float(v) for v in ranged), in_range_n=len(ranged),
                format_ok_rate=_mean(float(r["format_ok"]) for r in rows),
                truncation_rate=_mean(float(r["truncated"]) for r in rows),
                near_duplicate_share=_mean(dup), near_duplicate_rate=_mean(float(v > 0) for v in dup),
                quality_mean=_mean(qual), quality_n=len(qual),
                answer_words_mean=_mean(r["words"] for r in rows),
                response_tokens_mean=_mean(r["response_tokens"] for r in rows))


def summarize(rows: list[dict]) -> dict:
    """overall / by_bucket (required length) / by_language figures of samples.jsonl rows."""
    buckets = [name for name, _, _ in BUCKETS] + [UNSPECIFIED]
    by_bucket = {b: group_stats(rs) for b in buckets if (rs := [r for r in rows if bucket_of(r["required_words"]) == b])}
    langs = sorted({r["language"] for r in rows})
    return dict(overall=group_stats(rows), by_bucket=by_bucket,
                by_language={g: group_stats([r for r in rows if r["language"] == g]) for g in langs})


# ---- generation (the training run's path) ------------------------------------------------------------

def eval_config(cfg, max_new_tokens: int, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                stop_strings=STOP_STRINGS):
    """A copy of a run Config whose rollout samples one answer per prompt with these settings
    (engine settings: batch size, paged cache, kernels, ... stay the run's)."""
    r = dataclasses.replace(cfg.rollout, group_size=1, max_new_tokens=int(max_new_tokens),
                            temperature=float(temperature), top_p=float(top_p), top_k=0,
                            stop_strings=list(stop_strings))
    return dataclasses.replace(cfg, rollout=r)


# every evaluation draws the same noise (not the training step's): the curve compares policies,
# not noise
_EVAL_STREAM = 0


def share(n: int, d, groups=None) -> tuple[list[int], list[int]]:
    """Which of n prompts this rank generates: (the prompts its rollout call decodes, the indices of
    the rows it keeps). Without TP, prompt i on rank i % world. With TP groups (lwz.distributed.Groups,
    tp > 1) a group decodes prompts i % dp == dp_rank together, in equal shares per TP rank (the
    contract of lwz.train.rollout), the last share padded with repeats of the group's last prompt that
    no rank keeps."""
    if groups is None or groups.tp == 1:
        mine = list(range(d.rank, n, d.world))
        return mine, mine
    shared = list(range(groups.dp_rank, n, groups.dp))
    if not shared:
        return [], []
    k = -(-len(shared) // groups.tp)
    padded = shared + [shared[-1]] * (k * groups.tp - len(shared))
    lo = groups.tp_rank * k
    return padded, shared[lo:lo + k]


def generate_rows(policy, tok, items: list[EvalPrompt], records: list[PromptRecord], cfg, d,
                  groups=None) -> list[dict]:
    """This rank's share of the prompts (see share) generated by lwz.train.rollout with cfg (see
    eval_config; with TP groups through the tensor-parallel copy) and measured (sample_row); quality
    not yet filled."""
    from lwz.rollout import full_params_for_generation
    from lwz.train import rollout
    decode, keep = share(len(items), d, groups)
    if not decode:  # more ranks than prompts: no rollout, but the gather of a sharded policy is collective
        if groups is None or groups.tp == 1:
            with full_params_for_generation(policy):
                return []
        return []
    out, batch, _ = rollout(policy, tok, [records[i] for i in decode], cfg, d, _EVAL_STREAM, groups)
    lengths = batch.response_lengths.tolist()
    # under TP rollout returns this rank's equal share, whose tail may be padding: keep the real ones
    return [sample_row(items[i], s["response"], s["stopped_at_close"], s["truncated"], n, cfg.data.think)
            for i, s, n in zip(keep, out, lengths)]


def gather_rows(rows: list[dict], d) -> list[dict]:
    """Every rank's rows, in file order (on every rank)."""
    from lwz.distributed import all_gather_objects
    allrows = [r for part in all_gather_objects(rows, d.world) for r in part]
    return sorted(allrows, key=lambda r: r["index"])


def evaluate_policy(policy, tok, items, records, cfg, d, quality_fn=None) -> tuple[list[dict], dict]:
    """Generate (with cfg, see eval_config), score and summarise on every rank; every rank must call
    it. Returns (all rows in file order, summary)."""
    rows = generate_rows(policy, tok, items, records, cfg, d)
    if quality_fn is not None:
        for r, q in zip(rows, quality_scores(quality_fn, [r["prompt"] for r in rows], [r["answer"] for r in rows])):
            r["quality"] = q
    rows = gather_rows(rows, d)
    return rows, summarize(rows)


def metrics_of(summary: dict, prefix: str = "eval/") -> dict:
    """The overall figures (and S_l per bucket) as flat metric keys; None values left out."""
    out = {f"{prefix}{k}": v for k, v in summary["overall"].items() if v is not None and k != "n"}
    for b, st in summary["by_bucket"].items():
        if st["length_score"] is not None:
            out[f"{prefix}length_score/{b}"] = st["length_score"]
    return out


# ---- during training (eval.* keys, called by lwz.train) ---------------------------------------------

def training_eval_set(cfg, tok, train_records, show: bool = True) -> Optional[tuple[list[EvalPrompt], list[PromptRecord]]]:
    """The held-out prompts of eval.prompts, loaded and tokenised at start-up (None when eval.prompts
    is unset). Refuses the training prompt file itself (same file or same content); warns when some
    eval prompts are also training prompts."""
    path = cfg.eval.prompts
    if path is None:
        return None
    from lwz.checkpoint import file_identity
    train = cfg.data.prompts
    same = os.path.exists(path) and os.path.exists(train) and os.path.samefile(path, train)
    if not same and os.path.isfile(path) and os.path.isfile(train):
        same = file_identity(path)["sha256"] == file_identity(train)["sha256"]
    if same:
        raise ConfigError(f"eval.prompts = {path!r} is the training prompt file (data.prompts = {train!r}); "
                          f"evaluate on held-out prompts")
    items = load_eval_prompts(path)
    records = tokenize_eval_prompts(items, tok, cfg.data, path)
    seen = {r.prompt.strip() for r in train_records}
    shared = sum(it.prompt.strip() in seen for it in items)
    if shared and show:
        print(f"warning: {shared} of the {len(items)} prompts of eval.prompts are also training prompts",
              file=sys.stderr, flush=True)
    return items, records


def training_eval(policy, tok, eval_set, cfg, d, reward_fns, step: int) -> dict:
    """Evaluate the live policy on the held-out set (every rank calls it): generation through the
    run's own rollout path with the paper's inference sampling and eval.max_new_tokens, the run's
    quality reward model when it has one; rank 0 writes run/eval/step_N/{samples.jsonl,summary.json}.
    Returns the `eval/...` metrics."""
    items, records = eval_set
    ecfg = eval_config(cfg, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    quality = next((f for f in reward_fns if getattr(f, "name", None) == "quality"), None)
    rows, summary = evaluate_policy(policy, tok, items, records, ecfg, d, quality)
    if d.is_main:
        summary = dict(step=step, prompts=cfg.eval.prompts, **summary)
        write_outputs(os.path.join(cfg.run_path, "eval", f"step_{step:08d}"), rows, summary, plots=False)
    return metrics_of(summary)


# ---- head-to-head ------------------------------------------------------------------------------------

WIN, TIE, LOSS = 1.0, 0.5, 0.0


def _missing_rule(a: Optional[str], b: Optional[str]) -> Optional[float]:
    """The outcome for A when an answer is missing (None when both exist)."""
    if a is None and b is None:
        return TIE
    if a is None:
        return LOSS
    if b is None:
        return WIN
    return None


def rm_outcome(a: Optional[str], b: Optional[str], qa: Optional[float], qb: Optional[float]) -> float:
    """A's outcome against B by reward-model scores (identical answers tie)."""
    rule = _missing_rule(a, b)
    if rule is not None:
        return rule
    if a == b or qa == qb:
        return TIE
    return WIN if qa > qb else LOSS


JUDGE_TEMPLATE = (
    "Two assistants answered the same writing request. Decide which response serves the request "
    "better: how well it follows the instructions (content, form, requested length), and the "
    "quality of the writing (coherence, clarity, style, depth).\n\n"
    "[Request]\n{question}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is better? Reply with one letter, A or B."
)


class Judge:
    """A local causal LM asked JUDGE_TEMPLATE; preference(...) = log p(A) - log p(B) of its reply's
    first token. With a chat template the request is a user turn (reply tokens "A"/"B"); without,
    the text ends in "\\nAnswer:" (reply tokens " A"/" B"). Answers are cut to fit the context."""

    def __init__(self, folder: str, device, dtype, max_tokens_per_batch: int = 32768):
        from lwz.model import Transformer
        from lwz.tokenizer import has_tokenizer, load_tokenizer
        if not os.path.isdir(folder):
            raise ModelLoadError(f"{folder}: judge model folder not found")
        if not has_tokenizer(folder):
            raise ModelLoadError(f"{folder}: the judge folder has no tokenizer files")
        self.tok = load_tokenizer(folder, require_eos=False)
        self.model = Transformer.from_pretrained(folder, dtype=dtype, device=device).eval()
        self.device, self.folder, self.budget = device, folder, max_tokens_per_batch
        self.chat = bool(getattr(self.tok, "chat_template", None))
        letters = ("A", "B") if self.chat else (" A", " B")
        ids = [self.tok.encode(x, add_special_tokens=False) for x in letters]
        if not all(ids) or ids[0][0] == ids[1][0]:
            raise ModelLoadError(f"{folder}: the judge's tokenizer does not tell {letters[0]!r} from {letters[1]!r}")
        self.a_id, self.b_id = ids[0][0], ids[1][0]
        mark_a, mark_b = "\x00RESPONSE_A\x00", "\x00RESPONSE_B\x00"
        self._parts = None
        text = self._render("{question}", mark_a, mark_b)
        head, rest = text.split(mark_a)
        mid, tail = rest.split(mark_b)
        self._parts = (head, mid, tail)

    def _render(self, question: str, a: str, b: str) -> str:
        body = JUDGE_TEMPLATE.replace("{a}", a).replace("{b}", b)
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                add_generation_prompt=True)
        return body + "\nAnswer:"

    def _encode(self, t: str) -> list[int]:
        return list(self.tok.encode(t, add_special_tokens=False))

    def tokens(self, question: str, a: str, b: str) -> list[int]:
        head, mid, tail = (p.replace("{question}", question) for p in self._parts)
        h, m, t = self._encode(head), self._encode(mid), self._encode(tail)
        room = self.model.config.max_position_embeddings - len(h) - len(m) - len(t)
        if room < 32:
            raise ValueError(f"judge {self.folder}: the request alone fills its "
                             f"{self.model.config.max_position_embeddings}-token context")
        ea, eb = self._encode(a), self._encode(b)
        k = room // 2
        return h + ea[:k] + m + eb[:k] + t

    @torch.no_grad()
    def preferences(self, triples: list[tuple[str, str, str]]) -> list[float]:
        """log p(A) - log p(B) for each (question, response A, response B)."""
        from lwz.packing import pack_token_lists
        from lwz.rewards.quality import token_budget_batches
        seqs = [self.tokens(*t) for t in triples]
        out = [0.0] * len(seqs)
        for idx in token_budget_batches([len(s) for s in seqs], self.budget):
            ids, pos, cu, mx = pack_token_lists([seqs[i] for i in idx], device=self.device)
            hidden = self.model(ids, pos, cu, mx)
            lp = torch.log_softmax(self.model.logits(hidden.index_select(0, cu[1:].long() - 1)), -1)
            for i, v in zip(idx, (lp[:, self.a_id] - lp[:, self.b_id]).tolist()):
                out[i] = v
        return out


def judge_outcomes(judge: Judge, questions, answers_a, answers_b) -> list[tuple[float, Optional[float], Optional[float]]]:
    """(A's outcome, preference for A shown first, preference for A shown second) per prompt; a win
    needs both orders to prefer A, a loss both to prefer B, anything else ties."""
    ask = [i for i, (a, b) in enumerate(zip(answers_a, answers_b)) if _missing_rule(a, b) is None]
    triples = [(questions[i], answers_a[i], answers_b[i]) for i in ask]
    triples += [(questions[i], answers_b[i], answers_a[i]) for i in ask]
    prefs = judge.preferences(triples) if triples else []
    out = [(_missing_rule(a, b), None, None) for a, b in zip(answers_a, answers_b)]
    for k, i in enumerate(ask):
        first, second = prefs[k], -prefs[len(ask) + k]
        outcome = WIN if first > 0 and second > 0 else LOSS if first < 0 and second < 0 else TIE
        out[i] = (outcome, first, second)
    return out


def rate_summary(outcomes: list[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Win / tie / loss rates and score (win + tie / 2) of A, each with a 95% percentile bootstrap
    interval over prompts."""
    import numpy as np
    o = np.asarray(outcomes, dtype=np.float64)
    n = len(o)
    out = dict(n=n)
    if n == 0:
        return out
    samp = o[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))]
    for name, stat in (("win", lambda x: (x == WIN).mean(-1)), ("tie", lambda x: (x == TIE).mean(-1)),
                       ("loss", lambda x: (x == LOSS).mean(-1)), ("score", lambda x: x.mean(-1))):
        out[name] = float(stat(o))
        lo, hi = np.percentile(stat(samp), [2.5, 97.5])
        out[f"{name}_ci"] = [float(lo), float(hi)]
    return out


def fit_elo(battles: list[tuple[int, int, float]], k: int, prior: float = 1.0, base: float = 1000.0,
            iters: int = 100000, tol: float = 1e-12) -> list[float]:
    """Bradley-Terry ratings on the Elo scale of k players from battles (i, j, outcome of i: 1, 0.5
    or 0; a tie is half a win each): P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)), maximum
    likelihood by the MM algorithm (Hunter 2004). `prior` adds that many virtual games, drawn, to
    every pair that met, so an unbeaten player keeps a finite rating. Mean rating = base."""
    import numpy as np
    W = np.zeros((k, k))
    N = np.zeros((k, k))
    for i, j, s in battles:
        W[i, j] += s
        W[j, i] += 1.0 - s
        N[i, j] += 1
        N[j, i] += 1
    met = N > 0
    W += prior * 0.5 * met
    N += prior * met
    wins = W.sum(1)
    p = np.ones(k)
    for _ in range(iters):
        denom = (N / (p[:, None] + p[None, :])).sum(1)
        new = np.where(denom > 0, wins / np.where(denom > 0, denom, 1), p)
        new = new / np.exp(np.log(new).mean())
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    r = 400.0 * np.log10(p)
    return (r - r.mean() + base).tolist()


def elo_summary(names: list[str], battles: list[tuple[int, int, int, float]], n_boot: int = 200,
                seed: int = 0) -> dict:
    """{name: {elo, ci}} from battles (prompt index, i, j, outcome of i), bootstrapped over prompts."""
    import numpy as np
    k = len(names)
    point = fit_elo([(i, j, s) for _, i, j, s in battles], k)
    prompts = sorted({p for p, _, _, _ in battles})
    by_prompt = {p: [(i, j, s) for q, i, j, s in battles if q == p] for p in prompts}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if prompts else 0):
        pick = rng.integers(0, len(prompts), size=len(prompts))
        boots.append(fit_elo([b for x in pick for b in by_prompt[prompts[x]]], k))
    out = {}
    for m, name in enumerate(names):
        ci = np.percentile([b[m] for b in boots], [2.5, 97.5]).tolist() if boots else [point[m], point[m]]
        out[name] = dict(elo=point[m], ci=ci)
    return out


# ---- outputs -----------------------------------------------------------------------------------------

def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_outputs(out_dir: str, rows: list[dict], summary: dict, plots: bool = True) -> None:
    """samples.jsonl, summary.json and (plots) the two PNGs into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, SAMPLES), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_atomic(os.path.join(out_dir, SUMMARY), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if plots:
        try:  # the numbers are written; a missing matplotlib only costs the figures
            from lwz.plot import plot_eval
            plot_eval(out_dir, rows, summary)
        except Exception as e:  # noqa: BLE001
            print(f"warning: no eval plots ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def is_eval_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SAMPLES)) and os.path.isfile(os.path.join(path, SUMMARY))


def read_eval_dir(path: str, items: list[EvalPrompt]) -> list[dict]:
    """The rows of an earlier evaluation's samples.jsonl, which must hold the same prompts in the
    same order as `items` (PromptDataError naming the line otherwise)."""
    file = os.path.join(path, SAMPLES)
    rows = [obj for _, obj in iter_jsonl(file, PromptDataError, "samples file")]
    if len(rows) != len(items):
        raise PromptDataError(f"{file}: {len(rows)} samples for {len(items)} prompts; evaluate the same prompt file")
    for k, (r, it) in enumerate(zip(rows, items)):
        if not isinstance(r, dict) or r.get("prompt") != it.prompt or "answer" not in r:
            raise PromptDataError(f"{file}: sample {k + 1} is not the answer to prompt line {it.line} of the "
                                  f"prompt file; evaluate the same prompt file")
    return rows


# ---- the command -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lwz.eval", description=__doc__.splitlines()[0])

    def one_line(msg):  # argparse prints usage + message; keep bad input to one line
        raise PromptDataError(f"{msg} (see --help)")

    p.error = one_line
    p.add_argument("--model", required=True, help="HF model folder, a training checkpoint (runs/X/checkpoints/step_N), "
                                                  "or an earlier eval's --out folder (re-scored, re-judged)")
    p.add_argument("--prompts", required=True, help="prompt JSONL (ours or LongBench-Write rows)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--baseline", action="append", default=[],
                   help="HF model folder or an earlier eval's --out folder; repeat for several (Elo)")
    p.add_argument("--rm", help="quality reward-model folder (scores and head-to-head)")
    p.add_argument("--judge", help="local causal-LM judge folder (pairwise head-to-head)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of generation: groups of this many consecutive ranks (in one node) decode together with sharded weights")
    p.add_argument("--tokenizer", help="tokenizer folder for model folders that have none")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help=f"default {TEMPERATURE} (paper)")
    p.add_argument("--top-p", type=float, default=TOP_P, help=f"default {TOP_P} (paper)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help=f"default {MAX_NEW_TOKENS} (paper)")
    p.add_argument("--stop", action="append", default=None,
                   help=f"stop string, repeatable (default: {', '.join(STOP_STRINGS)}; paper)")
    p.add_argument("--no-think", action="store_true", help="the direct-answer template (paper's ablation)")
    p.add_argument("--template-en", help="replaces the English template; must contain {question}")
    p.add_argument("--template-zh", help="replaces the Chinese template; must contain {question}")
    p.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest templated prompt (default 4096)")
    p.add_argument("--batch-size", type=int, default=0, help="KV-cache rows (0 = auto, as rollout.batch_size)")
    p.add_argument("--page-size", type=int, default=0, help="paged KV cache page size (0 = static, as rollout.page_size)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the win rates")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier evaluation in --out")
    p.add_argument("--no-plots", action="store_true")
    return p


@dataclass
class Source:
    """A model to evaluate or compare: an HF folder, a training checkpoint, or an eval folder."""
    name: str
    path: str
    kind: str  # "hf" | "checkpoint" | "eval"
    run_cfg: object = None  # the run Config of a checkpoint


def _checkpoint_run_config(path: str):
    """The Config of the run a training checkpoint (run/checkpoints/step_N) belongs to."""
    from lwz.config import load_config
    toml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.toml")
    if not os.path.isfile(toml):
        raise FileNotFoundError(f"{path}: a training checkpoint needs its run's config.toml at {toml}")
    return load_config(toml)


def classify(path: str, allow_eval: bool) -> Source:
    from lwz.checkpoint import COMPLETE, check_checkpoint_files
    p = path.rstrip("/")
    if not os.path.isdir(p):
        raise ModelLoadError(f"{path}: folder not found")
    if allow_eval and is_eval_dir(p):
        return Source(os.path.basename(p), p, "eval")
    if os.path.isfile(os.path.join(p, COMPLETE)):
        check_checkpoint_files(p)
        cfg = _checkpoint_run_config(p)
        return Source(f"{cfg.name}-{os.path.basename(p)}", p, "checkpoint", cfg)
    if os.path.isfile(os.path.join(p, "config.json")):
        base = os.path.basename(p)
        name = os.path.basename(os.path.dirname(p)) if base == "hf" else base  # runs/X/hf -> X
        return Source(name, p, "hf")
    what = "an HF model folder (config.json), a training checkpoint (COMPLETE)"
    raise ModelLoadError(f"{path}: not {what}{' or an eval folder (samples.jsonl)' if allow_eval else ''}")


def _base_config(args):
    """A run Config carrying the command's template and sampling settings (for lwz.train.rollout)."""
    from lwz.config import Config
    cfg = Config()
    cfg.seed = args.seed
    cfg.data = dataclasses.replace(cfg.data, think=not args.no_think, template_en=args.template_en,
                                   template_zh=args.template_zh, max_prompt_tokens=args.max_prompt_tokens)
    cfg.rollout = dataclasses.replace(cfg.rollout, batch_size=args.batch_size, page_size=args.page_size)
    return eval_config(cfg, args.max_new_tokens, args.temperature, args.top_p,
                       args.stop if args.stop is not None else STOP_STRINGS)


def _source_config(src: Source, base, args):
    """The Config a source generates with: the command's, with a checkpoint's templates and tokenizer."""
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, path=src.path),
                              tokenizer=dataclasses.replace(base.tokenizer))
    from lwz.tokenizer import has_tokenizer
    if src.kind == "checkpoint":
        rc = src.run_cfg
        cfg.model = dataclasses.replace(cfg.model, path=rc.model.path)
        cfg.tokenizer.path = rc.tokenizer.path
        if args.template_en is None and args.template_zh is None:
            cfg.data = dataclasses.replace(cfg.data, template_en=rc.data.template_en, template_zh=rc.data.template_zh)
    elif has_tokenizer(src.path):
        cfg.tokenizer.path = src.path
    elif args.tokenizer:
        cfg.tokenizer.path = args.tokenizer
    else:
        raise TokenizerError(f"{src.path}: the model folder has no tokenizer; pass --tokenizer")
    return cfg


def _validate_args(args):
    checks = [("--temperature", args.temperature >= 0, ">= 0"), ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
              ("--max-new-tokens", args.max_new_tokens >= 1, ">= 1"),
              ("--max-prompt-tokens", args.max_prompt_tokens >= 1, ">= 1"),
              ("--batch-size", args.batch_size >= 0, ">= 0"), ("--page-size", args.page_size >= 0, ">= 0"),
              ("--bootstrap", args.bootstrap >= 1, ">= 1")]
    for flag, ok, want in checks:
        if not ok:
            raise PromptDataError(f"{flag} must be {want}")
    if args.tp < 1:
        raise PromptDataError("--tp must be >= 1")
    for flag, t in (("--template-en", args.template_en), ("--template-zh", args.template_zh)):
        if t is not None and "{question}" not in t:
            raise PromptDataError(f"{flag}: the template must contain {{question}}")
    if args.stop is not None and not all(args.stop):
        raise PromptDataError("--stop: a stop string cannot be empty")


def _startup(args, d):
    """Every check that can fail before a model loads; returns (items, sources, base config)."""
    from lwz.distributed import check_tp, local_world_size
    from lwz.model import ModelConfig
    from lwz.tokenizer import check_fits_model, load_tokenizer
    _validate_args(args)
    if is_eval_dir(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds an evaluation ({SAMPLES}); choose another --out or "
                              f"pass --overwrite")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out}: exists and is not a folder")
    items = load_eval_prompts(args.prompts)
    base = _base_config(args)
    model = classify(args.model, allow_eval=True)
    baselines = [classify(b, allow_eval=True) for b in args.baseline]
    names = set()
    for s in [model] + baselines:  # unique names: the keys of the head-to-head and Elo tables
        n, k = s.name, 2
        while s.name in names:
            s.name, k = f"{n}_{k}", k + 1
        names.add(s.name)
    plans = []
    for s in [model] + baselines:
        if s.kind == "eval":
            read_eval_dir(s.path, items)
            plans.append((s, None, None))
            continue
        cfg = _source_config(s, base, args)
        tok = load_tokenizer(cfg.tokenizer.path)
        mc = ModelConfig.from_hf(cfg.model.path)
        check_fits_model(tok, cfg.tokenizer.path, mc.vocab_size, s.path)
        try:
            check_tp(args.tp, d.world, local_world_size(d.world), mc.num_attention_heads, mc.num_key_value_heads,
                     mc.intermediate_size)
        except ConfigError as e:
            raise PromptDataError(str(e).replace("rollout.tp_size = ", "--tp ")) from None
        # a prompt must leave room for one new token in the model's context
        cfg.data = dataclasses.replace(cfg.data, max_prompt_tokens=min(cfg.data.max_prompt_tokens,
                                                                       mc.max_position_embeddings - 1))
        records = tokenize_eval_prompts(items, tok, cfg.data, args.prompts)
        plans.append((s, cfg, records))
    for flag, path in (("--rm", args.rm), ("--judge", args.judge)):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{flag} {path}: no config.json there (expected an HF model folder)")
    if baselines and not (args.rm or args.judge):
        raise PromptDataError("--baseline needs --rm or --judge to compare the answers")
    return items, plans, base


def _device_dtype(args, d):
    from lwz.distributed import DTYPES
    name = args.dtype or ("bfloat16" if d.device.type == "cuda" else "float32")
    return DTYPES[name]


def _load_policy(src: Source, cfg, d, dtype):
    from lwz.model import Transformer
    if src.kind == "hf":
        return Transformer.from_pretrained(src.path, dtype=dtype, device=d.device)
    # a training checkpoint: the run's architecture, the DCP model tensors (its fp32 master weights)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from lwz.checkpoint import check_checkpoint_files, check_checkpoint_shapes
    model = Transformer.from_config(cfg.model.path, dtype=torch.float32, device="cpu")
    check_checkpoint_shapes(src.path, check_checkpoint_files(src.path), model)
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we want here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=src.path, no_dist=not dist.is_initialized())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{src.path}: cannot load the model from the checkpoint ({e})") from None
    model.load_state_dict(state["model"])
    return model.to(device=d.device, dtype=dtype)


def run(args, d) -> int:
    from lwz.distributed import agree_on_errors, all_gather_objects, build_groups
    from lwz.tokenizer import load_tokenizer
    items, plans, base = agree_on_errors(lambda: _startup(args, d), d, STARTUP_ERRORS)
    dtype = _device_dtype(args, d)
    say = (lambda m: print(m, flush=True)) if d.is_main else (lambda m: None)
    # TP groups of --tp consecutive ranks (every rank of a group holds a shard of the model's copy)
    groups = build_groups(d, args.tp) if args.tp > 1 else None
    _, mine = share(len(items), d, groups)
    local = {}  # source name -> this rank's rows
    for src, cfg, records in plans:
        if src.kind == "eval":
            rows = read_eval_dir(src.path, items)
            local[src.name] = [dict(rows[i], index=i) for i in mine]
            continue
        say(f"eval: generating {len(items)} answers with {src.path}")
        policy = _load_policy(src, cfg, d, dtype)
        local[src.name] = generate_rows(policy, load_tokenizer(cfg.tokenizer.path), items, records, cfg, d, groups)
        del policy
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
    names = [s.name for s, _, _ in plans]
    if args.rm:
        from lwz.rewards.quality import QualityRewardModel
        say(f"eval: scoring with the reward model {args.rm}")
        rm = QualityRewardModel.from_pretrained(args.rm, dtype=dtype, device=d.device).eval()
        for name in names:
            rows = local[name]
            for r, q in zip(rows, quality_scores(rm, [r["prompt"] for r in rows], [r["answer"] for r in rows])):
                r["quality"] = q
        del rm
    judged = {}  # baseline name -> this rank's (index, outcome, pref first, pref second)
    if args.judge and len(names) > 1:
        say(f"eval: judging with {args.judge}")
        judge = Judge(args.judge, d.device, dtype)
        ma = local[names[0]]
        for name in names[1:]:
            mb = local[name]
            res = judge_outcomes(judge, [r["prompt"] for r in ma], [r["answer"] for r in ma], [r["answer"] for r in mb])
            judged[name] = [(r["index"],) + x for r, x in zip(ma, res)]
        del judge
    every = {n: gather_rows(local[n], d) for n in names}
    judged = {n: sorted((x for part in all_gather_objects(v, d.world) for x in part)) for n, v in judged.items()}
    if not d.is_main:
        return 0
    model_name = names[0]
    summary = dict(model=plans[0][0].path, prompts=args.prompts,
                   settings=dict(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                 stop=list(base.rollout.stop_strings), think=not args.no_think, seed=args.seed,
                                 world_size=d.world, rm=args.rm, judge=args.judge),
                   **summarize(every[model_name]))
    if len(names) > 1:
        summary["head_to_head"], battles = head_to_head(names, every, judged, args)
        os.makedirs(args.out, exist_ok=True)
        _write_atomic(os.path.join(args.out, BATTLES), "".join(json.dumps(b, ensure_ascii=False) + "\n"
                                                                for b in battles))
    for (src, cfg, _), name in zip(plans[1:], names[1:]):
        if src.kind != "eval":  # a generated baseline is kept as an eval folder of its own
            write_outputs(os.path.join(args.out, "baselines", name), every[name],
                          dict(model=src.path, prompts=args.prompts, settings=summary["settings"],
                               **summarize(every[name])), plots=not args.no_plots)
    write_outputs(args.out, every[model_name], summary, plots=not args.no_plots)
    o = summary["overall"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    say(f"eval: {o['n']} prompts: length score {fmt(o['length_score'])}, in range {fmt(o['in_range_rate'])}, "
        f"format ok {fmt(o['format_ok_rate'])}, truncated {fmt(o['truncation_rate'])}, "
        f"quality {fmt(o['quality_mean'])} -> {os.path.join(args.out, SUMMARY)}")
    for judge_name, table in summary.get("head_to_head", {}).get("vs", {}).items():
        for b, st in table.items():
            say(f"eval: vs {b} ({judge_name}): win {st['win']:.3f} tie {st['tie']:.3f} loss {st['loss']:.3f}")
    return 0


def head_to_head(names: list[str], every: dict, judged: dict, args) -> tuple[dict, list[dict]]:
    """({"model", "vs": {judge: {baseline: rates}}, "elo": {judge: {name: {elo, ci}}}}, the battle
    rows of head_to_head.jsonl) of the model (names[0]) against each baseline, by the reward model
    ("rm") and by the judge ("judge"). Outcomes are the model's: 1 win, 0.5 tie, 0 loss."""
    model = every[names[0]]
    vs, elo, rows = {}, {}, []
    outcomes = {}
    if args.rm:
        outcomes["rm"] = {b: [(r["index"], rm_outcome(r["answer"], s["answer"], r["quality"], s["quality"]))
                              for r, s in zip(model, every[b])] for b in names[1:]}
        rows += [dict(index=r["index"], baseline=b, judge="rm", outcome=o, model_score=r["quality"],
                      baseline_score=s["quality"])
                 for b in names[1:] for r, s, (_, o) in zip(model, every[b], outcomes["rm"][b])]
    if judged:
        outcomes["judge"] = {b: [(x[0], x[1]) for x in judged[b]] for b in names[1:]}
        rows += [dict(index=x[0], baseline=b, judge="judge", outcome=x[1], pref_model_first=x[2],
                      pref_model_second=x[3]) for b in names[1:] for x in judged[b]]
    for kind, per in outcomes.items():
        vs[kind] = {b: rate_summary([o for _, o in per[b]], args.bootstrap, args.seed) for b in names[1:]}
        battles = [(p, 0, 1 + k, o) for k, b in enumerate(names[1:]) for p, o in per[b]]
        elo[kind] = elo_summary(names, battles, n_boot=min(args.bootstrap, 200), seed=args.seed)
    return dict(model=names[0], vs=vs, elo=elo), rows


# errors that end the command with one line (their messages name the file or flag)
STARTUP_ERRORS = (ConfigError, ModelLoadError, PromptDataError, TokenizerError, FileNotFoundError, FileExistsError,
                  ValueError)


def main(argv=None) -> int:
    from lwz.distributed import PeerFailed, init_distributed, report_error, shutdown_distributed
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except PromptDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = init_distributed("auto")
    ok, rc = False, 2
    try:
        rc = run(args, d)
        ok = True
    except PeerFailed:
        rc = 2
    except STARTUP_ERRORS as e:
        report_error(f"rank {d.rank}: error: {e}" if d.rank else f"error: {e}")
        rc = 2
    finally:
        shutdown_distributed(sync=ok, exit_code=rc if d.world > 1 else None)
    return rc


if __name__ == "__main__":
    sys.exit(main())
