"""GPU-tier kernels on the CPU device: torch dequantisation bit-exact with gguf.quants and
QTensor.dequantize, tiled matmuls and the batched expert entry against dequantise + float64
(ReferenceExperts), and quant.linear routing off-CPU weights here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from localseek.model.moe import ReferenceExperts
from localseek.quant import QTensor, linear
from localseek.quant.fp8 import FP8_QTYPE, fp8_scale_shape
from localseek.quant.gpu import kernels as gk

GGML = {
    "ggml_q8_0": GGMLQuantizationType.Q8_0,
    "ggml_q4_0": GGMLQuantizationType.Q4_0,
    "ggml_q4_k": GGMLQuantizationType.Q4_K,
}
CASES = [  # partial FP8 blocks at both edges
    ("ggml_q8_0", (40, 288)),
    ("ggml_q4_0", (40, 288)),
    ("ggml_q4_k", (40, 512)),
    (FP8_QTYPE, (200, 300)),
]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).abs().max() / ref.abs().max())


def _stack(qtype: str, shape: tuple[int, int], n: int, seed: int) -> gk.ExpertStack:
    """n random weights as a uint8 (n, rows, row_bytes) stack. Random bytes cover every quant
    and packed-scale bit pattern; f16 scales are set to finite values, FP8 NaNs to numbers."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if qtype == FP8_QTYPE:
        raw = rng.integers(0, 256, (n, rows, cols), dtype=np.uint8)
        raw[(raw & 0x7F) == 0x7F] = 0x3C
        scale = rng.uniform(0.01, 2, (n, *fp8_scale_shape(shape))).astype(np.float32)
        return gk.ExpertStack(qtype, shape, torch.from_numpy(raw), torch.from_numpy(scale))
    block, size = gk.GGML_BLOCKS[qtype]
    raw = rng.integers(0, 256, (n, rows, cols // block, size), dtype=np.uint8)
    n_f16 = 2 if qtype == "ggml_q4_k" else 1  # d (and dmin)
    f16 = rng.uniform(-0.05, 0.05, (n, rows, cols // block, n_f16)).astype(np.float16)
    raw[..., : 2 * n_f16] = f16.view(np.uint8)
    return gk.ExpertStack(qtype, shape, torch.from_numpy(raw.reshape(n, rows, -1)))


def _reference_values(w: QTensor) -> torch.Tensor:
    if w.qtype == FP8_QTYPE:
        return w.dequantize(torch.float32)
    return torch.from_numpy(dequantize(w.data.numpy(), GGML[w.qtype]))


@pytest.mark.parametrize("qtype,shape", CASES)
def test_dequantize_rows_is_bit_exact(qtype, shape) -> None:
    w = _stack(qtype, shape, 1, seed=1).expert(0)
    ref = _reference_values(w)
    assert torch.equal(gk.dequantize_rows(w, 0, shape[0]), ref)
    r0, r1 = 7, shape[0] - 5  # FP8: across row blocks
    assert torch.equal(gk.dequantize_rows(w, r0, r1), ref[r0:r1])


@pytest.mark.parametrize("qtype,shape", CASES)
def test_tiled_matmul_equals_float64_without_a_whole_dequantised_copy(
    qtype, shape, monkeypatch
) -> None:
    rows, cols = shape
    w = _stack(qtype, shape, 1, seed=2).expert(0)
    dense = _reference_values(w).double()
    tile_bytes = 4 * cols * 7  # 7 rows a tile: several tiles and a partial last one
    tiles: list[torch.Tensor] = []
    real = gk.dequantize_rows

    def spy(w, r0, r1, out=None):
        tiles.append(out)
        return real(w, r0, r1, out)

    monkeypatch.setattr(gk, "dequantize_rows", spy)
    monkeypatch.setattr(QTensor, "dequantize", lambda *a: pytest.fail("whole-matrix dequantize"))
    for T in (1, 5, 64):
        tiles.clear()
        x = torch.randn(T, cols)
        y = gk.qmatmul(x, w, tile_bytes)
        assert y.shape == (T, rows)
        assert _rel(y, x.double() @ dense.T) < 1e-5
        # every tile is a view of one buffer of tile_rows rows
        assert len(tiles) == -(-rows // 7)
        assert all(t.data_ptr() == tiles[0].data_ptr() and t.shape[0] <= 7 for t in tiles)
        assert sum(t.shape[0] for t in tiles) == rows
    x3 = torch.randn(2, 3, cols)  # leading dims pass through
    assert gk.qmatmul(x3, w).shape == (2, 3, rows)


def test_tile_rows_bounds_the_buffer() -> None:
    assert gk.tile_rows(2048, 7168) * 7168 * 4 <= gk.TILE_BYTES  # V3 gate/up
    assert gk.tile_rows(7168, 2048) * 2048 * 4 <= gk.TILE_BYTES  # V3 down
    assert gk.tile_rows(7168, 2048) > 100  # and still a few hundred rows per matmul
    assert gk.tile_rows(10, 64) == 10
    assert gk.tile_rows(5, 10**7) == 1


def test_fp8_scaled_mm_within_activation_quantisation_error() -> None:
    """The _scaled_mm path (run here by CPU torch): e4m3 activations, bfloat16 product."""
    shape = (272, 320)  # a partial 16-row block and a partial column block
    w = _stack(FP8_QTYPE, shape, 1, seed=3).expert(0)
    dense = w.dequantize(torch.float32).double()
    for T in (1, 5, 64):
        x = torch.randn(T, shape[1])
        y = gk.fp8_scaled_mm(x.bfloat16(), w)
        assert y.dtype == torch.bfloat16 and y.shape == (T, shape[0])
        # measured 2.1e-2 to 2.8e-2 (bf16 tiles: 4e-3): e4m3 keeps 3 mantissa bits of each
        # activation, as in DeepSeek's own FP8 inference; a misapplied scale is off by O(1)
        assert _rel(y, x.bfloat16().double() @ dense.T) < 5e-2
    assert not gk._scaled_mm_ok(x.bfloat16(), w)  # CPU tensors: the exact tiled path


@pytest.mark.parametrize(
    "formats",
    [("ggml_q4_k", "ggml_q8_0", "ggml_q4_k"), ("ggml_q4_0",) * 3, (FP8_QTYPE,) * 3],
)
def test_gpu_moe_equals_reference_experts(formats) -> None:
    S, hidden, inter, K = 6, 512, 256, 3
    f1, f2, f3 = formats
    w1 = _stack(f1, (inter, hidden), S, seed=4)
    w2 = _stack(f2, (hidden, inter), S, seed=5)
    w3 = _stack(f3, (inter, hidden), S, seed=6)
    dense = [tuple(_reference_values(w.expert(s)).double() for w in (w1, w2, w3)) for s in range(S)]
    reference = ReferenceExperts({0: dense})  # dequantise + float64
    gen = torch.Generator().manual_seed(7)
    for N in (1, 5, 64):
        x = torch.randn(N, hidden, generator=gen)
        slot_ids = torch.rand(N, S, generator=gen).argsort(dim=1)[:, :K]  # (N, K) distinct
        weights = torch.rand(N, K, generator=gen)
        missing = torch.rand(N, K, generator=gen) < 0.3  # experts not cached here
        missing[0, 0] = False
        y = gk.gpu_moe(
            x, slot_ids.masked_fill(missing, -1), weights, w1, w3, w2, tile_bytes=4 * hidden * 50
        )
        ref = reference(0, x.double(), slot_ids, weights.masked_fill(missing, 0))
        assert _rel(y, ref) < 1e-5


def test_linear_routes_off_cpu_weights_to_the_tiled_kernels(monkeypatch) -> None:
    monkeypatch.setattr(QTensor, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(gk, "qmatmul", lambda x, w: ("tiled", w.qtype))
    for qtype, shape in CASES:
        w = _stack(qtype, shape, 1, seed=8).expert(0)
        assert linear(torch.randn(3, shape[1]), w) == ("tiled", qtype)
