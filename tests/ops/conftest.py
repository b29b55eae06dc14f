"""Fixtures of the op tests."""
import pytest


@pytest.fixture
def triton_backend(monkeypatch):
    """Route the ops to their Triton kernels (the interpreter on CPU: tests/conftest.py)."""
    monkeypatch.setenv("SPARSA_BACKEND", "triton")
