"""Reference sliding-window causal attention (readable PyTorch; exact in float64; O(T^2) memory).

o[t] = softmax_{t - window < j <= t}(q[t] . k[j] * scale) @ v      (the `window` most recent keys, t included)
Positions are local to each packed document (B = 1 with `cu_seqlens`).
"""
from __future__ import annotations

import torch

from .._checks import doc_spans
from ..compress.naive import positional_attention


def window_attention(q, k, v, *, window: int, scale: float, cu_seqlens=None, attend=positional_attention):
    """Returns (o, lse); differentiable in q, k, v. `attend`: positional_attention or a function with its
    signature and values (compress.chunked.chunked_positional_attention)."""

    def run(qs, ks, vs):
        key_pos = torch.arange(ks.shape[1], device=qs.device)
        return attend(qs, ks, vs, key_pos, scale, window=window)

    if cu_seqlens is None:
        return run(q, k, v)
    outs, lses = [], []
    for s, e in doc_spans(cu_seqlens):
        o, lse = run(q[:, s:e], k[:, s:e], v[:, s:e])
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
