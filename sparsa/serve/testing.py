"""Stand-ins for benchmarks and GPU checks of the engine: forecasts and a selection locality model.

Stand-in forecasts follow the forecast contract (`sparsa/layers/forecast.py`: forward(u, cos, sin) -> f
[B, T, Hkv, D], `model.forecasts[l]` predicts layer l+1, `model.self_forecast` layer 0) with
random weights: the same cost as trained forecasts, not their accuracy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..layers.rope import apply_rope


class StandInForecast(nn.Module):
    def __init__(self, d_model: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.h, self.d = n_kv_heads, head_dim
        self.proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)

    def forward(self, u, cos, sin):
        b, t, _ = u.shape
        return apply_rope(self.proj(u).view(b, t, self.h, self.d), cos, sin)


def attach_standin_forecasts(model, std: float | None = None):
    """Adds random forecasts to a SparsaLM in place (same device and dtype); returns the model.
    Uses the model's own `add_forecasts()` (sparsa.layers.forecast.Forecast) when it has one."""
    if hasattr(model, "add_forecasts"):
        if not model.has_forecasts:
            model.add_forecasts()
        if std is not None:
            for m in [*model.forecasts, model.self_forecast]:
                nn.init.normal_(m.proj.weight, std=std)
        return model
    cfg = model.config
    param = next(model.parameters())
    make = lambda: StandInForecast(cfg.d_model, cfg.n_kv_heads, cfg.head_dim).to(param.device, param.dtype)  # noqa: E731
    model.forecasts = nn.ModuleList(make() for _ in range(cfg.n_layers - 1))
    model.self_forecast = make()
    if std is not None:
        for m in [*model.forecasts, model.self_forecast]:
            nn.init.normal_(m.proj.weight, std=std)
    cls = model.__class__
    if not getattr(cls, "_standin_forecasts", False):
        model.__class__ = type(cls.__name__ + "WithForecasts", (cls,), {"has_forecasts": True, "_standin_forecasts": True})
    return model


class LocalitySelection:
    """Synthetic decode selections with a set step-to-step retention (benchmarks only).

    Random weights select nearly independent blocks at every step, so an offloading engine misses
    most of them; trained models keep most of their selection from one token to the next (SmolLM2
    measured about 0.8 hits, benchmarks/results/decode_h100.md). Attached as
    `engine.selection_model`, this replaces the scores of every decode-step selection (the real
    scores are still computed, so the cost is unchanged): each block chosen at the previous step
    for the same layer keeps a winning score with probability `retention`, every other block gets
    a random score below it. The engine's forcing rules (init and local blocks, no future blocks)
    and top-k then apply as usual, so every mode sees the same kind of selection stream.
    """

    def __init__(self, retention: float):
        if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0.0 <= retention <= 1.0:
            raise ValueError(f"retention must be a number in [0, 1], got {retention!r}")
        self.retention = float(retention)
        self._prev: dict = {}  # layer -> previous selection [R, H, topk] (updated in place: graph safe)

    def scores(self, layer: int, score: torch.Tensor) -> torch.Tensor:
        """score [R, H, NB] -> synthetic scores of the same shape (float32)."""
        new = torch.rand(score.shape, dtype=torch.float32, device=score.device)  # in [0, 1)
        prev = self._prev.get(layer)
        if prev is None or prev.shape[:2] != score.shape[:2]:
            return new
        n_blocks = score.shape[-1]
        keep = (prev >= 0) & (torch.rand(prev.shape, device=score.device) < self.retention)
        idx = torch.where(keep, prev.to(torch.long), torch.full_like(prev, n_blocks, dtype=torch.long))
        bonus = torch.zeros((*score.shape[:-1], n_blocks + 1), dtype=torch.float32, device=score.device)
        bonus.scatter_(-1, idx, 2.0)
        return new + bonus[..., :n_blocks]

    def observe(self, layer: int, selection: torch.Tensor) -> None:
        prev = self._prev.get(layer)
        if prev is None or prev.shape != selection.shape:
            self._prev[layer] = selection.detach().clone()
        else:
            prev.copy_(selection)
