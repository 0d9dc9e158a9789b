"""Format reward: think/answer structure, and a near-duplicate penalty that is exactly 0 for
ordinary prose of any length (so it never acts as a length penalty inside a group)."""

import random
import re
import time

import pytest
import torch

from lwz.rewards import group_advantages
from lwz.rewards.format import (FormatReward, format_reward, near_duplicate_share,
                                near_duplicate_units, split_units)
from lwz.rewards.length import count_words

# ------------------------------------------------------------------------- realistic prose
# Sentences are assembled from hand-written parts (opening phrase, subject, action, closing
# clause), so stock phrases ("at the end of the", "in the middle of") recur across paragraphs as
# in real writing, but no two sentences share three of their four parts.

EN_OPEN = [
    "At the end of the day", "In the middle of the night", "By the time the rain stopped",
    "Early the next morning", "For most of the year", "On the other side of the river",
    "Later that week", "As the season turned", "Whenever the market opened",
    "After the long winter", "In the years that followed", "Before anyone could answer",
    "At the start of the harvest", "Once the roads were clear", "During the first snow",
    "In the middle of the afternoon", "When the letters finally came", "Long after the fair ended",
    "On the last Sunday of the month", "While the town was still asleep", "Every spring",
    "Just before the bridge was finished", "For the first time in years", "Not long after that",
    "In the quiet hour before supper", "By the end of the summer", "Some weeks later",
    "At the far end of the valley", "Throughout the autumn", "On a cold evening in March",
]
EN_SUBJ = [
    "the old miller", "his youngest daughter", "a travelling merchant", "the village council",
    "the schoolteacher", "two fishermen from the coast", "the baker's apprentice",
    "a stranger in a grey coat", "the mayor's clerk", "the children from the square",
    "the widow who kept bees", "a doctor from the city", "the ferryman", "the priest",
    "a group of students", "the blacksmith and his wife", "the innkeeper", "a young soldier",
    "the postmistress", "her brother Tomas", "the shepherd on the hill", "a painter from abroad",
    "the night watchman", "the twins", "an engineer from the railway company",
]
EN_VERB = [
    "repaired the broken wheel of the mill", "counted the coins left in the drawer",
    "walked along the edge of the harbour", "wrote a long letter to the capital",
    "argued about the price of grain", "planted a row of apple trees behind the church",
    "carried lanterns up the narrow stairs", "sold the last of the winter wool",
    "opened a small shop near the station", "mended the nets that the storm had torn",
    "read the newspaper aloud to the neighbours", "built a wall of rough grey stone",
    "collected herbs in the forest", "painted the shutters a pale shade of blue",
    "fixed the clock above the town hall", "waited for the train from the north",
    "taught the younger children to swim", "cleared the snow from the main road",
    "kept careful records of every birth", "baked bread for half the village",
    "sketched the boats in the harbour", "climbed the hill to watch the ships",
    "buried the letters under the oak", "measured the depth of the well",
    "traded salt for leather with the traders", "tuned the piano in the schoolroom",
    "chased the goats out of the garden", "listened to the stories of the sailors",
]
EN_TAIL = [
    "while the bells rang in the distance", "because nobody else would do it",
    "and nobody said a word", "as if nothing had happened", "in the middle of the square",
    "at the end of the road", "without looking back", "with a patience that surprised everyone",
    "although the weather was against them", "until the light began to fade",
    "so that the others could rest", "before the guests arrived", "despite the rumours",
    "with more care than usual", "in spite of the cold", "as the tide went out",
    "for reasons no one understood", "while the dogs slept by the fire",
    "and the whole street came to watch", "long before anyone noticed",
]
ZH_OPEN = [
    "到了傍晚", "第二天一早", "在村子的另一头", "那年冬天", "雨停了以后",
    "集市开张的时候", "过了几个星期", "天还没亮", "秋收刚开始", "在河的对岸",
    "春节前后", "就在桥修好之前", "很多年以后", "那个夏天快结束的时候",
    "每逢初一十五", "在山脚下的小院里", "临近中午", "第一场雪落下时",
    "吃过晚饭", "学校放假以后",
]
ZH_SUBJ = [
    "老磨坊主", "他的小女儿", "一个外地来的商人", "村里的老支书",
    "学校的王老师", "两个渔民", "面包房的学徒", "穿灰大衣的陌生人",
    "镇长的秘书", "广场上的孩子们", "养蜂的寡妇", "城里来的医生", "摆渡的老人",
    "几个大学生", "铁匠夫妇", "客栈老板", "邮局的李阿姨", "山坡上的牧羊人",
    "从南方来的画家", "守夜的更夫",
]
ZH_VERB = [
    "修好了磨坊的旧水车", "数了数抽屉里剩下的铜钱", "沿着码头慢慢地走",
    "给省城写了一封长信", "为粮食的价钱争了半天", "在祠堂后面种了一排苹果树",
    "提着灯笼爬上窄窄的楼梯", "卖掉了最后一批羊毛", "在车站旁边开了一家小店",
    "补好了被风暴撕破的渔网", "给邻居们念报纸上的新闻", "砌了一道青石墙",
    "到林子里采草药", "把窗板漆成了淡蓝色", "修好了镇政府楼顶的大钟",
    "等着北边开来的火车", "教小孩子们游泳", "扫干净了大路上的积雪",
    "认真记下每一户的收成", "替半个村子烤了面包", "在院子里画港口的渔船",
    "爬上山去看远处的船",
]
ZH_TAIL = [
    "远处的钟声一下一下地响着", "因为别人都不愿意去做", "谁也没有说话",
    "好像什么事都没有发生过", "街上的人都跑出来看热闹", "天色渐渐暗了下来",
    "连头也没有回", "大家都觉得有些意外", "虽然天气一点也不好",
    "狗在火炉边睡得正香", "比平时更加仔细", "尽管外面的传言越来越多",
    "潮水正一点点退去", "没有人知道这是为什么", "客人们还没有到",
]




def _sentences(lang, seed):
    banks = (EN_OPEN, EN_SUBJ, EN_VERB, EN_TAIL) if lang == "en" else (ZH_OPEN, ZH_SUBJ, ZH_VERB, ZH_TAIL)
    rng = random.Random(seed)
    used = set()
    while True:
        c = tuple(rng.randrange(len(b)) for b in banks)
        triples = [tuple((k, c[k]) for k in range(4) if k != skip) for skip in range(4)]
        if any(t in used for t in triples):
            continue
        used.update(triples)
        o, s, v, t = (b[i] for b, i in zip(banks, c))
        yield f"{o}, {s} {v} {t}." if lang == "en" else f"{o}，{s}{v}，{t}。"


def paragraphs(n_words, lang="en", seed=0):
    """Distinct paragraphs of 3-6 sentences, together at least `n_words` words (count_words)."""
    rng = random.Random(seed + 1)
    sents = _sentences(lang, seed)
    out, n = [], 0
    while n < n_words:
        p = ("" if lang == "zh" else " ").join(next(sents) for _ in range(rng.randint(3, 6)))
        out.append(p)
        n += count_words(p)
    return out


def prose(n_words, lang="en", seed=0):
    return "\n\n".join(paragraphs(n_words, lang, seed))


def wrap(answer, think="Plan: an opening scene, the village, the letters."):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def reword(paragraph, n_changes, seed=0):
    """`paragraph` with `n_changes` of its words (4+ letters) swapped for other words: the kind
    of light rewording a policy uses to pad an answer with near-copies."""
    rng = random.Random(seed)
    words = paragraph.split(" ")
    spots = rng.sample([i for i, w in enumerate(words) if len(w.strip(",.")) >= 4], n_changes)
    for i in spots:
        words[i] = rng.choice(["gladly", "vivid", "harbour", "lantern", "meadow", "sturdy"])
    return " ".join(words)


def reword_zh(paragraph, n_changes, seed=0):
    rng = random.Random(seed)
    chars = list(paragraph)
    for i in rng.sample([i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"], n_changes):
        chars[i] = rng.choice("山水风云花草")
    return "".join(chars)


# ------------------------------------------------------------------------- clean prose: exactly 1


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_clean_prose_scores_exactly_one_at_every_length(lang):
    scores = []
    for n in (300, 1000, 3000, 10000):
        answer = prose(n, lang)
        assert count_words(answer) >= n
        assert near_duplicate_units(answer) == []
        scores.append(format_reward(wrap(answer)))
    assert scores == [1.0, 1.0, 1.0, 1.0]
    # the same prose as one long paragraph is compared sentence by sentence: still clean
    one_paragraph = ("" if lang == "zh" else " ").join(paragraphs(3000, lang, seed=3))
    assert len(split_units(one_paragraph)) > 100
    assert format_reward(wrap(one_paragraph)) == 1.0


def test_group_advantages_rank_on_target_long_answers_first():
    # The example: a group of four answers of 300/1k/3k/10k words whose length rewards
    # are [0.2, 0.6, 1, 1]. Measured on these answers, the old 4-gram/sentence repetition penalty
    # gave format rewards [0.961, 0.849, 0.776, 0.692] and total advantages
    # [-0.037, -0.003, +0.232, -0.192]: the on-target 10k answer ranked last but one. With the
    # near-duplicate penalty the format rewards are all 1.0, and the advantages are
    # [-0.754, -0.151, +0.452, +0.452].
    answers = [prose(n, "en") for n in (300, 1000, 3000, 10000)]
    fmt = FormatReward()(["Write a story."] * 4, answers, [{"response": wrap(a)} for a in answers])
    assert fmt.tolist() == [1.0, 1.0, 1.0, 1.0]
    length = torch.tensor([0.2, 0.6, 1.0, 1.0])
    adv = group_advantages(torch.stack([length, fmt]), group_size=4)
    assert adv[3] == adv[2] > adv[1] > adv[0]
    # the format reward adds nothing to the ranking: each advantage is half the length one
    assert adv.tolist() == pytest.approx((group_advantages(length, 4) / 2).tolist(), abs=1e-6)


# ------------------------------------------------------------------------- padding is penalised


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_copies_of_one_block_score_one_over_k(lang):
    block = "\n\n".join(paragraphs(150, lang, seed=5))
    for k in (1, 2, 3, 5, 10):
        assert format_reward(wrap("\n\n".join([block] * k))) == pytest.approx(1 / k)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_penalty_grows_with_the_number_of_copies(lang):
    paras = paragraphs(400, lang, seed=7)
    scores = [format_reward(wrap("\n\n".join(paras + [paras[1]] * k))) for k in range(6)]
    assert scores[0] == 1.0
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[-1] < 0.6


def test_near_copies_differing_in_a_few_words_are_penalised():
    paras = paragraphs(400, "en", seed=11)
    padded = paras + [reword(paras[0], n, seed=n) for n in (2, 3, 4)]
    assert all(p != paras[0] for p in padded[len(paras):])
    units = split_units("\n\n".join(padded))
    assert near_duplicate_units("\n\n".join(padded)) == [len(paras), len(paras) + 1, len(paras) + 2]
    assert units[len(paras)] == padded[len(paras)]
    assert format_reward(wrap("\n\n".join(padded))) < 0.75
    zh = paragraphs(600, "zh", seed=11)
    zh_padded = zh + [reword_zh(zh[1], n, seed=n) for n in (2, 4)]
    assert near_duplicate_units("\n\n".join(zh_padded)) == [len(zh), len(zh) + 1]


def _brute_force_near_duplicates(units, similarity=0.6, k=3, min_tokens=12):
    """Reference: Jaccard of k-token shingle sets over all pairs of units."""
    sets = []
    for u in units:
        toks = re.findall(r"[\u4e00-\u9fff]|[^\W\d_]+|\d+", u.lower())
        shingles = {tuple(toks[i:i + k]) for i in range(len(toks) - k + 1)}
        sets.append(shingles if len(toks) >= min_tokens else None)
    return [i for i, a in enumerate(sets) if a and any(
        b and len(a & b) / len(a | b) >= similarity for b in sets[:i])]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_detector_matches_all_pairs_reference(lang):
    # rewordings from light to heavy put many pairs on both sides of the threshold
    paras = paragraphs(800, lang, seed=29)
    change = reword if lang == "en" else reword_zh
    mixed = list(paras)
    for n in range(1, 16):
        mixed.insert(2 * n, change(paras[n % len(paras)], n, seed=n))
    answer = "\n\n".join(mixed)
    got = near_duplicate_units(answer)
    assert got == _brute_force_near_duplicates(split_units(answer))
    assert 3 <= len(got) < 15          # some rewordings are near-copies, the heaviest are not


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_padding_inside_one_long_paragraph_is_penalised(lang):
    sep = "" if lang == "zh" else " "
    clean = sep.join(paragraphs(300, lang, seed=13))
    loop = sep.join(paragraphs(60, lang, seed=14))
    answer = clean + sep + sep.join([loop] * 6)          # no line breaks: a generation loop
    assert "\n" not in answer
    share = near_duplicate_share(answer)
    assert share == pytest.approx(5 * count_words(loop) / count_words(answer), rel=0.05)
    assert format_reward(wrap(answer)) < 0.6


def test_short_lines_repeated_are_not_penalised():
    paras = paragraphs(1200, "en", seed=17)
    parts = []
    for i, p in enumerate(paras):
        parts += [f"## Chapter {i + 1}", "---", p, "- Keep the lid closed.", "**Note:** see above.", ""]
    answer = "\n".join(parts)
    assert near_duplicate_units(answer) == []
    assert format_reward(wrap(answer)) == 1.0
    checklist = "\n".join(f"- Check the {x} before you leave" for x in
                          ["oil level", "tyre pressure", "brake fluid", "coolant", "wipers"] * 3)
    assert format_reward(wrap(paras[0] + "\n" + checklist)) == 1.0
    zh = paragraphs(1000, "zh", seed=17)
    zh_answer = "\n".join(f"第{i + 1}章\n{p}\n（未完待续）" for i, p in enumerate(zh))
    assert format_reward(wrap(zh_answer)) == 1.0


def test_broken_structure_scores_zero_even_for_clean_prose():
    answer = prose(1000)
    assert format_reward(f"<think>plan</think>{answer}") == 0.0
    assert format_reward(f"<answer>{answer}</answer>") == 0.0
    assert format_reward(f"<think>plan</think><answer>{answer}</answer><answer>more</answer>") == 0.0


def test_format_reward_options():
    padded = "\n\n".join([prose(200, seed=19)] * 2)
    assert format_reward(wrap(padded)) == pytest.approx(0.5)
    assert format_reward(wrap(padded), penalty_weight=0.5) == pytest.approx(0.75)
    assert format_reward(wrap(padded), penalty_weight=3.0) == 0.0
    assert format_reward(wrap(padded), penalty_weight=0.0) == 1.0
    rew = FormatReward(penalty_weight=0.5)
    assert rew(["p"], [None], [{"response": wrap(padded)}]).tolist() == pytest.approx([0.75])
    with pytest.raises(ValueError, match="format_repetition_weight"):
        FormatReward(penalty_weight=-1.0)
    with pytest.raises(ValueError, match="similarity"):
        FormatReward(similarity=0.0)


def test_scoring_a_10k_word_answer_is_fast():
    # a generous bound that still fails for work quadratic in the number of units
    text = wrap(" ".join(paragraphs(10000, "en", seed=23)))   # one paragraph: ~500 sentence units
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        format_reward(text)
        best = min(best, time.process_time() - t)
    assert best < 0.15
