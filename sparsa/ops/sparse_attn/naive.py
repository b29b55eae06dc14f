"""Reference selected-block attention (readable PyTorch; exact in float64; O(T^2) memory).

o[t, g] = softmax over the keys j of the blocks in block_indices[t, g // G] with j <= t
          of (q[t, g] . k[j] * scale), applied to v.   -1 entries are ignored.
Positions and block indices are local to each packed document.
"""
from __future__ import annotations

import torch

from .._checks import doc_spans


def selection_token_mask(block_indices: torch.Tensor, seqlen: int, block_size: int) -> torch.Tensor:
    """block_indices [B, T, Hkv, K] -> bool [B, Hkv, T, T]: key j allowed for query t (causal included)."""
    batch, _, n_heads_kv, _ = block_indices.shape
    n_all = -(-seqlen // block_size)
    valid = block_indices >= 0
    safe = block_indices.long().clamp(min=0)
    chosen = torch.zeros(batch, seqlen, n_heads_kv, n_all + 1, dtype=torch.bool, device=block_indices.device)
    chosen.scatter_(-1, torch.where(valid, safe, torch.full_like(safe, n_all)), True)
    chosen = chosen[..., :n_all]  # [B, T, Hkv, n_all]
    key_block = torch.arange(seqlen, device=block_indices.device) // block_size  # [T]
    token_mask = chosen[..., key_block]  # [B, T, Hkv, T]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=block_indices.device).tril()
    return token_mask.permute(0, 2, 1, 3) & causal


def masked_attention(q, k, v, allowed: torch.Tensor, scale: float):
    """Softmax attention with an explicit key mask. q [B,T,Hq,D], k/v [B,T,Hkv,*], allowed [B,Hkv,T,T].

    Returns o [B, T, Hq, Dv] (dtype of q) and lse [B, T, Hq] float32 (natural log; -inf for empty rows).
    Computed in float32 (float64 for float64 inputs).
    """
    n_heads_q, n_heads_kv = q.shape[2], k.shape[2]
    group = n_heads_q // n_heads_kv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh = q.to(acc_dtype).transpose(1, 2)  # [B, Hq, T, D]
    kh = k.to(acc_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, T, D]
    vh = v.to(acc_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, T, Dv]
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, Hq, T, T]
    mask = allowed.repeat_interleave(group, dim=1)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, T]
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe_lse[..., None])
    out = torch.matmul(probs, vh)  # [B, Hq, T, Dv]
    return out.transpose(1, 2).to(q.dtype), lse.transpose(1, 2).float() if acc_dtype != torch.float64 else lse.transpose(1, 2)


def sparse_attention_dense(q, k, v, block_indices, block_size, scale):
    allowed = selection_token_mask(block_indices, q.shape[1], block_size)
    return masked_attention(q, k, v, allowed, scale)


def sparse_attention(q, k, v, block_indices, *, block_size, scale, cu_seqlens=None):
    """Returns (o, lse); differentiable in q, k, v."""
    if cu_seqlens is None:
        return sparse_attention_dense(q, k, v, block_indices, block_size, scale)
    outs, lses = [], []
    for s, e in doc_spans(cu_seqlens):
        o, lse = sparse_attention_dense(q[:, s:e], k[:, s:e], v[:, s:e], block_indices[:, s:e], block_size, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
