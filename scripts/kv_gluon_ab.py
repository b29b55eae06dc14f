"""The Gluon KV-outer MAIN (sparsa/ops/sparse_attn/kv_gluon.py, SPARSA_KV_GLUON=1) against the Triton MAIN, one
process: do_bench medians (ms) of the forward and forward+backward, GPU ms of MAIN per call (profiler), and each
variant's output difference against the Triton forward's.

    PYTHONPATH=. python3 scripts/kv_gluon_ab.py [--sizes 8192,65536] [--groups 1,4,16] [--programs "2;1"]

--programs: Gluon variants (the module's default flags), programs per SM separated by ';'
(kv_gluon.PROGRAMS_OVERRIDE); --flags: kernel variants run at the first --programs value instead, ';'-separated sets of
kv_gluon flags joined by '+' ('TMA_STORE+OFFSETS_I32'; 'none' = all off; PIPELINE then at every G). The Triton MAIN
runs first and last. Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16). Where
the Gluon kernel is not eligible (no Hopper GPU, the CPU dry run) the "gluon" rows run the Triton MAIN.
"""
import argparse
import json
import os

from benchmarks.sparse_attention import bench, sparse_calls
from scripts.kv_variants import parse_counts, rel, variant_parts
from scripts.sa_kernel_times import kernel_times
from sparsa.ops.sparse_attn import kv_gluon


FLAGS = ("TMA_STORE", "OFFSETS_I32", "PIPELINE")


def parse_flags(text):
    """'none;TMA_STORE+OFFSETS_I32' -> [(), ('TMA_STORE', 'OFFSETS_I32')]."""
    sets = []
    for part in variant_parts(text) if text else []:
        names = () if part == "none" else tuple(part.split("+"))
        for name in names:
            if name not in FLAGS:
                raise ValueError(f"--flags: {name!r} is not one of {FLAGS}")
        sets.append(names)
    return sets


DEFAULTS = {name: getattr(kv_gluon, name) for name in (*FLAGS, "PIPELINE_MIN_GROUP")}


def set_flags(names):
    """The kv_gluon flags in `names` on, the others off, PIPELINE then at every G; None: the module's defaults."""
    if names is None:
        for name, value in DEFAULTS.items():
            setattr(kv_gluon, name, value)
        return
    for name in FLAGS:
        setattr(kv_gluon, name, name in names)
    kv_gluon.PIPELINE_MIN_GROUP = 1


def measure(n, group, fwd, fwd_bwd, name, ref):
    out = fwd()
    main_ms = sum(t for k, t in kernel_times(fwd, 3).items() if "main" in k)
    return {
        "N": n, "G": group, "main": name, "fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwd_bwd), "main_kernel_ms": main_ms,
        "diff": 0.0 if ref is None else rel(out, ref),
    }, out


def main():
    # the two-programs-per-SM kernels these variants configure, not the warp-specialised one (kv_gluon_ws.py)
    os.environ.setdefault("SPARSA_KV_GLUON_WS", "0")
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,4,16")
    p.add_argument("--programs", default="2;1")
    p.add_argument("--flags", default="", help="kernel flag sets at the first --programs value, e.g. 'none;TMA_STORE'")
    args = p.parse_args()
    programs = parse_counts(args.programs, "--programs", "programs per SM", 1)
    flag_sets = parse_flags(args.flags)
    configs = [(n, None) for n in programs] if not flag_sets else [(programs[0], f) for f in flag_sets]
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, _ = sparse_calls(n, group, "kv_outer")
            ref = None
            for cfg in [None, *configs, None]:
                os.environ["SPARSA_KV_GLUON"] = "0" if cfg is None else "1"
                kv_gluon.PROGRAMS_OVERRIDE = None if cfg is None else cfg[0]
                set_flags(None if cfg is None else cfg[1])
                name = "triton" if cfg is None else f"gluon, {cfg[0]} per SM" + (
                    "" if cfg[1] is None else "".join(f" +{f}" for f in cfg[1]) or " (no flags)")
                try:
                    row, out = measure(n, group, fwd, fwd_bwd, name, ref)
                    ref = out if ref is None else ref
                except Exception as exc:  # noqa: BLE001 - report the variant and go on
                    row = {"N": n, "G": group, "main": name, "error": repr(exc)[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.environ["SPARSA_KV_GLUON"] = "0"
    kv_gluon.PROGRAMS_OVERRIDE = None
    set_flags(None)
    print("\n| N | G | MAIN | fwd ms | fwd+bwd ms | MAIN kernel ms | diff vs Triton |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['N']} | {r['G']} | {r['main']} | error: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['N']} | {r['G']} | {r['main']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
                  f"{r['main_kernel_ms']:.3f} | {r['diff']:.2e} |")


if __name__ == "__main__":
    main()
