"""SSA's claims at small scale: train `full`, `sparse` and `ssa` models of one size on the same tokens,
evaluate each in both modes, and write a report stating which claims held.

GPU scale (default `--scale gpu`): 6 layers, width 512, 8 query / 2 KV heads, byte vocabulary,
2048-token context, block 16, topk 8. `--scale toy` is the CPU version used by the test suite (it
checks the pipeline, not the claims).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..eval import EvalConfig, evaluate_checkpoint
from ..train import TrainConfig, train

METHODS = ("full", "sparse", "ssa")

SCALES = {
    "gpu": dict(preset="repro", seq_len=2048, batch_size=16, steps=600, lr=2e-3, warmup_steps=30,
                eval_batches=8, topk_sweep=(2, 4, 8, 16, 32), passkey_lengths=(512, 1024, 2040), passkey_depths=(0.1, 0.5, 0.9),
                eval_max_batches=16, diag_windows=4),
    "toy": dict(preset="tiny", seq_len=128, batch_size=2, steps=3, lr=3e-3, warmup_steps=2,
                eval_batches=1, topk_sweep=(1, 4), passkey_lengths=(100,), passkey_depths=(0.5,),
                eval_max_batches=1, diag_windows=1),
}


def add_cli_args(p) -> None:
    p.add_argument("--out", default="runs/ssa_repro")
    p.add_argument("--scale", default="gpu", choices=sorted(SCALES))
    p.add_argument("--steps", type=int, default=None, help="override the scale's steps per model")
    p.add_argument("--report", default=None, help="markdown report path (default: OUT/ssa_reproduction.md)")
    p.add_argument("--device", default=None)
    p.add_argument("--throughput", default=None,
                   help="JSON from `python -m sparsa.experiments.throughput` to include in the report")
    p.add_argument("--no-progress", action="store_true")


def cmd_ssa(args) -> int:
    run_ssa_reproduction(out=args.out, scale=args.scale, steps=args.steps, report=args.report,
                         device=args.device, progress=not args.no_progress, throughput=args.throughput)
    return 0


def claims(results: dict[str, dict]) -> list[tuple[str, bool, str]]:
    """(claim, held?, evidence) for each of SSA's claims checked here."""
    s = {m: results[m]["attn_sparsity"] for m in METHODS}
    e = {m: results[m]["entropy_bits"] for m in METHODS}
    gap = {m: results[m]["bpb"]["sparse"] - results[m]["bpb"]["full"] for m in METHODS}
    degrade = {m: gap[m] for m in METHODS}

    def rising(method):
        sweep = [v for _, v in sorted(((int(k), v) for k, v in results[method]["topk_sweep"].items()))]
        return all(b <= a + 1e-3 for a, b in zip(sweep, sweep[1:]))

    fmt = lambda d: ", ".join(f"{m} {v:.4f}" for m, v in d.items())  # noqa: E731
    return [
        ("SSA has the highest AttnSparsity", s["ssa"] >= max(s.values()), f"AttnSparsity: {fmt(s)}"),
        ("SSA has the lowest attention entropy", e["ssa"] <= min(e.values()), f"entropy (bits): {fmt(e)}"),
        ("the sparse-only model is less sparse than the full model", s["sparse"] < s["full"],
         f"AttnSparsity: sparse {s['sparse']:.4f} vs full {s['full']:.4f}"),
        ("the full model degrades most under sparse inference", degrade["full"] >= max(degrade.values()),
         f"bpb(sparse) - bpb(full): {fmt(degrade)}"),
        ("SSA's gap between modes is the smallest", abs(gap["ssa"]) <= min(abs(g) for g in gap.values()),
         f"|gap|: {fmt({m: abs(g) for m, g in gap.items()})}"),
        ("quality rises with topk for SSA", rising("ssa"), "sparse-mode bpb non-increasing over the topk sweep"),
        ("quality rises with topk for the full model", rising("full"), "sparse-mode bpb non-increasing over the sweep"),
    ]


def write_report(results: dict, timings: dict, path: Path, settings: dict, throughput: list | None = None) -> None:
    lines = ["# SSA reproduction at small scale", "",
             f"Settings: `{json.dumps(settings)}`; device: {settings.get('device_name')}; date: {time.strftime('%Y-%m-%d')}.",
             "", "## Quality and sparsity", "",
             "| method | bpb full | bpb sparse | gap | AttnSparsity | delta | entropy (bits) | passkey full | passkey sparse |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {r['bpb']['full']:.4f} | {r['bpb']['sparse']:.4f} | {r['bpb']['sparse'] - r['bpb']['full']:+.4f} "
                     f"| {r['attn_sparsity']:.4f} | {r['delta']:.4f} | {r['entropy_bits']:.3f} "
                     f"| {r['passkey']['full']['accuracy']:.2f} | {r['passkey']['sparse']['accuracy']:.2f} |")
    ks = sorted({int(k) for r in results.values() for k in r["topk_sweep"]})
    lines += ["", "## Sparse-mode bits per byte against topk at inference", "",
              "| method | " + " | ".join(f"topk {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m, r in results.items():
        lines.append(f"| {m} | " + " | ".join(f"{r['topk_sweep'].get(str(k), float('nan')):.4f}" for k in ks) + " |")
    lines += ["", "## Claims", "", "| claim | held here | evidence |", "|---|---|---|"]
    for claim, held, evidence in claims(results):
        lines.append(f"| {claim} | {'yes' if held else 'no'} | {evidence} |")
    if timings:
        lines += ["", "## Training cost", "", "| method | tokens/s (median step) |", "|---|---|"]
        for m, v in timings.items():
            lines.append(f"| {m} | {v:.0f} |")
    if throughput:
        lines += ["", "## Training throughput at long context (one sequence, fwd + bwd + AdamW, bf16)", "",
                  "| context | method | tokens/s |", "|---|---|---|"]
        for row in throughput:
            rate = f"{row['tokens_per_s']:.0f}" if row.get("tokens_per_s") else row.get("error", "n/a")
            lines.append(f"| {row['seq_len']} | {row['method']} | {rate} |")
    lines += ["", "Figure: `ssa_reproduction.png` (topk sweep and AttnSparsity per method).", ""]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines)))


def plot(results: dict, path: Path) -> None:
    from ..demo import plot_demo

    plot_demo(results, path)


def median_tokens_per_s(run_dir: Path) -> float:
    from ..train.ssa import read_metrics

    rates = sorted(r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")
    rates = rates[len(rates) // 5:] or rates  # skip warm-up / compilation steps
    return rates[len(rates) // 2]


def run_ssa_reproduction(out="runs/ssa_repro", scale="gpu", steps=None, report=None, device=None,
                         progress=True, throughput: str | None = None) -> dict:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    s = dict(SCALES[scale])
    if steps is not None:
        s["steps"] = steps
    root = Path(out)
    results, timings = {}, {}
    for method in METHODS:
        run_dir = root / method
        cfg = TrainConfig(out=str(run_dir), preset=s["preset"], method=method, steps=s["steps"],
                          batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"], warmup_steps=s["warmup_steps"],
                          eval_every=s["steps"], save_every=min(100, s["steps"]), eval_batches=s["eval_batches"], seed=0,
                          device=device, progress=progress, resume=True)
        train(cfg)
        timings[method] = median_tokens_per_s(run_dir)
        results[method] = evaluate_checkpoint(EvalConfig(
            str(run_dir), seq_len=s["seq_len"], batch_size=4, max_batches=s["eval_max_batches"],
            topk_sweep=s["topk_sweep"], passkey_lengths=s["passkey_lengths"], passkey_depths=s["passkey_depths"],
            diag_windows=s["diag_windows"], device=device, figure=False))
    settings = {k: v for k, v in s.items()}
    settings["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu"
    report_path = Path(report) if report else root / "ssa_reproduction.md"
    throughput_rows = json.loads(Path(throughput).read_text()) if throughput else None
    write_report(results, timings, report_path, settings, throughput_rows)
    plot(results, report_path.with_suffix(".png"))
    atomic_write(root / "ssa_reproduction.json",
                 lambda tmp: Path(tmp).write_text(json.dumps({"results": results, "timings": timings,
                                                              "settings": settings}, indent=2)))
    print(Path(report_path).read_text())
    return {"results": results, "timings": timings, "claims": claims(results)}
