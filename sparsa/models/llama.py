"""A Llama-style decoder with SSA attention, readable top to bottom.

tokens [B, T] -> embed -> n_layers x (RMSNorm -> SparseAttention -> + ; RMSNorm -> SwiGLU -> +)
       -> RMSNorm -> lm_head -> logits [B, T, vocab]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..layers.attention import MODES, SparseAttention, alignment_loss
from ..layers.rope import positions_from_cu_seqlens, rope_cos_sin, rope_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = SparseAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    loss: torch.Tensor | None = None  # ce + alpha * align (when targets are given)
    ce: torch.Tensor | None = None  # mean cross-entropy over valid targets
    n_targets: int = 0
    align: torch.Tensor | None = None  # mean over layers of the SSA alignment loss
    block_indices: list = field(default_factory=list)  # per layer, sparse mode only


class SparsaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_frequencies(config.head_dim, config.rope_theta), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def rope(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor | None, positions: torch.Tensor | None):
        batch, seqlen = tokens.shape
        if positions is None:
            if cu_seqlens is not None:
                positions = positions_from_cu_seqlens(cu_seqlens, seqlen)
            else:
                positions = torch.arange(seqlen, device=tokens.device)[None, :].expand(batch, seqlen)
        return rope_cos_sin(positions, self.inv_freq)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        targets: torch.Tensor | None = None,
        mode: str = "full",
        align: bool = False,
        alpha: float = 10.0,
        cu_seqlens: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        topk: int | None = None,
    ) -> ModelOutput:
        """tokens [B, T] int64; targets [B, T] (-100 = ignore). `align` adds SSA's alignment loss:
        every layer also computes the other mode, which never feeds the next layer."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty [B, T] tensor, got shape {tuple(tokens.shape)}")
        cos, sin = self.rope(tokens, cu_seqlens, positions)
        x = self.embed(tokens)  # [B, T, d_model]
        align_total = x.new_zeros((), dtype=torch.float32) if align else None
        selections = []
        for layer in self.layers:
            att = layer.attn(layer.attn_norm(x), cos, sin, mode=mode, cu_seqlens=cu_seqlens,
                             compute_aux=align, topk=topk)
            if align:
                h_full, h_sparse = (att.head_out, att.aux_head_out) if mode == "full" else (att.aux_head_out, att.head_out)
                align_total = align_total + alignment_loss(h_full, h_sparse)
            if att.block_indices is not None:
                selections.append(att.block_indices)
            x = x + att.out
            x = x + layer.mlp(layer.mlp_norm(x))
        logits = self.lm_head(self.norm(x))
        out = ModelOutput(logits=logits, block_indices=selections)
        if align:
            out.align = align_total / len(self.layers)
        if targets is not None:
            ce_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            n_targets = int((targets != -100).sum())
            out.n_targets = n_targets
            out.ce = ce_sum / max(n_targets, 1)
            out.loss = out.ce + (alpha * out.align if align else 0.0)
        return out
