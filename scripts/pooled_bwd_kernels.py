"""GPU time per kernel of forward+backward on pooled selections (tiles share their blocks): the q_tile forward
followed by the KV-outer backward (the default there), the hybrid one (SPARSA_Q_TILE_BACKWARD=hybrid: KV-outer
dK/dV without dQ partials, q_tile's dQ kernel) or q_tile's own backward (SPARSA_Q_TILE_BACKWARD=q_tile).

    PYTHONPATH=. python3 scripts/pooled_bwd_kernels.py [--sizes 8192,65536] [--groups 4,16,1] [--pool 20] [--calls 3]

Question it answers: which kernels make the backward about 70% of forward+backward on such selections, and how
q_tile's own dQ kernel (one pass per tile over its union, dQ written once) compares with the KV-outer dK/dV
kernel's per-pair dQ partials plus their reduction. Setup as benchmarks/sparse_attention.py (Hq = 32, D = 128,
block 64, top-16, bf16). Dry run on CPU: scripts/gpu_script_dry_run.py scripts/pooled_bwd_kernels.py --sizes 64.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.sparse_attention as sa  # noqa: E402
from scripts.sa_kernel_times import kernel_times, print_top_kernels  # noqa: E402

BACKWARDS = ("kv_outer", "hybrid", "q_tile")


def probe(n, group, pool, calls, backwards=BACKWARDS):
    """Print fwd / fwd+bwd times and the top kernels of each backward at (N, G)."""
    fwd, run, leaves = sa.sparse_calls(n, group, "q_tile", pool=pool)  # the backward: SPARSA_Q_TILE_BACKWARD
    fwd_ms = sa.bench(fwd)
    for backward in backwards:
        os.environ["SPARSA_Q_TILE_BACKWARD"] = backward
        ms = sa.bench(run, grad_to_none=list(leaves))
        per = kernel_times(run, calls)
        total = sum(per.values())
        print(f"\nN={n} G={group} pool={pool} backward={backward}: fwd {fwd_ms:.3f} ms, fwd+bwd do_bench {ms:.3f} ms, "
              f"kernels {total:.3f} ms", flush=True)
        print_top_kernels(per)
    os.environ.pop("SPARSA_Q_TILE_BACKWARD", None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="4,16,1")
    p.add_argument("--pool", type=int, default=20)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--backwards", default=",".join(BACKWARDS), help="SPARSA_Q_TILE_BACKWARD values to time")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            probe(n, group, args.pool, args.calls, tuple(args.backwards.split(",")))
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
