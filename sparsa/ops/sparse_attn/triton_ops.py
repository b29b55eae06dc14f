"""Triton selected-block attention: the loop orders behind one autograd function.

forward : query-outer (q_outer.py, one program per token and KV head) or KV-outer (kv_outer.py,
          one program per (KV head, block, chunk of the tokens that chose it) + LSE merge), chosen
          automatically; or the query-tile order (q_tile.py, one program per tile of tokens; automatic
          for small problems at head dim <= 64, and where adjacent tokens share their blocks: locality.py);
backward: KV-outer (backward.py): dK/dV per block, dQ through per-pair partials and a fixed-order
          reduction (deterministic); after the query-tile order, for small problems, its own backward
          over the tiles' block unions (q_tile_backward.py).
Every batch row / packed document is flattened into one token axis; positions and block indices
stay local to each document (index.DocMeta). KV heads are processed in slices so that the
per-pair buffers stay under PAIR_BUFFER_BYTES.
"""

from __future__ import annotations

import torch

from .backward import compute_delta, kv_outer_backward
from . import kv_gluon, kv_local, locality
from . import q_tile as q_tile_kernels
from .index import build_pair_index, doc_meta
from .device_tuning import device_tuning
from .kv_outer import kv_outer_forward
from .._alloc import new_output
from .._env import env_choice
from .q_outer import q_outer_forward
from .q_tile import q_tile_forward, tile_config
from .q_tile_backward import q_tile_backward, q_tile_dq

# upper bound on the per-pair buffers (forward partial outputs, dQ partials) of one head slice
PAIR_BUFFER_BYTES = 6 << 30


# query-tile for small problems: on the H100 (2026-12-05, scripts/real_selection_bench.py, SmolLM2-135M at 4096
# tokens, 3 KV heads, G = 3, D = 64) it was the fastest order on select_blocks and random selections alike:
# forward 0.10-0.24 ms against 0.31-0.53 (q_outer) and 1.1-1.9 (kv_outer), forward+backward 1.9-2.7 against
# 2.6-3.5 (kv_outer). Bounds: the measured size (token x KV-head pairs) and head dim; larger ones not measured.
Q_TILE_MAX_TOKEN_HEADS = 4096 * 3
Q_TILE_MAX_HEAD_DIM = 64


# G >= 16 below this many tokens takes KV-outer where its MAIN is the Gluon kernel (H100, session 16,
# benchmarks/results/h100_session16/bench.log, forward ms G = 16 KV-outer vs query-outer: 8K 1.14 vs 1.18, 16K 2.30
# vs 2.35, 32K 4.70 vs 4.60, 64K 9.59 vs 9.23). With the one-token tiles (session 26 on the H100,
# benchmarks/results/h100_session26/g16_orders.log, two interleaved rounds, query-outer vs KV-outer, fwd / fwd+bwd
# ms): 12K 1.68 / 4.02-4.04 vs 1.71 / 4.00; 16K 2.24-2.26 / 5.35 vs 2.30 / 5.33-5.34; 24K 3.39 / 7.99-8.02 vs 3.50 /
# 8.06-8.07. Query-outer's forward wins from 12K, but after it the backward builds the pair index the KV-outer
# forward would have left, so forward+backward crosses between 16K and 24K: KV-outer below 20480 tokens.
# (The H200 takes KV-outer at every size: device_tuning.py.) gpu_check.sh --only g16_orders is the A/B.
# Where the query-outer forward is the kernel with K / V by TMA (session 29, q_tile.q_outer_tma) this bound does not
# apply: on the H100 its forward took 1.015 ms at 8K and 2.04 at 16K (1 warp x 2 stages: 0.916 / 1.925) against
# KV-outer's 1.129 / 2.308 in the same run (benchmarks/results/h100_session29/bench_tma_g16.log).
GLUON_LARGE_GROUP_MAX_TOKENS = 20480


def choose_loop_order(group: int, n_tokens: int, head_dim: int, n_heads_kv: int | None = None,
                      gluon_main: bool = False, large_group_kv_outer: bool = False, q_outer_tma: bool = False) -> str:
    """Measured on the H100 (docs/kernels/sparse_attention.md): query-outer wins for large groups
    and for few queries (the KV-outer index build and reduction are fixed costs), except below 20480 tokens where the
    KV-outer MAIN is the Gluon kernel (`gluon_main`) and the query-outer forward is not the TMA kernel
    (`q_outer_tma`), and at every size where `large_group_kv_outer` (GPUs with faster memory, device_tuning.py);
    query-tile for small problems at head dim <= 64 (Q_TILE_MAX_TOKEN_HEADS)."""
    if group >= 16:
        gluon_sizes = gluon_main and n_tokens < GLUON_LARGE_GROUP_MAX_TOKENS and not q_outer_tma
        if n_tokens < 2048 or not (large_group_kv_outer or gluon_sizes):
            return "q_outer"
    if n_tokens < 2048:  # few queries: not measured yet, index + reduction fixed costs dominate
        return "q_outer"
    if (
        n_heads_kv is not None
        and n_tokens * n_heads_kv <= Q_TILE_MAX_TOKEN_HEADS
        and head_dim <= Q_TILE_MAX_HEAD_DIM
    ):
        return "q_tile"
    return "kv_outer"


def automatic_loop_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                         q_outer_tma: bool | None = None) -> str:
    """choose_loop_order for q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] (whether the KV-outer MAIN would be the
    Gluon kernel and the device's tuning included); q_outer_tma: q_tile.q_outer_tma's answer for these tensors when
    the caller has it (None: asked here)."""
    n_tokens, n_heads_q, head_dim = q.shape
    n_heads_kv = k.shape[1]
    group = n_heads_q // n_heads_kv
    gluon_main = kv_gluon.enabled(group, n_tokens) and kv_gluon.eligible(q, k, v, block_size, False)
    large_group_kv_outer = device_tuning(q.device).large_group_kv_outer
    if q_outer_tma is None:
        q_outer_tma = q_tile_kernels.q_outer_tma(q, k, v, block_size)
    return choose_loop_order(group, n_tokens, max(head_dim, v.shape[2]), n_heads_kv, gluon_main, large_group_kv_outer,
                             q_outer_tma)


def forced_loop_order() -> str | None:
    """SPARSA_LOOP_ORDER=q_outer|kv_outer|q_tile: the forward loop order of every call that passes none (A/B of
    whole models without code changes); unset: the automatic choice."""
    from . import LOOP_ORDERS

    return env_choice("SPARSA_LOOP_ORDER", LOOP_ORDERS, None)


def q_tile_backward_order(n_tokens: int, n_heads_kv: int) -> str:
    """The backward after a q_tile forward: its own over the tiles' unions for small problems (the size where
    q_tile is the automatic order, measured faster there in session 9), else the KV-outer one, which builds the
    pair index itself (H100 session 19, forward+backward with q_tile's backward vs the KV-outer one on pooled
    selections: 8K G = 4 6.14 vs 2.56 ms, 64K 46.1 vs 20.4). SPARSA_Q_TILE_BACKWARD=q_tile|kv_outer forces one;
    =hybrid (opt-in; 1.5-1.7x slower than the KV-outer backward on the H200, session 22): dK / dV from the KV-outer kernels without their per-pair dQ partials, dQ
    from q_tile's dQ kernel over the tiles' unions (written once per token)."""
    forced = env_choice("SPARSA_Q_TILE_BACKWARD", ("q_tile", "kv_outer", "hybrid"), None)
    if forced is not None:
        return forced
    return "q_tile" if n_tokens * n_heads_kv <= Q_TILE_MAX_TOKEN_HEADS else "kv_outer"


def _head_slices(n_heads_kv: int, n_tokens: int, topk: int, group: int, head_dim: int, head_dim_v: int, esize: int = 4):
    per_head = n_tokens * topk * group * (max(head_dim, head_dim_v) * esize + 4)
    step = max(1, min(n_heads_kv, PAIR_BUFFER_BYTES // max(per_head, 1)))
    return [(h0, min(step, n_heads_kv - h0)) for h0 in range(0, n_heads_kv, step)]


def _esize(dtype: torch.dtype) -> int:
    """Bytes per element of the largest per-pair buffer (fp16 dQ partials stay fp32)."""
    return 2 if dtype == torch.bfloat16 else 4


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, meta, block_size, scale, loop_order):
        n_tokens, n_heads_q, head_dim = q.shape
        n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
        group = n_heads_q // n_heads_kv
        topk = idx.shape[-1]
        indices = None
        if loop_order == "q_outer" and q_tile_kernels.q_outer_tma(q, k, v, block_size):
            o, lse = q_outer_forward(q, k, v, idx, meta, block_size, scale, tma=True)
        elif loop_order == "q_outer" and (tile := q_tile_kernels.one_token_tile(q, k, v, block_size)) is not None:
            o, lse = q_tile_forward(q, k, v, idx, meta, block_size, scale, tile=tile)  # the same work, pipelined
        elif loop_order == "q_outer":
            o, lse = q_outer_forward(q, k, v, idx, meta, block_size, scale)
        elif loop_order == "q_tile":
            o, lse = q_tile_forward(q, k, v, idx, meta, block_size, scale)
        else:
            o = new_output((n_tokens, n_heads_q, head_dim_v), q.dtype, q.device)
            lse = new_output((n_tokens, n_heads_q), torch.float32, q.device)
            indices = []
            # without gradients the local blocks may leave the pairs (kv_local.py); then the backward has no index
            split = kv_local.uses_split(any(ctx.needs_input_grad[:3]))
            for h0, hs in _head_slices(n_heads_kv, n_tokens, topk, group, head_dim, head_dim_v, _esize(q.dtype)):
                index = build_pair_index(idx, meta, block_size, h0, hs, skip_local=split)
                kv_outer_forward(q, k, v, idx, index, meta, block_size, scale, o, lse)
                indices.append(index)
            if split:
                indices = None
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.meta, ctx.block_size, ctx.scale, ctx.indices = meta, block_size, scale, indices
        ctx.loop_order = loop_order
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, idx = ctx.saved_tensors
        meta, block_size, scale = ctx.meta, ctx.block_size, ctx.scale
        n_tokens, n_heads_q, head_dim = q.shape
        n_heads_kv, head_dim_v = k.shape[1], v.shape[2]
        group = n_heads_q // n_heads_kv
        topk = idx.shape[-1]
        do = do.contiguous()
        # after q_tile, for small problems, its own backward: over the tiles' block unions, no pair index
        after_q_tile = q_tile_backward_order(n_tokens, n_heads_kv) if ctx.loop_order == "q_tile" else None
        if after_q_tile == "q_tile":
            dq, dk, dv = q_tile_backward(q, k, v, o, lse, do, idx, meta, block_size, scale)
            return dq, dk, dv, None, None, None, None, None
        hybrid = after_q_tile == "hybrid"  # dQ over the tiles' unions, dK / dV without dQ partials
        delta = compute_delta(o, do)
        dq = None if hybrid else new_output(q.shape, q.dtype, q.device)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        indices = ctx.indices
        if indices is None:
            slices = _head_slices(n_heads_kv, n_tokens, topk, group, head_dim, head_dim_v, _esize(q.dtype))
            indices = (build_pair_index(idx, meta, block_size, h0, hs) for h0, hs in slices)
        for index in indices:
            kv_outer_backward(q, k, v, do, lse, delta, index, meta, block_size, scale, dq, dk, dv)
        if hybrid:
            dq = q_tile_dq(q, k, v, do, lse, delta, idx, meta, block_size, scale)
        ctx.indices = None
        return dq, dk, dv, None, None, None, None, None


def sparse_attention_triton(q, k, v, block_indices, *, block_size, scale, cu_seqlens=None, loop_order=None):
    """Inputs validated by sparsa.sparse_attention. Returns (o [B, T, Hq, Dv], lse [B, T, Hq] fp32)."""
    batch, seqlen, n_heads_q, head_dim = q.shape
    n_heads_kv, head_dim_v = k.shape[2], v.shape[3]
    n_tokens = batch * seqlen
    meta = doc_meta(batch, seqlen, cu_seqlens, block_size, q.device)
    qf = q.reshape(n_tokens, n_heads_q, head_dim).contiguous()
    kf = k.reshape(n_tokens, n_heads_kv, head_dim).contiguous()
    vf = v.reshape(n_tokens, n_heads_kv, head_dim_v).contiguous()
    idx = block_indices.reshape(n_tokens, n_heads_kv, -1).to(torch.int32).contiguous()
    if loop_order is None:
        loop_order = forced_loop_order()
    if loop_order is None:
        qo_tma = q_tile_kernels.q_outer_tma(qf, kf, vf, block_size)  # the order's rule and the waste threshold's
        loop_order = automatic_loop_order(qf, kf, vf, block_size, q_outer_tma=qo_tma)
        head_dim_max = max(head_dim, head_dim_v)
        if loop_order != "q_tile" and locality.check_applies(qf, head_dim_max, block_size):
            # adjacent tokens sharing their blocks (as select_blocks' selections do) favour the query-tile order
            group = n_heads_q // n_heads_kv
            tokens = tile_config(group, head_dim_max)[1]
            tma = q_tile_kernels.UNION_LIST and q_tile_kernels.list_tma(kf, vf)  # its forward's K / V loads
            factor = device_tuning(qf.device).waste_factor
            against_qo_tma = loop_order == "q_outer" and qo_tma
            if locality.prefers_q_tile(idx, meta, tokens, group, tma=tma, factor=factor, q_outer_tma=against_qo_tma):
                loop_order = "q_tile"
    if loop_order != "kv_outer":
        # q_outer drops a slot that repeats the previous one and q_tile merges sorted rows: sorting each row
        # makes every repeat adjacent, so a block listed twice counts once (the set semantics of
        # docs/semantics.md) in any slot order. The KV-outer pair index drops any repeat itself (first slot
        # of each block), which saves this sort (0.33 ms at 64K, G = 4 on the H200).
        idx = torch.sort(idx, dim=-1).values
    o, lse = _SparseAttention.apply(qf, kf, vf, idx, meta, block_size, float(scale), loop_order)
    return o.view(batch, seqlen, n_heads_q, head_dim_v), lse.view(batch, seqlen, n_heads_q)
