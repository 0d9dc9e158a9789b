"""Format reward (paper §2): exactly one <think> segment then one <answer> segment, minus a
penalty for padding the answer with near-duplicate paragraphs.

Score range: 0.0 for a broken format; otherwise 1 - weight * near_duplicate_share(answer),
floored at 0. The share is exactly 0 when no paragraph (or long sentence) of the answer is a
near-duplicate of an earlier one, so ordinary prose scores exactly 1.0 at any length: every
reward is z-scored within its group, and a penalty that crept up with length would turn into a
full-size advantage against long answers. An answer padded with k copies of one block has a
share of about 1 - 1/k and scores about 1/k.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from itertools import chain
from typing import Optional, Sequence

import torch

from lwz.rewards import batch_meta

_TAG = re.compile(r"</?(?:think|answer)>")
_EXPECTED = ["<think>", "</think>", "<answer>", "</answer>"]

# Tokens: every CJK character is a token (so Chinese gets character shingles); otherwise runs
# of letters or of digits.
_TOKEN = re.compile(r"[\u4e00-\u9fff]|[^\W\d_]+|\d+", re.UNICODE)
# Sentence ends inside an over-long paragraph: . ! ? followed by space, or 。！？ (not ; or ；,
# which separate the parallel clauses of ordinary rhetoric).
_SENT_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")

# Defaults of the near-duplicate detector (see `near_duplicate_units`). Jaccard >= 0.6 on
# 3-token shingles flags a paragraph copied with a few words changed (each changed word breaks
# at most 3 shingles), while distinct paragraphs that share stock phrases ("at the end of the")
# stay far below it; units under 12 tokens (headings, list items) are left alone.
SIMILARITY = 0.6
SHINGLE = 3
MIN_UNIT_TOKENS = 12
MAX_PARAGRAPH_TOKENS = 200


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


def _units(answer: str, max_paragraph_tokens: int):
    """(unit text, its lowercased tokens) for every unit, in order (see `split_units`)."""
    for line in answer.splitlines():
        toks = _TOKEN.findall(line.lower())
        if not toks:
            continue
        if len(toks) <= max_paragraph_tokens:
            yield line.strip(), toks
            continue
        for sent in _SENT_END.split(line):
            sent_toks = _TOKEN.findall(sent.lower())
            if sent_toks:
                yield sent.strip(), sent_toks


def split_units(answer: str, max_paragraph_tokens: int = MAX_PARAGRAPH_TOKENS) -> list[str]:
    """The units the near-duplicate detector compares, in order: the answer's lines that hold a
    token (paragraphs), except that a paragraph of more than `max_paragraph_tokens` tokens is
    split into its sentences, so that padding inside one long paragraph (or an answer of few
    paragraphs) is still seen."""
    return [u for u, _ in _units(answer, max_paragraph_tokens)]


def _scan(answer: str, similarity: float, shingle: int, min_tokens: int,
          max_paragraph_tokens: int) -> tuple[list[int], list[int]]:
    """(token count of every unit, indices of the near-duplicate units)."""
    sizes, sets = [], []
    for _, toks in _units(answer, max_paragraph_tokens):
        sizes.append(len(toks))
        sets.append(set(zip(*(toks[j:] for j in range(shingle)))) if len(toks) >= min_tokens else None)
    # Prefix filter (exact, not an estimate): with every set ordered by one global order (rarest
    # shingle first), two sets of Jaccard >= t share an element among the first
    # |x| - ceil(t|x|) + 1 of each. Only those prefixes are indexed and probed, so the work
    # follows the rare shingles that near-duplicates share, not all pairs of units.
    freq = Counter(chain.from_iterable(s for s in sets if s))
    rank = {g: r for r, g in enumerate(sorted(freq, key=freq.__getitem__))}
    index: dict[tuple, list[int]] = defaultdict(list)
    dups = []
    for i, sh in enumerate(sets):
        if not sh:
            continue
        n = len(sh)
        prefix = sorted(sh, key=rank.__getitem__)[:n - math.ceil(similarity * n - 1e-9) + 1]
        for j in set(chain.from_iterable(index[g] for g in prefix if g in index)):
            m = len(sets[j])
            if not similarity * n - 1e-9 <= m <= n / similarity + 1e-9:   # J <= min/max of the sizes
                continue
            c = len(sh & sets[j])
            if c >= similarity * (n + m - c):
                dups.append(i)
                break
        for g in prefix:
            index[g].append(i)
    return sizes, dups


def near_duplicate_units(answer: str, similarity: float = SIMILARITY, shingle: int = SHINGLE,
                         min_tokens: int = MIN_UNIT_TOKENS,
                         max_paragraph_tokens: int = MAX_PARAGRAPH_TOKENS) -> list[int]:
    """Indices into `split_units(answer)` of the units that near-duplicate an EARLIER unit.

    Units are lowercased into tokens (each CJK character one token; letter runs; digit runs) and
    compared as sets of `shingle`-token shingles: unit i is a near-duplicate when its Jaccard
    similarity with some earlier unit is >= `similarity`. Units of fewer than `min_tokens`
    tokens (headings, "Chapter 2", short list items) are never near-duplicates, nor compared.
    The first of a set of copies is not counted, so k copies of one block give k-1 indices.
    """
    return _scan(answer, similarity, shingle, min_tokens, max_paragraph_tokens)[1]


def near_duplicate_share(answer: str, similarity: float = SIMILARITY, shingle: int = SHINGLE,
                         min_tokens: int = MIN_UNIT_TOKENS,
                         max_paragraph_tokens: int = MAX_PARAGRAPH_TOKENS) -> float:
    """Share in [0, 1) of the answer's tokens that lie in near-duplicate units (see
    `near_duplicate_units`): 0.0 exactly when there is none; (k-1)/k for k copies of a block."""
    sizes, dups = _scan(answer, similarity, shingle, min_tokens, max_paragraph_tokens)
    total = sum(sizes)
    return sum(sizes[i] for i in dups) / total if total else 0.0


def format_reward(text: str, allow_unclosed: bool = False, penalty_weight: float = 1.0,
                  similarity: float = SIMILARITY) -> float:
    """0.0 if `text` (the whole response) breaks the think/answer format (see `split_response`),
    else max(0, 1 - penalty_weight * near_duplicate_share(answer)), in [0, 1]."""
    parts = split_response(text, allow_unclosed=allow_unclosed)
    if parts is None:
        return 0.0
    return max(0.0, 1.0 - penalty_weight * near_duplicate_share(parts[1], similarity=similarity))


class FormatReward:
    """Format reward as a module-like callable: `reward(prompts, answers, meta) -> Tensor[B]` fp32.

    Reads the whole generated text from meta["response"] (a sample without one scores 0; the
    extracted answer alone cannot show the think segment). `accept_unclosed=True` (default) accepts a
    missing final `</answer>` for samples whose meta["stopped_at_close"] is true (generation ended
    on the `</answer>` stop string and the string was cut), like
    `lwz.prompts.extract_answer(text, stopped_at_close=True)`; a text cut by the length cap, or
    ended by another stop string (e.g. `<|user|>`), with no `</answer>` is broken.
    `penalty_weight` scales the near-duplicate share; `similarity` is the detector's Jaccard
    threshold.
    """

    name = "format"

    def __init__(self, penalty_weight: float = 1.0, similarity: float = SIMILARITY,
                 accept_unclosed: bool = True):
        if not penalty_weight >= 0:
            raise ValueError(f"rewards.format_repetition_weight: expected >= 0, got {penalty_weight}")
        if not 0 < similarity <= 1:
            raise ValueError(f"FormatReward similarity: expected 0 < similarity <= 1, got {similarity}")
        self.penalty_weight = float(penalty_weight)
        self.similarity = float(similarity)
        self.accept_unclosed = accept_unclosed

    def __call__(self, prompts: Sequence[str], answers: Sequence[Optional[str]],
                 meta: Optional[Sequence[dict]] = None) -> torch.Tensor:
        meta = batch_meta("FormatReward", prompts, answers, meta)
        vals = []
        for m in meta:
            text = m.get("response") or ""
            unclosed = self.accept_unclosed and bool(m.get("stopped_at_close", False))
            vals.append(format_reward(text, allow_unclosed=unclosed,
                                      penalty_weight=self.penalty_weight, similarity=self.similarity))
        return torch.tensor(vals, dtype=torch.float32)
