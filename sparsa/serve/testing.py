"""Stand-in forecasts for benchmarks and GPU checks of the `sparda` mode.

They follow the forecast contract (`sparsa/layers/forecast.py`: forward(u, cos, sin) -> f
[B, T, Hkv, D], `model.forecasts[l]` predicts layer l+1, `model.self_forecast` layer 0) with
random weights: the same cost as trained forecasts, not their accuracy.
"""
from __future__ import annotations

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
