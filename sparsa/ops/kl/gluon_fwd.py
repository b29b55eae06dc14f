"""StreamKL forward for Hopper (sm_90) in Gluon: the key tile's GEMMs overlap the previous tile's softmax.

Same math and outputs as `_kl_fwd_kernel` (triton_ops.py; the per-tile update and the final LSE / KL are
the same functions). What differs is the schedule. In the Triton kernel a tile's two GEMMs finish before
its exponentials start, so tensor, MUFU and FP32 time add up. Here each iteration

    1. issues the TMA loads of key tile j + STAGES into tile j's stage (a ring of STAGES shared-memory
       stages; tile j's logits are in registers by then),
    2. issues the two wgmmas of tile j + 1 asynchronously (q_p k_p^T and q_q k_q^T),
    3. runs the online update of tile j (exponentials, sums, maxima) while those GEMMs run,
    4. waits for the GEMMs of tile j + 1.

One program: BM query rows of one head (both sides' Q tiles stay in shared memory, or in registers with
qreg), num_warps / 4 warpgroups of 64 rows each. Grid and tile order as the Triton kernel (`_tile_pids`:
heavy causal tiles first, heads in L2-sized groups). gluon_fwd_ws.py holds a warp-specialised variant
(config "ws").

Scope (`eligible`): CUDA capability 9.x, bf16 / fp16, both sides of head dim 64 or 128, no packed
documents, both K tensors read as [B * N, H_kv * D] row views (unit stride on D, rows of H_kv * D). Other
inputs use the Triton kernel.

Dispatch (`mode`): by default the Gluon kernel runs where it was measured faster than the Triton kernel
(eligible inputs with at least GLUON_MIN_KEYS queries and keys; shorter sequences were not timed and keep
the Triton kernel), with the config of `choose_config`; SPARSA_KL_GLUON=1 runs it on every eligible input,
SPARSA_KL_GLUON=0 never. Measurements: docs/kernels/attention_kl.md.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernel is used
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

from .._alloc import new_output, new_output_like
from .._intmath import cdiv
from .._launch import launcher_for
from . import triton_ops

# Config of the kernel: (BM, BN, warps, stages, paired, qreg), or ("ws", BN, stages, qreg) for the
# warp-specialised kernel of gluon_fwd_ws.py; SPARSA_KL_GLUON_CONFIG="BM,BN,W,S[,P[,R]]" or "ws,BN,S,R"
# overrides `choose_config`. qreg: Q tiles read from registers by the wgmmas (0 none, 1 the P side's, 2 both);
# paired = 1: two key tiles per loop iteration. Measured on the H100 (session 7,
# benchmarks/results/h100_session7/kl_dispatch_sweep*.json), forward through the API:
# - ws,64,4,1 (128 rows per program, two compute warpgroups sharing a 4-stage key ring, P side's Q in
#   registers) was the fastest or within 2% of the fastest of six configs at every size from 8K to 128K;
# - 64,64,4,2,0,1 (64 rows, two CTAs per SM) was the fastest at 2K (0.117 ms against 0.126) and 4K.
DEFAULT_CONFIG = ("ws", 64, 4, 1)
SHORT_CONFIG = (64, 64, 4, 2, 0, 1)
SHORT_KEYS = 8192  # below this many keys: SHORT_CONFIG
# With fewer queries or keys than this the Triton kernel is used unless SPARSA_KL_GLUON=1 (shorter sequences
# were not timed; at 2K the Gluon forward took 0.117 ms against the Triton kernel's 0.138 ms, both through the
# launch cache).
GLUON_MIN_KEYS = 2048


def choose_config(n_keys: int) -> tuple:
    """The config for n_keys keys per sequence: SHORT_CONFIG below SHORT_KEYS, else DEFAULT_CONFIG."""
    return SHORT_CONFIG if n_keys < SHORT_KEYS else DEFAULT_CONFIG


def mode() -> str:
    """"off" (SPARSA_KL_GLUON=0, or no Gluon in this Triton), "on" (=1: every eligible input) or "auto"
    (unset: eligible inputs with at least GLUON_MIN_KEYS queries and keys)."""
    if not HAVE_GLUON:
        return "off"
    value = os.environ.get("SPARSA_KL_GLUON", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"SPARSA_KL_GLUON must be 0, 1 or unset, got {value!r}")
    return {"": "auto", "0": "off", "1": "on"}[value]


def enabled() -> bool:
    """Whether the Gluon kernel may run at all (`mode` is not "off")."""
    return mode() != "off"


def _row_view(x: torch.Tensor):
    """x [B, N, H, D] as a [B * N, H * D] row view when its strides allow it (else None)."""
    b, n, h, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(1) != h * d or (b > 1 and x.stride(0) != n * h * d):
        return None
    return x.as_strided((b * n, h * d), (h * d, 1))


def eligible(qp, kp, qq, kq, cu_seqlens, only_p) -> bool:
    """Whether the attention-KL forward (sparsa/ops/kl/__init__.py) may run the Gluon kernel on these inputs."""
    how = mode()
    if how == "off" or only_p or cu_seqlens is not None or triton_ops._INTERPRET:
        return False
    if how == "auto" and min(qp.shape[1], kp.shape[1]) < GLUON_MIN_KEYS:  # the measured range: N_q = N_k >= 2K
        return False
    if not qp.is_cuda or torch.cuda.get_device_capability(qp.device)[0] != 9:
        return False
    if len({x.dtype for x in (qp, kp, qq, kq)}) != 1 or qp.dtype not in (torch.bfloat16, torch.float16):
        return False
    if qp.shape[3] != qq.shape[3] or qp.shape[3] not in (64, 128):
        return False
    return all(_row_view(x) is not None and x.data_ptr() % 16 == 0 for x in (qp, kp, qq, kq))


def _config(config, n_keys: int) -> tuple:
    """A config as `_parse_config` returns it, from a tuple, a string, or (None) SPARSA_KL_GLUON_CONFIG or
    `choose_config(n_keys)` (n_keys: keys per sequence)."""
    if config is None:
        forced = os.environ.get("SPARSA_KL_GLUON_CONFIG")
        return _parse_config(forced) if forced else choose_config(n_keys)
    return _parse_config(config if isinstance(config, str) else ",".join(map(str, config)))


def _parse_config(text: str) -> tuple:
    """"BM,BN,W,S[,P[,R]]" -> (BM, BN, W, S, P, R): P (paired loop) defaults to 1, R (Q tiles held in
    registers: 0 none, 1 the P side's, 2 both) to 0. "ws[,BN[,S[,R]]]" -> ("ws", BN, S, R), the
    warp-specialised kernel of gluon_fwd_ws.py (defaults 64, 4, 0)."""
    parts = [v.strip() for v in text.split(",")]
    try:
        if parts[0] == "ws":
            values = tuple(int(v) for v in parts[1:])
            if len(values) > 3:
                raise ValueError
            return ("ws",) + values + (64, 4, 0)[len(values):]
        values = tuple(int(v) for v in parts)
        if len(values) not in (4, 5, 6):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"SPARSA_KL_GLUON_CONFIG / config must be BM,BN,WARPS,STAGES[,PAIRED[,QREG]] or ws[,BN[,STAGES[,QREG]]], "
            f"got {text!r}"
        ) from None
    return values + (1, 0)[len(values) - 4:]


def _variant(config: tuple):
    """(kernel, rows per Q-tile load, query rows per program, key tile rows, num_warps, constexprs)."""
    if config[0] == "ws":
        from . import gluon_fwd_ws

        _, bn, stages, qreg = config
        rows = gluon_fwd_ws.WG_ROWS.value
        return gluon_fwd_ws._kl_fwd_ws_kernel, rows, 2 * rows, bn, 4, dict(STAGES=stages, QREG=qreg)
    bm, bn, warps, stages, paired, qreg = config
    return _kl_fwd_gluon_kernel, bm, bm, bn, warps, dict(STAGES=stages, PAIRED=bool(paired), QREG=qreg)


if HAVE_GLUON:
    _tile_pids = gluon.jit(triton_ops._tile_pids.fn)
    _query_tile_ranges = gluon.jit(triton_ops._query_tile_ranges.fn)
    _update = gluon.jit(triton_ops._fwd_update.fn)
    _finish = gluon.jit(triton_ops._fwd_finish.fn)

    @gluon.jit
    def _issue_loads(kp_desc, kq_desc, kp_s, kq_s, ready, tile, n_kt, key_row, col_p, col_q,
                     BN: gl.constexpr, STAGES: gl.constexpr):
        """TMA loads of key tile `tile` (both sides) into stage tile % STAGES, if tile < n_kt."""
        s = tile % STAGES
        pred = tile < n_kt
        bar = ready.index(s)
        mbarrier.expect(bar, kp_desc.block_type.nbytes + kq_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(kp_desc, [key_row + tile * BN, col_p], bar, kp_s.index(s), pred=pred)
        tma.async_copy_global_to_shared(kq_desc, [key_row + tile * BN, col_q], bar, kq_s.index(s), pred=pred)

    @gluon.jit
    def _issue_mmas(qp_s, qq_s, kp_s, kq_s, ready, tile, into_a, into_b, STAGES: gl.constexpr):
        """Waits for key tile `tile` and starts its two GEMMs (async): a = q_p k_p^T, b = q_q k_q^T, written
        over the registers of into_a / into_b (consumed logits; use_acc=False ignores their values)."""
        s = tile % STAGES
        mbarrier.wait(ready.index(s), (tile // STAGES) & 1)
        a = warpgroup_mma(qp_s, kp_s.index(s).permute((1, 0)), into_a, use_acc=False, is_async=True)
        b = warpgroup_mma(qq_s, kq_s.index(s).permute((1, 0)), into_b, use_acc=False, is_async=True)
        return a, b

    @gluon.jit
    def _update_tile(a, b, tile, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
                     CAUSAL: gl.constexpr, SAME_SCALE: gl.constexpr, BN: gl.constexpr):
        """The running values after key tile `tile`'s logits, masked from key n_full on."""
        offs_n = tile * BN + cols
        if tile * BN >= n_full:
            m_p, l_p, acc, m_q, l_q = _update(a, b, offs_n, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q,
                                              scale_p2, scale_q2, True, CAUSAL, False, SAME_SCALE)
        else:
            m_p, l_p, acc, m_q, l_q = _update(a, b, offs_n, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q,
                                              scale_p2, scale_q2, False, CAUSAL, False, SAME_SCALE)
        return m_p, l_p, acc, m_q, l_q

    @gluon.jit
    def _running_init(ROWS: gl.constexpr, rows_l: gl.constexpr):
        """The five running values of ROWS rows before any key: m_p, l_p, acc, m_q, l_q."""
        m = gl.full([ROWS], float("-inf"), gl.float32, layout=rows_l)
        z = gl.zeros([ROWS], gl.float32, layout=rows_l)
        return m, z, z, m, z

    @gluon.jit
    def _q_operands(qp_tile, qq_tile, mma: gl.constexpr, QREG: gl.constexpr):
        """The Q tiles as the wgmmas' A operands: shared memory, or registers (QREG >= 1: the P side's,
        QREG >= 2: both), which halves those GEMMs' shared-memory reads."""
        q_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        if QREG >= 1:
            qp_op = qp_tile.load(q_reg)
        else:
            qp_op = qp_tile
        if QREG >= 2:
            qq_op = qq_tile.load(q_reg)
        else:
            qq_op = qq_tile
        return qp_op, qq_op

    @gluon.jit
    def _store_rows(m_p, l_p, acc, m_q, l_q, offs_m, n_q, b, h, KL, LSEP, LSEQ, skl_b, skl_t, skl_h, slse_b, slse_h):
        """LSE_p2, LSE_q2 and KL of rows offs_m (those < n_q) from their running values."""
        lse_p, lse_q, kl = _finish(m_p, l_p, acc, m_q, l_q)
        row_ok = offs_m < n_q
        lse_off = b.to(gl.int64) * slse_b + h.to(gl.int64) * slse_h + offs_m
        gl.store(LSEP + lse_off, lse_p, mask=row_ok)
        gl.store(LSEQ + lse_off, lse_q, mask=row_ok)
        kl_off = b.to(gl.int64) * skl_b + h.to(gl.int64) * skl_h + offs_m.to(gl.int64) * skl_t
        gl.store(KL + kl_off, kl, mask=row_ok)

    @gluon.jit
    def _step(a, b, spare_a, spare_b, tile, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q,
              scale_p2, scale_q2, qp_s, qq_s, kp_s, kq_s, ready, kp_desc, kq_desc, n_kt, key_row, col_p, col_q,
              CAUSAL: gl.constexpr, SAME_SCALE: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
        """One key tile: refills tile `tile`'s stage with tile + STAGES, starts tile + 1's GEMMs into the
        spare registers, updates the running values with tile `tile`'s logits (a, b) meanwhile, and waits.
        Returns tile + 1's logits and the running values."""
        gl.thread_barrier()  # every warpgroup has waited for tile `tile`'s GEMMs: its stage is free
        _issue_loads(kp_desc, kq_desc, kp_s, kq_s, ready, tile + STAGES, n_kt, key_row, col_p, col_q, BN, STAGES)
        na, nb = _issue_mmas(qp_s, qq_s, kp_s, kq_s, ready, tile + 1, spare_a, spare_b, STAGES)
        m_p, l_p, acc, m_q, l_q = _update_tile(a, b, tile, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q,
                                               scale_p2, scale_q2, CAUSAL, SAME_SCALE, BN)
        na, nb = warpgroup_mma_wait(num_outstanding=0, deps=(na, nb))
        return na, nb, m_p, l_p, acc, m_q, l_q

    @gluon.jit
    def _kl_fwd_gluon_kernel(
        qp_desc, kp_desc, qq_desc, kq_desc, KL, LSEP, LSEQ,
        skl_b, skl_t, skl_h, slse_b, slse_h,
        n_q, n_k, n_heads, group_p, group_q, scale_p2, scale_q2, n_bh, head_group,
        CAUSAL: gl.constexpr, SAME_SCALE: gl.constexpr, STAGES: gl.constexpr, PAIRED: gl.constexpr,
        QREG: gl.constexpr,
    ):
        BM: gl.constexpr = qp_desc.block_type.shape[0]
        D: gl.constexpr = qp_desc.block_type.shape[1]
        BN: gl.constexpr = kp_desc.block_type.shape[0]
        WARPS: gl.constexpr = gl.num_warps()
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BN, 16])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)

        tile, n_tiles, pid_bh = _tile_pids(n_bh, head_group)
        pid_m = n_tiles - 1 - tile  # heavy (late) causal tiles first
        h = pid_bh % n_heads
        b = pid_bh // n_heads
        m0 = pid_m * BM
        off = n_k - n_q
        n_full, hi = _query_tile_ranges(m0, n_q, n_k, CAUSAL, BM, BN)
        n_kt = gl.maximum(gl.cdiv(hi, BN), 1)  # an all-masked tile still runs once (its rows give 0)

        qp_s = gl.allocate_shared_memory(qp_desc.dtype, [BM, D], qp_desc.layout)
        qq_s = gl.allocate_shared_memory(qq_desc.dtype, [BM, D], qq_desc.layout)
        kp_s = gl.allocate_shared_memory(kp_desc.dtype, [STAGES, BN, D], kp_desc.layout)
        kq_s = gl.allocate_shared_memory(kq_desc.dtype, [STAGES, BN, D], kq_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)

        q_row = b * n_q + m0
        mbarrier.expect(q_ready, qp_desc.block_type.nbytes + qq_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(qp_desc, [q_row, h * D], q_ready, qp_s)
        tma.async_copy_global_to_shared(qq_desc, [q_row, h * D], q_ready, qq_s)
        key_row = b * n_k
        col_p = (h // group_p) * D
        col_q = (h // group_q) * D
        for first in gl.static_range(STAGES):
            _issue_loads(kp_desc, kq_desc, kp_s, kq_s, ready, first, n_kt, key_row, col_p, col_q, BN, STAGES)

        offs_m = m0 + gl.arange(0, BM, layout=rows_l)
        cols = gl.arange(0, BN, layout=cols_l)
        zero = gl.zeros([BM, BN], gl.float32, layout=mma)
        m_p, l_p, acc, m_q, l_q = _running_init(BM, rows_l)

        mbarrier.wait(q_ready, 0)
        qp_op, qq_op = _q_operands(qp_s, qq_s, mma, QREG)
        xa, xb = _issue_mmas(qp_op, qq_op, kp_s, kq_s, ready, 0, zero, zero, STAGES)
        xa, xb = warpgroup_mma_wait(num_outstanding=0, deps=(xa, xb))
        if PAIRED:
            ya = zero
            yb = zero
            # two tiles per iteration, so that the logits alternate between two register sets (x, y) without copies
            n_pairs = (n_kt - 1) // 2
            for it in range(0, n_pairs):
                t = 2 * it
                ya, yb, m_p, l_p, acc, m_q, l_q = _step(
                    xa, xb, ya, yb, t, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
                    qp_op, qq_op, kp_s, kq_s, ready, kp_desc, kq_desc, n_kt, key_row, col_p, col_q,
                    CAUSAL, SAME_SCALE, BN, STAGES)
                xa, xb, m_p, l_p, acc, m_q, l_q = _step(
                    ya, yb, xa, xb, t + 1, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
                    qp_op, qq_op, kp_s, kq_s, ready, kp_desc, kq_desc, n_kt, key_row, col_p, col_q,
                    CAUSAL, SAME_SCALE, BN, STAGES)
            t = 2 * n_pairs  # x holds tile t; one or two tiles are left, the last one masked
            if n_kt - t == 2:
                ya, yb, m_p, l_p, acc, m_q, l_q = _step(
                    xa, xb, ya, yb, t, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q, scale_p2, scale_q2,
                    qp_op, qq_op, kp_s, kq_s, ready, kp_desc, kq_desc, n_kt, key_row, col_p, col_q,
                    CAUSAL, SAME_SCALE, BN, STAGES)
                m_p, l_p, acc, m_q, l_q = _update(ya, yb, (t + 1) * BN + cols, offs_m, n_k, off, m_p, l_p, acc, m_q,
                                                  l_q, scale_p2, scale_q2, True, CAUSAL, False, SAME_SCALE)
            else:
                m_p, l_p, acc, m_q, l_q = _update(xa, xb, t * BN + cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q,
                                                  scale_p2, scale_q2, True, CAUSAL, False, SAME_SCALE)
        else:  # one tile per iteration: the next tile's logits land in fresh registers, copied back each time
            for j in range(0, n_kt - 1):
                xa, xb, m_p, l_p, acc, m_q, l_q = _step(
                    xa, xb, zero, zero, j, n_full, cols, offs_m, n_k, off, m_p, l_p, acc, m_q, l_q, scale_p2,
                    scale_q2, qp_op, qq_op, kp_s, kq_s, ready, kp_desc, kq_desc, n_kt, key_row, col_p, col_q,
                    CAUSAL, SAME_SCALE, BN, STAGES)
            m_p, l_p, acc, m_q, l_q = _update(xa, xb, (n_kt - 1) * BN + cols, offs_m, n_k, off, m_p, l_p, acc,
                                              m_q, l_q, scale_p2, scale_q2, True, CAUSAL, False, SAME_SCALE)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(q_ready)

        _store_rows(m_p, l_p, acc, m_q, l_q, offs_m, n_q, b, h, KL, LSEP, LSEQ, skl_b, skl_t, skl_h, slse_b, slse_h)


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, d: int, bf16: bool):
    """Shared-memory layout of a [rows, d] TMA tile (built once per shape: the launch path is host-bound
    at short sequences)."""
    return gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16 if bf16 else gl.float16)


def _descriptor(x: torch.Tensor, rows: int, d: int):
    """TMA descriptor of x's [B * N, H * D] row view, in [rows, d] tiles."""
    return TensorDescriptor.from_tensor(_row_view(x), [rows, d], _tile_layout(rows, d, x.dtype == torch.bfloat16))


def kl_forward_gluon(qp, kp, qq, kq, *, causal, scale_p, scale_q, config=None):
    """kl_forward (triton_ops.py) on a Gluon kernel; inputs must pass `eligible`. config: a tuple or
    string as `_parse_config` reads (default: SPARSA_KL_GLUON_CONFIG or `choose_config`)."""
    kernel, q_rows, bm, bn, warps, consts = _variant(_config(config, kp.shape[1]))
    batch, n_q, n_heads, d = qp.shape
    n_k = kp.shape[1]
    dev = qp.device
    kl = new_output((batch, n_q, n_heads), torch.float32, dev)
    lse_p = new_output((batch, n_heads, n_q), torch.float32, dev)
    lse_q = new_output_like(lse_p)
    n_bh = batch * n_heads
    head_group = triton_ops._head_group(n_k, triton_ops._key_bytes(kp, kq, False), n_bh)
    grid = (cdiv(n_q, bm) * n_bh,)
    args = (
        _descriptor(qp, q_rows, d), _descriptor(kp, bn, d), _descriptor(qq, q_rows, d), _descriptor(kq, bn, d),
        kl, lse_p, lse_q, *kl.stride(), lse_p.stride(0), lse_p.stride(1),
        n_q, n_k, n_heads, n_heads // kp.shape[2], n_heads // kq.shape[2],
        scale_p * triton_ops.LOG2E, scale_q * triton_ops.LOG2E, n_bh, head_group,
    )
    # through the Triton kernels' launch cache: the Gluon JIT's own call path costs ~0.1 ms of host time per call
    launcher = launcher_for(f"gluon:{kernel.fn.__name__}", kernel)
    launcher(kernel, lambda meta: grid, args, dict(CAUSAL=causal, SAME_SCALE=scale_p == scale_q, **consts),
             {"num_warps": warps})
    return kl, lse_p, lse_q


def compile_offline(*config, d: int = 128):
    """A kernel variant (`_parse_config` fields) compiled for sm_90 without a GPU (bf16, causal, same
    scales): tests and scripts/kl_gluon_sass.py read its registers and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    fn, q_rows, _, bn, warps, consts = _variant(_config(config, SHORT_KEYS))  # config is given here
    names = fn.arg_names
    sample = torch.zeros(1, 256, 2, d, dtype=torch.bfloat16)
    sig = {name: mangle_type(_descriptor(sample, rows, d))
           for name, rows in (("qp_desc", q_rows), ("kp_desc", bn), ("qq_desc", q_rows), ("kq_desc", bn))}
    const = dict(CAUSAL=True, SAME_SCALE=True, **consts)
    for name in names:
        if name not in sig:
            sig[name] = {"KL": "*fp32", "LSEP": "*fp32", "LSEQ": "*fp32"}.get(
                name, "constexpr" if name in const else ("fp32" if name.startswith("scale") else "i32"))
    aligned = [i for i, name in enumerate(names) if name in ("KL", "LSEP", "LSEQ", "skl_b", "slse_b", "n_q", "n_k")]
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})


def offline_report(*config, d: int = 128):
    """(SASS text, ptxas -v output, shared bytes) of `compile_offline` with Triton's bundled tools."""
    from .._sm90_tools import tool_reports

    kernel = compile_offline(*config, d=d)
    info, sass = tool_reports(kernel.asm["ptx"], kernel.asm["cubin"])
    return sass, info, kernel.metadata.shared
