"""Backend choice: CUDA tensors use the Triton kernels, everything else the PyTorch reference.

`SPARSA_BACKEND=naive|triton` overrides; with `triton` and `TRITON_INTERPRET=1` the kernels run
on CPU tensors (this is how the CPU tests exercise them).
"""
from __future__ import annotations

import functools
import os

import torch

VALID_BACKENDS = ("auto", "naive", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend_name() -> str:
    name = os.environ.get("SPARSA_BACKEND", "auto").lower()
    if name not in VALID_BACKENDS:
        raise ValueError(f"SPARSA_BACKEND must be one of {VALID_BACKENDS}, got {name!r}")
    return name


def use_triton(x: torch.Tensor) -> bool:
    """True when the op on tensor `x` should run its Triton kernel."""
    name = backend_name()
    if name == "naive":
        return False
    if name == "triton":
        if not triton_available():
            raise ValueError("SPARSA_BACKEND=triton but triton is not installed")
        return True
    return x.is_cuda and triton_available()
