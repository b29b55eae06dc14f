"""Block keys and block selection: public entry points with validation and backend dispatch."""
from __future__ import annotations

import torch

from .._checks import (
    check_cu_seqlens,
    check_positive_int,
    check_qkv,
    check_selection_geometry,
    check_tensor,
    default_scale,
)
from ..backend import use_triton
from . import naive

SCORE_RULES = ("ssa", "nsa", "infllm")
DEFAULT_POOLING = {"nsa": (32, 16), "infllm": (32, 16)}  # (compress_length, compress_stride)


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
    compress_length: int | None = None,
    compress_stride: int | None = None,
    compressed_keys: torch.Tensor | None = None,
    compressed_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSA block selection -> [B, T, Hkv, topk] int32, ascending, right-padded with -1.

    Each query scores the complete past blocks by the per-head softmax of q . mean-key * scale,
    summed over the G query heads of its KV group; the first `init_blocks` blocks and the
    `local_blocks` blocks ending at the query's own block are always selected. No gradient.

    Other scoring rules (`score=`), same output contract:
      "nsa"    NSA: softmax of q over the compressed keys (key i covers tokens
               [i*compress_stride, i*compress_stride + compress_length), visible to t iff its whole
               window is in the past), mapped onto selection blocks with overlap weights
               (shared tokens / compress_stride), summed over the group.
      "infllm" InfLLM-V2: the same group-summed probabilities over overlapping mean-pooled windows,
               max-pooled onto the blocks (each block takes the max over the windows overlapping it).
    For both, compress_length / compress_stride default to 32 / 16 and block_size must be a multiple
    of compress_stride. `compressed_keys` [B, Nc, Hkv, D] (documents concatenated; NSA: the branch's
    learned, rotated compressed keys) replaces the default mean pooling of k; `compressed_lse`
    [B, T, Hq] ("nsa" only; natural log, e.g. from `compressed_attention(..., return_lse=True)`)
    skips the normalisation pass. Only past blocks are scored, as for SSA.
    """
    check_qkv(q, k)
    check_selection_geometry(block_size, topk, init_blocks, local_blocks)
    if score not in SCORE_RULES:
        raise ValueError(f"score must be one of {SCORE_RULES}, got {score!r}")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = default_scale(scale, q.shape[-1])
    common = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks, scale=scale)
    if score == "ssa":
        for name, value in (("compress_length", compress_length), ("compress_stride", compress_stride),
                            ("compressed_keys", compressed_keys), ("compressed_lse", compressed_lse)):
            if value is not None:
                raise ValueError(f"{name} is only used by score='nsa' or 'infllm', got it with score='ssa'")
        if _triton_path(q):
            from .triton_select import pool_keys, select_blocks_triton

            with torch.no_grad():
                kbar = pool_keys(k, block_size, block_size, cu_seqlens)  # = block_keys, no fp32 copy of k
                key_cu = None if cu_seqlens is None else _pooled_cu_seqlens(cu_seqlens, block_size, block_size)
                return select_blocks_triton(q, kbar, length=block_size, stride=block_size, reduce="sum",
                                            cu_seqlens=cu_seqlens, key_cu_seqlens=key_cu, **common)
        return naive.select_blocks(q, k, cu_seqlens=cu_seqlens, **common)

    length, stride = DEFAULT_POOLING[score]
    length = length if compress_length is None else compress_length
    stride = stride if compress_stride is None else compress_stride
    check_positive_int("compress_length", length)
    check_positive_int("compress_stride", stride)
    if block_size % stride != 0:
        raise ValueError(f"block_size ({block_size}) must be a multiple of compress_stride ({stride})")
    key_cu = None if cu_seqlens is None else _pooled_cu_seqlens(cu_seqlens, length, stride)
    n_keys = _n_pooled(q.shape[1], length, stride) if cu_seqlens is None else int(key_cu[-1])
    if compressed_keys is not None:
        if not isinstance(compressed_keys, torch.Tensor) or compressed_keys.ndim != 4:
            raise ValueError("compressed_keys must be a 4-D tensor [B, Nc, Hkv, D]")
        expected = (q.shape[0], n_keys, k.shape[2], q.shape[3])
        if tuple(compressed_keys.shape) != expected:
            raise ValueError(f"compressed_keys must have shape {expected} [B, Nc, Hkv, D], got {tuple(compressed_keys.shape)}")
    if compressed_lse is not None:
        if score != "nsa":
            raise ValueError("compressed_lse is only used by score='nsa'")
        if tuple(compressed_lse.shape) != tuple(q.shape[:3]):
            raise ValueError(f"compressed_lse must have shape {tuple(q.shape[:3])} [B, T, Hq], got {tuple(compressed_lse.shape)}")
    reduce = "sum" if score == "nsa" else "max"
    if _triton_path(q):
        from .triton_select import pool_keys, select_blocks_triton

        with torch.no_grad():
            keys = pool_keys(k, length, stride, cu_seqlens) if compressed_keys is None else compressed_keys
            lse = None if compressed_lse is None else compressed_lse.float()
            return select_blocks_triton(q, keys, length=length, stride=stride, reduce=reduce, cu_seqlens=cu_seqlens,
                                        key_cu_seqlens=key_cu, lse=lse, **common)
    return naive.select_blocks_pooled(q, k, length=length, stride=stride, reduce=reduce, cu_seqlens=cu_seqlens,
                                      keys=compressed_keys, lse=compressed_lse, **common)


def _triton_path(q: torch.Tensor) -> bool:
    """Triton kernel for CUDA tensors (or SPARSA_BACKEND=triton); float64 always uses the reference."""
    return q.dtype != torch.float64 and use_triton(q)


def _n_pooled(seqlen: int, length: int, stride: int) -> int:
    return 0 if seqlen < length else (seqlen - length) // stride + 1


def _pooled_cu_seqlens(cu_seqlens: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """Offsets of each document's pooled keys (complete windows) in the concatenated pooled sequence."""
    values = cu_seqlens.tolist()
    offsets = [0]
    for s, e in zip(values[:-1], values[1:]):
        offsets.append(offsets[-1] + _n_pooled(e - s, length, stride))
    return torch.tensor(offsets, dtype=torch.int32)
