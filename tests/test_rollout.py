"""Rollout engine: greedy parity with transformers.generate, sampling log-probs == the trainer's
recomputation, stop strings / tokens / lengths, seeds, shared prefill, admission, host syncs, FSDP2."""

import math
import os

import pytest
import torch

from kernels.logprob import fused_logprobs
from lwz.batch import from_rollout, microbatch, padded_responses
from lwz.distributed import shutdown_distributed
from lwz.model import Transformer
from lwz.rollout import (
    EngineSettings, RolloutBatch, SamplingParams, full_params_for_generation, generate, logprob_mismatch,
)
from tests.test_model import tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LENS = [5, 17, 1, 30]


_SP = set(SamplingParams.__dataclass_fields__)
_ES = set(EngineSettings.__dataclass_fields__)


def gen(model, prompts, *, tokenizer=None, greedy=False, **kw):
    """generate() with the settings as keywords (SamplingParams' and EngineSettings' fields;
    greedy=True is temperature 0)."""
    bad = set(kw) - _SP - _ES
    assert not bad, bad
    sp = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if k in _SP}
    if greedy:
        sp["temperature"] = 0.0
    return generate(model, prompts, SamplingParams(**sp), EngineSettings(**{k: v for k, v in kw.items() if k in _ES}),
                    tokenizer=tokenizer)


def prompts_for(vocab, lens=PROMPT_LENS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def tiny():
    """Our tiny default model (assets/tiny-model, random weights) and the bundled tokenizer."""
    from lwz.tokenizer import load_tokenizer
    model = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0)
    # larger random weights than the init std: peakier, more varied distributions
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(5.0)
    return model, load_tokenizer(os.path.join(ROOT, "assets/tokenizer"))


# ---- parity with transformers -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,tied", [("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", False)])
def test_greedy_equals_transformers(tmp_path, kind, tied):
    hf = tiny_hf(kind, tied)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(str(tmp_path))
    prompts = prompts_for(hf.config.vocab_size)
    new = 24
    batch = gen(ours, prompts, max_new_tokens=new, greedy=True)
    hf.generation_config.eos_token_id = None  # never stop early: compare all `new` tokens
    hf.generation_config.pad_token_id = 0
    for i, p in enumerate(prompts):  # one prompt at a time: no padding on the HF side
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=new, min_new_tokens=new)
        assert batch.response_ids[i] == out[0, len(p):].tolist(), f"prompt {i}"
        assert batch.finish_reasons[i] == "length" and bool(batch.truncated[i])


# ---- log-probs -------------------------------------------------------------------------------------

def packed_rollout(rb, device=None):
    """The rollout as the trainer sees it: its lwz.batch.Batch (old log-probs = the sampler's, as
    with rollout.old_logprobs = "rollout") and one micro-batch of all its sequences in order."""
    batch = from_rollout(rb, torch.zeros(len(rb)), device)
    batch.old_logp = batch.rollout_logp
    return batch, microbatch(batch, list(range(len(rb))), rb.pad_id)


def trainer_logprobs(model, mb, temperature, impl="torch"):
    """[N] log-prob of each micro-batch position's target under `model`."""
    with torch.no_grad():
        hidden = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen)
        logp, _ = fused_logprobs(hidden, model.lm_head_weight, mb.targets, temperature=temperature, impl=impl)
    return logp


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 20)])
def test_logprobs_match_trainer_recomputation(tiny, top_p, top_k):
    model, tok = tiny
    T = 0.8
    prompts = prompts_for(1024, [9, 3, 21])
    batch = gen(model, prompts, n=3, max_new_tokens=40, temperature=T, top_p=top_p, top_k=top_k,
                     stop_token_ids=[0], seed=1)
    assert batch.response_logprobs.dtype == torch.float32
    tb, mb = packed_rollout(batch)
    logp = trainer_logprobs(model, mb, T)
    # the packed layout: targets are the response tokens, old log-probs the rollout's
    assert torch.equal(mb.targets[mb.resp_index], batch.response_tokens[batch.response_mask])
    assert torch.equal(mb.old_logp[mb.resp_index], batch.response_logprobs[batch.response_mask])
    assert int(mb.mask.sum()) == int(batch.response_lengths.sum())
    trainer = padded_responses(tb, logp[mb.resp_index], mb.seqs)
    stats = logprob_mismatch(batch.response_logprobs, trainer, batch.response_mask, batch.response_lengths)
    assert stats["tokens"] == int(batch.response_lengths.sum()) > 0
    assert stats["max"] <= 1e-4 and stats["mean"] <= stats["max"]
    assert stats["tokens/len<=256"] == stats["tokens"]
    if top_p == 1.0 and top_k == 0:
        assert torch.equal(batch.response_trunc_logprobs, batch.response_logprobs)
    else:  # renormalising over a subset raises every kept token's probability
        m = batch.response_mask
        assert (batch.response_trunc_logprobs[m] >= batch.response_logprobs[m] - 1e-6).all()
        assert (batch.response_trunc_logprobs[m] > batch.response_logprobs[m] + 1e-6).any()


def test_top_k_one_is_greedy(tiny):
    model, _ = tiny
    prompts = prompts_for(1024, [4, 11])
    a = gen(model, prompts, max_new_tokens=12, greedy=True)
    b = gen(model, prompts, max_new_tokens=12, temperature=1.3, top_k=1,
                 seed=5)
    assert a.response_ids == b.response_ids
    assert torch.allclose(b.response_trunc_logprobs, torch.zeros_like(b.response_trunc_logprobs))


def test_logprob_mismatch_buckets():
    lengths = torch.tensor([3, 300, 2000])
    L = 2000
    mask = torch.arange(L)[None, :] < lengths[:, None]
    a = torch.zeros(3, L)
    b = torch.zeros(3, L)
    b[0, :3] = 0.5
    b[1, 10] = 2.0
    b[2, :] = 1.0  # padding beyond length 2000: none; all 2000 count
    s = logprob_mismatch(a, b, mask, lengths)
    assert s["tokens"] == 2303 and s["max"] == 2.0
    assert math.isclose(s["mean"], (1.5 + 2.0 + 2000.0) / 2303, rel_tol=1e-6)
    assert s["tokens/len<=256"] == 3 and s["mean/len<=256"] == 0.5
    assert s["max/len<=1024"] == 2.0 and s["tokens/len<=1024"] == 300
    assert s["mean/len<=4096"] == 1.0
    assert "tokens/len<=16384" not in s and "tokens/len>16384" not in s


# ---- stop conditions --------------------------------------------------------------------------------

def test_stop_string_straddling_tokens(tiny):
    model, tok = tiny
    prompts = [tok.encode("Write a poem about the sea."), tok.encode("Hi")]
    free = gen(model, prompts, max_new_tokens=30, greedy=True)
    resp = free.response_ids[0]
    # a stop string that starts inside response token 6 and ends inside token 9
    pieces = [tok.decode(resp[:k]) for k in range(len(resp) + 1)]
    start, end = len(pieces[6]) + 1, len(pieces[9]) - 1
    text = pieces[-1]
    if not (start < len(pieces[7]) and end > len(pieces[8]) and "\ufffd" not in text[start:end]):
        pytest.skip("random model produced tokens too short to straddle")
    stop = text[start:end]
    first = next(k for k in range(len(resp)) if stop in pieces[k + 1])  # the completing token
    assert first == 9 or stop in pieces[9]  # an earlier occurrence is fine too
    out = gen(model, prompts, max_new_tokens=30, greedy=True, stop_strings=["never-there", stop],
                   tokenizer=tok)
    assert out.response_ids[0] == resp[:first + 1]
    assert out.finish_reasons[0] == "stop_string" and not bool(out.truncated[0])
    decoded = tok.decode(out.response_ids[0])
    assert stop in decoded and stop not in tok.decode(out.response_ids[0][:-1])
    # a raw tokenizers.Tokenizer works too, and so does the unfiltered path (string ending in a space)
    raw = gen(model, prompts, max_new_tokens=30, greedy=True, stop_strings=[stop],
                   tokenizer=tok.backend_tokenizer)
    assert raw.response_ids[0] == out.response_ids[0]
    ws = pieces[-1].find(" ", len(pieces[4]))
    if ws > 0:
        sp = pieces[-1][max(0, ws - 3):ws + 1]
        k = next(k for k in range(len(resp)) if sp in pieces[k + 1])
        w = gen(model, prompts[:1], max_new_tokens=30, greedy=True, stop_strings=[sp], tokenizer=tok)
        assert w.response_ids[0] == resp[:k + 1] and w.finish_reasons[0] == "stop_string"
    # the other prompt is unaffected unless it also produced the string
    if stop not in tok.decode(free.response_ids[1]):
        assert out.response_ids[1] == free.response_ids[1] and out.finish_reasons[1] == "length"
    # a stop string inside the prompt does not count
    assert gen(model, [prompts[0]], max_new_tokens=5, greedy=True, stop_strings=["poem"],
                    tokenizer=tok).finish_reasons[0] in ("length", "stop_string")
    with pytest.raises(ValueError, match="tokenizer"):
        gen(model, prompts, max_new_tokens=3, stop_strings=["x"])


def test_stop_token_and_truncation(tiny):
    model, _ = tiny
    prompts = prompts_for(1024, [6, 13])
    free = gen(model, prompts, max_new_tokens=20, greedy=True)
    assert free.truncated.all() and free.finish_reasons == ["length", "length"]
    assert free.response_lengths.tolist() == [20, 20]
    stop_tok = free.response_ids[0][7]
    first = free.response_ids[0].index(stop_tok)
    out = gen(model, prompts, max_new_tokens=20, greedy=True, stop_token_ids=[stop_tok])
    assert out.response_ids[0] == free.response_ids[0][:first + 1]  # the stop token is kept
    assert out.finish_reasons[0] == "stop_token" and not bool(out.truncated[0])
    assert out.response_lengths[0] == first + 1
    # the context bound truncates too: 13 + 4 = 17 tokens at most
    ctx = gen(model, prompts, max_new_tokens=20, greedy=True, max_context=17)
    assert ctx.response_lengths.tolist() == [11, 4] and ctx.truncated.all()
    assert ctx.response_ids[1] == free.response_ids[1][:4]


def test_empty_and_bad_prompts(tiny):
    model, _ = tiny
    empty = gen(model, [], n=4, max_new_tokens=8)
    assert isinstance(empty, RolloutBatch) and len(empty) == 0
    assert empty.response_tokens.shape[0] == 0 and empty.finish_reasons == []
    tb = from_rollout(empty, torch.zeros(0))
    assert tb.tokens.numel() == 0 and tb.cu_seqlens.tolist() == [0] and tb.num_response_tokens == 0
    with pytest.raises(ValueError, match=r"prompt 1 has 1024 tokens.*max_context=1024"):
        gen(model, [[1, 2], [3] * 1024], max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 0 has 10 tokens"):
        gen(model, [[3] * 10], max_new_tokens=8, max_context=10)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        gen(model, [[]], max_new_tokens=8)


# ---- determinism, shared prefill, admission, sync points ------------------------------------------------

def sample(model, prompts, seed, **kw):
    kw = {"n": 3, "max_new_tokens": 16, "temperature": 1.0, "stop_token_ids": [0], **kw}
    return gen(model, prompts, seed=seed, **kw)


def test_same_seed_same_samples(tiny):
    model, _ = tiny
    prompts = prompts_for(1024, [7, 2, 15])
    a, b, c = sample(model, prompts, 11), sample(model, prompts, 11), sample(model, prompts, 12)
    assert a.response_ids == b.response_ids
    assert torch.equal(a.response_logprobs, b.response_logprobs)
    assert a.response_ids != c.response_ids
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # samples of one prompt differ from each other (n draws, not one)
    assert len({tuple(r) for r in a.response_ids[:3]}) > 1


def test_counter_uniform_is_uniform_and_keyed():
    """The counter-based draws: a pure function of (seed, sample, position), uniform on (0, 1) and
    without correlation between neighbouring samples or positions."""
    from lwz.rollout import counter_uniform
    s = torch.arange(400).repeat_interleave(250)
    p = torch.arange(250).repeat(400)
    u = counter_uniform(7, s, p)
    assert u.dtype == torch.float32 and u.min() > 0 and u.max() < 1
    assert torch.equal(u, counter_uniform(7, s, p))
    assert torch.equal(u[:5], counter_uniform(7, s[:5].flip(0), p[:5].flip(0)).flip(0))  # order-free
    assert not torch.equal(u, counter_uniform(8, s, p)) and not torch.equal(u, counter_uniform(7 + 2**32, s, p))
    # Kolmogorov-Smirnov distance to U(0, 1): 1.63 / sqrt(n) is its 1% critical value
    n = u.numel()
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (ecdf - u.double().sort().values).abs().max()
    assert ks < 1.63 / n ** 0.5, ks
    # neighbours in either key are uncorrelated (|r| < 4 / sqrt(n) is far out for independent draws)
    grid = u.view(400, 250).double()
    for a, b in ((grid[1:], grid[:-1]), (grid[:, 1:], grid[:, :-1])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 4 / a.numel() ** 0.5, r


def test_n_samples_share_prefill(tiny):
    model, _ = tiny
    prompts = prompts_for(1024, [7, 19])
    shared = gen(model, prompts, n=3, max_new_tokens=15, greedy=True)
    copies = gen(model, [p for p in prompts for _ in range(3)], n=1, max_new_tokens=15, greedy=True)
    assert shared.response_ids == copies.response_ids
    assert torch.allclose(shared.response_logprobs, copies.response_logprobs, atol=1e-5)


@pytest.mark.parametrize("greedy", [False, True])
def test_samples_ignore_batch_size_sync_every_and_rows(tiny, monkeypatch, greedy):
    """What a sample draws depends on (seed, sample, position) and its own tokens only: not on how
    many rows decode at once (batch_size, so admission order and cache rows too), nor on how often
    the host looks (sync_every), nor on the batch buckets' padding rows, static or paged."""
    import lwz.rollout as ro
    model, _ = tiny
    prompts = prompts_for(1024, [7, 2, 15, 4, 9, 11, 3])
    stops = list(range(200)) if greedy else [0] + list(range(8, 60))  # answers of varied lengths
    kw = dict(n=2, max_new_tokens=20, stop_token_ids=stops, greedy=greedy)
    ref = sample(model, prompts, 9, **kw)
    assert len(set(ref.response_lengths.tolist())) > 2  # sequences finished at different rounds
    pads = []
    real = ro._Engine._round

    def spy(self, idx):
        pads.append(int((idx == self.R).sum()))
        return real(self, idx)

    monkeypatch.setattr(ro._Engine, "_round", spy)
    for es in (dict(sync_every=1), dict(sync_every=16), dict(batch_size=5, sync_every=1),
               dict(batch_size=5, sync_every=16), dict(batch_size=3, sync_every=4),
               dict(batch_size=5, sync_every=3, page_size=8)):
        out = sample(model, prompts, 9, **kw, **es)
        assert out.response_ids == ref.response_ids, es
        assert out.finish_reasons == ref.finish_reasons, es
        torch.testing.assert_close(out.response_logprobs, ref.response_logprobs, atol=1e-5, rtol=1e-5)
    assert any(pads)  # padded buckets really ran
    # and another seed draws other samples
    assert sample(model, prompts, 10, **kw).response_ids != ref.response_ids or greedy


def test_host_syncs_once_per_sync_every_rounds(tiny, monkeypatch):
    """The decode round has no host synchronisation point at all (no .item(), nonzero, boolean
    indexing or device->host copy: counted with a dispatch mode while rounds run), and the engine
    reads the device once per sync_every rounds (plus once to start)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import lwz.rollout as ro
    model, tok = tiny
    syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.item.default,
               torch.ops.aten._unique.default, torch.ops.aten._unique2.default,
               torch.ops.aten.unique_dim.default, torch.ops.aten.unique_consecutive.default}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to_host = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and any(
                isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args) and (
                kwargs.get("device") == torch.device("cpu") or (func is torch.ops.aten.copy_.default
                                                                and args[0].device.type == "cpu"))
            if func in syncing or to_host:
                self.hits.append(func)
            return func(*args, **kwargs)

    counter = Count()
    real_round, real_read = ro._Engine._round, ro._host_read
    reads = []

    def round_(self, idx):
        with counter:
            return real_round(self, idx)

    def read(t, pinned):
        reads.append(t.shape)
        return real_read(t, pinned)

    monkeypatch.setattr(ro._Engine, "_round", round_)
    monkeypatch.setattr(ro, "_host_read", read)
    prompts = prompts_for(1024, [7, 2, 15, 4])
    for every in (1, 8):
        reads.clear()
        out = sample(model, prompts, 3, n=2, max_new_tokens=30, batch_size=4, sync_every=every,
                     stop_token_ids=[0] + list(range(8, 40)), stop_strings=["ab"], tokenizer=tok)
        assert out.rounds > 16 and len(set(out.response_lengths.tolist())) > 2
        assert len(reads) == out.host_syncs
        # the first look is free (nothing runs yet); then one per window of <= sync_every rounds
        assert out.host_syncs <= math.ceil(out.rounds / every) + len(prompts) * 2, (every, out.host_syncs)
        if every > 1:
            assert out.host_syncs < out.rounds
    assert counter.hits == [], counter.hits[:5]
    # a deliberate sync inside the round is caught
    def syncing_round(self, idx):
        with counter:
            real_round(self, idx)
            return self.count[idx].sum().item()

    monkeypatch.setattr(ro._Engine, "_round", syncing_round)
    sample(model, prompts[:1], 3, n=1, max_new_tokens=3)
    assert counter.hits


def test_continuous_admission_refills_freed_rows(tiny, monkeypatch):
    """batch_size < number of samples: a finished sequence's row goes to the next waiting sample
    at the next sync, so the rounds stay full until the queue is empty; greedy results equal one
    batch holding everything; a prompt whose sibling is still decoding is copied, not prefilled."""
    model, _ = tiny
    prompts = prompts_for(1024, [7, 2, 15, 4, 9, 11, 3, 6])
    kw = dict(n=2, max_new_tokens=24, stop_token_ids=list(range(200)), greedy=True)
    prefilled = []
    real = Transformer.hidden_states

    def spy(self, ids, pos, cu, max_len, cache=None):
        if cache is not None and cache.lengths is None:
            prefilled.append(ids.numel())
        return real(self, ids, pos, cu, max_len, cache)

    whole = gen(model, prompts, **kw)
    monkeypatch.setattr(Transformer, "hidden_states", spy)
    slots = 4
    part = gen(model, prompts, batch_size=slots, sync_every=1, **kw)
    assert part.response_ids == whole.response_ids
    assert torch.allclose(part.response_logprobs, whole.response_logprobs, atol=1e-5)
    lens = part.response_lengths.tolist()
    assert len(set(lens)) > 2, lens
    # with sync_every = 1 a freed row is refilled before the next round: rounds ~ tokens / rows
    chunked = sum(max(lens[c:c + slots]) for c in range(0, len(lens), slots))
    assert part.rounds < chunked and part.rounds >= sum(lens) / slots, (part.rounds, chunked)
    # the prompt minus its last token (the first round's input) is prefilled once per prompt at
    # least, and less than twice over: siblings mostly copy
    need = sum(len(p) - 1 for p in prompts)
    assert need <= sum(prefilled) < 2 * need, (prefilled, need)
    one = gen(model, prompts[:3], batch_size=1, **kw)
    assert one.response_ids == whole.response_ids[:6]


def test_paged_cache_preempts_and_recomputes_when_pages_run_out(tiny):
    """With too few pages for every admitted sequence to grow, the latest admitted ones give their
    pages back and come back later by recomputing their tokens: the answers are unchanged."""
    model, _ = tiny
    prompts = prompts_for(1024, [7, 2, 15, 4, 9, 11, 3, 6])
    kw = dict(n=2, max_new_tokens=30, batch_size=6, greedy=True, stop_token_ids=list(range(200)))
    static = gen(model, prompts, **kw)
    lens = static.response_lengths.tolist()
    assert len(set(lens)) > 2 and max(lens) == 30, lens
    S = 15 + 30 - 1
    per_seq = -(-S // 4)
    paged = gen(model, prompts, page_size=4, num_pages=per_seq + 4, sync_every=4, **kw)
    assert paged.preemptions > 0
    assert paged.response_ids == static.response_ids
    torch.testing.assert_close(paged.response_logprobs, static.response_logprobs, atol=1e-4, rtol=1e-4)
    kw.update(greedy=False, stop_token_ids=[0])  # sampling, long answers: the pool runs short
    sampled = sample(model, prompts, 5, **kw)
    again = sample(model, prompts, 5, **kw, page_size=4, num_pages=per_seq + 4)
    assert again.preemptions > 0 and again.response_ids == sampled.response_ids
    # the pool must hold one whole sequence; the kernel's tile size bounds the page size
    with pytest.raises(ValueError, match=rf"pool of {per_seq - 1} pages of 4 tokens cannot hold one sequence"):
        gen(model, prompts, page_size=4, num_pages=per_seq - 1, **kw)
    with pytest.raises(ValueError, match="page_size=48: the triton decode kernel needs a multiple of 64"):
        gen(model, prompts, page_size=48, decode_kernel="triton", **kw)
    with pytest.raises(ValueError, match="generate: sync_every must be >= 1, got 0"):
        gen(model, prompts, sync_every=0, **kw)


def test_cache_rows_follow_batch_size_and_free_memory(tiny, monkeypatch):
    import lwz.rollout as ro
    model, _ = tiny
    tb = model.kv_bytes(1)
    cfg = model.config
    assert tb == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    row = 100 * tb
    assert ro.cache_rows(tb, 100, 12, 0, None, 0.9) == 12  # CPU: all
    assert ro.cache_rows(tb, 100, 12, 5, None, 0.9) == 5
    assert ro.cache_rows(tb, 100, 3, 5, None, 0.9) == 3
    # auto on a device: rows that fit in the fraction of the free memory, at most all samples
    assert ro.cache_rows(tb, 100, 12, 0, 10 * row, 0.5) == 5
    assert ro.cache_rows(tb, 100, 12, 0, 100 * row, 0.9) == 12
    with pytest.raises(ValueError, match=r"rollout.batch_size=0 \(auto\): one KV-cache row of 100 tokens"):
        ro.cache_rows(tb, 100, 12, 0, row, 0.5)
    with pytest.raises(ValueError, match=r"rollout.batch_size=8: 8 KV-cache rows of 100 tokens need"):
        ro.cache_rows(tb, 100, 12, 8, 7 * row, 0.9)
    # paged: every row's budget on the CPU, the free memory's pages (less the scratch page) on CUDA
    page = 16 * tb
    assert ro.cache_pages(tb, 100, 16, 3, None, 0.9) == 3 * 7
    assert ro.cache_pages(tb, 100, 16, 3, 40 * page, 0.5) == 19
    assert ro.cache_pages(tb, 100, 16, 3, 40 * page, 0.5, num_pages=9) == 9
    with pytest.raises(ValueError, match=r"pool of 5 pages of 16 tokens \(0.0 GiB free\) cannot hold one sequence"):
        ro.cache_pages(tb, 100, 16, 3, 12 * page, 0.5)
    # the padding row is budgeted too
    assert ro.cache_rows(tb, 100, 12, 0, 10 * row, 0.5, spare=1) == 4
    assert ro.cache_rows(tb, 100, 12, 7, 8 * row, 0.9, spare=1) == 7
    with pytest.raises(ValueError, match="rollout.batch_size=8"):
        ro.cache_rows(tb, 100, 12, 8, 8 * row, 0.9, spare=1)
    # generate with a budgeted device: batch_size 0 decodes through the rows that fit, same results
    prompts = prompts_for(1024, [7, 2, 15])
    kw = dict(n=2, max_new_tokens=12, greedy=True, stop_token_ids=list(range(200)))
    whole = gen(model, prompts, **kw)
    assert whole.cache_rows == 6
    S = 15 + 12 - 1
    monkeypatch.setattr(ro, "_free_bytes", lambda device: 4 * S * tb)
    budget = gen(model, prompts, cache_mem_fraction=0.8, **kw)
    assert budget.cache_rows == 2 and budget.response_ids == whole.response_ids
    with pytest.raises(ValueError, match="cache_mem_fraction"):
        gen(model, prompts, cache_mem_fraction=0.0, **kw)


def test_layout_for_packing(tiny):
    model, _ = tiny
    prompts = prompts_for(1024, [3, 8])
    b = sample(model, prompts, 2, n=2)
    Lp = 8
    assert b.prompt_tokens.shape == (4, Lp)
    assert b.prompt_starts.tolist() == [5, 5, 0, 0] and b.prompt_lengths.tolist() == [3, 3, 8, 8]
    assert b.prompt_ids == [prompts[0], prompts[0], prompts[1], prompts[1]]
    assert (b.prompt_tokens[:2, :5] == b.pad_id).all()
    for s in range(4):
        n = int(b.response_lengths[s])
        assert (b.response_tokens[s, n:] == b.pad_id).all() and (b.response_logprobs[s, n:] == 0).all()
        assert (b.response_logprobs[s, :n] <= 0).all()
        seq = b.sequence_tokens[s, int(b.sequence_starts[s]):int(b.sequence_starts[s]) + int(b.sequence_lengths[s])]
        assert seq.tolist() == b.prompt_ids[s] + b.response_ids[s]
    _, p = packed_rollout(b)
    assert p.cu_seqlens.dtype == torch.int32 and p.cu_seqlens[-1] == p.input_ids.numel()
    assert p.max_seqlen == int(b.sequence_lengths.max())
    s1 = slice(int(p.cu_seqlens[1]), int(p.cu_seqlens[2]))
    assert p.position_ids[s1].tolist() == list(range(int(b.sequence_lengths[1])))
    # the last token of each sequence predicts nothing, nor do prompt tokens but the last
    assert (p.targets[p.cu_seqlens[1:].long() - 1] == -100).all()
    assert (p.targets[:2] == -100).all() and p.targets[2] == b.response_tokens[0, 0]


# ---- FSDP2 -----------------------------------------------------------------------------------------------

def _fsdp_worker(rank, world, store, folder, prompts, expected):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    # a file store: no port to race for with other processes on the machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = Transformer.from_pretrained(folder)
        mesh = None
        if torch.cuda.is_available():  # stay a CPU test: FSDP2's default mesh would be a CUDA one
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with pytest.raises(ValueError, match="full_params_for_generation"):
            gen(model, prompts, max_new_tokens=6, greedy=True)
        with full_params_for_generation(model):
            out = gen(model, prompts, max_new_tokens=6, greedy=True)
        assert out.response_ids == expected, (rank, out.response_ids, expected)
        # resharded afterwards: parameters are DTensor shards again, and training forward works
        assert hasattr(model.layers[0].mlp.up_proj.weight, "to_local")
        ids = torch.tensor(prompts[0])
        h = model(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids))
        assert torch.isfinite(h).all()
        shutdown_distributed(exit_code=0)  # barrier, destroy, leave (see its docstring)
    finally:  # a failed assertion: no barrier the other rank may never reach
        shutdown_distributed(sync=False)


def test_generate_under_fsdp2(tmp_path):
    import torch.multiprocessing as mp
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path)
    model = Transformer.from_pretrained(str(tmp_path))
    prompts = prompts_for(203, [5, 9])
    # same thread count as the workers: a different reduction order could flip a near-tie in argmax
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = gen(model, prompts, max_new_tokens=6, greedy=True).response_ids
    finally:
        torch.set_num_threads(threads)
    store = str(tmp_path / "store")
    mp.spawn(_fsdp_worker, args=(2, store, str(tmp_path), prompts, expected), nprocs=2, join=True)


# ---- benchmark smoke test -------------------------------------------------------------------------------

def test_bench_rollout_tiny(tmp_path):
    import json
    from bench import bench_rollout
    out = tmp_path / "r.json"
    # the tiny CPU case even on a GPU machine (its CUDA default is the 1.5B shape)
    res = bench_rollout.main(["--model", "tiny", "--device", "cpu", "--prompts", "4", "--new-tokens", "8",
                              "--tail-prompts", "3", "--tail-group", "2",
                              "--tail-rows", "3", "--tail-max-new", "24", "--tail-mean", "8", "--grid", "3x6",
                              "--sync-every", "4", "--copy-mib", "8", "--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    for key in ("device", "torch", "transformers"):
        assert data[key]
    if os.path.isdir(os.path.join(ROOT, ".git")):  # a checkout without .git (the device copy) has none
        assert data["commit"]
    fixed, dec, tail = data["results"]
    assert fixed["scenario"] == "fixed-length" and tail["scenario"] == "long-tail"
    assert dec["scenario"] == "decode" and (dec["batch"], dec["new_tokens"]) == (3, 6)
    for k in ("engine_tokens_per_s", "plain_tokens_per_s", "engine_ms_per_round", "plain_ms_per_round",
              "decode_roofline_fraction", "copy_gb_per_s", "weight_gb", "kv_gb_per_round"):
        assert math.isfinite(dec[k]) and dec[k] > 0, k
    # the plain loop looks every round; the engine once per 4 rounds (+ the start)
    assert dec["plain_host_syncs"] == 6 and dec["engine_host_syncs"] == 2
    assert dec["roofline_ms"] == pytest.approx(1e3 * (dec["weight_gb"] + dec["kv_gb_per_round"]) / dec["copy_gb_per_s"])
    for k in ("lwz_tokens_per_s", "hf_tokens_per_s", "speedup"):
        assert math.isfinite(fixed[k]) and fixed[k] > 0
    for k in ("static_tokens_per_s", "continuous_tokens_per_s", "continuous_vs_static", "paged_tokens_per_s",
              "paged_vs_static"):
        assert math.isfinite(tail[k]) and tail[k] > 0
    assert tail["paged_preemptions"] >= 0
    assert tail["samples"] == 6 and 1 <= tail["continuous_mean_len"] <= tail["continuous_max_len"] <= 24
    for k in ("static", "continuous"):
        assert tail[f"{k}_rounds"] >= tail[f"{k}_max_len"] and 0 < tail[f"{k}_fill"] <= 1
    assert tail["paged_rounds"] >= tail["paged_max_len"] and tail["paged_fill"] > 0


# ---- pieces ---------------------------------------------------------------------------------------------

def test_attention_backend_follows_device_and_dtype():
    """The flash kernels take fp16/bf16 only: auto gives SDPA for an fp32 model on CUDA, and an
    explicit flash/varlen request with fp32 is one clear error (no CUDA needed to decide)."""
    import lwz.attention as attn
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attn.resolve_backend("auto", cpu, torch.bfloat16) == "sdpa"
    assert attn.resolve_backend("auto", cuda, torch.float32) == "sdpa"
    assert attn.decode_backend("auto", cuda, torch.float32) == "sdpa"
    if attn._torch_varlen is not None or attn._flash_varlen is not None:
        assert attn.resolve_backend("auto", cuda, torch.bfloat16) in ("flash", "varlen")
        assert attn.decode_backend("auto", cuda, torch.float16) in ("flash", "varlen", "triton")
    if attn._torch_varlen is not None:
        with pytest.raises(ValueError, match=r"model.attn_backend='varlen' needs fp16/bf16 tensors"):
            attn.resolve_backend("varlen", cuda, torch.float32)


def test_decode_attention_sdpa_matches_reference():
    from lwz.attention import decode_attention, decode_backend
    assert decode_backend("auto", torch.device("cpu")) == "sdpa"
    g = torch.Generator().manual_seed(0)
    R, S, Hq, Hkv, D = 5, 12, 6, 2, 8
    kc, vc = torch.randn(R, S, Hkv, D, generator=g), torch.randn(R, S, Hkv, D, generator=g)
    rows = torch.tensor([3, 0, 4])
    lengths = torch.tensor([7, 1, 12])
    q = torch.randn(3, Hq, D, generator=g)
    out = decode_attention(q, kc, vc, lengths, 0.3, rows=rows, max_length=12)
    for b in range(3):
        r, L = int(rows[b]), int(lengths[b])
        k = kc[r, :L].repeat_interleave(Hq // Hkv, dim=1)  # [L, Hq, D]
        v = vc[r, :L].repeat_interleave(Hq // Hkv, dim=1)
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[b], k) * 0.3, dim=-1)
        torch.testing.assert_close(out[b], torch.einsum("hl,lhd->hd", w, v), atol=1e-5, rtol=1e-5)
    # compacted layout (rows=None) gives the same
    dense = decode_attention(q, kc[rows], vc[rows], lengths, 0.3)
    torch.testing.assert_close(dense, out, atol=1e-6, rtol=1e-6)


def test_sampling_logits_accumulate_in_fp32(tiny):
    """model.logits of a bf16 model: the fp32 product of the bf16 operands (as the trainer's
    log-prob kernel accumulates it), not the product rounded to bf16 first."""
    import torch.nn.functional as F
    model, _ = tiny
    m16 = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0)
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    h = torch.randn(7, m16.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = m16.logits(h)
    ref = h.double() @ m16.lm_head_weight.double().t()
    assert out.dtype == torch.float32 and out.shape == (7, m16.config.vocab_size)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    rounded = F.linear(h, m16.lm_head_weight).double()  # what sampling used before
    assert (rounded - ref).abs().max() > 100 * (out.double() - ref).abs().max()


def test_bf16_generation_runs_and_logprobs_are_close(tiny):
    model, _ = tiny
    m16 = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0)
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.bfloat16)
    b = gen(m16, prompts_for(1024, [5, 12]), n=2, max_new_tokens=12, temperature=0.8,
                 seed=0)
    assert b.response_logprobs.dtype == torch.float32 and torch.isfinite(b.response_logprobs).all()
    tb, mb = packed_rollout(b)
    trainer = padded_responses(tb, trainer_logprobs(m16, mb, 0.8)[mb.resp_index], mb.seqs)
    stats = logprob_mismatch(b.response_logprobs, trainer, b.response_mask, b.response_lengths)
    assert stats["mean"] < 0.1, stats  # bf16: same math, different rounding of decode vs packed


# ---- CUDA (skipped here; run by the device check) ---------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kernel", ["flash", "varlen", "triton"])
def test_cuda_decode_attention_matches_sdpa(kernel):
    import lwz.attention as attn
    from lwz.attention import decode_attention
    dev = torch.device("cuda")
    if kernel == "flash" and attn._flash_kvcache is None:
        pytest.skip("flash-attn is not installed")
    if kernel == "varlen" and not {"block_table", "seqused_k", "enable_gqa"} <= attn._VARLEN_PARAMS:
        pytest.skip("this torch's varlen_attn has no block_table / seqused_k")
    g = torch.Generator(device=dev).manual_seed(0)
    R, S, Hq, Hkv, D = 6, 512, 12, 2, 128
    kc = torch.randn(R, S, Hkv, D, generator=g, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(R, S, Hkv, D, generator=g, device=dev, dtype=torch.bfloat16)
    q = torch.randn(4, Hq, D, generator=g, device=dev, dtype=torch.bfloat16)
    rows = torch.tensor([5, 0, 2, 3], device=dev)
    lengths = torch.tensor([300, 1, 512, 77], device=dev)
    ref = decode_attention(q.float(), kc.float(), vc.float(), lengths, D ** -0.5, rows=rows, kernel="sdpa")
    out = decode_attention(q, kc, vc, lengths, D ** -0.5, rows=rows, kernel=kernel)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.parametrize("page_size", [0, 256])
def test_cuda_graph_rounds_match_eager(tiny, page_size):
    """Rounds replayed from CUDA graphs give the eager rounds' tokens and log-probs (bf16), on the
    static cache and on a paged one (256-token pages suit every CUDA decode kernel), and the host
    looks once per sync_every rounds at most."""
    import lwz.rollout as ro
    model, _ = tiny
    m = _bf16_cuda_copy(model)
    prompts = prompts_for(1024, [7, 2, 15, 4, 9, 11, 3])
    kw = dict(n=2, max_new_tokens=40, batch_size=5, stop_token_ids=[0] + list(range(8, 40)), seed=3)
    runs = {}
    for graphs in (False, True):
        runs[graphs] = gen(m, prompts, cuda_graphs=graphs, page_size=page_size if graphs else 0, **kw)
    assert not ro._GRAPHS_FAILED, ro._GRAPHS_FAILED
    _assert_bf16_runs_agree(runs[False], runs[True])


@cuda
@pytest.mark.parametrize("page_size", [0, 256])
def test_cuda_sync_every_does_not_change_samples(tiny, page_size):
    """sync_every 1 and 16 on CUDA (graphs, pinned-memory reads) sample the same answers."""
    import lwz.rollout as ro
    model, _ = tiny
    m = _bf16_cuda_copy(model)
    prompts = prompts_for(1024, [7, 2, 15, 4, 9, 11, 3])
    kw = dict(n=2, max_new_tokens=40, batch_size=5, stop_token_ids=[0] + list(range(8, 40)), page_size=page_size,
              seed=3)
    runs = {every: gen(m, prompts, sync_every=every, **kw) for every in (1, 16)}
    assert not ro._GRAPHS_FAILED, ro._GRAPHS_FAILED
    _assert_bf16_runs_agree(runs[1], runs[16])
    assert runs[16].host_syncs <= runs[16].rounds / 16 + 2 * len(prompts)


def _bf16_cuda_copy(model):
    """The tiny model's weights in a bf16 model built on the GPU."""
    m = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0, dtype=torch.bfloat16,
                                device="cuda")
    m.load_state_dict(model.state_dict())
    return m


def _assert_bf16_runs_agree(a, b):
    """Two bf16 CUDA rollouts of the same prompts and seed that may batch their steps differently:
    not bit for bit (padded GEMMs and whole-cache attention splits round differently in bf16, and a
    near-tie can then draw another token), but up to the first differing token they agree."""
    same = sum(x == y for x, y in zip(a.response_ids, b.response_ids))
    assert same >= 0.8 * len(a.response_ids), (a.response_ids, b.response_ids)
    diffs = []
    for s, (x, y) in enumerate(zip(a.response_ids, b.response_ids)):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        diffs.append((a.response_logprobs[s, :k] - b.response_logprobs[s, :k]).abs())
    d = torch.cat(diffs)
    assert d.numel() > 50 and d.mean() < 0.02 and d.max() < 0.2, (d.mean(), d.max())


@cuda
def test_cuda_generate_logprobs_match_trainer(tiny):
    model, _ = tiny
    m = Transformer.from_config(os.path.join(ROOT, "assets/tiny-model"), seed=0)
    m.load_state_dict(model.state_dict())
    m = m.to(device="cuda", dtype=torch.bfloat16)
    b = gen(m, prompts_for(1024, [5, 40, 17]), n=4, max_new_tokens=64, temperature=0.8,
                 stop_token_ids=[0], seed=0)
    tb, mb = packed_rollout(b, "cuda")
    lp = trainer_logprobs(m, mb, 0.8, impl="auto")
    stats = logprob_mismatch(b.response_logprobs, padded_responses(tb, lp[mb.resp_index], mb.seqs).cpu(),
                             b.response_mask, b.response_lengths)
    assert stats["mean"] < 0.05, stats
    # the same run on the SDPA path samples (nearly: bf16 rounding may flip a near-tie) the same tokens
    m.set_attn_backend("sdpa")
    s = gen(m, prompts_for(1024, [5, 40, 17]), n=4, max_new_tokens=64, temperature=0.8,
                 stop_token_ids=[0], seed=0)
    same = sum(x[:2] == y[:2] for x, y in zip(s.response_ids, b.response_ids))
    assert same >= 0.8 * len(b), (s.response_ids, b.response_ids)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7)])
def test_sampler_draws_from_the_stated_distribution(top_k, top_p):
    from lwz.rollout import _sample
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    tok, logp, tlogp = _sample(logits, torch.rand(logits.shape[0], generator=g), 0.7, top_k, top_p)
    p_full = torch.softmax(logits[0] / 0.7, -1)
    keep = torch.ones(6, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1:
        keep = (p_full.cumsum(0) - p_full) < top_p
    p_trunc = torch.where(keep, p_full, 0.0) / p_full[keep].sum()
    freq = torch.bincount(tok, minlength=6).float() / tok.numel()
    assert (freq - p_trunc).abs().max() < 0.01, (freq, p_trunc)
    torch.testing.assert_close(logp, p_full.log()[tok])
    torch.testing.assert_close(tlogp, p_trunc.log()[tok])
