"""Training: configuration, losses, atomic checkpoints and the training loop."""

from convrec.training.config import TrainConfig, read_config_file
from convrec.training.trainer import train

__all__ = ["TrainConfig", "read_config_file", "train"]
