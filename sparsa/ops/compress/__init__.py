"""NSA compression branch: compressed keys/values (mean pooling or a learnable MLP) and compressed attention.

Compressed token i of a document covers its tokens [i*stride, i*stride + length); only complete windows
exist (`n_compressed`). Query t (local position) sees compressed token i iff i*stride + length - 1 <= t.
Packed documents (B = 1, `cu_seqlens`): compressed tokens of the documents are concatenated in order,
with offsets `compressed_cu_seqlens(cu_seqlens, length, stride)`.
"""
from __future__ import annotations

import torch

from .._checks import check_cu_seqlens, check_floating, check_positive_int, default_scale
from ..backend import use_triton
from . import chunked, naive
from .naive import compressed_cu_seqlens, n_compressed

__all__ = ["compressed_attention", "mean_pool", "mlp_compress", "compressed_cu_seqlens", "n_compressed"]


def _check_window(length, stride) -> None:
    check_positive_int("length", length)
    check_positive_int("stride", stride)


def _check_x(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D], got {getattr(x, 'shape', type(x).__name__)}")
    check_floating(name, x)


def mean_pool(x: torch.Tensor, *, length: int, stride: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of every complete window: x [B, T, H, D] -> [B, Nc, H, D] (differentiable)."""
    _check_x("x", x)
    _check_window(length, stride)
    check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    return naive.mean_pool(x, length, stride, cu_seqlens)


def mlp_compress(x: torch.Tensor, weight: torch.Tensor, pos_emb: torch.Tensor | None = None, *, length: int,
                 stride: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """NSA's learnable compression phi: kc[i] = flatten(x[i*stride : i*stride + length] + pos_emb) @ weight.

    x [B, T, H, D]; weight [H, length * D, Dout]; pos_emb [H, length, D] (intra-block position
    embedding) or None. Returns [B, Nc, H, Dout]; differentiable in x, weight and pos_emb (PyTorch GEMMs).
    """
    _check_x("x", x)
    _check_window(length, stride)
    check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    n_heads, head_dim = x.shape[2], x.shape[3]
    if not isinstance(weight, torch.Tensor) or weight.ndim != 3 or weight.shape[:2] != (n_heads, length * head_dim):
        raise ValueError(f"weight must have shape [H={n_heads}, length*D={length * head_dim}, Dout], "
                         f"got {getattr(weight, 'shape', None)}")
    if pos_emb is not None and (not isinstance(pos_emb, torch.Tensor) or pos_emb.shape != (n_heads, length, head_dim)):
        raise ValueError(f"pos_emb must have shape [{n_heads}, {length}, {head_dim}], got {getattr(pos_emb, 'shape', None)}")
    return naive.mlp_compress(x, weight, pos_emb, length, stride, cu_seqlens)


def compressed_attention(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    *,
    length: int,
    stride: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of every query over the compressed tokens whose whole window is in its past.

    q [B, T, Hq, D], kc [B, Nc, Hkv, D], vc [B, Nc, Hkv, Dv] (Nc = n_compressed(T, length, stride), or the
    sum over documents with `cu_seqlens`). Returns o [B, T, Hq, Dv] (0 for t < length - 1) and, with
    `return_lse`, the natural-log LSE [B, T, Hq] float32 (-inf where no compressed token is visible).
    Differentiable in q, kc, vc; CUDA tensors use the Triton kernels.
    """
    _check_x("q", q)
    _check_x("kc", kc)
    _check_x("vc", vc)
    _check_window(length, stride)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    if kc.dtype != q.dtype or vc.dtype != q.dtype:
        raise ValueError(f"kc ({kc.dtype}) and vc ({vc.dtype}) must have the dtype of q ({q.dtype})")
    if kc.shape[0] != q.shape[0] or kc.shape[3] != q.shape[3] or vc.shape[:3] != kc.shape[:3]:
        raise ValueError(f"kc {tuple(kc.shape)} / vc {tuple(vc.shape)} do not fit q {tuple(q.shape)}")
    if q.shape[2] % kc.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kc heads ({kc.shape[2]})")
    key_cu = None if cu_seqlens is None else compressed_cu_seqlens(cu_seqlens, length, stride)
    expected = n_compressed(q.shape[1], length, stride) if cu_seqlens is None else int(key_cu[-1])
    if kc.shape[1] != expected:
        raise ValueError(f"kc holds {kc.shape[1]} compressed tokens, expected {expected} for length={length}, stride={stride}")
    scale = default_scale(scale, q.shape[-1])
    if use_triton(q) and q.dtype != torch.float64:
        from .triton_attention import positional_attention_triton

        out, lse = positional_attention_triton(q, kc, vc, scale=scale, stride=stride, length=length, window=0,
                                               cu_seqlens=cu_seqlens, key_cu_seqlens=key_cu)
    else:
        # PyTorch: the reference in one piece for small problems, else in query chunks (checkpointed)
        out, lse = naive.compressed_attention(q, kc, vc, length=length, stride=stride, scale=scale,
                                              cu_seqlens=cu_seqlens, attend=chunked.attend_for(q, kc.shape[1]))
    return (out, lse) if return_lse else out
