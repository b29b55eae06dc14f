"""A Llama-style decoder with SSA attention, readable top to bottom.

tokens [B, T] -> embed -> n_layers x (RMSNorm -> SparseAttention -> + ; RMSNorm -> SwiGLU -> +)
       -> RMSNorm -> lm_head -> logits [B, T, vocab]

Optional SparDA forecasts (`add_forecasts()`, docs/forecast.md): per layer a `Forecast` that reads the
layer's normalised input and predicts the NEXT layer's block selection, plus `self_forecast` for
layer 0; `forward(..., selector="forecast")` routes sparse attention by them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..layers.attention import MODES, SparseAttention, alignment_loss
from ..layers.forecast import Forecast
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


SELECTORS = ("query", "forecast")
FORECAST_INITS = ("random", "query")


class SparsaLM(nn.Module):
    """Llama-style decoder with SSA attention; optional SparDA forecasts (see `add_forecasts`)."""

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

    # ---------------------------------------------------------------- SparDA forecasts
    @property
    def has_forecasts(self) -> bool:
        """True once `add_forecasts()` ran (or a checkpoint with forecasts was loaded)."""
        return hasattr(self, "forecasts") and hasattr(self, "self_forecast")

    def add_forecasts(self, init: str = "random") -> None:
        """Adds SparDA forecast projections; changes no other weight and no output of the query selector.

        Creates
          `self.forecasts`: nn.ModuleList of n_layers - 1 `Forecast`s; forecasts[l] reads layer l's
              normalised input (attn_norm output, the input of its q/k/v) and predicts layer l + 1's
              blocks. The last layer has no successor, so its forecast is omitted
              (len(forecasts) == n_layers - 1).
          `self.self_forecast`: a `Forecast` reading layer 0's normalised input and predicting layer
              0's own blocks (no earlier layer exists).
        init: "random" = nn.Linear's Kaiming-uniform init (bound 1/sqrt(d_model), as in the paper);
              "query"  = a warm start from the predicted layer's queries: the group mean of its
              q_proj rows, with its input rescaled by attn_norm weight ratios (w_{l+1} / w_l), i.e.
              the next layer's mean query if the residual stream did not change between the layers.
        Modules are created on the device and dtype of the embedding. Raises ValueError if present.
        """
        if init not in FORECAST_INITS:
            raise ValueError(f"init must be one of {FORECAST_INITS}, got {init!r}")
        if self.has_forecasts:
            raise ValueError("the model already has forecasts")
        cfg = self.config
        ref = self.embed.weight
        make = lambda: Forecast(cfg.d_model, cfg.n_kv_heads, cfg.head_dim).to(device=ref.device, dtype=ref.dtype)
        forecasts = nn.ModuleList(make() for _ in range(cfg.n_layers - 1))
        self_forecast = make()
        if init == "query":
            with torch.no_grad():
                self_forecast.proj.weight.copy_(self._query_warm_start(0, 0))
                for l, fc in enumerate(forecasts):
                    fc.proj.weight.copy_(self._query_warm_start(l, l + 1))
        self.forecasts = forecasts
        self.self_forecast = self_forecast

    @torch.no_grad()
    def _query_warm_start(self, source: int, target: int) -> torch.Tensor:
        """[Hkv * D, d_model]: group-mean q_proj of layer `target` on layer `source`'s normalised input."""
        cfg = self.config
        w_q = self.layers[target].attn.q_proj.weight.float()
        w_q = w_q.view(cfg.n_kv_heads, cfg.group_size, cfg.head_dim, cfg.d_model).mean(dim=1)
        w_q = w_q.reshape(cfg.n_kv_heads * cfg.head_dim, cfg.d_model)
        if source != target:
            w_src = self.layers[source].attn_norm.weight.float()
            w_dst = self.layers[target].attn_norm.weight.float()
            floor = 1e-3 * w_src.abs().max().clamp_min(1e-12)
            safe = torch.where(w_src.abs() < floor, torch.where(w_src < 0, -floor, floor), w_src)
            w_q = w_q * (w_dst / safe)[None, :]
        return w_q

    def prepare_for_checkpoint(self, meta: dict) -> None:
        """Called by `load_model` before the weights load: adds the forecasts a checkpoint declares
        (config.json extra key `"forecast": true`)."""
        if meta.get("forecast") and not self.has_forecasts:
            self.add_forecasts()

    def checkpoint_meta(self) -> dict:
        """Extra config.json keys describing optional modules: {"forecast": True} when present."""
        return {"forecast": True} if self.has_forecasts else {}

    def forecast_parameters(self) -> list[nn.Parameter]:
        """The forecast weights (self_forecast first, then forecasts[0..L-2]); [] without forecasts."""
        if not self.has_forecasts:
            return []
        return list(self.self_forecast.parameters()) + list(self.forecasts.parameters())

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
        selector: str = "query",
    ) -> ModelOutput:
        """tokens [B, T] int64; targets [B, T] (-100 = ignore). `align` adds SSA's alignment loss:
        every layer also computes the other mode, which never feeds the next layer.

        selector: "query" (SSA's own selector, from each layer's queries) or "forecast" (SparDA
        lookahead: layer 0's blocks from `self_forecast`, layer l >= 1's from `forecasts[l - 1]`
        computed at layer l - 1, both against the selected layer's own block keys). It only matters
        where a sparse branch runs (mode="sparse" or align=True); the forecasts get no gradient
        through the selection. "forecast" needs `add_forecasts()` first."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
        if selector == "forecast" and not self.has_forecasts:
            raise ValueError("selector='forecast' needs forecasts: call add_forecasts() or load a checkpoint "
                             "that has them (sparsa distill-forecast)")
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty [B, T] tensor, got shape {tuple(tokens.shape)}")
        cos, sin = self.rope(tokens, cu_seqlens, positions)
        x = self.embed(tokens)  # [B, T, d_model]
        align_total = x.new_zeros((), dtype=torch.float32) if align else None
        selections = []
        use_forecast = selector == "forecast" and (mode == "sparse" or align)
        f_next = None
        for index, layer in enumerate(self.layers):
            u = layer.attn_norm(x)
            forecast = None
            if use_forecast:
                forecast = self.self_forecast(u, cos, sin) if index == 0 else f_next
                f_next = self.forecasts[index](u, cos, sin) if index < len(self.forecasts) else None
            att = layer.attn(u, cos, sin, mode=mode, cu_seqlens=cu_seqlens,
                             compute_aux=align, topk=topk, forecast=forecast)
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
