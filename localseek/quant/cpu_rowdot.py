"""Row dot products for the numba CPU kernels, written as LLVM vector IR (numba intrinsics).

LLVM's loop vectorizer turns a nibble or byte loop into byte -> dword zero-extensions, which
are shuffles and run on one or two ports; that, not memory, bounded the plain numba loops well
below the memory bandwidth. These intrinsics load the stored bytes as 32-bit words instead and
take byte ``k`` of every word with one mask (or shift) per 8 values, so no shuffle is needed.
Values then come out in the order ``4 * i + k`` (little-endian words); the activations are
permuted to match once per call (``cpu_kernels._permute``), which costs ``T * in`` copies instead
of ``rows * in`` shuffles. Powers of two that the masks leave in the values are folded into the
permuted activations, so every product is the exact float32 product. The IR is target-neutral
vector IR: LLVM picks the instructions (AVX2 here: vpand, vcvtdq2ps, vfmadd, vpmaddwd).

One intrinsic computes ``nt`` tokens' dot products with one weight row, decoding each block once
for all ``nt`` tokens. Accumulation is float32 in vector lanes.

numba's on-disk cache of ``cpu_kernels`` keys on that file only: after editing this one, delete
``localseek/quant/__pycache__/cpu_kernels*.nb*``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

FMT_Q8_0, FMT_Q4_0, FMT_Q4_K, FMT_FP8 = 0, 1, 2, 3
# (weights per unit of the loop, stored bytes per unit, vector lanes)
UNIT = {FMT_Q8_0: (32, 34, 8), FMT_Q4_0: (32, 18, 4), FMT_Q4_K: (256, 144, 8), FMT_FP8: (32, 32, 8)}

_I8, _I16, _I32, _I64, _F32 = (
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.IntType(64),
    ir.FloatType(),
)


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _splat(t: ir.Type, n: int, v) -> ir.Constant:
    return ir.Constant(_vec(t, n), [v] * n)


class _Gen:
    """IR helpers bound to one builder."""

    def __init__(self, context, builder):
        self.c, self.b = context, builder

    def i64(self, v: int) -> ir.Constant:
        return ir.Constant(_I64, v)

    def data(self, aryty, ary) -> ir.Value:
        return self.c.make_array(aryty)(self.c, self.b, ary).data

    def array(self, aryty, ary):
        return self.c.make_array(aryty)(self.c, self.b, ary)

    def load(self, base: ir.Value, off: ir.Value, ty: ir.Type, ety: ir.Type) -> ir.Value:
        """Unaligned load of ``ty`` at element offset ``off`` of ``base`` (elements of ety)."""
        p = self.b.gep(base, [off], source_etype=ety)
        return self.b.load(self.b.bitcast(p, ty.as_pointer()), align=1)

    def lane(self, v: ir.Value, j: int, n: int) -> ir.Value:
        """Broadcast lane j of v to n lanes."""
        return self.b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), [j] * n))

    def bcast(self, s: ir.Value, n: int) -> ir.Value:
        v = self.b.insert_element(ir.Constant(_vec(_F32, n), ir.Undefined), s, ir.Constant(_I32, 0))
        return self.lane(v, 0, n)

    def hsum(self, v: ir.Value, n: int) -> ir.Value:
        b = self.b
        while n > 1:
            n //= 2
            lo = b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
            hi = b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
            v = b.fadd(lo, hi)
        return b.extract_element(v, ir.Constant(_I32, 0))

    def f16(self, row: ir.Value, off: ir.Value, lut: ir.Value) -> ir.Value:
        """A little-endian f16 at byte offset ``off`` as float32, through the 65536-entry LUT."""
        h = self.b.zext(self.load(row, off, _I16, _I8), _I64)
        return self.b.load(self.b.gep(lut, [h], source_etype=_F32))


def _decode(g: _Gen, fmt: int, w: ir.Value, lanes: int) -> list[list[ir.Value]]:
    """The float values of one chunk of words ``w`` (<lanes x i32>), as groups (one per scale)
    of four <lanes x float> vectors, vector k holding byte k (or its nibble) of every word."""
    b = g.b
    vf = _vec(_F32, lanes)
    if fmt in (FMT_Q4_K, FMT_Q4_0):  # low nibbles, then high nibbles: q * 256**k
        wh = b.lshr(w, _splat(_I32, lanes, 4))
        return [
            [b.sitofp(b.and_(src, _splat(_I32, lanes, 15 << (8 * k))), vf) for k in range(4)]
            for src in (w, wh)
        ]
    if fmt == FMT_Q8_0:  # byte k moved to the top: q * 2**24, signed
        top = _splat(_I32, lanes, -(1 << 24))  # 0xFF000000
        out = []
        for k in range(4):
            v = w if k == 3 else b.shl(w, _splat(_I32, lanes, 24 - 8 * k))
            out.append(b.sitofp(b.and_(v, top), vf))
        return [out]
    # FP8 e4m3fn: byte at the top, arithmetic shift by 4 puts sign at bit 31 and the 7
    # exponent/mantissa bits at 20..26: a float32 equal to the value * 2**-120 (subnormals too)
    keep = _splat(_I32, lanes, -(1 << 31) + 0x07F00000)  # 0x87F00000
    out = []
    for k in range(4):
        v = w if k == 3 else b.shl(w, _splat(_I32, lanes, 24 - 8 * k))
        v = b.and_(b.ashr(v, _splat(_I32, lanes, 4)), keep)
        out.append(b.bitcast(v, vf))
    return [out]


def _q4k_scales(g: _Gen, rowp: ir.Value, base: ir.Value, d: ir.Value, dmin: ir.Value):
    """A Q4_K super-block's 8 sub-block scales d * sc and mins dmin * m (<8 x float> each),
    unpacked from its 12 bytes of 6-bit fields in vector lanes."""
    b = g.b
    s12 = b.zext(g.load(rowp, b.add(base, g.i64(4)), _vec(_I8, 12), _I8), _vec(_I32, 12))

    def pick(idx):
        return b.shuffle_vector(s12, s12, ir.Constant(_vec(_I32, 8), idx))

    def const(vals):
        return ir.Constant(_vec(_I32, 8), vals)

    def top2(v):  # (v >> 6) << 4 in lanes 4..7, 0 in lanes 0..3
        return b.and_(b.shl(b.lshr(v, const([6] * 8)), const([4] * 8)), const([0] * 4 + [48] * 4))

    low = const([63] * 4 + [15] * 4)
    # sc: lanes 0-3 s[0..3] & 63; lanes 4-7 (s[8..11] & 15) | (s[0..3] >> 6) << 4
    sc = b.or_(b.and_(pick([0, 1, 2, 3, 8, 9, 10, 11]), low), top2(pick([0, 1, 2, 3] * 2)))
    # m: lanes 0-3 s[4..7] & 63; lanes 4-7 (s[8..11] >> 4) | (s[4..7] >> 6) << 4
    mm = b.lshr(pick([4, 5, 6, 7, 8, 9, 10, 11]), const([0] * 4 + [4] * 4))
    m = b.or_(b.and_(mm, low), top2(pick([4, 5, 6, 7] * 2)))
    vf = _vec(_F32, 8)
    return b.fmul(g.bcast(d, 8), b.sitofp(sc, vf)), b.fmul(g.bcast(dmin, 8), b.sitofp(m, vf))


def make_rowdot(fmt: int, nt: int):
    """An intrinsic ``rowdot(row, xp, t0, xsum, scale, lut, out)``: out[t] = W[row] . x[t0 + t]
    for t < nt.

    Args (numba arrays):
        row: uint8 (row_bytes,) one row's stored bytes.
        xp: float32 (T, in) activations permuted by ``permute_activations`` for ``fmt``.
        xsum: float32 (T, in // 32) sums of the unpermuted activations per 32 (Q4_K, Q4_0).
        scale: float32 (in // 128,) the row's FP8 block scales (others: unused).
        lut: float32 (65536,) f16 -> float32.
        out: float32 (nt,) results.
    """
    wpu, bpu, lanes = UNIT[fmt]
    vf = _vec(_F32, lanes)
    vi = _vec(_I32, lanes)

    @intrinsic
    def rowdot(typingctx, row, xp, t0, xsum, scale, lut, out):
        sig = types.void(row, xp, t0, xsum, scale, lut, out)

        def codegen(context, builder, sig, args):
            g = _Gen(context, builder)
            b = builder
            rowty, xpty, _, xsty, scty, lutty, outty = sig.args
            rowa = g.array(rowty, args[0])
            rowp = rowa.data
            xpa = g.array(xpty, args[1])
            xpp = xpa.data
            n_in = b.extract_value(xpa.shape, 1)
            xsa = g.array(xsty, args[3])
            xsp = xsa.data
            n_xs = b.extract_value(xsa.shape, 1)
            scp = g.data(scty, args[4])
            lutp = g.data(lutty, args[5])
            outp = g.data(outty, args[6])
            t0v = args[2]
            n_units = b.sdiv(b.extract_value(rowa.shape, 0), g.i64(bpu))
            zero = ir.Constant(vf, [0.0] * lanes)
            n_acc = 2 if fmt == FMT_Q4_K else 1
            accs = [[cgutils.alloca_once_value(b, zero) for _ in range(n_acc)] for _ in range(nt)]
            mins = [cgutils.alloca_once_value(b, zero) for _ in range(nt)]
            msum = [cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in range(nt)]
            xrow = [b.mul(b.add(t0v, g.i64(t)), n_in) for t in range(nt)]
            xsrow = [b.mul(b.add(t0v, g.i64(t)), n_xs) for t in range(nt)]

            with cgutils.for_range(b, n_units) as loop:
                u = loop.index
                base = b.mul(u, g.i64(bpu))
                x0 = b.mul(u, g.i64(wpu))
                if fmt == FMT_Q4_K:
                    d = g.f16(rowp, base, lutp)
                    dmin = g.f16(rowp, b.add(base, g.i64(2)), lutp)
                    dsc, dm = _q4k_scales(g, rowp, base, d, dmin)
                    for t in range(nt):
                        xs = g.load(xsp, b.add(xsrow[t], b.mul(u, g.i64(8))), vf, _F32)
                        b.store(b.fadd(b.load(mins[t]), b.fmul(dm, xs)), mins[t])
                    for grp in range(4):
                        w = g.load(rowp, b.add(base, g.i64(16 + 32 * grp)), vi, _I8)
                        halves = _decode(g, fmt, w, lanes)
                        for h, vals in enumerate(halves):
                            sj = g.lane(dsc, 2 * grp + h, lanes)
                            for t in range(nt):
                                xo = b.add(xrow[t], b.add(x0, g.i64(64 * grp + 32 * h)))
                                part = None
                                for k in range(4):
                                    xv = g.load(xpp, b.add(xo, g.i64(8 * k)), vf, _F32)
                                    pr = b.fmul(vals[k], xv)
                                    part = pr if part is None else b.fadd(part, pr)
                                a = accs[t][h]
                                b.store(b.fadd(b.load(a), b.fmul(sj, part)), a)
                else:
                    if fmt == FMT_FP8:
                        # chunk of 32 columns; its block scale is scale[u // 4]
                        s = b.load(b.gep(scp, [b.sdiv(u, g.i64(4))], source_etype=_F32))
                        s = b.fmul(s, ir.Constant(_F32, 2.0**120))
                        woff = base
                    else:
                        d = g.f16(rowp, base, lutp)
                        s = b.fmul(d, ir.Constant(_F32, 2.0**-24)) if fmt == FMT_Q8_0 else d
                        woff = b.add(base, g.i64(2))
                    w = g.load(rowp, woff, vi, _I8)
                    halves = _decode(g, fmt, w, lanes)
                    sv = g.bcast(s, lanes)
                    for t in range(nt):
                        part = None
                        for h, vals in enumerate(halves):
                            xo = b.add(xrow[t], b.add(x0, g.i64(4 * lanes * h)))
                            for k in range(4):
                                xv = g.load(xpp, b.add(xo, g.i64(lanes * k)), vf, _F32)
                                pr = b.fmul(vals[k], xv)
                                part = pr if part is None else b.fadd(part, pr)
                        a = accs[t][0]
                        b.store(b.fadd(b.load(a), b.fmul(sv, part)), a)
                        if fmt == FMT_Q4_0:  # q - 8: subtract 8 d sum(x) at the end
                            xs = b.load(b.gep(xsp, [b.add(xsrow[t], u)], source_etype=_F32))
                            b.store(b.fadd(b.load(msum[t]), b.fmul(d, xs)), msum[t])
            for t in range(nt):
                tot = None
                for a in accs[t]:
                    hs = g.hsum(b.load(a), lanes)
                    tot = hs if tot is None else b.fadd(tot, hs)
                if fmt == FMT_Q4_K:
                    tot = b.fsub(tot, g.hsum(b.load(mins[t]), 8))
                if fmt == FMT_Q4_0:
                    tot = b.fsub(tot, b.fmul(ir.Constant(_F32, 8.0), b.load(msum[t])))
                b.store(tot, b.gep(outp, [g.i64(t)], source_etype=_F32))
            return context.get_dummy_value()

        return sig, codegen

    return rowdot


# --- int8 activations (exact=False) ----------------------------------------------------------
#
# Activations are quantized per 32 to int8 (stored as int16, scale dx = max|x| / 127, as
# llama.cpp's Q8 activations) and the weights' integers are multiplied by them in integer
# arithmetic: 16-bit lanes, adjacent products summed into 32 bits (the pattern LLVM lowers to
# vpmaddwd). One float conversion and one fused multiply-add per 8 sums of 4 products remain.
# Byte k of every 16-bit word is taken with one mask or shift, so activations are permuted within
# each run of 16 * 2 (Q4_0: 8 * 2) values: value 2 * i + k goes to k * L + i.

QUNIT = {FMT_Q8_0: (32, 34, 8), FMT_Q4_0: (32, 18, 4), FMT_Q4_K: (256, 144, 8)}


def _madd(b: ir.IRBuilder, x: ir.Value, y: ir.Value, n: int) -> ir.Value:
    """<2n x i16> x, y -> <n x i32>: x[2i] * y[2i] + x[2i+1] * y[2i+1] (vpmaddwd)."""
    v32 = _vec(_I32, 2 * n)
    p = b.mul(b.sext(x, v32), b.sext(y, v32))
    even = b.shuffle_vector(p, p, ir.Constant(_vec(_I32, n), list(range(0, 2 * n, 2))))
    odd = b.shuffle_vector(p, p, ir.Constant(_vec(_I32, n), list(range(1, 2 * n, 2))))
    return b.add(even, odd)


def _qdecode(b: ir.IRBuilder, fmt: int, w: ir.Value, n16: int) -> list[list[ir.Value]]:
    """Integer weights of one chunk of 16-bit words ``w`` (<n16 x i16>): groups (one per
    scale) of two vectors, vector k holding byte k (or its nibble) of every word."""

    def c(v):
        return _splat(_I16, n16, v)

    if fmt == FMT_Q8_0:
        return [[b.ashr(b.shl(w, c(8)), c(8)), b.ashr(w, c(8))]]
    lo = [b.and_(w, c(15)), b.and_(b.lshr(w, c(8)), c(15))]
    hi = [b.and_(b.lshr(w, c(4)), c(15)), b.lshr(w, c(12))]
    return [lo, hi]


def make_rowdot_q8(fmt: int, nt: int):
    """An intrinsic ``rowdot(row, xq, t0, dx, xs, lut, out)``: out[t] = W[row] . x[t0 + t] with
    int8 activations, for t < nt.

    Args (numba arrays):
        row: uint8 (row_bytes,) one row's stored bytes.
        xq: int16 (T, in) quantized activations permuted by ``cpu_kernels._quantize``.
        dx: float32 (T, in // 32) their scales.
        xs: float32 (T, in // 32) per 32: sum(xq) * dx (Q4_K mins) or sum(xq) (Q4_0).
        lut: float32 (65536,) f16 -> float32.
        out: float32 (nt,) results.
    """
    wpu, bpu, lanes = QUNIT[fmt]
    n16 = 2 * lanes  # 16-bit words per vector
    vf = _vec(_F32, lanes)
    vw = _vec(_I16, n16)

    @intrinsic
    def rowdot(typingctx, row, xq, t0, dx, xs, lut, out):
        sig = types.void(row, xq, t0, dx, xs, lut, out)

        def codegen(context, builder, sig, args):
            g = _Gen(context, builder)
            b = builder
            rowty, xqty, _, dxty, xsty, lutty, outty = sig.args
            rowa = g.array(rowty, args[0])
            rowp = rowa.data
            xqa = g.array(xqty, args[1])
            xqp = xqa.data
            n_in = b.extract_value(xqa.shape, 1)
            dxa = g.array(dxty, args[3])
            dxp = dxa.data
            n_b = b.extract_value(dxa.shape, 1)
            xsp = g.data(xsty, args[4])
            lutp = g.data(lutty, args[5])
            outp = g.data(outty, args[6])
            n_units = b.sdiv(b.extract_value(rowa.shape, 0), g.i64(bpu))
            zero = ir.Constant(vf, [0.0] * lanes)
            n_acc = 2 if fmt == FMT_Q4_K else 1
            accs = [[cgutils.alloca_once_value(b, zero) for _ in range(n_acc)] for _ in range(nt)]
            mins = [cgutils.alloca_once_value(b, _splat(_F32, 8, 0.0)) for _ in range(nt)]
            msum = [cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in range(nt)]
            tok = [b.add(args[2], g.i64(t)) for t in range(nt)]
            xrow = [b.mul(tok[t], n_in) for t in range(nt)]
            brow = [b.mul(tok[t], n_b) for t in range(nt)]

            def isum(vals, t, xo):  # <lanes x i32>: sum over k of madd(vals[k], xq[...])
                tot = None
                for k, v in enumerate(vals):
                    xv = g.load(xqp, b.add(xo, g.i64(n16 * k)), vw, _I16)
                    m = _madd(b, v, xv, lanes)
                    tot = m if tot is None else b.add(tot, m)
                return b.sitofp(tot, vf)

            with cgutils.for_range(b, n_units) as loop:
                u = loop.index
                base = b.mul(u, g.i64(bpu))
                x0 = b.mul(u, g.i64(wpu))
                if fmt == FMT_Q4_K:
                    d = g.f16(rowp, base, lutp)
                    dmin = g.f16(rowp, b.add(base, g.i64(2)), lutp)
                    dsc, dm = _q4k_scales(g, rowp, base, d, dmin)
                    sub = b.mul(u, g.i64(8))
                    s_t = []
                    for t in range(nt):
                        xs = g.load(xsp, b.add(brow[t], sub), _vec(_F32, 8), _F32)
                        b.store(b.fadd(b.load(mins[t]), b.fmul(dm, xs)), mins[t])
                        dxv = g.load(dxp, b.add(brow[t], sub), _vec(_F32, 8), _F32)
                        s_t.append(b.fmul(dsc, dxv))
                    for grp in range(4):
                        w = g.load(rowp, b.add(base, g.i64(16 + 32 * grp)), vw, _I8)
                        for h, vals in enumerate(_qdecode(b, fmt, w, n16)):
                            for t in range(nt):
                                xo = b.add(xrow[t], b.add(x0, g.i64(64 * grp + 32 * h)))
                                sj = g.lane(s_t[t], 2 * grp + h, lanes)
                                a = accs[t][h]
                                b.store(b.fadd(b.load(a), b.fmul(sj, isum(vals, t, xo))), a)
                else:
                    d = g.f16(rowp, base, lutp)
                    w = g.load(rowp, b.add(base, g.i64(2)), vw, _I8)
                    groups = _qdecode(b, fmt, w, n16)
                    for t in range(nt):
                        blk = b.add(brow[t], u)
                        sd = b.fmul(d, b.load(b.gep(dxp, [blk], source_etype=_F32)))
                        xo = b.add(xrow[t], x0)
                        vals = [v for grp in groups for v in grp]
                        a = accs[t][0]
                        b.store(b.fadd(b.load(a), b.fmul(g.bcast(sd, lanes), isum(vals, t, xo))), a)
                        if fmt == FMT_Q4_0:  # q - 8: subtract 8 d dx sum(xq) at the end
                            xsv = b.load(b.gep(xsp, [blk], source_etype=_F32))
                            b.store(b.fadd(b.load(msum[t]), b.fmul(sd, xsv)), msum[t])
            for t in range(nt):
                tot = None
                for a in accs[t]:
                    hs = g.hsum(b.load(a), lanes)
                    tot = hs if tot is None else b.fadd(tot, hs)
                if fmt == FMT_Q4_K:
                    tot = b.fsub(tot, g.hsum(b.load(mins[t]), 8))
                if fmt == FMT_Q4_0:
                    tot = b.fsub(tot, b.fmul(ir.Constant(_F32, 8.0), b.load(msum[t])))
                b.store(tot, b.gep(outp, [g.i64(t)], source_etype=_F32))
            return context.get_dummy_value()

        return sig, codegen

    return rowdot
