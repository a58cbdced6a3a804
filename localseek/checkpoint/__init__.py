"""Checkpoint formats end here: each reader maps its tensor names to canonical names.

Canonical names follow DeepSeek's reference implementation:

    embed, norm, head
    layers.{i}.attn_norm, layers.{i}.ffn_norm
    layers.{i}.attn.{wq | wq_a, q_norm, wq_b}, .wkv_a, .kv_norm, .wkv_b, .wo
    layers.{i}.ffn.{w1, w2, w3}                       dense MLP (w1 gate, w3 up, w2 down)
    layers.{i}.ffn.gate, layers.{i}.ffn.gate_bias     router weight, e_score_correction_bias
    layers.{i}.ffn.shared.{w1, w2, w3}                shared experts (fused into one MLP)
    layers.{i}.ffn.experts.{e}.{w1, w2, w3}           routed expert e
"""

from localseek.checkpoint.base import Checkpoint, expected_shapes, open_checkpoint

__all__ = ["Checkpoint", "expected_shapes", "open_checkpoint"]
