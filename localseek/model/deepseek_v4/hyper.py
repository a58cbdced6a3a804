"""Manifold-constrained hyper-connections (mHC, paper section 2.2): the residual is
``hc_mult`` streams. Before a sub-layer (attention or MoE) a small projection of the normed
streams gives ``pre`` (how to collapse the streams into the sub-layer's input), ``post`` (how
to spread its output over the streams) and ``comb`` (how the streams mix), ``comb`` projected
close to a doubly stochastic matrix by Sinkhorn iterations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    def __init__(
        self,
        fn: torch.Tensor,
        base: torch.Tensor,
        scale: torch.Tensor,
        hc: int,
        sinkhorn_iters: int,
        hc_eps: float,
        norm_eps: float,
    ):
        super().__init__()
        self.fn, self.base, self.scale = fn.float(), base.float(), scale.float()
        self.hc, self.iters, self.hc_eps, self.norm_eps = hc, sinkhorn_iters, hc_eps, norm_eps

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams (B, T, hc, D) -> post (B, T, hc), comb (B, T, hc, hc), collapsed (B, T, D)."""
        B, T, hc, _ = streams.shape
        mixes = F.linear(_unit_rms(streams.reshape(B, T, -1).float(), self.norm_eps), self.fn)
        pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = comb_w.view(B, T, hc, hc) * self.scale[2] + comb_b.view(hc, hc)
        comb = comb.softmax(dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):  # Sinkhorn: rows, then columns, sum to 1
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(
        streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """The streams after a sub-layer: post_k * out + sum_j comb[j, k] * streams_j."""
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)  # (B, T, hc, D)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


class HyperHead(nn.Module):
    """The last collapse of the streams, before the final norm."""

    def __init__(
        self, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, eps: float, norm_eps: float
    ):
        super().__init__()
        self.fn, self.base, self.scale = fn.float(), base.float(), scale.float()
        self.eps, self.norm_eps = eps, norm_eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        B, T = streams.shape[:2]
        mixes = F.linear(_unit_rms(streams.reshape(B, T, -1).float(), self.norm_eps), self.fn)
        pre = torch.sigmoid(mixes * self.scale + self.base) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
