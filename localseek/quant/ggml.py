"""GGML block quantization types (what llama.cpp's GGUF files hold), as QTensor formats.

A GGML QTensor keeps the file's raw bytes, one row of blocks per output row: ``data`` is uint8
(rows, row_bytes), usually a view into the memory-mapped file. Dequantization is gguf-py's
``gguf.quants.dequantize``, the reference implementation of every type, so results are
bit-exact with llama.cpp's own dequantization by construction.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from localseek.quant.formats import BY_GGML
from localseek.quant.tensor import QTensor, register_format

# The block types localseek reads; F32/F16/BF16 are served as dense tensors instead.
GGML_QTYPES: dict[GGMLQuantizationType, str] = {t: f.tag for t, f in BY_GGML.items()}
_BY_TAG = {tag: t for t, tag in GGML_QTYPES.items()}
DENSE_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    """Bytes one row of ``cols`` values takes in ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


def ggml_qtensor(qtype: GGMLQuantizationType, shape: tuple[int, int], raw: torch.Tensor) -> QTensor:
    """Wrap raw uint8 rows (rows, row_bytes) of a GGML block type as a QTensor."""
    return QTensor(GGML_QTYPES[qtype], shape, raw)


def _dequantize(qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
    qtype = _BY_TAG[qt.qtype]
    raw = qt.data.cpu().numpy()
    values = dequantize(np.ascontiguousarray(raw), qtype)  # float32 (rows, cols)
    out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(qt.shape)
    return out.to(device=qt.data.device, dtype=dtype)


for _tag in _BY_TAG:
    register_format(_tag)(_dequantize)
