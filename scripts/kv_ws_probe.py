"""Where the warp-specialised MAIN's time goes: its GPU time per forward with parts of its work removed.

    PYTHONPATH=. python3 scripts/kv_ws_probe.py [--sizes 8192,65536] [--groups 8] [--probes 0,1,2,4,3,5,6,7]

SPARSA_KV_WS_PROBE bits (kv_gluon_ws.probe_bits; timing only, the outputs are wrong with any bit set): 1 no query-row
gathers, 2 K / V loaded only into each stage's first item, 4 no partial stores (the math still runs). For each (N,
G) and probe: profiler time of the MAIN kernel per forward (KV-outer, the issue's setup: Hq = 32, D = 128, block 64,
top-16, bf16, random selections), interleaved over `--rounds` rounds, and what each probe saves against probe 0.
"""
import argparse
import os

from scripts.sa_kernel_times import kernel_times

from benchmarks.sparse_attention import sparse_calls

NAMES = {0: "all", 1: "no Q gather", 2: "K/V once per stage", 4: "no partial stores"}


def label(probe: int) -> str:
    return NAMES.get(probe) or " + ".join(NAMES[b] for b in (1, 2, 4) if probe & b)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8192,65536")
    p.add_argument("--groups", default="8")
    p.add_argument("--probes", default="0,1,2,4,3,5,6,7")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    probes = [int(x) for x in args.probes.split(",")]
    os.environ["SPARSA_KV_GLUON_WS"] = "1"
    for n in (int(x) for x in args.sizes.split(",")):
        for group in (int(g) for g in args.groups.split(",")):
            fwd = sparse_calls(n, group, "kv_outer")[0]
            times = {pr: [] for pr in probes}
            for _ in range(args.rounds):
                for pr in probes:
                    os.environ["SPARSA_KV_WS_PROBE"] = str(pr)
                    per = kernel_times(fwd, args.calls)
                    times[pr].append(sum(t for k, t in per.items() if "_kv_main_gluon_ws" in k))
            os.environ["SPARSA_KV_WS_PROBE"] = "0"
            base = min(times[probes[0]])
            for pr in probes:
                best = min(times[pr])
                print(f"N={n} G={group} probe={pr} ({label(pr)}): MAIN {best:.3f} ms "
                      f"(rounds {', '.join(f'{t:.3f}' for t in times[pr])}), saves {base - best:+.3f}", flush=True)


if __name__ == "__main__":
    main()
