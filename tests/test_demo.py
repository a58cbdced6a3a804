"""The bundled demo model: V3 architecture, loads in transformers and localseek alike, learned
something (bits per byte, balanced routers) and decodes a fixed golden sequence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import localseek
from localseek.demo import BUNDLED, default_model
from localseek.perplexity import perplexity

GOLDEN_PROMPT = "The man who"
# greedy, exact=True; regenerate when tools/train_demo.py retrains the model
# fmt: off
GOLDEN = [
    325, 1018, 969, 268, 276, 718, 296, 268, 705, 309, 371, 263, 635, 711, 288, 202,
    546, 80, 1693, 296, 268, 705, 17, 224, 398, 81, 460, 382, 81, 376, 263, 635,
]
# fmt: on


@pytest.fixture(scope="module")
def demo():
    return localseek.load(BUNDLED, exact=True, ctx=256)


@pytest.fixture(scope="module")
def heldout() -> str:
    return (BUNDLED / "heldout.txt").read_text(encoding="utf-8")


def test_is_the_default_and_has_the_whole_v3_architecture():
    assert default_model() == BUNDLED
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["q_lora_rank"] and cfg["kv_lora_rank"] and cfg["qk_rope_head_dim"]
    assert cfg["n_routed_experts"] >= 16 and cfg["num_experts_per_tok"] >= 4
    assert cfg["n_shared_experts"] == 1 and cfg["first_k_dense_replace"] >= 1
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    shipped = sum(f.stat().st_size for f in BUNDLED.iterdir())
    assert shipped <= 25 * 2**20


def test_logits_match_transformers(demo):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    ids = demo.tokenizer.encode("A penny saved is a penny earned. Tell me a fortune.")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    got = demo.logits(ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the same greedy pick at every position
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_golden_greedy(demo):
    ids = demo.tokenizer.encode(GOLDEN_PROMPT)
    out = list(demo.generate(ids, 32))
    assert out == GOLDEN, (out, demo.tokenizer.decode(out))


def test_heldout_bits_per_byte_beat_a_unigram_byte_model(demo, heldout):
    text = heldout[:8000]
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    p = np.bincount(data, minlength=256) / len(data)
    # the byte entropy of the text itself: no unigram byte model does better on it
    unigram = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    got = perplexity(demo, text, ctx=128).bits_per_byte
    assert got < 0.7 * unigram, (got, unigram)


def test_routers_spread_tokens_over_the_experts(demo, heldout):
    """On held-out text every MoE layer's expert-usage entropy is >= 80% of log2(n_experts)."""
    cfg = demo.config
    counts = {layer: np.zeros(cfg.n_routed_experts) for layer in cfg.moe_layers}
    inner = demo.experts

    def counting(layer, x, topk_ids, topk_weights):
        counts[layer] += np.bincount(topk_ids.flatten().numpy(), minlength=cfg.n_routed_experts)
        return inner(layer, x, topk_ids, topk_weights)

    moes = [b.ffn for b in demo.net.layers if hasattr(b.ffn, "experts")]
    for moe in moes:
        moe.experts = counting
    try:
        perplexity(demo, heldout[:8000], ctx=128)
    finally:
        for moe in moes:
            moe.experts = inner
    for layer, c in counts.items():
        p = c / c.sum()
        entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        assert entropy >= 0.8 * math.log2(cfg.n_routed_experts), (layer, entropy)
