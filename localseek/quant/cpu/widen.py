"""Rows of stored blocks widened to bfloat16, for prefill batches on CPUs with bf16 matrix units.

On a CPU with AMX (Sapphire Rapids and later) or AVX512-BF16, oneDNN's bf16 matmul (torch's)
runs 5-10 times faster than the integer dot products of the streaming kernels: 1.0 TMAC/s on two
Sapphire Rapids cores at 512 tokens against ~90 GMAC/s. A prefill batch then goes faster by
widening a few hundred rows of the weight at a time into a scratch tile of bf16 and multiplying
the tile there (``kernels.widened_matmul``); the weight is never held dequantized as a whole,
and decode (one token) keeps the streaming kernels, which read each byte once.

Each format's decoder is an intrinsic ``widen(w, r0, nr, lut, out)``: out[i] = the bf16 bits of
row r0 + i, rounded to nearest even from the float32 value ``QTensor.dequantize`` gives (the
same products; they may differ from it in the last float32 bit where a product is rounded in
another order, so in at most one bf16 step). The code formats use ``codes``' block decoders
(codes, scales and mins, w = sc * code - mn), the hand-scheduled ones (Q8_0, Q4_0, Q4_K) their
few lines here; F16 widens through vcvtph2ps, BF16 is already the tile (``kernels``), FP8's
lookups are plain numba there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from localseek.quant.cpu.codes import block32, superblock
from localseek.quant.cpu.rowdot import (
    F32,
    I8,
    I16,
    I32,
    IRGen,
    nibbles,
    q4k_scales,
    splat,
    target_features,
    vec,
)
from localseek.quant.formats import (
    BY_CODE,
    FMT_BF16,
    FMT_F16,
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
)
from localseek.quant.fp8 import FP8_BLOCK


def to_bf16(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """<n x float> -> <n x i16> bf16 bits, rounded to nearest even (finite values)."""
    n = v.type.count
    u = b.bitcast(v, vec(I32, n))
    odd = b.and_(b.lshr(u, splat(I32, n, 16)), splat(I32, n, 1))
    r = b.add(b.add(u, splat(I32, n, 0x7FFF)), odd)
    return b.trunc(b.lshr(r, splat(I32, n, 16)), vec(I16, n))


def _spread_lanes(b: ir.IRBuilder, v: ir.Value, first: int, per: int, n: int) -> ir.Value:
    """<n x float> whose lane i is lane ``first + i // per`` of v."""
    return b.shuffle_vector(v, v, ir.Constant(vec(I32, n), [first + i // per for i in range(n)]))


def make_widen(fmt: int):
    """The intrinsic ``widen(w, r0, nr, lut, out)`` for one GGML format (not BF16).

    Args (numba arrays):
        w: uint8 (rows, row_bytes) stored bytes, one row of blocks per output row.
        lut: float32 (65536,) f16 -> float32.
        out: uint16 (>= nr, in): bf16 bits; row i gets stored row r0 + i.
    """
    f = BY_CODE[fmt]
    wpu, bpu = f.block, f.block_bytes

    @intrinsic
    def widen(typingctx, w, r0, nr, lut, out):
        sig = types.void(w, r0, nr, lut, out)

        def codegen(context, builder, sig, args):
            g = IRGen(context, builder)
            b = builder
            wty, _, _, lutty, outty = sig.args
            wa = g.array(wty, args[0])
            lutp = g.data(lutty, args[3])
            outa = g.array(outty, args[4])
            n_units = b.sdiv(b.extract_value(wa.shape, 1), g.i64(bpu))

            with cgutils.for_range(b, args[2]) as rows:
                rowp = g.row(wa, b.add(args[1], rows.index))
                orow = b.bitcast(g.row(outa, rows.index), I16.as_pointer())

                def put(v: ir.Value, at: ir.Value) -> None:  # floats at element ``at``
                    h = to_bf16(b, v)
                    p = b.gep(orow, [at], source_etype=I16)
                    b.store(h, b.bitcast(p, h.type.as_pointer()), align=1)

                def affine(codes, sc, mn, at) -> None:  # sc * code - mn, codes unsigned
                    n = codes.type.count
                    v = b.fmul(sc, b.uitofp(codes, vec(F32, n)))
                    put(v if mn is None else b.fsub(v, mn), at)

                with cgutils.for_range(b, n_units) as loop:
                    u = loop.index
                    base = b.mul(u, g.i64(bpu))
                    x0 = b.mul(u, g.i64(wpu))
                    if fmt == FMT_Q8_0:
                        d = g.f16(rowp, base, lutp)
                        q = g.load(rowp, b.add(base, g.i64(2)), vec(I8, 32), I8)
                        put(b.fmul(g.bcast(d, 32), b.sitofp(q, vec(F32, 32))), x0)
                    elif fmt == FMT_Q4_0:
                        d = g.f16(rowp, base, lutp)
                        q = nibbles(b, g.load(rowp, b.add(base, g.i64(2)), vec(I8, 16), I8))
                        dv = g.bcast(d, 32)
                        affine(q, dv, b.fmul(dv, ir.Constant(vec(F32, 32), [8.0] * 32)), x0)
                    elif fmt == FMT_Q4_K:
                        d = g.f16(rowp, base, lutp)
                        dmin = g.f16(rowp, b.add(base, g.i64(2)), lutp)
                        sc, mn = q4k_scales(g, rowp, base, d, dmin)  # <8 x float>, per 32
                        for a in range(4):  # 32 bytes: sub-blocks 2a (low), 2a + 1 (high)
                            q = nibbles(
                                b, g.load(rowp, b.add(base, g.i64(16 + 32 * a)), vec(I8, 32), I8)
                            )
                            affine(
                                q,
                                _spread_lanes(b, sc, 2 * a, 32, 64),
                                _spread_lanes(b, mn, 2 * a, 32, 64),
                                b.add(x0, g.i64(64 * a)),
                            )
                    elif fmt == FMT_F16:
                        h = g.load(rowp, base, vec(I16, 32), I8)
                        put(b.fpext(b.bitcast(h, vec(ir.HalfType(), 32)), vec(F32, 32)), x0)
                    elif wpu == 256:
                        chunks, d, isc, mn = superblock(g, fmt, rowp, base, lutp, False)
                        sc = b.fmul(g.bcast(d, 16), b.sitofp(isc, vec(F32, 16)))
                        for c, cv in enumerate(chunks):  # groups 4c .. 4c + 3 of 16
                            affine(
                                cv,
                                _spread_lanes(b, sc, 4 * c, 16, 64),
                                _spread_lanes(b, mn, 4 * c, 16, 64),
                                b.add(x0, g.i64(64 * c)),
                            )
                    else:
                        codes, d, mn = block32(g, fmt, rowp, base, lutp, False)
                        affine(codes, g.bcast(d, 32), g.bcast(mn, 32), x0)
            return context.get_dummy_value()

        return sig, codegen

    return widen


(
    _W_Q8_0,
    _W_Q4_0,
    _W_Q4_K,
    _W_F16,
    _W_Q4_1,
    _W_Q5_0,
    _W_Q5_1,
    _W_IQ4_NL,
    _W_MXFP4,
    _W_Q2_K,
    _W_Q3_K,
    _W_Q5_K,
    _W_Q6_K,
    _W_IQ4_XS,
) = (
    make_widen(f)
    for f in (
        FMT_Q8_0,
        FMT_Q4_0,
        FMT_Q4_K,
        FMT_F16,
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
)
_ROWS = 16  # rows a work item widens


@njit(cache=True)
def _widen_fp8(w, scale, r0, nr, fp8, out) -> None:
    tmp = np.empty(w.shape[1], dtype=np.float32)
    bits = tmp.view(np.uint32)
    for i in range(nr):
        r = r0 + i
        srow = scale[r // FP8_BLOCK]
        for k in range(w.shape[1]):
            tmp[k] = fp8[w[r, k]] * srow[k // FP8_BLOCK]
        for k in range(w.shape[1]):
            u = bits[k]
            odd = (u >> np.uint32(16)) & np.uint32(1)
            out[i, k] = np.uint16((u + np.uint32(0x7FFF) + odd) >> np.uint32(16))


@njit(cache=True)
def _widen(fmt, w, scale, r0, nr, lut, fp8, out) -> None:
    """out[i] = bf16 of row r0 + i of w, for i < nr; one branch per format (numba cannot pick
    an intrinsic from a tuple at run time)."""
    if fmt == FMT_Q4_K:
        _W_Q4_K(w, r0, nr, lut, out)
    elif fmt == FMT_Q8_0:
        _W_Q8_0(w, r0, nr, lut, out)
    elif fmt == FMT_Q6_K:
        _W_Q6_K(w, r0, nr, lut, out)
    elif fmt == FMT_Q5_0:
        _W_Q5_0(w, r0, nr, lut, out)
    elif fmt == FMT_Q4_0:
        _W_Q4_0(w, r0, nr, lut, out)
    elif fmt == FMT_Q5_K:
        _W_Q5_K(w, r0, nr, lut, out)
    elif fmt == FMT_Q3_K:
        _W_Q3_K(w, r0, nr, lut, out)
    elif fmt == FMT_Q2_K:
        _W_Q2_K(w, r0, nr, lut, out)
    elif fmt == FMT_IQ4_XS:
        _W_IQ4_XS(w, r0, nr, lut, out)
    elif fmt == FMT_MXFP4:
        _W_MXFP4(w, r0, nr, lut, out)
    elif fmt == FMT_IQ4_NL:
        _W_IQ4_NL(w, r0, nr, lut, out)
    elif fmt == FMT_Q4_1:
        _W_Q4_1(w, r0, nr, lut, out)
    elif fmt == FMT_Q5_1:
        _W_Q5_1(w, r0, nr, lut, out)
    elif fmt == FMT_F16:
        _W_F16(w, r0, nr, lut, out)
    elif fmt == FMT_BF16:  # already bf16 (``Tiles`` views the rows instead)
        for i in range(nr):
            for k in range(out.shape[1]):
                out[i, k] = np.uint16(w[r0 + i, 2 * k]) | (np.uint16(w[r0 + i, 2 * k + 1]) << 8)
    else:  # FMT_FP8
        _widen_fp8(w, scale, r0, nr, fp8, out)


@njit(parallel=True, cache=True, nogil=True)
def widen_rows(fmt, w, scale, r0, r1, lut, fp8, out) -> None:
    """out[i] = rows r0 + i of the stored weight w as bf16 bits (uint16), i < r1 - r0; work
    items of ``_ROWS`` rows over the threads."""
    n = r1 - r0
    for c in prange((n + _ROWS - 1) // _ROWS):
        a = c * _ROWS
        k = min(_ROWS, n - a)
        _widen(fmt, w, scale, r0 + a, k, lut, fp8, out[a : a + k])


# --- prefill products through bf16 tiles -----------------------------------------------------


def bf16_units() -> bool:
    """Whether the CPU numba compiles for has bf16 matrix or dot-product units (AMX-BF16,
    AVX512-BF16) that oneDNN's matmul (torch's) uses; without them a bf16 matmul converts to
    float32 and the streaming kernels are faster."""
    return bool({"amx-bf16", "avx512bf16"} & target_features()) and (
        torch.backends.mkldnn.is_available()
    )


BF16_UNITS = bf16_units()
# the fewest tokens a weight is multiplied with for the bf16 tiles to beat the streaming int8
# kernels: widening costs ~0.08 ns a weight on two Sapphire Rapids cores and oneDNN's matmul is
# inefficient at few tokens; Q4_K (the fastest int8 kernel) 2048 x 2048 at 16 / 24 / 32 / 128
# tokens: int8 0.79 / 1.23 / 1.70 / 6.9 ms, tiles 0.81 / 0.82 / 0.87 / 1.8 ms; 1408 x 2048
# breaks even at 24
MIN_TOKENS = 24
# the same for one routed expert in the MoE call, whose int8 kernel is slower per product than a
# single matrix's: 64 experts (Q4_K 1408 x 2048 gate / up, Q5_0 down), top-6 of N tokens, with
# experts of at least 1 / 12 / 24 tokens through tiles against the int8 call: N = 64: 125 / 86 /
# 87 against 84 ms; N = 128: 129 / 121 / 154 against 138; N = 256: 139 / 140 / 190 against 246
MIN_EXPERT_TOKENS = 12
TILE_BYTES = 4 << 20  # bf16 rows a tile holds (1024 of 2048): 1 MiB tiles measured ~20% slower


def use_tiles(widen: bool | None, exact: bool, tokens: int) -> bool:
    """The path of one product: ``widen`` True / False forces it; None (auto) takes the tiles
    in fast mode for ``MIN_TOKENS`` or more tokens where the CPU has bf16 units."""
    if exact:
        return False
    return (BF16_UNITS and tokens >= MIN_TOKENS) if widen is None else widen


def tile_rows(n_in: int) -> int:
    """Rows of ``n_in`` bf16 values a tile holds (a multiple of the work items')."""
    return max(_ROWS, TILE_BYTES // (2 * n_in) // _ROWS * _ROWS)


def scratch() -> np.ndarray:
    """A tile's worth of bf16 scratch, for ``Tiles`` that take turns (one MoE call's experts):
    a fresh 4 MiB buffer is a page fault per 4 KiB on first touch."""
    return np.empty(TILE_BYTES // 2, dtype=np.uint16)


class Tiles:
    """bf16 tiles of one stored weight: ``tile(r0, r1)`` is rows r0..r1 as a torch bf16
    (r1 - r0, n_in) tensor, widened into a scratch buffer that the next tile reuses (BF16
    rows: a view of the stored bytes, no copy)."""

    def __init__(self, fmt: int, w: np.ndarray, scale: np.ndarray, n_in: int, lut, fp8, buf=None):
        self.fmt, self.w, self.scale, self.n_in, self.lut, self.fp8 = fmt, w, scale, n_in, lut, fp8
        self.buf = scratch() if buf is None else buf

    def tile(self, r0: int, r1: int) -> torch.Tensor:
        if self.fmt == FMT_BF16:
            return torch.from_numpy(self.w[r0:r1]).view(torch.bfloat16)
        n = (r1 - r0) * self.n_in
        if self.buf.shape[0] < n:  # a row wider than a tile
            self.buf = np.empty(n, dtype=np.uint16)
        out = self.buf[:n].reshape(r1 - r0, self.n_in)
        widen_rows(self.fmt, self.w, self.scale, r0, r1, self.lut, self.fp8, out)
        return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)


def tiled_matmul(xb: torch.Tensor, tiles: Tiles, r0: int, r1: int, y: torch.Tensor) -> None:
    """y[:, :] = xb @ W[r0:r1].T: xb torch bf16 (T, in), y torch float32 (T, r1 - r0)."""
    step = tile_rows(tiles.n_in)
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        y[:, a - r0 : b - r0] = xb @ tiles.tile(a, b).T


def tiled_swiglu(xb: torch.Tensor, t1: Tiles, t3: Tiles, rows: int, h: torch.Tensor) -> None:
    """h = silu(xb @ W1.T) * (xb @ W3.T) by tiles of both; h torch float32 (T, rows)."""
    step = tile_rows(t1.n_in)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        g = (xb @ t1.tile(a, b).T).float()
        u = xb @ t3.tile(a, b).T
        h[:, a:b] = F.silu(g).mul_(u)
