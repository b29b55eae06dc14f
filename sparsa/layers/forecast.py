"""SparDA Forecast projection and lookahead block selection (see docs/forecast.md).

A `Forecast` reads a layer's normalised input u (the input of its q/k/v projections) and emits one
RoPE-rotated "forecast query" per KV group. `forecast_select` turns forecasts into block indices with
the same output contract as `sparsa.select_blocks`, scoring the blocks by the raw dot product
f . kbar (no scale, no softmax, no head aggregation: with one head per group the softmax is a
monotone map of each row, so the ranking is the same).

Contract (used by the model and by the inference engine; keep it stable):

  Forecast(d_model, n_kv_heads, head_dim)
      .proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)   (Kaiming-uniform init,
      bound 1/sqrt(d_model), nn.Linear's default); forward(u [B, T, d_model], cos, sin) -> f
      [B, T, Hkv, D], rotated with `apply_rope` at the positions that cos/sin encode.

  forecast_select(f, kbar, *, seqlen_offset=0, block_size, topk, init_blocks=0, local_blocks=1)
      -> [B, T, Hkv, topk] int32, ascending, right-padded with -1.
      Row i of f is the query at absolute position p = seqlen_offset + i, cur = p // block_size.
      Only complete past blocks c < cur are scored, by sum_d f[b, i, g, d] * kbar[b, c, g, d]
      (fp32 accumulation); the first `init_blocks` blocks (c <= cur) and the `local_blocks` blocks
      ending at cur (cur - local_blocks < c <= cur) are forced; then the `topk` best, sorted
      ascending, -1 where fewer than topk blocks exist (exactly as select_blocks). kbar [B, Nb, Hkv, D]
      must hold at least the blocks c < cur of the last row (extra blocks are ignored, so the kbar of
      a whole prefill can be passed; for decoding pass the cache's kbar and seqlen_offset).

  forecast_select_from_keys(f, k_next, *, block_size, topk, init_blocks=0, local_blocks=1,
                            cu_seqlens=None)
      kbar = sparsa.block_keys(k_next, block_size, cu_seqlens) then forecast_select per document
      (positions and block indices local to each document, as everywhere in sparsa).

The selection carries no gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops import block_keys
from ..ops._checks import check_cu_seqlens, check_positive_int, check_selection_geometry, check_tensor, doc_spans
from ..ops.select.naive import topk_from_scores
from .rope import apply_rope

# rows of scores materialised at once: bounds the [rows, n_blocks] score tile of the reference
_MAX_SCORE_ELEMENTS = 1 << 24


class Forecast(nn.Module):
    """f = RoPE(W_F u): a bias-free Linear(d_model -> n_kv_heads * head_dim), one head per KV group.

    u is the layer's normalised input (what its q/k/v projections read); the output is rotated at
    the token positions like a query. forward(u [B, T, d_model], cos, sin) -> f [B, T, Hkv, D].
    """

    def __init__(self, d_model: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            check_positive_int(name, value)
        self.d_model, self.n_kv_heads, self.head_dim = d_model, n_kv_heads, head_dim
        self.proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)

    def forward(self, u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        check_tensor("u", u, 3)
        if u.shape[-1] != self.d_model:
            raise ValueError(f"u must have last dim d_model={self.d_model}, got shape {tuple(u.shape)}")
        batch, seqlen, _ = u.shape
        f = self.proj(u).view(batch, seqlen, self.n_kv_heads, self.head_dim)
        return apply_rope(f, cos, sin)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"



def _select_rows(f, kbar, positions, block_size, topk, init_blocks, local_blocks) -> torch.Tensor:
    """Selection for rows at absolute `positions` [T] (int64), f [B, T, Hkv, D]."""
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    batch, seqlen, n_heads, _ = f.shape
    cur = positions // block_size  # [T]
    n_all = int(cur.max()) + 1
    block = torch.arange(n_all, device=f.device)
    scores = torch.full((batch, seqlen, n_heads, n_all), float("-inf"), dtype=acc, device=f.device)
    n_keys = min(kbar.shape[1], n_all)
    if n_keys > 0:
        z = torch.einsum("bthd,bchd->bthc", f.to(acc), kbar[:, :n_keys].to(acc))
        scores[..., :n_keys] = z
    past = block[None, :] < cur[:, None]  # [T, n_all] complete past blocks only
    scores = scores.masked_fill(~past[None, :, None, :], float("-inf"))
    scores = scores.masked_fill(torch.isnan(scores), float("-inf"))  # a NaN forecast selects nothing extra
    local = (block[None, :] <= cur[:, None]) & (block[None, :] > cur[:, None] - local_blocks)
    init = (block[None, :] < init_blocks) & (block[None, :] <= cur[:, None])
    return topk_from_scores(scores, local | init, topk)


@torch.no_grad()
def forecast_select(
    f: torch.Tensor,
    kbar: torch.Tensor,
    *,
    seqlen_offset: int = 0,
    block_size: int,
    topk: int,
    init_blocks: int = 0,
    local_blocks: int = 1,
) -> torch.Tensor:
    """Lookahead selection from forecasts: f [B, T, Hkv, D], kbar [B, Nb, Hkv, D] -> [B, T, Hkv, topk] int32.

    Scores = raw dot product f . kbar (fp32 accumulation, no scaling, no softmax) of the complete
    past blocks c < cur (cur = (seqlen_offset + i) // block_size for row i); forced init / local
    blocks, top-k, ascending order and -1 padding exactly as `sparsa.select_blocks`. kbar must
    contain every block c < cur of the last row; later blocks are ignored. No gradient.
    """
    check_tensor("f", f, 4)
    if not isinstance(kbar, torch.Tensor) or kbar.ndim != 4:  # may hold zero blocks
        raise ValueError(f"kbar must be a 4-D tensor [B, Nb, Hkv, D], got {getattr(kbar, 'shape', type(kbar))}")
    check_selection_geometry(block_size, topk, init_blocks, local_blocks)
    if isinstance(seqlen_offset, bool) or not isinstance(seqlen_offset, int) or seqlen_offset < 0:
        raise ValueError(f"seqlen_offset must be a non-negative int, got {seqlen_offset!r}")
    if kbar.shape[0] != f.shape[0] or kbar.shape[2:] != f.shape[2:]:
        raise ValueError(f"kbar must have shape [B={f.shape[0]}, Nb, Hkv={f.shape[2]}, D={f.shape[3]}], "
                         f"got {tuple(kbar.shape)}")
    if kbar.device != f.device:
        raise ValueError(f"kbar must be on f's device {f.device}, got {kbar.device}")
    batch, seqlen, n_heads, _ = f.shape
    last_cur = (seqlen_offset + seqlen - 1) // block_size
    if kbar.shape[1] < last_cur:
        raise ValueError(f"kbar must hold the {last_cur} complete blocks before position "
                         f"{seqlen_offset + seqlen - 1}, got {kbar.shape[1]}")
    positions = seqlen_offset + torch.arange(seqlen, device=f.device)
    n_all = last_cur + 1
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * n_heads * n_all))
    pieces = [
        _select_rows(f[:, s: s + rows], kbar, positions[s: s + rows], block_size, topk, init_blocks, local_blocks)
        for s in range(0, seqlen, rows)
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


@torch.no_grad()
def forecast_select_from_keys(
    f: torch.Tensor,
    k_next: torch.Tensor,
    *,
    block_size: int,
    topk: int,
    init_blocks: int = 0,
    local_blocks: int = 1,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """forecast_select against the block keys of k_next [B, T, Hkv, D] (the layer being selected for).

    kbar = sparsa.block_keys(k_next, block_size, cu_seqlens); with packed documents (B = 1,
    cu_seqlens) every document is selected on its own with local positions and block indices.
    """
    check_tensor("f", f, 4)
    check_tensor("k_next", k_next, 4)
    if f.shape != k_next.shape:
        raise ValueError(f"f and k_next must have the same shape [B, T, Hkv, D], got {tuple(f.shape)} "
                         f"and {tuple(k_next.shape)}")
    check_cu_seqlens(cu_seqlens, f.shape[0], f.shape[1])
    geometry = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks)
    check_selection_geometry(**geometry)
    kbar = block_keys(k_next.detach(), block_size, cu_seqlens)
    if cu_seqlens is None:
        return forecast_select(f, kbar, **geometry)
    pieces, first = [], 0
    for s, e in doc_spans(cu_seqlens):
        n_blocks = (e - s) // block_size
        pieces.append(forecast_select(f[:, s:e], kbar[:, first: first + n_blocks], **geometry))
        first += n_blocks
    return torch.cat(pieces, dim=1)
