"""KV-outer (FSA-style) forward: one program per work item = (KV head, selected block, chunk of the
tokens that chose it), the G heads of those tokens stacked as rows of one MMA tile.

MAIN   one key block, BLOCK_M rows = PAIRS tokens x G heads (gathered query rows):
       S = Q K^T * scale*log2e (key > token masked); m = rowmax; P = exp2(S - m); l = rowsum;
       partial O_p = P V / l and partial lse2_p = m + log2(l), each with its own local max.
REDUCE per (token, KV head), over the token's slots (fixed order, deterministic; a program takes several
       tokens, its rows are tokens x G heads):
       M = max lse2_p; O = sum 2^(lse2_p - M) O_p / sum 2^(lse2_p - M); LSE = M + log2(sum ...).
LOCAL  (opt-in, SPARSA_KV_LOCAL=1) the merge kernel first runs an online softmax over its tokens' local
       blocks (block 0, own, previous) from contiguous query rows, then merges the other partials; MAIN
       skips those pairs (no gathered rows, no partials for 3 of the benchmark's 16 slots).
SPLIT  (opt-in, SPARSA_KV_LOCAL_SPLIT=1, kv_local.py) the pair index has no local pairs; the local kernel writes
       o, lse of the local blocks and the merge (INIT) starts from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import env_flag
from . import kv_gluon, kv_local, overlap
from .index import PairIndex, work_list
from .q_outer import LOG2E, _pow2, attend_block, precision_for, store_rows


# rows (tokens x G heads) of one program of the per-token reductions (forward merge, dQ sum) at head dim 128
# (at least one token's G rows); with REDUCE_SLOTS below: 8 rows x 16 slots
REDUCE_ROWS = 8
# rows of one program of the forward merge with the local blocks fused in (head dim <= 128)
LOCAL_ROWS = 64


# (rows, num_warps) of the fused merge kernel forced by the tuning scripts; None = local_config's choice
LOCAL_OVERRIDE: tuple | None = None


def local_config(group: int, head_dim: int):
    """(BLOCK_R rows, tokens per program, num_warps) of the merge kernel with the local blocks fused in.
    8 warps: compiled offline for sm_90 (bf16, top-16) 4 warps spill at D = 64 / 256 and block 128, 8 warps
    do not (G = 1 .. 16, D = 128, block 64 and 16; 64-112 bytes at block 128 with G = 1 or 8)."""
    if LOCAL_OVERRIDE is not None:
        rows = max(LOCAL_OVERRIDE[0], _pow2(group, 1))
        return rows, rows // group, LOCAL_OVERRIDE[1]
    rows, tokens, _ = reduce_config(group, head_dim, LOCAL_ROWS)
    return rows, tokens, 8


def merge_stages(local: bool, block_size: int, head_dim: int) -> int:
    """Pipeline stages of the merge kernel: 3, or 2 with the local blocks fused in at block 128, head dims from 128
    (offline sm_90 build: 213056 bytes of shared memory with 3 stages, 147520 with 2; the H100's build of the dK/dV
    kernel needed 32 KB more than its offline build, session 16)."""
    return 2 if local and block_size >= 128 and head_dim >= 128 else 3


def local_fusion() -> bool:
    """Whether the forward computes each token's local blocks (its document's block 0, its own and the
    previous block) in the merge kernel instead of MAIN: SPARSA_KV_LOCAL=1, or 0 (the default: slower
    on the H100 at every measured shape, session 9; docs/kernels/sparse_attention.md)."""
    return env_flag("SPARSA_KV_LOCAL", False)


# slots of a token merged per step by the per-token reductions (forward merge, dQ sum): their partials are
# loaded as one [rows, SLOTS, D] tile, so that SLOTS loads per row are in flight at once (1: slot by slot).
# 8 rows x 16 slots beat the former 32 rows x 1 slot at every measured shape (H200, 2026-12-06,
# scripts/kv_variants.py --reduce, benchmarks/results/h200_session11): 64K G = 4 forward+backward 25.66 vs
# 26.74 ms (merge kernel 2.14 vs 2.89, dQ sum 2.08 vs 2.42), G = 1 29.02 vs 30.15, G = 16 (16 x 8) 22.70 vs 23.72;
# 8K G = 4 3.19 vs 3.34, G = 1 3.38 vs 3.53. Capped at REDUCE_ELEMENTS elements per step (head dim 256: 8 slots).
REDUCE_SLOTS = 16
REDUCE_ELEMENTS = 8 * 16 * 128
# (rows, slots per step[, num_warps]) of the per-token reductions forced by the tuning scripts
# (scripts/kv_variants.py --reduce); None = reduce_config's choice and REDUCE_SLOTS
REDUCE_OVERRIDE: tuple | None = None


def reduce_slots(topk: int, rows: int = 8, head_dim: int = 128) -> int:
    """SLOTS of the per-token reductions: REDUCE_OVERRIDE's, else REDUCE_SLOTS capped at REDUCE_ELEMENTS per
    step of `rows` rows; at most topk rounded up to a power of two."""
    if REDUCE_OVERRIDE is not None:
        slots = REDUCE_OVERRIDE[1]
    else:
        slots = max(1, min(REDUCE_SLOTS, REDUCE_ELEMENTS // (rows * _pow2(head_dim))))
        slots = 1 << (slots.bit_length() - 1)  # a power of two
    if slots < 1 or slots & (slots - 1):
        raise ValueError(f"reduction slots per step must be a power of two >= 1, got {slots}")
    return min(slots, _pow2(topk, 1))


def reduce_config(group: int, head_dim: int, base_rows: int | None = None):
    """(BLOCK_R rows, tokens per program, num_warps) of the per-token reductions: whole tokens of G rows,
    about base_rows (REDUCE_ROWS) x 128 elements per program and slot."""
    if REDUCE_OVERRIDE is not None and base_rows is None:
        block_r = max(REDUCE_OVERRIDE[0], _pow2(group, 1))
        warps = REDUCE_OVERRIDE[2] if len(REDUCE_OVERRIDE) > 2 else 4
        return block_r, block_r // group, warps
    rows = max(8, (base_rows or REDUCE_ROWS) * 128 // max(head_dim, 16))
    rows = 1 << (rows.bit_length() - 1)  # a power of two (tl.arange), also for head dims such as 24 or 40
    block_r = max(rows, _pow2(group, 1))
    return block_r, block_r // group, 4


@triton.jit
def group_block(BLKSTART, BLKLEN, grp, NBG, h0):
    """Group grp of a pair index (KV head slot x global block): (global block gb, KV head h, first key
    position kst, keys in the block blen)."""
    gb = grp % NBG
    return gb, h0 + grp // NBG, tl.load(BLKSTART + gb), tl.load(BLKLEN + gb)


@triton.jit
def token_rows(N, G: tl.constexpr, BLOCK_R: tl.constexpr, TOKENS: tl.constexpr):
    """Rows of a reduction program over TOKENS consecutive tokens (program axis 0) x G heads:
    (token t [R] int64, head in the group g [R], row mask [R]); rows past TOKENS * G or N are masked."""
    offs_r = tl.arange(0, BLOCK_R)
    tr = offs_r // G
    t = tl.program_id(0).to(tl.int64) * TOKENS + tr
    return t, offs_r % G, (tr < TOKENS) & (t < N)


@triton.jit
def tile_is_one_doc(DOCSTART, t0, N, TOKENS: tl.constexpr, mask):
    """Whether the merge tile of TOKENS tokens that starts at t0 lies inside one document."""
    t1 = tl.minimum(t0 + TOKENS, N) - 1
    return tl.load(DOCSTART + t0, mask=mask, other=0) == tl.load(DOCSTART + t1, mask=mask, other=0)


def local_block_table(meta, block_size: int, tokens: int) -> torch.Tensor:
    """[N, 2] int32 per token: global ids of its document's block 0 and of its own block, or (-2, -2) when
    its merge tile (`tokens` consecutive tokens from a multiple of `tokens`) is not inside one document.
    MAIN skips a pair (token t, global block gb) when gb is one of them or the own block - 1 (the merge
    kernel computes those); one 8-byte load per row. Cached on the layout."""
    key = ("local_blocks", block_size, tokens)
    if key not in meta.derived:
        n = meta.n_tokens
        t = torch.arange(n, device=meta.tok_docstart.device)
        own = meta.tok_blockbase + (t - meta.tok_docstart) // block_size
        tile0 = (t // tokens) * tokens
        tile1 = torch.clamp(tile0 + tokens, max=n) - 1
        one_doc = meta.tok_docstart[tile0] == meta.tok_docstart[tile1]
        none = torch.full_like(own, -2)
        table = torch.stack([torch.where(one_doc, meta.tok_blockbase, none), torch.where(one_doc, own, none)], 1)
        meta.derived[key] = table.to(torch.int32).contiguous()
    return meta.derived[key]


@triton.jit
def local_pair(tok, gb, LOCALBLK, mask):
    """[M] bool: the pair (token tok, global block gb) is one of the token's local blocks (its document's
    block 0, its own block, the previous one) and its merge tile lies in one document (local_block_table),
    so that the merge kernel computes it (the same test as _kv_fwd_merge_kernel's with LOCAL)."""
    block0 = tl.load(LOCALBLK + tok * 2, mask=mask, other=-2)
    own = tl.load(LOCALBLK + tok * 2 + 1, mask=mask, other=-2)
    return (gb == block0) | (gb == own) | (gb == own - 1)


@triton.jit
def _kv_fwd_merge_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    OP,
    LSEP,
    POS,
    IDX,
    DOCSTART,
    qk_scale,
    N,
    Hq,
    Hkv,
    h0,
    BS,
    TOPK: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    LOCAL: tl.constexpr,
    SLOTS: tl.constexpr = 1,
    HINTS: tl.constexpr = False,
    INIT: tl.constexpr = False,
):
    """REDUCE: one program per (TOKENS consecutive tokens, KV head), rows = those tokens x their G heads;
    merges each row's partials slot by slot (slot order: deterministic), without a branch per slot so that
    the loads of all rows of a slot are issued together.
    INIT: each row starts from the (o, lse) already in O, LSE (the local kernel's, kv_local.py) as a partial of
    its own (normalised, weight 2^lse2), instead of from nothing.
    LOCAL (opt-in): when the tile lies in one document, an online softmax over its tokens' local blocks
    (block 0, own, previous; each row only over the ones its token selected) from the contiguous query rows
    starts the merge, and those slots' partials (not written by MAIN) are skipped."""
    hl = tl.program_id(1).to(tl.int64)
    h = h0 + hl
    t, g, rmask = token_rows(N, G, BLOCK_R, TOKENS)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    if INIT:
        orow = t * Hq + h * G + g
        m_i = tl.load(LSE + orow, mask=rmask, other=float("-inf")) * 1.4426950408889634  # natural log -> log2
        l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
        acc = tl.load(O + orow[:, None] * DV + offs_dv[None, :], mask=rmask[:, None] & (offs_dv < DV)[None, :],
                      other=0.0).to(tl.float32)
    idx_row = IDX + (t * Hkv + h) * TOPK  # [R]
    if LOCAL:
        t0 = tl.program_id(0).to(tl.int64) * TOKENS
        t1 = tl.minimum(t0 + TOKENS, N) - 1
        ds = tl.load(DOCSTART + t0)
        one_doc = tile_is_one_doc(DOCSTART, t0, N, TOKENS, True)
        own = (t - ds) // BS  # [R] (meaningful when one_doc)
        if one_doc:
            offs_d = tl.arange(0, BLOCK_D)
            offs_n = tl.arange(0, BLOCK_N)
            q = tl.load(
                Q + (t * Hq + h * G + g)[:, None] * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :],
                other=0.0,
            )
            offs_k = tl.arange(0, BLOCK_K)
            sel = tl.load(idx_row[:, None] + offs_k[None, :], mask=rmask[:, None] & (offs_k < TOPK)[None, :], other=-1)
            lo = tl.maximum((t0 - ds) // BS - 1, 0)
            hi = (t1 - ds) // BS
            extra = (lo > 0).to(tl.int64)  # block 0 first when it is not in [lo, hi]
            for i in range(hi - lo + 1 + extra):
                c = tl.where(i < extra, 0, lo + i - extra)
                chosen = tl.max((sel == c).to(tl.int32), 1) > 0
                use = rmask & chosen & ((c == 0) | (c == own) | (c == own - 1))  # [R]
                kpos = ds + c * BS + offs_n
                kmask = (offs_n < BS) & (kpos <= t1)
                score_mask = use[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
                m_i, l_i, acc = attend_block(
                    q, K, V, kpos, kmask, h, Hkv, score_mask, m_i, l_i, acc, qk_scale, D, DV, BLOCK_D, BLOCK_DV,
                    PRECISION,
                )
    STREAM: tl.constexpr = "evict_first" if HINTS else ""  # partials are read once
    pos_row = POS + (hl * N + t) * TOPK  # [R]
    dvmask = offs_dv < DV
    if SLOTS == 1:  # slot by slot: the fused-local merge as measured (the tile code at SLOTS = 1 compiles differently)
        for s in range(TOPK):
            pp = tl.load(pos_row + s, mask=rmask, other=-1).to(tl.int64)
            ok = pp >= 0
            if LOCAL:
                blk = tl.load(idx_row + s, mask=rmask, other=-1)
                ok = ok & ~(one_doc & ((blk == 0) | (blk == own) | (blk == own - 1)))  # merged above, no partial
            rows = pp * G + g
            lp = tl.load(LSEP + rows, mask=ok, other=float("-inf"))
            op = tl.load(OP + rows[:, None] * DV + offs_dv[None, :], mask=ok[:, None] & dvmask[None, :], other=0.0)
            m_new = tl.maximum(m_i, lp)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot yet: everything stays 0
            alpha = tl.exp2(m_i - m_use)
            beta = tl.exp2(lp - m_use)
            l_i = l_i * alpha + beta
            acc = acc * alpha[:, None] + op.to(tl.float32) * beta[:, None]
            m_i = m_new
    else:  # SLOTS slots per step: their partials loaded as one [R, SLOTS, DV] tile (more loads in flight)
        offs_u = tl.arange(0, SLOTS)
        for s0 in range(0, TOPK, SLOTS):
            su = s0 + offs_u  # [U]
            smask = rmask[:, None] & (su < TOPK)[None, :]  # [R, U]
            pp = tl.load(pos_row[:, None] + su[None, :], mask=smask, other=-1).to(tl.int64)
            ok = pp >= 0
            if LOCAL:
                blk = tl.load(idx_row[:, None] + su[None, :], mask=smask, other=-1)
                own2 = own[:, None]
                ok = ok & ~(one_doc & ((blk == 0) | (blk == own2) | (blk == own2 - 1)))  # merged above
            rows = pp * G + g[:, None]  # [R, U]
            lp = tl.load(LSEP + rows, mask=ok, other=float("-inf"), eviction_policy=STREAM)
            op = tl.load(
                OP + rows[:, :, None] * DV + offs_dv[None, None, :],
                mask=ok[:, :, None] & dvmask[None, None, :],
                other=0.0,
                eviction_policy=STREAM,
            )  # [R, U, DV]
            m_new = tl.maximum(m_i, tl.max(lp, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot yet: everything stays 0
            alpha = tl.exp2(m_i - m_use)
            beta = tl.exp2(lp - m_use[:, None])  # [R, U]
            l_i = l_i * alpha + tl.sum(beta, 1)
            acc = acc * alpha[:, None] + tl.sum(op.to(tl.float32) * beta[:, :, None], 1)
            m_i = m_new
    store_rows(O, LSE, t * Hq + h * G + g, rmask, acc, m_i, l_i, DV, BLOCK_DV)


@triton.jit
def item_rows(TOKS, start, end, G: tl.constexpr, BLOCK_M: tl.constexpr, PAIRS: tl.constexpr):
    """Rows of the work item with sorted pair range [start, end): (pair index [M], head in the group [M], row
    mask [M], token [M] int64); rows = PAIRS pairs x G heads."""
    offs_m = tl.arange(0, BLOCK_M)
    pr = offs_m // G
    g = offs_m % G
    pidx = start + pr
    rmask = (pr < PAIRS) & (pidx < end)
    tok = tl.load(TOKS + pidx, mask=rmask, other=0).to(tl.int64)
    return pidx, g, rmask, tok


@triton.jit
def last_key(tok, rmask, kst, blen):
    """[M] int32: the last key of the block (from kst, blen keys) that each row may see, min(token - kst,
    blen - 1), or -1 for masked rows; "key offset <= last_key" is the whole score mask in one compare."""
    return tl.where(rmask, tl.minimum((tok - kst).to(tl.int32), blen - 1), -1)


@triton.jit
def load_tile(ptrs, colmask, FULL: tl.constexpr, KEEP: tl.constexpr = False):
    """A [rows, cols] tile whose rows all point at valid memory: unmasked when every column is real
    (KEEP: with the L2 policy evict_last)."""
    EVICT: tl.constexpr = "evict_last" if KEEP else ""
    if FULL:
        return tl.load(ptrs, eviction_policy=EVICT)
    return tl.load(ptrs, mask=colmask[None, :], other=0.0, eviction_policy=EVICT)


@triton.jit
def main_tile(Q, K, V, OP, LSEP, qk_scale, Hq, Hkv, h, kst, blen, pidx, g, rmask, tok, G: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, EARLY_V: tl.constexpr = False,
              HINTS: tl.constexpr = False):
    """MAIN on one tile: rows (pair pidx, head g) against the key block at kst (blen keys, KV head h); writes
    each row's normalised partial and log2 LSE (masked rows write nothing). EARLY_V: V is loaded with K,
    before the first dot (its latency overlaps the gathers; more registers live across the softmax).
    HINTS: the query and key loads evict_last, the partial stores evict_first (CACHE_HINTS)."""
    STREAM: tl.constexpr = "evict_first" if HINTS else ""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    dvmask = offs_dv < DV
    hq = h * G + g
    # loads without row masks: a masked row points at token 0 (item_rows' other=0) and keys past the block's
    # end re-read its last key, so every address is valid; the score mask below removes them (fewer selects)
    krow = (kst + tl.minimum(offs_n, blen - 1)) * Hkv + h  # [N]
    q = load_tile(Q + (tok * Hq + hq)[:, None] * D + offs_d[None, :], dmask, D == BLOCK_D, HINTS)
    k = load_tile(K + krow[:, None] * D + offs_d[None, :], dmask, D == BLOCK_D, HINTS)
    v_ptrs = V + krow[:, None] * DV + offs_dv[None, :]
    if EARLY_V:
        vv = load_tile(v_ptrs, dvmask, DV == BLOCK_DV)
    sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # unscaled: the scale (> 0) is applied in one FMA
    sc = tl.where(offs_n[None, :] <= last_key(tok, rmask, kst, blen)[:, None], sc, float("-inf"))
    m = tl.where(rmask, tl.max(sc, 1) * qk_scale, 0.0)
    p = tl.exp2(sc * qk_scale - m[:, None])
    l = tl.sum(p, 1)
    if not EARLY_V:
        vv = load_tile(v_ptrs, dvmask, DV == BLOCK_DV)
    acc = tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc * (1.0 / l_safe)[:, None]  # one reciprocal per row, not a division per element
    row = pidx * G + g
    smask = rmask[:, None] if DV == BLOCK_DV else rmask[:, None] & dvmask[None, :]
    tl.store(OP + row[:, None] * DV + offs_dv[None, :], out.to(OP.dtype.element_ty), mask=smask, eviction_policy=STREAM)
    tl.store(LSEP + row, m + tl.log2(l_safe), mask=rmask, eviction_policy=STREAM)


@triton.jit
def _kv_fwd_main_kernel(
    Q,
    K,
    V,
    OP,
    LSEP,
    WORK,
    TOKS,
    BLKSTART,
    BLKLEN,
    qk_scale,
    Hq,
    Hkv,
    NBG,
    h0,
    LOCALBLK,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    LOCAL: tl.constexpr,
    EARLY_V: tl.constexpr = False,
    HINTS: tl.constexpr = False,
):
    """MAIN: one program per work item (empty items return at once)."""
    w = tl.program_id(0).to(tl.int64)
    start = tl.load(WORK + w * 3)
    end = tl.load(WORK + w * 3 + 1)
    if start >= end:
        return
    grp = tl.load(WORK + w * 3 + 2)
    gb, h, kst, blen = group_block(BLKSTART, BLKLEN, grp, NBG, h0)
    pidx, g, rmask, tok = item_rows(TOKS, start, end, G, BLOCK_M, PAIRS)
    if LOCAL:  # the merge kernel computes these pairs from contiguous rows: skip them
        rmask = rmask & ~local_pair(tok, gb, LOCALBLK, rmask)
        if tl.max(rmask.to(tl.int32), 0) == 0:
            return
    main_tile(Q, K, V, OP, LSEP, qk_scale, Hq, Hkv, h, kst, blen, pidx, g, rmask, tok, G, D, DV, BLOCK_N, BLOCK_D,
              BLOCK_DV, PRECISION, EARLY_V, HINTS)


# partial-output dtype for 16-bit inputs: None = the input dtype (normalised partials are bounded by
# max|v|, so fp16 cannot overflow; measured on the H100: error within 1.2x of fp32 partials, forward
# 1.4x faster at 64K), or torch.float32 for the most exact merge. fp32 inputs always use fp32.
PARTIAL_DTYPE: torch.dtype | None = None


# (BLOCK_M, num_warps[, maxnreg[, num_stages]]) forced by the tuning scripts; None = fwd_config's choice
FWD_OVERRIDE: tuple | None = None


# MAIN loads V together with K, before the first dot (an experiment, session 12; see main_tile): slower on the
# H100 except at G = 1 (64K G = 4 forward 12.92 vs 11.51-11.61 ms, G = 16 11.77 vs 10.85-10.90, G = 1 13.16 vs
# 13.47-13.50; benchmarks/results/h100_session12/main_flags.log), so off
MAIN_EARLY_V = False
# L2 eviction hints (session 12): MAIN's query and key loads evict_last (a token's query rows are gathered
# once per selected block), the partials evict_first (written by MAIN, read once by the merge). None = on for
# the group sizes in HINTS_GROUPS, True / False = forced. Measured on the H100 (two runs each,
# benchmarks/results/h100_session12/main_flags*.log, fwd+bwd ms): G = 1 64K 31.50-31.57 vs 32.16-32.24, 8K
# 3.67-3.68 vs 3.69-3.72 (forward 12.81-12.87 vs 13.46-13.52); G = 4 slower (64K 28.39-28.46 vs 28.17-28.28);
# G = 16 equal.
CACHE_HINTS: bool | None = None
HINTS_GROUPS = frozenset({1})


def cache_hints(group: int) -> bool:
    """Whether MAIN and the forward merge use the L2 eviction hints at this group size (CACHE_HINTS)."""
    return group in HINTS_GROUPS if CACHE_HINTS is None else bool(CACHE_HINTS)


def forced_config(override: tuple, group: int):
    """(BLOCK_M, num_warps, launch options) from an override (BLOCK_M, num_warps[, maxnreg[, num_stages]]);
    maxnreg 0 = no register cap."""
    if not 2 <= len(override) <= 4:
        raise ValueError(f"a launch override takes (BLOCK_M, num_warps[, maxnreg[, num_stages]]), got {override}")
    extra = {"maxnreg": override[2]} if len(override) > 2 and override[2] else {}
    if len(override) > 3:
        extra["num_stages"] = override[3]
    return max(override[0], _pow2(group)), override[1], extra


# MAIN launch per group size at head dim 128, block 64 (BLOCK_M, num_warps, maxnreg; 0 = no cap), where a
# variant beat the default (128 rows, 4 warps) at every measured shape (scripts/kv_variants.py). With the
# lean MAIN body (no spills), 64 rows / 4 warps without a register cap was fastest for G = 1, 2, 4, 8 on
# the H100 (2026-12-06, benchmarks/results/h100_session13, forward ms vs the default): 8K G = 2 1.28 vs
# 1.34-1.35, G = 4 1.22 vs 1.28, G = 8 1.19 vs 1.24-1.25; 64K G = 2 10.64 vs 11.15-11.22, G = 4 10.28 vs
# 10.81-10.83, G = 8 9.99 vs 10.17-10.20; G = 1 (against the earlier (64, 4, 128)) 1.43-1.44 vs 1.44,
# 11.50-11.54 vs 11.59-11.65; G = 16 (KV-outer when forced; query-outer is the automatic choice there) 8K
# 1.19 vs 1.24-1.25, 64K 9.71 vs 10.17-10.19. Other G keep the default.
FWD_TUNED = {1: (64, 4, 0), 2: (64, 4, 0), 4: (64, 4, 0), 8: (64, 4, 0), 16: (64, 4, 0)}


def fwd_config(group: int, head_dim: int, block_size: int):
    """(BLOCK_M rows per tile, num_warps, extra launch options: {"maxnreg": n} when forced or tuned)."""
    if FWD_OVERRIDE is not None:
        return forced_config(FWD_OVERRIDE, group)
    if head_dim == 128 and block_size == 64 and group in FWD_TUNED:
        return forced_config(FWD_TUNED[group], group)
    block_m = 128 if max(head_dim, block_size) <= 128 else 64
    block_m = max(block_m, _pow2(group))
    return block_m, 4 if max(head_dim, block_size) <= 128 else 8, {}


def kv_outer_forward(q, k, v, idx, index: PairIndex, meta, block_size: int, scale: float, o, lse):
    """Fills o [N, Hq, Dv] and lse [N, Hq] for the KV heads of `index` (one head slice); idx [N, Hkv, K]
    int32 is the selection (read by the merge kernel when the local blocks are fused into it)."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    group = n_heads_q // n_heads_kv
    topk = index.pos.shape[-1]
    block_m, warps, launch_opts = fwd_config(group, head_dim, block_size)
    pairs = block_m // group
    local_rows, local_tokens, local_warps = local_config(group, max(head_dim, head_dim_v))
    if not local_fusion() or index.skip_local:  # (the local kernel of kv_local.py has them)
        local_tokens = 0
    if q.dtype == torch.float32:
        pdtype = torch.float32
    else:
        pdtype = q.dtype if PARTIAL_DTYPE is None else PARTIAL_DTYPE
    n_rows = index.n_pairs_max * group  # partial rows: (pair, head) in sorted pair order
    gluon_main = (
        kv_gluon.enabled(group, n_tokens)
        and kv_gluon.eligible(q, k, v, block_size, bool(local_tokens))
        and pdtype == q.dtype  # its partial tiles are in the input dtype
        and n_rows < kv_gluon.MAX_PARTIAL_ROWS  # its TMA partial stores address rows in int32
    )
    if gluon_main:  # the Hopper MAIN (kv_gluon.py; default for G >= 2, and G = 1 below 32K tokens): its own item size
        pairs = kv_gluon.pairs_per_item(group)
    op = torch.empty(n_rows, head_dim_v, dtype=pdtype, device=q.device)
    lsep = torch.empty(n_rows, dtype=torch.float32, device=q.device)
    # [N, 2] int32 table of MAIN's skip test (any int32 tensor when the local blocks are not fused)
    local_blocks = local_block_table(meta, block_size, local_tokens) if local_tokens else index.pos
    rows, tokens, merge_warps = (
        (local_rows, local_tokens, local_warps) if local_tokens else reduce_config(group, head_dim_v)
    )
    plan = _ForwardPlan(
        block_size, scale, group, topk, block_m, pairs, warps, launch_opts, bool(local_tokens), gluon_main, rows,
        tokens, merge_warps,
    )
    if index.skip_local:  # the local pairs: o, lse of the local blocks alone, where the merge starts
        kv_local.launch_local(q, k, v, o, lse, idx, meta, block_size, scale, index.h0, index.n_heads)
    on = overlap.enabled()
    pipe = overlap.Pipeline(q.device, on)
    for chunk in overlap.head_chunks(index, on):  # one chunk unless SPARSA_KV_OVERLAP=1 (overlap.py)
        work, _ = work_list(chunk, pairs)
        _launch_main(plan, q, k, v, op, lsep, work, chunk, meta, local_blocks)
        with pipe.side():
            _launch_merge(plan, q, k, v, o, lse, op, lsep, idx, chunk, meta)
    pipe.join()


@dataclass(frozen=True)
class _ForwardPlan:
    """The launch parameters of one KV-outer forward (shared by its head chunks)."""

    block_size: int
    scale: float
    group: int
    topk: int
    block_m: int  # MAIN rows per item
    pairs: int  # MAIN pairs per item
    warps: int
    launch_opts: dict
    local: bool  # local blocks fused into the merge
    gluon: bool  # the Gluon MAIN (kv_gluon.py)
    rows: int  # merge rows per program
    tokens: int  # merge tokens per program
    merge_warps: int


def _launch_main(plan: _ForwardPlan, q, k, v, op, lsep, work, index: PairIndex, meta, local_blocks):
    """MAIN over the work list `work` of `index` (a slice or a head chunk of one): partials into op, lsep."""
    n_heads_q, head_dim = q.shape[1], q.shape[2]
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    scale, group, block_size = plan.scale, plan.group, plan.block_size
    if plan.gluon:
        kv_gluon.launch_main(q, k, v, op, lsep, work, index, meta, scale * LOG2E)
    else:
        _kv_fwd_main_kernel[(work.shape[0],)](
            q,
            k,
            v,
            op,
            lsep,
            work,
            index.toks,
            meta.blk_start,
            meta.blk_len,
            scale * LOG2E,
            n_heads_q,
            n_heads_kv,
            meta.n_blocks,
            index.h0,
            local_blocks,
            G=group,
            D=head_dim,
            DV=head_dim_v,
            BLOCK_M=plan.block_m,
            PAIRS=plan.pairs,
            BLOCK_N=_pow2(block_size),
            BLOCK_D=_pow2(head_dim),
            BLOCK_DV=_pow2(head_dim_v),
            PRECISION=precision_for(q.dtype),
            LOCAL=plan.local,
            EARLY_V=MAIN_EARLY_V,
            HINTS=cache_hints(group),
            num_warps=plan.warps,
            **{"num_stages": 1, **plan.launch_opts},
        )


def _launch_merge(plan: _ForwardPlan, q, k, v, o, lse, op, lsep, idx, index: PairIndex, meta):
    """The per-token merge of the partials of `index`'s heads into o, lse (with the local blocks when fused)."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    block_size, scale, group, topk = plan.block_size, plan.scale, plan.group, plan.topk
    rows, tokens, merge_warps, local = plan.rows, plan.tokens, plan.merge_warps, plan.local
    _kv_fwd_merge_kernel[(triton.cdiv(n_tokens, tokens), index.n_heads)](
        q,
        k,
        v,
        o,
        lse,
        op,
        lsep,
        index.pos,
        idx,
        meta.tok_docstart,
        scale * LOG2E,
        n_tokens,
        n_heads_q,
        n_heads_kv,
        index.h0,
        block_size,
        TOPK=topk,
        G=group,
        D=head_dim,
        DV=head_dim_v,
        BLOCK_R=rows,
        TOKENS=tokens,
        BLOCK_N=_pow2(block_size),
        BLOCK_D=_pow2(head_dim),
        BLOCK_DV=_pow2(head_dim_v),
        BLOCK_K=_pow2(topk, 1),
        PRECISION=precision_for(q.dtype),
        LOCAL=local,
        SLOTS=1 if local else reduce_slots(topk, rows, head_dim_v),  # fused local blocks: measured slot by slot
        HINTS=cache_hints(group),
        INIT=index.skip_local,
        num_warps=merge_warps,
        num_stages=merge_stages(local, block_size, max(head_dim, head_dim_v)),
    )
