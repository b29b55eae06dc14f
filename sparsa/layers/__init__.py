from .attention import SparseAttention, alignment_loss

__all__ = ["SparseAttention", "alignment_loss"]
