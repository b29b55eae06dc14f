"""Argument validation shared by the functional ops (clear ValueErrors naming the argument)."""
from __future__ import annotations

import torch


def check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


def check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_selection_geometry(block_size, topk, init_blocks, local_blocks) -> None:
    """Block size, budget and forced blocks of a block selection."""
    check_positive_int("block_size", block_size)
    check_positive_int("topk", topk)
    check_positive_int("local_blocks", local_blocks)
    if isinstance(init_blocks, bool) or not isinstance(init_blocks, int) or init_blocks < 0:
        raise ValueError(f"init_blocks must be a non-negative int, got {init_blocks!r}")
    if topk < init_blocks + local_blocks:
        raise ValueError(f"topk ({topk}) must be >= init_blocks + local_blocks ({init_blocks + local_blocks})")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[int, int]:
    """Checks [B, T, H, D] layout and GQA compatibility; returns (n_heads_q, n_heads_kv)."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_floating("q", q)
    check_floating("k", k)
    if k.dtype != q.dtype:
        raise ValueError(f"k dtype {k.dtype} differs from q dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and sequence dims")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q head dim {q.shape[3]} differs from k head dim {k.shape[3]}")
    if v is not None:
        check_tensor("v", v, 4)
        if v.dtype != q.dtype:
            raise ValueError(f"v dtype {v.dtype} differs from q dtype {q.dtype}")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)} in batch, sequence and heads")
    n_heads_q, n_heads_kv = q.shape[2], k.shape[2]
    if n_heads_q % n_heads_kv != 0:
        raise ValueError(f"q heads ({n_heads_q}) must be a multiple of k heads ({n_heads_kv})")
    return n_heads_q, n_heads_kv


def check_cu_seqlens(cu_seqlens, batch: int, seqlen: int, device=None) -> None:
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [n_docs + 1] of int32 offsets")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs packed input with batch size 1, got batch {batch}")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != seqlen:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seqlen}, got {values[0]}..{values[-1]}")
    if any(b <= a for a, b in zip(values[:-1], values[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")


def default_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return float(scale)


def doc_spans(cu_seqlens) -> list[tuple[int, int]]:
    """[(start, end)] of each packed document."""
    values = cu_seqlens.tolist()
    return list(zip(values[:-1], values[1:]))
