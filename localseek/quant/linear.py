"""One ``linear()`` for every matmul: the weight's storage picks the path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from localseek.quant.tensor import QTensor, Weight


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """y = x @ w.T for a dense or quantized weight ``w`` of shape (out, in).

    Quantized weights are dequantized on use here; faster kernels plug in by type tag.
    """
    if isinstance(w, QTensor):
        w = w.dequantize(x.dtype)
    return F.linear(x, w)


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense tensor (for the few places that need the matrix itself)."""
    return w.dequantize(dtype) if isinstance(w, QTensor) else w.to(dtype)
