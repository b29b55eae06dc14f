"""GPU time per kernel of one sparsa.sparse_attention call (KV-outer), for each pair-index backend.

    PYTHONPATH=. python3 scripts/sa_kernel_times.py [--sizes 65536] [--groups 1,4] [--calls 5]

For each (N, G) and SPARSA_PAIR_INDEX backend (torch, triton): do_bench median of the forward and of the
forward+backward, then a torch.profiler table of `--calls` calls of each: GPU time per call of every kernel
(summed over the head slices), the kernel total and the gap between the total and the do_bench time
(idle GPU: host-bound launches, allocations, synchronisations), and the SM clock / power / temperature
read through NVML after 20 back-to-back calls. Used to find out why the Triton-built
index made the attention around it slower (docs/kernels/sparse_attention.md, "Layout and index").
Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16).
"""
import argparse
import os
from collections import defaultdict

import torch

from benchmarks.sparse_attention import bench, sparse_calls
from sparsa.ops.sparse_attn.index import PAIR_INDEX_BACKENDS


def gpu_state(fn, calls=20):
    """SM clock (MHz), power (W) and temperature (C) read through NVML right after `calls` back-to-back calls
    of fn (a power-capped GPU lowers its clock under sustained load; gaps between kernels let it recover)."""
    for _ in range(calls):
        fn()
    try:
        state = (torch.cuda.clock_rate(), torch.cuda.power_draw() / 1000, torch.cuda.temperature())
    except Exception:  # noqa: BLE001 - NVML missing: report nothing rather than fail the probe
        state = None
    torch.cuda.synchronize()
    return state


def kernel_times(fn, calls):
    """{kernel name: GPU ms per call} over `calls` calls of fn (after two warm-up calls)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activity.CUDA if torch.cuda.is_available() else activity.CPU]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if not torch.cuda.is_available():  # CPU dry run of the script: host time per op
            us = evt.self_cpu_time_total
        if us > 0:
            per[evt.key[:70]] += us / 1e3 / calls
    return dict(per)


def print_top_kernels(per: dict, top: int = 12) -> None:
    """The `top` kernels of kernel_times' {name: ms per call}, slowest first."""
    for key, t in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {t:8.3f}  {key}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="65536")
    p.add_argument("--groups", default="1,4")
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, _ = sparse_calls(n, group, "kv_outer")

            for name in PAIR_INDEX_BACKENDS:
                os.environ["SPARSA_PAIR_INDEX"] = name
                for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    ms = bench(fn)
                    state = gpu_state(fn)
                    per = kernel_times(fn, args.calls)
                    total = sum(per.values())
                    print(f"\nN={n} G={group} index={name} {label}: do_bench {ms:.3f} ms, kernels {total:.3f} ms, "
                          f"gap {ms - total:.3f} ms; SM clock MHz, power W, temperature C under load: {state}",
                          flush=True)
                    print_top_kernels(per, 14)
            os.environ.pop("SPARSA_PAIR_INDEX", None)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
