"""RMSNorm (and the residual add before it) for a few float32 rows on the CPU, in numba.

At decode a norm is 2048 numbers, and torch's fused ``rms_norm`` still took 20 us warm and
30-100 us in a decode step, where the weight-streaming kernels had just flushed the caches its
dispatch runs on; the same arithmetic as one numba call on the arrays takes 1-4 us.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from localseek.quant.cpu_kernels import _FM


@njit(fastmath=_FM, cache=True, nogil=True)
def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    n = x.shape[1]
    for r in range(x.shape[0]):
        ss = np.float32(0)
        for i in range(n):
            ss += x[r, i] * x[r, i]
        inv = np.float32(1) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[r, i] = (x[r, i] * inv) * w[i]


@njit(fastmath=_FM, cache=True, nogil=True)
def _add_rms_norm(
    x: np.ndarray, a: np.ndarray, w: np.ndarray, eps: float, s: np.ndarray, out: np.ndarray
) -> None:
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            s[r, i] = x[r, i] + a[r, i]
    _rms_norm(s, w, eps, out)


def _rows(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().reshape(-1, t.shape[-1]).numpy())


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / rms(x) over the last dimension, float32 (as ``F.rms_norm``)."""
    out = np.empty(x.shape, dtype=np.float32)
    _rms_norm(_rows(x), w.numpy(), eps, out.reshape(-1, x.shape[-1]))
    return torch.from_numpy(out)


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, rms_norm(x + a)): a residual add and the next sub-layer's norm in one call."""
    s = np.empty(x.shape, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    n = x.shape[-1]
    _add_rms_norm(_rows(x), _rows(a), w.numpy(), eps, s.reshape(-1, n), out.reshape(-1, n))
    return torch.from_numpy(s), torch.from_numpy(out)
