"""Positional attention (compressed and sliding-window branches) in query chunks: the PyTorch path for long
sequences without Triton.

naive.positional_attention builds [B, Hq, T, Nk] logits and autograd keeps them. Here the queries run in chunks
[s, e); a chunk takes only the keys it can see (key_pos <= e - 1 and, with a window w, key_pos > s - w; key_pos
is ascending), and with gradients each chunk runs under activation checkpointing, so memory is one chunk's
logits (`CHUNK_ELEMENTS`) and the backward recomputes chunk by chunk. Values are the reference's.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .naive import positional_attention

# elements of one chunk's logits (batch x query heads x rows x keys) and the least rows per chunk
CHUNK_ELEMENTS = 2**23
MIN_ROWS = 64


def prefers_dense(q: torch.Tensor, n_keys: int) -> bool:
    """Whether one piece is small enough: the whole [B, Hq, T, Nk] logits within CHUNK_ELEMENTS."""
    return q.shape[0] * q.shape[2] * q.shape[1] * n_keys <= CHUNK_ELEMENTS


def attend_for(q: torch.Tensor, n_keys: int):
    """The positional attention for q against n_keys keys: naive.positional_attention in one piece where
    `prefers_dense`, else chunked_positional_attention (same signature and values)."""
    return positional_attention if prefers_dense(q, n_keys) else chunked_positional_attention


def chunk_rows(q: torch.Tensor, n_keys: int, window: int = 0) -> int:
    """Query rows per chunk: without a window the most whose logits against all n_keys keys fit CHUNK_ELEMENTS;
    with a window w at most w rows (a chunk of R rows sees R + w - 1 keys: the logits stay within 2x the useful
    ones), fewer where R x 2w logits would not fit; never below MIN_ROWS."""
    per_row = q.shape[0] * q.shape[2] * (n_keys if window <= 0 else 2 * window)
    rows = CHUNK_ELEMENTS // max(1, per_row)
    return max(MIN_ROWS, rows if window <= 0 else min(window, rows))


def _chunk(q, k, v, key_pos, scale: float, window: int):
    return positional_attention(q, k, v, key_pos, scale, window=window)


def chunked_positional_attention(q, k, v, key_pos: torch.Tensor, scale: float, window: int = 0):
    """naive.positional_attention (queries at 0 .. T - 1, key j at key_pos[j], ascending) in query chunks."""
    seqlen = q.shape[1]
    rows = chunk_rows(q, k.shape[1], window)
    grads = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    starts = list(range(0, seqlen, rows))
    ends = [min(seqlen, s + rows) for s in starts]
    n = len(starts)
    # every chunk's key range in one search (one host read, not two per chunk): keys in (s - window, e - 1]
    probes = torch.tensor([s - window for s in starts] + [e - 1 for e in ends], dtype=key_pos.dtype,
                          device=key_pos.device)
    bounds = torch.searchsorted(key_pos, probes, right=True).tolist()
    los = bounds[:n] if window > 0 else [0] * n
    outs, lses = [], []
    for s, e, lo, hi in zip(starts, ends, los, bounds[n:]):
        args = (q[:, s:e], k[:, lo:hi], v[:, lo:hi], key_pos[lo:hi] - s, scale, window)
        o, lse = checkpoint(_chunk, *args, use_reentrant=False) if grads else _chunk(*args)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
