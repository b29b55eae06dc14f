"""Llama-family Hugging Face checkpoints <-> sparsa's SparsaLM (safetensors both ways).

SparsaLM is the same network as a Llama decoder without an output gate (RMSNorm, RoPE rotate-half,
SwiGLU, GQA), so the conversion only renames weights:

    model.embed_tokens.weight                       embed.weight
    model.layers.{i}.input_layernorm.weight         layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.*     layers.{i}.attn.{q,k,v,o}_proj.*
    model.layers.{i}.post_attention_layernorm.weight layers.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight                               norm.weight
    lm_head.weight                                  lm_head.weight (absent when tied)

Supported: model_type llama / mistral (no sliding window) / qwen2 (q/k/v biases) / smollm-style Llama,
SiLU MLP without biases, default RoPE (no scaling). Anything else is a ValueError naming the field.
transformers is imported inside the functions only.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig, SparseConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise ValueError(f"rope_type {rope_type!r} is not supported (SparsaLM uses default RoPE)")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("hf config has no rope_theta")
    return float(theta)


def config_from_hf(hf_config, sparse: SparseConfig | None = None) -> ModelConfig:
    """ModelConfig of the SparsaLM equivalent to a Llama-family transformers config."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act must be 'silu', got {act!r}")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "use_sliding_window", True):
        raise ValueError(f"sliding_window={hf_config.sliding_window} is not supported")
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    attention_bias = bool(getattr(hf_config, "attention_bias", False)) or model_type == "qwen2"
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=n_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_ff=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        output_gate=False,
        attention_bias=attention_bias,
        sparse=sparse or SparseConfig(),
    )


def hf_config_from_sparsa(config: ModelConfig):
    """transformers LlamaConfig of a SparsaLM (needs output_gate=False)."""
    from transformers import LlamaConfig

    if config.output_gate:
        raise ValueError("config.output_gate=True has no Llama equivalent: only gate-free SparsaLMs convert to HF")
    if config.attention_bias:
        raise ValueError("config.attention_bias=True: Llama's o_proj would need a bias SparsaLM lacks; "
                         "convert to a qwen2-style model instead (not implemented)")
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )


def state_dict_to_sparsa(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Renames a Llama-family state dict to SparsaLM names (checks every weight is used)."""
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name.endswith("self_attn.o_proj.bias"):
            if torch.count_nonzero(tensor):
                raise ValueError(f"{name} is non-zero: SparsaLM's o_proj has no bias")
            continue
        match = _LAYER_RE.match(name)
        if match and match.group(2) in _LAYER_MAP:
            out[f"layers.{match.group(1)}.{_LAYER_MAP[match.group(2)]}"] = tensor
        elif name in _TOP_MAP:
            out[_TOP_MAP[name]] = tensor
        else:
            raise ValueError(f"weight {name!r} has no SparsaLM counterpart")
    return out


def state_dict_to_hf(sparsa_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    out = {}
    for name, tensor in sparsa_state.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        match = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if match and match.group(2) in inverse_layer:
            out[f"model.layers.{match.group(1)}.{inverse_layer[match.group(2)]}"] = tensor
        elif name in inverse_top:
            out[inverse_top[name]] = tensor
        else:
            raise ValueError(f"weight {name!r} has no Llama counterpart")
    return out


def hf_to_sparsa(hf_model, sparse: SparseConfig | None = None):
    """SparsaLM (float32) with the weights of a Llama-family transformers model."""
    from ..models.llama import SparsaLM

    config = config_from_hf(hf_model.config, sparse)
    model = SparsaLM(config)
    state = state_dict_to_sparsa({k: v.detach().float() for k, v in hf_model.state_dict().items()}, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def sparsa_to_hf(model, attn_implementation: str = "sdpa"):
    """transformers LlamaForCausalLM (float32) with the weights of a SparsaLM."""
    from transformers import LlamaForCausalLM

    if attn_implementation == "sparsa":
        from .attention import register

        register()
    hf_config = hf_config_from_sparsa(model.config)
    hf_model = LlamaForCausalLM._from_config(hf_config, attn_implementation=attn_implementation,
                                              dtype=torch.float32)
    state = state_dict_to_hf({k: v.detach().float() for k, v in model.state_dict().items()}, model.config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (model.config.tie_embeddings and m == "lm_head.weight")
               and not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


def save_sparsa(folder, model, extra: dict | None = None) -> Path:
    """Writes a SparsaLM checkpoint (config.json + model.safetensors) loadable by sparsa.checkpoint.load_model."""
    from ..checkpoint import save_model

    save_model(Path(folder), model, model.config, extra=extra)
    return Path(folder)


def save_hf(folder, hf_model, tokenizer=None) -> Path:
    """save_pretrained with safetensors (config.json + model.safetensors [+ tokenizer])."""
    folder = Path(folder)
    hf_model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_hf(path, gguf_file: str | None = None, attn_implementation: str = "sdpa", dtype=torch.float32):
    """A Llama-family transformers model from a folder (safetensors) or a GGUF file (dequantized)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation == "sparsa":
        from .attention import register

        register()
    path = Path(path)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    if gguf_file is not None:
        return load_gguf(path, gguf_file, attn_implementation=attn_implementation, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def load_gguf(folder, gguf_file: str, attn_implementation: str = "sdpa", dtype=torch.float32):
    """from_pretrained(folder, gguf_file=...) when accelerate is installed; otherwise the same transformers
    GGUF reader (config + dequantized tensors) with the model built here."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    folder = Path(folder)
    if not (folder / gguf_file).exists():
        raise ValueError(f"gguf_file {gguf_file!r} not found in {str(folder)!r}")
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file,
                                                     attn_implementation=attn_implementation, dtype=dtype)
        return model.eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    tensors = load_gguf_checkpoint(str(folder / gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def load_tokenizer(path, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    path = Path(path)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(path)
