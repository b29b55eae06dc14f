"""KV-outer MAIN for Hopper (sm_90) in Gluon: persistent programs that keep the next work item's loads in flight.

Same work items, math and outputs (the partials OP and LSEP) as kv_outer._kv_fwd_main_kernel; only the schedule
differs. The Triton MAIN runs one item per program: gathered query rows and key block, the first MMA, the
softmax, the value block, the second MMA, the stores, one after the other. Nsight Compute (H100, session 14)
found it latency-bound: 42% of DRAM bandwidth at 8K tokens with 4 programs per SM, 36% of the stall cycles
waiting on the gathers. Here each program walks the items pid, pid + P, pid + 2P, ... through two shared-memory
stages: while it computes item i, item i + 1's key and value blocks are in flight by TMA (contiguous rows of K, V
viewed as [N, Hkv * D]) and its gathered query rows by cp.async, and the loads that address item i + 2's copies
(block, tokens) and item i + 3's work entry are issued, so that no load latency sits on the per-item chain.

The score mask is applied only to items that reach their tokens' diagonal or a short block. Session 15 cut the
per-item chain three ways (module flags below, all on): full items store their partials by one TMA copy, the gather
offsets are 32-bit, and the PIPELINE loop (_kv_main_gluon_pipe_kernel) runs item i's stores under item i + 1's
asynchronous first MMA. Measured on the H100 (docs/kernels/sparse_attention.md, benchmarks/results/h100_session15):
MAIN 8K G = 4 0.64 vs 0.74 ms for the Triton MAIN, 64K G = 4 6.18 vs 6.65-6.72, outputs equal; so it is the default on
Hopper for G >= 2 and, since session 16, for G = 1 below 32K tokens (`enabled`). Scope (`covers`): CUDA capability 9.x, bf16 / fp16, head dims D = Dv in {64, 128},
block size 64, G <= 64 (64 rows per item: 64 // G tokens x G heads), no fused local blocks. SPARSA_KV_GLUON=1 / 0
forces it on / off.
"""
from __future__ import annotations

import functools

import torch

from .._env import env_flag
from .._launch import launcher_for

try:  # Gluon ships with Triton >= 3.5; without it the Triton MAIN is used
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

ROWS = 64  # rows of one item (one warpgroup's wgmma M)
MAX_PARTIAL_ROWS = 2**31 - ROWS  # partial rows of a head slice it takes (TMA store coordinates are int32)
BLOCK = 64  # keys per block (the only block size of this kernel)
# programs per SM forced by the tuning scripts; None = PROGRAMS_PER_SM
PROGRAMS_OVERRIDE: int | None = None
PROGRAMS_PER_SM = 2  # two stages of 48 KB (D = 128) each: two programs fit in an SM's shared memory
# session 15 variants (constexprs, so that kv_gluon_ab can time each in one process), all on since session 15:
# TMA_STORE: an item with all 64 rows stores its partials by one TMA copy from shared memory (its rows are
#            contiguous and its own: row0 + r), other items load them back from that buffer for masked stores;
# OFFSETS_I32: gathered-row element offsets and token arithmetic in 32 bits (where q.numel() < 2**31);
# PIPELINE: the loop of _kv_main_gluon_pipe_kernel (an item's stores overlap the next item's first MMA).
# H100, session 15 (benchmarks/results/h100_session15/gluon_*_ab.log), MAIN kernel ms, Triton MAIN / Gluon base /
# TMA_STORE + OFFSETS_I32 / + PIPELINE: 8K G = 4 0.737 / 0.745 / 0.674 / 0.642, 64K G = 4 6.65-6.72 / 6.44 / 6.29-6.30 /
# 6.18; G = 2 8K 0.74 / - / 0.678 / 0.607; G = 1 8K 0.78 / 0.86 / 0.74 / 0.77, 64K 6.59-6.73 / 7.09 / 6.68-6.72 / 6.68.
TMA_STORE = True
OFFSETS_I32 = True
PIPELINE = True
# PIPELINE from this group size: at G = 1 (forced with SPARSA_KV_GLUON=1) the loop without it was faster at 8K and
# 16K (MAIN 0.74 vs 0.77 ms, 1.51 vs 1.57) and equal at 64K (6.68-6.72 vs 6.68)
PIPELINE_MIN_GROUP = 2
# SPARSA_KV_GLUON unset: on from this group size, and at G = 1 below G1_MAX_TOKENS tokens. H100, session 16
# (benchmarks/results/h100_session16/gluon_g1_sweep.log), forward ms at G = 1, Gluon (no PIPELINE) vs Triton MAIN:
# 8K 1.396 vs 1.427-1.430, 16K 2.773 vs 2.806-2.815, 32K 5.659 vs 5.558-5.598, 64K 11.63 vs 11.49-11.53, 128K 23.76 vs
# 23.54
DEFAULT_MIN_GROUP = 2
G1_MAX_TOKENS = 32768


def enabled(group: int, n_tokens: int = 0) -> bool:
    """Whether the forward's MAIN runs on this kernel where `eligible` holds: SPARSA_KV_GLUON=1 / 0 forces it on /
    off; unset, on for G >= DEFAULT_MIN_GROUP and for G = 1 below G1_MAX_TOKENS tokens."""
    default = group >= DEFAULT_MIN_GROUP or n_tokens < G1_MAX_TOKENS
    return env_flag("SPARSA_KV_GLUON", default) and HAVE_GLUON


def on_hopper(x: torch.Tensor) -> bool:
    """Whether Gluon is here and x is on a Hopper GPU (CUDA capability 9.x): where the Gluon kernels can run."""
    return HAVE_GLUON and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9


def eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, local: bool) -> bool:
    """Whether this kernel covers the call: a Hopper GPU and `covers`."""
    return on_hopper(q) and covers(q, k, v, block_size, local)


def covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, local: bool) -> bool:
    """The module docstring's scope, for contiguous 16-byte-aligned q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv]."""
    group = q.shape[1] // k.shape[1]
    return (
        q.dtype in (torch.bfloat16, torch.float16)
        and k.dtype == q.dtype == v.dtype
        and q.shape[2] == k.shape[2] == v.shape[2]
        and q.shape[2] in (64, 128)
        and block_size == BLOCK
        and group <= ROWS
        and not local
        and all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, v))  # TMA rows, 16-byte cp.async
    )


def pairs_per_item(group: int) -> int:
    """Tokens per work item: ROWS // G (the item's rows are those tokens x their G heads)."""
    return ROWS // group


if HAVE_GLUON:
    _ROWS = gl.constexpr(ROWS)

    @gluon.constexpr_function
    def wgmma_layout(n, warps):
        """The register layout of a wgmma result with n columns (instruction shape [16, n, 16], warps stacked on
        the rows)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, n, 16])

    @gluon.constexpr_function
    def row_gather_layout(d, warps):
        """Rows of d 16-bit elements, 8 (16 bytes) per thread and d // 8 threads per row: the layout of the gathered
        row loads and of the row stores."""
        return gl.BlockedLayout([1, 8], [32 // (d // 8), d // 8], [warps, 1], [1, 0])

    @gluon.jit
    def _work(WORK, j, n_mine, pid, nprog):
        """(first pair, end pair, group) of this program's j-th item (its last item from j = n_mine on)."""
        w = (pid + gl.minimum(j, n_mine - 1) * nprog).to(gl.int64)
        return gl.load(WORK + w * 3), gl.load(WORK + w * 3 + 1), gl.load(WORK + w * 3 + 2)

    @gluon.jit
    def _item_rows(TOKS, start, end, G: gl.constexpr, PAIRS: gl.constexpr, layout: gl.constexpr,
                   I32: gl.constexpr = False):
        """Rows of an item in `layout` (a slice layout of its rows): (pair index, head in the group, row mask,
        token, int64 unless I32; masked rows point at token 0, a valid address)."""
        r = gl.arange(0, _ROWS, layout=layout)
        pidx = start + r // G
        rmask = (r // G < PAIRS) & (pidx < end)
        tok = gl.load(TOKS + pidx, mask=rmask, other=0)
        if not I32:
            tok = tok.to(gl.int64)
        return pidx, r % G, rmask, tok

    @gluon.jit
    def _item_meta(TOKS, BLKSTART, BLKLEN, start, end, grp, NBG, h0, G: gl.constexpr, PAIRS: gl.constexpr,
                   gather_rows: gl.constexpr, score_rows: gl.constexpr, I32: gl.constexpr):
        """Loads of an item's block and tokens, used one loop iteration later (their latency overlaps the
        current item): (KV head, first key, keys in the block, tokens in the gather layout, in the score layout, the
        first token); int32 tokens, head and first key with I32."""
        gb = grp % NBG
        tok_g = _item_rows(TOKS, start, end, G, PAIRS, gather_rows, I32)[3]
        tok_s = _item_rows(TOKS, start, end, G, PAIRS, score_rows, I32)[3]
        first = gl.load(TOKS + start, mask=start < end, other=0)  # the item's smallest token
        hd = h0 + grp // NBG
        kst = gl.load(BLKSTART + gb)
        if I32:
            hd = hd.to(gl.int32)
            kst = kst.to(gl.int32)
        else:
            first = first.to(gl.int64)
        return hd, kst, gl.load(BLKLEN + gb), tok_g, tok_s, first

    @gluon.jit
    def _issue(j, n_mine, h, kst, tok_g, Q, k_desc, v_desc, q_s, k_s, v_s, ready, Hq, G: gl.constexpr,
               gather: gl.constexpr):
        """Starts the loads of this program's j-th item into stage j % 2: K and V by TMA (arriving on the stage's
        barrier), the gathered query rows by cp.async (one commit group per call, also past the last item, where
        the last item's rows are re-read and never used, so that the group count stays in step)."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        s = j % 2
        live = j < n_mine
        bar = ready.index(s)
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes, pred=live)
        tma.async_copy_global_to_shared(k_desc, [kst.to(gl.int32), (h * D).to(gl.int32)], bar, k_s.index(s), pred=live)
        tma.async_copy_global_to_shared(v_desc, [kst.to(gl.int32), (h * D).to(gl.int32)], bar, v_s.index(s), pred=live)
        g = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, gather)) % G
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, gather))
        rows = tok_g * Hq + h * G + g  # int32 with OFFSETS_I32 (the launch checks q.numel() < 2**31)
        async_copy.async_copy_global_to_shared(q_s.index(s), Q + (rows[:, None] * D + offs_d[None, :]))
        async_copy.commit_group()

    @gluon.jit
    def _softmax_pv(sc, v_tile, start, end, kst, blen, tok, first, qk_scale, G: gl.constexpr, PAIRS: gl.constexpr):
        """From an item's scores sc [ROWS, BN] (fp32, wgmma layout) to (acc = P V [ROWS, D] fp32 unnormalised, m, l),
        kv_outer.main_tile's math; `first` is the item's first token, the smallest (pairs are sorted by group, then
        token)."""
        D: gl.constexpr = v_tile.shape[1]
        BN: gl.constexpr = v_tile.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        mma_s: gl.constexpr = wgmma_layout(BN, WARPS)
        mma_o: gl.constexpr = wgmma_layout(D, WARPS)
        if (blen == BN) & (first >= kst + BN - 1):  # pairs are in token order: every row sees every key
            m = gl.max(sc, 1) * qk_scale  # rows past the item's end are finite and not stored
        else:  # the tokens' own block, or a short last block of a document
            n_rows = gl.minimum((end - start) * G, PAIRS * G).to(gl.int32)
            rmask = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, mma_s)) < n_rows
            last = gl.where(rmask, gl.minimum((tok - kst).to(gl.int32), blen - 1), -1)  # last visible key offset
            offs_n = gl.arange(0, BN, layout=gl.SliceLayout(0, mma_s))
            sc = gl.where(offs_n[None, :] <= last[:, None], sc, float("-inf"))
            m = gl.where(rmask, gl.max(sc, 1) * qk_scale, 0.0)
        p = gl.exp2(sc * qk_scale - m[:, None])
        l = gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(v_tile.dtype), gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2))
        acc = warpgroup_mma(p_op, v_tile, gl.zeros([_ROWS, D], gl.float32, layout=mma_o), use_acc=False)
        return acc, m, l

    @gluon.jit
    def rows_out(tile, buf, desc, PTR, row0, n_rows, gather: gl.constexpr):
        """Rows row0 .. row0 + n_rows of a [ROWS, D] output (row-major, D columns) through the shared tile buf: one TMA
        copy when the tile has all ROWS rows (contiguous and its own), masked row stores read back from buf in the
        gather layout otherwise. The caller makes sure no earlier copy still reads buf."""
        D: gl.constexpr = buf.shape[1]
        buf.store(tile)
        fence_async_shared()
        gl.thread_barrier()
        if n_rows == _ROWS:
            tma.async_copy_shared_to_global(desc, [row0.to(gl.int32), 0], buf)
        else:
            ro = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, gather))
            offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, gather))
            gl.store(PTR + (row0 + ro)[:, None] * D + offs_d[None, :], buf.load(gather), mask=(ro < n_rows)[:, None])

    @gluon.jit
    def _epilogue(acc, m, l, o_s, op_desc, OP, LSEP, start, end, G: gl.constexpr, PAIRS: gl.constexpr,
                  gather: gl.constexpr, TMA_ST: gl.constexpr):
        """Stores an item's partials: lse2 = m + log2 l and O = acc / l (rows row0 + r, r < the item's rows)."""
        D: gl.constexpr = acc.shape[1]
        n_rows = gl.minimum((end - start) * G, PAIRS * G).to(gl.int32)  # the item's rows (pairs x G heads)
        row0 = start * G  # its first row of the partials: row r of the item is row0 + r
        r = gl.arange(0, _ROWS, layout=m.type.layout)
        l_safe = gl.where(l > 0, l, 1.0)
        gl.store(LSEP + row0 + r, m + gl.log2(l_safe), mask=r < n_rows)
        inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, acc.type.layout))
        out = (acc * inv[:, None]).to(OP.dtype.element_ty)
        if TMA_ST:
            tma.store_wait(0)  # the previous item's partial copy has read o_s
            gl.thread_barrier()
            rows_out(out, o_s, op_desc, OP, row0, n_rows, gather)
        else:
            # through shared memory into the gather layout: 16-byte row-contiguous stores (stored straight from the
            # accumulator layout, 4 bytes at a time, MAIN took 1.6-1.7x as long on the H100, session 14)
            ro = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, gather))
            offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, gather))
            out = gl.convert_layout(out, gather)
            gl.store(OP + (row0 + ro)[:, None] * D + offs_d[None, :], out, mask=(ro < n_rows)[:, None])

    @gluon.jit
    def _compute(q_tile, k_tile, v_tile, o_s, op_desc, OP, LSEP, start, end, kst, blen, tok, first, qk_scale,
                 G: gl.constexpr, PAIRS: gl.constexpr, gather: gl.constexpr, TMA_ST: gl.constexpr):
        """MAIN on one item whose rows, keys and values are in shared memory."""
        BN: gl.constexpr = k_tile.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        mma_s: gl.constexpr = wgmma_layout(BN, WARPS)
        sc = warpgroup_mma(q_tile, k_tile.permute((1, 0)), gl.zeros([_ROWS, BN], gl.float32, layout=mma_s),
                           use_acc=False)
        acc, m, l = _softmax_pv(sc, v_tile, start, end, kst, blen, tok, first, qk_scale, G, PAIRS)
        gl.thread_barrier()  # the stage is read: the next iteration may refill it
        _epilogue(acc, m, l, o_s, op_desc, OP, LSEP, start, end, G, PAIRS, gather, TMA_ST)

    @gluon.jit
    def _buffers(k_desc, v_desc, op_desc, Q_LAYOUT: gl.constexpr, TMA_ST: gl.constexpr):
        """Shared memory of a program: two stages of query rows, keys and values, the partial tile (TMA_ST) and
        one barrier per stage (the K / V copies arrive on it)."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        dtype: gl.constexpr = k_desc.dtype
        q_s = gl.allocate_shared_memory(dtype, [2, _ROWS, D], Q_LAYOUT)
        k_s = gl.allocate_shared_memory(dtype, [2, BN, D], k_desc.layout)
        v_s = gl.allocate_shared_memory(dtype, [2, BN, D], v_desc.layout)
        if TMA_ST:
            o_s = gl.allocate_shared_memory(dtype, [_ROWS, D], op_desc.layout)
        else:
            o_s = q_s  # unused
        ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(2):
            mbarrier.init(ready.index(st), count=1)
        return q_s, k_s, v_s, o_s, ready

    @gluon.jit
    def _wait_item(ready, j):
        """Until this program's j-th item is in its stage j % 2: this thread's query rows (every commit group but
        the newest one, item j + 1's or j + 2's), visible to the async proxy (the wgmma) once all threads pass the
        barrier, and K and V (the stage's barrier, phase (j // 2) & 1)."""
        async_copy.wait_group(1)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.wait(ready.index(j % 2), (j // 2) & 1)

    @gluon.jit
    def _drain(ready, TMA_ST: gl.constexpr):
        """End of a program: no copy in flight, barriers released."""
        async_copy.wait_group(0)
        if TMA_ST:
            tma.store_wait(0)
        for st in gl.static_range(2):
            mbarrier.invalidate(ready.index(st))

    @gluon.jit
    def _kv_main_gluon_kernel(Q, k_desc, v_desc, op_desc, OP, LSEP, WORK, TOKS, BLKSTART, BLKLEN, qk_scale, n_items,
                              Hq, NBG, h0, G: gl.constexpr, PAIRS: gl.constexpr, Q_LAYOUT: gl.constexpr,
                              TMA_ST: gl.constexpr, I32: gl.constexpr):
        """MAIN over the items pid, pid + P, ... of the work list. Iteration i issues item i + 1's copies (from
        block and token loads started in iteration i - 1), starts the loads of item i + 2's block and tokens
        and of item i + 3's work entry, then computes item i: no load latency on the critical path."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        gather: gl.constexpr = row_gather_layout(D, WARPS)
        mma_s: gl.constexpr = wgmma_layout(BN, WARPS)
        grows: gl.constexpr = gl.SliceLayout(1, gather)
        srows: gl.constexpr = gl.SliceLayout(1, mma_s)

        q_s, k_s, v_s, o_s, ready = _buffers(k_desc, v_desc, op_desc, Q_LAYOUT, TMA_ST)

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_mine = gl.cdiv(n_items - pid, nprog)  # >= 1: the host launches at most n_items programs
        start, end, grp = _work(WORK, 0, n_mine, pid, nprog)
        hd, kst, blen, tok_g, tok_s, first = _item_meta(TOKS, BLKSTART, BLKLEN, start, end, grp, NBG, h0, G, PAIRS,
                                                        grows, srows, I32)
        _issue(0, n_mine, hd, kst, tok_g, Q, k_desc, v_desc, q_s, k_s, v_s, ready, Hq, G, gather)
        start1, end1, grp1 = _work(WORK, 1, n_mine, pid, nprog)
        hd1, kst1, blen1, tok_g1, tok_s1, first1 = _item_meta(TOKS, BLKSTART, BLKLEN, start1, end1, grp1, NBG, h0, G,
                                                              PAIRS, grows, srows, I32)
        start2, end2, grp2 = _work(WORK, 2, n_mine, pid, nprog)
        for i in range(n_mine):
            _issue(i + 1, n_mine, hd1, kst1, tok_g1, Q, k_desc, v_desc, q_s, k_s, v_s, ready, Hq, G, gather)
            hd2, kst2, blen2, tok_g2, tok_s2, first2 = _item_meta(TOKS, BLKSTART, BLKLEN, start2, end2, grp2, NBG, h0,
                                                                  G, PAIRS, grows, srows, I32)
            start3, end3, grp3 = _work(WORK, i + 3, n_mine, pid, nprog)

            stage = i % 2
            _wait_item(ready, i)
            _compute(q_s.index(stage), k_s.index(stage), v_s.index(stage), o_s, op_desc, OP, LSEP, start, end, kst,
                     blen, tok_s, first, qk_scale, G, PAIRS, gather, TMA_ST)

            start, end, kst, blen, tok_s, first = start1, end1, kst1, blen1, tok_s1, first1
            start1, end1, hd1, kst1, blen1, tok_g1, tok_s1, first1 = start2, end2, hd2, kst2, blen2, tok_g2, tok_s2, first2
            start2, end2, grp2 = start3, end3, grp3
        _drain(ready, TMA_ST)


    @gluon.jit
    def _kv_main_gluon_pipe_kernel(Q, k_desc, v_desc, op_desc, OP, LSEP, WORK, TOKS, BLKSTART, BLKLEN, qk_scale,
                                   n_items, Hq, NBG, h0, G: gl.constexpr, PAIRS: gl.constexpr, Q_LAYOUT: gl.constexpr,
                                   TMA_ST: gl.constexpr, I32: gl.constexpr):
        """PIPELINE variant of _kv_main_gluon_kernel: iteration i stores item i's partials while item i + 1's first
        MMA (Q K^T, issued asynchronously) runs, then computes item i + 1's softmax and P V. Loads run one item
        further ahead: iteration i issues item i + 2's copies (into item i's stage, read by then), loads item i + 3's
        block and tokens and item i + 4's work entry."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        gather: gl.constexpr = row_gather_layout(D, WARPS)
        mma_s: gl.constexpr = wgmma_layout(BN, WARPS)
        grows: gl.constexpr = gl.SliceLayout(1, gather)
        srows: gl.constexpr = gl.SliceLayout(1, mma_s)

        q_s, k_s, v_s, o_s, ready = _buffers(k_desc, v_desc, op_desc, Q_LAYOUT, TMA_ST)

        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_mine = gl.cdiv(n_items - pid, nprog)  # >= 1: the host launches at most n_items programs
        # items 0 and 1: copies issued; item 2: block and tokens loaded; item 3: work entry loaded
        start, end, grp = _work(WORK, 0, n_mine, pid, nprog)
        hd, kst, blen, tok_g, tok_s, first = _item_meta(TOKS, BLKSTART, BLKLEN, start, end, grp, NBG, h0, G, PAIRS,
                                                        grows, srows, I32)
        _issue(0, n_mine, hd, kst, tok_g, Q, k_desc, v_desc, q_s, k_s, v_s, ready, Hq, G, gather)
        start1, end1, grp1 = _work(WORK, 1, n_mine, pid, nprog)
        hd1, kst1, blen1, tok_g1, tok_s1, first1 = _item_meta(TOKS, BLKSTART, BLKLEN, start1, end1, grp1, NBG, h0, G,
                                                              PAIRS, grows, srows, I32)
        _issue(1, n_mine, hd1, kst1, tok_g1, Q, k_desc, v_desc, q_s, k_s, v_s, ready, Hq, G, gather)
        start2, end2, grp2 = _work(WORK, 2, n_mine, pid, nprog)
        hd2, kst2, blen2, tok_g2, tok_s2, first2 = _item_meta(TOKS, BLKSTART, BLKLEN, start2, end2, grp2, NBG, h0,
                                                              G, PAIRS, grows, srows, I32)
        start3, end3, grp3 = _work(WORK, 3, n_mine, pid, nprog)
        # item 0, up to its P V
        _wait_item(ready, 0)
        sc = warpgroup_mma(q_s.index(0), k_s.index(0).permute((1, 0)),
                           gl.zeros([_ROWS, BN], gl.float32, layout=mma_s), use_acc=False)
        acc, m, l = _softmax_pv(sc, v_s.index(0), start, end, kst, blen, tok_s, first, qk_scale, G, PAIRS)
        gl.thread_barrier()  # stage 0 is read
        for i in range(n_mine):
            _issue(i + 2, n_mine, hd2, kst2, tok_g2, Q, k_desc, v_desc, q_s, k_s, v_s, ready, Hq, G, gather)
            hd3, kst3, blen3, tok_g3, tok_s3, first3 = _item_meta(TOKS, BLKSTART, BLKLEN, start3, end3, grp3, NBG,
                                                                  h0, G, PAIRS, grows, srows, I32)
            start4, end4, grp4 = _work(WORK, i + 4, n_mine, pid, nprog)
            if i + 1 < n_mine:
                nxt = (i + 1) % 2
                _wait_item(ready, i + 1)  # (only item i + 2's copies may still be pending)
                sc_tok = warpgroup_mma(q_s.index(nxt), k_s.index(nxt).permute((1, 0)),
                                       gl.zeros([_ROWS, BN], gl.float32, layout=mma_s), use_acc=False, is_async=True)
                _epilogue(acc, m, l, o_s, op_desc, OP, LSEP, start, end, G, PAIRS, gather, TMA_ST)
                sc = warpgroup_mma_wait(0, deps=[sc_tok, q_s.index(nxt), k_s.index(nxt)])[0]
                acc, m, l = _softmax_pv(sc, v_s.index(nxt), start1, end1, kst1, blen1, tok_s1, first1, qk_scale, G,
                                        PAIRS)
                gl.thread_barrier()  # item i + 1's stage is read
            else:
                _epilogue(acc, m, l, o_s, op_desc, OP, LSEP, start, end, G, PAIRS, gather, TMA_ST)
            start, end = start1, end1
            start1, end1, kst1, blen1, tok_s1, first1 = start2, end2, kst2, blen2, tok_s2, first2
            start2, end2, hd2, kst2, blen2, tok_g2, tok_s2, first2 = start3, end3, hd3, kst3, blen3, tok_g3, tok_s3, first3
            start3, end3, grp3 = start4, end4, grp4
        _drain(ready, TMA_ST)


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, d: int, bf16: bool):
    return gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16 if bf16 else gl.float16)


def _kv_descriptor(x: torch.Tensor):
    """TMA descriptor of x [N, H, D] as its [N, H * D] row view, in [BLOCK, D] tiles."""
    n, h, d = x.shape
    return TensorDescriptor.from_tensor(x.view(n, h * d), [BLOCK, d], _smem_layout(BLOCK, d, x.dtype == torch.bfloat16))


def _partial_descriptor(op: torch.Tensor):
    """TMA descriptor of the partials op [rows, D] in [ROWS, D] tiles (MAIN's TMA_STORE; kv_gluon_bwd's dQ partials)."""
    return TensorDescriptor.from_tensor(op, [ROWS, op.shape[1]], _smem_layout(ROWS, op.shape[1],
                                                                               op.dtype == torch.bfloat16))


def uses_pipeline(group: int) -> bool:
    """Whether MAIN at group size G runs the PIPELINE loop (_kv_main_gluon_pipe_kernel)."""
    return PIPELINE and group >= PIPELINE_MIN_GROUP


def programs_per_sm() -> int:
    return PROGRAMS_OVERRIDE or PROGRAMS_PER_SM


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_main(q, k, v, op, lsep, work, index, meta, scale_log2: float):
    """Runs MAIN over the work list `work` [W, 3] (items of pairs_per_item(G) pairs) into op / lsep."""
    from . import kv_gluon_ws

    if kv_gluon_ws.enabled(q.shape[1] // k.shape[1]):  # the warp-specialised schedule: same items and outputs
        return kv_gluon_ws.launch_main(q, k, v, op, lsep, work, index, meta, scale_log2)
    group = q.shape[1] // k.shape[1]
    per_sm = programs_per_sm()
    n_items = work.shape[0]
    if n_items == 0:  # no pairs: nothing to compute (the merge reads no partial)
        return
    grid = (max(1, min(n_items, per_sm * _sm_count(q.device.index or 0))),)
    i32 = OFFSETS_I32 and q.numel() < 2**31
    args = (q, _kv_descriptor(k), _kv_descriptor(v), _partial_descriptor(op), op, lsep, work, index.toks,
            meta.blk_start, meta.blk_len, scale_log2, n_items, q.shape[1], meta.n_blocks, index.h0)
    q_layout = _smem_layout(ROWS, q.shape[2], q.dtype == torch.bfloat16)
    consts = dict(G=group, PAIRS=pairs_per_item(group), Q_LAYOUT=q_layout, TMA_ST=TMA_STORE, I32=i32)
    kernel = _kv_main_gluon_pipe_kernel if uses_pipeline(group) else _kv_main_gluon_kernel
    launcher = launcher_for("gluon:" + kernel.fn.__name__, kernel)
    launcher(kernel, lambda meta_: grid, args, consts, {"num_warps": 4})


def compile_offline(group: int = 4, d: int = 128, tma_store: bool | None = None, i32: bool | None = None,
                    pipeline: bool | None = None):
    """The kernel compiled for sm_90 without a GPU (bf16): tests and scripts read its registers and shared memory.
    tma_store / i32 / pipeline: the TMA_STORE / OFFSETS_I32 / PIPELINE variant (None: what a launch at this G runs)."""
    fn = _kv_main_gluon_pipe_kernel if (uses_pipeline(group) if pipeline is None else pipeline) else _kv_main_gluon_kernel
    const = dict(G=group, PAIRS=pairs_per_item(group), Q_LAYOUT=_smem_layout(ROWS, d, True),
                 TMA_ST=TMA_STORE if tma_store is None else tma_store, I32=OFFSETS_I32 if i32 is None else i32)
    return compile_main_offline(fn, const, d)


def compile_main_offline(fn, const: dict, d: int, options: dict | None = None):
    """A MAIN kernel `fn` (this module's arguments: Q, the K / V / partial descriptors, OP, LSEP, WORK, TOKS,
    BLKSTART, BLKLEN, qk_scale, int32 scalars) compiled for sm_90 in bf16 at head dim d with the constexprs `const`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    names = fn.arg_names
    desc = mangle_type(_kv_descriptor(torch.zeros(256, 2, d, dtype=torch.bfloat16)))
    op_desc = mangle_type(_partial_descriptor(torch.zeros(256, d, dtype=torch.bfloat16)))
    types = {"Q": "*bf16", "OP": "*bf16", "LSEP": "*fp32", "WORK": "*i64", "TOKS": "*i32", "BLKSTART": "*i64",
             "BLKLEN": "*i32", "qk_scale": "fp32", "k_desc": desc, "v_desc": desc, "op_desc": op_desc}
    sig = {name: "constexpr" if name in const else types.get(name, "i32") for name in names}
    aligned = [i for i, name in enumerate(names) if name in ("Q", "OP", "LSEP", "Hq")]
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": 1, **(options or {})})
