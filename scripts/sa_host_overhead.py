"""Host (CPU) cost of one sparsa.sparse_attention call against its GPU time: is a shape launch-bound?

    PYTHONPATH=. python3 scripts/sa_host_overhead.py [--sizes 4096,8192,16384] [--groups 1,4,8]
        [--profile 8192,4]

For each (N, G, loop order) on the benchmark's inputs (benchmarks/sparse_attention.py): the do_bench median
(GPU-bound time), the host time to enqueue one call (perf_counter around the call, no synchronisation, median
of 30 calls, the queue drained between calls), and the number of GPU kernels per call (torch.profiler). When the
host time is close to the do_bench time the call is launch-bound: kernel speed-ups do not show. --profile N,G
prints cProfile's top functions (internal time) of the KV-outer forward+backward at that shape.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

import benchmarks.sparse_attention as b


def host_ms(fn, calls: int = 30) -> float:
    """Median host time of one enqueue, with the GPU queue drained before each call."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernels_per_call(fn) -> int:
    if not torch.cuda.is_available():
        return 0  # CPU dry run (scripts/gpu_script_dry_run.py)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def calls_at(n: int, group: int, order: str):
    """order "auto": the automatic choice (loop_order=None)."""
    fwd, fwd_bwd, _ = b.sparse_calls(n, group, None if order == "auto" else order)
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4096,8192,16384")
    p.add_argument("--groups", default="1,4,8")
    p.add_argument("--orders", default="kv_outer,q_outer", help="loop orders, auto for the automatic one")
    p.add_argument("--profile", default="8192,4", help="N,G of the cProfile run ('none': skip)")
    p.add_argument("--profile-call", default="kv_outer,fwd+bwd", help="ORDER,CALL of the cProfile run (auto: the "
                   "automatic order; fwd or fwd+bwd)")
    p.add_argument("--calls", type=int, default=30, help="host-timed calls per shape (and cProfile calls / 1.5)")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            for order in args.orders.split(","):
                for what, fn in calls_at(n, group, order).items():
                    if order == "q_outer" and what == "fwd+bwd":
                        continue  # same backward as kv_outer
                    gpu = b.bench(fn)
                    row = {"N": n, "G": group, "order": order, "call": what, "do_bench_ms": gpu,
                           "host_ms": host_ms(fn, args.calls), "kernels": kernels_per_call(fn)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.profile != "none":
        n, group = (int(x) for x in args.profile.split(","))
        order, what = args.profile_call.split(",")
        fn = calls_at(n, group, order)[what]
        fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(max(1, args.calls * 2 // 3)):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\ncProfile, {max(1, args.calls * 2 // 3)} {order} {what} calls at N={n} G={group} (host time, internal):")
        print(out.getvalue()[-6000:])
    print("\n| N | G | order | call | do_bench ms | host ms per call | host / do_bench | GPU kernels |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']} | {r['G']} | {r['order']} | {r['call']} | {r['do_bench_ms']:.3f} | {r['host_ms']:.3f} | "
              f"{r['host_ms'] / r['do_bench_ms']:.2f} | {r['kernels']} |")


if __name__ == "__main__":
    main()
