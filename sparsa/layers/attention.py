"""SparseAttention: one attention layer that runs in full or block-sparse mode (SSA)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops import attention, select_blocks, sparse_attention
from .rope import apply_rope

MODES = ("full", "sparse")


@dataclass
class AttentionOutput:
    out: torch.Tensor  # [B, T, d_model] after o_proj (main mode)
    head_out: torch.Tensor  # [B, T, Hq, D] gated per-head output of the main mode
    aux_head_out: torch.Tensor | None  # [B, T, Hq, D] gated output of the other mode, if asked for
    block_indices: torch.Tensor | None  # [B, T, Hkv, topk] selection used by the sparse branch


def alignment_loss(h_full: torch.Tensor, h_sparse: torch.Tensor) -> torch.Tensor:
    """SSA alignment: SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full)).

    Each branch receives gradient only from its own term. Computed in float32.
    """
    h_full, h_sparse = h_full.float(), h_sparse.float()
    pull_full = F.smooth_l1_loss(h_full, h_sparse.detach(), beta=1.0)
    pull_sparse = F.smooth_l1_loss(h_sparse, h_full.detach(), beta=1.0)
    return pull_full + pull_sparse


class SparseAttention(nn.Module):
    """q/k/v/o projections, RoPE, per-head sigmoid output gate; `mode` in {"full", "sparse"}.

    `config.variant == "nsa"`: the sparse mode is NSA's three branches (`sparsa.layers.nsa.NSABranches`,
    with their own per-branch gates; the output gate then applies to full mode only).

    Sparse mode (SSA variant) selects blocks with SSA's rule (`sparsa.select_blocks`) unless the caller passes
    `block_indices`, or `forecast` f [B, T, Hkv, D] (SparDA lookahead: the blocks come from
    `forecast_select_from_keys(f, k)` against this layer's own keys), then runs
    `sparsa.sparse_attention`. The gate multiplies the attention output of both modes before o_proj.

    `record`: when a dict, forward stores q, k (post-RoPE), v and x (the layer's normalised input,
    i.e. what q/k/v and a Forecast read), all detached.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.gate_proj = nn.Linear(config.d_model, self.n_heads, bias=False) if config.output_gate else None
        self.record: dict | None = None  # when a dict, forward stores q, k, v (post-RoPE) in it
        self.nsa = None
        if config.variant == "nsa":
            from .nsa import NSABranches

            sc = config.sparse
            self.nsa = NSABranches(
                config.d_model, self.n_heads, self.n_kv_heads, self.head_dim, block_size=sc.block_size,
                topk=sc.topk, init_blocks=sc.init_blocks, local_blocks=sc.local_blocks,
                compress_length=config.nsa_compress_length, compress_stride=config.nsa_compress_stride,
                window=config.nsa_window, compress=config.nsa_compress, rope_theta=config.rope_theta,
            )

    def project_unrotated(self, x: torch.Tensor):
        """x [B, T, d_model] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] before RoPE."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        return q, k, v

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, d_model] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] (q, k rotated)."""
        q, k, v = self.project_unrotated(x)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-head sigmoid gate [B, T, Hq, 1], or None when the model has no output gate."""
        if self.gate_proj is None:
            return None
        return torch.sigmoid(self.gate_proj(x))[..., None]

    def select(self, q, k, cu_seqlens=None, topk: int | None = None) -> torch.Tensor:
        sc = self.config.sparse
        return select_blocks(
            q.detach(), k.detach(), block_size=sc.block_size, topk=topk or sc.topk,
            init_blocks=sc.init_blocks, local_blocks=sc.local_blocks, cu_seqlens=cu_seqlens,
        )

    def select_from_forecast(self, f, k, cu_seqlens=None, topk: int | None = None) -> torch.Tensor:
        """SparDA lookahead selection: blocks of this layer's keys k ranked by f . kbar (no gradient)."""
        from .forecast import forecast_select_from_keys

        sc = self.config.sparse
        return forecast_select_from_keys(
            f.detach(), k.detach(), block_size=sc.block_size, topk=topk or sc.topk,
            init_blocks=sc.init_blocks, local_blocks=sc.local_blocks, cu_seqlens=cu_seqlens,
        )

    def run_nsa(self, x, q, k, v, k_raw, cu_seqlens, topk: int | None) -> torch.Tensor:
        """NSA branches; `topk` (an inference-time budget) overrides the configured one for this call."""
        configured = self.nsa.topk
        self.nsa.topk = topk or configured
        try:
            return self.nsa(x, q, k, v, k_raw=k_raw, cu_seqlens=cu_seqlens)
        finally:
            self.nsa.topk = configured

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        mode: str = "full",
        cu_seqlens: torch.Tensor | None = None,
        compute_aux: bool = False,
        block_indices: torch.Tensor | None = None,
        topk: int | None = None,
        forecast: torch.Tensor | None = None,
    ) -> AttentionOutput:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        q, k_raw, v = self.project_unrotated(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k_raw, cos, sin)
        if self.record is not None:
            self.record.update(q=q.detach(), k=k.detach(), v=v.detach(), x=x.detach())
        gate = self.gate(x)
        needs_sparse = mode == "sparse" or compute_aux
        if needs_sparse and self.nsa is not None:
            block_indices = None  # NSA selects inside its branches (compression-score rule)
        elif needs_sparse and block_indices is None:
            if forecast is not None:
                block_indices = self.select_from_forecast(forecast, k, cu_seqlens, topk)
            else:
                block_indices = self.select(q, k, cu_seqlens, topk)

        def run(which: str) -> torch.Tensor:
            if which == "sparse" and self.nsa is not None:
                return self.run_nsa(x, q, k, v, k_raw, cu_seqlens, topk)  # gated inside
            if which == "full":
                h = attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
            else:
                h = sparse_attention(q, k, v, block_indices, block_size=self.config.sparse.block_size,
                                     cu_seqlens=cu_seqlens)
            return h if gate is None else h * gate.to(h.dtype)

        head_out = run(mode)
        aux = run("sparse" if mode == "full" else "full") if compute_aux else None
        batch, seqlen = x.shape[:2]
        out = self.o_proj(head_out.reshape(batch, seqlen, self.n_heads * self.head_dim))
        return AttentionOutput(out, head_out, aux, block_indices if needs_sparse else None)
