"""One decoder layer: pre-norm MLA, then pre-norm dense MLP or MoE, each with a residual."""

from __future__ import annotations

import torch
from torch import nn

from localseek.config import ModelConfig
from localseek.model.kv_cache import KVCache
from localseek.model.mla import MLA
from localseek.model.moe import MLP, Experts, MoE
from localseek.model.norm import RMSNorm
from localseek.model.rope import RotaryEmbedding
from localseek.quant import Weight


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        w: dict[str, Weight],
        experts: Experts,
        exact: bool = True,
    ):
        """exact: float32 activations into every quantized matmul (else int8 per 32)."""
        super().__init__()
        self.attn_norm = RMSNorm(w["attn_norm"], cfg.rms_norm_eps)
        attn_w = {k[5:]: v for k, v in w.items() if k.startswith("attn.")}
        self.attn = MLA(cfg, layer, attn_w, exact)
        self.ffn_norm = RMSNorm(w["ffn_norm"], cfg.rms_norm_eps)
        ffn_w = {k[4:]: v for k, v in w.items() if k.startswith("ffn.")}
        if cfg.is_moe_layer(layer):
            self.ffn: nn.Module = MoE(cfg, layer, ffn_w, experts, exact)
        else:
            self.ffn = MLP(ffn_w["w1"], ffn_w["w2"], ffn_w["w3"], exact)

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache,
        rope: RotaryEmbedding,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        x, h = self.ffn_norm.add(x, self.attn(self.attn_norm(x), start, cache, rope, absorb))
        return x + self.ffn(h)
