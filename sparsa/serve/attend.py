"""Attention of single queries over selected KV blocks held in a block pool (decode and prefill).

Every row r (a decoding sequence, or one query of a prefill chunk) has a position pos[r], its
G query heads per KV head, and for each KV head a list of K entries: `idx` (which pool slot holds
the block, -1 = none) and `blk` (which logical block it is, for positions). Keys of block c sit at
positions c*bs .. c*bs+bs-1 and count when <= pos[r]. With a tail, the entry whose block is the
row's current block (pos // bs) reads the tail instead of the pool: the newest, partial block.

  o[r, h*G + g] = softmax_j(q[r, h*G+g] . key_j * scale) @ value_j   over the allowed keys j

The reference gathers the entries into a compact buffer and attends in float32; the Triton kernel
(CUDA, or the interpreter) streams the blocks with an online softmax, optionally split over the
entry list (flash-decoding) and combined afterwards. Both read entries in list order, so two
callers that present the same data in the same order get the same result bit for bit.
"""
from __future__ import annotations

import torch

from ..ops._intmath import next_pow2

try:  # triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None


def gather_entries(pool: torch.Tensor, idx: torch.Tensor, shared: bool) -> torch.Tensor:
    """pool [P, H, S, bs, D], idx [R, H, K] -> [R, H, K, bs, D] (row r reads pool r, or pool 0 if shared)."""
    rows, n_heads, k = idx.shape
    safe = idx.clamp(min=0).to(torch.long)
    heads = torch.arange(n_heads, device=idx.device)[None, :, None]
    if shared:
        return pool[0][heads.expand(rows, n_heads, k), safe]
    row = torch.arange(rows, device=idx.device)[:, None, None]
    return pool[row.expand(rows, n_heads, k), heads.expand(rows, n_heads, k), safe]


def block_attention_reference(q, pool_k, pool_v, idx, blk, pos, *, block_size: int, scale: float,
                              shared: bool = False, tail_k=None, tail_v=None) -> torch.Tensor:
    """q [R, Hq, D]; pool_k/v [P, H, S, bs, D]; idx, blk [R, H, K]; pos [R]; tail_k/v [R, H, bs, D]."""
    rows, n_heads_q, head_dim = q.shape
    n_heads_kv, k_entries = idx.shape[1], idx.shape[2]
    group = n_heads_q // n_heads_kv
    kc = gather_entries(pool_k, idx, shared)
    vc = gather_entries(pool_v, idx, shared)
    if tail_k is not None:
        cur = torch.div(pos, block_size, rounding_mode="floor").to(torch.long)[:, None, None]
        is_tail = (blk.to(torch.long) == cur)[..., None, None]
        kc = torch.where(is_tail, tail_k[:, :, None], kc)
        vc = torch.where(is_tail, tail_v[:, :, None], vc)
    key_pos = blk.to(torch.long)[..., None] * block_size + torch.arange(block_size, device=q.device)  # [R,H,K,bs]
    allowed = (idx >= 0)[..., None] & (key_pos <= pos.to(torch.long)[:, None, None, None])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kc = kc.reshape(rows, n_heads_kv, k_entries * block_size, head_dim).to(acc)
    vc = vc.reshape(rows, n_heads_kv, k_entries * block_size, -1).to(acc)
    qg = q.to(acc).view(rows, n_heads_kv, group, head_dim)
    logits = torch.matmul(qg, kc.transpose(-1, -2)) * scale  # [R, H, G, K*bs]
    logits = logits.masked_fill(~allowed.reshape(rows, n_heads_kv, 1, -1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    out = torch.matmul(probs, vc)  # [R, H, G, Dv]
    return out.reshape(rows, n_heads_q, -1).to(q.dtype)


if triton is not None:

    @triton.jit
    def _block_attn_kernel(
        q_ptr, pk_ptr, pv_ptr, idx_ptr, blk_ptr, pos_ptr, tk_ptr, tv_ptr,
        acc_ptr, m_ptr, l_ptr,
        scale, n_entries,
        s_qr, s_qh,
        s_pp, s_ph, s_ps,
        s_ir, s_ih,
        s_tr, s_th,
        H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BS: tl.constexpr, D: tl.constexpr,
        N_SPLITS: tl.constexpr, PER_SPLIT: tl.constexpr, USE_TAIL: tl.constexpr, PREC: tl.constexpr,
    ):
        r = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        gmask = g < G
        q = tl.load(q_ptr + r * s_qr + (h * G + g)[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
        pos = tl.load(pos_ptr + r)
        cur = pos // BS
        m_i = tl.full([BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, D], tl.float32)
        for i in range(0, PER_SPLIT):
            e = sp * PER_SPLIT + i
            slot = tl.load(idx_ptr + r * s_ir + h * s_ih + e, mask=e < n_entries, other=-1)
            if slot >= 0:
                b = tl.load(blk_ptr + r * s_ir + h * s_ih + e)
                koff = r.to(tl.int64) * s_pp + h.to(tl.int64) * s_ph + slot.to(tl.int64) * s_ps
                kp = pk_ptr + koff
                vp = pv_ptr + koff
                if USE_TAIL:
                    if b == cur:
                        toff = r.to(tl.int64) * s_tr + h.to(tl.int64) * s_th
                        kp = tk_ptr + toff
                        vp = tv_ptr + toff
                k = tl.load(kp + t[:, None] * D + d[None, :])
                v = tl.load(vp + t[:, None] * D + d[None, :])
                s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale  # [BG, BS]
                kpos = b * BS + t
                s = tl.where((kpos <= pos)[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
                m_i = m_new
        base = (r * H + h) * N_SPLITS + sp
        tl.store(acc_ptr + base * BG * D + g[:, None] * D + d[None, :], acc)
        tl.store(m_ptr + base * BG + g, m_i)
        tl.store(l_ptr + base * BG + g, l_i)


    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, s_or, s_oh,
                        H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                        N_SPLITS: tl.constexpr, BSPLIT: tl.constexpr):
        """out[r, h*G + g] = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max_s m_s) (0 for empty splits)."""
        r = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, BSPLIT)
        g = tl.arange(0, BG)
        d = tl.arange(0, D)
        base = (r * H + h) * N_SPLITS
        split_ok = (sp < N_SPLITS)[:, None]
        m = tl.load(m_ptr + (base + sp)[:, None] * BG + g[None, :], mask=split_ok, other=float("-inf"))  # [S, BG]
        l = tl.load(l_ptr + (base + sp)[:, None] * BG + g[None, :], mask=split_ok, other=0.0)
        big = tl.max(m, axis=0)
        big = tl.where(big == float("-inf"), 0.0, big)
        den = tl.sum(tl.exp(m - big[None, :]) * l, axis=0)  # [BG]
        num = tl.zeros([BG, D], tl.float32)
        for s in range(N_SPLITS):
            w = tl.exp(tl.load(m_ptr + (base + s) * BG + g) - big)  # exp(-inf) = 0 for an empty split
            num += w[:, None] * tl.load(acc_ptr + ((base + s) * BG + g)[:, None] * D + d[None, :])
        out = num / tl.where(den == 0.0, 1.0, den)[:, None]
        tl.store(out_ptr + r.to(tl.int64) * s_or + (h * G + g)[:, None] * s_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


def block_attention_triton(q, pool_k, pool_v, idx, blk, pos, *, block_size: int, scale: float,
                           shared: bool = False, tail_k=None, tail_v=None, n_splits: int | None = None) -> torch.Tensor:
    rows, n_heads_q, head_dim = q.shape
    n_heads_kv, n_entries = idx.shape[1], idx.shape[2]
    group = n_heads_q // n_heads_kv
    if head_dim != next_pow2(head_dim) or block_size != next_pow2(block_size) or block_size < 16:
        raise ValueError("the Triton block attention needs power-of-two head_dim and block_size >= 16")
    bg = max(16, next_pow2(group))
    if n_splits is None:
        programs = rows * n_heads_kv
        n_splits = 1 if programs >= 256 else min(n_entries, max(1, 512 // max(programs, 1)))
    per_split = -(-n_entries // n_splits)
    q = q.contiguous()
    idx = idx.contiguous()
    blk = blk.contiguous()
    pos = pos.contiguous()
    for name, x in (("pool_k", pool_k), ("pool_v", pool_v)):
        if x.stride(-1) != 1 or x.stride(-2) != head_dim or x.stride(-3) != block_size * head_dim:
            raise ValueError(f"{name} must have contiguous [bs, D] blocks")
    use_tail = tail_k is not None
    tk = tail_k.contiguous() if use_tail else pool_k
    tv = tail_v.contiguous() if use_tail else pool_v
    dev = q.device
    acc = torch.empty(rows, n_heads_kv, n_splits, bg, head_dim, dtype=torch.float32, device=dev)
    m = torch.empty(rows, n_heads_kv, n_splits, bg, dtype=torch.float32, device=dev)
    l = torch.empty_like(m)
    grid = (rows, n_heads_kv, n_splits)
    _block_attn_kernel[grid](
        q, pool_k, pool_v, idx, blk, pos, tk, tv, acc, m, l,
        scale, n_entries,
        q.stride(0), q.stride(1),
        0 if shared else pool_k.stride(0), pool_k.stride(1), pool_k.stride(2),
        idx.stride(0), idx.stride(1),
        tk.stride(0) if use_tail else 0, tk.stride(1) if use_tail else 0,
        H=n_heads_kv, G=group, BG=bg, BS=block_size, D=head_dim, N_SPLITS=n_splits, PER_SPLIT=per_split, USE_TAIL=use_tail,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    out = torch.empty(rows, n_heads_q, head_dim, dtype=q.dtype, device=dev)
    _combine_kernel[(rows, n_heads_kv)](acc, m, l, out, out.stride(0), out.stride(1), H=n_heads_kv, G=group, BG=bg,
                                        D=head_dim, N_SPLITS=n_splits, BSPLIT=max(2, next_pow2(n_splits)), num_warps=4)
    return out


def block_attention(q, pool_k, pool_v, idx, blk, pos, *, block_size: int, scale: float, shared: bool = False,
                    tail_k=None, tail_v=None, backend: str = "auto") -> torch.Tensor:
    """Dispatch: Triton on CUDA (or backend="triton"), the reference otherwise."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    use_kernel = backend == "triton" or (backend == "auto" and q.is_cuda and triton is not None)
    if use_kernel:
        return block_attention_triton(q, pool_k, pool_v, idx, blk, pos, block_size=block_size, scale=scale,
                                      shared=shared, tail_k=tail_k, tail_v=tail_v)
    return block_attention_reference(q, pool_k, pool_v, idx, blk, pos, block_size=block_size, scale=scale,
                                     shared=shared, tail_k=tail_k, tail_v=tail_v)
