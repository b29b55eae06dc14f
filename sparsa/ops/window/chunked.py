"""Sliding-window attention in query chunks: the PyTorch path for long sequences without Triton.

The reference (naive.py) builds [B, Hq, T, T] logits. Here the queries t in [s, e) see only the keys
(s - window, e), so each chunk of C queries builds [B, Hq, C, C + window - 1] logits: memory (kept by autograd
for the backward) linear in T. Same definition and outputs as the reference (positions local to each packed
document, o = 0 / lse = -inf for rows without keys, which a window >= 1 never leaves).
"""
from __future__ import annotations

import torch

from .._checks import doc_spans
from ..compress.naive import positional_attention

# dense logits (batch x query heads x L^2, L the longest document) up to which the reference is used, and the
# queries per chunk as a multiple of the window (at least MIN_CHUNK)
DENSE_MAX_ELEMENTS = 2**22
CHUNK_WINDOWS = 1
MIN_CHUNK = 256


def prefers_dense(q: torch.Tensor, window: int, cu_seqlens=None) -> bool:
    """Whether the dense reference is the cheaper path: small logits, or a window that covers the document."""
    spans = [(0, q.shape[1])] if cu_seqlens is None else doc_spans(cu_seqlens)
    longest = max(e - s for s, e in spans)
    return q.shape[0] * q.shape[2] * longest**2 <= DENSE_MAX_ELEMENTS or longest <= 2 * chunk_queries(window)


def chunk_queries(window: int) -> int:
    return max(MIN_CHUNK, CHUNK_WINDOWS * window)


def _doc_window_attention(q, k, v, window: int, scale: float):
    """One document in query chunks; returns (o, lse) as positional_attention."""
    step = chunk_queries(window)
    outs, lses = [], []
    for s in range(0, q.shape[1], step):
        e = min(q.shape[1], s + step)
        first = max(0, s - window + 1)
        key_pos = torch.arange(first - s, e - s, device=q.device)  # key positions relative to the chunk's first query
        o, lse = positional_attention(q[:, s:e], k[:, first:e], v[:, first:e], key_pos, scale, window=window)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def window_attention(q, k, v, *, window: int, scale: float, cu_seqlens=None):
    """Returns (o, lse) as naive.window_attention; differentiable in q, k, v."""
    if cu_seqlens is None:
        return _doc_window_attention(q, k, v, window, scale)
    outs, lses = [], []
    for s, e in doc_spans(cu_seqlens):
        o, lse = _doc_window_attention(q[:, s:e], k[:, s:e], v[:, s:e], window, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
