"""Next-token sampling: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from localseek.errors import LocalseekError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # not (t >= 0): NaN compares false both ways; inf would make every token equally likely
        if not (0.0 <= self.temperature < math.inf):
            raise LocalseekError(
                f"temperature must be a finite number >= 0, got {self.temperature}."
            )
        if self.top_k < 0:
            raise LocalseekError(f"top_k must be >= 0, got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise LocalseekError(f"top_p must be in (0, 1], got {self.top_p}.")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick a token id from float32 logits (vocab,)."""
        p = self.params
        if p.temperature == 0.0:
            return int(logits.argmax())
        logits = logits.float().cpu() / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token when the tokens before it already reach top_p; the first always stays
            drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
