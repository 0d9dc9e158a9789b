"""Rule-based rewards (length, format) and group advantages."""

import math

import pytest
import torch

from lwz.rewards import compute_rewards, group_advantages
from lwz.rewards.format import FormatReward, format_reward, near_duplicate_share, split_response
from lwz.rewards.length import LengthReward, count_words, length_reward, parse_length_request

# ------------------------------------------------------------------------------------ length


@pytest.mark.parametrize("text,n", [
    ("", 0),
    (None, 0),
    ("Hello, world!", 2),
    ("It's 2024 and GPT-4 rocks.", 5),      # It, s, and, GPT, rocks; digits are not words
    ("我爱北京天安门", 7),
    ("我爱 Python 和 C++ 编程。", 7),        # 5 CJK chars + Python, C
    ("混合 mixed text 中文，标点！", 8),      # 6 CJK chars + 2 words; punctuation not counted
])
def test_count_words(text, n):
    assert count_words(text) == n


@pytest.mark.parametrize("n,lo,hi,mx,want", [
    (2000, 1800, 2200, 10000, 1.0),
    (1800, 1800, 2200, 10000, 1.0),
    (2200, 1800, 2200, 10000, 1.0),
    (900, 1800, 2200, 10000, 0.5),
    (0, 1800, 2200, 10000, 0.0),
    (6100, 1800, 2200, 10000, 0.5),      # (10000-6100)/(10000-2200)
    (10000, 1800, 2200, 10000, 0.0),
    (12000, 1800, 2200, 10000, 0.0),     # floored at 0
    (50, 0, 100, 1000, 1.0),             # lower = 0
    (550, 0, 100, 1000, 0.5),
    (250, 100, 200, 200, 0.0),           # upper == max_words: above the range gives 0
    (300, 400, 800, 12000, 0.75),
])
def test_length_reward_table(n, lo, hi, mx, want):
    assert length_reward(n, lo, hi, mx) == pytest.approx(want)


PHRASES = [
    # the paper's examples
    ("Write a 2,000-word essay on climate change.", (1800, 2200)),
    ("Write an essay of no more than 2,000 words.", (1800, 2000)),
    ("Write an essay of at least 2,000 words.", (2000, 2200)),
    # English
    ("Write a story in 2000 words.", (1800, 2200)),
    ("Give me a 500 word summary.", (450, 550)),
    ("Keep it to at most 300 words.", (270, 300)),
    ("The report should be no less than 1000 words.", (1000, 1100)),
    ("No fewer than 800 words, please.", (800, 880)),
    ("Write up to 1000 words.", (900, 1000)),
    ("A blog post under 500 words.", (450, 500)),
    ("Write between 1500 and 2000 words on AI.", (1500, 2000)),
    ("A 1500-2000 words essay.", (1500, 2000)),
    ("Write 1,500 to 2,000 words.", (1500, 2000)),
    ("Write about 800 words about your summer.", (720, 880)),
    ("Around 1200 words would be great.", (1080, 1320)),
    ("approximately 600 words", (540, 660)),
    ("A 2k-word explainer.", (1800, 2200)),
    ("Write 1000 words or less.", (900, 1000)),
    ("An article of 3000 words or more.", (3000, 3300)),
    ("It must not exceed 600 words.", (540, 600)),
    ("Write less than 400 words.", (360, 400)),
    ("A minimum of 1200 words.", (1200, 1320)),
    ("Write 500+ words.", (500, 550)),
    # Chinese
    ("写一篇2000字的文章", (1800, 2200)),
    ("请写一篇2000字左右的作文", (1800, 2200)),
    ("字数不少于2000字", (2000, 2200)),
    ("至少2000字", (2000, 2200)),
    ("不超过2000字", (1800, 2000)),
    ("请在2000字以内完成", (1800, 2000)),
    ("1500-2000字", (1500, 2000)),
    ("写一篇1500到2000字的小说", (1500, 2000)),
    ("篇幅1500至2000字", (1500, 2000)),
    ("约3000字", (2700, 3300)),
    ("3000字以上的报告", (3000, 3300)),
    ("最多500字", (450, 500)),
    ("写一篇1万字的小说", (9000, 11000)),
    ("写一篇2000字内容丰富的文章", (1800, 2200)),
    # both bounds stated
    ("At least 1000 words and no more than 1,500 words.", (1000, 1500)),
    ("不少于1000字，不超过1500字", (1000, 1500)),
    # no request
    ("Tell me a story about a dragon.", None),
    ("List 5 key ideas of stoicism.", None),
    ("写一首关于春天的诗", None),
    ("In 2023 the company grew.", None),
]


@pytest.mark.parametrize("prompt,want", PHRASES)
def test_parse_length_request(prompt, want):
    assert parse_length_request(prompt) == want


def test_phrase_table_is_big_enough():
    assert sum(w is not None for _, w in PHRASES) >= 20
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in p) and w is not None for p, w in PHRASES) >= 10


def test_length_reward_module_sources_and_broken():
    rew = LengthReward(max_words=1000, default_range=(10, 20), on_broken="zero")
    ans10 = " ".join(["word"] * 10)
    prompts = ["Write about 10 words.", "Write something.", "Write something.", "Write something."]
    answers = [ans10, ans10, ans10, None]
    meta = [{}, {"length_range": (20, 40)}, {}, {"response": ans10}]
    out = rew(prompts, answers, meta)
    assert out.dtype == torch.float32 and out.shape == (4,)
    # [9, 11] from prompt -> 1; meta [20, 40] -> 0.5; default [10, 20] -> 1; broken -> 0
    assert out.tolist() == pytest.approx([1.0, 0.5, 1.0, 0.0])

    rew2 = LengthReward(max_words=1000, default_range=(20, 30), on_broken="whole_response")
    assert rew2(["x"], [None], [{"response": ans10}]).tolist() == pytest.approx([0.5])

    # predictor is used when neither the prompt nor meta gives a range
    rew3 = LengthReward(max_words=1000, default_range=(1, 2), range_predictor=lambda p: (40, 50))
    assert rew3(["Write.", "Write 10 words."], [ans10, ans10], [{}, {}]).tolist() == \
        pytest.approx([0.25, 1.0])
    # meta["question"] is parsed in preference to the templated prompt
    assert rew3.target_range("<preamble> ...", {"question": "at least 100 words"}) == (100, 110)

    with pytest.raises(ValueError, match="on_broken"):
        LengthReward(on_broken="nope")


# ------------------------------------------------------------------------------------ format

PARA = ("The river ran quietly past the mill, carrying leaves from the autumn hills. "
        "Children waited on the bridge to watch the boats drift toward the harbour. "
        "Later that evening the lamps were lit one by one along the narrow streets.")
VARIED = [PARA,
          "A merchant from the south arrived with spices, silk and rumours of war. "
          "He spoke of distant cities where towers reached above the clouds. "
          "Nobody in the village believed him, yet everyone listened until midnight.",
          "By winter the mill had stopped, its wheel locked in thick grey ice. "
          "The miller's daughter kept accounts by candlelight and dreamed of the sea. "
          "In spring she left on the first boat, taking only a small wooden box.",
          "Years passed before anyone heard from her again, and then only by letter. "
          "She wrote of storms, of islands without names, of friends lost and found. "
          "The letters were read aloud in the square every Sunday after the market."]


def wrap(answer, think="plan the essay"):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def test_format_correct():
    assert format_reward(wrap(PARA)) == pytest.approx(1.0)
    assert format_reward("  \n" + wrap("\n\n".join(VARIED)) + "\n ") == 1.0
    assert split_response(wrap(" hi there ")) == ("plan the essay", "hi there")


@pytest.mark.parametrize("text", [
    "just an answer with no tags",
    "<answer>only an answer</answer>",
    "<think>only thinking</think>",
    "<think>t</think> some text",
    "<think>t</think><answer>a</answer><answer>b</answer>",          # two answers
    "<think>t</think><think>u</think><answer>a</answer>",            # two thinks
    "Sure! <think>t</think><answer>a</answer>",                      # text before
    "<think>t</think> so: <answer>a</answer>",                       # text between
    "<think>t</think><answer>a</answer> hope this helps",            # text after
    "<answer>a</answer><think>t</think>",                            # misordered
    "<think>t<answer>a</answer></think>",                            # nested
    "<think>t</think><answer>a<think>x</think></answer>",            # nested inside answer
    "<think>t</think><answer>a",                                     # unclosed answer
    "<think>t</think><answer>   </answer>",                          # empty answer
    "<think>t</answer><answer>a</think>",                            # mismatched closers
])
def test_format_broken(text):
    assert format_reward(text) == 0.0


def test_format_unclosed_when_stopped():
    text = "<think>t</think><answer>a short answer here"
    assert format_reward(text) == 0.0
    assert format_reward(text, allow_unclosed=True) == pytest.approx(1.0)
    rew = FormatReward(accept_unclosed=True)
    out = rew(["p", "p"], [None, None], [{"response": text, "stopped_at_close": True},
                                         {"response": text, "stopped_at_close": False}])
    assert out.tolist() == pytest.approx([1.0, 0.0])


def test_format_copy_paste_padding_scores_lower():
    varied = "\n\n".join(VARIED)
    padded = "\n\n".join([PARA] * 4)
    assert abs(count_words(varied) - count_words(padded)) <= 8   # same length
    s_var, s_pad = format_reward(wrap(varied)), format_reward(wrap(padded))
    assert s_var == 1.0
    assert s_pad == pytest.approx(0.25)      # 1/k for k copies
    # penalty grows with the number of copies, on separate lines or run together in one line
    p2 = near_duplicate_share("\n".join([PARA] * 2))
    p8 = near_duplicate_share(" ".join([PARA] * 8))
    assert p2 == pytest.approx(0.5) and p8 == pytest.approx(7 / 8)
    # Chinese: each character is a token
    zh = "春天来了，花开了，鸟儿在树上唱歌。小河里的冰融化了，孩子们在河边奔跑。"
    assert near_duplicate_share(zh) == 0.0
    assert near_duplicate_share("\n".join([zh] * 5)) == pytest.approx(0.8)


def test_format_module():
    rew = FormatReward()
    meta = [{"response": wrap(PARA)}, {"response": "no tags"}, {}]
    out = rew(["p"] * 3, [PARA, None, None], meta)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([1.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------ advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 10.0]])
    adv = group_advantages(r, group_size=4, eps=0.0)
    s1 = math.sqrt(1.25)           # population std of 1,2,3,4
    s2 = math.sqrt(18.75)          # of 0,0,0,10 (mean 2.5)
    want = [-1.5 / s1, -0.5 / s1, 0.5 / s1, 1.5 / s1, -2.5 / s2, -2.5 / s2, -2.5 / s2, 7.5 / s2]
    assert adv.tolist() == pytest.approx(want, rel=1e-6)
    assert adv.dtype == torch.float32


def test_group_advantages_zero_variance():
    r = torch.tensor([[0.3, 0.3, 0.3, 1.0, 2.0, 3.0],
                      [0.1, 0.1, 0.1, 5.0, 5.0, 5.0]])
    adv = group_advantages(r, group_size=3)
    assert torch.isfinite(adv).all()
    # group 0: both rewards constant -> 0; group 1: only reward 0 contributes (halved)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    s = math.sqrt(2 / 3)
    assert adv[3:].tolist() == pytest.approx([-0.5 / s, 0.0, 0.5 / s], rel=1e-5)
    assert group_advantages(torch.full((2, 4), 7.0), 2, std_norm=False).abs().max() == 0


def test_group_advantages_k1_is_grpo():
    torch.manual_seed(0)
    r = torch.rand(12)
    adv = group_advantages(r[None], group_size=4)
    g = r.view(3, 4)
    ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)
    assert torch.allclose(adv, ref, atol=1e-6)
    assert torch.allclose(group_advantages(r, 4), ref, atol=1e-6)   # [B] accepted as K=1


def test_group_advantages_averages_advantages_not_rewards():
    # reward 1 has a large scale, reward 2 a small one: both must count equally
    r = torch.tensor([[0.0, 100.0, 0.0, 100.0],
                      [0.1, 0.0, 0.1, 0.0]])
    adv = group_advantages(r, group_size=2, eps=0.0)
    assert adv.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-6)
    w = group_advantages(r, group_size=2, weights=[3.0, 1.0], eps=0.0)
    assert w.tolist() == pytest.approx([-0.5, 0.5, -0.5, 0.5], abs=1e-6)


def test_group_advantages_dr_grpo_and_errors():
    r = torch.tensor([[1.0, 3.0, 2.0, 2.0]])
    assert group_advantages(r, 2, std_norm=False).tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(1, 5), 2)
    with pytest.raises(ValueError, match="weights"):
        group_advantages(torch.zeros(2, 4), 2, weights=[1.0])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[float("nan"), 1.0]]), 2)


def test_compute_rewards_stacks():
    prompts = ["Write about 10 words."] * 2
    ans = " ".join(["w"] * 10)
    answers = [ans, None]
    meta = [{"response": wrap(ans)}, {"response": "broken"}]
    R = compute_rewards([LengthReward(max_words=100), FormatReward()], prompts, answers, meta)
    assert R.shape == (2, 2) and R.dtype == torch.float32
    assert R[:, 1].tolist() == [0.0, 0.0]
    assert R[0, 0] == 1.0
