"""Numba CPU kernels: y = x @ W.T straight from the stored blocks, and one call per MoE layer.

Weights are never dequantized as a whole, and work is split over output rows with ``prange``
so each thread reads a disjoint slice of the weight bytes. The entry points release the GIL,
so the expert store's reader threads keep reading from disk while a kernel runs. Paths:

- streaming (every GGML format, FP8 rows of whole 32-column chunks; any T): each row's bytes
  are decoded by the vector-IR intrinsics of ``rowdot`` once per 4 tokens, in blocks of
  ``_TOKEN_BLOCK`` tokens whose activations stay in L2; at decode each row is read once.
  ``exact=True``: float32 activations, float32 sums (reordered, still within 1e-5 of float64).
  ``exact=False`` (GGML formats): activations rounded to int8 per 32 (llama.cpp's Q8_0
  activations) and multiplied in integer arithmetic (vpdpbusd where the CPU has VNNI), exact
  for the rounded activations (about 0.5% relative RMS from the rounding).
- bf16 tiles (fast mode, prefill batches, CPUs with AMX / AVX512-BF16; ``widen``): rows
  widened to bf16 a few hundred at a time and multiplied by oneDNN's matmul (torch's).
- tiles (FP8 rows of other widths): each worker decodes a tile of ``_TILE_ROWS`` rows by
  ``_TILE`` columns into float32 (the exact values ``QTensor.dequantize`` gives) and multiplies
  it with every token's activations; about ten times slower than streaming.

Formats (``FMT_*``), raw bytes as in GGUF, one row of blocks per output row:
    Q8_0  34-byte blocks of 32: f16 d, 32 int8; w = d * q
    Q4_0  18-byte blocks of 32: f16 d, 16 bytes of nibbles (low: 0..15, high: 16..31);
          w = d * (q - 8)
    Q4_K  144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins,
          128 bytes of nibbles; w = (d * sc) * q - dmin * m (gguf-py's Q4_K, op for op)
    FP8   e4m3fn bytes (rows, cols) with float32 scales per 128x128 block (edges partial);
          w = lut[byte] * scale
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from localseek.quant.cpu.codes import make_rowdot_codes, make_rowdot_float
from localseek.quant.cpu.rowdot import (
    make_rowdot,
    make_rowdot_fp8,
    make_rowdot_i8,
    superblock_int_sums,
)
from localseek.quant.cpu.widen import (
    MIN_EXPERT_TOKENS,
    Tiles,
    scratch,
    tiled_matmul,
    tiled_swiglu,
    use_tiles,
)
from localseek.quant.formats import (
    FIRST_CODES,
    FLOAT_CODES,
    FMT_BF16,
    FMT_F16,
    FMT_FP8,
    FMT_IQ4_NL,
    FMT_IQ4_XS,
    FMT_MXFP4,
    FMT_Q2_K,
    FMT_Q3_K,
    FMT_Q4_0,
    FMT_Q4_1,
    FMT_Q4_K,
    FMT_Q5_0,
    FMT_Q5_1,
    FMT_Q5_K,
    FMT_Q6_K,
    FMT_Q8_0,
    FORMATS,
)
from localseek.quant.fp8 import FP8_BLOCK
from localseek.quant.tensor import QTensor

KERNEL_FORMATS: dict[str, int] = {tag: f.cpu_code for tag, f in FORMATS.items()}
# elements per block, bytes per block (FP8: one byte per element, the block is the scale's)
_BLOCK = {f.cpu_code: (f.block, f.block_bytes) for f in FORMATS.values()}

_TILE = 256  # columns decoded at once: one Q4_K super-block, 8 Q8_0/Q4_0 blocks, 2 FP8 blocks
_TILE_ROWS = 16  # rows decoded at once (the vector lanes); a thread's unit of work
_STREAM_ROWS = 64  # rows of a streaming work item: longer runs of bytes (16 measured 1.5x slower)
# half -> float32 and e4m3fn -> float32 for every bit pattern: exact, and cheap to index
F16_LUT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
FP8_LUT = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
# the super-block formats' int8 activations share a scale per 256 (a super-block, llama.cpp's
# q8_K) where the kernels sum super-blocks in int32 (AVX2 without VNNI), else per 32 like the
# block formats' (``act_span``)
ACT_SPAN_SUPERBLOCK = 256 if superblock_int_sums() else 32
_TOKEN_BLOCK = 16  # tokens streamed per pass over a row chunk: (16, 7168) float32 is 458 KiB
FASTMATH = {"contract", "reassoc"}  # float32 sums may be reordered and fused (still exact inputs)
_RD1_Q8_0, _RD1_Q4_0, _RD1_Q4_K = (make_rowdot(f, 1) for f in (FMT_Q8_0, FMT_Q4_0, FMT_Q4_K))
_RD4_Q8_0, _RD4_Q4_0, _RD4_Q4_K = (make_rowdot(f, 4) for f in (FMT_Q8_0, FMT_Q4_0, FMT_Q4_K))
_RD1_FP8, _RD4_FP8 = make_rowdot_fp8(1), make_rowdot_fp8(4)
_RQ1_Q8_0, _RQ1_Q4_0, _RQ1_Q4_K = (make_rowdot_i8(f, 1) for f in (FMT_Q8_0, FMT_Q4_0, FMT_Q4_K))
_RQ4_Q8_0, _RQ4_Q4_0, _RQ4_Q4_K = (make_rowdot_i8(f, 4) for f in (FMT_Q8_0, FMT_Q4_0, FMT_Q4_K))
# codes rows: _C{1,4}{Q,F}_<format>: 1 or 4 tokens, int8 (Q) or float32 (F) activations
# super-block formats at prefill: 8 tokens a pass over each row (their decode costs more than
# cpu.rowdot's, so it is shared by more tokens)
_C8Q_Q2_K, _C8Q_Q3_K, _C8Q_Q5_K, _C8Q_Q6_K, _C8Q_IQ4_XS = (
    make_rowdot_codes(f, 8, False) for f in (FMT_Q2_K, FMT_Q3_K, FMT_Q5_K, FMT_Q6_K, FMT_IQ4_XS)
)
_C1_F16, _C4_F16, _C1_BF16, _C4_BF16 = (
    make_rowdot_float(f, n) for f in (FMT_F16, FMT_BF16) for n in (1, 4)
)
_CODE_FORMATS = (
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
)
(
    _C1Q_Q4_1,
    _C1Q_Q5_0,
    _C1Q_Q5_1,
    _C1Q_IQ4_NL,
    _C1Q_MXFP4,
    _C1Q_Q2_K,
    _C1Q_Q3_K,
    _C1Q_Q5_K,
    _C1Q_Q6_K,
    _C1Q_IQ4_XS,
) = (make_rowdot_codes(f, 1, False) for f in _CODE_FORMATS)
(
    _C4Q_Q4_1,
    _C4Q_Q5_0,
    _C4Q_Q5_1,
    _C4Q_IQ4_NL,
    _C4Q_MXFP4,
    _C4Q_Q2_K,
    _C4Q_Q3_K,
    _C4Q_Q5_K,
    _C4Q_Q6_K,
    _C4Q_IQ4_XS,
) = (make_rowdot_codes(f, 4, False) for f in _CODE_FORMATS)
(
    _C1F_Q4_1,
    _C1F_Q5_0,
    _C1F_Q5_1,
    _C1F_IQ4_NL,
    _C1F_MXFP4,
    _C1F_Q2_K,
    _C1F_Q3_K,
    _C1F_Q5_K,
    _C1F_Q6_K,
    _C1F_IQ4_XS,
) = (make_rowdot_codes(f, 1, True) for f in _CODE_FORMATS)
(
    _C4F_Q4_1,
    _C4F_Q5_0,
    _C4F_Q5_1,
    _C4F_IQ4_NL,
    _C4F_MXFP4,
    _C4F_Q2_K,
    _C4F_Q3_K,
    _C4F_Q5_K,
    _C4F_Q6_K,
    _C4F_IQ4_XS,
) = (make_rowdot_codes(f, 4, True) for f in _CODE_FORMATS)


def block_size(fmt: int) -> int:
    """Columns a row of ``fmt`` must be a multiple of (FP8 takes any width)."""
    return 1 if fmt == FMT_FP8 else _BLOCK[fmt][0]


# --- decoding one tile -----------------------------------------------------------------------


@njit(cache=True, inline="always")
def _f16(row: np.ndarray, i: int, f16: np.ndarray) -> np.float32:
    return f16[np.int64(row[i]) | (np.int64(row[i + 1]) << 8)]


@njit(cache=True)
def _decode_tile(
    fmt: int,
    row: np.ndarray,  # uint8 (row_bytes,): one row's raw blocks
    scale_row: np.ndarray,  # float32 (n_col_blocks,): FP8 block scales of this row
    k0: int,
    kk: int,
    out: np.ndarray,  # float32 (_TILE,): columns k0..k0+kk of the row
    f16: np.ndarray,
    fp8: np.ndarray,
) -> None:
    if fmt == FMT_Q8_0:
        for b in range(kk // 32):
            base = (k0 // 32 + b) * 34
            d = _f16(row, base, f16)
            for j in range(32):
                q = (np.int32(row[base + 2 + j]) ^ 128) - 128  # int8 from its byte
                out[b * 32 + j] = d * np.float32(q)
    elif fmt == FMT_Q4_0:
        for b in range(kk // 32):
            base = (k0 // 32 + b) * 18
            d = _f16(row, base, f16)
            for j in range(16):
                byte = np.int32(row[base + 2 + j])
                out[b * 32 + j] = d * np.float32((byte & 15) - 8)
                out[b * 32 + 16 + j] = d * np.float32((byte >> 4) - 8)
    elif fmt == FMT_Q4_K:
        base = (k0 // 256) * 144
        d = _f16(row, base, f16)
        dmin = _f16(row, base + 2, f16)
        s = base + 4  # 12 bytes: 0..3 low scale bits, 4..7 low min bits, 8..11 high nibbles
        for j in range(8):
            if j < 4:
                sc = np.int32(row[s + j]) & 63
                m = np.int32(row[s + 4 + j]) & 63
            else:
                sc = (np.int32(row[s + 4 + j]) & 15) | ((np.int32(row[s + j - 4]) >> 2) & 48)
                m = (np.int32(row[s + 4 + j]) >> 4) | ((np.int32(row[s + j]) >> 2) & 48)
            dj = d * np.float32(sc)
            mj = dmin * np.float32(m)
            qs = base + 16 + (j // 2) * 32
            shift = 4 * (j % 2)
            for i in range(32):
                q = (np.int32(row[qs + i]) >> shift) & 15
                out[j * 32 + i] = dj * np.float32(q) - mj
    else:  # FMT_FP8
        for i in range(kk):
            out[i] = fp8[row[k0 + i]] * scale_row[(k0 + i) // 128]


@njit(cache=True)
def _gemm_rows(
    fmt: int,
    w: np.ndarray,  # uint8 (rows, row_bytes)
    scale: np.ndarray,  # float32 (row_blocks, col_blocks); FP8 only
    x: np.ndarray,  # float32 (T, in)
    r0: int,
    r1: int,
    out: np.ndarray,  # float32 (T, r1 - r0): out[t, i] = x[t] . W[r0 + i]
    f16: np.ndarray,
    fp8: np.ndarray,
) -> None:
    T, n_in = x.shape
    n = r1 - r0  # <= _TILE_ROWS
    # decoded tile, transposed: the rows are the vector lanes, so each lane is a plain
    # sequential float32 sum and the loop vectorizes without reassociating anything
    wt = np.zeros((_TILE, _TILE_ROWS), dtype=np.float32)
    dec = np.empty(_TILE, dtype=np.float32)
    acc = np.zeros((T, _TILE_ROWS), dtype=np.float32)
    for k0 in range(0, n_in, _TILE):
        kk = min(_TILE, n_in - k0)
        for i in range(n):
            r = r0 + i
            srow = scale[r // FP8_BLOCK] if fmt == FMT_FP8 else scale[0]
            _decode_tile(fmt, w[r], srow, k0, kk, dec, f16, fp8)
            for j in range(kk):
                wt[j, i] = dec[j]
        for t in range(T):
            xt = x[t]
            at = acc[t]
            for j in range(kk):
                xv = xt[k0 + j]
                wj = wt[j]
                for lane in range(_TILE_ROWS):
                    at[lane] += wj[lane] * xv
    for t in range(T):
        for i in range(n):
            out[t, i] = acc[t, i]


# --- streaming: each row decoded once per 4 tokens (rowdot) ---------------------------------


@njit(cache=True)
def stream_ok(fmt: int, n_in: int) -> bool:
    """Whether rowdot can run this format at this row length (FP8: whole 32-column chunks)."""
    return fmt != FMT_FP8 or n_in % 32 == 0


@njit(cache=True)
def _permute(fmt: int, x: np.ndarray) -> np.ndarray:
    """Activations (T, in) in ``make_rowdot``'s order (Q8_0, Q4_0, Q4_K): within each run of
    4 * L values (L = 4 for Q4_0, else 8), value 4 * i + k goes to k * L + i, times 256**-k
    for the nibble formats."""
    T, n = x.shape
    lanes = 4 if fmt == FMT_Q4_0 else 8
    run = 4 * lanes
    xp = x.copy()  # a tail shorter than a run (never read by rowdot) stays as it is
    for t in range(T):
        for c in range(n // run):
            o = c * run
            for k in range(4):
                f = np.float32(2.0 ** (-8 * k)) if fmt in (FMT_Q4_K, FMT_Q4_0) else np.float32(1)
                for i in range(lanes):
                    xp[t, o + k * lanes + i] = x[t, o + 4 * i + k] * f
    return xp


@njit(fastmath=FASTMATH, cache=True)
def _block_sums(x: np.ndarray, group: int = 32) -> np.ndarray:
    """Sums of each ``group`` consecutive activations: float32 (T, in // group)."""
    T, n = x.shape
    xs = np.zeros((T, n // group), dtype=np.float32)
    for t in range(T):
        for c in range(n // group):
            acc = np.float32(0)
            for i in range(group):
                acc += x[t, c * group + i]
            xs[t, c] = acc
    return xs


@njit(cache=True)
def _q_sums16(xq: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Per 16 int8 activations: sum(xq) * dx of their block of 32, float32 (T, in // 16)."""
    T, n = xq.shape
    xs = np.zeros((T, n // 16), dtype=np.float32)
    for t in range(T):
        for c in range(n // 16):
            acc = 0
            for i in range(16):
                acc += xq[t, c * 16 + i]
            xs[t, c] = np.float32(acc) * dx[t, c // 2]
    return xs


@njit(cache=True)
def _code_group(fmt: int) -> int:
    """Weights per scale group in cpu.codes' decoded form: 16 for the super-block formats, 32
    for the block ones."""
    return 16 if fmt in (FMT_Q2_K, FMT_Q3_K, FMT_Q5_K, FMT_Q6_K, FMT_IQ4_XS) else 32


@njit(cache=True)
def act_span(fmt: int) -> int:
    """Activations per int8 scale on the fast path for ``fmt``: ``ACT_SPAN_SUPERBLOCK`` for
    the 256-weight super-block formats (Q2_K..Q6_K, IQ4_XS), 32 for the block formats."""
    return ACT_SPAN_SUPERBLOCK if fmt == FMT_Q4_K or _code_group(fmt) == 16 else 32


@njit(cache=True)
def _quantize(fmt: int, x: np.ndarray):
    """Activations (T, in) as int8 with one scale max|x| / 127 per ``act_span(fmt)``
    (repeated per 32), for the int8 paths.

    Returns int8 (T, in) values in their natural order; float32 (T, in // 32) scales; float32
    (T, in // 32) sums of the int8 values per 32 (Q4_K and cpu.codes: times the scale)."""
    T, n = x.shape
    xq = np.zeros((T, n), dtype=np.int8)
    dx = np.zeros((T, n // 32), dtype=np.float32)
    xs = np.zeros((T, n // 32), dtype=np.float32)
    span = act_span(fmt)
    # Q4_K's mins take the rounded activations too: the result is exact for them
    scaled = fmt == FMT_Q4_K or fmt >= FIRST_CODES
    for t in range(T):
        for c0 in range(0, n // 32, span // 32):
            amax = np.float32(0)
            for i in range(c0 * 32, c0 * 32 + span):
                amax = max(amax, abs(x[t, i]))
            inv = np.float32(127) / amax if amax > 0 else np.float32(0)
            for c in range(c0, c0 + span // 32):
                o = c * 32
                qsum = 0
                for i in range(32):
                    q = np.int8(np.rint(x[t, o + i] * inv))
                    xq[t, o + i] = q
                    qsum += q
                dx[t, c] = amax / np.float32(127)
                xs[t, c] = np.float32(qsum) * dx[t, c] if scaled else np.float32(qsum)
    return xq, dx, xs


# one branch per format: numba cannot pick an intrinsic from a tuple at run time
@njit(fastmath=FASTMATH, cache=True)
def _dot_codes_q8(fmt, w, r0, nr, xq, dx, xs, t0, n, out, o0, f16) -> None:
    """out[o0 + i, j] = W[r0 + j] . x[t0 + i] for the cpu.codes formats, int8 x."""
    t = 0
    while n - t >= 8 and fmt in (FMT_Q2_K, FMT_Q3_K, FMT_Q5_K, FMT_Q6_K, FMT_IQ4_XS):
        args = (w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        if fmt == FMT_Q6_K:
            _C8Q_Q6_K(*args)
        elif fmt == FMT_Q5_K:
            _C8Q_Q5_K(*args)
        elif fmt == FMT_Q3_K:
            _C8Q_Q3_K(*args)
        elif fmt == FMT_Q2_K:
            _C8Q_Q2_K(*args)
        else:
            _C8Q_IQ4_XS(*args)
        t += 8
    while t < n:
        four = n - t >= 4
        if fmt == FMT_Q4_1:
            if four:
                _C4Q_Q4_1(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q4_1(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_Q5_0:
            if four:
                _C4Q_Q5_0(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q5_0(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_Q5_1:
            if four:
                _C4Q_Q5_1(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q5_1(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_IQ4_NL:
            if four:
                _C4Q_IQ4_NL(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_IQ4_NL(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_MXFP4:
            if four:
                _C4Q_MXFP4(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_MXFP4(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_Q2_K:
            if four:
                _C4Q_Q2_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q2_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_Q3_K:
            if four:
                _C4Q_Q3_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q3_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_Q5_K:
            if four:
                _C4Q_Q5_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q5_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_Q6_K:
            if four:
                _C4Q_Q6_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_Q6_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        elif fmt == FMT_IQ4_XS:
            if four:
                _C4Q_IQ4_XS(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _C1Q_IQ4_XS(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
        t += 4 if four else 1


@njit(fastmath=FASTMATH, cache=True)
def _dot_codes_f32(fmt, w, r0, nr, xp, xs, t0, n, out, o0, f16) -> None:
    """out[o0 + i, j] = W[r0 + j] . x[t0 + i] for the cpu.codes formats, float32 x."""
    t = 0
    while t < n:
        four = n - t >= 4
        if fmt == FMT_Q4_1:
            if four:
                _C4F_Q4_1(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q4_1(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_Q5_0:
            if four:
                _C4F_Q5_0(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q5_0(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_Q5_1:
            if four:
                _C4F_Q5_1(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q5_1(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_IQ4_NL:
            if four:
                _C4F_IQ4_NL(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_IQ4_NL(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_MXFP4:
            if four:
                _C4F_MXFP4(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_MXFP4(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_Q2_K:
            if four:
                _C4F_Q2_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q2_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_Q3_K:
            if four:
                _C4F_Q3_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q3_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_Q5_K:
            if four:
                _C4F_Q5_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q5_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_Q6_K:
            if four:
                _C4F_Q6_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_Q6_K(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_IQ4_XS:
            if four:
                _C4F_IQ4_XS(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1F_IQ4_XS(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_F16:
            if four:
                _C4_F16(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1_F16(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        elif fmt == FMT_BF16:
            if four:
                _C4_BF16(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
            else:
                _C1_BF16(w, r0, nr, xp, t0 + t, xs, xs, f16, out, o0 + t)
        t += 4 if four else 1


@njit(fastmath=FASTMATH, cache=True)
def _dot_tokens_q8(fmt, w, r0, nr, xq, dx, xs, t0, n, out, o0, f16) -> None:
    """out[o0 + i, j] = W[r0 + j] . x[t0 + i] for i < n, j < nr, int8 activations (not FP8)."""
    if fmt >= FIRST_CODES:
        _dot_codes_q8(fmt, w, r0, nr, xq, dx, xs, t0, n, out, o0, f16)
        return
    t = 0
    while t < n:
        if n - t >= 4:
            if fmt == FMT_Q4_K:
                _RQ4_Q4_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            elif fmt == FMT_Q8_0:
                _RQ4_Q8_0(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _RQ4_Q4_0(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            t += 4
        else:
            if fmt == FMT_Q4_K:
                _RQ1_Q4_K(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            elif fmt == FMT_Q8_0:
                _RQ1_Q8_0(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            else:
                _RQ1_Q4_0(w, r0, nr, xq, t0 + t, dx, xs, f16, out, o0 + t)
            t += 1


@njit(cache=True)
def prepare_activations(fmt: int, x: np.ndarray, exact: bool):
    """What the streaming path needs of activations x (T, in), or nothing for the tile path:
    (use int8 path, float permuted, int8 permuted, int8 scales, sums per 32)."""
    T, n = x.shape
    if not stream_ok(fmt, n):
        return False, x, np.zeros((0, 0), np.int8), x, x
    if fmt in FLOAT_CODES:  # F16 / BF16: float32 activations in both modes, no sums
        return False, x, np.zeros((0, 0), np.int8), x, x
    if fmt >= FIRST_CODES:  # natural order; sums per scale group
        group = _code_group(fmt)
        if exact:
            return False, x, np.zeros((0, 0), np.int8), x, _block_sums(x, group)
        xq, dx, xs = _quantize(fmt, x)
        return True, x, xq, dx, _q_sums16(xq, dx) if group == 16 else xs
    if fmt == FMT_FP8:  # float32 activations in both modes, natural order
        return False, x, np.zeros((0, 0), np.int8), x, x
    if exact:
        return False, _permute(fmt, x), np.zeros((0, 0), np.int8), x, _block_sums(x)
    xq, dx, xs = _quantize(fmt, x)
    return True, x, xq, dx, xs


@njit(fastmath=FASTMATH, cache=True)
def _dot_tokens(fmt, w, r0, nr, scale, xp, xs, t0, n, out, o0, f16) -> None:
    """out[o0 + i, j] = W[r0 + j] . x[t0 + i] for i < n, j < nr, float32 activations; each
    row's bytes are decoded once per 4 tokens."""
    if fmt >= FIRST_CODES:  # codes rows take x in natural order; dx is unused
        _dot_codes_f32(fmt, w, r0, nr, xp, xs, t0, n, out, o0, f16)
        return
    t = 0
    while t < n:
        if n - t >= 4:
            if fmt == FMT_Q4_K:
                _RD4_Q4_K(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            elif fmt == FMT_Q8_0:
                _RD4_Q8_0(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            elif fmt == FMT_Q4_0:
                _RD4_Q4_0(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            else:
                _RD4_FP8(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            t += 4
        else:
            if fmt == FMT_Q4_K:
                _RD1_Q4_K(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            elif fmt == FMT_Q8_0:
                _RD1_Q8_0(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            elif fmt == FMT_Q4_0:
                _RD1_Q4_0(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            else:
                _RD1_FP8(w, r0, nr, xp, t0 + t, xs, scale, f16, out, o0 + t)
            t += 1


@njit(fastmath=FASTMATH, cache=True)
def gemm_stream(
    fmt: int,
    w: np.ndarray,  # uint8 (rows, row_bytes)
    scale: np.ndarray,  # float32 (row_blocks, col_blocks); FP8 only
    quant: bool,  # int8 activations xq, dx (else float32 xp)
    xp: np.ndarray,  # float32 (T, in), permuted by _permute
    xq: np.ndarray,  # int8 (T, in), from _quantize
    dx: np.ndarray,  # float32 (T, in // 32), from _quantize
    xs: np.ndarray,  # float32 (T, in // 32), sums per 32 (_block_sums or _quantize)
    t0: int,
    n: int,
    r0: int,
    r1: int,
    out: np.ndarray,  # float32 (n, r1 - r0): out[i, j] = x[t0 + i] . W[r0 + j]
    f16: np.ndarray,
) -> None:
    for tb in range(0, n, _TOKEN_BLOCK):
        nb = min(_TOKEN_BLOCK, n - tb)
        if quant:
            _dot_tokens_q8(fmt, w, r0, r1 - r0, xq, dx, xs, t0 + tb, nb, out, tb, f16)
        else:
            _dot_tokens(fmt, w, r0, r1 - r0, scale, xp, xs, t0 + tb, nb, out, tb, f16)


# --- one matrix ------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _qmatmul(
    fmt: int,
    w: np.ndarray,  # uint8 (G * R, row_bytes): G groups of R rows
    scale: np.ndarray,  # float32 (row_blocks, col_blocks)
    x: np.ndarray,  # float32 (G * N, in): G groups of N tokens
    y: np.ndarray,  # float32 (G * N, R): y[g * N + t, j] = x[g * N + t] . W[g * R + j]
    f16: np.ndarray,
    fp8: np.ndarray,
    exact: bool,
    groups: int,
) -> None:
    N = x.shape[0] // groups
    R = w.shape[0] // groups
    stream = stream_ok(fmt, x.shape[1])
    quant, xp, xq, dx, xs = prepare_activations(fmt, x, exact)
    rows = _STREAM_ROWS if stream else _TILE_ROWS
    n_chunks = (R + rows - 1) // rows  # per group
    for c in prange(groups * n_chunks):
        g = c // n_chunks
        j0 = (c % n_chunks) * rows
        j1 = min(R, j0 + rows)
        r0, r1, t0 = g * R + j0, g * R + j1, g * N
        part = np.empty((N, j1 - j0), dtype=np.float32)
        if stream:
            gemm_stream(fmt, w, scale, quant, xp, xq, dx, xs, t0, N, r0, r1, part, f16)
        else:
            _gemm_rows(fmt, w, scale, x[t0 : t0 + N], r0, r1, part, f16, fp8)
        for t in range(N):
            for i in range(j1 - j0):
                y[t0 + t, j0 + i] = part[t, i]


_NO_SCALE = np.zeros((1, 1), dtype=np.float32)  # the scales argument of the GGML formats


def _scale2d(scale: torch.Tensor | None) -> np.ndarray:
    if scale is None:
        return _NO_SCALE
    return np.ascontiguousarray(scale.detach().cpu().numpy(), dtype=np.float32)


def check_width(fmt: int, w: np.ndarray, n_in: int) -> None:
    """The stored rows must be exactly ``n_in`` values wide: the kernels trust the row bytes."""
    block, size = _BLOCK[fmt]
    want = n_in if fmt == FMT_FP8 else n_in // block * size
    if n_in % block_size(fmt) or w.ndim != 2 or w.shape[1] != want:
        raise ValueError(f"a weight of {w.shape[1]} bytes a row does not take {n_in} inputs")


def raw_bytes(data: torch.Tensor) -> np.ndarray:
    """A weight's stored bytes as a uint8 numpy array (rows, row_bytes), without a copy."""
    if data.dtype == torch.float8_e4m3fn:
        data = data.view(torch.uint8)
    arr = data.detach().numpy()
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def kernel_args(w: QTensor) -> tuple[int, np.ndarray, np.ndarray]:
    """(format code, stored bytes, 2-D scales) of a CPU-kernel QTensor, made once and kept on
    it while its data and scale stay the same objects: a decode step calls ~25 kernels, and
    rebuilding these views (torch -> numpy, a scales array) was a visible share of each call."""
    got = getattr(w, "_kernel_args", None)
    if got is None or got[0] is not w.data or got[1] is not w.scale:
        got = (w.data, w.scale, KERNEL_FORMATS[w.qtype], raw_bytes(w.data), _scale2d(w.scale))
        w._kernel_args = got
    return got[2], got[3], got[4]


def activations(x: torch.Tensor) -> np.ndarray:
    xs = x.detach().numpy()
    return (
        xs
        if xs.dtype == np.float32 and xs.flags.c_contiguous
        else np.ascontiguousarray(xs, np.float32)
    )


def qmatmul_weight(
    x: torch.Tensor, w: QTensor, exact: bool = True, groups: int = 1, widen: bool | None = None
) -> torch.Tensor:
    """``qmatmul`` for a QTensor, with its kernel arguments kept on it (``kernel_args``)."""
    fmt, arr, sc = kernel_args(w)
    return _run_qmatmul(activations(x), fmt, arr, sc, exact, groups, widen)


def _run_qmatmul(xs, fmt, w, sc, exact, groups, widen) -> torch.Tensor:
    if xs.shape[0] % groups or w.shape[0] % groups:
        raise ValueError(f"{xs.shape[0]} tokens and {w.shape[0]} rows in {groups} groups")
    check_width(fmt, w, xs.shape[1])
    N, R = xs.shape[0] // groups, w.shape[0] // groups
    if use_tiles(widen, exact, N):  # bf16 tiles, group by group
        xb = torch.from_numpy(xs).bfloat16()
        y = torch.empty((xs.shape[0], R), dtype=torch.float32)
        tiles = Tiles(fmt, w, sc, xs.shape[1], F16_LUT, FP8_LUT)
        for g in range(groups):
            rows = slice(g * N, (g + 1) * N)
            tiled_matmul(xb[rows], tiles, g * R, (g + 1) * R, y[rows])
        return y
    y = np.empty((xs.shape[0], R), dtype=np.float32)
    _qmatmul(fmt, w, sc, xs, y, F16_LUT, FP8_LUT, bool(exact), groups)
    return torch.from_numpy(y)


def qmatmul(
    x: torch.Tensor,
    qtype: str,
    data: torch.Tensor,
    scale: torch.Tensor | None,
    exact: bool = True,
    groups: int = 1,
    widen: bool | None = None,
) -> torch.Tensor:
    """y = x @ W.T for a weight stored as ``qtype`` (one of ``KERNEL_FORMATS``), or, with
    ``groups`` G, G independent products: group g's tokens times group g's rows.

    Args:
        x: float32 (T, in) activations on the CPU; with groups, (G * N, in), group-major.
        qtype: the QTensor format tag.
        data: the stored weight, uint8 (rows, row_bytes) or float8_e4m3fn (rows, in); with
            groups, G * R rows, group-major.
        scale: FP8 block scales (row_blocks, col_blocks); None for GGML formats.
        exact: float32 activations; False quantizes them to int8 per 32 for integer dot
            products (GGML formats; FP8 stays float32).
        groups: G; y[g * N + t] = x[g * N + t] @ W[g * R : (g + 1) * R].T.
        widen: fast mode through bf16 tiles of the weight and oneDNN's matmul (``widen``):
            None takes them where the CPU has bf16 units and N >= ``widen.MIN_TOKENS``;
            True / False force the choice (the tiles round weights, activations and results
            to bf16, 2**-9 relative; the int8 path rounds activations per 32).
    Returns:
        float32 (T, rows), or (G * N, R) with groups.
    """
    xs = activations(x)
    fmt, arr, sc = KERNEL_FORMATS[qtype], raw_bytes(data), _scale2d(scale)
    return _run_qmatmul(xs, fmt, arr, sc, exact, groups, widen)


# --- SwiGLU: gate and up in one pass ----------------------------------------------------------


@njit(fastmath=FASTMATH, cache=True)
def _swiglu_rows(fmt1, w1, s1, fmt3, w3, s3, stream, p1, p3, x, t0, n, r0, r1, h, f16, fp8):
    """h[t0 + i, r0 + j] = silu(x[t0 + i] . W1[r0 + j]) * (x[t0 + i] . W3[r0 + j]) for i < n;
    p1, p3: ``prepare_activations``'s activations for each weight's format."""
    g = np.empty((n, r1 - r0), dtype=np.float32)
    u = np.empty((n, r1 - r0), dtype=np.float32)
    if stream:
        gemm_stream(fmt1, w1, s1, p1[0], p1[1], p1[2], p1[3], p1[4], t0, n, r0, r1, g, f16)
        gemm_stream(fmt3, w3, s3, p3[0], p3[1], p3[2], p3[3], p3[4], t0, n, r0, r1, u, f16)
    else:
        _gemm_rows(fmt1, w1, s1, x[t0 : t0 + n], r0, r1, g, f16, fp8)
        _gemm_rows(fmt3, w3, s3, x[t0 : t0 + n], r0, r1, u, f16, fp8)
    for i in range(n):
        for j in range(r1 - r0):
            gv = g[i, j]
            h[t0 + i, r0 + j] = gv / (np.float32(1.0) + np.exp(-gv)) * u[i, j]


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _swiglu(
    fmt1: int,
    w1: np.ndarray,  # uint8 (inter, row_bytes): gate
    s1: np.ndarray,  # float32 (row_blocks, col_blocks); FP8 only
    fmt3: int,
    w3: np.ndarray,  # uint8 (inter, row_bytes): up
    s3: np.ndarray,
    x: np.ndarray,  # float32 (T, in)
    h: np.ndarray,  # float32 (T, inter)
    f16: np.ndarray,
    fp8: np.ndarray,
    exact: bool,
) -> None:
    T, n_in = x.shape
    inter = w1.shape[0]
    stream = stream_ok(fmt1, n_in) and stream_ok(fmt3, n_in)
    p1 = prepare_activations(fmt1, x, exact)
    # gate and up of one type (the recipes' rule) share one rounding of x: it runs serially
    p3 = p1 if fmt3 == fmt1 else prepare_activations(fmt3, x, exact)
    rows = _STREAM_ROWS if stream else _TILE_ROWS
    for c in prange((inter + rows - 1) // rows):
        r0 = c * rows
        r1 = min(inter, r0 + rows)
        _swiglu_rows(fmt1, w1, s1, fmt3, w3, s3, stream, p1, p3, x, 0, T, r0, r1, h, f16, fp8)


def swiglu(
    x: torch.Tensor,
    w1: tuple[str, torch.Tensor, torch.Tensor | None],
    w3: tuple[str, torch.Tensor, torch.Tensor | None],
    exact: bool = True,
    widen: bool | None = None,
) -> torch.Tensor:
    """h = silu(x @ W1.T) * (x @ W3.T), both projections in one parallel call.

    Args:
        x: float32 (T, in) activations on the CPU.
        w1, w3: (qtype, stored data, FP8 scales or None) of the gate and up weights (inter, in).
        exact: float32 activations; False rounds them to int8 per 32 (see ``qmatmul``).
        widen: bf16 tiles in fast mode (see ``qmatmul``).
    Returns:
        float32 (T, inter).
    """
    (q1, d1, sc1), (q3, d3, sc3) = w1, w3
    p1 = KERNEL_FORMATS[q1], raw_bytes(d1), _scale2d(sc1)
    p3 = KERNEL_FORMATS[q3], raw_bytes(d3), _scale2d(sc3)
    return _run_swiglu(activations(x), p1, p3, exact, widen)


def swiglu_weights(
    x: torch.Tensor, w1: QTensor, w3: QTensor, exact: bool = True, widen: bool | None = None
) -> torch.Tensor:
    """``swiglu`` for QTensors, with their kernel arguments kept on them (``kernel_args``)."""
    return _run_swiglu(activations(x), kernel_args(w1), kernel_args(w3), exact, widen)


def _run_swiglu(xs, p1, p3, exact, widen) -> torch.Tensor:
    (f1, a1, s1), (f3, a3, s3) = p1, p3
    check_width(f1, a1, xs.shape[1])
    check_width(f3, a3, xs.shape[1])
    if a1.shape[0] != a3.shape[0]:
        raise ValueError(f"gate and up have {a1.shape[0]} and {a3.shape[0]} rows")
    if use_tiles(widen, exact, xs.shape[0]):
        h = torch.empty((xs.shape[0], a1.shape[0]), dtype=torch.float32)
        n_in = xs.shape[1]
        t1 = Tiles(f1, a1, s1, n_in, F16_LUT, FP8_LUT)
        t3 = Tiles(f3, a3, s3, n_in, F16_LUT, FP8_LUT, t1.buf)  # gate's tile is done with
        tiled_swiglu(torch.from_numpy(xs).bfloat16(), t1, t3, a1.shape[0], h)
        return h
    h = np.empty((xs.shape[0], a1.shape[0]), dtype=np.float32)
    _swiglu(f1, a1, s1, f3, a3, s3, xs, h, F16_LUT, FP8_LUT, bool(exact))
    return torch.from_numpy(h)


# --- one MoE layer ---------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _moe_swiglu(
    fmt1: int,
    w1: np.ndarray,  # uint8 (E, inter, row_bytes1): gate
    s1: np.ndarray,  # float32 (E, row_blocks, col_blocks); FP8 only
    fmt3: int,
    w3: np.ndarray,  # uint8 (E, inter, row_bytes1): up
    s3: np.ndarray,
    fmt2: int,
    w2: np.ndarray,  # uint8 (E, hidden, row_bytes2): down
    s2: np.ndarray,
    x: np.ndarray,  # float32 (N, hidden)
    topk_ids: np.ndarray,  # int64 (N, K)
    topk_weights: np.ndarray,  # float32 (N, K)
    y: np.ndarray,  # float32 (N, hidden), zeroed
    f16: np.ndarray,
    fp8: np.ndarray,
    exact: bool,
) -> None:
    N, K = topk_ids.shape
    E, inter = w1.shape[0], w1.shape[1]
    hidden = w2.shape[1]
    # group the N * K assignments by expert, tokens in order within each (as the reference)
    offsets = np.zeros(E + 1, dtype=np.int64)
    for n in range(N):
        for k in range(K):
            offsets[topk_ids[n, k] + 1] += 1
    for e in range(E):
        offsets[e + 1] += offsets[e]
    fill = offsets[:E].copy()
    token = np.empty(N * K, dtype=np.int64)
    weight = np.empty(N * K, dtype=np.float32)
    xg = np.empty((N * K, hidden), dtype=np.float32)  # (N * K, hidden), grouped by expert
    for n in range(N):
        for k in range(K):
            e = topk_ids[n, k]
            p = fill[e]
            fill[e] += 1
            token[p] = n
            weight[p] = topk_weights[n, k]
            xg[p] = x[n]
    n_active = 0
    active = np.empty(E, dtype=np.int64)
    for e in range(E):
        if offsets[e + 1] > offsets[e]:
            active[n_active] = e
            n_active += 1

    # activations as the streaming path wants them (per format)
    stream1 = stream_ok(fmt1, hidden) and stream_ok(fmt3, hidden)
    stream2 = stream_ok(fmt2, inter)
    p1 = prepare_activations(fmt1, xg, exact)
    p3 = p1 if fmt3 == fmt1 else prepare_activations(fmt3, xg, exact)  # as in ``_swiglu``

    # gate and up, h = silu(x w1.T) * (x w3.T): work items are (active expert, row chunk)
    h = np.empty((N * K, inter), dtype=np.float32)  # (N * K, inter)
    rows1 = _STREAM_ROWS if stream1 else _TILE_ROWS
    n_ic = (inter + rows1 - 1) // rows1
    for item in prange(n_active * n_ic):
        e = active[item // n_ic]
        r0 = (item % n_ic) * rows1
        r1 = min(inter, r0 + rows1)
        a, b = offsets[e], offsets[e + 1]
        _swiglu_rows(
            fmt1,
            w1[e],
            s1[e],
            fmt3,
            w3[e],
            s3[e],
            stream1,
            p1,
            p3,
            xg,
            a,
            b - a,
            r0,
            r1,
            h,
            f16,
            fp8,
        )

    q2, hp, hq, dh, hs = prepare_activations(fmt2, h, exact)

    # down, weighted and summed per token: work items are output row chunks, so each thread
    # owns its columns of y and adds the experts in id order
    rows2 = _STREAM_ROWS if stream2 else _TILE_ROWS
    n_dc = (hidden + rows2 - 1) // rows2
    for c in prange(n_dc):
        r0 = c * rows2
        r1 = min(hidden, r0 + rows2)
        for q in range(n_active):
            e = active[q]
            a, b = offsets[e], offsets[e + 1]
            part = np.empty((b - a, r1 - r0), dtype=np.float32)
            if stream2:
                gemm_stream(fmt2, w2[e], s2[e], q2, hp, hq, dh, hs, a, b - a, r0, r1, part, f16)
            else:
                _gemm_rows(fmt2, w2[e], s2[e], h[a:b], r0, r1, part, f16, fp8)
            for i in range(b - a):
                n = token[a + i]
                for j in range(r1 - r0):
                    y[n, r0 + j] += weight[a + i] * part[i, j]


def moe_swiglu(
    x: np.ndarray,
    topk_ids: np.ndarray,
    topk_weights: np.ndarray,
    w1: tuple[int, np.ndarray, np.ndarray],
    w3: tuple[int, np.ndarray, np.ndarray],
    w2: tuple[int, np.ndarray, np.ndarray],
    exact: bool = True,
    widen: bool | None = None,
) -> np.ndarray:
    """One layer's routed SwiGLU experts for all tokens in one call.

    y[n] = sum_k topk_weights[n, k] * W2[e] (silu(W1[e] x[n]) * W3[e] x[n]), e = topk_ids[n, k].

    Args:
        x: float32 (N, hidden).
        topk_ids: int64 (N, K) expert ids; topk_weights: float32 (N, K).
        w1, w3, w2: (format code, uint8 (E, rows, row_bytes) stored bytes, float32
            (E, row_blocks, col_blocks) FP8 scales or a (E, 1, 1) placeholder) per projection.
        exact: float32 activations; False quantizes them to int8 per 32 (see ``qmatmul``).
        widen: fast mode's bf16 tiles (see ``qmatmul``), expert by expert: None takes them
            for the experts with ``widen.MIN_EXPERT_TOKENS`` tokens or more where the CPU has
            bf16 units, the rest in the one-call kernel; True takes them for every expert.
    Returns:
        float32 (N, hidden).
    """
    y = np.zeros(x.shape, dtype=np.float32)
    # auto: tiles at all only where the CPU has bf16 units (use_tiles at any token count)
    if not exact and widen is not False and (widen or use_tiles(None, False, 1 << 30)):
        least = 1 if widen else MIN_EXPERT_TOKENS
        rest = _moe_tiles(x, topk_ids, topk_weights, w1, w3, w2, least, y)
        if rest is None:
            return y
        n, x, topk_ids, topk_weights = rest
        part = np.zeros(x.shape, dtype=np.float32)
        _moe_swiglu(*w1, *w3, *w2, x, topk_ids, topk_weights, part, F16_LUT, FP8_LUT, False)
        torch.from_numpy(y).index_add_(0, torch.from_numpy(n), torch.from_numpy(part))
        return y
    _moe_swiglu(*w1, *w3, *w2, x, topk_ids, topk_weights, y, F16_LUT, FP8_LUT, bool(exact))
    return y


def _moe_tiles(x, topk_ids, topk_weights, w1, w3, w2, least: int, y: np.ndarray):
    """The experts with ``least`` tokens or more through bf16 tiles, added into y. Returns
    None, or the other experts' assignments for the one-call kernel: (token of each, its
    activations (M, hidden), ids (M, 1), weights (M, 1))."""
    N, K = topk_ids.shape
    E = w1[1].shape[0]
    flat = topk_ids.reshape(-1)
    counts = np.bincount(flat, minlength=E)
    order = np.argsort(flat, kind="stable")  # assignments grouped by expert, tokens in order
    ends = np.cumsum(counts)
    hidden, inter = x.shape[1], w1[1].shape[1]
    xb = torch.from_numpy(x).bfloat16()
    yt = torch.from_numpy(y)
    wflat = torch.from_numpy(np.ascontiguousarray(topk_weights, dtype=np.float32).reshape(-1))
    small = np.zeros(flat.shape[0], dtype=bool)
    buf = scratch()  # one tile buffer, expert after expert
    for e in range(E):
        a, b = ends[e] - counts[e], ends[e]
        if counts[e] == 0:
            continue
        sel = order[a:b]
        if counts[e] < least:
            small[sel] = True
            continue
        tokens = torch.from_numpy(sel // K)
        (f1, a1, s1), (f3, a3, s3), (f2, a2, s2) = w1, w3, w2
        h = torch.empty((b - a, inter), dtype=torch.float32)
        t1 = Tiles(f1, a1[e], s1[e], hidden, F16_LUT, FP8_LUT, buf)
        t3 = Tiles(f3, a3[e], s3[e], hidden, F16_LUT, FP8_LUT, buf)
        tiled_swiglu(xb[tokens], t1, t3, inter, h)
        ye = torch.empty((b - a, hidden), dtype=torch.float32)
        t2 = Tiles(f2, a2[e], s2[e], inter, F16_LUT, FP8_LUT, buf)
        tiled_matmul(h.bfloat16(), t2, 0, hidden, ye)
        yt.index_add_(0, tokens, ye.mul_(wflat[torch.from_numpy(sel)].unsqueeze(1)))
    if not small.any():
        return None
    rest = np.nonzero(small)[0]
    n = rest // K
    return n, x[n], flat[rest].reshape(-1, 1), topk_weights.reshape(-1)[rest].reshape(-1, 1)
