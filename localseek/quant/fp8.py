"""DeepSeek's official FP8 layout: float8_e4m3fn weights, one float32 ``weight_scale_inv`` per
128x128 block (edge blocks partial). Dequantized exactly: fp8 -> float32 is exact, and the one
multiplication by the block scale is done in float32, as the reference does it."""

from __future__ import annotations

import torch

from localseek.quant.formats import FP8_QTYPE
from localseek.quant.tensor import QTensor, register_format

__all__ = ["FP8_BLOCK", "FP8_QTYPE", "dequantize_fp8_block", "fp8_scale_shape"]

FP8_BLOCK = 128


def fp8_scale_shape(shape: tuple[int, int], block: int = FP8_BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // block), -(-cols // block))


@register_format(FP8_QTYPE)
def dequantize_fp8_block(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = qt.shape
    assert qt.scale is not None
    scale = qt.scale.to(torch.float32)
    # Expand each block scale over its 128x128 tile, then crop the partial edge blocks.
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    return (qt.data.to(torch.float32) * full).to(dtype)
