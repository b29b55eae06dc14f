"""Plot benchmarks/sparse_attention.py results: speedup over dense causal SDPA against N, one line per G.

    PYTHONPATH=. python3 benchmarks/plot_sparse_attention.py --out speedup.png \
        random=benchmarks/results/h100_session17/bench.log \
        "pooled P=20=benchmarks/results/h100_session20/bench_pooled_16k_32k.json,benchmarks/results/h100_session20/bench_pooled_8k_64k_128k.json"

Each positional argument is LABEL=FILE[,FILE...]: the benchmark's JSON (`--out`) or its printed log (the
markdown table at its end). Two panels, forward and forward+backward; the first label's lines are solid, the
next ones dashed / dotted; above 1 the sparse op is faster than dense SDPA. The image is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile

# | 8K | 1 | index | fwd q_outer | fwd kv_outer | fwd (auto) | TFLOP/s | fwd+bwd | TFLOP/s | dense fwd | dense fwd+bwd |
_ROW = re.compile(r"^\|\s*(\d+)K\s*\|\s*(\d+)\s*\|(.*)$")


def _number(cell: str) -> float:
    return float(cell.strip().split()[0])


def read_rows(path: str) -> list[dict]:
    """Rows {N, G, fwd, fwdbwd, dense_fwd, dense_fwdbwd} (ms) of one benchmark output, JSON or log."""
    if not os.path.isfile(path):
        raise ValueError(f"results file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        keys = ("N", "G", "fwd", "fwdbwd", "dense_fwd", "dense_fwdbwd")
        return [{k: r[k] for k in keys} for r in json.loads(text)["rows"] if "N" in r]
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            cells = m.group(3).split("|")
            rows.append({"N": int(m.group(1)) * 1024, "G": int(m.group(2)), "fwd": _number(cells[3]),
                         "fwdbwd": _number(cells[5]), "dense_fwd": _number(cells[7]),
                         "dense_fwdbwd": _number(cells[8])})
    if not rows:
        raise ValueError(f"no benchmark rows in {path!r} (expected the JSON of --out or the printed table)")
    return rows


def parse_series(spec: str) -> tuple[str, list[dict]]:
    """'LABEL=FILE[,FILE...]' -> (label, rows of every file)."""
    label, sep, files = spec.rpartition("=")
    if not sep or not label or not files:
        raise ValueError(f"series {spec!r}: expected LABEL=FILE[,FILE...]")
    return label, [row for path in files.split(",") for row in read_rows(path)]


def plot(series: list[tuple[str, list[dict]]], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["G"] for _, rows in series for r in rows})
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, name) in zip(axes, (("fwd", "forward"), ("fwdbwd", "forward+backward"))):
        for i, (label, rows) in enumerate(series):
            for group in groups:
                pts = sorted((r["N"], r[f"dense_{key}"] / r[key]) for r in rows if r["G"] == group)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % len(styles)], marker="o",
                            markersize=3, color=colors[group], label=f"{label}, G={group}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over dense causal SDPA")
    axes[1].legend(fontsize=7, ncol=len(series))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(out)[1] or ".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("series", nargs="+", help="LABEL=FILE[,FILE...] (benchmark JSON or log)")
    ap.add_argument("--out", required=True, help="image file (.png, .svg, ...)")
    ap.add_argument("--title", default="sparsa.sparse_attention, Hq = 32, D = 128, block 64, top-16, bf16")
    args = ap.parse_args(argv)
    plot([parse_series(s) for s in args.series], args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
