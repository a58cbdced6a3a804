"""Row dot products for the GGML formats that ``rowdot`` does not hand-schedule, through
one shape every one of them fits: unsigned byte codes with a scale and a min per group.

Each format here is one block decoder (``_DECODERS``) that turns a unit of stored bytes (a
256-weight super-block, or one 32-weight block) into

    codes  <64 x i8> (or <32 x i8>) vectors, unsigned, in the weights' natural order;
    sc     <S x float>: the weight scale of each group of 16 (super-blocks) or of the block;
    mn     <S x float>: the min of each group, so that  w = sc * code - mn.

Signed codes become unsigned by an offset folded into the min (Q6_K's q - 32 is code q with
min 32 sc; IQ4's table values v are codes v + 128 with min 128 d), so every format multiplies
the same way: u8 x s8 dot products of 4 pairs per 32-bit lane (vpdpbusd with VNNI) against int8
activations (fast path), or float32 products (``exact``). The mins need only the activation sums
per group, made once per call. Without VNNI the byte products are vpmaddubsw's, which saturate
for codes above 128: there IQ4's codes stay its signed table values (|v| times x with v's sign,
no min). The decoders are whole-vector integer ops and byte-table lookups
(pshufb), never a shuffle per value.

    format  unit  bytes  groups  codes
    Q4_1     32    20     1      nibble; min -m
    Q5_0     32    22     1      nibble | qh bit << 4; min 16 d
    Q5_1     32    24     1      nibble | qh bit << 4; min -m
    IQ4_NL   32    18     1      table[nibble] + 128; min 128 d
    MXFP4    32    17     1      table[nibble] + 12 (e2m1 doubled); d = 2**(e - 128); min 12 d
    Q2_K    256    84    16      2 bits; scale d * (s & 15), min dmin * (s >> 4)
    Q3_K    256   110    16      2 bits | hmask bit << 2; scale d * (s - 32), min 4 sc
    Q5_K    256   176    16      nibble | qh bit << 4; Q4_K's 6-bit scales and mins (per 32)
    Q6_K    256   210    16      nibble | 2 qh bits << 4; scale d * int8 s, min 32 sc
    IQ4_XS  256   136    16      table[nibble] + 128; scale d * (6-bit s - 32) (per 32), min 128 sc

Edit note: numba caches ``kernels`` on its own file only; after editing this one, delete
``localseek/quant/cpu/__pycache__/*.nb*``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from localseek.quant.cpu.rowdot import (
    F32,
    I8,
    I16,
    I32,
    PF,
    IRGen,
    avx2,
    dpbusd,
    nibbles,
    q4k_scale_bytes,
    splat,
    superblock_int_sums,
    target_features,
    target_vnni,
    vec,
)
from localseek.quant.formats import (
    BY_CODE,
    FIRST_CODES,
    FLOAT_CODES,
    FMT_F16,
    FMT_IQ4_NL,
    FMT_IQ4_XS,
    FMT_MXFP4,
    FMT_Q2_K,
    FMT_Q3_K,
    FMT_Q4_1,
    FMT_Q5_0,
    FMT_Q5_1,
    FMT_Q5_K,
    FMT_Q6_K,
)

# (weights per unit, bytes per unit); a super-block format has 16 groups of 16, a block one group
UNITS = {
    code: (f.block, f.block_bytes)
    for code, f in BY_CODE.items()
    if code >= FIRST_CODES and code not in FLOAT_CODES
}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# the largest code each decoder gives (bounds what a byte product may meet)
MAX_CODE = {
    FMT_Q4_1: 15,
    FMT_Q5_0: 31,
    FMT_Q5_1: 31,
    FMT_IQ4_NL: 241,
    FMT_MXFP4: 24,
    FMT_Q2_K: 3,
    FMT_Q3_K: 7,
    FMT_Q5_K: 31,
    FMT_Q6_K: 63,
    FMT_IQ4_XS: 241,
}


def _i32(v: int) -> ir.Constant:
    return ir.Constant(I32, v)


def _shr16(b: ir.IRBuilder, v: ir.Value, shifts: list[int]) -> ir.Value:
    """Bytes ``v`` (<2n x i8>) shifted right per 16-bit word (``shifts``: n amounts). Bits of
    the next byte move in at the top; callers mask them off."""
    n = v.type.count // 2
    w = b.lshr(b.bitcast(v, vec(I16, n)), ir.Constant(vec(I16, n), shifts))
    return b.bitcast(w, vec(I8, 2 * n))


def _dup(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """<n x i8> -> <2n x i8>: v twice."""
    n = v.type.count
    return b.shuffle_vector(v, v, ir.Constant(vec(I32, 2 * n), [*range(n)] * 2))


def _spread(b: ir.IRBuilder, v: ir.Value, times: int) -> ir.Value:
    """Each lane of v repeated ``times`` times."""
    n = v.type.count
    return b.shuffle_vector(
        v, v, ir.Constant(vec(I32, n * times), [i // times for i in range(n * times)])
    )


def _bits(b: ir.IRBuilder, v: ir.Value, mask: int, shl: int) -> ir.Value:
    """(v & mask) << shl, bytewise."""
    n = v.type.count
    return b.shl(b.and_(v, splat(I8, n, mask)), splat(I8, n, shl))


def _intrinsic2(b: ir.IRBuilder, name: str, u: ir.Value, v: ir.Value) -> ir.Value:
    """A two-operand x86 intrinsic whose result has the operands' type."""
    fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(u.type, [u.type, v.type]), name)
    return b.call(fn, [u, v])


def _table(values: list[int], n: int) -> ir.Constant:
    """A 16-entry byte table repeated over an <n x i8> vector (pshufb looks up per 16 bytes)."""
    return ir.Constant(vec(I8, n), [v & 255 for v in values] * (n // 16))


def _halves(b: ir.IRBuilder, op, *vs: ir.Value) -> ir.Value:
    """op on each 32-byte part of the vectors vs (<32 or 64 x i8>), joined again."""
    if vs[0].type.count == 32:
        return op(*vs)
    parts = [
        op(*(b.shuffle_vector(v, v, ir.Constant(vec(I32, 32), [*range(o, o + 32)])) for v in vs))
        for o in (0, 32)
    ]
    return b.shuffle_vector(parts[0], parts[1], ir.Constant(vec(I32, 64), [*range(64)]))


def _sign(b: ir.IRBuilder, x: ir.Value, s: ir.Value) -> ir.Value:
    """x with the sign of s bytewise (0 where s is 0): vpsignb."""
    return _halves(b, lambda u, v: _intrinsic2(b, "llvm.x86.avx2.psign.b", u, v), x, s)


def _lookup(b: ir.IRBuilder, idx: ir.Value, table: list[int]) -> ir.Value:
    """table[idx] bytewise for 4-bit indices (<32 or 64 x i8>): pshufb where the target has it
    (AVX2 for 32 bytes, AVX512BW for 64), else a chain of 16 selects."""
    n = idx.type.count
    feats = target_features()
    if n == 64 and "avx512bw" in feats:
        return _intrinsic2(b, "llvm.x86.avx512.pshuf.b.512", _table(table, 64), idx)
    if "avx2" in feats:  # 32 bytes at a time
        tbl = _table(table, 32)
        return _halves(b, lambda part: _intrinsic2(b, "llvm.x86.avx2.pshuf.b", tbl, part), idx)
    out = splat(I8, n, 0)
    for k, v in enumerate(table):
        out = b.select(b.icmp_unsigned("==", idx, splat(I8, n, k)), splat(I8, n, v & 255), out)
    return out


def _qh_bits(b: ir.IRBuilder, qh: ir.Value, value: int) -> ir.Value:
    """Bit j of the 32-bit word qh as byte j of <32 x i8> (``value`` where set, else 0)."""
    mask = b.bitcast(qh, vec(ir.IntType(1), 32))
    return b.select(mask, splat(I8, 32, value), splat(I8, 32, 0))


def mxfp4_scales(b: ir.IRBuilder, e: ir.Value):
    """MXFP4 exponent bytes e (i32, or a vector of them) -> (d, min 12 d), d = 2**(e - 128)
    as gguf-py's ``e8m0_to_fp32_half`` (a subnormal below e = 2, (e - 1) << 23 above)."""

    def k(v):
        return splat(I32, e.type.count, v) if isinstance(e.type, ir.VectorType) else _i32(v)

    small = b.icmp_unsigned("<", e, k(2))
    bits = b.select(small, b.shl(k(0x00200000), e), b.shl(b.sub(e, k(1)), k(23)))
    d = b.bitcast(bits, F32 if bits.type == I32 else vec(F32, e.type.count))
    twelve = ir.Constant(F32, 12.0)
    return d, b.fmul(d, twelve if d.type == F32 else ir.Constant(d.type, [12.0] * e.type.count))


def block32(g: IRGen, fmt: int, rowp: ir.Value, base: ir.Value, lut: ir.Value, signed: bool):
    """One 32-weight block: (codes <32 x i8>, scale, min) as float scalars; ``signed``: IQ4_NL's
    codes are its signed table values and the min is None."""
    b = g.b
    at = lambda o: b.add(base, g.i64(o))  # noqa: E731
    if fmt == FMT_MXFP4:
        d, mn = mxfp4_scales(b, b.zext(g.load(rowp, base, I8, I8), I32))
        nib = nibbles(b, g.load(rowp, at(1), vec(I8, 16), I8))
        return _lookup(b, nib, [v + 12 for v in MXFP4_VALUES]), d, mn
    d = g.f16(rowp, base, lut)
    if fmt == FMT_IQ4_NL:
        nib = nibbles(b, g.load(rowp, at(2), vec(I8, 16), I8))
        if signed:
            return _lookup(b, nib, list(IQ4_VALUES)), d, None
        codes = _lookup(b, nib, [v + 128 for v in IQ4_VALUES])
        return codes, d, b.fmul(d, ir.Constant(F32, 128.0))
    with_min = fmt in (FMT_Q4_1, FMT_Q5_1)
    qs_at = 2 + 2 * with_min + 4 * (fmt != FMT_Q4_1)  # after d, m and qh
    codes = nibbles(b, g.load(rowp, at(qs_at), vec(I8, 16), I8))
    if fmt != FMT_Q4_1:  # Q5: the fifth bit of weight j is bit j of qh
        qh = g.load(rowp, at(2 + 2 * with_min), I32, I8)
        codes = b.or_(codes, _qh_bits(b, qh, 16))
    if with_min:  # w = d q + m
        return codes, d, b.fneg(g.f16(rowp, at(2), lut))
    return codes, d, b.fmul(d, ir.Constant(F32, 16.0))


def superblock(g: IRGen, fmt: int, rowp: ir.Value, base: ir.Value, lut: ir.Value, signed: bool):
    """One 256-weight super-block: (four <64 x i8> code vectors, d, <16 x i16> integer scales
    of the groups, <16 x float> mins), the groups' scales being d * the integer ones;
    ``signed``: IQ4_XS's codes are its signed table values and the mins None."""
    b = g.b
    at = lambda o: b.add(base, g.i64(o))  # noqa: E731
    v16, i16 = vec(F32, 16), vec(I16, 16)

    def scaled(d, s):  # d * s (<16 x i16>) as floats
        return b.fmul(g.bcast(d, 16), b.sitofp(s, v16))

    def load8(o: int, n: int) -> ir.Value:
        return g.load(rowp, at(o), vec(I8, n), I8)

    chunks = []
    if fmt == FMT_Q6_K:  # ql[128], qh[64], int8 scales[16], d
        d = g.f16(rowp, at(208), lut)
        isc = b.sext(load8(192, 16), i16)
        mn = b.fmul(scaled(d, isc), ir.Constant(v16, [32.0] * 16))
        for n in range(2):
            ql = load8(64 * n, 64)
            qh = _dup(b, load8(128 + 32 * n, 32))
            for sub in range(2):
                lo = b.and_(ql, splat(I8, 64, 15)) if sub == 0 else b.lshr(ql, splat(I8, 64, 4))
                hi = _shr16(b, qh, [4 * sub] * 16 + [4 * sub + 2] * 16)
                chunks.append(b.or_(lo, _bits(b, hi, 3, 4)))
        return chunks, d, isc, mn
    if fmt == FMT_Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
        d = g.f16(rowp, base, lut)
        dmin = g.f16(rowp, at(2), lut)
        sc8, m8 = q4k_scale_bytes(g, rowp, base)  # per 32
        dm = b.fmul(g.bcast(dmin, 8), b.uitofp(m8, vec(F32, 8)))
        qh = _dup(b, load8(16, 32))
        for a in range(4):
            nib = nibbles(b, load8(48 + 32 * a, 32))
            hi = _shr16(b, qh, [2 * a] * 16 + [2 * a + 1] * 16)
            chunks.append(b.or_(nib, _bits(b, hi, 1, 4)))
        return chunks, d, _spread(b, b.zext(sc8, vec(I16, 8)), 2), _spread(b, dm, 2)
    if fmt == FMT_Q2_K:  # scales[16], qs[64], d, dmin
        d = g.f16(rowp, at(80), lut)
        dmin = g.f16(rowp, at(82), lut)
        s = load8(0, 16)
        isc = b.zext(b.and_(s, splat(I8, 16, 15)), i16)
        mn = b.fmul(g.bcast(dmin, 16), b.uitofp(b.lshr(s, splat(I8, 16, 4)), v16))
        for c in range(4):
            n, j0 = c // 2, 2 * (c % 2)
            qs = _dup(b, load8(16 + 32 * n, 32))
            lo = _shr16(b, qs, [2 * j0] * 16 + [2 * j0 + 2] * 16)
            chunks.append(b.and_(lo, splat(I8, 64, 3)))
        return chunks, d, isc, mn
    if fmt == FMT_Q3_K:  # hmask[32], qs[64], scales[12], d
        d = g.f16(rowp, at(108), lut)
        lo = g.load(rowp, at(96), vec(I32, 2), I8)
        hi = g.load(rowp, at(104), I32, I8)
        m4 = ir.Constant(vec(I32, 2), [0x0F0F0F0F] * 2)
        l0 = b.and_(lo, m4)
        l1 = b.and_(b.lshr(lo, ir.Constant(vec(I32, 2), [4, 4])), m4)
        low = b.shuffle_vector(l0, l1, ir.Constant(vec(I32, 4), [0, 1, 2, 3]))
        high = ir.Constant(vec(I32, 4), ir.Undefined)
        for k in range(4):
            hk = b.and_(b.lshr(hi, _i32(2 * k)), _i32(0x03030303))
            high = b.insert_element(high, b.shl(hk, _i32(4)), _i32(k))
        s = b.sub(b.bitcast(b.or_(low, high), vec(I8, 16)), splat(I8, 16, 32))
        isc = b.sext(s, i16)
        mn = b.fmul(scaled(d, isc), ir.Constant(v16, [4.0] * 16))
        hm = _dup(b, load8(0, 32))
        for c in range(4):
            n, j0 = c // 2, 2 * (c % 2)
            qs = _dup(b, load8(32 + 32 * n, 32))
            low2 = b.and_(_shr16(b, qs, [2 * j0] * 16 + [2 * j0 + 2] * 16), splat(I8, 64, 3))
            k0 = 4 * n + j0
            hb = _shr16(b, hm, [k0] * 16 + [k0 + 1] * 16)
            chunks.append(b.or_(low2, _bits(b, hb, 1, 2)))
        return chunks, d, isc, mn
    # IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]
    d = g.f16(rowp, base, lut)
    v8i = vec(I32, 8)
    sl = g.load(rowp, at(4), I32, I8)
    sh = b.zext(g.load(rowp, at(2), I16, I8), I32)

    def bcast_i(v):
        vec = b.insert_element(ir.Constant(v8i, ir.Undefined), v, _i32(0))
        return b.shuffle_vector(vec, vec, ir.Constant(v8i, [0] * 8))

    ls = b.and_(b.lshr(bcast_i(sl), ir.Constant(v8i, [4 * i for i in range(8)])), splat(I32, 8, 15))
    hs = b.and_(b.lshr(bcast_i(sh), ir.Constant(v8i, [2 * i for i in range(8)])), splat(I32, 8, 3))
    s = b.sub(b.or_(ls, b.shl(hs, splat(I32, 8, 4))), splat(I32, 8, 32))
    isc = _spread(b, b.trunc(s, vec(I16, 8)), 2)
    mn = None if signed else b.fmul(scaled(d, isc), ir.Constant(v16, [128.0] * 16))
    table = list(IQ4_VALUES) if signed else [v + 128 for v in IQ4_VALUES]
    order = ir.Constant(vec(I32, 64), [*range(16), *range(16), *range(16, 32), *range(16, 32)])
    for c in range(4):  # blocks 2c and 2c + 1: 16 bytes each, low nibbles then high ones
        w = load8(8 + 32 * c, 32)
        both = b.shuffle_vector(w, w, order)
        nib = b.and_(_shr16(b, both, ([0] * 8 + [4] * 8) * 2), splat(I8, 64, 15))
        chunks.append(_lookup(b, nib, table))
    return chunks, d, isc, mn


def _abs(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """|v| bytewise (vpabsb)."""
    zero = splat(I8, v.type.count, 0)
    return b.select(b.icmp_signed("<", v, zero), b.sub(zero, v), v)


def _vec1(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """A float scalar as <1 x float>."""
    return b.insert_element(ir.Constant(vec(F32, 1), ir.Undefined), v, _i32(0))


def _gather(b: ir.IRBuilder, scalars: list[ir.Value]) -> ir.Value:
    """Scalars of one type as a vector."""
    v = ir.Constant(vec(scalars[0].type, len(scalars)), ir.Undefined)
    for i, s in enumerate(scalars):
        v = b.insert_element(v, s, _i32(i))
    return v


def _quad(g: IRGen, fmt: int, rowp: ir.Value, u: ir.Value, lut: ir.Value, signed: bool):
    """Four 32-weight blocks from block ``u`` on as one unit: (two <64 x i8> code vectors,
    <4 x float> scales, mins or None). MXFP4's exponents are decoded as one vector."""
    b = g.b
    bpu = UNITS[fmt][1]
    bases = [b.mul(b.add(u, g.i64(k)), g.i64(bpu)) for k in range(4)]
    blocks = [block32(g, fmt, rowp, base, lut, signed) for base in bases]
    join = ir.Constant(vec(I32, 64), list(range(64)))
    codes = [b.shuffle_vector(blocks[k][0], blocks[k + 1][0], join) for k in (0, 2)]
    if fmt == FMT_MXFP4:  # LLVM drops the per-block scalar decodes block32 made
        e = _gather(b, [b.zext(g.load(rowp, base, I8, I8), I32) for base in bases])
        return codes, *mxfp4_scales(b, e)
    sc = _gather(b, [blk[1] for blk in blocks])
    return codes, sc, None if blocks[0][2] is None else _gather(b, [blk[2] for blk in blocks])


def make_rowdot_codes(fmt: int, nt: int, exact: bool):
    """An intrinsic ``rowdot(w, r0, nr, x, t0, dx, xs, lut, out, o0)``:
    out[o0 + t, i] = W[r0 + i] . x[t0 + t] for t < nt, i < nr.

    Super-block formats go a super-block per step; block formats four blocks per step (two
    512-bit products), the last ones (fewer than four) alone.

    Args (numba arrays):
        w: uint8 (rows, row_bytes) stored bytes, one row of blocks per output row.
        x: int8 (T, in) quantized activations (``exact=False``) or float32 (T, in), both in
            their natural order.
        dx: float32 (T, in // 32) the int8 activations' scales (unused when exact).
        xs: float32 (T, in // G), G = 16 for super-block formats and 32 for blocks: per
            group, sum(xq) * dx, or the float activations' sum when exact.
        lut: float32 (65536,) f16 -> float32.
        out: float32 (tokens, nr) results.
    """
    wpu, bpu = UNITS[fmt]
    sb = wpu == 256
    vnni = target_vnni()
    fm = ("contract",)
    # IQ4 codes reach 241: where only vpmaddubsw multiplies bytes (AVX2 without VNNI), which
    # saturates above 128, they stay signed (|v| times x with v's sign) and need no mins
    signed = fmt in (FMT_IQ4_NL, FMT_IQ4_XS) and not exact and not vnni
    signed = signed and "avx2" in target_features()
    max_w = 127 if signed else MAX_CODE[fmt]
    # AVX2 without VNNI: a super-block sums in int32 with its integer scales (``int_unit``);
    # the activations have one scale per 256 there (``kernels.act_span``)
    int_sb = sb and not exact and superblock_int_sums()

    @intrinsic
    def rowdot(typingctx, w, r0, nr, x, t0, dx, xs, lut, out, o0):
        sig = types.void(w, r0, nr, x, t0, dx, xs, lut, out, o0)

        def codegen(context, builder, sig, args):
            g = IRGen(context, builder)
            b = builder
            wty, _, _, xty, _, dxty, xsty, lutty, outty, _ = sig.args
            wa = g.array(wty, args[0])
            r0v, nrv, o0v = args[1], args[2], args[9]
            xa = g.array(xty, args[3])
            xp = xa.data
            n_in = b.extract_value(xa.shape, 1)
            dxa = g.array(dxty, args[5])
            dxp = dxa.data
            n_b = b.extract_value(dxa.shape, 1)
            xsa = g.array(xsty, args[6])
            xsp = xsa.data
            n_xs = b.extract_value(xsa.shape, 1)
            lutp = g.data(lutty, args[7])
            outa = g.array(outty, args[8])
            n_units = b.sdiv(b.extract_value(wa.shape, 1), g.i64(bpu))
            tok = [b.add(args[4], g.i64(t)) for t in range(nt)]
            xrow = [b.mul(tok[t], n_in) for t in range(nt)]
            brow = [b.mul(tok[t], n_b) for t in range(nt)]
            srow = [b.mul(tok[t], n_xs) for t in range(nt)]
            xel = F32 if exact else I8
            # float accumulators, one per token and vector width: the products (a super-block
            # or four blocks, and a lone block), and the mins (per group)
            lane = 1 if exact else 4  # weights per product lane
            widths = [8 if int_sb else 256 // 4 // lane] if sb else [64 // lane, 32 // lane]
            prods, mins = (
                {wd: [cgutils.alloca_once(b, vec(F32, wd)) for _ in range(nt)] for wd in table}
                for table in (widths, [] if int_sb else [16] if sb else [4, 1])
            )

            def unit(codes, sc, mn, gw: int, x0, dx_at, xs_at) -> None:
                """Accumulate one unit: code vectors, <G x float> scales and mins of groups
                of ``gw`` weights; x0, dx_at, xs_at: its offsets in x, dx and xs."""
                n_g = sc.type.count
                mags = [_abs(b, cv) for cv in codes] if signed else codes
                for t in range(nt):
                    if mn is not None:
                        xsv = g.load(xsp, b.add(srow[t], xs_at), vec(F32, n_g), F32)
                        m = mins[n_g][t]
                        b.store(b.fadd(b.load(m), b.fmul(mn, xsv)), m)
                    if exact:
                        s_t = sc
                    else:
                        n_dx = max(1, n_g * gw // 32)
                        dxv = g.load(dxp, b.add(brow[t], dx_at), vec(F32, n_dx), F32)
                        s_t = b.fmul(sc, _spread(b, dxv, 2) if gw == 16 else dxv)
                    for c, cv in enumerate(codes):
                        n_code = cv.type.count
                        xo = b.add(xrow[t], b.add(x0, g.i64(64 * c)))
                        xv = g.load(xp, xo, vec(xel, n_code), xel)
                        if exact:
                            p = b.fmul(b.uitofp(cv, vec(F32, n_code)), xv, flags=fm)
                            per = gw  # one lane a weight
                        else:
                            if signed:
                                xv = _sign(b, xv, cv)
                            p = dpbusd(b, mags[c], xv, vnni, max_w)
                            p = b.sitofp(p, vec(F32, n_code // 4))
                            per = gw // 4  # one lane per 4 weights
                        lanes = p.type.count
                        pick = [64 * c // gw + lane // per for lane in range(lanes)]
                        sj = b.shuffle_vector(s_t, s_t, ir.Constant(vec(I32, lanes), pick))
                        a = prods[lanes][t]
                        b.store(b.fadd(b.load(a), b.fmul(sj, p, flags=fm), flags=fm), a)

            def int_unit(codes, d, isc, mn, x0, dx_at, xs_at) -> None:
                """A super-block on AVX2 without VNNI, as llama.cpp's k-quant x q8_K: per 32
                weights vpmaddubsw gives 16-bit pair sums (of two groups of 16), vpmaddwd
                multiplies them by the groups' integer scales and adds pairs, so the
                super-block's sum stays int32 and takes one conversion and one multiply-add
                by d dx per token (dx: the activations' one scale per 256); the mins come
                off in float, mn times the activations' sums per 16, into the same 8 lanes.
                Bounds: a pair sum is at most 2 * 127 * 127 (IQ4's signed values; Q6_K's
                codes reach 63), times a scale of at most 128 and summed over 256 weights
                well inside int32. Halves of 32 bytes are the outer loop and tokens the inner
                one, so one weight vector and its scales are live beside the tokens' sums."""
                vb, vw, vd = vec(I8, 32), vec(I16, 16), vec(I32, 8)
                isum = [ir.Constant(vd, [0] * 8)] * nt
                for c, cv in enumerate(codes):
                    for h in (0, 1):
                        half = ir.Constant(vec(I32, 32), list(range(32 * h, 32 * h + 32)))
                        code = b.shuffle_vector(cv, cv, half)
                        mag = _abs(b, code) if signed else code
                        j = 4 * c + 2 * h  # groups j and j + 1
                        scv = b.shuffle_vector(
                            isc, isc, ir.Constant(vec(I32, 16), [j] * 8 + [j + 1] * 8)
                        )
                        for t in range(nt):
                            xo = b.add(xrow[t], b.add(x0, g.i64(64 * c + 32 * h)))
                            xv = g.load(xp, xo, vb, I8)
                            if signed:
                                xv = _intrinsic2(b, "llvm.x86.avx2.psign.b", xv, code)
                            pairs = avx2(b, "pmadd.ub.sw", vw, mag, xv)
                            p = avx2(b, "pmadd.wd", vd, pairs, scv)
                            isum[t] = b.add(isum[t], p)
                v8 = vec(F32, 8)
                lo8, hi8 = (ir.Constant(vec(I32, 8), list(range(o, o + 8))) for o in (0, 8))
                for t in range(nt):
                    dx = b.load(b.gep(dxp, [b.add(brow[t], dx_at)], source_etype=F32))
                    a = prods[8][t]
                    acc = b.fmul(g.bcast(b.fmul(d, dx), 8), b.sitofp(isum[t], v8))
                    acc = b.fadd(b.load(a), acc, flags=fm)
                    if mn is not None:
                        xsv = g.load(xsp, b.add(srow[t], xs_at), vec(F32, 16), F32)
                        m = b.fmul(mn, xsv)
                        m8 = b.fadd(b.shuffle_vector(m, m, lo8), b.shuffle_vector(m, m, hi8))
                        acc = b.fsub(acc, m8, flags=fm)
                    b.store(acc, a)

            def block(u):
                return block32(g, fmt, rowp, b.mul(u, g.i64(bpu)), lutp, signed)

            with cgutils.for_range(b, nrv) as rows:
                rowp = g.row(wa, b.add(r0v, rows.index))
                for table in (prods, mins):
                    for accs in table.values():
                        for a in accs:
                            b.store(ir.Constant(a.type.pointee, None), a)
                if sb:
                    with cgutils.for_range(b, n_units) as loop:
                        u = loop.index
                        base = b.mul(u, g.i64(bpu))
                        for o in range(0, bpu, 64):
                            g.prefetch(rowp, b.add(base, g.i64(PF + o)))
                        codes, d, isc, mn = superblock(g, fmt, rowp, base, lutp, signed)
                        x0 = b.mul(u, g.i64(256))
                        at = (x0, b.mul(u, g.i64(8)), b.mul(u, g.i64(16)))
                        if int_sb:
                            int_unit(codes, d, isc, mn, *at)
                        else:
                            sc = b.fmul(g.bcast(d, 16), b.sitofp(isc, vec(F32, 16)))
                            unit(codes, sc, mn, 16, *at)
                else:
                    n_quads = b.sdiv(n_units, g.i64(4))
                    with cgutils.for_range(b, n_quads) as loop:
                        u = b.mul(loop.index, g.i64(4))
                        for o in range(0, 4 * bpu, 64):
                            g.prefetch(rowp, b.add(b.mul(u, g.i64(bpu)), g.i64(PF + o)))
                        codes, sc, mn = _quad(g, fmt, rowp, u, lutp, signed)
                        unit(codes, sc, mn, 32, b.mul(u, g.i64(32)), u, u)
                    first = b.mul(n_quads, g.i64(4))
                    with cgutils.for_range_slice(b, first, n_units, g.i64(1)) as (u, _):
                        code, sc, mn = block(u)  # the last blocks, one at a time
                        mn = None if mn is None else _vec1(b, mn)
                        unit([code], _vec1(b, sc), mn, 32, b.mul(u, g.i64(32)), u, u)
                for t in range(nt):
                    tot = ir.Constant(F32, 0.0)
                    for table, add in ((prods, b.fadd), (mins, b.fsub)):
                        for wd, accs in table.items():
                            v = b.load(accs[t])
                            h = g.hsum(v, wd) if wd > 1 else b.extract_element(v, _i32(0))
                            tot = add(tot, h)
                    g.store2d(tot, outa, b.add(o0v, g.i64(t)), rows.index)
            return context.get_dummy_value()

        return sig, codegen

    return rowdot


def make_rowdot_float(fmt: int, nt: int):
    """An intrinsic with ``make_rowdot_codes``' arguments for F16 / BF16 rows (dx, xs and lut
    unused): 32 values a step widened to float32 (vcvtph2ps for F16, a 16-bit shift for BF16)
    and multiplied with float32 activations, in both modes (the products are exact)."""
    fm = ("contract",)

    @intrinsic
    def rowdot(typingctx, w, r0, nr, x, t0, dx, xs, lut, out, o0):
        sig = types.void(w, r0, nr, x, t0, dx, xs, lut, out, o0)

        def codegen(context, builder, sig, args):
            g = IRGen(context, builder)
            b = builder
            wty, _, _, xty, _, _, _, _, outty, _ = sig.args
            wa = g.array(wty, args[0])
            r0v, nrv, o0v = args[1], args[2], args[9]
            xa = g.array(xty, args[3])
            n_in = b.extract_value(xa.shape, 1)
            outa = g.array(outty, args[8])
            n_units = b.sdiv(b.extract_value(wa.shape, 1), g.i64(64))
            v32 = vec(F32, 32)
            accs = [cgutils.alloca_once(b, v32) for _ in range(nt)]
            xrow = [b.mul(b.add(args[4], g.i64(t)), n_in) for t in range(nt)]
            with cgutils.for_range(b, nrv) as rows:
                rowp = g.row(wa, b.add(r0v, rows.index))
                for a in accs:
                    b.store(ir.Constant(v32, None), a)
                with cgutils.for_range(b, n_units) as loop:
                    u = loop.index
                    base = b.mul(u, g.i64(64))
                    g.prefetch(rowp, b.add(base, g.i64(PF)))
                    h = g.load(rowp, base, vec(I16, 32), I8)
                    if fmt == FMT_F16:
                        wv = b.fpext(b.bitcast(h, vec(ir.HalfType(), 32)), v32)
                    else:
                        wide = b.shl(b.zext(h, vec(I32, 32)), splat(I32, 32, 16))
                        wv = b.bitcast(wide, v32)
                    for t in range(nt):
                        xv = g.load(xa.data, b.add(xrow[t], b.mul(u, g.i64(32))), v32, F32)
                        a = accs[t]
                        b.store(b.fadd(b.load(a), b.fmul(wv, xv, flags=fm), flags=fm), a)
                for t in range(nt):
                    tot = g.hsum(b.load(accs[t]), 32)
                    g.store2d(tot, outa, b.add(o0v, g.i64(t)), rows.index)
            return context.get_dummy_value()

        return sig, codegen

    return rowdot
