"""Attention KL on the CPU in chunks of query rows: the PyTorch path for long sequences without Triton.

The references (naive.attention_kl_dense, group_attention_kl_dense) build [B, H, N_Q, N_K] logits for the teacher
and the student and keep them for autograd. Here the query rows run in chunks of C rows, each against the keys
it can see (all keys, or the first r1 + N_K - N_Q under the bottom-right causal mask), and each chunk under
activation checkpointing: the forward keeps no logits, the backward recomputes one chunk at a time. Memory is
about C x N_K per head (`CHUNK_ELEMENTS` in all); the values are the reference's, chunk by chunk.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from . import naive

# elements of one chunk's logits (teacher and student, all heads, float32: about 4 bytes each, several
# buffers alive at once); a chunk is at least one row. Below this the reference runs in one piece.
CHUNK_ELEMENTS = 2**24


def chunk_rows(batch: int, n_heads: int, n_keys: int) -> int:
    """Query rows per chunk: the most whose two logit tiles stay within CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, 2 * batch * n_heads * n_keys))


def _in_row_chunks(dense_fn, q_t, k_t, q_s, k_s, *, causal: bool, **kwargs):
    """dense_fn over chunks of query rows of one document (or batch of equal-length sequences)."""
    n_q, n_k = q_t.shape[1], k_t.shape[1]
    rows = chunk_rows(q_t.shape[0], q_t.shape[2], n_k)
    fn = functools.partial(dense_fn, causal=causal, **kwargs)
    if rows >= n_q:
        return fn(q_t, k_t, q_s, k_s)
    grads = torch.is_grad_enabled() and any(x.requires_grad for x in (q_t, k_t, q_s, k_s))
    pieces = []
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        # bottom-right causal: row i sees keys j <= i + n_k - n_q; with the chunk's keys cut at r1 + n_k - n_q
        # the chunk's own bottom-right rule is the same rule (a chunk that sees nothing gets zero keys)
        n_seen = max(0, min(n_k, r1 + n_k - n_q)) if causal else n_k
        args = (q_t[:, r0:r1], k_t[:, :n_seen], q_s[:, r0:r1], k_s[:, :n_seen])
        pieces.append(checkpoint(fn, *args, use_reentrant=False) if grads else fn(*args))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))


def attention_kl(q_t, k_t, q_s, k_s, *, causal, scale_t, scale_s, direction="forward", cu_seqlens=None):
    """naive.attention_kl in chunks of query rows -> (kl, lse_t, lse_s), each [B, N_Q, H]."""
    fn = functools.partial(_in_row_chunks, naive.attention_kl_dense)
    return naive._per_document(fn, cu_seqlens, (q_t, k_t, q_s, k_s), causal=causal, scale_t=scale_t,
                               scale_s=scale_s, direction=direction)


def group_attention_kl(q_t, k_t, q_s, k_s, *, causal, scale_t, scale_s, cu_seqlens=None):
    """naive.group_attention_kl in chunks of query rows -> (kl, lse_s), each [B, N_Q, Hkv]."""
    fn = functools.partial(_in_row_chunks, naive.group_attention_kl_dense)
    return naive._per_document(fn, cu_seqlens, (q_t, k_t, q_s, k_s), causal=causal, scale_t=scale_t,
                               scale_s=scale_s)
