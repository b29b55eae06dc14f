"""Fused Triton block selection: scores and top-k without storing the [T x T/block] score matrix.

One program = a tile of BM query tokens of one document x one KV head; the G query heads of the group
are stacked into the rows of the tile (row = token * GP + head, GP = next power of two >= G).

  pass 1  online log-sum-exp of q . key[i] * scale over the pooled keys visible to each row
          (skipped when the caller passes the LSE, e.g. NSA's compression branch);
  pass 2  for chunks of BC selection blocks: probabilities of the pooled keys overlapping each block
          (N_OVER strided key gathers, each one tl.dot), summed over the group, reduced onto the blocks
          ("sum" with overlap weights: SSA and NSA; "max": InfLLM-V2), packed with the block index into
          an int64 sort key (score bits << 32 | (2^31 - 1 - block)) and merged into a running top-k:
          top = sort_ascending(chunk of KP blocks); running = bitonic_merge_descending(max(running, top))
          (the bitonic top-k step: the elementwise max of a descending and an ascending list is bitonic
          and holds the KP largest of both).
  `tl_sort`: use triton's tl.sort / tl.bitonic_merge (default on GPU) or the split/join network
  below (default in the CPU interpreter, where tl.sort is very slow).
  end     the top-k block ids sorted ascending, -1 right-padded, written to [B, T, Hkv, topk].

Extra memory: the pooled keys and the output only (O(T * topk)). Ties between equal scores prefer the
lower block index (the PyTorch reference leaves ties to torch.topk).
SSA is the "sum" rule with pooled keys = block mean keys (length = stride = block_size).
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
_FORCED_KEY = tl.constexpr(0x7F800000 << 32)  # +inf score bits in the high word


@triton.jit
def _compare_swap(x, ROWS: tl.constexpr, N: tl.constexpr, J: tl.constexpr, K: tl.constexpr, DESC: tl.constexpr):
    """One bitonic compare-exchange stage on every row of x [ROWS, N]: elements i and i + J of each group
    of 2J. K > 0: direction ascending where (i & K) == 0 (sorting network); K == 0: all DESC."""
    y = tl.permute(tl.reshape(x, [ROWS, N // (2 * J), 2, J]), (0, 1, 3, 2))  # [ROWS, N/2J, J, 2]
    a, b = tl.split(y)
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    if K > 0:
        group_first = tl.arange(0, N // (2 * J)) * (2 * J)
        up = ((group_first // K) % 2 == 0)[None, :, None]
        first = tl.where(up, lo, hi)
        second = tl.where(up, hi, lo)
    elif DESC:
        first = hi
        second = lo
    else:
        first = lo
        second = hi
    y = tl.permute(tl.join(first, second), (0, 1, 3, 2))
    return tl.reshape(y, [ROWS, N])


@triton.jit
def _sort_rows_asc(x, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Bitonic sort of each row, ascending, from split/join/min/max only (fast in the CPU interpreter)."""
    for ks in tl.static_range(1, LOG_N + 1):
        for jj in tl.static_range(ks):
            x = _compare_swap(x, ROWS, N, 1 << (ks - 1 - jj), 1 << ks, False)
    return x


@triton.jit
def _merge_rows_desc(x, ROWS: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Bitonic merge of each (bitonic) row into descending order."""
    for jj in tl.static_range(LOG_N):
        x = _compare_swap(x, ROWS, N, 1 << (LOG_N - 1 - jj), 0, True)
    return x


@triton.jit
def _insert(running, key, BM: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr, TL_SORT: tl.constexpr):
    """Merge KP new keys into the running top-KP (descending): the new keys sorted ascending and the
    running list have an elementwise max that holds the top KP of both and is bitonic; one bitonic merge
    restores the descending order."""
    if TL_SORT:
        top = tl.sort(key)
        running = tl.bitonic_merge(tl.maximum(running, top), descending=True)
    else:
        top = _sort_rows_asc(key, BM, KP, LOG_KP)
        running = _merge_rows_desc(tl.maximum(running, top), BM, KP, LOG_KP)
    return running


@triton.jit
def _select_kernel(
    Q, KEYS, LSE, OUT,
    TILE_Q, DOC_Q, DOC_QLEN, DOC_K, DOC_KLEN,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_lb, stride_lt, stride_lh,
    stride_ob, stride_ot, stride_oh,
    n_heads_kv, n_tiles, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, LENGTH: tl.constexpr, STRIDE: tl.constexpr, FIRST: tl.constexpr,
    N_OVER: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    REDUCE_MAX: tl.constexpr, HAS_LSE: tl.constexpr, DOT_PREC: tl.constexpr,
    LOG_KP: tl.constexpr, TL_SORT: tl.constexpr, NSUB: tl.constexpr,
):
    ROWS: tl.constexpr = BM * GP
    RATIO: tl.constexpr = BLOCK_SIZE // STRIDE
    tile = n_tiles - 1 - tl.program_id(0)  # later (heavier) tiles first
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads_kv
    h = pid_bh % n_heads_kv
    t0 = tl.load(TILE_Q + tile)
    doc_q = tl.load(DOC_Q + tile).to(tl.int64)
    qlen = tl.load(DOC_QLEN + tile)
    doc_k = tl.load(DOC_K + tile).to(tl.int64)
    klen = tl.load(DOC_KLEN + tile)

    rows = tl.arange(0, ROWS)
    tok = rows // GP
    g = rows % GP
    t = t0 + tok  # local query position of each row
    row_ok = (t < qlen) & (g < G)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + (doc_q + t).to(tl.int64)[:, None] * stride_qt \
        + (h * G + g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    t_last = tl.minimum(t0 + BM, qlen) - 1
    k_base = KEYS + b * stride_kb + h * stride_kh

    # ---- pass 1: log2-sum-exp over the visible pooled keys of every row
    if HAS_LSE:
        lse = tl.load(LSE + b * stride_lb + (doc_q + t).to(tl.int64) * stride_lt + (h * G + g) * stride_lh,
                      mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    else:
        n_vis = tl.maximum(t_last - (LENGTH - 1) + STRIDE, 0) // STRIDE  # keys with i*STRIDE + LENGTH - 1 <= t_last
        n_vis = tl.minimum(n_vis, klen)
        m_i = tl.full([ROWS], -1.0e30, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        for k0 in range(0, n_vis, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < klen
            keys = tl.load(k_base + (doc_k + kk).to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                           mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC) * scale_log2
            vis = ((kk * STRIDE + (LENGTH - 1))[None, :] <= t[:, None]) & k_ok[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    lse2 = tl.where(row_ok, lse2, float("inf"))  # padded heads / tokens contribute nothing

    # ---- pass 2: block scores + running top-k
    tq = t0 + tl.arange(0, BM)  # [BM] local token positions
    cur = tq // BLOCK_SIZE
    n_loop = t_last // BLOCK_SIZE + 1
    running = tl.full([BM, KP], -1, tl.int64)
    for c0 in range(0, n_loop, BC):
        cc = c0 + tl.arange(0, BC)
        acc = tl.zeros([BM, BC], tl.float32)
        for u in range(N_OVER):
            ki = cc * RATIO - FIRST + u
            k_ok = (ki >= 0) & (ki < klen)
            keys = tl.load(k_base + (doc_k + ki).to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                           mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(keys), input_precision=DOT_PREC) * scale_log2
            vis = ((ki * STRIDE + (LENGTH - 1))[None, :] <= t[:, None]) & k_ok[None, :]
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
            p_group = tl.sum(tl.reshape(p, [BM, GP, BC]), 1)  # [BM, BC]
            if REDUCE_MAX:
                acc = tl.maximum(acc, p_group)
            else:
                start = (u - FIRST) * STRIDE
                weight = (tl.minimum(start + LENGTH, BLOCK_SIZE) - tl.maximum(start, 0)) / STRIDE
                acc += weight * p_group
        c2 = cc[None, :]
        forced = (c2 <= cur[:, None]) & ((c2 < INIT) | (c2 > cur[:, None] - LOCAL))
        past = c2 < cur[:, None]
        low = (2147483647 - c2).to(tl.int64)
        bits = tl.maximum(acc, 0.0).to(tl.int32, bitcast=True).to(tl.int64)
        key = tl.where(past, (bits << 32) | low, -1)
        key = tl.where(forced, _FORCED_KEY | low, key)  # +inf bits: forced blocks first
        # the chunk's NSUB sub-chunks of KP blocks enter the running top-k one after the other
        if NSUB == 1:
            running = _insert(running, key, BM, KP, LOG_KP, TL_SORT)
        elif NSUB == 2:
            part0, part1 = tl.split(tl.permute(tl.reshape(key, [BM, 2, KP]), (0, 2, 1)))
            running = _insert(running, part0, BM, KP, LOG_KP, TL_SORT)
            running = _insert(running, part1, BM, KP, LOG_KP, TL_SORT)
        else:
            quad = tl.reshape(tl.permute(tl.reshape(key, [BM, 4, KP]), (0, 2, 1)), [BM, KP, 2, 2])
            pair0, pair1 = tl.split(quad)
            part0, part1 = tl.split(pair0)
            part2, part3 = tl.split(pair1)
            running = _insert(running, part0, BM, KP, LOG_KP, TL_SORT)
            running = _insert(running, part1, BM, KP, LOG_KP, TL_SORT)
            running = _insert(running, part2, BM, KP, LOG_KP, TL_SORT)
            running = _insert(running, part3, BM, KP, LOG_KP, TL_SORT)

    slot = tl.arange(0, KP)
    running = tl.where(slot[None, :] < TOPK, running, -1)
    idx = tl.where(running >= 0, 2147483647 - (running & 2147483647), 1073741824).to(tl.int32)
    if TL_SORT:
        idx = tl.sort(idx)
    else:
        idx = _sort_rows_asc(idx, BM, KP, LOG_KP)
    idx = tl.where(idx == 1073741824, -1, idx)
    o_ptrs = OUT + b * stride_ob + (doc_q + tq).to(tl.int64)[:, None] * stride_ot + h * stride_oh + slot[None, :]
    tl.store(o_ptrs, idx, mask=(tq < qlen)[:, None] & (slot[None, :] < TOPK))


# rows = stacked (token, head) rows per program; nsub = sub-chunks of KP blocks scored per step;
# tl_sort = triton's tl.sort / tl.bitonic_merge instead of the split/join network; warps None = auto.
# Chosen by the tuning step of benchmarks/sparse_layer.py on an H100 at N = 64K (SSA + NSA selection
# time, benchmarks/results/sparse_layer_h100.md); tl.sort was slower than the split/join network there.
GPU_CONFIG = {"rows": 128, "nsub": 4, "tl_sort": False, "warps": 8}
INTERPRETER_CONFIG = {"rows": 128, "nsub": 1, "tl_sort": False, "warps": 4}
GPU_CONFIG_BY_GROUP: dict[int, dict] = {  # padded group size -> config overriding GPU_CONFIG
    8: {"rows": 128, "nsub": 1, "tl_sort": False, "warps": None},
}


def pool_keys(k: torch.Tensor, length: int, stride: int, cu_seqlens=None) -> torch.Tensor:
    """Mean of every complete window [i*stride, i*stride + length) (per document, concatenated), in k's
    dtype, without an fp32 copy of k: fp32 sums of stride-chunks, then sums of length/stride chunks.
    Same values as the references' `mean_pool` / `block_keys` up to fp32 summation order."""
    if length % stride != 0:
        from ..compress.naive import mean_pool

        return mean_pool(k, length, stride, cu_seqlens)

    def pool(x):
        batch, seqlen, n_heads, dim = x.shape
        n_win = 0 if seqlen < length else (seqlen - length) // stride + 1
        if n_win == 0:
            return x.new_zeros(batch, 0, n_heads, dim)
        n_chunks = n_win - 1 + length // stride
        chunks = x[:, : n_chunks * stride].unflatten(1, (n_chunks, stride)).sum(2, dtype=torch.float32)
        per = length // stride
        total = chunks[:, :n_win].clone()
        for j in range(1, per):
            total += chunks[:, j:j + n_win]
        return (total / length).to(x.dtype)

    if cu_seqlens is None:
        return pool(k)
    return torch.cat([pool(k[:, s:e]) for s, e in doc_spans(cu_seqlens)], dim=1)


@functools.lru_cache(maxsize=64)
def _tiles(doc_q: tuple[tuple[int, int], ...], doc_k: tuple[tuple[int, int], ...], block_m: int, device):
    """Per-tile metadata: (tile start local, doc q start, doc q len, doc key start, doc key count) int32.

    Cached per layout: the tables are read-only kernel inputs, and building them copies from host memory,
    which waits for the device (a host synchronisation per call otherwise)."""
    cols = [[], [], [], [], []]
    for (qs, ql), (ks, kl) in zip(doc_q, doc_k):
        for t0 in range(0, ql, block_m):
            for col, val in zip(cols, (t0, qs, ql, ks, kl)):
                col.append(val)
    return tuple(torch.tensor(c, dtype=torch.int32, device=device) for c in cols)


def select_blocks_triton(q, keys, *, block_size, topk, init_blocks, local_blocks, scale, length, stride,
                         reduce="sum", cu_seqlens=None, key_cu_seqlens=None, lse=None, tl_sort=None):
    """q [B, T, Hq, D]; keys [B, Nk, Hkv, D] pooled keys (key i covers [i*stride, i*stride + length) of
    its document; documents concatenated per `key_cu_seqlens`); lse [B, T, Hq] optional natural-log LSE.
    Returns [B, T, Hkv, topk] int32 (see the module docstring)."""
    batch, seqlen, n_heads_q, head_dim = q.shape
    n_heads_kv = keys.shape[2]
    group = n_heads_q // n_heads_kv
    if keys.dtype != q.dtype:
        keys = keys.to(q.dtype)
    if keys.shape[1] == 0:  # no pooled key at all: a 1-row dummy that no query sees
        keys = keys.new_zeros(batch, 1, n_heads_kv, head_dim)
    q = q if q.stride(-1) == 1 else q.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    out = torch.full((batch, seqlen, n_heads_kv, topk), -2, dtype=torch.int32, device=q.device)

    interpret = not q.is_cuda
    group_pad = next_pow2(group)
    cfg = dict(INTERPRETER_CONFIG if interpret else GPU_CONFIG_BY_GROUP.get(group_pad, GPU_CONFIG))
    block_m = max(cfg["rows"] // group_pad, 1)
    block_m = max(block_m, 16 // group_pad if group_pad < 16 else 1)
    kp = max(16, next_pow2(topk))
    block_c = kp * cfg["nsub"]  # blocks per scoring step
    block_k = 32 if interpret else 64
    block_d = max(16, next_pow2(head_dim))
    tl_sort = cfg["tl_sort"] if tl_sort is None else tl_sort
    num_warps = cfg["warps"] or (8 if block_m * group_pad > 64 else 4)

    if cu_seqlens is None:
        doc_q = [(0, seqlen)]
        n_keys = keys.shape[1]
        doc_k = [(0, n_keys)]
    else:
        doc_q = [(s, e - s) for s, e in doc_spans(cu_seqlens)]
        kcu = key_cu_seqlens.tolist()
        doc_k = [(s, e - s) for s, e in zip(kcu[:-1], kcu[1:])]
    tile_q, tile_dq, tile_ql, tile_dk, tile_kl = _tiles(tuple(doc_q), tuple(doc_k), block_m, q.device)
    n_tiles = tile_q.numel()

    first = -(-length // stride) - 1
    n_over = block_size // stride + first
    if lse is None:
        lse_arg, lse_strides, has_lse = q, (0, 0, 0), False
    else:
        lse_arg, lse_strides, has_lse = lse, lse.stride(), True
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (n_tiles, batch * n_heads_kv)
    _select_kernel[grid](
        q, keys, lse_arg, out,
        tile_q, tile_dq, tile_ql, tile_dk, tile_kl,
        q.stride(0), q.stride(1), q.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        *lse_strides,
        out.stride(0), out.stride(1), out.stride(2),
        n_heads_kv, n_tiles, scale * LOG2E,
        G=group, GP=group_pad, D=head_dim, BD=block_d,
        BM=block_m, BK=block_k, BC=block_c,
        BLOCK_SIZE=block_size, LENGTH=length, STRIDE=stride, FIRST=first,
        N_OVER=n_over, TOPK=topk, KP=kp, INIT=init_blocks, LOCAL=local_blocks,
        REDUCE_MAX=(reduce == "max"), HAS_LSE=has_lse, DOT_PREC=dot_prec,
        LOG_KP=kp.bit_length() - 1, TL_SORT=tl_sort, NSUB=cfg["nsub"],
        num_warps=num_warps, num_stages=2,
    )
    return out
