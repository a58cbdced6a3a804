"""THE list of weight formats: one entry per stored type, every other table derived from it.

A format is a QTensor type tag with its block geometry, where it comes from (a ggml type id, or
DeepSeek's FP8 checkpoint layout), the code of its CPU row kernel (``cpu_rowdot`` for the
hand-scheduled Q8_0 / Q4_0 / Q4_K / FP8 rows, ``cpu_codes`` for the rest), whether the GPU
tier's tiled kernels decode it and whether ``localseek quantize`` writes it. The reference
dequantize of every GGML type is gguf-py's (``quant.ggml``), FP8's is ``quant.fp8``.

Adding a GGML type: one entry here, and its block decoder in ``cpu_codes`` (``_block32`` or
``_superblock``) with a ``cpu_code`` from ``cpu_codes``' range.
"""

from __future__ import annotations

from dataclasses import dataclass

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
) = range(14)
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
    """

    tag: str
    ggml: G | None
    block: int
    block_bytes: int
    cpu_code: int
    gpu: bool = False
    writable: bool = False


def _ggml(t: G, code: int, gpu: bool = False, writable: bool = False) -> Format:
    block, size = GGML_QUANT_SIZES[t]
    return Format("ggml_" + t.name.lower(), t, block, size, code, gpu, writable)


FP8_QTYPE = "fp8_e4m3_b128"
FORMATS: dict[str, Format] = {
    f.tag: f
    for f in (
        _ggml(G.Q8_0, FMT_Q8_0, gpu=True, writable=True),
        _ggml(G.Q4_0, FMT_Q4_0, gpu=True, writable=True),
        _ggml(G.Q4_K, FMT_Q4_K, gpu=True, writable=True),
        Format(FP8_QTYPE, None, 128, 128, FMT_FP8, gpu=True),
        _ggml(G.Q4_1, FMT_Q4_1),
        _ggml(G.Q5_0, FMT_Q5_0),
        _ggml(G.Q5_1, FMT_Q5_1),
        _ggml(G.IQ4_NL, FMT_IQ4_NL),
        _ggml(G.MXFP4, FMT_MXFP4),
        _ggml(G.Q2_K, FMT_Q2_K),
        _ggml(G.Q3_K, FMT_Q3_K),
        _ggml(G.Q5_K, FMT_Q5_K),
        _ggml(G.Q6_K, FMT_Q6_K),
        _ggml(G.IQ4_XS, FMT_IQ4_XS),
    )
}
BY_GGML: dict[G, Format] = {f.ggml: f for f in FORMATS.values() if f.ggml is not None}
BY_CODE: dict[int, Format] = {f.cpu_code: f for f in FORMATS.values()}
# the float types a GGUF holds; they are served as dense tensors, not QTensors
DENSE_GGML = (G.F32, G.F16, G.BF16)


def ggml_names() -> str:
    """The ggml types localseek reads, for messages: 'F32, F16, ..., IQ4_XS'."""
    return ", ".join([t.name for t in DENSE_GGML] + [t.name for t in BY_GGML])
