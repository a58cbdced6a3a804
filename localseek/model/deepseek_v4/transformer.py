"""The DeepSeek-V4 network: embedding spread over ``hc_mult`` residual streams, decoder
blocks (mHC -> RMSNorm -> attention, mHC -> RMSNorm -> MoE), the hyper-head collapsing the
streams, final norm, lm_head."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from localseek.model.deepseek_v4.attention import Attention
from localseek.model.deepseek_v4.cache import LayerCache, V4Cache
from localseek.model.deepseek_v4.config import SLIDING, V4Config
from localseek.model.deepseek_v4.hyper import HyperConnection, HyperHead
from localseek.model.deepseek_v4.moe import MoE
from localseek.model.moe import Experts
from localseek.model.norm import RMSNorm
from localseek.model.rope import RotaryEmbedding, yarn_inv_freq
from localseek.quant import Weight, dense, linear


class Block(nn.Module):
    def __init__(
        self,
        cfg: V4Config,
        layer: int,
        w: dict[str, Weight],
        experts: Experts,
        rope: RotaryEmbedding,
        exact: bool,
    ):
        super().__init__()

        def hc(name: str) -> HyperConnection:
            return HyperConnection(
                w[f"{name}.fn"],
                w[f"{name}.base"],
                w[f"{name}.scale"],
                cfg.hc_mult,
                cfg.hc_sinkhorn_iters,
                cfg.hc_eps,
                cfg.rms_norm_eps,
            )

        self.hc_attn, self.hc_ffn = hc("hc_attn"), hc("hc_ffn")
        self.attn_norm = RMSNorm(w["attn_norm"], cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, _sub(w, "attn."), rope, exact)
        self.ffn_norm = RMSNorm(w["ffn_norm"], cfg.rms_norm_eps)
        self.ffn = MoE(cfg, layer, _sub(w, "ffn."), experts, exact)

    def forward(
        self, h: torch.Tensor, tokens: torch.Tensor, start: int, cache: LayerCache
    ) -> torch.Tensor:
        """h: the residual streams (B, T, hc_mult, D)."""
        post, comb, x = self.hc_attn(h)
        h = HyperConnection.merge(h, self.attn(self.attn_norm(x), start, cache), post, comb)
        post, comb, x = self.hc_ffn(h)
        return HyperConnection.merge(h, self.ffn(self.ffn_norm(x), tokens), post, comb)


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: V4Config,
        weights: Mapping[str, Weight],
        experts: Experts,
        max_len: int,
        device: torch.device,
        exact: bool = True,
    ):
        super().__init__()
        self.cfg, self.exact = cfg, exact
        r = cfg.qk_rope_head_dim
        # sliding layers: plain rope; CSA / HCA layers (attention and compressors): their own
        # base, with YaRN where the config has it
        self.rope = RotaryEmbedding(None, max_len, device, yarn_inv_freq(r, cfg.rope_theta, None))
        self.compress_rope = RotaryEmbedding(
            None, max_len, device, yarn_inv_freq(r, cfg.compress_rope_theta, cfg.rope_scaling)
        )
        self.embed = weights["embed"]
        self.layers = nn.ModuleList()
        for i in range(cfg.num_hidden_layers):
            rope = self.rope if cfg.layer_types[i] == SLIDING else self.compress_rope
            w = _sub(weights, f"layers.{i}.")
            self.layers.append(Block(cfg, i, w, experts, rope, exact))
        self.hc_head = HyperHead(
            weights["hc_head.fn"],
            weights["hc_head.base"],
            weights["hc_head.scale"],
            cfg.hc_eps,
            cfg.rms_norm_eps,
        )
        self.norm = RMSNorm(weights["norm"], cfg.rms_norm_eps)
        self.head = weights["embed"] if cfg.tie_word_embeddings else weights["head"]

    def forward(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: V4Cache,
        last_only: bool = False,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for tokens (B, T) at positions start.. .

        absorb: MLA's switch, no meaning here.
        """
        B, T = tokens.shape
        cache.check_start(start, T)
        x = F.embedding(tokens, dense(self.embed, self.norm.weight.dtype))  # (B, T, D)
        h = x.unsqueeze(2).expand(B, T, self.cfg.hc_mult, -1).contiguous()  # (B, T, hc, D)
        for block, layer_cache in zip(self.layers, cache.layers, strict=True):
            h = block(h, tokens, start, layer_cache)
        cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return linear(self.norm(self.hc_head(h)), self.head, self.exact).float()


def _sub(w: Mapping[str, Weight], prefix: str) -> dict[str, Weight]:
    return {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
