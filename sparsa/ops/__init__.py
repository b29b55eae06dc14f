"""Functional ops with autograd. Each op folder holds naive.py (the reference) and its kernels."""
from .full_attention import attention
from .select import block_keys, select_blocks
from .sparse_attn import sparse_attention

__all__ = ["attention", "block_keys", "select_blocks", "sparse_attention"]
