"""StreamKL: KL divergence between attention distributions without N x N matrices.

Public ops (re-exported lazily by `sparsa`):
  attention_kl        KL(softmax(q_t k_t^T * scale_t) || softmax(q_s k_s^T * scale_s)) per query row
  group_attention_kl  teacher = mean of the G per-head softmaxes of a GQA group, one student head per group
  block_attention_kl  teacher block attention mass against a student softmax over block keys

Dispatch: `use_triton(q_t)` (CUDA tensor, or SPARSA_BACKEND=triton) -> fused Triton kernels
(block_attention_kl: a row-chunked PyTorch implementation with O(chunk * T) memory); otherwise the
materialised reference in naive.py, in chunks of query rows with activation checkpointing for long sequences
(row_chunks.py: attention_kl, group_attention_kl). float64 inputs always take the PyTorch path.

Reductions: "mean" = sum of the per-row KLs / (number of valid rows x number of heads), where a row is
valid when it sees at least one key (one complete block for block_attention_kl); fully masked rows
contribute 0 and are not counted. "sum" = plain sum. "none" = per-row values, fp32 [B, T, H]
(float64 for float64 inputs). The KL is not clamped: rounding can make a row slightly negative (|KL|
about 1e-7 * max|logit| in fp32).
"""

from __future__ import annotations

import itertools
import math

import torch

from .._checks import check_cu_seqlens, check_floating, check_positive_int, check_tensor
from ..backend import use_triton
from . import naive, row_chunks

DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")

__all__ = ["attention_kl", "block_attention_kl", "group_attention_kl"]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_scale(name: str, scale, head_dim: int, default=None) -> float:
    if scale is None:
        return head_dim**-0.5 if default is None else float(default)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")  # noqa: TRY004 - sparsa raises ValueError


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_pair(q_name, q, k_name, k) -> None:
    """q [B, N_Q, Hq, D] and k [B, N_K, Hk, D] of one side (teacher or student)."""
    check_tensor(q_name, q, 4)
    check_tensor(k_name, k, 4)
    check_floating(q_name, q)
    check_floating(k_name, k)
    if k.dtype != q.dtype:
        raise ValueError(f"{k_name} dtype {k.dtype} differs from {q_name} dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"{k_name} is on {k.device} but {q_name} is on {q.device}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"{k_name} batch {k.shape[0]} differs from {q_name} batch {q.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{k_name} head dim {k.shape[3]} differs from {q_name} head dim {q.shape[3]}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"{q_name} heads ({q.shape[2]}) must be a multiple of {k_name} heads ({k.shape[2]})")


def _check_sides(q_t, k_t, q_s, k_s) -> None:
    _check_pair("q_t", q_t, "k_t", k_t)
    _check_pair("q_s", q_s, "k_s", k_s)
    if q_s.device != q_t.device:
        raise ValueError(f"q_s is on {q_s.device} but q_t is on {q_t.device}")
    if q_s.shape[0] != q_t.shape[0] or q_s.shape[1] != q_t.shape[1]:
        raise ValueError(f"q_s {tuple(q_s.shape)} and q_t {tuple(q_t.shape)} must share batch and query length")
    if k_s.shape[1] != k_t.shape[1]:
        raise ValueError(f"k_s length {k_s.shape[1]} differs from k_t length {k_t.shape[1]}")


def _check_docs(cu_seqlens, q: torch.Tensor, k: torch.Tensor):
    """Validates packed documents; returns (cu_seqlens int32 on q's device or None, longest document)."""
    if cu_seqlens is None:
        return None, None
    check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"cu_seqlens needs equal query and key lengths, got {q.shape[1]} and {k.shape[1]}")
    values = cu_seqlens.tolist()
    max_len = max(b - a for a, b in itertools.pairwise(values))
    return cu_seqlens.to(device=q.device, dtype=torch.int32), max_len


def _n_valid_rows(n_q: int, n_k: int, causal: bool, batch: int, cu_seqlens) -> int:
    """Rows that see at least one key (bottom-right causal: row i sees keys j <= i + n_k - n_q)."""
    if cu_seqlens is not None:
        return n_q  # every row of a document sees itself
    return batch * (min(n_q, n_k) if causal else n_q)


def _reduce(rows: torch.Tensor, reduction: str, n_valid: int) -> torch.Tensor:
    """Rows that are not valid are exactly 0, so the mean is the sum / n_valid (one kernel when all are valid)."""
    if reduction == "none":
        return rows
    if reduction == "mean" and n_valid == rows.numel():
        return rows.mean()
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / max(n_valid, 1)


# ----------------------------------------------------------------------------------------------
# autograd functions around the Triton kernels
# ----------------------------------------------------------------------------------------------
def _grad_factor(reduction: str, n_valid: int) -> float:
    return 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0


class _AttentionKLTriton(torch.autograd.Function):
    """Reduced KL(P || Q) over rows; inputs are the P side (qp, kp) and the Q side (qq, kq).

    The reduction (`_reduce`) is part of the function: one autograd node, and no separate kernels in the
    backward (the kernels read a scalar loss's 0-d gradient as one value for all rows and scale their
    outputs by 1/n for the mean)."""

    @staticmethod
    def forward(ctx, qp, kp, qq, kq, causal, scale_p, scale_q, cu_seqlens, max_len, reduction, n_valid):
        from . import gluon_fwd, triton_ops

        if gluon_fwd.eligible(qp, kp, qq, kq, cu_seqlens, False):  # opt-in Hopper kernel, same outputs
            kl, lse_p, lse_q = gluon_fwd.kl_forward_gluon(qp, kp, qq, kq, causal=causal, scale_p=scale_p,
                                                          scale_q=scale_q)
        else:
            kl, lse_p, lse_q = triton_ops.kl_forward(
                qp, kp, qq, kq, causal=causal, scale_p=scale_p, scale_q=scale_q, cu_seqlens=cu_seqlens,
                max_len=max_len
            )
        ctx.save_for_backward(qp, kp, qq, kq, kl, lse_p, lse_q, cu_seqlens)
        ctx.config = (causal, scale_p, scale_q, max_len, _grad_factor(reduction, n_valid))
        ctx.mark_non_differentiable(lse_p, lse_q)
        ctx.set_materialize_grads(False)  # no zero-filled [B, H, T] gradients for the LSE outputs
        return _reduce(kl, reduction, n_valid), lse_p, lse_q

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse_p, _grad_lse_q):
        from . import triton_ops

        qp, kp, qq, kq, kl, lse_p, lse_q, cu_seqlens = ctx.saved_tensors
        causal, scale_p, scale_q, max_len, factor = ctx.config
        need_p = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_q = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if grad_loss is None or not (need_p or need_q):
            return (None,) * 11
        dqp, dkp, dqq, dkq = triton_ops.kl_backward(
            qp, kp, qq, kq, kl, lse_p, lse_q, grad_loss, causal=causal, scale_p=scale_p,
            scale_q=scale_q, need_p=need_p, need_q=need_q, cu_seqlens=cu_seqlens, max_len=max_len, grad_factor=factor,
        )
        return dqp, dkp, dqq, dkq, None, None, None, None, None, None, None


class _GroupKLTriton(torch.autograd.Function):
    """Reduced KL(pbar_teacher || q_student) over (row, group); the teacher (q_t, k_t) is frozen."""

    @staticmethod
    def forward(ctx, q_t, k_t, q_s, k_s, causal, scale_t, scale_s, cu_seqlens, max_len, reduction, n_valid):
        from . import triton_ops

        kl, lse_s, lse_t = triton_ops.group_forward(
            q_t, k_t, q_s, k_s, causal=causal, scale_t=scale_t, scale_s=scale_s, cu_seqlens=cu_seqlens,
            max_len=max_len,
        )
        ctx.save_for_backward(q_t, k_t, q_s, k_s, lse_t, lse_s, cu_seqlens)
        ctx.config = (causal, scale_t, scale_s, max_len, _grad_factor(reduction, n_valid))
        ctx.mark_non_differentiable(lse_s)
        ctx.set_materialize_grads(False)
        return _reduce(kl, reduction, n_valid), lse_s

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        from . import triton_ops

        q_t, k_t, q_s, k_s, lse_t, lse_s, cu_seqlens = ctx.saved_tensors
        causal, scale_t, scale_s, max_len, factor = ctx.config
        if grad_loss is None or not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            return (None,) * 11
        dqs, dks = triton_ops.group_backward(
            q_t, k_t, q_s, k_s, lse_t, lse_s, grad_loss, causal=causal, scale_t=scale_t,
            scale_s=scale_s, cu_seqlens=cu_seqlens, max_len=max_len, grad_factor=factor,
        )
        return None, None, dqs, dks, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def attention_kl(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    causal: bool = True,
    scale_t: float | None = None,
    scale_s: float | None = None,
    direction: str = "forward",
    reduction: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    teacher_grad: bool = False,
    return_lse: bool = False,
):
    """Per-query-row KL divergence between a teacher and a student attention distribution.

    p_i = softmax_j(q_t[i] . k_t[j] * scale_t), q_i = softmax_j(q_s[i] . k_s[j] * scale_s);
    direction="forward": KL(p_i || q_i) (standard distillation); "reverse": KL(q_i || p_i).

    q_t [B, N_Q, H, D_t], k_t [B, N_K, H_t, D_t], q_s [B, N_Q, H, D_s], k_s [B, N_K, H_s, D_s]:
    teacher and student share the query heads H but may differ in head dim and in GQA grouping
    (H_t and H_s divide H; query head h uses KV head h // (H / H_kv) on each side). Scales default
    to D^-1/2 of each side. causal=True masks key j for query i when j > i + N_K - N_Q
    (bottom-right aligned); fully masked rows contribute 0 (never NaN). cu_seqlens: packed
    documents (B = 1, N_Q = N_K, int32 [n_docs + 1]); no distribution crosses a document boundary.

    The teacher is detached unless teacher_grad=True. reduction: "mean" (over valid rows and heads),
    "sum", or "none" -> [B, N_Q, H] float32. With return_lse, also returns the natural-log LSEs of
    the teacher and the student logits, float32 [B, N_Q, H] (0 on fully masked rows):
    (loss, lse_t, lse_s).
    """
    _check_sides(q_t, k_t, q_s, k_s)
    if q_s.shape[2] != q_t.shape[2]:
        raise ValueError(f"q_s heads ({q_s.shape[2]}) must equal q_t heads ({q_t.shape[2]})")
    _check_bool("causal", causal)
    _check_bool("teacher_grad", teacher_grad)
    _check_bool("return_lse", return_lse)
    _check_choice("direction", direction, DIRECTIONS)
    _check_choice("reduction", reduction, REDUCTIONS)
    scale_t = _check_scale("scale_t", scale_t, q_t.shape[-1])
    scale_s = _check_scale("scale_s", scale_s, q_s.shape[-1])
    cu, max_len = _check_docs(cu_seqlens, q_t, k_t)
    if not teacher_grad:
        q_t, k_t = q_t.detach(), k_t.detach()
    batch, n_q = q_t.shape[:2]
    n_k = k_t.shape[1]
    n_valid = _n_valid_rows(n_q, n_k, causal, batch, cu) * q_t.shape[2]
    fp64 = torch.float64 in (q_t.dtype, q_s.dtype)
    if use_triton(q_t) and not fp64:
        sides = (q_t, k_t, q_s, k_s, causal, scale_t, scale_s)
        if direction == "reverse":
            sides = (q_s, k_s, q_t, k_t, causal, scale_s, scale_t)
        loss, lse_p, lse_q = _AttentionKLTriton.apply(*sides, cu, max_len, reduction, n_valid)
        if not return_lse:
            return loss
        from .triton_ops import LN2

        lse_t2, lse_s2 = (lse_p, lse_q) if direction == "forward" else (lse_q, lse_p)
        return loss, (lse_t2 * LN2).transpose(1, 2), (lse_s2 * LN2).transpose(1, 2)
    else:
        kl, lse_t, lse_s = row_chunks.attention_kl(
            q_t,
            k_t,
            q_s,
            k_s,
            causal=causal,
            scale_t=scale_t,
            scale_s=scale_s,
            direction=direction,
            cu_seqlens=cu_seqlens,
        )
    loss = _reduce(kl, reduction, n_valid)
    if return_lse:
        return loss, lse_t, lse_s
    return loss


def group_attention_kl(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    *,
    causal: bool = True,
    scale_t: float | None = None,
    scale_s: float | None = None,
    reduction: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """KL(pbar || q) per (query row, KV group) with a head-averaged, frozen teacher.

    Teacher: q_t [B, N_Q, Hq, D_t], k_t [B, N_K, Hkv, D_t] (GQA, G = Hq / Hkv);
    pbar_i = (1/G) sum_{h in group} softmax_j(q_t[i, h] . k_t[j] * scale_t).
    Student: one head per group, q_s [B, N_Q, Hkv, D_s], k_s [B, N_K, Hkv, D_s];
    q_i = softmax_j(q_s[i] . k_s[j] * scale_s). Gradients flow to q_s and k_s only.
    Masks, scales, cu_seqlens and reductions as in attention_kl ("none" -> [B, N_Q, Hkv]; "mean"
    over valid rows and groups). With return_lse: (loss, lse_s) with the student's natural-log LSE
    float32 [B, N_Q, Hkv].
    """
    _check_sides(q_t, k_t, q_s, k_s)
    n_heads_kv = k_t.shape[2]
    if q_s.shape[2] != n_heads_kv or k_s.shape[2] != n_heads_kv:
        raise ValueError(
            f"the student has one head per KV group: q_s heads ({q_s.shape[2]}) and k_s heads ({k_s.shape[2]}) "
            f"must equal k_t heads ({n_heads_kv})"
        )
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    _check_choice("reduction", reduction, REDUCTIONS)
    scale_t = _check_scale("scale_t", scale_t, q_t.shape[-1])
    scale_s = _check_scale("scale_s", scale_s, q_s.shape[-1])
    cu, max_len = _check_docs(cu_seqlens, q_t, k_t)
    q_t, k_t = q_t.detach(), k_t.detach()
    batch, n_q = q_t.shape[:2]
    n_valid = _n_valid_rows(n_q, k_t.shape[1], causal, batch, cu) * n_heads_kv
    fp64 = torch.float64 in (q_t.dtype, q_s.dtype)
    if use_triton(q_t) and not fp64:
        loss, lse_s2 = _GroupKLTriton.apply(q_t, k_t, q_s, k_s, causal, scale_t, scale_s, cu, max_len, reduction,
                                            n_valid)
        if not return_lse:
            return loss
        from .triton_ops import LN2

        return loss, (lse_s2 * LN2).transpose(1, 2)
    kl, lse_s = row_chunks.group_attention_kl(
        q_t, k_t, q_s, k_s, causal=causal, scale_t=scale_t, scale_s=scale_s, cu_seqlens=cu_seqlens
    )
    loss = _reduce(kl, reduction, n_valid)
    return (loss, lse_s) if return_lse else loss


def block_attention_kl(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    f_s: torch.Tensor,
    kbar_s: torch.Tensor,
    *,
    block_size: int,
    scale_t: float | None = None,
    scale_s: float = 1.0,
    reduction: str = "mean",
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
):
    """KL between the teacher's block attention mass and a student softmax over block keys.

    The target of the SparDA forecast distillation. Per query row t and KV group g:

      teacher (frozen): pbar[t, j] = (1/G) sum_{h in g} softmax_{j <= t}(q_t[t, h] . k_t[j, g] * scale_t)
                        P[t, c]   = sum_{j in block c} pbar[t, j] over the complete blocks visible to t,
                                    c < (t + 1) // block_size, renormalised to sum to 1 over them
      student:          Q[t, c]   = softmax_c(f_s[t, g] . kbar_s[c, g] * scale_s) over the same blocks
      loss row:         KL(P[t] || Q[t]);   rows with no complete block (t < block_size - 1) give 0

    Args:
      q_t    [B, T, Hq, D_t]   teacher queries (no gradient)
      k_t    [B, T, Hkv, D_t]  teacher keys (no gradient), G = Hq / Hkv query heads per group
      f_s    [B, T, Hkv, D_s]  student queries (the forecast), one head per KV group (gets a gradient)
      kbar_s [B, n_blocks, Hkv, D_s]  student block keys of the complete blocks, e.g.
             sparsa.block_keys(k, block_size) (gets a gradient); n_blocks >= T // block_size (extra
             blocks are ignored). With cu_seqlens: the documents' blocks concatenated in order
             (document i contributes len_i // block_size blocks), as block_keys returns them.
      block_size  tokens per block (positive int); block c covers tokens [c*bs, (c+1)*bs) of its document
      scale_t     teacher logit scale, default D_t^-1/2
      scale_s     student logit scale, default 1.0 (raw dot products, as SparDA's forecast scores)
      reduction   "mean" (over rows with at least one complete visible block, and groups), "sum",
                  or "none" -> float32 [B, T, Hkv]
      cu_seqlens  packed documents (B = 1, int32 [n_docs + 1]); positions are local to each document
      chunk_size  query rows per chunk of the memory-efficient path (default: chosen so one chunk's
                  teacher logits take about 256 MiB); memory is O(chunk_size * T * Hq)

    On CUDA (or SPARSA_BACKEND=triton) this runs a row-chunked PyTorch implementation that never
    holds more than one chunk of teacher logits and recomputes them in the backward; on CPU the
    materialised reference.
    """
    check_tensor("q_t", q_t, 4)
    check_tensor("k_t", k_t, 4)
    check_tensor("f_s", f_s, 4)
    check_tensor("kbar_s", kbar_s, 4)
    for name, x in (("q_t", q_t), ("k_t", k_t), ("f_s", f_s), ("kbar_s", kbar_s)):
        check_floating(name, x)
        if x.device != q_t.device:
            raise ValueError(f"{name} is on {x.device} but q_t is on {q_t.device}")
    check_positive_int("block_size", block_size)
    batch, seqlen, n_heads_q, head_dim_t = q_t.shape
    n_heads_kv = k_t.shape[2]
    if k_t.shape[:2] != (batch, seqlen) or k_t.shape[3] != head_dim_t:
        raise ValueError(f"k_t {tuple(k_t.shape)} must be [B={batch}, T={seqlen}, Hkv, D_t={head_dim_t}]")
    if n_heads_q % n_heads_kv != 0:
        raise ValueError(f"q_t heads ({n_heads_q}) must be a multiple of k_t heads ({n_heads_kv})")
    if f_s.shape[:3] != (batch, seqlen, n_heads_kv):
        raise ValueError(f"f_s {tuple(f_s.shape)} must be [B={batch}, T={seqlen}, Hkv={n_heads_kv}, D_s]")
    if kbar_s.shape[0] != batch or kbar_s.shape[2] != n_heads_kv or kbar_s.shape[3] != f_s.shape[3]:
        raise ValueError(
            f"kbar_s {tuple(kbar_s.shape)} must be [B={batch}, n_blocks, Hkv={n_heads_kv}, D_s={f_s.shape[3]}]"
        )
    if kbar_s.dtype != f_s.dtype:
        raise ValueError(f"kbar_s dtype {kbar_s.dtype} differs from f_s dtype {f_s.dtype}")
    if k_t.dtype != q_t.dtype:
        raise ValueError(f"k_t dtype {k_t.dtype} differs from q_t dtype {q_t.dtype}")
    _check_choice("reduction", reduction, REDUCTIONS)
    scale_t = _check_scale("scale_t", scale_t, head_dim_t)
    scale_s = _check_scale("scale_s", scale_s, f_s.shape[3])
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_cu_seqlens(cu_seqlens, batch, seqlen)
    if cu_seqlens is None:
        spans = [(0, seqlen)]
    else:
        values = cu_seqlens.tolist()
        spans = list(itertools.pairwise(values))
    n_blocks_needed = sum((e - s) // block_size for s, e in spans)
    if kbar_s.shape[1] < n_blocks_needed:
        raise ValueError(f"kbar_s holds {kbar_s.shape[1]} blocks but the input has {n_blocks_needed} complete blocks")
    q_t, k_t = q_t.detach(), k_t.detach()
    if use_triton(q_t):
        from .chunked import block_attention_kl_chunked

        kl = block_attention_kl_chunked(
            q_t,
            k_t,
            f_s,
            kbar_s,
            block_size=block_size,
            scale_t=scale_t,
            scale_s=scale_s,
            spans=spans,
            chunk_size=chunk_size,
        )
    else:
        kl = naive.block_attention_kl(
            q_t, k_t, f_s, kbar_s, block_size=block_size, scale_t=scale_t, scale_s=scale_s, cu_seqlens=cu_seqlens
        )
    n_valid = batch * n_heads_kv * sum(max(0, (e - s) - block_size + 1) for s, e in spans)
    return _reduce(kl, reduction, n_valid)
