"""Length reward (paper §2, Eq. 3).

The target range [lower, upper] of a sample comes, in this order, from
  1. the prompt record's own `length_range` (meta["length_range"]: the dataset's label);
  2. an explicit word-count request in the question ("2,000-word essay", "不少于2000字", ...),
     turned into a range with the paper's ±10% rules (`parse_length_request`);
  3. an optional range predictor (any callable prompt -> (lo, hi), e.g. a trained module);
  4. a configurable default range (`rewards.default_length_range`).
The answer is measured with `count_words` (CJK characters + English words, as the paper's
evaluation script does) and scored with `length_reward`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
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
# The prompt is normalised first (number words and Chinese numerals to digits; a bare number
# after "字数" / "word count" gets its unit), then every length mention is found and classified:
# a request, or a description of material the prompt hands over ("this 3000-word article"), or a
# per-item length ("5 poems of 100 words each") that is multiplied by its count.

_EN_SMALL = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_EN_TENS = {w: 10 * i for i, w in
            enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_EN_WORD = re.compile(r"[A-Za-z]+")
# runs of number words (and the "a", "and", "half" that join them), separated by spaces or hyphens
_EN_NUMBER_VOCAB = "|".join(sorted([*_EN_SMALL, *_EN_TENS, "hundred", "thousand", "and", "a", "an", "half"],
                                   key=len, reverse=True))
_EN_NUMBER_RUN = re.compile(rf"\b(?:{_EN_NUMBER_VOCAB})(?:[\s-]+(?:{_EN_NUMBER_VOCAB}))*\b", re.IGNORECASE)


def _en_small(words: list[str], i: int) -> Optional[tuple[int, int]]:
    """(value < 100, next index) for "seven", "twenty", "twenty-five" at words[i]."""
    if i < len(words) and words[i] in _EN_TENS:
        v = _EN_TENS[words[i]]
        if i + 1 < len(words) and 0 < _EN_SMALL.get(words[i + 1], 0) < 10:
            return v + _EN_SMALL[words[i + 1]], i + 2
        return v, i + 1
    if i < len(words) and words[i] in _EN_SMALL:
        return _EN_SMALL[words[i]], i + 1
    return None


def _en_below_thousand(words: list[str], i: int) -> Optional[tuple[float, int]]:
    """ "three hundred and fifty", "fifteen hundred", "a hundred", "forty", "two and a half"."""
    if i + 1 < len(words) and words[i] in ("a", "an", "one") and words[i + 1] == "hundred":
        v, j = 100, i + 2
    else:
        small = _en_small(words, i)
        if small is None:
            return None
        v, j = small
        if j < len(words) and words[j] == "hundred":
            v, j = v * 100, j + 1
        elif words[j:j + 3] == ["and", "a", "half"]:
            return v + 0.5, j + 3
    if v >= 100:
        k = j + 1 if j < len(words) and words[j] == "and" else j
        rest = _en_small(words, k)
        # "five hundred and eight hundred" is two numbers: "eight" starts the second
        if rest is not None and rest[0] > 0 and words[rest[1]:rest[1] + 1] not in (["hundred"], ["thousand"]):
            v, j = v + rest[0], rest[1]
    return v, j


def _en_number(words: list[str], i: int) -> Optional[tuple[int, int]]:
    """(value, next index) of the English number spelled at words[i], or None."""
    if i + 1 < len(words) and words[i] in ("a", "an") and words[i + 1] == "thousand":
        head = (1, i + 1)
    else:
        head = _en_below_thousand(words, i)
        if head is None:
            return None
    v, j = head
    if j < len(words) and words[j] == "thousand":
        v, j = v * 1000, j + 1
        k = j + 1 if j < len(words) and words[j] == "and" else j
        rest = _en_below_thousand(words, k)
        if rest is not None and rest[0] >= 1 and words[rest[1]:rest[1] + 1] != ["thousand"]:
            v, j = v + rest[0], rest[1]
    if v != int(v):
        return None
    return int(v), j


def _spell_out_en(text: str) -> str:
    """`text` with English number words ("two thousand", "fifteen hundred", "a thousand",
    "twenty-five", "two and a half thousand") replaced by digits."""
    out, last = [], 0
    for run in _EN_NUMBER_RUN.finditer(text):
        words = list(_EN_WORD.finditer(run.group(0)))
        lower = [w.group(0).lower() for w in words]
        k = 0
        while k < len(words):
            num = _en_number(lower, k)
            if num is None:
                k += 1
                continue
            v, e = num
            out += [text[last:run.start() + words[k].start()], str(v)]
            last = run.start() + words[e - 1].end()
            k = e
    out.append(text[last:])
    return "".join(out)


_ZH_DIGIT = {c: i for i, c in enumerate("零一二三四五六七八九")} | {"〇": 0, "两": 2}
_ZH_MULT = {"十": 10, "百": 100, "千": 1000}
# A Chinese numeral: starts with a digit or 十 (so 千万 "by all means" and 万一 "in case" are
# left alone); converted when it holds a unit (八百, 两千, 一万) or counts items (五首, 三篇).
_ZH_NUMERAL = re.compile(r"[一二两三四五六七八九十][零〇一二两三四五六七八九十百千万]*")
_ZH_CLASSIFIER = r"(?:个|篇|首|段|章|条|封|则|部分|节|份)"


def _zh_value(s: str) -> int:
    total, section, digit, last_unit = 0, 0, None, 0
    for c in s:
        if c in _ZH_DIGIT:
            digit = _ZH_DIGIT[c]
            if c in "零〇":
                last_unit = 0
        elif c in _ZH_MULT:
            section += (1 if digit is None else digit) * _ZH_MULT[c]
            digit, last_unit = None, _ZH_MULT[c]
        else:  # 万
            total += (section + (digit or 0)) * 10000
            section, digit, last_unit = 0, None, 10000
    if digit is not None:  # 三千五 = 3500, 两万五 = 25000
        section += digit * (last_unit // 10 if last_unit >= 10 else 1)
    return total + section


def _spell_out_zh(text: str) -> str:
    def sub(m: re.Match) -> str:
        s = m.group(0)
        after = text[m.end():m.end() + 3]
        has_unit = any(c in "十百千万" for c in s)
        counts = re.match(_ZH_CLASSIFIER, after) is not None
        if has_unit or counts:
            return str(_zh_value(s))
        return s
    return _ZH_NUMERAL.sub(sub, text)


# A number: "2000", "2,000", "2，000", "1.5k", "2k", "3千", "1万", "1.5万".
_NUM = r"(\d{1,3}(?:[,，]\d{3})+|\d+(?:\.\d+)?)\s*([kK千万]?)"
_N = r"(?<!\d)(?<!\d[.,，])" + _NUM
# Units: English "words" (also "2000-word", "2000 word essay"), Chinese "字" / "个字" / "词".
_EN_UNIT = r"(?:\s*-\s*|\s+)(?:english\s+)?words?\b"
_ZH_UNIT = r"\s*(?:个)?(?:汉字|中文字|字|词)"
_UNIT = rf"(?:{_EN_UNIT}|{_ZH_UNIT})"
_RANGE_SEP = r"\s*(?:-|–|—|~|～|to|至|到|and)\s*"

_I = re.IGNORECASE
# A bare number after 字数 / word count takes the unit: "字数不少于3000" -> "字数不少于3000字".
_ZH_COUNT_UNITLESS = re.compile(
    rf"(字数[^\d。！？；\n]{{0,10}}?{_N}(?:{_RANGE_SEP}{_N})?)(?!{_UNIT}|\d|[.,，]\d)")
_EN_COUNT_UNITLESS = re.compile(
    rf"(word\s+(?:count|limit)[^\d.!?;\n]{{0,20}}?{_N}(?:{_RANGE_SEP}{_N})?)(?!{_UNIT}|\d|[.,，]\d)", _I)

_AT_LEAST_BEFORE = (r"at\s+least|no\s+less\s+than|no\s+fewer\s+than|not\s+less\s+than|not\s+fewer\s+than|"
                    r"(?:a\s+)?min(?:imum)?\.?\s*(?:of|:)?|more\s+than|over|exceeding|upwards\s+of|"
                    r"不少于|不低于|不得少于|不能少于|不应少于|至少|最少|"
                    r"多于|超过|大于|下限为?")
_AT_MOST_BEFORE = (r"no\s+more\s+than|not\s+more\s+than|no\s+longer\s+than|at\s+most|up\s+to|under|"
                   r"less\s+than|fewer\s+than|below|within|(?:a\s+)?max(?:imum)?\.?\s*(?:of|:)?|"
                   r"not\s+(?:to\s+)?exceed(?:ing)?|word\s+limit\s*(?:of|is|:)?|"
                   r"不超过|不多于|不得超过|不能超过|不要超过|不应超过|"
                   r"最多|少于|低于|控制在|限制?在|上限为?")
# (kind, pattern): kinds are "range", "at_least", "at_most", "exact". Overlapping matches keep
# the earliest, then the longest ("no more than" beats "more than", "不超过" beats "超过").
_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("range", re.compile(rf"(?:at\s+least|no\s+less\s+than|no\s+fewer\s+than|a\s+minimum\s+of)\s+{_N}"
                         rf"(?:{_UNIT})?\s*(?:and|but|,)\s*(?:no\s+more\s+than|not\s+more\s+than|at\s+most|"
                         rf"under|fewer\s+than|less\s+than|a\s+maximum\s+of)\s+{_N}{_UNIT}", _I)),
    ("range", re.compile(rf"between\s+{_N}(?:{_UNIT})?\s+and\s+{_N}{_UNIT}", _I)),
    ("from_to", re.compile(rf"from\s+{_N}(?:{_UNIT})?\s+to\s+{_N}{_UNIT}", _I)),
    ("range", re.compile(rf"{_N}(?:{_UNIT})?{_RANGE_SEP}{_N}{_UNIT}", _I)),
    ("at_least", re.compile(rf"(?<![A-Za-z])(?:{_AT_LEAST_BEFORE})\s*{_N}{_UNIT}", _I)),
    ("at_least", re.compile(rf"{_N}(?:\s*\+)?{_UNIT}\s*(?:or\s+more|or\s+longer|at\s+least|minimum|"
                            rf"以上|或以上|起)", _I)),
    ("at_least", re.compile(rf"{_N}\s*(?:\+|多|余)\s*{_UNIT}", _I)),
    ("at_least", re.compile(rf"{_N}{_EN_UNIT}\s+minimum", _I)),
    ("at_most", re.compile(rf"(?<![A-Za-z])(?:{_AT_MOST_BEFORE})\s*{_N}{_UNIT}", _I)),
    ("at_most", re.compile(rf"{_N}{_UNIT}\s*(?:or\s+less|or\s+fewer|or\s+shorter|max(?:imum)?\b|"
                           rf"at\s+most|limit\b|cap\b|以内|之内|以下|"
                           rf"内(?=[^\u4e00-\u9fff]|$|完成|回答|作答|写完|说明|介绍|概括|总结))", _I)),
    ("exact", re.compile(rf"{_N}{_UNIT}", _I)),
]
_TIER = {"range": 0, "at_least": 1, "at_most": 1, "exact": 2}

# "cut / expand ... from A to B words" asks for B
_RESIZE = re.compile(r"\b(?:cut|shorten|reduce|trim|condense|compress|expand|extend|lengthen|grow|"
                     r"bring)\b", _I)
# Cues read from the text before a mention, within its clause.
_CLAUSE_END = re.compile(r"[.!?;:,\n。！？；：，]")
# "this / my / the attached ... 3000-word article", "my essay is about 1500 words": material.
_EN_MATERIAL = re.compile(
    r"(?:\b(?:this|these|my|our|his|her|their|attached|enclosed|following|above|below|"
    r"preceding|provided|given|original)\b"
    r"(?:\s+(?!(?:in|into|within|to|under|using|for|as|at)\b)[\w'’-]+){0,2}?"
    r"|\b(?:here\s+is|here's|here\s+are|below\s+is|above\s+is|attached\s+is|i\s+wrote|i\s+have\s+written|"
    r"i've\s+written|i\s+have|i've\s+got|i\s+drafted)\s+(?:an?\s+)?(?:[\w'’-]+\s+){0,2}?)"
    r"(?:\s+(?:of|with|is|was|runs|runs\s+to|has|contains|which\s+is|that\s+is))?"
    r"\s*(?:about|around|roughly|approximately|nearly|almost|some|just|over|under|only)?\s*$", _I)
# a creation verb in the clause makes it a request again: "help me write my 650-word essay"
_EN_CREATE = re.compile(r"\b(?:write|draft|compose|create|generate|produce|prepare|craft)\b", _I)
_ZH_MATERIAL = re.compile(r"(?:这|那|该|此|本文|以下|下面|下列|上面|上述|如下|附件|附上|"
                          r"原文|原稿|我的|我写的|我们的|他的|她的|我写了|我有)[^\d]{0,6}$")
_ZH_REQUEST_WORD = re.compile(r"要求|需要|应|须|请|控制|限|写|改|缩|扩")
# "in / within / about / approximately N words", "用200字", "约2000字": a stated request, which
# beats a bare mention ("a 1000-word story about a boy who reads 100 words a day").
_STRONG_BEFORE = re.compile(
    r"(?:\b(?:in|within|of|to|into|using|use|be|around|about|approximately|approx|roughly|exactly|"
    r"only|just|total(?:ing|ling)?|write|answer|respond|reply|limit(?:ed)?|keep\s+it)\b\.?"
    r"|用|以|约|大约|大概|为|在|到|成|写|字数|篇幅|控制在|限|共|总共|"
    r"长度|全文|~|～)\s*$", _I)
_TINY_REQUEST = re.compile(r"(?:\b(?:in|within|using|exactly|only|just)|用)\s*$", _I)
_STRONG_AFTER = re.compile(r"\s*(?:左右|上下)")
# per-item lengths: "each about 500 words", "每首100字", "5 poems of 100 words", "... words each"
_EACH_BEFORE = re.compile(r"(?:\b(?:each|every|per)\b(?:\s+(?!(?:in|within|using|to)\b)[\w'’-]+){0,6}?\s*"
                          r"|(?:每|各(?!位|种|类|方面|个方面))[^\d]{0,6}"
                          r"|\b\d+\s+(?:[a-z-]+\s+){0,2}?[a-z]+s\s+(?:of|with)\s+(?:about\s+|around\s+|"
                          r"roughly\s+|approximately\s+)?)$", _I)
_EACH_AFTER = re.compile(r"\s*(?:each|apiece|a\s+piece|per\s+\w+|for\s+each\b)", _I)
_NOT_ITEMS = {"words", "characters", "years", "days", "hours", "minutes", "seconds", "weeks",
              "months", "times", "people", "percent"}
_EN_COUNT = re.compile(r"\b(\d+)\s+(?:(?!words?\b)[a-z-]+\s+){0,2}?([a-z]+s)\b", _I)
_ZH_COUNT = re.compile(rf"(\d+)\s*{_ZH_CLASSIFIER}")


def _to_int(num: str, suffix: str) -> float:
    value = float(num.replace(",", "").replace("，", ""))
    scale = {"k": 1000, "K": 1000, "千": 1000, "万": 10000}.get(suffix, 1)
    return value * scale


def _r(x: float) -> int:
    return int(round(x))


@dataclass
class _Mention:
    start: int
    end: int
    kind: str          # range, at_least, at_most, exact
    lo: float          # the stated number (range: its lower end)
    hi: float          # range: its upper end; otherwise = lo
    strong: bool = False
    resize: bool = False   # "shorten it from 3000 to 500 words": a request for the new length


def _normalise(prompt: str) -> str:
    text = _spell_out_zh(_spell_out_en(prompt))
    text = _ZH_COUNT_UNITLESS.sub(r"\1字", text)
    return _EN_COUNT_UNITLESS.sub(r"\1 words", text)


def _mentions(text: str) -> list[_Mention]:
    """Every length mention in `text`, in order; overlapping matches keep the earliest, then the
    longest."""
    found = []
    for kind, pat in _PATTERNS:
        for m in pat.finditer(text):
            g = m.groups()
            if kind == "from_to" and _RESIZE.search(text[max(0, m.start() - 60):m.start()]):
                b = _to_int(*g[2:4])
                found.append(_Mention(m.start(), m.end(), "exact", b, b, resize=True))
            elif kind in ("range", "from_to"):
                a_num, a_suf, b_num, b_suf = g
                # "2-3k words", "1.5-2万字": the suffix of the upper end applies to both
                if not a_suf and b_suf and _to_int(a_num, "") < _to_int(b_num, ""):
                    a_suf = b_suf
                lo, hi = sorted((_to_int(a_num, a_suf), _to_int(b_num, b_suf)))
                found.append(_Mention(m.start(), m.end(), "range", lo, hi))
            else:
                n = _to_int(*g[:2])
                found.append(_Mention(m.start(), m.end(), kind, n, n))
    kept, end = [], -1
    for t in sorted(found, key=lambda t: (t.start, -t.end)):
        if t.start >= end:
            kept.append(t)
            end = t.end
    return kept


def _clause_before(text: str, m: _Mention) -> str:
    """The text between the last clause break before the mention and the mention."""
    before = text[:m.start]
    return before[max((x.end() for x in _CLAUSE_END.finditer(before)), default=0):]


def _is_material(text: str, m: _Mention) -> bool:
    """The mention describes text the prompt hands over, not the answer asked for."""
    clause = _clause_before(text, m)
    hit = _EN_MATERIAL.search(clause)
    if hit and not _EN_CREATE.search(clause):
        return True
    hit = _ZH_MATERIAL.search(clause)
    return bool(hit) and not _ZH_REQUEST_WORD.search(hit.group(0)[1:])


def _item_count(text: str, m: _Mention) -> Optional[int]:
    """The number of items a per-item length applies to: the count nearest before the mention
    ("5 poems", "三篇" -> 3篇), else the first after it; None when none is stated."""
    counts = [(c.start(), int(c.group(1))) for c in _EN_COUNT.finditer(text)
              if c.group(2).lower() not in _NOT_ITEMS]
    counts += [(c.start(), int(c.group(1))) for c in _ZH_COUNT.finditer(text)]
    counts = [(s, n) for s, n in counts if not (m.start <= s < m.end) and 2 <= n <= 100]
    before = [n for s, n in sorted(counts) if s < m.start]
    after = [n for s, n in sorted(counts) if s >= m.end]
    return before[-1] if before else (after[0] if after else None)


@functools.lru_cache(maxsize=4096)  # every prompt is scored once per sample of its group
def parse_length_request(prompt: str) -> Optional[tuple[int, int]]:
    """(lo, hi) word range the prompt asks for, or None when it asks for none.

    Rules (paper §2): an exact N ("2000 words", "about 2,000 words", "2000字左右", "八百字") ->
    [0.9N, 1.1N]; at most N ("no more than", "up to", "under", "不超过", "以内") -> [0.9N, N];
    at least N ("at least", "no less than", "N+ words", "不少于", "以上") -> [N, 1.1N]; an explicit
    range ("between A and B", "A-B words", "A到B字", "字数要求：A-B") -> [A, B]. Bounds are rounded
    to ints. Number words ("two thousand", "fifteen hundred") and Chinese numerals ("两千",
    "1.5万", "三千五百") are read.

    Mentions that describe material the prompt hands over ("summarize this 3000-word article",
    "here is my 1500-word essay") are not requests. A per-item length ("5 poems of 100 words
    each", "三篇，每篇500字") is multiplied by the stated number of items, or is not used when
    none is stated. Among the requests, ranges beat bounds and bounds beat exact counts; within
    one of those, a mention with a request cue ("in N words", "about N", "约", "左右") beats a bare
    one, then the earliest wins, except that a lower and an upper bound both stated ("at least
    1000 and no more than 1500 words", "不少于1000字，不超过1500字") give [lower, upper].
    """
    if not prompt:
        return None
    text = _normalise(prompt)
    requests = []
    for m in _mentions(text):
        if not m.resize and _is_material(text, m):
            continue
        before, after = text[:m.start], text[m.end:]
        if _EACH_BEFORE.search(_clause_before(text, m)) or _EACH_AFTER.match(after):
            count = _item_count(text, m)
            if count is None:
                continue
            m.lo, m.hi = m.lo * count, m.hi * count
        else:  # a per-item length is weaker than a length stated for the whole answer
            m.strong = (m.kind != "exact" or _STRONG_BEFORE.search(before[-30:]) is not None
                        or _STRONG_AFTER.match(after) is not None)
        # a few words are a request only when asked for ("in three words"), not when a story is
        # "about one word that ..."
        if m.hi <= 0 or (m.hi < 10 and not _TINY_REQUEST.search(before[-20:])):
            continue
        requests.append(m)
    if not requests:
        return None
    requests.sort(key=lambda m: (_TIER[m.kind], not m.strong, m.start))
    best = requests[0]
    if best.kind in ("at_least", "at_most"):
        lows = [m.lo for m in requests if m.kind == "at_least"]
        highs = [m.lo for m in requests if m.kind == "at_most"]
        if lows and highs and lows[0] <= highs[0]:
            return _r(lows[0]), _r(highs[0])
    if best.kind == "range":
        return _r(best.lo), _r(best.hi)
    n = best.lo
    if best.kind == "at_least":
        return _r(n), _r(1.1 * n)
    if best.kind == "at_most":
        return _r(0.9 * n), _r(n)
    return _r(0.9 * n), _r(1.1 * n)


# ---------------------------------------------------------------------------------------------
# The reward module
# ---------------------------------------------------------------------------------------------


class LengthReward:
    """Length reward as a module-like callable: `reward(prompts, answers, meta) -> Tensor[B]` fp32.

    Args:
      max_words: L_max of Eq. 3, where the reward above the range reaches 0.
      default_range: (lo, hi) when neither meta, the question nor the predictor gives one.
      on_broken: what an answer of None (broken format) scores: "zero" -> 0; "whole_response" ->
        the length reward measured on meta["response"] (the whole generated text), which gives a
        random model a length signal from step 1.
      range_predictor: optional callable prompt -> (lo, hi) (e.g. a trained nn.Module), used when
        meta has no "length_range" and the question states no length.
      parse_prompt: look for an explicit request in the question text (meta["question"] when
        present, else the prompt) when meta has no "length_range".
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
        """(lo, hi) of one sample: meta["length_range"], else the request parsed from the question
        (meta["question"] when present, else `prompt`), else the predictor, else the default."""
        meta = meta or {}
        rng = meta.get("length_range")
        if rng is not None:
            lo, hi = rng
            return (min(lo, hi), max(lo, hi))
        if self.parse_prompt:
            rng = parse_length_request(meta.get("question") or prompt)
            if rng is not None:
                return rng
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
