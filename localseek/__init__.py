"""localseek: run DeepSeek-V2/V3-class Mixture-of-Experts models on one workstation."""

import os

# torch's and numba's OpenMP pools wait between parallel calls. Sleeping waiters cost a wake-up
# per call (a decode step makes ~36 numba calls; in a VM a wake-up of an idle vCPU is slow):
# measured 26-31 tok/s against 40-45 when they spin for 30,000 iterations (~0.3 ms) first. On a
# machine whose cores are taken by other work the spinning costs more than it saves (22 against
# 10 tok/s with one busy core of two): set OMP_WAIT_POLICY=PASSIVE there. libgomp reads these
# once, when it loads; a choice already in the environment is kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "30000"

from localseek.config import ModelConfig  # noqa: E402
from localseek.engine import Model, load  # noqa: E402
from localseek.errors import CheckpointError, LocalseekError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CheckpointError", "LocalseekError", "Model", "ModelConfig", "load"]
