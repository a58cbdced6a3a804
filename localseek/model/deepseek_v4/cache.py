"""V4's caches, per layer: a ring of the last ``sliding_window`` raw keys (= values), and in
CSA / HCA layers the compressed entries with the compressor's state for the block that is not
complete yet; CSA layers also keep the lightning indexer's compressed keys and its state.

Nothing here grows with the context but the compressed entries (one per ``compress_rate``
tokens), which is V4's point: at 128 tokens of window and rates 4 / 128, a token costs a
sliding layer nothing beyond the ring.
"""

from __future__ import annotations

import torch

from localseek.errors import LocalseekError
from localseek.model.deepseek_v4.config import CSA, SLIDING, V4Config


class CompressorState:
    """One compressor's stream: compressed entries so far, the projected ``kv`` / ``gate`` of
    the tokens of the block not complete yet, and (overlapping CSA windows) the first half of
    the last complete block's kv / gate, which the next entry mixes in."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        rate: int,
        dim: int,
        overlap: bool,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.rate = rate
        width = 2 * dim if overlap else dim
        self.entries = torch.zeros(batch, max_len // rate, dim, device=device, dtype=dtype)
        self.count = 0  # entries written
        self.pending_kv = torch.zeros(batch, rate, width, device=device, dtype=dtype)
        self.pending_gate = torch.zeros(batch, rate, width, device=device, dtype=torch.float32)
        self.pending = 0  # tokens of the incomplete block held
        self.prior_kv: torch.Tensor | None = None  # (B, rate, dim) Ca of the last block
        self.prior_gate: torch.Tensor | None = None

    def reset(self) -> None:
        self.count = self.pending = 0
        self.prior_kv = self.prior_gate = None


class LayerCache:
    def __init__(self, cfg: V4Config, layer: int, batch: int, max_len: int, device, dtype):
        W = cfg.sliding_window
        self.window = torch.zeros(batch, W, cfg.head_dim, device=device, dtype=dtype)
        rate = cfg.compress_rate(layer)
        kind = cfg.layer_types[layer]
        self.compressor = (
            None
            if kind == SLIDING
            else CompressorState(batch, max_len, rate, cfg.head_dim, kind == CSA, device, dtype)
        )
        self.indexer = (
            CompressorState(batch, max_len, rate, cfg.index_head_dim, True, device, dtype)
            if kind == CSA
            else None
        )

    def reset(self) -> None:
        for state in (self.compressor, self.indexer):
            if state is not None:
                state.reset()


class V4Cache:
    """All layers' caches for ``batch`` sequences of up to ``max_len`` tokens.

    Unlike MLA's cache it cannot forget its last positions (a compressed entry mixes tokens
    that would stay and go): ``keep(n)`` keeps all of it or nothing.
    """

    def __init__(
        self, cfg: V4Config, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ):
        self.cfg = cfg
        self.max_len = max_len
        self.length = 0  # tokens the caches hold
        self.layers = [
            LayerCache(cfg, i, batch, max_len, device, dtype) for i in range(cfg.num_hidden_layers)
        ]

    def keep(self, n: int) -> int:
        """Forget all but the first ``n`` tokens where possible; returns how many are kept."""
        if n >= self.length:
            return self.length
        self.length = 0
        for layer in self.layers:
            layer.reset()
        return 0

    def check_start(self, start: int, T: int) -> None:
        if start != self.length:
            raise LocalseekError(
                f"a V4 cache holding {self.length} tokens cannot take tokens at position {start}."
            )
        if start + T > self.max_len:
            raise LocalseekError(
                f"{start + T} tokens do not fit a cache of {self.max_len} (raise --ctx)."
            )

    @staticmethod
    def bytes_per_token(cfg: V4Config, dtype: torch.dtype) -> int:
        """Bytes the compressed entries add per token (the rings are a fixed size)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = 0.0
        for i, kind in enumerate(cfg.layer_types):
            if kind != SLIDING:
                dim = cfg.head_dim + (cfg.index_head_dim if kind == CSA else 0)
                total += dim / cfg.compress_rate(i)
        return int(total * itemsize) + 1
