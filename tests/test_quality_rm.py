"""Quality reward model: parity with transformers' ...ForSequenceClassification, HF folder
round trips, the text path, and Bradley–Terry training on a learnable synthetic preference set."""

import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForSequenceClassification, LlamaConfig, Qwen2Config, Qwen3Config  # noqa: E402

from lwz.model import ModelLoadError  # noqa: E402
from lwz.rewards.quality import QualityRewardModel, pack_token_lists, token_budget_batches  # noqa: E402
from lwz.rewards import train_rm  # noqa: E402



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast on an idle CPU and far faster on a busy one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


V = 101
PAD = 0
ARCHS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}


def hf_config(arch, **over):
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, num_labels=1,
              max_position_embeddings=256)
    if arch == "qwen3":
        kw["head_dim"] = 16
    kw.update(over)
    return ARCHS[arch](**kw)


def make_hf(arch, folder, seed=0, **over):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(hf_config(arch, **over)).eval()
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # O(1) scores so the 1e-4 tolerance means something
    model.save_pretrained(folder)
    return model


def hf_scores(model, seqs, side="right"):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def rand_seqs(lens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_scores_match_transformers(arch, tmp_path):
    hf = make_hf(arch, tmp_path / "hf")
    ours = QualityRewardModel.from_pretrained(str(tmp_path / "hf")).eval()
    for lens, seed in [([5, 9, 1, 13], 0), ([17, 3, 3, 8, 30, 2], 1), ([7], 2)]:
        seqs = rand_seqs(lens, seed)
        with torch.no_grad():
            got = ours.score_packed(*pack_token_lists(seqs))
        assert got.shape == (len(lens),) and got.dtype == torch.float32
        for side in ("right", "left"):
            ref = hf_scores(hf, seqs, side)
            assert torch.allclose(got, ref, atol=1e-4, rtol=0), (arch, side, (got - ref).abs().max())
        # batching does not change a sequence's score
        alone = torch.cat([ours.score_packed(*pack_token_lists([s])) for s in seqs]).detach()
        assert torch.allclose(got, alone, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_save_pretrained_loads_in_transformers(arch, tmp_path):
    make_hf(arch, tmp_path / "hf", seed=3)
    ours = QualityRewardModel.from_pretrained(str(tmp_path / "hf")).eval()
    ours.save_pretrained(str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")
    assert cfg["pad_token_id"] == PAD and len(cfg["id2label"]) == 1
    hf2 = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(hf2).__name__ == cfg["architectures"][0]
    assert hf2.config.num_labels == 1
    seqs = rand_seqs([4, 11, 6], 5)
    with torch.no_grad():
        ours_s = ours.score_packed(*pack_token_lists(seqs))
    assert torch.allclose(hf_scores(hf2, seqs, "right"), ours_s, atol=1e-4, rtol=0)
    again = QualityRewardModel.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(again.score_packed(*pack_token_lists(seqs)), ours_s)


def test_bad_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        QualityRewardModel.from_pretrained(str(tmp_path / "nope"))
    torch.manual_seed(0)
    two = AutoModelForSequenceClassification.from_config(hf_config("llama", num_labels=2))
    two.save_pretrained(tmp_path / "two")
    with pytest.raises(ModelLoadError, match="one label"):
        QualityRewardModel.from_pretrained(str(tmp_path / "two"))
    # a causal LM folder has no score head: an error unless a new head is asked for
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_config(hf_config("qwen2"))
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ModelLoadError):
        QualityRewardModel.from_pretrained(str(tmp_path / "lm"))
    rm = QualityRewardModel.from_pretrained(str(tmp_path / "lm"), allow_new_head=True)
    sd = lm.state_dict()
    assert torch.equal(rm.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    assert rm.score.weight.abs().sum() > 0


# ---- text path ----------------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "good": 2, "bad": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(str(folder))
    return tok


def test_text_path_matches_transformers(tmp_path):
    folder = tmp_path / "rm"
    hf = make_hf("qwen3", folder, seed=7)
    tok = make_tokenizer(folder)
    rm = QualityRewardModel.from_pretrained(str(folder), template="plain").eval()
    assert rm.tokenizer is not None
    r = random.Random(0)
    prompts = [" ".join(r.choices(WORDS, k=3)) for _ in range(5)]
    answers = [" ".join(r.choices(WORDS, k=n)) for n in (4, 20, 9, 1, 13)]
    answers[2] = None
    meta = [{} for _ in prompts]
    meta[4] = {"question": "w1 w2"}  # the untemplated question wins over the prompt
    got = rm(prompts, answers, meta)
    assert got.shape == (5,) and got.dtype == torch.float32
    texts = {i: f"{meta[i].get('question') or prompts[i]}\n\n{answers[i]}" for i in (0, 1, 3, 4)}
    enc = tok([texts[i] for i in (0, 1, 3, 4)], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc).logits[:, 0]
    valid = got[[0, 1, 3, 4]]
    assert torch.allclose(valid, ref, atol=1e-4, rtol=0)
    assert got[2] == valid.min()                      # broken answer gets the batch minimum
    # a tiny token budget (many micro-batches) gives the same scores
    rm.max_tokens_per_batch = 8
    assert torch.allclose(rm(prompts, answers, meta), got, atol=1e-5)
    # a fixed floor
    rm.broken_score = -3.0
    assert rm(prompts, answers, meta)[2] == -3.0
    # a trailing pad id is stripped: same as HF's rightmost-non-pad rule
    assert rm.encode("w1", "w2 [PAD] [PAD]") == rm.encode("w1", "w2")
    # truncation keeps the head and the last 16 tokens
    rm.max_length = 40
    ids = rm.encode("w0", " ".join(WORDS))
    full = tok("w0\n\n" + " ".join(WORDS))["input_ids"]
    assert len(ids) == 40 and ids[:24] == full[:24] and ids[-16:] == full[-16:]


def test_helpers():
    ids, pos, cu, mx = pack_token_lists([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [5, 6, 7, 8, 9, 10] and pos.tolist() == [0, 1, 2, 0, 0, 1]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 6] and mx == 3
    batches = token_budget_batches([5, 1, 9, 3, 4], 9)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 1, 9, 3, 4][i] for i in b) <= 9 for b in batches)
    with pytest.raises(ValueError):
        pack_token_lists([[1], []])


# ---- Bradley–Terry training ---------------------------------------------------------------------


def write_pairs(path, n, seed=0):
    """Learnable rule: the chosen answer contains the word "good", the rejected one "bad"; the rest
    of each answer is random words of random length."""
    r = random.Random(seed)

    def answer(marker):
        ws = r.choices(WORDS, k=r.randint(6, 20))
        ws.insert(r.randrange(len(ws) + 1), marker)
        return " ".join(ws)

    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(r.choices(WORDS, k=r.randint(2, 5)))
            f.write(json.dumps({"prompt": prompt, "chosen": answer("good"), "rejected": answer("bad")}) + "\n")


def test_bt_training_learns_rule(tmp_path, capsys):
    make_tokenizer(tmp_path / "tok")
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
               max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_pairs(tmp_path / "pairs.jsonl", 400)
    out = tmp_path / "out"
    rc = train_rm.main(["--data", str(tmp_path / "pairs.jsonl"), "--init", str(tmp_path / "config.json"),
                        "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--steps", "120",
                        "--lr", "3e-3", "--batch-pairs", "16", "--eval-frac", "0.2", "--template", "plain",
                        "--max-tokens", "256", "--log-every", "40"])
    assert rc == 0
    metrics = json.loads((out / "train_rm_metrics.json").read_text())
    assert metrics["eval_n"] == 80
    assert metrics["eval_acc"] >= 0.9, metrics
    assert '"eval_acc"' in capsys.readouterr().out
    # the saved folder loads in transformers and in ours, with the tokenizer, giving the same scores
    rm = QualityRewardModel.from_pretrained(str(out)).eval()
    assert rm.template == "plain" and rm.tokenizer is not None
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    seqs = [rm.encode("w1 w2", "w3 good w4"), rm.encode("w1 w2", "w3 bad w4 w5 w6")]
    with torch.no_grad():
        ours = rm.score_packed(*pack_token_lists(seqs))
    assert torch.allclose(ours, hf_scores(hf, seqs), atol=1e-4, rtol=0)
    assert ours[0] > ours[1]
    # continue training from the saved folder (seq-cls init) for a couple of steps
    rc = train_rm.main(["--data", str(tmp_path / "pairs.jsonl"), "--init", str(out), "--out",
                        str(tmp_path / "out2"), "--steps", "2", "--batch-pairs", "4", "--log-every", "1"])
    assert rc == 0 and (tmp_path / "out2" / "config.json").is_file()


@pytest.mark.parametrize("line,msg", [
    ("{not json", "invalid JSON"),
    ('{"prompt": "p", "chosen": "c"}', "'rejected' must be a string"),
    ('["a", "b"]', "expected an object"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "'chosen' must be a string"),
])
def test_bad_jsonl_is_one_line_with_file_and_line(tmp_path, capsys, line, msg):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n' + line + "\n")
    with pytest.raises(train_rm.RMDataError, match=f"pairs.jsonl:3: .*{msg}"):
        train_rm.load_pairs(str(path))
    make_tokenizer(tmp_path / "tok")
    rc = train_rm.main(["--data", str(path), "--init", str(tmp_path / "config.json"),
                        "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{path}:3:" in err[0]


def test_config_file(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = train_rm.parse_args(["--config", os.path.join(root, "configs", "rm_tiny.toml"),
                                "--data", "d.jsonl", "--init", "i", "--out", "o", "--steps", "7"])
    assert args.steps == 7 and args.data == "d.jsonl"
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(SystemExit):
        train_rm.parse_args(["--config", str(bad), "--data", "d", "--init", "i", "--out", "o"])


def test_chat_template_path(tmp_path):
    folder = tmp_path / "rm"
    make_hf("qwen2", folder, seed=11)
    tok = make_tokenizer(folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} [PAD] {% endfor %}"
    tok.save_pretrained(str(folder))
    rm = QualityRewardModel.from_pretrained(str(folder)).eval()
    assert rm._template_kind() == "chat"                    # "auto" picks the tokenizer's template
    assert rm.render("w1", "w2 w3") == "w1 [PAD] w2 w3 [PAD] "
    ids = rm.encode("w1", "w2 w3")                           # trailing pad stripped
    assert ids == tok("w1 [PAD] w2 w3", add_special_tokens=False)["input_ids"]
    # transformers reads the rightmost non-pad token: same score on the unstripped text
    full = tok("w1 [PAD] w2 w3 [PAD]", add_special_tokens=False, return_tensors="pt")
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ref = hf(**full).logits[:, 0]
    assert torch.allclose(rm(["w1"], ["w2 w3"]), ref, atol=1e-4, rtol=0)
    rm.template = "Q: {prompt} A: {answer}"
    assert rm.render("w1", "w2") == "Q: w1 A: w2"
    rm.template = "no placeholders"
    with pytest.raises(ValueError, match="template"):
        rm.render("w1", "w2")


def test_train_rm_two_processes_matches_one(tmp_path):
    """torchrun with 2 processes (FSDP2, pairs balanced over the ranks): the same weights and
    held-out accuracy as one process, because each micro-batch's loss is divided by the step's
    pair count over every rank."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    make_tokenizer(tmp_path / "tok")
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
               max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_pairs(tmp_path / "pairs.jsonl", 120)
    args = ["--data", str(tmp_path / "pairs.jsonl"), "--init", str(tmp_path / "config.json"), "--tokenizer",
            str(tmp_path / "tok"), "--steps", "40", "--lr", "3e-3", "--batch-pairs", "16", "--eval-frac", "0.25",
            "--template", "plain", "--max-tokens", "128", "--log-every", "40", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lwz.rewards.train_rm", *args, "--out", str(tmp_path / "two")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('"eval_acc"') == 1  # rank 0 alone prints
    assert train_rm.main(args + ["--out", str(tmp_path / "one")]) == 0
    m1 = json.loads((tmp_path / "one" / "train_rm_metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "train_rm_metrics.json").read_text())
    assert m1["eval_n"] == m2["eval_n"] == 30
    assert m2["eval_acc"] == m1["eval_acc"] and m2["eval_acc"] >= 0.8, (m1, m2)
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], rel=1e-4)
    w1 = load_file(str(tmp_path / "one" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=2e-5, msg=k)
