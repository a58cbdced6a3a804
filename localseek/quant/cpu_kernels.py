"""Numba CPU kernels: y = x @ W.T straight from the stored blocks, and one call per MoE layer.

Weights are never dequantized as a whole: each worker decodes a tile of ``_TILE_ROWS`` rows by
``_TILE`` columns into float32 (the exact values ``QTensor.dequantize`` gives), multiplies it
with every token's activations and sums each tile's products pairwise. Accumulation is float32
and activations are never rounded (``exact=True`` semantics). Work is split over output rows
with ``prange``, so each thread reads a disjoint slice of the weight bytes.

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

from localseek.quant.fp8 import FP8_BLOCK, FP8_QTYPE

FMT_Q8_0, FMT_Q4_0, FMT_Q4_K, FMT_FP8 = 0, 1, 2, 3
KERNEL_FORMATS: dict[str, int] = {
    "ggml_q8_0": FMT_Q8_0,
    "ggml_q4_0": FMT_Q4_0,
    "ggml_q4_k": FMT_Q4_K,
    FP8_QTYPE: FMT_FP8,
}
# elements per block, bytes per block (FP8: one byte per element, the block is the scale's)
_BLOCK = {FMT_Q8_0: (32, 34), FMT_Q4_0: (32, 18), FMT_Q4_K: (256, 144), FMT_FP8: (128, 128)}

_TILE = 256  # columns decoded at once: one Q4_K super-block, 8 Q8_0/Q4_0 blocks, 2 FP8 blocks
_TILE_ROWS = 16  # rows decoded at once (the vector lanes); a thread's unit of work
# half -> float32 and e4m3fn -> float32 for every bit pattern: exact, and cheap to index
F16_LUT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
FP8_LUT = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


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


# --- one matrix ------------------------------------------------------------------------------


@njit(parallel=True, fastmath=False, cache=True)
def _qmatmul(
    fmt: int,
    w: np.ndarray,  # uint8 (rows, row_bytes)
    scale: np.ndarray,  # float32 (row_blocks, col_blocks)
    x: np.ndarray,  # float32 (T, in)
    y: np.ndarray,  # float32 (T, rows)
    f16: np.ndarray,
    fp8: np.ndarray,
) -> None:
    T = x.shape[0]
    rows = w.shape[0]
    n_chunks = (rows + _TILE_ROWS - 1) // _TILE_ROWS
    for c in prange(n_chunks):
        r0 = c * _TILE_ROWS
        r1 = min(rows, r0 + _TILE_ROWS)
        part = np.empty((T, r1 - r0), dtype=np.float32)
        _gemm_rows(fmt, w, scale, x, r0, r1, part, f16, fp8)
        for t in range(T):
            for i in range(r1 - r0):
                y[t, r0 + i] = part[t, i]


def _scale2d(scale: torch.Tensor | None) -> np.ndarray:
    if scale is None:
        return np.zeros((1, 1), dtype=np.float32)
    return np.ascontiguousarray(scale.detach().cpu().numpy(), dtype=np.float32)


def raw_bytes(data: torch.Tensor) -> np.ndarray:
    """A weight's stored bytes as a uint8 numpy array (rows, row_bytes), without a copy."""
    if data.dtype == torch.float8_e4m3fn:
        data = data.view(torch.uint8)
    arr = data.detach().numpy()
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def qmatmul(x: torch.Tensor, qtype: str, data: torch.Tensor, scale: torch.Tensor | None):
    """y = x @ W.T for a weight stored as ``qtype`` (one of ``KERNEL_FORMATS``).

    Args:
        x: float32 (T, in) activations on the CPU.
        qtype: the QTensor format tag.
        data: the stored weight, uint8 (rows, row_bytes) or float8_e4m3fn (rows, in).
        scale: FP8 block scales (row_blocks, col_blocks); None for GGML formats.
    Returns:
        float32 (T, rows).
    """
    fmt = KERNEL_FORMATS[qtype]
    xs = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
    w = raw_bytes(data)
    y = np.empty((xs.shape[0], w.shape[0]), dtype=np.float32)
    _qmatmul(fmt, w, _scale2d(scale), xs, y, F16_LUT, FP8_LUT)
    return torch.from_numpy(y)


# --- one MoE layer ---------------------------------------------------------------------------


@njit(parallel=True, fastmath=False, cache=True)
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

    # gate and up, h = silu(x w1.T) * (x w3.T): work items are (active expert, row chunk)
    h = np.empty((N * K, inter), dtype=np.float32)  # (N * K, inter)
    n_ic = (inter + _TILE_ROWS - 1) // _TILE_ROWS
    for item in prange(n_active * n_ic):
        e = active[item // n_ic]
        r0 = (item % n_ic) * _TILE_ROWS
        r1 = min(inter, r0 + _TILE_ROWS)
        a, b = offsets[e], offsets[e + 1]
        g = np.empty((b - a, r1 - r0), dtype=np.float32)
        u = np.empty((b - a, r1 - r0), dtype=np.float32)
        _gemm_rows(fmt1, w1[e], s1[e], xg[a:b], r0, r1, g, f16, fp8)
        _gemm_rows(fmt3, w3[e], s3[e], xg[a:b], r0, r1, u, f16, fp8)
        for i in range(b - a):
            for j in range(r1 - r0):
                gv = g[i, j]
                h[a + i, r0 + j] = gv / (np.float32(1.0) + np.exp(-gv)) * u[i, j]

    # down, weighted and summed per token: work items are output row chunks, so each thread
    # owns its columns of y and adds the experts in id order
    n_dc = (hidden + _TILE_ROWS - 1) // _TILE_ROWS
    for c in prange(n_dc):
        r0 = c * _TILE_ROWS
        r1 = min(hidden, r0 + _TILE_ROWS)
        for q in range(n_active):
            e = active[q]
            a, b = offsets[e], offsets[e + 1]
            part = np.empty((b - a, r1 - r0), dtype=np.float32)
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
) -> np.ndarray:
    """One layer's routed SwiGLU experts for all tokens in one call.

    y[n] = sum_k topk_weights[n, k] * W2[e] (silu(W1[e] x[n]) * W3[e] x[n]), e = topk_ids[n, k].

    Args:
        x: float32 (N, hidden).
        topk_ids: int64 (N, K) expert ids; topk_weights: float32 (N, K).
        w1, w3, w2: (format code, uint8 (E, rows, row_bytes) stored bytes, float32
            (E, row_blocks, col_blocks) FP8 scales or a (E, 1, 1) placeholder) per projection.
    Returns:
        float32 (N, hidden).
    """
    y = np.zeros(x.shape, dtype=np.float32)
    _moe_swiglu(*w1, *w3, *w2, x, topk_ids, topk_weights, y, F16_LUT, FP8_LUT)
    return y
