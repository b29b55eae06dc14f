"""Forward and forward+backward ms of sparse_attention with each loop order forced, rounds interleaved (GPU).

    PYTHONPATH=. python3 scripts/order_ab.py --shapes "16384,16;131072,16" --orders q_outer,kv_outer \
        [--rounds 2] [--env SPARSA_ONE_TOKEN_TILES=0,auto] [--out FILE.json]

The issue-3 benchmark's inputs (benchmarks/sparse_attention.py `make`: Hq = 32, D = 128, block 64, top-16,
random selections, bf16), no dense SDPA: for moving a crossover (triton_ops.choose_loop_order) on measured data.
Each variant is an (order, env setting) pair; every round times every variant once per shape, so drift is shared.
Last, a table per shape and variant: medians over the rounds, their ranges, and how often each variant was fastest.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import benchmarks.sparse_attention as sa  # noqa: E402
from sparsa.checkpoint import write_json  # noqa: E402
from sparsa.ops.sparse_attn import LOOP_ORDERS  # noqa: E402


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'16384,16;131072,4' -> [(16384, 16), (131072, 4)]."""
    shapes = []
    for item in filter(None, text.split(";")):
        n, g = (int(x) for x in item.split(","))
        shapes.append((n, g))
    if not shapes:
        raise ValueError("--shapes: give at least one 'N,G'")
    return shapes


def parse_env(text: str | None) -> list[tuple[str, str | None]]:
    """'NAME=a,b' -> [(NAME, a), (NAME, b)]; None -> one variant with the environment as it is."""
    if not text:
        return [("", None)]
    name, _, values = text.partition("=")
    if not name or not values:
        raise ValueError(f"--env: expected NAME=v1,v2, got {text!r}")
    return [(name, value) for value in values.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", required=True, help="'N,G;N,G'")
    ap.add_argument("--orders", default="q_outer,kv_outer", help="comma-separated loop orders ('auto': the default)")
    ap.add_argument("--env", default=None, help="NAME=v1,v2: also vary one environment variable")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    orders = [None if o == "auto" else o for o in args.orders.split(",")]
    unknown = [o for o in orders if o is not None and o not in LOOP_ORDERS]
    if unknown:
        raise ValueError(f"--orders: unknown loop order(s) {unknown}; use {LOOP_ORDERS} or auto")
    settings = parse_env(args.env)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    rows = []
    for n, group in shapes:
        q, k, v, idx = sa.make(n, group)
        for rnd in range(args.rounds):
            for order in orders:
                for name, value in settings:
                    saved = os.environ.get(name) if name else None
                    if name:
                        os.environ[name] = value
                    try:
                        fwd = sa.time_sparse(q, k, v, idx, order, False)
                        fb = None if args.no_backward else sa.time_sparse(q, k, v, idx, order, True)
                    finally:  # the next variant (and every other order) sees the environment as it was
                        if name and saved is None:
                            os.environ.pop(name, None)
                        elif name:
                            os.environ[name] = saved
                    label = f"{order or 'auto'}" + (f" {name}={value}" if name else "")
                    fb_text = "" if fb is None else f" fwd+bwd {fb:8.3f}"
                    print(f"N={n:6d} G={group:2d} round {rnd} {label:40s} fwd {fwd:8.3f}{fb_text}", flush=True)
                    rows.append({"N": n, "G": group, "round": rnd, "order": order or "auto", "env": name,
                                 "value": value, "fwd": fwd, "fwdbwd": fb})
        del q, k, v, idx
        torch.cuda.empty_cache()
    print(summary(rows), flush=True)
    if args.out:
        write_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})


def summary(rows: list[dict]) -> str:
    """Per shape and variant: the median over rounds of fwd and fwd+bwd ms, their range, and the rounds in which the
    variant was the fastest (ties count for each), as a markdown table."""
    lines = ["| N | G | variant | rounds | fwd median (min-max) | fastest fwd | fwd+bwd median (min-max) | fastest fwd+bwd |",
             "|---|---|---|---|---|---|---|---|"]
    shapes = sorted({(r["N"], r["G"]) for r in rows})
    for n, group in shapes:
        mine = [r for r in rows if (r["N"], r["G"]) == (n, group)]
        variants = list(dict.fromkeys(_variant(r) for r in mine))
        best = {}  # (round, key) -> fastest time of that round
        for r in mine:
            for key in ("fwd", "fwdbwd"):
                if r[key] is not None:
                    best[r["round"], key] = min(best.get((r["round"], key), float("inf")), r[key])
        for variant in variants:
            runs = [r for r in mine if _variant(r) == variant]
            cells = []
            for key in ("fwd", "fwdbwd"):
                times = [r[key] for r in runs if r[key] is not None]
                if not times:
                    cells += ["-", "-"]
                    continue
                wins = sum(r[key] == best[r["round"], key] for r in runs if r[key] is not None)
                cells += [f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})", f"{wins}/{len(times)}"]
            lines.append(f"| {n} | {group} | {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variant(row: dict) -> str:
    return row["order"] + (f" {row['env']}={row['value']}" if row["env"] else "")


if __name__ == "__main__":
    main()
