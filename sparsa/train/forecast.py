"""`sparsa distill-forecast CHECKPOINT`: train SparDA forecast projections on a frozen backbone.

Layer-wise loop (the paper's memory trick, docs/forecast.md): the frozen backbone runs layer by
layer under no_grad, so every hidden state is detached; at layer l the forecast that predicts layer
l's blocks (layer 0: `self_forecast` on layer 0's input; layer l >= 1: `forecasts[l - 1]`, computed at
layer l - 1 from its detached normalised input) is scored against layer l's real queries and keys,
and that layer's loss is back-propagated at once. A loss graph therefore holds one Forecast
projection and one layer's teacher tensors: memory is flat in depth.

Targets (`--target`):
  block_mass (default)  KL(P_blk || softmax_c(f . kbar_c * scale_s)), P_blk the teacher's block
                        attention mass: the group-averaged causal softmax of the layer's real queries
                        over its keys, summed per complete visible block and renormalised
                        (`sparsa.block_attention_kl`).
  topk_rest             the paper's objective on SSA's selector distribution: P = group mean of
                        softmax_c(q . kbar_c * scale_t) over the visible blocks, E_t = the query
                        selector's chosen blocks minus the forced ones, KL over [P_E, 1 - sum P_E]
                        vs [Q_E, 1 - sum Q_E] (entries clamped >= 1e-8, renormalised).

The forecast weights are written into the checkpoint (model.safetensors rewritten atomically with
the backbone weights unchanged, then config.json with "forecast": true); the optimizer state goes to
forecast_optimizer.pt, the step to forecast_state.json (written last), metrics to
forecast_metrics.jsonl. `--resume` continues exactly (data depends on seed and step only).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write, load_model, read_config, save_model, write_json
from ..data import random_batch, tokenizer_for_checkpoint
from ..ops import block_keys
from ..ops._checks import doc_spans
from .ssa import (
    SingleProcess,
    append_metrics,
    autocast_for,
    load_streams,
    read_metrics,
    resolve_device,
    write_lines,
)

TARGETS = ("block_mass", "topk_rest")
BACKBONE_MODES = ("sparse", "full")
INITS = ("query", "random")
FORECAST_OPTIMIZER_FILE = "forecast_optimizer.pt"
FORECAST_STATE_FILE = "forecast_state.json"
FORECAST_METRICS_FILE = "forecast_metrics.jsonl"


@dataclass
class DistillConfig:
    checkpoint: str
    out: str | None = None  # default: write into `checkpoint`
    steps: int = 200
    batch_size: int = 8
    seq_len: int | None = None  # default: the model's max_seq_len
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 0  # then constant (the paper's schedule)
    weight_decay: float = 0.01
    grad_clip: float = 0.5
    target: str = "block_mass"
    backbone_mode: str = "sparse"  # the frozen backbone's mode (query selector) while distilling
    init: str = "query"
    student_scale: float | None = None  # student softmax scale; default head_dim ** -0.5
    eval_every: int = 50
    eval_batches: int = 2
    save_every: int = 50
    seed: int = 0
    data: str | None = None
    device: str | None = None
    resume: bool = False
    restart: bool = False  # replace forecasts the checkpoint already has
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"backbone_mode must be one of {BACKBONE_MODES}, got {self.backbone_mode!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.student_scale is not None and not self.student_scale > 0:
            raise ValueError(f"student_scale must be positive, got {self.student_scale}")
        if self.resume and self.restart:
            raise ValueError("resume and restart exclude each other")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"stop_after must be a positive int, got {self.stop_after}")


# ---------------------------------------------------------------------------------------- losses
def reference_block_attention_kl(q_t, k_t, f_s, kbar_s, *, block_size, scale_t=None, scale_s=1.0,
                                 reduction="mean", cu_seqlens=None):
    """Materialised `sparsa.block_attention_kl` (same contract): the fallback when StreamKL is absent."""
    if cu_seqlens is not None:
        rows, first = [], 0
        for s, e in doc_spans(cu_seqlens):
            n_blocks = (e - s) // block_size
            rows.append(reference_block_attention_kl(
                q_t[:, s:e], k_t[:, s:e], f_s[:, s:e], kbar_s[:, first: first + n_blocks], block_size=block_size,
                scale_t=scale_t, scale_s=scale_s, reduction="none"))
            first += n_blocks
        per_row = torch.cat(rows, dim=1)
    else:
        batch, seqlen, n_heads_q, head_dim = q_t.shape
        n_heads_kv = k_t.shape[2]
        group = n_heads_q // n_heads_kv
        n_blocks = seqlen // block_size
        scale_t = head_dim ** -0.5 if scale_t is None else scale_t
        acc = torch.float64 if f_s.dtype == torch.float64 else torch.float32
        pos = torch.arange(seqlen, device=q_t.device)
        visible = torch.arange(n_blocks, device=q_t.device)[None, :] < ((pos + 1) // block_size)[:, None]  # [T, nb]
        if n_blocks == 0:
            per_row = (f_s.to(acc) * 0).sum(-1)
        else:
            with torch.no_grad():
                logits = torch.einsum("bthd,bjhd->bhtj", q_t.to(acc), k_t.to(acc).repeat_interleave(group, dim=2))
                causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q_t.device).tril()
                probs = torch.softmax((logits * scale_t).masked_fill(~causal, float("-inf")), dim=-1)
                pbar = probs.view(batch, n_heads_kv, group, seqlen, seqlen).mean(2)
                mass = pbar[..., : n_blocks * block_size].reshape(batch, n_heads_kv, seqlen, n_blocks, block_size).sum(-1)
                mass = mass.permute(0, 2, 1, 3) * visible[None, :, None, :]  # [B, T, Hkv, nb]
                P = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
            z = torch.einsum("bthd,bchd->bthc", f_s.to(acc), kbar_s[:, :n_blocks].to(acc)) * scale_s
            log_q = torch.log_softmax(z.masked_fill(~visible[None, :, None, :], float("-inf")), dim=-1)
            log_q = torch.where(visible[None, :, None, :], log_q, torch.zeros_like(log_q))
            per_row = (torch.special.xlogy(P, P) - P * log_q).sum(-1)
            per_row = torch.where(visible.any(-1)[None, :, None], per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if cu_seqlens is not None:
        lengths = [e - s for s, e in doc_spans(cu_seqlens)]
    else:
        lengths = [q_t.shape[1]] * q_t.shape[0]
    n_valid = sum(max(0, n - block_size + 1) for n in lengths) * k_t.shape[2]
    return per_row.sum() / max(n_valid, 1)


def block_attention_kl(*args, **kwargs):
    """`sparsa.block_attention_kl` (StreamKL) when available, else `reference_block_attention_kl`."""
    try:
        from ..ops.kl import block_attention_kl as streamkl
    except (ImportError, AttributeError):
        streamkl = reference_block_attention_kl
    return streamkl(*args, **kwargs)


def _forced(cur: torch.Tensor, n_blocks: int, init_blocks: int, local_blocks: int) -> torch.Tensor:
    block = torch.arange(n_blocks, device=cur.device)[None, :]
    return (block < init_blocks) | ((block > cur[:, None] - local_blocks) & (block <= cur[:, None]))


def topk_rest_kl(q_t, k_t, f_s, kbar_s, block_indices, *, block_size, init_blocks, local_blocks,
                 scale_t=None, scale_s=1.0, cu_seqlens=None, eps=1e-8):
    """The paper's top-k restricted forward KL with a "rest" bucket, on SSA's selector distribution.

    P[t, c] = (1/G) sum_{h in g} softmax_c(q_t[t, h] . kbar_t[c] * scale_t) over the visible complete blocks
    (c < (t + 1) // bs, kbar_t = block_keys(k_t)); Q[t, c] = softmax_c(f_s[t] . kbar_s[c] * scale_s) over
    the same blocks; E_t = blocks of `block_indices` [B, T, Hkv, K] that are not forced; loss =
    mean over rows with E_t non-empty of KL([P_E, 1 - sum P_E] || [Q_E, 1 - sum Q_E]) (clamped >= eps,
    renormalised). Materialises [B, T, Hkv, n_blocks] (n_blocks = T / block_size) only.
    """
    spans = doc_spans(cu_seqlens) if cu_seqlens is not None else [(0, q_t.shape[1])]
    total, count, first = None, 0, 0
    for s, e in spans:
        n_blocks = (e - s) // block_size
        piece = _topk_rest_rows(q_t[:, s:e], k_t[:, s:e], f_s[:, s:e], kbar_s[:, first: first + n_blocks],
                                block_indices[:, s:e], block_size, init_blocks, local_blocks, scale_t, scale_s, eps)
        first += n_blocks
        if piece is None:
            continue
        rows, n = piece
        total = rows if total is None else total + rows
        count += n
    if total is None:
        return (f_s.float() * 0).sum()
    return total / max(count, 1)


def _topk_rest_rows(q_t, k_t, f_s, kbar_s, idx, block_size, init_blocks, local_blocks, scale_t, scale_s, eps):
    batch, seqlen, n_heads_q, head_dim = q_t.shape
    n_heads_kv = k_t.shape[2]
    group = n_heads_q // n_heads_kv
    n_blocks = seqlen // block_size
    if n_blocks == 0:
        return None
    scale_t = head_dim ** -0.5 if scale_t is None else scale_t
    acc = torch.float64 if f_s.dtype == torch.float64 else torch.float32
    pos = torch.arange(seqlen, device=q_t.device)
    cur = pos // block_size
    visible = torch.arange(n_blocks, device=q_t.device)[None, :] < ((pos + 1) // block_size)[:, None]  # [T, nb]
    vis = visible[None, :, None, :]
    with torch.no_grad():
        kbar_t = block_keys(k_t, block_size).to(acc).repeat_interleave(group, dim=2)  # [B, nb, Hq, D]
        a = torch.einsum("bthd,bchd->bthc", q_t.to(acc), kbar_t) * scale_t
        p = torch.softmax(a.masked_fill(~visible[None, :, None, :], float("-inf")), dim=-1)
        p = torch.nan_to_num(p, nan=0.0).view(batch, seqlen, n_heads_kv, group, n_blocks).mean(3)
        chosen = torch.zeros(batch, seqlen, n_heads_kv, n_blocks + 1, dtype=torch.bool, device=q_t.device)
        safe = torch.where(idx >= 0, idx.long().clamp(max=n_blocks), torch.full_like(idx.long(), n_blocks))
        chosen.scatter_(-1, safe, True)
        chosen = chosen[..., :n_blocks] & ~_forced(cur, n_blocks, init_blocks, local_blocks)[None, :, None, :] & vis
        row_ok = chosen.any(-1)  # [B, T, Hkv]
        p_e = torch.where(chosen, p, torch.zeros_like(p))
        p_til = torch.cat([p_e, (1 - p_e.sum(-1, keepdim=True))], dim=-1).clamp_min(eps)
        p_til = p_til / p_til.sum(-1, keepdim=True)
        keep = torch.cat([chosen, torch.ones_like(chosen[..., :1])], dim=-1)
    z = torch.einsum("bthd,bchd->bthc", f_s.to(acc), kbar_s.to(acc)) * scale_s
    q = torch.softmax(z.masked_fill(~vis, float("-inf")), dim=-1)
    q = torch.where(vis, q, torch.zeros_like(q))
    q_e = torch.where(chosen, q, torch.zeros_like(q))
    q_til = torch.cat([q_e, (1 - q_e.sum(-1, keepdim=True))], dim=-1).clamp_min(eps)
    q_til = q_til / q_til.sum(-1, keepdim=True)
    kl = torch.where(keep, p_til * (p_til.log() - q_til.log()), torch.zeros_like(q_til)).sum(-1)
    kl = torch.where(row_ok, kl, torch.zeros_like(kl))
    return kl.sum(), int(row_ok.sum())


# ------------------------------------------------------------------------------------- the loop
def predictor_of(model, layer_index: int):
    """The Forecast that predicts layer `layer_index`'s blocks and the layer whose input it reads."""
    if layer_index == 0:
        return model.self_forecast, 0
    return model.forecasts[layer_index - 1], layer_index - 1


def distill_step(model, tokens, cu_seqlens, cfg: DistillConfig, weight: float = 1.0, on_layer=None) -> list[float]:
    """One micro-batch: layer-wise forward of the frozen backbone, each layer's forecast loss
    back-propagated at once (times `weight`). Returns the per-layer losses. `on_layer(index)` is called
    after each layer's backward (tests use it to check that a graph spans one layer)."""
    sc = model.config.sparse
    device = tokens.device
    scale_s = cfg.student_scale or model.config.head_dim ** -0.5
    with torch.no_grad():
        cos, sin = model.rope(tokens, cu_seqlens, None)
        x = model.embed(tokens)
    f_next, losses = None, []
    for index, layer in enumerate(model.layers):
        record = {}
        with torch.no_grad(), autocast_for(device):
            u = layer.attn_norm(x)
            layer.attn.record = record
            try:
                att = layer.attn(u, cos, sin, mode=cfg.backbone_mode, cu_seqlens=cu_seqlens)
            finally:
                layer.attn.record = None
            x = x + att.out
            x = x + layer.mlp(layer.mlp_norm(x))
        q, k = record["q"], record["k"]
        with autocast_for(device):
            pred = model.self_forecast(u, cos, sin) if index == 0 else f_next
            f_next = model.forecasts[index](u, cos, sin) if index < len(model.forecasts) else None
        kbar = block_keys(k, sc.block_size, cu_seqlens).detach()
        if cfg.target == "block_mass":
            loss = block_attention_kl(q, k, pred.to(k.dtype), kbar, block_size=sc.block_size, scale_s=scale_s,
                                      reduction="mean", cu_seqlens=cu_seqlens)
        else:
            idx = att.block_indices if att.block_indices is not None else layer.attn.select(q, k, cu_seqlens)
            loss = topk_rest_kl(q, k, pred, kbar, idx, block_size=sc.block_size, init_blocks=sc.init_blocks,
                                local_blocks=sc.local_blocks, scale_s=scale_s, cu_seqlens=cu_seqlens)
        (loss * weight).backward()
        losses.append(float(loss.detach()))
        if on_layer is not None:
            on_layer(index)
    return losses


def make_forecast_optimizer(model, cfg: DistillConfig) -> torch.optim.Optimizer:
    params = model.forecast_parameters()
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-6, weight_decay=cfg.weight_decay)


def lr_for(step: int, cfg: DistillConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def freeze_backbone(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.forecast_parameters():
        p.requires_grad_(True)


def save_distill_checkpoint(out: Path, model, optimizer, meta: dict, cfg: DistillConfig, step: int) -> None:
    """Backbone + forecast weights (atomic), config.json with "forecast": true, optimizer, then state."""
    extra = {k: v for k, v in meta.items() if k != "model"}
    extra.update(model.checkpoint_meta())
    extra["forecast_distill"] = {**dataclasses.asdict(cfg), "step": step}
    save_model(out, model, model.config, extra=extra)
    atomic_write(out / FORECAST_OPTIMIZER_FILE,
                 lambda tmp: torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp))
    write_json(out / FORECAST_STATE_FILE, {"step": step, "target": cfg.target, "time": time.time()})


class DistillRuntime(SingleProcess):
    """How `run_distill` talks to the hardware: one process. `sparsa.train.distributed` subclasses it
    for data-parallel ranks under torchrun; every hook here is the identity of single-process
    distillation. From `SingleProcess`: `device`, `rank`, `world_size`, `is_main` (evaluates, logs and
    writes the checkpoint), `sum_over_ranks` (the per-layer losses), `barrier` (after the setup and
    after each save)."""

    def micro_batch_index(self, cfg: DistillConfig, micro: int) -> int:
        """The micro-batch of a single process with grad_accum world_size * G that this rank's micro-batch
        `micro` stands for: it feeds the batch seed."""
        return self.rank * cfg.grad_accum + micro

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Every forecast gradient becomes its mean over the ranks (before clipping)."""


def distill(cfg: DistillConfig) -> dict:
    """Distils (or resumes) the forecasts of cfg.checkpoint; returns a summary dict."""
    return run_distill(cfg, DistillRuntime(resolve_device(cfg.device)))


def copy_tokenizer(source: Path, out: Path) -> None:
    """A converted checkpoint's tokenizer/ folder travels with it to a new --out."""
    import shutil

    if source.resolve() != out.resolve() and (source / "tokenizer").is_dir() and not (out / "tokenizer").exists():
        shutil.copytree(source / "tokenizer", out / "tokenizer")


def run_distill(cfg: DistillConfig, rt: DistillRuntime) -> dict:
    """The distillation loop, on one process or on every rank of a torchrun job (`rt` says which).

    Rank r's micro-batch m of a step is micro-batch r * grad_accum + m of single-process distillation,
    weighed by 1 / grad_accum; the forecast gradients are averaged over ranks before clipping, so N
    ranks with grad_accum G train as one process with grad_accum N * G. Rank 0 alone evaluates, writes
    metrics and checkpoints."""
    from ..eval.forecast_metrics import forecast_recall

    source = Path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else source
    device = rt.device
    torch.manual_seed(cfg.seed)
    tokenizer = tokenizer_for_checkpoint(source, read_config(source)["model"]["vocab_size"])
    train_stream, val_stream = load_streams(cfg.data, tokenizer)
    start_step = 0
    if cfg.resume:
        if not (out / FORECAST_STATE_FILE).exists():
            raise ValueError(f"resume: {str(out)!r} holds no {FORECAST_STATE_FILE} (nothing to resume)")
        model, meta = load_model(out, device)
        if not model.has_forecasts:
            raise ValueError(f"resume: the checkpoint in {str(out)!r} has no forecasts")
        freeze_backbone(model)
        optimizer = make_forecast_optimizer(model, cfg)
        state = torch.load(out / FORECAST_OPTIMIZER_FILE, map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        rt.barrier()  # every rank has read the checkpoint before rank 0 rewrites anything in `out`
        if rt.is_main:
            kept = [r for r in read_metrics(out / FORECAST_METRICS_FILE) if r["step"] < start_step or
                    (r["kind"] == "eval" and r["step"] <= start_step)]
            atomic_write(out / FORECAST_METRICS_FILE, lambda tmp: write_lines(tmp, kept))
    else:
        if (out / FORECAST_STATE_FILE).exists() and not cfg.restart:
            raise ValueError(f"{str(out)!r} already holds a forecast distillation: pass --resume or --restart")
        model, meta = load_model(source, device)
        if model.has_forecasts:
            if not cfg.restart:
                raise ValueError(f"checkpoint {str(source)!r} already has forecasts: pass --resume to continue "
                                 "or --restart to train new ones")
            del model.forecasts
            del model.self_forecast
        model.add_forecasts(init=cfg.init)
        freeze_backbone(model)
        optimizer = make_forecast_optimizer(model, cfg)
        rt.barrier()  # every rank has read `source` (it may be `out`) before rank 0 writes there
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / FORECAST_METRICS_FILE).unlink(missing_ok=True)
            copy_tokenizer(source, out)
    model.eval()  # no dropout anywhere; the backbone is frozen
    seq_len = cfg.seq_len or model.config.max_seq_len
    end_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, start_step + cfg.stop_after)
    bar = tqdm(range(start_step, end_step), desc="distill-forecast", disable=not (cfg.progress and rt.is_main),
               initial=start_step, total=cfg.steps, dynamic_ncols=True)
    params = model.forecast_parameters()
    last: dict = {}

    def log_eval(done: int) -> None:  # rank 0 only (no collectives inside)
        rec = forecast_recall(model, val_stream, seq_len, cfg.eval_batches, device)
        append_metrics(out / FORECAST_METRICS_FILE, {"kind": "eval", "step": done, **rec})
        bar.write(f"step {done}: recall per layer " + ", ".join(f"{r:.3f}" for r in rec["recall"]))

    if start_step == 0 and rt.is_main:
        log_eval(0)  # the initial forecasts (e.g. the query warm start)
    for step in bar:
        started = time.perf_counter()
        lr = lr_for(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        per_layer = [0.0] * model.config.n_layers
        for micro in range(cfg.grad_accum):
            index = rt.micro_batch_index(cfg, micro)
            batch = random_batch(train_stream, cfg.batch_size, seq_len, [cfg.seed, 13, step, index]).to(device)
            losses = distill_step(model, batch.tokens, batch.cu_seqlens, cfg, weight=1.0 / cfg.grad_accum)
            per_layer = [a + b / cfg.grad_accum for a, b in zip(per_layer, losses)]
        rt.average_grads(params)
        per_layer = [v / rt.world_size for v in rt.sum_over_ranks(per_layer)]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        loss = sum(per_layer) / len(per_layer)
        last = {"kind": "train", "step": step, "lr": lr, "loss": loss, "layer_loss": per_layer, "grad_norm": grad_norm,
                "tokens_per_s": cfg.batch_size * seq_len * cfg.grad_accum * rt.world_size / elapsed}
        done = step + 1
        if rt.is_main:
            append_metrics(out / FORECAST_METRICS_FILE, last)
            bar.set_postfix(loss=f"{loss:.4f}")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                log_eval(done)
        if done % cfg.save_every == 0 or done == end_step:
            if rt.is_main:
                save_distill_checkpoint(out, model, optimizer, meta, cfg, done)
            rt.barrier()  # the checkpoint is complete before any rank goes on (or returns)
    bar.close()
    rt.barrier()  # also when no step ran (a resume at the end): rank 0 has rewritten the metrics
    return {"out": str(out), "steps": end_step, "last": last,
            "n_forecast_params": sum(p.numel() for p in params)}


# ------------------------------------------------------------------------------------------ CLI
def add_distill_args(p) -> None:
    d = DistillConfig(checkpoint="")
    p.add_argument("checkpoint", help="checkpoint folder (sparsa train output, or a converted model)")
    p.add_argument("--out", default=None, help="write here instead of into CHECKPOINT")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the model's context)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--target", default=d.target, choices=TARGETS,
                   help="block_mass: next layer's block attention mass (default); topk_rest: the paper's KL")
    p.add_argument("--backbone-mode", default=d.backbone_mode, choices=BACKBONE_MODES,
                   help="mode of the frozen backbone while distilling (query selector)")
    p.add_argument("--init", default=d.init, choices=INITS,
                   help="query: warm start from the next layer's group-mean queries; random: Kaiming")
    p.add_argument("--student-scale", type=float, default=None, help="student softmax scale (default 1/sqrt(d))")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=None, help="text file or folder (default: Shakespeare)")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue the distillation saved in --out")
    p.add_argument("--restart", action="store_true", help="replace existing forecasts")
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def cmd_distill(args) -> int:
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = not args.no_progress
    summary = distill(DistillConfig(**values))
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0


def cmd_forecast_eval(args) -> int:
    from ..eval.forecast_metrics import ForecastEvalConfig, evaluate_forecast, format_report

    cfg = ForecastEvalConfig(
        checkpoint=args.checkpoint, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
        max_batches=args.max_batches, diag_windows=args.diag_windows, device=args.device,
        passkey_lengths=tuple(args.passkey_lengths) if args.passkey_lengths else None,
        passkey=not args.no_passkey,
    )
    result = evaluate_forecast(cfg)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("distill-forecast", help="train SparDA forecast projections on a frozen checkpoint")
    add_distill_args(p)
    p.set_defaults(func=cmd_distill)

    p = subparsers.add_parser("forecast-eval", help="forecast vs query selector: recall, kept mass, bpb, passkey")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-batches", type=int, default=8)
    p.add_argument("--diag-windows", type=int, default=4, help="windows for per-layer recall / kept mass")
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=None)
    p.add_argument("--no-passkey", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_forecast_eval)
