"""tools/make_synthetic.py: its random blocks decode to weights of the intended scale."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import make_synthetic as ms  # noqa: E402


@pytest.mark.parametrize(
    ("make", "qtype", "cols"),
    [
        (ms.random_q4_k, ms.Q4_K, 2048),
        (ms.random_q4_0, ms.Q4_0, 1408),
        (ms.random_q8_0, ms.Q8_0, 512),
    ],
)
def test_random_blocks_have_fan_in_scale(make, qtype, cols):
    raw = make(np.random.default_rng(0), 64, cols)
    w = dequantize(raw, qtype)  # what llama.cpp reads
    assert w.shape == (64, cols)
    std = 1 / np.sqrt(cols)
    assert w.std() == pytest.approx(std, rel=0.1)
    assert abs(w.mean()) < (0.12 if qtype == ms.Q4_0 else 0.02) * std  # Q4_0 is d (q - 8)


def test_plan_matches_the_shapes_localseek_expects():
    from localseek.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(ms.synthetic_config("v2-lite", 3))
    plan = {name: (shape, qtype) for name, shape, qtype, _ in ms.gguf_tensors(cfg)}
    assert plan["blk.1.ffn_gate_exps.weight"] == ((64, 1408, 2048), ms.Q4_K)
    assert plan["blk.2.ffn_down_exps.weight"] == ((64, 2048, 1408), ms.Q4_0)  # 1408 % 256 != 0
    assert plan["blk.0.ffn_gate.weight"][1] == ms.Q8_0
    assert plan["blk.1.ffn_gate_inp.weight"][1] == ms.F32
    assert "blk.3.attn_norm.weight" not in plan
    data = [
        make(np.random.default_rng(1))
        for name, _, _, make in ms.gguf_tensors(cfg)
        if name == "blk.1.attn_k_b.weight"
    ]
    again = [
        make(np.random.default_rng(1))
        for name, _, _, make in ms.gguf_tensors(cfg)
        if name == "blk.1.attn_k_b.weight"
    ]
    assert np.array_equal(data[0], again[0])  # deterministic for a seed


def test_fp8_pairs_dequantize_to_fan_in_scale():
    import torch

    from localseek.quant import QTensor
    from localseek.quant.fp8 import FP8_QTYPE

    codes, scale = ms._fp8_pair(torch.Generator().manual_seed(0), 300, 1408)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 11)
    w = QTensor(FP8_QTYPE, (300, 1408), codes, scale).dequantize()
    assert torch.isfinite(w).all()
    assert float(w.std()) == pytest.approx(1 / 1408**0.5, rel=0.1)
