"""Backward of the query-tile forward (loop_order="q_tile"): no per-pair traffic, like the forward.

UNION  per (tile, KV head): the distinct global blocks the tile's tokens selected, in ascending order (the
       forward's merge of the sorted rows, without MMAs) -> union lists [tiles, Hkv, TOKENS * topk] + counts.
DQ     per (tile, KV head), over its union: recompute P = exp2(S - lse2) on the rows that chose the block,
       dP = dO V^T, dS = P (dP - delta), dq += dS K; written once per row (no partials, no reduction).
DKDV   the union entries sorted by (KV head, block) give each block the tiles that chose it (a CSR, as the
       pair index of index.py but over (tile, block) entries: ~TOKENS x fewer than pairs on real selections);
       one program per work item of a block: dK += dS^T Q, dV += P^T dO over those tiles' contiguous rows.
       Hot blocks (block 0: every tile) are cut into items whose fp32 partials SPLIT_REDUCE sums in a fixed
       order (backward.py's machinery); the partial buffer is sized exactly, after one host synchronisation.
       Deterministic, no atomics.
A row uses block b when its token's (sorted) selection holds b's local index, b is at or before its own
block, and the key is at or before the token (rows of a tile may belong to different packed documents).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton_interpreter  # noqa: F401  (interpreter patch: run-time loop bounds)
from .._alloc import new_output
from .backward import _bwd_block, _split_reduce_kernel, _store_dkdv, _work_item, compute_delta, dkdv_rows_step
from .index import PairIndex, key_dtype, sort_groups, split_work_list
from .q_outer import LOG2E
from .q_tile import (
    _block_keys, _row_descriptor, _rows_choosing, _tile_layout, _tile_selection, _tile_tokens, list_tma, tile_consts,
    tile_union,
)

# union entries (tiles) per dK/dV work item: only blocks chosen by more tiles (block 0 is in every tile's union)
# are cut into items, whose fp32 partial dK/dV (64 KB each at block 64, head dim 128) SPLIT_REDUCE sums
TILES_PER_ITEM = 256
# warps of the dQ and dK/dV kernels: compiled offline for sm_90 (bf16, head dim 128, block 64, 64-row tiles)
# 4 warps spill ~250 bytes in dK/dV, 8 warps 0-16
BWD_WARPS = 8
# K / V of the dQ kernel by TMA where list_tma allows: opt-in (H200, session 22, pooled P = 20, D = 128: the dQ kernel
# 8% faster at 64K G = 4, q_tile's own backward 2-3%; not timed at the small head-dim-64 shapes where that backward is the default)
DQ_TMA = False


@triton.jit
def _rows_using(IDX, t, h, rmask, b, base, own, Hkv, TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
    """[R] bool: the row's token selected global block b (its selection loaded here, see _rows_choosing)."""
    return _rows_choosing(_tile_selection(IDX, t, h, rmask, Hkv, TOPK, BLOCK_K), b - base, own, rmask)


@triton.jit
def _row_data(Q, DO, LSE, DELTA, row, mask, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr):
    """Q, dO, log2 LSE and delta of the rows under `mask` (masked rows move no data)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + row[:, None] * D + offs_d[None, :], mask=mask[:, None] & (offs_d < D)[None, :], other=0.0)
    do = tl.load(DO + row[:, None] * DV + offs_dv[None, :], mask=mask[:, None] & (offs_dv < DV)[None, :], other=0.0)
    lse2 = tl.load(LSE + row, mask=mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=mask, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _tile_dq_kernel(
    Q, K, V, KD, VD, DO, LSE, DELTA, DQ, IDX, DOCSTART, BLOCKBASE, BLKSTART, BLKLEN, UNION, COUNT, scale, qk_scale,
    N, Hq, Hkv, BS,
    TOPK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr, MAXU: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """dQ of one (tile, KV head) over the tile's union: per block S and dP recomputed for the rows that chose
    it, dq += dS K; written once. TMA: K and V boxes by the descriptors KD, VD (as q_tile's list forward; rows past
    the block are real rows whose P and dS are 0, rows past N read as 0)."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t, rmask, row, base, own = _tile_tokens(DOCSTART, BLOCKBASE, tile, h, N, Hq, BS, G, BLOCK_R, TOKENS)
    q, do, lse2, delta = _row_data(Q, DO, LSE, DELTA, row, rmask, D, DV, BLOCK_D, BLOCK_DV)
    t1, one_doc, ds0, base0 = _tile_layout(DOCSTART, BLOCKBASE, N, TOKENS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    union = UNION + (tile * Hkv + h) * MAXU
    for i in range(tl.load(COUNT + tile * Hkv + h)):
        b = tl.load(union + i).to(tl.int64)
        use = _rows_using(IDX, t, h, rmask, b, base, own, Hkv, TOPK, BLOCK_K)
        kpos, kmask, kst = _block_keys(BLKSTART, BLKLEN, b, t1, one_doc, ds0, base0, BS, BLOCK_N)
        if TMA:
            k = KD.load([kst.to(tl.int32), (h * D).to(tl.int32)])
            vv = VD.load([kst.to(tl.int32), (h * DV).to(tl.int32)])
        else:
            k = tl.load(K + (kpos * Hkv + h)[:, None] * D + offs_d[None, :],
                        mask=kmask[:, None] & (offs_d < D)[None, :], other=0.0)
            vv = tl.load(V + (kpos * Hkv + h)[:, None] * DV + offs_dv[None, :],
                         mask=kmask[:, None] & (offs_dv < DV)[None, :], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = use[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
        p = tl.exp2(tl.where(ok, sc - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(vv), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=rmask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _tile_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVv, DKP, DVP, WORK, TILES, IDX, DOCSTART, BLOCKBASE, BLKSTART, BLKLEN,
    scale, qk_scale, N, Hq, Hkv, NBG, BS,
    TOPK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    start, end, grp, slot = _work_item(WORK, tl.program_id(0).to(tl.int64))
    if start >= end:
        return
    b = grp % NBG
    h, kst, blen, kpos, kmask, k, vv = _bwd_block(K, V, BLKSTART, BLKLEN, grp, Hkv, NBG, 0, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for e in range(start, end):
        tile = tl.load(TILES + e).to(tl.int64)
        t, rmask, row, base, own = _tile_tokens(DOCSTART, BLOCKBASE, tile, h, N, Hq, BS, G, BLOCK_R, TOKENS)
        use = _rows_using(IDX, t, h, rmask, b, base, own, Hkv, TOPK, BLOCK_K)
        # only the rows that chose the block are read: the others' loads are masked and move no data
        q, do, lse2, delta = _row_data(Q, DO, LSE, DELTA, row, use, D, DV, BLOCK_D, BLOCK_DV)
        ok = use[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
        dk, dv, _ = dkdv_rows_step(q, do, lse2, delta, k, vv, ok, dk, dv, qk_scale, PRECISION)
    _store_dkdv(DK, DVv, DKP, DVP, dk * scale, dv, slot, kpos, kmask, h, Hkv, D, DV, BLOCK_N, BLOCK_D, BLOCK_DV)


def block_tiles(union, counts, maxu: int, n_blocks: int) -> PairIndex:
    """The union entries sorted by group (KV head, global block), tiles ascending inside a group: a PairIndex
    whose `toks` are tile ids (work_list / group_split_info cut it into items)."""
    n_tiles, n_heads_kv, _ = union.shape
    n_groups = n_heads_kv * n_blocks
    step = torch.arange(maxu, device=union.device, dtype=torch.int32)
    head = torch.arange(n_heads_kv, device=union.device, dtype=torch.int64)[None, :, None]
    valid = step[None, None, :] < counts[:, :, None]
    keys = torch.where(valid, head * n_blocks + union.to(torch.int64), n_groups).to(key_dtype(n_groups)).reshape(-1)
    _, perm, group_counts, gstart = sort_groups(keys, n_groups)
    tiles = (perm // (n_heads_kv * maxu)).to(torch.int32)
    return PairIndex(0, n_heads_kv, keys.numel(), group_counts, gstart, tiles, tiles[:0])


def dq_stages(block_n: int, head_dim: int) -> int:
    """Pipeline stages of the dq kernel: 3, or 2 for blocks of 128 keys at head dims from 128 (offline build: 229440
    bytes of shared memory with 3 stages, 163904 with 2; the H100's build of a kernel that needed 230912 offline
    needed 32 KB more, over its 232448: session 16)."""
    return 2 if block_n >= 128 and head_dim >= 128 else 3


def _tile_setup(q, k, v, idx, meta, block_size: int):
    """The tiles' unions and the kernels' constants: (union, counts, maxu, consts)."""
    consts = tile_consts(q, k, v, idx, block_size)[0]
    union, counts, maxu = tile_union(idx, meta, block_size, consts["TOKENS"])
    return union, counts, maxu, consts


def _tile_dq(q, k, v, do, lse, delta, idx, meta, block_size, scale, union, counts, maxu, consts):
    """dq [N, Hq, D] by _tile_dq_kernel: one pass per (tile, KV head) over its union, written once; with DQ_TMA,
    K and V by TMA where the list forward would load them so (q_tile.list_tma)."""
    n_tokens, n_heads_q, _ = q.shape
    n_heads_kv = k.shape[1]
    dq = new_output(q.shape, q.dtype, q.device)
    tma = DQ_TMA and list_tma(k, v)
    kd, vd = (_row_descriptor(x, consts["BLOCK_N"]) for x in (k, v)) if tma else (k, v)
    _tile_dq_kernel[(union.shape[0], n_heads_kv)](
        q, k, v, kd, vd, do, lse, delta, dq, idx, meta.tok_docstart, meta.tok_blockbase, meta.blk_start, meta.blk_len,
        union, counts, scale, scale * LOG2E, n_tokens, n_heads_q, n_heads_kv, block_size,
        MAXU=maxu, TMA=tma, num_warps=BWD_WARPS,
        num_stages=dq_stages(consts["BLOCK_N"], max(consts["D"], consts["DV"])), **consts,
    )
    return dq


def q_tile_dq(q, k, v, do, lse, delta, idx, meta, block_size: int, scale: float):
    """dq alone, over the tiles' unions (the hybrid backward: dK / dV from the KV-outer kernels without dQ
    partials). Shapes as q_tile_backward; delta [N, Hq] = rowsum(dO * O) in fp32."""
    union, counts, maxu, consts = _tile_setup(q, k, v, idx, meta, block_size)
    return _tile_dq(q, k, v, do, lse, delta, idx, meta, block_size, scale, union, counts, maxu, consts)


def q_tile_backward(q, k, v, o, lse, do, idx, meta, block_size: int, scale: float):
    """dq, dk, dv of the q_tile forward. q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv], o, do [N, Hq, Dv],
    lse [N, Hq] (natural log), idx [N, Hkv, K] int32 with ascending rows."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    delta = compute_delta(o, do)
    union, counts, maxu, consts = _tile_setup(q, k, v, idx, meta, block_size)
    dq = _tile_dq(q, k, v, do, lse, delta, idx, meta, block_size, scale, union, counts, maxu, consts)
    index = block_tiles(union, counts, maxu, meta.n_blocks)
    work, _, split = split_work_list(index, TILES_PER_ITEM)
    # exact number of partial slots (one host synchronisation): work_list's host-side bound, 2 x entries /
    # TILES_PER_ITEM, assumes every tile's union could hold TOKENS x topk blocks (GBs of slots at 64K)
    n_slots = max(1, int(split[:, 0].sum()))
    block_n, block_d, block_dv = consts["BLOCK_N"], consts["BLOCK_D"], consts["BLOCK_DV"]
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dkp = torch.empty(n_slots, block_n, block_d, dtype=torch.float32, device=q.device)
    dvp = torch.empty(n_slots, block_n, block_dv, dtype=torch.float32, device=q.device)
    _tile_dkdv_kernel[(work.shape[0],)](
        q, k, v, do, lse, delta, dk, dv, dkp, dvp, work, index.toks, idx, meta.tok_docstart, meta.tok_blockbase,
        meta.blk_start, meta.blk_len, scale, scale * LOG2E, n_tokens, n_heads_q, n_heads_kv, meta.n_blocks,
        block_size, num_warps=BWD_WARPS, **consts,
    )
    _split_reduce_kernel[(split.shape[0],)](
        dk, dv, dkp, dvp, split, meta.blk_start, meta.blk_len, n_heads_kv, meta.n_blocks, 0,
        D=head_dim, DV=head_dim_v, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=4,
    )
    return dq, dk, dv
