"""THE list of weight formats: one entry per stored type, every other table derived from it.

A format is a QTensor type tag with its block geometry, where it comes from (a ggml type id, or
DeepSeek's FP8 checkpoint layout), the code of its CPU row kernel (``cpu_rowdot`` for the
hand-scheduled Q8_0 / Q4_0 / Q4_K / FP8 rows, ``cpu_codes`` for the rest), whether the GPU
tier's tiled kernels decode it and whether ``localseek quantize`` writes it. The reference
dequantize of every GGML type is gguf-py's (``quant.ggml``), FP8's is ``quant.fp8``.

Adding a GGML type: one entry here, and its block decoder in ``cpu_codes`` (``block32`` or
``superblock``) with a ``cpu_code`` from ``cpu_codes``' range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G

# CPU kernel format codes: 0..3 cpu_rowdot's hand-scheduled rows, 4.. cpu_codes' decoders
(
    FMT_Q8_0,
    FMT_Q4_0,
    FMT_Q4_K,
    FMT_FP8,
    FMT_Q4_1,
    FMT_Q5_0,
    FMT_Q5_1,
    FMT_IQ4_NL,
    FMT_MXFP4,
    FMT_Q2_K,
    FMT_Q3_K,
    FMT_Q5_K,
    FMT_Q6_K,
    FMT_IQ4_XS,
    FMT_F16,
    FMT_BF16,
) = range(16)
FIRST_CODES = FMT_Q4_1  # codes from here on are cpu_codes formats


@dataclass(frozen=True)
class Format:
    """One stored weight format.

    Attributes:
        tag: the QTensor type tag.
        ggml: its ggml type (None for FP8, which comes from Hugging Face checkpoints).
        block: weights per block (FP8: the 128 columns of one scale block, one byte each).
        block_bytes: stored bytes per block.
        cpu_code: the CPU row kernel's format code.
        gpu: the GPU tier's tiled kernels decode it.
        writable: ``localseek quantize`` writes it (GGUF), by the name ``tag[5:]``.
        f16_at: byte offsets of the f16 scales in a block (for ``random_blocks``).
    """

    tag: str
    ggml: G | None
    block: int
    block_bytes: int
    cpu_code: int
    gpu: bool = False
    writable: bool = False
    f16_at: tuple[int, ...] = ()


def _ggml(t: G, code: int, f16_at=(0,), gpu: bool = False, writable: bool = False) -> Format:
    block, size = GGML_QUANT_SIZES[t]
    return Format("ggml_" + t.name.lower(), t, block, size, code, gpu, writable, f16_at)


FP8_QTYPE = "fp8_e4m3_b128"
FORMATS: dict[str, Format] = {
    f.tag: f
    for f in (
        _ggml(G.Q8_0, FMT_Q8_0, gpu=True, writable=True),
        _ggml(G.Q4_0, FMT_Q4_0, gpu=True, writable=True),
        _ggml(G.Q4_K, FMT_Q4_K, (0, 2), gpu=True, writable=True),
        Format(FP8_QTYPE, None, 128, 128, FMT_FP8, gpu=True),
        _ggml(G.Q4_1, FMT_Q4_1, (0, 2)),
        _ggml(G.Q5_0, FMT_Q5_0),
        _ggml(G.Q5_1, FMT_Q5_1, (0, 2)),
        _ggml(G.IQ4_NL, FMT_IQ4_NL),
        _ggml(G.MXFP4, FMT_MXFP4, ()),  # byte 0: an e8m0 exponent
        _ggml(G.Q2_K, FMT_Q2_K, (80, 82)),
        _ggml(G.Q3_K, FMT_Q3_K, (108,)),
        _ggml(G.Q5_K, FMT_Q5_K, (0, 2)),
        _ggml(G.Q6_K, FMT_Q6_K, (208,)),
        _ggml(G.IQ4_XS, FMT_IQ4_XS),
        # float matrices whose rows are whole runs of 32 (the kernel's unit; 1-D tensors and
        # other widths stay dense torch tensors)
        Format("ggml_f16", G.F16, 32, 64, FMT_F16),
        Format("ggml_bf16", G.BF16, 32, 64, FMT_BF16),
    )
}
BY_GGML: dict[G, Format] = {f.ggml: f for f in FORMATS.values() if f.ggml is not None}
BY_CODE: dict[int, Format] = {f.cpu_code: f for f in FORMATS.values()}
# the float types a GGUF holds (F32 always dense; F16/BF16 matrices as QTensors, see above)
DENSE_GGML = (G.F32, G.F16, G.BF16)
FLOAT_CODES = (FMT_F16, FMT_BF16)


def ggml_names() -> str:
    """The ggml types localseek reads, for messages: 'F32, F16, BF16, Q8_0, ..., IQ4_XS'."""
    return ", ".join(dict.fromkeys([t.name for t in DENSE_GGML] + [t.name for t in BY_GGML]))


def random_blocks(tag: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid stored bytes of a GGML format, uint8 (rows, cols // block * block_bytes):
    every code and packed-scale bit pattern occurs; f16 scales are finite (|d| <= 0.05) and
    MXFP4 exponents near 1 (2**-10 .. 2**1), so products stay in range. For tests and
    benchmarks: kernel timing does not depend on the values."""
    f = FORMATS[tag]
    if f.cpu_code in FLOAT_CODES:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        if f.cpu_code == FMT_F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bf16, truncated
    raw = rng.integers(0, 256, (rows, cols // f.block, f.block_bytes), dtype=np.uint8)
    for o in f.f16_at:
        d = rng.uniform(-0.05, 0.05, (rows, cols // f.block, 1)).astype(np.float16)
        raw[..., o : o + 2] = d.view(np.uint8)
    if f.cpu_code == FMT_MXFP4:
        raw[..., 0] = rng.integers(118, 130, (rows, cols // f.block))
    return raw.reshape(rows, -1)
