"""Split-K ("flash-decoding") attention for the rollout engine's decode step, in Triton.

    out = decode_attention_triton(q, k_cache, v_cache, lengths, scale, rows=None, max_length=None)

q [B, Hq, D] (one new query per live sequence); k_cache/v_cache [R, S, Hkv, D], the static cache of
lwz.model.KVCache; row `rows[b]` (default b) holds sequence b, whose first `lengths[b]` slots are
valid (the new token's key/value already written). Grouped-query: query head h reads kv head
h // (Hq / Hkv), as in HF. Returns [B, Hq, D] in q's dtype.

Why our own kernel: the rollout engine reads the cache rows of live sequences in place (finished
sequences leave the batch without copying the cache). flash-attn's `flash_attn_with_kvcache`
(cache_batch_idx) and torch's varlen_attn with block_table/seqused_k do that when present; torch
2.11 has neither, and the masked-SDPA fallback must copy the survivors' rows on every change.

How: one program per (sequence, kv head, split of the keys). It loads the Hq/Hkv query heads that
share the kv head as the rows of one [REP, D] tile (padded to 16 rows, tl.dot's minimum), streams
its split's keys and values in BLOCK_N tiles with an online softmax (running max m, sum l, fp32
accumulator), and writes (m, l, acc) for its split. A second small kernel merges the splits of
each (sequence, query head): out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s. Splits keep
the GPU busy when the batch is small and the contexts long (a 14k-token answer decoding alone);
empty splits (m = -inf, l = 0) drop out of the merge. All offsets into the cache are 64-bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per tile
SPLIT_WARPS, MERGE_WARPS = 4, 4


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, bt_ptr,  # q [B, Hq, D]; caches [pages, PAGE, Hkv, D]; lengths [B]; table [B, BT_STRIDE]
    m_ptr, l_ptr, acc_ptr,  # outputs: [B, Hq, SPLITS] fp32 (m, l), [B, Hq, SPLITS, D] fp32
    PAGE, BT_STRIDE, SPLIT_LEN, SPLITS,  # slots per page; table row stride; keys per split (a multiple of BLOCK_N); splits
    scale,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, REP: tl.constexpr,
    REP_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)  # kv head
    sp = tl.program_id(2)
    L = tl.load(len_ptr + b)
    bt = bt_ptr + b * BT_STRIDE
    start = sp * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, L)

    r = tl.arange(0, REP_PAD)  # query head h * REP + r
    d = tl.arange(0, D_PAD)
    rmask = r < REP
    dmask = d < D
    qh = h * REP + r
    q = tl.load(q_ptr + (b * HQ + qh)[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)

    m = tl.full((REP_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((REP_PAD,), tl.float32)
    acc = tl.zeros((REP_PAD, D_PAD), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        # a tile never straddles two pages: PAGE is a multiple of BLOCK_N, or one page holds the row
        j = n0 // PAGE
        page = tl.load(bt + j).to(tl.int64)
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        slot = page * PAGE + (n - j * PAGE).to(tl.int64)  # int64: pages * PAGE * Hkv * D can pass 2^31
        off = slot[:, None] * (HKV * D) + h * D + d[None, :]
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [REP_PAD, BLOCK_N] fp32
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)  # m = -inf on the first tile: alpha = 0, nothing to rescale
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    out = (b * HQ + qh) * SPLITS + sp
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(l_ptr + out, l, mask=rmask)
    tl.store(acc_ptr + out[:, None] * D + d[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _decode_merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, SPLITS, D: tl.constexpr, D_PAD: tl.constexpr,
                         SPLITS_PAD: tl.constexpr):
    i = tl.program_id(0)  # b * Hq + query head
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < SPLITS
    m = tl.load(m_ptr + i * SPLITS + s, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + i * SPLITS + s, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + (i * SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None] & (d < D)[None, :],
                  other=0.0)
    mx = tl.max(m, axis=0)  # finite: every sequence has >= 1 key, so some split saw it
    w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + i * D + d, o.to(o_ptr.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    """Multiprocessors of a CUDA device (4 elsewhere); asked once, not on every decode step."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_splits(batch_heads: int, max_len: int, device) -> int:
    """Enough programs to fill the GPU twice over, never a split shorter than one tile."""
    return max(1, min(-(-2 * _sm_count(device) // max(batch_heads, 1)), -(-max_len // BLOCK_N), 64))


def decode_attention_triton(q, k_cache, v_cache, lengths, scale: float, rows=None, max_length=None,
                            num_splits: int | None = None, block_table=None):
    """See the module docstring. lengths int [B] >= 1; max_length (host int >= lengths.max(),
    default S) bounds the split sizes; num_splits overrides the heuristic (tests). block_table
    int32 [B, S // P]: a paged cache k_cache/v_cache [pages, P, Hkv, D] (P a multiple of BLOCK_N)."""
    B, Hq, D = q.shape
    R, P, Hkv, Dk = k_cache.shape
    if block_table is None:  # the static cache: one page (its row) per sequence
        S = P
        block_table = (torch.arange(B, device=q.device) if rows is None else rows).to(torch.int32)[:, None]
    else:
        S = P * block_table.shape[1]
        if block_table.shape[1] > 1 and P % BLOCK_N:
            raise ValueError(f"decode attention: page size {P} must be a multiple of {BLOCK_N}")
    block_table = block_table.to(torch.int32).contiguous()
    if Dk != D or v_cache.shape != k_cache.shape or Hq % Hkv:
        raise ValueError(f"decode attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode attention: the caches must be contiguous [R, S, Hkv, D]")
    q = q.contiguous()
    rep = Hq // Hkv
    max_len = S if max_length is None else min(int(max_length), S)
    splits = num_splits or _num_splits(B * Hkv, max_len, q.device)
    split_len = -(-max(-(-max_len // splits), 1) // BLOCK_N) * BLOCK_N
    splits = max(1, -(-max_len // split_len))
    m = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if B == 0:
        return out
    d_pad = triton.next_power_of_2(D)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, lengths.to(torch.int32), block_table, m, l, acc, P, block_table.shape[1], split_len,
        splits, float(scale),
        HQ=Hq, HKV=Hkv, D=D, REP=rep, REP_PAD=max(16, triton.next_power_of_2(rep)), D_PAD=max(16, d_pad),
        BLOCK_N=BLOCK_N, num_warps=SPLIT_WARPS, num_stages=2)
    # the split count is a run-time argument (it follows the live batch and context every step); only
    # its power-of-two padding is compiled in, so a rollout compiles a handful of variants, not dozens
    _decode_merge_kernel[(B * Hq,)](m, l, acc, out, splits, D=D, D_PAD=d_pad,
                                    SPLITS_PAD=triton.next_power_of_2(splits), num_warps=MERGE_WARPS)
    return out


def decode_attention_reference(q, k_cache, v_cache, lengths, scale: float, rows=None):
    """Plain torch, fp64 softmax: [B, Hq, D] in q's dtype (tests and benchmarks)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    rep = Hq // Hkv
    idx = torch.arange(B) if rows is None else rows.cpu()
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        k = k_cache[int(idx[b]), :L].double().cpu().repeat_interleave(rep, dim=1)  # [L, Hq, D]
        v = v_cache[int(idx[b]), :L].double().cpu().repeat_interleave(rep, dim=1)
        s = torch.einsum("hd,lhd->hl", q[b].double().cpu(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), v)
    return out.to(q.dtype)


# Shipped configuration at a Qwen2.5-1.5B/7B shape (D = 128, 6-7 query heads per kv head) for the
# ahead-of-time report (kernels.report).
AOT_SPECS = [
    dict(name="decode_split", fn=_decode_split_kernel,
         signature={"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "len_ptr": "*i32", "bt_ptr": "*i32",
                    "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "PAGE": "i32", "BT_STRIDE": "i32",
                    "SPLIT_LEN": "i32",
                    "SPLITS": "i32", "scale": "fp32", "HQ": "constexpr", "HKV": "constexpr", "D": "constexpr",
                    "REP": "constexpr", "REP_PAD": "constexpr", "D_PAD": "constexpr", "BLOCK_N": "constexpr"},
         constexprs=dict(HQ=28, HKV=4, D=128, REP=7, REP_PAD=16, D_PAD=128, BLOCK_N=BLOCK_N),
         num_warps=SPLIT_WARPS, num_stages=2,
         divisible=("q_ptr", "k_ptr", "v_ptr", "m_ptr", "l_ptr", "acc_ptr", "PAGE", "SPLIT_LEN")),
    dict(name="decode_merge", fn=_decode_merge_kernel,
         signature={"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "o_ptr": "*bf16", "SPLITS": "i32",
                    "D": "constexpr", "D_PAD": "constexpr", "SPLITS_PAD": "constexpr"},
         constexprs=dict(D=128, D_PAD=128, SPLITS_PAD=8), num_warps=MERGE_WARPS, num_stages=1),
]
