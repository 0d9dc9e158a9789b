"""Sequence packing for the varlen training stream, and the micro-batch planner.

Rollout tensors are padded: row b of ``x[B, L, *feature]`` holds its valid tokens at
``x[b, starts[b] : starts[b] + lengths[b]]`` (prompts left-padded, responses right-padded, so the
span is neither a prefix nor a suffix). ``pack`` concatenates the spans into one stream
``packed[N, *feature]`` (N = sum(lengths)) with int32 ``cu_seqlens[B+1]``, int64
``position_ids[N]`` restarting at 0 per sequence and the host int ``max_seqlen`` — the inputs of
varlen attention. ``unpack`` is the exact inverse (padding positions get ``fill``).

A source of one row ``x[1, L, *feature]`` is read by every sequence: then ``starts`` are offsets
into that row and spans may overlap or repeat. This gathers any subset of a flat stream (the
step's tokens end to end, lwz.batch) into a micro-batch without a padded copy of it.

Implementations: the ops of the extension ``lwz._C`` (``torch.ops.lwz.pack / unpack /
position_ids / plan_microbatches``; CPU kernels always, CUDA kernels when it was built with CUDA),
else pure torch with the same semantics (index_select / index_copy). ``BACKEND`` says which one runs
and the first call logs it. pack/unpack are differentiable in floating-point data (the backward of
pack is unpack with fill 0 and vice versa) and have fake implementations, so torch.compile traces
through them.

The planner (``plan_microbatches``) splits a batch of sequences over data-parallel ranks and then
into micro-batches under a token budget; see its docstring.
"""

from __future__ import annotations

import heapq
import logging
import os
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

try:
    if os.environ.get("LWZ_NO_EXT", "") == "1":  # force the pure-torch fallback (testing)
        raise ImportError("LWZ_NO_EXT=1")
    from lwz import _C  # noqa: F401  (loading it registers torch.ops.lwz.*)

    HAVE_EXT = True
    BUILT_WITH_CUDA = bool(_C.BUILT_WITH_CUDA)
    _EXT_ERROR = None
except ImportError as _e:  # not built (no compiler) or built for another torch
    _C = None
    HAVE_EXT = False
    BUILT_WITH_CUDA = False
    _EXT_ERROR = _e

if HAVE_EXT:
    BACKEND = "lwz._C (cpu+cuda kernels)" if BUILT_WITH_CUDA else "lwz._C (cpu kernels; torch fallback on cuda)"
else:
    BACKEND = "torch (fallback: lwz._C not available)"

_logged = False


def _log_backend() -> None:
    global _logged
    if not _logged:
        _logged = True
        if HAVE_EXT:
            log.info("lwz.packing backend: %s", BACKEND)
        else:
            log.warning("lwz.packing backend: %s (%s)", BACKEND, _EXT_ERROR)


def _use_ext(device: torch.device) -> bool:
    _log_backend()
    if not HAVE_EXT:
        return False
    return device.type == "cpu" or (device.type == "cuda" and BUILT_WITH_CUDA)


# ---------------------------------------------------------------------------------------------------
# Fake (meta) and autograd registrations of the ops
# ---------------------------------------------------------------------------------------------------
if HAVE_EXT:

    @torch.library.register_fake("lwz::pack")
    def _pack_fake(x, starts, cu_seqlens, total):
        return x.new_empty((total, *x.shape[2:]))

    @torch.library.register_fake("lwz::unpack")
    def _unpack_fake(packed, starts, cu_seqlens, L, fill=0):
        return packed.new_empty((starts.shape[0], L, *packed.shape[1:]))

    @torch.library.register_fake("lwz::position_ids")
    def _position_ids_fake(cu_seqlens, total):
        return cu_seqlens.new_empty((total,), dtype=torch.int64)

    def _pack_setup(ctx, inputs, output):
        x, starts, cu_seqlens, _total = inputs
        ctx.save_for_backward(starts, cu_seqlens)
        ctx.L, ctx.one_row = x.shape[1], x.shape[0] == 1

    def _pack_backward(ctx, grad):
        starts, cu_seqlens = ctx.saved_tensors
        if ctx.one_row:  # spans of one row may overlap: their gradients add up
            return _one_row_grad(grad, starts, cu_seqlens, ctx.L), None, None, None
        return torch.ops.lwz.unpack(grad, starts, cu_seqlens, ctx.L, 0), None, None, None

    def _unpack_setup(ctx, inputs, output):
        packed, starts, cu_seqlens, _L, *_fill = inputs
        ctx.save_for_backward(starts, cu_seqlens)
        ctx.total = packed.shape[0]

    def _unpack_backward(ctx, grad):
        starts, cu_seqlens = ctx.saved_tensors
        return torch.ops.lwz.pack(grad, starts, cu_seqlens, ctx.total), None, None, None, None

    torch.library.register_autograd("lwz::pack", _pack_backward, setup_context=_pack_setup)
    torch.library.register_autograd("lwz::unpack", _unpack_backward, setup_context=_unpack_setup)


# ---------------------------------------------------------------------------------------------------
# Pure-torch fallbacks (same semantics as the ops; differentiable through index_select/index_copy)
# ---------------------------------------------------------------------------------------------------
def _token_rows(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row[N], pos[N]) int64: sequence of each packed token and its position in that sequence."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths,
                                  output_size=total)
    pos = torch.arange(total, device=cu.device) - cu[:-1][row]
    return row, pos


def _flat_index(starts, cu_seqlens, L, total):
    """Source row of each packed token in x.reshape(B * L, ...); L = 0 for a one-row source."""
    row, pos = _token_rows(cu_seqlens, total)
    return row * L + starts.long()[row] + pos


def _pack_torch(x, starts, cu_seqlens, total):
    B, L = x.shape[:2]
    idx = _flat_index(starts, cu_seqlens, 0 if B == 1 else L, total)
    return x.reshape(B * L, *x.shape[2:]).index_select(0, idx)


def _one_row_grad(grad, starts, cu_seqlens, L):
    """Gradient of a one-row pack: packed grad [N, *f] summed into its source row -> [1, L, *f]."""
    idx = _flat_index(starts, cu_seqlens, 0, grad.shape[0])
    return grad.new_zeros((L, *grad.shape[1:])).index_add_(0, idx, grad).unsqueeze(0)


def _unpack_torch(packed, starts, cu_seqlens, L, fill=0):
    B = starts.shape[0]
    idx = _flat_index(starts, cu_seqlens, L, packed.shape[0])
    out = packed.new_full((B * L, *packed.shape[1:]), fill)
    return out.index_copy(0, idx, packed).reshape(B, L, *packed.shape[1:])


def _position_ids_torch(cu_seqlens, total):
    return _token_rows(cu_seqlens, total)[1]


# ---------------------------------------------------------------------------------------------------
# Layout-level functional API (no host sync: everything is given)
# ---------------------------------------------------------------------------------------------------
def pack_with_layout(x: torch.Tensor, starts: torch.Tensor, cu_seqlens: torch.Tensor,
                     total: int) -> torch.Tensor:
    """x[B, L, *f] (any dtype), starts[B] int64, cu_seqlens[B+1] int32 (both on x's device),
    total = cu_seqlens[-1] as a host int → packed[total, *f], same dtype. x may be one row
    [1, L, *f] that all B sequences read (starts are offsets into it)."""
    if _use_ext(x.device):
        return torch.ops.lwz.pack(x, starts, cu_seqlens, total)
    return _pack_torch(x, starts, cu_seqlens, total)


def unpack_with_layout(packed: torch.Tensor, starts: torch.Tensor, cu_seqlens: torch.Tensor, L: int,
                       fill=0) -> torch.Tensor:
    """packed[N, *f], starts[B] int64, cu_seqlens[B+1] int32 (on packed's device) → out[B, L, *f]
    with out[b, starts[b] + t] = packed[cu_seqlens[b] + t] and ``fill`` elsewhere."""
    if _use_ext(packed.device):
        return torch.ops.lwz.unpack(packed, starts, cu_seqlens, L, fill)
    return _unpack_torch(packed, starts, cu_seqlens, L, fill)


def position_ids_from_cu(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens[B+1] int32 → position_ids[total] int64 on the same device, 0..len_b-1 per sequence."""
    if _use_ext(cu_seqlens.device):
        return torch.ops.lwz.position_ids(cu_seqlens, total)
    return _position_ids_torch(cu_seqlens, total)


# ---------------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------------
def _host_ints(v, name: str, B: int) -> torch.Tensor:
    t = torch.as_tensor(v).detach()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    t = t.to("cpu", torch.int64).reshape(-1)
    if t.numel() != B:
        raise ValueError(f"{name} must have one entry per row (B={B}), got {t.numel()}")
    return t


def make_layout(starts, lengths, B: int, L: int):
    """Host-side layout of a padded batch: (starts int64[B], lengths int64[B], cu_seqlens int32[B+1],
    total, max_seqlen), all on the CPU. Raises ValueError naming the first row that does not fit."""
    lengths_h = _host_ints(lengths, "lengths", B)
    starts_h = torch.zeros(B, dtype=torch.int64) if starts is None else _host_ints(starts, "starts", B)
    bad = (starts_h < 0) | (lengths_h < 0) | (starts_h + lengths_h > L)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"row {b}: start {int(starts_h[b])} + length {int(lengths_h[b])} does not fit "
                         f"in L={L} (need 0 <= start, 0 <= length, start + length <= L)")
    cu = torch.zeros(B + 1, dtype=torch.int64)
    torch.cumsum(lengths_h, 0, out=cu[1:])
    total = int(cu[-1])
    if total >= 2**31:
        raise ValueError(f"packed length {total} does not fit int32 cu_seqlens")
    max_seqlen = int(lengths_h.max()) if B else 0
    return starts_h, lengths_h, cu.to(torch.int32), total, max_seqlen


def pack(x: torch.Tensor, starts, lengths):
    """Pack the valid spans of a padded batch into one stream.

    x: [B, L, *feature], any dtype (int64 token ids, fp32/bf16 hidden states, ...), any device;
      or one row [1, L, *feature] that every sequence reads (B = len(lengths)).
    starts, lengths: [B] ints (tensors on any device, lists or arrays); ``starts=None`` means 0
      (right padding). Row b's tokens are x[b, starts[b] : starts[b] + lengths[b]] (x[0, ...] for
      a one-row x).
    Returns (packed [N, *feature] x.dtype, cu_seqlens [B+1] int32, position_ids [N] int64,
      max_seqlen int), tensors on x's device, N = sum(lengths). Device-side starts/lengths are copied
      to the host once (one sync); pass host values to avoid it.
    Differentiable in x when x is floating point.
    """
    if x.dim() < 2:
        raise ValueError(f"pack: x must be [B, L, *feature], got shape {tuple(x.shape)}")
    B, L = x.shape[:2]
    if B == 1:  # one row read by every sequence
        B = int(torch.as_tensor(lengths).numel())
    starts_h, _, cu_h, total, max_seqlen = make_layout(starts, lengths, B, L)
    dev = x.device
    cu = cu_h.to(dev)
    st = starts_h.to(dev)
    packed = pack_with_layout(x, st, cu, total)
    return packed, cu, position_ids_from_cu(cu, total), max_seqlen


def unpack(packed: torch.Tensor, cu_seqlens, starts, L: int, fill=0) -> torch.Tensor:
    """Inverse of ``pack``: packed [N, *feature] → [B, L, *feature] (packed's dtype and device),
    padding positions set to ``fill``.

    cu_seqlens: [B+1] int32 (as returned by pack); starts: [B] ints or None (0). Host (CPU/list)
    values are validated; device tensors are used as they are (no sync).
    Differentiable in packed when it is floating point.
    """
    dev = packed.device
    host = not (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu")
    if host:
        cu_h = torch.as_tensor(cu_seqlens).to("cpu", torch.int64).reshape(-1)
        B = cu_h.numel() - 1
        lengths = cu_h[1:] - cu_h[:-1]
        if B < 0 or int(cu_h[0]) != 0 or int(cu_h[-1]) != packed.shape[0]:
            raise ValueError(f"unpack: cu_seqlens must run from 0 to the packed length {packed.shape[0]}")
        starts_h, _, cu_i32, _, _ = make_layout(starts, lengths, B, L)
        cu, st = cu_i32.to(dev), starts_h.to(dev)
    else:
        cu = cu_seqlens.to(dev, torch.int32)
        B = cu.numel() - 1
        st = (torch.zeros(B, dtype=torch.int64, device=dev) if starts is None
              else torch.as_tensor(starts).to(dev, torch.int64))
    return unpack_with_layout(packed, st, cu, L, fill)


def pack_sequences(seqs: Sequence[torch.Tensor]):
    """Concatenate sequences [len_i, *feature] (or 1-D [len_i]) of one dtype/device into the packed
    layout: (packed [N, *feature], cu_seqlens [B+1] int32, position_ids [N] int64, max_seqlen int)."""
    if len(seqs) == 0:
        raise ValueError("pack_sequences: no sequences given")
    lens = [int(s.shape[0]) for s in seqs]
    dev = seqs[0].device
    packed = torch.cat(list(seqs), 0)
    cu_h = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0, out=cu_h[1:])
    cu = cu_h.to(device=dev, dtype=torch.int32)
    total = int(cu_h[-1])
    return packed, cu, position_ids_from_cu(cu, total), max(lens)


def pack_token_lists(seqs: Sequence[Sequence[int]], device=None):
    """Pack token lists into (input_ids[N] int64, position_ids[N] int64, cu_seqlens[B+1] int32,
    max_seqlen), on `device`: the inputs of a packed forward (reward model, rollout prefill). Every
    list must be non-empty."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise ValueError("pack_token_lists: every sequence needs at least one token")
    ids, cu, pos, max_len = pack_sequences([torch.tensor(list(s), dtype=torch.int64, device=device) for s in seqs])
    return ids, pos, cu, max_len


# ---------------------------------------------------------------------------------------------------
# Micro-batch planner
# ---------------------------------------------------------------------------------------------------
def attn_coeff_for(hidden_size: int, intermediate_size: int | None = None) -> int:
    """Coefficient a of the per-sequence cost a·L + L² used by ``cost="quadratic"``.

    Forward FLOPs of one decoder layer on a sequence of L tokens (hidden h, causal attention):
    q/k/v/o projections 2·L·4h², a plain MLP of width 4h 2·L·8h², attention scores and values
    4·L²·h halved by the causal mask = 2·L²·h. Total 24·L·h² + 2·L²·h = 2h·(12h·L + L²), so up to
    the constant 2h the cost is a·L + L² with a = 12·h (verl uses 24576 = 12·2048). A gated MLP of
    width f (Qwen, Llama) has 3 matmuls: pass intermediate_size for a = 4h + 3f (Qwen2.5-7B:
    h=3584, f=18944 → 71168). GQA shrinks k/v and is ignored (a slight overestimate of a).
    """
    if intermediate_size is None:
        return 12 * int(hidden_size)
    return 4 * int(hidden_size) + 3 * int(intermediate_size)


def _check_plan_args(lengths: list[int], max_tokens: int, num_ranks: int) -> None:
    # Messages are the same as csrc/planner.cpp's.
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"sequence {i} has negative length {n}")
        if n > max_tokens:
            raise ValueError(f"sequence {i} has length {n} > max_tokens={max_tokens} "
                             "(the micro-batch token budget)")


def _karmarkar_karp(cost: list[int], k: int) -> list[list[int]]:
    """k-way largest differencing (twin of csrc/planner.cpp karmarkar_karp)."""
    n = len(cost)
    if n == 0:
        return [[] for _ in range(k)]
    # state = (sums desc, item lists); heap key (-spread, id): biggest spread first, ties by id
    heap = []
    states = {}
    for i, c in enumerate(cost):
        states[i] = ([c] + [0] * (k - 1), [[i]] + [[] for _ in range(k - 1)])
        heap.append((-c, i))
    heapq.heapify(heap)
    next_id = n
    while len(heap) > 1:
        _, a = heapq.heappop(heap)
        _, b = heapq.heappop(heap)
        (sa, ia), (sb, ib) = states.pop(a), states.pop(b)
        merged = [(sa[j] + sb[k - 1 - j], ia[j] + ib[k - 1 - j]) for j in range(k)]
        merged.sort(key=lambda t: -t[0])  # stable, like std::stable_sort
        states[next_id] = ([m[0] for m in merged], [m[1] for m in merged])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), next_id))
        next_id += 1
    return states[heap[0][1]][1]


def _first_fit_decreasing(items: list[int], lengths: list[int], cap: int) -> list[list[int]]:
    """Twin of csrc/planner.cpp first_fit_decreasing (plain scan instead of a segment tree)."""
    items = sorted(items, key=lambda i: (-lengths[i], i))
    used: list[int] = []
    bins: list[list[int]] = []
    for i in items:
        n = lengths[i]
        for j, u in enumerate(used):
            if u + n <= cap:
                used[j] += n
                bins[j].append(i)
                break
        else:
            used.append(n)
            bins.append([i])
    order = sorted(range(len(bins)), key=lambda j: -used[j])  # stable: ties keep creation order
    return [sorted(bins[j]) for j in order]


def _plan_python(lengths: list[int], max_tokens: int, num_ranks: int, attn_coeff: int):
    _check_plan_args(lengths, max_tokens, num_ranks)
    n = len(lengths)
    if num_ranks == 1:
        shares = [list(range(n))]
    else:
        cost = lengths if attn_coeff < 0 else [attn_coeff * L + L * L for L in lengths]
        shares = _karmarkar_karp(list(cost), num_ranks)
    plan = [_first_fit_decreasing(s, lengths, max_tokens) for s in shares]
    M = max(len(p) for p in plan)
    return [p + [[] for _ in range(M - len(p))] for p in plan]


def _plan_cpp(lengths_t: torch.Tensor, max_tokens: int, num_ranks: int, attn_coeff: int):
    flat = torch.ops.lwz.plan_microbatches(lengths_t, max_tokens, num_ranks, attn_coeff).tolist()
    M = flat[0]
    pos = 1 + num_ranks * M
    plan = []
    for r in range(num_ranks):
        rank = []
        for m in range(M):
            c = flat[1 + r * M + m]
            rank.append(flat[pos:pos + c])
            pos += c
        plan.append(rank)
    return plan


def plan_microbatches(lengths, max_tokens: int, num_ranks: int = 1, cost: str = "tokens",
                      attn_coeff: int | None = None, backend: str | None = None) -> list[list[list[int]]]:
    """Plan rank → micro-batch → sequence indices for a batch of sequence lengths.

    1. Balance: the sequences are split over ``num_ranks`` ranks by Karmarkar–Karp largest
       differencing (k-way) on a per-sequence cost: ``"tokens"`` (L) or ``"quadratic"``
       (attn_coeff·L + L², attention-aware FLOPs; see ``attn_coeff_for``). Rank 0 gets the largest
       share.
    2. Pack: each rank's share goes first-fit-decreasing into micro-batches of at most
       ``max_tokens`` tokens (sum of lengths), so the budget holds by construction (unlike balancing
       into a fixed number of micro-batches, verl PRs #6735/#7553). Micro-batches are ordered by
       tokens, descending; indices inside one are ascending.
    3. Every rank gets the same number of micro-batches (short ranks get empty ones at the end),
       each sequence appears exactly once.

    lengths: [n] ints (list, array or tensor). A sequence longer than max_tokens raises ValueError
    naming its index, length and the budget. Deterministic; the C++ op (lwz._C) and the Python
    fallback give identical plans. backend: None (C++ when built), "cpp" or "python".
    """
    if cost not in ("tokens", "quadratic"):
        raise ValueError(f"cost must be 'tokens' or 'quadratic', got {cost!r}")
    if cost == "quadratic":
        if attn_coeff is None:
            raise ValueError("cost='quadratic' needs attn_coeff (e.g. attn_coeff_for(hidden_size, intermediate_size))")
        a = int(attn_coeff)
        if a < 0:
            raise ValueError(f"attn_coeff must be >= 0, got {attn_coeff}")
    else:
        a = -1
    if backend is None:
        _log_backend()
        backend = "cpp" if HAVE_EXT else "python"
    if backend == "cpp":
        if not HAVE_EXT:
            raise RuntimeError(f"lwz._C is not available ({_EXT_ERROR})")
        if isinstance(lengths, torch.Tensor):
            t = lengths.detach().to("cpu", torch.int64).reshape(-1)
        else:  # numpy converts a list of ints ~4x faster than torch.as_tensor
            t = torch.from_numpy(np.asarray(lengths, dtype=np.int64).reshape(-1))
        return _plan_cpp(t, int(max_tokens), int(num_ranks), a)
    if backend != "python":
        raise ValueError(f"backend must be None, 'cpp' or 'python', got {backend!r}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().reshape(-1).tolist()
    return _plan_python([int(n) for n in lengths], int(max_tokens), int(num_ranks), a)


def rank_costs(lengths, plan, cost: str = "tokens", attn_coeff: int | None = None) -> list[int]:
    """Total cost of each rank's sequences under the planner's cost."""
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    a = attn_coeff if cost == "quadratic" else None

    def c(n):
        return n if a is None else a * n + n * n

    return [sum(c(lengths[i]) for mb in rank for i in mb) for rank in plan]


def padding_waste(lengths, plan, max_tokens: int | None = None) -> float:
    """Padded tokens ÷ real tokens of a plan.

    max_tokens=None: ranks step through their micro-batches in lockstep, so step m costs every
    rank as much as the fullest micro-batch of that step; waste = (Σ_m R·max_r tokens(r, m) − real)
    / real. With max_tokens: static shapes, every micro-batch padded to the budget:
    (R·M·max_tokens − real) / real.
    """
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    real = sum(lengths)
    if real == 0:
        return 0.0
    R, M = len(plan), len(plan[0]) if plan else 0
    if max_tokens is not None:
        return (R * M * max_tokens - real) / real
    padded = sum(R * max(sum(lengths[i] for i in plan[r][m]) for r in range(R)) for m in range(M))
    return (padded - real) / real


def padded_to_longest_waste(lengths, batch_size: int) -> float:
    """Padded tokens ÷ real tokens when the sequences, in the given order, go in batches of
    ``batch_size`` rows each padded to its longest row (the unpacked baseline)."""
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
    real = sum(lengths)
    if real == 0:
        return 0.0
    padded = sum(len(chunk) * max(chunk) for chunk in
                 (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)))
    return (padded - real) / real
