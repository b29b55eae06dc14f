"""KV-outer dK/dV for Hopper (sm_90) in Gluon: the backward's block kernel with its gathered rows in flight.

Same work items, math and outputs (dK, dV or their fp32 split slots, and the per-(pair, head) dQ partials) as
backward._kv_bwd_kernel with the block's keys as the MMA rows; only the schedule differs. At G = 4 the Triton kernel
runs one program of 8 warps per SM and loads each tile of gathered query and dO rows when it needs them: Nsight Compute
(H100, session 14) found no eligible warp in 84% of its cycles at 64K tokens, G = 4. Here a program of one
warpgroup (two per SM) takes one work item: K and V of its block by TMA, and while it computes tile t of the item's
rows, tile t + 1's query and dO rows (cp.async gathers) and their log-sum-exp and delta are in flight.

Per tile of 64 rows (64 // G pairs x G heads), with the block's 64 keys as the MMA rows:
  S^T = K Q^T and dP^T = V dO^T (both in flight at once), P^T = exp2(S^T * scale * log2 e - lse2),
  dV += P^T dO and dK += dS^T Q with P^T and dS^T = P^T (dP^T - delta) from registers,
  dQ_pair = dS K with dS from shared memory (transposed view), stored by one TMA copy for full tiles.
Scope (`covers`): CUDA capability 9.x, bf16 (its dQ partials are bf16, backward.DQ_PARTIAL_DTYPE), head dims
D = Dv in {64, 128}, block size 64, G <= 64. SPARSA_KV_GLUON_BWD=1 / 0 forces it on / off; unset, on (`DEFAULT_ON`:
measured faster than the Triton dK/dV at every G and N on the H100, session 16).
"""
from __future__ import annotations

import os

import torch

from .._env import env_flag
from .._launch import launcher_for
from . import kv_gluon
from .kv_gluon import BLOCK, HAVE_GLUON, ROWS

if HAVE_GLUON:
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

# rows of the dQ partials a call takes (TMA store coordinates are int32)
MAX_PARTIAL_ROWS = kv_gluon.MAX_PARTIAL_ROWS
# unset SPARSA_KV_GLUON_BWD: on. H100, session 16 (benchmarks/results/h100_session16; docs/kernels/sparse_attention.md,
# "dK/dV in Gluon"): forward+backward faster at every measured N and G (8K-128K; G = 1, 4, 8, 16 against the Triton
# dK/dV in one process, G = 2 against session 15's sweep), e.g. 64K G = 4 25.96-26.35 -> 22.74 ms, 8K G = 4
# 3.19-3.22 -> 2.75; gradients within 5e-4 of the Triton kernel's (equal where the items are the same)
DEFAULT_ON = True


def enabled() -> bool:
    """Whether the backward's block kernel runs here where `eligible` holds (SPARSA_KV_GLUON_BWD=1 / 0)."""
    return env_flag("SPARSA_KV_GLUON_BWD", DEFAULT_ON) and HAVE_GLUON


def covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """The module docstring's scope: kv_gluon.covers in bf16 (bf16 dQ partials)."""
    return q.dtype == torch.bfloat16 and kv_gluon.covers(q, k, v, block_size, local=False)


def eligible(q, k, v, do, block_size: int) -> bool:
    """A Hopper GPU, `covers`, and dO laid out as q (its rows are gathered with q's offsets)."""
    return (kv_gluon.on_hopper(q) and covers(q, k, v, block_size) and do.shape == q.shape and do.is_contiguous()
            and do.data_ptr() % 16 == 0)


def pairs_per_tile(group: int) -> int:
    """Pairs per tile of rows: ROWS // G."""
    return ROWS // group


# tiles per work item (hot groups are cut into items whose dK/dV are summed from fp32 slots): an item's tiles run one
# after the other in one program, so long items leave a tail at small N, and short ones add slots (written, read back
# and summed one after the other by the split reduction), which cost more the larger N. Below LARGE_TOKENS an item
# has SMALL_TILES tiles, or MIN_PAIRS_PER_ITEM pairs where that is more (G = 16); from LARGE_TOKENS on, LARGE_TILES
# tiles; always at most backward.MAX_PAIRS_PER_ITEM pairs in whole tiles (2048: G <= 8 at large N). Fwd+bwd ms on
# the H100 with 16 / 32 / 64 / 128 / 256 tiles per item (session 16, gluon_bwd_tiles*.log; no MIN_PAIRS_PER_ITEM there):
#   G = 4:  8K 2.76 / 2.67 / 2.72 / 2.85,   16K 5.80 / 5.54 / 5.42 / 5.53,   64K 25.28 / 23.42 / 22.50 / 22.32
#   G = 8:  8K 2.84 / 2.71 / 2.73 / 3.01,   16K 5.95 / 5.63 / 5.48 / 5.40 / 5.56, 32K - / - / 11.07 / 10.92 / 10.89,
#           64K 26.69 / 24.29 / 22.98 / 22.40,   128K - / - / 48.81 / 46.77 / 45.39
#   G = 16: 8K 3.07 / 2.87 / 2.78 / 2.74,   16K 6.27 / 5.79 / 5.58 / 5.45 / 5.35, 32K - / - / 10.96 / 10.70 / 10.59,
#           64K 28.41 / 24.92 / 22.91 / 21.87,   128K - / - / 46.69 / 45.63 / 43.96
SMALL_TILES = 64
MIN_PAIRS_PER_ITEM = 512
LARGE_TOKENS = 32768
LARGE_TILES = 256
MAX_TILES_PER_ITEM: int | None = None  # forced by the A/B script (kv_gluon_bwd_ab.py --tiles): this many at every N


def pairs_per_item(group: int, n_tokens: int = 0, max_pairs: int | None = None) -> int:
    """Pairs per dK/dV work item at most, in whole tiles (the comment above); max_pairs (the backward passes
    backward.MAX_PAIRS_PER_ITEM) caps it, rounded down to whole tiles (one tile at least)."""
    tile = pairs_per_tile(group)
    if MAX_TILES_PER_ITEM is not None:
        tiles = MAX_TILES_PER_ITEM
    elif n_tokens >= LARGE_TOKENS:
        tiles = LARGE_TILES
    else:
        tiles = max(SMALL_TILES, MIN_PAIRS_PER_ITEM // tile)
    if max_pairs is not None:
        tiles = min(tiles, max(max_pairs // tile, 1))
    return tiles * tile


if HAVE_GLUON:
    _ROWS = gl.constexpr(ROWS)
    _LOG2E = gl.constexpr(1.4426950408889634)

    @gluon.jit
    def _issue_rows(t, start, end, tok_g, tok_v, h, Q, DO, LSE, DELTA, q_s, do_s, ld_s, Hq, G: gl.constexpr,
                    PAIRS: gl.constexpr, gather: gl.constexpr, vec: gl.constexpr):
        """Starts the gathers of tile t (pairs start + t * PAIRS ...) into stage t % 2: its query and dO rows and
        their lse and delta (one commit group; past the item's end the rows point at token 0, never used)."""
        D: gl.constexpr = q_s.shape[2]
        s = t % 2
        g = gl.arange(0, _ROWS, layout=gl.SliceLayout(1, gather)) % G
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, gather))
        rows = (tok_g * Hq + h * G + g).to(gl.int64)
        async_copy.async_copy_global_to_shared(q_s.index(s), Q + (rows[:, None] * D + offs_d[None, :]))
        async_copy.async_copy_global_to_shared(do_s.index(s), DO + (rows[:, None] * D + offs_d[None, :]))
        r = gl.arange(0, 2 * _ROWS, layout=vec)
        rows_v = (tok_v * Hq + h * G + (r % _ROWS) % G).to(gl.int64)
        ptrs = gl.where(r < _ROWS, LSE + rows_v, DELTA + rows_v)  # [2 * ROWS]: the rows' lse, then their delta
        async_copy.async_copy_global_to_shared(ld_s.index(s), ptrs)
        async_copy.commit_group()

    @gluon.jit
    def _tile_tokens(TOKS, start, end, t, G: gl.constexpr, PAIRS: gl.constexpr, gather_rows: gl.constexpr,
                     vec_rows: gl.constexpr):
        """Tokens of tile t's rows in the gather and the lse layouts, and its first (smallest) token."""
        p0 = start + t * PAIRS
        tok_g = kv_gluon._item_rows(TOKS, p0, end, G, PAIRS, gather_rows, True)[3]
        r = gl.arange(0, 2 * _ROWS, layout=vec_rows) % _ROWS  # the lse / delta copy: each row twice
        tok_v = gl.load(TOKS + p0 + r // G, mask=(r // G < PAIRS) & (p0 + r // G < end), other=0)
        first = gl.load(TOKS + p0, mask=p0 < end, other=0)
        return tok_g, tok_v, first

    @gluon.jit
    def _tile_grads(s, q_s, do_s, ld_s, ds_s, k_s, v_s, dk, dv, TOKS, p0, end, kst, blen, first, qk_scale,
                    G: gl.constexpr, PAIRS: gl.constexpr, WRITE_DQ: gl.constexpr):
        """One tile of rows in stage s against the item's block: (dk + dS^T Q, dv + P^T dO), fp32, the block's keys
        as the rows of dk, dv; with WRITE_DQ dS^T is left in ds_s for the tile's dQ_pair (_tile_dq)."""
        D: gl.constexpr = q_s.shape[2]
        BN: gl.constexpr = k_s.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        mma_s: gl.constexpr = kv_gluon.wgmma_layout(_ROWS, WARPS)
        mma_o: gl.constexpr = kv_gluon.wgmma_layout(D, WARPS)
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        cols: gl.constexpr = gl.SliceLayout(0, mma_s)
        zeros = gl.zeros([BN, _ROWS], gl.float32, layout=mma_s)
        st_tok = warpgroup_mma(k_s, q_s.index(s).permute((1, 0)), zeros, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v_s, do_s.index(s).permute((1, 0)), zeros, use_acc=False, is_async=True)
        ld = ld_s.index(s)
        n_rows = gl.minimum((end - p0) * G, PAIRS * G).to(gl.int32)  # the tile's rows; the others get P = 0
        c = gl.arange(0, _ROWS, layout=cols)
        lse2 = gl.where(c < n_rows, ld.slice(0, _ROWS).load(cols) * _LOG2E, float("inf"))
        st = warpgroup_mma_wait(1, deps=[st_tok, k_s])[0]
        if (blen < BN) | (first < kst + BN - 1):  # the tokens' own block, or a short last block of a document
            tok = kv_gluon._item_rows(TOKS, p0, end, G, PAIRS, cols, True)[3]
            last = gl.minimum(tok - kst.to(gl.int32), blen - 1)  # the last key offset each row may see
            offs_n = gl.arange(0, BN, layout=gl.SliceLayout(1, mma_s))
            st = gl.where(offs_n[:, None] <= last[None, :], st, float("-inf"))
        pt = gl.exp2(st * qk_scale - lse2[None, :])
        dpt = warpgroup_mma_wait(0, deps=[dpt_tok, k_s, v_s])[0]
        delta = ld.slice(_ROWS, _ROWS).load(cols)  # loaded here: fewer registers live at once
        ds_b = (pt * (dpt - delta[None, :])).to(q_s.dtype)
        dv_tok = warpgroup_mma(gl.convert_layout(pt.to(q_s.dtype), a_op), do_s.index(s), dv, is_async=True)
        if WRITE_DQ:
            ds_s.store(ds_b)
        dk_tok = warpgroup_mma(gl.convert_layout(ds_b, a_op), q_s.index(s), dk, is_async=True)
        if WRITE_DQ:
            fence_async_shared()
            gl.thread_barrier()  # every thread's dS^T is in ds_s
        dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, q_s.index(s), do_s.index(s)])[:2]
        return dk, dv

    @gluon.jit
    def _tile_dq(ds_s, k_s):
        """dQ_pair = dS K (unscaled, fp32) of the tile whose dS^T _tile_grads left in ds_s."""
        D: gl.constexpr = k_s.shape[1]
        mma_o: gl.constexpr = kv_gluon.wgmma_layout(D, gl.num_warps())
        return warpgroup_mma(ds_s.permute((1, 0)), k_s, gl.zeros([_ROWS, D], gl.float32, layout=mma_o), use_acc=False)

    @gluon.jit
    def _store_dq(dq, buf, dqp_desc, DQP, p0, end, scale, G: gl.constexpr, PAIRS: gl.constexpr, gather: gl.constexpr):
        """dQ_pair * scale of a tile (rows p0 * G + r) through buf (the tile's query stage, read by now): one TMA copy
        when the tile has all ROWS rows, masked row stores otherwise."""
        n_rows = gl.minimum((end - p0) * G, PAIRS * G).to(gl.int32)
        kv_gluon.rows_out((dq * scale).to(buf.dtype), buf, dqp_desc, DQP, p0 * G, n_rows, gather)

    @gluon.jit
    def _store_block(dk, dv, k_s, v_s, dk_desc, dv_desc, DK, DVv, DKP, DVP, slot, h, kst, blen, Hkv,
                     gather: gl.constexpr):
        """The item's dK, dV: into its fp32 split slot (slot >= 0), or in the input dtype into dk / dv rows
        kst..kst + blen of KV head h (one TMA copy each for a full block; through k_s / v_s, read by now)."""
        D: gl.constexpr = k_s.shape[1]
        BN: gl.constexpr = k_s.shape[0]
        if slot >= 0:
            rl: gl.constexpr = gl.SliceLayout(1, dk.type.layout)
            cl: gl.constexpr = gl.SliceLayout(0, dk.type.layout)
            off = (slot.to(gl.int64) * (BN * D) + gl.arange(0, BN, layout=rl)[:, None] * D
                   + gl.arange(0, D, layout=cl)[None, :])
            gl.store(DKP + off, dk)
            gl.store(DVP + off, dv)
        else:
            gl.thread_barrier()
            k_s.store(dk.to(k_s.dtype))
            v_s.store(dv.to(v_s.dtype))
            fence_async_shared()
            gl.thread_barrier()
            if blen == BN:
                tma.async_copy_shared_to_global(dk_desc, [kst.to(gl.int32), (h * D).to(gl.int32)], k_s)
                tma.async_copy_shared_to_global(dv_desc, [kst.to(gl.int32), (h * D).to(gl.int32)], v_s)
            else:
                rn = gl.arange(0, BN, layout=gl.SliceLayout(1, gather))
                offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, gather))
                rows = ((kst + rn) * Hkv + h).to(gl.int64)
                mask = (rn < blen)[:, None]
                gl.store(DK + rows[:, None] * D + offs_d[None, :], k_s.load(gather), mask=mask)
                gl.store(DVv + rows[:, None] * D + offs_d[None, :], v_s.load(gather), mask=mask)

    @gluon.jit
    def _kv_bwd_gluon_kernel(Q, DO, LSE, DELTA, k_desc, v_desc, dk_desc, dv_desc, dqp_desc, DQP, DK, DVv, DKP, DVP,
                             WORK, TOKS, BLKSTART, BLKLEN, scale, qk_scale, Hq, Hkv, NBG, h0, G: gl.constexpr,
                             PAIRS: gl.constexpr, Q_LAYOUT: gl.constexpr, DS_LAYOUT: gl.constexpr,
                             WRITE_DQ: gl.constexpr, PROBE: gl.constexpr = 0):
        """dK/dV and (WRITE_DQ) the dQ partials of work item program_id (one warpgroup). Iteration t starts tile
        t + 1's gathers and loads tile t + 2's tokens, then computes tile t: only the item's first tile waits on a
        load. PROBE (timing only, `probe_bits`): 1 gathers only the first tile's rows, 4 computes the dQ partials
        without storing them."""
        D: gl.constexpr = k_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        gather: gl.constexpr = kv_gluon.row_gather_layout(D, WARPS)
        vec: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])  # [2 * ROWS]: lse, delta
        mma_o: gl.constexpr = kv_gluon.wgmma_layout(D, WARPS)
        grows: gl.constexpr = gl.SliceLayout(1, gather)

        w = gl.program_id(0).to(gl.int64)
        start = gl.load(WORK + w * 4)
        end = gl.load(WORK + w * 4 + 1)
        grp = gl.load(WORK + w * 4 + 2)
        slot = gl.load(WORK + w * 4 + 3)
        if start < end:
            gb = grp % NBG
            h = (h0 + grp // NBG).to(gl.int32)
            kst = gl.load(BLKSTART + gb).to(gl.int32)
            blen = gl.load(BLKLEN + gb)
            dtype: gl.constexpr = k_desc.dtype
            q_s = gl.allocate_shared_memory(dtype, [2, _ROWS, D], Q_LAYOUT)
            do_s = gl.allocate_shared_memory(dtype, [2, _ROWS, D], Q_LAYOUT)
            ld_s = gl.allocate_shared_memory(gl.float32, [2, 2 * _ROWS], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
            ds_s = gl.allocate_shared_memory(dtype, [BN, _ROWS], DS_LAYOUT)
            k_s = gl.allocate_shared_memory(dtype, [BN, D], k_desc.layout)
            v_s = gl.allocate_shared_memory(dtype, [BN, D], v_desc.layout)
            kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(kv_bar, count=1)
            mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kst, h * D], kv_bar, k_s)
            tma.async_copy_global_to_shared(v_desc, [kst, h * D], kv_bar, v_s)

            n_tiles = gl.cdiv(end - start, PAIRS).to(gl.int32)
            tok_g, tok_v, first = _tile_tokens(TOKS, start, end, 0, G, PAIRS, grows, vec)
            _issue_rows(0, start, end, tok_g, tok_v, h, Q, DO, LSE, DELTA, q_s, do_s, ld_s, Hq, G, PAIRS, gather, vec)
            tok_g1, tok_v1, first1 = _tile_tokens(TOKS, start, end, 1, G, PAIRS, grows, vec)
            dk = gl.zeros([BN, D], gl.float32, layout=mma_o)
            dv = gl.zeros([BN, D], gl.float32, layout=mma_o)
            mbarrier.wait(kv_bar, 0)
            for t in range(n_tiles):
                tma.store_wait(0)  # tile t - 1's dQ copy has read its stage
                gl.thread_barrier()  # and every thread's masked dQ stores have (stage (t + 1) % 2)
                if (PROBE & 1) == 0:
                    _issue_rows(t + 1, start, end, tok_g1, tok_v1, h, Q, DO, LSE, DELTA, q_s, do_s, ld_s, Hq, G,
                                PAIRS, gather, vec)
                else:
                    async_copy.commit_group()  # an empty group: the waits below count the same
                tok_g2, tok_v2, first2 = _tile_tokens(TOKS, start, end, t + 2, G, PAIRS, grows, vec)
                async_copy.wait_group(1)  # tile t's group (only tile t + 1's may be pending)
                fence_async_shared()
                gl.thread_barrier()
                s = t % 2
                p0 = start + t * PAIRS
                dk, dv = _tile_grads(s, q_s, do_s, ld_s, ds_s, k_s, v_s, dk, dv, TOKS, p0, end, kst, blen, first,
                                     qk_scale, G, PAIRS, WRITE_DQ)
                if WRITE_DQ:
                    if (PROBE & 4) == 0:
                        _store_dq(_tile_dq(ds_s, k_s), q_s.index(s), dqp_desc, DQP, p0, end, scale, G, PAIRS, gather)
                    else:
                        dq = _tile_dq(ds_s, k_s)
                        if scale < 0.0:  # never true: keeps the dQ MMA
                            _store_dq(dq, q_s.index(s), dqp_desc, DQP, p0, end, scale, G, PAIRS, gather)
                first = first1
                tok_g1, tok_v1, first1 = tok_g2, tok_v2, first2
            async_copy.wait_group(0)
            tma.store_wait(0)
            _store_block(dk * scale, dv, k_s, v_s, dk_desc, dv_desc, DK, DVv, DKP, DVP, slot, h, kst, blen, Hkv,
                         gather)
            tma.store_wait(0)
            mbarrier.invalidate(kv_bar)


def _ds_layout():
    return kv_gluon._smem_layout(BLOCK, ROWS, True)


def probe_bits() -> int:
    """SPARSA_KV_BWD_PROBE (timing probes only: the gradients are wrong with any bit set): 1 gathers only each
    item's first tile of query / dO rows, 4 skips the dQ partial stores (their MMA kept); scripts/kv_bwd_probe.py."""
    raw = os.environ.get("SPARSA_KV_BWD_PROBE", "0")
    if raw not in ("0", "1", "4", "5"):
        raise ValueError(f"SPARSA_KV_BWD_PROBE must be 0, 1, 4 or 5, got {raw!r}")
    return int(raw)


def launch_dkdv(q, k, v, do, lse, delta, dqp, dk, dv, dkp, dvp, work, index, meta, scale: float, write_dq: bool = True):
    """dK/dV over the dK/dV work list `work` [W, 4] (items of whole tiles of pairs_per_tile(G) pairs) of `index`
    (a head slice): dk, dv (or the split slots dkp, dvp) and, with write_dq, the dQ partials dqp [pairs * G, D]
    (bf16; without, dqp is only a placeholder for the descriptor)."""
    from .q_outer import LOG2E

    group = q.shape[1] // k.shape[1]
    if work.shape[0] == 0:
        return
    args = (q, do, lse, delta, kv_gluon._kv_descriptor(k), kv_gluon._kv_descriptor(v), kv_gluon._kv_descriptor(dk),
            kv_gluon._kv_descriptor(dv), kv_gluon._partial_descriptor(dqp), dqp,
            dk, dv, dkp, dvp, work, index.toks, meta.blk_start, meta.blk_len, scale, scale * LOG2E, q.shape[1],
            k.shape[1], meta.n_blocks, index.h0)
    consts = dict(G=group, PAIRS=pairs_per_tile(group), Q_LAYOUT=kv_gluon._smem_layout(ROWS, q.shape[2], True),
                  DS_LAYOUT=_ds_layout(), WRITE_DQ=write_dq, PROBE=probe_bits())
    kernel = _kv_bwd_gluon_kernel
    launcher = launcher_for("gluon:" + kernel.fn.__name__, kernel)
    launcher(kernel, lambda meta_: (work.shape[0],), args, consts, {"num_warps": 4})


def compile_offline(group: int = 4, d: int = 128, write_dq: bool = True, probe: int = 0):
    """The kernel compiled for sm_90 without a GPU (bf16): tests and scripts read its registers and shared memory
    (probe: the PROBE bits of a timing probe)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    fn = _kv_bwd_gluon_kernel
    names = fn.arg_names
    desc = mangle_type(kv_gluon._kv_descriptor(torch.zeros(256, 2, d, dtype=torch.bfloat16)))
    dqp_desc = mangle_type(kv_gluon._partial_descriptor(torch.zeros(256, d, dtype=torch.bfloat16)))
    const = dict(G=group, PAIRS=pairs_per_tile(group), Q_LAYOUT=kv_gluon._smem_layout(ROWS, d, True),
                 DS_LAYOUT=_ds_layout(), WRITE_DQ=write_dq, PROBE=probe)
    types = {"Q": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "DQP": "*bf16", "DK": "*bf16",
             "DVv": "*bf16", "DKP": "*fp32", "DVP": "*fp32", "WORK": "*i64", "TOKS": "*i32", "BLKSTART": "*i64",
             "BLKLEN": "*i32", "scale": "fp32", "qk_scale": "fp32", "k_desc": desc, "v_desc": desc, "dk_desc": desc,
             "dv_desc": desc, "dqp_desc": dqp_desc}
    sig = {name: "constexpr" if name in const else types.get(name, "i32") for name in names}
    aligned = [i for i, name in enumerate(names) if name in ("Q", "DO", "DQP", "DK", "DVv", "DKP", "DVP", "Hq")]
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k_),): v_ for k_, v_ in const.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
