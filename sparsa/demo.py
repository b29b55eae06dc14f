"""`sparsa demo`: train tiny full, sparse and SSA models on the default corpus and compare them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import atomic_write
from .eval import EvalConfig, evaluate_checkpoint
from .train import TrainConfig, train

METHODS = ("full", "sparse", "ssa")


def format_table(results: dict[str, dict]) -> str:
    header = f"{'method':<8} {'bpb full':>9} {'bpb sparse':>11} {'gap':>7} {'AttnSparsity':>13} {'delta':>7} {'entropy':>8}"
    lines = [header, "-" * len(header)]
    for method, r in results.items():
        gap = r["bpb"]["sparse"] - r["bpb"]["full"]
        lines.append(f"{method:<8} {r['bpb']['full']:>9.4f} {r['bpb']['sparse']:>11.4f} {gap:>+7.4f} "
                     f"{r['attn_sparsity']:>13.4f} {r['delta']:>7.4f} {r['entropy_bits']:>8.3f}")
    return "\n".join(lines)


def plot_demo(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, r in results.items():
        ks = [int(k) for k in r["topk_sweep"]]
        axes[0].plot(ks, list(r["topk_sweep"].values()), marker="o", label=f"{method} (sparse mode)")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("topk at inference (blocks)")
    axes[0].set_ylabel("validation bits per byte")
    axes[0].legend()
    names = list(results)
    axes[1].bar(names, [results[m]["attn_sparsity"] for m in names])
    axes[1].set_ylabel("AttnSparsity (mass inside selected blocks)")
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def run_demo(out: str = "runs/demo", steps: int = 300, seed: int = 0, progress: bool = True) -> dict:
    root = Path(out)
    results = {}
    for method in METHODS:
        run_dir = root / method
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo owns runs/demo and retrains from scratch
        train(TrainConfig(out=str(run_dir), preset="tiny", method=method, steps=steps, eval_every=steps,
                          save_every=steps, seed=seed, progress=progress))
        results[method] = evaluate_checkpoint(EvalConfig(str(run_dir), passkey_lengths=(120,), max_batches=8))
    table = format_table(results)
    figure = plot_demo(results, root / "demo.png")
    atomic_write(root / "demo.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(table)
    print(f"figure: {figure}\nresults: {root / 'demo.json'}")
    return results
