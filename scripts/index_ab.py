"""A/B on the GPU: sparse attention (KV-outer) with the pair index built by PyTorch ops or by the Triton
kernels (SPARSA_PAIR_INDEX=torch|triton, sparsa/ops/sparse_attn/index.py), same process, alternating,
do_bench medians in ms (index build included), outputs compared. Setup as benchmarks/sparse_attention.py.

    PYTHONPATH=. python3 scripts/index_ab.py [--sizes 65536] [--groups 1,4]
"""
import argparse
import json
import os

import torch

from benchmarks.sparse_attention import bench, sparse_calls
from sparsa.ops.sparse_attn.index import PAIR_INDEX_BACKENDS


def use(name):
    os.environ["SPARSA_PAIR_INDEX"] = name


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="65536")
    p.add_argument("--groups", default="1,4")
    args = p.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, _ = sparse_calls(n, group, "kv_outer")

            outs = {}
            for rnd in range(2):
                for name in PAIR_INDEX_BACKENDS:
                    use(name)
                    outs[name] = fwd()
                    row = {"N": n, "G": group, "index": name, "round": rnd, "fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwd_bwd)}
                    print(json.dumps(row), flush=True)
            a, b = (outs[name] for name in PAIR_INDEX_BACKENDS)
            print(json.dumps({"N": n, "G": group, "outputs_equal": bool(torch.equal(a, b))}), flush=True)
            os.environ.pop("SPARSA_PAIR_INDEX", None)  # back to the default
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
