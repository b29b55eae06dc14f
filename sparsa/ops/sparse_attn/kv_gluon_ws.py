"""Warp-specialised KV-outer MAIN for Hopper (the Gluon MAIN's schedule for G >= 2 since session 31; SPARSA_KV_GLUON_WS).

kv_gluon.py's MAIN runs two programs of one warpgroup per SM, each issuing its own loads; at 8K tokens it spends
about 2800 cycles per 64-row item per SM against about 512 cycles of MMAs, with no eligible warp in 63% of cycles
(docs/kernels/sparse_attention.md, "Per-pair kernel times against N"). This kernel puts more warps on the same
items: one program per SM, a loader partition (the kernel's 4 warps) and NWG compute warpgroups (FA3-style warp
specialisation).
- Shared memory: a ring of STAGES stages (gathered query rows, key block, value block: 48 KB at D = 128). Item j of
  the program (work-list entry pid + j * P, as in kv_gluon) goes to stage j % STAGES and warpgroup j % NWG.
- Loader (the default partition, 4 warps, 56 registers): waits for the stage to be empty, gathers the item's query
  rows by cp.async (the stage's barrier waits for them: cp.async.mbarrier.arrive), then K and V by TMA on the same
  barrier. Its work entries and item tokens are loaded two and one items ahead of use.
- Compute warpgroup: waits for its item's stage, Q K^T, softmax, P V (kv_gluon._softmax_pv), then the partials
  through the stage's query buffer (read by then) by one TMA copy (masked row stores for short items), and
  releases the stage once that copy has read it. Its item's block and tokens are loaded one item ahead.
Same items, math and outputs as kv_gluon's MAIN: equal to it in the GPU tests. On the H100 (session 31) the forward
took 2-7% less time at every measured shape (DEFAULT_MIN_GROUP below).
Offline sm_90 build (`python3 scripts/kv_gluon_build.py --kernel ws`): no spills at G = 1-16, D = 64 / 128; 192 KB
of shared memory at D = 128; compute warpgroups at 152 registers (setmaxnreg), the loader at 56.
"""
from __future__ import annotations

import os

import torch

from .._env import env_flag
from .._launch import launcher_for
from . import kv_gluon

NWG = 3  # compute warpgroups per program (the kernel's partition list has three)
STAGES = 4  # shared-memory stages (48 KB each at D = 128: 192 KB)
OUT_BUF = False  # partials through the stage's query buffer (True: one buffer per compute warpgroup; `schedule`)
COMPUTE_REGS = 152  # registers per thread of a compute warpgroup (3 x 128 x 152 plus the loader's 4 warps <= 64K)


# on by default from this group size wherever the Gluon MAIN runs. H100, session 31 (benchmarks/results/h100_session31,
# KV-outer forward ms, off -> on, interleaved, outputs equal): 8K G = 2 1.150 -> 1.126, G = 4 1.135 -> 1.067, G = 8
# 1.126 -> 1.053, G = 16 1.129 -> 1.075; 16K G = 8 2.270 -> 2.141; 64K G = 4 9.719 -> 9.118, G = 8 9.647 -> 9.003.
# G = 1 (the Gluon MAIN without PIPELINE, below 32K tokens) was not timed.
DEFAULT_MIN_GROUP = 2


def enabled(group: int) -> bool:
    """Whether the Gluon MAIN runs as this kernel: SPARSA_KV_GLUON_WS=1 / 0 forces it on / off; unset, on from
    DEFAULT_MIN_GROUP."""
    return env_flag("SPARSA_KV_GLUON_WS", group >= DEFAULT_MIN_GROUP) and kv_gluon.HAVE_GLUON


if kv_gluon.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
    )

    from .kv_gluon import _ROWS, _epilogue, _item_rows, _softmax_pv, _work, row_gather_layout, wgmma_layout

    @gluon.jit
    def _score_meta(TOKS, BLKSTART, BLKLEN, start, end, grp, NBG, G: gl.constexpr, PAIRS: gl.constexpr,
                    score_rows: gl.constexpr, I32: gl.constexpr):
        """What a compute warpgroup needs of an item: (first key, keys in the block, tokens in the score layout,
        the first token)."""
        gb = grp % NBG
        tok = _item_rows(TOKS, start, end, G, PAIRS, score_rows, I32)[3]
        first = gl.load(TOKS + start, mask=start < end, other=0)
        kst = gl.load(BLKSTART + gb)
        if I32:
            kst = kst.to(gl.int32)
        else:
            first = first.to(gl.int64)
        return kst, gl.load(BLKLEN + gb), tok, first

    @gluon.jit
    def _gather_meta(TOKS, BLKSTART, start, end, grp, NBG, h0, G: gl.constexpr, PAIRS: gl.constexpr,
                     gather_rows: gl.constexpr, I32: gl.constexpr):
        """What the loader needs of an item: (KV head, first key, tokens in the gather layout)."""
        tok = _item_rows(TOKS, start, end, G, PAIRS, gather_rows, I32)[3]
        hd = h0 + grp // NBG
        kst = gl.load(BLKSTART + grp % NBG)
        if I32:
            hd = hd.to(gl.int32)
            kst = kst.to(gl.int32)
        return hd, kst, tok

    @gluon.jit
    def _issue_item(j, hd, kst, tok, Q, k_desc, v_desc, q_s, k_s, v_s, ready, empty, Hq, G: gl.constexpr,
                    STAGES_: gl.constexpr, PROBE: gl.constexpr):
        """Waits for stage j % STAGES to be empty, then starts item j's loads into it (rows by cp.async, K and V by
        TMA, all on the stage's `ready` barrier)."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        gather: gl.constexpr = row_gather_layout(D, gl.num_warps())
        g = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, gather)) % G
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, gather))
        s = j % STAGES_
        mbarrier.wait(empty.index(s), ((j // STAGES_) & 1) ^ 1)  # the first round passes at once
        bar = ready.index(s)
        if (PROBE & 1) == 0:
            rows = tok * Hq + hd * G + g  # masked rows point at token 0: a valid address, never stored
            async_copy.async_copy_global_to_shared(q_s.index(s), Q + (rows[:, None] * D + offs_d[None, :]))
            # before the expect's arrival: the phase cannot complete until these rows have landed
            async_copy.mbarrier_arrive(bar)
        if ((PROBE & 2) == 0) | (j < STAGES_):
            mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kst.to(gl.int32), (hd * D).to(gl.int32)], bar, k_s.index(s))
            tma.async_copy_global_to_shared(v_desc, [kst.to(gl.int32), (hd * D).to(gl.int32)], bar, v_s.index(s))
        else:
            mbarrier.arrive(bar, count=1)

    @gluon.jit
    def _ws_loader(Q, k_desc, v_desc, q_s, k_s, v_s, ready, empty, WORK, TOKS, BLKSTART, n_mine, pid, nprog, Hq,
                   NBG, h0, G: gl.constexpr, PAIRS: gl.constexpr, I32: gl.constexpr, STAGES_: gl.constexpr,
                   PROBE: gl.constexpr):
        """Loader: item j's query rows (cp.async), keys and values (TMA) into stage j % STAGES once it is empty, all
        arriving on the stage's `ready` barrier (PROBE: `probe_bits`). Each iteration loads the work entry two items
        ahead and the tokens and block one item ahead (session 32: loading both one item further ahead was 3-7%
        slower)."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        grows: gl.constexpr = gl.SliceLayout(1, row_gather_layout(D, gl.num_warps()))
        start, end, grp = _work(WORK, 0, n_mine, pid, nprog)
        hd, kst, tok = _gather_meta(TOKS, BLKSTART, start, end, grp, NBG, h0, G, PAIRS, grows, I32)
        start1, end1, grp1 = _work(WORK, 1, n_mine, pid, nprog)
        for j in range(n_mine):
            hd1, kst1, tok1 = _gather_meta(TOKS, BLKSTART, start1, end1, grp1, NBG, h0, G, PAIRS, grows, I32)
            start2, end2, grp2 = _work(WORK, j + 2, n_mine, pid, nprog)
            _issue_item(j, hd, kst, tok, Q, k_desc, v_desc, q_s, k_s, v_s, ready, empty, Hq, G, STAGES_, PROBE)
            hd, kst, tok = hd1, kst1, tok1
            start1, end1, grp1 = start2, end2, grp2

    @gluon.jit
    def _ws_compute(WG: gl.constexpr, NWG_: gl.constexpr, STAGES_: gl.constexpr, q_s, k_s, v_s, o_s, ready, empty,
                    op_desc, OP, LSEP, WORK, TOKS, BLKSTART, BLKLEN, qk_scale, n_mine, pid, nprog, NBG,
                    G: gl.constexpr, PAIRS: gl.constexpr, I32: gl.constexpr, PROBE: gl.constexpr,
                    OUT_BUF: gl.constexpr):
        """Compute warpgroup WG: the program's items WG, WG + NWG, ... (PROBE: `probe_bits`). OUT_BUF: the partials go
        through the warpgroup's own buffer o_s[WG] and the stage is released as soon as both MMAs are done; else
        through the stage's query buffer, released once the partial copy has read it."""
        D: gl.constexpr = k_s.shape[2]
        BN: gl.constexpr = k_s.shape[1]
        WARPS: gl.constexpr = gl.num_warps()
        gather: gl.constexpr = row_gather_layout(D, WARPS)
        mma_s: gl.constexpr = wgmma_layout(BN, WARPS)
        srows: gl.constexpr = gl.SliceLayout(1, mma_s)
        start, end, grp = _work(WORK, WG, n_mine, pid, nprog)
        kst, blen, tok, first = _score_meta(TOKS, BLKSTART, BLKLEN, start, end, grp, NBG, G, PAIRS, srows, I32)
        for j in range(WG, n_mine, NWG_):
            start1, end1, grp1 = _work(WORK, j + NWG_, n_mine, pid, nprog)
            kst1, blen1, tok1, first1 = _score_meta(TOKS, BLKSTART, BLKLEN, start1, end1, grp1, NBG, G, PAIRS, srows,
                                                    I32)
            s = j % STAGES_
            mbarrier.wait(ready.index(s), (j // STAGES_) & 1)
            fence_async_shared()  # the loader's cp.async rows, visible to the wgmma (async proxy)
            sc = warpgroup_mma(q_s.index(s), k_s.index(s).permute((1, 0)),
                               gl.zeros([_ROWS, BN], gl.float32, layout=mma_s), use_acc=False)
            acc, m, l = _softmax_pv(sc, v_s.index(s), start, end, kst, blen, tok, first, qk_scale, G, PAIRS)
            gl.thread_barrier()  # every warp is past both MMAs: the stage's operands are read
            if OUT_BUF:
                mbarrier.arrive(empty.index(s), count=1)
                buf = o_s.index(WG)  # _epilogue waits for this buffer's previous copy first
            else:
                buf = q_s.index(s)
            if (PROBE & 4) == 0:
                _epilogue(acc, m, l, buf, op_desc, OP, LSEP, start, end, G, PAIRS, gather, True)
            elif qk_scale < 0.0:  # never true: keeps the math that feeds the stores
                _epilogue(acc, m, l, buf, op_desc, OP, LSEP, start, end, G, PAIRS, gather, True)
            if not OUT_BUF:
                tma.store_wait(0)  # the partial copy has read the stage
                gl.thread_barrier()
                mbarrier.arrive(empty.index(s), count=1)
            start, end, kst, blen, tok, first = start1, end1, kst1, blen1, tok1, first1
        if OUT_BUF:
            tma.store_wait(0)  # the last partial copy has read the warpgroup's buffer

    @gluon.jit
    def _kv_main_gluon_ws_kernel(Q, k_desc, v_desc, op_desc, OP, LSEP, WORK, TOKS, BLKSTART, BLKLEN, qk_scale,
                                 n_items, Hq, NBG, h0, G: gl.constexpr, PAIRS: gl.constexpr, Q_LAYOUT: gl.constexpr,
                                 I32: gl.constexpr, NWG_: gl.constexpr, STAGES_: gl.constexpr,
                                 COMPUTE_REGS_: gl.constexpr, PROBE: gl.constexpr = 0, OUT_BUF: gl.constexpr = False):
        """MAIN over the items pid, pid + P, ... of the work list (one program per SM): the default partition (the
        kernel's 4 warps) loads, the NWG workers compute."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        dtype: gl.constexpr = k_desc.dtype
        q_s = gl.allocate_shared_memory(dtype, [STAGES_, _ROWS, D], Q_LAYOUT)
        k_s = gl.allocate_shared_memory(dtype, [STAGES_, BN, D], k_desc.layout)
        v_s = gl.allocate_shared_memory(dtype, [STAGES_, BN, D], v_desc.layout)
        if OUT_BUF:
            o_s = gl.allocate_shared_memory(dtype, [NWG_, _ROWS, D], Q_LAYOUT)
        else:
            o_s = q_s  # unused
        ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES_):
            mbarrier.init(ready.index(s), count=1)  # the loader's expect; the cp.async arrivals add and remove one
            mbarrier.init(empty.index(s), count=1)  # the one compute warpgroup of the stage's item
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        n_mine = gl.cdiv(n_items - pid, nprog)  # >= 1: the host launches at most n_items programs
        # the default partition (the kernel's 4 warps) loads; the compute warpgroups are workers, so that each gets
        # COMPUTE_REGS registers (the default partition's count is what the workers leave)
        gl.static_assert(NWG_ == 3, "three compute warpgroups (the partition list below)")
        gl.warp_specialize(
            [
                (_ws_loader, (Q, k_desc, v_desc, q_s, k_s, v_s, ready, empty, WORK, TOKS, BLKSTART, n_mine, pid,
                              nprog, Hq, NBG, h0, G, PAIRS, I32, STAGES_, PROBE)),
                (_ws_compute, (0, NWG_, STAGES_, q_s, k_s, v_s, o_s, ready, empty, op_desc, OP, LSEP, WORK, TOKS,
                               BLKSTART, BLKLEN, qk_scale, n_mine, pid, nprog, NBG, G, PAIRS, I32, PROBE, OUT_BUF)),
                (_ws_compute, (1, NWG_, STAGES_, q_s, k_s, v_s, o_s, ready, empty, op_desc, OP, LSEP, WORK, TOKS,
                               BLKSTART, BLKLEN, qk_scale, n_mine, pid, nprog, NBG, G, PAIRS, I32, PROBE, OUT_BUF)),
                (_ws_compute, (2, NWG_, STAGES_, q_s, k_s, v_s, o_s, ready, empty, op_desc, OP, LSEP, WORK, TOKS,
                               BLKSTART, BLKLEN, qk_scale, n_mine, pid, nprog, NBG, G, PAIRS, I32, PROBE, OUT_BUF)),
            ],
            [4, 4, 4],
            [COMPUTE_REGS_, COMPUTE_REGS_, COMPUTE_REGS_],
        )


def probe_bits() -> int:
    """SPARSA_KV_WS_PROBE (timing probes only: the outputs are wrong with any bit set): 1 skips the query-row
    gathers, 2 loads K / V only into each stage's first item, 4 skips the partial stores (scripts/kv_ws_probe.py)."""
    raw = os.environ.get("SPARSA_KV_WS_PROBE", "0")
    if not raw.isdigit() or int(raw) > 7:
        raise ValueError(f"SPARSA_KV_WS_PROBE must be an integer 0-7 (bits 1, 2, 4), got {raw!r}")
    return int(raw)


def schedule() -> tuple[int, bool]:
    """(stages, OUT_BUF): SPARSA_KV_WS_CONFIG = "3xS" or "3xSo" (S stages, o: a partial buffer per compute warpgroup,
    the stage released right after the MMAs) for A/B runs; unset, the module's (STAGES, OUT_BUF). Session 32 also
    measured two compute warpgroups (12-17% slower) and metadata loads one item further ahead (3-7% slower): removed."""
    raw = os.environ.get("SPARSA_KV_WS_CONFIG", "")
    if not raw:
        return STAGES, OUT_BUF
    prefix, _, rest = raw.partition("x")
    stages = rest.removesuffix("o")
    if prefix != str(NWG) or not stages.isdigit() or not 2 <= int(stages) <= 6:
        raise ValueError(f"SPARSA_KV_WS_CONFIG must look like 3x4 or 3x3o (3 compute warpgroups, 2-6 stages, o: a "
                         f"partial buffer per warpgroup), got {raw!r}")
    return int(stages), rest.endswith("o")


def _consts(group: int, d: int, bf16: bool, i32: bool, probe: int = 0, sched: tuple | None = None) -> dict:
    stages, out_buf = sched or schedule()
    return dict(G=group, PAIRS=kv_gluon.pairs_per_item(group), Q_LAYOUT=kv_gluon._smem_layout(kv_gluon.ROWS, d, bf16),
                I32=i32, NWG_=NWG, STAGES_=stages, COMPUTE_REGS_=COMPUTE_REGS, PROBE=probe, OUT_BUF=out_buf)


def launch_main(q, k, v, op, lsep, work, index, meta, scale_log2: float):
    """kv_gluon.launch_main with this kernel: one program per SM (at most one per item)."""
    n_items = work.shape[0]
    if n_items == 0:
        return
    grid = (max(1, min(n_items, kv_gluon._sm_count(q.device.index or 0))),)
    i32 = kv_gluon.OFFSETS_I32 and q.numel() < 2**31
    args = (q, kv_gluon._kv_descriptor(k), kv_gluon._kv_descriptor(v), kv_gluon._partial_descriptor(op), op, lsep,
            work, index.toks, meta.blk_start, meta.blk_len, scale_log2, n_items, q.shape[1], meta.n_blocks, index.h0)
    consts = _consts(q.shape[1] // k.shape[1], q.shape[2], q.dtype == torch.bfloat16, i32, probe_bits())
    launcher = launcher_for("gluon:_kv_main_gluon_ws_kernel", _kv_main_gluon_ws_kernel)
    launcher(_kv_main_gluon_ws_kernel, lambda meta_: grid, args, consts, {"num_warps": 4})


def compile_offline(group: int = 4, d: int = 128, sched: tuple | None = None):
    """The kernel compiled for sm_90 without a GPU (bf16, int32 offsets): its registers and shared memory. sched:
    (stages, OUT_BUF) (None: `schedule`)."""
    return kv_gluon.compile_main_offline(_kv_main_gluon_ws_kernel, _consts(group, d, True, True, 0, sched), d)
