"""SSA attention diagnostics from full attention: AttnSparsity, dropped mass, entropy, Theorem 1."""
from __future__ import annotations

import math

import torch

from ..ops.sparse_attn.naive import selection_token_mask
from ..ops.sparse_attn.naive import sparse_attention as reference_sparse_attention


def full_attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention probabilities [B, Hq, T, T] in float64 (small T only: materialized)."""
    group = q.shape[2] // k.shape[2]
    scale = scale or q.shape[-1] ** -0.5
    qh = q.double().transpose(1, 2)
    kh = k.double().transpose(1, 2).repeat_interleave(group, dim=1)
    logits = qh @ kh.transpose(-1, -2) * scale
    seqlen = q.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def attention_diagnostics(q, k, v, block_indices, block_size: int, min_position: int) -> dict:
    """Per-layer metrics averaged over heads and positions t >= min_position.

    attn_sparsity: full-attention mass on the selected tokens; delta = 1 - attn_sparsity;
    entropy_bits: entropy of the full attention rows in bits;
    theorem1_residual: max |h_full - h_sparse - delta * (mu_dropped - h_sparse)| (SSA Theorem 1,
    an exact identity, so this is float64 rounding only).
    """
    group = q.shape[2] // k.shape[2]
    probs = full_attention_probs(q, k)  # [B, Hq, T, T]
    allowed = selection_token_mask(block_indices, q.shape[1], block_size).repeat_interleave(group, dim=1)
    kept = (probs * allowed).sum(-1)  # [B, Hq, T]
    delta = 1.0 - kept
    entropy = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(-1)
    vh = v.double().transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, T, D]
    h_full = probs @ vh
    # the library's sparse attention (float64): the identity holds only if it uses exactly the
    # full logits restricted to the selected tokens
    # (float64: the readable reference on every device; the kernels are checked against it in tests)
    h_sparse, _ = reference_sparse_attention(q.double(), k.double(), v.double(), block_indices,
                                             block_size=block_size, scale=q.shape[-1] ** -0.5)
    h_sparse = h_sparse.transpose(1, 2)  # [B, Hq, T, D]
    dropped_sum = (probs * ~allowed) @ vh  # = delta * mu_dropped
    residual = (h_full - h_sparse - (dropped_sum - delta[..., None] * h_sparse)).abs().amax()
    positions = slice(min_position, None)
    n_positions = q.shape[1] - min_position
    if n_positions <= 0:
        nan = math.nan
        return {"attn_sparsity": nan, "delta": nan, "entropy_bits": nan, "theorem1_residual": float(residual),
                "n_positions": 0}
    return {
        "attn_sparsity": float(kept[..., positions].mean()),
        "delta": float(delta[..., positions].mean()),
        "entropy_bits": float(entropy[..., positions].mean()),
        "theorem1_residual": float(residual),
        "n_positions": n_positions,
    }
