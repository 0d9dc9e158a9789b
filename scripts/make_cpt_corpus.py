"""Writes the synthetic continual-pretraining corpus of `make train` (the paper's stage 1 in miniature).

    python scripts/make_cpt_corpus.py [--out data/cpt] [--seed 0] [--docs 6000] [--think-share 0.08]

Deterministic (same arguments, same bytes). Two JSONL files, one {"text": ...} a line:

  writing.jsonl  English prose of varied kinds and lengths (stories, letters, diary entries,
                 descriptions, reviews, news items, short poems; 20 to 400 words) and about 10%
                 Chinese prose (30 to 200 characters), made from a small grammar: subjects, verbs,
                 objects, places, times, feelings, connectives and dialogue, so the sentences are
                 varied but every word is one the bundled tokenizer encodes compactly.
  think.jsonl    think/answer-formatted samples in the exact template the tiny GRPO prompt uses
                 (configs/grpo-tiny.toml data.template_en / template_zh): preamble, `<|user|>: request
                 <|assistant|>:`, then ` <think>plan</think> <answer>prose</answer>`.

What the think samples must NOT teach is the GRPO task itself: their requests come from other
request forms than data/tiny_prompts.jsonl (scripts/make_prompts.py), never state a length, and
their answers' lengths are drawn uniformly from 20 to 150 words (Chinese: characters; see
--answer-words) whatever the request, mostly longer than the GRPO prompts' 5 to 40. So the CPT
model learns the format and how to write, and GRPO has to learn to stop before the token cap and
to write the length each request asks for (length_in_range_rate).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- English grammar ---------------------------------------------------------------------------
SUBJECTS = ["the old man", "a small cat", "my friend", "the teacher", "a young girl", "the baker",
            "my mother", "the stranger", "our neighbour", "the fisherman", "a tired traveller", "the children",
            "my brother", "the old woman", "a quiet boy", "the musician", "the driver", "my grandfather",
            "the doctor", "a little dog"]
VERBS = ["waits for", "remembers", "sings about", "looks at", "walks past", "dreams of", "finds", "brings",
         "shows", "carries", "opens", "follows", "holds", "hears", "leaves", "paints", "writes about",
         "talks about", "thinks of", "keeps"]
VERBS_PAST = ["waited for", "remembered", "sang about", "looked at", "walked past", "dreamed of", "found",
              "brought", "showed", "carried", "opened", "followed", "held", "heard", "left", "painted",
              "wrote about", "talked about", "thought of", "kept"]
OBJECTS = ["the quiet light", "a warm smile", "the first snow", "an open door", "the long road",
           "a bright morning", "the last letter", "a gentle song", "the empty station", "a small boat",
           "the golden field", "a new friend", "the evening rain", "an old photograph", "the stars",
           "a paper kite", "the broken clock", "a cup of tea", "the old bridge", "a red umbrella"]
PLACES = ["near the water", "in the garden", "at the station", "by the window", "in the village",
          "on the hill", "at the market", "in the library", "under the trees", "by the sea",
          "in the city", "on the train", "at the old house", "in the kitchen", "on the beach"]
TIMES = ["in the morning", "at night", "in the spring", "after the storm", "every day", "once again",
         "for a while", "before dawn", "in the autumn", "on a cold day", "in the evening", "last summer"]
FEELINGS = ["happy", "calm", "tired", "hopeful", "quiet", "warm", "sad", "curious", "grateful", "proud"]
ADJS = ["bright", "quiet", "small", "old", "gentle", "cold", "warm", "green", "soft", "long", "dark", "golden"]
NOUNS = ["sky", "river", "street", "forest", "field", "sea", "wind", "road", "garden", "moon", "house", "light"]
CONNECT = ["Then", "After that", "Later", "Soon", "At last", "Still", "Even so", "For a moment", "Now"]
SAYS = ["\"Look at this,\" said {s}.", "\"We will come back tomorrow,\" said {s}.",
        "\"I remember this place,\" said {s}.", "\"It is getting late,\" said {s}.",
        "\"Thank you for waiting,\" said {s}."]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def en_sentence(rng: random.Random, past: bool = False) -> str:
    s = rng.choice(SUBJECTS)
    v = rng.choice(VERBS_PAST if past else VERBS)
    k = rng.random()
    if k < 0.35:
        return f"{_cap(s)} {v} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
    if k < 0.55:
        return f"{rng.choice(CONNECT)}, {s} {v} {rng.choice(OBJECTS)} {rng.choice(TIMES)}."
    if k < 0.7:
        was = "was" if past else "is"
        return f"The {rng.choice(NOUNS)} {was} {rng.choice(ADJS)} and {rng.choice(ADJS)} {rng.choice(TIMES)}."
    if k < 0.82:
        felt = "felt" if past else "feels"
        return f"{_cap(s)} {felt} {rng.choice(FEELINGS)} when {rng.choice(SUBJECTS)} {v} {rng.choice(OBJECTS)}."
    if k < 0.9:
        return rng.choice(SAYS).replace("{s}", rng.choice(SUBJECTS))
    return f"{_cap(rng.choice(TIMES))}, {s} {v} {rng.choice(OBJECTS)} and {rng.choice(VERBS_PAST if past else VERBS)} " \
           f"{rng.choice(OBJECTS)}."


def words(text: str) -> int:
    return len(text.split())


def en_prose(rng: random.Random, n_words: int, past: bool = False) -> str:
    """Sentences until about n_words words, in paragraphs of 2 to 5 sentences."""
    paras, cur, total = [], [], 0
    while total < n_words:
        s = en_sentence(rng, past)
        cur.append(s)
        total += words(s)
        if len(cur) >= rng.randint(2, 5):
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def en_answer(rng: random.Random, n_words: int) -> str:
    """Whole sentences, as many as fit in n_words words (at least one), in one paragraph."""
    out, total = [], 0
    while True:
        s = en_sentence(rng)
        if out and total + words(s) > n_words:
            return " ".join(out)
        out.append(s)
        total += words(s)


def en_poem(rng: random.Random, n_lines: int) -> str:
    return "\n".join(f"{_cap(rng.choice(ADJS))} {rng.choice(NOUNS)} {rng.choice(PLACES)}," if i % 2 == 0
                     else f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for i in range(n_lines))


def en_document(rng: random.Random) -> str:
    n = int(rng.choice([rng.uniform(20, 80), rng.uniform(60, 200), rng.uniform(150, 400)]))
    kind = rng.random()
    if kind < 0.3:    # a story
        return f"{_cap(rng.choice(OBJECTS))}\n\n" + en_prose(rng, n, past=True)
    if kind < 0.45:   # a letter
        return f"Dear {rng.choice(['Anna', 'Tom', 'Lily', 'Sam', 'Mia', 'Ben'])},\n\n" + en_prose(rng, n) + \
               f"\n\nWith love,\n{rng.choice(['Kate', 'Leo', 'Emma', 'Max', 'Rose'])}"
    if kind < 0.6:    # a diary entry
        return f"{rng.choice(['Monday', 'Tuesday', 'Friday', 'Sunday'])}. " + en_prose(rng, n, past=True)
    if kind < 0.75:   # a news item
        return f"News from the {rng.choice(NOUNS)}. " + en_prose(rng, n, past=True)
    if kind < 0.85:   # a short poem
        return en_poem(rng, rng.randint(4, 12))
    return en_prose(rng, n)  # a description


# ---- Chinese grammar ---------------------------------------------------------------------------
ZH_SUBJ = ["老人", "小猫", "我的朋友", "老师", "小女孩", "妈妈", "邻居", "孩子们", "爷爷", "渔夫"]
ZH_VERB = ["看着", "想起", "走过", "找到", "带来", "打开", "听见", "写下", "等着", "画出"]
ZH_OBJ = ["安静的灯光", "温暖的笑容", "第一场雪", "一扇门", "长长的路", "一封旧信", "小船", "金色的田野",
          "一张旧照片", "满天的星星"]
ZH_PLACE = ["在河边", "在花园里", "在车站", "在窗前", "在村子里", "在山上", "在海边", "在老街上"]
ZH_TIME = ["早上", "夜里", "春天", "雨后", "每一天", "秋天", "傍晚", "冬天的早晨"]


def zh_prose(rng: random.Random, n_chars: int) -> str:
    out, total = [], 0
    while total < n_chars:
        s = f"{rng.choice(ZH_TIME)}，{rng.choice(ZH_SUBJ)}{rng.choice(ZH_PLACE)}{rng.choice(ZH_VERB)}{rng.choice(ZH_OBJ)}。"
        out.append(s)
        total += len(s) - 2
    return "".join(out)


# ---- think/answer samples ----------------------------------------------------------------------
ANSWER_WORDS = (20, 150)  # answer lengths of the think samples (uniform), whatever the request
# Request forms that data/tiny_prompts.jsonl does not use, with no length stated.
REQUESTS_EN = ["Tell me about {t}.", "Write something about {t}.", "Describe a day with {t}.",
               "Give me a few lines on {t}.", "Write a little scene with {t}.", "Share a memory of {t}.",
               "Write about {t} for a magazine.", "Say something kind about {t}."]
REQUESTS_ZH = ["说说{t}。", "写一写{t}。", "描述一下{t}。"]
PLANS_EN = ["I will write about {t} with a warm tone.", "First I set the scene, then I add one detail.",
            "The reader is a friend, so I keep it simple.", "I should use clear words and a clear structure.",
            "A strong opening line helps.", "I will end with a feeling.", "Let me check the style.",
            "The purpose is to describe {t} clearly."]
PLANS_ZH = ["我先想好结构，再写开头和结尾。", "语气要亲切。", "读者是朋友，可以写得轻松一些。", "最后检查一遍用词。"]


def think_sample(rng: random.Random, template_en: str, template_zh: str, topics_en, topics_zh,
                 answer_words: tuple[int, int]) -> str:
    if rng.random() < 0.1:
        t = rng.choice(topics_zh)
        q = rng.choice(REQUESTS_ZH).replace("{t}", t)
        plan = "".join(rng.sample(PLANS_ZH, rng.randint(1, 2)))
        answer = zh_prose(rng, rng.randint(*answer_words))
        return template_zh.replace("{question}", q) + f" <think>{plan}</think> <answer>{answer}</answer>"
    t = rng.choice(topics_en)
    q = rng.choice(REQUESTS_EN).replace("{t}", t)
    plan = " ".join(p.replace("{t}", t) for p in rng.sample(PLANS_EN, rng.randint(1, 2)))
    answer = en_answer(rng, rng.randint(*answer_words))
    return template_en.replace("{question}", q) + f" <think>{plan}</think> <answer>{answer}</answer>"


def make_corpus(seed: int, n_docs: int, think_share: float, template_en: str, template_zh: str,
                answer_words: tuple[int, int] = ANSWER_WORDS):
    """(writing documents, think samples): n_docs in all, think_share of them think samples, whose
    answers have a length drawn uniformly from answer_words (words; Chinese: characters)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_prompts

    rng = random.Random(seed)
    n_think = round(n_docs * think_share)
    writing = [zh_prose(rng, rng.randint(30, 200)) if rng.random() < 0.1 else en_document(rng)
               for _ in range(n_docs - n_think)]
    think = [think_sample(rng, template_en, template_zh, make_prompts.TOPICS_EN, make_prompts.TOPICS_ZH, answer_words)
             for _ in range(n_think)]
    return writing, think


def main() -> None:
    sys.path.insert(0, ROOT)
    from lwz.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "cpt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--think-share", type=float, default=0.08)
    ap.add_argument("--answer-words", type=int, nargs=2, default=ANSWER_WORDS, metavar=("LO", "HI"),
                    help="the think samples' answer lengths are drawn uniformly from [LO, HI]")
    ap.add_argument("--grpo-config", default=os.path.join(ROOT, "configs", "grpo-tiny.toml"),
                    help="the GRPO config whose data.template_en / template_zh the think samples use")
    args = ap.parse_args()
    if not 0 <= args.think_share <= 1:
        sys.exit(f"--think-share: expected a number in [0, 1], got {args.think_share}")
    if not 1 <= args.answer_words[0] <= args.answer_words[1]:
        sys.exit(f"--answer-words: expected 1 <= LO <= HI, got {args.answer_words[0]} {args.answer_words[1]}")
    from lwz.prompts import THINK_TEMPLATE_EN, THINK_TEMPLATE_ZH
    data = load_config(args.grpo_config).data
    t_en, t_zh = data.template_en or THINK_TEMPLATE_EN, data.template_zh or THINK_TEMPLATE_ZH
    writing, think = make_corpus(args.seed, args.docs, args.think_share, t_en, t_zh, tuple(args.answer_words))
    os.makedirs(args.out, exist_ok=True)
    for name, docs in (("writing.jsonl", writing), ("think.jsonl", think)):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {len(docs)} documents to {path}")


if __name__ == "__main__":
    main()
