"""Hugging Face integration (extra `hf`): `attn_implementation="sparsa"` and Llama <-> SparsaLM conversion.

Nothing here imports transformers at import time (the CLI must work without the extra).
"""
from .attention import (
    DEFAULT_SETTINGS,
    SparsaSettings,
    attention_modules,
    enable,
    get_sparsa,
    register,
    set_sparsa,
    sparsa_attention_forward,
    sparsa_mode,
)
from .convert import (
    config_from_hf,
    hf_config_from_sparsa,
    hf_to_sparsa,
    load_gguf,
    load_hf,
    load_tokenizer,
    save_hf,
    save_sparsa,
    sparsa_to_hf,
)
from .smollm2 import SMOLLM2_GGUF, load_smollm2, smollm2_folder

__all__ = [
    "DEFAULT_SETTINGS",
    "SMOLLM2_GGUF",
    "SparsaSettings",
    "attention_modules",
    "config_from_hf",
    "enable",
    "get_sparsa",
    "hf_config_from_sparsa",
    "hf_to_sparsa",
    "load_gguf",
    "load_hf",
    "load_smollm2",
    "load_tokenizer",
    "register",
    "save_hf",
    "save_sparsa",
    "set_sparsa",
    "smollm2_folder",
    "sparsa_attention_forward",
    "sparsa_mode",
    "sparsa_to_hf",
]
