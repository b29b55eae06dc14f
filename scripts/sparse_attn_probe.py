"""Host against GPU time of sparsa.sparse_attention (GPU): where a call's time goes at small N.

    PYTHONPATH=. python3 scripts/sparse_attn_probe.py [--sizes 8192] [--groups 1,4,16]

For each (N, G) and loop order picked by the op: host enqueue time per call (forward, forward+backward;
GPU not waited for inside the loop), `do_bench` medians, then for the first configuration a torch.profiler
table of the forward+backward (GPU time per kernel, host time per op). A host time near the do_bench time
means the call is bound by the host (launches, allocations, synchronisations), not by the kernels.
Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, bf16).
"""
import argparse

import torch
import triton

from benchmarks.sparse_attention import sparse_calls
from scripts.kl_overhead_probe import host_ms


def profile(fn, calls=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192")
    p.add_argument("--groups", default="1,4,16")
    args = p.parse_args()
    first = True
    for n in (int(s) for s in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd, fwd_bwd, _ = sparse_calls(n, group)

            for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                host = host_ms(fn, calls=50)
                bench = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                print(f"N={n} G={group} {name}: host {host:.3f} ms/call, do_bench {bench:.3f} ms", flush=True)
            if first:
                profile(fwd_bwd)
                first = False


if __name__ == "__main__":
    main()
