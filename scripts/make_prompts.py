"""Writes data/tiny_prompts.jsonl: short writing requests for the tiny CPU default.

    python scripts/make_prompts.py [--out data/tiny_prompts.jsonl] [--seed 0]

Deterministic (same seed, same file). About 300 requests: English forms (a short poem, a note to
a friend, a product description, a story opening, ...) crossed with varied topics, plus about
10% Chinese requests so the Chinese template and length counting are exercised. Every request
has a small length_range in words (Chinese: characters) that a tiny model can meet in about 60
tokens; about a third say the length in the text, and then the range follows the stated length
(the paper's ±10% rule, clamped to small numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import random

# (request text with {t} for the topic, default [lo, hi] words when the text states no length)
FORMS_EN = [
    ("Write a short poem about {t}.", (15, 25)),
    ("Write a haiku-like verse about {t}.", (10, 20)),
    ("Write a note to a friend about {t}.", (20, 30)),
    ("Write a product description for a gadget related to {t}.", (25, 35)),
    ("Write the opening of a story about {t}.", (30, 40)),
    ("Write a diary entry about {t}.", (25, 35)),
    ("Write a short speech about {t}.", (30, 40)),
    ("Write a postcard message about {t}.", (15, 25)),
    ("Describe {t} for a child.", (20, 30)),
    ("Write a short advertisement about {t}.", (15, 25)),
    ("Write a thank-you message that mentions {t}.", (15, 25)),
    ("Write a short review of a book about {t}.", (25, 35)),
    ("Explain why {t} matters, in a short paragraph.", (30, 40)),
    ("Write a tweet about {t}.", (10, 20)),
    ("Write a brief news item about {t}.", (25, 35)),
]

TOPICS_EN = [
    "the sea at night", "a rainy Monday", "an old bicycle", "the first snow", "a lost key",
    "a small bakery", "the moon", "a garden in spring", "a long train ride", "a quiet library",
    "a lighthouse", "morning coffee", "a forgotten letter", "a mountain village", "the city at dawn",
    "a paper boat", "an autumn forest", "a broken clock", "a market day", "a school trip",
    "a street musician", "a summer storm", "a kite festival", "an old photograph", "a winter night",
    "a new neighbour", "a river crossing", "a desert road", "a birthday cake", "a sleeping cat",
    "a robot helper", "a camping trip", "the last bus home", "a field of sunflowers", "a museum visit",
    "a violin lesson", "a fishing boat", "a crowded station", "a tree house", "a star map",
]

# explicit-length phrasings: (suffix appended to the request, range from the stated n)
EXPLICIT_EN = [
    (" Use about {n} words.", lambda n: (round(n * 0.9), round(n * 1.1))),
    (" Write at least {n} words.", lambda n: (n, n + 10)),
    (" Keep it under {n} words.", lambda n: (max(n - 10, 0), n)),
    (" It should be roughly {n} words long.", lambda n: (round(n * 0.9), round(n * 1.1))),
    (" Answer in {n} words or more.", lambda n: (n, n + 10)),
    (" No more than {n} words, please.", lambda n: (max(n - 10, 0), n)),
]

FORMS_ZH = [
    ("写一段关于{t}的短文", (20, 30)),
    ("写一首关于{t}的小诗", (15, 25)),
    ("给朋友写一张关于{t}的便条", (15, 25)),
    ("用几句话描写{t}", (15, 25)),
    ("为{t}写一句广告语，再加一句说明", (10, 20)),
    ("写一篇关于{t}的日记开头", (20, 30)),
]

TOPICS_ZH = ["秋天", "雨夜", "老街", "月亮", "春天的花园", "一只小猫", "海边", "火车旅行",
             "家乡的河", "冬天的早晨", "一本旧书", "雪山"]

EXPLICIT_ZH = [
    ("，不少于{n}字。", lambda n: (n, n + 10)),
    ("，大约{n}字。", lambda n: (round(n * 0.9), round(n * 1.1))),
    ("，不超过{n}字。", lambda n: (max(n - 10, 0), n)),
]


def make_prompts(seed: int = 0, n_en: int = 270, n_zh: int = 30) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(f, t) for f in range(len(FORMS_EN)) for t in range(len(TOPICS_EN))]
    rng.shuffle(pairs)
    out = []
    for i, (fi, ti) in enumerate(pairs[:n_en]):
        text, (lo, hi) = FORMS_EN[fi]
        text = text.replace("{t}", TOPICS_EN[ti])
        if i % 3 == 0:  # a third state the length
            suffix, to_range = EXPLICIT_EN[rng.randrange(len(EXPLICIT_EN))]
            n = rng.choice([15, 20, 25, 30, 35])
            text += suffix.replace("{n}", str(n))
            lo, hi = to_range(n)
        out.append({"prompt": text, "length_range": [lo, hi]})
    zh_pairs = [(f, t) for f in range(len(FORMS_ZH)) for t in range(len(TOPICS_ZH))]
    rng.shuffle(zh_pairs)
    for i, (fi, ti) in enumerate(zh_pairs[:n_zh]):
        text, (lo, hi) = FORMS_ZH[fi]
        text = text.replace("{t}", TOPICS_ZH[ti])
        if i % 2 == 0:
            suffix, to_range = EXPLICIT_ZH[rng.randrange(len(EXPLICIT_ZH))]
            n = rng.choice([20, 25, 30])
            text += suffix.replace("{n}", str(n))
            lo, hi = to_range(n)
        else:
            text += "。"
        out.append({"prompt": text, "length_range": [lo, hi]})
    rng.shuffle(out)  # mix languages and forms in file order
    return out


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(root, "data", "tiny_prompts.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    records = make_prompts(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} prompts to {args.out}")


if __name__ == "__main__":
    main()
