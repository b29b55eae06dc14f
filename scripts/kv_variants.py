"""KV-outer launch variants on the GPU, one process: forward MAIN tile rows / warps / register cap
(kv_outer.FWD_OVERRIDE) and dK/dV backward ones (backward.BWD_OVERRIDE); do_bench medians in ms (index
build included), each variant's output and gradients compared with the default's.

    PYTHONPATH=. python3 scripts/kv_variants.py [--sizes 8192,65536] [--groups 1,4]
        [--fwd "128x4;64x4x96"] [--bwd "64x4;k;k64x8"] [--reduce "32x2;16x4"] [--flags "CACHE_HINTS"]

--fwd / --bwd: variants as ROWSxWARPS[xMAXNREG[xSTAGES]] separated by ';' ("none": skip that half; MAXNREG 0:
no register cap; STAGES: num_stages, default 1 forward, 2 dK/dV); the default is measured first and last in either list. A dK/dV variant with a leading "k" runs the keys-as-rows kernel
(SPARSA_KV_BWD_KEYS=1; "k" alone: its default launch); the dK/dV "default" is the gathered-rows layout
(SPARSA_KV_BWD_KEYS=0), which is not the library default where keys-as-rows is tuned on (G = 8, 16K+ tokens).

Why (compiled offline for sm_90, bf16, D = 128, G = 4): the default MAIN (128 rows, 4 warps) takes 248
registers, so two CTAs (8 warps) share an SM; 128 rows / 8 warps with maxnreg=128 compiles without spills
(two CTAs of 8 warps), 64 rows / 4 warps with maxnreg=128 spills 40 bytes (four CTAs). The dK/dV kernel
(128 rows, 8 warps) takes 255 registers and 152 bytes of stack, one CTA per SM.
--flags: kv_outer's boolean experiments (MAIN_EARLY_V, CACHE_HINTS) switched on together per variant ('+').
--reduce: the per-token reductions (forward merge, dQ sum; kv_outer.REDUCE_OVERRIDE) as ROWSxSLOTS[xWARPS]:
rows per program, slots merged per step (their partials loaded as one tile), warps; "none" (the default) skips.
Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16).
"""
import argparse
import json
import os

import torch

from benchmarks.sparse_attention import bench, sparse_calls
from sparsa.ops.sparse_attn import backward as bwd_mod
from sparsa.ops.sparse_attn import kv_outer as kv_mod

FWD_VARIANTS = [None, (128, 4), (128, 8, 128), (64, 4, 128), (64, 4, 96), (128, 4, 168), None]
BWD_VARIANTS = [None, (64, 4), (32, 4), (64, 8), None]


def variant_parts(text):
    """The non-empty ';'-separated parts of a variant list; [] for 'none'."""
    if text.strip().lower() == "none":
        return []
    return [part for part in (x.strip() for x in text.split(";")) if part]


def parse_counts(text, option, what, minimum):
    """'8;4' -> [8, 4]: the ';'-separated integers of `option`, each at least `minimum` (else a ValueError)."""
    counts = []
    for part in variant_parts(text):
        if not part.isdigit() or int(part) < minimum:
            raise ValueError(f"{option}: {part!r} must be {what} (>= {minimum})")
        counts.append(int(part))
    return counts


def parse_variants(text, default):
    """'128x4;64x4x96' -> [None, (128, 4), (64, 4, 96), None]; 'none' -> []; None -> default."""
    if text is None:
        return default
    cfgs = []
    for part in variant_parts(text):
        keys = part.startswith("k")  # dK/dV with the keys as MMA rows (SPARSA_KV_BWD_KEYS=1)
        nums = tuple(int(x) for x in part.lstrip("k").split("x") if x)
        if len(nums) not in ((0, 2, 3, 4) if keys else (2, 3, 4)):
            raise ValueError(
                f"variant {part!r} must be [k]ROWSxWARPS[xMAXNREG[xSTAGES]] (or k alone; MAXNREG 0: none)"
            )
        cfgs.append(("keys", *nums) if keys else nums)
    return [None, *cfgs, None] if cfgs else []


def parse_reduce_variants(text):
    """'32x1;16x4x8' -> [None, (32, 1), (16, 4, 8), None]; 'none' -> []."""
    cfgs = []
    for part in variant_parts(text):
        nums = tuple(int(x) for x in part.split("x"))
        if len(nums) not in (2, 3):
            raise ValueError(f"reduction variant {part!r} must be ROWSxSLOTS[xWARPS]")
        cfgs.append(nums)
    return [None, *cfgs, None] if cfgs else []


FLAG_DEFAULTS = {"MAIN_EARLY_V": False, "CACHE_HINTS": None}  # kv_outer's library defaults
FLAG_NAMES = tuple(FLAG_DEFAULTS)


def parse_flag_variants(text):
    """'MAIN_EARLY_V;CACHE_HINTS;MAIN_EARLY_V+CACHE_HINTS' -> [(), ("MAIN_EARLY_V",), ..., ()]; 'none' -> []."""
    sets = []
    for part in variant_parts(text):
        names = tuple(n.strip() for n in part.split("+"))
        bad = [n for n in names if n not in FLAG_NAMES]
        if bad:
            raise ValueError(f"--flags: unknown kv_outer flag(s) {bad}; known: {', '.join(FLAG_NAMES)}")
        sets.append(names)
    return [(), *sets, ()] if sets else []


def flag_rows(n, group, fwd, fwd_bwd, leaves, variants):
    """kv_outer boolean experiments (FLAG_NAMES) switched on together per variant, the others at their library
    defaults: do_bench of the forward and forward+backward, output and gradient differences against the
    default's (every flag at its library default; CACHE_HINTS's is per G, kv_outer.cache_hints)."""
    rows, ref = [], None
    for names in variants:
        for name, default in FLAG_DEFAULTS.items():
            setattr(kv_mod, name, True if name in names else default)
        try:
            out = fwd().float()
            fwd_bwd()
            got = (out, *(x.grad.float() for x in leaves))
            ref = got if ref is None else ref
            row = {
                "N": n,
                "G": group,
                "flags": "+".join(names),
                "fwd_ms": bench(fwd),
                "fwdbwd_ms": bench(fwd_bwd),
                "diff": max(rel(a, b) for a, b in zip(got, ref)),
            }
        except Exception as exc:  # noqa: BLE001 - report the variant and go on
            row = {"N": n, "G": group, "flags": "+".join(names), "error": repr(exc)[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for name, default in FLAG_DEFAULTS.items():
        setattr(kv_mod, name, default)
    return rows


def reduce_rows(n, group, fwd, fwd_bwd, leaves, variants):
    """Per-token reduction variants (kv_outer.REDUCE_OVERRIDE: forward merge and dQ sum): do_bench of the
    forward and forward+backward, GPU ms per call of the two reduction kernels, output and gradient
    differences against the default's (the summation order changes with SLOTS: not bit-equal)."""
    from scripts.sa_kernel_times import kernel_times

    rows, ref = [], None
    for cfg in variants:
        kv_mod.REDUCE_OVERRIDE = cfg
        try:
            out = fwd().float()
            fwd_bwd()
            got = (out, *(x.grad.float() for x in leaves))
            ref = got if ref is None else ref
            per = kernel_times(fwd_bwd, 3)
            row = {
                "N": n,
                "G": group,
                "reduce_cfg": cfg,
                "fwd_ms": bench(fwd),
                "fwdbwd_ms": bench(fwd_bwd),
                "merge_ms": sum(t for k, t in per.items() if "merge" in k),
                "dq_sum_ms": sum(t for k, t in per.items() if "dq_reduce" in k),
                "diff": max(rel(a, b) for a, b in zip(got, ref)),
            }
        except Exception as exc:  # noqa: BLE001 - report the variant and go on
            row = {"N": n, "G": group, "reduce_cfg": cfg, "error": repr(exc)[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    kv_mod.REDUCE_OVERRIDE = None
    return rows


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="1,4")
    p.add_argument("--fwd", default=None, help="forward MAIN variants, e.g. '128x4;64x4x96' ('none': skip)")
    p.add_argument("--bwd", default=None, help="dK/dV variants, e.g. '64x4;32x4' ('none': skip)")
    p.add_argument(
        "--reduce", default="none", help="per-token reduction variants ROWSxSLOTS[xWARPS], e.g. '32x1;16x4' (default none)"
    )
    p.add_argument(
        "--flags", default="none",
        help=f"kv_outer experiments switched on per variant, e.g. 'MAIN_EARLY_V;CACHE_HINTS;MAIN_EARLY_V+CACHE_HINTS'"
        f" (known: {', '.join(FLAG_NAMES)}; default none)",
    )
    args = p.parse_args()
    flag_variants = parse_flag_variants(args.flags)
    fwd_variants = parse_variants(args.fwd, FWD_VARIANTS)
    bwd_variants = parse_variants(args.bwd, BWD_VARIANTS)
    reduce_variants = parse_reduce_variants(args.reduce)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, (qr, kr, vr) = sparse_calls(n, group, "kv_outer")

            ref = None
            for cfg in fwd_variants:
                kv_mod.FWD_OVERRIDE = cfg
                try:
                    out = fwd()
                    ref = out if ref is None else ref
                    row = {"N": n, "G": group, "fwd_cfg": cfg, "fwd_ms": bench(fwd), "diff": rel(out, ref)}
                except Exception as exc:  # noqa: BLE001 - report the variant and go on
                    row = {"N": n, "G": group, "fwd_cfg": cfg, "error": repr(exc)[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            kv_mod.FWD_OVERRIDE = None
            ref_grads = None
            for cfg in bwd_variants:
                keys = cfg is not None and cfg[0] == "keys"
                os.environ["SPARSA_KV_BWD_KEYS"] = "1" if keys else "0"
                bwd_mod.BWD_OVERRIDE = (cfg[1:] or None) if keys else cfg
                try:
                    fwd_bwd()
                    grads = (qr.grad.clone(), kr.grad.clone(), vr.grad.clone())
                    ref_grads = grads if ref_grads is None else ref_grads
                    diff = max(rel(a, b) for a, b in zip(grads, ref_grads))
                    row = {"N": n, "G": group, "bwd_cfg": cfg, "fwdbwd_ms": bench(fwd_bwd), "diff": diff}
                except Exception as exc:  # noqa: BLE001
                    row = {"N": n, "G": group, "bwd_cfg": cfg, "error": repr(exc)[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            bwd_mod.BWD_OVERRIDE = None
            os.environ.pop("SPARSA_KV_BWD_KEYS", None)
            rows += reduce_rows(n, group, fwd, fwd_bwd, (qr, kr, vr), reduce_variants)
            rows += flag_rows(n, group, fwd, fwd_bwd, (qr, kr, vr), flag_variants)
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}\n| N | G | variant | ms | diff vs default |\n|---|---|---|---|---|")
    for r in rows:
        if "flags" in r:
            ms = r.get("fwd_ms")
            ms = ms if ms is None else f"{ms:.3f} / {r['fwdbwd_ms']:.3f}"
            print(f"| {r['N']} | {r['G']} | flags {r['flags'] or 'default'}: fwd / fwd+bwd | {ms} | {r.get('diff', r.get('error'))} |")
            continue
        if "reduce_cfg" in r:
            name = f"reduce {r['reduce_cfg'] or 'default'}: fwd / fwd+bwd; merge / dQ-sum kernel ms"
            ms = r.get("fwd_ms")
            if ms is not None:
                ms = f"{ms:.3f} / {r['fwdbwd_ms']:.3f}; {r['merge_ms']:.3f} / {r['dq_sum_ms']:.3f}"
            print(f"| {r['N']} | {r['G']} | {name} | {ms} | {r.get('diff', r.get('error'))} |")
            continue
        name = f"fwd {r['fwd_cfg'] or 'default'}" if "fwd_cfg" in r else f"fwd+bwd, bwd {r['bwd_cfg'] or 'default'}"
        ms = r.get("fwd_ms", r.get("fwdbwd_ms"))
        print(f"| {r['N']} | {r['G']} | {name} | {ms if ms is None else f'{ms:.3f}'} | {r.get('diff', r.get('error'))} |")


if __name__ == "__main__":
    main()
