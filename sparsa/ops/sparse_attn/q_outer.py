"""Query-outer (NSA-style) forward: one program per (token, KV head), the G query heads as rows.

Each program walks the token's selected blocks with an online softmax (log2 domain, fp32).
Rows are padded to max(16, next_pow2(G)) for tl.dot: efficient for large G and for few queries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton_interpreter  # noqa: F401  (interpreter patch)
from .._alloc import new_output
from .._intmath import next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def attend_block(q, K, V, kpos, kmask, h, Hkv, score_mask, m_i, l_i, acc, qk_scale, D: tl.constexpr,
                 DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of an online softmax in the log2 domain: loads the block's K and V at positions kpos
    (mask kmask [BN], KV head h), scores the rows q against it (score_mask [R, BN], or broadcastable to it:
    False -> -inf) and updates each row's running max m_i, sum l_i and unnormalised output acc."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + (kpos * Hkv + h)[:, None] * D + offs_d[None, :], mask=kmask[:, None] & (offs_d < D)[None, :],
                other=0.0)
    vv = tl.load(V + (kpos * Hkv + h)[:, None] * DV + offs_dv[None, :],
                 mask=kmask[:, None] & (offs_dv < DV)[None, :], other=0.0)
    return attend_loaded(q, k, vv, score_mask, m_i, l_i, acc, qk_scale, PRECISION)


@triton.jit
def attend_loaded(q, k, vv, score_mask, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """attend_block on a loaded key block k [BN, D] and value block vv [BN, Dv]. Keys outside score_mask get
    probability 0, so their value rows must be finite (zeros or real rows), never garbage."""
    sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    sc = tl.where(score_mask, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: everything stays 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_rows(O, LSE, orow, rmask, acc, m_i, l_i, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Normalised output rows O[orow] and natural-log LSE from their (m, l, acc) online-softmax state (log2
    domain); a row without any key gets o = 0 and lse = -inf."""
    offs_dv = tl.arange(0, BLOCK_DV)
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + orow[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + orow, lse, mask=rmask)


@triton.jit
def _q_outer_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    IDX,
    DOCSTART,
    qk_scale,  # scale * log2(e)
    Hq,
    Hkv,
    BS,
    TOPK: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BRANCHLESS: tl.constexpr,
    KD,
    VD,
    TMA: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_PADDING: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    doc0 = tl.load(DOCSTART + t)
    tloc = t - doc0
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    dmask = offs_d < D
    hq = h * G + offs_g
    q = tl.load(Q + (t * Hq + hq)[:, None] * D + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    prev = tl.full([], -1, dtype=tl.int64)
    idx_row = IDX + (t * Hkv + h) * TOPK
    first = 0
    if SKIP_PADDING:  # rows are sorted (the caller's contract), so the -1 padding leads: start past it
        offs_k = tl.arange(0, BLOCK_K)
        slots = tl.load(idx_row + offs_k, mask=offs_k < TOPK, other=0)
        first = tl.sum((slots < 0).to(tl.int32), 0)
    for s in range(first, TOPK):
        b = tl.load(idx_row + s).to(tl.int64)
        use = (b >= 0) & (b * BS <= tloc) & (b != prev)
        kpos = doc0 + b * BS + offs_n
        if TMA:  # the block's BLOCK_N rows as TMA boxes of [N, Hkv * D] (a skipped slot loads rows of block 0;
            # rows past N read as 0; every loaded row is finite, and the masked ones get probability 0)
            row = (doc0 + tl.maximum(b, 0) * BS).to(tl.int32)
            smask = (offs_n < BS) & (kpos <= t) & use
            k_blk = KD.load([row, (h * D).to(tl.int32)])
            v_blk = VD.load([row, (h * DV).to(tl.int32)])
            m_i, l_i, acc = attend_loaded(q, k_blk, v_blk, smask[None, :], m_i, l_i, acc, qk_scale, PRECISION)
        elif BRANCHLESS:  # masked loads move no data; lets the compiler pipeline the block loads
            kmask = (offs_n < BS) & (kpos <= t) & use
            m_i, l_i, acc = attend_block(
                q, K, V, kpos, kmask, h, Hkv, kmask[None, :], m_i, l_i, acc, qk_scale, D, DV, BLOCK_D, BLOCK_DV, PRECISION
            )
        else:
            if use:
                kmask = (offs_n < BS) & (kpos <= t)
                m_i, l_i, acc = attend_block(
                    q, K, V, kpos, kmask, h, Hkv, kmask[None, :], m_i, l_i, acc, qk_scale, D, DV, BLOCK_D, BLOCK_DV,
                    PRECISION,
                )
        prev = b
    store_rows(O, LSE, t * Hq + hq, gmask, acc, m_i, l_i, DV, BLOCK_DV)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, next_pow2(x))


def precision_for(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# (num_warps, num_stages) of the kernel with TMA loads. H100, session 29 (benchmarks/results/h100_session29/
# q_outer_tma_configs.txt, forward medians of 3 rounds, random selections, Hq = 32, D = 128, block 64, top-16): 1 warp
# x 2 stages was the fastest of 14 configurations everywhere measured: G = 16 8K 0.911-0.916 ms (2x3 1.016, 4x2
# 0.984, one-token tiles 1.10), 16K 1.925, 64K 8.31, 128K 17.30 (2x3 17.49-17.72); G = 8 8K 1.74, 64K 16.06 (2x3 1.93
# / 16.33). An A/B knob (scripts/q_outer_tma_ab.py)
TMA_CONFIG = (1, 2)
# the TMA kernel starts each row's loop past its leading -1 padding (sorted rows) instead of loading block 0 for it
# and masking it (at 8K about 6% of the benchmark's slots are padding). H100, session 29
# (benchmarks/results/h100_session29/q_outer_skip.log, G = 16, forward medians of 3 rounds, on / off): 8K 0.890 /
# 0.915 ms, 16K 1.878 / 1.902, 64K 8.179 / 8.169; its sm_90 build spills 24 bytes at 1 warp (none without it). An
# A/B knob (q_outer_tma_ab.py: a config with a trailing 'n' runs with it off)
TMA_SKIP_PADDING = True
# (BRANCHLESS, num_warps, num_stages) forced by the tuning benchmark; None = the default below
Q_OUTER_OVERRIDE: tuple[bool, int, int] | None = None


def q_outer_config(block_d: int) -> tuple[bool, int, int]:
    """(BRANCHLESS, num_warps, num_stages) of the query-outer forward for head-dim tile block_d (the launch and
    scripts/sa_sm90_build.py). Measured at 64K on the H100: branchless, 4 warps, 3 stages is 1.3x faster than the
    branchy loop; head dims above 128 take 8 warps and 2 stages (offline sm_90 build at head dim 256, block 128:
    143360 bytes of shared memory)."""
    if Q_OUTER_OVERRIDE is not None:
        return Q_OUTER_OVERRIDE
    return (True, 8, 2) if block_d > 128 else (True, 4, 3)


def row_descriptor(x, block_n: int):
    """TMA descriptor of x [N, Hkv, D] viewed as [N, Hkv * D], boxes of [block_n, D] (one KV head's block)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, heads, width = x.shape
    return TensorDescriptor.from_tensor(x.view(n, heads * width), [block_n, width])


def q_outer_forward(q, k, v, idx, meta, block_size: int, scale: float, tma: bool = False):
    """q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv], idx [N, Hkv, K] int32, each row sorted ascending (-1 padding
    first; sparse_attention_triton sorts them) -> o [N, Hq, Dv], lse [N, Hq] fp32. tma: K and V blocks by TMA
    (q_tile.list_tma's conditions: head dims that are their own block widths), and with TMA_SKIP_PADDING each row's
    loop starts past its padding."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
    group = n_heads_q // n_heads_kv
    o = new_output((n_tokens, n_heads_q, head_dim_v), q.dtype, q.device)
    lse = new_output((n_tokens, n_heads_q), torch.float32, q.device)
    block_d, block_dv = _pow2(head_dim), _pow2(head_dim_v)
    branchless, warps, stages = q_outer_config(max(block_d, block_dv))
    if tma:
        warps, stages = TMA_CONFIG
        kd, vd = (row_descriptor(x, _pow2(block_size)) for x in (k, v))
    else:
        kd, vd = k, v  # unused without TMA (as the query-tile list kernel passes them)
    _q_outer_fwd_kernel[(n_tokens, n_heads_kv)](
        q,
        k,
        v,
        o,
        lse,
        idx,
        meta.tok_docstart,
        scale * LOG2E,
        n_heads_q,
        n_heads_kv,
        block_size,
        TOPK=idx.shape[-1],
        G=group,
        D=head_dim,
        DV=head_dim_v,
        BLOCK_G=_pow2(group),
        BLOCK_N=_pow2(block_size),
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        PRECISION=precision_for(q.dtype),
        BRANCHLESS=branchless,
        KD=kd,
        VD=vd,
        TMA=tma,
        BLOCK_K=next_pow2(idx.shape[-1]),
        SKIP_PADDING=tma and TMA_SKIP_PADDING,
        num_warps=warps,
        num_stages=stages,
    )
    return o, lse
