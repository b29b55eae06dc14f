"""GPU: the three forward loop orders on real queries / keys with real `select_blocks` selections.

    python3 scripts/real_activations.py --tokens 4096 --out .carry/smollm2_qk.safetensors   # CPU, here
    PYTHONPATH=. python3 scripts/real_selection_bench.py .carry/smollm2_qk.safetensors        # GPU

SmolLM2-135M shapes (Hq = 9, Hkv = 3, G = 3, head dim 64), the recorded layers, block 16 and 64, top-16 with
block 0 and two local blocks forced, bf16, values random. For each: do_bench medians (ms) of the forward
with loop_order q_outer / kv_outer / q_tile (and q_tile at each --tile-rows) and of forward+backward (KV-outer backward) with the
automatic order and with q_tile, dense causal SDPA, and the same with `random_selection` at the same shape
(where adjacent tokens share only the forced blocks). Outputs of the orders are compared with each other.
"""
import argparse
import json

import torch
import torch.nn.functional as F

import sparsa
from benchmarks.sparse_attention import bench
from scripts.real_activations import load_qk
from sparsa.ops.sparse_attn import q_tile as qt_mod
from sparsa.ops.sparse_attn.index import random_selection

ORDERS = ("q_outer", "kv_outer", "q_tile")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fwd_bwd_ms(q, k, v, idx, bs, order):
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)

    def run():
        sparsa.sparse_attention(qr, kr, vr, idx, block_size=bs, loop_order=order).backward(do)

    return bench(run, grad_to_none=[qr, kr, vr])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("activations")
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--tile-rows", default="32,64,128", help="q_tile TILE_ROWS variants (rows per tile at head dim 128)")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for layer, (q, k) in load_qk(args.activations).items():
        q, k = q.cuda().to(torch.bfloat16)[None], k.cuda().to(torch.bfloat16)[None]
        v = torch.randn(k.shape, device="cuda", dtype=torch.bfloat16)
        n, hkv = q.shape[1], k.shape[2]
        qd, kd, vd = (x.transpose(1, 2).repeat_interleave(q.shape[2] // hkv if x is not q else 1, 1) for x in (q, k, v))
        dense = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True))
        for bs in (16, 64):
            real = sparsa.select_blocks(q, k, block_size=bs, topk=args.topk, init_blocks=1, local_blocks=2)
            rnd = random_selection(1, n, hkv, args.topk, bs, generator=torch.Generator().manual_seed(layer), device="cuda")
            for name, idx in (("select_blocks", real), ("random", rnd)):
                row = {"layer": layer, "block": bs, "selection": name, "N": n, "dense_fwd": dense}
                outs = {}
                for order in ORDERS:
                    outs[order] = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order=order)
                    row[f"fwd_{order}"] = bench(
                        lambda order=order: sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order=order)
                    )
                row["max_rel_diff"] = max(rel(outs[o], outs["kv_outer"]) for o in ORDERS)
                default_rows = qt_mod.TILE_ROWS
                for tile_rows in (int(x) for x in args.tile_rows.split(",")):
                    qt_mod.TILE_ROWS = tile_rows
                    row[f"fwd_q_tile_rows{tile_rows}"] = bench(
                        lambda: sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="q_tile")
                    )
                qt_mod.TILE_ROWS = default_rows
                row["fwdbwd_auto"] = fwd_bwd_ms(q, k, v, idx, bs, None)
                row["fwdbwd_q_tile"] = fwd_bwd_ms(q, k, v, idx, bs, "q_tile")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
