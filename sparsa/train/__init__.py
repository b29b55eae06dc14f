from .ssa import TrainConfig, train

__all__ = ["TrainConfig", "train"]
