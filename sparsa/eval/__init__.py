from .evaluate import EvalConfig, evaluate_checkpoint
from .metrics import attention_diagnostics

__all__ = ["EvalConfig", "evaluate_checkpoint", "attention_diagnostics"]
