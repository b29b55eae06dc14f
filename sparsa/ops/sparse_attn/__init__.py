"""Selected-block attention: public entry point with validation and backend dispatch."""
from __future__ import annotations

import torch

from .._checks import check_cu_seqlens, check_positive_int, check_qkv, check_tensor, default_scale
from ..backend import use_triton
from . import blockwise, naive


# Triton forward loop orders (`loop_order=`); q_tile has its own backward, the others share the KV-outer one
LOOP_ORDERS = ("q_outer", "kv_outer", "q_tile")


def check_block_indices(block_indices, q: torch.Tensor, n_heads_kv: int, block_size: int) -> None:
    check_tensor("block_indices", block_indices, 4)
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_indices must be int32 or int64, got {block_indices.dtype}")
    batch, seqlen = q.shape[:2]
    if block_indices.shape[0] != batch or block_indices.shape[1] != seqlen or block_indices.shape[2] != n_heads_kv:
        raise ValueError(
            f"block_indices shape {tuple(block_indices.shape)} must be [B={batch}, T={seqlen}, Hkv={n_heads_kv}, topk]"
        )
    if block_indices.is_cuda:  # range checks need a host sync: only on CPU
        return
    n_all = -(-seqlen // block_size)
    if block_indices.numel() and int(block_indices.max()) >= n_all:
        raise ValueError(f"block_indices holds block {int(block_indices.max())} but T={seqlen} has only {n_all} blocks")
    if block_indices.numel() and int(block_indices.min()) < -1:
        raise ValueError("block_indices may hold -1 (padding) but no other negative value")


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    loop_order: str | None = None,
):
    """Softmax attention over the tokens of the selected blocks (causal inside the query's block).

    q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], block_indices [B, T, Hkv, topk] (-1 = none).
    Returns o [B, T, Hq, Dv] and, with `return_lse`, the natural-log LSE [B, T, Hq] in float32.
    `loop_order` ("q_outer" | "kv_outer" | "q_tile") forces a Triton forward loop order; None chooses from
    G, T, head dim and KV heads (q_tile for small problems at head dim <= 64) and, on CUDA from 2048 tokens,
    from the selection: q_tile when the tokens of a tile share most of their blocks (locality.py: a count every
    16 calls of a shape, no host synchronisation; SPARSA_LOCALITY_CHECK=0 turns it off). "q_tile" walks the union of a tile of
    tokens' blocks (docs/kernels/sparse_attention.md). Without Triton the op runs PyTorch: the dense reference
    (naive.py) for short sequences, the memory-bounded blockwise.py path otherwise (blockwise.prefers_dense).
    """
    _, n_heads_kv = check_qkv(q, k, v)
    check_positive_int("block_size", block_size)
    check_block_indices(block_indices, q, n_heads_kv, block_size)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    if loop_order not in (None, *LOOP_ORDERS):
        raise ValueError(f"loop_order must be None or one of {LOOP_ORDERS}, got {loop_order!r}")
    scale = default_scale(scale, q.shape[-1])
    if use_triton(q):
        from .triton_ops import sparse_attention_triton

        out, lse = sparse_attention_triton(
            q, k, v, block_indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens, loop_order=loop_order
        )
    else:  # PyTorch: the dense reference for short sequences, the memory-bounded blockwise path otherwise
        path = naive if blockwise.prefers_dense(q, block_indices, block_size, cu_seqlens) else blockwise
        out, lse = path.sparse_attention(q, k, v, block_indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens)
    return (out, lse) if return_lse else out
