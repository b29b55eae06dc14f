"""Test setup: without a GPU, Triton kernels run in the interpreter (must be set before triton loads)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
