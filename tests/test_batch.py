"""The step's flat tensor batch (lwz.batch): one GRPO micro-batch against transformers' Qwen2 run on
each sequence alone, micro-batch fields against a per-sequence reference, the rollout -> batch
conversion, the tensor exchange across 2 gloo ranks, and the planner's cost."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import transformers as tf

import lwz.batch as B
from lwz.batch import Batch, exchange, from_rollout, gather_response_values, microbatch, padded_responses
from lwz.distributed import shutdown_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_RESPONSE = [(9, 5), (4, 17), (12, 1), (6, 30), (3, 11)]  # different lengths, one 1-token answer


def make_batch(vocab=203, seed=0, pr=PROMPT_RESPONSE, with_old=True, with_ref=True) -> tuple[Batch, list]:
    """A Batch of random sequences and the same data as per-sequence tuples
    (tokens int64 [L], n_prompt, advantage, rollout/old/ref log-probs [Lr] or None)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for p, r in pr:
        lp = lambda: -3.0 + torch.randn(r, generator=g)  # noqa: E731
        seqs.append((torch.randint(2, vocab, (p + r,), generator=g), p, float(torch.randn(1, generator=g)), lp(),
                     lp() if with_old else None, lp() if with_ref else None))
    lengths = torch.tensor([len(s[0]) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    cat = lambda k: torch.cat([s[k] for s in seqs]) if seqs[0][k] is not None else None  # noqa: E731
    batch = Batch(tokens=cat(0).to(torch.int32), cu_seqlens=cu, prompt_lengths=torch.tensor([s[1] for s in seqs]),
                  advantages=torch.tensor([s[2] for s in seqs]), rollout_logp=cat(3), old_logp=cat(4),
                  ref_logp=cat(5))
    return batch, seqs


# ---- one GRPO micro-batch against transformers ---------------------------------------------------

CLIP_LOW, CLIP_HIGH, KL_COEF, TEMP = 0.2, 0.28, 0.1, 0.8


def tiny_qwen2():
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=203, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=256, rope_theta=1e4)
    model = tf.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases and norms, so a missed one would show
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return model.float()


def hf_response_logprobs(hf, seqs):
    """Each sequence alone through HF: log softmax(logits / T) at the next token, response part."""
    out = []
    for toks, P, *_ in seqs:
        logits = hf(input_ids=toks[None]).logits[0].float()
        logp = torch.log_softmax(logits / TEMP, -1)
        # logits at position t predict token t + 1: the response tokens toks[P:] are predicted at P-1 .. L-2
        out.append(logp[P - 1:-1].gather(1, toks[P:, None])[:, 0])
    return out


def plain_grpo_loss(logp, old, ref, adv, n_tokens):
    """Token-mean clipped GRPO loss with the k3 KL, written out in plain torch."""
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH) * adv)
    d = ref - logp
    kl = torch.exp(d) - d - 1
    return (pg + KL_COEF * kl).sum() / n_tokens


def packed_grpo_loss(model, batch, seqs_idx):
    from kernels.grpo_loss import grpo_loss
    mb = microbatch(batch, seqs_idx, pad_id=1)
    logp, _ = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, targets=mb.targets,
                    temperature=TEMP)
    loss, _ = grpo_loss(logp, mb.old_logp, mb.advantages, mb.mask, mb.ref_logp, clip_low=CLIP_LOW,
                        clip_high=CLIP_HIGH, kl_coef=KL_COEF, kl_type="k3", loss_agg="token-mean",
                        global_tokens=batch.num_response_tokens, cu_seqlens=mb.cu_seqlens)
    return loss


@pytest.mark.parametrize("shift", [1, 0, 2])
def test_packed_microbatch_matches_hf_per_sequence(tmp_path, monkeypatch, shift):
    """Loss and every parameter gradient of one packed micro-batch (sequences in planner order) equal
    transformers' Qwen2ForCausalLM run on each sequence alone with the loss in plain torch. With the
    targets shifted by one too few or too many (shift 0 / 2), the comparison fails."""
    from lwz.model import Transformer
    if shift != 1:
        monkeypatch.setattr(B, "next_tokens", lambda ids: ids.roll(-shift))
    hf = tiny_qwen2()
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    batch, seqs = make_batch()
    # old/ref log-probs near the model's own, so some ratios fall inside and some outside the clip
    with torch.no_grad():
        true = hf_response_logprobs(hf, seqs)
    g = torch.Generator().manual_seed(5)
    old = [t + 0.3 * torch.randn(t.shape, generator=g) for t in true]
    ref = [t + 0.2 * torch.randn(t.shape, generator=g) for t in true]
    batch.old_logp, batch.ref_logp = torch.cat(old), torch.cat(ref)

    hf.zero_grad()
    logp = hf_response_logprobs(hf, seqs)
    adv = torch.cat([torch.full((len(lp),), s[2]) for lp, s in zip(logp, seqs)])
    want = plain_grpo_loss(torch.cat(logp), batch.old_logp, batch.ref_logp, adv, batch.num_response_tokens)
    want.backward()
    ratio = torch.exp(torch.cat(true) - batch.old_logp)
    assert ((ratio < 1 - CLIP_LOW) | (ratio > 1 + CLIP_HIGH)).any() and ((ratio - 1).abs() < 0.1).any()

    got = packed_grpo_loss(ours, batch, [3, 0, 4, 2, 1])
    got.backward()
    hf_grads = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    hf_grads["lm_head_weight"] = hf_grads.pop("lm_head.weight")

    def check():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for n, p in ours.named_parameters():
            gw = hf_grads["lm_head_weight" if n.startswith("lm_head") else n]
            torch.testing.assert_close(p.grad, gw, rtol=1e-5, atol=1e-5 * gw.abs().max().item(), msg=n)

    if shift == 1:
        check()
    else:
        with pytest.raises(AssertionError):
            check()


# ---- micro-batch fields against a per-sequence reference ----------------------------------------

def reference_microbatch(seqs, order):
    """Loop-and-slice reference of a packed micro-batch (what a per-sample packer builds)."""
    ids, pos, tgt, adv, old, ref, cu = [], [], [], [], [], [], [0]
    for i in order:
        toks, P, a, _, o, r = seqs[i]
        L = len(toks)
        t = torch.full((L,), -100)
        t[P - 1:L - 1] = toks[P:]
        ids.append(toks), pos.append(torch.arange(L)), tgt.append(t), cu.append(cu[-1] + L)
        for dst, val in ((adv, torch.full((L - P,), a)), (old, o), (ref, r)):
            x = torch.zeros(L)
            x[P - 1:L - 1] = val
            dst.append(x)
    return dict(ids=torch.cat(ids), pos=torch.cat(pos), targets=torch.cat(tgt), adv=torch.cat(adv),
                old=torch.cat(old), ref=torch.cat(ref), cu=torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [3, 0, 4], [2], [4, 2, 1, 0]])
def test_microbatch_fields_match_per_sequence_reference(order):
    batch, seqs = make_batch(seed=order[0])
    mb = microbatch(batch, order, pad_id=1)
    want = reference_microbatch(seqs, order)
    assert mb.input_ids.dtype == torch.int64 and torch.equal(mb.input_ids, want["ids"])
    assert torch.equal(mb.position_ids, want["pos"]) and torch.equal(mb.targets, want["targets"])
    assert mb.cu_seqlens.dtype == torch.int32 and torch.equal(mb.cu_seqlens, want["cu"])
    assert mb.max_seqlen == max(len(seqs[i][0]) for i in order)
    for k, v in (("advantages", "adv"), ("old_logp", "old"), ("ref_logp", "ref")):
        assert torch.equal(getattr(mb, k), want[v]), k
    # resp_index takes packed per-token values back to the batch's response alignment
    rollout = torch.cat([seqs[i][3] for i in order])
    packed = torch.zeros(mb.input_ids.numel())
    packed[mb.targets != -100] = rollout
    assert torch.equal(packed[mb.resp_index], rollout)
    assert mb.seqs == order


def test_empty_microbatch_is_one_masked_token():
    batch, _ = make_batch(with_ref=False)
    mb = microbatch(batch, [], pad_id=7)
    assert mb.input_ids.tolist() == [7] and mb.targets.tolist() == [-100] and mb.cu_seqlens.tolist() == [0, 1]
    assert mb.old_logp.tolist() == [0.0] and mb.ref_logp is None and mb.resp_index.numel() == 0


def test_from_rollout_matches_the_padded_rows():
    """RolloutBatch (left-padded prompts, right-padded responses) -> flat batch, sample order kept."""
    from lwz.rollout import RolloutBatch
    g = torch.Generator().manual_seed(2)
    Lp, Lr, pad = 6, 9, 1
    plen, rlen = torch.tensor([6, 2, 4]), torch.tensor([9, 0, 3])
    pt = torch.full((3, Lp), pad)
    rt = torch.full((3, Lr), pad)
    lp = torch.zeros(3, Lr)
    want_tokens, want_logp = [], []
    for s in range(3):
        p = torch.randint(2, 100, (int(plen[s]),), generator=g)
        r = torch.randint(2, 100, (int(rlen[s]),), generator=g)
        pt[s, Lp - len(p):], rt[s, :len(r)] = p, r
        lp[s, :len(r)] = -torch.rand(len(r), generator=g)
        want_tokens += [p, r]
        want_logp.append(lp[s, :len(r)])
    rb = RolloutBatch(prompt_index=torch.tensor([0, 0, 1]), prompt_tokens=pt, prompt_starts=Lp - plen,
                      prompt_lengths=plen, response_tokens=rt, response_lengths=rlen, response_logprobs=lp,
                      response_trunc_logprobs=lp, truncated=torch.zeros(3, dtype=torch.bool), pad_id=pad)
    batch = from_rollout(rb, torch.tensor([0.5, -1.0, 0.25]))
    assert batch.tokens.dtype == torch.int32 and torch.equal(batch.tokens.long(), torch.cat(want_tokens))
    assert batch.cu_seqlens.tolist() == [0, 15, 17, 24] and batch.prompt_lengths.tolist() == [6, 2, 4]
    assert batch.response_lengths.tolist() == [9, 0, 3] and batch.resp_cu.tolist() == [0, 9, 9, 12]
    assert torch.equal(batch.rollout_logp, torch.cat(want_logp))
    assert torch.equal(padded_responses(batch, batch.rollout_logp, [0, 2]), lp[[0, 2]])


def test_bad_batch_is_one_clear_error():
    batch, _ = make_batch()
    with pytest.raises(ValueError, match="old_logp must hold one value per response token \\(64\\), got 63"):
        Batch(batch.tokens, batch.cu_seqlens, batch.prompt_lengths, batch.advantages, batch.rollout_logp,
              old_logp=batch.old_logp[1:])
    with pytest.raises(ValueError, match="sequence 1 has an empty prompt"):
        Batch(batch.tokens, batch.cu_seqlens, torch.tensor([9, 0, 12, 6, 3]), batch.advantages,
              torch.zeros(int(batch.lengths.sum()) - 30))
    with pytest.raises(ValueError, match="advantages must be \\[S\\] = \\[5\\], got 4"):
        Batch(batch.tokens, batch.cu_seqlens, batch.prompt_lengths, batch.advantages[:4], batch.rollout_logp)


# ---- exchange across ranks -----------------------------------------------------------------------

def _exchange_worker(rank, world, store, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # rank 0 holds 3 sequences, rank 1 holds 2 (different sizes: the padded gather must cut them)
    mine, _ = make_batch(seed=11 + rank, pr=PROMPT_RESPONSE[:3] if rank == 0 else PROMPT_RESPONSE[3:],
                         with_old=False, with_ref=False)
    full = exchange(mine, world)
    # each rank "computes" old log-probs for its share of a plan; every rank gets all of them
    plan = [[[4, 0], [2]], [[1, 3], []]]
    mbs = [microbatch(full, seqs, pad_id=1) for seqs in plan[rank]]
    vals = [2.0 * full.rollout_logp[torch.cat([torch.arange(int(full.resp_cu[i]), int(full.resp_cu[i + 1]))
                                                for i in mb.seqs]).long()] if mb.seqs else torch.zeros(0)
            for mb in mbs]
    got = gather_response_values(full, plan, torch.cat(vals), world, rank)
    part = gather_response_values(full, [[[3]], [[0]]], full.rollout_logp[full.resp_cu[3 - 3 * rank]:
                                                                          full.resp_cu[4 - 3 * rank]], world, rank)
    torch.save(dict(full=full, got=got, part=part), f"{out}.{rank}")
    shutdown_distributed(exit_code=0)


def test_exchange_and_gather_across_two_ranks(tmp_path):
    out = str(tmp_path / "x")
    mp.spawn(_exchange_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    a, b = (make_batch(seed=11 + r, pr=PROMPT_RESPONSE[:3] if r == 0 else PROMPT_RESPONSE[3:], with_old=False,
                       with_ref=False)[0] for r in range(2))
    for r in range(2):
        res = torch.load(f"{out}.{r}", weights_only=False)
        full = res["full"]
        assert torch.equal(full.tokens, torch.cat([a.tokens, b.tokens]))
        assert torch.equal(full.lengths, torch.cat([a.lengths, b.lengths]))
        assert torch.equal(full.prompt_lengths, torch.cat([a.prompt_lengths, b.prompt_lengths]))
        assert torch.equal(full.advantages, torch.cat([a.advantages, b.advantages]))
        assert torch.equal(full.rollout_logp, torch.cat([a.rollout_logp, b.rollout_logp]))
        assert torch.equal(res["got"], 2.0 * full.rollout_logp)
        # a plan over sequences 3 and 0 only: theirs in place, NaN elsewhere
        part = res["part"]
        known = torch.zeros_like(part, dtype=torch.bool)
        for i in (0, 3):
            known[full.resp_cu[i]:full.resp_cu[i + 1]] = True
        assert torch.equal(part[known], full.rollout_logp[known]) and part[~known].isnan().all()


# ---- the planner's cost --------------------------------------------------------------------------

def test_plan_weighs_the_gated_mlp(monkeypatch):
    """train.plan's quadratic cost uses a = 4h + 3f: the ratio of a layer's per-token matmul FLOPs
    to its per-token-pair attention FLOPs in model_flops_per_token (GQA ignored), and returns
    indices into the batch for a mini-batch's sequences."""
    import lwz.train as T
    from lwz.config import load_config
    from lwz.model import ModelConfig, model_flops_per_token
    cfg = load_config(os.path.join(ROOT, "configs/tiny.toml"),
                      ["--grpo.pack_cost=quadratic", "--grpo.max_tokens_per_microbatch=40",
                       "--data.max_prompt_tokens=20", "--rollout.max_new_tokens=20"])
    mcfg = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                    num_hidden_layers=1, num_attention_heads=28, num_key_value_heads=28))
    # model_flops_per_token(L) * L = 6 (dense L + H*V*L) + 6 heads*hd (L^2 + L): dense / (heads*hd) = a
    f = lambda L: model_flops_per_token(mcfg, L) * L - 6 * mcfg.hidden_size * mcfg.vocab_size * L  # noqa: E731
    quad = (f(3) - 2 * f(2) + f(1)) / 2  # second difference: the L^2 coefficient
    lin = f(1) - quad
    a = round((lin - quad) / quad)
    assert a == 4 * 3584 + 3 * 18944 == 71168
    seen = []
    real = T.plan_microbatches
    monkeypatch.setattr(T, "plan_microbatches", lambda *x, **kw: seen.append(kw["attn_coeff"]) or real(*x, **kw))
    batch, _ = make_batch()
    p = T.plan(batch, [1, 3, 4], cfg, 2, mcfg)
    assert seen == [a]
    assert sorted(i for rank in p for mb in rank for i in mb) == [1, 3, 4]
    assert sum(int(batch.lengths[i]) for i in p[0][0]) <= 40
