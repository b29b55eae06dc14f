"""Triton attention over keys at strided positions: NSA's compressed branch and sliding-window attention.

Key j of a document sits at position  pos(j) = j * STRIDE + LENGTH - 1  (the last token of its window);
query t (position local to its document) sees key j iff  pos(j) <= t  and, when WINDOW > 0,
pos(j) > t - WINDOW.
  compressed attention: STRIDE = d, LENGTH = l, WINDOW = 0   (whole compression window in the past)
  sliding window:       STRIDE = 1, LENGTH = 1, WINDOW = w   (the w most recent tokens, t included)

Forward: one program per (tile of BM queries of one document, query head); online softmax in the
log2 domain with fp32 statistics; rows that see no key write o = 0 and lse = -inf.
Backward (FlashAttention-2 style, no atomics): dQ per (query tile, query head); dK/dV per (key tile,
KV head) looping over the G heads of the group and the query tiles that can see the keys;
delta = rowsum(dO * O) is computed beforehand.
Packed documents: per-tile metadata (tile start, document query start / length, document key start /
count) so that no tile crosses a document boundary. Pointer offsets are int64.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._checks import doc_spans
from .._intmath import next_pow2
from ... import _triton_interpreter  # noqa: F401  (CPU interpreter fix, tests only)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _visible(t, jj, klen, STRIDE: tl.constexpr, LENGTH: tl.constexpr, WINDOW: tl.constexpr):
    kpos = jj * STRIDE + (LENGTH - 1)
    vis = (kpos[None, :] <= t[:, None]) & (jj < klen)[None, :]
    if WINDOW > 0:
        vis = vis & (kpos[None, :] > t[:, None] - WINDOW)
    return vis


@triton.jit
def _key_range(t_first, t_last, klen, STRIDE: tl.constexpr, LENGTH: tl.constexpr, WINDOW: tl.constexpr,
               BN: tl.constexpr):
    """Keys [j_lo, j_hi) that queries t_first..t_last may see (j_lo rounded down to a multiple of BN)."""
    j_hi = tl.minimum(tl.maximum(t_last - (LENGTH - 1) + STRIDE, 0) // STRIDE, klen)
    if WINDOW > 0:
        j_lo = tl.maximum(t_first - WINDOW - LENGTH + 1 + STRIDE, 0) // STRIDE  # first j with pos(j) > t_first - W
        j_lo = (j_lo // BN) * BN
    else:
        j_lo = j_hi * 0
    return j_lo, j_hi


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    TILE, DOC_Q, DOC_QLEN, DOC_K, DOC_KLEN,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
    n_heads_q, n_tiles, scale_log2,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    STRIDE: tl.constexpr, LENGTH: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    tile = n_tiles - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    hq = pid_bh % n_heads_q
    hk = hq // G
    t0 = tl.load(TILE + tile)
    doc_q = tl.load(DOC_Q + tile).to(tl.int64)
    qlen = tl.load(DOC_QLEN + tile)
    doc_k = tl.load(DOC_K + tile).to(tl.int64)
    klen = tl.load(DOC_KLEN + tile)

    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    t = t0 + offs_m
    row_ok = t < qlen
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    # scalar int64 base pointers; the per-element tile offsets stay int32
    q_tile = Q + b.to(tl.int64) * stride_qb + (doc_q + t0) * stride_qt + hq * stride_qh
    q = tl.load(q_tile + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    t_last = tl.minimum(t0 + BM, qlen) - 1
    j_lo, j_hi = _key_range(t0, t_last, klen, STRIDE, LENGTH, WINDOW, BN)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh

    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        jj = j0 + offs_n
        k_ok = jj < j_hi
        k = tl.load(k_base + (doc_k + j0) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=k_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(v_base + (doc_k + j0) * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :],
                    mask=k_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s = tl.where(_visible(t, jj, j_hi, STRIDE, LENGTH, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    has = l_i > 0
    safe_l = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / safe_l[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
    o_tile = O + b.to(tl.int64) * stride_ob + (doc_q + t0) * stride_ot + hq * stride_oh
    tl.store(o_tile + offs_m[:, None] * stride_ot + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    l_tile = LSE + b.to(tl.int64) * stride_lb + (doc_q + t0) * stride_lt + hq * stride_lh
    tl.store(l_tile + offs_m * stride_lt, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    TILE, DOC_Q, DOC_QLEN, DOC_K, DOC_KLEN,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
    n_heads_q, n_tiles, scale, scale_log2,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    STRIDE: tl.constexpr, LENGTH: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """DO and DQ share the strides of O and Q; DELTA shares the strides of LSE."""
    tile = n_tiles - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_q
    hq = pid_bh % n_heads_q
    hk = hq // G
    t0 = tl.load(TILE + tile)
    doc_q = tl.load(DOC_Q + tile).to(tl.int64)
    qlen = tl.load(DOC_QLEN + tile)
    doc_k = tl.load(DOC_K + tile).to(tl.int64)
    klen = tl.load(DOC_KLEN + tile)

    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    t = t0 + offs_m
    row_ok = t < qlen
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q_off = b.to(tl.int64) * stride_qb + (doc_q + t0) * stride_qt + hq * stride_qh  # also DQ's
    o_off = b.to(tl.int64) * stride_ob + (doc_q + t0) * stride_ot + hq * stride_oh
    l_off = b.to(tl.int64) * stride_lb + (doc_q + t0) * stride_lt + hq * stride_lh
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + o_off + offs_m[:, None] * stride_ot + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse = tl.load(LSE + l_off + offs_m * stride_lt, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + l_off + offs_m * stride_lt, mask=row_ok, other=0.0)
    t_last = tl.minimum(t0 + BM, qlen) - 1
    j_lo, j_hi = _key_range(t0, t_last, klen, STRIDE, LENGTH, WINDOW, BN)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh

    dq = tl.zeros([BM, BD], tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        jj = j0 + offs_n
        k_ok = jj < j_hi
        k = tl.load(k_base + (doc_k + j0) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=k_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(v_base + (doc_k + j0) * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :],
                    mask=k_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s = tl.where(_visible(t, jj, j_hi, STRIDE, LENGTH, WINDOW), s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])  # 0 where invisible or where the row sees nothing (lse2 = +inf)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(DQ + q_off + offs_m[:, None] * stride_qt + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
    TILE, DOC_Q, DOC_QLEN, DOC_K, DOC_KLEN,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, stride_lh,
    n_heads_kv, n_tiles, scale, scale_log2,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    STRIDE: tl.constexpr, LENGTH: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    SEG: tl.constexpr, ATOMIC: tl.constexpr,
):
    """One program = BN keys of one KV head x one segment of SEG queries (program_id 2; SEG = 0: all).

    DK / DV_OUT share the strides of K / V; with ATOMIC they are zeroed float32 buffers that the
    segments of a key tile add into (fp32 atomics), else the program stores its tile directly.
    TILE = key tile start."""
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    seg = tl.program_id(2)
    b = pid_bh // n_heads_kv
    hk = pid_bh % n_heads_kv
    j0 = tl.load(TILE + tile)
    doc_q = tl.load(DOC_Q + tile).to(tl.int64)
    qlen = tl.load(DOC_QLEN + tile)
    doc_k = tl.load(DOC_K + tile).to(tl.int64)
    klen = tl.load(DOC_KLEN + tile)

    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    jj = j0 + offs_n
    k_ok = jj < klen
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k_mask = k_ok[:, None] & (offs_d < D)[None, :]
    v_mask = k_ok[:, None] & (offs_dv < DV)[None, :]
    k_off = b.to(tl.int64) * stride_kb + (doc_k + j0) * stride_kt + hk * stride_kh  # also DK's
    v_off = b.to(tl.int64) * stride_vb + (doc_k + j0) * stride_vt + hk * stride_vh  # also DV_OUT's
    k = tl.load(K + k_off + offs_n[:, None] * stride_kt + offs_d[None, :], mask=k_mask, other=0.0)
    v = tl.load(V + v_off + offs_n[:, None] * stride_vt + offs_dv[None, :], mask=v_mask, other=0.0)
    t_lo = j0 * STRIDE + LENGTH - 1  # first query that sees the first key of the tile
    t_hi = qlen
    if WINDOW > 0:
        t_hi = tl.minimum(qlen, (tl.minimum(j0 + BN, klen) - 1) * STRIDE + LENGTH - 1 + WINDOW)
    t_lo = (t_lo // BM) * BM
    if SEG > 0:  # this program's share of the queries
        t_lo = t_lo + seg * SEG
        t_hi = tl.minimum(t_hi, t_lo + SEG)

    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    for g in range(G):
        hq = hk * G + g
        q_head = Q + b.to(tl.int64) * stride_qb + hq * stride_qh
        o_head = DO + b.to(tl.int64) * stride_ob + hq * stride_oh
        l_head = b.to(tl.int64) * stride_lb + hq * stride_lh
        for t0 in range(t_lo, t_hi, BM):
            t = t0 + offs_m
            row_ok = t < qlen
            t0_64 = doc_q + t0  # int64 row of the tile start
            q = tl.load(q_head + t0_64 * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            do = tl.load(o_head + t0_64 * stride_ot + offs_m[:, None] * stride_ot + offs_dv[None, :],
                         mask=row_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
            lse = tl.load(LSE + l_head + t0_64 * stride_lt + offs_m * stride_lt, mask=row_ok, other=float("-inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + l_head + t0_64 * stride_lt + offs_m * stride_lt, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            vis = _visible(t, jj, klen, STRIDE, LENGTH, WINDOW) & row_ok[:, None]
            p = tl.exp2(tl.where(vis, s, float("-inf")) - lse2[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    if ATOMIC:
        if t_lo < t_hi:  # segments past the last query add nothing
            tl.atomic_add(DK + k_off + offs_n[:, None] * stride_kt + offs_d[None, :], dk * scale, mask=k_mask)
            tl.atomic_add(DV_OUT + v_off + offs_n[:, None] * stride_vt + offs_dv[None, :], dv, mask=v_mask)
    else:
        tl.store(DK + k_off + offs_n[:, None] * stride_kt + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=k_mask)
        tl.store(DV_OUT + v_off + offs_n[:, None] * stride_vt + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=v_mask)


def _documents(seqlen, n_keys, cu_seqlens, key_cu_seqlens):
    """[(q_start, q_len, k_start, k_len)] of each document."""
    if cu_seqlens is None:
        return [(0, seqlen, 0, n_keys)]
    kcu = key_cu_seqlens.tolist()
    return [(s, e - s, ks, ke - ks) for (s, e), ks, ke in zip(doc_spans(cu_seqlens), kcu[:-1], kcu[1:])]


@functools.lru_cache(maxsize=64)
def _tiles(docs: tuple, block: int, over_keys: bool, device):
    """Per-tile metadata (start, doc q start, doc q len, doc key start, doc key count) int32 of each query
    (or key) tile. Cached per layout: read-only kernel inputs whose host-to-device copy would wait for the
    device on every call."""
    cols = [[], [], [], [], []]
    for qs, ql, ks, kl in docs:
        for start in range(0, kl if over_keys else ql, block):
            for col, val in zip(cols, (start, qs, ql, ks, kl)):
                col.append(val)
    if not cols[0]:  # no key at all (every document shorter than one window): one empty tile
        cols = [[0], [0], [0], [0], [0]]
    return tuple(torch.tensor(c, dtype=torch.int32, device=device) for c in cols)


# (BM, BN, num_warps, num_stages) per kernel on the GPU; the benchmark may try others.
GPU_CONFIG = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkv": (128, 64, 8, 2)}
# (query tile x head) steps per dK/dV program before its queries are split into segments that add into
# fp32 buffers with atomics. Off by default: on the H100 the split measured no faster at 64K
# (G=4: 42.1 vs 42.1 ms, G=1: 41.7 vs 37.7 ms without it) and it makes dK/dV non-deterministic.
DKV_ITERATIONS = 10**9
FORCE_SPLIT_ON_CPU = False  # tests: exercise the split + atomics path in the interpreter
GPU_CONFIG_WIDE = {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 2), "dkv": (32, 32, 4, 2)}  # head dims > 128


def _config(q, head_dim, dv, kernel: str):
    block_d, block_dv = max(16, next_pow2(head_dim)), max(16, next_pow2(dv))
    if not q.is_cuda:  # CPU interpreter: few large tiles
        return dict(BM=64, BN=64, BD=block_d, BDV=block_dv), dict(num_warps=4, num_stages=1)
    table = GPU_CONFIG_WIDE if max(block_d, block_dv) > 128 else GPU_CONFIG
    bm, bn, warps, stages = table[kernel]
    return dict(BM=bm, BN=bn, BD=block_d, BDV=block_dv), dict(num_warps=warps, num_stages=stages)


def _common(q, k, v, o_like, lse_like):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o_like.stride(0), o_like.stride(1), o_like.stride(2),
            lse_like.stride(0), lse_like.stride(1), lse_like.stride(2))


def attention_fwd(q, k, v, *, scale, stride, length, window, cu_seqlens=None, key_cu_seqlens=None):
    batch, seqlen, n_heads_q, head_dim = q.shape
    n_keys, n_heads_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = n_heads_q // n_heads_kv
    out = torch.full((batch, seqlen, n_heads_q, dv), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((batch, seqlen, n_heads_q), float("nan"), dtype=torch.float32, device=q.device)
    if n_keys == 0:  # nothing to attend to: keep the kernel away from empty tensors
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    meta, launch = _config(q, head_dim, dv, "fwd")
    docs = _documents(seqlen, n_keys, cu_seqlens, key_cu_seqlens)
    tiles = _tiles(tuple(docs), meta["BM"], False, q.device)
    n_tiles = tiles[0].numel()
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _fwd_kernel[(n_tiles, batch * n_heads_q)](
        q, k, v, out, lse, *tiles, *_common(q, k, v, out, lse),
        n_heads_q, n_tiles, scale * LOG2E,
        G=group, D=head_dim, DV=dv, STRIDE=stride, LENGTH=length, WINDOW=window, DOT_PREC=dot_prec,
        **meta, **launch,
    )
    return out, lse


def attention_bwd(q, k, v, out, lse, dout, *, scale, stride, length, window, cu_seqlens=None,
                  key_cu_seqlens=None):
    batch, seqlen, n_heads_q, head_dim = q.shape
    n_keys, n_heads_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = n_heads_q // n_heads_kv
    if n_keys == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # q, dq, dout, out share the [B, T, H, D] contiguous layout, delta and lse the [B, T, H] one
    q, k, v, lse = q.contiguous(), k.contiguous(), v.contiguous(), lse.contiguous()
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, T, Hq]
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dvv = torch.full_like(v, float("nan"))
    docs = _documents(seqlen, n_keys, cu_seqlens, key_cu_seqlens)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    consts = dict(G=group, D=head_dim, DV=dv, STRIDE=stride, LENGTH=length, WINDOW=window, DOT_PREC=dot_prec)
    meta, launch = _config(q, head_dim, dv, "dq")
    tiles = _tiles(tuple(docs), meta["BM"], False, q.device)
    n_tiles = tiles[0].numel()
    _bwd_dq_kernel[(n_tiles, batch * n_heads_q)](
        q, k, v, dout, lse, delta, dq, *tiles, *_common(q, k, v, dout, lse),
        n_heads_q, n_tiles, scale, scale * LOG2E, **consts, **meta, **launch,
    )
    meta, launch = _config(q, head_dim, dv, "dkv")
    ktiles = _tiles(tuple(docs), meta["BN"], True, q.device)
    n_ktiles = ktiles[0].numel()
    # Split the queries of each key tile into segments of about DKV_ITERATIONS (query tile, head) steps
    # when a tile sees many queries (compressed keys: the first tile sees the whole sequence), so that
    # no program walks the whole sequence; the segments then add into fp32 buffers with atomics.
    q_range = max(ql for _, ql, _, _ in docs)
    if window > 0:
        q_range = min(q_range, window + meta["BN"] * stride + meta["BM"])
    seg = meta["BM"] * max(1, DKV_ITERATIONS // group)
    n_seg = -(-q_range // seg)
    atomic = n_seg > 1 and (q.is_cuda or FORCE_SPLIT_ON_CPU)
    if not atomic:
        seg, n_seg = 0, 1
    dk_buf = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if atomic else dk
    dv_buf = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if atomic else dvv
    _bwd_dkv_kernel[(n_ktiles, batch * n_heads_kv, n_seg)](
        q, k, v, dout, lse, delta, dk_buf, dv_buf, *ktiles, *_common(q, k, v, dout, lse),
        n_heads_kv, n_ktiles, scale, scale * LOG2E, **consts, SEG=seg, ATOMIC=atomic, **meta, **launch,
    )
    if atomic:
        dk, dvv = dk_buf.to(k.dtype), dv_buf.to(v.dtype)
    return dq, dk, dvv


class PositionalAttention(torch.autograd.Function):
    """(o, lse) = attention with key j at position j*stride + length - 1 (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, stride, length, window, cu_seqlens, key_cu_seqlens):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        out, lse = attention_fwd(q, k, v, scale=scale, stride=stride, length=length, window=window,
                                 cu_seqlens=cu_seqlens, key_cu_seqlens=key_cu_seqlens)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = dict(scale=scale, stride=stride, length=length, window=window, cu_seqlens=cu_seqlens,
                        key_cu_seqlens=key_cu_seqlens)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(q, k, v, out, lse, dout, **ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def positional_attention_triton(q, k, v, *, scale, stride, length, window=0, cu_seqlens=None, key_cu_seqlens=None):
    return PositionalAttention.apply(q, k, v, scale, stride, length, window, cu_seqlens, key_cu_seqlens)
