"""Bundled tokenizer, prompt templates, answer extraction, prompt JSONL reader and cursor."""

import json
import os
import subprocess
import sys

import pytest

from lwz import prompts as P
from lwz.tokenizer import TokenizerError, decode, encode, eos_id, load_tokenizer, pad_id, single_token_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = os.path.join(ROOT, "assets", "tokenizer")
DATA = os.path.join(ROOT, "data", "tiny_prompts.jsonl")
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK)


# ------------------------------------------------------------------ tokenizer


def test_autotokenizer_loads_bundled_folder():
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TOK, local_files_only=True)
    assert len(t) == 1024
    assert t.eos_token == "<|endoftext|>" and t.eos_token_id == 0
    assert t.pad_token == "<|pad|>" and t.pad_token_id == 1
    with open(os.path.join(TOK, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_special_ids(tok):
    assert eos_id(tok) == 0 and pad_id(tok) == 1
    for i, t in enumerate(["<|endoftext|>", "<|pad|>"] + TAGS):
        assert encode(tok, t) == [i]
        assert single_token_id(tok, t) == i
    assert single_token_id(tok, "hello world, this is long") is None


@pytest.mark.parametrize("text", [
    "Write a short poem about the sea at night.",
    "  leading and trailing spaces  \n\nnew lines\ttabs",
    " <think>plan: warm tone</think> <answer>The sea waits.</answer>",
    "<|user|>: hi <|assistant|>: <think></think><answer>ok</answer><|endoftext|>",
    "写一段关于秋天的短文，不少于40字。月亮挂在天上。",
    "emoji 🙂 and accents: café, naïve; symbols <>{}[]|\\",
    "",
])
def test_round_trip(tok, text):
    ids = encode(tok, text)
    assert all(0 <= i < 1024 for i in ids)
    assert decode(tok, ids) == text


def test_tags_are_single_ids_inside_text(tok):
    ids = encode(tok, "a<answer>b</answer>c<think>d</think>")
    for t in ["<answer>", "</answer>", "<think>", "</think>"]:
        assert single_token_id(tok, t) in ids
    # no BOS/EOS added by encode
    assert eos_id(tok) not in encode(tok, "hello")


def test_skip_special_keeps_tags(tok):
    ids = encode(tok, "<think>x</think><answer>y</answer>") + [eos_id(tok), pad_id(tok)]
    assert decode(tok, ids, skip_special_tokens=True) == "<think>x</think><answer>y</answer>"
    assert decode(tok, ids).endswith("<|endoftext|><|pad|>")


def test_missing_tokenizer_folder_one_line(tmp_path):
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(str(tmp_path / "nope"))
    msg = str(ei.value)
    assert "\n" not in msg and "nope" in msg and "not found" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(str(tmp_path / "empty"))
    assert "no tokenizer files" in str(ei.value) and "\n" not in str(ei.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(str(bad))
    assert "\n" not in str(ei.value) and "bad" in str(ei.value)


def test_make_tokenizer_reproduces_committed(tmp_path):
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tokenizer.py"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(TOK, name), "rb") as a, open(out / name, "rb") as b:
            assert a.read() == b.read(), name


def test_prompts_fit_tiny_budget(tok):
    recs = P.load_prompts(DATA)
    n = max(len(encode(tok, P.build_prompt(r.prompt))) for r in recs)
    assert n < 320  # the template is part of the tokenizer's training text


# ------------------------------------------------------------------ templates


def test_template_en_zh_choice():
    en = P.build_prompt("Write a poem about the sea.")
    assert en.endswith("<|user|>: Write a poem about the sea. <|assistant|>:")
    assert "<think>" in en and "<answer>" in en and "  <|user|>" in en
    zh = P.build_prompt("写一首关于秋天的小诗")
    assert zh.endswith("<|用户|>: 写一首关于秋天的小诗 <|助手|>:")
    assert "<think>" in zh and "<|user|>" not in zh
    # one ideograph in an otherwise English question selects Chinese
    assert P.build_prompt("Explain the word 秋").endswith("<|助手|>:")
    # Japanese kana only / Korean: not in [\u4e00-\u9fff]
    assert P.build_prompt("ひらがな").endswith("<|assistant|>:")


def test_nothink_template():
    p = P.build_prompt("Write a note.", think=False)
    assert "<think>" not in p and "<answer>" in p and p.endswith("<|user|>: Write a note. <|assistant|>:")
    z = P.build_prompt("写一张便条", think=False)
    assert "<think>" not in z and z.endswith("<|用户|>: 写一张便条 <|助手|>:")


def test_template_override():
    assert P.build_prompt("hi {x}", template_en="Q: {question} A:") == "Q: hi {x} A:"
    assert P.build_prompt("你好", template_en="Q: {question}", template_zh="问：{question} 答：") == "问：你好 答："
    with pytest.raises(ValueError):
        P.build_prompt("hi", template_en="no placeholder")


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text,stopped,expected", [
    ("<think>plan</think> <answer>The poem.</answer>", False, "The poem."),
    ("<think>plan</think> <answer>\n  The poem.\n\n</answer>trailing", False, "The poem."),
    ("<think>plan</think> <answer>cut off by the length cap", False, None),
    ("<think>plan</think> <answer>stopped at the stop string ", True, "stopped at the stop string"),
    ("no tags at all", False, None),
    ("no tags at all", True, None),
    ("</answer> only a close tag", True, None),
    ("<answer>first</answer> <answer>second</answer>", False, "first"),
    ("<answer>first</answer> <answer>second", True, "first"),
    ("<answer></answer>", False, ""),
    ("<answer>a <answer> b</answer>", False, "a <answer> b"),
    ("<answer>多行\n答案</answer>", False, "多行\n答案"),
])
def test_extract_answer(text, stopped, expected):
    assert P.extract_answer(text, stopped_at_close=stopped) == expected
    if not stopped:  # agrees with the authors' regex
        import re
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert (m.group(1).strip() if m else None) == expected


def test_extract_think():
    assert P.extract_think("<think> a plan </think><answer>x</answer>") == "a plan"
    assert P.extract_think("<answer>x</answer>") is None
    assert P.extract_think("<think>unfinished") is None
    assert P.extract_think("<think>unfinished", stopped_at_close=True) == "unfinished"


# ------------------------------------------------------------------ dataset


def _jsonl(tmp_path, lines, name="p.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


def test_bundled_prompt_file():
    recs = P.load_prompts(DATA)
    assert 250 <= len(recs) <= 400
    assert len({r.prompt for r in recs}) == len(recs)
    assert all(r.length_range is not None and 0 <= r.length_range[0] <= r.length_range[1] <= 60 for r in recs)
    zh = sum(P.is_chinese(r.prompt) for r in recs)
    assert 0.05 * len(recs) <= zh <= 0.2 * len(recs)
    explicit = sum(any(c.isdigit() for c in r.prompt) for r in recs)
    assert 0.25 * len(recs) <= explicit <= 0.45 * len(recs)
    assert recs[0].line == 1


def test_make_prompts_is_deterministic(tmp_path):
    out = tmp_path / "p.jsonl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_prompts.py"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    with open(DATA, "rb") as f:
        assert out.read_bytes() == f.read()


def test_good_file(tmp_path):
    p = _jsonl(tmp_path, [
        '{"prompt": "Write a poem.", "length_range": [20, 30]}',
        "",
        '{"prompt": "写一段话", "extra": 1}',
        '{"prompt": "Zero range", "length_range": [0, 0]}',
    ])
    recs = P.load_prompts(p)
    assert [r.prompt for r in recs] == ["Write a poem.", "写一段话", "Zero range"]
    assert recs[0].length_range == (20, 30) and recs[1].length_range is None and recs[2].length_range == (0, 0)
    assert [r.line for r in recs] == [1, 3, 4]


@pytest.mark.parametrize("bad,what", [
    ('{"prompt": "x", ', "invalid JSON"),
    ('["prompt"]', "expected a JSON object"),
    ('{"text": "x"}', "missing 'prompt'"),
    ('{"prompt": ""}', "'prompt' is empty"),
    ('{"prompt": "   "}', "'prompt' is empty"),
    ('{"prompt": 3}', "'prompt' must be a string"),
    ('{"prompt": "x", "length_range": [30, 20]}', "0 <= lo <= hi"),
    ('{"prompt": "x", "length_range": [-1, 20]}', "0 <= lo <= hi"),
    ('{"prompt": "x", "length_range": [1, 2, 3]}', "[lo, hi]"),
    ('{"prompt": "x", "length_range": [1.5, 2]}', "[lo, hi]"),
    ('{"prompt": "x", "length_range": "20-30"}', "[lo, hi]"),
    ('{"prompt": "x", "length_range": [true, 2]}', "[lo, hi]"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, what):
    p = _jsonl(tmp_path, ['{"prompt": "ok"}', "", bad])
    with pytest.raises(P.PromptDataError) as ei:
        P.load_prompts(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3: "), msg
    assert what in msg and "\n" not in msg


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(P.PromptDataError, match="not found"):
        P.load_prompts(str(tmp_path / "none.jsonl"))
    with pytest.raises(P.PromptDataError, match="no prompts"):
        P.load_prompts(_jsonl(tmp_path, ["", "  "]))


def test_cursor_epochs_and_resume():
    c = P.PromptCursor(10, seed=3)
    first = c.next_indices(4) + c.next_indices(4) + c.next_indices(4)  # crosses into epoch 1
    assert sorted(first[:10]) == list(range(10))
    assert c.state_dict()["epoch"] == 1 and c.state_dict()["position"] == 2
    state = c.state_dict()
    nxt = c.next_indices(7)
    d = P.PromptCursor(10, seed=3)
    d.load_state_dict(state)
    assert d.next_indices(7) == nxt
    # same seed, same stream; different seed, different order; shuffle off = file order
    assert P.PromptCursor(10, seed=3).next_indices(12) == first
    assert P.PromptCursor(10, seed=4).next_indices(10) != first[:10]
    assert P.PromptCursor(5, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]
    # epochs differ in order
    e = P.PromptCursor(50, seed=0)
    assert e.next_indices(50) != e.next_indices(50)
    with pytest.raises(ValueError, match="prompt file changed"):
        P.PromptCursor(11).load_state_dict(state)
    recs = list("abcdefghij")
    assert P.PromptCursor(10, shuffle=False).next(recs, 3) == ["a", "b", "c"]
