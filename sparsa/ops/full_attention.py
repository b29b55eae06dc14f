"""Full (dense) softmax attention with the sparsa interface: [B, T, H, D], GQA, packed documents."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_cu_seqlens, check_qkv, default_scale, doc_spans
from .sparse_attn.naive import masked_attention


def attention_reference(q, k, v, *, causal: bool, scale: float):
    """Readable reference: returns (o, lse)."""
    batch, seqlen, _, _ = q.shape
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(batch, k.shape[2], seqlen, seqlen)
    return masked_attention(q, k, v, allowed, scale)


def _attention_sdpa(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if group > 1:
        kh = kh.repeat_interleave(group, dim=1)
        vh = vh.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def attention(q, k, v, *, causal: bool = True, scale=None, cu_seqlens=None) -> torch.Tensor:
    """Full softmax attention; on CUDA via PyTorch SDPA (flash backend), on CPU via the reference."""
    check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = default_scale(scale, q.shape[-1])

    def run(qs, ks, vs):
        if qs.is_cuda:
            return _attention_sdpa(qs, ks, vs, causal, scale)
        return attention_reference(qs, ks, vs, causal=causal, scale=scale)[0]

    if cu_seqlens is None:
        return run(q, k, v)
    return torch.cat([run(q[:, s:e], k[:, s:e], v[:, s:e]) for s, e in doc_spans(cu_seqlens)], dim=1)
