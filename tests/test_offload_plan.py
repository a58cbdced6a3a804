"""The placement planner: sizes, the fixed part against the GPU budget, slots per tier, the
hottest experts first, and refusals in one sentence (no weights needed)."""

from __future__ import annotations

import numpy as np
import pytest
from test_config import V3  # DeepSeek-V3's config.json numbers

from localseek.config import ModelConfig
from localseek.errors import LocalseekError
from localseek.offload.plan import (
    ExpertUsage,
    config_tensor_bytes,
    make_plan,
    parse_size,
    scratch_bytes,
)

GiB = 2**30


@pytest.mark.parametrize(
    "text,want",
    [
        ("24GiB", 24 * GiB),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("123456", 123456),
        (" 2 KiB ", 2048),
        ("4gib", 4 * GiB),
        (789, 789),
    ],
)
def test_sizes(text, want) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["lots", "12XB", "-1", "", "1.2.3GiB", -5])
def test_bad_sizes_are_one_sentence(bad) -> None:
    with pytest.raises(LocalseekError, match=r"(not a size|must not be negative)"):
        parse_size(bad, "gpu_mem")


def _v3_plan(gpu_mem, ram, ctx=4096, usage=None):
    cfg = ModelConfig.from_hf_dict(V3)
    sizes = config_tensor_bytes(cfg)  # experts at 4.5 bits (Q4_K), the rest 8.5 (Q8_0)
    kv = cfg.num_hidden_layers * cfg.kv_cache_dim * 2 * ctx
    return (
        cfg,
        sizes,
        make_plan(cfg, sizes, gpu_mem, ram, ctx, kv, scratch_bytes(cfg, ctx, 2), usage),
    )


def test_v3_fixed_part_and_tiers_add_up() -> None:
    cfg, sizes, plan = _v3_plan(24 * GiB, 200 * GiB)
    expert = 3 * 2048 * 7168 * 9 // 16  # one Q4_K expert: w1, w2, w3 at 4.5 bits
    assert all(lp.expert_bytes == expert for lp in plan.layers)
    assert len(plan.layers) == 58
    non_expert = sum(b for n, b in sizes.items() if ".experts." not in n)
    kv = 61 * (512 + 64) * 2 * 4096
    assert plan.fixed["KV cache"] == kv
    assert plan.fixed_bytes == non_expert + kv + scratch_bytes(cfg, 4096, 2)
    # the fixed part: MLA, norms, routers, shared experts, 3 dense layers, embed and head
    assert 12 * GiB < plan.fixed_bytes < 24 * GiB
    left = 24 * GiB - plan.fixed_bytes
    assert plan.gpu_cache_bytes <= left < plan.gpu_cache_bytes + expert
    assert plan.ram_bytes <= 200 * GiB < plan.ram_bytes + expert
    counts = plan.tier_counts()
    assert sum(counts.values()) == 58 * 256
    assert counts["gpu"] == left // expert
    assert counts["ram"] == 200 * GiB // expert
    assert counts["disk"] == 58 * 256 - counts["gpu"] - counts["ram"]
    # slots are spread evenly: layers differ by at most one
    g = [lp.gpu_slots for lp in plan.layers]
    assert max(g) - min(g) <= 1
    d = plan.to_dict()
    assert d["tensors"]["layers.0.attn.wq_a"] == {"tier": "gpu", "bytes": 1536 * 7168 * 17 // 16}


def test_a_budget_that_cannot_hold_the_fixed_part_is_refused() -> None:
    _, _, plan = _v3_plan(None, 200 * GiB)
    need = plan.fixed_bytes
    with pytest.raises(LocalseekError) as e:
        _v3_plan(need - 5 * 2**20, 200 * GiB)
    msg = str(e.value)
    assert "cannot hold the fixed part" in msg and "5.00 MiB short" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")
    _, _, exact = _v3_plan(need, 200 * GiB)  # exactly the fixed part: no expert cache
    assert exact.gpu_cache_bytes == 0 and exact.tier_counts()["gpu"] == 0


def test_ram_must_hold_one_expert_per_moe_layer() -> None:
    with pytest.raises(LocalseekError, match="cannot hold one routed expert per MoE layer"):
        _v3_plan(24 * GiB, 1 * GiB)


def test_unbounded_ram_holds_every_expert_the_gpu_does_not() -> None:
    _, _, plan = _v3_plan(40 * GiB, None)
    counts = plan.tier_counts()
    assert counts["disk"] == 0 and counts["gpu"] > 0
    assert counts["gpu"] + counts["ram"] == 58 * 256


def test_hottest_experts_are_placed_first() -> None:
    cfg = ModelConfig.from_hf_dict(V3)
    rng = np.random.default_rng(0)
    usage = ExpertUsage({layer: rng.integers(0, 1000, 256) for layer in cfg.moe_layers})
    _, _, plan = _v3_plan(30 * GiB, 100 * GiB, usage=usage)
    for lp in plan.layers:
        c = usage.counts[lp.layer]
        assert min(c[lp.gpu]) >= max(c[lp.ram]) >= 0
        assert min(c[lp.ram]) >= max(c[lp.disk])
    assert plan.stats_used
