"""Engine-side block selection with per-row positions (static shapes, no host synchronisation).

Same semantics as `sparsa.select_blocks` (SSA rule) and the forecast contract
(`sparsa.layers.forecast.forecast_select`), written for rows that each carry their own position:
decode rows are sequences of a batch (one query each, own block keys), prefill rows are the
queries of one chunk of one sequence (shared block keys).

For a query at position t (block cur = t // bs):
  SSA:      score[c] = sum over the G heads of its group of softmax_{c' < (t+1)//bs}(q . kbar[c'] * scale)[c]
  forecast: score[c] = f . kbar[c]                        (raw dot product, fp32, no softmax)
  only past blocks c < cur are candidates; the first `init_blocks` blocks (c <= cur) and the
  `local_blocks` blocks ending at cur are forced; the `topk` best, ascending, -1 right-padded.
"""
from __future__ import annotations

import torch

from ..ops.select.naive import topk_indices


def _use_kernel(method: str, x: torch.Tensor, auto_ok: bool = True) -> bool:
    """Validates `method`; True for "kernel", and for "auto" on CUDA tensors when `auto_ok`."""
    if method not in ("auto", "torch", "kernel"):
        raise ValueError(f"method must be 'auto', 'torch' or 'kernel', got {method!r}")
    return method == "kernel" or (method == "auto" and x.is_cuda and auto_ok)


def finish_selection(score: torch.Tensor, pos: torch.Tensor, *, block_size: int, topk: int,
                     init_blocks: int, local_blocks: int, method: str = "auto") -> torch.Tensor:
    """score [R, H, NB] (float; any value for invalid blocks), pos [R] -> [R, H, topk] int32.

    method: "torch" (this reference), "kernel" (`sparsa.serve.select_kernels`, one Triton launch)
    or "auto" (the kernel for CUDA tensors)."""
    if _use_kernel(method, score):
        from .select_kernels import finish_selection_triton

        return finish_selection_triton(score, pos, block_size=block_size, topk=topk, init_blocks=init_blocks,
                                       local_blocks=local_blocks)
    n_blocks = score.shape[-1]
    device = score.device
    cur = torch.div(pos, block_size, rounding_mode="floor").to(torch.long)[:, None, None]  # [R,1,1]
    block = torch.arange(n_blocks, device=device)[None, None, :]
    past = block < cur
    score = torch.where(past, score, torch.full_like(score, float("-inf")))
    forced = ((block <= cur) & (block > cur - local_blocks)) | ((block < init_blocks) & (block <= cur))
    score = torch.where(forced, torch.full_like(score, float("inf")), score)
    return topk_indices(score, topk)


def ssa_scores(q: torch.Tensor, kbar: torch.Tensor, pos: torch.Tensor, *, block_size: int, scale: float,
               method: str = "auto") -> torch.Tensor:
    """SSA block importance. q [R, Hq, D]; kbar [R, H, NB, D] (per row) or [H, NB, D] (shared);
    pos [R]. -> [R, H, NB] float32 (garbage where not visible; `finish_selection` masks it).
    method: "torch", "kernel" (`sparsa.serve.select_kernels`; per-row kbar of q's dtype only) or
    "auto" (the kernel for per-row kbar of q's dtype on CUDA)."""
    if _use_kernel(method, q, auto_ok=q.dtype == kbar.dtype) and kbar.ndim == 4:
        from .select_kernels import ssa_scores_triton

        return ssa_scores_triton(q, kbar, pos, block_size=block_size, scale=scale)
    rows, n_heads_q, head_dim = q.shape
    n_heads_kv, n_blocks = kbar.shape[-3], kbar.shape[-2]
    group = n_heads_q // n_heads_kv
    qg = q.float().view(rows, n_heads_kv, group, head_dim)
    if kbar.ndim == 4:
        logits = torch.einsum("rhgd,rhnd->rhgn", qg, kbar.float())
    else:
        logits = torch.einsum("rhgd,hnd->rhgn", qg, kbar.float())
    logits = logits * scale
    n_visible = torch.div(pos + 1, block_size, rounding_mode="floor").to(torch.long)[:, None, None, None]
    visible = torch.arange(n_blocks, device=q.device)[None, None, None, :] < n_visible
    logits = torch.where(visible, logits, torch.full_like(logits, float("-inf")))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return probs.sum(dim=2)


def forecast_scores(f: torch.Tensor, kbar: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Raw dot products f . kbar in fp32. f [R, H, D]; kbar [R, H, NB, D] or [H, NB, D] -> [R, H, NB].
    method as `ssa_scores`."""
    if _use_kernel(method, f) and kbar.ndim == 4:
        from .select_kernels import forecast_scores_triton

        return forecast_scores_triton(f, kbar)
    if kbar.ndim == 4:
        return torch.einsum("rhd,rhnd->rhn", f.float(), kbar.float())
    return torch.einsum("rhd,hnd->rhn", f.float(), kbar.float())


def slot_diff(selection: torch.Tensor, block_map: torch.Tensor, current: torch.Tensor, *, method: str = "auto"):
    """Match a new selection against the blocks already held in a slot pool.

    method: "torch" (this reference), "kernel" (`sparsa.serve.select_kernels`, one Triton launch; the
    interpreter runs it on CPU) or "auto" (the kernel for CUDA tensors).

    selection [B, H, K] int (ascending, -1 padded); block_map [B, H, S] int64 (block held by each
    slot, -1 = empty), S >= K; current [B] the block of the newest token (it lives in the tail, not
    in a slot). Resident blocks that stay selected keep their slot (hits); each newly selected block
    takes, in order, a slot whose block was dropped (a miss).
    Returns (new_block_map [B,H,S], load [B,H,S] block to copy into each slot or -1,
             slot_of [B,H,K] slot of each selection entry (-1 for padding and the current block),
             hits [B,H] int64, misses [B,H] int64).
    """
    if _use_kernel(method, selection):
        from .select_kernels import slot_diff_triton

        return slot_diff_triton(selection, block_map, current)
    sel = selection.to(torch.long)
    cur = current.to(torch.long)[:, None, None]
    wanted = (sel >= 0) & (sel != cur)  # [B,H,K]
    match = (sel[..., :, None] == block_map[..., None, :]) & wanted[..., :, None]  # [B,H,K,S]
    hit = match.any(dim=-1)  # [B,H,K]
    keep = match.any(dim=-2)  # [B,H,S]
    miss = wanted & ~hit
    free = ~keep
    n_slots = block_map.shape[-1]
    miss_rank = torch.cumsum(miss.to(torch.long), dim=-1) - 1  # [B,H,K]
    free_rank = torch.cumsum(free.to(torch.long), dim=-1) - 1  # [B,H,S]
    slots = torch.arange(n_slots, device=block_map.device).expand_as(block_map)
    # scatter with duplicates is order-dependent: write only free slots through a masked index
    free_by_rank = torch.full((*block_map.shape[:-1], n_slots + 1), n_slots, dtype=torch.long, device=block_map.device)
    free_by_rank.scatter_(-1, torch.where(free, free_rank, torch.full_like(free_rank, n_slots)), slots)
    free_by_rank = free_by_rank[..., :n_slots]
    miss_slot = free_by_rank.gather(-1, miss_rank.clamp(min=0, max=n_slots - 1))  # [B,H,K]
    hit_slot = match.to(torch.int8).argmax(dim=-1)  # [B,H,K]
    slot_of = torch.where(hit, hit_slot, torch.where(miss, miss_slot, torch.full_like(miss_slot, -1)))
    new_map = torch.where(keep, block_map, torch.full_like(block_map, -1))
    load = torch.full((*block_map.shape[:-1], n_slots + 1), -1, dtype=torch.long, device=block_map.device)
    target = torch.where(miss, miss_slot, torch.full_like(miss_slot, n_slots))
    load.scatter_(-1, target, torch.where(miss, sel, torch.full_like(sel, -1)))
    load = load[..., :n_slots]
    new_map = torch.where(load >= 0, load, new_map)
    return new_map, load, slot_of, hit.sum(dim=-1), miss.sum(dim=-1)


def slot_update(selection: torch.Tensor, block_map: torch.Tensor, current: torch.Tensor, totals: torch.Tensor, *,
                current_slot: int = 0, method: str = "auto"):
    """The engine's form of `slot_diff`: `block_map` (contiguous int64) is updated in place and
    `totals` (int64 [2]) accumulates (hits, misses). Returns (load [B,H,S], entry_slot [B,H,K]):
    the slot of every selection entry, `current_slot` for the current block (which attention reads
    from the tail), -1 for padding. One kernel launch on CUDA instead of a dozen small ones."""
    if totals.shape != (2,) or totals.dtype != torch.long:
        raise ValueError(f"totals must be an int64 tensor of shape (2,), got {tuple(totals.shape)} {totals.dtype}")
    if _use_kernel(method, selection):
        from .select_kernels import slot_update_triton

        return slot_update_triton(selection, block_map, current, totals, current_slot)
    new_map, load, slot_of, hits, misses = slot_diff(selection, block_map, current, method="torch")
    block_map.copy_(new_map)
    totals += torch.stack((hits.sum(), misses.sum()))
    is_current = selection.to(torch.long) == current.to(torch.long)[:, None, None]
    return load, torch.where(is_current, torch.full_like(slot_of, current_slot), slot_of)
