"""Output allocation for the Triton ops.

Kernels write every element of their outputs, so outputs are normally allocated uninitialised.
Tests and the GPU checks poison them with NaN instead (`SPARSA_POISON_OUTPUTS=1`, always under
`TRITON_INTERPRET=1`), so that an element a kernel fails to write shows up as NaN.
"""
from __future__ import annotations

import os

import torch

POISON_OUTPUTS = os.environ.get("SPARSA_POISON_OUTPUTS", "0") == "1" or os.environ.get("TRITON_INTERPRET") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer: NaN-filled when POISON_OUTPUTS, else torch.empty (no memset launch)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output_like(x: torch.Tensor) -> torch.Tensor:
    return new_output(x.shape, x.dtype, x.device)
