"""A GRPO step's sequences as one flat tensor batch: built from the rollout, exchanged across ranks
as tensors, cut into packed micro-batches by the extension's pack op.

    batch = from_rollout(rollout_batch, advantages, device)   # this rank's sequences
    batch = exchange(batch, world)                            # every rank's, in rank order
    mb = microbatch(batch, [3, 0, 7], pad_id)                 # one packed forward's inputs
    logp_resp = logp[mb.resp_index]                           # back to response alignment

Layout (S sequences, T tokens, R response tokens; sequence s is its prompt then its response):
  tokens          int32 [T]    every sequence end to end, on the batch's device
  cu_seqlens      int32 [S+1]  host: sequence s is tokens[cu[s]:cu[s+1]]
  prompt_lengths  int64 [S]    host: each >= 1 (a prompt token predicts the first response token)
  advantages      fp32  [S]    device
  rollout_logp    fp32  [R]    device: the sampler's log-prob of each response token, sequence by
                               sequence (sequence s's at resp_cu[s]:resp_cu[s+1])
  old_logp, ref_logp, trainer_logp   fp32 [R] or None, the same alignment
Per-sequence sizes stay on the host, so the planner and the index arithmetic of a micro-batch
need no device sync; per-token data lives on the device that trains on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lwz.distributed import all_gather_tensors
from lwz.packing import pack, pack_with_layout, position_ids_from_cu, unpack

IGNORE = -100  # target of a position that predicts no response token


@dataclass
class Batch:
    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    prompt_lengths: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    trainer_logp: torch.Tensor | None = None

    def __post_init__(self):
        S = self.prompt_lengths.numel()
        if self.cu_seqlens.numel() != S + 1 or int(self.cu_seqlens[-1]) != self.tokens.numel():
            raise ValueError(f"Batch: cu_seqlens must be [S+1] = [{S + 1}] from 0 to the {self.tokens.numel()} "
                             f"tokens, got {self.cu_seqlens.numel()} entries ending at {int(self.cu_seqlens[-1])}")
        if S and int(self.prompt_lengths.min()) < 1:
            raise ValueError(f"Batch: sequence {int(self.prompt_lengths.argmin())} has an empty prompt "
                             "(a prompt token must predict the first response token)")
        if bool((self.response_lengths < 0).any()):
            raise ValueError(f"Batch: sequence {int(self.response_lengths.argmin())} has a prompt longer "
                             "than the sequence")
        if self.advantages.numel() != S:
            raise ValueError(f"Batch: advantages must be [S] = [{S}], got {self.advantages.numel()}")
        R = self.num_response_tokens
        for name in ("rollout_logp", "old_logp", "ref_logp", "trainer_logp"):
            v = getattr(self, name)
            if v is not None and v.numel() != R:
                raise ValueError(f"Batch: {name} must hold one value per response token ({R}), got {v.numel()}")

    def __len__(self) -> int:
        return self.prompt_lengths.numel()

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [S] host: tokens per sequence."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def response_lengths(self) -> torch.Tensor:
        """int64 [S] host."""
        return self.lengths - self.prompt_lengths

    @property
    def resp_cu(self) -> torch.Tensor:
        """int64 [S+1] host: sequence s's response values are x[resp_cu[s]:resp_cu[s+1]] of a [R] tensor."""
        return _cu(self.response_lengths)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_lengths.sum())


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    return cu


def from_rollout(rb, advantages: torch.Tensor, device=None) -> Batch:
    """This rank's Batch from a lwz.rollout.RolloutBatch (padded CPU tensors) and the advantages
    [S] of its samples, in the rollout's sample order; per-token data moved to `device`."""
    device = torch.device(device) if device is not None else rb.prompt_tokens.device
    # packed where the rollout's tensors are, then only the flat tensors move
    tokens, cu, _, _ = pack(rb.sequence_tokens, rb.sequence_starts, rb.sequence_lengths)
    logp, _, _, _ = pack(rb.response_logprobs, None, rb.response_lengths)
    return Batch(tokens=tokens.to(device, torch.int32), cu_seqlens=cu.cpu(),
                 prompt_lengths=rb.prompt_lengths.cpu().long(), advantages=advantages.to(device, torch.float32),
                 rollout_logp=logp.to(device, torch.float32))


# ---- exchange ------------------------------------------------------------------------------------

def exchange(batch: Batch, world: int) -> Batch:
    """Every rank's batch, concatenated in rank order, on every rank. One int32 buffer per rank
    ([S, T, R] | lengths | prompt lengths | advantage bits | tokens | rollout log-prob bits) goes
    through one padded all-gather on the batch's device (after a gather of the sizes): 4 bytes per
    token, 4 per response token, 12 per sequence."""
    if world == 1:
        return batch
    dev = batch.device
    S, T, R = len(batch), batch.tokens.numel(), batch.num_response_tokens
    head = torch.tensor([S, T, R], dtype=torch.int32)
    meta = torch.cat([head, batch.lengths.to(torch.int32), batch.prompt_lengths.to(torch.int32)]).to(dev)
    buf = torch.cat([meta, batch.advantages.float().view(torch.int32), batch.tokens,
                     batch.rollout_logp.float().view(torch.int32)])
    parts = all_gather_tensors(buf, world)
    sizes = torch.stack([p[:3] for p in parts]).tolist()  # the host needs the sizes (one sync)
    meta = torch.cat([p[3:3 + 2 * s] for p, (s, _, _) in zip(parts, sizes)]).long().cpu()  # and one more
    lengths, prompts, o = [], [], 0
    for s, _, _ in sizes:
        lengths.append(meta[o:o + s])
        prompts.append(meta[o + s:o + 2 * s])
        o += 2 * s
    # where each part's advantages, tokens and log-prob bits start and end
    bounds = [(3 + 2 * s, 3 + 3 * s, 3 + 3 * s + t, 3 + 3 * s + t + r) for s, t, r in sizes]

    def cat(k):  # field k of every part (0 advantages, 1 tokens, 2 log-probs), in rank order
        return torch.cat([p[b[k]:b[k + 1]] for p, b in zip(parts, bounds)])

    return Batch(tokens=cat(1), cu_seqlens=_cu(torch.cat(lengths)).to(torch.int32),
                 prompt_lengths=torch.cat(prompts), advantages=cat(0).view(torch.float32),
                 rollout_logp=cat(2).view(torch.float32))


def gather_response_values(batch: Batch, plan: list[list[list[int]]], mine: torch.Tensor, world: int,
                           rank: int) -> torch.Tensor:
    """Per-response-token values [R] of the whole batch from every rank's share.

    plan: rank -> micro-batch -> sequence indices (every rank's, as the planner gave them); mine:
    this rank's values, its micro-batches' `values[mb.resp_index]` concatenated in its plan's order.
    Returns fp32 [R] on the batch's device; positions of sequences absent from the plan are NaN (a
    mini-batch's plan covers only its sequences)."""
    dev = batch.device
    rl = batch.response_lengths
    want = int(rl[[i for mb in plan[rank] for i in mb]].sum())
    if mine.numel() != want:
        raise ValueError(f"gather_response_values: rank {rank} holds {mine.numel()} values, its plan has {want} "
                         "response tokens")
    vals = torch.cat(all_gather_tensors(mine.float().to(dev), world))
    # vals holds the plan's sequences' spans in plan order: one pack puts them in batch order, the
    # sequences outside the plan reading a NaN tail
    order = torch.tensor([i for part in plan for mb in part for i in mb], dtype=torch.int64)
    src = torch.full((len(batch),), vals.numel(), dtype=torch.int64)
    src[order] = _cu(rl[order])[:-1]
    absent = rl[src == vals.numel()]
    tail = int(absent.max()) if absent.numel() else 0
    source = torch.cat([vals, torch.full((tail,), float("nan"), device=dev)]) if tail else vals
    return pack(source.view(1, -1), src, rl)[0]


def padded_responses(batch: Batch, values: torch.Tensor, seqs: list[int]) -> torch.Tensor:
    """[R] per-response-token values -> [len(seqs), longest response] (0 past each response's end)
    for the sequences `seqs`, through the pack and unpack ops."""
    idx = torch.as_tensor(seqs, dtype=torch.int64)
    n = batch.response_lengths[idx]
    L = int(n.max()) if n.numel() else 0
    packed, cu, _, _ = pack(values.view(1, -1), batch.resp_cu[:-1][idx], n)
    return unpack(packed, cu, None, L, 0.0)


# ---- micro-batches -------------------------------------------------------------------------------

@dataclass
class MicroBatch:
    """One packed forward's inputs (N tokens of B sequences, on the batch's device):
      input_ids, position_ids int64 [N] (positions restart at 0); cu_seqlens int32 [B+1]; max_seqlen
      targets     int64 [N]  targets[i] = input_ids[i + 1] where that token is a response token, else -100
      advantages  fp32  [N]  the sequence's advantage where targets != -100, else 0
      old_logp, ref_logp fp32 [N] or None: the batch's values at the positions that predict them, else 0
      resp_index  int64 [Rm] the positions where targets != -100, sequence by sequence: values[resp_index]
                  lines up with the batch's [R] tensors of these sequences
      seqs: the batch's sequence indices, in packed order (empty: one masked dummy token)"""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    targets: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    resp_index: torch.Tensor
    seqs: list

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The token each position of a packed stream predicts: out[t] = ids[t + 1] (the last entry
    wraps around; no sequence's last position is ever a target)."""
    return ids.roll(-1)


def microbatch(batch: Batch, seqs: list[int], pad_id: int) -> MicroBatch:
    """Pack the sequences `seqs` of `batch` (the planner's index list) with the pack op: one call
    per flat tensor, segment arithmetic for the shift, no loop over sequences. An empty list packs
    one masked dummy token, so every rank runs the same number of forward/backward passes (FSDP
    needs it)."""
    dev = batch.device
    if not seqs:
        z = torch.zeros(1, device=dev)
        return MicroBatch(input_ids=torch.full((1,), pad_id, dtype=torch.int64, device=dev),
                          position_ids=torch.zeros(1, dtype=torch.int64, device=dev),
                          cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=dev), max_seqlen=1,
                          targets=torch.full((1,), IGNORE, dtype=torch.int64, device=dev), advantages=z,
                          old_logp=None if batch.old_logp is None else z,
                          ref_logp=None if batch.ref_logp is None else z,
                          resp_index=torch.zeros(0, dtype=torch.int64, device=dev), seqs=[])
    idx = torch.as_tensor(seqs, dtype=torch.int64)
    L, P = batch.lengths[idx], batch.prompt_lengths[idx]
    Rr = L - P
    cu_h, rcu_h = _cu(L), _cu(Rr)
    N, Rm, nb = int(cu_h[-1]), int(rcu_h[-1]), idx.numel()
    # each sequence is three segments: P-1 prompt positions that predict prompt tokens, Rr that
    # predict the response, and its last position, which predicts nothing
    seg = torch.stack([P - 1, Rr, torch.ones_like(P)], 1).reshape(-1)
    # sequence b's j-th response token is predicted at packed position cu[b] + P[b] - 1 + j
    shift = cu_h[:-1] + P - 1 - rcu_h[:-1]
    # the host's index arithmetic goes to the device in one copy
    parts = (cu_h, batch.cu_seqlens[:-1][idx].long(), seg, shift, Rr, rcu_h, batch.resp_cu[:-1][idx], idx)
    cu, starts, seg, shift, Rr, rcu, rstarts, idx = torch.cat(parts).to(dev).split([p.numel() for p in parts])
    cu, rcu = cu.to(torch.int32), rcu.to(torch.int32)
    ids = pack_with_layout(batch.tokens.view(1, -1), starts, cu, N).long()
    pos = position_ids_from_cu(cu, N)

    def segments(prompt, response, last):  # per-segment values [3B] -> per-token [N]
        return torch.repeat_interleave(torch.stack([prompt, response, last], 1).reshape(-1), seg, output_size=N)

    zero = torch.zeros(nb, device=dev)
    mask = segments(zero.bool(), ~zero.bool(), zero.bool())
    targets = torch.where(mask, next_tokens(ids), IGNORE)
    adv = segments(zero, batch.advantages[idx].float(), zero)
    resp_index = torch.arange(Rm, device=dev) + torch.repeat_interleave(shift, Rr, output_size=Rm)

    def per_token(values):  # [R] of the batch -> [N], the values at the positions that predict them
        if values is None:
            return None
        return torch.zeros(N, device=dev).masked_scatter_(mask, pack_with_layout(values.view(1, -1), rstarts, rcu, Rm))

    return MicroBatch(input_ids=ids, position_ids=pos, cu_seqlens=cu, max_seqlen=int(L.max()), targets=targets,
                      advantages=adv, old_logp=per_token(batch.old_logp), ref_logp=per_token(batch.ref_logp),
                      resp_index=resp_index, seqs=list(seqs))
