"""localseek: run DeepSeek-V2/V3-class Mixture-of-Experts models on one workstation."""

from localseek.config import ModelConfig
from localseek.engine import Model, load
from localseek.errors import CheckpointError, LocalseekError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "LocalseekError", "Model", "ModelConfig", "load"]
