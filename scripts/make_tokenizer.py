"""Trains the small bundled tokenizer of the tiny default and writes assets/tokenizer/.

    python scripts/make_tokenizer.py [--out assets/tokenizer] [--vocab 1024]

A byte-level BPE (HF `tokenizers`): any text encodes, and decode(encode(text)) == text. The
training text is produced here: the tiny prompt set, the prompt templates of lwz.prompts, and
sentences from a small grammar that look like the tiny model's thinking and answers (English
and Chinese). Token ids 0..7 are fixed:

    0 <|endoftext|>  (eos, special)      4 <answer>       (added, kept by decode)
    1 <|pad|>        (pad, special)      5 </answer>
    2 <think>        (added, kept)       6 <|user|>
    3 </think>                           7 <|assistant|>

The vocabulary is exactly --vocab ids, these 8 included. The output folder loads with
`transformers.AutoTokenizer.from_pretrained(path)` (tokenizer.json + tokenizer_config.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

SPECIAL = ["<|endoftext|>", "<|pad|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>"]
TEMPLATE_REPEATS = 200  # weight of the templates in the corpus: shorter prompts for the tiny model

EN_SUBJECTS = ["The sea", "The old man", "A small cat", "My friend", "The city", "The wind", "Our garden",
               "The train", "A young girl", "The teacher", "The river", "This gadget", "The morning",
               "The moon", "Every child", "The village", "The music", "The story", "The forest", "The day"]
EN_VERBS = ["waits for", "remembers", "sings about", "looks at", "walks past", "dreams of", "finds",
            "brings", "shows", "carries", "opens", "follows", "holds", "hears", "leaves"]
EN_OBJECTS = ["the quiet light", "a warm smile", "the first snow", "an open door", "the long road",
              "a bright morning", "the last letter", "a gentle song", "the empty station", "a small boat",
              "the golden field", "a new friend", "the evening rain", "an old photograph", "the stars"]
EN_TAILS = ["", " with care", " every day", " at night", " in the spring", " without a word",
            " once again", " for a while", " after the storm", " near the water"]
EN_PLANS = [
    "I will plan a short {form} about {t}.", "The reader is a friend, so the tone should be warm.",
    "First I set the scene, then I add one detail, and I end with a feeling.",
    "The request asks for about {n} words, so I keep it brief.",
    "I should use simple words and a clear structure.", "Let me check the length and the style.",
    "The audience is a child, so I will explain it simply.", "A strong opening line helps.",
    "I will review the draft and remove repeated words.", "The purpose is to describe {t} clearly.",
]
EN_FORMS = ["poem", "note", "story", "description", "message", "speech", "review", "diary entry"]

ZH_SENTENCES = [
    "秋天的风吹过小路，树叶慢慢落下。", "我想给朋友写几句话，说说最近的生活。", "月亮挂在天上，照亮了安静的街道。",
    "雨夜里，窗外的灯光显得格外温暖。", "海边的早晨，空气清新，浪花轻轻拍打着沙滩。", "老街上有一家小店，卖着香甜的面包。",
    "春天的花园里开满了各种颜色的花。", "这本旧书里夹着一张发黄的照片。", "火车穿过田野，远处是连绵的雪山。",
    "家乡的河水静静流淌，带走了童年的时光。", "冬天的早晨，小猫躺在窗边晒太阳。", "我先想好结构，再写开头和结尾。",
    "这段文字要简短，语气要亲切。", "读者是朋友，所以可以写得轻松一些。", "最后检查一遍字数和用词。",
]


def sentences(rng: random.Random, topics: list[str], n: int) -> list[str]:
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.55:
            s = f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} {rng.choice(EN_OBJECTS)}{rng.choice(EN_TAILS)}."
        elif kind < 0.85:
            s = rng.choice(EN_PLANS).replace("{form}", rng.choice(EN_FORMS)).replace(
                "{t}", rng.choice(topics)).replace("{n}", str(rng.choice([15, 20, 25, 30, 35])))
        else:
            s = rng.choice(ZH_SENTENCES)
        out.append(s)
    return out


def training_text(seed: int = 0) -> list[str]:
    """The deterministic corpus: prompts, templates and generated think/answer-like samples."""
    import make_prompts
    from lwz import prompts as P

    rng = random.Random(seed)
    records = make_prompts.make_prompts(seed)
    texts = []
    for r in records:
        texts.append(r["prompt"])
    for tmpl in (P.THINK_TEMPLATE_EN, P.THINK_TEMPLATE_ZH, P.NOTHINK_TEMPLATE_EN, P.NOTHINK_TEMPLATE_ZH):
        texts.extend([tmpl.replace("{question}", rng.choice(records)["prompt"]) for _ in range(TEMPLATE_REPEATS)])
    # think-then-answer samples shaped like the completions the tiny model learns to produce
    for _ in range(3000):
        think = " ".join(sentences(rng, make_prompts.TOPICS_EN, rng.randint(1, 3)))
        answer = " ".join(sentences(rng, make_prompts.TOPICS_EN, rng.randint(1, 4)))
        texts.append(f" <think>{think}</think> <answer>{answer}</answer>")
    texts.extend(sentences(rng, make_prompts.TOPICS_EN, 5000))
    return texts


def build(out: str, vocab: int, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIAL + TAGS,  # ids 0..7 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(seed), trainer=trainer)

    # The tags are ordinary added tokens (one id each, never split), not special: decoding with
    # skip_special_tokens=True drops only eos/pad and keeps <think>/<answer> text.
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        if t["content"] in TAGS:
            t["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    # name the class both transformers 4.x and 5.x know (5.x maps it to its tokenizers backend)
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tcfg = json.load(f)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for i, t in enumerate(SPECIAL + TAGS):
        assert hf.convert_tokens_to_ids(t) == i, (t, hf.convert_tokens_to_ids(t))
    print(f"wrote {out}: vocab {len(hf)}, eos {hf.eos_token_id}, pad {hf.pad_token_id}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "assets", "tokenizer"))
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    build(args.out, args.vocab, args.seed)


if __name__ == "__main__":
    main()
