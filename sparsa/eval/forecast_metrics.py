"""SparDA forecast metrics: per-layer recall of the query selector's blocks, kept attention mass,
sparse-mode bits per byte / perplexity and passkey accuracy under each selector.

Per-layer metrics are measured on the hidden states of the sparse model routed by the query
selector (the reference run): at layer l the query selector's blocks come from layer l's own
queries; the forecast's blocks from the Forecast that predicts layer l (layer 0: `self_forecast` on
layer 0's input; layer l >= 1: `forecasts[l - 1]` on layer l - 1's input), scored against layer l's
block keys. Both are computed per document (packed windows keep document boundaries).

  recall       hits / |S_query|, counting only NON-forced blocks (forced init / local blocks are in
               both selections by construction) and only rows with a real choice (more non-forced
               candidate blocks than free top-k slots), micro-averaged over rows and KV groups.
  recall_all   the same over all rows and all selected blocks, forced ones included.
  kept_mass    mean over query heads and rows t >= topk * block_size of the full (dense, causal)
               attention probability that falls on the tokens a selector lets the row see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..data import ByteTokenizer, sequential_batches, tokenizer_for_checkpoint
from ..layers.forecast import forecast_select_from_keys
from ..ops._checks import doc_spans
from ..ops.sparse_attn.naive import selection_token_mask
from .metrics import full_attention_probs


class SelectorView:
    """Calls `model(..., selector=selector)`; everything else passes through (for passkey_accuracy)."""

    def __init__(self, model, selector: str):
        self.model, self.selector = model, selector

    def __call__(self, *args, **kwargs):
        return self.model(*args, selector=self.selector, **kwargs)

    def eval(self):
        self.model.eval()
        return self

    def __getattr__(self, name):
        return getattr(self.model, name)


def _membership(idx: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[B, T, H, K] block indices (-1 padded) -> bool [B, T, H, n_blocks]."""
    safe = torch.where(idx >= 0, idx.long().clamp(max=n_blocks), torch.full_like(idx.long(), n_blocks))
    out = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, safe, True)
    return out[..., :n_blocks]


def _forced(seqlen: int, block_size: int, init_blocks: int, local_blocks: int, device) -> torch.Tensor:
    n_blocks = -(-seqlen // block_size)
    cur = torch.arange(seqlen, device=device)[:, None] // block_size
    block = torch.arange(n_blocks, device=device)[None, :]
    return ((block < init_blocks) & (block <= cur)) | ((block <= cur) & (block > cur - local_blocks))


def selection_overlap(idx_query, idx_forecast, block_size: int, topk: int, init_blocks: int, local_blocks: int) -> dict:
    """Counts for recall of one document: both [B, T, Hkv, K] with local positions."""
    seqlen = idx_query.shape[1]
    n_blocks = -(-seqlen // block_size)
    sq, sf = _membership(idx_query, n_blocks), _membership(idx_forecast, n_blocks)
    forced = _forced(seqlen, block_size, init_blocks, local_blocks, idx_query.device)  # [T, nb]
    cur = torch.arange(seqlen, device=idx_query.device) // block_size
    candidates = ((torch.arange(n_blocks, device=cur.device)[None, :] < cur[:, None]) & ~forced).sum(-1)  # [T]
    free_slots = topk - forced.sum(-1)  # [T]
    real_choice = (candidates > free_slots)[None, :, None]  # [1, T, 1]
    nf_q = sq & ~forced[None, :, None, :]
    hits_nf = (nf_q & sf).sum(-1)  # [B, T, H]
    size_nf = nf_q.sum(-1)
    return {
        "hits": int((hits_nf * real_choice).sum()), "total": int((size_nf * real_choice).sum()),
        "hits_all": int((sq & sf).sum()), "total_all": int(sq.sum()),
        "same_rows": int((sq == sf).all(-1).sum()), "rows": int(sq.shape[0] * sq.shape[1] * sq.shape[2]),
    }


def kept_mass(q, k, idx, block_size: int, min_position: int) -> tuple[float, int]:
    """(sum, count) over heads and rows t >= min_position of the full-attention mass on the allowed tokens."""
    seqlen = q.shape[1]
    if seqlen <= min_position:
        return 0.0, 0
    group = q.shape[2] // k.shape[2]
    probs = full_attention_probs(q, k)  # [B, Hq, T, T] float64
    allowed = selection_token_mask(idx, seqlen, block_size).repeat_interleave(group, dim=1)
    kept = (probs * allowed).sum(-1)[..., min_position:]
    return float(kept.sum()), kept.numel()


@torch.no_grad()
def forecast_layer_metrics(model, stream, seq_len: int, n_windows: int, device, mass: bool = True) -> list[dict]:
    """Per layer: recall, recall_all, exact-row agreement and (mass=True) kept mass of both selectors."""
    if not model.has_forecasts:
        raise ValueError("the model has no forecasts (sparsa distill-forecast)")
    sc = model.config.sparse
    geometry = dict(block_size=sc.block_size, topk=sc.topk, init_blocks=sc.init_blocks, local_blocks=sc.local_blocks)
    n_layers = len(model.layers)
    acc = [dict(hits=0, total=0, hits_all=0, total_all=0, same_rows=0, rows=0, mass_q=0.0, mass_f=0.0, n_mass=0)
           for _ in range(n_layers)]
    was_training = model.training
    model.eval()
    for batch in sequential_batches(stream, 1, seq_len, n_windows):
        batch = batch.to(device)
        records = [dict() for _ in model.layers]
        for layer, record in zip(model.layers, records):
            layer.attn.record = record
        try:
            out = model(batch.tokens, mode="sparse", cu_seqlens=batch.cu_seqlens)
        finally:
            for layer in model.layers:
                layer.attn.record = None
        cos, sin = model.rope(batch.tokens, batch.cu_seqlens, None)
        for index, record in enumerate(records):
            fc = model.self_forecast if index == 0 else model.forecasts[index - 1]
            src = records[0 if index == 0 else index - 1]
            f = fc(src["x"], cos, sin).float()
            q, k = record["q"].float(), record["k"].float()
            idx_q_all = out.block_indices[index]
            for s, e in doc_spans(batch.cu_seqlens):
                idx_q = idx_q_all[:, s:e]
                idx_f = forecast_select_from_keys(f[:, s:e], k[:, s:e], **geometry)
                counts = selection_overlap(idx_q, idx_f, **geometry)
                for key, value in counts.items():
                    acc[index][key] += value
                if mass:
                    min_pos = sc.topk * sc.block_size
                    sum_q, n = kept_mass(q[:, s:e], k[:, s:e], idx_q, sc.block_size, min_pos)
                    sum_f, _ = kept_mass(q[:, s:e], k[:, s:e], idx_f, sc.block_size, min_pos)
                    acc[index]["mass_q"] += sum_q
                    acc[index]["mass_f"] += sum_f
                    acc[index]["n_mass"] += n
    model.train(was_training)
    rows = []
    for index, a in enumerate(acc):
        row = {"layer": index, "predictor": "self_forecast" if index == 0 else f"forecasts[{index - 1}]",
               "recall": a["hits"] / a["total"] if a["total"] else math.nan,
               "recall_all": a["hits_all"] / a["total_all"] if a["total_all"] else math.nan,
               "same_selection": a["same_rows"] / a["rows"] if a["rows"] else math.nan,
               "n_choice_blocks": a["total"]}
        if mass:
            row["kept_mass_query"] = a["mass_q"] / a["n_mass"] if a["n_mass"] else math.nan
            row["kept_mass_forecast"] = a["mass_f"] / a["n_mass"] if a["n_mass"] else math.nan
        rows.append(row)
    return rows


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def forecast_recall(model, stream, seq_len: int, n_windows: int, device) -> dict:
    """Cheap summary for training logs: per-layer recall (non-forced), recall_all, mean over layers >= 1."""
    rows = forecast_layer_metrics(model, stream, seq_len, n_windows, device, mass=False)
    return {"recall": [r["recall"] for r in rows], "recall_all": [r["recall_all"] for r in rows],
            "mean_recall_ge1": _mean([r["recall"] for r in rows[1:]])}


@torch.no_grad()
def evaluate_bpb_selector(model, stream, seq_len: int, batch_size: int, max_batches: int, device,
                          selector: str = "query", mode: str = "sparse", topk: int | None = None) -> float:
    """Bits per byte (nats per token / ln 2 / the stream's average bytes per token) in `mode` with the given selector."""
    from ..train.ssa import autocast_for

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nats, total_targets = 0.0, 0
    for batch in sequential_batches(stream, batch_size, seq_len, max_batches):
        batch = batch.to(device)
        with autocast_for(device):
            out = model(batch.tokens, targets=batch.targets, mode=mode, cu_seqlens=batch.cu_seqlens, topk=topk,
                        selector=selector)
        total_nats += float(out.ce) * out.n_targets
        total_targets += out.n_targets
    model.train(was_training)
    return total_nats / max(total_targets, 1) / math.log(2) / stream.bytes_per_token


@dataclass
class ForecastEvalConfig:
    checkpoint: str
    data: str | None = None
    seq_len: int | None = None
    batch_size: int = 4
    max_batches: int = 8
    diag_windows: int = 4
    passkey: bool = True
    passkey_lengths: tuple[int, ...] | None = None
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    device: str | None = None


def forecast_report(model, val_stream, seq_len: int, *, batch_size: int, max_batches: int, diag_windows: int,
                    device, passkey_lengths=None, passkey_depths=(0.1, 0.5, 0.9), passkey: bool = True,
                    tokenizer=None) -> dict:
    """Everything the issue asks for, for a model with forecasts (`tokenizer`: the stream's; bytes by default)."""
    from .passkey import passkey_accuracy

    layers = forecast_layer_metrics(model, val_stream, seq_len, diag_windows, device, mass=True)
    bpb = {"full": evaluate_bpb_selector(model, val_stream, seq_len, batch_size, max_batches, device, mode="full")}
    for selector in ("query", "forecast"):
        bpb[selector] = evaluate_bpb_selector(model, val_stream, seq_len, batch_size, max_batches, device, selector)
    ppl = {k: 2.0 ** (v * val_stream.bytes_per_token) for k, v in bpb.items()}  # per token of the stream's tokenizer
    result = {
        "layers": layers,
        "mean_recall_ge1": _mean([r["recall"] for r in layers[1:]]),
        "mean_recall_all_ge1": _mean([r["recall_all"] for r in layers[1:]]),
        "bpb": bpb,
        "perplexity": ppl,
        "ppl_ratio_forecast_vs_query": ppl["forecast"] / ppl["query"],
    }
    result["targets"] = {
        "recall_ge_0.9": bool(result["mean_recall_ge1"] >= 0.9),
        "ppl_within_1pct": bool(result["ppl_ratio_forecast_vs_query"] <= 1.01),
    }
    if passkey:
        lengths = passkey_lengths or tuple(sorted({max(128, seq_len // 2) - 8, seq_len - 8}))
        tokenizer = tokenizer or ByteTokenizer()
        filler = tokenizer.decode(val_stream.tokens[: 4 * max(lengths)].tolist())
        result["passkey"] = {
            selector: passkey_accuracy(SelectorView(model, selector), filler, tokenizer, lengths,
                                       passkey_depths, "sparse", device)
            for selector in ("query", "forecast")
        }
    return result


def evaluate_forecast(cfg: ForecastEvalConfig) -> dict:
    from ..train.ssa import load_streams, resolve_device

    device = resolve_device(cfg.device)
    model, meta = load_model(Path(cfg.checkpoint), device)
    if not model.has_forecasts:
        raise ValueError(f"checkpoint {cfg.checkpoint!r} has no forecasts: run sparsa distill-forecast first")
    model.eval()
    seq_len = cfg.seq_len or model.config.max_seq_len
    tokenizer = tokenizer_for_checkpoint(cfg.checkpoint, model.config.vocab_size)
    _, val_stream = load_streams(cfg.data, tokenizer)
    sc = model.config.sparse
    result = {"checkpoint": str(cfg.checkpoint), "method": meta.get("method"), "seq_len": seq_len,
              "block_size": sc.block_size, "topk": sc.topk, "init_blocks": sc.init_blocks,
              "local_blocks": sc.local_blocks, "distill": meta.get("forecast_distill")}
    result.update(forecast_report(model, val_stream, seq_len, batch_size=cfg.batch_size, max_batches=cfg.max_batches,
                                  diag_windows=cfg.diag_windows, device=device, passkey_lengths=cfg.passkey_lengths,
                                  passkey_depths=cfg.passkey_depths, passkey=cfg.passkey, tokenizer=tokenizer))
    return result


def format_report(result: dict) -> str:
    lines = []
    if "checkpoint" in result:
        lines.append(f"checkpoint {result['checkpoint']} ({result.get('method')}), block {result['block_size']}, "
                     f"topk {result['topk']}, seq_len {result['seq_len']}")
    lines.append(f"{'layer':>5} {'predictor':>14} {'recall':>7} {'recall_all':>10} {'kept q':>7} {'kept f':>7}")
    for r in result["layers"]:
        lines.append(f"{r['layer']:>5} {r['predictor']:>14} {r['recall']:>7.4f} {r['recall_all']:>10.4f} "
                     f"{r.get('kept_mass_query', math.nan):>7.4f} {r.get('kept_mass_forecast', math.nan):>7.4f}")
    lines.append(f"mean recall over layers >= 1: {result['mean_recall_ge1']:.4f}")
    b, p = result["bpb"], result["perplexity"]
    lines.append(f"bits per byte: full {b['full']:.4f}  sparse/query {b['query']:.4f}  sparse/forecast {b['forecast']:.4f}")
    lines.append(f"perplexity:    full {p['full']:.4f}  sparse/query {p['query']:.4f}  sparse/forecast {p['forecast']:.4f}"
                 f"  (forecast / query = {result['ppl_ratio_forecast_vs_query']:.4f})")
    if "passkey" in result:
        lines.append("passkey accuracy (sparse): " + ", ".join(f"{s}: {v['accuracy']:.2f}"
                                                            for s, v in result["passkey"].items()))
    lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items()))
    return "\n".join(lines)
