"""`sparsa train`: full, sparse-only and SSA training of a SparsaLM on a text corpus.

SSA: each step draws the main mode (full with probability `full_ratio`, one draw for all layers of
a micro-batch); every layer also computes the other mode; loss = CE(main) + alpha * mean over
layers of [SmoothL1(h_full, sg(h_sparse)) + SmoothL1(h_sparse, sg(h_full))].
Data and mode draws are functions of (seed, step, micro-step), so `--resume` reproduces an
uninterrupted run exactly on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import OPTIMIZER_FILE, STATE_FILE, atomic_write, load_model, save_model, write_json
from ..config import ModelConfig, preset
from ..data import (
    ByteTokenizer,
    PackedBatch,
    TokenStream,
    load_documents,
    pack_windows,
    random_batch,
    sequential_batches,
    split_documents,
)
from ..models.llama import SparsaLM

METHODS = ("full", "sparse", "ssa")
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    out: str = "runs/default"
    preset: str = "tiny"
    method: str = "ssa"
    steps: int = 100
    batch_size: int = 8
    seq_len: int | None = None  # default: the preset's max_seq_len
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    alpha: float = 10.0
    full_ratio: float = 0.5
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 50
    seed: int = 0
    data: str | None = None
    device: str | None = None
    topk: int | None = None
    block_size: int | None = None
    variant: str = "ssa"  # sparse mode: "ssa" (selected blocks) | "nsa" (compressed + selected + window)
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this run
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.full_ratio <= 1.0:
            raise ValueError(f"full_ratio must be in [0, 1], got {self.full_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def draw_mode(cfg: TrainConfig, step: int, micro: int) -> str:
    """The main mode of one micro-batch (identical on every rank: it depends on seed and step only)."""
    if cfg.method != "ssa":
        return cfg.method
    rng = np.random.default_rng([cfg.seed, 7, step, micro])
    return "full" if rng.random() < cfg.full_ratio else "sparse"


def batch_seed(cfg: TrainConfig, step: int, micro: int, rank: int = 0) -> list[int]:
    return [cfg.seed, 11, step, micro, rank]


def shard_batch(stream: TokenStream, batch_size: int, seq_len: int, seed, rank: int = 0,
                world_size: int = 1) -> PackedBatch:
    """Rank `rank`'s rows of a global batch of `world_size * batch_size` windows fixed by `seed`.

    The global offsets are drawn exactly as `random_batch(stream, world_size * batch_size, ...)` draws
    them, and rank r packs rows [r * batch_size, (r + 1) * batch_size): the union over ranks is the
    batch a single process with `batch_size * world_size` rows sees. world_size 1 is `random_batch`.
    """
    if world_size == 1:
        return random_batch(stream, batch_size, seq_len, seed)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(stream) <= seq_len + 1:
        raise ValueError(f"seq_len ({seq_len}) must be shorter than the corpus ({len(stream)} tokens)")
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(stream) - seq_len - 1, size=world_size * batch_size).tolist()
    return pack_windows(stream, offsets[rank * batch_size: (rank + 1) * batch_size], seq_len)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the backbone (forecast weights, if any, are trained by `sparsa distill-forecast`)."""
    forecast = {id(p) for p in getattr(model, "forecast_parameters", list)()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in forecast]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    overrides = {}
    if cfg.topk is not None:
        overrides["topk"] = cfg.topk
    if cfg.block_size is not None:
        overrides["block_size"] = cfg.block_size
    overrides["variant"] = cfg.variant
    config = preset(cfg.preset, **overrides)
    if cfg.seq_len is not None:
        config.max_seq_len = max(config.max_seq_len, cfg.seq_len)
    return config


def load_streams(data: str | None, tokenizer=None) -> tuple[TokenStream, TokenStream]:
    tokenizer = tokenizer or ByteTokenizer()
    train_texts, val_texts = split_documents(load_documents(data))
    return TokenStream.from_texts(train_texts, tokenizer), TokenStream.from_texts(val_texts, tokenizer)


@torch.no_grad()
def evaluate_bpb(model, stream: TokenStream, seq_len: int, batch_size: int, max_batches: int, mode: str,
                 device, topk: int | None = None) -> float:
    """Bits per byte (nats per token / ln 2 / the stream's average bytes per token) of `model` on `stream` in `mode`."""
    model.eval()
    total_nats, total_targets = 0.0, 0
    for batch in sequential_batches(stream, batch_size, seq_len, max_batches):
        batch = batch.to(device)
        with autocast_for(device):
            out = model(batch.tokens, targets=batch.targets, mode=mode, cu_seqlens=batch.cu_seqlens, topk=topk)
        total_nats += float(out.ce) * out.n_targets
        total_targets += out.n_targets
    model.train()
    return total_nats / max(total_targets, 1) / math.log(2) / stream.bytes_per_token


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_lines(path, records: list[dict]) -> None:
    """`records` as JSON lines (a new file)."""
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(out: Path) -> Path | None:
    """loss.png: training CE (and alignment loss) and validation bits per byte against step."""
    records = read_metrics(out / METRICS_FILE)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["step"] for r in train], [r["ce"] for r in train], label="train CE (nats)")
    if any(r.get("align") is not None for r in train):
        axes[0].plot([r["step"] for r in train], [r["align"] or 0.0 for r in train], label="align loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    for key in ("val_bpb_full", "val_bpb_sparse"):
        pts = [(r["step"], r[key]) for r in val if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("bits per byte")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    fig.tight_layout()
    path = out / "loss.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def save_training_checkpoint(out: Path, model, optimizer, model_config: ModelConfig, cfg: TrainConfig, step: int):
    write_training_checkpoint(out, model, optimizer.state_dict(), model_config, cfg, step)


def write_training_checkpoint(out: Path, model, optimizer_state: dict, model_config: ModelConfig, cfg: TrainConfig,
                              step: int, extra: dict | None = None) -> None:
    """The checkpoint files of a training run; `model` is a plain (unwrapped) SparsaLM and `optimizer_state`
    a single-process optimizer state dict (parameters numbered in `make_optimizer` order). Each file is
    written atomically and trainer_state.json last, so a checkpoint with a state file is complete."""
    meta = {"train": dataclasses.asdict(cfg), "method": cfg.method, **getattr(model, "checkpoint_meta", dict)()}
    save_model(out, model, model_config, extra={**meta, **(extra or {})})
    atomic_write(out / OPTIMIZER_FILE, lambda tmp: torch.save({"optimizer": optimizer_state, "step": step}, tmp))
    write_json(out / STATE_FILE, {"step": step, "method": cfg.method, "time": time.time()})


class SingleProcess:
    """How `run_training` talks to the hardware: one process. `sparsa.train.distributed` subclasses it
    for DDP and FSDP2 (torchrun); every hook here is the identity of single-process training."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that runs the training forward and backward."""
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return make_optimizer(model, cfg)

    def load_optimizer_state(self, model, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def batch(self, stream: TokenStream, cfg: TrainConfig, step: int, micro: int, seq_len: int) -> PackedBatch:
        return shard_batch(stream, cfg.batch_size, seq_len, batch_seed(cfg, step, micro), self.rank, self.world_size)

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return values

    def grad_sync(self, model, sync: bool):
        """Context for one micro-batch's forward and backward; `sync` is False on all but the last."""
        return nullcontext()

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def evaluate(self, model, stream: TokenStream, seq_len: int, batch_size: int, max_batches: int, mode: str) -> float:
        return evaluate_bpb(model, stream, seq_len, batch_size, max_batches, mode, self.device)

    def save(self, out: Path, model, optimizer, model_config: ModelConfig, cfg: TrainConfig, step: int) -> None:
        save_training_checkpoint(out, model, optimizer, model_config, cfg, step)

    def barrier(self) -> None:
        pass


def train(cfg: TrainConfig) -> dict:
    """Trains (or resumes) and returns a summary dict; writes checkpoints, metrics.jsonl, loss.png to cfg.out."""
    return run_training(cfg, SingleProcess(resolve_device(cfg.device)))


def run_training(cfg: TrainConfig, rt: SingleProcess) -> dict:
    """The training loop, on one process or on every rank of a torchrun job (`rt` says which).

    With world size W each rank trains on its slice of a global batch of W * batch_size rows per
    micro-batch; the loss is token-weighted over the global step, so the update equals one process
    training on the same global batch (up to floating-point summation order). Rank 0 alone writes
    metrics and checkpoints."""
    out = Path(cfg.out)
    device = rt.device
    torch.manual_seed(cfg.seed)
    train_stream, val_stream = load_streams(cfg.data)
    start_step = 0
    if cfg.resume and (out / STATE_FILE).exists():
        model, _ = load_model(out, device)
        model_config = model.config
        model = rt.wrap(model)
        optimizer = rt.make_optimizer(model, cfg)
        state = torch.load(out / OPTIMIZER_FILE, map_location=device, weights_only=False)
        rt.load_optimizer_state(model, optimizer, state["optimizer"])
        start_step = state["step"]
        rt.barrier()  # every rank has read the checkpoint before rank 0 rewrites anything in `out`
        if rt.is_main:
            kept = [r for r in read_metrics(out / METRICS_FILE) if r["step"] < start_step or
                    (r["kind"] == "eval" and r["step"] <= start_step)]
            atomic_write(out / METRICS_FILE,
                         lambda tmp: write_lines(tmp, kept))
    else:
        if (out / STATE_FILE).exists():
            raise ValueError(f"out {str(out)!r} already holds a checkpoint: pass --resume or choose another --out")
        model_config = model_config_for(cfg)
        model = SparsaLM(model_config).to(device)
        model = rt.wrap(model)
        optimizer = rt.make_optimizer(model, cfg)
        rt.barrier()
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / METRICS_FILE).unlink(missing_ok=True)
    seq_len = cfg.seq_len or model_config.max_seq_len
    model.train()
    end_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, start_step + cfg.stop_after)
    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum * rt.world_size
    bar = tqdm(range(start_step, end_step), desc=f"train {cfg.method}", disable=not (cfg.progress and rt.is_main),
               initial=start_step, total=cfg.steps, dynamic_ncols=True)
    last = {}
    for step in bar:
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [rt.batch(train_stream, cfg, step, m, seq_len).to(device) for m in range(cfg.grad_accum)]
        (total_targets,) = rt.sum_over_ranks([sum(int((b.targets != -100).sum()) for b in batches)])
        total_targets = int(total_targets)
        ce_sum, align_sum, modes = 0.0, 0.0, []
        for micro, batch in enumerate(batches):
            mode = draw_mode(cfg, step, micro)
            modes.append(mode)
            with rt.grad_sync(model, micro == cfg.grad_accum - 1):
                with autocast_for(device):
                    result = model(batch.tokens, targets=batch.targets, mode=mode, align=cfg.method == "ssa",
                                   cu_seqlens=batch.cu_seqlens)
                # token-weighted CE over the whole (global) step; alignment averaged over micro-batches.
                # Gradients are averaged over ranks (DDP / FSDP), hence the world_size factor on the CE.
                loss = result.ce * (result.n_targets * rt.world_size / total_targets)
                if result.align is not None:
                    loss = loss + cfg.alpha * result.align / cfg.grad_accum
                    align_sum += float(result.align.detach()) / cfg.grad_accum
                loss.backward()
            ce_sum += float(result.ce.detach()) * result.n_targets / total_targets
        if rt.world_size > 1:
            ce_sum, align_sum = rt.sum_over_ranks([ce_sum, align_sum])
            align_sum /= rt.world_size
        grad_norm = rt.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        last = {"kind": "train", "step": step, "lr": lr, "ce": ce_sum, "align": align_sum if cfg.method == "ssa" else None,
                "grad_norm": grad_norm, "modes": modes, "tokens_per_s": tokens_per_step / elapsed}
        if rt.is_main:
            append_metrics(out / METRICS_FILE, last)
        bar.set_postfix(ce=f"{ce_sum:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record = {"kind": "eval", "step": done}
            for mode in ("full", "sparse"):
                record[f"val_bpb_{mode}"] = rt.evaluate(model, val_stream, seq_len, cfg.batch_size,
                                                        cfg.eval_batches, mode)
            if rt.is_main:
                append_metrics(out / METRICS_FILE, record)
                bar.write(f"step {done}: val bpb full {record['val_bpb_full']:.4f} sparse {record['val_bpb_sparse']:.4f}")
        if done % cfg.save_every == 0 or done == end_step:
            rt.save(out, model, optimizer, model_config, cfg, done)
    bar.close()
    if rt.is_main:
        plot_losses(out)
    rt.barrier()
    return {"out": str(out), "steps": end_step, "last": last, "n_params": rt.unwrap(model).n_params()}
