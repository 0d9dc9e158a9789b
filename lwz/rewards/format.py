"""Format reward (paper §2): exactly one <think> segment then one <answer> segment, minus a
penalty for repeated content in the answer.

Score range: 0.0 for a broken format; otherwise 1 - repetition_penalty(answer), in [0, 1]
(1.0 for a clean, non-repetitive answer). Natural prose scores ~0.97-1.0; an answer padded
with k copies of one paragraph scores about 1/k.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from lwz.rewards import batch_meta

_TAG = re.compile(r"</?(?:think|answer)>")
_EXPECTED = ["<think>", "</think>", "<answer>", "</answer>"]

# Sentence split on terminal punctuation (EN + ZH) and newlines.
_SENT_SPLIT = re.compile(r"[.!?;。！？；\n]+")
# Tokens for n-grams: every CJK character is a word; otherwise runs of letters/digits.
_TOKEN = re.compile(r"[\u4e00-\u9fff]|[^\W\d_]+|\d+", re.UNICODE)


def split_response(text: str, allow_unclosed: bool = False) -> Optional[tuple[str, str]]:
    """(think, answer) when `text` is exactly `<think>…</think><answer>…</answer>` with nothing
    but whitespace outside the tags, else None.

    The four tags must each occur exactly once, in that order (so nested, misordered or
    duplicated tags fail). The answer must be non-empty after stripping. With
    `allow_unclosed=True` a missing final `</answer>` is accepted (generation stopped at the
    stop string and the decoded text left it out); every other tag is still required.
    """
    if text is None:
        return None
    tags = [(m.group(0), m.start(), m.end()) for m in _TAG.finditer(text)]
    names = [t[0] for t in tags]
    if names != _EXPECTED:
        if not (allow_unclosed and names == _EXPECTED[:3]):
            return None
        tags.append(("</answer>", len(text), len(text)))
    (_, _, e0), (_, s1, e1), (_, s2, e2), (_, s3, e3) = tags
    if text[:tags[0][1]].strip() or text[e1:s2].strip() or text[e3:].strip():
        return None
    think, answer = text[e0:s1].strip(), text[e2:s3].strip()
    if not answer:
        return None
    return think, answer


def _normalise_sentence(s: str) -> str:
    return " ".join(_TOKEN.findall(s.lower()))


def repetition_penalty(answer: str, ngram: int = 4, min_sentence_tokens: int = 3) -> float:
    """Penalty in [0, 1]: the mean of two shares,

      dup_sentences = 1 - (#distinct sentences / #sentences), over sentences (split at . ! ? ;
                      。！？； and newlines) normalised to lowercase tokens, ignoring sentences
                      of fewer than `min_sentence_tokens` tokens; 0 when fewer than 2 remain;
      dup_ngrams    = 1 - (#distinct n-grams / #n-grams) over word n-grams (n=`ngram`; English
                      words / digit runs are tokens, each CJK character is a token); 0 when the
                      answer has fewer than n tokens.

    Both are 0 for text with no repeats and approach 1 - 1/k when the text is k copies of one
    block, so the penalty is about 1 - 1/k for copy-paste padding.
    """
    sents = [_normalise_sentence(s) for s in _SENT_SPLIT.split(answer)]
    sents = [s for s in sents if len(s.split()) >= min_sentence_tokens]
    dup_s = 1.0 - len(set(sents)) / len(sents) if len(sents) >= 2 else 0.0
    toks = _TOKEN.findall(answer.lower())
    if len(toks) >= ngram:
        grams = [tuple(toks[i:i + ngram]) for i in range(len(toks) - ngram + 1)]
        dup_n = 1.0 - len(set(grams)) / len(grams)
    else:
        dup_n = 0.0
    return min(1.0, max(0.0, 0.5 * (dup_s + dup_n)))


def format_reward(text: str, allow_unclosed: bool = False, penalty_weight: float = 1.0,
                  ngram: int = 4) -> float:
    """0.0 if `text` (the whole response) breaks the think/answer format (see `split_response`),
    else max(0, 1 - penalty_weight * repetition_penalty(answer)), in [0, 1]."""
    parts = split_response(text, allow_unclosed=allow_unclosed)
    if parts is None:
        return 0.0
    return max(0.0, 1.0 - penalty_weight * repetition_penalty(parts[1], ngram=ngram))


class FormatReward:
    """Format reward as a module-like callable: `reward(prompts, answers, meta) -> Tensor[B]` fp32.

    Reads the whole generated text from meta["response"] (a sample without one scores 0; the
    extracted answer alone cannot show the think segment). `accept_unclosed=True` (default) accepts a
    missing final `</answer>` for samples whose meta["stopped"] is true (generation ended on the
    `</answer>` stop string and the string was cut), like
    `lwz.prompts.extract_answer(text, stopped_at_close=True)`; a text cut by the length cap
    (stopped false) with no `</answer>` is broken.
    """

    name = "format"

    def __init__(self, penalty_weight: float = 1.0, ngram: int = 4, accept_unclosed: bool = True):
        if penalty_weight < 0:
            raise ValueError(f"rewards.format.penalty_weight: expected >= 0, got {penalty_weight}")
        if ngram < 1:
            raise ValueError(f"rewards.format.ngram: expected >= 1, got {ngram}")
        self.penalty_weight = float(penalty_weight)
        self.ngram = int(ngram)
        self.accept_unclosed = accept_unclosed

    def __call__(self, prompts: Sequence[str], answers: Sequence[Optional[str]],
                 meta: Optional[Sequence[dict]] = None) -> torch.Tensor:
        meta = batch_meta("FormatReward", prompts, answers, meta)
        vals = []
        for m in meta:
            text = m.get("response") or ""
            unclosed = self.accept_unclosed and bool(m.get("stopped", False))
            vals.append(format_reward(text, allow_unclosed=unclosed,
                                      penalty_weight=self.penalty_weight, ngram=self.ngram))
        return torch.tensor(vals, dtype=torch.float32)
