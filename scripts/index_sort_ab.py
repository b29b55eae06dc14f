"""A/B of the pair index's counting sort (index_triton.COUNTING_SORT, session 17) against torch.sort + the pos
kernel, in one process, interleaved (counting, sort, counting, sort): the two indexes compared element for element
(counts, gstart, toks, pos), then do_bench ms of the index build, the forward and the forward+backward. Setup as
benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16).

    PYTHONPATH=. python3 scripts/index_sort_ab.py [--shapes "8192,1;8192,4;65536,1;65536,4;131072,1"]
"""
import argparse
import json

import torch

from benchmarks.sparse_attention import BS, bench, make, sparse_calls, time_index
from sparsa.ops.sparse_attn import index_triton
from sparsa.ops.sparse_attn.index import doc_meta


def parse_shapes(text):
    shapes = []
    for part in filter(None, text.split(";")):
        n, g = part.split(",")
        shapes.append((int(n), int(g)))
    if not shapes:
        raise ValueError("--shapes: give 'N,G;N,G'")
    return shapes


def same_index(idx, n):
    """Whether both sorts build the same index of all KV heads (one slice)."""
    flat = idx.view(n, idx.shape[2], -1).contiguous()
    meta = doc_meta(1, n, None, BS, idx.device)
    built = []
    for on in (True, False):
        index_triton.COUNTING_SORT = on
        built.append(index_triton.build_pair_index_triton(flat, meta, BS, 0, flat.shape[1]))
    index_triton.COUNTING_SORT = True
    return all(torch.equal(getattr(built[0], f), getattr(built[1], f)) for f in ("counts", "gstart", "toks", "pos"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192,1;8192,4;65536,1;65536,4;131072,1;131072,4")
    args = p.parse_args()
    rows = []
    for n, group in parse_shapes(args.shapes):
        q, k, v, idx = make(n, group)
        equal = same_index(idx, n)
        fwd, fwd_bwd, _ = sparse_calls(n, group, "kv_outer")
        for on in (True, False, True, False):
            index_triton.COUNTING_SORT = on
            row = {"N": n, "G": group, "sort": "counting" if on else "torch.sort", "equal": equal,
                   "index_ms": time_index(q, k, v, idx), "fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwd_bwd)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    index_triton.COUNTING_SORT = True
    print("\n| N | G | sort | same index | index ms | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['G']} | {r['sort']} | {r['equal']} | {r['index_ms']:.3f} | {r['fwd_ms']:.3f} | "
              f"{r['fwdbwd_ms']:.3f} |")


if __name__ == "__main__":
    main()
