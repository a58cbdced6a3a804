"""RMSNorm, computed in float32 as DeepSeek and transformers do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUMBA_ROWS = 16  # rows up to which a norm or the router on the CPU is one numba call (cpu_ops)


def _numba_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """float32 on the CPU, few rows: decode and short batches."""
    f32 = torch.float32
    return (
        x.dtype == f32
        and w.dtype == f32
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.numel() <= NUMBA_ROWS * x.shape[-1]
    )


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _numba_fits(x, self.weight):  # numba: imported on first use
            from localseek.quant.cpu import ops as cpu_ops

            return cpu_ops.rms_norm(x, self.weight, self.eps)
        # weight * (x / rms(x)) with the normalisation in float32, then x's dtype; one fused
        # op where both are float32 (six small ops were a visible share of a decode step)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * xf.to(x.dtype)

    def add(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + a, the norm of x + a): a residual add and this norm, one call at decode."""
        if _numba_fits(x, self.weight) and a.dtype == x.dtype and a.shape == x.shape:
            from localseek.quant.cpu import ops as cpu_ops

            return cpu_ops.add_rms_norm(x, a, self.weight, self.eps)
        s = x + a
        return s, self(s)
