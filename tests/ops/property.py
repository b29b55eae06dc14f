"""Shared pieces of the property-based (Hypothesis) kernel tests: example count, settings, packed documents."""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

# examples per property test: CI runs a few; SPARSA_PROPERTY_EXAMPLES=300 makes a bug hunt
EXAMPLES = int(os.environ.get("SPARSA_PROPERTY_EXAMPLES", "6"))
settings = hypothesis.settings(max_examples=EXAMPLES, deadline=None, print_blob=True)
# the kernels run on a GPU or, on CPU tensors, in the Triton interpreter
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a GPU or TRITON_INTERPRET=1",
)


def draw_cu_seqlens(draw, max_len: int, max_docs: int = 3) -> torch.Tensor:
    """int32 offsets [n_docs + 1] of 1 to max_docs packed documents of 1 to max_len tokens each (CPU)."""
    lens = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=max_docs))
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
