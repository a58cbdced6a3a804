"""MLA's absorbed attention for one decoded token in one numba call (CPU, float32 cache).

Between the two projections that read the hidden state (``wq``, ``wkv_a``) and the output
projection ``wo``, a decode step's attention is small work in many pieces: RMSNorm of the
latent, RoPE of the shared key and of every head's query, the cache write, W_UK per head
(``wk_b``), scores over the latent cache, softmax, the weighted sum of the latents and W_UV per
head (``wv_b``). As torch ops that was ~25 small calls a layer, each paying dispatch and running
on caches the weight-streaming kernels had just flushed: ~2 ms of a 22 ms step on a 4-layer
V2-Lite-shaped model. Here it is one call (five parallel loops over heads, positions or head
groups); the two per-head products run the same row kernels (``kernels.gemm_stream``) on
the same activations as ``grouped_linear``, so ``wk_b`` / ``wv_b`` give the same numbers bit
for bit.

numba caches this module keyed on this file alone: after editing ``kernels`` or
``rowdot``, delete ``localseek/quant/cpu/__pycache__/*.nb*``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from localseek.quant.cpu.kernels import (
    F16_LUT,
    FASTMATH,
    KERNEL_FORMATS,
    check_width,
    gemm_stream,
    kernel_args,
    prepare_activations,
    stream_ok,
)
from localseek.quant.tensor import QTensor

_POS = 16  # cache positions per scoring work item
_SPAN = 256  # cache positions (512 KiB of a 512-wide latent) summed per pass over 4 heads


# The small dense products below are loops LLVM vectorizes over the latent's columns: a 4 x 4
# block of dot products shares each load four times (one dot per call ran at half torch's
# speed); the weighted sum adds 8 positions per pass over an output row, whose one store
# pointer keeps the loop vectorizable under LLVM's alias checks (4 rows a pass did not).
@njit(fastmath=FASTMATH, inline="always")
def _dot(a, b):
    acc = np.float32(0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(fastmath=FASTMATH, inline="always")
def _dot44(q, h, c, s, out) -> None:
    """out[i, j] = q[h + i] . c[s + j] for i, j < 4."""
    q0, q1, q2, q3 = q[h], q[h + 1], q[h + 2], q[h + 3]
    c0, c1, c2, c3 = c[s], c[s + 1], c[s + 2], c[s + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0)
    for i in range(q0.shape[0]):
        x0, x1, x2, x3 = c0[i], c1[i], c2[i], c3[i]
        y = q0[i]
        a00, a01, a02, a03 = a00 + y * x0, a01 + y * x1, a02 + y * x2, a03 + y * x3
        y = q1[i]
        a10, a11, a12, a13 = a10 + y * x0, a11 + y * x1, a12 + y * x2, a13 + y * x3
        y = q2[i]
        a20, a21, a22, a23 = a20 + y * x0, a21 + y * x1, a22 + y * x2, a23 + y * x3
        y = q3[i]
        a30, a31, a32, a33 = a30 + y * x0, a31 + y * x1, a32 + y * x2, a33 + y * x3
    out[0, 0], out[0, 1], out[0, 2], out[0, 3] = a00, a01, a02, a03
    out[1, 0], out[1, 1], out[1, 2], out[1, 3] = a10, a11, a12, a13
    out[2, 0], out[2, 1], out[2, 2], out[2, 3] = a20, a21, a22, a23
    out[3, 0], out[3, 1], out[3, 2], out[3, 3] = a30, a31, a32, a33


@njit(fastmath=FASTMATH, inline="always")
def _axpy8(o, p, h, s, c) -> None:
    """o += sum_j p[h, s + j] c[s + j] for j < 8."""
    p0, p1, p2, p3 = p[h, s], p[h, s + 1], p[h, s + 2], p[h, s + 3]
    p4, p5, p6, p7 = p[h, s + 4], p[h, s + 5], p[h, s + 6], p[h, s + 7]
    x0, x1, x2, x3 = c[s], c[s + 1], c[s + 2], c[s + 3]
    x4, x5, x6, x7 = c[s + 4], c[s + 5], c[s + 6], c[s + 7]
    for i in range(o.shape[0]):
        lo = p0 * x0[i] + p1 * x1[i] + p2 * x2[i] + p3 * x3[i]
        o[i] += lo + (p4 * x4[i] + p5 * x5[i] + p6 * x6[i] + p7 * x7[i])


@njit(fastmath=FASTMATH, inline="always")
def _axpy1(o, a, x) -> None:
    for i in range(o.shape[0]):
        o[i] += a * x[i]


@njit(inline="always")
def _rotate(x, o, rot, dst, d0) -> None:
    """dst[d0 + 2i], dst[d0 + 2i + 1] = (x[o + 2i], x[o + 2i + 1]) times rot[i, 0] + i rot[i, 1]."""
    for i in range(rot.shape[0]):
        x0, x1, re, im = x[o + 2 * i], x[o + 2 * i + 1], rot[i, 0], rot[i, 1]
        dst[d0 + 2 * i] = x0 * re - x1 * im
        dst[d0 + 2 * i + 1] = x0 * im + x1 * re


@njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _mla_decode(
    q: np.ndarray,  # float32 (H, nope + R): the token's query, before RoPE
    kv: np.ndarray,  # float32 (C + R,): the latent and the shared key, before norm / RoPE
    norm_w: np.ndarray,  # float32 (C,): kv_norm's weight
    eps: float,
    rot: np.ndarray,  # float32 (R / 2, 2): the position's rotation, (real, imaginary) pairs
    c_cache: np.ndarray,  # float32 (max_len, C): this layer's latent cache, written at pos
    pe_cache: np.ndarray,  # float32 (max_len, R): this layer's rotated keys, written at pos
    pos: int,
    fk: int,  # wk_b: (H * C, nope) rows, format fk
    wk: np.ndarray,
    sk: np.ndarray,
    fv: int,  # wv_b: (H * V, C) rows, format fv
    wv: np.ndarray,
    sv: np.ndarray,
    softmax_scale: float,
    exact: bool,
    f16: np.ndarray,
    out: np.ndarray,  # float32 (H, V): the heads' outputs, wo's input
) -> None:
    H, V, C = q.shape[0], out.shape[1], norm_w.shape[0]
    R = 2 * rot.shape[0]
    nope = q.shape[1] - R
    S = pos + 1
    # the latent: RMSNorm (float32, as F.rms_norm), then the cache; the shared key: RoPE
    ss = np.float32(0)
    for i in range(C):
        ss += kv[i] * kv[i]
    inv = np.float32(1) / np.sqrt(ss / np.float32(C) + np.float32(eps))
    for i in range(C):
        c_cache[pos, i] = (kv[i] * inv) * norm_w[i]
    _rotate(kv, C, rot, pe_cache[pos], 0)
    # every head's query: the rope part rotated, the rest through W_UK into the latent space
    q_lat = np.empty((H, C), dtype=np.float32)
    q_rot = np.empty((H, R), dtype=np.float32)
    for h in prange(H):
        qn = np.empty((1, nope), dtype=np.float32)
        qn[0] = q[h, :nope]
        _rotate(q[h], nope, rot, q_rot[h], 0)
        quant, xp, xq, dx, xs = prepare_activations(fk, qn, exact)
        gemm_stream(fk, wk, sk, quant, xp, xq, dx, xs, 0, 1, h * C, h * C + C, q_lat[h:], f16)
    # scores: a chunk of positions per work item, 4 heads x 4 positions per pass
    p = np.empty((H, S), dtype=np.float32)
    for c in prange((S + _POS - 1) // _POS):
        blk = np.empty((4, 4), dtype=np.float32)
        s1 = min(S, c * _POS + _POS)
        for s in range(c * _POS, s1, 4):
            for h in range(0, H, 4):
                if s + 4 <= s1 and h + 4 <= H:
                    _dot44(q_lat, h, c_cache, s, blk)
                    for i in range(4):
                        for j in range(4):
                            p[h + i, s + j] = blk[i, j]
                else:  # edges
                    for hh in range(h, min(H, h + 4)):
                        for ss in range(s, min(s1, s + 4)):
                            p[hh, ss] = _dot(q_lat[hh], c_cache[ss])
            for h in range(H):
                for ss in range(s, min(s1, s + 4)):
                    p[h, ss] = (p[h, ss] + _dot(q_rot[h], pe_cache[ss])) * np.float32(softmax_scale)
    for h in prange(H):
        top = np.float32(-np.inf)
        for s in range(S):
            top = max(top, p[h, s])
        tot = np.float32(0)
        for s in range(S):
            e = np.exp(p[h, s] - top)
            p[h, s] = e
            tot += e
        inv_tot = np.float32(1) / tot
        for s in range(S):
            p[h, s] *= inv_tot
    # the attended latents: 4 heads per work item, positions in chunks that stay in L2
    o_lat = np.zeros((H, C), dtype=np.float32)
    for g in prange((H + 3) // 4):
        for s0 in range(0, S, _SPAN):
            s1 = min(S, s0 + _SPAN)
            for h in range(4 * g, min(H, 4 * g + 4)):
                o = o_lat[h]
                s = s0
                while s + 8 <= s1:
                    _axpy8(o, p, h, s, c_cache)
                    s += 8
                while s < s1:
                    _axpy1(o, p[h, s], c_cache[s])
                    s += 1
    # W_UV: every head's attended latent out to its values
    for h in prange(H):
        quant, xp, xq, dx, xs = prepare_activations(fv, o_lat[h : h + 1], exact)
        gemm_stream(fv, wv, sv, quant, xp, xq, dx, xs, 0, 1, h * V, h * V + V, out[h:], f16)


def supported(wk_b: QTensor, wv_b: QTensor, nope: int, rank: int) -> bool:
    """Whether ``mla_decode`` runs these per-head weights (rows the streaming kernels take)."""
    return all(
        w.qtype in KERNEL_FORMATS and stream_ok(KERNEL_FORMATS[w.qtype], n)
        for w, n in ((wk_b, nope), (wv_b, rank))
    )


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.numpy()


def mla_decode(
    q: torch.Tensor,
    kv: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    rot: torch.Tensor | np.ndarray,
    c_cache: torch.Tensor | np.ndarray,
    pe_cache: torch.Tensor | np.ndarray,
    pos: int,
    wk_b: QTensor,
    wv_b: QTensor,
    softmax_scale: float,
    exact: bool,
) -> torch.Tensor:
    """One token's absorbed attention: the latent normed and the shared key rotated into the
    cache at ``pos``, then every head attends over positions 0..pos.

    Args:
        q: float32 (H, nope + R), the query projection's output.
        kv: float32 (C + R,), the ``wkv_a`` projection's output.
        norm_w: kv_norm's float32 weight (C,).
        rot: the rotation of position ``pos``: complex64 (R / 2,) (``RotaryEmbedding.rot``)
            or its float32 (R / 2, 2) pairs as a numpy array (``RotaryEmbedding.pairs``).
        c_cache, pe_cache: float32 (max_len, C) and (max_len, R) tensors or numpy arrays,
            this layer's cache (rows contiguous); written at ``pos``.
        wk_b: (H * C, nope), W_UK per head as llama.cpp stores it; wv_b: (H * V, C).
        exact: float32 activations into wk_b / wv_b (else int8 per 32, as ``linear``).
    Returns:
        float32 (H, V), the heads' outputs.
    """
    if not 0 <= pos < c_cache.shape[0]:
        raise ValueError(f"position {pos} is outside a cache of {c_cache.shape[0]} positions")
    H = q.shape[0]
    out = np.empty((H, wv_b.shape[0] // H), dtype=np.float32)
    (fk, wk, sk), (fv, wv, sv) = kernel_args(wk_b), kernel_args(wv_b)
    R = pe_cache.shape[1]
    check_width(fk, wk, q.shape[1] - R)
    check_width(fv, wv, c_cache.shape[1])
    if isinstance(rot, torch.Tensor):
        rot = torch.view_as_real(rot).numpy()
    _mla_decode(
        q.numpy(),
        kv.numpy(),
        norm_w.numpy(),
        eps,
        rot,
        _np(c_cache),
        _np(pe_cache),
        pos,
        fk,
        wk,
        sk,
        fv,
        wv,
        sv,
        softmax_scale,
        bool(exact),
        F16_LUT,
        out,
    )
    return torch.from_numpy(out)
