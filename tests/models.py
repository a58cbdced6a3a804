"""Tiny random DeepSeek models built with transformers (the reference), saved as HF folders."""

from __future__ import annotations

from pathlib import Path

import torch

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
}


def v3_config(**over):
    from transformers import DeepseekV3Config

    kw = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        rope_parameters=dict(YARN),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    kw.update(over)
    return DeepseekV3Config(**kw)


def v2_lite_config(**over):
    from transformers import DeepseekV2Config

    kw = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=12,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    kw.update(over)
    return DeepseekV2Config(**kw)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with unit-scale activations (transformers' 0.02 init makes everything near-tied),
    random non-unit norm weights and a random non-zero e_score_correction_bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # small enough that biased sigmoid scores stay positive
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def build(kind: str, path: Path, seed: int = 0, **over):
    """Save a random tiny model of ``kind`` ("v3" or "v2_lite") to ``path``; return it (float32)."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    if kind == "v3":
        model = DeepseekV3ForCausalLM(v3_config(**over))
    else:
        model = DeepseekV2ForCausalLM(v2_lite_config(**over))
    randomize(model, seed)
    model.eval()
    model.save_pretrained(path)
    return model


def reference_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
