"""Memory-efficient block attention KL (row-chunked PyTorch, O(chunk * T) memory).

Same function as naive.block_attention_kl. For a chunk of query rows [r0, r1) of one document:

  a[h, t, j]   = q_t[t, h] . k_t[j] * scale_t                  (fp32, keys j < r1 only)
  log P_h(t,c) = logsumexp_{j in block c} a - logsumexp_{j <= t} a        (c < r1 // bs)
  log P(t, c)  = logsumexp_h log P_h(t, c) - log G              (group average, in the log domain)
  restricted to the visible blocks c < (t + 1) // bs and renormalised there (log domain, so a
  block mass that underflows fp32 stays exact); blocks visible to t hold only tokens <= t.
  z(t, c) = f_s[t] . kbar_s[c] * scale_s;  log Q = log_softmax over the visible blocks
  KL(t) = sum_c P (log P - log Q);   dKL/dz = Q - P   (teacher frozen)

The backward recomputes each chunk's teacher (no N x N buffer is kept between the passes).
"""

from __future__ import annotations

import math

import torch

_DEFAULT_BUDGET = 1 << 26  # fp32 teacher-logit elements per chunk (256 MiB)


def _chunk_rows(batch: int, n_heads_q: int, seqlen: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(16, _DEFAULT_BUDGET // max(1, batch * n_heads_q * seqlen))


def _teacher_log_mass(q_t, k_t32, r0: int, r1: int, block_size: int, scale_t: float):
    """q_t [B, T, Hq, Dt] of one document, k_t32 [B, Hkv, Dt, T] fp32 -> (logP [B, Hkv, C, nb], visible [C, nb])."""
    batch, _, n_heads_q, head_dim = q_t.shape
    n_heads_kv = k_t32.shape[1]
    group = n_heads_q // n_heads_kv
    n_rows = r1 - r0
    n_blocks = r1 // block_size
    dev = q_t.device
    q = q_t[:, r0:r1].float().view(batch, n_rows, n_heads_kv, group, head_dim)
    q = q.permute(0, 2, 3, 1, 4).reshape(batch, n_heads_kv, group * n_rows, head_dim)
    a = torch.matmul(q, k_t32[..., :r1]).mul_(scale_t)  # [B, Hkv, G*C, r1]
    a = a.view(batch, n_heads_kv, group, n_rows, r1)
    blocks = a[..., : n_blocks * block_size].reshape(batch, n_heads_kv, group, n_rows, n_blocks, block_size)
    log_blocks = torch.logsumexp(blocks, dim=-1)  # [B, Hkv, G, C, nb]
    rows = torch.arange(r0, r1, device=dev)
    future = torch.arange(r1, device=dev)[None, :] > rows[:, None]  # [C, r1]
    a.masked_fill_(future, float("-inf"))
    lse = torch.logsumexp(a, dim=-1)  # [B, Hkv, G, C]
    del a, blocks
    log_mass = torch.logsumexp(log_blocks - lse[..., None], dim=2) - math.log(group)  # [B, Hkv, C, nb]
    visible = torch.arange(n_blocks, device=dev)[None, :] < ((rows + 1) // block_size)[:, None]  # [C, nb]
    row_valid = visible.any(dim=-1)  # [C]
    log_mass = log_mass.masked_fill(~visible, float("-inf"))
    norm = torch.logsumexp(log_mass, dim=-1, keepdim=True)
    norm = torch.where(row_valid[:, None], norm, torch.zeros_like(norm))
    return log_mass - norm, visible


def _student_log_q(f_s, kbar, r0: int, r1: int, scale_s: float, visible):
    """f_s [B, T, Hkv, Ds], kbar [B, nb, Hkv, Ds] -> (log Q [B, Hkv, C, nb] with 0 where not visible)."""
    z = torch.einsum("bchd,bnhd->bhcn", f_s[:, r0:r1].float(), kbar.float()) * scale_s
    row_valid = visible.any(dim=-1)
    z = z.masked_fill(~visible, float("-inf")).masked_fill(~row_valid[:, None], 0.0)
    log_q = torch.log_softmax(z, dim=-1)
    return torch.where(visible, log_q, torch.zeros_like(log_q))


def _documents(spans, block_size):
    first_block = 0
    for s, e in spans:
        n_blocks = (e - s) // block_size
        yield s, e, first_block, n_blocks
        first_block += n_blocks


class _BlockKLChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_t, k_t, f_s, kbar_s, block_size, scale_t, scale_s, spans, chunk_size):
        batch, seqlen, n_heads_q, _ = q_t.shape
        n_heads_kv = k_t.shape[2]
        kl = torch.zeros(batch, seqlen, n_heads_kv, dtype=torch.float32, device=q_t.device)
        for s, e, b0, nb_doc in _documents(spans, block_size):
            if nb_doc == 0:
                continue
            q_doc, f_doc = q_t[:, s:e], f_s[:, s:e]
            k_t32 = k_t[:, s:e].float().permute(0, 2, 3, 1)  # [B, Hkv, Dt, L]
            kbar_doc = kbar_s[:, b0 : b0 + nb_doc]
            chunk = _chunk_rows(batch, n_heads_q, e - s, chunk_size)
            for r0 in range(block_size - 1, e - s, chunk):  # rows before block_size - 1 see no block
                r1 = min(r0 + chunk, e - s)
                log_p, visible = _teacher_log_mass(q_doc, k_t32, r0, r1, block_size, scale_t)
                nb = visible.shape[1]
                log_q = _student_log_q(f_doc, kbar_doc[:, :nb], r0, r1, scale_s, visible)
                p = torch.exp(log_p)  # 0 where not visible
                term = torch.where(visible, p * (log_p - log_q), torch.zeros_like(p))
                kl[:, s + r0 : s + r1] = term.sum(dim=-1).transpose(1, 2)
        ctx.save_for_backward(q_t, k_t, f_s, kbar_s)
        ctx.config = (block_size, scale_t, scale_s, spans, chunk_size)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        q_t, k_t, f_s, kbar_s = ctx.saved_tensors
        block_size, scale_t, scale_s, spans, chunk_size = ctx.config
        batch, _, n_heads_q, _ = q_t.shape
        df = torch.zeros(f_s.shape, dtype=torch.float32, device=f_s.device)
        dkbar = torch.zeros(kbar_s.shape, dtype=torch.float32, device=kbar_s.device)
        for s, e, b0, nb_doc in _documents(spans, block_size):
            if nb_doc == 0:
                continue
            q_doc, f_doc = q_t[:, s:e], f_s[:, s:e]
            k_t32 = k_t[:, s:e].float().permute(0, 2, 3, 1)
            kbar_doc = kbar_s[:, b0 : b0 + nb_doc]
            chunk = _chunk_rows(batch, n_heads_q, e - s, chunk_size)
            for r0 in range(block_size - 1, e - s, chunk):
                r1 = min(r0 + chunk, e - s)
                log_p, visible = _teacher_log_mass(q_doc, k_t32, r0, r1, block_size, scale_t)
                nb = visible.shape[1]
                log_q = _student_log_q(f_doc, kbar_doc[:, :nb], r0, r1, scale_s, visible)
                g = grad_kl[:, s + r0 : s + r1].float().transpose(1, 2)  # [B, Hkv, C]
                dz = torch.where(visible, torch.exp(log_q) - torch.exp(log_p), torch.zeros_like(log_q))
                dz = dz * (g[..., None] * scale_s)  # [B, Hkv, C, nb]
                df[:, s + r0 : s + r1] = torch.einsum("bhcn,bnhd->bchd", dz, kbar_doc[:, :nb].float())
                dkbar[:, b0 : b0 + nb] += torch.einsum("bhcn,bchd->bnhd", dz, f_doc[:, r0:r1].float())
        return None, None, df.to(f_s.dtype), dkbar.to(kbar_s.dtype), None, None, None, None, None


def block_attention_kl_chunked(q_t, k_t, f_s, kbar_s, *, block_size, scale_t, scale_s, spans, chunk_size=None):
    """Per-row block KL [B, T, Hkv] float32; spans = [(start, end)] of the documents."""
    return _BlockKLChunked.apply(q_t, k_t, f_s, kbar_s, block_size, scale_t, scale_s, spans, chunk_size)
