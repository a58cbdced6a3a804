"""V4's MoE: every layer routed, one shared expert, experts' SwiGLU clamped (``swiglu_limit``).
The first layers (``hash_moe``) pick their experts from a frozen token -> experts table
(``tid2eid``); the rest by top-k of the scores plus a bias. Either way the weights are the
chosen scores renormalised, times ``routed_scaling_factor``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localseek.model.deepseek_v4.config import V4Config
from localseek.model.moe import MLP, Experts
from localseek.quant import Weight


def score(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: V4Config,
    hashed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts: a pure function of router logits (N, E), bias and config.

    hashed: the experts ``tid2eid`` gives the tokens (N, k), for hash-routed layers.
    Returns: topk_ids (N, k) int64 and topk_weights (N, k) float32. The weights are always
    renormalised (transformers' rule, and DeepSeek's for non-softmax scores).
    """
    scores = score(logits, cfg.scoring_func)
    if hashed is not None:
        topk_ids = hashed.long()
    else:
        choice = scores if bias is None else scores + bias
        topk_ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, topk_ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, weights * cfg.routed_scaling_factor


class MoE(nn.Module):
    def __init__(
        self, cfg: V4Config, layer: int, w: dict[str, Weight], experts: Experts, exact: bool
    ):
        super().__init__()
        self.cfg, self.layer, self.experts = cfg, layer, experts
        self.gate = w["gate"]
        self.tid2eid = w["tid2eid"] if cfg.is_hash_layer(layer) else None
        self.bias = None if self.tid2eid is not None else w.get("gate_bias")
        self.shared = MLP(w["shared.w1"], w["shared.w2"], w["shared.w3"], exact, cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        logits = F.linear(flat.float(), self.gate.float())
        hashed = None if self.tid2eid is None else self.tid2eid[tokens.reshape(-1)]
        bias = None if self.bias is None else self.bias.float()
        topk_ids, topk_weights = route(logits, bias, self.cfg, hashed)
        y = self.experts(self.layer, flat, topk_ids, topk_weights)
        return (y + self.shared(flat)).view(shape)
