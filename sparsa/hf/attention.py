"""`attn_implementation="sparsa"`: full or block-sparse attention inside Hugging Face Llama-family models.

    from sparsa.hf import register, sparsa_mode
    register()                                    # once; adds "sparsa" to transformers' interfaces
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparsa")
    with sparsa_mode(model, mode="sparse", topk=16, block_size=16):
        model(ids)  /  model.generate(ids)        # training (gradients) and generation (KV cache)

Full mode is transformers' own SDPA attention (the model behaves exactly as with "sdpa"). Sparse mode
is SSA's block top-k attention (docs/semantics.md):

* prefill / training (no padding mask, as many queries as keys): `sparsa.select_blocks` +
  `sparsa.sparse_attention` (Triton on CUDA, the PyTorch reference elsewhere);
* decode with a KV cache (fewer queries than cached keys) and masked batches: every query at cache
  position t selects among the blocks of the cached keys 0..t with the same rule (block keys are the
  means of the complete cached blocks, the current block forced), then attends over the gathered
  tokens of its blocks. Decoding with the cache equals recomputing the whole sequence without it.

Settings live on the attention modules (`module.sparsa_settings`, one shared `SparsaSettings`);
modules without settings run in full mode. This module never imports transformers at import time.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ops import select_blocks, sparse_attention
from ..ops.sparse_attn import blockwise
from ..ops.select import naive as select_naive
from ..ops.select.naive import topk_indices

NAME = "sparsa"
MODES = ("full", "sparse")
SELECTORS = ("ssa", "nsa", "infllm")
SETTINGS_ATTR = "sparsa_settings"


@dataclass(frozen=True)
class SparsaSettings:
    """mode: "full" | "sparse"; block_size / topk / init_blocks / local_blocks: SSA block geometry;
    selector: "ssa" | "nsa" | "infllm" (rules of `sparsa.select_blocks`) or a callable
    selector(q, k, *, block_size, topk, scale, positions, layer_idx) -> block indices [B, Tq, Hkv, topk]
    (q [B, Tq, Hq, D], k [B, Tk, Hkv, D], positions [B, Tq] int64: each query's cache position)."""

    mode: str = "full"
    block_size: int = 16
    topk: int = 16
    init_blocks: int = 0
    local_blocks: int = 1
    selector: str | Callable = "ssa"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("block_size", "topk", "local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.init_blocks, bool) or not isinstance(self.init_blocks, int) or self.init_blocks < 0:
            raise ValueError(f"init_blocks must be a non-negative int, got {self.init_blocks!r}")
        if self.topk < self.init_blocks + self.local_blocks:
            raise ValueError(f"topk ({self.topk}) must be >= init_blocks + local_blocks "
                             f"({self.init_blocks + self.local_blocks})")
        if not callable(self.selector) and self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS} or a callable, got {self.selector!r}")


DEFAULT_SETTINGS = SparsaSettings()


# ----------------------------------------------------------------------------------------------
# registration with transformers
# ----------------------------------------------------------------------------------------------

def register() -> None:
    """Registers "sparsa" with transformers' AttentionInterface and AttentionMaskInterface (idempotent).

    The mask function is transformers' SDPA mask (boolean [B, 1, Tq, Tk], or None for a plain causal
    mask), so full mode is exactly the "sdpa" implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sparsa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a Llama-family model (those with q/k/v/o projections and a layer index)."""
    found = [m for m in model.modules()
             if all(hasattr(m, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))]
    if not found:
        raise ValueError("model has no Llama-style attention modules (q_proj/k_proj/v_proj/o_proj/layer_idx)")
    return found


def _check_implementation(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if config is not None and impl != NAME:
        raise ValueError(
            f"model uses attn_implementation={impl!r}: load it with attn_implementation='sparsa' "
            "(after sparsa.hf.register()) or call sparsa.hf.enable(model)"
        )


def enable(model: torch.nn.Module, **settings) -> torch.nn.Module:
    """Registers "sparsa", switches `model` to it (model.set_attn_implementation) and applies `settings`."""
    register()
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
    set_sparsa(model, **settings)
    return model


def get_sparsa(model: torch.nn.Module) -> SparsaSettings:
    """The settings of the model's first attention module (all share one object when set here)."""
    return getattr(attention_modules(model)[0], SETTINGS_ATTR, DEFAULT_SETTINGS)


def set_sparsa(model: torch.nn.Module, **changes) -> SparsaSettings:
    """Sets mode / topk / block_size / init_blocks / local_blocks / selector on every attention module
    (unnamed fields keep their current values). Returns the new settings."""
    _check_implementation(model)
    known = {f.name for f in dataclasses.fields(SparsaSettings)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown sparsa settings {sorted(unknown)}; known: {sorted(known)}")
    settings = dataclasses.replace(get_sparsa(model), **changes)
    for module in attention_modules(model):
        setattr(module, SETTINGS_ATTR, settings)
    return settings


@contextlib.contextmanager
def sparsa_mode(model: torch.nn.Module, mode: str = "sparse", **changes):
    """Context manager: `with sparsa_mode(model, "sparse", topk=8): ...` restores the previous settings."""
    modules = attention_modules(model)
    previous = [getattr(m, SETTINGS_ATTR, None) for m in modules]
    try:
        yield set_sparsa(model, mode=mode, **changes)
    finally:
        for module, old in zip(modules, previous):
            if old is None:
                if hasattr(module, SETTINGS_ATTR):
                    delattr(module, SETTINGS_ATTR)
            else:
                setattr(module, SETTINGS_ATTR, old)


# ----------------------------------------------------------------------------------------------
# the attention function
# ----------------------------------------------------------------------------------------------

def sparsa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] (cache included),
    attention_mask None or bool [B, 1, Tq, Tk] (True = attend). Returns ([B, Tq, Hq, D], None)."""
    settings = getattr(module, SETTINGS_ATTR, DEFAULT_SETTINGS)
    if settings.mode == "full":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError("sparse mode does not implement attention dropout (set attention_dropout=0)")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError(f"sparsa expects a boolean attention mask (its mask function), got {attention_mask.dtype}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    q = query.transpose(1, 2)  # [B, Tq, Hq, D]
    k = key.transpose(1, 2)  # [B, Tk, Hkv, D]
    v = value.transpose(1, 2)
    layer_idx = getattr(module, "layer_idx", None)
    if attention_mask is None and q.shape[1] == k.shape[1]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        positions = None
        indices = _select(settings, q, k, scale, positions, layer_idx)
        out = sparse_attention(q, k, v, indices, block_size=settings.block_size, scale=scale)
    else:
        positions = query_positions(attention_mask, q.shape[0], q.shape[1], k.shape[1], q.device)
        indices = _select(settings, q, k, scale, positions, layer_idx)
        out = gathered_sparse_attention(q, k, v, indices, positions, settings.block_size, scale, attention_mask)
    return out, None


def query_positions(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """[B, Tq] int64 cache position of every query: the last cached key it may attend to.

    Without a mask the queries are the last Tq cache slots; with one, the last True of each mask row
    (the query's own slot under a causal mask; -1 for a fully masked row)."""
    if attention_mask is None:
        return (torch.arange(q_len, device=device) + (kv_len - q_len))[None, :].expand(batch, q_len)
    mask = attention_mask[:, 0].expand(batch, q_len, kv_len)
    slots = torch.arange(kv_len, device=device)
    return torch.where(mask, slots, torch.full_like(slots, -1)).amax(dim=-1)


def _select(settings: SparsaSettings, q, k, scale, positions, layer_idx) -> torch.Tensor:
    common = {"block_size": settings.block_size, "topk": settings.topk}
    if callable(settings.selector):
        if positions is None:
            positions = query_positions(None, q.shape[0], q.shape[1], k.shape[1], q.device)
        with torch.no_grad():
            indices = settings.selector(q.detach(), k.detach(), scale=scale, positions=positions, layer_idx=layer_idx,
                                        **common)
        expected = (q.shape[0], q.shape[1], k.shape[2], settings.topk)
        if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != expected:
            raise ValueError(f"selector must return block indices of shape {expected}, got "
                             f"{getattr(indices, 'shape', type(indices).__name__)}")
        return indices
    rule = dict(init_blocks=settings.init_blocks, local_blocks=settings.local_blocks, scale=scale, **common)
    if positions is None:
        return select_blocks(q.detach(), k.detach(), score=settings.selector, **rule)
    if settings.selector == "ssa":
        return select_blocks_at(q.detach(), k.detach(), positions, **rule)
    # other rules: place each query at its cache slot of a zero query sequence and select there
    batch, _q_len = positions.shape
    padded = q.new_zeros(batch, k.shape[1], q.shape[2], q.shape[3])
    safe = positions.clamp(min=0)
    padded[torch.arange(batch, device=q.device)[:, None], safe] = q.detach()
    full = select_blocks(padded, k.detach(), score=settings.selector, **rule)
    return full[torch.arange(batch, device=q.device)[:, None], safe]


@torch.no_grad()
def select_blocks_at(q, k, positions, *, block_size, topk, init_blocks, local_blocks, scale) -> torch.Tensor:
    """SSA selection for queries at arbitrary cache positions (decode, chunked prefill).

    q [B, Tq, Hq, D], k [B, Tk, Hkv, D] (all cached keys), positions [B, Tq] -> [B, Tq, Hkv, topk] int32.
    Row (b, i) equals row positions[b, i] of `select_blocks(q_full, k)` for the whole sequence."""
    batch, q_len, n_heads_q, _ = q.shape
    kv_len, n_heads_kv = k.shape[1], k.shape[2]
    group = n_heads_q // n_heads_kv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_all = max(1, -(-kv_len // block_size))
    kbar = select_naive.block_keys_dense(k, block_size)  # [B, nc, Hkv, D]
    n_complete = kbar.shape[1]
    pos = positions.long()
    cur = torch.div(pos, block_size, rounding_mode="floor")  # [B, Tq] (-1 for empty rows)
    visible_blocks = torch.div(pos + 1, block_size, rounding_mode="floor")
    scores = torch.zeros(batch, q_len, n_heads_kv, n_all, dtype=acc, device=q.device)
    if n_complete > 0:
        kbar_q = kbar.to(acc).repeat_interleave(group, dim=2)  # [B, nc, Hq, D]
        logits = torch.einsum("bthd,bchd->bthc", q.to(acc), kbar_q) * scale  # [B, Tq, Hq, nc]
        block = torch.arange(n_complete, device=q.device)
        visible = block[None, None, :] < visible_blocks[:, :, None]  # [B, Tq, nc]
        logits = logits.masked_fill(~visible[:, :, None, :], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        scores[..., :n_complete] = probs.view(batch, q_len, n_heads_kv, group, n_complete).sum(dim=3)
    block_all = torch.arange(n_all, device=q.device)
    past = block_all[None, None, :] < cur[:, :, None]  # [B, Tq, n_all]
    scores = scores.masked_fill(~past[:, :, None, :], float("-inf"))
    upto = block_all[None, None, :] <= cur[:, :, None]
    local = upto & (block_all[None, None, :] > cur[:, :, None] - local_blocks)
    init = upto & (block_all[None, None, :] < init_blocks)
    scores = scores.masked_fill((local | init)[:, :, None, :], float("inf"))
    return topk_indices(scores, topk)


def gathered_sparse_attention(q, k, v, block_indices, positions, block_size: int, scale: float,
                              attention_mask=None) -> torch.Tensor:
    """Attention of each query over the tokens of its selected blocks, gathered from the cache.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; block_indices [B, Tq, Hkv, K]; positions [B, Tq];
    key j is used by query (b, i) iff its block is selected, j <= positions[b, i] and (with a mask)
    attention_mask[b, 0, i, j]. Differentiable in q, k, v. Returns [B, Tq, Hq, Dv] (q's dtype).
    Long prompts run in query chunks whose gathered keys stay within blockwise.CHUNK_ELEMENTS (no autograd
    memory bound: each chunk's gathered rows are kept for the backward)."""
    step = blockwise.chunk_tokens(q.shape[0], k.shape[2], q.shape[2] // k.shape[2],
                                  block_indices.shape[-1] * block_size, q.shape[-1], v.shape[-1])
    if step >= q.shape[1]:
        return _gathered_chunk(q, k, v, block_indices, positions, block_size, scale, attention_mask)
    outs = []
    for s in range(0, q.shape[1], step):
        mask = attention_mask
        if mask is not None and mask.shape[2] != 1:  # a mask broadcast over the queries stays whole
            mask = mask[:, :, s : s + step]
        outs.append(_gathered_chunk(q[:, s : s + step], k, v, block_indices[:, s : s + step],
                                    positions[:, s : s + step], block_size, scale, mask))
    return torch.cat(outs, dim=1)


def _gathered_chunk(q, k, v, block_indices, positions, block_size: int, scale: float, attention_mask=None):
    """gathered_sparse_attention on all of q at once."""
    batch, q_len, n_heads_q, head_dim = q.shape
    kv_len, n_heads_kv = k.shape[1], k.shape[2]
    group = n_heads_q // n_heads_kv
    n_sel = block_indices.shape[-1]
    blocks = block_indices.long()
    offsets = torch.arange(block_size, device=q.device)
    tokens = (blocks[..., None] * block_size + offsets).flatten(-2)  # [B, Tq, Hkv, K*bs]
    valid = (blocks >= 0)[..., None].expand(-1, -1, -1, -1, block_size).flatten(-2)
    valid = valid & (tokens <= positions[:, :, None, None]) & (tokens < kv_len)
    safe = torch.where(valid, tokens, torch.zeros_like(tokens))
    if attention_mask is not None:
        rows = attention_mask[:, 0].expand(batch, q_len, kv_len)  # [B, Tq, Tk]
        allowed = torch.gather(rows, 2, safe.flatten(2)).view_as(safe)
        valid = valid & allowed
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_tok = n_sel * block_size
    # gather keys / values per (b, i, kv head): index [B, Tq*Hkv*n_tok] into the time axis of [B, Tk, Hkv, D]
    kh = k.transpose(1, 2)  # [B, Hkv, Tk, D]
    vh = v.transpose(1, 2)
    idx = safe.permute(0, 2, 1, 3).reshape(batch, n_heads_kv, q_len * n_tok)  # [B, Hkv, Tq*n_tok]
    k_sel = torch.gather(kh, 2, idx[..., None].expand(-1, -1, -1, head_dim)).view(batch, n_heads_kv, q_len, n_tok, head_dim)
    v_sel = torch.gather(vh, 2, idx[..., None].expand(-1, -1, -1, vh.shape[-1])).view(
        batch, n_heads_kv, q_len, n_tok, vh.shape[-1])
    qg = q.to(acc).view(batch, q_len, n_heads_kv, group, head_dim).permute(0, 2, 1, 3, 4)  # [B, Hkv, Tq, G, D]
    logits = torch.einsum("bhtgd,bhtnd->bhtgn", qg, k_sel.to(acc)) * scale
    keep = valid.permute(0, 2, 1, 3)[:, :, :, None, :]  # [B, Hkv, Tq, 1, n_tok]
    logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    out = torch.einsum("bhtgn,bhtnd->bhtgd", probs, v_sel.to(acc))  # [B, Hkv, Tq, G, Dv]
    return out.permute(0, 2, 1, 3, 4).reshape(batch, q_len, n_heads_q, -1).to(q.dtype)
