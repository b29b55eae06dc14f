"""The local blocks of the KV-outer forward in their own kernel (SPARSA_KV_LOCAL_SPLIT).

Every token of the benchmark's selections (and of `select_blocks` with its forced blocks) selects its document's
block 0, its own block and the previous one. In the KV-outer order each of those pairs costs a gathered query row,
a partial written by MAIN and read back by the merge (768 B per pair and query head at D = 128). Here one program
per (sub-tile of one block's tokens, KV head) attends its tokens to the local blocks they selected, from contiguous
query rows, with the key blocks shared by all rows: no gather and one output row instead of three partials.

  LOCAL  rows = TOKENS tokens of global block gb (all in one document, same own block) x their G heads; an online
         softmax over block 0, own - 1 and own of the document (each once), a row taking a block only when its token
         selected it (any slot: set semantics); writes o and lse (the final layout, natural log; o = 0 and
         lse = -inf for a row without a local block).
  MERGE  the KV-outer merge (kv_outer._kv_fwd_merge_kernel with INIT) starts each row from that (o, lse) and merges
         the partials of the other pairs on top; the pair index is built with skip_local (index.valid_slots), so
         MAIN computes no local pair and the merge finds pos = -1 in the local slots.

Forward only: the backward's pair index keeps the local pairs, so a forward whose inputs need gradients keeps them
too (triton_ops decides), unless WITH_GRAD (an experiment: the backward then builds its own index).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._env import env_flag
from .q_outer import LOG2E, _pow2, attend_block, precision_for, store_rows

# rows (tokens x G heads) of one program at head dims <= 128 and blocks below 128 (local_rows); whole tokens
LOCAL_ROWS = 64
# warps of one program (offline sm_90 build, 64 rows, D = 128: 4 warps spill 24 bytes at G = 1 and 4, 8 do not)
LOCAL_WARPS = 8


def enabled() -> bool:
    """SPARSA_KV_LOCAL_SPLIT=1 / 0; unset: off (slower on the H100 at every measured shape, session 19; docs/kernels/sparse_attention.md)."""
    return env_flag("SPARSA_KV_LOCAL_SPLIT", False)


def local_rows(group: int, head_dim: int, block_size: int = 64) -> int:
    """BLOCK_R of the local kernel: LOCAL_ROWS at head dims <= 128 and blocks below 128, half that otherwise (offline
    sm_90 build, 64 rows, 8 warps: 20 bytes of spills at block 128, D = 128), at least G rounded up to a power of two."""
    rows = LOCAL_ROWS if head_dim <= 128 and block_size < 128 else LOCAL_ROWS // 2
    return max(rows, _pow2(group, 1))


def local_warps(rows: int, head_dim: int, block_size: int) -> int:
    """num_warps of the local kernel: LOCAL_WARPS, 8 for 128 rows or head dims / blocks above 128."""
    return 8 if rows >= 128 or max(head_dim, block_size) > 128 else LOCAL_WARPS


@triton.jit
def _kv_local_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    IDX,
    BLKSTART,
    BLKLEN,
    TOKBASE,
    TOKDOCSTART,
    qk_scale,
    Hq,
    Hkv,
    h0,
    BS,
    SUB,
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
    """LOCAL (module docstring): program (gb * SUB + sub, local head hl)."""
    gb = tl.program_id(0) // SUB
    sub = tl.program_id(0) % SUB
    h = (h0 + tl.program_id(1)).to(tl.int64)
    kst = tl.load(BLKSTART + gb)  # first token (and key) of the block, int64
    blen = tl.load(BLKLEN + gb)
    base = tl.load(TOKBASE + kst)  # global id of the document's block 0
    ds = tl.load(TOKDOCSTART + kst)  # the document's first token
    own = gb - base  # local id of the block: every row's own block
    offs_r = tl.arange(0, BLOCK_R)
    tr = sub * TOKENS + offs_r // G  # token offset in the block
    g = offs_r % G
    rmask = (offs_r // G < TOKENS) & (tr < blen)
    t = kst + tl.where(rmask, tr, 0)  # [R] int64 (masked rows: the block's first token, a valid address)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + (t * Hq + h * G + g)[:, None] * D + offs_d[None, :], mask=rmask[:, None] & (offs_d < D)[None, :],
                other=0.0)
    offs_k = tl.arange(0, BLOCK_K)
    sel = tl.load(IDX + (t * Hkv + h)[:, None] * TOPK + offs_k[None, :], mask=rmask[:, None] & (offs_k < TOPK)[None, :],
                  other=-1)  # [R, BK] the rows' selections
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    # block 0, the previous block, the own block, each local block once; branchless (a repeat of block 0 is a fully
    # masked step, whose loads move no data) so that the compiler can pipeline the block loads
    for i in range(3):
        c = tl.where(i == 0, 0, tl.maximum(own - 2 + i, 0))
        live = (i == 0) | (own - 2 + i > 0)
        chosen = (tl.max((sel == c).to(tl.int32), 1) > 0) & live  # [R]
        kpos = ds + c * BS + offs_n
        kmask = (offs_n < tl.load(BLKLEN + base + c)) & live
        score_mask = (rmask & chosen)[:, None] & kmask[None, :] & (kpos[None, :] <= t[:, None])
        m_i, l_i, acc = attend_block(q, K, V, kpos, kmask, h, Hkv, score_mask, m_i, l_i, acc, qk_scale, D, DV,
                                     BLOCK_D, BLOCK_DV, PRECISION)
    store_rows(O, LSE, t * Hq + h * G + g, rmask, acc, m_i, l_i, DV, BLOCK_DV)


def launch_local(q, k, v, o, lse, idx, meta, block_size: int, scale: float, h0: int, n_heads: int):
    """o, lse of the KV heads [h0, h0 + n_heads) from their tokens' local blocks alone (q [N, Hq, D], k, v
    [N, Hkv, D / Dv], idx [N, Hkv, K] int32)."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    group = n_heads_q // n_heads_kv
    topk = idx.shape[-1]
    if n_tokens == 0 or meta.n_blocks == 0:
        return
    rows = local_rows(group, max(head_dim, head_dim_v), block_size)
    tokens = rows // group
    sub = triton.cdiv(block_size, tokens)
    _kv_local_kernel[(meta.n_blocks * sub, n_heads)](
        q,
        k,
        v,
        o,
        lse,
        idx,
        meta.blk_start,
        meta.blk_len,
        meta.tok_blockbase,
        meta.tok_docstart,
        scale * LOG2E,
        n_heads_q,
        n_heads_kv,
        h0,
        block_size,
        sub,
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
        num_warps=local_warps(rows, max(head_dim, head_dim_v), block_size),
        num_stages=2,
    )


# also with gradients (the backward then builds its own pair index, with the local pairs): an experiment for
# scripts/kv_local_split_ab.py --backward
WITH_GRAD = False


def uses_split(needs_grad: bool) -> bool:
    """Whether a KV-outer forward takes the local blocks out of its pairs: enabled() and no input needs a
    gradient (the backward's pair index has them), or WITH_GRAD."""
    return enabled() and (WITH_GRAD or not needs_grad)
