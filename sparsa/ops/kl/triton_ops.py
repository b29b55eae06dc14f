"""StreamKL Triton kernels: fused attention KL forward and backward without N x N buffers.

Notation inside the kernels: the KL is always KL(P || Q) between a "P side" (first argument of the
KL) and a "Q side". The public wrapper maps (teacher, student) to (P, Q) for direction="forward"
and to (Q, P) for direction="reverse", so one set of kernels serves both directions.

Forward (one pass, 5 fp32 running values per row, exp2 domain):
    A2 = (q_p . k_p) * scale_p * log2(e),  B2 = (q_q . k_q) * scale_q * log2(e)
    m_p, l_p (online max / sum of 2^A2), acc = sum 2^(A2 - m_p) * (A2 - B2), m_q, l_q
    KL = ln2 * (acc / l_p - (m_p + log2 l_p) + (m_q + log2 l_q))
Saved: KL (nats), LSE_p and LSE_q in the log2 domain (fp32, 12 bytes per row and head).
Backward (recomputes tiles from the saved LSEs, no atomics, deterministic):
    p = 2^(A2 - LSE_p2), q = 2^(B2 - LSE_q2)
    dB = g (q - p)                                   (Q-side logit gradient)
    dA = g p ((A2 - LSE_p2 - B2 + LSE_q2) ln2 - KL)  (P-side logit gradient)
    dQ kernel: grid over (query tile, head);  dK kernel: grid over (key tile, KV head), looping over
    the query heads of the KV group and the query tiles (causal: from the diagonal on).
Group variant (teacher = mean of the G softmaxes of a KV group, frozen): a first pass computes the
teacher's per-head LSE, then pbar tiles are exact: pbar = mean_h 2^(A2_h - LSE_h2).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._alloc import new_output, new_output_like
from .._intmath import cdiv, next_pow2
from .._launch import launcher_for
from ... import _triton_interpreter  # noqa: F401  (interpreter patch: run-time loop bounds)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# K-tile bytes the heads issued together by the attention-KL grids may keep in L2 (`_head_group`)
HEAD_GROUP_L2_BYTES = 24 << 20


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, rows, stride, n_rows, D: tl.constexpr, BD: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """rows [R] of a [*, D] matrix (row stride `stride`, unit column stride) -> [R, BD], zero padded."""
    offs_d = tl.arange(0, BD)
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS:
        if D == BD:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if D == BD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, n_rows, x, D: tl.constexpr, BD: tl.constexpr):
    offs_d = tl.arange(0, BD)
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if D == BD:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D))


@triton.jit
def _doc_bounds(CU, b, n_q, n_k, VARLEN: tl.constexpr):
    """(batch index for pointers, first query row, query length, first key row, key length)."""
    if VARLEN:
        q_start = tl.load(CU + b)
        q_len = tl.load(CU + b + 1) - q_start
        k_start = q_start
        k_len = q_len
        batch = b * 0
    else:
        q_start = b * 0
        q_len = b * 0 + n_q
        k_start = b * 0
        k_len = b * 0 + n_k
        batch = b
    return batch, q_start, q_len, k_start, k_len


@triton.jit
def _query_tile_ranges(m0, q_len, k_len, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Key ranges of a query tile [m0, m0 + BM): [0, n_full) needs no mask, [n_full, hi) does."""
    off = k_len - q_len
    if CAUSAL:
        n_full = tl.maximum(m0 + off + 1, 0) // BN * BN
        hi = tl.minimum(tl.maximum(m0 + BM + off, 0), k_len)
        n_full = tl.minimum(n_full, hi)
    else:
        n_full = k_len // BN * BN
        hi = k_len
    return n_full, hi


@triton.jit
def _key_tile_ranges(n0, q_len, k_len, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Query ranges of a key tile [n0, n0 + BN): [m_lo, m_mid) needs the causal mask, [m_mid, q_len) not.

    Rows beyond q_len and keys beyond k_len need no mask here: their loads are zero and their
    contributions vanish (g = 0 for rows) or land in dK rows that are never stored (keys)."""
    off = k_len - q_len
    if CAUSAL:
        m_lo = tl.maximum(n0 - off, 0) // BM * BM
        m_full = (tl.maximum(n0 + BN - 1 - off, 0) + BM - 1) // BM * BM
        m_mid = tl.minimum(m_full, q_len)
        m_mid = tl.maximum(m_mid, m_lo)
    else:
        m_lo = n0 * 0
        m_mid = n0 * 0
    return m_lo, m_mid


@triton.jit
def _tile_pids(n_bh, head_group):
    """(tile index, number of tiles, batch*head index) of this program in a 1-D grid of n_tiles * n_bh.

    Programs are issued in groups of `head_group` consecutive (batch, head) pairs; inside a group tile by
    tile across its heads. The kernels order tiles heaviest first, so a group runs its heavy causal tiles
    first on all its heads (a short tail), while the K tiles of only `head_group` heads compete for L2
    (`_head_group` sizes the group from the key length)."""
    pid = tl.program_id(0)
    n_tiles = tl.num_programs(0) // n_bh
    per_group = head_group * n_tiles
    grp = pid // per_group
    in_group = tl.minimum(head_group, n_bh - grp * head_group)  # the last group may be smaller
    r = pid - grp * per_group
    return r // in_group, n_tiles, grp * head_group + r % in_group


# ----------------------------------------------------------------------------------------------
# attention KL: forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_logits(
    qp, qq, KPb, KQb, skp_t, skq_t, n0, k_len,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr, BN: tl.constexpr,
    MASK: tl.constexpr, ONLY_P: tl.constexpr, PREC_P: tl.constexpr, PREC_Q: tl.constexpr,
):
    """Raw logits of key tile [n0, n0 + BN): a = qp kp^T, b = qq kq^T ([BM, BN] fp32; b = a with ONLY_P)."""
    offs_n = n0 + tl.arange(0, BN)
    kp = _load_rows(KPb, offs_n, skp_t, k_len, DP, BDP, MASK)
    a = tl.dot(qp, tl.trans(kp), input_precision=PREC_P)  # [BM, BN]
    if ONLY_P:
        b = a
    else:
        kq = _load_rows(KQb, offs_n, skq_t, k_len, DQ, BDQ, MASK)
        b = tl.dot(qq, tl.trans(kq), input_precision=PREC_Q)
    return a, b


@triton.jit
def _fwd_update(
    a, b, offs_n, offs_m, k_len, off, m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, ONLY_P: tl.constexpr, SAME_SCALE: tl.constexpr,
):
    """The five running values of each row after one key tile of logits a, b (key indices offs_n).

    The scales (> 0, log2 domain) are folded into FMAs: exp2(a * s - m) with m scaled. Also the update of
    the Gluon forward (gluon_fwd.py), so it uses only operations both languages share."""
    if MASK:
        valid = offs_n[None, :] < k_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
        a = tl.where(valid, a, float("-inf"))
    m_new = tl.maximum(m_p, tl.max(a, 1) * scale_p2)
    if MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # safe max: fully masked so far
    else:
        m_use = m_new  # an unmasked tile has a finite maximum
    alpha = tl.exp2(m_p - m_use)
    w = tl.exp2(a * scale_p2 - m_use[:, None])
    l_p = l_p * alpha + tl.sum(w, 1)
    if not ONLY_P:
        if SAME_SCALE:
            diff = a - b  # scaled once per row below
        else:
            diff = a * scale_p2 - b * scale_q2
        if MASK:
            b = tl.where(valid, b, float("-inf"))
            diff = tl.where(valid, diff, 0.0)  # (-inf) - (-inf) would be NaN
        if SAME_SCALE:
            acc = acc * alpha + tl.sum(w * diff, 1) * scale_p2
        else:
            acc = acc * alpha + tl.sum(w * diff, 1)
        mq_new = tl.maximum(m_q, tl.max(b, 1) * scale_q2)
        if MASK:
            mq_use = tl.where(mq_new == float("-inf"), 0.0, mq_new)
        else:
            mq_use = mq_new
        l_q = l_q * tl.exp2(m_q - mq_use) + tl.sum(tl.exp2(b * scale_q2 - mq_use[:, None]), 1)
        m_q = mq_new
    return m_new, l_p, acc, m_q, l_q


@triton.jit
def _fwd_finish(m_p, l_p, acc, m_q, l_q):
    """(LSE_p2, LSE_q2, KL in nats) of each row from its five running values; fully masked rows
    (l_p = 0) give 0 for all three."""
    has = l_p > 0.0
    l_p_safe = tl.where(has, l_p, 1.0)
    lse_p = tl.where(has, m_p + tl.log2(l_p_safe), 0.0)
    lse_q = tl.where(has, m_q + tl.log2(tl.where(has, l_q, 1.0)), 0.0)
    kl = tl.where(has, (acc / l_p_safe - lse_p + lse_q) * 0.6931471805599453, 0.0)
    return lse_p, lse_q, kl


@triton.jit
def _fwd_step(
    qp, qq, KPb, KQb, skp_t, skq_t, n0, offs_m, k_len, off,
    m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr, BN: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, ONLY_P: tl.constexpr, SAME_SCALE: tl.constexpr,
    PREC_P: tl.constexpr, PREC_Q: tl.constexpr,
):
    a, b = _fwd_logits(qp, qq, KPb, KQb, skp_t, skq_t, n0, k_len, DP, DQ, BDP, BDQ, BN, MASK, ONLY_P, PREC_P, PREC_Q)
    return _fwd_update(a, b, n0 + tl.arange(0, BN), offs_m, k_len, off, m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
                       MASK, CAUSAL, ONLY_P, SAME_SCALE)


@triton.jit
def _kl_fwd_kernel(
    QP, KP, QQ, KQ, KL, LSEP, LSEQ, CU,
    sqp_b, sqp_t, sqp_h, skp_b, skp_t, skp_h,
    sqq_b, sqq_t, sqq_h, skq_b, skq_t, skq_h,
    skl_b, skl_t, skl_h, slse_b, slse_h,
    n_q, n_k, n_heads, group_p, group_q, scale_p2, scale_q2, tune_key, n_bh, head_group,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ONLY_P: tl.constexpr, SAME_SCALE: tl.constexpr,
    PREC_P: tl.constexpr, PREC_Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    tile, n_tiles, pid_bh = _tile_pids(n_bh, head_group)
    pid_m = n_tiles - 1 - tile  # heavy (late) causal tiles first
    h = pid_bh % n_heads
    b = pid_bh // n_heads
    batch, q_start, q_len, k_start, k_len = _doc_bounds(CU, b, n_q, n_k, VARLEN)
    m0 = pid_m * BM
    if m0 < q_len:
        off = k_len - q_len
        offs_m = m0 + tl.arange(0, BM)
        batch64 = batch.to(tl.int64)
        QPb = QP + batch64 * sqp_b + h.to(tl.int64) * sqp_h + q_start.to(tl.int64) * sqp_t
        KPb = KP + batch64 * skp_b + (h // group_p).to(tl.int64) * skp_h + k_start.to(tl.int64) * skp_t
        qp = _load_rows(QPb, offs_m, sqp_t, q_len, DP, BDP, True)
        if ONLY_P:
            qq = qp
            KQb = KPb
        else:
            QQb = QQ + batch64 * sqq_b + h.to(tl.int64) * sqq_h + q_start.to(tl.int64) * sqq_t
            KQb = KQ + batch64 * skq_b + (h // group_q).to(tl.int64) * skq_h + k_start.to(tl.int64) * skq_t
            qq = _load_rows(QQb, offs_m, sqq_t, q_len, DQ, BDQ, True)
        m_p = tl.full([BM], float("-inf"), tl.float32)
        l_p = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM], tl.float32)
        m_q = tl.full([BM], float("-inf"), tl.float32)
        l_q = tl.zeros([BM], tl.float32)
        n_full, hi = _query_tile_ranges(m0, q_len, k_len, CAUSAL, BM, BN)
        for n0 in range(0, n_full, BN):
            m_p, l_p, acc, m_q, l_q = _fwd_step(
                qp, qq, KPb, KQb, skp_t, skq_t, n0, offs_m, k_len, off, m_p, l_p, acc, m_q, l_q,
                scale_p2, scale_q2, DP, DQ, BDP, BDQ, BN, False, CAUSAL, ONLY_P, SAME_SCALE, PREC_P, PREC_Q,
            )
        for n0 in range(n_full, hi, BN):
            m_p, l_p, acc, m_q, l_q = _fwd_step(
                qp, qq, KPb, KQb, skp_t, skq_t, n0, offs_m, k_len, off, m_p, l_p, acc, m_q, l_q,
                scale_p2, scale_q2, DP, DQ, BDP, BDQ, BN, True, CAUSAL, ONLY_P, SAME_SCALE, PREC_P, PREC_Q,
            )
        row_ok = offs_m < q_len
        lse_p, lse_q, kl = _fwd_finish(m_p, l_p, acc, m_q, l_q)
        lse_off = batch64 * slse_b + h.to(tl.int64) * slse_h + q_start + offs_m
        tl.store(LSEP + lse_off, lse_p, mask=row_ok)
        if not ONLY_P:
            tl.store(LSEQ + lse_off, lse_q, mask=row_ok)
            kl_off = batch64 * skl_b + h.to(tl.int64) * skl_h + (q_start + offs_m).to(tl.int64) * skl_t
            tl.store(KL + kl_off, kl, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# attention KL: backward, dQ (grid over query tiles and heads)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_step(
    qp, qq, KPb, KQb, skp_t, skq_t, n0, offs_m, k_len, off, lse_p, lse_q, kl, g,
    dqp, dqq, scale_p2, scale_q2,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr, BN: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, NEED_P: tl.constexpr, NEED_Q: tl.constexpr,
    PREC_P: tl.constexpr, PREC_Q: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BN)
    kp = _load_rows(KPb, offs_n, skp_t, k_len, DP, BDP, MASK)
    kq = _load_rows(KQb, offs_n, skq_t, k_len, DQ, BDQ, MASK)
    a = tl.dot(qp, tl.trans(kp), input_precision=PREC_P) * scale_p2 - lse_p[:, None]  # log2 p
    b = tl.dot(qq, tl.trans(kq), input_precision=PREC_Q) * scale_q2 - lse_q[:, None]  # log2 q
    p = tl.exp2(a)
    q = tl.exp2(b)
    if MASK:
        valid = offs_n[None, :] < k_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
        p = tl.where(valid, p, 0.0)
        q = tl.where(valid, q, 0.0)
    if NEED_Q:
        ds = g[:, None] * (q - p)
        dqq += tl.dot(ds.to(kq.dtype), kq, input_precision=PREC_Q)
    if NEED_P:
        t = (a - b) * 0.6931471805599453 - kl[:, None]
        if MASK:
            t = tl.where(valid, t, 0.0)
        da = g[:, None] * p * t
        dqp += tl.dot(da.to(kp.dtype), kp, input_precision=PREC_P)
    return dqp, dqq


@triton.jit
def _kl_bwd_dq_kernel(
    QP, KP, QQ, KQ, KL, LSEP, LSEQ, GRAD, DQP, DQQ, CU,
    sqp_b, sqp_t, sqp_h, skp_b, skp_t, skp_h,
    sqq_b, sqq_t, sqq_h, skq_b, skq_t, skq_h,
    skl_b, skl_t, skl_h, slse_b, slse_h, sg_b, sg_t, sg_h,
    sdqp_b, sdqp_t, sdqp_h, sdqq_b, sdqq_t, sdqq_h,
    n_q, n_k, n_heads, group_p, group_q, scale_p2, scale_q2, out_scale_p, out_scale_q, tune_key, n_bh, head_group,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, NEED_P: tl.constexpr, NEED_Q: tl.constexpr,
    PREC_P: tl.constexpr, PREC_Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    tile, n_tiles, pid_bh = _tile_pids(n_bh, head_group)
    pid_m = n_tiles - 1 - tile
    h = pid_bh % n_heads
    b = pid_bh // n_heads
    batch, q_start, q_len, k_start, k_len = _doc_bounds(CU, b, n_q, n_k, VARLEN)
    m0 = pid_m * BM
    if m0 < q_len:
        off = k_len - q_len
        offs_m = m0 + tl.arange(0, BM)
        row_ok = offs_m < q_len
        batch64 = batch.to(tl.int64)
        h64 = h.to(tl.int64)
        QPb = QP + batch64 * sqp_b + h64 * sqp_h + q_start.to(tl.int64) * sqp_t
        KPb = KP + batch64 * skp_b + (h // group_p).to(tl.int64) * skp_h + k_start.to(tl.int64) * skp_t
        QQb = QQ + batch64 * sqq_b + h64 * sqq_h + q_start.to(tl.int64) * sqq_t
        KQb = KQ + batch64 * skq_b + (h // group_q).to(tl.int64) * skq_h + k_start.to(tl.int64) * skq_t
        qp = _load_rows(QPb, offs_m, sqp_t, q_len, DP, BDP, True)
        qq = _load_rows(QQb, offs_m, sqq_t, q_len, DQ, BDQ, True)
        rows64 = (q_start + offs_m).to(tl.int64)
        lse_off = batch64 * slse_b + h64 * slse_h + rows64
        lse_p = tl.load(LSEP + lse_off, mask=row_ok, other=0.0)
        lse_q = tl.load(LSEQ + lse_off, mask=row_ok, other=0.0)
        g = tl.load(GRAD + batch64 * sg_b + h64 * sg_h + rows64 * sg_t, mask=row_ok, other=0.0).to(tl.float32)
        if NEED_P:
            kl = tl.load(KL + batch64 * skl_b + h64 * skl_h + rows64 * skl_t, mask=row_ok, other=0.0)
        else:
            kl = lse_p
        if NEED_P:
            dqp = tl.zeros([BM, BDP], tl.float32)
        else:
            dqp = tl.zeros([1, 1], tl.float32)  # unused: keep it out of the registers
        dqq = tl.zeros([BM, BDQ], tl.float32)
        n_full, hi = _query_tile_ranges(m0, q_len, k_len, CAUSAL, BM, BN)
        for n0 in range(0, n_full, BN):
            dqp, dqq = _dq_step(
                qp, qq, KPb, KQb, skp_t, skq_t, n0, offs_m, k_len, off, lse_p, lse_q, kl, g, dqp, dqq,
                scale_p2, scale_q2, DP, DQ, BDP, BDQ, BN, False, CAUSAL, NEED_P, NEED_Q, PREC_P, PREC_Q,
            )
        for n0 in range(n_full, hi, BN):
            dqp, dqq = _dq_step(
                qp, qq, KPb, KQb, skp_t, skq_t, n0, offs_m, k_len, off, lse_p, lse_q, kl, g, dqp, dqq,
                scale_p2, scale_q2, DP, DQ, BDP, BDQ, BN, True, CAUSAL, NEED_P, NEED_Q, PREC_P, PREC_Q,
            )
        if NEED_Q:
            base = DQQ + batch64 * sdqq_b + h64 * sdqq_h + q_start.to(tl.int64) * sdqq_t
            _store_rows(base, offs_m, sdqq_t, q_len, (dqq * out_scale_q).to(DQQ.dtype.element_ty), DQ, BDQ)
        if NEED_P:
            base = DQP + batch64 * sdqp_b + h64 * sdqp_h + q_start.to(tl.int64) * sdqp_t
            _store_rows(base, offs_m, sdqp_t, q_len, (dqp * out_scale_p).to(DQP.dtype.element_ty), DP, BDP)


# ----------------------------------------------------------------------------------------------
# attention KL: backward, dK (grid over key tiles and KV heads; loops over the group and query tiles)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dk_step(
    kp, kq, QPb, QQb, sqp_t, sqq_t, m0, offs_n, q_len, off,
    LSEPb, LSEQb, KLb, Gb, skl_t, sg_t, dkp, dkq, scale_p2, scale_q2,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr, BM: tl.constexpr,
    MASK: tl.constexpr, NEED_P: tl.constexpr, NEED_Q: tl.constexpr, PREC_P: tl.constexpr, PREC_Q: tl.constexpr,
):
    offs_m = m0 + tl.arange(0, BM)
    row_ok = offs_m < q_len
    qp = _load_rows(QPb, offs_m, sqp_t, q_len, DP, BDP, True)
    qq = _load_rows(QQb, offs_m, sqq_t, q_len, DQ, BDQ, True)
    lse_p = tl.load(LSEPb + offs_m, mask=row_ok, other=0.0)
    lse_q = tl.load(LSEQb + offs_m, mask=row_ok, other=0.0)
    g = tl.load(Gb + offs_m.to(tl.int64) * sg_t, mask=row_ok, other=0.0).to(tl.float32)
    a = tl.dot(kp, tl.trans(qp), input_precision=PREC_P) * scale_p2 - lse_p[None, :]  # [BN, BM] log2 p^T
    b = tl.dot(kq, tl.trans(qq), input_precision=PREC_Q) * scale_q2 - lse_q[None, :]
    p = tl.exp2(a)
    q = tl.exp2(b)
    if MASK:
        valid = offs_n[:, None] <= offs_m[None, :] + off
        p = tl.where(valid, p, 0.0)
        q = tl.where(valid, q, 0.0)
    if NEED_Q:
        ds = g[None, :] * (q - p)
        dkq += tl.dot(ds.to(qq.dtype), qq, input_precision=PREC_Q)
    if NEED_P:
        kl = tl.load(KLb + offs_m.to(tl.int64) * skl_t, mask=row_ok, other=0.0)
        t = (a - b) * 0.6931471805599453 - kl[None, :]
        if MASK:
            t = tl.where(valid, t, 0.0)
        da = g[None, :] * p * t
        dkp += tl.dot(da.to(qp.dtype), qp, input_precision=PREC_P)
    return dkp, dkq


@triton.jit
def _dk_head(
    QP, KP, QQ, KQ, KL, LSEP, LSEQ, GRAD, h, batch64, q_start, q_len, k_start, k_len, offs_n, m_lo, m_mid, dkp, dkq,
    sqp_b, sqp_t, sqp_h, skp_b, skp_t, skp_h, sqq_b, sqq_t, sqq_h, skq_b, skq_t, skq_h,
    skl_b, skl_t, skl_h, slse_b, slse_h, sg_b, sg_t, sg_h, group_p, group_q, scale_p2, scale_q2,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr,
    NEED_P: tl.constexpr, NEED_Q: tl.constexpr, PREC_P: tl.constexpr, PREC_Q: tl.constexpr,
    BM: tl.constexpr,
):
    """Adds query head h's contribution to the dK tile of its KV head."""
    off = k_len - q_len
    h64 = h.to(tl.int64)
    KPb = KP + batch64 * skp_b + (h // group_p).to(tl.int64) * skp_h + k_start.to(tl.int64) * skp_t
    KQb = KQ + batch64 * skq_b + (h // group_q).to(tl.int64) * skq_h + k_start.to(tl.int64) * skq_t
    kp = _load_rows(KPb, offs_n, skp_t, k_len, DP, BDP, True)
    kq = _load_rows(KQb, offs_n, skq_t, k_len, DQ, BDQ, True)
    QPb = QP + batch64 * sqp_b + h64 * sqp_h + q_start.to(tl.int64) * sqp_t
    QQb = QQ + batch64 * sqq_b + h64 * sqq_h + q_start.to(tl.int64) * sqq_t
    LSEPb = LSEP + batch64 * slse_b + h64 * slse_h + q_start
    LSEQb = LSEQ + batch64 * slse_b + h64 * slse_h + q_start
    KLb = KL + batch64 * skl_b + h64 * skl_h + q_start.to(tl.int64) * skl_t
    Gb = GRAD + batch64 * sg_b + h64 * sg_h + q_start.to(tl.int64) * sg_t
    for m0 in range(m_lo, m_mid, BM):
        dkp, dkq = _dk_step(
            kp, kq, QPb, QQb, sqp_t, sqq_t, m0, offs_n, q_len, off, LSEPb, LSEQb, KLb, Gb, skl_t, sg_t,
            dkp, dkq, scale_p2, scale_q2, DP, DQ, BDP, BDQ, BM, True, NEED_P, NEED_Q, PREC_P, PREC_Q,
        )
    for m0 in range(m_mid, q_len, BM):
        dkp, dkq = _dk_step(
            kp, kq, QPb, QQb, sqp_t, sqq_t, m0, offs_n, q_len, off, LSEPb, LSEQb, KLb, Gb, skl_t, sg_t,
            dkp, dkq, scale_p2, scale_q2, DP, DQ, BDP, BDQ, BM, False, NEED_P, NEED_Q, PREC_P, PREC_Q,
        )
    return dkp, dkq


@triton.jit
def _kl_bwd_dk_kernel(
    QP, KP, QQ, KQ, KL, LSEP, LSEQ, GRAD, DKP, DKQ, CU,
    sqp_b, sqp_t, sqp_h, skp_b, skp_t, skp_h,
    sqq_b, sqq_t, sqq_h, skq_b, skq_t, skq_h,
    skl_b, skl_t, skl_h, slse_b, slse_h, sg_b, sg_t, sg_h,
    sdkp_b, sdkp_t, sdkp_h, sdkq_b, sdkq_t, sdkq_h,
    n_q, n_k, n_kv_grid, group_grid, group_p, group_q, scale_p2, scale_q2, out_scale_p, out_scale_q, tune_key,
    n_bh, head_group,
    DP: tl.constexpr, DQ: tl.constexpr, BDP: tl.constexpr, BDQ: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, NEED_P: tl.constexpr, NEED_Q: tl.constexpr,
    PREC_P: tl.constexpr, PREC_Q: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    pid_n, _, pid_bh = _tile_pids(n_bh, head_group)  # early key tiles carry the most causal work: first
    hk = pid_bh % n_kv_grid
    b = pid_bh // n_kv_grid
    batch, q_start, q_len, k_start, k_len = _doc_bounds(CU, b, n_q, n_k, VARLEN)
    n0 = pid_n * BN
    if n0 < k_len:
        offs_n = n0 + tl.arange(0, BN)
        batch64 = batch.to(tl.int64)
        if NEED_P:
            dkp = tl.zeros([BN, BDP], tl.float32)
        else:
            dkp = tl.zeros([1, 1], tl.float32)  # unused: keep it out of the registers
        dkq = tl.zeros([BN, BDQ], tl.float32)
        m_lo, m_mid = _key_tile_ranges(n0, q_len, k_len, CAUSAL, BM, BN)
        for gi in range(group_grid):
            dkp, dkq = _dk_head(
                QP, KP, QQ, KQ, KL, LSEP, LSEQ, GRAD, hk * group_grid + gi, batch64, q_start, q_len,
                k_start, k_len, offs_n, m_lo, m_mid, dkp, dkq,
                sqp_b, sqp_t, sqp_h, skp_b, skp_t, skp_h, sqq_b, sqq_t, sqq_h, skq_b, skq_t, skq_h,
                skl_b, skl_t, skl_h, slse_b, slse_h, sg_b, sg_t, sg_h, group_p, group_q, scale_p2, scale_q2,
                DP, DQ, BDP, BDQ, NEED_P, NEED_Q, PREC_P, PREC_Q, BM,
            )
        hk64 = hk.to(tl.int64)
        if NEED_Q:
            base = DKQ + batch64 * sdkq_b + hk64 * sdkq_h + k_start.to(tl.int64) * sdkq_t
            _store_rows(base, offs_n, sdkq_t, k_len, (dkq * out_scale_q).to(DKQ.dtype.element_ty), DQ, BDQ)
        if NEED_P:
            base = DKP + batch64 * sdkp_b + hk64 * sdkp_h + k_start.to(tl.int64) * sdkp_t
            _store_rows(base, offs_n, sdkp_t, k_len, (dkp * out_scale_p).to(DKP.dtype.element_ty), DP, BDP)



# ----------------------------------------------------------------------------------------------
# group (head-averaged teacher) KL: teacher pbar = mean_h 2^(A2_h - LSE_h2), one student head per group
# ----------------------------------------------------------------------------------------------
@triton.jit
def _group_pbar(
    QTb, LSETb, kt, offs_m, q_len, sqt_t, sqt_h, slt_h, scale_t2,
    DT: tl.constexpr, BDT: tl.constexpr, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC_T: tl.constexpr, TRANS: tl.constexpr,
):
    """Exact group-mean teacher probabilities of a tile: [BM, BN] (or [BN, BM] with TRANS).

    Entries of masked keys are garbage (possibly inf, never NaN): the caller masks them."""
    row_ok = offs_m < q_len
    if TRANS:
        pbar = tl.zeros([BN, BM], tl.float32)
    else:
        pbar = tl.zeros([BM, BN], tl.float32)
    for hi in range(GROUP):
        qt = _load_rows(QTb + hi * sqt_h, offs_m, sqt_t, q_len, DT, BDT, True)
        lse = tl.load(LSETb + hi * slt_h + offs_m, mask=row_ok, other=0.0)
        if TRANS:
            pbar += tl.exp2(tl.dot(kt, tl.trans(qt), input_precision=PREC_T) * scale_t2 - lse[None, :])
        else:
            pbar += tl.exp2(tl.dot(qt, tl.trans(kt), input_precision=PREC_T) * scale_t2 - lse[:, None])
    return pbar * (1.0 / GROUP)


@triton.jit
def _group_fwd_step(
    qs, QTb, LSETb, KTb, KSb, sqt_t, sqt_h, slt_h, skt_t, sks_t, n0, offs_m, q_len, k_len, off,
    acc_pb, acc_ent, mass, m_s, l_s, scale_t2, scale_s2,
    DT: tl.constexpr, DS: tl.constexpr, BDT: tl.constexpr, BDS: tl.constexpr, GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PREC_T: tl.constexpr, PREC_S: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BN)
    kt = _load_rows(KTb, offs_n, skt_t, k_len, DT, BDT, MASK)
    ks = _load_rows(KSb, offs_n, sks_t, k_len, DS, BDS, MASK)
    pbar = _group_pbar(QTb, LSETb, kt, offs_m, q_len, sqt_t, sqt_h, slt_h, scale_t2, DT, BDT, GROUP, BM, BN,
                       PREC_T, False)
    b = tl.dot(qs, tl.trans(ks), input_precision=PREC_S) * scale_s2
    if MASK:
        valid = offs_n[None, :] < k_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
        pbar = tl.where(valid, pbar, 0.0)
        bz = tl.where(valid, b, 0.0)
        b = tl.where(valid, b, float("-inf"))
    else:
        bz = b
    acc_pb += tl.sum(pbar * bz, 1)
    acc_ent += tl.sum(pbar * tl.log2(tl.where(pbar > 0.0, pbar, 1.0)), 1)  # 0 log 0 = 0
    mass += tl.sum(pbar, 1)
    m_new = tl.maximum(m_s, tl.max(b, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_s = l_s * tl.exp2(m_s - m_use) + tl.sum(tl.exp2(b - m_use[:, None]), 1)
    return acc_pb, acc_ent, mass, m_new, l_s


@triton.jit
def _group_fwd_kernel(
    QT, KT, QS, KS, LSET, KL, LSES, CU,
    sqt_b, sqt_t, sqt_h, skt_b, skt_t, skt_h, sqs_b, sqs_t, sqs_h, sks_b, sks_t, sks_h,
    slt_b, slt_h, skl_b, skl_t, skl_h, sls_b, sls_h,
    n_q, n_k, n_kv, scale_t2, scale_s2, tune_key,
    DT: tl.constexpr, DS: tl.constexpr, BDT: tl.constexpr, BDS: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = pid_bh % n_kv
    b = pid_bh // n_kv
    batch, q_start, q_len, k_start, k_len = _doc_bounds(CU, b, n_q, n_k, VARLEN)
    m0 = pid_m * BM
    if m0 < q_len:
        off = k_len - q_len
        offs_m = m0 + tl.arange(0, BM)
        batch64 = batch.to(tl.int64)
        g64 = g.to(tl.int64)
        QTb = QT + batch64 * sqt_b + g64 * GROUP * sqt_h + q_start.to(tl.int64) * sqt_t
        LSETb = LSET + batch64 * slt_b + g64 * GROUP * slt_h + q_start
        KTb = KT + batch64 * skt_b + g64 * skt_h + k_start.to(tl.int64) * skt_t
        QSb = QS + batch64 * sqs_b + g64 * sqs_h + q_start.to(tl.int64) * sqs_t
        KSb = KS + batch64 * sks_b + g64 * sks_h + k_start.to(tl.int64) * sks_t
        qs = _load_rows(QSb, offs_m, sqs_t, q_len, DS, BDS, True)
        acc_pb = tl.zeros([BM], tl.float32)
        acc_ent = tl.zeros([BM], tl.float32)
        mass = tl.zeros([BM], tl.float32)
        m_s = tl.full([BM], float("-inf"), tl.float32)
        l_s = tl.zeros([BM], tl.float32)
        n_full, hi = _query_tile_ranges(m0, q_len, k_len, CAUSAL, BM, BN)
        for n0 in range(0, n_full, BN):
            acc_pb, acc_ent, mass, m_s, l_s = _group_fwd_step(
                qs, QTb, LSETb, KTb, KSb, sqt_t, sqt_h, slt_h, skt_t, sks_t, n0, offs_m, q_len, k_len, off,
                acc_pb, acc_ent, mass, m_s, l_s, scale_t2, scale_s2,
                DT, DS, BDT, BDS, GROUP, BM, BN, False, CAUSAL, PREC_T, PREC_S,
            )
        for n0 in range(n_full, hi, BN):
            acc_pb, acc_ent, mass, m_s, l_s = _group_fwd_step(
                qs, QTb, LSETb, KTb, KSb, sqt_t, sqt_h, slt_h, skt_t, sks_t, n0, offs_m, q_len, k_len, off,
                acc_pb, acc_ent, mass, m_s, l_s, scale_t2, scale_s2,
                DT, DS, BDT, BDS, GROUP, BM, BN, True, CAUSAL, PREC_T, PREC_S,
            )
        row_ok = offs_m < q_len
        has = l_s > 0.0
        lse_s = tl.where(has, m_s + tl.log2(tl.where(has, l_s, 1.0)), 0.0)
        kl = tl.where(has, (acc_ent - acc_pb + lse_s * mass) * 0.6931471805599453, 0.0)
        rows64 = (q_start + offs_m).to(tl.int64)
        tl.store(LSES + batch64 * sls_b + g64 * sls_h + rows64, lse_s, mask=row_ok)
        tl.store(KL + batch64 * skl_b + g64 * skl_h + rows64 * skl_t, kl, mask=row_ok)


@triton.jit
def _group_dq_step(
    qs, QTb, LSETb, KTb, KSb, sqt_t, sqt_h, slt_h, skt_t, sks_t, n0, offs_m, q_len, k_len, off,
    lse_s, gr, dqs, scale_t2, scale_s2,
    DT: tl.constexpr, DS: tl.constexpr, BDT: tl.constexpr, BDS: tl.constexpr, GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PREC_T: tl.constexpr, PREC_S: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BN)
    kt = _load_rows(KTb, offs_n, skt_t, k_len, DT, BDT, MASK)
    ks = _load_rows(KSb, offs_n, sks_t, k_len, DS, BDS, MASK)
    pbar = _group_pbar(QTb, LSETb, kt, offs_m, q_len, sqt_t, sqt_h, slt_h, scale_t2, DT, BDT, GROUP, BM, BN,
                       PREC_T, False)
    q = tl.exp2(tl.dot(qs, tl.trans(ks), input_precision=PREC_S) * scale_s2 - lse_s[:, None])
    if MASK:
        valid = offs_n[None, :] < k_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + off)
        pbar = tl.where(valid, pbar, 0.0)
        q = tl.where(valid, q, 0.0)
    ds = gr[:, None] * (q - pbar)
    dqs += tl.dot(ds.to(ks.dtype), ks, input_precision=PREC_S)
    return dqs


@triton.jit
def _group_bwd_dq_kernel(
    QT, KT, QS, KS, LSET, LSES, GRAD, DQS, CU,
    sqt_b, sqt_t, sqt_h, skt_b, skt_t, skt_h, sqs_b, sqs_t, sqs_h, sks_b, sks_t, sks_h,
    slt_b, slt_h, sls_b, sls_h, sg_b, sg_t, sg_h, sdq_b, sdq_t, sdq_h,
    n_q, n_k, n_kv, scale_t2, scale_s2, out_scale_s, tune_key,
    DT: tl.constexpr, DS: tl.constexpr, BDT: tl.constexpr, BDS: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = pid_bh % n_kv
    b = pid_bh // n_kv
    batch, q_start, q_len, k_start, k_len = _doc_bounds(CU, b, n_q, n_k, VARLEN)
    m0 = pid_m * BM
    if m0 < q_len:
        off = k_len - q_len
        offs_m = m0 + tl.arange(0, BM)
        row_ok = offs_m < q_len
        batch64 = batch.to(tl.int64)
        g64 = g.to(tl.int64)
        QTb = QT + batch64 * sqt_b + g64 * GROUP * sqt_h + q_start.to(tl.int64) * sqt_t
        LSETb = LSET + batch64 * slt_b + g64 * GROUP * slt_h + q_start
        KTb = KT + batch64 * skt_b + g64 * skt_h + k_start.to(tl.int64) * skt_t
        QSb = QS + batch64 * sqs_b + g64 * sqs_h + q_start.to(tl.int64) * sqs_t
        KSb = KS + batch64 * sks_b + g64 * sks_h + k_start.to(tl.int64) * sks_t
        qs = _load_rows(QSb, offs_m, sqs_t, q_len, DS, BDS, True)
        rows64 = (q_start + offs_m).to(tl.int64)
        lse_s = tl.load(LSES + batch64 * sls_b + g64 * sls_h + rows64, mask=row_ok, other=0.0)
        gr = tl.load(GRAD + batch64 * sg_b + g64 * sg_h + rows64 * sg_t, mask=row_ok, other=0.0).to(tl.float32)
        dqs = tl.zeros([BM, BDS], tl.float32)
        n_full, hi = _query_tile_ranges(m0, q_len, k_len, CAUSAL, BM, BN)
        for n0 in range(0, n_full, BN):
            dqs = _group_dq_step(
                qs, QTb, LSETb, KTb, KSb, sqt_t, sqt_h, slt_h, skt_t, sks_t, n0, offs_m, q_len, k_len, off,
                lse_s, gr, dqs, scale_t2, scale_s2, DT, DS, BDT, BDS, GROUP, BM, BN, False, CAUSAL, PREC_T, PREC_S,
            )
        for n0 in range(n_full, hi, BN):
            dqs = _group_dq_step(
                qs, QTb, LSETb, KTb, KSb, sqt_t, sqt_h, slt_h, skt_t, sks_t, n0, offs_m, q_len, k_len, off,
                lse_s, gr, dqs, scale_t2, scale_s2, DT, DS, BDT, BDS, GROUP, BM, BN, True, CAUSAL, PREC_T, PREC_S,
            )
        base = DQS + batch64 * sdq_b + g64 * sdq_h + q_start.to(tl.int64) * sdq_t
        _store_rows(base, offs_m, sdq_t, q_len, (dqs * out_scale_s).to(DQS.dtype.element_ty), DS, BDS)


@triton.jit
def _group_dk_step(
    kt, ks, QTb, LSETb, QSb, LSESb, Gb, sqt_t, sqt_h, slt_h, sqs_t, sg_t, m0, offs_n, q_len, off,
    dks, scale_t2, scale_s2,
    DT: tl.constexpr, DS: tl.constexpr, BDT: tl.constexpr, BDS: tl.constexpr, GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
):
    offs_m = m0 + tl.arange(0, BM)
    row_ok = offs_m < q_len
    qs = _load_rows(QSb, offs_m, sqs_t, q_len, DS, BDS, True)
    lse_s = tl.load(LSESb + offs_m, mask=row_ok, other=0.0)
    gr = tl.load(Gb + offs_m.to(tl.int64) * sg_t, mask=row_ok, other=0.0).to(tl.float32)
    pbar = _group_pbar(QTb, LSETb, kt, offs_m, q_len, sqt_t, sqt_h, slt_h, scale_t2, DT, BDT, GROUP, BM, BN,
                       PREC_T, True)  # [BN, BM]
    q = tl.exp2(tl.dot(ks, tl.trans(qs), input_precision=PREC_S) * scale_s2 - lse_s[None, :])
    if MASK:
        valid = offs_n[:, None] <= offs_m[None, :] + off
        pbar = tl.where(valid, pbar, 0.0)
        q = tl.where(valid, q, 0.0)
    ds = gr[None, :] * (q - pbar)
    dks += tl.dot(ds.to(qs.dtype), qs, input_precision=PREC_S)
    return dks


@triton.jit
def _group_bwd_dk_kernel(
    QT, KT, QS, KS, LSET, LSES, GRAD, DKS, CU,
    sqt_b, sqt_t, sqt_h, skt_b, skt_t, skt_h, sqs_b, sqs_t, sqs_h, sks_b, sks_t, sks_h,
    slt_b, slt_h, sls_b, sls_h, sg_b, sg_t, sg_h, sdk_b, sdk_t, sdk_h,
    n_q, n_k, n_kv, scale_t2, scale_s2, out_scale_s, tune_key,
    DT: tl.constexpr, DS: tl.constexpr, BDT: tl.constexpr, BDS: tl.constexpr, GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = pid_bh % n_kv
    b = pid_bh // n_kv
    batch, q_start, q_len, k_start, k_len = _doc_bounds(CU, b, n_q, n_k, VARLEN)
    n0 = pid_n * BN
    if n0 < k_len:
        off = k_len - q_len
        offs_n = n0 + tl.arange(0, BN)
        batch64 = batch.to(tl.int64)
        g64 = g.to(tl.int64)
        QTb = QT + batch64 * sqt_b + g64 * GROUP * sqt_h + q_start.to(tl.int64) * sqt_t
        LSETb = LSET + batch64 * slt_b + g64 * GROUP * slt_h + q_start
        KTb = KT + batch64 * skt_b + g64 * skt_h + k_start.to(tl.int64) * skt_t
        QSb = QS + batch64 * sqs_b + g64 * sqs_h + q_start.to(tl.int64) * sqs_t
        KSb = KS + batch64 * sks_b + g64 * sks_h + k_start.to(tl.int64) * sks_t
        LSESb = LSES + batch64 * sls_b + g64 * sls_h + q_start
        Gb = GRAD + batch64 * sg_b + g64 * sg_h + q_start.to(tl.int64) * sg_t
        kt = _load_rows(KTb, offs_n, skt_t, k_len, DT, BDT, True)
        ks = _load_rows(KSb, offs_n, sks_t, k_len, DS, BDS, True)
        dks = tl.zeros([BN, BDS], tl.float32)
        m_lo, m_mid = _key_tile_ranges(n0, q_len, k_len, CAUSAL, BM, BN)
        for m0 in range(m_lo, m_mid, BM):
            dks = _group_dk_step(
                kt, ks, QTb, LSETb, QSb, LSESb, Gb, sqt_t, sqt_h, slt_h, sqs_t, sg_t, m0, offs_n, q_len, off,
                dks, scale_t2, scale_s2, DT, DS, BDT, BDS, GROUP, BM, BN, True, PREC_T, PREC_S,
            )
        for m0 in range(m_mid, q_len, BM):
            dks = _group_dk_step(
                kt, ks, QTb, LSETb, QSb, LSESb, Gb, sqt_t, sqt_h, slt_h, sqs_t, sg_t, m0, offs_n, q_len, off,
                dks, scale_t2, scale_s2, DT, DS, BDT, BDS, GROUP, BM, BN, False, PREC_T, PREC_S,
            )
        base = DKS + batch64 * sdk_b + g64 * sdk_h + k_start.to(tl.int64) * sdk_t
        _store_rows(base, offs_n, sdk_t, k_len, (dks * out_scale_s).to(DKS.dtype.element_ty), DS, BDS)

# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
def _configs(pairs):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


# (BM, BN, warps, stages); lists pruned offline with ptxas -v for sm_90 at D = 128 (no or few spills)
# forward: (64, 64, 4, 2), (128, 32, 8, 2) and (64, 32, 4, 2) fit two CTAs per SM (<= 96 KiB of shared memory),
# so that one CTA's GEMMs could overlap another's exponentials; (128, 64, 8, 4) takes 192 KiB and
# (64, 64, 4, 3) 128 KiB. The H100 autotuner's choices vary between runs: 64 x 64 / 4 warps at 2K-4K,
# 128 x 64 / 8 warps at 8K, 128 x 128 from 16K in run 8; 128 x 64 / 8 warps at 2K-4K, 128 x 128 at 8K,
# 128 x 64 with 4 stages from 16K in run 7 (benchmarks/results/attention_kl_h100_run{7,8}.json)
_FWD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
     (128, 32, 8, 2), (64, 32, 4, 2)]
)
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 8, 3), (128, 64, 8, 3)])
# dK: key tiles of 32 use mma.sync (HMMA); key tiles >= 64 use wgmma but spill a little outside the
# query loop (ptxas -v, sm_90, aligned strides): both kinds are tuned
_DK_CONFIGS = _configs([(128, 32, 8, 3), (64, 32, 4, 3), (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2)])
_GROUP_FWD_CONFIGS = _configs([(64, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2)])
_GROUP_DQ_CONFIGS = _configs([(128, 32, 8, 3), (64, 32, 4, 3)])
_GROUP_DK_CONFIGS = _configs([(32, 128, 8, 2), (128, 32, 8, 3)])
_TUNE_KEYS = {
    "fwd": ["tune_key", "DP", "DQ", "CAUSAL", "VARLEN", "ONLY_P"],
    "dq": ["tune_key", "DP", "DQ", "CAUSAL", "VARLEN", "NEED_P", "NEED_Q"],
    "dk": ["tune_key", "DP", "DQ", "CAUSAL", "VARLEN", "NEED_P", "NEED_Q"],
    "group_fwd": ["tune_key", "DT", "DS", "GROUP", "CAUSAL", "VARLEN"],
    "group_dq": ["tune_key", "DT", "DS", "GROUP", "CAUSAL", "VARLEN"],
    "group_dk": ["tune_key", "DT", "DS", "GROUP", "CAUSAL", "VARLEN"],
}

# interpreter (CPU tests): small fixed tiles, BM != BN to exercise the diagonal logic
_INTERPRET_META = {
    "fwd": {"BM": 32, "BN": 16}, "dq": {"BM": 16, "BN": 32}, "dk": {"BM": 32, "BN": 16},
    "group_fwd": {"BM": 16, "BN": 32}, "group_dq": {"BM": 32, "BN": 16}, "group_dk": {"BM": 16, "BN": 32},
}
# fixed GPU fallback when autotuning is switched off (SPARSA_KL_AUTOTUNE=0); dk is the config the H100
# autotuner chose at D = 128, bf16, causal (benchmarks/results/attention_kl_h100.md)
_DEFAULT_META = {
    "fwd": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
    "dq": {"BM": 128, "BN": 32, "num_warps": 8, "num_stages": 3},
    "dk": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    "group_fwd": {"BM": 64, "BN": 128, "num_warps": 8, "num_stages": 2},
    "group_dq": {"BM": 128, "BN": 32, "num_warps": 8, "num_stages": 3},
    "group_dk": {"BM": 32, "BN": 128, "num_warps": 8, "num_stages": 2},
}


def _autotune_enabled() -> bool:
    return not _INTERPRET and os.environ.get("SPARSA_KL_AUTOTUNE", "1") != "0"


_TUNED = {}


def _kernel(name: str, fn, configs):
    """The kernel to launch and the extra meta-parameters to pass (none when autotuned)."""
    if _INTERPRET:
        return fn, dict(_INTERPRET_META[name])
    if not _autotune_enabled():
        return fn, dict(_DEFAULT_META[name])
    if name not in _TUNED:
        _TUNED[name] = triton.autotune(configs=configs, key=_TUNE_KEYS[name])(fn)
    return _TUNED[name], {}



def _launch(name: str, fn, configs, grid, args: tuple, consts: dict) -> None:
    """Launches kernel `name` (runtime `args`, constexpr `consts`), through the launch cache on the GPU."""
    kernel, meta = _kernel(name, fn, configs)
    if _INTERPRET:
        kernel[grid](*args, **consts, **meta)
        return
    launcher_for(name, fn)(kernel, grid, args, consts, meta)



def _head_group(n_keys: int, key_bytes: int, n_bh: int) -> int:
    """Heads issued together by the attention-KL grids (`_tile_pids`): as many as keep their K tiles
    (n_keys * key_bytes each) within HEAD_GROUP_L2_BYTES. SPARSA_KL_HEAD_GROUP=n forces it."""
    forced = os.environ.get("SPARSA_KL_HEAD_GROUP")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"SPARSA_KL_HEAD_GROUP must be a positive integer, got {forced!r}")
        return min(int(forced), n_bh)
    widest = max(1, min(HEAD_GROUP_L2_BYTES // max(1, n_keys * key_bytes), n_bh))
    n_groups = cdiv(n_bh, widest)
    return cdiv(n_bh, n_groups)  # groups of equal size (a small last group would run its heavy tiles last)


def _tile_grid(n_tiles: int, n_bh: int) -> tuple:
    return (n_tiles * n_bh,)


def _key_bytes(kp: torch.Tensor, kq: torch.Tensor, only_p: bool) -> int:
    """Bytes of K read per key and head (both sides)."""
    size = kp.shape[3] * kp.element_size()
    return size if only_p else size + kq.shape[3] * kq.element_size()


def _tune_key(n: int) -> int:
    return min(next_pow2(n), 1 << 14)  # sizes >= 16K share one tuning


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _pad_dim(d: int) -> int:
    return max(16, next_pow2(d))


def _grad_strides(grad: torch.Tensor) -> tuple:
    """Strides of a per-row upstream gradient [B, T, H]; a 0-d gradient (of a scalar loss) is read as
    one value for every row (strides 0) without an expanded view."""
    return (0, 0, 0) if grad.dim() == 0 else _strides3(grad)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides3(x: torch.Tensor):
    return x.stride()[:3]


class _Docs:
    """Batch/document layout shared by the launches."""

    def __init__(self, batch: int, n_q: int, n_k: int, cu_seqlens, max_len):
        self.varlen = cu_seqlens is not None
        self.cu = cu_seqlens
        if self.varlen:
            self.n_seq = cu_seqlens.numel() - 1
            self.max_q = self.max_k = int(max_len)
        else:
            self.n_seq = batch
            self.max_q, self.max_k = n_q, n_k


def kl_forward(qp, kp, qq, kq, *, causal, scale_p, scale_q, cu_seqlens=None, max_len=None, only_p=False):
    """Returns (kl [B, T, H] fp32 nats, lse_p2 [B, H, T], lse_q2 [B, H, T]) (log2 domain).

    With only_p the Q side is ignored and only lse_p2 is meaningful (teacher LSE pass)."""
    qp, kp, qq, kq = (_unit_last(x) for x in (qp, kp, qq, kq))
    batch, n_q, n_heads, dp = qp.shape
    n_k = kp.shape[1]
    dq = qq.shape[3]
    docs = _Docs(batch, n_q, n_k, cu_seqlens, max_len)
    dev = qp.device
    kl = new_output((batch, n_q, n_heads), torch.float32, dev)
    lse_p = new_output((batch, n_heads, n_q), torch.float32, dev)
    lse_q = lse_p if only_p else new_output_like(lse_p)
    cu = cu_seqlens if cu_seqlens is not None else lse_p  # dummy pointer when not varlen
    n_bh = docs.n_seq * n_heads
    head_group = _head_group(docs.max_k, _key_bytes(kp, kq, only_p), n_bh)
    grid = lambda m: _tile_grid(cdiv(docs.max_q, m["BM"]), n_bh)
    args = (
        qp, kp, qq, kq, kl, lse_p, lse_q, cu,
        *_strides3(qp), *_strides3(kp), *_strides3(qq), *_strides3(kq),
        *_strides3(kl), lse_p.stride(0), lse_p.stride(1),
        n_q, n_k, n_heads, n_heads // kp.shape[2], n_heads // kq.shape[2],
        scale_p * LOG2E, scale_q * LOG2E, _tune_key(docs.max_q), n_bh, head_group,
    )
    consts = dict(DP=dp, DQ=dq, BDP=_pad_dim(dp), BDQ=_pad_dim(dq), CAUSAL=causal, VARLEN=docs.varlen, ONLY_P=only_p,
                  SAME_SCALE=scale_p == scale_q, PREC_P=_prec(qp), PREC_Q=_prec(qq))
    _launch("fwd", _kl_fwd_kernel, _FWD_CONFIGS, grid, args, consts)
    return kl, lse_p, lse_q


def kl_backward(qp, kp, qq, kq, kl, lse_p, lse_q, grad, *, causal, scale_p, scale_q, need_p, need_q,
                cu_seqlens=None, max_len=None, grad_factor=1.0):
    """grad [B, T, H] (any strides, stride 0 allowed) or 0-d (one value for all rows), times the constant
    grad_factor -> (dqp, dkp, dqq, dkq), None where not needed."""
    qp, kp, qq, kq = (_unit_last(x) for x in (qp, kp, qq, kq))
    batch, n_q, n_heads, dp = qp.shape
    n_k, n_kv_p = kp.shape[1], kp.shape[2]
    dq, n_kv_q = qq.shape[3], kq.shape[2]
    group_p, group_q = n_heads // n_kv_p, n_heads // n_kv_q
    docs = _Docs(batch, n_q, n_k, cu_seqlens, max_len)
    cu = cu_seqlens if cu_seqlens is not None else lse_p
    dqp = new_output_like(qp) if need_p else None
    dkp = new_output_like(kp) if need_p else None
    dqq = new_output_like(qq) if need_q else None
    dkq = new_output_like(kq) if need_q else None
    dummy_p = dqp if need_p else qp
    dummy_kp = dkp if need_p else kp
    dummy_q = dqq if need_q else qq
    dummy_kq = dkq if need_q else kq
    key_bytes = _key_bytes(kp, kq, False)
    common = {"DP": dp, "DQ": dq, "BDP": _pad_dim(dp), "BDQ": _pad_dim(dq), "CAUSAL": causal, "VARLEN": docs.varlen,
                  "PREC_P": _prec(qp), "PREC_Q": _prec(qq)}
    head_args = (*_strides3(qp), *_strides3(kp), *_strides3(qq), *_strides3(kq),
                 *_strides3(kl), lse_p.stride(0), lse_p.stride(1), *_grad_strides(grad))
    n_bh = docs.n_seq * n_heads
    grid = lambda m: _tile_grid(cdiv(docs.max_q, m["BM"]), n_bh)
    out_p, out_q = scale_p * grad_factor, scale_q * grad_factor  # the kernels scale dQ, dK once at the end
    args = (
        qp, kp, qq, kq, kl, lse_p, lse_q, grad, dummy_p, dummy_q, cu, *head_args,
        *_strides3(dummy_p), *_strides3(dummy_q),
        n_q, n_k, n_heads, group_p, group_q, scale_p * LOG2E, scale_q * LOG2E, out_p, out_q,
        _tune_key(docs.max_q), n_bh, _head_group(docs.max_k, key_bytes, n_bh),
    )
    _launch("dq", _kl_bwd_dq_kernel, _DQ_CONFIGS, grid, args, dict(NEED_P=need_p, NEED_Q=need_q, **common))
    # dK: one launch when both sides are needed and share the KV grouping, else one per side
    launches = []
    if need_p and need_q and group_p == group_q:
        launches.append((True, True, n_kv_q, group_q))
    else:
        if need_q:
            launches.append((False, True, n_kv_q, group_q))
        if need_p:
            launches.append((True, False, n_kv_p, group_p))
    for with_p, with_q, n_kv, group in launches:
        n_bh_kv = docs.n_seq * n_kv
        grid = lambda m, n_bh_kv=n_bh_kv: _tile_grid(cdiv(docs.max_k, m["BN"]), n_bh_kv)
        args = (
            qp, kp, qq, kq, kl, lse_p, lse_q, grad, dummy_kp, dummy_kq, cu, *head_args,
            *_strides3(dummy_kp), *_strides3(dummy_kq),
            n_q, n_k, n_kv, group, group_p, group_q, scale_p * LOG2E, scale_q * LOG2E, out_p, out_q,
            _tune_key(docs.max_q), n_bh_kv, _head_group(docs.max_q, key_bytes, n_bh_kv),
        )
        _launch("dk", _kl_bwd_dk_kernel, _DK_CONFIGS, grid, args, dict(NEED_P=with_p, NEED_Q=with_q, **common))
    return dqp, dkp, dqq, dkq



def group_forward(qt, kt, qs, ks, *, causal, scale_t, scale_s, cu_seqlens=None, max_len=None):
    """Returns (kl [B, T, Hkv] fp32 nats, lse_s2 [B, Hkv, T], lse_t2 [B, Hq, T]) (LSEs in the log2 domain)."""
    qt, kt, qs, ks = (_unit_last(x) for x in (qt, kt, qs, ks))
    _, lse_t, _ = kl_forward(qt, kt, qt, kt, causal=causal, scale_p=scale_t, scale_q=scale_t,
                             cu_seqlens=cu_seqlens, max_len=max_len, only_p=True)
    batch, n_q, n_heads_q, dt = qt.shape
    n_k, n_kv = kt.shape[1], kt.shape[2]
    ds = qs.shape[3]
    docs = _Docs(batch, n_q, n_k, cu_seqlens, max_len)
    kl = new_output((batch, n_q, n_kv), torch.float32, qt.device)
    lse_s = new_output((batch, n_kv, n_q), torch.float32, qt.device)
    cu = cu_seqlens if cu_seqlens is not None else lse_s
    grid = lambda m: (cdiv(docs.max_q, m["BM"]), docs.n_seq * n_kv)
    args = (
        qt, kt, qs, ks, lse_t, kl, lse_s, cu,
        *_strides3(qt), *_strides3(kt), *_strides3(qs), *_strides3(ks),
        lse_t.stride(0), lse_t.stride(1), *_strides3(kl), lse_s.stride(0), lse_s.stride(1),
        n_q, n_k, n_kv, scale_t * LOG2E, scale_s * LOG2E, _tune_key(docs.max_q),
    )
    consts = dict(DT=dt, DS=ds, BDT=_pad_dim(dt), BDS=_pad_dim(ds), GROUP=n_heads_q // n_kv, CAUSAL=causal,
                  VARLEN=docs.varlen, PREC_T=_prec(qt), PREC_S=_prec(qs))
    _launch("group_fwd", _group_fwd_kernel, _GROUP_FWD_CONFIGS, grid, args, consts)
    return kl, lse_s, lse_t


def group_backward(qt, kt, qs, ks, lse_t, lse_s, grad, *, causal, scale_t, scale_s, cu_seqlens=None, max_len=None,
                   grad_factor=1.0):
    """grad [B, T, Hkv] (any strides) or 0-d, times the constant grad_factor -> (dqs, dks)."""
    qt, kt, qs, ks = (_unit_last(x) for x in (qt, kt, qs, ks))
    batch, n_q, n_heads_q, dt = qt.shape
    n_k, n_kv = kt.shape[1], kt.shape[2]
    ds = qs.shape[3]
    docs = _Docs(batch, n_q, n_k, cu_seqlens, max_len)
    cu = cu_seqlens if cu_seqlens is not None else lse_s
    dqs = new_output_like(qs)
    dks = new_output_like(ks)
    common = {"DT": dt, "DS": ds, "BDT": _pad_dim(dt), "BDS": _pad_dim(ds), "GROUP": n_heads_q // n_kv, "CAUSAL": causal,
                  "VARLEN": docs.varlen, "PREC_T": _prec(qt), "PREC_S": _prec(qs)}
    args = (*_strides3(qt), *_strides3(kt), *_strides3(qs), *_strides3(ks),
            lse_t.stride(0), lse_t.stride(1), lse_s.stride(0), lse_s.stride(1), *_grad_strides(grad))
    scales = (n_q, n_k, n_kv, scale_t * LOG2E, scale_s * LOG2E, scale_s * grad_factor, _tune_key(docs.max_q))
    grid = lambda m: (cdiv(docs.max_q, m["BM"]), docs.n_seq * n_kv)
    _launch("group_dq", _group_bwd_dq_kernel, _GROUP_DQ_CONFIGS, grid,
            (qt, kt, qs, ks, lse_t, lse_s, grad, dqs, cu, *args, *_strides3(dqs), *scales), common)
    grid = lambda m: (cdiv(docs.max_k, m["BN"]), docs.n_seq * n_kv)
    _launch("group_dk", _group_bwd_dk_kernel, _GROUP_DK_CONFIGS, grid,
            (qt, kt, qs, ks, lse_t, lse_s, grad, dks, cu, *args, *_strides3(dks), *scales), common)
    return dqs, dks
