"""Run statistics of the tiered expert store: where each expert use was served from, bytes
moved, time stalled, and how well the predictor guessed."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from localseek.offload.plan import ExpertUsage


@dataclass
class OffloadStats:
    """Counters since load; subtract two snapshots for one generation's figures.

    A lookup is one (layer, expert) a forward needs: served by the GPU cache, by RAM, or read
    from disk (on demand, or by a prefetch that was still in flight).
    """

    tokens: int = 0
    lookups: int = 0
    gpu_hits: int = 0
    ram_hits: int = 0
    disk_loads: int = 0
    disk_bytes: int = 0
    prefetch_loads: int = 0
    prefetch_bytes: int = 0
    prefetch_used: int = 0  # prefetched experts later used (before being evicted)
    prefetch_late: int = 0  # uses whose prefetch was still being read (waited for: a stall)
    prefetch_cancelled: int = 0  # queued prefetches dropped: their layer chose other experts
    promotions: int = 0  # misses copied into the GPU cache (prefetches included)
    gpu_prefetches: int = 0  # predicted experts copied RAM -> GPU ahead of need
    stall_seconds: float = 0.0
    # predictor, per layer: [experts used that were predicted, experts used, experts predicted]
    predictor: dict[int, list[int]] = field(default_factory=dict)

    def _combine(self, other: OffloadStats, sign: int) -> OffloadStats:
        out = copy.deepcopy(self)
        for f in fields(self):
            if f.name == "predictor":
                for layer, v in other.predictor.items():
                    mine = out.predictor.setdefault(layer, [0, 0, 0])
                    for i in range(3):
                        mine[i] += sign * v[i]
            else:
                setattr(out, f.name, getattr(self, f.name) + sign * getattr(other, f.name))
        return out

    def __add__(self, other: OffloadStats) -> OffloadStats:
        return self._combine(other, 1)

    def __sub__(self, other: OffloadStats) -> OffloadStats:
        return self._combine(other, -1)

    def snapshot(self) -> OffloadStats:
        return copy.deepcopy(self)

    @property
    def expert_cache_hit_rate(self) -> float | None:
        """Share of expert uses served by the GPU expert cache."""
        return self.gpu_hits / self.lookups if self.lookups else None

    @property
    def ram_hit_rate(self) -> float | None:
        """Share of the uses the GPU cache missed that RAM served without a disk read."""
        misses = self.lookups - self.gpu_hits
        return self.ram_hits / misses if misses else None

    @property
    def disk_bytes_per_token(self) -> float:
        return self.disk_bytes / self.tokens if self.tokens else 0.0

    @property
    def prefetch_precision(self) -> float | None:
        """Share of the experts read ahead that were used before being evicted."""
        return self.prefetch_used / self.prefetch_loads if self.prefetch_loads else None

    def recall(self, layer: int | None = None) -> float | None:
        """Share of the experts used that the predictor named (one layer, or all)."""
        hit, used, _ = self._pred(layer)
        return hit / used if used else None

    def precision(self, layer: int | None = None) -> float | None:
        """Share of the experts the predictor named that were used."""
        hit, _, named = self._pred(layer)
        return hit / named if named else None

    def _pred(self, layer: int | None) -> list[int]:
        if layer is not None:
            return self.predictor.get(layer, [0, 0, 0])
        return [sum(v[i] for v in self.predictor.values()) for i in range(3)]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "predictor"}
        d.update(
            expert_cache_hit_rate=self.expert_cache_hit_rate,
            ram_hit_rate=self.ram_hit_rate,
            disk_bytes_per_token=self.disk_bytes_per_token,
            predictor_recall=self.recall(),
            predictor_precision=self.precision(),
            prefetch_precision=self.prefetch_precision,
            predictor_per_layer={
                str(k): {"recall": self.recall(k), "precision": self.precision(k)}
                for k in sorted(self.predictor)
            },
        )
        return d

    def summary(self) -> str:
        """One line: GPU cache hits, RAM hits, disk bytes per token, stall, recall."""
        parts = []
        if self.expert_cache_hit_rate is not None:
            parts.append(f"GPU expert cache hits {self.expert_cache_hit_rate:.0%}")
        if self.ram_hit_rate is not None:
            parts.append(f"RAM hits {self.ram_hit_rate:.0%}")
        parts.append(f"disk {self.disk_bytes_per_token / 2**20:.2f} MiB/token")
        parts.append(f"prefetched {self.prefetch_bytes / 2**20:.1f} MiB")
        parts.append(f"stalled {self.stall_seconds:.2f} s")
        if self.recall() is not None:
            parts.append(f"predictor recall {self.recall():.0%}")
        return ", ".join(parts)


@contextmanager
def record_usage(model: Any, usage: ExpertUsage) -> Iterator[ExpertUsage]:
    """While inside, count every routed expert ``model``'s MoE layers choose into ``usage``."""
    from localseek.model.moe import MoE

    cfg = model.config
    first = cfg.moe_layers[0] if cfg.moe_layers else None
    moes = [b.ffn for b in model.net.layers if isinstance(b.ffn, MoE)]
    inner = [m.experts for m in moes]

    def counting(experts: Any) -> Any:
        def call(layer: int, x: Any, topk_ids: Any, topk_weights: Any) -> Any:
            ids = topk_ids.detach().cpu().numpy()
            usage.add(layer, ids, cfg.n_routed_experts)
            if layer == first:
                usage.tokens += ids.shape[0]
            return experts(layer, x, topk_ids, topk_weights)

        return call

    for m in moes:
        m.experts = counting(m.experts)
    try:
        yield usage
    finally:
        for m, experts in zip(moes, inner, strict=True):
            m.experts = experts
