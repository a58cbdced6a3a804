"""localseek: run DeepSeek-V2/V3-class Mixture-of-Experts models on one workstation."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from localseek.errors import CheckpointError, LocalseekError
from localseek.options import choose_openmp_wait_policy

# before torch or numba load libgomp, which reads its wait policy once: spin between parallel
# calls on a quiet machine, sleep where other work keeps a core busy (see the function)
if "torch" in sys.modules or "numba.np.ufunc.omppool" in sys.modules:
    OPENMP_WAIT = "libgomp was loaded before localseek: its wait policy is already set"
else:
    OPENMP_WAIT = choose_openmp_wait_policy()

if TYPE_CHECKING:
    from localseek.config import ModelConfig
    from localseek.engine import Model, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "LocalseekError", "Model", "ModelConfig", "load"]

# torch and numba load with the first of these (seconds), not with the package: `--help` is fast
_LAZY = {"Model": "localseek.engine", "load": "localseek.engine", "ModelConfig": "localseek.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'localseek' has no attribute {name!r}")
