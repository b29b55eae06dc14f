"""Checkpoints: safetensors weights + JSON config, every file written atomically.

A checkpoint is a folder:
  config.json          {"model": ModelConfig, ...extra}
  model.safetensors    weights (tied weights stored once)
  optimizer.pt         optimizer + trainer state (training checkpoints only)
  trainer_state.json   step and metadata, written last
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


def atomic_write(path: Path, write) -> None:
    """Calls write(tmp_path) then renames the temporary file over `path` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, data: dict | list, *, indent: int = 2, default=None) -> None:
    """json.dump(data) to path, atomically (`default` as in json.dump: how to write other objects)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent, default=default)
    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    """text to path, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied parameters, contiguous, on CPU."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_model(folder: Path, model: torch.nn.Module, config: ModelConfig, extra: dict | None = None) -> None:
    folder = Path(folder)
    weights = unique_state_dict(model)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp))
    write_json(folder / CONFIG_FILE, {"model": config.to_dict(), **(extra or {})})


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"checkpoint {str(folder)!r} has no {CONFIG_FILE}")
    with open(path) as f:
        return json.load(f)


def load_model(folder: Path, device="cpu"):
    """-> (SparsaLM, full config dict). Parameters absent from the file keep their initial values only
    when they are optional extensions (the caller is told through `missing`)."""
    from .models.llama import SparsaLM

    folder = Path(folder)
    meta = read_config(folder)
    config = ModelConfig.from_dict(meta["model"])
    model = SparsaLM(config)
    if hasattr(model, "prepare_for_checkpoint"):
        model.prepare_for_checkpoint(meta)
    path = folder / WEIGHTS_FILE
    if not path.exists():
        raise ValueError(f"checkpoint {str(folder)!r} has no {WEIGHTS_FILE}")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(folder)!r} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device), meta
