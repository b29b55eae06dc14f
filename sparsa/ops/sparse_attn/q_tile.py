"""Query-tile forward (third loop order, `loop_order="q_tile"`; automatic for small problems, locality.py): one program per (TOKENS consecutive
tokens, KV head), rows = those tokens x their G heads, walking the *union* of the tokens' selected blocks.

The rows' selections are sorted (sparse_attention_triton sorts every row), so the union is a merge of sorted
lists: each step takes the smallest block any row still has to visit (global block ids, so tiles across
packed documents merge correctly), loads its K and V once, and updates the online softmax of exactly the
rows that selected it (a repeated block is used once: `last` remembers each row's previous block). Nothing
is gathered and no partials are written: a loaded block serves every row of the tile that chose it.

It pays when adjacent tokens share blocks, as real `select_blocks` selections do (scripts/real_activations.py:
SmolLM2, block 16, top-16, 64-token tiles visit 41-49 distinct blocks against 129 for random selections);
for random selections the union is nearly TOKENS x topk blocks and the MMAs mostly compute masked rows.
By default (UNION_LIST) the union is first written per (tile, KV head) by _tile_union_kernel and the forward
runs a counted loop over it, which Triton pipelines (8-14% faster on the H100, session 19); the single-pass
merge kernel is kept for the A/B. On Hopper the list forward loads K and V by TMA (`list_tma`, 8-16% faster on
the H100, session 21). Its backward (q_tile_backward.py) works over the same tile unions: dQ per
tile, dK/dV per block over the tiles that chose it, again without per-pair traffic (used for small problems;
larger ones take the KV-outer backward, triton_ops.q_tile_backward_order).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ... import _triton_interpreter  # noqa: F401  (interpreter patch: run-time loop bounds)
from .._alloc import new_output
from .._env import env_choice
from .kv_outer import reduce_config
from .q_outer import LOG2E, _pow2, attend_block, attend_loaded, precision_for, store_rows
from .q_outer import row_descriptor as _row_descriptor

# rows (tokens x G heads) of one program at head dim 128 (scaled like the reductions for other head dims)
TILE_ROWS = 64
# the forward over precomputed tile unions (a pipelined counted loop) instead of the single-pass merge
UNION_LIST = True
# warps and pipeline stages of the union-list forward (None: tile_config's, list_stages'); A/B knobs
# (scripts/locality_bench.py --tiles). Two stages take 82 KB of shared memory at block 64, head dim 128 (sm_90
# build), so two programs fit an SM; three take 115 KB, one program per SM.
LIST_WARPS = None
LIST_STAGES = None
# K and V of the union-list forward by TMA (`list_tma`): on by default on Hopper and later GPUs (8K-64K forwards
# 8-16% faster on the H100, session 21); SPARSA_Q_TILE_TMA=0 / 1 forces it off / on
# q_outer_tma's automatic use (the query-outer kernel with K / V by TMA instead of the one-token tiles) and the group
# sizes it covers: measured on the H100 at G = 8 and 16 (session 29, q_outer.TMA_CONFIG), faster than the one-token
# tiles and the pointer kernel at every size (8K-128K)
Q_OUTER_TMA_AUTO = True
Q_OUTER_TMA_GROUPS = (8, 16)
# one_token_tile's automatic use from this many tokens (the smallest measured size was 8K)
ONE_TOKEN_MIN_TOKENS = 2048
# With gradients too, at every size: session 26 limited them to 64K tokens from single-sample medians at 128K;
# session 27 (H100, benchmarks/results/h100_session27/) found the same backward kernel times after either forward
# and forward+backward 0.3 ms faster on average with the tiles at 96K / 128K (medians over 7+ calls, 6 of 8 rounds).
# in the kernels, 2**62 is a global block id larger than any real one: "this row has no block left"


@triton.jit
def _next_block(IDX, t, h, ptr, own, base, rmask, Hkv, TOPK: tl.constexpr):
    """[R] global id of the block at slot ptr of each row, or _DONE when the row has no visible block left
    (slots are ascending after the -1 padding, so the first block past the token's own ends the row)."""
    c = tl.load(IDX + (t * Hkv + h) * TOPK + ptr, mask=rmask & (ptr < TOPK), other=-1).to(tl.int64)
    ok = rmask & (ptr < TOPK) & (c >= 0) & (c <= own)
    return tl.where(ok, base + c, 2**62)


@triton.jit
def _tile_layout(DOCSTART, BLOCKBASE, N, TOKENS: tl.constexpr):
    """Scalars of the program's tile: last token t1, whether the tile lies in one document, that document's
    start and the global id of its block 0."""
    t0 = tl.program_id(0).to(tl.int64) * TOKENS
    t1 = tl.minimum(t0 + TOKENS, N) - 1
    ds0 = tl.load(DOCSTART + t0)
    return t1, ds0 == tl.load(DOCSTART + t1), ds0, tl.load(BLOCKBASE + t0)


@triton.jit
def _block_keys(BLKSTART, BLKLEN, b, t1, one_doc, ds0, base0, BS, BLOCK_N: tl.constexpr):
    """Key positions [BLOCK_N], mask and first key of global block b. In a one-document tile they follow from the
    document start (no dependent load in the block loop; keys after the tile's last token are never visible,
    so the block's length is not needed), else from the block table."""
    offs_n = tl.arange(0, BLOCK_N)
    kst = tl.where(one_doc, ds0 + (b - base0) * BS, tl.load(BLKSTART + b, mask=~one_doc, other=0))
    blen = tl.where(one_doc, BS, tl.load(BLKLEN + b, mask=~one_doc, other=0))
    kpos = kst + offs_n
    return kpos, (offs_n < blen) & (kpos <= t1), kst


@triton.jit
def _q_tile_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    IDX,
    DOCSTART,
    BLOCKBASE,
    BLKSTART,
    BLKLEN,
    qk_scale,
    N,
    Hq,
    Hkv,
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
):
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t, rmask, orow, base, own = _tile_tokens(DOCSTART, BLOCKBASE, tile, h, N, Hq, BS, G, BLOCK_R, TOKENS)
    t1, one_doc, ds0, base0 = _tile_layout(DOCSTART, BLOCKBASE, N, TOKENS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    q = tl.load(Q + orow[:, None] * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
    sel = tl.load(
        IDX + (t * Hkv + h)[:, None] * TOPK + offs_k[None, :], mask=rmask[:, None] & (offs_k < TOPK)[None, :], other=0
    )
    ptr = tl.sum((sel < 0).to(tl.int32), 1)  # [R] first slot after the -1 padding
    cur = _next_block(IDX, t, h, ptr, own, base, rmask, Hkv, TOPK)
    last = tl.full([BLOCK_R], -1, dtype=tl.int64)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    b = tl.min(cur, 0)
    while b < 2**62:
        at_b = cur == b
        use = at_b & (last != b)
        # the next step's blocks are known now: issue their gather before this block's loads and MMAs
        last = tl.where(at_b, b, last)
        ptr = ptr + at_b.to(tl.int32)
        cur = _next_block(IDX, t, h, ptr, own, base, rmask, Hkv, TOPK)
        kpos, kmask, _ = _block_keys(BLKSTART, BLKLEN, b, t1, one_doc, ds0, base0, BS, BLOCK_N)
        score_mask = use[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
        m_i, l_i, acc = attend_block(
            q, K, V, kpos, kmask, h, Hkv, score_mask, m_i, l_i, acc, qk_scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION
        )
        b = tl.min(cur, 0)
    store_rows(O, LSE, orow, rmask, acc, m_i, l_i, DV, BLOCK_DV)


@triton.jit
def _tile_tokens(DOCSTART, BLOCKBASE, tile, h, N, Hq, BS, G: tl.constexpr, BLOCK_R: tl.constexpr,
                 TOKENS: tl.constexpr):
    """Rows of one tile (TOKENS tokens x G heads of KV head h): token, mask, row index, global id of the token's
    document block 0 and the token's own local block."""
    offs_r = tl.arange(0, BLOCK_R)
    t = tile * TOKENS + offs_r // G
    rmask = (offs_r // G < TOKENS) & (t < N)
    base = tl.load(BLOCKBASE + t, mask=rmask, other=0)
    own = (t - tl.load(DOCSTART + t, mask=rmask, other=0)) // BS
    return t, rmask, t * Hq + h * G + offs_r % G, base, own


@triton.jit
def _tile_selection(IDX, t, h, rmask, Hkv, TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
    """[R, BLOCK_K] int32: the selections of the rows' tokens (-1 for padding and masked rows)."""
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(
        IDX + (t * Hkv + h)[:, None] * TOPK + offs_k[None, :], mask=rmask[:, None] & (offs_k < TOPK)[None, :], other=-1
    )


@triton.jit
def _rows_choosing(sel, c, own, rmask):
    """[R] bool: rows whose selection sel [R, K] holds the local block c [R], at or before their own block."""
    return rmask & (tl.max((sel == c[:, None]).to(tl.int32), 1) > 0) & (c >= 0) & (c <= own)


@triton.jit
def _q_tile_list_fwd_kernel(
    Q, K, V, KD, VD, O, LSE, IDX, DOCSTART, BLOCKBASE, BLKSTART, BLKLEN, UNION, COUNT, qk_scale, N, Hq, Hkv, BS,
    TOPK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr,
    TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr, MAXU: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """The forward over the tile's precomputed union list (UNION, COUNT from _tile_union_kernel): a counted
    loop whose K / V loads Triton software-pipelines (num_stages), where _q_tile_fwd_kernel's merge is a
    `while` loop that it does not. The rows' selections stay in registers; a row uses block b when b's local
    index is in its selection, at or before its own block (the union is distinct: each block once per row)."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t, rmask, orow, base, own = _tile_tokens(DOCSTART, BLOCKBASE, tile, h, N, Hq, BS, G, BLOCK_R, TOKENS)
    own = own.to(tl.int32)  # int32 compares against the selection (fewer registers)
    t1, one_doc, ds0, base0 = _tile_layout(DOCSTART, BLOCKBASE, N, TOKENS)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + orow[:, None] * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
    sel = _tile_selection(IDX, t, h, rmask, Hkv, TOPK, BLOCK_K)  # [R, K], kept in registers
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    union = UNION + (tile * Hkv + h) * MAXU
    for i in range(tl.load(COUNT + tile * Hkv + h)):
        b = tl.load(union + i).to(tl.int64)
        use = _rows_choosing(sel, (b - base).to(tl.int32), own, rmask)  # b's local index in each row's document
        kpos, kmask, kst = _block_keys(BLKSTART, BLKLEN, b, t1, one_doc, ds0, base0, BS, BLOCK_N)
        score_mask = use[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
        if TMA:  # the block's BLOCK_N rows by TMA (rows past N read as 0; masked rows are real, finite rows)
            k = KD.load([kst.to(tl.int32), (h * D).to(tl.int32)])
            vv = VD.load([kst.to(tl.int32), (h * DV).to(tl.int32)])
            m_i, l_i, acc = attend_loaded(q, k, vv, score_mask, m_i, l_i, acc, qk_scale, PRECISION)
        else:
            m_i, l_i, acc = attend_block(
                q, K, V, kpos, kmask, h, Hkv, score_mask, m_i, l_i, acc, qk_scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION
            )
    store_rows(O, LSE, orow, rmask, acc, m_i, l_i, DV, BLOCK_DV)


@triton.jit
def _tile_union_kernel(IDX, DOCSTART, BLOCKBASE, UNION, COUNT, N, Hkv, BS, TOPK: tl.constexpr,
                       TOKENS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MAXU: tl.constexpr):
    """UNION[tile, h, :COUNT] = the ascending distinct global blocks of the tile's TOKENS tokens (one row each)."""
    tile = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tile * TOKENS + tl.arange(0, BLOCK_T)
    rmask = (tl.arange(0, BLOCK_T) < TOKENS) & (t < N)
    base = tl.load(BLOCKBASE + t, mask=rmask, other=0)
    own = (t - tl.load(DOCSTART + t, mask=rmask, other=0)) // BS
    offs_k = tl.arange(0, BLOCK_K)
    sel = tl.load(
        IDX + (t * Hkv + h)[:, None] * TOPK + offs_k[None, :], mask=rmask[:, None] & (offs_k < TOPK)[None, :], other=0
    )
    ptr = tl.sum((sel < 0).to(tl.int32), 1)
    cur = _next_block(IDX, t, h, ptr, own, base, rmask, Hkv, TOPK)
    out = UNION + (tile * Hkv + h) * MAXU
    n = 0
    b = tl.min(cur, 0)
    while b < 2**62:
        tl.store(out + n, b.to(tl.int32))
        n += 1
        ptr = ptr + (cur == b).to(tl.int32)
        cur = _next_block(IDX, t, h, ptr, own, base, rmask, Hkv, TOPK)
        # a block repeated in a row is already in the list: advance past it without a second entry
        nb = tl.min(cur, 0)
        while nb == b:
            ptr = ptr + (cur == b).to(tl.int32)
            cur = _next_block(IDX, t, h, ptr, own, base, rmask, Hkv, TOPK)
            nb = tl.min(cur, 0)
        b = nb
    tl.store(COUNT + tile * Hkv + h, n)


def tile_config(group: int, head_dim: int):
    """(BLOCK_R rows, tokens per program, num_warps): about TILE_ROWS x 128 elements per row tile; 8 warps
    above head dim 128 (compiled offline for sm_90, bf16: at head dim 256 4 warps spill 700 bytes, 8 warps
    144; none at 64 / 128 with 4)."""
    rows = max(reduce_config(group, head_dim, TILE_ROWS)[0], 16)  # tl.dot on a GPU: the backward's K >= 16
    return rows, rows // group, 8 if head_dim > 128 else 4


def list_stages(block_n: int, head_dim: int) -> int:
    """Pipeline stages of the union-list forward: 3, or 2 from blocks of 128 keys at head dim 128 (or 64 keys
    at 256), where three stages of K and V would need 192 KB of shared memory."""
    return 2 if block_n * head_dim >= 128 * 128 else 3


def tile_consts(q, k, v, idx, block_size: int, tile: tuple[int, int, int] | None = None):
    """(compile-time constants shared by the q_tile kernels, num_warps) for q [N, Hq, D], k [N, Hkv, D],
    v [N, Hkv, Dv], idx [N, Hkv, K]; `tile` (rows, tokens, warps) overrides tile_config's."""
    head_dim, head_dim_v, topk = q.shape[2], v.shape[2], idx.shape[-1]
    group = q.shape[1] // k.shape[1]
    rows, tokens, warps = tile or tile_config(group, max(head_dim, head_dim_v))
    consts = dict(
        TOPK=topk, G=group, D=head_dim, DV=head_dim_v, BLOCK_R=rows, TOKENS=tokens, BLOCK_N=_pow2(block_size),
        BLOCK_D=_pow2(head_dim), BLOCK_DV=_pow2(head_dim_v), BLOCK_K=_pow2(topk, 1), PRECISION=precision_for(q.dtype),
    )
    return consts, warps


def q_tile_forward(q, k, v, idx, meta, block_size: int, scale: float, tile: tuple[int, int, int] | None = None):
    """q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv], idx [N, Hkv, K] int32 with ascending rows (-1 first)
    -> o [N, Hq, Dv], lse [N, Hq] fp32. UNION_LIST: the tiles' unions first (_tile_union_kernel), then the
    pipelined forward over them; else the single-pass merge (_q_tile_fwd_kernel). `tile` (rows, tokens, warps)
    overrides tile_config's (one_token_tile)."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    o = new_output((n_tokens, n_heads_q, head_dim_v), q.dtype, q.device)
    lse = new_output((n_tokens, n_heads_q), torch.float32, q.device)
    consts, warps = tile_consts(q, k, v, idx, block_size, tile)
    tokens = consts["TOKENS"]
    grid = (triton.cdiv(n_tokens, tokens), n_heads_kv)
    layout = (idx, meta.tok_docstart, meta.tok_blockbase, meta.blk_start, meta.blk_len)
    if UNION_LIST:
        union, counts, maxu = tile_union(idx, meta, block_size, tokens)
        tma = list_tma(k, v)
        kd, vd = (_row_descriptor(x, consts["BLOCK_N"]) for x in (k, v)) if tma else (k, v)
        _q_tile_list_fwd_kernel[grid](
            q, k, v, kd, vd, o, lse, *layout, union, counts, scale * LOG2E, n_tokens, n_heads_q, n_heads_kv,
            block_size, MAXU=maxu, TMA=tma, num_warps=LIST_WARPS or warps,
            num_stages=LIST_STAGES or list_stages(consts["BLOCK_N"], max(consts["BLOCK_D"], consts["BLOCK_DV"])),
            **consts,
        )
    else:
        _q_tile_fwd_kernel[grid](
            q, k, v, o, lse, *layout, scale * LOG2E, n_tokens, n_heads_q, n_heads_kv, block_size, num_warps=warps,
            **consts,
        )
    return o, lse


def one_token_tile(q, k, v, block_size: int) -> tuple[int, int, int] | None:
    """The query-outer order's forward as the union-list kernel on one-token tiles (rows = the token's G heads,
    waste 1: the query-outer order's work, with TMA loads and Triton's pipelining), as (rows, tokens, warps), or
    None for the query-outer kernel. SPARSA_ONE_TOKEN_TILES=auto (default): at G = 16 where the list forward
    loads K / V by TMA, from ONE_TOKEN_MIN_TOKENS tokens (fewer: one launch instead of two), at head dims and
    blocks up to 128: on the H200 (session 22, random selections, Hq = 32, D = 128, block 64, top-16, bf16) 16 rows
    x 2 warps x 3 stages took 1.10 / 2.21 / 8.95 ms at 8K / 16K / 64K against the query-outer kernel's 1.18 / 2.32 /
    9.20; on the H100 (session 24) 1.11 / 4.52 / 9.19 at 8K / 32K / 64K against 1.18 / 4.63 / 9.23, and (session 27)
    forward+backward 0.3 ms faster on average at 96K / 128K; 1: wherever G is a power of two >= 16; 0: never."""
    choice = env_choice("SPARSA_ONE_TOKEN_TILES", ("auto", "0", "1"), "auto")
    group = q.shape[1] // k.shape[1]
    if choice == "0" or group < 16 or group != _pow2(group) or not UNION_LIST:
        return None
    if choice == "auto" and not (
        group == 16 and q.shape[0] >= ONE_TOKEN_MIN_TOKENS and max(q.shape[2], v.shape[2]) <= 128
        and block_size <= 128 and list_tma(k, v)
    ):
        return None
    return group, 1, 2 if group == 16 else 4


def q_outer_tma(q, k, v, block_size: int) -> bool:
    """Whether the query-outer order's forward runs its own kernel with K / V by TMA (no tile unions: one counted
    loop over the token's slots), ahead of one_token_tile. SPARSA_Q_OUTER_TMA=auto (default): where
    Q_OUTER_TMA_AUTO is on, for G from Q_OUTER_TMA_GROUPS[0] to [1] at head dims and blocks up to 128 where list_tma
    allows TMA; 1: wherever list_tma allows it; 0: never."""
    choice = env_choice("SPARSA_Q_OUTER_TMA", ("auto", "0", "1"), "auto")
    if choice == "0":
        return False
    group = q.shape[1] // k.shape[1]
    low, high = Q_OUTER_TMA_GROUPS
    if choice == "auto" and not (
        Q_OUTER_TMA_AUTO and low <= group <= high and max(q.shape[2], v.shape[2]) <= 128 and block_size <= 128
    ):
        return False
    return list_tma(k, v)


def list_tma(k, v) -> bool:
    """Whether the union-list forward loads k [N, Hkv, D] and v [N, Hkv, Dv] by TMA: by default on CUDA devices
    of compute capability 9 or more for 16-bit inputs whose rows are at most 256 bytes (what the GPU tests and
    the H100 timings covered: bf16 / fp16, head dims up to 128); SPARSA_Q_TILE_TMA=1 also elsewhere on CUDA, in
    the interpreter and for other dtypes and widths, 0 never. Always: head dims that are their own block widths
    (powers of two from 16) and rows of [N, Hkv * D] 16-byte aligned."""
    choice = env_choice("SPARSA_Q_TILE_TMA", ("0", "1", "auto"), "auto")
    if choice == "0" or not (k.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    if choice == "auto" and not (
        k.is_cuda
        and torch.cuda.get_device_capability(k.device)[0] >= 9
        and all(x.element_size() == 2 and x.shape[2] * 2 <= 256 for x in (k, v))
    ):
        return False
    return all(
        x.shape[2] == _pow2(x.shape[2]) and x.is_contiguous() and x.data_ptr() % 16 == 0
        and x.shape[1] * x.shape[2] * x.element_size() % 16 == 0
        for x in (k, v)
    )


def tile_union(idx, meta, block_size: int, tokens: int):
    """(union [tiles, Hkv, MAXU] int32 global block ids, counts [tiles, Hkv] int32, MAXU)."""
    n_tokens, n_heads_kv, topk = idx.shape
    n_tiles = triton.cdiv(n_tokens, tokens)
    maxu = tokens * topk
    union = torch.empty(n_tiles, n_heads_kv, maxu, dtype=torch.int32, device=idx.device)
    counts = torch.empty(n_tiles, n_heads_kv, dtype=torch.int32, device=idx.device)
    _tile_union_kernel[(n_tiles, n_heads_kv)](
        idx, meta.tok_docstart, meta.tok_blockbase, union, counts, n_tokens, n_heads_kv, block_size,
        TOPK=topk, TOKENS=tokens, BLOCK_T=_pow2(tokens, 1), BLOCK_K=_pow2(topk, 1), MAXU=maxu,
    )
    return union, counts, maxu
