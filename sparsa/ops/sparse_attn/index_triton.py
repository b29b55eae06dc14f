"""Triton kernels that build the KV-outer pair index (index.py's PairIndex, work list, split table) with a
handful of launches; the outputs equal index.py's PyTorch path element for element (tests/ops/test_pair_index.py).

  _pair_key_kernel   idx -> sort keys in (head, token, slot) order, the `valid_slots` test fused in;
  torch.sort (stable) and torch.searchsorted (group bounds) as in the PyTorch path;
  _pair_pos_kernel   perm, sorted keys -> pos (inverse permutation, -1 for invalid slots) and toks;
  _group_items_kernel + torch.cumsum: items per group and their running sums, then _work_kernel writes
                     every work row (binary search of the row in the running sums) and _split_info_kernel
                     the dK/dV split table.
1-D grids of INDEX_BLOCK elements, int64 offsets. Selected by SPARSA_PAIR_INDEX=triton (index.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton_interpreter  # noqa: F401  (interpreter patch: run-time loop bound)
from .index import DocMeta, PairIndex, key_dtype, partial_slots, sort_groups


# elements (slots, sorted positions, work rows, groups) per program of the index kernels
INDEX_BLOCK = 1024
# from this many slots on, the pos/toks kernel divides slot numbers in int64 (tests lower it)
WIDE_PAIRS = 2**31


@triton.jit
def _pair_key_kernel(
    IDX,
    DOCSTART,
    BLOCKBASE,
    GID,
    N,
    NBG,
    n_groups,
    h0,
    block_size,
    stride_n,
    stride_h,
    stride_k,
    TOPK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SKIP_LOCAL: tl.constexpr = False,
):
    """Sort keys of BLOCK_T tokens x all slots of one local head hl (the `valid_slots` test fused in):
    GID [Hs, N, TOPK] = hl * NBG + block base of the token + slot's block, n_groups if invalid."""
    pid = tl.program_id(0).to(tl.int64)
    n_tblocks = tl.cdiv(N, BLOCK_T)
    hl = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] int64
    s = tl.arange(0, BLOCK_K)  # [BK]
    tmask = t < N
    mask = tmask[:, None] & (s < TOPK)[None, :]  # [BT, BK]
    row = IDX + t * stride_n + (h0 + hl) * stride_h  # [BT] first slot of each token's row
    c = tl.load(row[:, None] + s[None, :] * stride_k, mask=mask, other=-1).to(tl.int64)
    # repeat: an earlier slot of the row holds the same block (rows need not be sorted; the block counts once)
    repeat = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int1)
    for j in tl.static_range(TOPK - 1):
        cj = tl.load(row + j * stride_k, mask=tmask, other=-1).to(tl.int64)  # [BT] slot j (cached: loaded above)
        repeat = repeat | ((c == cj[:, None]) & (s > j)[None, :])
    own = (t - tl.load(DOCSTART + t, mask=tmask, other=0)) // block_size  # [BT] the token's own local block
    base = hl * NBG + tl.load(BLOCKBASE + t, mask=tmask, other=0)  # [BT]
    valid = (c >= 0) & (c <= own[:, None]) & ~repeat
    if SKIP_LOCAL:  # block 0, own and previous block: the local kernel's (kv_local.py)
        valid = valid & (c != 0) & (c < own[:, None] - 1)
    key = tl.where(valid, base[:, None] + c, n_groups)
    tl.store(GID + (hl * N + t)[:, None] * TOPK + s[None, :], key.to(GID.dtype.element_ty), mask=mask)


@triton.jit
def _pair_pos_kernel(
    PERM, SORTED, POS, TOKS, n_pairs, N, n_groups, TOPK: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr
):
    """For BLOCK sorted positions p: POS[perm[p]] = p (-1 if the key is the invalid one), TOKS[p] = the
    token of the slot perm[p] of the (head, token, slot) order. WIDE: more than 2^31 slots (int64 division)."""
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < n_pairs
    q = tl.load(PERM + p, mask=mask, other=0)
    key = tl.load(SORTED + p, mask=mask, other=0)
    tl.store(POS + q, tl.where(key < n_groups, p, -1).to(tl.int32), mask=mask)
    if not WIDE:
        q = q.to(tl.int32)
    tl.store(TOKS + p, ((q // TOPK) % N).to(tl.int32), mask=mask)


def build_pair_index_triton(idx: torch.Tensor, meta: DocMeta, block_size: int, h0: int, n_heads: int,
                            skip_local: bool = False) -> PairIndex:
    """`index.build_pair_index`. Launches: key kernel, sort, arange + searchsorted + sub (group bounds),
    pos/toks kernel."""
    n_tokens, _, topk = idx.shape
    device = idx.device
    n_groups = n_heads * meta.n_blocks
    n_pairs = n_heads * n_tokens * topk
    gid = torch.empty(n_pairs, dtype=key_dtype(n_groups), device=device)  # order (head, token, slot)
    block_k = triton.next_power_of_2(topk)
    block_t = max(1, INDEX_BLOCK // block_k)
    if n_pairs:
        grid = (n_heads * triton.cdiv(n_tokens, block_t),)
        _pair_key_kernel[grid](
            idx,
            meta.tok_docstart,
            meta.tok_blockbase,
            gid,
            n_tokens,
            meta.n_blocks,
            n_groups,
            h0,
            block_size,
            *idx.stride(),
            TOPK=topk,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            SKIP_LOCAL=skip_local,
        )
    sorted_gid, perm, counts, gstart = sort_groups(gid, n_groups)
    pos = torch.empty(n_pairs, dtype=torch.int32, device=device)
    toks = torch.empty(n_pairs, dtype=torch.int32, device=device)
    if n_pairs:
        wide = n_pairs >= WIDE_PAIRS
        _pair_pos_kernel[(triton.cdiv(n_pairs, INDEX_BLOCK),)](
            perm, sorted_gid, pos, toks, n_pairs, n_tokens, n_groups, TOPK=topk, WIDE=wide, BLOCK=INDEX_BLOCK
        )
    return PairIndex(h0, n_heads, n_pairs, counts, gstart, toks, pos.view(n_heads, n_tokens, topk), skip_local)


@triton.jit
def _group_items_kernel(COUNTS, ITEMS, n_groups, per_item, BLOCK: tl.constexpr):
    """ITEMS [2, n_groups] = (items of the group, the same if it is cut into several items else 0)."""
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < n_groups
    nitems = (tl.load(COUNTS + g, mask=mask, other=0) + per_item - 1) // per_item
    tl.store(ITEMS + g, nitems, mask=mask)
    tl.store(ITEMS + n_groups + g, tl.where(nitems > 1, nitems, 0), mask=mask)


def _item_cumsum(index: PairIndex, per_item: int) -> torch.Tensor:
    """[2, n_groups] int64 inclusive cumsums of (items per group, items of the groups cut into several).
    Groups on the inner axis: torch.cumsum over an outer axis of two columns ran 0.7 ms at 8192 groups on the
    H100 (one scan thread per column; scripts/sa_kernel_times.py, 2026-12-05), the inner-axis scan is fast."""
    n_groups = index.counts.numel()
    items = torch.empty(2, n_groups, dtype=torch.int64, device=index.counts.device)
    _group_items_kernel[(triton.cdiv(n_groups, INDEX_BLOCK),)](
        index.counts, items, n_groups, per_item, BLOCK=INDEX_BLOCK
    )
    return torch.cumsum(items, 1)


@triton.jit
def _cum_range(CUM, g, col, n_groups, mask):
    """Exclusive and inclusive cumsum (row col of CUM [2, n_groups]) at groups g."""
    before = tl.load(CUM + col * n_groups + g - 1, mask=mask & (g > 0), other=0)
    return before, tl.load(CUM + col * n_groups + g, mask=mask, other=0)


@triton.jit
def _work_kernel(
    COUNTS, GSTART, CUM, WORK, n_groups, n_rows, per_item, n_steps, COLS: tl.constexpr, BLOCK: tl.constexpr
):
    """BLOCK rows w of WORK [W, COLS]: the group g of item w (binary search of w in the inclusive item
    cumsum, n_steps halvings), the item's pair range and (COLS == 4) its partial slot. Rows past the last
    item: (0, 0, n_groups - 1[, -1])."""
    w = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = w < n_rows
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.full([BLOCK], n_groups, dtype=tl.int64)
    for _ in range(n_steps):  # lo = number of groups whose items all come before w
        mid = (lo + hi) >> 1
        left = lo < hi
        below = tl.load(CUM + mid, mask=mask & left, other=0) <= w
        lo = tl.where(left & below, mid + 1, lo)
        hi = tl.where(left & ~below, mid, hi)
    ok = lo < n_groups
    g = tl.minimum(lo, n_groups - 1)
    first, _ = _cum_range(CUM, g, 0, n_groups, mask)
    local = w - first
    gs = tl.load(GSTART + g, mask=mask, other=0)
    start = gs + local * per_item
    end = tl.minimum(start + per_item, gs + tl.load(COUNTS + g, mask=mask, other=0))
    row = WORK + w * COLS
    tl.store(row, tl.where(ok, start, 0), mask=mask)
    tl.store(row + 1, tl.where(ok, end, 0), mask=mask)
    tl.store(row + 2, g, mask=mask)
    if COLS == 4:
        base, upto = _cum_range(CUM, g, 1, n_groups, mask)
        tl.store(row + 3, tl.where(ok & (upto > base), base + local, -1), mask=mask)


def work_list_triton(index: PairIndex, per_item: int, with_slots: bool = False, cum: torch.Tensor | None = None):
    """`index.work_list` in three launches: items kernel, cumsum, work kernel (one with `cum`, the item cumsum
    of the same index and per_item, already made)."""
    n_groups = index.counts.numel()
    w_max = -(-index.n_pairs_max // per_item) + n_groups
    cols = 4 if with_slots else 3
    if cum is None:
        cum = _item_cumsum(index, per_item)
    work = torch.empty(w_max, cols, dtype=torch.int64, device=cum.device)
    _work_kernel[(triton.cdiv(w_max, INDEX_BLOCK),)](
        index.counts,
        index.gstart,
        cum,
        work,
        n_groups,
        w_max,
        per_item,
        n_groups.bit_length(),
        COLS=cols,
        BLOCK=INDEX_BLOCK,
    )
    n_slots = partial_slots(index, per_item) if with_slots else 0
    return work, n_slots


@triton.jit
def _split_info_kernel(CUM, SPLIT, n_groups, BLOCK: tl.constexpr):
    """SPLIT [n_groups, 2] = (items of a group cut into several, else 0; its first partial slot)."""
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < n_groups
    base, upto = _cum_range(CUM, g, 1, n_groups, mask)
    tl.store(SPLIT + g * 2, upto - base, mask=mask)
    tl.store(SPLIT + g * 2 + 1, base, mask=mask)


def group_split_info_triton(index: PairIndex, per_item: int, cum: torch.Tensor | None = None) -> torch.Tensor:
    """`index.group_split_info`. Launches: items kernel, cumsum, split kernel (one with `cum`)."""
    n_groups = index.counts.numel()
    if cum is None:
        cum = _item_cumsum(index, per_item)
    split = torch.empty(n_groups, 2, dtype=torch.int64, device=cum.device)
    _split_info_kernel[(triton.cdiv(n_groups, INDEX_BLOCK),)](cum, split, n_groups, BLOCK=INDEX_BLOCK)
    return split


def split_work_list_triton(index: PairIndex, per_item: int):
    """`index.split_work_list`: the item cumsum made once for the work list and the split table."""
    cum = _item_cumsum(index, per_item)
    work, n_slots = work_list_triton(index, per_item, with_slots=True, cum=cum)
    return work, n_slots, group_split_info_triton(index, per_item, cum=cum)
