"""Reference NSA compression branch (readable PyTorch; exact in float64; O(T * Nc) memory).

Compressed token i of a document covers the tokens [i*stride, i*stride + length) of that document;
only complete windows exist: n_compressed(len) = (len - length) // stride + 1 (0 when len < length).

  mean_pool:     kc[i] = mean(x[i*stride : i*stride + length])
  mlp_compress:  kc[i] = flatten(x[i*stride : i*stride + length] + pos_emb) @ weight      (per head)
  compressed attention for query t (local position):
      o[t] = softmax_{i : i*stride + length - 1 <= t}(q[t] . kc[i] * scale) @ vc
      rows that see no compressed token (t < length - 1) give o = 0 and lse = -inf.
Packed documents: B = 1, `cu_seqlens` over tokens; compressed tokens of the documents are
concatenated in order (see `compressed_cu_seqlens`).
"""
from __future__ import annotations

import torch

from .._checks import doc_spans


def n_compressed(seqlen: int, length: int, stride: int) -> int:
    """Number of complete compression windows in a sequence of `seqlen` tokens."""
    return 0 if seqlen < length else (seqlen - length) // stride + 1


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """Offsets of each document's compressed tokens in the concatenated compressed sequence (int32)."""
    counts = [n_compressed(e - s, length, stride) for s, e in doc_spans(cu_seqlens)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return torch.tensor(offsets, dtype=torch.int32, device=cu_seqlens.device)


def windows(x: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """x [B, T, H, D] -> the complete windows [B, Nc, H, length, D] (a copy)."""
    batch, seqlen, n_heads, head_dim = x.shape
    count = n_compressed(seqlen, length, stride)
    if count == 0:
        return x.new_zeros(batch, 0, n_heads, length, head_dim)
    return x.unfold(1, length, stride)[:, :count].permute(0, 1, 2, 4, 3)  # [B, Nc, H, l, D]


def _per_document(fn, x: torch.Tensor, cu_seqlens) -> torch.Tensor:
    if cu_seqlens is None:
        return fn(x)
    return torch.cat([fn(x[:, s:e]) for s, e in doc_spans(cu_seqlens)], dim=1)


def mean_pool(x: torch.Tensor, length: int, stride: int, cu_seqlens=None) -> torch.Tensor:
    """Mean of every complete window: x [B, T, H, D] -> [B, Nc, H, D] (fp32 accumulation)."""

    def pool(xs):
        win = windows(xs, length, stride)
        if xs.dtype in (torch.float16, torch.bfloat16):
            return win.float().mean(dim=3).to(xs.dtype)
        return win.mean(dim=3)

    return _per_document(pool, x, cu_seqlens)


def mlp_compress(x: torch.Tensor, weight: torch.Tensor, pos_emb, length: int, stride: int, cu_seqlens=None):
    """Learnable compression: x [B, T, H, D], weight [H, length*D, Dout], pos_emb [H, length, D] or None."""

    def compress(xs):
        win = windows(xs, length, stride)  # [B, Nc, H, l, D]
        if pos_emb is not None:
            win = win + pos_emb.to(win.dtype)
        flat = win.reshape(*win.shape[:3], win.shape[3] * win.shape[4])  # [B, Nc, H, l*D]
        return torch.einsum("bnhx,hxo->bnho", flat, weight.to(flat.dtype))

    return _per_document(compress, x, cu_seqlens)


def positional_attention(q, k, v, key_pos: torch.Tensor, scale: float, window: int = 0):
    """Attention where key j sits at position key_pos[j]: query t sees j iff key_pos[j] <= t
    (and key_pos[j] > t - window when window > 0). q [B,T,Hq,D], k [B,Nk,Hkv,D], v [B,Nk,Hkv,Dv].

    Returns o [B, T, Hq, Dv] (dtype of q; 0 for rows that see nothing) and lse [B, T, Hq]
    (natural log, float32 or float64 for float64 inputs; -inf for rows that see nothing).
    Differentiable in q, k, v, also through empty rows (no NaN).
    """
    batch, seqlen, n_heads_q, _ = q.shape
    n_heads_kv, dv = k.shape[2], v.shape[3]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k.shape[1] == 0:
        out = (q.sum() * 0).to(q.dtype) + q.new_zeros(batch, seqlen, n_heads_q, dv)
        lse = torch.full((batch, seqlen, n_heads_q), float("-inf"), dtype=acc_dtype, device=q.device)
        return out, lse
    group = n_heads_q // n_heads_kv
    t = torch.arange(seqlen, device=q.device)
    allowed = key_pos[None, :] <= t[:, None]  # [T, Nk]
    if window > 0:
        allowed = allowed & (key_pos[None, :] > t[:, None] - window)
    qh = q.to(acc_dtype).transpose(1, 2)  # [B, Hq, T, D]
    kh = k.to(acc_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Nk, D]
    vh = v.to(acc_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Nk, Dv]
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, Hq, T, Nk]
    row_has = allowed.any(dim=-1)  # [T]
    logits = logits.masked_fill(~allowed, float("-inf"))
    logits = torch.where(row_has[:, None], logits, torch.zeros_like(logits))  # empty rows: finite dummy
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, T]
    probs = torch.exp(logits - lse[..., None]) * row_has[:, None].to(acc_dtype)
    out = torch.matmul(probs, vh).transpose(1, 2).to(q.dtype)  # [B, T, Hq, Dv]
    lse = torch.where(row_has, lse, torch.full_like(lse, float("-inf"))).transpose(1, 2)
    return out, lse if acc_dtype == torch.float64 else lse.float()


def compressed_key_positions(n_keys: int, length: int, stride: int, device) -> torch.Tensor:
    """Position of the last token of each compressed token's window: i*stride + length - 1."""
    return torch.arange(n_keys, device=device) * stride + length - 1


def compressed_attention(q, kc, vc, *, length: int, stride: int, scale: float, cu_seqlens=None,
                         attend=positional_attention):
    """Returns (o, lse); differentiable in q, kc, vc. `attend`: positional_attention or a function with its
    signature and values (chunked.chunked_positional_attention)."""
    if cu_seqlens is None:
        key_pos = compressed_key_positions(kc.shape[1], length, stride, q.device)
        return attend(q, kc, vc, key_pos, scale)
    ccu = compressed_cu_seqlens(cu_seqlens, length, stride).tolist()
    outs, lses = [], []
    for (s, e), cs, ce in zip(doc_spans(cu_seqlens), ccu[:-1], ccu[1:]):
        key_pos = compressed_key_positions(ce - cs, length, stride, q.device)
        o, lse = attend(q[:, s:e], kc[:, cs:ce], vc[:, cs:ce], key_pos, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
