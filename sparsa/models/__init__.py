from .llama import ModelOutput, SparsaLM

__all__ = ["ModelOutput", "SparsaLM"]
