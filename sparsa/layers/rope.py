"""Rotary position embedding (rotate-half convention, as in Llama / Hugging Face)."""
from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """positions [B, T] (int) -> cos, sin [B, T, 1, head_dim] float32."""
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, T, D]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated at its positions (computed in float32, returned in x's dtype)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Position of every packed token inside its own document: [1, T]."""
    starts = torch.zeros(seqlen, dtype=torch.long, device=cu_seqlens.device)
    bounds = cu_seqlens[1:-1].long()
    starts[bounds] = 1
    doc_id = torch.cumsum(starts, dim=0)  # [T]
    doc_start = cu_seqlens.long()[doc_id]
    return (torch.arange(seqlen, device=cu_seqlens.device) - doc_start)[None, :]
