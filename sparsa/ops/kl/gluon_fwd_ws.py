"""Warp-specialised variant of the Gluon StreamKL forward (gluon_fwd.py): a loader warp and two compute
warpgroups that share the key tiles. Config ws,64,4,1 is the default forward on Hopper from 8192 keys
(gluon_fwd.choose_config; measured on the H100 in session 7, docs/kernels/attention_kl.md).

One program covers 128 query rows of one head: compute warpgroup w (w = 0, 1) owns rows
[m0 + 64 w, m0 + 64 w + 64). Both read every key tile from the same ring of STAGES shared-memory stages,
so a key tile costs one L2 read per 128 rows. With 64 rows per program, as in gluon_fwd.py's measured
config, it costs one per 64 rows. A single loader warp issues the TMA loads:
- `ready[s]`: the TMA transaction count of stage s;
- `empty[s]`: both warpgroups are done with stage s (count 2). A warpgroup releases a tile's stage as soon
  as that tile's GEMMs have completed, because the logits are in registers by then.
The compute loop is gluon_fwd's: the next tile's two wgmmas run while the current tile's update does.
Both warpgroups run every key tile of the program (the first one's last tile is fully masked), so that
each stage always gets its two releases.
"""
from __future__ import annotations

from . import gluon_fwd

if gluon_fwd.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma_wait

    from .gluon_fwd import (_issue_mmas, _q_operands, _query_tile_ranges, _running_init, _store_rows, _tile_pids,
                            _update, _update_tile)

    WG_ROWS = gl.constexpr(64)  # query rows per compute warpgroup
    LOADER_REGS = gl.constexpr(24)  # registers per thread of the loader warp
    COMPUTE_REGS = gl.constexpr(240)  # registers per thread of the second compute warpgroup (a worker partition)

    @gluon.jit
    def _ws_loader(qp_desc, qq_desc, kp_desc, kq_desc, qp_s, qq_s, kp_s, kq_s, q_ready, ready, empty,
                   q_row, col_q_tile, n_kt, key_row, col_p, col_q, BN: gl.constexpr, STAGES: gl.constexpr):
        """Loader warp: both warpgroups' Q tiles, then key tile t into stage t % STAGES once it is empty."""
        rows: gl.constexpr = qp_desc.block_type.shape[0]
        mbarrier.expect(q_ready, 4 * qp_desc.block_type.nbytes)
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(qp_desc, [q_row + w * rows, col_q_tile], q_ready, qp_s.index(w))
            tma.async_copy_global_to_shared(qq_desc, [q_row + w * rows, col_q_tile], q_ready, qq_s.index(w))
        for t in range(0, n_kt):
            s = t % STAGES
            mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)  # the first round passes at once
            bar = ready.index(s)
            mbarrier.expect(bar, kp_desc.block_type.nbytes + kq_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(kp_desc, [key_row + t * BN, col_p], bar, kp_s.index(s))
            tma.async_copy_global_to_shared(kq_desc, [key_row + t * BN, col_q], bar, kq_s.index(s))

    @gluon.jit
    def _ws_compute(WG: gl.constexpr, qp_s, qq_s, kp_s, kq_s, q_ready, ready, empty, KL, LSEP, LSEQ,
                    skl_b, skl_t, skl_h, slse_b, slse_h, b, h, m0, n_kt, n_q, n_k, scale_p2, scale_q2,
                    CAUSAL: gl.constexpr, SAME_SCALE: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                    QREG: gl.constexpr):
        """Compute warpgroup WG: rows [m0 + 64 WG, m0 + 64 WG + 64) over key tiles [0, n_kt)."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        r0 = m0 + WG * WG_ROWS
        off = n_k - n_q
        n_full, _ = _query_tile_ranges(r0, n_q, n_k, CAUSAL, WG_ROWS, BN)
        offs_m = r0 + gl.arange(0, WG_ROWS, layout=rows_l)
        cols = gl.arange(0, BN, layout=cols_l)
        zero = gl.zeros([WG_ROWS, BN], gl.float32, layout=mma)
        m_p, l_p, acc, m_q, l_q = _running_init(WG_ROWS, rows_l)

        mbarrier.wait(q_ready, 0)
        qp_op, qq_op = _q_operands(qp_s.index(WG), qq_s.index(WG), mma, QREG)
        xa, xb = _issue_mmas(qp_op, qq_op, kp_s, kq_s, ready, 0, zero, zero, STAGES)
        xa, xb = warpgroup_mma_wait(num_outstanding=0, deps=(xa, xb))
        for j in range(0, n_kt - 1):
            mbarrier.arrive(empty.index(j % STAGES), count=1)  # tile j's logits are in registers
            na, nb = _issue_mmas(qp_op, qq_op, kp_s, kq_s, ready, j + 1, zero, zero, STAGES)
            m_p, l_p, acc, m_q, l_q = _update_tile(xa, xb, j, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q,
                                                   l_q, scale_p2, scale_q2, CAUSAL, SAME_SCALE, BN)
            xa, xb = warpgroup_mma_wait(num_outstanding=0, deps=(na, nb))
        m_p, l_p, acc, m_q, l_q = _update(xa, xb, (n_kt - 1) * BN + cols, offs_m, n_k, off, m_p, l_p, acc, m_q,
                                          l_q, scale_p2, scale_q2, True, CAUSAL, False, SAME_SCALE)

        _store_rows(m_p, l_p, acc, m_q, l_q, offs_m, n_q, b, h, KL, LSEP, LSEQ, skl_b, skl_t, skl_h, slse_b, slse_h)

    @gluon.jit
    def _kl_fwd_ws_kernel(
        qp_desc, kp_desc, qq_desc, kq_desc, KL, LSEP, LSEQ,
        skl_b, skl_t, skl_h, slse_b, slse_h,
        n_q, n_k, n_heads, group_p, group_q, scale_p2, scale_q2, n_bh, head_group,
        CAUSAL: gl.constexpr, SAME_SCALE: gl.constexpr, STAGES: gl.constexpr, QREG: gl.constexpr,
    ):
        BM: gl.constexpr = 2 * WG_ROWS
        D: gl.constexpr = qp_desc.block_type.shape[1]
        BN: gl.constexpr = kp_desc.block_type.shape[0]
        tile, n_tiles, pid_bh = _tile_pids(n_bh, head_group)
        pid_m = n_tiles - 1 - tile  # heavy (late) causal tiles first
        h = pid_bh % n_heads
        b = pid_bh // n_heads
        m0 = pid_m * BM
        _, hi = _query_tile_ranges(m0, n_q, n_k, CAUSAL, BM, BN)
        n_kt = gl.maximum(gl.cdiv(hi, BN), 1)

        qp_s = gl.allocate_shared_memory(qp_desc.dtype, [2, WG_ROWS, D], qp_desc.layout)
        qq_s = gl.allocate_shared_memory(qq_desc.dtype, [2, WG_ROWS, D], qq_desc.layout)
        kp_s = gl.allocate_shared_memory(kp_desc.dtype, [STAGES, BN, D], kp_desc.layout)
        kq_s = gl.allocate_shared_memory(kq_desc.dtype, [STAGES, BN, D], kq_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # one release per compute warpgroup

        gl.warp_specialize(
            [
                (_ws_compute, (0, qp_s, qq_s, kp_s, kq_s, q_ready, ready, empty, KL, LSEP, LSEQ,
                               skl_b, skl_t, skl_h, slse_b, slse_h, b, h, m0, n_kt, n_q, n_k, scale_p2, scale_q2,
                               CAUSAL, SAME_SCALE, BN, STAGES, QREG)),
                (_ws_compute, (1, qp_s, qq_s, kp_s, kq_s, q_ready, ready, empty, KL, LSEP, LSEQ,
                               skl_b, skl_t, skl_h, slse_b, slse_h, b, h, m0, n_kt, n_q, n_k, scale_p2, scale_q2,
                               CAUSAL, SAME_SCALE, BN, STAGES, QREG)),
                (_ws_loader, (qp_desc, qq_desc, kp_desc, kq_desc, qp_s, qq_s, kp_s, kq_s, q_ready, ready, empty,
                              b * n_q + m0, h * D, n_kt, b * n_k, (h // group_p) * D, (h // group_q) * D,
                              BN, STAGES)),
            ],
            [4, 1],
            [COMPUTE_REGS, LOADER_REGS],
        )

