"""The whole network: embedding, decoder blocks, final norm, lm_head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from localseek.config import ModelConfig
from localseek.model.block import Block
from localseek.model.kv_cache import KVCache
from localseek.model.moe import Experts
from localseek.model.norm import RMSNorm
from localseek.model.rope import RotaryEmbedding
from localseek.quant import Weight, dense, linear


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, Weight],
        experts: Experts,
        max_len: int,
        device: torch.device,
        exact: bool = True,
    ):
        """exact: float32 activations into every quantized matmul; False rounds them to int8
        per 32 for the CPU kernels' integer dot products (llama.cpp's choice)."""
        super().__init__()
        self.cfg = cfg
        self.exact = exact
        self.max_len = max_len
        self.embed = weights["embed"]
        self.layers = nn.ModuleList()
        for i in range(cfg.num_hidden_layers):
            prefix = f"layers.{i}."
            w = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            self.layers.append(Block(cfg, i, w, experts, exact))
        self.norm = RMSNorm(weights["norm"], cfg.rms_norm_eps)
        self.head = weights["embed"] if cfg.tie_word_embeddings else weights["head"]
        self.rope = RotaryEmbedding(cfg, max_len, device)

    def forward(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: KVCache,
        last_only: bool = False,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for tokens (B, T) at positions start.. .

        last_only: compute logits for the last position only (B, 1, vocab).
        """
        x = F.embedding(tokens, dense(self.embed, self.norm.weight.dtype))  # (B, T, D)
        for block in self.layers:
            x = block(x, start, cache, self.rope, absorb)
        if last_only:
            x = x[:, -1:]
        return linear(self.norm(x), self.head, self.exact).float()
