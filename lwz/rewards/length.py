"""Length reward (paper §2, Eq. 3).

The target range [lower, upper] of a sample comes, in this order, from
  1. an explicit word-count request in the question ("2,000-word essay", "不少于2000字", ...),
     turned into a range with the paper's ±10% rules (`parse_length_request`);
  2. the prompt file's `length_range` (meta["length_range"]);
  3. an optional range predictor (any callable prompt -> (lo, hi), e.g. a trained module);
  4. a configurable default range.
The answer is measured with `count_words` (CJK characters + English words, as the paper's
evaluation script does) and scored with `length_reward`.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch

from lwz.rewards import batch_meta

_CJK = re.compile(r"[\u4e00-\u9fff]")
_EN_WORD = re.compile(r"\b[a-zA-Z]+\b")


def count_words(text: Optional[str]) -> int:
    """Number of CJK characters ([\\u4e00-\\u9fff]) plus English words (\\b[a-zA-Z]+\\b).

    Digits and punctuation are not counted. None or "" gives 0.
    """
    if not text:
        return 0
    return len(_CJK.findall(text)) + len(_EN_WORD.findall(text))


def length_reward(n_words: float, lower: float, upper: float, max_words: float) -> float:
    """The paper's Eq. 3, in [0, 1].

    1 if lower <= n <= upper; n / lower if n < lower; (max_words - n) / (max_words - upper),
    floored at 0, if n > upper. When upper >= max_words any n above upper gives 0.
    """
    n = float(n_words)
    lower, upper = float(lower), float(upper)
    if lower > upper:
        lower, upper = upper, lower
    if lower <= n <= upper:
        return 1.0
    if n < lower:
        return max(0.0, n / lower)  # lower > 0 here since n >= 0
    if max_words <= upper:
        return 0.0
    return max(0.0, (float(max_words) - n) / (float(max_words) - upper))


# ---------------------------------------------------------------------------------------------
# Parsing explicit length requests
# ---------------------------------------------------------------------------------------------

# A number: "2000", "2,000", "2，000", "1.5k", "2k", "3千", "1万", "1.5万".
_NUM = r"(\d{1,3}(?:[,，]\d{3})+|\d+(?:\.\d+)?)\s*([kK千万]?)"
_N = r"(?<![\d.,，])" + _NUM
# Units: English "words" (also "2000-word", "2000 word essay"), Chinese "字" / "个字" / "词".
_EN_UNIT = r"(?:\s*-\s*|\s+)(?:english\s+)?words?\b"
_ZH_UNIT = r"\s*(?:个)?(?:汉字|中文字|字|词)"
_UNIT = rf"(?:{_EN_UNIT}|{_ZH_UNIT})"
_RANGE_SEP = r"\s*(?:-|–|—|~|～|to|至|到|and)\s*"

_I = re.IGNORECASE
# Tiers are tried in order (ranges, then bounds, then exact counts); within a tier the earliest
# match in the text wins, the longer one at equal start ("no more than" beats "more than",
# "不超过" beats "超过").
_TIERS: list[list[tuple[str, re.Pattern]]] = [[
    # explicit ranges
    ("range", re.compile(rf"between\s+{_N}(?:\s*words?)?\s+and\s+{_N}{_UNIT}", _I)),
    ("range", re.compile(rf"from\s+{_N}(?:\s*words?)?\s+to\s+{_N}{_UNIT}", _I)),
    ("range", re.compile(rf"{_N}(?:{_UNIT})?{_RANGE_SEP}{_N}{_UNIT}", _I)),
], [
    # lower bounds
    ("at_least", re.compile(
        rf"(?:at\s+least|no\s+less\s+than|no\s+fewer\s+than|not\s+less\s+than|not\s+fewer\s+than|"
        rf"a\s+minimum\s+of|minimum\s+of|min\.?\s+of|more\s+than|over|exceeding|"
        rf"不少于|不低于|不得少于|不能少于|至少|最少|多于|超过|大于)\s*{_N}{_UNIT}", _I)),
    ("at_least", re.compile(
        rf"{_N}(?:\s*\+)?{_UNIT}\s*(?:or\s+more|or\s+longer|at\s+least|minimum|以上|或以上|起)", _I)),
    ("at_least", re.compile(rf"{_N}\s*\+{_UNIT}", _I)),
    # upper bounds
    ("at_most", re.compile(
        rf"(?:no\s+more\s+than|not\s+more\s+than|no\s+longer\s+than|at\s+most|up\s+to|under|"
        rf"less\s+than|fewer\s+than|below|within|a\s+maximum\s+of|maximum\s+of|max\.?\s+of|"
        rf"not\s+(?:to\s+)?exceed(?:ing)?|不超过|不多于|不得超过|不能超过|不要超过|最多|少于|低于|"
        rf"控制在)\s*{_N}{_UNIT}", _I)),
    ("at_most", re.compile(
        rf"{_N}{_UNIT}\s*(?:or\s+less|or\s+fewer|or\s+shorter|max(?:imum)?\b|at\s+most|"
        rf"以内|之内|以下)", _I)),
], [
    # exact counts ("about 800 words", "2,000-word essay", "2000字左右", "约2000字")
    ("exact", re.compile(rf"{_N}{_UNIT}", _I)),
]]


def _to_int(num: str, suffix: str) -> float:
    value = float(num.replace(",", "").replace("，", ""))
    scale = {"k": 1000, "K": 1000, "千": 1000, "万": 10000}.get(suffix, 1)
    return value * scale


def _r(x: float) -> int:
    return int(round(x))


def parse_length_request(prompt: str) -> Optional[tuple[int, int]]:
    """(lo, hi) word range stated in `prompt`, or None when it states none.

    Rules (paper §2): an exact N ("2000 words", "about 2,000 words", "2000字左右") -> [0.9N, 1.1N];
    at most N ("no more than", "up to", "under", "不超过", "以内") -> [0.9N, N]; at least N
    ("at least", "no less than", "N+ words", "不少于", "以上") -> [N, 1.1N]; an explicit range
    ("between A and B", "A-B words", "A到B字") -> [A, B]. Bounds are rounded to ints. Ranges beat
    bounds, bounds beat exact counts; within a tier the earliest match in the text wins, except that
    a lower and an upper bound both stated ("at least 1000 and no more than 1500 words",
    "不少于1000字，不超过1500字") give [lower, upper].
    """
    if not prompt:
        return None
    for tier in _TIERS:
        found = []
        for kind, pat in tier:
            for m in pat.finditer(prompt):
                found.append((m.start(), m.end(), kind, m.groups()))
        # earliest first, the longer at equal start; drop matches overlapping a kept one
        # ("超过2000字" inside "不超过2000字", "more than" inside "no more than")
        kept, end = [], -1
        for t in sorted(found, key=lambda t: (t[0], -t[1])):
            if t[0] >= end:
                kept.append(t)
                end = t[1]
        found = kept
        # "at least A ... at most B" (both bounds stated) is the range [A, B]
        lows = [_to_int(*g[:2]) for _, _, k, g in found if k == "at_least"]
        highs = [_to_int(*g[:2]) for _, _, k, g in found if k == "at_most"]
        if lows and highs and 0 < lows[0] <= highs[0]:
            return _r(lows[0]), _r(highs[0])
        for _, _, kind, g in found:
            rng = _to_range(kind, g)
            if rng is not None:
                return rng
    return None


def _to_range(kind: str, g: tuple) -> Optional[tuple[int, int]]:
    if kind == "range":
        a, b = _to_int(g[0], g[1]), _to_int(g[2], g[3])
        if a > b:
            a, b = b, a
        if b <= 0:
            return None
        return _r(a), _r(b)
    n = _to_int(g[0], g[1])
    if n <= 0:
        return None
    if kind == "at_least":
        return _r(n), _r(1.1 * n)
    if kind == "at_most":
        return _r(0.9 * n), _r(n)
    return _r(0.9 * n), _r(1.1 * n)


# ---------------------------------------------------------------------------------------------
# The reward module
# ---------------------------------------------------------------------------------------------


class LengthReward:
    """Length reward as a module-like callable: `reward(prompts, answers, meta) -> Tensor[B]` fp32.

    Args:
      max_words: L_max of Eq. 3, where the reward above the range reaches 0.
      default_range: (lo, hi) when neither the prompt, meta nor the predictor gives one.
      on_broken: what an answer of None (broken format) scores: "zero" -> 0; "whole_response" ->
        the length reward measured on meta["response"] (the whole generated text), which gives a
        random model a length signal from step 1.
      range_predictor: optional callable prompt -> (lo, hi) (e.g. a trained nn.Module), used when
        the prompt states no length and meta has no "length_range".
      parse_prompt: look for an explicit request in the question text (meta["question"] when
        present, else the prompt).
    """

    name = "length"

    def __init__(self, max_words: int = 12000, default_range: Sequence[int] = (400, 1200),
                 on_broken: str = "zero",
                 range_predictor: Optional[Callable[[str], Sequence[float]]] = None,
                 parse_prompt: bool = True):
        if on_broken not in ("zero", "whole_response"):
            raise ValueError(f"rewards.length.on_broken: expected 'zero' or 'whole_response', "
                             f"got {on_broken!r}")
        lo, hi = default_range
        if not (0 <= lo <= hi):
            raise ValueError(f"rewards.length.default_range: expected 0 <= lo <= hi, got {default_range}")
        if max_words <= 0:
            raise ValueError(f"rewards.length.max_words: expected > 0, got {max_words}")
        self.max_words = int(max_words)
        self.default_range = (int(lo), int(hi))
        self.on_broken = on_broken
        self.range_predictor = range_predictor
        self.parse_prompt = parse_prompt

    def target_range(self, prompt: str, meta: Optional[dict] = None) -> tuple[float, float]:
        meta = meta or {}
        if self.parse_prompt:
            rng = parse_length_request(meta.get("question") or prompt)
            if rng is not None:
                return rng
        rng = meta.get("length_range")
        if rng is not None:
            lo, hi = rng
            return (min(lo, hi), max(lo, hi))
        if self.range_predictor is not None:
            lo, hi = (float(x) for x in self.range_predictor(prompt))
            return (min(lo, hi), max(lo, hi))
        return self.default_range

    def score(self, prompt: str, answer: Optional[str], meta: Optional[dict] = None) -> float:
        meta = meta or {}
        if answer is None:
            if self.on_broken == "zero":
                return 0.0
            answer = meta.get("response") or ""
        lo, hi = self.target_range(prompt, meta)
        return length_reward(count_words(answer), lo, hi, self.max_words)

    def __call__(self, prompts: Sequence[str], answers: Sequence[Optional[str]],
                 meta: Optional[Sequence[dict]] = None) -> torch.Tensor:
        meta = batch_meta("LengthReward", prompts, answers, meta)
        vals = [self.score(p, a, m) for p, a, m in zip(prompts, answers, meta)]
        return torch.tensor(vals, dtype=torch.float32)
