"""localseek: run DeepSeek-V2/V3-class Mixture-of-Experts models on one workstation."""

import os

# torch's and numba's OpenMP pools share the cores: threads that spin-wait between parallel
# calls starve the other pool (measured: >= 8 ms per numba call under load, 4-5x slower decode
# kernels). Sleeping waiters cost microseconds. Read once, before either runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from localseek.config import ModelConfig  # noqa: E402
from localseek.engine import Model, load  # noqa: E402
from localseek.errors import CheckpointError, LocalseekError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CheckpointError", "LocalseekError", "Model", "ModelConfig", "load"]
