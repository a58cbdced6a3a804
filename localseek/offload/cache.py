"""Cache policies of a tier's expert slots: which slot to give up, and whether a miss is
promoted into the cache. One policy object per (layer, tier) slot pool."""

from __future__ import annotations

import numpy as np

POLICIES = ("lru", "lfu", "static")


class CachePolicy:
    """Least recently used: evict the slot touched longest ago; every miss is admitted."""

    admits_misses = True

    def __init__(self, slots: int):
        self.tick = 0
        self.last = np.zeros(slots, dtype=np.int64)

    def touch(self, slot: int) -> None:
        self.tick += 1
        self.last[slot] = self.tick

    def victim(self, candidates: list[int]) -> int | None:
        return min(candidates, key=lambda s: self.last[s]) if candidates else None


class LFUDecay(CachePolicy):
    """Least frequently used with exponential decay per access of the pool, so experts that
    were hot long ago fade (``decay`` 0.98: a use counts half after ~34 later accesses)."""

    def __init__(self, slots: int, decay: float = 0.98):
        super().__init__(slots)
        self.decay = decay
        self.score = np.zeros(slots, dtype=np.float64)

    def _now(self, slot: int) -> float:
        return float(self.score[slot] * self.decay ** (self.tick - self.last[slot]))

    def touch(self, slot: int) -> None:
        self.tick += 1
        self.score[slot] = self._now(slot) + 1.0
        self.last[slot] = self.tick

    def reset(self, slot: int) -> None:
        """A new expert moved into ``slot``: its count starts from zero."""
        self.score[slot] = 0.0
        self.last[slot] = self.tick

    def victim(self, candidates: list[int]) -> int | None:
        return min(candidates, key=self._now) if candidates else None


class StaticHotSet(CachePolicy):
    """The slots keep the experts they were filled with (the profiled hot set): nothing is
    evicted and no miss is promoted."""

    admits_misses = False

    def victim(self, candidates: list[int]) -> int | None:
        return None


def make_policy(name: str, slots: int) -> CachePolicy:
    """The policy called ``name`` (lru, lfu, static) for a pool of ``slots``."""
    if name == "lru":
        return CachePolicy(slots)
    if name == "lfu":
        return LFUDecay(slots)
    if name == "static":
        return StaticHotSet(slots)
    raise ValueError(f"unknown cache policy {name!r}")
