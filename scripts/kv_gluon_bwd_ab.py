"""The Gluon dK/dV (sparsa/ops/sparse_attn/kv_gluon_bwd.py, SPARSA_KV_GLUON_BWD=1) against the Triton dK/dV, one
process: do_bench median (ms) of forward+backward, GPU ms of the dK/dV kernel per call (profiler), and each
variant's gradients against the first Triton run's (relative difference of dq, dk, dv).

    PYTHONPATH=. python3 scripts/kv_gluon_bwd_ab.py [--sizes 8192,65536] [--groups 1,4,8,16] [--tiles "32;128"]

The Triton dK/dV runs first and last. Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16,
bf16, the automatic forward loop order). Where the Gluon kernel is not eligible (no Hopper GPU, the CPU dry run)
the "gluon" rows run the Triton kernel.
"""
import argparse
import json
import os

from benchmarks.sparse_attention import bench, sparse_calls
from scripts.kv_variants import parse_counts, rel
from scripts.sa_kernel_times import kernel_times
from sparsa.ops.sparse_attn import kv_gluon_bwd


def grads_of(fwd_bwd, leaves):
    fwd_bwd()
    return [x.grad.detach().clone() for x in leaves]


def measure(n, group, fwd_bwd, leaves, name, ref):
    grads = grads_of(fwd_bwd, leaves)
    dkdv_ms = sum(t for k, t in kernel_times(fwd_bwd, 3).items() if "bwd" in k and "kernel" in k)
    row = {"N": n, "G": group, "dkdv": name, "fwdbwd_ms": bench(fwd_bwd), "dkdv_kernel_ms": dkdv_ms}
    for label, a, b in zip(("dq", "dk", "dv"), grads, ref or grads):
        row[f"diff_{label}"] = rel(a, b)
    return row, grads


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,4,8,16")
    p.add_argument("--tiles", default="", help="Gluon variants: tiles per item at most, ';'-separated "
                   "(kv_gluon_bwd.MAX_TILES_PER_ITEM at every N; empty: the module's rule)")
    args = p.parse_args()
    tiles = parse_counts(args.tiles, "--tiles", "tiles per item", 1) if args.tiles else [None]
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            _, fwd_bwd, leaves = sparse_calls(n, group)
            ref = None
            for cap in ["triton", *tiles, "triton"]:
                name = "triton" if cap == "triton" else "gluon" + ("" if cap is None else f", {cap} tiles")
                os.environ["SPARSA_KV_GLUON_BWD"] = "0" if cap == "triton" else "1"
                kv_gluon_bwd.MAX_TILES_PER_ITEM = None if cap in ("triton", None) else cap
                try:
                    row, grads = measure(n, group, fwd_bwd, leaves, name, ref)
                    ref = grads if ref is None else ref
                except Exception as exc:  # noqa: BLE001 - report the variant and go on
                    row = {"N": n, "G": group, "dkdv": name, "error": repr(exc)[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.environ.pop("SPARSA_KV_GLUON_BWD", None)
    kv_gluon_bwd.MAX_TILES_PER_ITEM = None
    print("\n| N | G | dK/dV | fwd+bwd ms | dK/dV kernel ms | diff dq / dk / dv vs Triton |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['N']} | {r['G']} | {r['dkdv']} | error: {r['error'][:80]} | | |")
        else:
            print(f"| {r['N']} | {r['G']} | {r['dkdv']} | {r['fwdbwd_ms']:.3f} | {r['dkdv_kernel_ms']:.3f} | "
                  f"{r['diff_dq']:.1e} / {r['diff_dk']:.1e} / {r['diff_dv']:.1e} |")


if __name__ == "__main__":
    main()
