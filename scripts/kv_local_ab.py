"""A/B on the GPU: the KV-outer forward with the local blocks fused into the merge kernel
(SPARSA_KV_LOCAL=1, kv_outer.LOCAL_OVERRIDE rows x warps variants) against every pair through MAIN and
the plain merge (SPARSA_KV_LOCAL=0); same process, alternating, do_bench medians in ms (index build
included), outputs compared with the unfused forward (bitwise equality is not expected: another
summation order). Setup as benchmarks/sparse_attention.py.

    PYTHONPATH=. python3 scripts/kv_local_ab.py [--sizes 8192,65536] [--groups 1,4,8] [--local "64x4;64x8"]
"""
import argparse
import json
import os

import torch

from benchmarks.sparse_attention import bench, sparse_calls
from sparsa.ops.sparse_attn import kv_outer as kv_mod


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,4,8")
    p.add_argument("--local", default="", help="fused-merge variants ROWSxWARPS separated by ';' (default config first)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    args = p.parse_args()
    variants = [None] + [tuple(int(x) for x in v.split("x")) for v in args.local.split(";") if v.strip()]
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, _ = sparse_calls(n, group, "kv_outer")

            ref = None
            for rnd in range(2):
                for setting in ["0"] + [("1", cfg) for cfg in variants]:
                    fused = setting != "0"
                    os.environ["SPARSA_KV_LOCAL"] = "1" if fused else "0"
                    kv_mod.LOCAL_OVERRIDE = setting[1] if fused else None
                    out = fwd()
                    ref = out if ref is None else ref
                    row = {"N": n, "G": group, "round": rnd, "local": setting[1] if fused else "off",
                           "fwd_ms": bench(fwd), "diff_vs_unfused": rel(out, ref)}
                    if args.backward:
                        row["fwdbwd_ms"] = bench(fwd_bwd)
                    print(json.dumps(row), flush=True)
            os.environ.pop("SPARSA_KV_LOCAL")
            kv_mod.LOCAL_OVERRIDE = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
