"""GPU: the loop orders on selections with locality (`pooled_selection`) at the benchmark's shapes.

    PYTHONPATH=. python3 scripts/locality_bench.py [--ns 16384,65536] [--gs 1,4,16] [--pools 0,20,40]

Setup as benchmarks/sparse_attention.py (Hq = 32, head dim 128, block 64, top-16, bf16). Pool 0 is the
benchmark's `random_selection`; pool P gives the tokens of each 64-token tile their 13 free blocks from one
pool of P past blocks (real `select_blocks` selections at block 64 have 21-25 distinct blocks per 64-token
tile, benchmarks/results/real_selection_locality_cpu.md). For each (N, G, pool): the mean distinct blocks
per q_tile program tile, do_bench medians (ms) of the forward with each order and of forward+backward with the
automatic order and with q_tile, dense causal SDPA, and the largest relative difference between orders.
"""

import argparse
import json
import os

import torch

import sparsa
import benchmarks.sparse_attention as sa
from sparsa.ops.sparse_attn import q_tile as qt_mod
from sparsa.ops.sparse_attn.index import doc_meta, pooled_selection, random_selection


def tile_union(idx, tokens):
    """Mean distinct selected blocks per (tile of `tokens` consecutive tokens, KV head)."""
    n, hkv = idx.shape[1], idx.shape[2]
    pad = -n % tokens
    x = torch.nn.functional.pad(idx[0].long(), (0, 0, 0, 0, 0, pad), value=-1)  # [n + pad, Hkv, K]
    x = x.view(-1, tokens, hkv, idx.shape[3]).permute(0, 2, 1, 3).reshape(x.shape[0] // tokens * hkv, -1)  # [tiles * Hkv, T * K]
    x = torch.sort(x, dim=-1).values
    new = torch.ones_like(x, dtype=torch.bool)
    new[:, 1:] = x[:, 1:] != x[:, :-1]
    return ((new & (x >= 0)).sum(-1).float().mean()).item()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fwd_bwd_ms(q, k, v, idx, order):
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)

    def run():
        sparsa.sparse_attention(qr, kr, vr, idx, block_size=sa.BS, loop_order=order).backward(do)

    return sa.bench(run, grad_to_none=[qr, kr, vr])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ns", default="16384,65536")
    p.add_argument("--gs", default="1,4,16")
    p.add_argument("--pools", default="0,20,40", help="0 = random_selection")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--walk", action="store_true", help="also time the single-pass merge q_tile forward")
    p.add_argument("--tiles", default="", help="union-list forward variants ROWSxWARPS, e.g. 64x8,128x8")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        dense_fwd, dense_fb = sa.time_dense(n)
        for group in (int(x) for x in args.gs.split(",")):
            q, k, v, _ = sa.make(n, group)
            hkv, bs, topk = k.shape[2], sa.BS, sa.TOPK
            _, tile_tokens, _ = qt_mod.tile_config(group, q.shape[-1])
            for pool in (int(x) for x in args.pools.split(",")):
                sel_gen = torch.Generator().manual_seed(pool)
                if pool == 0:
                    idx = random_selection(1, n, hkv, topk, bs, generator=sel_gen, device=q.device)
                else:
                    idx = pooled_selection(n, hkv, topk, bs, pool, generator=sel_gen, device=q.device)
                row = {"N": n, "G": group, "pool": pool, "tile_tokens": tile_tokens,
                       "tile_union": round(tile_union(idx, tile_tokens), 2), "dense_fwd": dense_fwd,
                       "dense_fwd_bwd": dense_fb}
                outs = {}
                for order in ("kv_outer", "q_tile") + (("q_outer",) if group >= 8 else ()):
                    outs[order] = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order=order)
                    row[f"fwd_{order}"] = sa.bench(
                        lambda order=order, idx=idx: sparsa.sparse_attention(q, k, v, idx, block_size=bs,
                                                                             loop_order=order)
                    )
                if args.walk:  # the single-pass merge forward against the union-list one (the default)
                    qt_mod.UNION_LIST = False
                    row["fwd_q_tile_walk"] = sa.bench(
                        lambda idx=idx: sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="q_tile")
                    )
                    qt_mod.UNION_LIST = True
                for spec in filter(None, args.tiles.split(",")):  # union-list forward launch variants
                    rows_target, warps = (int(x) for x in spec.split("x"))
                    saved = qt_mod.TILE_ROWS, qt_mod.LIST_WARPS
                    qt_mod.TILE_ROWS, qt_mod.LIST_WARPS = rows_target, warps
                    row[f"fwd_q_tile_{spec}"] = sa.bench(
                        lambda idx=idx: sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="q_tile")
                    )
                    qt_mod.TILE_ROWS, qt_mod.LIST_WARPS = saved
                flat = torch.sort(idx.view(n, hkv, topk), dim=-1).values.contiguous()
                meta = doc_meta(1, n, None, bs, q.device)
                row["union_ms"] = sa.bench(lambda flat=flat, meta=meta: qt_mod.tile_union(flat, meta, bs, tile_tokens))
                row["waste"] = qt_mod.union_waste(flat, meta, bs, tile_tokens)
                row["waste_sampled"] = qt_mod.union_waste(flat, meta, bs, tile_tokens, 16)
                row["waste_sampled_ms"] = sa.bench(
                    lambda flat=flat, meta=meta: qt_mod.union_waste(flat, meta, bs, tile_tokens, 16)
                )
                row["max_rel_diff"] = max(rel(o, outs["kv_outer"]) for o in outs.values())
                if not args.no_backward:
                    row["fwd_bwd_auto"] = fwd_bwd_ms(q, k, v, idx, None)
                    row["fwd_bwd_q_tile"] = fwd_bwd_ms(q, k, v, idx, "q_tile")
                    os.environ["SPARSA_Q_TILE_BACKWARD"] = "kv_outer"
                    row["fwd_bwd_q_tile_kv"] = fwd_bwd_ms(q, k, v, idx, "q_tile")
                    del os.environ["SPARSA_Q_TILE_BACKWARD"]
                print(json.dumps(row), flush=True)
                rows.append(row)
                del idx, outs
                torch.cuda.empty_cache()
    print("N G pool union waste | fwd kv q_tile (q_outer) walk union | fwd+bwd auto q_tile q_tile+kv | dense fwd fwd+bwd")
    nan = float("nan")
    for r in rows:
        print(
            f"{r['N']} {r['G']} {r['pool']} {r['tile_union']} {r['waste']:.2f} | {r['fwd_kv_outer']:.2f} {r['fwd_q_tile']:.2f}"
            f" {r.get('fwd_q_outer', nan):.2f} {r.get('fwd_q_tile_walk', nan):.2f} {r['union_ms']:.2f}"
            f" | {r.get('fwd_bwd_auto', nan):.2f} {r.get('fwd_bwd_q_tile', nan):.2f} {r.get('fwd_bwd_q_tile_kv', nan):.2f}"
            f" | {r['dense_fwd']:.2f} {r['dense_fwd_bwd']:.2f}"
        )


if __name__ == "__main__":
    main()
