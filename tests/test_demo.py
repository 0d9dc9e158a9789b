"""`make train`'s pipeline (the paper's in miniature): the synthetic CPT corpus, tiny CPT, then GRPO
from the CPT model with the think prompt and the length + format rewards, on 2 CPU processes.

One run of the same commands as the Makefile (into a temporary run folder) serves every test here:
  - the GRPO metrics meet the demo's bar (format_ok_rate, truncation_rate, length_in_range_rate);
  - the rise is real: answers sampled from the exported models, counted here with a word counter
    of our own, fall inside their prompt's range more often after GRPO than after CPT alone, and
    are made of the corpus's own word pairs (not words repeated to game the counter);
  - a second run into the same folder stops at once and says how to go on.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _torchrun(script, config, flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, script), "--config", os.path.join(ROOT, config)] + flags


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    data, runs = base / "cpt", base / "runs"
    py = [sys.executable]
    setup = [py + [os.path.join(ROOT, "scripts/make_cpt_corpus.py"), "--out", str(data)]]
    for src in ("writing", "think"):
        setup.append(py + ["-m", "lwz.data", "tokenize", "--in", str(data / f"{src}.jsonl"), "--out",
                           str(data / src), "--tokenizer", os.path.join(ROOT, "assets/tokenizer")])
    for cmd in setup:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    common = [f"--logging.run_dir={runs}", "--logging.progress=false", "--checkpoint.every=0"]
    cpt_flags = common + [f"--cpt.sources={data / 'writing'},{data / 'think'}"]
    grpo_flags = common + [f"--model.path={runs / 'cpt-tiny' / 'hf'}"]
    t0 = time.time()
    cpt = subprocess.run(_torchrun("lwz/pretrain.py", "configs/cpt-tiny.toml", cpt_flags), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert cpt.returncode == 0, cpt.stderr[-3000:]
    grpo = subprocess.run(_torchrun("lwz/train.py", "configs/grpo-tiny.toml", grpo_flags), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    with open(runs / "grpo-tiny" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return dict(data=data, runs=runs, rows=rows, stdout=grpo.stdout, seconds=time.time() - t0,
                cpt_flags=cpt_flags)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_grpo_learns_format_and_length(demo):
    rows = demo["rows"]
    assert len(rows) >= 100
    first, last = rows[:10], rows[-10:]
    assert _mean(last, "format_ok_rate") >= 0.8, _mean(last, "format_ok_rate")
    assert _mean(last, "reward_format") >= 0.8  # the whole think-then-answer format, not just an answer
    assert _mean(last, "truncation_rate") <= 0.2
    rise = _mean(last, "length_in_range_rate") - _mean(first, "length_in_range_rate")
    assert rise >= 0.25, (_mean(first, "length_in_range_rate"), _mean(last, "length_in_range_rate"))
    # the summary at the end names the numbers
    for key in ("format_ok_rate", "truncation_rate", "length_in_range_rate"):
        assert re.search(rf"{key}: [0-9.]+ -> [0-9.]+", demo["stdout"]), demo["stdout"][-2000:]
    assert os.path.isfile(demo["runs"] / "grpo-tiny" / "curves.png")


# ---- the answers themselves --------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+")


def _words(text):
    """Our own count: letter runs (English) plus CJK characters."""
    return _WORD.findall(text) + re.findall(r"[\u4e00-\u9fff]", text)


def _sample(model_dir, records, n=4, max_new_tokens=160):
    """(record, whole response text, answer or None) for n samples of each record at the config's
    temperature, with the GRPO run's template and stop string."""
    from lwz.config import load_config
    from lwz.model import Transformer
    from lwz.prompts import ANSWER_CLOSE, template_prompt
    from lwz.rollout import SamplingParams, generate, strip_stop_string
    from lwz.tokenizer import load_tokenizer

    cfg = load_config(os.path.join(ROOT, "configs/grpo-tiny.toml"))
    tok = load_tokenizer(os.path.join(ROOT, "assets/tokenizer"))
    model = Transformer.from_pretrained(str(model_dir)).eval()
    ids = [tok.encode(template_prompt(r.prompt, cfg.data)) for r in records]
    b = generate(model, ids, SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=cfg.rollout.temperature,
                                            stop_token_ids=(tok.eos_token_id,), stop_strings=(ANSWER_CLOSE,),
                                            seed=123), tokenizer=tok)
    out = []
    for j, (pi, resp) in enumerate(zip(b.prompt_index.tolist(), b.response_ids)):
        text = strip_stop_string(tok.decode(resp, skip_special_tokens=True), b.stopped_by[j])
        # our own parse of the format: one think block, then the answer, closed by the stop string
        m = re.fullmatch(r"\s*<think>(.*?)</think>\s*<answer>(.*)", text, re.S)
        ok = m is not None and b.stopped_by[j] == ANSWER_CLOSE and "<" not in m.group(1) + m.group(2)
        out.append((records[pi], text, m.group(2) if ok else None))
    return out


def _in_range_share(samples):
    hits = 0
    for rec, _, answer in samples:
        lo, hi = rec.length_range
        hits += answer is not None and lo <= len(_words(answer)) <= hi
    return hits / len(samples)


def test_answers_are_real_prose_in_range(demo):
    from lwz.prompts import load_prompts

    records = load_prompts(os.path.join(ROOT, "data/tiny_prompts.jsonl"))[:48]
    before = _sample(demo["runs"] / "cpt-tiny" / "hf", records)
    after = _sample(demo["runs"] / "grpo-tiny" / "hf", records)
    assert _in_range_share(after) >= _in_range_share(before) + 0.15, (_in_range_share(before),
                                                                       _in_range_share(after))
    # every word pair of the answers should be one the corpus contains: GRPO moved the length
    # by writing more or fewer of the corpus's sentences, not by repeating or inventing words
    pairs = set()
    for name in ("writing.jsonl", "think.jsonl"):
        with open(demo["data"] / name) as f:
            for line in f:
                w = [x.lower() for x in _WORD.findall(json.loads(line)["text"])]
                pairs.update(zip(w, w[1:]))
    answers = [a for _, _, a in after if a]
    assert len(answers) >= 0.8 * len(after)
    got = [(x.lower(), y.lower()) for a in answers for x, y in zip(_WORD.findall(a), _WORD.findall(a)[1:])]
    known = sum(p in pairs for p in got) / len(got)
    repeats = sum(x == y for x, y in got) / len(got)
    assert known >= 0.7, (known, answers[:5])  # 0.98 after CPT; 0.2 in the counter-gaming run
    assert repeats <= 0.05, (repeats, answers[:5])  # a counter-gaming run had 0.56 ("the the the")


def test_second_run_stops_and_keeps_the_first(demo):
    before = sorted(os.listdir(demo["runs"] / "cpt-tiny"))
    r = subprocess.run(_torchrun("lwz/pretrain.py", "configs/cpt-tiny.toml", demo["cpt_flags"]), cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "checkpoint.overwrite=true" in r.stderr and "resume" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(demo["runs"] / "cpt-tiny")) == before
