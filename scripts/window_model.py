"""What window-major KV-outer items would cost: work items and partial footprints, block-major against windows.

    PYTHONPATH=. python3 scripts/window_model.py [--sizes 8192,65536] [--groups 1,4,8,16] [--windows 256,512,1024]

The design sketched at the end of docs/kernels/sparse_attention.md's "Warp-specialised MAIN" groups a KV head's
(token, block) pairs by (token window, block) instead of by block, so that a window's partials can be merged while
they are still in L2. On the issue's random selections (block 64, top-16, one KV head; every head draws the same
way) this counts, per KV head: MAIN's work items of 64 rows (ROWS // G tokens each) block-major and window-major
(more items: each (window, block) group ends in a partly filled item), the share of item rows that are used, and the
bf16 partials (256 B per row plus a 4-byte log-sum-exp) one window holds for one KV head and for all Hq / G heads of
the benchmark (Hq = 32). CPU only; a model, not a measurement.
"""
from __future__ import annotations

import argparse

import torch

from sparsa.ops.sparse_attn.index import random_selection

BLOCK, TOPK, ROWS, HQ, ROW_BYTES = 64, 16, 64, 32, 260


def pair_blocks(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, block) of every valid pair of one KV head's random selection."""
    idx = random_selection(1, n, 1, TOPK, BLOCK, generator=torch.Generator().manual_seed(seed))[0, :, 0]
    tok = torch.arange(n)[:, None].expand_as(idx)
    valid = idx >= 0
    return tok[valid], idx[valid].long()


def items(groups: torch.Tensor, per_item: int) -> int:
    """Work items when each group's pairs are cut into items of per_item pairs."""
    counts = torch.bincount(groups)
    return int(((counts + per_item - 1) // per_item).sum())


def model(n: int, group: int, window: int, tok: torch.Tensor, blk: torch.Tensor) -> dict:
    per_item = max(1, ROWS // group)
    n_blocks = n // BLOCK
    block_major = items(blk, per_item)
    windowed = items((tok // window) * n_blocks + blk, per_item)
    pairs = tok.numel()
    per_head = window * TOPK * group * ROW_BYTES / 2**20
    return {"N": n, "G": group, "W": window, "pairs": pairs, "items_block_major": block_major,
            "items_window_major": windowed, "extra_items": windowed / block_major - 1,
            "rows_used_block_major": pairs * group / (block_major * ROWS),
            "rows_used_window_major": pairs * group / (windowed * ROWS),
            "partials_mb_per_kv_head": per_head, "partials_mb_all_heads": per_head * (HQ // group)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,4,8,16")
    p.add_argument("--windows", default="256,512,1024")
    args = p.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    if any(w <= 0 or w % BLOCK for w in windows):
        raise ValueError(f"--windows must be positive multiples of {BLOCK}, got {args.windows!r}")
    print("| N | G | window | items block-major | items window-major | extra | rows used (block / window) | "
          "partials per window, one KV head / all heads (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        tok, blk = pair_blocks(n)
        for group in (int(g) for g in args.groups.split(",")):
            for window in windows:
                r = model(n, group, window, tok, blk)
                print(f"| {n // 1024}K | {group} | {window} | {r['items_block_major']} | {r['items_window_major']} | "
                      f"{r['extra_items']:+.1%} | {r['rows_used_block_major']:.1%} / {r['rows_used_window_major']:.1%} | "
                      f"{r['partials_mb_per_kv_head']:.1f} / {r['partials_mb_all_heads']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
