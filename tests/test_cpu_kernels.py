"""numba CPU kernels: each format against dequantize + float64 matmul, the fused MoE layer
against ReferenceExperts, and a quantized GGUF model against the reference expert path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf_util as gu
import models
import numpy as np
import pytest
import torch

import localseek
import localseek.engine
from localseek.checkpoint import open_checkpoint
from localseek.convert.gguf_writer import write_gguf
from localseek.model.moe import ReferenceExperts, route
from localseek.offload import CPUExperts
from localseek.quant import QTensor, linear
from localseek.quant.cpu import kernels as ck
from localseek.quant.cpu import widen
from localseek.quant.cpu.kernels import (
    F16_LUT,
    FP8_LUT,
    KERNEL_FORMATS,
    act_span,
    kernel_args,
    qmatmul,
)
from localseek.quant.cpu.widen import widen_rows
from localseek.quant.formats import FORMATS, random_blocks
from localseek.quant.fp8 import FP8_QTYPE, fp8_scale_shape
from localseek.quant.linear import grouped_linear, swiglu_linear

# every GGML format with a CPU kernel (all of them), by its block size
GGML_KERNEL_FORMATS = [t for t, f in FORMATS.items() if f.ggml is not None]


def _rel(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    return float((got - ref).abs().max() / ref.abs().max())


def _random_weights(qtype: str, shape: tuple[int, int], n: int, seed: int) -> list[QTensor]:
    """n random weights of one format, as views of one (n, rows, row_bytes) stack like GGUF's.

    Random bytes cover every quant and packed-scale bit pattern; the f16 scales are set to
    finite values."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if qtype == FP8_QTYPE:
        raw = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
        raw[(raw & 0x7F) == 0x7F] = 0x3C  # e4m3fn NaN -> a number
        data = torch.from_numpy(raw).view(torch.float8_e4m3fn)
        scale = torch.from_numpy(rng.uniform(0.01, 2, (n, *fp8_scale_shape(shape))).astype("f4"))
        return [QTensor(qtype, shape, data[e], scale[e]) for e in range(n)]
    stack = np.stack([random_blocks(qtype, rows, cols, rng) for _ in range(n)])
    return [QTensor(qtype, shape, torch.from_numpy(stack[e])) for e in range(n)]


# formats whose fast mode keeps float32 activations (their products are exact either way)
FLOAT_ONLY = {FP8_QTYPE, "ggml_f16", "ggml_bf16"}


def _case_shape(qtype: str) -> tuple[int, int]:
    """40 rows (a partial 64-row chunk); 224 columns (7 blocks: a four-block step and three
    lone blocks, or three pairs and a lone block) for the 32-weight blocks, 512 for the
    256-weight super-blocks."""
    return (40, 512 if FORMATS[qtype].block == 256 else 224)


CASES = [(t, _case_shape(t)) for t in GGML_KERNEL_FORMATS] + [
    (FP8_QTYPE, (200, 352)),  # whole 32-column chunks: the streaming path for few tokens
    (FP8_QTYPE, (200, 300)),  # not: the tile path for any T
]


@pytest.mark.parametrize("qtype", GGML_KERNEL_FORMATS)
def test_random_blocks_are_valid_and_decode_like_gguf(qtype) -> None:
    """Our dequantize is gguf-py's, on the random valid blocks every kernel test uses: finite
    values, and no code pattern the kernels are not checked on is left out (all 256 byte
    values occur in the code bytes)."""
    from gguf.quants import dequantize

    raw = random_blocks(qtype, 16, 1024, np.random.default_rng(3))
    got = QTensor(qtype, (16, 1024), torch.from_numpy(raw)).dequantize(torch.float32).numpy()
    want = dequantize(raw, FORMATS[qtype].ggml)
    assert np.isfinite(got).all() and np.array_equal(got, want)
    assert len(np.unique(raw)) == 256


def _int8_activations(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """x rounded as the fast path rounds it for qtype: int8 per 32 (super-block formats per
    256 where the kernels sum super-blocks in int32), scale max|x| / 127 (float32 ops)."""
    span = act_span(FORMATS[qtype].cpu_code)
    xb = x.reshape(x.shape[0], -1, span)  # (T, in // span, span)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, 127) / amax  # a true division, as the kernel's (127 / amax is
    q = torch.round(xb * inv)  # 127 * (1 / amax) in torch: one ulp off, a .5 rounds apart)
    return (q * (amax / 127)).reshape(x.shape)


@pytest.mark.parametrize("qtype,shape", CASES)
def test_qmatmul_equals_dequantize_matmul(qtype, shape) -> None:
    (w,) = _random_weights(qtype, shape, 1, seed=1)
    dense = w.dequantize(torch.float32).double()
    for T in (1, 3, 16, 33):  # rows decoded per 1 and per 4 tokens, in blocks of 16 tokens
        x = torch.randn(T, shape[1])
        y = qmatmul(x, w.qtype, w.data, w.scale)
        assert y.shape == (T, shape[0])
        assert _rel(y, x.double() @ dense.T) < 1e-5
        if qtype in FLOAT_ONLY:  # F16 / BF16: the fast mode is the exact one
            if qtype != FP8_QTYPE:
                assert torch.equal(
                    qmatmul(x, w.qtype, w.data, w.scale, exact=False, widen=False), y
                )
            continue
        # fast path: exact for the int8-rounded activations, and within their rounding error
        # of float32 activations (measured 0.4-0.8% of max |y|, 0.5% relative RMS)
        fast = qmatmul(x, w.qtype, w.data, w.scale, exact=False, widen=False)
        assert _rel(fast, _int8_activations(x, qtype).double() @ dense.T) < 1e-5
        assert _rel(fast, x.double() @ dense.T) < 2e-2


@pytest.mark.parametrize(
    "qtype,n_in",
    [("ggml_q8_0", 96), ("ggml_q4_0", 96), ("ggml_q4_k", 256), (FP8_QTYPE, 96), (FP8_QTYPE, 100)],
)
def test_grouped_qmatmul_is_one_product_per_group(qtype, n_in) -> None:
    """groups=G: group g's tokens times group g's rows (MLA's per-head absorbed decode); FP8
    100 wide takes the tile path."""
    G, R = 3, 40
    (w,) = _random_weights(qtype, (G * R, n_in), 1, seed=7)
    dense = w.dequantize(torch.float32).double().view(G, R, n_in)
    for N in (1, 5):
        x = torch.randn(G * N, n_in)
        want = torch.cat([x[g * N : (g + 1) * N].double() @ dense[g].T for g in range(G)])
        got = qmatmul(x, w.qtype, w.data, w.scale, groups=G)
        assert got.shape == (G * N, R) and _rel(got, want) < 1e-5
        if qtype in FLOAT_ONLY:  # FP8, F16, BF16 have only the float path
            continue
        fast = qmatmul(x, w.qtype, w.data, w.scale, exact=False, groups=G)
        xr = _int8_activations(x, qtype).double()
        want_fast = torch.cat([xr[g * N : (g + 1) * N] @ dense[g].T for g in range(G)])
        assert _rel(fast, want_fast) < 1e-5
    # grouped_linear: the same through the public entry, batch dims kept
    x = torch.randn(2, 4, G, n_in)
    y = grouped_linear(x, w)
    assert y.shape == (2, 4, G, R)
    ref = torch.einsum("btgi,gri->btgr", x.double(), dense)
    assert _rel(y, ref) < 1e-5
    assert _rel(grouped_linear(x, w.dequantize(torch.float32)), ref) < 1e-5


def test_kernels_refuse_rows_of_another_width() -> None:
    """The kernels trust the stored row bytes: a weight whose rows do not hold as many values
    as the activations is refused, not read past its rows."""
    (w,) = _random_weights("ggml_q8_0", (16, 288), 1, seed=9)
    with pytest.raises(ValueError, match="does not take 64 inputs"):
        qmatmul(torch.randn(1, 64), w.qtype, w.data, w.scale)
    with pytest.raises(ValueError, match="does not take 64 inputs"):
        swiglu_linear(torch.randn(1, 64), w, w)


@pytest.mark.parametrize("qtype,shape", CASES)
def test_swiglu_equals_silu_of_gate_times_up(qtype, shape) -> None:
    """swiglu_linear: gate and up in one kernel call, the activation fused."""
    w1, w3 = _random_weights(qtype, shape, 2, seed=8)
    d1, d3 = (w.dequantize(torch.float32).double() for w in (w1, w3))
    for T in (1, 5):
        x = torch.randn(2, T, shape[1])
        got = swiglu_linear(x, w1, w3)
        assert got.shape == (2, T, shape[0])
        want = torch.nn.functional.silu(x.double() @ d1.T) * (x.double() @ d3.T)
        assert _rel(got, want) < 1e-5
        if qtype not in FLOAT_ONLY:
            xr = _int8_activations(x.reshape(-1, shape[1]), qtype).double().view(x.shape)
            want = torch.nn.functional.silu(xr @ d1.T) * (xr @ d3.T)
            assert _rel(swiglu_linear(x, w1, w3, exact=False), want) < 1e-5


@pytest.mark.parametrize(
    "formats,inter",
    [
        (("ggml_q4_k", "ggml_q8_0", "ggml_q4_k"), 256),
        (("ggml_q4_0",) * 3, 256),
        (("ggml_q4_k", "ggml_q6_k", "ggml_q4_k"), 256),  # Q4_K_M's more-bits down
        (("ggml_q4_k", "ggml_q5_0", "ggml_q4_k"), 288),  # its fallback for other widths
        (("ggml_q2_k", "ggml_q3_k", "ggml_q2_k"), 256),
        (("ggml_q5_k", "ggml_iq4_xs", "ggml_q5_k"), 256),
        (("ggml_mxfp4", "ggml_iq4_nl", "ggml_q5_1"), 288),
        (("ggml_q4_1",) * 3, 288),
        (("ggml_f16", "ggml_bf16", "ggml_f16"), 288),
        ((FP8_QTYPE,) * 3, 256),
        ((FP8_QTYPE,) * 3, 200),  # down rows of 200 columns: the tile path
    ],
)
def test_fused_layer_equals_reference(formats, inter) -> None:
    E, hidden, K = 6, 512, 3
    f1, f2, f3 = formats
    w1 = _random_weights(f1, (inter, hidden), E, seed=2)
    w2 = _random_weights(f2, (hidden, inter), E, seed=3)
    w3 = _random_weights(f3, (inter, hidden), E, seed=4)
    weights = {5: list(zip(w1, w2, w3, strict=True))}
    reference = ReferenceExperts({5: list(weights[5])})
    cpu = CPUExperts(weights)
    assert 5 in cpu.stacks
    if f1 != FP8_QTYPE:  # GGUF-like views: the stack is used in place
        assert np.shares_memory(cpu.stacks[5][0][1], w1[0].data.numpy())
    for N in (1, 3, 33):
        x = torch.randn(N, hidden)
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(N)])  # (N, K)
        wts = torch.rand(N, K)
        got = cpu(5, x, ids, wts)
        want = reference(5, x, ids, wts)
        assert _rel(got, want) < 1e-5
        if f1 not in FLOAT_ONLY:  # int8 activations (rounded twice: x and h): measured ~0.7%
            fast = CPUExperts({5: weights[5]}, exact=False)(5, x, ids, wts)
            assert _rel(fast, want) < 3e-2


# --- fast mode's bf16 tiles (prefill on CPUs with AMX / AVX512-BF16) ---------------------------


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


@pytest.mark.parametrize("qtype,shape", CASES)
def test_widened_rows_are_dequantize_rounded_to_bf16(qtype, shape) -> None:
    """Every format's rows widened to bf16 are its dequantized values rounded to nearest even
    (F16 / BF16 / FP8 too), from any first row: equal values (a zero may differ in sign)."""
    (w,) = _random_weights(qtype, shape, 1, seed=11)
    want = w.dequantize(torch.float32).to(torch.bfloat16)[3:]
    fmt, arr, sc = kernel_args(w)
    out = np.zeros((shape[0] - 3, shape[1]), dtype=np.uint16)
    widen_rows(fmt, arr, sc, 3, shape[0], F16_LUT, FP8_LUT, out)
    assert torch.equal(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), want)


@pytest.mark.parametrize("qtype,shape", CASES)
def test_tiles_equal_bf16_products(qtype, shape) -> None:
    """widen=True: the products of bf16-rounded activations and weights, accumulated in float32
    and rounded to bf16 (within a bf16 step of each value), at any token count and in groups."""
    (w,) = _random_weights(qtype, shape, 1, seed=12)
    wb = _bf16(w.dequantize(torch.float32))
    for T in (1, 3, 33):
        x = torch.randn(T, shape[1])
        got = qmatmul(x, w.qtype, w.data, w.scale, exact=False, widen=True).double()
        want = _bf16(x) @ wb.T
        slack = 2**-8 * want.abs() + 1e-5 * want.abs().max()
        assert got.shape == want.shape and bool(((got - want).abs() <= slack).all())
        assert torch.equal(
            qmatmul(x, w.qtype, w.data, w.scale, exact=True, widen=True),
            qmatmul(x, w.qtype, w.data, w.scale, exact=True),
        )  # exact: no tiles
    G, R = 2, shape[0] // 2
    x = torch.randn(G * 5, shape[1])
    got = qmatmul(x, w.qtype, w.data, w.scale, exact=False, groups=G, widen=True).double()
    want = torch.cat([_bf16(x[g * 5 : (g + 1) * 5]) @ wb[g * R : (g + 1) * R].T for g in range(G)])
    assert _rel(got, want) < 2**-8


def test_tiled_swiglu_and_moe_equal_bf16_products(monkeypatch) -> None:
    """The SwiGLU and the MoE layer through tiles: bf16 products (h rounded to bf16 before the
    down projection), and with auto choice on a CPU with bf16 units (forced here), the experts
    with ``MIN_EXPERT_TOKENS`` tokens or more go through tiles and the rest through the one-call
    kernel, each within its own rounding of the float32 reference."""
    E, hidden, inter, N, K = 4, 256, 256, 40, 2
    fmts = ("ggml_q4_k", "ggml_q6_k", "ggml_q5_k")  # gate, down, up
    w1, w2, w3 = (
        _random_weights(f, s, E, seed=13 + i)
        for i, (f, s) in enumerate(
            zip(fmts, [(inter, hidden), (hidden, inter), (inter, hidden)], strict=True)
        )
    )
    d1, d2, d3 = ([_bf16(w.dequantize(torch.float32)) for w in ws] for ws in (w1, w2, w3))
    silu = torch.nn.functional.silu
    x = torch.randn(N, hidden)
    got = ck.swiglu(x, *[(w.qtype, w.data, w.scale) for w in (w1[0], w3[0])], False, True)
    assert _rel(got, silu(_bf16(x) @ d1[0].T) * (_bf16(x) @ d3[0].T)) < 1e-2
    # expert 0 gets every token, 1..3 share the second choice (14, 13, 13 tokens); the tiles
    # threshold is set between them
    ids = torch.stack([torch.zeros(N, dtype=torch.int64), 1 + torch.arange(N) % 3], 1)
    wts = torch.rand(N, K)
    stacks = [
        (
            KERNEL_FORMATS[ws[0].qtype],
            np.stack([w.data.numpy() for w in ws]),
            np.zeros((E, 1, 1), np.float32),
        )
        for ws in (w1, w3, w2)
    ]
    xs, idn, wn = x.numpy(), ids.numpy(), wts.numpy()
    exact = torch.from_numpy(ck.moe_swiglu(xs, idn, wn, *stacks, exact=True)).double()

    def tiled_expert(e, xe):
        h = _bf16(silu(_bf16(xe) @ d1[e].T) * (_bf16(xe) @ d3[e].T))
        return h @ d2[e].T

    want = torch.zeros(N, hidden, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            want[n] += wts[n, k].double() * tiled_expert(int(ids[n, k]), x[n : n + 1])[0]
    every = torch.from_numpy(ck.moe_swiglu(xs, idn, wn, *stacks, exact=False, widen=True))
    assert _rel(every, want) < 1e-2
    monkeypatch.setattr(widen, "BF16_UNITS", True)
    monkeypatch.setattr(ck, "MIN_EXPERT_TOKENS", 20)
    mixed = torch.from_numpy(ck.moe_swiglu(xs, idn, wn, *stacks, exact=False))
    none = torch.from_numpy(ck.moe_swiglu(xs, idn, wn, *stacks, exact=False, widen=False))
    assert not torch.equal(mixed, none) and not torch.equal(mixed, every)
    for y in (every, mixed, none):
        assert _rel(y, exact) < 3e-2  # each within its rounding of the float32 layer


def test_tiles_only_in_fast_mode_on_bf16_units(monkeypatch) -> None:
    """The auto choice: tiles in fast mode for MIN_TOKENS tokens or more where the CPU has bf16
    matrix units; never in exact mode; widen=True / False force it."""
    for units in (False, True):
        monkeypatch.setattr(widen, "BF16_UNITS", units)
        assert widen.use_tiles(None, False, widen.MIN_TOKENS) is units
        assert not widen.use_tiles(None, False, widen.MIN_TOKENS - 1)
        assert not widen.use_tiles(True, True, 512) and not widen.use_tiles(None, True, 512)
        assert widen.use_tiles(True, False, 1) and not widen.use_tiles(False, False, 512)


def test_linear_uses_cpu_kernel_for_quantized_weights(monkeypatch) -> None:
    """A Q4_K weight on the CPU goes through the kernel (batch dims kept), equal to dequantize."""
    (w,) = _random_weights("ggml_q4_k", (40, 512), 1, seed=6)
    x = torch.randn(2, 3, 512)
    calls = []
    import localseek.quant.cpu.kernels as ck

    real = ck.qmatmul_weight
    monkeypatch.setattr(ck, "qmatmul_weight", lambda *a: calls.append(1) or real(*a))
    y = linear(x, w)
    assert calls and y.shape == (2, 3, 40)
    ref = x.double() @ w.dequantize(torch.float32).double().T
    assert _rel(y, ref) < 1e-5


IDS = [0, 5, 77, 130, 200, 9, 31, 250, 3, 100, 42, 7]


@pytest.mark.parametrize("ftype,label", [(7, "q8_0"), (2, "q4_0"), (14, "q4_k_s")])
def test_gguf_model_with_cpu_experts(ftype, label, tmp_path, monkeypatch) -> None:
    path = tmp_path / "hf"
    over = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256)
    models.build("v3", path, seed=5, vocab_size=gu.VOCAB, num_hidden_layers=2, **over)
    gu.write_tokenizer(path)
    with open_checkpoint(path) as ckpt:
        f32 = write_gguf(ckpt, tmp_path / "f32.gguf", "f32")[0]
    quant = tmp_path / f"{label}.gguf"
    gu.llama_quantize(f32, quant, ftype)
    model = localseek.load(quant, exact=True)
    assert isinstance(model.experts, CPUExperts) and model.experts.stacks
    ours = model.logits(IDS)
    monkeypatch.setattr(localseek.engine, "expert_executor", lambda w, exact: ReferenceExperts(w))
    reference = localseek.load(quant, exact=True)
    assert isinstance(reference.experts, ReferenceExperts)
    rel = _rel(ours, reference.logits(IDS))
    print(f"{label}: CPUExperts vs reference logits {rel:.2e}")
    assert rel < 1e-5


def test_int8_path_without_vnni(tmp_path) -> None:
    """On a CPU without VNNI (numba told to compile for Haswell: AVX2, no VNNI, no AVX-512) the
    int8 path takes vpmaddubsw (super-blocks summed in int32 with their integer scales), two
    32-byte pshufb for the tables and signed IQ4 values, and gives the int8-rounded products
    there too."""
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from test_cpu_kernels import _int8_activations, _random_weights, _rel
        from localseek.quant.cpu.kernels import qmatmul
        from localseek.quant.cpu.rowdot import target_vnni
        assert target_vnni() == 0, target_vnni()
        for qtype, shape in [("ggml_q8_0", (24, 288)), ("ggml_q4_0", (24, 288)),
                             ("ggml_q4_k", (24, 512)), ("ggml_q6_k", (24, 512)),
                             ("ggml_q2_k", (24, 512)), ("ggml_q3_k", (24, 512)),
                             ("ggml_q5_k", (24, 512)), ("ggml_iq4_xs", (24, 512)),
                             ("ggml_mxfp4", (24, 288))]:
            (w,) = _random_weights(qtype, shape, 1, seed=1)
            dense = w.dequantize(torch.float32).double()
            for T in (1, 5):
                x = torch.randn(T, shape[1])
                fast = qmatmul(x, w.qtype, w.data, w.scale, exact=False)
                err = _rel(fast, _int8_activations(x, qtype).double() @ dense.T)
                assert err < 1e-5, (qtype, T, err)
        print("ok")
        """
    )
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    env["NUMBA_CPU_FEATURES"] = "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2"
    tests = os.path.dirname(__file__)
    run = subprocess.run(
        [sys.executable, "-c", script, tests], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_vnni_target_compiles_to_vpdpbusd(tmp_path) -> None:
    """For a CPU with AVX512-VNNI the int8 rows lower to vpdpbusd (compiled, not run, so this
    holds on any host): a broken lowering would otherwise pass silently on CPUs without it."""
    script = textwrap.dedent(
        """
        import numpy as np
        from numba import njit
        from localseek.quant.cpu import kernels as ck
        from localseek.quant.cpu.rowdot import target_vnni
        assert target_vnni() == 64, target_vnni()

        @njit
        def rows(w, xq, dx, xs, lut, out):
            ck._RQ1_Q4_K(w, 0, w.shape[0], xq, 0, dx, xs, lut, out, 0)

        sig = "void(u1[:, ::1], i1[:, ::1], f4[:, ::1], f4[:, ::1], f4[::1], f4[:, ::1])"
        rows.compile(sig)
        asm = rows.inspect_asm(rows.signatures[0])
        print("vpdpbusd" in asm and "zmm" in asm)
        """
    )
    env = dict(os.environ, NUMBA_CPU_NAME="icelake-server", NUMBA_CACHE_DIR=str(tmp_path))
    env["NUMBA_CPU_FEATURES"] = "+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512vnni"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr[-2000:]


@pytest.mark.parametrize("qtype", ["ggml_q8_0", "ggml_q4_k"])
@pytest.mark.parametrize("H,pos", [(6, 0), (6, 299), (8, 517)])
def test_one_call_decode_attention_against_float64(qtype, H, pos) -> None:
    """quant.cpu.attention.mla_decode against the absorbed attention in float64 from the dequantized
    per-head weights: head counts and positions off the 4 x 4 / 8-position blocks, a context
    longer than one 256-position span; the cache written at pos, nothing else touched."""
    from localseek.quant.cpu.attention import mla_decode

    C, nope, R, V = 256, 256, 8, 32
    wk_b, wv_b = (
        _random_weights(qtype, (H * C, nope), 1, 1)[0],
        _random_weights(qtype, (H * V, C), 1, 2)[0],
    )
    g = torch.Generator().manual_seed(pos)
    q, kv = torch.randn(H, nope + R, generator=g), torch.randn(C + R, generator=g)
    norm_w = torch.rand(C, generator=g) + 0.5
    angle = torch.rand(R // 2, generator=g) * 6
    rot = torch.polar(torch.full_like(angle, 1.1), angle)
    c_cache, pe_cache = torch.randn(pos + 3, C, generator=g), torch.randn(pos + 3, R, generator=g)
    before = c_cache.clone(), pe_cache.clone()
    out = mla_decode(q, kv, norm_w, 1e-6, rot, c_cache, pe_cache, pos, wk_b, wv_b, 0.1, True)

    d = torch.float64
    lat = kv[:C].to(d)
    lat = lat / (lat.square().mean() + 1e-6).sqrt() * norm_w.to(d)
    k_pe = torch.view_as_real(
        torch.view_as_complex(kv[C:].to(d).view(-1, 2)) * rot.to(torch.complex128)
    )
    q_pe = torch.view_as_real(torch.view_as_complex(q[:, nope:].to(d).reshape(H, -1, 2)) * rot)
    assert _rel(c_cache[pos], lat) < 1e-5 and _rel(pe_cache[pos], k_pe.flatten()) < 1e-5
    assert torch.equal(c_cache[pos + 1 :], before[0][pos + 1 :]) and torch.equal(
        c_cache[:pos], before[0][:pos]
    )
    assert torch.equal(pe_cache[:pos], before[1][:pos])
    w_uk = wk_b.dequantize().to(d).view(H, C, nope)
    w_uv = wv_b.dequantize().to(d).view(H, V, C)
    c_all, pe_all = c_cache[: pos + 1].to(d), pe_cache[: pos + 1].to(d)
    q_lat = torch.einsum("hcn,hn->hc", w_uk, q[:, :nope].to(d))
    scores = (q_lat @ c_all.T + q_pe.reshape(H, R) @ pe_all.T) * 0.1
    o_lat = scores.softmax(-1) @ c_all
    want = torch.einsum("hvc,hc->hv", w_uv, o_lat)
    assert out.shape == (H, V) and _rel(out, want) < 1e-5
    n = pos + 1
    with pytest.raises(ValueError, match=f"position {n} is outside a cache of {n} positions"):
        mla_decode(q, kv, norm_w, 1e-6, rot, c_cache[:n], pe_cache[:n], n, wk_b, wv_b, 0.1, True)


def test_numba_norms_against_float64() -> None:
    """RMSNorm of a few rows (decode) and the residual add before it, as one numba call each,
    against float64; a strided input is read as its values, and many rows go to torch."""
    from localseek.model.norm import RMSNorm

    g = torch.Generator().manual_seed(11)
    norm = RMSNorm(torch.rand(96, generator=g) + 0.5, 1e-6)

    def want(x):
        x = x.double()
        return x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight.double()

    for x in (torch.randn(1, 1, 96, generator=g), torch.randn(3, 192, generator=g)[:, ::2]):
        assert _rel(norm(x), want(x)) < 1e-6
        a = torch.randn(x.shape, generator=g)
        s, h = norm.add(x, a)
        assert torch.equal(s, x + a) and _rel(h, want(x + a)) < 1e-6
    many = torch.randn(40, 96, generator=g)
    assert _rel(norm(many), want(many)) < 1e-6


@pytest.mark.parametrize(
    "scoring,method,groups,norm,model_type,k",
    [
        ("sigmoid", "noaux_tc", (8, 4), True, "deepseek_v3", 8),
        ("softmax", "greedy", (1, 1), False, "deepseek_v2", 6),
        ("softmax", "group_limited_greedy", (4, 2), True, "deepseek_v2", 3),
        ("softmax", "greedy", (1, 1), True, "deepseek_v2", 1),
        ("sigmoid", "noaux_tc", (1, 1), False, "deepseek_v3", 4),
    ],
)
def test_numba_router_equals_route(scoring, method, groups, norm, model_type, k) -> None:
    """The router's logits and the choice of experts in one numba call (decode) give what
    ``model.moe.route`` gives on torch's logits: the same experts, best first, the same weights."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from localseek.model.moe import MoE

    cfg = SimpleNamespace(
        scoring_func=scoring,
        topk_method=method,
        n_group=groups[0],
        topk_group=groups[1],
        num_experts_per_tok=k,
        norm_topk_prob=norm,
        model_type=model_type,
        routed_scaling_factor=2.5,
    )
    g = torch.Generator().manual_seed(k)
    E, D = 64, 256
    gate = torch.randn(E, D, generator=g) / 16
    bias = torch.randn(E, generator=g) * 0.1 if scoring == "sigmoid" else None
    x = torch.randn(5, D, generator=g)
    moe = MoE.__new__(MoE)
    torch.nn.Module.__init__(moe)
    moe.cfg, moe.gate, moe.bias = cfg, gate, bias
    ids, wts = moe.route(x)  # 5 rows: the numba path
    want_ids, want_wts = route(F.linear(x, gate), bias, cfg)
    assert torch.equal(ids, want_ids)
    assert _rel(wts, want_wts) < 1e-6
    assert ids.dtype == torch.int64 and wts.dtype == torch.float32
    many = torch.randn(20, D, generator=g)  # above the numba path's rows: torch
    assert torch.equal(moe.route(many)[0], route(F.linear(many, gate), bias, cfg)[0])
