"""Multi-process training under torchrun: DDP or FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --standalone --nproc-per-node N -m sparsa.train --parallel ddp|fsdp [flags of `sparsa train`]

The training loop is `sparsa.train.ssa.run_training`; this module supplies its runtime hooks (and
those of the forecast distillation loop `sparsa.train.forecast.run_distill`, see `distill_distributed`).

* Mode draw: `draw_mode(cfg, step, micro)` depends on (seed, step, micro) only, so every rank runs the
  same mode (and the same SSA branch pair) at every micro-step.
* Data: micro-batch `m` of step `s` is a global batch of `world_size * batch_size` windows drawn from
  `batch_seed(cfg, s, m)`; rank r trains on rows [r * batch_size, (r + 1) * batch_size). The union of
  the ranks' rows is exactly the batch of a single process with `batch_size * world_size` rows, so a
  run on N ranks and a run on one process with N times the batch see the same data.
* Loss scaling: the target count of the global step is all-reduced; each rank's CE is weighted by
  n_targets_local * world_size / n_targets_global and DDP / FSDP average gradients over ranks, so the
  gradient is the token-weighted mean over the global step, as in single-process training. The SSA
  alignment loss (a mean over equally sized local batches) is averaged by the same gradient average.
  Gradient accumulation skips the gradient synchronisation on all but the last micro-batch
  (`DDP.no_sync`, FSDP2 `set_requires_gradient_sync(False)`).
* Checkpoints: written by rank 0 only, atomically, in the single-process format (full weights in
  model.safetensors, a single-process optimizer state dict in optimizer.pt: parameters numbered in
  `make_optimizer` order, full tensors). FSDP2 gathers every sharded tensor first. A checkpoint loads
  on any world size (1 included); on resume every rank reads it and FSDP2 keeps its own shards.
* Validation: the validation windows are split over ranks the same way and the nats and target
  counts are all-reduced, so the bits per byte equal single-process evaluation with
  `batch_size * world_size` rows.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..data import TokenStream, pack_windows
from .forecast import DistillRuntime, distill, run_distill
from .ssa import (
    SingleProcess,
    TrainConfig,
    autocast_for,
    make_optimizer,
    run_training,
    train,
    write_training_checkpoint,
)

PARALLEL = ("ddp", "fsdp")


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized())


def distributed_device(name: str | None, local_rank: int) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when CUDA is used, else cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _register_output_pytrees() -> None:
    """FSDP2 hooks the backward of every tensor in a sharded module's output; older torch finds them
    with pytree, which does not look inside unregistered dataclasses (AttentionOutput, ModelOutput)."""
    import torch.utils._pytree as pytree

    from ..layers.attention import AttentionOutput
    from ..models.llama import ModelOutput

    for cls in (AttentionOutput, ModelOutput):
        if cls not in pytree.SUPPORTED_NODES:
            pytree.register_dataclass(cls)


class DistributedRuntime(SingleProcess):
    """Runtime hooks for one rank of a DDP or FSDP2 job; the process group must be initialised."""

    def __init__(self, parallel: str, device: torch.device):
        if parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
        if not dist.is_initialized():
            raise ValueError("DistributedRuntime needs an initialised process group (run under torchrun)")
        super().__init__(device)
        self.parallel = parallel
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._shadow: torch.nn.Module | None = None  # rank 0's full CPU copy for FSDP2 checkpoints

    # --- model and optimizer -------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # the only buffer (RoPE inv_freq) is a constant: no need to broadcast it every forward
            # (torch >= 2.13 names the option forward_sync_buffers, older torch broadcast_buffers)
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
            # a checkpoint with SparDA forecasts carries parameters the training forward never uses
            unused = bool(getattr(model, "has_forecasts", False))
            return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused, **no_sync)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        _register_output_pytrees()
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # SparsaLM calls layer.attn and layer.mlp (a DecoderLayer has no forward of its own), so these
        # are the units; the root holds the embedding (tied with lm_head) and the final norm.
        for layer in model.layers:
            fully_shard(layer.attn, mesh=mesh)
            fully_shard(layer.mlp, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if self.parallel == "ddp" else model

    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        # same parameter order as single-process training (FSDP2 replaces parameters in place)
        return make_optimizer(self.unwrap(model), cfg)

    def load_optimizer_state(self, model, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """`state` is a single-process (full) optimizer state dict; FSDP2 keeps this rank's shards."""
        if self.parallel == "ddp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.tensor import DTensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {}
        for index, values in state["state"].items():
            param = params[int(index)]
            sharded[index] = {
                key: _shard_like(value, param) if isinstance(param, DTensor) and torch.is_tensor(value)
                and value.shape == param.shape else value
                for key, value in values.items()
            }
        optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})

    # --- data and reductions -------------------------------------------------------------------
    def sum_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def grad_sync(self, model, sync: bool):
        if self.parallel == "ddp":
            return contextlib.nullcontext() if sync else model.no_sync()
        return _fsdp_sync(model, sync)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2 (already reduced over ranks)
            norm = norm.full_tensor()
        return float(norm)

    def barrier(self) -> None:
        dist.barrier()

    # --- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, stream: TokenStream, seq_len: int, batch_size: int, max_batches: int, mode: str) -> float:
        """Bits per byte over `max_batches` global batches of `batch_size * world_size` consecutive
        windows, each rank taking its rows (as training does); the sums are all-reduced."""
        net = self.unwrap(model) if self.parallel == "ddp" else model  # DDP: no collectives needed
        n_windows = (len(stream) - 1) // seq_len
        if n_windows == 0:
            raise ValueError(f"seq_len ({seq_len}) must be shorter than the validation text ({len(stream)} tokens)")
        global_rows = batch_size * self.world_size
        n_batches = min(max_batches, math.ceil(n_windows / global_rows))
        net.eval()
        nats, targets = 0.0, 0
        for b in range(n_batches):
            first = b * global_rows + self.rank * batch_size
            rows = [i * seq_len for i in range(first, min(first + batch_size, n_windows, (b + 1) * global_rows))]
            if not rows and self.parallel == "ddp":
                continue
            # FSDP2: every rank runs the same number of forwards (all-gathers); an empty slice runs a
            # dummy window whose result is dropped
            batch = pack_windows(stream, rows or [0], seq_len).to(self.device)
            with autocast_for(self.device):
                out = net(batch.tokens, targets=batch.targets, mode=mode, cu_seqlens=batch.cu_seqlens)
            if rows:
                nats += float(out.ce) * out.n_targets
                targets += out.n_targets
        net.train()
        nats, targets = self.sum_over_ranks([nats, targets])
        return nats / max(targets, 1) / math.log(2)

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self, out: Path, model, optimizer, model_config: ModelConfig, cfg: TrainConfig, step: int) -> None:
        extra = {"distributed": {"parallel": self.parallel, "world_size": self.world_size,
                                 "global_batch_size": cfg.batch_size * self.world_size}}
        if self.parallel == "ddp":
            if self.is_main:
                write_training_checkpoint(out, model.module, optimizer.state_dict(), model_config, cfg, step, extra)
        else:
            weights = {name: _gather(t) for name, t in model.state_dict().items()}  # collective
            optim_state = full_optimizer_state(optimizer)  # collective
            if self.is_main:
                shadow = self._shadow_model(model_config)
                shadow.load_state_dict(weights, strict=True)
                write_training_checkpoint(out, shadow, optim_state, model_config, cfg, step, extra)
        self.barrier()

    def _shadow_model(self, model_config: ModelConfig) -> torch.nn.Module:
        if self._shadow is None:
            from ..models.llama import SparsaLM

            with torch.random.fork_rng(devices=[]):  # do not move rank 0's RNG away from the others'
                self._shadow = SparsaLM(model_config)
        return self._shadow


@contextlib.contextmanager
def _fsdp_sync(model, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _gather(t):
    """A full CPU copy of a (possibly sharded DTensor) tensor; collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """`full` laid out as the DTensor `param` (this rank's shard); every rank holds `full`."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    try:
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    except TypeError:  # torch without src_data_rank: scatter from rank 0 (same values everywhere)
        return distribute_tensor(full, param.device_mesh, param.placements)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The single-process form of a (possibly FSDP2-sharded) optimizer's state dict: every tensor
    gathered to full size on CPU. Collective: every rank must call it."""
    state = optimizer.state_dict()
    return {
        "state": {index: {key: _gather(value) if torch.is_tensor(value) else value for key, value in values.items()}
                  for index, values in sorted(state["state"].items())},
        "param_groups": state["param_groups"],
    }


@contextlib.contextmanager
def process_group(device: torch.device, backend: str | None = None):
    """The default process group for the duration of the block (kept if the caller made one)."""
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        if owns_group:
            dist.destroy_process_group()


def train_distributed(cfg: TrainConfig, parallel: str = "ddp", backend: str | None = None) -> dict:
    """Trains on every rank of a torchrun job (one call per rank). Outside torchrun it is `train(cfg)`.

    Initialises (and afterwards destroys) the default process group unless the caller already did;
    backend: nccl on CUDA, gloo on CPU unless given."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if not launched_by_torchrun():
        return train(cfg)
    device = distributed_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    with process_group(device, backend):
        return run_training(cfg, DistributedRuntime(parallel, device))


# --------------------------------------------------------------------------------------------------
# forecast distillation (sparsa.train.forecast) on several ranks

def all_reduce_mean_grads(params: list[torch.nn.Parameter]) -> None:
    """Replicated parameters, data-parallel gradients: every grad becomes its mean over ranks (one
    flat all-reduce). A parameter without a grad on this rank counts as a zero grad."""
    params = list(params)
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).to(g.dtype)
        offset += n


class DistributedDistillRuntime(DistillRuntime, DistributedRuntime):
    """Runtime hooks of `sparsa.train.forecast.run_distill` for one rank: plain data parallelism (the
    backbone is frozen and the forecasts are small, so every rank holds the whole model, unwrapped).
    The micro-batch index (rank * grad_accum + m) comes from `DistillRuntime`; ranks, `sum_over_ranks`
    and `barrier` from `DistributedRuntime`."""

    def __init__(self, device: torch.device):
        super().__init__("ddp", device)

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        all_reduce_mean_grads(params)


def distill_distributed(cfg, parallel: str = "ddp", backend: str | None = None) -> dict:
    """`sparsa.train.forecast.distill` on every rank of a torchrun job (one call per rank).

    The loop is `sparsa.train.forecast.run_distill`; `DistributedDistillRuntime` supplies its hooks.
    Every rank runs `distill_step` on its own micro-batches and the forecast gradients are averaged
    over ranks before clipping. Rank r's micro-batch m of a step is the micro-batch
    r * grad_accum + m of single-process distillation, and every rank weighs its micro-batches by
    1 / grad_accum before the mean over ranks: N ranks with grad_accum G train exactly as one process
    with grad_accum N * G (same rows, same loss scale). Rank 0 evaluates, logs and writes the
    checkpoint (the single-process format). Outside torchrun it is `distill(cfg)`.
    """
    if parallel != "ddp":
        raise ValueError(f"parallel must be 'ddp' for distill-forecast (the backbone is frozen and the forecasts "
                         f"are small: nothing worth sharding), got {parallel!r}")
    if not launched_by_torchrun():
        return distill(cfg)
    device = distributed_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    with process_group(device, backend):
        return run_distill(cfg, DistributedDistillRuntime(device))
