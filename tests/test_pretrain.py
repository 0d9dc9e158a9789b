"""Continual pretraining: `lwz.data tokenize`, the packed mixed stream, the loss against a plain
per-document forward, 1 vs 2 ranks, exact resume, the held-out loss."""

import json
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lwz.data import main as data_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = os.path.join(ROOT, "assets/tokenizer")
MODEL = os.path.join(ROOT, "assets/tiny-model")
WORDS = ("the quiet river bends past old stone houses where lamps glow at dusk and children run home "
         "while a writer drafts the long chapter").split()


def _texts(n, seed, lo=3, hi=120):
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi))) for _ in range(n)]


def _write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def _tokenize(inputs, out, *extra):
    argv = ["tokenize", "--out", str(out), "--tokenizer", TOK, *extra]
    for i in inputs:
        argv += ["--in", str(i)]
    return data_main(argv)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two token folders: a 'writing' source of 60 documents and a 'think' source of 12."""
    d = tmp_path_factory.mktemp("corpus")
    _write_jsonl(d / "writing.jsonl", _texts(60, 1))
    _write_jsonl(d / "think.jsonl", [f"<think> plan {i} </think><answer> {t} </answer>"
                                     for i, t in enumerate(_texts(12, 2, 2, 20))])
    assert _tokenize([d / "writing.jsonl"], d / "tok_w") == 0
    assert _tokenize([d / "think.jsonl"], d / "tok_t") == 0
    return d


# ---- tokenize -------------------------------------------------------------------------------------

def test_tokenize_formats_index_and_rerun(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lwz.corpus import open_corpus
    from lwz.tokenizer import encode, load_tokenizer

    docs_j = _texts(7, 3)
    _write_jsonl(tmp_path / "a.jsonl", docs_j)
    with open(tmp_path / "a.jsonl", "a") as f:  # a bad line, a record without text, an empty text
        f.write("{not json\n" + json.dumps({"title": "x"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    (tmp_path / "b.txt").write_text("First block of the book.\n\nSecond block.\n")
    docs_p = _texts(3, 4)
    pq.write_table(pa.table({"body": docs_p, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    out = tmp_path / "tok"
    # a parquet file without the text column is refused before any work
    assert _tokenize([tmp_path / "c.parquet"], out) == 2
    assert "no column 'text'" in capsys.readouterr().err and not out.exists()
    assert _tokenize([tmp_path / "a.jsonl", tmp_path / "*.txt"], out, "--shard-tokens", "64") == 0
    printed = capsys.readouterr().out
    assert "bad records skipped: 2" in printed and "empty documents skipped: 1" in printed
    tok = load_tokenizer(TOK)
    c = open_corpus(str(out))
    want = docs_j + ["First block of the book.\n\nSecond block.\n"]  # a .txt file is one document
    assert len(c) == len(want) and len(c.tokens) > 1  # several shards of <= 64 tokens (or one long doc)
    for i, text in enumerate(want):
        got = c.piece(i, 0, int(c.lengths[i])).tolist()
        assert got == encode(tok, text) + [tok.eos_token_id]
    assert c.meta["num_tokens"] == int(c.lengths.sum()) == sum(x.size for x in c.tokens)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the build folder is gone

    # rerun: the same inputs are up to date, other inputs are refused, the folder is untouched
    before = sorted(os.listdir(out)), (out / "index.npy").read_bytes()
    assert _tokenize([tmp_path / "a.jsonl", tmp_path / "*.txt"], out, "--shard-tokens", "64") == 0
    assert "up to date" in capsys.readouterr().out
    assert _tokenize([tmp_path / "a.jsonl"], out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a different corpus" in err and "inputs" in err
    assert (sorted(os.listdir(out)), (out / "index.npy").read_bytes()) == before

    # parquet with --text-field, .txt split on blank lines
    out2 = tmp_path / "tok2"
    assert _tokenize([tmp_path / "c.parquet", tmp_path / "b.txt"], out2, "--text-field", "body",
                     "--txt-docs", "blank-line") == 0
    c2 = open_corpus(str(out2))
    want2 = docs_p + ["First block of the book.", "Second block.\n"]
    assert [c2.piece(i, 0, int(c2.lengths[i])).tolist() for i in range(len(c2))] == \
        [encode(tok, t) + [tok.eos_token_id] for t in want2]

    # an --out that is some other non-empty folder, a missing input: one line, nothing written
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert _tokenize([tmp_path / "a.jsonl"], tmp_path / "other") == 2
    assert _tokenize([tmp_path / "missing.jsonl"], tmp_path / "tok3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "holds no token corpus" in err[0] and "missing.jsonl: file not found" in err[1]
    assert not (tmp_path / "tok3").exists()


def test_damaged_token_folder_is_one_line(corpora, tmp_path):
    import shutil

    from lwz.corpus import CorpusError, open_corpus
    bad = tmp_path / "bad"
    shutil.copytree(corpora / "tok_w", bad)
    shard = bad / "tokens_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CorpusError, match="tokens_00000.bin: .* bytes, meta.json says"):
        open_corpus(str(bad))


# ---- the stream -----------------------------------------------------------------------------------

def _stream(corpora, weights=(0.8, 0.2), seq_len=64, share=0.1, seed=0):
    from lwz.corpus import CPTStream, open_corpus
    cs = [open_corpus(str(corpora / "tok_w")), open_corpus(str(corpora / "tok_t"))]
    return CPTStream(cs, list(weights), seq_len, share, seed)


def test_stream_covers_documents_mixes_and_resumes(corpora):
    s = _stream(corpora)
    held = [set(h.tolist()) for h in s.heldout_docs]
    assert len(held[0]) == 6 and len(held[1]) == 1
    mbs = s.next_microbatches(60)
    assert all(sum(p.length for p in mb) == 64 for mb in mbs)  # every micro-batch exactly full
    # each source's pieces, in order, rebuild whole documents (split ones continue where they
    # stopped), in its training order; no held-out document is ever trained on
    for k in (0, 1):
        pieces = [p for mb in mbs for p in mb if p.source == k]
        assert not {p.doc for p in pieces} & held[k]
        pos = {}
        for p in pieces:
            assert p.start == pos.get(p.doc, 0), "a piece must continue its document exactly"
            pos[p.doc] = (p.start + p.length) % int(s.corpora[k].lengths[p.doc])
    # token shares follow the weights (the deficit rule keeps them within one document)
    share = sum(p.length for mb in mbs for p in mb if p.source == 1) / (60 * 64)
    assert abs(share - 0.2) < 0.02
    # a stream loaded from another's state continues identically
    state = s.state_dict()
    a = s.next_microbatches(5)
    t = _stream(corpora)
    t.load_state_dict(json.loads(json.dumps(state)))  # it survives a round trip through plain data
    assert t.next_microbatches(5) == a


def _piece_logp_reference(model, ids):
    """Log-probs of ids[1:] given their prefix, one plain forward of this piece alone."""
    n = ids.numel()
    h = model(ids, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n)
    return torch.log_softmax(model.logits(h), -1)[:-1].gather(1, ids[1:, None])[:, 0]


def test_packed_loss_equals_per_document_forward(corpora):
    """The packed micro-batch's next-token log-probs, piece by piece, equal a forward of each piece
    alone: no attention across pieces, positions restart, targets are the next token within the
    piece (an off-by-one in any of them breaks this)."""
    from lwz.batch import microbatch
    from lwz.model import Transformer
    from lwz.pretrain import nll_sum, to_batch

    model = Transformer.from_config(MODEL, seed=3)
    s = _stream(corpora, seq_len=96, share=0.0)
    d = types.SimpleNamespace(device=torch.device("cpu"), world=1, rank=0)
    mb_pieces = s.next_microbatches(4)
    assert any(p.start > 0 for mb in mb_pieces for p in mb)  # some documents were split
    assert max(len(mb) for mb in mb_pieces) >= 3  # several documents packed together
    for pieces in mb_pieces:
        mb = microbatch(to_batch(s, pieces, d.device), list(range(len(pieces))), pad_id=1)
        logp, _ = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, targets=mb.targets)
        cu = mb.cu_seqlens.tolist()
        total = 0.0
        for j, (p, ids) in enumerate(zip(pieces, s.tokens(pieces))):
            ids = torch.from_numpy(ids.astype(np.int64))
            ref = _piece_logp_reference(model, ids)
            got = logp[cu[j]:cu[j + 1]]
            assert bool(mb.mask[cu[j + 1] - 1] == 0)  # a piece's last position predicts nothing
            torch.testing.assert_close(got[:-1], ref, rtol=1e-4, atol=1e-5)
            total += float(-ref.detach().sum())
        assert float(nll_sum(model, s, pieces, 1, d).detach()) == pytest.approx(total, rel=1e-5)


# ---- training: ranks, resume, held-out -------------------------------------------------------------

def _cfg(corpora, *extra):
    from lwz.config import CPTConfig, load_config
    return load_config(os.path.join(ROOT, "configs/cpt-tiny.toml"),
                       [f"--model.path={MODEL}", f"--tokenizer.path={TOK}",
                        f"--cpt.sources={corpora / 'tok_w'},{corpora / 'tok_t'}", "--cpt.weights=[0.8,0.2]",
                        "--cpt.seq_len=64", "--cpt.tokens_per_step=256", "--cpt.heldout_share=0.1", *extra],
                       root=CPTConfig)


def _rank_worker(rank, world, store, corpora, out_path):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from lwz import loop
    from lwz.corpus import targets_in
    from lwz.distributed import full_state_dict, init_distributed, shutdown_distributed
    from lwz.pretrain import train_step
    d = init_distributed("gloo")
    cfg = _cfg(corpora)
    model = loop.build_policy(cfg, d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.0)
    s = _stream(corpora)
    mbs = s.next_microbatches(4)
    stats = train_step(model, opt, s, mbs[rank::world], sum(targets_in(m) for m in mbs), cfg, d, 1)
    sd = full_state_dict(model)
    if rank == 0:
        torch.save({"sd": sd, "stats": stats}, out_path)
    shutdown_distributed(exit_code=0)


def test_one_and_two_ranks_give_the_same_update(corpora, tmp_path):
    res = []
    for world in (1, 2):
        out = str(tmp_path / f"w{world}.pt")
        mp.spawn(_rank_worker, args=(world, str(tmp_path / f"store{world}"), corpora, out), nprocs=world, join=True)
        res.append(torch.load(out))
    a, b = res
    assert a["stats"]["cpt_loss"] == pytest.approx(b["stats"]["cpt_loss"], rel=1e-6)
    assert a["stats"]["cpt_loss"] == pytest.approx(np.log(1024), rel=0.05)  # a random model: ~uniform
    assert a["stats"]["grad_norm"] == pytest.approx(b["stats"]["grad_norm"], rel=1e-5)
    # the gradient is the step's mean next-token loss over all its tokens (not a mean of
    # micro-batch means): its norm before clipping equals a plain model's on the whole step
    from lwz.model import Transformer
    from lwz.pretrain import nll_sum
    ref = Transformer.from_config(MODEL, seed=0)
    s = _stream(corpora)
    mbs = s.next_microbatches(4)
    d = types.SimpleNamespace(device=torch.device("cpu"), world=1, rank=0)
    n = sum(p.length - 1 for mb in mbs for p in mb)
    (sum(nll_sum(ref, s, mb, 1, d) for mb in mbs) / n).backward()
    gn = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    assert a["stats"]["grad_norm"] == pytest.approx(float(gn), rel=1e-4)
    init = Transformer.from_config(MODEL, seed=0).state_dict()
    for k in a["sd"]:
        torch.testing.assert_close(a["sd"][k], b["sd"][k], rtol=0, atol=1e-6, msg=k)
    assert max((a["sd"][k] - init[k]).abs().max().item() for k in init) > 1e-4  # the update moved weights


def _pretrain(tmp_path, corpora, name, *extra, nproc=1):
    cfg_args = ["--config", os.path.join(ROOT, "configs/cpt-tiny.toml"), f"--model.path={MODEL}",
                f"--tokenizer.path={TOK}", f"--cpt.sources={corpora / 'tok_w'},{corpora / 'tok_t'}",
                "--cpt.weights=[0.8,0.2]", "--cpt.seq_len=64", "--cpt.tokens_per_step=256",
                "--cpt.heldout_share=0.1", "--cpt.eval_every=2", "--cpt.eval_tokens=256", "--optim.warmup_steps=2",
                f"--logging.run_dir={tmp_path}", f"--name={name}", "--logging.plot=false", *extra]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(launcher + [os.path.join(ROOT, "lwz/pretrain.py")] + cfg_args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(tmp_path, name):
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(l) for l in f]


def test_exact_resume_and_heldout_loss(corpora, tmp_path):
    full = _pretrain(tmp_path, corpora, "full", "--steps=4", "--checkpoint.every=2")
    assert full.returncode == 0, full.stderr[-3000:]
    part = _pretrain(tmp_path, corpora, "part", "--steps=2", "--checkpoint.every=2", "--checkpoint.export_hf=false")
    assert part.returncode == 0, part.stderr[-3000:]
    res = _pretrain(tmp_path, corpora, "part", "--steps=4", "--checkpoint.every=2", "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step_00000002" in res.stdout
    a, b = _rows(tmp_path, "full"), _rows(tmp_path, "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert ["cpt_eval_loss" in r for r in a] == ["cpt_eval_loss" in r for r in b] == [False, True, False, True]
    for ra, rb in zip(a, b):
        for k in ("cpt_loss", "grad_norm", "lr", "tokens", "sequences", "source_share_1", "cpt_eval_loss"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    assert a[-1]["cpt_loss"] < a[0]["cpt_loss"]
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "full" / "hf" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "hf" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert os.path.isfile(tmp_path / "full" / "hf" / "tokenizer.json")  # exported with the tokenizer

    # the held-out loss: the mean next-token loss of the held-out documents under the exported model
    from lwz.model import Transformer
    model = Transformer.from_pretrained(str(tmp_path / "full" / "hf"))
    s = _stream(corpora)
    nll, n = 0.0, 0
    for mb in s.heldout_microbatches(256):
        for ids in s.tokens(mb):
            ids = torch.from_numpy(ids.astype(np.int64))
            if ids.numel() > 1:
                with torch.no_grad():
                    ref = _piece_logp_reference(model, ids)
                nll, n = nll - float(ref.sum()), n + ids.numel() - 1
    assert a[-1]["cpt_eval_tokens"] == n
    assert a[-1]["cpt_eval_loss"] == pytest.approx(nll / n, rel=1e-4)


def test_pretrain_start_up_errors_are_one_line(corpora, tmp_path):
    r = _pretrain(tmp_path, corpora, "x", f"--cpt.sources={tmp_path / 'nope'},{corpora / 'tok_t'}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "nope: token folder not found" in r.stderr
    r = _pretrain(tmp_path, corpora, "x", "--cpt.tokens_per_step=100")
    assert r.returncode == 2 and "cpt.tokens_per_step = 100" in r.stderr and "multiple of cpt.seq_len" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing written


def test_cpt_config_rules_and_tokenizer_check(corpora, tmp_path):
    import shutil

    from lwz.config import ConfigError
    from lwz.corpus import CorpusError
    from lwz.pretrain import micro_count, open_sources
    for extra, msg in [(["--cpt.weights=[1.0]"], "cpt.weights = [1.0] is not allowed: must be 2 numbers"),
                       (["--cpt.weights=[1.0,0]"], "cpt.weights[1] = 0.0 is not allowed: must be > 0"),
                       (["--cpt.heldout_share=0", "--cpt.eval_every=20"], "cpt.eval_every = 20 needs held-out documents"),
                       (["--cpt.sruces=x"], "unknown key 'cpt.sruces' (did you mean 'cpt.sources'?)"),
                       (["--rollout.group_size=4"], "unknown section 'rollout'")]:
        with pytest.raises(ConfigError) as e:
            _cfg(corpora, *extra)
        assert msg in str(e.value) and "\n" not in str(e.value)
    cfg = _cfg(corpora)
    assert micro_count(cfg, 2) == 2
    with pytest.raises(ConfigError, match="4 micro-batches .* multiple of the world size 3"):
        micro_count(cfg, 3)
    assert [len(c) for c in open_sources(cfg, 1024)] == [60, 12]
    with pytest.raises(CorpusError, match=r"holds token id \d+, beyond the model's vocabulary \(100\)"):
        open_sources(cfg, 100)
    # a token folder made with other tokenizer files than tokenizer.path
    other = tmp_path / "tok"
    shutil.copytree(TOK, other)
    (other / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text() + "\n")
    cfg.tokenizer.path = str(other)
    with pytest.raises(CorpusError, match=r"cpt.sources\[0\] = .* whose files differ from tokenizer.path"):
        open_sources(cfg, 1024)
