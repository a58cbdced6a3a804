"""Quantized tensors, their formats, and the one ``linear()`` every matmul goes through."""

from localseek.quant import fp8 as _fp8  # noqa: F401  (registers the FP8 block format)
from localseek.quant import ggml as _ggml  # noqa: F401  (registers the GGML block formats)
from localseek.quant.linear import dense, linear
from localseek.quant.tensor import QTensor, Weight, register_format, weight_nbytes

__all__ = ["QTensor", "Weight", "dense", "linear", "register_format", "weight_nbytes"]
