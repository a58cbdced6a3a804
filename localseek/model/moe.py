"""DeepSeekMoE: a router, shared experts that see every token, and routed experts behind the
one expert interface ``experts(layer, x, topk_ids, topk_weights) -> y``."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from localseek.config import ModelConfig
from localseek.model.norm import NUMBA_ROWS
from localseek.model.variants import variant
from localseek.quant import Weight, linear
from localseek.quant.linear import swiglu_linear


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense layers and shared experts.

    swiglu_limit (V4): gate clamped to at most the limit, up to [-limit, limit], before the
    product; 0 means no clamp."""

    def __init__(
        self, w1: Weight, w2: Weight, w3: Weight, exact: bool = True, swiglu_limit: float = 0.0
    ):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.exact = exact
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu_limit:
            h = clamped_swiglu(x, self.w1, self.w3, self.swiglu_limit, self.exact)
        else:
            h = swiglu_linear(x, self.w1, self.w3, self.exact)
        return linear(h, self.w2, self.exact)


def clamped_swiglu(
    x: torch.Tensor, w1: Weight, w3: Weight, limit: float, exact: bool = True
) -> torch.Tensor:
    """silu(min(w1 x, limit)) * clamp(w3 x, -limit, limit): V4's SwiGLU."""
    gate = linear(x, w1, exact).clamp(max=limit)
    up = linear(x, w3, exact).clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def route(
    logits: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts: a pure function of router logits, bias and config.

    Args:
        logits: (N, n_routed_experts) router logits, float32.
        bias: e_score_correction_bias (n_routed_experts,) or None; it steers the choice only,
            never the weights.
    Returns:
        topk_ids (N, k) int64 and topk_weights (N, k) float32.
    """
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias
    N, E = choice.shape
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        grouped = choice.view(N, cfg.n_group, E // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
        else:  # group_limited_greedy
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        dropped = torch.ones(N, cfg.n_group, dtype=torch.bool, device=choice.device)
        dropped.scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(N, E)
    topk_ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, topk_ids)
    if variant(cfg.model_type).v2_weight_rule:
        # V2 scales only when it does not normalise (its modeling code's rule).
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * cfg.routed_scaling_factor
    else:
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    return topk_ids, weights


class Experts(Protocol):
    """Where routed experts live and how they are computed (``offload/``'s business)."""

    def __call__(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor: ...


class ReferenceExperts:
    """All routed experts as dense per-expert weights; runs only experts that got tokens."""

    def __init__(
        self,
        weights: dict[int, list[tuple[Weight, Weight, Weight]]],
        swiglu_limit: float = 0.0,
        exact: bool = True,
    ):
        self.weights = weights  # layer -> [(w1, w2, w3) per expert]
        self.swiglu_limit = swiglu_limit  # V4 clamps gate and up (0: no clamp)
        self.exact = exact

    def __call__(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        experts = self.weights[layer]
        y = torch.zeros_like(x)
        counts = torch.bincount(topk_ids.flatten(), minlength=len(experts)).tolist()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            token, slot = torch.where(topk_ids == e)
            w1, w2, w3 = experts[e]
            xe = x[token]
            if self.swiglu_limit:
                h = clamped_swiglu(xe, w1, w3, self.swiglu_limit, self.exact)
            else:
                h = F.silu(linear(xe, w1)) * linear(xe, w3)
            out = linear(h, w2, self.exact)
            y.index_add_(0, token, out * topk_weights[token, slot, None].to(out.dtype))
        return y


class MoE(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        w: dict[str, Weight],
        experts: Experts,
        exact: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.gate = w["gate"]
        self.bias = w.get("gate_bias")
        self.shared = (
            MLP(w["shared.w1"], w["shared.w2"], w["shared.w3"], exact)
            if cfg.n_shared_experts
            else None
        )
        self.experts = experts

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router (float32) and ``route`` for tokens (N, D): one numba call for a few rows
        on the CPU (torch's linear, softmax and topk took ~250 us a layer in a decode step)."""
        gate, bias = self.gate.float(), None if self.bias is None else self.bias.float()
        few = flat.shape[0] <= NUMBA_ROWS and flat.dtype == gate.dtype == torch.float32
        if few and flat.device.type == gate.device.type == "cpu":
            from localseek.quant.cpu import ops as cpu_ops  # numba: imported on first use

            cfg = self.cfg
            method = {"noaux_tc": cpu_ops.GROUP_TOP2, "greedy": cpu_ops.GREEDY}.get(
                cfg.topk_method, cpu_ops.GROUP_MAX
            )
            return cpu_ops.route(
                flat,
                gate,
                bias,
                cfg.scoring_func == "sigmoid",
                cfg.n_group,
                cfg.topk_group,
                method,
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
                variant(cfg.model_type).v2_weight_rule,
                cfg.routed_scaling_factor,
            )
        return route(F.linear(flat.float(), gate), bias, self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        topk_ids, topk_weights = self.route(flat)
        y = self.experts(self.layer, flat, topk_ids, topk_weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(shape)
