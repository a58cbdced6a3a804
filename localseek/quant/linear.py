"""One ``linear()`` for every matmul: the weight's storage picks the path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from localseek.quant.formats import FORMATS
from localseek.quant.gpu import kernels as gpu_kernels
from localseek.quant.tensor import QTensor, Weight


def linear(x: torch.Tensor, w: Weight, exact: bool = True) -> torch.Tensor:
    """y = x @ w.T for a dense or quantized weight ``w`` of shape (out, in).

    A 2-D QTensor in a CPU-kernel format with ``x`` on the CPU goes through the numba kernel
    (float32 accumulation, the exact dequantized values); one on another device goes through the
    tiled GPU-tier kernels (``gpu_kernels``); other QTensors are dequantized on use.
    ``exact=False`` lets the CPU kernel round the activations to int8 per 32 for integer dot
    products (what llama.cpp does for every quantized matmul); dense weights are unaffected.
    """
    if isinstance(w, QTensor):
        if from_blocks(w) and x.device.type == "cpu":
            from localseek.quant.cpu.kernels import qmatmul_weight  # numba: imported on use

            y = qmatmul_weight(_rows(x), w, exact)  # (B*T, out)
            return _back(y, x).reshape(*x.shape[:-1], w.shape[0])
        if w.device.type != "cpu" and gpu_kernels.supports(w):  # GPU tier: tile by tile
            return gpu_kernels.qmatmul(x, w)
        w = w.dequantize(x.dtype)
    return F.linear(x, w)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as float32 rows (B*T, in) for the CPU kernels; no op where it already is one."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return flat if flat.dtype == torch.float32 else flat.float()


def _back(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def from_blocks(w: Weight | None) -> bool:
    """Whether ``linear`` / ``grouped_linear`` multiply ``w`` straight from its stored blocks
    (a CPU-kernel format on the CPU) rather than from a dequantized copy."""
    return (
        isinstance(w, QTensor)
        and w.qtype in FORMATS  # every format has a CPU row kernel
        and len(w.shape) == 2
        and w.device.type == "cpu"
    )


def swiglu_linear(x: torch.Tensor, w1: Weight, w3: Weight, exact: bool = True) -> torch.Tensor:
    """silu(x @ w1.T) * (x @ w3.T): SwiGLU's gate and up. Weights the CPU kernels multiply
    from their blocks go through one kernel call for both (one parallel region, not two, and
    the activation fused); others through ``linear``."""
    if from_blocks(w1) and from_blocks(w3) and x.device.type == "cpu":
        from localseek.quant.cpu.kernels import swiglu_weights

        h = swiglu_weights(_rows(x), w1, w3, exact)
        return _back(h, x).reshape(*x.shape[:-1], w1.shape[0])
    return F.silu(linear(x, w1, exact)) * linear(x, w3, exact)


def grouped_linear(x: torch.Tensor, w: Weight, exact: bool = True) -> torch.Tensor:
    """G independent products: y[..., g, :] = x[..., g, :] @ W_g.T, where W_g is rows
    g * R .. (g + 1) * R - 1 of ``w`` (G * R, in). MLA's absorbed decode uses it per head.

    Args:
        x: (..., G, in).
        w: (G * R, in), dense or a QTensor (CPU-kernel formats run from the stored bytes).
    Returns:
        (..., G, R) in x's dtype.
    """
    *lead, G, n_in = x.shape
    R = w.shape[0] // G
    xg = x.reshape(-1, G, n_in).transpose(0, 1)  # (G, N, in)
    N = xg.shape[1]
    if from_blocks(w) and x.device.type == "cpu":
        from localseek.quant.cpu.kernels import qmatmul_weight

        flat = xg.reshape(G * N, n_in).float()  # (G * N, in), group-major
        y = qmatmul_weight(flat, w, exact, groups=G)  # (G * N, R)
        return y.view(G, N, R).transpose(0, 1).reshape(*lead, G, R).to(x.dtype)
    wd = dense(w, x.dtype).view(G, R, n_in)
    return (xg @ wd.transpose(1, 2)).transpose(0, 1).reshape(*lead, G, R)  # (G, N, R) first


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense tensor (for the few places that need the matrix itself)."""
    return w.dequantize(dtype) if isinstance(w, QTensor) else w.to(dtype)
