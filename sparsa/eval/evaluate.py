"""`sparsa eval CHECKPOINT`: quality in both modes, a topk sweep, attention diagnostics, passkey.

`selector` ("query" | "forecast") picks the block selector of every sparse-mode number (bpb, topk
sweep, passkey); the per-layer diagnostics always use the query selector. A checkpoint with SparDA
forecasts also gets a "forecast" section (sparsa.eval.forecast_metrics): per-layer recall of the
query selector's blocks by the forecast selector, kept full-attention mass of both selectors,
sparse bpb / perplexity and passkey accuracy under each selector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_write, load_model
from ..data import sequential_batches, tokenizer_for_checkpoint
from ..train.ssa import evaluate_bpb, load_streams, resolve_device
from .forecast_metrics import SelectorView, evaluate_bpb_selector, forecast_report
from .metrics import attention_diagnostics
from .passkey import passkey_accuracy

SELECTORS = ("query", "forecast")


@dataclass
class EvalConfig:
    checkpoint: str
    data: str | None = None
    seq_len: int | None = None
    batch_size: int = 4
    max_batches: int = 8
    topk_sweep: tuple[int, ...] | None = None
    diag_windows: int = 2
    passkey_lengths: tuple[int, ...] | None = None
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    device: str | None = None
    figure: bool = True
    selector: str = "query"  # block selector of the sparse mode: "query" | "forecast"
    forecast_metrics: bool = True  # add the "forecast" section when the checkpoint has forecasts


def default_topk_sweep(topk: int) -> tuple[int, ...]:
    values = sorted({max(1, topk // 4), max(1, topk // 2), topk, topk * 2, topk * 4})
    return tuple(values)


@torch.no_grad()
def layer_diagnostics(model, stream, seq_len: int, n_windows: int, device) -> list[dict]:
    """Per-layer AttnSparsity, delta, entropy and Theorem 1 residual from full-mode activations."""
    sc = model.config.sparse
    rf = sc.topk * sc.block_size
    sums: list[dict] = [dict() for _ in model.layers]
    count = 0
    for batch in sequential_batches(stream, 1, seq_len, n_windows):
        batch = batch.to(device)
        records = [dict() for _ in model.layers]
        for layer, record in zip(model.layers, records):
            layer.attn.record = record
        try:
            model(batch.tokens, mode="full", cu_seqlens=batch.cu_seqlens)
        finally:
            for layer in model.layers:
                layer.attn.record = None
        for i, (layer, record) in enumerate(zip(model.layers, records)):
            q, k, v = record["q"], record["k"], record["v"]
            idx = layer.attn.select(q, k)
            diag = attention_diagnostics(q, k, v, idx, sc.block_size, min_position=rf)
            for key, value in diag.items():
                if key == "theorem1_residual":
                    sums[i][key] = max(sums[i].get(key, 0.0), value)
                else:
                    sums[i][key] = sums[i].get(key, 0.0) + value
        count += 1
    out = []
    for i, acc in enumerate(sums):
        row = {"layer": i}
        for key, value in acc.items():
            row[key] = value if key in ("theorem1_residual",) else value / max(count, 1)
        out.append(row)
    return out


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    if cfg.selector not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {cfg.selector!r}")
    device = resolve_device(cfg.device)
    model, meta = load_model(Path(cfg.checkpoint), device)
    if cfg.selector == "forecast" and not model.has_forecasts:
        raise ValueError(f"selector 'forecast' needs a checkpoint with forecasts (sparsa distill-forecast); "
                         f"{str(cfg.checkpoint)!r} has none")
    model.eval()
    config = model.config
    seq_len = cfg.seq_len or config.max_seq_len
    tokenizer = tokenizer_for_checkpoint(cfg.checkpoint, config.vocab_size)
    _, val_stream = load_streams(cfg.data, tokenizer)
    result = {"checkpoint": str(cfg.checkpoint), "method": meta.get("method"), "seq_len": seq_len,
              "block_size": config.sparse.block_size, "topk": config.sparse.topk, "selector": cfg.selector}

    def bpb_of(mode: str, topk: int | None = None) -> float:
        if cfg.selector == "query":
            return evaluate_bpb(model, val_stream, seq_len, cfg.batch_size, cfg.max_batches, mode, device, topk=topk)
        return evaluate_bpb_selector(model, val_stream, seq_len, cfg.batch_size, cfg.max_batches, device,
                                     cfg.selector, mode=mode, topk=topk)

    bpb = {}
    for mode in ("full", "sparse"):
        bpb[mode] = bpb_of(mode)
    result["bpb"] = bpb
    # perplexity per token of the checkpoint's tokenizer
    result["perplexity"] = {m: math.exp(v * math.log(2) * val_stream.bytes_per_token) for m, v in bpb.items()}
    sweep = cfg.topk_sweep or default_topk_sweep(config.sparse.topk)
    result["topk_sweep"] = {
        str(k): bpb_of("sparse", topk=k)
        for k in sweep if k >= config.sparse.init_blocks + config.sparse.local_blocks
    }
    layers = layer_diagnostics(model, val_stream, seq_len, cfg.diag_windows, device)
    result["layers"] = layers
    for key in ("attn_sparsity", "delta", "entropy_bits"):
        result[key] = sum(r[key] for r in layers) / len(layers)
    result["theorem1_max_residual"] = max(r["theorem1_residual"] for r in layers)
    # prompts end 8 tokens short of the context so the answer fits
    lengths = cfg.passkey_lengths or tuple(sorted({max(128, seq_len // 2) - 8, seq_len - 8}))
    filler = tokenizer.decode(val_stream.tokens[: 4 * max(lengths)].tolist())
    runner = model if cfg.selector == "query" else SelectorView(model, cfg.selector)
    result["passkey"] = {
        mode: passkey_accuracy(runner, filler, tokenizer, lengths, cfg.passkey_depths, mode, device)
        for mode in ("full", "sparse")
    }
    if cfg.forecast_metrics and model.has_forecasts:
        section = forecast_report(model, val_stream, seq_len, batch_size=cfg.batch_size, max_batches=cfg.max_batches,
                                  diag_windows=cfg.diag_windows, device=device, passkey=False)
        other = "forecast" if cfg.selector == "query" else "query"
        section["passkey"] = {
            cfg.selector: result["passkey"]["sparse"],
            other: passkey_accuracy(SelectorView(model, other), filler, tokenizer, lengths, cfg.passkey_depths,
                                    "sparse", device),
        }
        result["forecast"] = section
    if cfg.figure:
        result["figure"] = str(plot_eval(result, Path(cfg.checkpoint) / "eval.png"))
    return result


def plot_eval(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = [int(k) for k in result["topk_sweep"]]
    axes[0].plot(ks, list(result["topk_sweep"].values()), marker="o", label="sparse mode")
    axes[0].axhline(result["bpb"]["full"], color="k", linestyle="--", label="full mode")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("topk (blocks)")
    axes[0].set_ylabel("bits per byte")
    axes[0].legend()
    layers = [r["layer"] for r in result["layers"]]
    axes[1].bar(layers, [r["attn_sparsity"] for r in result["layers"]])
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("AttnSparsity (kept full-attention mass)")
    axes[1].set_ylim(0, 1)
    fig.suptitle(f"{result.get('method')}: {Path(result['checkpoint']).name}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
