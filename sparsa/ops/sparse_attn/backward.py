"""Backward of selected-block attention, KV-outer for every G (deterministic, no atomics).

delta[t, g] = rowsum(dO * O)  (fp32)
DKDV   one program per work item = (KV head, block, up to MAXP pairs): the block's K, V stay in
       registers; for each tile of gathered rows (PAIRS tokens x G heads):
         P = exp2(S - lse2); dV += P^T dO; dP = dO V^T; dS = P (dP - delta);
         dK += dS^T Q * scale; dQ_pair = dS K * scale -> fp32 per-(pair, head) buffer.
       A group cut into several items (hot blocks such as block 0) writes fp32 partial dK/dV
       slots that SPLIT_REDUCE sums in a fixed order; other groups write dK/dV directly.
DQ     per (token, KV head): dq = sum over the token's slots of dQ_pair (fixed order; a program takes
       several tokens x G heads as rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import env_flag
from . import kv_gluon_bwd, overlap
from .index import PairIndex, split_work_list
from .kv_outer import forced_config, group_block, last_key, load_tile, reduce_config, reduce_slots, token_rows
from .q_outer import LOG2E, _pow2, precision_for


@triton.jit
def _delta_kernel(O, DO, DELTA, R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_DV)
    mask = (r < R)[:, None] & (offs < DV)[None, :]
    o = tl.load(O + r[:, None] * DV + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + r[:, None] * DV + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, 1), mask=r < R)


@triton.jit
def _work_item(WORK, w):
    """Row w of a dK/dV work list [W, 4]: (first entry, end, group, partial slot or -1)."""
    return tl.load(WORK + w * 4), tl.load(WORK + w * 4 + 1), tl.load(WORK + w * 4 + 2), tl.load(WORK + w * 4 + 3)


@triton.jit
def _bwd_block(K, V, BLKSTART, BLKLEN, grp, Hkv, NBG, h0, D: tl.constexpr, DV: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The work item's KV head h, first key kst and key count blen, key positions kpos [BN] (mask kmask) and its
    block's K [BN, BD], V [BN, BDV]; keys past the block's end hold its last key (finite; the score masks
    remove them)."""
    _, h, kst, blen = group_block(BLKSTART, BLKLEN, grp, NBG, h0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kpos = kst + offs_n
    kmask = offs_n < blen
    krow = (kst + tl.minimum(offs_n, blen - 1)) * Hkv + h
    k = load_tile(K + krow[:, None] * D + offs_d[None, :], offs_d < D, D == BLOCK_D)
    vv = load_tile(V + krow[:, None] * DV + offs_dv[None, :], offs_dv < DV, DV == BLOCK_DV)
    return h, kst, blen, kpos, kmask, k, vv


@triton.jit
def _bwd_rows(Q, DO, LSE, DELTA, TOKS, p0, end, h, Hq, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
              BLOCK_M: tl.constexpr, PAIRS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One tile of gathered rows (PAIRS pairs from p0 x G heads): pair index, row mask, token, Q, dO, log2 LSE, delta."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # the rows as kv_outer.item_rows makes them, kept inline: the sm_90 build of the measured dK/dV kernels
    # (h100_session13) differs when this calls item_rows (G = 3, 5, 8; spills of keys-as-rows at G = 16)
    pr = offs_m // G
    pidx = p0 + pr
    rmask = (pr < PAIRS) & (pidx < end)
    tok = tl.load(TOKS + pidx, mask=rmask, other=0).to(tl.int64)  # masked rows: token 0 (valid addresses)
    qrow = tok * Hq + h * G + offs_m % G
    q = load_tile(Q + qrow[:, None] * D + offs_d[None, :], offs_d < D, D == BLOCK_D)
    do = load_tile(DO + qrow[:, None] * DV + offs_dv[None, :], offs_dv < DV, DV == BLOCK_DV)
    lse2 = tl.load(LSE + qrow, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + qrow, mask=rmask, other=0.0)
    return pidx, rmask, tok, q, do, lse2, delta


@triton.jit
def _store_dq_pair(DQP, dq, pidx, rmask, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    row = pidx * G + tl.arange(0, BLOCK_M) % G
    tl.store(DQP + row[:, None] * D + offs_d[None, :], dq.to(DQP.dtype.element_ty), mask=rmask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _store_block_grads(DK, DVv, dk, dv, kpos, kmask, h, Hkv, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK [BN, BD] and dV [BN, BDV] of one key block (positions kpos, mask kmask, KV head h) in the inputs' dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(DK + (kpos * Hkv + h)[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kmask[:, None] & (offs_d < D)[None, :])
    tl.store(DVv + (kpos * Hkv + h)[:, None] * DV + offs_dv[None, :], dv.to(DVv.dtype.element_ty),
             mask=kmask[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _store_dkdv(DK, DVv, DKP, DVP, dk, dv, slot, kpos, kmask, h, Hkv, D: tl.constexpr, DV: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dK, dV of the item's block into dk / dv (a group in one item) or into its fp32 partial slot."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if slot < 0:
        _store_block_grads(DK, DVv, dk, dv, kpos, kmask, h, Hkv, D, DV, BLOCK_D, BLOCK_DV)
    else:
        tl.store(DKP + slot * (BLOCK_N * BLOCK_D) + offs_n[:, None] * BLOCK_D + offs_d[None, :], dk)
        tl.store(DVP + slot * (BLOCK_N * BLOCK_DV) + offs_n[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def dkdv_rows_step(q, do, lse2, delta, k, vv, ok, dk, dv, qk_scale, PRECISION: tl.constexpr):
    """One tile of gathered rows against a block, rows as the MMA rows: S = Q K^T [rows, keys] (masked by
    ok), P = exp2(S - lse2), dS = P (dO V^T - delta). Returns (dk + dS^T Q, dv + P^T dO, dS). dV is
    accumulated before dO V^T is formed: P and dP live together otherwise (the sm_90 build spilled twice
    as much)."""
    sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(tl.where(ok, sc - lse2[:, None], float("-inf")))
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(vv), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv, ds


@triton.jit
def _kv_bwd_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQP,
    DK,
    DVv,
    DKP,
    DVP,
    WORK,
    TOKS,
    BLKSTART,
    BLKLEN,
    scale,
    qk_scale,
    Hq,
    Hkv,
    NBG,
    h0,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    KEYS_AS_ROWS: tl.constexpr,
    WRITE_DQ: tl.constexpr,
):
    """dK/dV (and with WRITE_DQ the dQ partials) of one work item. KEYS_AS_ROWS False: the gathered rows are the MMA rows,
    S = Q K^T [rows, keys], and P and dS are transposed for dV += P^T dO and dK += dS^T Q. True (default for
    G = 8 from 16K tokens, backward.keys_as_rows): the block's keys are the MMA rows (the layout of Triton's fused-attention
    backward), S^T = K Q^T [keys, rows], so P^T and dS^T feed dV and dK from registers and only dS is
    transposed (for dQ = dS K)."""
    start, end, grp, slot = _work_item(WORK, tl.program_id(0).to(tl.int64))
    if start >= end:
        return
    h, kst, blen, kpos, kmask, k, vv = _bwd_block(
        K, V, BLKSTART, BLKLEN, grp, Hkv, NBG, h0, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV
    )
    offs_n = tl.arange(0, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for p0 in range(start, end, PAIRS):
        pidx, rmask, tok, q, do, lse2, delta = _bwd_rows(
            Q, DO, LSE, DELTA, TOKS, p0, end, h, Hq, G, D, DV, BLOCK_M, PAIRS, BLOCK_D, BLOCK_DV
        )
        if KEYS_AS_ROWS:
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BN, BM]
            ok = offs_n[:, None] <= last_key(tok, rmask, kst, blen)[None, :]
            pt = tl.exp2(tl.where(ok, st - lse2[None, :], float("-inf")))
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(vv, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
            if WRITE_DQ:
                dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PRECISION) * scale
                _store_dq_pair(DQP, dq, pidx, rmask, G, D, BLOCK_M, BLOCK_D)
        else:
            ok = offs_n[None, :] <= last_key(tok, rmask, kst, blen)[:, None]
            dk, dv, ds = dkdv_rows_step(q, do, lse2, delta, k, vv, ok, dk, dv, qk_scale, PRECISION)
            if WRITE_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                _store_dq_pair(DQP, dq, pidx, rmask, G, D, BLOCK_M, BLOCK_D)
    _store_dkdv(DK, DVv, DKP, DVP, dk * scale, dv, slot, kpos, kmask, h, Hkv, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)


@triton.jit
def _split_reduce_kernel(
    DK,
    DVv,
    DKP,
    DVP,
    SPLIT,
    BLKSTART,
    BLKLEN,
    Hkv,
    NBG,
    h0,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    grp = tl.program_id(0).to(tl.int64)
    nitems = tl.load(SPLIT + grp * 2)
    if nitems == 0:
        return
    base = tl.load(SPLIT + grp * 2 + 1)
    _, h, kst, blen = group_block(BLKSTART, BLKLEN, grp, NBG, h0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for i in range(nitems):
        sl = base + i
        dk += tl.load(DKP + sl * (BLOCK_N * BLOCK_D) + offs_n[:, None] * BLOCK_D + offs_d[None, :])
        dv += tl.load(DVP + sl * (BLOCK_N * BLOCK_DV) + offs_n[:, None] * BLOCK_DV + offs_dv[None, :])
    _store_block_grads(DK, DVv, dk, dv, kst + offs_n, offs_n < blen, h, Hkv, D, DV, BLOCK_D, BLOCK_DV)


@triton.jit
def _dq_reduce_kernel(
    DQ,
    DQP,
    POS,
    N,
    Hq,
    h0,
    TOPK: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SLOTS: tl.constexpr = 1,
):
    """dq of TOKENS consecutive tokens x G heads of one KV head: the sum of each row's slot partials, SLOTS
    slots per step, without a branch per slot (all rows' loads of a step issued together)."""
    hl = tl.program_id(1).to(tl.int64)
    t, g, rmask = token_rows(N, G, BLOCK_R, TOKENS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    pos_row = POS + (hl * N + t) * TOPK  # [R]
    # SLOTS slots per step as one [R, SLOTS, D] tile (fixed summation order: deterministic); at SLOTS = 1 the
    # sm_90 build has the same PTX op counts as a plain loop over the slots
    offs_u = tl.arange(0, SLOTS)
    for s0 in range(0, TOPK, SLOTS):
        su = s0 + offs_u  # [U]
        smask = rmask[:, None] & (su < TOPK)[None, :]  # [R, U]
        pp = tl.load(pos_row[:, None] + su[None, :], mask=smask, other=-1).to(tl.int64)
        rows = pp * G + g[:, None]
        part = tl.load(
            DQP + rows[:, :, None] * D + offs_d[None, None, :],
            mask=(pp >= 0)[:, :, None] & dmask[None, None, :],
            other=0.0,
        )  # [R, U, D]
        acc += tl.sum(part.to(tl.float32), 1)
    orow = t * Hq + (h0 + hl) * G + g
    tl.store(DQ + orow[:, None] * D + offs_d[None, :], acc.to(DQ.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


# pairs per dK/dV work item: hot blocks (block 0, ...) are cut into items of this size for balance
MAX_PAIRS_PER_ITEM = 2048


# (BLOCK_M, num_warps[, maxnreg[, num_stages]]) forced by the tuning scripts; None = bwd_config's choice
BWD_OVERRIDE: tuple | None = None
# dtype of the per-(pair, head) dQ partials for bf16 inputs: bf16 (half the traffic; measured error
# within 1.2x of fp32 partials) or torch.float32. fp16 and fp32 inputs always use fp32 (range).
DQ_PARTIAL_DTYPE: torch.dtype = torch.bfloat16


# Keys-as-rows dK/dV by default where it beat the default layout in every measurement (H100, 2026-12-05,
# scripts/kv_variants.py, benchmarks/results/h100_session9): G = 8 at head dim 128, block 64 from 16K tokens
# (fwd+bwd 7.03 vs 7.12 / 7.18 ms at 16K, 13.15 vs 14.03 / 14.06 at 32K, 26.66-26.70 vs 28.60-28.61 at 64K);
# it lost at 8K (4.01 vs 3.90-3.93) and for G = 1, 2, 4 (G = 16 within noise).
KEYS_TUNED_GROUPS = (8,)
KEYS_TUNED_MIN_TOKENS = 16384


def keys_as_rows(group: int = 0, head_dim: int = 0, block_size: int = 0, n_tokens: int = 0) -> bool:
    """dK/dV kernel with the block's keys as the MMA rows (_kv_bwd_kernel's KEYS_AS_ROWS): SPARSA_KV_BWD_KEYS=1
    forces it, 0 forbids it; unset, it is on for the tuned shapes (KEYS_TUNED_GROUPS, head dim 128, block 64,
    at least KEYS_TUNED_MIN_TOKENS tokens)."""
    tuned = (
        group in KEYS_TUNED_GROUPS and head_dim == 128 and block_size == 64 and n_tokens >= KEYS_TUNED_MIN_TOKENS
    )
    return env_flag("SPARSA_KV_BWD_KEYS", tuned)


# Gathered-rows dK/dV without software pipelining (num_stages=1) for these G at head dim 128, block 64: it
# beat num_stages=2 at every measured shape (H200, 2026-12-06, scripts/kv_variants.py,
# benchmarks/results/h200_session10: fwd+bwd ms G = 1 16K 7.95 vs 8.09, 64K 33.45 vs 33.74; G = 2 8K 3.72 vs
# 3.89, 64K 29.77 vs 30.52-30.67; G = 4 8K 3.64 vs 3.69, 64K 27.76-27.95 vs 28.01-28.19); it lost at G = 8
# (8K 3.87 vs 3.59-3.64, 64K 26.44 vs 25.69-25.71) and keys-as-rows lost with it everywhere. Only the
# measured G are listed (3 was not measured).
UNPIPELINED_GROUPS = (1, 2, 4)

# dK/dV launch (BLOCK_M, num_warps, maxnreg, num_stages) per G at head dim 128, block 64 with the gathered-rows
# layout, where it beat the default at every measured shape. With the lean dK/dV body (no spills) G = 1 took
# 64 rows / 4 warps, two stages (H100, 2026-12-06, benchmarks/results/h100_session13, fwd+bwd ms): 8K 3.34-3.36
# vs 3.52-3.53, 64K 27.91-27.94 vs 30.47-30.58. At G = 2 and 4 it lost (64K G = 4 29.87 vs 27.09-27.10).
BWD_TUNED = {1: (64, 4, 0, 2)}


def bwd_config(group: int, head_dim: int, block_size: int, n_tokens: int = 0):
    """(BLOCK_M rows per tile of the dK/dV kernel, num_warps, extra launch options: {"maxnreg": n} when forced,
    {"num_stages": s} when forced or tuned; keys as MMA rows)."""
    keys = keys_as_rows(group, head_dim, block_size, n_tokens)
    if BWD_OVERRIDE is not None:
        return (*forced_config(BWD_OVERRIDE, group), keys)
    if not keys and head_dim == 128 and block_size == 64 and group in BWD_TUNED:
        return (*forced_config(BWD_TUNED[group], group), keys)
    opts = {}
    if head_dim == 128 and block_size >= 128 and not keys:
        # shared memory: 128 rows / 8 warps / two stages need 230912 bytes in the offline sm_90 build and 263680 in the
        # H100's (session 16, h100_session16/sparse_attn_check_full.log: out of resources, limit 232448); 64 rows /
        # 8 warps / one stage need 114688 offline and ran on the H100 (session 17, h100_session17/
        # sparse_attn_check_full.log: 71/71; not timed)
        block_m, warps, opts = 64, 8, {"num_stages": 1}
    elif max(head_dim, block_size) <= 128:
        block_m, warps = (128, 8) if head_dim >= 128 else (64, 4)
        if keys and head_dim >= 128:
            # H100 (h100_session9/kv_bwd_keys.log): 64 rows / 4 warps beat 64 / 8 and 128 / 8 at 8K and 64K for
            # G = 1, 4, 8 (64K G = 8: 26.70 vs 31.05 vs 34.79 ms); 128 rows spill in this layout (sm_90 build)
            block_m, warps = 64, 4
        if not keys and head_dim == 128 and block_size == 64 and group in UNPIPELINED_GROUPS:
            opts = {"num_stages": 1}
    else:
        # head dims above 128 are a forward target (issue 3); their backward at block 128 is not expected to fit an
        # H100's shared memory (offline sm_90 build, head dim 256: 246144 bytes, over 232448; 16-32 rows, 4-16 warps,
        # 1-2 stages: 221376-262144), at block 64 it fits (139648)
        block_m, warps = 32, 8
    return max(block_m, _pow2(group)), warps, opts, keys


def compute_delta(o, do):
    n_rows = o.shape[0] * o.shape[1]
    head_dim_v = o.shape[2]
    delta = torch.empty(o.shape[0], o.shape[1], dtype=torch.float32, device=o.device)
    block_r = 16
    _delta_kernel[(triton.cdiv(n_rows, block_r),)](
        o, do, delta, n_rows, DV=head_dim_v, BLOCK_R=block_r, BLOCK_DV=_pow2(head_dim_v)
    )
    return delta


def kv_outer_backward(q, k, v, do, lse, delta, index: PairIndex, meta, block_size: int, scale: float, dq, dk, dv):
    """Fills dq [N, Hq, D], dk, dv [N, Hkv, *] (dk, dv zero-initialised) for the heads of `index`; dq None: dk and
    dv only (no dQ partials written, summed or allocated beyond a placeholder)."""
    n_tokens, n_heads_q, head_dim = q.shape
    group = n_heads_q // k.shape[1]
    block_m, warps, launch_opts, keys = bwd_config(group, head_dim, block_size, n_tokens)
    pairs = block_m // group
    dqp_dtype = DQ_PARTIAL_DTYPE if q.dtype == torch.bfloat16 else torch.float32
    gluon = (
        kv_gluon_bwd.enabled()
        and kv_gluon_bwd.eligible(q, k, v, do, block_size)
        and dqp_dtype == q.dtype  # its dQ partial tiles are in the input dtype
        and index.n_pairs_max * group < kv_gluon_bwd.MAX_PARTIAL_ROWS  # TMA stores address rows in int32
    )
    per_item = max(MAX_PAIRS_PER_ITEM // pairs, 1) * pairs
    if gluon:  # the Hopper dK/dV (kv_gluon_bwd.py): its own tile and item sizes (whole tiles)
        per_item = kv_gluon_bwd.pairs_per_item(group, n_tokens, MAX_PAIRS_PER_ITEM)
    dqp_rows = index.n_pairs_max * group if dq is not None else 256  # a placeholder (the Gluon descriptor's box)
    dqp = torch.empty(dqp_rows, head_dim, dtype=dqp_dtype, device=q.device)
    on = overlap.enabled()
    pipe = overlap.Pipeline(q.device, on)
    for chunk in overlap.head_chunks(index, on):  # one chunk unless SPARSA_KV_OVERLAP=1 (overlap.py)
        _block_grads(q, k, v, do, lse, delta, chunk, meta, block_size, scale, dqp, dk, dv, per_item,
                     (block_m, warps, launch_opts, keys, gluon), write_dq=dq is not None)
        if dq is not None:
            with pipe.side():
                _dq_sum(dq, dqp, chunk, n_tokens, group, head_dim)
    pipe.join()


def _block_grads(q, k, v, do, lse, delta, index: PairIndex, meta, block_size, scale, dqp, dk, dv, per_item, config,
                 write_dq=True):
    """dK, dV of `index`'s blocks (the dK/dV kernel and the reduction of split groups) and, with write_dq, its dQ
    partials."""
    n_heads_q, head_dim = q.shape[1], q.shape[2]
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    group = n_heads_q // n_heads_kv
    block_m, warps, launch_opts, keys, gluon = config
    pairs = block_m // group
    work, n_slots, split = split_work_list(index, per_item)
    block_n, block_d, block_dv = _pow2(block_size), _pow2(head_dim), _pow2(head_dim_v)
    dkp = torch.empty(n_slots, block_n, block_d, dtype=torch.float32, device=q.device)
    dvp = torch.empty(n_slots, block_n, block_dv, dtype=torch.float32, device=q.device)
    if gluon:
        kv_gluon_bwd.launch_dkdv(q, k, v, do, lse, delta, dqp, dk, dv, dkp, dvp, work, index, meta, scale, write_dq)
    else:
        _kv_bwd_kernel[(work.shape[0],)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dqp,
            dk,
            dv,
            dkp,
            dvp,
            work,
            index.toks,
            meta.blk_start,
            meta.blk_len,
            scale,
            scale * LOG2E,
            n_heads_q,
            n_heads_kv,
            meta.n_blocks,
            index.h0,
            G=group,
            D=head_dim,
            DV=head_dim_v,
            BLOCK_M=block_m,
            PAIRS=pairs,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_DV=block_dv,
            PRECISION=precision_for(q.dtype),
            KEYS_AS_ROWS=keys,
            WRITE_DQ=write_dq,
            num_warps=warps,
            **{"num_stages": 2, **launch_opts},
        )
    _split_reduce_kernel[(split.shape[0],)](
        dk,
        dv,
        dkp,
        dvp,
        split,
        meta.blk_start,
        meta.blk_len,
        n_heads_kv,
        meta.n_blocks,
        index.h0,
        D=head_dim,
        DV=head_dim_v,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=4,
    )


def _dq_sum(dq, dqp, index: PairIndex, n_tokens: int, group: int, head_dim: int):
    """dq of `index`'s query heads: the per-token sum of their dQ partials."""
    n_heads_q = dq.shape[1]
    topk = index.pos.shape[-1]
    block_d = _pow2(head_dim)
    block_r, tokens, warps = reduce_config(group, head_dim)
    _dq_reduce_kernel[(triton.cdiv(n_tokens, tokens), index.n_heads)](
        dq,
        dqp,
        index.pos,
        n_tokens,
        n_heads_q,
        index.h0,
        TOPK=topk,
        G=group,
        D=head_dim,
        BLOCK_R=block_r,
        TOKENS=tokens,
        BLOCK_D=block_d,
        SLOTS=reduce_slots(topk, block_r, head_dim),
        num_warps=warps,
    )
