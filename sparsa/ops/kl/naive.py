"""Reference attention KL divergences (readable PyTorch, materialised, exact in float64).

These are the oracles of the tests and the CPU implementation. They build the full
[B, H, N_Q, N_K] logits, so memory is O(N_Q * N_K) per head: use them only for small shapes.

Conventions (shared with the Triton kernels):
  a[i, j] = scale_t * <q_t[i], k_t[j]>   (teacher logits),  b[i, j] = scale_s * <q_s[i], k_s[j]>
  causal: key j is visible to query i iff j <= i + (N_K - N_Q)   (bottom-right aligned)
  fully masked rows: KL = 0 and LSE = 0 (never NaN)
  packed documents (cu_seqlens, B = 1, N_Q = N_K): every document is its own sequence.
All functions return per-row values; reductions live in the public wrappers (sparsa/ops/kl/__init__.py).
Computation runs in float32 (float64 for float64 inputs) and returns float32 (float64) tensors.
"""

from __future__ import annotations

import torch

from .._checks import doc_spans


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def visible_mask(n_q: int, n_k: int, causal: bool, device) -> torch.Tensor:
    """[N_Q, N_K] bool: key j visible to query i (bottom-right aligned causal mask)."""
    rows = torch.arange(n_q, device=device)[:, None]
    cols = torch.arange(n_k, device=device)[None, :]
    if not causal:
        return torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    return cols <= rows + (n_k - n_q)


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, n_heads: int) -> torch.Tensor:
    """q [B, Tq, H, D], k [B, Tk, Hk, D] -> scale * q k^T as [B, H, Tq, Tk] (GQA: head h uses k head h // G)."""
    dtype = _acc_dtype(q)
    group = n_heads // k.shape[2]
    qh = q.to(dtype).transpose(1, 2)  # [B, H, Tq, D]
    kh = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, Tk, D]
    return torch.matmul(qh, kh.transpose(-1, -2)) * scale


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor, row_valid: torch.Tensor):
    """log-softmax over the last dim with masked entries -> 0 (finite; their probability is 0 anyway).

    Returns (logp_safe, p, lse): logp_safe is 0 where masked, p is exactly 0 there, lse is 0 on
    fully masked rows. Written so that autograd never sees inf - inf (no NaN gradients).
    """
    filled = logits.masked_fill(~mask, float("-inf"))
    filled = filled.masked_fill(~row_valid[..., None], 0.0)  # fully masked rows: any finite row
    lse = torch.logsumexp(filled, dim=-1)  # [..., Tq]
    logp = filled - lse[..., None]
    logp_safe = torch.where(mask, logp, torch.zeros_like(logp))
    p = torch.where(mask, torch.exp(logp_safe), torch.zeros_like(logp))
    lse = torch.where(row_valid, lse, torch.zeros_like(lse))
    return logp_safe, p, lse


def attention_kl_dense(q_t, k_t, q_s, k_s, *, causal: bool, scale_t: float, scale_s: float, direction: str = "forward"):
    """Per-row KL for one sequence batch. Returns (kl, lse_t, lse_s), each [B, Tq, H] (natural log)."""
    n_heads = q_t.shape[2]
    n_q, n_k = q_t.shape[1], k_t.shape[1]
    mask = visible_mask(n_q, n_k, causal, q_t.device)  # [Tq, Tk]
    row_valid = mask.any(dim=-1)  # [Tq]
    a = _logits(q_t, k_t, scale_t, n_heads)  # [B, H, Tq, Tk]
    b = _logits(q_s, k_s, scale_s, n_heads)
    log_p, p, lse_t = _masked_log_softmax(a, mask, row_valid)
    log_q, q, lse_s = _masked_log_softmax(b, mask, row_valid)
    if direction == "forward":  # KL(teacher || student)
        kl = (p * (log_p - log_q)).sum(dim=-1)
    else:  # KL(student || teacher)
        kl = (q * (log_q - log_p)).sum(dim=-1)
    kl = torch.where(row_valid, kl, torch.zeros_like(kl))
    return kl.transpose(1, 2), lse_t.transpose(1, 2), lse_s.transpose(1, 2)


def _per_document(fn, cu_seqlens, tensors, **kwargs):
    if cu_seqlens is None:
        return fn(*tensors, **kwargs)
    pieces = [fn(*(x[:, s:e] for x in tensors), **kwargs) for s, e in doc_spans(cu_seqlens)]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))


def attention_kl(q_t, k_t, q_s, k_s, *, causal, scale_t, scale_s, direction="forward", cu_seqlens=None):
    """Per-row KL(p_teacher || q_student) (or the reverse) -> (kl, lse_t, lse_s), each [B, Tq, H]."""
    return _per_document(
        attention_kl_dense,
        cu_seqlens,
        (q_t, k_t, q_s, k_s),
        causal=causal,
        scale_t=scale_t,
        scale_s=scale_s,
        direction=direction,
    )


def group_attention_kl_dense(q_t, k_t, q_s, k_s, *, causal: bool, scale_t: float, scale_s: float):
    """Teacher pbar = mean over the G query heads of a KV group of their softmaxes (frozen);
    student: one head per group. Returns (kl [B, Tq, Hkv], lse_s [B, Tq, Hkv])."""
    n_heads_q, n_heads_kv = q_t.shape[2], k_t.shape[2]
    group = n_heads_q // n_heads_kv
    n_q, n_k = q_t.shape[1], k_t.shape[1]
    mask = visible_mask(n_q, n_k, causal, q_t.device)
    row_valid = mask.any(dim=-1)
    with torch.no_grad():
        a = _logits(q_t, k_t, scale_t, n_heads_q)  # [B, Hq, Tq, Tk]
        _, p, _ = _masked_log_softmax(a, mask, row_valid)
        batch = p.shape[0]
        pbar = p.view(batch, n_heads_kv, group, n_q, n_k).mean(dim=2)  # [B, Hkv, Tq, Tk]
        neg_entropy = torch.special.xlogy(pbar, pbar).sum(dim=-1)
    b = _logits(q_s, k_s, scale_s, n_heads_kv)  # [B, Hkv, Tq, Tk]
    log_q, _, lse_s = _masked_log_softmax(b, mask, row_valid)
    kl = neg_entropy - (pbar * log_q).sum(dim=-1)
    kl = torch.where(row_valid, kl, torch.zeros_like(kl))
    return kl.transpose(1, 2), lse_s.transpose(1, 2)


def group_attention_kl(q_t, k_t, q_s, k_s, *, causal, scale_t, scale_s, cu_seqlens=None):
    return _per_document(
        group_attention_kl_dense, cu_seqlens, (q_t, k_t, q_s, k_s), causal=causal, scale_t=scale_t, scale_s=scale_s
    )


def block_teacher_dense(q_t, k_t, *, block_size: int, scale_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher block distribution, straight from the definition (materialised).

    pbar[t, j] = mean over the G heads of the group of the causal softmax of q_t[t, h] . k_t[j] * scale_t;
    P[t, c] = sum over the tokens j of complete block c of pbar[t, j], restricted to the blocks
    visible to t (c < (t + 1) // block_size) and renormalised over them.
    Returns (P [B, Hkv, T, n_blocks], visible [T, n_blocks] bool). Rows without a visible block are 0.
    """
    n_heads_q, n_heads_kv = q_t.shape[2], k_t.shape[2]
    group = n_heads_q // n_heads_kv
    batch, seqlen = q_t.shape[:2]
    n_blocks = seqlen // block_size
    mask = visible_mask(seqlen, seqlen, True, q_t.device)
    row_valid = mask.any(dim=-1)
    a = _logits(q_t, k_t, scale_t, n_heads_q)  # [B, Hq, T, T]
    _, p, _ = _masked_log_softmax(a, mask, row_valid)
    pbar = p.view(batch, n_heads_kv, group, seqlen, seqlen).mean(dim=2)  # [B, Hkv, T, T]
    mass = pbar[..., : n_blocks * block_size].reshape(batch, n_heads_kv, seqlen, n_blocks, block_size).sum(-1)
    pos = torch.arange(seqlen, device=q_t.device)
    visible = torch.arange(n_blocks, device=q_t.device)[None, :] < ((pos + 1) // block_size)[:, None]  # [T, nb]
    mass = torch.where(visible, mass, torch.zeros_like(mass))
    total = mass.sum(dim=-1, keepdim=True)
    P = torch.where(total > 0, mass / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(mass))
    return P, visible


def block_attention_kl_dense(q_t, k_t, f_s, kbar_s, *, block_size: int, scale_t: float, scale_s: float):
    """KL(P_teacher || softmax_c(f_s[t] . kbar_s[c] * scale_s)) over the visible complete blocks.

    Returns kl [B, T, Hkv] (0 on rows with no complete visible block). Teacher frozen.
    """
    n_heads_kv = k_t.shape[2]
    seqlen = q_t.shape[1]
    n_blocks = seqlen // block_size
    batch = q_t.shape[0]
    dtype = _acc_dtype(f_s)
    if n_blocks == 0:
        return (f_s.to(dtype) * 0).sum(-1)  # [B, T, Hkv] zeros, connected to the graph
    with torch.no_grad():
        P, visible = block_teacher_dense(q_t, k_t, block_size=block_size, scale_t=scale_t)
        P = P.to(dtype)
    row_valid = visible.any(dim=-1)  # [T]
    z = _logits(f_s, kbar_s[:, :n_blocks], scale_s, n_heads_kv)  # [B, Hkv, T, nb]
    log_q, _, _ = _masked_log_softmax(z, visible, row_valid)
    kl = (torch.special.xlogy(P, P) - P * log_q).sum(dim=-1)
    kl = torch.where(row_valid, kl, torch.zeros_like(kl))
    return kl.transpose(1, 2).reshape(batch, seqlen, n_heads_kv)


def block_attention_kl(q_t, k_t, f_s, kbar_s, *, block_size, scale_t, scale_s, cu_seqlens=None):
    """Per-row block KL [B, T, Hkv]; with cu_seqlens, kbar_s holds each document's blocks in order."""
    if cu_seqlens is None:
        return block_attention_kl_dense(q_t, k_t, f_s, kbar_s, block_size=block_size, scale_t=scale_t, scale_s=scale_s)
    pieces, first_block = [], 0
    for s, e in doc_spans(cu_seqlens):
        n_blocks = (e - s) // block_size
        pieces.append(
            block_attention_kl_dense(
                q_t[:, s:e],
                k_t[:, s:e],
                f_s[:, s:e],
                kbar_s[:, first_block : first_block + n_blocks],
                block_size=block_size,
                scale_t=scale_t,
                scale_s=scale_s,
            )
        )
        first_block += n_blocks
    return torch.cat(pieces, dim=1)
