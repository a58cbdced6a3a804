"""Row dot products for the numba CPU kernels, written as LLVM vector IR (numba intrinsics).

LLVM's loop vectorizer turns a nibble or byte loop into byte -> dword zero-extensions, which
are shuffles and run on one or two ports; that, not memory, bounded the plain numba loops well
below the memory bandwidth. Two paths:

- float32 activations (``make_rowdot``, exact): the stored bytes are loaded as 32-bit words and
  byte ``k`` of every word is taken with one mask (or shift) per 8 values, so no shuffle is
  needed. Values come out in the order ``4 * i + k`` (little-endian words); the activations are
  permuted to match once per call (``kernels._permute``), which costs ``T * in`` copies
  instead of ``rows * in`` shuffles. Powers of two that the masks leave in the values are folded
  into the permuted activations, so every product is the exact float32 product.
- int8 activations (``make_rowdot_i8``, the default fast path): u8 x s8 dot products of 4 pairs
  per 32-bit lane: vpdpbusd on CPUs with VNNI (64 weights per instruction), vpmaddubsw +
  vpmaddwd on AVX2 without it (Zen 2/3, most desktop Intel; 32 weights per pair, weights below
  129 so the 16-bit pair sums cannot saturate).

One intrinsic computes ``nt`` tokens' dot products with ``nr`` consecutive weight rows, decoding
each block once for all ``nt`` tokens; rows are looped over inside it, so a row costs neither a
call nor an array view (that was 30% of a 2048-wide Q4_K row). Accumulation is float32 in
vector lanes. The IR is target-neutral apart from vpdpbusd: LLVM picks the instructions.

numba's on-disk cache of ``kernels`` (and of ``attention``, which inlines its row loops)
keys on each module's own file only: after editing this one, delete
``localseek/quant/cpu/__pycache__/*.nb*``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from localseek.quant.formats import FMT_Q4_0, FMT_Q4_K, FMT_Q8_0

# (weights per unit of the loop, stored bytes per unit, vector lanes)
UNIT = {FMT_Q8_0: (32, 34, 8), FMT_Q4_0: (32, 18, 4), FMT_Q4_K: (256, 144, 8)}

I8, I16, I32, I64, F32 = (
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.IntType(64),
    ir.FloatType(),
)


def vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def splat(t: ir.Type, n: int, v) -> ir.Constant:
    return ir.Constant(vec(t, n), [v] * n)


def _iota(n: int) -> ir.Constant:
    """Shuffle indices 0..n-1: concatenates two vectors of n / 2."""
    return ir.Constant(vec(I32, n), list(range(n)))


class IRGen:
    """IR helpers bound to one builder."""

    def __init__(self, context, builder):
        self.c, self.b = context, builder

    def i64(self, v: int) -> ir.Constant:
        return ir.Constant(I64, v)

    def data(self, aryty, ary) -> ir.Value:
        return self.c.make_array(aryty)(self.c, self.b, ary).data

    def array(self, aryty, ary):
        return self.c.make_array(aryty)(self.c, self.b, ary)

    def load(self, base: ir.Value, off: ir.Value, ty: ir.Type, ety: ir.Type) -> ir.Value:
        """Unaligned load of ``ty`` at element offset ``off`` of ``base`` (elements of ety)."""
        p = self.b.gep(base, [off], source_etype=ety)
        return self.b.load(self.b.bitcast(p, ty.as_pointer()), align=1)

    def row(self, arr, r: ir.Value) -> ir.Value:
        """An i8* to row ``r`` of a 2-D array (any element type, any row stride)."""
        base = self.b.bitcast(arr.data, I8.as_pointer())
        return self.b.gep(base, [self.b.mul(r, self.b.extract_value(arr.strides, 0))])

    def store2d(self, v: ir.Value, arr, r: ir.Value, c: ir.Value) -> None:
        """arr[r, c] = v for a float32 2-D array."""
        p = self.b.gep(self.row(arr, r), [self.b.mul(c, self.b.extract_value(arr.strides, 1))])
        self.b.store(v, self.b.bitcast(p, F32.as_pointer()))

    def lane(self, v: ir.Value, j: int, n: int) -> ir.Value:
        """Broadcast lane j of v to n lanes."""
        return self.b.shuffle_vector(v, v, ir.Constant(vec(I32, n), [j] * n))

    def bcast(self, s: ir.Value, n: int) -> ir.Value:
        v = self.b.insert_element(ir.Constant(vec(F32, n), ir.Undefined), s, ir.Constant(I32, 0))
        return self.lane(v, 0, n)

    def hsum(self, v: ir.Value, n: int) -> ir.Value:
        b = self.b
        while n > 1:
            n //= 2
            lo = b.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n))))
            hi = b.shuffle_vector(v, v, ir.Constant(vec(I32, n), list(range(n, 2 * n))))
            v = b.fadd(lo, hi)
        return b.extract_element(v, ir.Constant(I32, 0))

    def prefetch(self, row: ir.Value, off: ir.Value) -> None:
        """A prefetch of the byte at ``row + off`` into every cache level (prefetcht0).

        Not prefetchnta: on a Sapphire Rapids-class Xeon that halved batch-1 throughput (2
        threads, 10944 x 2048, paired runs: Q8_0 12.7 -> 28.8 GB/s, Q6_K 12.2 -> 25.1, Q4_K
        12.9 -> 22.6, Q5_0 12.6 -> 20.7, of a measured 34 GB/s; no prefetch: 21 / 17 / 11 / 9)."""
        b = self.b
        fn = cgutils.get_or_insert_function(
            b.module,
            ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
            "llvm.prefetch.p0",
        )
        p = b.gep(row, [off], source_etype=I8)
        b.call(fn, [p, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])

    def f16(self, row: ir.Value, off: ir.Value, lut: ir.Value) -> ir.Value:
        """A little-endian f16 at byte offset ``off`` as float32 (vcvtph2ps)."""
        h = self.load(row, off, I16, I8)
        return self.b.fpext(self.b.bitcast(h, ir.HalfType()), F32)


def _decode(g: IRGen, fmt: int, w: ir.Value, lanes: int) -> list[list[ir.Value]]:
    """The float values of one chunk of words ``w`` (<lanes x i32>), as groups (one per scale)
    of four <lanes x float> vectors, vector k holding byte k (or its nibble) of every word."""
    b = g.b
    vf = vec(F32, lanes)
    if fmt in (FMT_Q4_K, FMT_Q4_0):  # low nibbles, then high nibbles: q * 256**k
        wh = b.lshr(w, splat(I32, lanes, 4))
        return [
            [b.sitofp(b.and_(src, splat(I32, lanes, 15 << (8 * k))), vf) for k in range(4)]
            for src in (w, wh)
        ]
    if fmt == FMT_Q8_0:  # byte k moved to the top: q * 2**24, signed
        top = splat(I32, lanes, -(1 << 24))  # 0xFF000000
        out = []
        for k in range(4):
            v = w if k == 3 else b.shl(w, splat(I32, lanes, 24 - 8 * k))
            out.append(b.sitofp(b.and_(v, top), vf))
        return [out]


def q4k_scale_bytes(g: IRGen, rowp: ir.Value, base: ir.Value):
    """A Q4_K super-block's 8 sub-block scales sc and mins m (<8 x i8> each, 0..63), unpacked
    from its 12 bytes of 6-bit fields as three 32-bit words (four fields a word):
    sc[0:4] = a & 63, m[0:4] = b & 63, sc[4:8] = (c & 15) | (a >> 6) << 4,
    m[4:8] = (c >> 4) | (b >> 6) << 4, bytewise."""
    b = g.b
    a, bw, c = (g.load(rowp, b.add(base, g.i64(o)), I32, I8) for o in (4, 8, 12))

    def k(v):
        return ir.Constant(I32, v)

    sc_lo, m_lo = b.and_(a, k(0x3F3F3F3F)), b.and_(bw, k(0x3F3F3F3F))
    sc_hi = b.or_(b.and_(c, k(0x0F0F0F0F)), b.and_(b.lshr(a, k(2)), k(0x30303030)))
    m_hi = b.or_(b.and_(b.lshr(c, k(4)), k(0x0F0F0F0F)), b.and_(b.lshr(bw, k(2)), k(0x30303030)))

    def bytes8(lo, hi):  # two words of 4 bytes -> <8 x i8>
        v = b.insert_element(ir.Constant(vec(I32, 2), ir.Undefined), lo, k(0))
        return b.bitcast(b.insert_element(v, hi, k(1)), vec(I8, 8))

    return bytes8(sc_lo, sc_hi), bytes8(m_lo, m_hi)


def q4k_scales(g: IRGen, rowp: ir.Value, base: ir.Value, d: ir.Value, dmin: ir.Value):
    """A Q4_K super-block's 8 sub-block scales d * sc and mins dmin * m (<8 x float> each)."""
    b, vf = g.b, vec(F32, 8)
    sc, m = q4k_scale_bytes(g, rowp, base)
    return b.fmul(g.bcast(d, 8), b.uitofp(sc, vf)), b.fmul(g.bcast(dmin, 8), b.uitofp(m, vf))


def make_rowdot(fmt: int, nt: int):
    """Q8_0 / Q4_0 / Q4_K rows against float32 activations (exact): an intrinsic
    ``rowdot(w, r0, nr, xp, t0, xsum, scale, lut, out, o0)``:
    out[o0 + t, i] = W[r0 + i] . x[t0 + t] for t < nt, i < nr.

    Rows are looped over inside the intrinsic, so a row costs no call and no array view.

    Args (numba arrays):
        w: uint8 (rows, row_bytes) stored bytes, one row of blocks per output row.
        xp: float32 (T, in) activations permuted by ``kernels._permute`` for ``fmt``.
        xsum: float32 (T, in // 32) sums of the unpermuted activations per 32 (Q4_K, Q4_0).
        scale: unused (the FP8 rows' argument: ``make_rowdot_fp8``).
        lut: float32 (65536,) f16 -> float32.
        out: float32 (tokens, nr) results.
    """
    wpu, bpu, lanes = UNIT[fmt]
    vf = vec(F32, lanes)
    vi = vec(I32, lanes)

    @intrinsic
    def rowdot(typingctx, w, r0, nr, xp, t0, xsum, scale, lut, out, o0):
        sig = types.void(w, r0, nr, xp, t0, xsum, scale, lut, out, o0)

        def codegen(context, builder, sig, args):
            g = IRGen(context, builder)
            b = builder
            wty, _, _, xpty, _, xsty, _, lutty, outty, _ = sig.args
            wa = g.array(wty, args[0])
            r0v, nrv, t0v, o0v = args[1], args[2], args[4], args[9]
            xpa = g.array(xpty, args[3])
            xpp = xpa.data
            n_in = b.extract_value(xpa.shape, 1)
            xsa = g.array(xsty, args[5])
            xsp = xsa.data
            n_xs = b.extract_value(xsa.shape, 1)
            lutp = g.data(lutty, args[7])
            outa = g.array(outty, args[8])
            n_units = b.sdiv(b.extract_value(wa.shape, 1), g.i64(bpu))
            zero = ir.Constant(vf, [0.0] * lanes)
            n_acc = 2 if fmt == FMT_Q4_K else 1
            accs = [[cgutils.alloca_once_value(b, zero) for _ in range(n_acc)] for _ in range(nt)]
            mins = [cgutils.alloca_once_value(b, zero) for _ in range(nt)]
            msum = [cgutils.alloca_once_value(b, ir.Constant(F32, 0.0)) for _ in range(nt)]
            xrow = [b.mul(b.add(t0v, g.i64(t)), n_in) for t in range(nt)]
            xsrow = [b.mul(b.add(t0v, g.i64(t)), n_xs) for t in range(nt)]

            with cgutils.for_range(b, nrv) as rows:
                r = b.add(r0v, rows.index)
                rowp = g.row(wa, r)
                for t in range(nt):
                    for a in accs[t]:
                        b.store(zero, a)
                    b.store(zero, mins[t])
                    b.store(ir.Constant(F32, 0.0), msum[t])
                with cgutils.for_range(b, n_units) as loop:
                    u = loop.index
                    base = b.mul(u, g.i64(bpu))
                    for o in range(0, bpu, 64):  # as the int8 rows: PF bytes ahead
                        g.prefetch(rowp, b.add(base, g.i64(PF + o)))
                    x0 = b.mul(u, g.i64(wpu))
                    if fmt == FMT_Q4_K:
                        d = g.f16(rowp, base, lutp)
                        dmin = g.f16(rowp, b.add(base, g.i64(2)), lutp)
                        dsc, dm = q4k_scales(g, rowp, base, d, dmin)
                        for t in range(nt):
                            xs = g.load(xsp, b.add(xsrow[t], b.mul(u, g.i64(8))), vf, F32)
                            b.store(b.fadd(b.load(mins[t]), b.fmul(dm, xs)), mins[t])
                        for grp in range(4):
                            wv = g.load(rowp, b.add(base, g.i64(16 + 32 * grp)), vi, I8)
                            halves = _decode(g, fmt, wv, lanes)
                            for h, vals in enumerate(halves):
                                sj = g.lane(dsc, 2 * grp + h, lanes)
                                for t in range(nt):
                                    xo = b.add(xrow[t], b.add(x0, g.i64(64 * grp + 32 * h)))
                                    part = None
                                    for k in range(4):
                                        xv = g.load(xpp, b.add(xo, g.i64(8 * k)), vf, F32)
                                        pr = b.fmul(vals[k], xv)
                                        part = pr if part is None else b.fadd(part, pr)
                                    a = accs[t][h]
                                    b.store(b.fadd(b.load(a), b.fmul(sj, part)), a)
                    else:
                        d = g.f16(rowp, base, lutp)
                        s = b.fmul(d, ir.Constant(F32, 2.0**-24)) if fmt == FMT_Q8_0 else d
                        woff = b.add(base, g.i64(2))
                        wv = g.load(rowp, woff, vi, I8)
                        halves = _decode(g, fmt, wv, lanes)
                        sv = g.bcast(s, lanes)
                        for t in range(nt):
                            part = None
                            for h, vals in enumerate(halves):
                                xo = b.add(xrow[t], b.add(x0, g.i64(4 * lanes * h)))
                                for k in range(4):
                                    xv = g.load(xpp, b.add(xo, g.i64(lanes * k)), vf, F32)
                                    pr = b.fmul(vals[k], xv)
                                    part = pr if part is None else b.fadd(part, pr)
                            a = accs[t][0]
                            b.store(b.fadd(b.load(a), b.fmul(sv, part)), a)
                            if fmt == FMT_Q4_0:  # q - 8: subtract 8 d sum(x) at the end
                                xs = b.load(b.gep(xsp, [b.add(xsrow[t], u)], source_etype=F32))
                                b.store(b.fadd(b.load(msum[t]), b.fmul(d, xs)), msum[t])
                for t in range(nt):
                    tot = None
                    for a in accs[t]:
                        hs = g.hsum(b.load(a), lanes)
                        tot = hs if tot is None else b.fadd(tot, hs)
                    side = g.hsum(b.load(mins[t]), 8)  # Q4_K: mins; else the odd block
                    tot = b.fsub(tot, side) if fmt == FMT_Q4_K else b.fadd(tot, side)
                    if fmt == FMT_Q4_0:
                        tot = b.fsub(tot, b.fmul(ir.Constant(F32, 8.0), b.load(msum[t])))
                    g.store2d(tot, outa, b.add(o0v, g.i64(t)), rows.index)
            return context.get_dummy_value()

        return sig, codegen

    return rowdot


def fp8_values(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """<n x i8> FP8 e4m3fn bytes -> <n x float>, each value * 2**-8, in order.

    Sign-extended to 16 bits and shifted left by 7, a byte's sign lands on bit 15 and its 7
    exponent/mantissa bits on 13..7 (bit 14, a copy of the sign, is masked off): an f16 equal
    to the value * 2**-8, subnormals included, which vcvtph2ps widens to a normal float32. Three
    integer ops per 32 values (vpmovsxbw, vpsllw, vpand). Placing the bits straight into a
    float32 gives the value * 2**-120, whose subnormals cost Intel cores a microcode assist per
    operation (0.84 GB/s at batch 1); a 32-bit lane per byte took four times the ops."""
    n = v.type.count
    h = b.and_(b.shl(b.sext(v, vec(I16, n)), splat(I16, n, 7)), splat(I16, n, 0xBF80 - 0x10000))
    return b.fpext(b.bitcast(h, vec(ir.HalfType(), n)), vec(F32, n))


def make_rowdot_fp8(nt: int):
    """FP8 e4m3fn rows with 128 x 128 block scales against float32 activations in their
    natural order (both modes: the products are float32's): an intrinsic ``rowdot(w, r0, nr,
    x, t0, xsum, scale, lut, out, o0)``, out[o0 + t, i] = W[r0 + i] . x[t0 + t] for t < nt,
    i < nr; ``make_rowdot``'s arguments, xsum and lut unused, scale float32 (row_blocks,
    col_blocks). Rows are whole 32-column chunks.

    A step takes one 128-column block (two cache lines): four chunks of 32 widened by
    ``fp8_values``, their products with x summed, then times the block's scale once; a
    row's last partial block goes a chunk at a time."""
    v32 = vec(F32, 32)
    fm = ("contract",)

    @intrinsic
    def rowdot(typingctx, w, r0, nr, x, t0, xsum, scale, lut, out, o0):
        sig = types.void(w, r0, nr, x, t0, xsum, scale, lut, out, o0)

        def codegen(context, builder, sig, args):
            g = IRGen(context, builder)
            b = builder
            wty, _, _, xty, _, _, scty, _, outty, _ = sig.args
            wa = g.array(wty, args[0])
            r0v, nrv, o0v = args[1], args[2], args[9]
            xa = g.array(xty, args[3])
            n_in = b.extract_value(xa.shape, 1)
            sca = g.array(scty, args[6])
            outa = g.array(outty, args[8])
            n_chunks = b.sdiv(b.extract_value(wa.shape, 1), g.i64(32))
            n_blocks = b.sdiv(n_chunks, g.i64(4))
            accs = [cgutils.alloca_once(b, v32) for _ in range(nt)]
            xrow = [b.mul(b.add(args[4], g.i64(t)), n_in) for t in range(nt)]

            def step(rowp, scp, blk, c0, n_c: int) -> None:
                """Chunks c0 .. c0 + n_c - 1 of block ``blk``: acc += s * sum w x."""
                base = b.mul(c0, g.i64(32))
                s = b.load(b.gep(scp, [blk], source_etype=F32))
                sv = g.bcast(b.fmul(s, ir.Constant(F32, 2.0**8)), 32)
                ws = [
                    fp8_values(b, g.load(rowp, b.add(base, g.i64(32 * c)), vec(I8, 32), I8))
                    for c in range(n_c)
                ]
                for t in range(nt):
                    part = None
                    for c, wv in enumerate(ws):
                        xo = b.add(xrow[t], b.add(base, g.i64(32 * c)))
                        pr = b.fmul(wv, g.load(xa.data, xo, v32, F32), flags=fm)
                        part = pr if part is None else b.fadd(part, pr, flags=fm)
                    a = accs[t]
                    b.store(b.fadd(b.load(a), b.fmul(sv, part, flags=fm), flags=fm), a)

            with cgutils.for_range(b, nrv) as rows:
                r = b.add(r0v, rows.index)
                rowp = g.row(wa, r)
                scp = b.bitcast(g.row(sca, b.sdiv(r, g.i64(128))), F32.as_pointer())
                for a in accs:
                    b.store(ir.Constant(v32, None), a)
                with cgutils.for_range(b, n_blocks) as loop:
                    blk = loop.index
                    c0 = b.mul(blk, g.i64(4))
                    for o in (0, 64):
                        g.prefetch(rowp, b.add(b.mul(blk, g.i64(128)), g.i64(PF + o)))
                    step(rowp, scp, blk, c0, 4)
                with cgutils.for_range_slice(b, b.mul(n_blocks, g.i64(4)), n_chunks, g.i64(1)) as (
                    c,
                    _,
                ):
                    step(rowp, scp, b.sdiv(c, g.i64(4)), c, 1)
                for t in range(nt):
                    g.store2d(g.hsum(b.load(accs[t]), 32), outa, b.add(o0v, g.i64(t)), rows.index)
            return context.get_dummy_value()

        return sig, codegen

    return rowdot


# --- int8 activations (exact=False) ----------------------------------------------------------
#
# Activations are quantized per 32 to int8 (scale dx = max|x| / 127, as llama.cpp's Q8
# activations), kept in their natural order, and multiplied by the weights' integers with one
# u8 x s8 dot product of 4 pairs per 32-bit lane (``dpbusd``): AVX512-VNNI / AVX-VNNI's
# vpdpbusd where the target CPU has it, else plain vector IR that LLVM lowers as it can (the
# same sums, bit for bit). Q4_K / Q4_0 nibbles are already unsigned; Q8_0 weights enter as |w|
# with w's sign moved onto the activations. One float conversion and one fused multiply-add per
# 32 weights and token remain.

# bytes ahead of the weight read that the rows prefetch (``IRGen.prefetch``). On the Sapphire
# Rapids-class Xeon, batch 1, 2 threads, 2048 x 7168, GB/s at 512 / 1 K / 2 K / 3 K / 4 K:
# MXFP4 11 / 14 / 18 / 18 / 19, Q4_K 23 / 24 / 26 / 25 / 24, Q2_K 18 / 20 / 22 / 21 / 20,
# Q8_0 27 / 27 / 28 / 29 / 23 (1 K was the best of 0 / 1 K / 4 K with prefetchnta on AMD Zen)
PF = 2048
QUNIT = {FMT_Q8_0: (32, 34), FMT_Q4_0: (32, 18), FMT_Q4_K: (256, 144)}
_VB = vec(I8, 32)  # 32 bytes: one ymm
_VD = vec(I32, 8)


def nibbles(b: ir.IRBuilder, w: ir.Value) -> ir.Value:
    """<n x i8> packed nibbles -> <2n x i8>: the n low nibbles, then the n high ones.

    The bytes go into both halves of one vector (a broadcast load, no shuffle), the upper half
    is shifted right by 4 per 16-bit word, and one mask keeps the low nibble of every byte:
    three whole-vector ops, where splitting the halves and concatenating them cost a shuffle
    per 32 bytes and left the loops shuffle-bound."""
    n = w.type.count
    both = b.shuffle_vector(w, w, ir.Constant(vec(I32, 2 * n), [*range(n)] * 2))
    shift = ir.Constant(vec(I16, n), [0] * (n // 2) + [4] * (n // 2))
    both = b.lshr(b.bitcast(both, vec(I16, n)), shift)
    return b.and_(b.bitcast(both, vec(I8, 2 * n)), splat(I8, 2 * n, 15))


def target_features() -> set[str]:
    """The CPU features numba compiles for (NUMBA_CPU_FEATURES, else the host's)."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    feats = config.CPU_FEATURES
    if feats is None:
        feats = get_host_cpu_features()
    return {f[1:] for f in feats.split(",") if f.startswith("+")}


def target_vnni() -> int:
    """Widest vpdpbusd, in bytes, of the CPU numba compiles for: 64 (AVX512-VNNI with BW and
    VL), 32 (AVX-VNNI), 0 (none: ``dpbusd`` uses AVX2's vpmaddubsw, else plain vector IR).

    Follows numba's own target choice: NUMBA_CPU_FEATURES (with NUMBA_CPU_NAME) or
    NUMBA_ENABLE_AVX=0 select the plain path too, and numba's cache keys on them."""
    on = target_features()
    if {"avx512vnni", "avx512bw"} <= on:
        return 64 if "avx512vl" in on else 0
    return 32 if "avxvnni" in on else 0


def superblock_int_sums() -> bool:
    """Whether the int8 paths sum a 256-weight super-block in int32 with its integer scales
    (``q4k_int_superblocks``, and ``codes``' super-block formats): AVX2 without VNNI, where
    float conversions and scale multiplies per 16 or 32 weights bound prefill. It needs
    activations with one scale per 256 (llama.cpp's q8_K, which every k-quant and IQ4_XS
    dot product of llama.cpp uses), which round worse than per 32 (on the demo model's
    all-Q4_K file, next-token KL to exact 1.9e-3 against 1.2e-3; llama.cpp: 1.6e-3), so VNNI
    targets, fast without it, keep per 32."""
    return not target_vnni() and "avx2" in target_features()


def dpbusd(b: ir.IRBuilder, w: ir.Value, x: ir.Value, vnni: int, max_w: int = 255) -> ir.Value:
    """<n x i8> w (unsigned), x (signed, -127..127) -> <n/4 x i32>: lane i = sum_k w[4i+k] *
    x[4i+k], for n = 32 or 64.

    Without VNNI, an AVX2 target with codes of at most ``max_w`` = 128 takes vpmaddubsw (pairs
    to int16: |2 * 128 * 127| fits, so nothing saturates) and vpmaddwd by ones (pairs of pairs
    to int32): two instructions per 32 bytes, the same sums."""
    n = w.type.count
    if not vnni and max_w <= 128 and "avx2" in target_features():
        vb, vw, vd = vec(I8, 32), vec(I16, 16), vec(I32, 8)
        mub = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(vw, [vb, vb]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        mwd = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(vd, [vw, vw]), "llvm.x86.avx2.pmadd.wd"
        )
        ones = ir.Constant(vw, [1] * 16)
        parts = []
        for o in range(0, n, 32):
            idx = ir.Constant(vec(I32, 32), list(range(o, o + 32)))
            wp = w if n == 32 else b.shuffle_vector(w, w, idx)
            xp = x if n == 32 else b.shuffle_vector(x, x, idx)
            parts.append(b.call(mwd, [b.call(mub, [wp, xp]), ones]))
        if len(parts) == 1:
            return parts[0]
        return b.shuffle_vector(parts[0], parts[1], ir.Constant(vec(I32, 16), list(range(16))))
    if vnni:
        step = min(n, vnni)
        vd = vec(I32, step // 4)
        fn = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(vd, [vd] * 3), f"llvm.x86.avx512.vpdpbusd.{8 * step}"
        )
        parts = []
        for o in range(0, n, step):
            idx = ir.Constant(vec(I32, step), list(range(o, o + step)))
            wp = w if step == n else b.shuffle_vector(w, w, idx)
            xp = x if step == n else b.shuffle_vector(x, x, idx)
            zero = ir.Constant(vd, [0] * (step // 4))
            parts.append(b.call(fn, [zero, b.bitcast(wp, vd), b.bitcast(xp, vd)]))
        if len(parts) == 1:
            return parts[0]
        return b.shuffle_vector(
            parts[0], parts[1], ir.Constant(vec(I32, n // 4), list(range(n // 4)))
        )
    vn = vec(I32, n)
    p = b.mul(b.zext(w, vn), b.sext(x, vn))
    tot = None
    for k in range(4):
        part = b.shuffle_vector(p, p, ir.Constant(vec(I32, n // 4), list(range(k, n, 4))))
        tot = part if tot is None else b.add(tot, part)
    return tot


def avx2(b: ir.IRBuilder, name: str, ret: ir.Type, *args: ir.Value) -> ir.Value:
    """The AVX2 intrinsic ``llvm.x86.avx2.<name>`` on args, returning ``ret``."""
    fn = cgutils.get_or_insert_function(
        b.module, ir.FunctionType(ret, [a.type for a in args]), f"llvm.x86.avx2.{name}"
    )
    return b.call(fn, list(args))


def q4k_int_superblocks(g, rowp, n_units, lutp, nt, xqp, xrow, dxp, xsp, brow, mins):
    """Q4_K rows against int8 activations with one scale per 256 (``kernels._quantize``) on
    AVX2 without VNNI, as llama.cpp's q4_K x q8_K: vpmaddubsw gives 16-bit pair sums of a
    sub-block, vpmaddwd multiplies them by the sub-block's 6-bit scale (instead of by ones) and
    adds pairs, so a super-block's sum stays int32 and takes one conversion and one float
    multiply-add per token (the float path pays both per 32 weights). Bounds: a pair sum is
    at most 2 * 15 * 127, times 63 and summed over 256 weights well inside int32.

    Sub-block pairs are the outer loop and tokens the inner one, so only two weight vectors
    and their scales are live beside the tokens' sums (16 ymm registers: the token-outer order
    spilled). mins[t] (8 float lanes) gets the row's dot product negated, dmin m_j xs_j -
    d dx sum_j sc_j (w . x)_j, so that the float path's ending (accs - mins, accs zero) gives
    it unchanged."""
    b = g.b
    vb, vw, vd, vf = _VB, vec(I16, 16), _VD, vec(F32, 8)
    wpu, bpu = QUNIT[FMT_Q4_K]
    fm = ("contract",)
    lo4 = splat(I8, 32, 15)
    with cgutils.for_range(b, n_units) as loop:
        u = loop.index
        base = b.mul(u, g.i64(bpu))
        for o in (0, 64, 128):
            g.prefetch(rowp, b.add(base, g.i64(PF + o)))
        x0 = b.mul(u, g.i64(wpu))
        d = g.f16(rowp, base, lutp)
        dmin = g.f16(rowp, b.add(base, g.i64(2)), lutp)
        sc8, m8 = q4k_scale_bytes(g, rowp, base)
        dm = b.fmul(g.bcast(dmin, 8), b.uitofp(m8, vf))
        sc16 = b.zext(sc8, vec(I16, 8))
        isum = [ir.Constant(vd, [0] * 8)] * nt
        for grp in range(4):  # 32 bytes: sub-block 2 grp in the low nibbles, 2 grp + 1 high
            wv = g.load(rowp, b.add(base, g.i64(16 + 32 * grp)), vb, I8)
            hi = b.bitcast(b.lshr(b.bitcast(wv, vw), splat(I16, 16, 4)), vb)
            for k, wk in enumerate((b.and_(wv, lo4), b.and_(hi, lo4))):
                j = 2 * grp + k
                sc = b.shuffle_vector(sc16, sc16, ir.Constant(vec(I32, 16), [j] * 16))
                for t in range(nt):
                    xv = g.load(xqp, b.add(xrow[t], b.add(x0, g.i64(32 * j))), vb, I8)
                    p = avx2(b, "pmadd.wd", vd, avx2(b, "pmadd.ub.sw", vw, wk, xv), sc)
                    isum[t] = b.add(isum[t], p)
        sub = b.mul(u, g.i64(8))
        for t in range(nt):
            xsv = g.load(xsp, b.add(brow[t], sub), vf, F32)
            dx = b.load(b.gep(dxp, [b.add(brow[t], sub)], source_etype=F32))
            sd = g.bcast(b.fmul(d, dx), 8)
            m = b.fadd(b.load(mins[t]), b.fmul(dm, xsv, flags=fm), flags=fm)
            m = b.fsub(m, b.fmul(sd, b.sitofp(isum[t], vf), flags=fm), flags=fm)
            b.store(m, mins[t])


def make_rowdot_i8(fmt: int, nt: int):
    """An intrinsic ``rowdot(w, r0, nr, xq, t0, dx, xs, lut, out, o0)``:
    out[o0 + t, i] = W[r0 + i] . x[t0 + t] with int8 activations, for t < nt, i < nr.

    Args (numba arrays):
        w: uint8 (rows, row_bytes) stored bytes, one row of blocks per output row.
        xq: int8 (T, in) quantized activations (``kernels._quantize``), natural order.
        dx: float32 (T, in // 32) their scales.
        xs: float32 (T, in // 32) per 32: sum(xq) * dx (Q4_K mins) or sum(xq) (Q4_0).
        lut: float32 (65536,) f16 -> float32.
        out: float32 (tokens, nr) results.
    """
    wpu, bpu = QUNIT[fmt]
    vf = vec(F32, 8)
    vnni = target_vnni()
    int_scales = fmt == FMT_Q4_K and superblock_int_sums()
    fm = ("contract",)
    n_lanes = 16  # accumulator lanes: 64 weights per product

    @intrinsic
    def rowdot(typingctx, w, r0, nr, xq, t0, dx, xs, lut, out, o0):
        sig = types.void(w, r0, nr, xq, t0, dx, xs, lut, out, o0)

        def codegen(context, builder, sig, args):
            g = IRGen(context, builder)
            b = builder
            wty, _, _, xqty, _, dxty, xsty, lutty, outty, _ = sig.args
            wa = g.array(wty, args[0])
            r0v, nrv, o0v = args[1], args[2], args[9]
            xqa = g.array(xqty, args[3])
            xqp = xqa.data
            n_in = b.extract_value(xqa.shape, 1)
            dxa = g.array(dxty, args[5])
            dxp = dxa.data
            n_b = b.extract_value(dxa.shape, 1)
            xsp = g.data(xsty, args[6])
            lutp = g.data(lutty, args[7])
            outa = g.array(outty, args[8])
            n_units = b.sdiv(b.extract_value(wa.shape, 1), g.i64(bpu))
            zero8 = ir.Constant(vf, [0.0] * 8)
            zero = ir.Constant(vec(F32, n_lanes), [0.0] * n_lanes)
            accs = [[cgutils.alloca_once_value(b, zero) for _ in range(2)] for _ in range(nt)]
            mins = [cgutils.alloca_once_value(b, zero8) for _ in range(nt)]
            msum = [cgutils.alloca_once_value(b, ir.Constant(F32, 0.0)) for _ in range(nt)]
            zero2 = ir.Constant(vec(F32, 2), [0.0, 0.0])
            msum2 = [cgutils.alloca_once_value(b, zero2) for _ in range(nt)]  # pairs' Q4_0 term
            tok = [b.add(args[4], g.i64(t)) for t in range(nt)]
            xrow = [b.mul(tok[t], n_in) for t in range(nt)]
            brow = [b.mul(tok[t], n_b) for t in range(nt)]

            def fma_into(a, s, p):  # a += s * float(p)
                prod = b.fmul(s, b.sitofp(p, s.type), flags=fm)
                b.store(b.fadd(b.load(a), prod, flags=fm), a)

            with cgutils.for_range(b, nrv) as rows:
                rowp = g.row(wa, b.add(r0v, rows.index))
                for t in range(nt):
                    for acc in accs[t]:
                        b.store(zero, acc)
                    b.store(zero8, mins[t])
                    b.store(ir.Constant(F32, 0.0), msum[t])
                    b.store(zero2, msum2[t])
                if fmt == FMT_Q4_K and int_scales:
                    q4k_int_superblocks(g, rowp, n_units, lutp, nt, xqp, xrow, dxp, xsp, brow, mins)
                elif fmt == FMT_Q4_K:
                    with cgutils.for_range(b, n_units) as loop:
                        u = loop.index
                        base = b.mul(u, g.i64(bpu))
                        for o in (0, 64, 128):
                            g.prefetch(rowp, b.add(base, g.i64(PF + o)))
                        x0 = b.mul(u, g.i64(wpu))
                        d = g.f16(rowp, base, lutp)
                        dmin = g.f16(rowp, b.add(base, g.i64(2)), lutp)
                        dsc, dm = q4k_scales(g, rowp, base, d, dmin)
                        sub = b.mul(u, g.i64(8))
                        s_t = []
                        for t in range(nt):
                            xsv = g.load(xsp, b.add(brow[t], sub), vf, F32)
                            b.store(b.fadd(b.load(mins[t]), b.fmul(dm, xsv)), mins[t])
                            dxv = g.load(dxp, b.add(brow[t], sub), vf, F32)
                            s_t.append(b.fmul(dsc, dxv))
                        for grp in range(4):
                            # sub-blocks 2 grp (low nibbles) and 2 grp + 1 (high): 64 weights
                            # that pair with 64 consecutive activations
                            wv = g.load(rowp, b.add(base, g.i64(16 + 32 * grp)), _VB, I8)
                            w64 = nibbles(b, wv)
                            pick = ir.Constant(vec(I32, 16), [2 * grp] * 8 + [2 * grp + 1] * 8)
                            for t in range(nt):
                                xo = b.add(xrow[t], b.add(x0, g.i64(64 * grp)))
                                p = dpbusd(b, w64, g.load(xqp, xo, vec(I8, 64), I8), vnni, 15)
                                sj = b.shuffle_vector(s_t[t], s_t[t], pick)
                                fma_into(accs[t][grp % 2], sj, p)
                else:
                    # blocks of 32 in pairs: 64 weights, one 512-bit product; an odd last block
                    # goes to the side accumulators
                    def block32(u):  # d, |w| or the nibbles (<32 x i8>), w < 0 (Q8_0)
                        base = b.mul(u, g.i64(bpu))
                        d = g.f16(rowp, base, lutp)
                        if fmt == FMT_Q8_0:
                            wv = g.load(rowp, b.add(base, g.i64(2)), _VB, I8)
                            neg = b.icmp_signed("<", wv, splat(I8, 32, 0))
                            return d, b.select(neg, b.neg(wv), wv), neg  # -128 is 128 unsigned
                        # Q4_0: 16 bytes, low nibbles values 0..15, high ones 16..31
                        w16 = g.load(rowp, b.add(base, g.i64(2)), vec(I8, 16), I8)
                        return d, nibbles(b, w16), None

                    def scaled(t, u, d):  # d dx[t, u] and the odd block's Q4_0 term
                        blk = b.add(brow[t], u)
                        sd = b.fmul(d, b.load(b.gep(dxp, [blk], source_etype=F32)))
                        if fmt == FMT_Q4_0:  # q - 8: subtract 8 d dx sum(xq) at the end
                            xsv = b.load(b.gep(xsp, [blk], source_etype=F32))
                            b.store(b.fadd(b.load(msum[t]), b.fmul(sd, xsv)), msum[t])
                        return sd

                    with cgutils.for_range(b, b.sdiv(n_units, g.i64(2))) as loop:
                        u = b.mul(loop.index, g.i64(2))
                        u1 = b.add(u, g.i64(1))
                        pb = b.mul(u, g.i64(bpu))
                        g.prefetch(rowp, b.add(pb, g.i64(PF)))
                        # a Q8_0 pair spans two lines; every line holds a Q4_0 pair's start
                        if 2 * bpu > 64:
                            g.prefetch(rowp, b.add(pb, g.i64(PF + 2 * bpu - 1)))
                        (d0, w0, n0), (d1, w1, n1) = block32(u), block32(u1)
                        w64 = b.shuffle_vector(w0, w1, _iota(64))
                        neg = None if n0 is None else b.shuffle_vector(n0, n1, _iota(64))
                        halves = ir.Constant(vec(I32, 16), [0] * 8 + [1] * 8)
                        v2 = vec(F32, 2)
                        dv = b.insert_element(ir.Constant(v2, ir.Undefined), d0, g.i64(0))
                        dv = b.insert_element(dv, d1, g.i64(1))
                        for t in range(nt):
                            blk = b.add(brow[t], u)
                            sd = b.fmul(dv, g.load(dxp, blk, v2, F32))  # d dx of both blocks
                            if fmt == FMT_Q4_0:  # q - 8: 8 d dx sum(xq) comes off at the end
                                prod = b.fmul(sd, g.load(xsp, blk, v2, F32), flags=fm)
                                b.store(b.fadd(b.load(msum2[t]), prod, flags=fm), msum2[t])
                            x0 = b.add(xrow[t], b.mul(u, g.i64(wpu)))
                            xv = g.load(xqp, x0, vec(I8, 64), I8)
                            if neg is not None:  # w's sign onto x (x in -127..127: no overflow)
                                xv = b.select(neg, b.neg(xv), xv)
                            fma_into(
                                accs[t][0],
                                b.shuffle_vector(sd, sd, halves),
                                dpbusd(b, w64, xv, vnni, 128),
                            )
                    odd = b.icmp_signed("!=", b.and_(n_units, g.i64(1)), g.i64(0))
                    with b.if_then(odd, likely=False):
                        u = b.sub(n_units, g.i64(1))
                        d, wv, neg = block32(u)
                        for t in range(nt):
                            sd = scaled(t, u, d)
                            xv = g.load(xqp, b.add(xrow[t], b.mul(u, g.i64(wpu))), _VB, I8)
                            if neg is not None:
                                xv = b.select(neg, b.neg(xv), xv)
                            fma_into(mins[t], g.bcast(sd, 8), dpbusd(b, wv, xv, vnni, 128))
                for t in range(nt):
                    tot = b.fadd(
                        g.hsum(b.load(accs[t][0]), n_lanes), g.hsum(b.load(accs[t][1]), n_lanes)
                    )
                    side = g.hsum(b.load(mins[t]), 8)  # Q4_K: mins; else the odd block
                    tot = b.fsub(tot, side) if fmt == FMT_Q4_K else b.fadd(tot, side)
                    if fmt == FMT_Q4_0:
                        m2 = b.load(msum2[t])
                        m = b.fadd(b.load(msum[t]), g.hsum(m2, 2))
                        tot = b.fsub(tot, b.fmul(ir.Constant(F32, 8.0), m))
                    g.store2d(tot, outa, b.add(o0v, g.i64(t)), rows.index)
            return context.get_dummy_value()

        return sig, codegen

    return rowdot
