"""GPU: the loop orders on selections with locality (`pooled_selection`) at the benchmark's shapes.

    PYTHONPATH=. python3 scripts/locality_bench.py [--ns 8192,65536] [--gs 4,16,1] [--pools 20,40,0]

Setup as benchmarks/sparse_attention.py (Hq = 32, head dim 128, block 64, top-16, bf16). Pool 0 is the
benchmark's `random_selection`; pool P gives the tokens of each 64-token tile their 13 free blocks from one
pool of P past blocks (real `select_blocks` selections at block 64 have 21-25 distinct blocks per 64-token
tile, benchmarks/results/real_selection_locality_cpu.md). For each (N, G, pool): the query-tile order's waste
(locality.selection_waste over every tile, and over the sample the automatic order counts) and the time of one
count (check_ms; locality.LocalityMonitor enqueues one every CHECK_EVERY calls, without synchronisation);
do_bench medians (ms) of the forward with each order, with the automatic order with and without the locality
check (SPARSA_LOCALITY_CHECK=1 / 0; --auto-only: only those), and of forward+backward likewise (q_tile: with the
backward its rule picks; --own-backward also with q_tile's own); dense causal SDPA; the largest relative
difference between orders.
"""

import argparse
import contextlib
import json
import os

import torch

import sparsa
import benchmarks.sparse_attention as sa
from sparsa.ops.sparse_attn import locality
from sparsa.ops.sparse_attn import q_tile as qt_mod
from sparsa.ops.sparse_attn.index import doc_meta, pooled_selection, random_selection


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(q, k, v, idx, group, args):
    n, hkv, bs = q.shape[1], k.shape[2], sa.BS
    _, tokens, _ = qt_mod.tile_config(group, q.shape[-1])
    flat = idx.view(n, hkv, -1).contiguous()
    meta = doc_meta(1, n, None, bs, q.device)
    programs = locality.default_sample_programs(tokens, flat.shape[-1])
    row = {"tile_tokens": tokens, "waste": round(locality.selection_waste(flat, meta, tokens, 1 << 40), 3),
           "sample_waste": round(locality.selection_waste(flat, meta, tokens, programs), 3),
           "check_ms": sa.bench(lambda: locality._launch_count(flat, meta, tokens, programs))}
    outs = {}
    with env("SPARSA_LOCALITY_CHECK", "0"):
        outs["auto_nocheck"] = sparsa.sparse_attention(q, k, v, idx, block_size=bs)
        row["fwd_auto_nocheck"] = sa.time_sparse(q, k, v, idx, None, False)
    with env("SPARSA_LOCALITY_CHECK", "1"):
        locality.MONITOR.reset()  # the previous row's shape had other selections
        sparsa.sparse_attention(q, k, v, idx, block_size=bs)  # the count is enqueued here and read next call
        torch.cuda.synchronize()
        outs["auto"] = sparsa.sparse_attention(q, k, v, idx, block_size=bs)
        row["fwd_auto"] = sa.time_sparse(q, k, v, idx, None, False)
    for order in () if args.auto_only else ("kv_outer", "q_tile") + (("q_outer",) if group >= 8 else ()):
        outs[order] = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order=order)
        row[f"fwd_{order}"] = sa.time_sparse(q, k, v, idx, order, False)
    row["max_rel_diff"] = max(rel(o, outs["auto_nocheck"]) for o in outs.values())
    if args.walk:  # the single-pass merge forward against the union-list one (the default)
        qt_mod.UNION_LIST = False
        row["fwd_q_tile_walk"] = sa.time_sparse(q, k, v, idx, "q_tile", False)
        qt_mod.UNION_LIST = True
    for spec in filter(None, args.tiles.split(",")):  # union-list variants ROWSxWARPS[xSTAGES][+tma]
        saved = qt_mod.TILE_ROWS, qt_mod.LIST_WARPS, qt_mod.LIST_STAGES
        launch, tma = spec.removesuffix("+tma"), spec.endswith("+tma")
        rows, warps, *stages = (int(x) for x in launch.split("x"))
        qt_mod.TILE_ROWS, qt_mod.LIST_WARPS, qt_mod.LIST_STAGES = rows, warps, (stages or [None])[0]
        with env("SPARSA_Q_TILE_TMA", "1" if tma else "0"):
            out = sparsa.sparse_attention(q, k, v, idx, block_size=bs, loop_order="q_tile")
            row[f"fwd_q_tile_{spec}"] = sa.time_sparse(q, k, v, idx, "q_tile", False)
        row["max_rel_diff"] = max(row["max_rel_diff"], rel(out, outs["auto_nocheck"]))
        qt_mod.TILE_ROWS, qt_mod.LIST_WARPS, qt_mod.LIST_STAGES = saved
    sorted_idx = torch.sort(flat, dim=-1).values.contiguous()
    row["union_ms"] = sa.bench(lambda: qt_mod.tile_union(sorted_idx, meta, bs, tokens))
    if not args.no_backward:
        with env("SPARSA_LOCALITY_CHECK", "1"):
            row["fwd_bwd_auto"] = sa.time_sparse(q, k, v, idx, None, True)
        with env("SPARSA_LOCALITY_CHECK", "0"):
            row["fwd_bwd_auto_nocheck"] = sa.time_sparse(q, k, v, idx, None, True)
    if not args.no_backward and not args.auto_only:
        row["fwd_bwd_q_tile"] = sa.time_sparse(q, k, v, idx, "q_tile", True)
        if args.own_backward:
            with env("SPARSA_Q_TILE_BACKWARD", "q_tile"):
                row["fwd_bwd_q_tile_own"] = sa.time_sparse(q, k, v, idx, "q_tile", True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ns", default="8192,65536")
    p.add_argument("--gs", default="4,16,1")
    p.add_argument("--pools", default="20,40,0", help="0 = random_selection")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--auto-only", action="store_true", help="only the automatic order, with and without the check")
    p.add_argument("--own-backward", action="store_true", help="also forward+backward with q_tile's own backward")
    p.add_argument("--walk", action="store_true", help="also time the single-pass merge q_tile forward")
    p.add_argument("--tiles", default="", help="union-list forward variants ROWSxWARPS[xSTAGES][+tma] (+tma: K / V by TMA), e.g. 64x4x2,64x4x2+tma")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        dense_fwd, dense_fb = sa.time_dense(n)
        for group in (int(x) for x in args.gs.split(",")):
            q, k, v, _ = sa.make(n, group)
            hkv = k.shape[2]
            for pool in (int(x) for x in args.pools.split(",")):
                gen = torch.Generator().manual_seed(pool)
                if pool == 0:
                    idx = random_selection(1, n, hkv, sa.TOPK, sa.BS, generator=gen, device=q.device)
                else:
                    idx = pooled_selection(n, hkv, sa.TOPK, sa.BS, pool, generator=gen, device=q.device)
                row = {"N": n, "G": group, "pool": pool, **measure(q, k, v, idx, group, args),
                       "dense_fwd": dense_fwd, "dense_fwd_bwd": dense_fb}
                print(json.dumps(row), flush=True)
                rows.append(row)
                del idx
                torch.cuda.empty_cache()
    nan = float("nan")
    print("N G pool waste check | fwd kv q_tile q_outer auto auto_nocheck | fwd+bwd auto auto_nocheck q_tile q_tile_own"
          " | dense fwd fwd+bwd")
    for r in rows:
        print(
            f"{r['N']} {r['G']} {r['pool']} {r['waste']:.2f} {r['check_ms']:.3f} | {r.get('fwd_kv_outer', nan):.2f}"
            f" {r.get('fwd_q_tile', nan):.2f} {r.get('fwd_q_outer', nan):.2f} {r['fwd_auto']:.2f} {r['fwd_auto_nocheck']:.2f}"
            f" | {r.get('fwd_bwd_auto', nan):.2f} {r.get('fwd_bwd_auto_nocheck', nan):.2f}"
            f" {r.get('fwd_bwd_q_tile', nan):.2f} {r.get('fwd_bwd_q_tile_own', nan):.2f}"
            f" | {r['dense_fwd']:.2f} {r['dense_fwd_bwd']:.2f}"
            + "".join(f" | q_tile {key[len('fwd_q_tile_'):]} {ms:.2f}" for key, ms in r.items()
                      if key.startswith("fwd_q_tile_") and key != "fwd_q_tile_walk")
        )


if __name__ == "__main__":
    main()
