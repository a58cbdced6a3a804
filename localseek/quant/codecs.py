"""Quantizers: float32 rows to the bytes of a GGML block type, and weights to DeepSeek's FP8.

Each GGML type is written bit-exact with llama.cpp's reference quantizer (the one
``llama_model_quantize`` uses when it has no importance matrix):

- F32, F16, BF16, Q8_0, Q4_0: gguf-py's ``gguf.quants.quantize``, which reproduces ggml's
  ``quantize_row_*_ref`` bit for bit for these types (checked in tests/test_quantize.py);
- Q4_K: gguf-py has no Q4_K quantizer, so ``quantize_q4_k`` reimplements ggml's
  ``quantize_row_q4_K_ref`` / ``make_qkx2_quants`` in numba, step for step in float32.

FP8 is DeepSeek's official layout: float8_e4m3fn values with one float32 ``weight_scale_inv``
per 128x128 block (the value is ``fp8 * scale_inv``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from localseek.quant.formats import BY_GGML, DENSE_GGML
from localseek.quant.fp8 import FP8_BLOCK, fp8_scale_shape

QK_K = 256
Q4_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1]  # 144: d, dmin, scales[12], qs[128]
FP8_MAX = 448.0

# The types `localseek quantize` writes, by the names users type.
WRITABLE: dict[str, GGMLQuantizationType] = {t.name.lower(): t for t in DENSE_GGML} | {
    f.ggml.name.lower(): f.ggml for f in BY_GGML.values() if f.writable
}


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block of ``qtype`` (1 for the float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def encoded_nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``shape`` (numpy order, rows last) takes in ``qtype``."""
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Encode float32 ``values`` (..., cols) as ``qtype``, bit-exact with llama.cpp.

    Returns float32/float16 arrays for F32/F16, else uint8 (..., cols // block * block_bytes).
    The row length must be a whole number of blocks.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == GGMLQuantizationType.Q4_K:
        rows = values.reshape(-1, values.shape[-1])
        return quantize_q4_k(rows).reshape(*values.shape[:-1], -1)
    return gguf_quantize(values, qtype)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q4_K_ref`` over float32 rows (rows, cols), cols % 256 == 0.

    Returns uint8 (rows, cols // 256 * 144). Super-blocks are quantized in parallel (numba
    threads), each exactly as ggml does it in float32.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, cols = rows.shape
    if cols % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {cols}")
    blocks = rows.reshape(-1, QK_K)  # (n_superblocks, 256)
    out = np.empty((blocks.shape[0], Q4_K_BYTES), dtype=np.uint8)
    d = np.empty(blocks.shape[0], dtype=np.float32)
    dmin = np.empty(blocks.shape[0], dtype=np.float32)
    _q4_k_blocks(blocks, out, d, dmin, min(len(blocks), 4 * numba.get_num_threads()))
    # d and dmin are already rounded to float16 values: the conversion below is exact
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = dmin.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return out.reshape(n_rows, -1)


# --- Q4_K in numba ----------------------------------------------------------------------------
# Every intermediate is float32 and rounded after each operation, as C does it (ggml-base is
# built without fused multiply-add contraction); a float64 step followed by a float32 rounding
# is the same as the float32 operation for +, -, *, / and sqrt.

_F = np.float32


@numba.njit(cache=True, inline="always")
def _nearest_int(v: float) -> int:
    # ggml's nearest_int adds 1.5 * 2**23: round half to even, like rint
    return int(np.rint(v))


@numba.njit(cache=True)
def _round_f16(v: np.float32) -> np.float32:
    """The float16 nearest to a non-negative float32 (ties to even), as a float32."""
    if v == 0:
        return _F(0.0)
    _, e = math.frexp(float(v))  # v = m * 2**e, 0.5 <= m < 1
    quantum = math.ldexp(1.0, e - 11) if e - 1 >= -14 else math.ldexp(1.0, -24)
    r = np.rint(float(v) / quantum) * quantum  # exact in float64
    if r > 65504.0:
        return _F(np.inf)
    return _F(r)


@numba.njit(cache=True)
def _make_qkx2_quants(x, weights, L, Laux, the_min, j):
    """ggml's make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false).

    Returns the scale; writes the levels into L and the (positive) min into the_min[j]."""
    n = x.shape[0]
    nmax = _F(15.0)
    rmin, rdelta, nstep = _F(-1.0), _F(0.1), 20
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = _F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w = _F(sum_w + w)
        sum_x = _F(sum_x + _F(w * x[i]))
    if mn > 0:
        mn = _F(0.0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        the_min[j] = -mn
        return _F(0.0)
    iscale = _F(nmax / _F(mx - mn))
    scale = _F(_F(1.0) / iscale)
    best_error = _F(0.0)
    for i in range(n):
        lv = _nearest_int(_F(iscale * _F(x[i] - mn)))
        lv = max(0, min(15, lv))
        L[i] = lv
        diff = _F(_F(_F(scale * _F(lv)) + mn) - x[i])
        diff = _F(diff * diff)
        best_error = _F(best_error + _F(weights[i] * diff))
    for step in range(nstep + 1):
        # mn is the best min found so far, as in ggml (it moves once a step improves)
        iscale = _F(_F(_F(rmin + _F(rdelta * _F(step))) + nmax) / _F(mx - mn))
        sum_l = _F(0.0)
        sum_l2 = _F(0.0)
        sum_xl = _F(0.0)
        for i in range(n):
            lv = _nearest_int(_F(iscale * _F(x[i] - mn)))
            lv = max(0, min(15, lv))
            Laux[i] = lv
            w = weights[i]
            fl = _F(lv)
            wl = _F(w * fl)
            sum_l = _F(sum_l + wl)
            sum_l2 = _F(sum_l2 + _F(wl * fl))
            sum_xl = _F(sum_xl + _F(wl * x[i]))
        D = _F(_F(sum_w * sum_l2) - _F(sum_l * sum_l))
        if D > 0:
            this_scale = _F(_F(_F(sum_w * sum_xl) - _F(sum_x * sum_l)) / D)
            this_min = _F(_F(_F(sum_l2 * sum_x) - _F(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = _F(0.0)
                this_scale = _F(sum_xl / sum_l2)
            cur_error = _F(0.0)
            for i in range(n):
                diff = _F(_F(_F(this_scale * _F(Laux[i])) + this_min) - x[i])
                diff = _F(diff * diff)
                cur_error = _F(cur_error + _F(weights[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    the_min[j] = -mn
    return scale


@numba.njit(cache=True)
def _q4_k_superblock(x, out, L, Laux, weights, scales, mins):
    """One 256-value super-block into out[4:144]; returns (d, dmin) rounded to float16."""
    max_scale = _F(0.0)
    max_min = _F(0.0)
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = _F(0.0)
        for v in xs:
            sum_x2 = _F(sum_x2 + _F(v * v))
        av_x = _F(math.sqrt(_F(sum_x2 / _F(32.0))))
        for t in range(32):
            weights[t] = _F(av_x + abs(xs[t]))
        scales[j] = _make_qkx2_quants(xs, weights, L[32 * j : 32 * j + 32], Laux, mins, j)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = _F(_F(63.0) / max_scale) if max_scale > 0 else _F(0.0)
    inv_min = _F(_F(63.0) / max_min) if max_min > 0 else _F(0.0)
    sc = out[4:16]
    for j in range(8):
        ls = min(63, _nearest_int(_F(inv_scale * scales[j])) & 0xFF)
        lm = min(63, _nearest_int(_F(inv_min * mins[j])) & 0xFF)
        if j < 4:
            sc[j] = ls
            sc[j + 4] = lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d = _round_f16(_F(max_scale / _F(63.0)))
    dmin = _round_f16(_F(max_min / _F(63.0)))
    for j in range(8):
        if j < 4:
            s, m = sc[j] & 63, sc[j + 4] & 63
        else:
            s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
            m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        dj = _F(d * _F(s))
        if dj == 0:
            continue  # keep make_qkx2_quants' levels, as ggml does
        dm = _F(dmin * _F(m))
        for t in range(32):
            lv = _nearest_int(_F(_F(x[32 * j + t] + dm) / dj))
            L[32 * j + t] = max(0, min(15, lv))
    qs = out[16:144]
    for half in range(4):  # 64 values -> 32 bytes: low nibbles first 32, high nibbles next 32
        for t in range(32):
            qs[32 * half + t] = L[64 * half + t] | (L[64 * half + t + 32] << 4)
    return d, dmin


@numba.njit(cache=True, parallel=True)
def _q4_k_blocks(blocks, out, d_out, dmin_out, n_chunks):
    n = blocks.shape[0]
    for c in numba.prange(n_chunks):
        L = np.empty(QK_K, dtype=np.uint8)
        Laux = np.empty(32, dtype=np.uint8)
        weights = np.empty(32, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        for b in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            out[b, 4:16] = 0
            d, dmin = _q4_k_superblock(blocks[b], out[b], L, Laux, weights, scales, mins)
            d_out[b] = d
            dmin_out[b] = dmin


# --- FP8 --------------------------------------------------------------------------------------


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8: (float8_e4m3fn weight, float32 weight_scale_inv per 128x128 block).

    The scale of a block is its max |w| / 448, so the block's largest value maps to e4m3's
    largest; partial edge blocks are scaled on their own values.
    """
    w = w.to(torch.float32)
    rows, cols = w.shape
    br, bc = fp8_scale_shape((rows, cols))
    pad = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK, dtype=torch.float32)
    pad[:rows, :cols] = w
    tiles = pad.view(br, FP8_BLOCK, bc, FP8_BLOCK)  # (br, 128, bc, 128)
    amax = tiles.abs().amax(dim=(1, 3))  # (br, bc)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(br * FP8_BLOCK, bc * FP8_BLOCK)[:rows, :cols].contiguous(), scale
