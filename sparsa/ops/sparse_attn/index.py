"""Block -> token index for the KV-outer kernels, built by a sort over the (token, slot) pairs.

All tensors live on the device of the inputs. Grid sizes use host-side upper bounds (programs with no
work exit at once); the only host synchronisation is building a document layout (`doc_meta`: reading
cu_seqlens, copying small tables to the device), done once per layout without cu_seqlens (cached).

Terms (every document / batch row is flattened into one packed sequence of N tokens):
  global block gb: the c-th block of a document, numbered over all documents (NBG in all);
  blk_start[gb]  : global token index of its first key, blk_len[gb] its number of keys (<= bs);
  group          : (local KV head hl, global block gb) -> hl * NBG + gb;
  pair           : one valid (head, token, slot) of block_indices; a slot is valid when it is
                   >= 0, its block starts at or before the token (local positions) and no earlier slot
                   of the row holds the same block (rows need not be sorted). Pairs are sorted by (group, token), so every group owns a
                   contiguous range of the sorted list (a CSR without dense [blocks x N] tables).

Two implementations build the same tensors (equal element for element, tested): index_triton.py (the
default: a handful of Triton kernels) and PyTorch ops (about 30 small kernels per head slice). With the
Triton index the attention was faster at every measured shape (H200, 2026-12-06, scripts/index_ab.py: 8K
fwd+bwd 3.37-3.83 vs 4.13-4.98 ms, 64K 23.8-32.1 vs 24.3-33.7; benchmarks/results/h200_session10).
SPARSA_PAIR_INDEX=torch|triton selects.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from .._env import env_choice


@dataclass
class DocMeta:
    n_tokens: int
    n_blocks: int  # NBG
    tok_docstart: torch.Tensor  # [N] int64: global index of the token's document start
    tok_blockbase: torch.Tensor  # [N] int64: global block id of its document's block 0
    blk_start: torch.Tensor  # [NBG] int64
    blk_len: torch.Tensor  # [NBG] int32
    # tables derived from the layout by the kernels (kv_outer.local_block_table), built once per layout
    derived: dict = field(default_factory=dict, repr=False, compare=False)


def doc_meta(batch: int, seqlen: int, cu_seqlens, block_size: int, device) -> DocMeta:
    """Document layout of the flattened [B*T] token axis (batch rows are documents too).

    Without cu_seqlens the layout depends on (batch, seqlen, block_size, device) only and is cached (its
    tensors are read-only inputs of the kernels), saving a dozen small kernels and host-to-device copies
    per call."""
    if cu_seqlens is None:
        return _uniform_doc_meta(batch, seqlen, block_size, torch.device(device))
    offs = [int(x) for x in cu_seqlens.tolist()]
    return _doc_meta([b - a for a, b in itertools.pairwise(offs)], block_size, device)


@functools.lru_cache(maxsize=16)
def _uniform_doc_meta(batch: int, seqlen: int, block_size: int, device: torch.device) -> DocMeta:
    return _doc_meta([seqlen] * batch, block_size, device)


def _doc_meta(lens: list, block_size: int, device) -> DocMeta:
    n_tokens = sum(lens)
    nblk = [-(-n // block_size) for n in lens]
    starts, bases, s, bb = [], [], 0, 0
    for n, nb in zip(lens, nblk):
        starts.append(s)
        bases.append(bb)
        s += n
        bb += nb
    n_blocks = bb
    lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
    nblk_t = torch.tensor(nblk, dtype=torch.int64, device=device)
    starts_t = torch.tensor(starts, dtype=torch.int64, device=device)
    bases_t = torch.tensor(bases, dtype=torch.int64, device=device)
    tok_docstart = torch.repeat_interleave(starts_t, lens_t, output_size=n_tokens)
    tok_blockbase = torch.repeat_interleave(bases_t, lens_t, output_size=n_tokens)
    blk_doc_start = torch.repeat_interleave(starts_t, nblk_t, output_size=n_blocks)
    blk_doc_len = torch.repeat_interleave(lens_t, nblk_t, output_size=n_blocks)
    blk_local = torch.arange(n_blocks, device=device) - torch.repeat_interleave(bases_t, nblk_t, output_size=n_blocks)
    blk_start = blk_doc_start + blk_local * block_size
    blk_len = torch.clamp(blk_doc_len - blk_local * block_size, max=block_size).to(torch.int32)
    return DocMeta(n_tokens, n_blocks, tok_docstart, tok_blockbase, blk_start, blk_len)


def valid_slots(idx: torch.Tensor, meta: DocMeta, block_size: int, skip_local: bool = False) -> torch.Tensor:
    """idx [N, H, K] int32 -> bool [N, H, K]: slot holds a block with at least one visible key, and it is the
    block's first slot in the row (a block listed twice counts once; rows need not be sorted). skip_local: the
    token's local blocks (its document's block 0, its own and the previous block) are not pairs either (the
    local kernel, kv_local.py, attends to them)."""
    n_tokens = idx.shape[0]
    tloc = torch.arange(n_tokens, device=idx.device) - meta.tok_docstart  # [N]
    # block c starts at or before the token  <=>  c <= the token's own block (no product that could overflow)
    own_block = (tloc // block_size).to(idx.dtype)[:, None, None]
    valid = (idx >= 0) & (idx <= own_block)
    if skip_local:
        valid &= (idx != 0) & (idx < own_block - 1)
    if idx.shape[-1] > 1:
        # a stable sort puts a block's first slot first among its equals: the later ones are repeats
        ordered, order = torch.sort(idx, dim=-1, stable=True)
        repeat = torch.zeros_like(valid)
        repeat.scatter_(-1, order[..., 1:], ordered[..., 1:] == ordered[..., :-1])
        valid &= ~repeat
    return valid


@dataclass
class PairIndex:
    h0: int  # first KV head of this slice
    n_heads: int  # KV heads in this slice
    n_pairs_max: int  # Hs * N * K (upper bound on the valid pairs)
    counts: torch.Tensor  # [Hs * NBG] int64 pairs per group
    gstart: torch.Tensor  # [Hs * NBG] int64 first sorted position of each group
    toks: torch.Tensor  # [Hs * N * K] int32 token of each sorted position (valid ones first)
    pos: torch.Tensor  # [Hs, N, K] int32 sorted position of each slot, -1 if the slot is invalid
    skip_local: bool = False  # local blocks are not pairs (valid_slots): only the forward with kv_local uses it

    def head_range(self, first: int, end: int) -> "PairIndex":
        """Local heads [first, end) of this slice as an index of their own: views that share this index's
        sorted pair list (gstart, toks and pos stay positions in it, so per-pair buffers sized for the whole
        slice are addressed the same way)."""
        if not 0 <= first < end <= self.n_heads:
            raise ValueError(f"head range [{first}, {end}) must lie in [0, {self.n_heads})")
        nbg = self.counts.numel() // self.n_heads
        per_head = self.n_pairs_max // self.n_heads
        groups = slice(first * nbg, end * nbg)
        return PairIndex(
            self.h0 + first,
            end - first,
            (end - first) * per_head,
            self.counts[groups],
            self.gstart[groups],
            self.toks,
            self.pos[first:end],
            self.skip_local,
        )


# which implementation builds the index: "triton" (index_triton.py, the default: a handful of kernels) or
# "torch" (PyTorch ops, the same tensors); SPARSA_PAIR_INDEX selects, scripts/index_ab.py compares them
PAIR_INDEX_BACKENDS = ("torch", "triton")


def pair_index_backend() -> str:
    return env_choice("SPARSA_PAIR_INDEX", PAIR_INDEX_BACKENDS, "triton")


def _triton_path():
    """index_triton unless SPARSA_PAIR_INDEX=torch, else None (the PyTorch functions of this module)."""
    if pair_index_backend() != "triton":
        return None
    from . import index_triton

    return index_triton


def build_pair_index(idx: torch.Tensor, meta: DocMeta, block_size: int, h0: int, n_heads: int,
                     skip_local: bool = False) -> PairIndex:
    """idx [N, Hkv, K] int32 (all heads); builds the sorted pair list of heads [h0, h0 + n_heads) (without the
    local blocks with skip_local: `valid_slots`)."""
    fast = _triton_path()
    build = fast.build_pair_index_triton if fast else _build_pair_index_torch
    return build(idx, meta, block_size, h0, n_heads, skip_local)


def work_list(index: PairIndex, per_item: int, with_slots: bool = False):
    """Flat work list: each group's sorted range cut into items of at most `per_item` pairs.

    Returns (work [W, 3 or 4] int64: start, end, group[, partial slot or -1], n_slots_max).
    W is a host-side upper bound; padding items have start == end == 0 (group n_groups - 1, slot -1).
    With `with_slots`, the items of groups cut into several items get consecutive partial slots.
    """
    fast = _triton_path()
    return (fast.work_list_triton if fast else _work_list_torch)(index, per_item, with_slots)


def group_split_info(index: PairIndex, per_item: int) -> torch.Tensor:
    """[n_groups, 2] int64: (items of the group, first partial slot) for the dK/dV split reduction."""
    fast = _triton_path()
    return (fast.group_split_info_triton if fast else _group_split_info_torch)(index, per_item)


def split_work_list(index: PairIndex, per_item: int):
    """(work list with partial slots, n_slots_max, split table) for the dK/dV kernels: `work_list(...,
    with_slots=True)` and `group_split_info` from one pass over the item counts."""
    fast = _triton_path()
    if fast:
        return fast.split_work_list_triton(index, per_item)
    work, n_slots = _work_list_torch(index, per_item, with_slots=True)
    return work, n_slots, _group_split_info_torch(index, per_item)


def key_dtype(n_groups: int) -> torch.dtype:
    """The narrowest sort key that holds n_groups (the "invalid" key): a 16-bit radix sort makes half the passes."""
    return torch.int16 if n_groups < 2**15 - 1 else torch.int32 if n_groups < 2**31 - 1 else torch.int64


def sort_groups(gid: torch.Tensor, n_groups: int):
    """Stable sort of the keys gid [P] -> (sorted keys, perm, counts [n_groups], gstart [n_groups])."""
    sorted_gid, perm = torch.sort(gid, stable=True)
    bounds = torch.searchsorted(sorted_gid, torch.arange(n_groups + 1, device=gid.device, dtype=gid.dtype))
    return sorted_gid, perm, bounds[1:] - bounds[:-1], bounds[:-1]


def partial_slots(index: PairIndex, per_item: int) -> int:
    """Upper bound on the dK/dV partial slots of a work list: ceil(c/p) < 2c/p for c > p."""
    return max(1, 2 * index.n_pairs_max // per_item)


def _build_pair_index_torch(idx: torch.Tensor, meta: DocMeta, block_size: int, h0: int, n_heads: int,
                            skip_local: bool = False) -> PairIndex:
    """`build_pair_index` with PyTorch ops."""
    n_tokens, _, topk = idx.shape
    device = idx.device
    sl = idx[:, h0 : h0 + n_heads]  # [N, Hs, K]
    valid = valid_slots(sl, meta, block_size, skip_local)  # [N, Hs, K]
    n_groups = n_heads * meta.n_blocks
    kdt = key_dtype(n_groups)
    head = torch.arange(n_heads, device=device, dtype=kdt)
    gid = (head[None, :, None] * meta.n_blocks + meta.tok_blockbase.to(kdt)[:, None, None]) + sl.to(kdt)
    gid = torch.where(valid, gid, n_groups)  # invalid slots sort last
    gid = gid.permute(1, 0, 2).reshape(-1)  # order (head, token, slot)
    _, perm, counts, gstart = sort_groups(gid, n_groups)
    n_pairs = gid.numel()
    pos = torch.empty(n_pairs, dtype=torch.int32, device=device)
    pos[perm] = torch.arange(n_pairs, dtype=torch.int32, device=device)
    pos = torch.where(gid < n_groups, pos, -1).view(n_heads, n_tokens, topk)
    if n_pairs < 2**31:
        toks = (perm.to(torch.int32) // topk) % n_tokens
    else:
        toks = ((perm // topk) % n_tokens).to(torch.int32)
    return PairIndex(h0, n_heads, n_pairs, counts, gstart, toks, pos, skip_local)


def _work_list_torch(index: PairIndex, per_item: int, with_slots: bool = False):
    """`work_list` with PyTorch ops."""
    counts, gstart = index.counts, index.gstart
    n_groups = counts.numel()
    device = counts.device
    w_max = -(-index.n_pairs_max // per_item) + n_groups
    nitems = (counts + per_item - 1) // per_item
    cum = torch.cumsum(nitems, 0)
    w = torch.arange(w_max, device=device, dtype=torch.int64)
    grp = torch.searchsorted(cum, w, right=True)
    ok = grp < n_groups
    grp = torch.clamp(grp, max=n_groups - 1)
    first = cum[grp] - nitems[grp]
    local = w - first
    start = gstart[grp] + local * per_item
    end = torch.minimum(start + per_item, gstart[grp] + counts[grp])
    zero = torch.zeros_like(start)
    cols = [torch.where(ok, start, zero), torch.where(ok, end, zero), grp]
    n_slots = 0
    if with_slots:
        split = nitems > 1
        sizes = torch.where(split, nitems, torch.zeros_like(nitems))
        base = torch.cumsum(sizes, 0) - sizes
        slot = torch.where(ok & split[grp], base[grp] + local, torch.full_like(local, -1))
        cols.append(slot)
        n_slots = partial_slots(index, per_item)
    return torch.stack(cols, 1).contiguous(), n_slots


def _group_split_info_torch(index: PairIndex, per_item: int) -> torch.Tensor:
    """`group_split_info` with PyTorch ops."""
    nitems = (index.counts + per_item - 1) // per_item
    split = nitems > 1
    sizes = torch.where(split, nitems, torch.zeros_like(nitems))
    base = torch.cumsum(sizes, 0) - sizes
    return torch.stack([sizes, base], 1).contiguous()


def _pick_blocks(score: torch.Tensor, cur: torch.Tensor, width: int) -> torch.Tensor:
    """score [n, Hkv, NB] (below 3), cur [n] the tokens' own blocks -> [n, Hkv, width] int32: block 0, the own
    and the previous block forced, no later block, the rest by highest score; ascending, -1 right-padded."""
    n_blocks = score.shape[-1]
    blocks = torch.arange(n_blocks, device=score.device)
    forced = (blocks[None, :] == 0) | (blocks[None, :] == cur[:, None]) | (blocks[None, :] == cur[:, None] - 1)
    score = torch.where(forced[:, None, :], torch.full_like(score, 3.0), score)
    score = torch.where((blocks[None, :] > cur[:, None])[:, None, :], torch.full_like(score, -1.0), score)
    val, ind = torch.topk(score, width, dim=-1)
    ind = torch.sort(torch.where(val < 0, torch.full_like(ind, n_blocks), ind), dim=-1).values
    return torch.where(ind == n_blocks, torch.full_like(ind, -1), ind).to(torch.int32)


def random_selection(
    batch: int,
    seqlen: int,
    n_heads_kv: int,
    topk: int,
    block_size: int,
    *,
    cu_seqlens=None,
    generator: torch.Generator | None = None,
    device=None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Realistic test/benchmark selections [B, T, Hkv, topk] int32: block 0, the current and the
    previous block forced, the rest distinct random past blocks; ascending, -1 right-padded.
    Positions are local to each packed document when `cu_seqlens` is given (then batch must be 1)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.full((batch, seqlen, n_heads_kv, topk), -1, dtype=torch.int32, device=device)
    spans = [(0, seqlen)] if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    for b in range(batch):
        for s, e in spans:
            n_blocks = -(-(e - s) // block_size)
            width = min(topk, n_blocks)
            for c0 in range(0, e - s, chunk):
                c1 = min(c0 + chunk, e - s)
                cur = torch.arange(c0, c1, device=device) // block_size  # [n]
                score = torch.rand(
                    c1 - c0,
                    n_heads_kv,
                    n_blocks,
                    generator=generator,
                    device="cpu" if generator is not None else device,
                )
                out[b, s + c0 : s + c1, :, :width] = _pick_blocks(score.to(device), cur, width)
    return out


def pooled_selection(
    seqlen: int,
    n_heads_kv: int,
    topk: int,
    block_size: int,
    pool: int,
    *,
    tile: int = 64,
    generator: torch.Generator | None = None,
    device=None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Benchmark selections with locality, [1, T, Hkv, topk] int32: like `random_selection` (block 0, the
    current and the previous block forced, ascending, -1 right-padded), but the other blocks of the tokens of
    each `tile` consecutive tokens (per KV head) come from one random pool of `pool` past blocks, so a tile's
    union is about pool + 3 blocks, as adjacent tokens' `select_blocks` choices share blocks on real
    activations (benchmarks/results/real_selection_locality_cpu.md). Tokens whose pool is smaller than
    what they need take the rest at random."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen_device = "cpu" if generator is not None else device
    n_blocks = -(-seqlen // block_size)
    width = min(topk, n_blocks)
    blocks = torch.arange(n_blocks, device=device)
    n_tiles = -(-seqlen // tile)
    # each tile's pool: the `pool` best of random scores over the blocks every token of the tile may take
    first = torch.arange(n_tiles, device=device) * tile // block_size  # [tiles] block of the tile's first token
    tile_score = torch.rand(n_tiles, n_heads_kv, n_blocks, generator=generator, device=gen_device).to(device)
    usable = (blocks[None, :] > 0) & (blocks[None, :] < first[:, None] - 1)  # [tiles, blocks]
    tile_score = torch.where(usable[:, None, :], tile_score, torch.full_like(tile_score, -1.0))
    top_val, top_ind = torch.topk(tile_score, min(pool, n_blocks), dim=-1)  # [tiles, Hkv, pool]
    in_pool = torch.zeros(n_tiles, n_heads_kv, n_blocks, dtype=torch.bool, device=device)
    in_pool.scatter_(-1, top_ind, top_val >= 0)
    out = torch.full((1, seqlen, n_heads_kv, topk), -1, dtype=torch.int32, device=device)
    for c0 in range(0, seqlen, chunk):
        c1 = min(c0 + chunk, seqlen)
        tok = torch.arange(c0, c1, device=device)
        cur = tok // block_size  # [n]
        score = torch.rand(c1 - c0, n_heads_kv, n_blocks, generator=generator, device=gen_device).to(device)
        score = score + in_pool[tok // tile].to(score.dtype)  # pool members first, in random order
        out[0, c0:c1, :, :width] = _pick_blocks(score, cur, width)
    return out
