"""SPARSA_KV_OVERLAP (sparsa/ops/sparse_attn/overlap.py: the per-token reductions of one head chunk on a side
stream while the next chunk's block kernel runs) against the default, one process: do_bench medians (ms) of the
forward and forward+backward, dense SDPA at the same N, and each variant's difference from the default's output
and gradients (the same arithmetic in the same order: 0 expected).

    PYTHONPATH=. python3 scripts/kv_overlap_ab.py [--sizes 8192,65536] [--groups 1,4,8] [--chunks "8;4;2"]

--chunks: overlap variants, head chunks per slice (overlap.MAX_CHUNKS) separated by ';'. The default (no
overlap) runs first and last. Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16,
index build included). On the CPU dry run the variants run without streams.
"""
import argparse
import json
import os

from benchmarks.sparse_attention import bench, sparse_calls, time_dense
from scripts.kv_variants import parse_counts, rel
from sparsa.ops.sparse_attn import overlap


def outputs(fwd, fwd_bwd, leaves):
    out = fwd().detach().clone()
    fwd_bwd()
    return [out, *(x.grad.detach().clone() for x in leaves)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,4,8")
    p.add_argument("--chunks", default="8;4;2")
    p.add_argument("--no-dense", action="store_true", help="skip the dense SDPA timing")
    args = p.parse_args()
    configs = parse_counts(args.chunks, "--chunks", "a number of head chunks", 2)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        dense = (None, None) if args.no_dense else time_dense(n)
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, leaves = sparse_calls(n, group, "kv_outer")
            ref = None
            for cfg in [None, *configs, None]:
                os.environ["SPARSA_KV_OVERLAP"] = "0" if cfg is None else "1"
                overlap.MAX_CHUNKS = cfg or overlap.MAX_CHUNKS
                name = "off" if cfg is None else f"on, {cfg} chunks"
                try:
                    outs = outputs(fwd, fwd_bwd, leaves)
                    ref = outs if ref is None else ref
                    row = {
                        "N": n, "G": group, "overlap": name, "fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwd_bwd),
                        "dense_fwd_ms": dense[0], "dense_fwdbwd_ms": dense[1],
                        "diff": max(rel(a, b) for a, b in zip(outs, ref)),
                    }
                except Exception as exc:  # noqa: BLE001 - report the variant and go on
                    row = {"N": n, "G": group, "overlap": name, "error": repr(exc)[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.environ["SPARSA_KV_OVERLAP"] = "0"
    print("\n| N | G | overlap | fwd ms | fwd+bwd ms | dense fwd / fwd+bwd | max diff vs off |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['N']} | {r['G']} | {r['overlap']} | error: {r['error'][:80]} | | | |")
            continue
        dense = "" if r["dense_fwd_ms"] is None else f"{r['dense_fwd_ms']:.3f} / {r['dense_fwdbwd_ms']:.3f}"
        print(f"| {r['N']} | {r['G']} | {r['overlap']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {dense} | "
              f"{r['diff']:.1e} |")


if __name__ == "__main__":
    main()
