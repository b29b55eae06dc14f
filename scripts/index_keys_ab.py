"""A/B of the pair index's sort keys (session 17): 16-bit keys shifted by -2**15 up to 2**16 - 2 groups (the
default) against the earlier rule (16-bit keys only below 2**15 - 1 groups, int32 from there), in one process,
interleaved (new, old, new, old): do_bench ms of the index build, the forward and the forward+backward, and the
outputs' difference. Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16).

    PYTHONPATH=. python3 scripts/index_keys_ab.py [--shapes "65536,1;131072,2;65536,2"]

G = 1 from 64K tokens and G = 2 from 128K are the shapes whose key width changes (32768 or more groups per head
slice); the others are controls.
"""
import argparse
import json

import torch

from benchmarks.sparse_attention import bench, make, sparse_calls, time_index
from scripts.kv_variants import rel
from sparsa.ops.sparse_attn import index, index_triton

NEW = (index.key_dtype, index.key_offset)


def old_key_dtype(n_groups: int) -> torch.dtype:
    return torch.int16 if n_groups < 2**15 - 1 else torch.int32 if n_groups < 2**31 - 1 else torch.int64


def use(rule: str):
    """Install the key rule ('new' or 'old') in the index modules (index_triton imported the names)."""
    dtype, offset = NEW if rule == "new" else (old_key_dtype, lambda n_groups: 0)
    for mod in (index, index_triton):
        mod.key_dtype = dtype
        mod.key_offset = offset


def parse_shapes(text):
    shapes = []
    for part in filter(None, text.split(";")):
        n, g = part.split(",")
        shapes.append((int(n), int(g)))
    if not shapes:
        raise ValueError("--shapes: give 'N,G;N,G'")
    return shapes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="65536,1;131072,1;131072,2;65536,2")
    args = p.parse_args()
    rows = []
    for n, group in parse_shapes(args.shapes):
        q, k, v, idx = make(n, group)
        fwd, fwd_bwd, _ = sparse_calls(n, group, "kv_outer")
        ref = None
        for rule in ("new", "old", "new", "old"):
            use(rule)
            out = fwd()
            ref = out if ref is None else ref
            row = {"N": n, "G": group, "keys": rule, "index_ms": time_index(q, k, v, idx), "fwd_ms": bench(fwd),
                   "fwdbwd_ms": bench(fwd_bwd), "diff": rel(out, ref)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    use("new")
    print("\n| N | G | keys | index ms | fwd ms | fwd+bwd ms | diff |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['G']} | {r['keys']} | {r['index_ms']:.3f} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
              f"{r['diff']:.1e} |")


if __name__ == "__main__":
    main()
