"""Length targets: the request parser on realistic prompts, and where a sample's range comes from."""

import pytest
import torch

from lwz.rewards.length import LengthReward, parse_length_request

# Realistic prompts, each with the (lo, hi) word range it asks for (None: no request). Rules:
# about N -> [0.9N, 1.1N]; at most N -> [0.9N, N]; at least N -> [N, 1.1N]; a range -> [A, B].
REQUESTS = [
    # English: exact counts
    ("Write a cover letter for a junior data analyst position, approximately 150 words.", (135, 165)),
    ("Describe the water cycle for a ten-year-old in about 250 words.", (225, 275)),
    ("Could you write a 2k-word explainer on how transformers process text?", (1800, 2200)),
    ("Write two thousand words on the history of the printing press.", (1800, 2200)),
    ("I need a fifteen hundred word short story set in a lighthouse.", (1350, 1650)),
    ("Write a thousand words about your favourite city and why you would move there.", (900, 1100)),
    ("Please write a blog post of around 800 words on remote work for small teams.", (720, 880)),
    ("Write a three-hundred-word product description for a stainless steel water bottle.", (270, 330)),
    ("Give me a two and a half thousand word report on urban heat islands.", (2250, 2750)),
    ("Write a speech for my sister's wedding, roughly 600 words, warm and funny.", (540, 660)),
    # English: bounds
    ("Write a cover letter for a junior data analyst position, no more than 300 words.", (270, 300)),
    ("Write an op-ed arguing for four-day work weeks. It should be at least 1,200 words.", (1200, 1320)),
    ("Summarise the causes of the French Revolution in under 400 words.", (360, 400)),
    ("Explain quantum entanglement in fewer than 200 words, no jargon please.", (180, 200)),
    ("Write a grant proposal introduction; keep it within 500 words.", (450, 500)),
    ("Draft a LinkedIn post about our product launch, 150 words max.", (135, 150)),
    ("Write a college application essay, minimum of 650 words, about a challenge you overcame.", (650, 715)),
    ("Write a review of the novel with a word limit of 350.", (315, 350)),
    ("Write a thriller chapter of no fewer than three thousand words.", (3000, 3300)),
    ("Write an essay on climate policy of at least 1000 and no more than 1,500 words.", (1000, 1500)),
    # English: ranges
    ("Write between 800 and 1,200 words on the ethics of gene editing.", (800, 1200)),
    ("A 1,500-2,000 word feature article on the revival of vinyl records, please.", (1500, 2000)),
    ("Write a case study of 3,000 to 4,000 words on a failed startup.", (3000, 4000)),
    ("Please produce a 2-3k word literature review on sleep and memory.", (2000, 3000)),
    ("Word count: 1,200-1,500. Topic: the impact of social media on teenage friendships.", (1200, 1500)),
    # English: a length that is not the request
    ("Summarize this 3000-word article in 200 words.", (180, 220)),
    ("Here is my 1500-word essay on Orwell. Please give feedback in about 300 words.", (270, 330)),
    ("Below is a 2,500-word report on supply chains. Condense it to no more than 250 words.", (225, 250)),
    ("Read the attached 5,000-word contract and list the main risks in 400 words.", (360, 440)),
    ("My essay is about 1800 words long; rewrite the introduction in 150 words.", (135, 165)),
    ("Help me write my 650-word personal statement for medical school.", (585, 715)),
    ("Proofread my 800-word cover letter and point out any errors.", None),
    # English: per-item lengths
    ("Write 5 poems of 100 words each about the seasons.", (450, 550)),
    ("Write three short stories, each about 500 words, set in the same village.", (1350, 1650)),
    ("Give me 10 product descriptions for handmade candles, each under 50 words.", (450, 500)),
    ("Write a poem with stanzas of 40 words each.", None),
    # English: no request
    ("Tell me a story about a dragon who is afraid of heights.", None),
    ("What were the main causes of the First World War?", None),
    ("Write a haiku about autumn rain.", None),
    ("In 2023 the company grew by 40 percent; write a press release about it.", None),
    ("Write an essay about the 1000 words every child should know.", (900, 1100)),
    # more phrasings seen in real prompt sets
    ("In 300 words, describe your ideal weekend and why it matters to you.", (270, 330)),
    ("Explain recursion to a beginner programmer in one hundred words.", (90, 110)),
    ("Write a bedtime story in 500 words or fewer.", (450, 500)),
    ("Write the introduction (max 200 words) for my thesis on coral bleaching.", (180, 200)),
    ("Write an argumentative essay (min. 1500 words) on free will.", (1500, 1650)),
    ("Write a column on city cycling with a 700-word limit.", (630, 700)),
    ("Write between five hundred and eight hundred words on the history of tea.", (500, 800)),
    ("Write a blog post of three hundred and fifty words on composting.", (315, 385)),
    ("Write a 1000 word essay on urban farming with 3 sections of 300 words each.", (900, 1100)),
    ("Write a 1,000-word story about a boy who reads 100 words a day.", (900, 1100)),
    ("Here's a 1,000 word story I wrote. Can you expand it to 3,000 words?", (2700, 3300)),
    ("Summarize the following 800-word passage in one sentence.", None),
    ("Write a story about one word that changed history.", None),
    ("Write a 5-paragraph essay on the benefits of reading.", None),
    ("用不超过100个字概括这段话的主要内容。", (90, 100)),
    ("本文约3000字，请为其写一段100字的摘要。", (90, 110)),
    ("我的论文有8000字，帮我写一个300字的摘要。", (270, 330)),
    ("请以“我的母亲”为题写一篇600字左右的记叙文。", (540, 660)),
    ("写一篇3000字以上、5000字以下的调查报告。", (3000, 5000)),
    ("请在500字内回答：什么是碳中和？", (450, 500)),
    ("写一篇不少于两千五百字的武侠小说。", (2500, 2750)),
    ("写一篇2000字内容丰富的文章，介绍你的家乡。", (1800, 2200)),
    ("Write a story that is about 800 words long, set on a night train.", (720, 880)),
    ("Write a story every child will love in 500 words.", (450, 550)),
    ("Write between two thousand and three thousand words on the history of jazz.", (2000, 3000)),
    ("Write 4 tips for new gardeners, each of them about 50 words.", (180, 220)),
    ("各位同学请写一篇800字的作文，题目是《我的理想》。", (720, 880)),
    ("Cut this essay from 2,000 words to 800 words without losing the argument.", (720, 880)),
    ("Please expand my story from 500 to 1500 words, adding a second character.", (1350, 1650)),
    ("Write from 1,500 to 2,000 words on the future of public libraries.", (1500, 2000)),
    ("I have to write 2000 words on Kant's ethics for tomorrow, can you draft it?", (1800, 2200)),
    # Chinese: exact counts and numerals
    ("请写一篇关于家乡变化的散文，600字。", (540, 660)),
    ("写一篇200字左右的读后感，谈谈你对《背影》的理解。", (180, 220)),
    ("以“坚持”为题写一篇八百字的议论文。", (720, 880)),
    ("请写一篇两千字的短篇小说，主题是城市里的孤独。", (1800, 2200)),
    ("写一篇1.5万字的中篇小说开头部分的大纲和正文。", (13500, 16500)),
    ("请写一篇三千五百字的调研报告，分析本地夜市经济。", (3150, 3850)),
    ("写一篇一万字的科幻小说，讲述火星移民的第一年。", (9000, 11000)),
    ("请用约500字介绍一下二十四节气。", (450, 550)),
    # Chinese: bounds
    ("请写一篇关于家乡变化的散文，字数不少于3000字。", (3000, 3300)),
    ("写一封给老师的感谢信，200字以内。", (180, 200)),
    ("写一篇400字以上的观后感，电影是《流浪地球》。", (400, 440)),
    ("请写一篇关于人工智能伦理的文章，字数不少于3000。", (3000, 3300)),
    ("写一份产品发布会的主持词，不超过一千字。", (900, 1000)),
    ("写一篇关于环保的倡议书，字数在800以上。", (800, 880)),
    ("写一篇游记，一千多字，记录你去过最难忘的地方。", (1000, 1100)),
    # Chinese: ranges
    ("写一篇关于乡村振兴的评论文章，字数要求：1500-2000。", (1500, 2000)),
    ("请写一篇1000到1500字的演讲稿，主题是青春与责任。", (1000, 1500)),
    ("写一篇不少于1000字、不超过1500字的书评。", (1000, 1500)),
    # Chinese: not the request, and per-item
    ("请将这篇3000字的文章压缩到500字以内。", (450, 500)),
    ("下面是我写的一篇2000字的论文摘要，请用300字左右点评。", (270, 330)),
    ("写五首关于春天的小诗，每首100字左右。", (450, 550)),
    ("写三篇短文，各500字，分别介绍三种传统节日。", (1350, 1650)),
    # Chinese: no request
    ("写一首关于春天的诗。", None),
    ("请介绍一下中国古代四大发明。", None),
    ("千万不要写得太长，讲讲你对未来的看法。", None),
]


@pytest.mark.parametrize("prompt,want", REQUESTS)
def test_parse_length_request(prompt, want):
    assert parse_length_request(prompt) == want


def test_table_covers_both_languages_and_no_request():
    zh = [p for p, _ in REQUESTS if any("\u4e00" <= c <= "\u9fff" for c in p)]
    assert len(REQUESTS) >= 60 and len(zh) >= 20
    assert sum(w is None for _, w in REQUESTS) >= 8


# ------------------------------------------------------------------------- where the range comes from


def test_record_length_range_beats_the_request_in_the_text():
    rew = LengthReward(max_words=10000, default_range=(400, 800), range_predictor=lambda p: (50, 60))
    q = "Write a 2,000-word essay on climate change."
    # the dataset's label wins over the 2,000 in the text, the parse over predictor and default
    assert rew.target_range(q, {"length_range": (3000, 4000), "question": q}) == (3000, 4000)
    assert rew.target_range(q, {"length_range": None, "question": q}) == (1800, 2200)
    assert rew.target_range("Tell me about tea.", {"question": "Tell me about tea."}) == (50, 60)
    # a templated prompt is not parsed when the raw question is in meta
    assert rew.target_range("<preamble> Write 100 words", {"question": "Tell me about tea."}) == (50, 60)
    no_predictor = LengthReward(max_words=10000, default_range=(400, 800))
    assert no_predictor.target_range("Tell me about tea.", {}) == (400, 800)
    assert no_predictor.target_range("请写一篇两千字的游记。", {}) == (1800, 2200)
    assert LengthReward(parse_prompt=False, default_range=(400, 800)).target_range(q, {}) == (400, 800)
    # and the reward follows: 2,000 words is on target for the text's request, not for the label
    answer = "word " * 2000
    out = rew([q, q], [answer, answer], [{"length_range": (3000, 4000), "question": q}, {"question": q}])
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([2000 / 3000, 1.0])
