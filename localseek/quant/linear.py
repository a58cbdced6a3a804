"""One ``linear()`` for every matmul: the weight's storage picks the path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from localseek.quant import gpu_kernels
from localseek.quant.tensor import QTensor, Weight

# QTensor formats the numba CPU kernels multiply straight from the stored bytes
_CPU_KERNEL_QTYPES = {"ggml_q8_0", "ggml_q4_0", "ggml_q4_k", "fp8_e4m3_b128"}


def linear(x: torch.Tensor, w: Weight, exact: bool = True) -> torch.Tensor:
    """y = x @ w.T for a dense or quantized weight ``w`` of shape (out, in).

    A 2-D QTensor in a CPU-kernel format with ``x`` on the CPU goes through the numba kernel
    (float32 accumulation, the exact dequantized values); one on another device goes through the
    tiled GPU-tier kernels (``gpu_kernels``); other QTensors are dequantized on use.
    ``exact=False`` lets the CPU kernel round the activations to int8 per 32 for integer dot
    products (what llama.cpp does for every quantized matmul); dense weights are unaffected.
    """
    if isinstance(w, QTensor):
        on_cpu = w.device.type == "cpu" and x.device.type == "cpu"
        if w.qtype in _CPU_KERNEL_QTYPES and len(w.shape) == 2 and on_cpu:
            from localseek.quant.cpu_kernels import qmatmul  # numba: imported on first use

            flat = x.reshape(-1, x.shape[-1]).float()  # (B*T, in)
            y = qmatmul(flat, w.qtype, w.data, w.scale, exact)  # (B*T, out)
            return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
        if w.device.type != "cpu" and gpu_kernels.supports(w):  # GPU tier: tile by tile
            return gpu_kernels.qmatmul(x, w)
        w = w.dequantize(x.dtype)
    return F.linear(x, w)


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense tensor (for the few places that need the matrix itself)."""
    return w.dequantize(dtype) if isinstance(w, QTensor) else w.to(dtype)
