"""The attention of one sparse layer, forward + backward, against dense causal SDPA (H100).

Variants (projections excluded; q, k, v given, bf16, batch 1, Hq query heads, G = Hq / Hkv):
  dense   F.scaled_dot_product_attention(causal) on [B, Hq, N, D] (flash backend; MHA layout: dense
          attention costs the same for any G)
  ssa     select_blocks (SSA rule, block 64, top-16 incl. block 0 + 2 local) + sparsa.sparse_attention
  nsa     NSABranches: learnable compression (l=32, d=16) + compressed attention, NSA-scored selection
          (from the compressed branch's LSE), selected attention, window 512, per-head sigmoid gates
          (gate_proj: hidden Hq*D -> 3*Hq; its matmul is included)
Reported: median ms of `triton.testing.do_bench` for forward+backward (torch.autograd.grad of q, k, v),
the selection alone (forward only, no gradient), its share of the layer, the selection's peak extra
memory, and speedups over dense. If `sparsa.sparse_attention` has no Triton kernel yet, the layer
columns are skipped and only the selection / NSA branch parts are timed.

  PYTHONPATH=. python3 benchmarks/sparse_layer.py --out benchmarks/results/sparse_layer_h100.md
  --check   first compares the Triton ops with the references in bf16 at small sizes
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import median_ms  # noqa: E402
from sparsa.checkpoint import write_json, write_text  # noqa: E402
from sparsa import select_blocks, sparse_attention  # noqa: E402
from sparsa.layers.nsa import NSABranches  # noqa: E402
from sparsa.ops.compress import compressed_attention, mean_pool  # noqa: E402
from sparsa.ops.compress import naive as compress_naive  # noqa: E402
from sparsa.ops.select import naive as select_naive  # noqa: E402
from sparsa.ops.window import naive as window_naive  # noqa: E402
from sparsa.ops.window import window_attention  # noqa: E402

BLOCK, TOPK, INIT, LOCAL = 64, 16, 1, 2
LENGTH, STRIDE, WINDOW = 32, 16, 512


def has_sparse_kernel() -> bool:
    try:
        from sparsa.ops.sparse_attn import triton_ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"sparse_attention Triton kernel unavailable: {exc!r}")
        return False
    return True


def bench(fn) -> float:
    """Median ms of fn over a do_bench window of max(40 ms, about 7 calls) (benchmarks/timing.py)."""
    return median_ms(fn, warmup=10, rep=40)


def guarded(fn, what):
    """bench(fn), or None (printed) when the selected-attention kernel fails."""
    try:
        return bench(fn)
    except Exception as exc:  # noqa: BLE001
        print(f"{what} failed: {exc!r}"[:400])
        torch.cuda.empty_cache()
        return None


def inputs(n, n_heads, group, dim, device="cuda", dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(n + group)
    n_kv = n_heads // group
    q = torch.randn(1, n, n_heads, dim, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    k = torch.randn(1, n, n_kv, dim, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    v = torch.randn(1, n, n_kv, dim, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    dout = torch.randn(1, n, n_heads, dim, device=device, dtype=dtype, generator=gen)
    return q, k, v, dout


def ssa_select(q, k):
    return select_blocks(q.detach(), k.detach(), block_size=BLOCK, topk=TOPK, init_blocks=INIT, local_blocks=LOCAL)


def peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def run_config(n, group, n_heads, dim, sparse_ok, rows):
    q, k, v, dout = inputs(n, n_heads, group, dim)
    row = dict(N=n, G=group, Hq=n_heads, Hkv=n_heads // group, D=dim)

    # --- SSA
    row["ssa_select_ms"] = bench(lambda: ssa_select(q, k))
    row["ssa_select_extra_mib"] = peak_extra_mib(lambda: ssa_select(q, k))
    if sparse_ok:
        def ssa_layer():
            idx = ssa_select(q, k)
            o = sparse_attention(q, k, v, idx, block_size=BLOCK)
            return torch.autograd.grad(o, (q, k, v), dout)

        row["ssa_ms"] = guarded(ssa_layer, "ssa layer")

    # --- NSA
    module = NSABranches(n_heads * dim, n_heads, n_heads // group, dim, block_size=BLOCK, topk=TOPK,
                         init_blocks=INIT, local_blocks=LOCAL, compress_length=LENGTH, compress_stride=STRIDE,
                         window=WINDOW).to("cuda", torch.bfloat16)
    x = torch.randn(1, n, n_heads * dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        kc, vc = module.compressed_kv(k, v, rotate=True)
        _, lse = compressed_attention(q, kc, vc, length=LENGTH, stride=STRIDE, return_lse=True)

    def nsa_select():
        return select_blocks(q.detach(), k.detach(), block_size=BLOCK, topk=TOPK, init_blocks=INIT,
                             local_blocks=LOCAL, score="nsa", compress_length=LENGTH, compress_stride=STRIDE,
                             compressed_keys=kc, compressed_lse=lse)

    row["nsa_select_ms"] = bench(nsa_select)

    def nsa_compressed():
        kc_, vc_ = module.compressed_kv(k, v, rotate=True)
        o = compressed_attention(q, kc_, vc_, length=LENGTH, stride=STRIDE)
        return torch.autograd.grad(o, (q, k, v), dout)

    def nsa_window():
        o = window_attention(q, k, v, window=WINDOW)
        return torch.autograd.grad(o, (q, k, v), dout)

    row["nsa_cmp_ms"] = bench(nsa_compressed)
    row["nsa_win_ms"] = bench(nsa_window)
    if sparse_ok:
        def nsa_layer():
            o = module(x, q, k, v, k_raw=k)
            return torch.autograd.grad(o, (q, k, v), dout)

        row["nsa_ms"] = guarded(nsa_layer, "nsa layer")
    rows.append(row)
    return row  # the inputs are freed on return (the caller empties the CUDA cache)


SELECT_CANDIDATES = [
    {"rows": 128, "nsub": 1, "tl_sort": False, "warps": None},
    {"rows": 128, "nsub": 4, "tl_sort": False, "warps": 8},
    {"rows": 64, "nsub": 4, "tl_sort": False, "warps": 4},
]


def tune(n, groups, n_heads, dim):
    """Pick the selection kernel config per G (SSA + NSA selection time at N = n) and report the
    compressed-branch time with and without the dK/dV query split. Returns a log dict."""
    from sparsa.ops.compress import triton_attention
    from sparsa.ops.select import triton_select

    log = {}
    for group in groups:
        q, k, v, dout = inputs(n, n_heads, group, dim)
        kc = mean_pool(k.detach(), length=LENGTH, stride=STRIDE)
        with torch.no_grad():
            _, lse = compressed_attention(q, kc, kc, length=LENGTH, stride=STRIDE, return_lse=True)
        times = []
        for cfg in SELECT_CANDIDATES:
            triton_select.GPU_CONFIG_BY_GROUP[1 << (group - 1).bit_length()] = cfg
            try:
                t_ssa = bench(lambda: ssa_select(q, k))
                t_nsa = bench(lambda: select_blocks(
                    q.detach(), k.detach(), block_size=BLOCK, topk=TOPK, init_blocks=INIT, local_blocks=LOCAL,
                    score="nsa", compress_length=LENGTH, compress_stride=STRIDE, compressed_keys=kc,
                    compressed_lse=lse))
            except Exception as exc:  # noqa: BLE001
                print(f"select config {cfg} failed: {exc!r}"[:300])
                continue
            times.append((t_ssa + t_nsa, t_ssa, t_nsa, cfg))
            print(f"tune G={group} {cfg}: ssa select {t_ssa:.2f} ms, nsa select {t_nsa:.2f} ms", flush=True)
        best = min(times, key=lambda x: x[0])
        triton_select.GPU_CONFIG_BY_GROUP[1 << (group - 1).bit_length()] = best[3]
        log[f"select_G{group}"] = [dict(cfg=c, ssa_ms=round(a, 3), nsa_ms=round(b, 3)) for _, a, b, c in times]
        log[f"select_G{group}_chosen"] = best[3]
        if group in (1, 4):
            vc = mean_pool(v.detach(), length=LENGTH, stride=STRIDE)
            kcg, vcg = kc.clone().requires_grad_(True), vc.clone().requires_grad_(True)

            def cmp_branch():
                o = compressed_attention(q, kcg, vcg, length=LENGTH, stride=STRIDE)
                return torch.autograd.grad(o, (q, kcg, vcg), dout)

            saved = triton_attention.DKV_ITERATIONS
            for iters in (saved, 10**9):  # 10**9: no query split (one program walks all queries)
                triton_attention.DKV_ITERATIONS = iters
                ms = bench(cmp_branch)
                log[f"cmp_attention_G{group}_dkv_iters_{iters}_ms"] = round(ms, 3)
                print(f"tune G={group} compressed attention fwd+bwd, DKV_ITERATIONS={iters}: {ms:.2f} ms", flush=True)
            triton_attention.DKV_ITERATIONS = saved
    return log


def run_dense(n, n_heads, dim):
    q, _, _, dout = inputs(n, n_heads, 1, dim)
    k = torch.randn_like(q).requires_grad_(True)
    v = torch.randn_like(q).requires_grad_(True)
    qh, kh, vh, dh = (t.transpose(1, 2) for t in (q, k, v, dout))

    def dense():
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        return torch.autograd.grad(o, (q, k, v), dh)

    return bench(dense)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def check(n=1024, n_heads=8, group=4, dim=128, device="cuda", dtype=torch.bfloat16):
    """Triton (bf16) vs float64 references at small sizes."""
    torch.manual_seed(0)
    results = {}
    q, k, v, dout = inputs(n, n_heads, group, dim, device=device, dtype=dtype)
    # selection: selected mass vs the reference (bf16 inputs; scores in float64 from the same keys)
    for rule in ("ssa", "nsa", "infllm"):
        extra = {} if rule == "ssa" else dict(score=rule, compress_length=LENGTH, compress_stride=STRIDE)
        out = select_blocks(q.detach(), k.detach(), block_size=BLOCK, topk=TOPK, init_blocks=INIT,
                            local_blocks=LOCAL, **extra).cpu().long()
        qc, kcpu = q.detach().cpu().double(), k.detach().cpu()
        if rule == "ssa":
            scores = select_naive.block_scores_dense(qc, select_naive.block_keys(kcpu, BLOCK).double(), n, BLOCK,
                                                     dim ** -0.5)
        else:
            keys = compress_naive.mean_pool(kcpu, LENGTH, STRIDE).double()
            scores = select_naive.pooled_block_scores_dense(qc, keys, n, BLOCK, LENGTH, STRIDE, dim ** -0.5,
                                                            "sum" if rule == "nsa" else "max")
        forced = select_naive.forced_mask(n, BLOCK, INIT, LOCAL, "cpu")
        ref = select_naive.topk_from_scores(scores, forced, TOPK).long()
        finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
        free = ~forced[None, :, None, :].expand_as(scores)

        def mass(idx):
            valid = idx >= 0
            safe = idx.clamp(min=0)
            return (torch.gather(finite, -1, safe) * (valid & torch.gather(free, -1, safe))).sum(-1)

        results[f"select_{rule}_mass_maxdiff"] = float((mass(out) - mass(ref)).abs().max())
        results[f"select_{rule}_index_agree"] = float((out == ref).float().mean())
        results[f"select_{rule}_all_valid"] = bool(((out >= -1) & (out < math.ceil(n / BLOCK))).all())
    # compressed attention and window: outputs and gradients vs float64
    kc = mean_pool(k.detach(), length=LENGTH, stride=STRIDE).requires_grad_(True)
    vc = mean_pool(v.detach(), length=LENGTH, stride=STRIDE).requires_grad_(True)
    from sparsa.ops.compress import triton_attention

    saved = triton_attention.DKV_ITERATIONS
    triton_attention.DKV_ITERATIONS = 2  # force the dK/dV query split (fp32 atomics) at this small size
    o = compressed_attention(q, kc, vc, length=LENGTH, stride=STRIDE)
    g = torch.autograd.grad(o, (q, kc, vc), dout)
    triton_attention.DKV_ITERATIONS = saved
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, kc, vc)]
    ro, _ = compress_naive.compressed_attention(*leaves, length=LENGTH, stride=STRIDE, scale=dim ** -0.5)
    rg = torch.autograd.grad(ro, leaves, dout.cpu().double())
    results["compress_out_rel"] = rel(o.cpu(), ro)
    results["compress_grad_rel"] = max(rel(a.cpu(), b) for a, b in zip(g, rg))
    o = window_attention(q, k, v, window=WINDOW)
    g = torch.autograd.grad(o, (q, k, v), dout)
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    ro, _ = window_naive.window_attention(*leaves, window=WINDOW, scale=dim ** -0.5)
    rg = torch.autograd.grad(ro, leaves, dout.cpu().double())
    results["window_out_rel"] = rel(o.cpu(), ro)
    results["window_grad_rel"] = max(rel(a.cpu(), b) for a, b in zip(g, rg))
    for key, val in results.items():
        print(f"check {key}: {val}")
    return results


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def speedup(dense, ms):
    return "n/a" if not dense or not ms else f"{dense / ms:.2f}x"


def percent(part, whole):
    return "n/a" if not whole else f"{100 * part / whole:.0f}%"


def table(rows, dense_ms):
    lines = ["| N | G | dense SDPA | SSA layer | SSA vs dense | SSA select | select share | select extra MiB "
             "| NSA layer | NSA vs dense | NSA select | NSA share | NSA cmp branch | NSA window branch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense_ms.get(r["N"])
        ssa, nsa = r.get("ssa_ms"), r.get("nsa_ms")
        lines.append(
            f"| {r['N'] // 1024}K | {r['G']} | {fmt(d)} | {fmt(ssa)} | "
            f"{speedup(d, ssa)} | {fmt(r['ssa_select_ms'])} | "
            f"{percent(r['ssa_select_ms'], ssa)} | {fmt(r['ssa_select_extra_mib'], 1)} | "
            f"{fmt(nsa)} | {speedup(d, nsa)} | {fmt(r['nsa_select_ms'])} | "
            f"{percent(r['nsa_select_ms'], nsa)} | {fmt(r['nsa_cmp_ms'])} | "
            f"{fmt(r['nsa_win_ms'])} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", default="8192,16384,32768,65536,131072")
    parser.add_argument("--groups", default="1,4,8,16")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", default=None, help="markdown file for the results table")
    parser.add_argument("--json", default=None)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new configs after this")
    parser.add_argument("--tune-n", type=int, default=0, help="tune the selection config per G at this N first")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    start = time.time()
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=" ".join(sys.argv))
    print(info)
    checks = check() if args.check else {}
    tuning = tune(args.tune_n, [int(s) for s in args.groups.split(",")], args.heads, args.dim) if args.tune_n else {}
    torch.cuda.empty_cache()
    sparse_ok = has_sparse_kernel()
    rows, dense_ms = [], {}

    def dump():
        text = ["# Sparse layer (selection + branches + gates), forward+backward, bf16\n",
                f"- GPU: {info['gpu']}; torch {info['torch']}; triton {info['triton']}; {info['date']}",
                f"- command: `{info['command']}`",
                f"- Hq = {args.heads}, D = {args.dim}, batch 1; SSA: block {BLOCK}, top-{TOPK} (init {INIT}, "
                f"local {LOCAL}); NSA: l={LENGTH}, d={STRIDE}, block {BLOCK}, top-{TOPK}, window {WINDOW}",
                "- times: median ms of triton.testing.do_bench; layer = forward + backward (grads of q, k, v); "
                "select = forward only; share = select / layer; extra MiB = peak memory of the selection "
                "beyond its inputs; dense = causal SDPA (flash) with Hq heads",
                "", table(rows, dense_ms), ""]
        if tuning:
            text += ["", f"Tuning step at N = {args.tune_n} (same run; the table above uses the chosen configs):", ""]
            text += [f"- {k}: {v}" for k, v in tuning.items()]
        if checks:
            text += ["", "Correctness checks (bf16 on this GPU vs float64 references):", ""]
            text += [f"- {k}: {v}" for k, v in checks.items()]
        if args.out:
            write_text(args.out, "\n".join(text) + "\n")
        if args.json:
            write_json(args.json, dict(info=info, checks=checks, tuning=tuning, dense_ms=dense_ms, rows=rows), indent=1)

    for n in [int(s) for s in args.seqlens.split(",")]:
        if time.time() - start > args.budget_s:
            print(f"budget reached, skipping N={n}")
            break
        dense_ms[n] = run_dense(n, args.heads, args.dim)
        torch.cuda.empty_cache()
        print(f"N={n} dense {dense_ms[n]:.2f} ms", flush=True)
        for group in [int(s) for s in args.groups.split(",")]:
            if time.time() - start > args.budget_s:
                break
            row = run_config(n, group, args.heads, args.dim, sparse_ok, rows)
            torch.cuda.empty_cache()
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            dump()
    dump()
    print(table(rows, dense_ms))


if __name__ == "__main__":
    main()
