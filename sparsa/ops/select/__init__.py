"""Block keys and block selection: public entry points with validation and backend dispatch."""
from __future__ import annotations

import torch

from .._checks import check_cu_seqlens, check_positive_int, check_qkv, check_tensor, default_scale
from . import naive

SCORE_RULES = ("ssa",)


def block_keys(k: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the keys of each complete block: k [B, T, Hkv, D] -> [B, n_blocks, Hkv, D].

    With `cu_seqlens` (B = 1) blocks restart at every document and the documents' blocks are
    concatenated in order (document i contributes len_i // block_size blocks).
    """
    check_tensor("k", k, 4)
    check_positive_int("block_size", block_size)
    check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1])
    return naive.block_keys(k, block_size, cu_seqlens)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    init_blocks: int = 0,
    local_blocks: int = 1,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    score: str = "ssa",
) -> torch.Tensor:
    """SSA block selection -> [B, T, Hkv, topk] int32, ascending, right-padded with -1.

    Each query scores the complete past blocks by the per-head softmax of q . mean-key * scale,
    summed over the G query heads of its KV group; the first `init_blocks` blocks and the
    `local_blocks` blocks ending at the query's own block are always selected. No gradient.
    """
    check_qkv(q, k)
    check_positive_int("block_size", block_size)
    check_positive_int("topk", topk)
    check_positive_int("local_blocks", local_blocks)
    if isinstance(init_blocks, bool) or not isinstance(init_blocks, int) or init_blocks < 0:
        raise ValueError(f"init_blocks must be a non-negative int, got {init_blocks!r}")
    if topk < init_blocks + local_blocks:
        raise ValueError(f"topk ({topk}) must be >= init_blocks + local_blocks ({init_blocks + local_blocks})")
    if score not in SCORE_RULES:
        raise ValueError(f"score must be one of {SCORE_RULES}, got {score!r}")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = default_scale(scale, q.shape[-1])
    return naive.select_blocks(
        q, k, block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
        scale=scale, cu_seqlens=cu_seqlens,
    )
