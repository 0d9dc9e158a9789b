"""Fused hidden states -> per-token log-probs (and entropy), never materialising [N, V] logits.

    fused_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, impl="auto",
                   bwd_scratch_bytes=None)
        hidden   [N, H]  fp16 / bf16 / fp32 (fp64 too on impl="torch"); rows with unit last stride
        weight   [V, H]  same dtype as hidden, contiguous (the lm head; the embedding when tied)
        targets  [N]     int64, in [0, V) or -100 (= ignored)
        returns  logp [N] fp32, entropy [N] fp32 (or None)

    z = hidden @ weight.T / temperature        (the "logits" below are always this scaled z)
    logp[i]    = z[i, t_i] - logsumexp(z[i])
    entropy[i] = -sum_j p_ij log p_ij,  p = softmax(z[i])
    Ignored rows (target == -100) give logp 0 and entropy 0 and no gradient from either output.

Differentiable in hidden and weight. Gradient with respect to z:
    d logp_i / d z_ij = [j == t_i] - p_ij
    d H_i    / d z_ij = -p_ij (z_ij - sum_k p_ik z_ik) = -p_ij (log p_ij + H_i)
and d z / d (hidden @ weight.T) = 1 / temperature, so with upstream g (logp) and e (entropy)
    dA_ij = (g_i ([j == t_i] - p_ij) - e_i p_ij (log p_ij + H_i)) / temperature,
    d hidden = dA @ weight,  d weight = dA^T @ hidden.

impl="triton" (CUDA, or the interpreter under TRITON_INTERPRET=1):
  forward   `_fwd_kernel`, grid (vocab splits x token blocks), builds [BLOCK_T, BLOCK_V] logit tiles
            with tl.dot over H and keeps per-row online stats in fp32 (running max m,
            s = sum exp(z - m), t = sum exp(z - m)(z - m), target logit); `_merge_kernel` merges the
            splits. Entropy = log s - t / s is taken relative to the max so that a large common
            shift of the logits does not cancel. Saved for backward: row max, log s and entropy
            (fp32 [N]); the lse itself is never rounded to fp32 (at |z| >> 1 that would shift every
            recomputed p by a common factor).
  backward  a walk over token groups x vocabulary chunks: `_bwd_dlogits_kernel` recomputes a
            chunk's logits and writes dA (fp32 math, stored in the GEMM dtype), then cuBLAS adds
            dA @ W[chunk] into an fp32 dX accumulator and writes dW[chunk] = dA^T @ X. Why cuBLAS:
            a Triton dX / dW kernel would hold a [BLOCK, H] fp32 accumulator (2.6 MB at H = 5120)
            or recompute the logits once per H slice. The walk holds at most `bwd_scratch_bytes`
            beyond the gradients (`backward_plan`): one group of all N tokens when its fp32 [N, H]
            accumulator and a chunk of MIN_CHUNK_COLS columns fit (dX and dW from one walk, dW
            written once); else token groups for dX, then a second walk over all N tokens for dW
            (its logits recomputed, dW still written once).
  Launch configs: the table kernels/logprob_configs.json (GPU name -> forward / backward config,
  "default" for the others), written by bench/tune_logprob.py.
impl="torch": plain torch, chunked (the CPU trainer's path); same math, same saved stats.
impl="auto": Triton when the tensors are on CUDA and triton imports, torch otherwise.

Offsets are 64-bit in the kernels (program ids and indices cast to int64 before any multiplication
by a stride): N * V passes 2^31 at N ~ 14.1k for V = 152064. Temperature is a `tl.constexpr` (a
Python float passed as a plain argument would become fp64 under torch.compile/Inductor).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import NamedTuple

import torch

try:  # triton is optional: the torch path must work without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False
try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover
    TensorDescriptor = None

IGNORE_INDEX = -100

# Default scratch of the Triton backward beyond the gradients (the trainer passes
# grpo.logprob_scratch_mib instead): the fp32 dX accumulator (N*H*4) plus one dA chunk.
BWD_SCRATCH_BYTES = 1 << 30
# Narrowest vocabulary chunk of the one walk over all tokens: every chunk re-reads and re-writes
# the fp32 dX accumulator, which at narrower chunks costs more than a second walk for dW.
MIN_CHUNK_COLS = 1024
# Widest dA chunk: wider ones save accumulator passes that no longer show in the time.
MAX_CHUNK_BYTES = 512 << 20


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- launch configs -----------------------------------------------------------------------------
def parse_config(text: str, base: dict, name: str = "config") -> dict:
    """A launch config from "BTxBVxBH[:wW][:sS][:gG][:tma|:ptr][:flat]" (e.g. "128x256x64:w8:s3:tma"),
    the fields not given taken from `base`; the form of kernels/logprob_configs.json and of
    bench/tune_logprob.py. ":tma": hidden / weight tiles through TMA tensor descriptors (where the
    tensors allow it), ":ptr": pointer loads. ":flat" flattens the vocab-tile and H loops into one
    pipelined loop (the backward then runs one persistent program per SM); without it the loops
    stay nested, whatever `base` says."""
    keys = {"w": "num_warps", "s": "num_stages", "g": "GROUP_T"}
    cfg = dict(base, FLAT=False)  # the loop form is never inherited: only ":flat" flattens
    try:
        parts = text.strip().split(":")
        bt, bv, bh = (int(v) for v in parts[0].lower().split("x"))
        cfg.update(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh)
        for p in parts[1:]:
            if p in ("tma", "ptr"):
                cfg["TMA"] = p == "tma"
            elif p == "flat":
                cfg["FLAT"] = True
            elif p[:1] in keys and p[1:].isdigit():
                cfg[keys[p[0]]] = int(p[1:])
            else:
                raise ValueError(p)
        if min(bt, bv, bh) < 16 or any(v & (v - 1) for v in (bt, bv, bh)):
            raise ValueError("blocks must be powers of two >= 16")
        if cfg["num_warps"] not in (1, 2, 4, 8, 16) or cfg["num_stages"] < 1 or cfg.get("GROUP_T", 1) < 1:
            raise ValueError("warps must be 1, 2, 4, 8 or 16; stages and group >= 1")
    except ValueError as e:
        raise ValueError(f"{name}={text!r}: expected BTxBVxBH[:wW][:sS][:gG][:tma|:ptr][:flat] with power-of-two "
                         f"blocks, e.g. 128x256x64:w8:s3:tma ({e})") from None
    return cfg


def format_config(c: dict) -> str:
    """The parse_config string of a config."""
    g = f":g{c['GROUP_T']}" if "GROUP_T" in c else ""
    return (f"{c['BLOCK_T']}x{c['BLOCK_V']}x{c['BLOCK_H']}:w{c['num_warps']}:s{c['num_stages']}{g}"
            f":{'tma' if c.get('TMA') else 'ptr'}{':flat' if c.get('FLAT') else ''}")


CONFIGS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "logprob_configs.json")
_FWD_BASE = dict(num_warps=8, num_stages=3, TMA=False)
_BWD_BASE = dict(_FWD_BASE, GROUP_T=8)


def load_configs(path: str = CONFIGS_PATH) -> dict:
    """The launch-config table: {GPU name (torch.cuda.get_device_name) or "default": (forward
    config, backward config)} from `path`, a JSON object {name: {"fwd": str, "bwd": str, ...}}
    (other keys, e.g. where the numbers came from, are ignored). It must have a "default" entry."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: expected a JSON table of log-prob launch configs ({e})") from None
    if not isinstance(table, dict) or "default" not in table:
        raise ValueError(f"{path}: expected a JSON object with a \"default\" entry {{\"fwd\": ..., \"bwd\": ...}}")
    out = {}
    for gpu, entry in table.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("fwd"), str) and isinstance(entry.get("bwd"), str)):
            raise ValueError(f"{path}: entry {gpu!r} must be an object with string fields \"fwd\" and \"bwd\"")
        out[gpu] = (parse_config(entry["fwd"], _FWD_BASE, f"{path}: {gpu}.fwd"),
                    parse_config(entry["bwd"], _BWD_BASE, f"{path}: {gpu}.bwd"))
    return out


# bf16/fp16 on a GPU: {GPU name or "default": (forward, backward config)}; "default" is what
# kernels/report.py compiles for sm_90
CONFIGS = load_configs()
# fp32 inputs ("ieee" dots, no tensor cores; fp32 models or tests): the bf16 tiles would spill
GPU_FP32_CONFIG = dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=2)
GPU_FP32_BWD_CONFIG = dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=32, GROUP_T=8, num_warps=8, num_stages=2)
# the interpreter pays per tile op, not per element: tiles that cover the test shapes in few steps
INTERP_CONFIG = dict(BLOCK_T=64, BLOCK_V=256, BLOCK_H=64, num_warps=4, num_stages=1, TMA=False)
INTERP_BWD_CONFIG = dict(BLOCK_T=64, BLOCK_V=256, BLOCK_H=64, GROUP_T=2, num_warps=4, num_stages=1, TMA=False)
MERGE_BLOCK = 256


if HAS_TRITON:

    @triton.jit
    def _logit_tile(x_src, w_src, row0, col0, row_mask, col_mask, H, TEMP: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, TMA: tl.constexpr):
        """One [BLOCK_T, BLOCK_V] tile of logits / TEMP in fp32 for token rows row0.. and vocab
        rows col0.. . TMA: x_src / w_src are tensor descriptors of hidden [N, H] and weight [V, H]
        with [BLOCK_T | BLOCK_V, BLOCK_H] blocks (the copy engine fetches each operand tile, out
        of bounds reads zeros, and no [BLOCK, BLOCK_H] pointer tensors occupy registers); else they
        are the row base pointers of the two tiles and masked rows and columns read zeros."""
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        if TMA:
            for k in range(0, tl.cdiv(H, BLOCK_H)):
                x = x_src.load([row0, k * BLOCK_H])
                w = w_src.load([col0, k * BLOCK_H])
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            offs_h = tl.arange(0, BLOCK_H)
            for k in range(0, tl.cdiv(H, BLOCK_H)):
                hk = k * BLOCK_H + offs_h
                h_mask = hk < H
                x = tl.load(x_src + hk[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                w = tl.load(w_src + hk[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        return acc / TEMP


    @triton.jit
    def _fwd_tile(x_src, w_ptr, tgt, m, s, t, zy, tile, row0, row_mask, V, H, stride_wv,
                  TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, TMA: tl.constexpr):
        """Vocab tile `tile` of the forward: its logits, folded into the rows' online stats
        (m running max, s = sum exp(z - m), t = sum exp(z - m)(z - m), zy target logit)."""
        col0 = tile.to(tl.int32) * BLOCK_V  # < V < 2^31
        lcols = tl.arange(0, BLOCK_V)  # int32 offsets in the tile: no 64-bit lanes in the 2-D compares
        col_mask = lcols < V - col0
        if TMA:
            w_src = w_ptr
        else:
            w_src = w_ptr + (col0 + lcols).to(tl.int64)[:, None] * stride_wv
        z = _logit_tile(x_src, w_src, row0, col0, row_mask, col_mask, H, TEMP, DOT_PRECISION,
                        BLOCK_T, BLOCK_V, BLOCK_H, TMA)
        # padded vocab columns: -inf for the max, 0 (with p = 0) everywhere else
        z_max = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_max, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # never -inf - -inf
        alpha = tl.exp(m - m_safe)  # 0 on the first tile (m = -inf)
        delta = tl.where(m == float("-inf"), 0.0, m - m_safe)  # avoid 0 * -inf
        zc = tl.where(col_mask[None, :], z - m_safe[:, None], 0.0)
        p = tl.where(col_mask[None, :], tl.exp(zc), 0.0)
        # rescale sums to the new max: exp(z-m)(z-m) -> alpha exp(z-m)((z-m) + (m-m_new))
        t = alpha * (t + s * delta) + tl.sum(p * zc, 1)
        s = alpha * s + tl.sum(p, 1)
        # the target's offset in this tile (negative or >= BLOCK_V elsewhere; -100 never matches);
        # a target is < V, so a match is never a padded column
        is_tgt = lcols[None, :] == (tgt - col0).to(tl.int32)[:, None]
        zy += tl.sum(tl.where(is_tgt, z, 0.0), 1)
        return m_new, s, t, zy

    @triton.jit
    def _fwd_kernel(
        x_ptr, w_ptr, tgt_ptr, part_ptr,
        N, V, H, stride_xn, stride_wv, tiles_per_split, n_vtiles,
        TEMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        TMA: tl.constexpr,  # x_ptr / w_ptr are tensor descriptors (see _logit_tile)
        FLAT: tl.constexpr,  # one flattened (vocab tile, H) loop: loads run on across tile ends
    ):
        # part_ptr: fp32 [4, SPLITS, N] = (max, sum exp(z-max), sum exp(z-max)(z-max), target z)
        # splits vary fastest: the programs resident at one time cover few token blocks (their
        # [BLOCK_T, H] hidden tiles, re-read once per vocab tile, stay in L2) and each vocab
        # split's W tiles are read by all of those token blocks at about the same time.
        pid_s = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1).to(tl.int64)
        n_splits = tl.num_programs(0).to(tl.int64)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        row_mask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_T], tl.float32)
        t = tl.zeros([BLOCK_T], tl.float32)
        zy = tl.zeros([BLOCK_T], tl.float32)
        tile0 = pid_s * tiles_per_split
        # only the tiles that exist: every visited tile has >= 1 valid column
        n_tiles = tl.minimum(tiles_per_split, n_vtiles - tile0)
        if TMA:
            x_src = x_ptr
        else:
            x_src = x_ptr + rows[:, None] * stride_xn
        row0 = tl.program_id(1) * BLOCK_T  # int32 descriptor coordinate (N < 2^31)
        # FLAT: the pipeliner sees one loop, so the next tile's first operand loads are issued
        # before this tile's softmax epilogue instead of after it
        for i in tl.range(0, n_tiles, flatten=FLAT):
            m, s, t, zy = _fwd_tile(x_src, w_ptr, tgt, m, s, t, zy, tile0 + i, row0, row_mask, V, H,
                                    stride_wv, TEMP, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H, TMA)
        base = part_ptr + pid_s * N + rows
        stride_k = n_splits * N
        tl.store(base, m, mask=row_mask)
        tl.store(base + stride_k, s, mask=row_mask)
        tl.store(base + 2 * stride_k, t, mask=row_mask)
        tl.store(base + 3 * stride_k, zy, mask=row_mask)

    @triton.jit
    def _merge_kernel(
        part_ptr, tgt_ptr, logp_ptr, ent_ptr, max_ptr, logs_ptr, N, n_splits,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = rows < N
        # tl.cast, not .to: the JIT turns an int argument equal to 1 into a constant, which has no .to
        n64 = tl.cast(N, tl.int64)
        stride_k = tl.cast(n_splits, tl.int64) * N
        mx = tl.full([BLOCK], float("-inf"), tl.float32)
        for k in range(0, n_splits):
            mk = tl.load(part_ptr + k * n64 + rows, mask=mask, other=0.0)
            mx = tl.maximum(mx, mk)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        S = tl.zeros([BLOCK], tl.float32)
        T = tl.zeros([BLOCK], tl.float32)
        zy = tl.zeros([BLOCK], tl.float32)
        for k in range(0, n_splits):
            off = part_ptr + k * n64 + rows
            mk = tl.load(off, mask=mask, other=0.0)
            sk = tl.load(off + stride_k, mask=mask, other=0.0)
            tk = tl.load(off + 2 * stride_k, mask=mask, other=0.0)
            zk = tl.load(off + 3 * stride_k, mask=mask, other=0.0)
            a = tl.exp(mk - mx)  # 0 for an empty split (mk = -inf)
            d = tl.where(mk == float("-inf"), 0.0, mk - mx)
            S += a * sk
            T += a * (tk + sk * d)
            zy += zk
        S = tl.where(S > 0.0, S, 1.0)  # only rows past N / degenerate; keeps log finite
        log_s = tl.log(S)
        ent = log_s - T / S
        tgt = tl.load(tgt_ptr + rows, mask=mask, other=-100)
        valid = tgt != -100
        logp = tl.where(valid, (zy - mx) - log_s, 0.0)
        ent = tl.where(valid, ent, 0.0)
        tl.store(logp_ptr + rows, logp, mask=mask)
        tl.store(ent_ptr + rows, ent, mask=mask)
        # lse = mx + log_s is NOT formed: rounding it to fp32 at |z| >> 1 would shift every
        # recomputed p by a common factor (sum p != 1, amplified by a large logit shift)
        tl.store(max_ptr + rows, mx, mask=mask)
        tl.store(logs_ptr + rows, log_s, mask=mask)

    @triton.jit
    def _dlogits_tile(
        tile, x_ptr, w_ptr, tgt_ptr, max_ptr, logs_ptr, ent_ptr, glogp_ptr, gent_ptr, dl_ptr,
        N, H, v_start, Vc, stride_xn, stride_wv, stride_dl,
        TEMP: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_T: tl.constexpr,
        TMA: tl.constexpr,
    ):
        """dA of tile number `tile` (grouped order) of the [N, Vc] chunk, stored to dl_ptr."""
        n_t = tl.cdiv(N, BLOCK_T)
        n_v = tl.cdiv(Vc, BLOCK_V)
        # grouped order: GROUP_T token blocks sweep the vocab tiles together (L2 reuse of W tiles)
        per_group = GROUP_T * n_v
        group = tile // per_group
        first_t = group * GROUP_T
        group_size = tl.minimum(n_t - first_t, GROUP_T)
        pid_t = (first_t + (tile % per_group) % group_size).to(tl.int64)
        pid_v = ((tile % per_group) // group_size).to(tl.int64)

        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        row_mask = rows < N
        c0 = pid_v.to(tl.int32) * BLOCK_V  # the tile's first column in the chunk (< Vc < 2^31)
        tcols = tl.arange(0, BLOCK_V)  # int32 offsets in the tile: no 64-bit lanes in the 2-D compares
        col_mask = tcols < Vc - c0
        if TMA:  # columns past the chunk (< V) read real weights: masked below like padding
            x_src = x_ptr
            w_src = w_ptr
        else:
            x_src = x_ptr + rows[:, None] * stride_xn
            w_src = w_ptr + (v_start + c0 + tcols).to(tl.int64)[:, None] * stride_wv
        z = _logit_tile(x_src, w_src, pid_t.to(tl.int32) * BLOCK_T, v_start + c0,
                        row_mask, col_mask, H, TEMP, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H, TMA)
        tgt = tl.load(tgt_ptr + rows, mask=row_mask, other=-100)
        mx = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
        log_s = tl.load(logs_ptr + rows, mask=row_mask, other=0.0)
        logp_all = (z - mx[:, None]) - log_s[:, None]  # z - max is exact near the max
        # padded vocab columns (z = 0) could overflow exp when every real logit is very negative
        logp_all = tl.where(col_mask[None, :], logp_all, 0.0)
        p = tl.where(col_mask[None, :], tl.exp(logp_all), 0.0)
        d = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        if HAS_GLOGP:
            g = tl.load(glogp_ptr + rows, mask=row_mask, other=0.0)
            # the target's offset in this tile (a match outside the chunk's columns is masked below)
            onehot = tl.where(tcols[None, :] == (tgt - v_start - c0).to(tl.int32)[:, None], 1.0, 0.0)
            d += g[:, None] * (onehot - p)  # fp32: no 1 - p cancellation in low precision
        if HAS_GENT:
            e = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
            d -= e[:, None] * p * (logp_all + ent[:, None])
        d = d / TEMP
        valid = (tgt != -100) & row_mask
        d = tl.where(valid[:, None] & col_mask[None, :], d, 0.0)
        out = dl_ptr + rows[:, None] * stride_dl + (c0 + tcols)[None, :]
        tl.store(out, d.to(dl_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit
    def _bwd_dlogits_kernel(
        x_ptr, w_ptr, tgt_ptr, max_ptr, logs_ptr, ent_ptr, glogp_ptr, gent_ptr, dl_ptr,
        N, V, H, v_start, Vc, stride_xn, stride_wv, stride_dl,
        TEMP: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_T: tl.constexpr,
        TMA: tl.constexpr,  # x_ptr / w_ptr are tensor descriptors (see _logit_tile)
        FLAT: tl.constexpr,  # persistent programs over the tiles, one flattened (tile, H) loop
    ):
        # dl_ptr: [N, Vc] in the GEMM dtype, column j <-> vocab entry v_start + j
        if FLAT:
            # one program per SM walks tiles pid, pid + programs, ...; the pipeliner sees one loop,
            # so the next tile's operand loads are in flight during this tile's dA epilogue and store
            n_tiles = tl.cdiv(N, BLOCK_T) * tl.cdiv(Vc, BLOCK_V)
            for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=True):
                _dlogits_tile(tile, x_ptr, w_ptr, tgt_ptr, max_ptr, logs_ptr, ent_ptr, glogp_ptr, gent_ptr,
                              dl_ptr, N, H, v_start, Vc, stride_xn, stride_wv, stride_dl, TEMP, HAS_GLOGP,
                              HAS_GENT, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H, GROUP_T, TMA)
        else:
            _dlogits_tile(tl.program_id(0), x_ptr, w_ptr, tgt_ptr, max_ptr, logs_ptr, ent_ptr, glogp_ptr,
                          gent_ptr, dl_ptr, N, H, v_start, Vc, stride_xn, stride_wv, stride_dl, TEMP,
                          HAS_GLOGP, HAS_GENT, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H, GROUP_T, TMA)


# ---- AOT specs (kernels/report.py compiles these for sm_90 with no GPU) -----------------------------
def _aot_specs(dtype="bf16", c=None, b=None, sfx=None):
    """Specs of the three kernels for `dtype` ("bf16" | "fp32") at the forward / backward configs
    c / b (default: the shipped ones); names end in sfx (default: "" for bf16, "_fp32")."""
    if not HAS_TRITON:
        return []
    c0, b0 = CONFIGS["default"] if dtype == "bf16" else (GPU_FP32_CONFIG, GPU_FP32_BWD_CONFIG)
    c, b = c or c0, b or b0
    prec = "tf32" if dtype == "bf16" else "ieee"

    def operand(cfg, block):  # hidden / weight: a pointer, or a TMA descriptor of [block, BLOCK_H]
        return f"tensordesc<{dtype}[{cfg[block]},{cfg['BLOCK_H']}]>" if cfg.get("TMA") else f"*{dtype}"

    fwd_sig = {"x_ptr": operand(c, "BLOCK_T"), "w_ptr": operand(c, "BLOCK_V"), "tgt_ptr": "*i64", "part_ptr": "*fp32",
               "N": "i32", "V": "i32", "H": "i32", "stride_xn": "i32", "stride_wv": "i32",
               "tiles_per_split": "i32", "n_vtiles": "i32"}
    fwd_const = {"TEMP": 1.0, "DOT_PRECISION": prec, "BLOCK_T": c["BLOCK_T"],
                 "BLOCK_V": c["BLOCK_V"], "BLOCK_H": c["BLOCK_H"], "TMA": bool(c.get("TMA")),
                 "FLAT": bool(c.get("FLAT"))}
    merge_sig = {"part_ptr": "*fp32", "tgt_ptr": "*i64", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
                 "max_ptr": "*fp32", "logs_ptr": "*fp32", "N": "i32", "n_splits": "i32"}
    bwd_sig = {"x_ptr": operand(b, "BLOCK_T"), "w_ptr": operand(b, "BLOCK_V"), "tgt_ptr": "*i64", "max_ptr": "*fp32",
               "logs_ptr": "*fp32",
               "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32", "dl_ptr": f"*{dtype}",
               "N": "i32", "V": "i32", "H": "i32", "v_start": "i32", "Vc": "i32",
               "stride_xn": "i32", "stride_wv": "i32", "stride_dl": "i32"}
    bwd_const = {"TEMP": 1.0, "HAS_GLOGP": True, "HAS_GENT": True, "DOT_PRECISION": prec,
                 "BLOCK_T": b["BLOCK_T"], "BLOCK_V": b["BLOCK_V"], "BLOCK_H": b["BLOCK_H"],
                 "GROUP_T": b["GROUP_T"], "TMA": bool(b.get("TMA")), "FLAT": bool(b.get("FLAT"))}
    for k in fwd_const:
        fwd_sig[k] = "constexpr"
    for k in bwd_const:
        bwd_sig[k] = "constexpr"
    merge_sig["BLOCK"] = "constexpr"
    # aligned at the target shapes (torch allocations are 16-byte aligned; H = 5120 etc.)
    ptrs = lambda sig: [k for k, v in sig.items() if v.startswith("*")]  # noqa: E731
    if sfx is None:
        sfx = "" if dtype == "bf16" else "_fp32"
    return [
        dict(name="logprob_fwd" + sfx, fn=_fwd_kernel, signature=fwd_sig, constexprs=fwd_const,
             num_warps=c["num_warps"], num_stages=c["num_stages"],
             divisible=ptrs(fwd_sig) + ["H", "stride_xn", "stride_wv"]),
        dict(name="logprob_merge", fn=_merge_kernel, signature=merge_sig,
             constexprs={"BLOCK": MERGE_BLOCK}, num_warps=4, num_stages=1,
             divisible=ptrs(merge_sig)),
        dict(name="logprob_bwd_dlogits" + sfx, fn=_bwd_dlogits_kernel, signature=bwd_sig,
             constexprs=bwd_const, num_warps=b["num_warps"], num_stages=b["num_stages"],
             divisible=ptrs(bwd_sig) + ["H", "v_start", "stride_xn", "stride_wv", "stride_dl"]),
    ]


def _merge_spec_ones():
    """The merge kernel as the JIT compiles it for one token and one vocabulary split: an int
    argument equal to 1 becomes a constant there, so `.to()` on it does not compile."""
    spec = dict(next(s for s in _aot_specs("bf16") if s["name"] == "logprob_merge"))
    spec["name"] = "logprob_merge_n1"
    spec["signature"] = {**spec["signature"], "N": "constexpr", "n_splits": "constexpr"}
    spec["constexprs"] = {**spec["constexprs"], "N": 1, "n_splits": 1}
    return spec


AOT_SPECS = _aot_specs("bf16") + [s for s in _aot_specs("fp32") if s["name"] != "logprob_merge"]
if AOT_SPECS:
    AOT_SPECS.append(_merge_spec_ones())



# ---- checks ---------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, targets, temperature, impl):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"fused_logprobs: hidden must be a 2-D tensor [N, H], got "
                         f"{getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"fused_logprobs: weight must be a 2-D tensor [V, H], got "
                         f"{getattr(weight, 'shape', type(weight))}")
    N, H = hidden.shape
    V, Hw = weight.shape
    if Hw != H:
        raise ValueError(f"fused_logprobs: hidden is [N={N}, H={H}] but weight is [V={V}, H={Hw}]; "
                         f"the hidden sizes must match")
    if not isinstance(targets, torch.Tensor) or targets.shape != (N,):
        raise ValueError(f"fused_logprobs: targets must be [N={N}], got "
                         f"{tuple(getattr(targets, 'shape', ()))}")
    if targets.dtype != torch.int64:
        raise ValueError(f"fused_logprobs: targets must be int64, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must "
                         f"have the same dtype")
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if impl == "torch":
        allowed = allowed + (torch.float64,)
    if hidden.dtype not in allowed:
        raise ValueError(f"fused_logprobs(impl={impl!r}): dtype {hidden.dtype} not supported, "
                         f"expected one of {allowed}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"fused_logprobs: hidden ({hidden.device}), weight ({weight.device}) and "
                         f"targets ({targets.device}) must be on one device")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"fused_logprobs: temperature must be a finite number > 0, got {temperature}")
    if impl == "triton":
        if hidden.stride(1) != 1 and H > 1:
            raise ValueError("fused_logprobs: hidden must have a contiguous last dimension "
                             f"(strides {hidden.stride()}); call .contiguous()")
        if not weight.is_contiguous():
            raise ValueError(f"fused_logprobs: weight must be contiguous (strides {weight.stride()})")
        if not targets.is_contiguous():
            raise ValueError("fused_logprobs: targets must be contiguous")
    # A range check needs the values on the host: do it on CPU only (on CUDA it would be a sync
    # per call). Out-of-range targets on CUDA give a meaningless logp for that row.
    if targets.device.type == "cpu" and N > 0:
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"fused_logprobs: targets[{i}] = {int(targets[i])} is outside "
                             f"[0, V={V}) and is not the ignore index {IGNORE_INDEX}")
    return t




# ---- Triton launchers -------------------------------------------------------------------------------
def _cfg(device, dtype, bwd=False):
    if device.type == "cuda" and not _interpreting():
        if dtype == torch.float32:
            return GPU_FP32_BWD_CONFIG if bwd else GPU_FP32_CONFIG
        fwd_c, bwd_c = CONFIGS.get(torch.cuda.get_device_name(device), CONFIGS["default"])
        return bwd_c if bwd else fwd_c
    return INTERP_BWD_CONFIG if bwd else INTERP_CONFIG
def _tma_ok(t):
    """The copy engine addresses t [R, C]: unit last stride, 16-byte aligned base and row stride."""
    nbytes = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * nbytes) % 16 == 0 and t.shape[1] * nbytes >= 16)


def _operands(hidden, weight, c):
    """(x, w, tma): what the kernels read hidden [N, H] and weight [V, H] through. With c["TMA"]
    and tensors the copy engine can address: tensor descriptors with [BLOCK_T | BLOCK_V, BLOCK_H]
    blocks; otherwise the tensors themselves (pointer loads)."""
    if c.get("TMA") and TensorDescriptor is not None and _tma_ok(hidden) and _tma_ok(weight):
        return (TensorDescriptor.from_tensor(hidden, [c["BLOCK_T"], c["BLOCK_H"]]),
                TensorDescriptor.from_tensor(weight, [c["BLOCK_V"], c["BLOCK_H"]]), True)
    return hidden, weight, False


def _dot_precision(dtype):
    # fp32 inputs are compared with fp64 references: keep them exact (no TF32)
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_splits(n_tblocks, n_vtiles, device):
    if device.type == "cuda" and not _interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # >= 2 waves of programs, and >= 16 splits so one wave spans <= ~sms/16 token blocks
        want = max(16, -(-2 * sms // n_tblocks))
    else:
        want = 3  # under the interpreter: small, but exercises the multi-split merge
    return max(1, min(want, n_vtiles))


def triton_forward(hidden, weight, targets, temperature):
    """Returns (logp, entropy, (row max, log sum exp(z - max))), all fp32 [N]."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty_like(logp)
    mx = torch.empty_like(logp)
    log_s = torch.empty_like(logp)
    if N == 0:
        return logp, ent, (mx, log_s)
    c = _cfg(dev, hidden.dtype)
    n_tb = triton.cdiv(N, c["BLOCK_T"])
    n_vt = triton.cdiv(V, c["BLOCK_V"])
    splits = _num_splits(n_tb, n_vt, dev)
    tiles_per_split = triton.cdiv(n_vt, splits)
    splits = triton.cdiv(n_vt, tiles_per_split)  # no empty split
    part = torch.empty(4, splits, N, device=dev, dtype=torch.float32)
    x_op, w_op, tma = _operands(hidden, weight, c)
    _fwd_kernel[(splits, n_tb)](
        x_op, w_op, targets, part, N, V, H, hidden.stride(0), weight.stride(0),
        tiles_per_split, n_vt,
        TEMP=float(temperature), DOT_PRECISION=_dot_precision(hidden.dtype),
        BLOCK_T=c["BLOCK_T"], BLOCK_V=c["BLOCK_V"], BLOCK_H=c["BLOCK_H"], TMA=tma, FLAT=bool(c.get("FLAT")),
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    _merge_kernel[(triton.cdiv(N, MERGE_BLOCK),)](part, targets, logp, ent, mx, log_s, N, splits,
                                                 BLOCK=MERGE_BLOCK, num_warps=4)
    return logp, ent, (mx, log_s)


_fallbacks_logged: set[str] = set()


def _log_fallback_once(what: str, err: Exception) -> None:
    """Say once which GEMM path is unavailable (the benchmarks' logs show why a path is slower)."""
    if what not in _fallbacks_logged:
        _fallbacks_logged.add(what)
        logging.getLogger("lwz").warning("fused log-prob backward: %s unavailable (%s: %s); using a fallback",
                                         what, type(err).__name__, str(err)[:120])


_ACC_MM_PATHS = ["addmm", "mm", "half"]  # the half-input paths still worth trying, best first


def _acc_mm(out32, a, b):
    """out32 += a @ b with fp32 accumulation and fp32 output (a, b may be half precision).

    Half inputs on CUDA try, best first: addmm with out_dtype=fp32 in place (no temporary); mm with
    out_dtype=fp32 plus an add (an fp32 [N, H] temporary); a half-precision product. A path this
    torch rejects is dropped for good at its first failure (no exception per vocabulary chunk)."""
    if a.dtype == torch.float32:
        out32.addmm_(a, b if b.dtype == torch.float32 else b.float())
        return
    if not a.is_cuda:
        out32.addmm_(a.float(), b.float())
        return
    while len(_ACC_MM_PATHS) > 1:
        path = _ACC_MM_PATHS[0]
        try:
            if path == "addmm":
                torch.addmm(out32, a, b, out_dtype=torch.float32, out=out32)
            else:
                out32 += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _log_fallback_once(f"{path}(out_dtype=fp32)", e)
            _ACC_MM_PATHS.pop(0)
    out32 += torch.mm(a, b).float()


class BwdPlan(NamedTuple):
    """How the Triton backward walks dA = d loss / d logits (see _bwd_plan)."""
    tc: int     # tokens per group of the dX walk; N: one walk gives dX and dW together
    vc: int     # vocabulary columns per chunk of that walk
    vc_dw: int  # columns per chunk of the separate dW walk over all N tokens (used where tc < N)


def _whole_blocks(n, block, full):
    """n rounded down to whole blocks, at least one block, at most full."""
    return min(full, max(block, n // block * block))


def _chunk_cols(rows, acc_row, elem, block_v, V, budget):
    """Vocabulary columns of a dA chunk [rows, w] (elem bytes each) that fit the budget beside an
    fp32 accumulator of rows * acc_row bytes: whole blocks, at least one, at most V and
    MAX_CHUNK_BYTES."""
    spare = min(budget - rows * acc_row, MAX_CHUNK_BYTES)
    return _whole_blocks(spare // max(1, rows * elem), block_v, V)


def _bwd_plan(N, V, elem, acc_row, block_t, block_v, budget):
    """The backward's walk within `budget` bytes of scratch: N tokens, V vocabulary, elem = bytes
    per dA element, acc_row = bytes per token of the fp32 dX accumulator (H * 4 for half-precision
    hidden; 0 when dX is fp32 itself or not needed). Token groups are as many rows as fit with a
    chunk of MIN_CHUNK_COLS columns (all N when they fit: one walk); each walk's chunks are what the
    budget leaves beside its accumulator (_chunk_cols). With a budget under one block, the smallest
    footprint (one block of each)."""
    tc = _whole_blocks(budget // max(1, acc_row + min(V, MIN_CHUNK_COLS) * elem), block_t, N)
    return BwdPlan(tc, _chunk_cols(tc, acc_row, elem, block_v, V, budget), _chunk_cols(N, 0, elem, block_v, V, budget))


def _dlogits_dtype(hidden):
    # GEMM dtype: tensor cores on GPU (bf16/fp16 dA, fp32 accumulate in cuBLAS); fp32 elsewhere
    on_gpu = hidden.device.type == "cuda" and not _interpreting()
    return hidden.dtype if on_gpu else torch.float32


def backward_plan(hidden, weight, scratch_bytes=None, need_dx=True):
    """The Triton backward's walk for these inputs and budget (default BWD_SCRATCH_BYTES): _bwd_plan's
    BwdPlan."""
    N, H = hidden.shape
    c = _cfg(hidden.device, hidden.dtype, bwd=True)
    elem = torch.finfo(_dlogits_dtype(hidden)).bits // 8
    acc_row = H * 4 if need_dx and hidden.dtype != torch.float32 else 0
    budget = BWD_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    return _bwd_plan(N, weight.shape[0], elem, acc_row, c["BLOCK_T"], c["BLOCK_V"], budget)


def triton_backward(hidden, weight, targets, stats, ent, g_logp, g_ent, temperature,
                    need_dx=True, need_dw=True, scratch_bytes=None):
    """(dX [N, H] in hidden's dtype or None, dW [V, H] in weight's dtype or None), holding at most
    scratch_bytes (default BWD_SCRATCH_BYTES) beyond them; see _bwd_plan."""
    mx, log_s = stats
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if N == 0 or (g_logp is None and g_ent is None):
        dx = torch.zeros_like(hidden) if need_dx else None
        return dx, (torch.zeros_like(weight) if need_dw else None)
    c = _cfg(dev, hidden.dtype, bwd=True)
    on_gpu = dev.type == "cuda" and not _interpreting()
    dl_dtype = _dlogits_dtype(hidden)
    # FLAT configs: one persistent program per SM (the shipped-size tiles' registers and SMEM
    # leave room for one); 3 under the interpreter, so each program there walks several tiles
    persistent_programs = torch.cuda.get_device_properties(dev).multi_processor_count if on_gpu else 3
    plan = backward_plan(hidden, weight, scratch_bytes, need_dx)
    dummy = ent  # placeholder pointer for absent upstream grads (never read: constexpr-guarded)
    x_g = hidden if on_gpu or hidden.dtype == torch.float32 else hidden.float()
    w_g = weight if on_gpu or weight.dtype == torch.float32 else weight.float()

    def dlogits(buf, r0, r1, v0, w):
        """dA of tokens [r0, r1) x vocabulary [v0, v0 + w), a contiguous [r1 - r0, w] view of buf."""
        n = r1 - r0
        out = buf[: n * w].view(n, w)
        rows = slice(r0, r1)
        n_tiles = triton.cdiv(n, c["BLOCK_T"]) * triton.cdiv(w, c["BLOCK_V"])
        grid = (min(n_tiles, persistent_programs) if c.get("FLAT") else n_tiles,)
        x_op, w_op, tma = _operands(hidden[rows], weight, c)
        _bwd_dlogits_kernel[grid](
            x_op, w_op, targets[rows], mx[rows], log_s[rows], ent[rows],
            g_logp[rows] if g_logp is not None else dummy, g_ent[rows] if g_ent is not None else dummy,
            out, n, V, H, v0, w, hidden.stride(0), weight.stride(0), out.stride(0),
            TEMP=float(temperature), HAS_GLOGP=g_logp is not None, HAS_GENT=g_ent is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_T=c["BLOCK_T"], BLOCK_V=c["BLOCK_V"], BLOCK_H=c["BLOCK_H"], GROUP_T=c["GROUP_T"],
            TMA=tma, FLAT=bool(c.get("FLAT")), num_warps=c["num_warps"], num_stages=c["num_stages"])
        return out

    dw = torch.empty_like(weight) if need_dw else None
    dx = torch.empty(N, H, device=dev, dtype=hidden.dtype) if need_dx else None

    def walk(tc, vc, with_dx, with_dw):
        """Token groups of tc rows x vocabulary chunks of vc columns: dX[group] = sum over chunks of
        dA W[chunk] in fp32 (an own [tc, H] accumulator, or dX itself when fp32; one GEMM straight
        into dX when a chunk covers the vocabulary), and, with with_dw (tc == N only),
        dW[chunk] = dA^T X over all tokens, written once. The buffers live while the walk runs."""
        whole = vc >= V
        buf = torch.empty(min(tc, N) * min(vc, V), device=dev, dtype=dl_dtype)
        acc = None
        if with_dx and not whole and dx.dtype != torch.float32:
            acc = torch.empty(min(tc, N), H, device=dev, dtype=torch.float32)
        for g0 in range(0, N, tc):
            g1 = min(N, g0 + tc)
            if with_dx and not whole:
                rows = (dx[g0:g1] if acc is None else acc[: g1 - g0]).zero_()
            for v0 in range(0, V, vc):
                w = min(vc, V - v0)
                dlc = dlogits(buf, g0, g1, v0, w)
                if with_dx and not whole:
                    _acc_mm(rows, dlc, w_g[v0:v0 + w])
                elif with_dx and on_gpu:
                    torch.mm(dlc, weight, out=dx[g0:g1])
                elif with_dx:
                    dx[g0:g1] = (dlc @ w_g).to(dx.dtype)
                if with_dw and on_gpu:
                    torch.mm(dlc.t(), hidden, out=dw[v0:v0 + w])
                elif with_dw:
                    dw[v0:v0 + w] = (dlc.t() @ x_g).to(dw.dtype)
            if acc is not None:
                dx[g0:g1] = acc[: g1 - g0]

    if plan.tc >= N:  # one walk: the accumulator of all N tokens beside a chunk fits
        walk(N, plan.vc, need_dx, need_dw)
    else:  # dX by token groups, then dW over all tokens (its logits recomputed), each within the budget
        if need_dx:
            walk(plan.tc, plan.vc, True, False)
        if need_dw:
            walk(N, plan.vc_dw, False, True)
    return dx, dw


# ---- plain torch, chunked -----------------------------------------------------------------------
def _torch_logits(x, weight, temperature):
    # GEMM in the input dtype (what "plain torch in the same dtype" does), softmax math in fp32+
    z = x @ weight.t()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return z.div_(temperature)  # in place: every extra [C, V] pass costs as much as the GEMM here


def _torch_chunk_elems(device):
    """Elements of one fp32 logits chunk of the torch path ([C, V] forward, [N, Vc] backward): on
    the CPU ~1 MB, which stays in L2 across the elementwise passes; on a GPU big (few launches)."""
    return (1 << 24) if device.type == "cuda" else (1 << 18)


def _fwd_chunk(x, weight, t, temperature):
    """One token chunk of the torch forward: x [C, H], t [C] -> (logp, entropy, row max,
    log sum exp(z - max)), each [C] in fp32 (fp64 for fp64 inputs)."""
    V = weight.shape[0]
    z = _torch_logits(x, weight, temperature)
    m = z.amax(dim=1)
    z -= m[:, None]  # z - max is exact near the max (see the merge kernel note)
    p = z.exp()
    s = p.sum(1)
    ls = s.log()
    # entropy = log s - sum exp(z-m)(z-m) / s: relative to the max, no cancellation at big shifts
    e = ls - (p * z).sum(1) / s  # torch.sum is pairwise: accurate over V terms
    valid = t != IGNORE_INDEX
    lp = z.gather(1, t.clamp(0, V - 1)[:, None]).squeeze(1) - ls
    return torch.where(valid, lp, 0.0), torch.where(valid, e, 0.0), m, ls


def torch_forward(hidden, weight, targets, temperature):
    N = hidden.shape[0]
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.empty(N, device=hidden.device, dtype=acc)
    ent = torch.empty_like(logp)
    mx = torch.empty_like(logp)
    log_s = torch.empty_like(logp)
    C = max(1, _torch_chunk_elems(hidden.device) // max(1, V))
    for i in range(0, N, C):
        rows = slice(i, i + C)
        logp[rows], ent[rows], mx[rows], log_s[rows] = _fwd_chunk(hidden[rows], weight, targets[rows], temperature)
    return logp.float(), ent.float(), (mx, log_s)


def _dA_chunk(hidden, wc, idx, mx_, ls_, ent_, gl, nge, temperature):
    """dA = d loss / d z of one vocabulary chunk [N, Vc] in the accumulation dtype.

    hidden [N, H], wc [Vc, H]; idx [N] = target - (chunk start) (outside [0, Vc): no one-hot
    here); mx_, ls_, ent_ [N, 1] row stats; gl = g_logp * valid / tau and nge = -g_ent * valid / tau
    as [N, 1] (or None)."""
    z = _torch_logits(hidden, wc, temperature).to(mx_.dtype)
    z -= mx_
    z -= ls_  # log p
    p = z.exp()
    if nge is not None:  # dH/dz = -p (log p + H)
        d = z.add_(ent_).mul_(p).mul_(nge)
        if gl is not None:
            d.addcmul_(p, gl, value=-1.0)
    elif gl is not None:
        d = p.mul_(-gl)
    else:
        d = z.zero_()
    if gl is not None:
        # one-hot part without a host sync: scatter g into the chunk's target column (if any)
        inside = (idx >= 0) & (idx < wc.shape[0])
        d.scatter_add_(1, idx.clamp(0, wc.shape[0] - 1)[:, None], gl * inside.to(d.dtype)[:, None])
    return d


def torch_backward(hidden, weight, targets, stats, ent, g_logp, g_ent, temperature,
                   need_dx=True, need_dw=True, scratch_bytes=None):
    # chunks of _torch_chunk_elems (scratch_bytes is the Triton path's): dW written once per chunk
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dx = torch.zeros(N, H, device=hidden.device, dtype=acc) if need_dx else None
    dw = torch.empty_like(weight) if need_dw else None
    # fold validity and 1/temperature into the [N] upstream grads instead of the [N, Vc] matrix
    vf = (targets != IGNORE_INDEX).to(acc)[:, None] / temperature
    gl = None if g_logp is None else g_logp.to(acc)[:, None] * vf
    nge = None if g_ent is None else -(g_ent.to(acc)[:, None] * vf)
    half = _half_gemms(hidden)
    x_acc = hidden if half else hidden.to(acc)
    ent_ = ent.to(acc)[:, None]
    mx_ = stats[0].to(acc)[:, None]
    ls_ = stats[1].to(acc)[:, None]
    # vocab chunks: dW[chunk] is one GEMM over all tokens (written once, never accumulated)
    Vc = max(1, _torch_chunk_elems(hidden.device) // max(1, N))
    for v0 in range(0, V, Vc):
        wc = weight[v0:v0 + Vc]
        d = _dA_chunk(hidden, wc, targets - v0, mx_, ls_, ent_, gl, nge, temperature)
        if half:  # dA rounded to the input dtype, fp32 accumulation inside the GEMMs
            d = d.to(hidden.dtype)
            if need_dx:
                _acc_mm(dx, d, wc)
            if need_dw:
                torch.mm(d.t(), hidden, out=dw[v0:v0 + Vc])
            continue
        if need_dx:
            dx.addmm_(d, wc if wc.dtype == acc else wc.to(acc))
        if need_dw:
            dw[v0:v0 + Vc] = (d.t() @ x_acc).to(dw.dtype)
    return (dx.to(hidden.dtype) if need_dx else None), dw


def _half_gemms(hidden):
    """Whether the torch backward runs its GEMMs on dA in the input dtype (fp32 accumulation):
    fp16/bf16 on a GPU, as the Triton path does (fp32 GEMMs of half inputs are several times
    slower there). Elsewhere (the CPU trainer, fp64 tests) they run in fp32 / fp64."""
    return hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16)


def compile_torch_chunks(**compile_kwargs):
    """torch.compile the chunk bodies of the torch path (`_fwd_chunk`, `_dA_chunk`) for the rest of
    the process: each is one small graph compiled per chunk shape, while the chunk loops stay in
    Python (compiling the whole path would unroll them: minutes at 16k tokens). What the log-prob
    benchmark times as "torch.compile of the chunked torch path"."""
    global _fwd_chunk, _dA_chunk
    _fwd_chunk = torch.compile(_fwd_chunk, **compile_kwargs)
    _dA_chunk = torch.compile(_dA_chunk, **compile_kwargs)


# ---- autograd -----------------------------------------------------------------------------------
class FusedLogprobFunction(torch.autograd.Function):
    """(hidden, weight, targets, temperature, impl, scratch_bytes) -> (logp fp32 [N], entropy fp32 [N]).
    Saves hidden, weight, targets and the fp32 [N] stats (row max, log sum exp(z - max),
    entropy); nothing [N, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, impl, scratch_bytes):
        fwd = triton_forward if impl == "triton" else torch_forward
        logp, ent, (mx, log_s) = fwd(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, mx, log_s, ent)
        ctx.temperature = temperature
        ctx.impl = impl
        ctx.scratch_bytes = scratch_bytes
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, mx, log_s, ent = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None, None, None
        g_logp = None if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        bwd = triton_backward if ctx.impl == "triton" else torch_backward
        dx, dw = bwd(hidden, weight, targets, (mx, log_s), ent, g_logp, g_ent, ctx.temperature,
                     need_dx=need_dx, need_dw=need_dw, scratch_bytes=ctx.scratch_bytes)
        return dx, dw, None, None, None, None


def fused_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, impl="auto",
                   bwd_scratch_bytes=None):
    """Per-token log p(target) (and entropy) of softmax(hidden @ weight.T / temperature).

    hidden [N, H], weight [V, H] (same float dtype), targets int64 [N] (-100 = ignored: logp 0,
    entropy 0, no gradient). Returns (logp fp32 [N], entropy fp32 [N] or None); differentiable in
    hidden and weight. impl: "triton" | "torch" | "auto" (Triton on CUDA, chunked torch elsewhere).
    bwd_scratch_bytes: the memory the Triton backward may hold beyond the gradients (default
    BWD_SCRATCH_BYTES, 1 GiB). From about N * (H * 4 + MIN_CHUNK_COLS * 2) bytes (half precision)
    it walks once; below that twice, recomputing the logits for dW (+25% flops). Both exact.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"fused_logprobs: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = "triton" if (HAS_TRITON and isinstance(hidden, torch.Tensor) and hidden.is_cuda) \
            else "torch"
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("fused_logprobs(impl='triton'): triton is not importable")
    if impl == "triton" and isinstance(hidden, torch.Tensor) and not hidden.is_cuda \
            and not _interpreting():
        raise ValueError("fused_logprobs(impl='triton'): tensors are on CPU; set TRITON_INTERPRET=1 "
                         "(before importing triton) or use impl='torch'")
    t = _check_inputs(hidden, weight, targets, temperature, impl)
    if bwd_scratch_bytes is not None and not (isinstance(bwd_scratch_bytes, int) and bwd_scratch_bytes >= 0):
        raise ValueError(f"fused_logprobs: bwd_scratch_bytes must be an int >= 0, got {bwd_scratch_bytes!r}")
    logp, ent = FusedLogprobFunction.apply(hidden, weight, targets, t, impl, bwd_scratch_bytes)
    return logp, (ent if return_entropy else None)
