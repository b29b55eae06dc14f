"""Forward+backward at G = 16 after each query-outer forward (one-token tiles off / on): where the time goes (GPU).

    PYTHONPATH=. python3 scripts/one_token_bwd_probe.py [--sizes 98304,131072] [--rounds 2] [--calls 3] [--group 16]

Both forwards (query-outer kernel, SPARSA_ONE_TOKEN_TILES=0; the same work on one-token q_tile tiles, =1) are
followed by the same KV-outer backward, so a gap in forward+backward must come from the kernels' own times, the
caching allocator (device mallocs / frees, allocation retries during the timed calls) or the clock. For each
size and setting, rounds interleaved: do_bench median of forward+backward, the allocator's counter deltas over
those calls, SM clock / power / temperature under load, and a per-kernel GPU time table (torch.profiler).
Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128, block 64, top-16, random selections, bf16).
Session 27 (H100, benchmarks/results/h100_session27/one_token_probe.log): the same backward kernel times after
either forward, no allocator activity; session 26's forward+backward gap at 128K was single-sample spread.
"""
import argparse
import os

import torch

from benchmarks.sparse_attention import bench, sparse_calls
from scripts.sa_kernel_times import gpu_state, kernel_times, print_top_kernels

ALLOC_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_deltas(fn):
    """(do_bench ms of fn, {counter: increase during the timed calls}, peak reserved GiB)."""
    stats = torch.cuda.memory_stats if torch.cuda.is_available() else dict  # CPU dry run: no counters
    torch.cuda.synchronize()
    before = stats()
    ms = bench(fn)
    after = stats()
    deltas = {key: after.get(key, 0) - before.get(key, 0) for key in ALLOC_COUNTERS}
    return ms, deltas, after.get("reserved_bytes.all.peak", 0) / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="98304,131072")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--state-calls", type=int, default=20, help="back-to-back calls before reading the clock")
    p.add_argument("--group", type=int, default=16, help="G (the one-token tiles apply at 16 only)")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} "
          f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')!r}", flush=True)
    for n in (int(x) for x in args.sizes.split(",")):
        _, fwd_bwd, _ = sparse_calls(n, args.group, "q_outer")
        tables = {}
        for rnd in range(args.rounds):
            for tiles in ("0", "1"):
                os.environ["SPARSA_ONE_TOKEN_TILES"] = tiles
                ms, deltas, peak = allocator_deltas(fwd_bwd)
                print(f"N={n} G={args.group} round {rnd} one-token tiles {tiles}: fwd+bwd {ms:.3f} ms; allocator {deltas}; "
                      f"peak reserved {peak:.1f} GiB", flush=True)
                if rnd == args.rounds - 1:
                    tables[tiles] = (ms, gpu_state(fwd_bwd, args.state_calls), kernel_times(fwd_bwd, args.calls))
        for tiles, (ms, state, per) in tables.items():
            total = sum(per.values())
            print(f"\nN={n} one-token tiles {tiles}: do_bench {ms:.3f} ms, kernels {total:.3f} ms, gap "
                  f"{ms - total:.3f} ms; SM clock MHz, power W, temperature C under load: {state}", flush=True)
            print_top_kernels(per)
        os.environ.pop("SPARSA_ONE_TOKEN_TILES", None)
        del fwd_bwd
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
