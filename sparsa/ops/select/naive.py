"""Reference block keys and SSA block selection (readable PyTorch, exact in float64).

Semantics (SSA, see docs/semantics.md):
  block c covers tokens [c*bs, (c+1)*bs) of its document;
  kbar[c] = mean of the keys of complete block c;
  for query t: cur = t // bs, nc = (t + 1) // bs complete blocks are visible;
  score[c] = sum over the G heads of the group of softmax_{c' < nc}(q . kbar[c'] * scale)[c]  for c < cur;
  forced blocks (the first `init_blocks` and the `local_blocks` ending at cur) score +inf;
  the `topk` best blocks c <= cur, ascending, right-padded with -1.

Pooled-key rules (NSA, InfLLM-V2), see `pooled_block_scores_dense`:
  pooled key i covers tokens [i*stride, i*stride + length) and is visible to t iff i*stride + length - 1 <= t;
  P_g[i] = softmax_i(q_g . key[i] * scale) over the visible keys, S[i] = sum over the group of P_g[i];
  block c gets  "nsa":    sum_i overlap(i, c) / stride * S[i]   (overlap = shared tokens of key i and block c)
                "infllm": max over the keys i overlapping block c of S[i];
  past blocks c < cur only; forced blocks and top-k as for SSA.
  With length = stride = block_size the "nsa" rule is exactly the SSA rule.
"""
from __future__ import annotations

import torch

from .._checks import doc_spans


def block_keys_dense(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """k [B, T, H, D] -> mean keys of complete blocks [B, T // bs, H, D]."""
    batch, seqlen, n_heads, head_dim = k.shape
    n_blocks = seqlen // block_size
    blocks = k[:, : n_blocks * block_size].reshape(batch, n_blocks, block_size, n_heads, head_dim)
    return blocks.float().mean(dim=2).to(k.dtype) if k.dtype in (torch.float16, torch.bfloat16) else blocks.mean(dim=2)


def block_keys(k: torch.Tensor, block_size: int, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean keys of the complete blocks; packed documents are concatenated in order."""
    if cu_seqlens is None:
        return block_keys_dense(k, block_size)
    pieces = [block_keys_dense(k[:, s:e], block_size) for s, e in doc_spans(cu_seqlens)]
    return torch.cat(pieces, dim=1)


def block_scores_dense(q: torch.Tensor, kbar: torch.Tensor, seqlen: int, block_size: int, scale: float) -> torch.Tensor:
    """SSA importance of every past complete block: [B, T, Hkv, ceil(T / bs)] float32/64, -inf where invalid."""
    batch, _, n_heads_q, _ = q.shape
    n_heads_kv = kbar.shape[2]
    group = n_heads_q // n_heads_kv
    n_all = -(-seqlen // block_size)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = torch.arange(seqlen, device=q.device)
    cur = pos // block_size  # [T]
    n_visible = (pos + 1) // block_size  # [T] complete blocks visible to t
    scores = torch.zeros(batch, seqlen, n_heads_kv, n_all, dtype=acc_dtype, device=q.device)
    n_complete = kbar.shape[1]
    if n_complete > 0:
        kbar_q = kbar.to(acc_dtype).repeat_interleave(group, dim=2)  # [B, nc, Hq, D]
        logits = torch.einsum("bthd,bchd->bthc", q.to(acc_dtype), kbar_q) * scale  # [B, T, Hq, nc]
        block = torch.arange(n_complete, device=q.device)
        visible = block[None, :] < n_visible[:, None]  # [T, nc]
        logits = logits.masked_fill(~visible[None, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible block
        grouped = probs.view(batch, seqlen, n_heads_kv, group, n_complete).sum(dim=3)
        scores[..., :n_complete] = grouped
    block_all = torch.arange(n_all, device=q.device)
    past = block_all[None, :] < cur[:, None]  # [T, n_all]
    scores = scores.masked_fill(~past[None, :, None, :], float("-inf"))
    return scores


def forced_mask(seqlen: int, block_size: int, init_blocks: int, local_blocks: int, device) -> torch.Tensor:
    """[T, ceil(T / bs)] bool: blocks always selected (init blocks and the local window ending at cur)."""
    n_all = -(-seqlen // block_size)
    cur = torch.arange(seqlen, device=device) // block_size
    block = torch.arange(n_all, device=device)
    local = (block[None, :] <= cur[:, None]) & (block[None, :] > cur[:, None] - local_blocks)
    init = (block[None, :] < init_blocks) & (block[None, :] <= cur[:, None])
    return local | init


def topk_indices(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """scores [..., n_blocks] (+inf forced, -inf invalid) -> [..., topk] int32 block indices of the topk
    highest scores, ascending, right-padded with -1. Ties go to the lower block index (as in the Triton
    kernel), so a token's selection does not depend on how many blocks the row holds."""
    n_all = scores.shape[-1]
    width = min(topk, n_all)
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    values, indices = values[..., :width], indices[..., :width]
    indices = indices.masked_fill(values == float("-inf"), -1)
    if width < topk:
        pad = indices.new_full((*indices.shape[:-1], topk - width), -1)
        indices = torch.cat([indices, pad], dim=-1)
    big = torch.iinfo(indices.dtype).max
    ordered = torch.sort(indices.masked_fill(indices < 0, big), dim=-1).values
    return ordered.masked_fill(ordered == big, -1).to(torch.int32)


def topk_from_scores(scores: torch.Tensor, forced: torch.Tensor, topk: int) -> torch.Tensor:
    """scores [B, T, Hkv, n_all] (-inf invalid), forced [T, n_all] -> indices [B, T, Hkv, topk] int32."""
    return topk_indices(scores.masked_fill(forced[None, :, None, :], float("inf")), topk)


def select_blocks_dense(q, k, block_size, topk, init_blocks, local_blocks, scale) -> torch.Tensor:
    seqlen = q.shape[1]
    kbar = block_keys_dense(k, block_size)
    scores = block_scores_dense(q, kbar, seqlen, block_size, scale)
    forced = forced_mask(seqlen, block_size, init_blocks, local_blocks, q.device)
    return topk_from_scores(scores, forced, topk)


def select_blocks(q, k, *, block_size, topk, init_blocks, local_blocks, scale, cu_seqlens=None) -> torch.Tensor:
    with torch.no_grad():
        if cu_seqlens is None:
            return select_blocks_dense(q, k, block_size, topk, init_blocks, local_blocks, scale)
        pieces = [
            select_blocks_dense(q[:, s:e], k[:, s:e], block_size, topk, init_blocks, local_blocks, scale)
            for s, e in doc_spans(cu_seqlens)
        ]
        return torch.cat(pieces, dim=1)


def overlap_offsets(block_size: int, length: int, stride: int) -> tuple[int, list[float]]:
    """Pooled keys overlapping block c are i = c * (block_size // stride) - first + u, u < len(weights).

    Returns (first, weights): weights[u] = overlap(key, block) / stride (tokens shared, in strides).
    Needs block_size % stride == 0 (blocks start on key starts).
    """
    ratio = block_size // stride
    first = -(-length // stride) - 1  # keys starting before the block that still reach into it
    weights = []
    for u in range(ratio + first):
        start = (u - first) * stride  # key start relative to the block start
        weights.append((min(start + length, block_size) - max(start, 0)) / stride)
    return first, weights


def pooled_block_scores_dense(q, keys, seqlen, block_size, length, stride, scale, reduce, lse=None):
    """NSA ("sum") / InfLLM-V2 ("max") importance of the past blocks: [B, T, Hkv, ceil(T / bs)], -inf invalid.

    q [B, T, Hq, D]; keys [B, Nk, Hkv, D] pooled keys (key i covers [i*stride, i*stride + length));
    lse [B, T, Hq] optional natural-log LSE of q over the visible keys (else computed here).
    """
    batch, _, n_heads_q, _ = q.shape
    n_keys, n_heads_kv = keys.shape[1], keys.shape[2]
    group = n_heads_q // n_heads_kv
    n_all = -(-seqlen // block_size)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos = torch.arange(seqlen, device=q.device)
    grouped = torch.zeros(batch, seqlen, n_heads_kv, n_keys + 1, dtype=acc_dtype, device=q.device)
    if n_keys > 0:
        keys_q = keys.to(acc_dtype).repeat_interleave(group, dim=2)  # [B, Nk, Hq, D]
        logits = torch.einsum("bthd,bihd->bthi", q.to(acc_dtype), keys_q) * scale  # [B, T, Hq, Nk]
        key_end = torch.arange(n_keys, device=q.device) * stride + length - 1
        visible = key_end[None, :] <= pos[:, None]  # [T, Nk]
        logits = logits.masked_fill(~visible[None, :, None, :], float("-inf"))
        if lse is None:
            probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        else:
            safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(acc_dtype)
            probs = torch.exp(logits - safe[..., None])
        grouped[..., :n_keys] = probs.view(batch, seqlen, n_heads_kv, group, n_keys).sum(dim=3)
    first, weights = overlap_offsets(block_size, length, stride)
    ratio = block_size // stride
    block = torch.arange(n_all, device=q.device)
    key_index = block[:, None] * ratio - first + torch.arange(len(weights), device=q.device)[None, :]  # [n_all, n_over]
    key_index = torch.where((key_index >= 0) & (key_index < n_keys), key_index, torch.full_like(key_index, n_keys))
    gathered = grouped[..., key_index]  # [B, T, Hkv, n_all, n_over] (index n_keys holds 0)
    if reduce == "sum":
        w = torch.tensor(weights, dtype=acc_dtype, device=q.device)
        scores = (gathered * w).sum(dim=-1)
    else:
        scores = gathered.amax(dim=-1)
    past = block[None, :] < (pos // block_size)[:, None]  # [T, n_all]
    return scores.masked_fill(~past[None, :, None, :], float("-inf"))


def select_blocks_pooled(q, k, *, block_size, topk, init_blocks, local_blocks, scale, length, stride, reduce,
                         cu_seqlens=None, keys=None, lse=None) -> torch.Tensor:
    """NSA / InfLLM-V2 selection. keys: pooled keys (per document, concatenated); None = mean-pool k.

    lse (optional) [B, T, Hq]: natural-log LSE of q over the visible pooled keys (NSA: the compression
    branch's LSE).
    """
    from ..compress.naive import compressed_cu_seqlens, mean_pool

    with torch.no_grad():
        if keys is None:
            keys = mean_pool(k, length, stride, cu_seqlens)

        def dense(qs, ks, ls):
            seqlen = qs.shape[1]
            scores = pooled_block_scores_dense(qs, ks, seqlen, block_size, length, stride, scale, reduce, ls)
            forced = forced_mask(seqlen, block_size, init_blocks, local_blocks, qs.device)
            return topk_from_scores(scores, forced, topk)

        if cu_seqlens is None:
            return dense(q, keys, lse)
        kcu = compressed_cu_seqlens(cu_seqlens, length, stride).tolist()
        pieces = [
            dense(q[:, s:e], keys[:, ks:ke], None if lse is None else lse[:, s:e])
            for (s, e), ks, ke in zip(doc_spans(cu_seqlens), kcu[:-1], kcu[1:])
        ]
        return torch.cat(pieces, dim=1)
