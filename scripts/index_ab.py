"""A/B on the GPU: sparse attention with the Triton index kernels (sparsa/ops/sparse_attn/index.py) against
the former pure-PyTorch index (the reference copies in tests/ops/test_pair_index.py), same process,
alternating, do_bench medians in ms (index build included). Setup as benchmarks/sparse_attention.py.

    PYTHONPATH=. python3 scripts/index_ab.py [--sizes 65536] [--groups 1,4]
"""
import argparse
import json

import torch

import sparsa
from benchmarks.sparse_attention import BS, bench, make
from sparsa.ops.sparse_attn import backward as bwd_mod
from sparsa.ops.sparse_attn import kv_outer as kv_mod
from sparsa.ops.sparse_attn import triton_ops
from tests.ops import test_pair_index as ref_mod

NEW = (triton_ops.build_pair_index, kv_mod.work_list, bwd_mod.work_list, bwd_mod.group_split_info)
OLD = (ref_mod._reference_build_pair_index, lambda i, p, with_slots=False: ref_mod._reference_work_list(i, p, with_slots),
       lambda i, p, with_slots=False: ref_mod._reference_work_list(i, p, with_slots), ref_mod._reference_group_split_info)


def use(fns):
    triton_ops.build_pair_index, kv_mod.work_list, bwd_mod.work_list, bwd_mod.group_split_info = fns


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="65536")
    p.add_argument("--groups", default="1,4")
    args = p.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            q, k, v, idx = make(n, group)
            qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
            do = torch.randn_like(q)
            fwd = lambda: sparsa.sparse_attention(q, k, v, idx, block_size=BS, loop_order="kv_outer")

            def fwd_bwd():
                qr.grad = kr.grad = vr.grad = None
                sparsa.sparse_attention(qr, kr, vr, idx, block_size=BS, loop_order="kv_outer").backward(do)

            for rnd in range(2):
                for name, fns in (("triton_index", NEW), ("torch_index", OLD)):
                    use(fns)
                    row = {"N": n, "G": group, "index": name, "round": rnd, "fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwd_bwd)}
                    print(json.dumps(row), flush=True)
            use(NEW)
            del q, k, v, idx, qr, kr, vr, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
