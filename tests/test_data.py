"""Prompt data: `python -m lwz.data prepare` and `label-lengths`, the trainer's start-up prompt
validation (over-long prompts stop the run before step 1, or are skipped with exact resume), and
stop strings: which one ended a sample decides whether its answer is closed."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from lwz import data as D
from lwz.config import load_config
from lwz.prompts import PromptDataError, load_prompts, template_prompt, tokenize_prompts
from lwz.tokenizer import encode, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny.toml")
LONG_Q = ("Write a story about " + " and ".join(["a lighthouse keeper who counts the waves"] * 60) + ".")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(os.path.join(ROOT, "assets/tokenizer"))


def scripted_model(chain: list[int]):
    """A tiny Transformer (random init, untied head) whose greedy next token depends only on the
    current one: chain[i] is followed by chain[i + 1], the last by token 0 (eos). The blocks add
    nothing to the residual stream (o_proj and down_proj are zero) and chain[i]'s embedding is the
    i-th basis vector, which the head maps to chain[i + 1] only."""
    from lwz.model import ModelConfig, Transformer
    cfg = replace(ModelConfig.from_hf(os.path.join(ROOT, "assets/tiny-model")), tie_word_embeddings=False)
    assert len(set(chain)) == len(chain) <= cfg.hidden_size
    model = Transformer.from_config(cfg, seed=0)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        eye = torch.eye(cfg.hidden_size)
        for i, t in enumerate(chain):
            model.embed_tokens.weight[t] = eye[i]
            if i + 1 < len(chain):
                model.lm_head.weight[chain[i + 1]] = 10.0 * eye[i]
    return model


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


# ---- label-lengths: answer parsing and fallbacks ----------------------------------------------------

@pytest.mark.parametrize("answer,want", [
    ("[800, 1200]", (800, 1200)),
    ("[800,1200]", (800, 1200)),
    ("[1,500 - 2,000]", (1500, 2000)),
    ("[1.5k, 2k]", (1500, 2000)),
    ("Range: 800-1200 words", (800, 1200)),
    ("Range: 800 to 1200 words", (800, 1200)),
    ("about 600–900 words would suit a blog post", (600, 900)),
    ("lo=800 hi=1200", (800, 1200)),
    ("lo: 300, hi: 450", (300, 450)),
    ("[300, 450\n", (300, 450)),  # stopped at the newline before the closing bracket
    ("<think>The user asks for a 3000-word article, so roughly [2700, 3300].</think>\n[2700, 3300]", (2700, 3300)),
    ("<think>The user asks for a 3000-word article [2700, 3300]", None),  # never finished thinking
    ("I think a moderate length is best.", None),
    ("]]]] the the the", None),
    ("", None),
    ("[1200, 800]", None),  # lo > hi
    ("[5000, 90000]", None),  # above max_words
    ("[0, 0]", None),
    ("[-5, 100]", None),
])
def test_parse_range_answer(answer, want):
    assert D.parse_range_answer(answer, max_words=12000) == want


def test_choose_range_falls_back_to_the_request_then_the_default():
    ask = "Write a cover letter for a junior accountant position in about 300 words."
    free = "Write a cover letter for a junior accountant position."
    # the labelling prompt ends in "[": the model's text continues it
    assert D.choose_range("250, 350]", ask, 12000, (400, 800)) == ((250, 350), "model")
    assert D.choose_range("350, 250]", ask, 12000, (400, 800)) == ((270, 330), "parser")
    assert D.choose_range("no idea", ask, 12000, (400, 800)) == ((270, 330), "parser")
    assert D.choose_range(None, ask, 12000, (400, 800)) == ((270, 330), "parser")
    assert D.choose_range("no idea", free, 12000, (400, 800)) == ((400, 800), "default")
    assert D.choose_range("9000, 20000]", free, 12000, (400, 800)) == ((400, 800), "default")
    # a request beyond length_max_words is not a valid label either
    assert D.choose_range("x", "Write a 50,000-word novel.", 12000, (400, 800)) == ((400, 800), "default")


def test_label_lengths_end_to_end_two_ranks(tmp_path, tok):
    """torchrun, 2 processes, a model folder whose greedy answer is "35, 79]": prompts that fit the
    model's context get [35, 79] from the model; too long ones fall back to their own request or the
    default; a given range is kept (--relabel would replace it); rank 0 writes in input order."""
    q = "Write a short poem about rain."
    suffix_last = encode(tok, D.LABEL_PROMPT.replace("{question}", q))[-1]
    answer = encode(tok, "35, 79]")
    model = scripted_model([suffix_last] + answer)
    model.save_pretrained(str(tmp_path / "labeller"))
    rows = [
        {"prompt": q, "id": "a"},
        {"prompt": "Write a 500-word essay on tides.", "length_range": [480, 520], "id": "b"},
        {"prompt": LONG_Q * 2 + " Keep it under 200 words.", "id": "c"},
        {"prompt": LONG_Q * 2, "id": "d"},
        {"prompt": "描写一次秋天的郊游，不少于800字。", "id": "e"},
        {"prompt": "Write a toast for my sister's wedding.", "id": "f"},
    ]
    inp = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "labelled.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lwz.data",
           "label-lengths", "--model", str(tmp_path / "labeller"),
           "--tokenizer", os.path.join(ROOT, "assets/tokenizer"),
           "--in", inp, "--out", str(out), "--batch-size", "2", "--rewards.length_max_words=12000",
           "--rewards.default_length_range=[400,800]"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _read(out)
    assert [g["id"] for g in got] == [x["id"] for x in rows]
    for g, x in zip(got, rows):
        assert {k: v for k, v in g.items() if k not in ("length_range", "length_source")} == \
            {k: v for k, v in x.items() if k != "length_range"}
        lo, hi = g["length_range"]
        assert 0 <= lo <= hi <= 12000 and hi > 0
    assert [(g["length_source"], g["length_range"]) for g in got] == [
        ("model", [35, 79]), ("given", [480, 520]), ("parser", [180, 200]), ("default", [400, 800]),
        ("model", [35, 79]), ("model", [35, 79])]
    line = [l for l in r.stdout.splitlines() if l.startswith("label-lengths:")]
    assert len(line) == 1, r.stdout  # rank 0 only
    assert "6 records written" in line[0], line[0]
    assert ("1 kept their length_range, 3 labelled by the model, 1 by the prompt's own request, "
            "1 by the default [400, 800] (2 did not fit the model context)") in line[0], line[0]


def test_label_lengths_bad_input_is_one_line(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"prompt": "x", "length_range": [9, 3]}])
    for argv, msg in [
        (["--model", str(tmp_path / "nope"), "--in", inp, "--out", str(tmp_path / "o.jsonl")], "no config.json"),
        (["--model", os.path.join(ROOT, "assets/tiny-model"), "--in", inp, "--out", inp], "is the input file"),
        (["--model", os.path.join(ROOT, "assets/tiny-model"), "--in", inp, "--out", str(tmp_path / "o.jsonl"),
          "--tokenizer", os.path.join(ROOT, "assets/tokenizer")], f"{inp}:2: 'length_range' [9, 3]"),
        (["--in", inp], "--model"),
    ]:
        with pytest.raises((D.DataError, PromptDataError)) as e:
            D.label_lengths(argv)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o.jsonl").exists()


# ---- prepare ----------------------------------------------------------------------------------------

def _prepare(argv, capsys):
    rc = D.main(["prepare", "--tokenizer", os.path.join(ROOT, "assets/tokenizer")] + argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_prepare_converts_dedups_and_drops_long(tmp_path, capsys):
    rows = [
        {"instruction": "Write a haiku about snow.", "target": [10, 20]},
        {"messages": [{"role": "system", "content": "You are helpful."},
                      {"role": "user", "content": "Describe a busy market in 300 words."},
                      {"role": "assistant", "content": "..."}]},
        {"instruction": "Write a haiku about snow.", "target": [10, 20]},  # exact duplicate
        "{not json",
        {"instruction": "", "target": [1, 2]},
        {"instruction": "Write a limerick.", "target": [30, 10]},
        {"instruction": LONG_Q},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "写一篇"},
                                                   {"type": "text", "text": "关于长江的散文。"}]}]},
        {"instruction": "Write a haiku about snow. "},  # not an exact duplicate
        {"other": 1},
    ]
    inp = _write(tmp_path / "raw.jsonl", rows)
    out = str(tmp_path / "prompts.jsonl")
    rc, stdout, _ = _prepare(["--in", inp, "--out", out, "--prompt-field", "instruction", "--range-field", "target",
                              "--config", TINY, "--data.max_prompt_tokens=200"], capsys)
    assert rc == 0
    got = _read(out)
    assert got == [
        {"prompt": "Write a haiku about snow.", "length_range": [10, 20]},
        {"prompt": "Describe a busy market in 300 words."},
        {"prompt": "写一篇关于长江的散文。"},
        {"prompt": "Write a haiku about snow. "},
    ]
    assert "read 10 records" in stdout
    assert "bad records skipped: 4" in stdout and f"{inp}:4: invalid JSON" in stdout
    assert f"{inp}:5: the prompt is empty" in stdout and f"{inp}:6: 'target' [30, 10]" in stdout
    assert f"{inp}:10: no 'instruction' field" in stdout
    assert "duplicates dropped: 1" in stdout
    assert f"too long, dropped: 1 templated prompt longer than data.max_prompt_tokens=200: {inp}:7 (" in stdout
    assert f"wrote 4 prompts to {out} (1 with a length_range)" in stdout
    # what it wrote is a valid trainer prompt file, and the tokens agree with the trainer's check
    cfg = load_config(TINY, ["--data.max_prompt_tokens=200"])
    kept, long_ = tokenize_prompts(load_prompts(out), load_tokenizer(cfg.tokenizer.path), cfg.data)
    assert len(kept) == 4 and not long_

    rc, stdout, _ = _prepare(["--in", inp, "--out", out, "--prompt-field", "instruction", "--range-field", "target",
                              "--config", TINY, "--data.max_prompt_tokens=200", "--keep-long"], capsys)
    assert rc == 0 and "too long, kept (--keep-long): 1 templated prompt" in stdout
    assert [g["prompt"] for g in _read(out)][2] == LONG_Q and len(_read(out)) == 5  # in input order


def test_prepare_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"question": ["Write a fable about a fox.", "写一封感谢信。", "Write a fable about a fox."],
                      "length_range": [[100, 200], None, [100, 200]], "source": ["a", "b", "c"]})
    inp = str(tmp_path / "raw.parquet")
    pq.write_table(table, inp)
    out = str(tmp_path / "p.jsonl")
    rc, stdout, _ = _prepare(["--in", inp, "--out", out, "--prompt-field", "question"], capsys)
    assert rc == 0, stdout
    assert _read(out) == [{"prompt": "Write a fable about a fox.", "length_range": [100, 200]},
                          {"prompt": "写一封感谢信。"}]
    assert "read 3 records" in stdout and "duplicates dropped: 1" in stdout


def test_prepare_parquet_without_pyarrow_is_one_line(tmp_path, capsys, monkeypatch):
    inp = tmp_path / "raw.parquet"
    inp.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rc, stdout, err = _prepare(["--in", str(inp), "--out", str(tmp_path / "p.jsonl")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "needs pyarrow: pip install pyarrow" in err
    assert not (tmp_path / "p.jsonl").exists()


def test_prepare_bad_parquet_is_one_line(tmp_path, capsys):
    inp = tmp_path / "raw.parquet"
    inp.write_bytes(b"PAR1 not really")
    rc, _, err = _prepare(["--in", str(inp), "--out", str(tmp_path / "p.jsonl")], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"--in {inp}: not a readable Parquet file" in err, err


def test_prepare_never_overwrites_its_input_or_leaves_a_partial_file(tmp_path, capsys):
    inp = _write(tmp_path / "raw.jsonl", [{"prompt": "Write a sonnet."}])
    before = open(inp).read()
    rc, _, err = _prepare(["--in", inp, "--out", inp], capsys)
    assert rc == 2 and "is the input file" in err and err.count("\n") == 1
    rc, _, err = _prepare(["--in", inp, "--out", str(tmp_path / "." / "raw.jsonl")], capsys)
    assert rc == 2 and "is the input file" in err
    assert open(inp).read() == before
    # a failure while writing leaves the previous output as it was and no temporary file
    out = _write(tmp_path / "prev.jsonl", [{"prompt": "previous"}])

    def rows():
        yield {"prompt": "new"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        D.write_jsonl_atomic(out, rows())
    assert _read(out) == [{"prompt": "previous"}]
    assert sorted(os.listdir(tmp_path)) == ["prev.jsonl", "raw.jsonl"]
    # nothing usable: nothing written
    bad = _write(tmp_path / "bad.jsonl", ["{oops"])
    rc, _, err = _prepare(["--in", bad, "--out", out], capsys)
    assert rc == 2 and "no prompts left" in err and _read(out) == [{"prompt": "previous"}]
    for argv, msg in [(["--in", str(tmp_path / "x.csv"), "--out", out], "file not found"),
                      (["--in", str(tmp_path / "prev.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                        "--data.max_prompt_tokenz=3"], "unknown key 'data.max_prompt_tokenz'"),
                      (["--out", out], "--in")]:
        rc, _, err = _prepare(argv, capsys)
        assert rc == 2 and msg in err and err.count("\n") == 1, err


def test_progress_bar_draws_on_a_terminal_only():
    from lwz.metrics import Progress

    class Tty:
        def __init__(self, tty):
            self.text, self.tty = "", tty

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return self.tty

    on, off = Tty(True), Tty(False)
    for stream in (on, off):
        bar = Progress(200, "reading x.jsonl", stream=stream, every=0.0)
        for _ in range(4):
            bar.update(50)
        bar.close()
    assert off.text == ""
    frames = on.text.split("\r")[1:]
    assert frames[0].startswith("reading x.jsonl   25%  50/200")
    assert frames[-1].startswith("reading x.jsonl  100%  200/200")
    assert on.text.endswith("\n") and on.text.count("\n") == 1


# ---- the trainer validates the prompt file before step 1 --------------------------------------------

@pytest.fixture
def world_of_one(monkeypatch):
    """The environment a plain `python lwz/train.py` gives itself, restored after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)


def _prompt_file(tmp_path):
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/tiny_prompts.jsonl")).read().splitlines()[:6]]
    rows.insert(3, {"prompt": LONG_Q})
    return _write(tmp_path / "prompts.jsonl", rows)


def _train(tmp_path, name, extra):
    from lwz.train import main
    return main(["--config", TINY, f"--logging.run_dir={tmp_path}", f"--name={name}", "--logging.plot=false",
                 "--rollout.max_new_tokens=8", "--rollout.group_size=2", "--rollout.prompts_per_step=2",
                 "--checkpoint.export_hf=false", "--logging.progress=false", "--distributed.fsdp=false"] + extra)


def test_trainer_stops_before_step_one_on_an_over_long_prompt(tmp_path, capsys, world_of_one):
    prompts = _prompt_file(tmp_path)
    rc = _train(tmp_path, "long", [f"--data.prompts={prompts}", "--steps=2"])
    err = capsys.readouterr().err
    assert rc == 2
    n = len(encode(load_tokenizer(os.path.join(ROOT, "assets/tokenizer")),
                   template_prompt(LONG_Q, load_config(TINY).data)))
    assert n > 512
    assert err.strip().splitlines() == [
        f"error: 1 templated prompt longer than data.max_prompt_tokens=512: {prompts}:4 ({n} tokens); "
        f"shorten or drop them, or set data.skip_long_prompts=true"]
    assert not os.path.exists(tmp_path / "long" / "metrics.jsonl")


def test_trainer_skips_long_prompts_and_resumes_exactly(tmp_path, capsys, world_of_one):
    import shutil
    prompts = _prompt_file(tmp_path)
    args = [f"--data.prompts={prompts}", "--data.skip_long_prompts=true", "--steps=2", "--checkpoint.every=1",
            "--checkpoint.keep=0"]
    assert _train(tmp_path, "full", args) == 0
    out = capsys.readouterr().out
    assert out.count("data: skipped 1 of 7 prompts (data.skip_long_prompts): 1 templated prompt longer than "
                     f"data.max_prompt_tokens=512: {prompts}:4") == 1
    # resume from step 1 in a copy of the run: the same step 2 (the cursor runs over the kept 6)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_00000002")
    assert _train(tmp_path, "part", args + ["--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    full, part = (_read(tmp_path / n / "metrics.jsonl") for n in ("full", "part"))
    assert [r["step"] for r in part] == [1, 2]
    for a, b in zip(full[1:], part[1:]):
        for k in a:
            if not (k.startswith("time_") or k == "tokens_per_s"):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k


# ---- stop strings: which one ended a sample ---------------------------------------------------------

def _rollout_and_score(tmp_path, tok, text, stop_strings):
    """The trainer's rollout() and score() for one prompt whose model writes `text` greedily (the
    scripted model; top_k = 1), with rollout.stop_strings = stop_strings. Returns (the samples,
    rewards [length, format] x samples, answers)."""
    from lwz.distributed import Dist
    from lwz.train import build_rewards, rollout, score
    cfg = load_config(TINY, ["--rollout.group_size=2", "--rollout.top_k=1", "--rollout.max_new_tokens=20",
                             f"--rollout.stop_strings={json.dumps(stop_strings)}"])
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Write something.", "length_range": [1, 3]}])
    records, _ = tokenize_prompts(load_prompts(path), tok, cfg.data)
    model = scripted_model([records[0].token_ids[-1]] + encode(tok, text))
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), backend="none")
    samples, _, _ = rollout(model, tok, records, cfg, d, step=0)
    fns, weights = build_rewards(cfg, d)
    R, _, answers = score(samples, fns, weights, cfg)
    return samples, R, answers


def test_generate_names_the_stop_string_that_fired(tok):
    from lwz.rollout import SamplingParams, generate, strip_stop_string

    def greedy(**kw):
        return SamplingParams(max_new_tokens=30, temperature=0.0, **kw)

    text = "<think>p</think><answer> more<|user|> x</answer>"
    prompt = encode(tok, "Hi <|assistant|>:")
    model = scripted_model([prompt[-1]] + encode(tok, text))
    out = generate(model, [prompt, prompt], greedy(stop_strings=("</answer>", "<|user|>", "never")), tokenizer=tok)
    assert out.finish_reasons == ["stop_string"] * 2 and out.stopped_by == ["<|user|>"] * 2
    decoded = tok.decode(out.response_ids[0])
    assert decoded == "<think>p</think><answer> more<|user|>"  # the completing token is kept
    assert strip_stop_string(decoded, "<|user|>") == "<think>p</think><answer> more"
    # without <|user|> in the list the same model runs on to </answer>; no stop string: eos
    out = generate(model, [prompt], greedy(stop_strings=("</answer>",)), tokenizer=tok)
    assert out.stopped_by == ["</answer>"] and tok.decode(out.response_ids[0]).endswith(" x</answer>")
    out = generate(model, [prompt], greedy(stop_token_ids=(0,)))
    assert out.finish_reasons == ["stop_token"] and out.stopped_by == [None]
    # several strings completed by the same token: the first in the list's order
    out = generate(model, [prompt], greedy(stop_strings=("/answer>", "</answer>")), tokenizer=tok)
    assert out.stopped_by == ["/answer>"]


def test_the_issue_example_is_neither_closed_nor_well_formed():
    """" <think>p</think> <answer>text <|user|>" ended by <|user|> (the text the trainer decodes),
    with "</answer>" also a stop string: no answer, format 0; the same ended by </answer> is fine."""
    from lwz.prompts import ANSWER_CLOSE, extract_answer
    from lwz.rewards.format import FormatReward
    from lwz.rollout import strip_stop_string
    texts = [(" <think>p</think> <answer>text <|user|>", "<|user|>"),
             (" <think>p</think> <answer>text </answer>", "</answer>")]
    meta, answers = [], []
    for text, stop in texts:
        cut = strip_stop_string(text, stop)
        answers.append(extract_answer(cut, stopped_at_close=stop == ANSWER_CLOSE))
        meta.append(dict(response=cut, stopped_at_close=stop == ANSWER_CLOSE))
    assert answers == [None, "text"]
    assert FormatReward()(["q", "q"], answers, meta).tolist() == [0.0, 1.0]


def test_a_non_answer_stop_string_does_not_close_the_answer(tmp_path, tok):
    # <|user|> ends the text before </answer>: broken format, no answer
    samples, R, answers = _rollout_and_score(tmp_path, tok, " <think>p</think><answer> text<|user|> more",
                                             ["</answer>", "<|user|>"])
    assert [s["response"] for s in samples] == [" <think>p</think><answer> text"] * 2
    assert answers == [None, None] and R[1].tolist() == [0.0, 0.0]
    assert not any(s["stopped_at_close"] for s in samples)
    # stopped by </answer>: the string is cut and the answer accepted as closed
    samples, R, answers = _rollout_and_score(tmp_path, tok, " <think>p</think><answer> text</answer><|user|>",
                                             ["</answer>", "<|user|>"])
    assert [s["response"] for s in samples] == [" <think>p</think><answer> text"] * 2
    assert answers == ["text", "text"] and R[1].tolist() == [1.0, 1.0] and all(s["stopped_at_close"] for s in samples)
    assert R[0].tolist() == [1.0, 1.0]  # one word, in the prompt's [1, 3]
    # <|user|> after a closed answer (</answer> not a stop string): the format holds
    samples, R, answers = _rollout_and_score(tmp_path, tok, " <think>p</think><answer> text</answer>\n<|user|>",
                                             ["<|user|>"])
    assert [s["response"] for s in samples] == [" <think>p</think><answer> text</answer>\n"] * 2
    assert answers == ["text", "text"] and R[1].tolist() == [1.0, 1.0]
