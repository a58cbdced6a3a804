"""The latent KV cache of MLA: per token per layer only the compressed ``c_kv``
(kv_lora_rank numbers, after its RMSNorm) and the rotated shared key ``k_pe``
(qk_rope_head_dim numbers)."""

from __future__ import annotations

import numpy as np
import torch

from localseek.config import ModelConfig


class KVCache:
    """Preallocated latent cache for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ):
        L = cfg.num_hidden_layers
        self.max_len = max_len
        self.kv = torch.zeros(L, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(L, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """numpy views (max_len, kv_lora_rank), (max_len, rope_dim) of sequence 0's cache in
        ``layer``, made once (CPU caches only): what the CPU decode attention writes and reads."""
        got = self._arrays.get(layer)
        if got is None:
            got = self._arrays[layer] = (self.kv[layer, 0].numpy(), self.pe[layer, 0].numpy())
        return got

    def keep(self, n: int) -> int:
        """Forget the positions from ``n`` on (the next forward overwrites them); returns n."""
        return n

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cfg.num_hidden_layers * cfg.kv_cache_dim * itemsize

    def write(self, layer: int, start: int, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store kv (B, T, kv_lora_rank) and pe (B, T, rope_dim) at positions start..start+T-1."""
        T = kv.shape[1]
        self.kv[layer, :, start : start + T] = kv
        self.pe[layer, :, start : start + T] = pe

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [0, end): (B, end, kv_lora_rank), (B, end, rope_dim)."""
        return self.kv[layer, :, :end], self.pe[layer, :, :end]
