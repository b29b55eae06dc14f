"""Selected-block attention in PyTorch with bounded memory: the path for long sequences without Triton.

The dense reference (naive.py) builds [B, Hq, T, T] logits: 8.6 GB at 16K tokens and 8 heads in float32. This
path gathers, for a chunk of C tokens at a time, the keys and values of each token's selected blocks
([B, Hkv, C, topk * block, D]) and computes that chunk's attention exactly, so its memory is set by the chunk
(`CHUNK_ELEMENTS`) and its work by topk * block keys per token instead of T. The backward recomputes each
chunk (nothing but q, k, v, o and lse is saved) and adds the gathered keys' gradients into dk / dv.

Semantics are the reference's: keys j <= t of the blocks in block_indices[t] (a block listed twice counts
once, -1 slots ignored), positions and blocks local to each packed document, a row without keys gives
o = 0 and lse = -inf. Accumulation in float32 (float64 for float64 inputs); o in q's dtype, lse float32
(float64 for float64 inputs), as naive.masked_attention.
"""
from __future__ import annotations

import torch

from .._alloc import new_output
from .._checks import doc_spans

# elements of the largest per-chunk tensor set (gathered keys and values, logits) a chunk may hold: 2**24
# (64 MB in float32); the chunk is at least one token
CHUNK_ELEMENTS = 2**24


# the dense reference is used while it is cheap: its logits (batch x query heads x L^2 for the longest
# document L) within DENSE_SMALL_ELEMENTS, or within DENSE_MAX_ELEMENTS with L below DENSE_MAX_RATIO x the
# selected keys per token (topk x block). Measured on 2 CPU cores (torch 2.13), forward+backward s, dense /
# blockwise: 8 / 2 heads, D = 64, block 64, top-8: 512 tokens 0.07 / 0.23, 2048 1.64 / 0.81, 4096 7.64 / 2.01;
# block 16: batch 4 x 1024 tokens 1.15 / 0.62; the demo's tiny model (batch 8 x 256 tokens, 4 / 2 heads, D = 16,
# block 16, top-4) 0.034 / 0.064
DENSE_SMALL_ELEMENTS = 2**21
DENSE_MAX_ELEMENTS = 2**27
DENSE_MAX_RATIO = 4


def prefers_dense(q: torch.Tensor, block_indices: torch.Tensor, block_size: int, cu_seqlens=None) -> bool:
    """Whether the dense reference (naive.py) is the cheaper PyTorch path for this call (DENSE_*)."""
    longest = max(e - s for s, e in _spans(cu_seqlens, q.shape[1]))
    logits = q.shape[0] * q.shape[2] * longest**2
    n_keys = block_indices.shape[-1] * block_size
    return logits <= DENSE_SMALL_ELEMENTS or (longest < DENSE_MAX_RATIO * n_keys and logits <= DENSE_MAX_ELEMENTS)


def unique_selection(block_indices: torch.Tensor) -> torch.Tensor:
    """[..., K] block ids with every repeat of a block after its first slot (and every negative id) set to -1."""
    blocks = block_indices.long()
    ordered, order = torch.sort(blocks, dim=-1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    drop = torch.empty_like(repeat).scatter_(-1, order, repeat)  # back to slot order
    return torch.where(drop | (blocks < 0), torch.full_like(blocks, -1), blocks)


def chunk_tokens(batch: int, n_heads_kv: int, group: int, n_keys: int, head_dim: int, v_dim: int) -> int:
    """Tokens per chunk: the most whose gathered keys, values and logits stay within CHUNK_ELEMENTS."""
    per_token = batch * n_heads_kv * n_keys * (head_dim + v_dim + 3 * group)
    return max(1, CHUNK_ELEMENTS // max(1, per_token))


def _chunk_keys(blocks: torch.Tensor, start: int, block_size: int):
    """Key blocks of a chunk: (blocks [B, Hkv, C, K], -1 kept: _flat_rows makes them rows of _block_rows' view;
    valid [B, Hkv, C, n]), n = K * block_size.

    blocks [B, C, Hkv, K] (deduplicated, -1 = none) for the tokens start .. start + C - 1 of one document,
    n_blocks = the document's blocks; a key is valid when its slot is and its position is at most the token's."""
    batch, n_tok, n_heads_kv, _ = blocks.shape
    offsets = torch.arange(block_size, device=blocks.device)
    pos = (blocks[..., None] * block_size + offsets).flatten(-2)  # [B, C, Hkv, n]
    tokens = start + torch.arange(n_tok, device=blocks.device)
    valid = (blocks >= 0).repeat_interleave(block_size, dim=-1) & (pos <= tokens[None, :, None, None])
    return blocks.permute(0, 2, 1, 3), valid.permute(0, 2, 1, 3)


def _block_rows(x: torch.Tensor, block_size: int, acc: torch.dtype) -> torch.Tensor:
    """x [B, T, Hkv, E] -> [B * Hkv * n_blocks, block_size * E] in acc (zero-padded to whole blocks)."""
    batch, seqlen, n_heads_kv, width = x.shape
    n_blocks = -(-seqlen // block_size)
    xb = torch.zeros(batch, n_heads_kv, n_blocks * block_size, width, dtype=acc, device=x.device)
    xb[:, :, :seqlen] = x.transpose(1, 2)
    return xb.view(batch * n_heads_kv * n_blocks, block_size * width)


def _flat_rows(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """blocks [B, Hkv, C, K] -> rows [B * Hkv * C * K] of _block_rows' view. A -1 slot, or a block past the
    document's last (possible in packed documents), holds no valid key (masked by _chunk_keys): it reads block 0
    or the last block of its own head instead of another head's rows or past the end."""
    batch, n_heads_kv = blocks.shape[:2]
    base = torch.arange(batch * n_heads_kv, device=blocks.device).view(batch, n_heads_kv, 1, 1) * n_blocks
    return (base + blocks.clamp(0, n_blocks - 1)).reshape(-1)


def _gather(rows: torch.Tensor, flat: torch.Tensor, blocks: torch.Tensor, width: int) -> torch.Tensor:
    """Rows `flat` of _block_rows' view -> [B, Hkv, C, K * block, width] (blocks: [B, Hkv, C, K])."""
    batch, n_heads_kv, n_tok, _ = blocks.shape
    return rows.index_select(0, flat).view(batch, n_heads_kv, n_tok, -1, width)


def _chunk_probs(qg, k_sel, valid, scale: float, lse=None):
    """Logits of a chunk and their probabilities: qg [B, Hkv, C, G, D], k_sel [B, Hkv, C, n, D], valid
    [B, Hkv, C, n]. Without `lse` it is computed (returned as [B, Hkv, C, G]); empty rows get p = 0."""
    logits = torch.matmul(qg, k_sel.transpose(-1, -2)) * scale  # [B, Hkv, C, G, n]
    logits = logits.masked_fill(~valid[:, :, :, None, :], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(logits - safe_lse[..., None]), lse


def _heads_major(x: torch.Tensor, n_heads_kv: int, acc: torch.dtype) -> torch.Tensor:
    """[B, C, Hq, E] -> [B, Hkv, C, G, E] in the accumulation dtype."""
    batch, n_tok, n_heads, width = x.shape
    return x.to(acc).reshape(batch, n_tok, n_heads_kv, n_heads // n_heads_kv, width).permute(0, 2, 1, 3, 4)


def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, C, G, E] -> [B, C, Hkv * G, E]."""
    batch, n_heads_kv, n_tok, group, width = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(batch, n_tok, n_heads_kv * group, width)


def _doc_forward(q, k, v, blocks, block_size: int, scale: float, acc: torch.dtype, o, lse):
    """One document: q [B, T, Hq, D], k / v [B, T, Hkv, *], blocks [B, T, Hkv, K] deduplicated; writes
    o [B, T, Hq, Dv] and lse [B, T, Hq] (acc dtype: the caller's slices)."""
    batch, seqlen, n_heads_q, head_dim = q.shape
    n_heads_kv, v_dim = k.shape[2], v.shape[-1]
    kb, vb = _block_rows(k, block_size, acc), _block_rows(v, block_size, acc)
    n_blocks = kb.shape[0] // (batch * n_heads_kv)
    step = chunk_tokens(batch, n_heads_kv, n_heads_q // n_heads_kv, blocks.shape[-1] * block_size, head_dim, v_dim)
    for s in range(0, seqlen, step):
        e = min(seqlen, s + step)
        chunk, valid = _chunk_keys(blocks[:, s:e], s, block_size)  # [B, Hkv, C, K], [B, Hkv, C, n]
        flat = _flat_rows(chunk, n_blocks)
        qg = _heads_major(q[:, s:e], n_heads_kv, acc)  # [B, Hkv, C, G, D]
        probs, lse_c = _chunk_probs(qg, _gather(kb, flat, chunk, head_dim), valid, scale)
        o[:, s:e] = _tokens_major(torch.matmul(probs, _gather(vb, flat, chunk, v_dim)))
        lse[:, s:e] = _tokens_major(lse_c[..., None])[..., 0]


def _doc_backward(q, k, v, o, lse, do, blocks, block_size: int, scale: float, acc: torch.dtype, dq):
    """Gradients of one document (shapes as _doc_forward; o, lse, do of the document): writes dq (acc dtype:
    the caller's slice), returns dk, dv in acc."""
    batch, seqlen, n_heads_q, head_dim = q.shape
    n_heads_kv, v_dim = k.shape[2], v.shape[-1]
    kb, vb = _block_rows(k, block_size, acc), _block_rows(v, block_size, acc)
    n_blocks = kb.shape[0] // (batch * n_heads_kv)
    dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
    step = chunk_tokens(batch, n_heads_kv, n_heads_q // n_heads_kv, blocks.shape[-1] * block_size, head_dim, v_dim)
    for s in range(0, seqlen, step):
        e = min(seqlen, s + step)
        chunk, valid = _chunk_keys(blocks[:, s:e], s, block_size)
        flat = _flat_rows(chunk, n_blocks)
        qg = _heads_major(q[:, s:e], n_heads_kv, acc)  # [B, Hkv, C, G, D]
        dog = _heads_major(do[:, s:e], n_heads_kv, acc)  # [B, Hkv, C, G, Dv]
        k_sel, v_sel = _gather(kb, flat, chunk, head_dim), _gather(vb, flat, chunk, v_dim)  # [B, Hkv, C, n, *]
        lse_c = _heads_major(lse[:, s:e, :, None], n_heads_kv, acc)[..., 0]  # [B, Hkv, C, G]
        probs, _ = _chunk_probs(qg, k_sel, valid, scale, lse_c)
        delta = (dog * _heads_major(o[:, s:e], n_heads_kv, acc)).sum(-1, keepdim=True)  # [B, Hkv, C, G, 1]
        dlogits = probs * (torch.matmul(dog, v_sel.transpose(-1, -2)) - delta) * scale  # [B, Hkv, C, G, n]
        dq[:, s:e] = _tokens_major(torch.matmul(dlogits, k_sel))
        # masked keys (padding slots point at block 0) have zero probability: they add exact zeros
        dkb.index_add_(0, flat, torch.matmul(dlogits.transpose(-1, -2), qg).reshape(flat.numel(), -1))
        dvb.index_add_(0, flat, torch.matmul(probs.transpose(-1, -2), dog).reshape(flat.numel(), -1))
    return _unblock(dkb, k.shape), _unblock(dvb, v.shape)


def _unblock(xb: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of _block_rows: [B * Hkv * n_blocks, block * E] -> [B, T, Hkv, E]."""
    batch, seqlen, n_heads_kv, width = shape
    return xb.view(batch, n_heads_kv, -1, width)[:, :, :seqlen].transpose(1, 2)


def _spans(cu_seqlens, seqlen: int):
    return [(0, seqlen)] if cu_seqlens is None else doc_spans(cu_seqlens)


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


class _BlockwiseSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size, scale, cu_seqlens):
        acc = _acc_dtype(q)
        blocks = unique_selection(block_indices)
        o = new_output((*q.shape[:3], v.shape[-1]), acc, q.device)
        lse = new_output(q.shape[:3], acc, q.device)
        for s, e in _spans(cu_seqlens, q.shape[1]):
            _doc_forward(q[:, s:e], k[:, s:e], v[:, s:e], blocks[:, s:e], block_size, scale, acc, o[:, s:e], lse[:, s:e])
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, blocks, o, lse)
        ctx.block_size, ctx.scale, ctx.cu_seqlens = block_size, scale, cu_seqlens
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, blocks, o, lse = ctx.saved_tensors
        acc = _acc_dtype(q)
        dq = new_output(q.shape, acc, q.device)
        dk = new_output(k.shape, acc, q.device)
        dv = new_output(v.shape, acc, q.device)
        for s, e in _spans(ctx.cu_seqlens, q.shape[1]):
            dk[:, s:e], dv[:, s:e] = _doc_backward(
                q[:, s:e], k[:, s:e], v[:, s:e], o[:, s:e], lse[:, s:e], do[:, s:e], blocks[:, s:e], ctx.block_size,
                ctx.scale, acc, dq[:, s:e])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def sparse_attention(q, k, v, block_indices, *, block_size: int, scale: float, cu_seqlens=None):
    """Returns (o, lse) as naive.sparse_attention, in memory bounded by CHUNK_ELEMENTS per chunk plus the
    inputs, outputs and (backward) fp32 copies of k and v; differentiable in q, k, v."""
    return _BlockwiseSparseAttention.apply(q, k, v, block_indices, block_size, scale, cu_seqlens)
