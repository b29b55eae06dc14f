"""Sliding-window causal attention: query t attends to the `window` most recent keys (t - window, t]."""
from __future__ import annotations

import torch

from .._checks import check_cu_seqlens, check_positive_int, check_qkv, default_scale
from ..backend import use_triton
from ..compress import chunked
from . import naive

__all__ = ["window_attention"]


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """o[t] = softmax_{t - window < j <= t}(q[t] . k[j] * scale) @ v, per query head (GQA: any G).

    q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]; positions local to each packed document.
    Returns o [B, T, Hq, Dv] and, with `return_lse`, the natural-log LSE [B, T, Hq] float32.
    Differentiable in q, k, v; CUDA tensors use the Triton kernels (forward and backward).
    """
    check_qkv(q, k, v)
    check_positive_int("window", window)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = default_scale(scale, q.shape[-1])
    if use_triton(q) and q.dtype != torch.float64:
        from ..compress.triton_attention import positional_attention_triton

        out, lse = positional_attention_triton(q, k, v, scale=scale, stride=1, length=1, window=window,
                                               cu_seqlens=cu_seqlens, key_cu_seqlens=cu_seqlens)
    else:  # PyTorch: the dense reference in one piece for small problems, else in query chunks (checkpointed)
        out, lse = naive.window_attention(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens,
                                          attend=chunked.attend_for(q, q.shape[1]))
    return (out, lse) if return_lse else out
