"""Rotary position embedding with YaRN, applied as DeepSeek does: on the ``qk_rope_head_dim``
part only, rotating interleaved pairs (x[2i], x[2i+1])."""

from __future__ import annotations

import math

import torch

from localseek.config import ModelConfig, YarnScaling


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rope_dim/2,) in float32 and the factor applied to cos/sin."""
    return yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)


def yarn_inv_freq(dim: int, base: float, ys: YarnScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) of a rope over ``dim`` numbers with base ``base``, YaRN
    applied when ``ys`` is given, and the factor applied to cos/sin."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    pos_freqs = base**exponents
    inv_freq = 1.0 / pos_freqs
    if ys is None:
        return inv_freq, 1.0
    # YaRN: interpolate low frequencies by `factor`, keep high ones, ramp linearly between.
    low = math.floor(_correction_dim(ys.beta_fast, dim, base, ys.original_max_position_embeddings))
    high = math.ceil(_correction_dim(ys.beta_slow, dim, base, ys.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / ys.factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, ys.rope_attention_factor


class RotaryEmbedding:
    """The rotations for positions [0, max_len), built once as unit complex numbers (times
    YaRN's attention factor): rotating the pair (x[2i], x[2i+1]) is one complex product."""

    def __init__(
        self,
        cfg: ModelConfig | None,
        max_len: int,
        device: torch.device,
        freqs: tuple[torch.Tensor, float] | None = None,
    ):
        """freqs: (inv_freq, attention factor) of a rope other than ``cfg``'s (V4's two)."""
        inv_freq, attention_factor = rope_inv_freq(cfg) if freqs is None else freqs
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (max_len, rope_dim/2)
        cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
        self.rot = torch.complex(cos, sin).to(device)  # (max_len, rope_dim/2)
        # the same as float32 (cos, sin) pairs in numpy, for the CPU kernels (decode attention)
        self.pairs = torch.view_as_real(self.rot).numpy() if self.rot.device.type == "cpu" else None

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate x (B, T, ..., rope_dim) for positions start .. start+T-1, in x's dtype:
        (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), as one complex product (a dozen small
        tensor ops per call before, a visible share of a decode step)."""
        T = x.shape[1]
        rot = self.rot[start : start + T].view((1, T) + (1,) * (x.dim() - 3) + (-1,))
        xf = x.float().unflatten(-1, (-1, 2))  # (..., rope_dim/2, 2)
        if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
            xf = xf.contiguous()  # view_as_complex wants pairs side by side
        out = torch.view_as_real(torch.view_as_complex(xf) * rot)
        return out.flatten(-2).to(x.dtype)

    def apply_at(
        self, x: torch.Tensor, positions: torch.Tensor, conjugate: bool = False
    ) -> torch.Tensor:
        """Rotate x (B, T, ..., rope_dim) for the T positions ``positions`` (T,), in x's dtype;
        ``conjugate`` rotates by minus those angles (undoing a rotation)."""
        T = x.shape[1]
        rot = self.rot[positions]
        if conjugate:
            rot = rot.conj()
        rot = rot.view((1, T) + (1,) * (x.dim() - 3) + (-1,))
        xf = x.float().unflatten(-1, (-1, 2)).contiguous()  # (..., rope_dim/2, 2)
        out = torch.view_as_real(torch.view_as_complex(xf) * rot)
        return out.flatten(-2).to(x.dtype)
