"""Benchmark of sparsa.sparse_attention (Triton) against dense causal SDPA and the reference.

    PYTHONPATH=. python benchmarks/sparse_attention.py [--quick] [--tune] [--pool P] [--out results.json]

Setup (as ../shared/ANCHORS.md): batch 1, Hq = 32, G = Hq / Hkv, head dim 128, block 64, top-16
(block 0, the current and the previous block forced, 13 random past blocks), bf16. With --pool P the 13 free
blocks of every 64-token tile come from one pool of P past blocks (`pooled_selection`; P = 20 has the tile
unions of real SmolLM2 selections). Times are medians of triton.testing.do_bench in ms (over about 7 calls
or more); the sparse times include the index building (every call builds its block -> token index). "fwd (auto)"
and fwd+bwd are the library's default (loop_order=None: the size rule and the locality check), named by the order
it takes. TFLOP/s count useful FLOPs only: 4 * D per
(query head, visible selected key) forward, 3.5x that forward+backward.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparsa  # noqa: E402
from benchmarks.issue_targets import check_targets, format_targets  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402
from sparsa.checkpoint import write_json  # noqa: E402
from sparsa.ops.sparse_attn import backward as bwd_mod
from sparsa.ops.sparse_attn import kv_outer as kv_mod
from sparsa.ops.sparse_attn import naive
from sparsa.ops.sparse_attn import locality, triton_ops
from sparsa.ops.sparse_attn.index import (
    build_pair_index, doc_meta, pair_index_backend, pooled_selection, random_selection, valid_slots,
)
from sparsa.ops.sparse_attn.q_tile import tile_config
from sparsa.ops.sparse_attn.device_tuning import device_tuning
from sparsa.ops.sparse_attn.triton_ops import _esize, _head_slices

HQ, D, BS, TOPK = 32, 128, 64, 16


def bench(fn, grad_to_none=None):
    """Median ms of fn over a do_bench window of max(60 ms, about 7 calls) (benchmarks/timing.py)."""
    return median_ms(fn, warmup=10, rep=60, grad_to_none=grad_to_none)


def matmul_rate():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def memory_rate():
    """Measured device memory rate in GB/s (read + write) of a 2 GiB copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


# KV-outer traffic model per (pair, query head), bf16 (docs/kernels/sparse_attention.md, "Every target
# against its traffic floor"): forward = gathered Q row + partial written + partial read back; the local
# pairs of SPARSA_KV_LOCAL=1 move nothing but one contiguous row per (token, head); backward = gathered Q
# and dO rows, lse and delta, dQ partial written and read back.
FWD_PAIR_BYTES, BWD_PAIR_BYTES = 3 * D * 2, 4 * D * 2 + 8


def traffic_floor_gb(idx, n_tokens, group, split=False):
    """(forward GB, forward GB with the local blocks fused (split: in their own kernel), backward GB) of the KV-outer
    model."""
    meta = doc_meta(1, n_tokens, None, BS, idx.device)
    flat = idx.view(n_tokens, idx.shape[2], -1)
    valid = valid_slots(flat, meta, BS)
    own = (torch.arange(n_tokens, device=idx.device) // BS)[:, None, None]
    local = valid & ((flat == 0) | (flat == own) | (flat == own - 1))
    pairs, local_pairs = int(valid.sum()) * group, int(local.sum()) * group
    fwd = pairs * FWD_PAIR_BYTES
    # fused: one contiguous row per (token, head); split (kv_local.py): that row read, o written and read by the merge
    fwd_local = (pairs - local_pairs) * FWD_PAIR_BYTES + n_tokens * HQ * D * 2 * (3 if split else 1)
    return fwd / 1e9, fwd_local / 1e9, pairs * BWD_PAIR_BYTES / 1e9


def visible_keys(idx, n_tokens):
    meta = doc_meta(1, n_tokens, None, BS, idx.device)
    flat = idx.view(n_tokens, idx.shape[2], -1)
    valid = valid_slots(flat, meta, BS)
    tloc = torch.arange(n_tokens, device=idx.device)[:, None, None]
    cnt = torch.clamp(tloc - flat.long() * BS + 1, max=BS)
    return int(torch.where(valid, cnt, torch.zeros_like(cnt)).sum())


def make(n, group, seed=0, pool=0):
    """bf16 q, k, v and a selection [1, n, Hkv, TOPK]: random (pool 0) or pooled from P blocks per tile."""
    hkv = HQ // group
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, n, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, n, hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, n, hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    gen = torch.Generator().manual_seed(seed)
    if pool:
        idx = pooled_selection(n, hkv, TOPK, BS, pool, generator=gen, device="cuda")
    else:
        idx = random_selection(1, n, hkv, TOPK, BS, generator=gen, device="cuda")
    return q, k, v, idx


def taken_order(q, k, v, idx):
    """The loop order that sparse_attention's default (loop_order=None) takes on these inputs now: after the
    timed calls the locality monitor has counted them, so this is the order that was timed."""
    with mock.patch.object(triton_ops._SparseAttention, "apply", wraps=triton_ops._SparseAttention.apply) as apply:
        sparsa.sparse_attention(q, k, v, idx, block_size=BS)
    return apply.call_args.args[-1]


def sampled_waste(q, k, idx):
    """The query-tile order's waste on the sample of tiles that the locality monitor counts (for the table)."""
    n, hkv = q.shape[1], k.shape[2]
    tokens = tile_config(HQ // hkv, D)[1]
    flat = idx.view(n, hkv, -1).contiguous()
    meta = doc_meta(1, n, None, BS, q.device)
    return locality.selection_waste(flat, meta, tokens, locality.default_sample_programs(tokens, TOPK))


def sparse_calls(n, group, loop_order=None, pool=0):
    """(fwd, fwd_bwd, leaves) on the benchmark's inputs at (N, G) (pooled selections with pool P), for the probes
    in scripts/: fwd returns o; fwd_bwd clears the leaves' grads and runs forward and backward (leaves = q, k, v
    with requires_grad)."""
    q, k, v, idx = make(n, group, pool=pool)
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)

    def fwd():
        return sparsa.sparse_attention(q, k, v, idx, block_size=BS, loop_order=loop_order)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        sparsa.sparse_attention(*leaves, idx, block_size=BS, loop_order=loop_order).backward(do)

    return fwd, fwd_bwd, leaves


def time_sparse(q, k, v, idx, order, backward):
    if not backward:
        return bench(lambda: sparsa.sparse_attention(q, k, v, idx, block_size=BS, loop_order=order))
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)

    def fb():
        sparsa.sparse_attention(qr, kr, vr, idx, block_size=BS, loop_order=order).backward(do)

    return bench(fb, grad_to_none=[qr, kr, vr])


def time_index(q, k, v, idx):
    n = q.shape[1]
    group = HQ // k.shape[2]
    meta = doc_meta(1, n, None, BS, q.device)
    flat = idx.view(n, k.shape[2], -1).contiguous()

    def build():
        for h0, hs in _head_slices(k.shape[2], n, TOPK, group, D, D, _esize(q.dtype)):
            build_pair_index(flat, meta, BS, h0, hs)

    return bench(build)


def time_dense(n):
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    # PyTorch's own backend choice (cuDNN on the H100 when available, else flash)
    fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)
    fb = bench(
        lambda: F.scaled_dot_product_attention(qr, kr, vr, is_causal=True).backward(do), grad_to_none=[qr, kr, vr]
    )
    return fwd, fb


def time_reference(q, k, v, idx):
    try:
        with torch.no_grad():
            ms = bench(lambda: naive.sparse_attention(q, k, v, idx, block_size=BS, scale=D**-0.5))
    except torch.OutOfMemoryError:
        ms = None
    torch.cuda.empty_cache()
    return ms


def auto_gaps(rows: list[dict], tolerance: float = 0.05) -> list[dict]:
    """Rows whose automatic forward took more than (1 + tolerance) x the same order forced (fwd_<order>): the choice
    was right but its call costs more than the kernels it runs (session 32: 8K G = 2-8, 8-11%)."""
    gaps = []
    for r in rows:
        forced = r.get(f"fwd_{r.get('auto')}")
        if forced and r["fwd"] > (1 + tolerance) * forced:
            gaps.append({"N": r["N"], "G": r["G"], "order": r["auto"], "auto_ms": r["fwd"], "forced_ms": forced})
    return gaps


def tune(rows):
    """Kernel variants at 64K (and a profile of one KV-outer forward+backward at G = 4)."""
    from sparsa.ops.sparse_attn import q_outer as q_mod

    n = 65536
    for group in (16, 8):
        q, k, v, idx = make(n, group, seed=1)
        print(f"\n## q_outer forward variants at N=64K G={group} (ms)", flush=True)
        for cfg in ((False, 4, 2), (True, 4, 2), (True, 4, 3), (True, 8, 3), (False, 8, 2)):
            q_mod.Q_OUTER_OVERRIDE = cfg
            try:
                ms = time_sparse(q, k, v, idx, "q_outer", False)
            except Exception as exc:  # noqa: BLE001 - report the variant, keep tuning
                ms = float("nan")
                print("  error", cfg, exc)
            print(f"  branchless,warps,stages={cfg}: {ms:.3f}", flush=True)
            rows.append({"tune": "q_fwd", "G": group, "cfg": cfg, "ms": ms})
        q_mod.Q_OUTER_OVERRIDE = None
        del q, k, v, idx
    q, k, v, idx = make(n, 4, seed=1)
    print("\n## kv_outer variants at N=64K G=4 (ms)", flush=True)
    for cfg in ((64, 4), (128, 4), (128, 8)):
        kv_mod.FWD_OVERRIDE = cfg
        ms = time_sparse(q, k, v, idx, "kv_outer", False)
        print(f"  kv fwd BLOCK_M,warps={cfg}: {ms:.3f}", flush=True)
        rows.append({"tune": "kv_fwd", "cfg": cfg, "ms": ms})
    kv_mod.FWD_OVERRIDE = None
    for cfg in ((32, 4), (64, 4), (128, 8)):
        bwd_mod.BWD_OVERRIDE = cfg
        ms = time_sparse(q, k, v, idx, "kv_outer", True)
        print(f"  kv fwd+bwd bwd BLOCK_M,warps={cfg}: {ms:.3f}", flush=True)
        rows.append({"tune": "kv_fwdbwd", "cfg": cfg, "ms": ms})
    bwd_mod.BWD_OVERRIDE = None
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(q)
    for _ in range(2):
        sparsa.sparse_attention(qr, kr, vr, idx, block_size=BS, loop_order="kv_outer").backward(do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sparsa.sparse_attention(qr, kr, vr, idx, block_size=BS, loop_order="kv_outer").backward(do)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N in {8K, 64K} x G in {1, 4, 16}")
    ap.add_argument("--tune", action="store_true", help="kernel variants and a profile at 64K, G=4")
    ap.add_argument("--ns", default=None, help="comma-separated N list (overrides)")
    ap.add_argument("--gs", default=None, help="comma-separated G list (overrides)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--q-tile", action="store_true", help="also time the q_tile forward (slow on random selections)")
    ap.add_argument("--pool", type=int, default=0, help="pooled selections from P blocks per 64-token tile (0: random)")
    args = ap.parse_args()
    if args.out and os.path.isdir(args.out):  # found before any timing, not when the first row is written
        raise ValueError(f"--out: {args.out} is a directory; give the JSON file to write")
    ns = [8192, 65536] if args.quick else [8192, 16384, 32768, 65536, 131072]
    gs = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16]
    if args.ns:
        ns = [int(x) for x in args.ns.split(",")]
    if args.gs:
        gs = [int(x) for x in args.gs.split(",")]
    info = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        # kernel settings read from the environment (sparsa/ops/sparse_attn/index.py, kv_outer.py)
        "SPARSA_PAIR_INDEX": pair_index_backend(),
        "SPARSA_KV_LOCAL": os.environ.get("SPARSA_KV_LOCAL", "0"),
        "SPARSA_KV_LOCAL_SPLIT": os.environ.get("SPARSA_KV_LOCAL_SPLIT", "0"),
        "SPARSA_LOCALITY_CHECK": "1" if locality.check_enabled() else "0",
        "selection": f"pooled, P = {args.pool}" if args.pool else "random",
        # every SPARSA_* switch set for this run, and the automatic order's device tuning (device_tuning.py)
        "environment": {name: value for name, value in sorted(os.environ.items()) if name.startswith("SPARSA_")},
        "device_tuning": device_tuning(torch.device("cuda")).name,
    }
    rate = matmul_rate()
    info["bf16_matmul_tflops"] = rate
    info["memory_gbps"] = mem_rate = memory_rate()
    print(info, flush=True)
    rows = []
    if args.tune:
        tune(rows)
    for n in ns:
        dense_fwd, dense_fb = time_dense(n)
        dense_flops = 4 * HQ * D * n * (n + 1) / 2
        print(
            f"\nN={n}: dense SDPA fwd {dense_fwd:.3f} ms ({dense_flops / dense_fwd / 1e9:.0f} TFLOP/s), fwd+bwd {dense_fb:.3f} ms",
            flush=True,
        )
        for group in gs:
            q, k, v, idx = make(n, group, pool=args.pool)
            keys = visible_keys(idx, n)
            flops = 4 * D * group * keys
            row = {"N": n, "G": group, "dense_fwd": dense_fwd, "dense_fwdbwd": dense_fb, "gflop_fwd": flops / 1e9}
            row["index"] = time_index(q, k, v, idx)
            for order in ("q_outer", "kv_outer", "q_tile") if args.q_tile or args.pool else ("q_outer", "kv_outer"):
                row[f"fwd_{order}"] = time_sparse(q, k, v, idx, order, False)
            locality.MONITOR.reset()  # the previous row's counts were of another selection
            row["fwd"] = time_sparse(q, k, v, idx, None, False)
            row["fwdbwd"] = time_sparse(q, k, v, idx, None, True)
            row["auto"], row["waste"] = taken_order(q, k, v, idx), sampled_waste(q, k, idx)
            row["tflops_fwd"] = flops / row["fwd"] / 1e9
            row["tflops_fwdbwd"] = 3.5 * flops / row["fwdbwd"] / 1e9
            split = info["SPARSA_KV_LOCAL_SPLIT"] == "1"  # (forward without gradients only)
            fwd_gb, fwd_local_gb, bwd_gb = traffic_floor_gb(idx, n, group, split)
            local = info["SPARSA_KV_LOCAL"] == "1"
            row["floor_fwd_ms"] = (fwd_local_gb if local or split else fwd_gb) / mem_rate * 1e3
            row["floor_fwdbwd_ms"] = ((fwd_local_gb if local else fwd_gb) + bwd_gb) / mem_rate * 1e3
            if n <= 8192:
                row["reference_fwd"] = time_reference(q, k, v, idx)
            rows.append(row)
            if args.out:  # written (atomically) after every row: a run cut short keeps what it measured
                write_json(args.out, {"info": info, "rows": rows})
            print(
                f"  G={group:2d} index {row['index']:.3f} | fwd q_outer {row['fwd_q_outer']:.3f} kv_outer {row['fwd_kv_outer']:.3f}"
                f"{' q_tile %.3f' % row['fwd_q_tile'] if 'fwd_q_tile' in row else ''}"
                f" -> auto {row['auto']} (waste {row['waste']:.2f}) {row['fwd']:.3f} ms ({row['tflops_fwd']:.0f} TFLOP/s) | fwd+bwd {row['fwdbwd']:.3f} ms"
                f" ({row['tflops_fwdbwd']:.0f} TFLOP/s) | ref fwd {row.get('reference_fwd')}",
                flush=True,
            )
            del q, k, v, idx
            torch.cuda.empty_cache()
    # issue 3's targets (anchors for random selections on the H100; benchmarks/issue_targets.py)
    targets = [] if args.pool else check_targets([r for r in rows if "N" in r], rate)
    print(
        f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16 matmul {rate:.0f} TFLOP/s, "
        f"memory {mem_rate:.0f} GB/s; floor = KV-outer traffic model at that memory rate"
    )
    print(
        "| N | G | index | fwd q_outer | fwd kv_outer | fwd (auto) | TFLOP/s | fwd+bwd | TFLOP/s | dense fwd | dense fwd+bwd | fwd speedup | fwd+bwd speedup | floor fwd / fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "N" not in r:
            continue
        print(
            f"| {r['N'] // 1024}K | {r['G']} | {r['index']:.2f} | {r['fwd_q_outer']:.2f} | {r['fwd_kv_outer']:.2f} | {r['fwd']:.2f} ({r['auto']}, waste {r['waste']:.2f}) |"
            f" {r['tflops_fwd']:.0f} | {r['fwdbwd']:.2f} | {r['tflops_fwdbwd']:.0f} | {r['dense_fwd']:.2f} | {r['dense_fwdbwd']:.2f} |"
            f" {r['dense_fwd'] / r['fwd']:.1f}x | {r['dense_fwdbwd'] / r['fwdbwd']:.1f}x |"
            f" {r['floor_fwd_ms']:.2f} / {r['floor_fwdbwd_ms']:.2f} |"
        )
    gaps = auto_gaps([r for r in rows if "N" in r])
    if gaps:
        print("\nautomatic forward slower than the same order forced by more than 5%: " + ", ".join(
            f"{g['N'] // 1024}K G={g['G']} {g['order']} {g['auto_ms']:.3f} vs {g['forced_ms']:.3f} ms" for g in gaps))
    if args.out:
        write_json(args.out, {"info": info, "rows": rows, "issue_targets": targets, "auto_gaps": gaps})
    if targets:
        print("\n" + format_targets(targets, info["gpu"]))


if __name__ == "__main__":
    main()
