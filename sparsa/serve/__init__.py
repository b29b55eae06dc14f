"""Inference engine: block KV cache (device, or pinned host memory with a device slot pool),
chunked prefill, static-shape decode, modes dense | sparse | offload | sparda. See docs/serve.md."""
from .engine import MODES, Engine, GenerationResult, sample_tokens

__all__ = ["MODES", "Engine", "GenerationResult", "sample_tokens"]
