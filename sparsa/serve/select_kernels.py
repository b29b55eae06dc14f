"""Triton versions of the engine's per-step selection helpers (`sparsa.serve.select`).

A decode step selects and diffs once per layer; the PyTorch references need a sort, a [B, H, K, S]
match tensor and a few dozen small kernels per call, so on the GPU their launches cost more than
their work. Each kernel here does one (row, KV head) per program in registers, in one launch, with
results identical to the references (tests compare them under TRITON_INTERPRET=1):

  forecast_scores_triton   f . kbar per row, fp32 accumulation straight from bf16 block keys
  ssa_scores_triton        SSA's group-summed softmax over block keys, two passes over them
  finish_selection_triton  forcing rules + top-k (ties to the lower block), ascending, -1 padded
  slot_diff_triton         resident-block matching and slot assignment (also in the engine's
                           in-place form, slot_update_triton)
The score kernels serve per-row block keys (decode); they agree with the references to fp32
rounding (summation order), the other two exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton_interpreter  # noqa: F401  (interpreter patch)


@triton.jit
def _slot_diff_kernel(SEL, BM, CUR, NEW, LOAD, SLOT_OF, HITS, MISSES, TOTALS, n_heads, K, S,
                      KP: tl.constexpr, SP: tl.constexpr, CURRENT_SLOT: tl.constexpr, ENGINE: tl.constexpr):
    """ENGINE=False: `slot_diff` outputs. ENGINE=True (`slot_update`): NEW aliases BM (each program
    reads its row before writing it), hits and misses are added atomically into TOTALS [2], and the
    current block's entries get CURRENT_SLOT instead of -1."""
    pid = tl.program_id(0)  # sequence * n_heads + head
    row = pid.to(tl.int64)
    ks = tl.arange(0, KP)
    ss = tl.arange(0, SP)
    # block ids fit in int32: the [KP, SP] comparisons run at 32 bits
    sel = tl.load(SEL + row * K + ks, mask=ks < K, other=-1).to(tl.int32)  # [KP]
    held = tl.load(BM + row * S + ss, mask=ss < S, other=-1).to(tl.int32)  # [SP]
    cur = tl.load(CUR + pid // n_heads).to(tl.int32)
    wanted = (sel >= 0) & (sel != cur) & (ks < K)
    match = (sel[:, None] == held[None, :]) & wanted[:, None] & (ss[None, :] < S)  # [KP, SP]
    match_i = match.to(tl.int32)
    hit = tl.max(match_i, 1) > 0  # selection entry already resident
    keep = tl.max(match_i, 0) > 0  # slot keeps its block
    miss = wanted & (tl.max(match_i, 1) == 0)
    free = (tl.max(match_i, 0) == 0) & (ss < S)
    miss_rank = tl.cumsum(miss.to(tl.int32), 0) - 1
    free_rank = tl.cumsum(free.to(tl.int32), 0) - 1
    # the r-th missing entry takes the r-th free slot
    assign = miss[:, None] & free[None, :] & (miss_rank[:, None] == free_rank[None, :])  # [KP, SP]
    miss_slot = tl.max(tl.where(assign, ss[None, :], -1), 1)
    hit_slot = tl.min(tl.where(match, ss[None, :], SP), 1)
    slot_of = tl.where(hit, hit_slot, tl.where(miss, miss_slot, -1))
    if ENGINE:
        slot_of = tl.where((sel == cur) & (ks < K), CURRENT_SLOT, slot_of)
    slot_of = slot_of.to(tl.int64)
    load = tl.max(tl.where(assign, sel[:, None], -1), 0)  # [SP] block to copy into each slot
    new_map = tl.where(load >= 0, load, tl.where(keep, held, -1))
    tl.store(NEW + row * S + ss, new_map.to(tl.int64), mask=ss < S)
    tl.store(LOAD + row * S + ss, load.to(tl.int64), mask=ss < S)
    tl.store(SLOT_OF + row * K + ks, slot_of, mask=ks < K)
    if ENGINE:
        tl.atomic_add(TOTALS, tl.sum(hit.to(tl.int64), 0))
        tl.atomic_add(TOTALS + 1, tl.sum(miss.to(tl.int64), 0))
    else:
        tl.store(HITS + row, tl.sum(hit.to(tl.int64), 0))
        tl.store(MISSES + row, tl.sum(miss.to(tl.int64), 0))


def _launch_slot_kernel(selection, held, current, new_map, hits, misses, totals, *, current_slot: int, engine: bool):
    """Allocates the load list and entry slots and runs `_slot_diff_kernel`; returns (load, slot_of)."""
    batch, n_heads, k = selection.shape
    s = held.shape[-1]
    load = torch.empty((batch, n_heads, s), dtype=torch.long, device=selection.device)
    slot_of = torch.empty((batch, n_heads, k), dtype=torch.long, device=selection.device)
    kp, sp = triton.next_power_of_2(max(k, 2)), triton.next_power_of_2(max(s, 2))
    _slot_diff_kernel[(batch * n_heads,)](selection.contiguous(), held, current.to(torch.long).contiguous(), new_map,
                                          load, slot_of, hits, misses, totals, n_heads, k, s, KP=kp, SP=sp,
                                          CURRENT_SLOT=current_slot, ENGINE=engine, num_warps=8)
    return load, slot_of


def slot_diff_triton(selection: torch.Tensor, block_map: torch.Tensor, current: torch.Tensor):
    """Same contract and results as `sparsa.serve.select.slot_diff` (one kernel launch)."""
    held = block_map.to(torch.long).contiguous()
    new_map = torch.empty_like(held)
    hits = torch.empty(selection.shape[:2], dtype=torch.long, device=selection.device)
    misses = torch.empty_like(hits)
    load, slot_of = _launch_slot_kernel(selection, held, current, new_map, hits, misses, hits, current_slot=-1,
                                        engine=False)
    return new_map, load, slot_of, hits, misses


def slot_update_triton(selection: torch.Tensor, block_map: torch.Tensor, current: torch.Tensor,
                       totals: torch.Tensor, current_slot: int = 0):
    """Same contract and results as `sparsa.serve.select.slot_update` (one kernel launch)."""
    if block_map.dtype != torch.long or not block_map.is_contiguous():
        raise ValueError("block_map must be a contiguous int64 tensor (it is updated in place)")
    return _launch_slot_kernel(selection, block_map, current, block_map, totals, totals, totals,
                               current_slot=current_slot, engine=True)


@triton.jit
def _finish_topk_kernel(SCORE, POS, OUT, n_heads, n_blocks, topk, block_size, init_blocks, local_blocks,
                        NBP: tl.constexpr):
    pid = tl.program_id(0)  # row * n_heads + head
    row = pid.to(tl.int64)
    blk = tl.arange(0, NBP)
    pos = tl.load(POS + pid // n_heads).to(tl.int64)
    cur = pos // block_size
    s = tl.load(SCORE + row * n_blocks + blk, mask=blk < n_blocks, other=float("-inf")).to(tl.float32)
    s = tl.where(blk < cur, s, float("-inf")) + 0.0  # only past blocks are candidates; -0.0 -> +0.0
    forced = ((blk <= cur) & (blk > cur - local_blocks)) | ((blk < init_blocks) & (blk <= cur))
    s = tl.where(forced, float("inf"), s)
    s = tl.where(blk < n_blocks, s, float("-inf"))
    # order-preserving map of fp32 to [0, 2^32) in int64
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    u = bits & 0xFFFFFFFF
    key = tl.where(bits < 0, 0xFFFFFFFF - u, u + 0x80000000)
    neg_inf_key = 0xFFFFFFFF - 0xFF800000
    valid = key > neg_inf_key
    n_sel = tl.minimum(tl.sum(valid.to(tl.int32), 0), topk)
    # the n_sel-th largest key, bit by bit from the top
    thr = tl.zeros([], tl.int64)
    for bit in tl.static_range(31, -1, -1):
        cand = thr | (1 << bit)
        cnt = tl.sum((key >= cand).to(tl.int32), 0)
        thr = tl.where(cnt >= n_sel, cand, thr)
    gt = key > thr
    eq = (key == thr) & valid
    need = n_sel - tl.sum(gt.to(tl.int32), 0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))  # ties: lower blocks first
    take = take & valid
    slot = tl.cumsum(take.to(tl.int32), 0) - 1  # ascending block order
    tl.store(OUT + row * topk + slot, blk.to(tl.int32), mask=take)
    tl.store(OUT + row * topk + blk, tl.full([NBP], -1, tl.int32), mask=(blk >= n_sel) & (blk < topk))  # padding


def finish_selection_triton(score: torch.Tensor, pos: torch.Tensor, *, block_size: int, topk: int,
                            init_blocks: int, local_blocks: int) -> torch.Tensor:
    """Same contract and results as `sparsa.serve.select.finish_selection` (one kernel launch)."""
    rows, n_heads, n_blocks = score.shape
    sc = score.contiguous()
    out = torch.empty((rows, n_heads, topk), dtype=torch.int32, device=sc.device)
    nbp = triton.next_power_of_2(max(n_blocks, topk, 2))  # topk > NB: -1 padding
    _finish_topk_kernel[(rows * n_heads,)](sc, pos.contiguous(), out, n_heads, n_blocks, topk, block_size,
                                           init_blocks, local_blocks, NBP=nbp, num_warps=4 if nbp <= 2048 else 8)
    return out


@triton.jit
def _load_kbar_chunk(base, nb, s_n, n_blocks, d, D: tl.constexpr):
    return tl.load(base + nb[:, None] * s_n + d[None, :], mask=(nb[:, None] < n_blocks) & (d[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _forecast_scores_kernel(F, KBAR, OUT, n_heads, n_blocks, s_r, s_h, s_n,
                            D: tl.constexpr, BD: tl.constexpr, BNB: tl.constexpr):
    pid = tl.program_id(0)  # row * n_heads + head
    row = pid.to(tl.int64)
    d = tl.arange(0, BD)
    f = tl.load(F + row * D + d, mask=d < D, other=0.0).to(tl.float32)
    base = KBAR + (pid // n_heads).to(tl.int64) * s_r + (pid % n_heads).to(tl.int64) * s_h
    nb = tl.program_id(1) * BNB + tl.arange(0, BNB)
    kb = _load_kbar_chunk(base, nb, s_n, n_blocks, d, D)
    tl.store(OUT + row * n_blocks + nb, tl.sum(kb * f[None, :], 1), mask=nb < n_blocks)


def forecast_scores_triton(f: torch.Tensor, kbar: torch.Tensor) -> torch.Tensor:
    """f [R, H, D], kbar [R, H, NB, D] -> [R, H, NB] float32. Grid: (row, head) x chunks of 32 blocks."""
    rows, n_heads, d = f.shape
    n_blocks = kbar.shape[2]
    kb = kbar if kbar.stride(-1) == 1 else kbar.contiguous()
    out = torch.empty((rows, n_heads, n_blocks), dtype=torch.float32, device=f.device)
    bnb = 32
    grid = (rows * n_heads, triton.cdiv(n_blocks, bnb))
    _forecast_scores_kernel[grid](f.contiguous(), kb, out, n_heads, n_blocks, kb.stride(0), kb.stride(1), kb.stride(2),
                                  D=d, BD=triton.next_power_of_2(d), BNB=bnb, num_warps=4)
    return out


@triton.jit
def _ssa_logits(q, base, nb, s_n, n_blocks, n_vis, d, scale, D: tl.constexpr, PREC: tl.constexpr):
    """Scaled logits [GP, BNB] of the group's heads against blocks nb (-inf where not visible).
    q and the block keys keep their dtype; the product accumulates in fp32 (exact bf16 products)."""
    kb = tl.load(base + nb[:, None] * s_n + d[None, :], mask=(nb[:, None] < n_blocks) & (d[None, :] < D), other=0.0)
    logit = tl.dot(q, tl.trans(kb), input_precision=PREC) * scale
    return tl.where(nb[None, :] < n_vis, logit, float("-inf"))


@triton.jit
def _ssa_program_setup(Q, KBAR, POS, n_heads, block_size, s_r, s_h,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)  # row * n_heads (KV heads) + head
    r = pid // n_heads
    d = tl.arange(0, BD)
    gs = tl.arange(0, GP)
    q_off = pid.to(tl.int64) * G * D + gs[:, None] * D + d[None, :]  # q [R, H*G, D]: this group's heads
    q = tl.load(Q + q_off, mask=(gs[:, None] < G) & (d[None, :] < D), other=0.0)  # [GP, BD], GP >= 16 for tl.dot
    n_vis = (tl.load(POS + r).to(tl.int64) + 1) // block_size
    base = KBAR + r.to(tl.int64) * s_r + (pid % n_heads).to(tl.int64) * s_h
    return pid, q, n_vis, base, d, gs


@triton.jit
def _ssa_stats_kernel(Q, KBAR, POS, STATS, n_heads, n_blocks, n_chunks, block_size, scale, s_r, s_h, s_n,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                      CHUNK: tl.constexpr, BNB: tl.constexpr, PREC: tl.constexpr):
    """Pass 1: per (row, head, chunk of blocks) the max and sum of exp of each head's logits."""
    pid, q, n_vis, base, d, gs = _ssa_program_setup(Q, KBAR, POS, n_heads, block_size, s_r, s_h, G, GP, D, BD)
    c = tl.program_id(1)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    for i in tl.static_range(CHUNK // BNB):
        nb = c * CHUNK + i * BNB + tl.arange(0, BNB)
        logit = _ssa_logits(q, base, nb, s_n, n_blocks, n_vis, d, scale, D, PREC)
        m_new = tl.maximum(m, tl.max(logit, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(logit - m_use[:, None]), 1)
        m = m_new
    off = (pid.to(tl.int64) * n_chunks + c) * 2 * GP
    tl.store(STATS + off + gs, m)
    tl.store(STATS + off + GP + gs, l)


@triton.jit
def _ssa_probs_kernel(Q, KBAR, POS, STATS, OUT, n_heads, n_blocks, n_chunks, block_size, scale, s_r, s_h, s_n,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                      CHUNK: tl.constexpr, BNB: tl.constexpr, CP: tl.constexpr, PREC: tl.constexpr):
    """Pass 2: merge the chunks' statistics into each head's LSE, then the group-summed probabilities."""
    pid, q, n_vis, base, d, gs = _ssa_program_setup(Q, KBAR, POS, n_heads, block_size, s_r, s_h, G, GP, D, BD)
    c = tl.program_id(1)
    cs = tl.arange(0, CP)
    off = (pid.to(tl.int64) * n_chunks + cs[:, None]) * 2 * GP + gs[None, :]
    ok = cs[:, None] < n_chunks
    m_c = tl.load(STATS + off, mask=ok, other=float("-inf"))  # [CP, GP]
    l_c = tl.load(STATS + off + GP, mask=ok, other=0.0)
    m = tl.max(m_c, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(l_c * tl.exp(m_c - m_use[None, :]), 0)
    lse = tl.where(l > 0, m_use + tl.log(tl.where(l > 0, l, 1.0)), float("inf"))  # nothing visible: p = 0
    row = pid.to(tl.int64)
    for i in tl.static_range(CHUNK // BNB):
        nb = c * CHUNK + i * BNB + tl.arange(0, BNB)
        logit = _ssa_logits(q, base, nb, s_n, n_blocks, n_vis, d, scale, D, PREC)
        p = tl.where(gs[:, None] < G, tl.exp(logit - lse[:, None]), 0.0)
        tl.store(OUT + row * n_blocks + nb, tl.sum(p, 0), mask=nb < n_blocks)


def ssa_scores_triton(q: torch.Tensor, kbar: torch.Tensor, pos: torch.Tensor, *, block_size: int,
                      scale: float) -> torch.Tensor:
    """q [R, Hq, D], kbar [R, H, NB, D], pos [R] -> [R, H, NB] float32 (0 where not visible).
    Two launches over a (row, head) x chunk grid: chunk statistics, then probabilities."""
    rows, n_heads_q, d = q.shape
    n_heads, n_blocks = kbar.shape[1], kbar.shape[2]
    group = n_heads_q // n_heads
    kb = kbar if kbar.stride(-1) == 1 else kbar.contiguous()
    qc, pc = q.contiguous(), pos.contiguous()
    if kbar.dtype != q.dtype:
        raise ValueError(f"q ({q.dtype}) and kbar ({kbar.dtype}) must share a dtype")
    bd, gp = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(group))
    bnb = chunk = 64
    n_chunks = triton.cdiv(n_blocks, chunk)
    stats = torch.empty((rows * n_heads, n_chunks, 2, gp), dtype=torch.float32, device=q.device)
    out = torch.empty((rows, n_heads, n_blocks), dtype=torch.float32, device=q.device)
    grid = (rows * n_heads, n_chunks)
    common = (n_heads, n_blocks, n_chunks, block_size, float(scale), kb.stride(0), kb.stride(1), kb.stride(2))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact products, like the reference
    meta = dict(G=group, GP=gp, D=d, BD=bd, CHUNK=chunk, BNB=bnb, PREC=prec, num_warps=4)
    _ssa_stats_kernel[grid](qc, kb, pc, stats, *common, **meta)
    _ssa_probs_kernel[grid](qc, kb, pc, stats, out, *common, CP=triton.next_power_of_2(n_chunks), **meta)
    return out
