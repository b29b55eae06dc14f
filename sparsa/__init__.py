"""sparsa: trainable block-sparse attention for long-context LLMs (SSA, NSA/FSA, StreamKL, SparDA)."""
from .ops import attention, block_keys, select_blocks, sparse_attention

__version__ = "0.1.0"


def __getattr__(name):  # lazily exposed ops whose modules are optional or heavy
    if name in ("attention_kl", "group_attention_kl", "block_attention_kl"):
        from .ops import kl

        return getattr(kl, name)
    raise AttributeError(f"module 'sparsa' has no attribute {name!r}")


__all__ = ["attention", "block_keys", "select_blocks", "sparse_attention", "__version__"]
