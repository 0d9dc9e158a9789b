"""Varlen causal attention over a packed stream.

Backends, in the order `auto` tries them:
  flash  -- flash_attn.flash_attn_varlen_func (flash-attn installed, CUDA tensors)
  varlen -- torch.nn.attention.varlen.varlen_attn (torch >= 2.11, CUDA tensors)
  sdpa   -- per-sequence torch scaled_dot_product_attention (any device; the CPU path)

All take q [N, Hq, D], k/v [N, Hkv, D] (grouped-query: Hq a multiple of Hkv), cu_seqlens int32
[B+1] and max_seqlen, and return [N, Hq, D]. Attention is causal and never crosses a sequence
boundary.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("lwz")

BACKENDS = ("auto", "flash", "varlen", "sdpa")

try:  # optional dependency
    from flash_attn import flash_attn_varlen_func as _flash_varlen  # type: ignore
except Exception:  # ImportError, or a flash-attn built for another torch
    _flash_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen

    # Keyword names differ between torch releases (window_size vs is_causal; enable_gqa,
    # block_table and seqused_k are absent from 2.11): callers check this set.
    _VARLEN_PARAMS = set(inspect.signature(_torch_varlen).parameters)
except Exception:
    _torch_varlen = None
    _VARLEN_PARAMS = set()

_logged: set[str] = set()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map a config value ("auto" | "flash" | "varlen" | "sdpa") to the backend that will run for
    tensors on `device` of `dtype` (None: not known, assumed fp16/bf16). The flash kernels (both
    flash-attn's and the one behind torch's varlen_attn) take fp16/bf16 only, so "auto" picks SDPA
    for an fp32 model on CUDA."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attn_backend: got {requested!r}, expected one of {BACKENDS}")
    cuda = device.type == "cuda"
    half = dtype is None or dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        if cuda and half and _flash_varlen is not None:
            return "flash"
        if cuda and half and _torch_varlen is not None:
            return "varlen"
        return "sdpa"
    if requested in ("flash", "varlen") and not half:
        raise ValueError(f"model.attn_backend={requested!r} needs fp16/bf16 tensors, got {dtype}; "
                         f"use 'auto' or 'sdpa' for this dtype")
    if requested == "flash" and (_flash_varlen is None or not cuda):
        raise ValueError("model.attn_backend='flash' needs flash-attn installed and CUDA tensors")
    if requested == "varlen" and (_torch_varlen is None or not cuda):
        raise ValueError("model.attn_backend='varlen' needs torch>=2.11 varlen_attn and CUDA tensors")
    return requested


def _log_once(backend: str) -> None:
    if backend not in _logged:
        _logged.add(backend)
        log.info("attention backend: %s", backend)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float, backend: str = "auto"):
    """Causal attention inside each packed sequence. q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]."""
    backend = resolve_backend(backend, q.device, q.dtype)
    _log_once(backend)
    if backend == "flash":
        return _flash_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                             softmax_scale=scale, causal=True)
    if backend == "varlen":
        kw = {"scale": scale}
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in _VARLEN_PARAMS:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _torch_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)
    return _sdpa_packed(q, k, v, cu_seqlens, scale)


def _sdpa_packed(q, k, v, cu_seqlens, scale):
    """Reference/CPU path: one SDPA call per sequence (no cross-sequence attention)."""
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qi = q[s:e].transpose(0, 1)  # [Hq, L, D]
        ki = k[s:e].transpose(0, 1)
        vi = v[s:e].transpose(0, 1)
        if rep > 1:
            ki = ki.repeat_interleave(rep, dim=0)
            vi = vi.repeat_interleave(rep, dim=0)
        out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
    return out


try:  # optional: flash-attn's decode kernel reading a cache in place (cache_batch_idx: rows by index)
    from flash_attn import flash_attn_with_kvcache as _flash_kvcache  # type: ignore
except Exception:
    _flash_kvcache = None


def decode_attention(q, k_cache, v_cache, lengths, scale, *, rows=None, block_table=None, max_length=None,
                     backend="auto", kernel="auto"):
    """One new query per sequence against its cached keys (used by the rollout engine).

    q [B, Hq, D]; static cache: k_cache/v_cache [R, S, Hkv, D] with the first `lengths[b]` slots of
    row `rows[b]` valid (the new token's k/v already written); lengths and rows int32/int64 [B]
    (rows None: row b). Paged cache: k_cache/v_cache [pages, P, Hkv, D] and block_table int32
    [B, S // P]: sequence b's positions [j*P, (j+1)*P) live in page block_table[b, j] (P a multiple
    of 64 for triton, of 256 for flash and varlen). `max_length` (host int >= lengths.max()) lets
    the SDPA path read only the first max_length positions. Returns [B, Hq, D].

    Kernels (see decode_backend for the choice; `kernel` other than "auto" forces one):
      flash  -- flash_attn_with_kvcache(cache_seqlens=lengths, cache_batch_idx=rows or block_table)
      varlen -- torch varlen_attn over the cache seen as a paged cache with one page per row
                (block_table = rows, seqused_k = lengths); S must suit the kernel's page size
                (the rollout engine rounds S up to a multiple of 256 on CUDA)
      triton -- our split-K kernel (kernels.decode_attention), reading rows in place
      sdpa   -- masked SDPA (any device, the CPU path; gathers rows when `rows` is given)
    flash and varlen cannot run on the CPU CI; triton is tested there under the interpreter.
    """
    backend = decode_backend(backend, q.device, q.dtype, kernel)
    if backend == "triton":
        from kernels.decode_attention import decode_attention_triton
        return decode_attention_triton(q, k_cache, v_cache, lengths, scale, rows=rows, max_length=max_length,
                                       block_table=block_table)
    if backend == "flash":
        B = q.shape[0]
        kw = dict(cache_seqlens=lengths.to(torch.int32), softmax_scale=scale, causal=True)
        if block_table is not None:
            kw["block_table"] = block_table
        else:
            kw["cache_batch_idx"] = (torch.arange(B, device=q.device) if rows is None else rows).to(torch.int32)
        return _flash_kvcache(q[:, None], k_cache, v_cache, **kw)[:, 0]
    if backend == "varlen":
        return _decode_varlen_paged(q, k_cache, v_cache, lengths, scale, rows, block_table)
    if block_table is not None:  # gather each sequence's pages into one row (the CPU path: a copy)
        P = k_cache.shape[1]
        n = -(-int(max_length if max_length is not None else block_table.shape[1] * P) // P)
        pages = block_table[:, :n].long()
        k_cache = k_cache[pages].flatten(1, 2)
        v_cache = v_cache[pages].flatten(1, 2)
        rows = None
    return _decode_sdpa(q, k_cache, v_cache, lengths, scale, rows, max_length)


DECODE_KERNELS = ("flash", "varlen", "triton", "sdpa")


def decode_backend(requested: str, device: torch.device, dtype: torch.dtype | None = None,
                   kernel: str = "auto") -> str:
    """The kernel decode_attention will use for the model's attention backend `requested` on
    `device`. On CUDA: "flash" (flash-attn's flash_attn_with_kvcache) when installed, else "varlen"
    (torch varlen_attn with block_table/seqused_k/enable_gqa, a torch that has them), else
    "triton" (kernels.decode_attention); "sdpa" on CPU or when the model asks for sdpa. All but
    sdpa read cache rows in place (sdpa gathers them), and can be captured in a CUDA graph. kernel: "auto" (that choice) or one of DECODE_KERNELS, which is used as given
    (rollout.decode_kernel)."""
    if kernel != "auto":
        if kernel not in DECODE_KERNELS:
            raise ValueError(f"rollout.decode_kernel: got {kernel!r}, expected 'auto' or one of {DECODE_KERNELS}")
        return kernel
    backend = resolve_backend(requested, device, dtype)
    if backend == "flash" and _flash_kvcache is not None:
        return "flash"
    if backend in ("flash", "varlen") and {"block_table", "seqused_k", "enable_gqa"} <= _VARLEN_PARAMS:
        return "varlen"
    if backend in ("flash", "varlen"):
        return "triton"
    return "sdpa"


def _decode_varlen_paged(q, k_cache, v_cache, lengths, scale, rows, block_table=None):
    B = q.shape[0]
    if block_table is None:  # the static cache: one page (= one cache row) per sequence
        idx = torch.arange(B, device=q.device) if rows is None else rows
        block_table = idx.to(torch.int32)[:, None].contiguous()
    cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    kw = {"scale": scale, "seqused_k": lengths.to(torch.int32), "block_table": block_table,
          "enable_gqa": k_cache.shape[2] != q.shape[1]}
    # a single query that is the newest token sees every valid key: no causal mask needed
    max_k = k_cache.shape[1] * block_table.shape[1]
    return _torch_varlen(q, k_cache, v_cache, cu_q, None, 1, max_k, **kw)


def _decode_sdpa(q, k_cache, v_cache, lengths, scale, rows=None, max_length=None):
    S = k_cache.shape[1] if max_length is None else min(int(max_length), k_cache.shape[1])
    k_cache, v_cache = k_cache[:, :S], v_cache[:, :S]
    if rows is not None:
        k_cache, v_cache = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    # grouped-query without copying the cache: the rep = Hq/Hkv query heads sharing a kv head
    # become rep queries of that head (query head h uses kv head h // rep, as in HF)
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    k = k_cache.transpose(1, 2)  # [B, Hkv, S, D]
    v = v_cache.transpose(1, 2)
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(B, Hq, D)
