"""Expert-usage predictor: layer L+1's router applied to layer L's hidden state.

The residual stream changes little from one layer to the next, so the next layer's router on
the current hidden state names most of the experts the next layer will pick. Its top-k plus a
margin, nudged by how often each expert has been used so far in that layer, is kept from
eviction; of those on disk, the ones at ranks where such guesses have come true often enough so
far are prefetched (disk -> RAM) while layer L computes. A wrong prefetch is not free: it takes disk
time from the reads a forward waits for, and a RAM slot from an expert that may be needed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from localseek.config import ModelConfig


class NextLayerPredictor:
    """Predicts the experts of a MoE layer from the hidden state entering the layer before.

    Args:
        cfg: the model's config (scoring function, experts per token).
        routers: layer -> (gate (E, hidden), e_score_correction_bias (E,) or None).
        margin: experts predicted per token beyond num_experts_per_tok.
        prior_weight: weight of the per-layer usage frequency (0..1 after scaling) against
            the router's scores (scaled so each token's best is 1).
        min_precision: a one-token prediction is read from disk at rank r only while the
            experts named at rank r in that layer that were on disk have been used at least
            this often (counted from one hit in two tries, so every rank starts in).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        routers: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
        margin: int = 2,
        prior_weight: float = 0.1,
        min_precision: float = 0.4,
    ):
        self.cfg = cfg
        self.routers = {
            layer: (g.float(), None if b is None else b.float())
            for layer, (g, b) in routers.items()
        }
        self.k = min(cfg.num_experts_per_tok + margin, cfg.n_routed_experts)
        self.prior_weight = prior_weight
        self.min_precision = min_precision
        self.counts = {layer: np.zeros(cfg.n_routed_experts) for layer in routers}
        # one-token predictions per layer, experts not held: [named at rank r, then used]
        self.rank_counts = {layer: np.zeros((2, self.k)) for layer in routers}
        moe = sorted(routers)
        self.next_layer = {a: b for a, b in zip(moe, moe[1:], strict=False)}

    def observe(self, layer: int, topk_ids: np.ndarray) -> None:
        """Count the experts ``layer`` actually chose (the frequency prior)."""
        self.counts[layer] += np.bincount(topk_ids.reshape(-1), minlength=len(self.counts[layer]))

    def score(self, layer: int, absent: list[tuple[int, int]], used: list[int]) -> None:
        """Count which of a one-token prediction's (rank, expert) pairs that neither tier held
        came true: whether reading them would have paid."""
        c = self.rank_counts[layer]
        for rank, e in absent:
            c[0, rank] += 1
            c[1, rank] += e in used

    def worth_reading(self, layer: int, rank: int) -> bool:
        """Whether a one-token guess at ``rank`` of ``layer`` is worth a disk read: experts
        named there and not held have been used at least min_precision of the time."""
        tried, hit = self.rank_counts[layer][:, rank]
        return (hit + 1) / (tried + 2) >= self.min_precision

    @torch.inference_mode()
    def predict(self, layer: int, x: torch.Tensor) -> list[int]:
        """Experts ``layer`` is expected to use for hidden states x (N, hidden), best first."""
        gate, bias = self.routers[layer]
        logits = F.linear(x.float(), gate.to(x.device))  # (N, E)
        scores = logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        if bias is not None:
            scores = scores + bias.to(x.device)
        scores = scores / scores.amax(dim=-1, keepdim=True).clamp_min(1e-20)
        counts = self.counts[layer]
        if self.prior_weight and counts.max() > 0:
            prior = torch.from_numpy(counts / counts.max()).to(scores)
            scores = scores + self.prior_weight * prior
        top = scores.topk(self.k, dim=-1)  # (N, k)
        # best first over all tokens: by the best score any token gave the expert
        best: dict[int, float] = {}
        for e, s in zip(top.indices.flatten().tolist(), top.values.flatten().tolist(), strict=True):
            if s > best.get(e, -np.inf):
                best[e] = s
        return sorted(best, key=lambda e: -best[e])
