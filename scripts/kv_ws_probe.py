"""Where the KV-outer Gluon kernels' time goes: their GPU time per call with parts of their work removed.

    PYTHONPATH=. python3 scripts/kv_ws_probe.py [--kernel main|bwd] [--sizes 8192,65536] [--groups 8] [--probes ...]

--kernel main (default): the warp-specialised forward MAIN (kv_gluon_ws.py), SPARSA_KV_WS_PROBE bits: 1 no query-row
gathers, 2 K / V loaded only into each stage's first item, 4 no partial stores (the math still runs).
--kernel bwd: the Gluon dK/dV kernel (kv_gluon_bwd.py) in forward+backward, SPARSA_KV_BWD_PROBE bits: 1 only each
item's first tile of query / dO rows gathered, 4 no dQ partial stores (their MMA kept).
Timing only: the outputs are wrong with any bit set. For each (N, G) and probe: profiler time of the kernel per
call (KV-outer, the issue's setup: Hq = 32, D = 128, block 64, top-16, bf16, random selections), the best of
`--rounds` interleaved rounds, and what each probe saves against probe 0.
"""
import argparse
import os

from scripts.sa_kernel_times import kernel_times

from benchmarks.sparse_attention import sparse_calls

KERNELS = {  # --kernel: (environment variable, kernel name prefix, call, probe names)
    "main": ("SPARSA_KV_WS_PROBE", "_kv_main_gluon_ws", 0,
             {1: "no Q gather", 2: "K/V once per stage", 4: "no partial stores"}),
    "bwd": ("SPARSA_KV_BWD_PROBE", "_kv_bwd_gluon", 1, {1: "first tile's rows only", 4: "no dQ partial stores"}),
}


def label(probe: int, names: dict) -> str:
    return "all" if probe == 0 else " + ".join(names[b] for b in (1, 2, 4) if probe & b)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=sorted(KERNELS), default="main")
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="8")
    p.add_argument("--probes", default=None, help="comma-separated probe values (default: each bit alone)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    var, prefix, which, names = KERNELS[args.kernel]
    probes = [int(x) for x in args.probes.split(",")] if args.probes else [0, *names]
    if probes[0] != 0:
        raise ValueError(f"--probes must start with 0 (the baseline), got {args.probes!r}")
    if args.kernel == "main":
        os.environ["SPARSA_KV_GLUON_WS"] = "1"
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fn = sparse_calls(n, group, "kv_outer")[which]
            times = {pr: [] for pr in probes}
            for _ in range(args.rounds):
                for pr in probes:
                    os.environ[var] = str(pr)
                    per = kernel_times(fn, args.calls)
                    times[pr].append(sum(t for k, t in per.items() if prefix in k))
            os.environ[var] = "0"
            base = min(times[0])
            for pr in probes:
                best = min(times[pr])
                print(f"N={n} G={group} {args.kernel} probe={pr} ({label(pr, names)}): {prefix} {best:.3f} ms "
                      f"(rounds {', '.join(f'{t:.3f}' for t in times[pr])}), saves {base - best:+.3f}", flush=True)


if __name__ == "__main__":
    main()
