"""lwz.eval: LongBench-Write's length score, prompt files in both formats, the summary, the whole
command on tiny models (generation, reward model, judge, head-to-head, Elo), and evaluation during
a short training run."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from lwz import eval as ev
from lwz.distributed import Dist
from lwz.prompts import PromptDataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "assets/tiny-model")
TOKENIZER = os.path.join(ROOT, "assets/tokenizer")
SHORT_EN = "Think in <think> </think>, then write the answer in <answer> </answer>. <|user|>: {question} <|assistant|>:"
SHORT_ZH = "先在 <think> </think> 中思考，再在 <answer> </answer> 中写出答案。<|用户|>: {question} <|助手|>:"
CPU1 = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- length score ---------------------------------------------------------------------------------

@pytest.mark.parametrize("x,y,want", [
    (1000, 1000, 100.0),
    (1000, 1300, 90.0),            # y > x: 100 * (1 - 0.3 / 3)
    (1000, 2500, 50.0),            # 100 * (1 - 1.5 / 3)
    (1000, 4000, 0.0),             # reaches 0 at y = 4x
    (1000, 9000, 0.0),             # floored
    (1000, 800, 87.5),             # y < x: 100 * (1 - 0.25 / 2)
    (1000, 500, 50.0),             # 100 * (1 - 1 / 2)
    (1000, 300, 0.0),              # x / y = 3.33: floored
    (1000, 0, 0.0),                # no answer
    (20, 25, 100 * (1 - 0.25 / 3)),
])
def test_length_score_hand_values(x, y, want):
    assert ev.length_score(x, y) == pytest.approx(want, abs=1e-9)


def test_length_score_needs_a_positive_requirement():
    with pytest.raises(ValueError, match="required length"):
        ev.length_score(0, 10)


def test_prompt_formats_and_required_length(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Write a postcard.", "length_range": [800, 1200]},            # ours: midpoint
            {"prompt": "写一篇关于春天的文章。", "type": "essay", "length": 3000},   # LongBench-Write
            {"prompt": "Write a 2,000-word essay about cities."},                    # request in the text
            {"prompt": "Say hello."},                                                # no length at all
            {"prompt": "An impossible task.", "length_range": [0, 0]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n" +
                    "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    items = ev.load_eval_prompts(str(path))
    assert [it.line for it in items] == [1, 2, 4, 5, 6] and [it.index for it in items] == [0, 1, 2, 3, 4]
    assert [it.required for it in items] == [1000.0, 3000.0, 2000.0, None, None]
    assert items[0].length_range == (800, 1200) and items[1].length_range is None and items[1].type == "essay"
    assert items[2].length_range == (1800, 2200)  # the length reward's +-10% rule
    assert [ev.bucket_of(it.required) for it in items] == ["500-2k", "2k-5k", "2k-5k", "unspecified", "unspecified"]
    assert [ev.bucket_of(x) for x in (499.5, 500, 1999, 2000, 4999, 5000, 20000)] == \
        ["<500", "500-2k", "500-2k", "2k-5k", "2k-5k", ">=5k", ">=5k"]


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "x", "length": 0}', "'length' must be a positive number of words, got 0"),
    ('{"prompt": "x", "length": "long"}', "'length' must be a positive number"),
    ('{"prompt": "x", "length": true}', "'length' must be a positive number"),
    ('{"prompt": "x", "length": 100, "length_range": [1, 2]}', "has both 'length'"),
    ('{"prompt": "x", "length": 100, "type": 3}', "'type' must be a string"),
    ('{"length": 100}', "missing 'prompt'"),
    ('{"prompt": "x", "length_range": [5, 1]}', "must satisfy 0 <= lo <= hi"),
    ('{"prompt": "x",', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_prompt_line_names_file_and_line(tmp_path, line, msg):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine", "length": 300}\n' + line + "\n")
    with pytest.raises(PromptDataError) as e:
        ev.load_eval_prompts(str(path))
    assert str(e.value).startswith(f"{path}:2: ") and msg in str(e.value)


# ---- rows and summary -------------------------------------------------------------------------------

def _item(index, prompt, required=None, rng=None):
    return ev.EvalPrompt(index, index + 1, prompt, rng, required)


def test_rows_and_summary_hand_computed():
    para = ("the river carried the small boat past the old mill and the quiet fields "
            "while the children watched from the bridge")
    items = [_item(0, "Write a postcard.", 20.0, (15, 25)),
             _item(1, "写一段话。", 600.0),
             _item(2, "Write a long report.", 3000.0),
             _item(3, "Say hello.")]
    responses = [
        ("<think>plan</think> <answer>" + " ".join(["word"] * 20) + "</answer>", False, False),
        ("<think>想</think><answer>" + "春" * 300, True, False),       # stopped on </answer> (cut)
        ("<think>a long plan that never ends", False, True),            # truncated, no answer
        ("<answer>" + para + "\n" + para + "</answer>", False, False),   # no think: format broken
    ]
    rows = [ev.sample_row(it, r, stop, trunc, 10 * (k + 1)) for k, (it, (r, stop, trunc)) in
            enumerate(zip(items, responses))]
    assert [r["words"] for r in rows] == [20, 300, 0, 42]  # 21 words a paragraph
    assert [r["answer"] is None for r in rows] == [False, False, True, False]
    assert [r["format_ok"] for r in rows] == [True, True, False, False]
    assert [r["length_score"] for r in rows] == [100.0, 50.0, 0.0, None]
    assert [r["in_range"] for r in rows] == [True, None, None, None]
    assert [r["near_duplicate_share"] for r in rows] == [0.0, 0.0, None, 0.5]  # 2 copies: (k-1)/k
    assert [r["language"] for r in rows] == ["en", "zh", "en", "en"]
    rows[0]["quality"], rows[1]["quality"] = 1.5, -0.5
    s = ev.summarize(rows)
    o = s["overall"]
    assert o["n"] == 4 and o["length_score"] == pytest.approx(50.0) and o["length_scored"] == 3
    assert o["in_range_rate"] == 1.0 and o["in_range_n"] == 1
    assert o["format_ok_rate"] == 0.5 and o["truncation_rate"] == 0.25
    assert o["near_duplicate_share"] == pytest.approx(0.5 / 3) and o["near_duplicate_rate"] == pytest.approx(1 / 3)
    assert o["quality_mean"] == pytest.approx(0.5) and o["quality_n"] == 2
    assert o["answer_words_mean"] == 90.5 and o["response_tokens_mean"] == 25.0
    assert {b: st["length_score"] for b, st in s["by_bucket"].items()} == \
        {"<500": 100.0, "500-2k": 50.0, "2k-5k": 0.0, "unspecified": None}
    assert s["by_language"]["zh"]["n"] == 1 and s["by_language"]["en"]["length_score"] == pytest.approx(50.0)
    m = ev.metrics_of(s)
    assert m["eval/length_score"] == pytest.approx(50.0) and m["eval/length_score/500-2k"] == 50.0
    assert "eval/length_score/unspecified" not in m


# ---- head-to-head statistics ------------------------------------------------------------------------

def test_rates_and_bootstrap():
    r = ev.rate_summary([1.0, 1.0, 0.5, 0.0], n_boot=2000, seed=3)
    assert (r["win"], r["tie"], r["loss"], r["score"]) == (0.5, 0.25, 0.25, 0.625)
    for k in ("win", "tie", "loss", "score"):
        lo, hi = r[f"{k}_ci"]
        assert 0 <= lo <= r[k] <= hi <= 1
    assert r["win_ci"][0] < 0.5 < r["win_ci"][1]  # four prompts: a wide interval
    assert ev.rate_summary([1.0] * 30)["win_ci"] == [1.0, 1.0]
    assert ev.rate_summary([1.0, 0.0] * 5, seed=1) == ev.rate_summary([1.0, 0.0] * 5, seed=1)


def test_rm_outcome_rules():
    assert ev.rm_outcome("a", "b", 2.0, 1.0) == 1.0 and ev.rm_outcome("a", "b", 1.0, 2.0) == 0.0
    assert ev.rm_outcome("same", "same", 1.0, 1.00001) == 0.5  # identical answers tie
    assert ev.rm_outcome(None, "b", None, 1.0) == 0.0 and ev.rm_outcome("a", None, 1.0, None) == 1.0
    assert ev.rm_outcome(None, None, None, None) == 0.5


def test_elo_two_players_closed_form():
    # 6 wins, 2 ties, 2 losses: the maximum-likelihood P(A beats B) is the score share
    battles = [(0, 1, 1.0)] * 6 + [(0, 1, 0.5)] * 2 + [(1, 0, 1.0)] * 2
    for prior, share in ((0.0, 7 / 10), (1.0, 7.5 / 11)):
        ra, rb = ev.fit_elo(battles, 2, prior=prior)
        assert ra - rb == pytest.approx(400 * math.log10(share / (1 - share)), abs=1e-6)
        assert (ra + rb) / 2 == pytest.approx(1000.0)


def test_elo_three_players_solves_the_likelihood_equations():
    import numpy as np
    battles = [(0, 1, 1.0)] * 5 + [(1, 0, 1.0)] * 2 + [(0, 2, 0.5)] * 3 + [(2, 0, 1.0)] * 2 + [(1, 2, 1.0)] * 4 + \
        [(2, 1, 1.0)] * 1
    r = np.array(ev.fit_elo(battles, 3, prior=0.0))
    W, N = np.zeros((3, 3)), np.zeros((3, 3))
    for i, j, s in battles:
        W[i, j] += s
        W[j, i] += 1 - s
        N[i, j] += 1
        N[j, i] += 1
    P = 1 / (1 + 10 ** ((r[None, :] - r[:, None]) / 400))  # P[i, j] = P(i beats j)
    np.testing.assert_allclose((N * P).sum(1), W.sum(1), atol=1e-6)  # score equations of the MLE
    # an unbeaten player stays finite with the prior
    assert all(math.isfinite(x) for x in ev.fit_elo([(0, 1, 1.0)] * 4, 2, prior=1.0))


# ---- tiny models ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny causal LMs (random init, with the bundled tokenizer), a tiny reward model and a
    prompt file mixing both formats."""
    from lwz.hf_io import copy_tokenizer_files
    from lwz.model import Transformer
    from lwz.rewards.quality import QualityRewardModel
    from lwz.tokenizer import load_tokenizer
    root = tmp_path_factory.mktemp("tiny")
    for name, seed in (("m1", 1), ("m2", 2)):
        Transformer.from_config(TINY, seed=seed).save_pretrained(str(root / name))
        copy_tokenizer_files(TOKENIZER, str(root / name))
    tok = load_tokenizer(TOKENIZER, require_eos=False, pad_from_eos=False)
    rm = QualityRewardModel.from_config(TINY, tokenizer=tok, template="plain", seed=3)
    with torch.no_grad():
        rm.score.weight.mul_(50.0)  # O(1) scores, so answers get distinct ones
    rm.save_pretrained(str(root / "rm"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"prompt": "Write a postcard about a trip.", "length_range": [15, 25]},
        {"prompt": "Write a poem about rain.", "type": "poem", "length": 30},
        {"prompt": "写一段关于春天的短文。", "type": "essay", "length": 600},
        {"prompt": "Write a 3,000-word report on rivers."},
        {"prompt": "Say hi."}]) + "\n")
    return root


def _args(*argv):
    return ev._parser().parse_args(list(argv))


# independent re-computations of the per-sample fields (the paper's evaluation script's rules)
def _answer(response, stopped_at_close):
    m = re.search(r"<answer>(.*?)</answer>", response + ("</answer>" if stopped_at_close else ""), re.DOTALL)
    return m.group(1).strip() if m else None


def _words(text):
    return len(re.findall(r"[\u4e00-\u9fff]", text or "")) + len(re.findall(r"\b[a-zA-Z]+\b", text or ""))


def _sl(x, y):
    if y > x:
        return 100 * max(0.0, 1 - (y / x - 1) / 3)
    return 0.0 if y == 0 else 100 * max(0.0, 1 - (x / y - 1) / 2)


def _bucket(x):
    return "unspecified" if x is None else "<500" if x < 500 else "500-2k" if x < 2000 else \
        "2k-5k" if x < 5000 else ">=5k"


def _mean(v):
    v = list(v)
    return sum(v) / len(v) if v else None


def _stats(rows):
    return dict(n=len(rows),
                length_score=_mean(r["length_score"] for r in rows if r["required_words"]),
                in_range_rate=_mean(r["in_range"] for r in rows if r["length_range"]),
                format_ok_rate=_mean(r["format_ok"] for r in rows),
                truncation_rate=_mean(r["truncated"] for r in rows),
                quality_mean=_mean(r["quality"] for r in rows if r["quality"] is not None),
                answer_words_mean=_mean(r["words"] for r in rows))


def _check_outputs(out, prompts_path):
    """samples.jsonl agrees with its responses, summary.json with samples.jsonl."""
    rows = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    summary = json.load(open(os.path.join(out, "summary.json")))
    src = [json.loads(l) for l in open(prompts_path) if l.strip()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in src]
    for r, p in zip(rows, src):
        assert r["answer"] == _answer(r["response"], r["stopped_at_close"])
        assert r["words"] == _words(r["answer"])
        x = p.get("length", None)
        if x is None and p.get("length_range"):
            x = sum(p["length_range"]) / 2
        if "length" not in p and "length_range" not in p and "3,000-word" in p["prompt"]:
            x = 3000.0
        assert r["required_words"] == x
        assert r["length_score"] == (None if x is None else pytest.approx(_sl(x, r["words"])))
    want = _stats(rows)
    got = {k: summary["overall"][k] for k in want}
    assert got == pytest.approx(want)
    for b, st in summary["by_bucket"].items():
        assert {k: st[k] for k in want} == pytest.approx(_stats([r for r in rows if _bucket(r["required_words"]) == b]))
    langs = {"zh" if re.search(r"[\u4e00-\u9fff]", r["prompt"]) else "en" for r in rows}
    assert set(summary["by_language"]) == langs
    for g in langs:
        sub = [r for r in rows if ("zh" if re.search(r"[\u4e00-\u9fff]", r["prompt"]) else "en") == g]
        assert {k: summary["by_language"][g][k] for k in want} == pytest.approx(_stats(sub))
    return rows, summary


def test_tensor_parallel_eval_equals_one_process(tiny, tmp_path):
    """--tp 2 on 2 processes (one TP group decoding 5 prompts in shares of 3, the last padded) writes
    the same greedy answers as 1 process with --tp 1."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    args = ["-m", "lwz.eval", "--model", str(tiny / "m1"), "--prompts", str(tiny / "prompts.jsonl"),
            "--max-new-tokens", "16", "--temperature", "0", "--no-plots",
            "--template-en", SHORT_EN, "--template-zh", SHORT_ZH]
    outs = []
    for nproc, tp in ((1, 1), (2, 2)):
        out = tmp_path / f"tp{tp}"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}"] + args + ["--out", str(out), "--tp", str(tp)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append([json.loads(line) for line in open(out / "samples.jsonl")])
    one, two = outs
    assert len(one) == len(two) == 5
    assert [x["prompt"] for x in one] == [x["prompt"] for x in two]
    assert [x["response"] for x in one] == [x["response"] for x in two]
    assert all(x["response_tokens"] > 0 for x in two)


def test_command_on_the_tiny_model(tiny, tmp_path):
    """`python -m lwz.eval` end to end under torchrun, data-parallel over 2 processes (exit code,
    outputs in file order, figures)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "lwz.eval", "--model", str(tiny / "m1"), "--prompts",
                        str(tiny / "prompts.jsonl"), "--out", str(out), "--rm", str(tiny / "rm"),
                        "--max-new-tokens", "24", "--template-en", SHORT_EN, "--template-zh", SHORT_ZH],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval: 5 prompts: length score" in r.stdout
    rows, summary = _check_outputs(str(out), str(tiny / "prompts.jsonl"))
    assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
    assert summary["settings"]["world_size"] == 2
    assert all(0 < x["response_tokens"] <= 24 for x in rows)
    for png in ("lengths.png", "length_score_by_bucket.png"):
        assert (out / png).stat().st_size > 1000
    # a second run into the same folder would replace it: refused before any work, nothing lost
    before = (out / "samples.jsonl").read_bytes()
    args = _args("--model", str(tiny / "m1"), "--prompts", str(tiny / "prompts.jsonl"), "--out", str(out))
    with pytest.raises(FileExistsError, match="already holds an evaluation .* --overwrite"):
        ev.run(args, CPU1)
    assert (out / "samples.jsonl").read_bytes() == before


def _crafted_eval_dir(folder, items, answers, name):
    """An earlier evaluation's folder holding the given answers (think + answer responses)."""
    rows = []
    for it, a in zip(items, answers):
        resp = f"<think>plan for {name}</think> <answer>{a}</answer>" if a is not None else "<think>cut"
        rows.append(ev.sample_row(it, resp, False, a is None, 10))
    ev.write_outputs(str(folder), rows, dict(model=name, **ev.summarize(rows)), plots=False)


def test_head_to_head_rm_judge_and_elo(tiny, tmp_path):
    """Two earlier evaluations and one generated baseline: the reward model's and the judge's
    verdicts are recomputed here from the models themselves; rates and Elo follow from them."""
    from lwz.rewards.quality import QualityRewardModel
    items = ev.load_eval_prompts(str(tiny / "prompts.jsonl"))
    a_answers = ["a short happy postcard from the sea", "rain falls softly on the roof", "春天来了，花开了。",
                 None, "hi there"]
    b_answers = ["greetings from the mountains and lakes", "rain falls softly on the roof", "春天很美。",
                 "rivers are long", None]
    _crafted_eval_dir(tmp_path / "A", items, a_answers, "A")
    _crafted_eval_dir(tmp_path / "B", items, b_answers, "B")
    out = tmp_path / "h2h"
    args = _args("--model", str(tmp_path / "A"), "--prompts", str(tiny / "prompts.jsonl"), "--out", str(out),
                 "--baseline", str(tmp_path / "B"), "--baseline", str(tiny / "m2"), "--rm", str(tiny / "rm"),
                 "--judge", str(tiny / "m1"), "--max-new-tokens", "12", "--template-en", SHORT_EN,
                 "--template-zh", SHORT_ZH, "--bootstrap", "300", "--no-plots")
    assert ev.run(args, CPU1) == 0
    rows, summary = _check_outputs(str(out), str(tiny / "prompts.jsonl"))
    h = summary["head_to_head"]
    assert h["model"] == "A" and set(h["vs"]) == {"rm", "judge"} and set(h["vs"]["rm"]) == {"B", "m2"}
    battles = [json.loads(l) for l in open(out / "head_to_head.jsonl")]
    # the generated baseline is kept as an evaluation of its own
    _check_outputs(str(out / "baselines" / "m2"), str(tiny / "prompts.jsonl"))
    m2 = [json.loads(l) for l in open(out / "baselines" / "m2" / "samples.jsonl")]

    # reward-model verdicts from the reward model's own scores
    rm = QualityRewardModel.from_pretrained(str(tiny / "rm")).eval()
    def q(i, a):
        return None if a is None else float(rm([items[i].prompt], [a])[0])

    for i, (r, a) in enumerate(zip(rows, a_answers)):
        assert (r["quality"] is None) == (a is None) and (a is None or r["quality"] == pytest.approx(q(i, a), abs=1e-5))
    want = []
    for i, (a, b) in enumerate(zip(a_answers, b_answers)):
        want.append(0.5 if a == b else 1.0 if b is None else 0.0 if a is None else float(q(i, a) > q(i, b)))
    got = [x["outcome"] for x in battles if x["judge"] == "rm" and x["baseline"] == "B"]
    assert got == want
    assert h["vs"]["rm"]["B"]["win"] == pytest.approx(want.count(1.0) / 5)
    assert h["vs"]["rm"]["B"]["tie"] == pytest.approx(want.count(0.5) / 5)
    # against the generated baseline: its answers decide (none, or any it managed to write)
    got = [x["outcome"] for x in battles if x["judge"] == "rm" and x["baseline"] == "m2"]
    for o, a, s in zip(got, a_answers, m2):
        if a is None or s["answer"] is None:
            assert o == ev.rm_outcome(a, s["answer"], None, None)

    # judge verdicts: both orders, from transformers' forward of the same texts
    from transformers import AutoModelForCausalLM
    from lwz.tokenizer import load_tokenizer
    hf = AutoModelForCausalLM.from_pretrained(str(tiny / "m1")).eval()
    tok = load_tokenizer(str(tiny / "m1"))
    a_id, b_id = tok.encode(" A", add_special_tokens=False)[0], tok.encode(" B", add_special_tokens=False)[0]

    def pref(question, x, y):
        text = ev.JUDGE_TEMPLATE.replace("{question}", question).replace("{a}", x).replace("{b}", y) + "\nAnswer:"
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0, -1].float(), -1)
        return float(lp[a_id] - lp[b_id])

    judged = [x for x in battles if x["judge"] == "judge" and x["baseline"] == "B"]
    asked = 0
    for x, it, a, b in zip(judged, items, a_answers, b_answers):
        if a is None or b is None:
            assert x["pref_model_first"] is None and x["outcome"] == (1.0 if b is None else 0.0)
            continue
        asked += 1
        first, second = pref(it.prompt, a, b), -pref(it.prompt, b, a)
        assert x["pref_model_first"] == pytest.approx(first, abs=1e-4)
        assert x["pref_model_second"] == pytest.approx(second, abs=1e-4)
        assert x["outcome"] == (1.0 if first > 0 and second > 0 else 0.0 if first < 0 and second < 0 else 0.5)
    assert asked == 3
    # Elo over the three models from the recorded battles; bootstrap intervals around it
    for kind in ("rm", "judge"):
        names = ["A", "B", "m2"]
        bt = [(0, names.index(x["baseline"]), x["outcome"]) for x in battles if x["judge"] == kind]
        want = ev.fit_elo(bt, 3)
        elo = h["elo"][kind]
        assert [elo[n]["elo"] for n in names] == pytest.approx(want)
        for n in names:
            assert elo[n]["ci"][0] <= elo[n]["elo"] + 1e-6 and elo[n]["elo"] - 1e-6 <= elo[n]["ci"][1]


def test_command_errors_are_one_line(tiny, tmp_path):
    p = str(tiny / "prompts.jsonl")
    cases = [
        (["--tp", "2"], PromptDataError, "--tp 2 must divide the processes per node"),
        (["--top-p", "0"], PromptDataError, "--top-p must be in (0, 1]"),
        (["--template-en", "no placeholder"], PromptDataError, "--template-en: the template must contain"),
        (["--baseline", str(tiny / "m2")], PromptDataError, "--baseline needs --rm or --judge"),
        (["--judge", str(tmp_path)], Exception, "no config.json there"),
    ]
    for extra, err, msg in cases:
        args = _args("--model", str(tiny / "m1"), "--prompts", p, "--out", str(tmp_path / "o"), *extra)
        with pytest.raises(err) as e:
            ev.run(args, CPU1)
        assert msg in str(e.value) and "\n" not in str(e.value)
    args = _args("--model", str(tmp_path / "nope"), "--prompts", p, "--out", str(tmp_path / "o"))
    with pytest.raises(Exception, match="folder not found"):
        ev.run(args, CPU1)
    # an earlier evaluation of other prompts cannot be a baseline
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "something else", "length": 100}\n')
    _crafted_eval_dir(tmp_path / "E", ev.load_eval_prompts(str(other)), ["x"], "E")
    args = _args("--model", str(tiny / "m1"), "--prompts", p, "--out", str(tmp_path / "o"), "--baseline",
                 str(tmp_path / "E"), "--rm", str(tiny / "rm"))
    with pytest.raises(PromptDataError, match="1 samples for 5 prompts"):
        ev.run(args, CPU1)
    assert not (tmp_path / "o").exists()  # every check runs before anything is written
    # a prompt the tiny model's 1024-token context cannot hold: named by file and line, up front
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "short", "length": 10}\n' + json.dumps({"prompt": "word " * 1500, "length": 10}) + "\n")
    args = _args("--model", str(tiny / "m1"), "--prompts", str(long), "--out", str(tmp_path / "o"))
    with pytest.raises(PromptDataError, match=re.escape(f"{long}:2 (")):
        ev.run(args, CPU1)
    with pytest.raises(PromptDataError, match="the following arguments are required: --model"):
        ev._parser().parse_args(["--prompts", p])


# ---- during training --------------------------------------------------------------------------------

def test_training_eval_refuses_the_training_prompts(tmp_path):
    from lwz.config import ConfigError, load_config
    from lwz.tokenizer import load_tokenizer
    train = os.path.join(ROOT, "data/tiny_prompts.jsonl")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(open(train, "rb").read())
    tok = load_tokenizer(TOKENIZER)
    for path in (train, str(copy)):
        cfg = load_config(os.path.join(ROOT, "configs/tiny.toml"), [f"--eval.prompts={path}"])
        with pytest.raises(ConfigError, match="is the training prompt file"):
            ev.training_eval_set(cfg, tok, [])
    for bad, msg in (("--eval.every=-1", "eval.every = -1 is not allowed: must be >= 0"),
                     ("--eval.max_new_tokens=0", "eval.max_new_tokens = 0 is not allowed: must be >= 1"),
                     ("--eval.prompts=", "eval.prompts = '' is not allowed")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(os.path.join(ROOT, "configs/tiny.toml"), [bad])


def test_eval_during_training_matches_the_checkpoint(tiny, tmp_path):
    """A short run evaluates the live policy every 2 steps and at the end; the last evaluation
    equals `python -m lwz.eval` on the run's final checkpoint (same weights, same sampling)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "lwz/train.py"), "--config",
                        os.path.join(ROOT, "configs/tiny.toml"), f"--logging.run_dir={tmp_path}", "--name=run",
                        "--logging.plot=true", "--rollout.max_new_tokens=16", "--rollout.prompts_per_step=2",
                        "--rollout.group_size=4", "--steps=3", "--checkpoint.every=3", "--checkpoint.export_hf=false",
                        f"--eval.prompts={tiny / 'prompts.jsonl'}", "--eval.every=2", "--eval.max_new_tokens=12"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [("eval/length_score" in x) for x in log] == [False, True, True]
    assert sorted(os.listdir(tmp_path / "run" / "eval")) == ["step_00000002", "step_00000003"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000  # with the eval panels
    live = tmp_path / "run" / "eval" / "step_00000003"
    rows, summary = _check_outputs(str(live), str(tiny / "prompts.jsonl"))
    assert log[2]["eval/format_ok_rate"] == summary["overall"]["format_ok_rate"]
    assert log[2]["eval/length_score"] == pytest.approx(summary["overall"]["length_score"])
    assert all(x["response_tokens"] <= 12 for x in rows)
    # the same evaluation from the checkpoint (the run's templates come with it)
    args = _args("--model", str(tmp_path / "run" / "checkpoints" / "step_00000003"), "--prompts",
                 str(tiny / "prompts.jsonl"), "--out", str(tmp_path / "ck"), "--max-new-tokens", "12", "--no-plots")
    assert ev.run(args, CPU1) == 0
    ck = [json.loads(l) for l in open(tmp_path / "ck" / "samples.jsonl")]
    assert [x["response"] for x in ck] == [x["response"] for x in rows]
