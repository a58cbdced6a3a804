"""Multi-head Latent Attention (DeepSeek-V2 paper, section 2.1).

Keys and values are rebuilt from a compressed latent c_kv; the cache stores only c_kv and the
rotated shared key k_pe. Two equivalent ways to attend:

- naive (prefill): expand c_kv through W_UK/W_UV (``wkv_b``) into per-head keys and values;
- absorbed (decode): fold W_UK into the query and apply W_UV after attention, so attention runs
  directly over the latent cache and nothing per-head is materialised for past tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localseek.config import ModelConfig
from localseek.model.kv_cache import KVCache
from localseek.model.norm import RMSNorm
from localseek.model.rope import RotaryEmbedding
from localseek.quant import Weight, dense, linear
from localseek.quant.linear import from_blocks, grouped_linear


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, w: dict[str, Weight], exact: bool = True):
        super().__init__()
        self.layer = layer
        self.exact = exact  # float32 activations into quantized projections (else int8)
        self.n_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.wq = w["wq"]
        else:
            self.wq_a = w["wq_a"]
            self.q_norm = RMSNorm(w["q_norm"], cfg.rms_norm_eps)
            self.wq_b = w["wq_b"]
        self.q_lora = cfg.q_lora_rank is not None
        self.wkv_a = w["wkv_a"]
        self.kv_norm = RMSNorm(w["kv_norm"], cfg.rms_norm_eps)
        self.wkv_b = w["wkv_b"]
        # wkv_b split per head as stored (llama.cpp MLA files): where the kernels multiply them
        # from their blocks, the absorbed decode reads those instead of dense float W_UK / W_UV
        split = (w.get("wk_b"), w.get("wv_b"))
        self.wk_b, self.wv_b = split if all(map(from_blocks, split)) else (None, None)
        self.wo = w["wo"]
        self._absorb: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fused: bool | None = (
            None  # one-call decode attention (quant.cpu.attention), found on use
        )

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, nope, C) and W_UV transposed (H, C, v), dense and contiguous, made once:
        slices of the stacked wkv_b made matmul copy them on every decode step."""
        if self._absorb is None or self._absorb[0].dtype != dtype:
            w = dense(self.wkv_b, dtype).view(  # (H, nope + v, C)
                self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank
            )
            w_uk = w[:, : self.nope_dim].contiguous()
            w_uv_t = w[:, self.nope_dim :].transpose(1, 2).contiguous()
            self._absorb = (w_uk, w_uv_t)
        return self._absorb

    def forward(
        self,
        x: torch.Tensor,
        start: int,
        cache: KVCache,
        rope: RotaryEmbedding,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Attend x (B, T, D) at positions start..start+T-1 over the cache; returns (B, T, D).

        absorb: use the absorbed path; default: absorbed for one token, naive otherwise.
        """
        B, T, _ = x.shape
        H = self.n_heads
        ex = self.exact
        q = (
            linear(self.q_norm(linear(x, self.wq_a, ex)), self.wq_b, ex)
            if self.q_lora
            else linear(x, self.wq, ex)
        )
        fuse = T == 1 and B == 1 and absorb is not False and rope.pairs is not None
        if fuse and self._fuses(x, cache):
            from localseek.quant.cpu.attention import mla_decode

            kv = linear(x, self.wkv_a, ex).view(-1)
            c_cache, pe_cache = cache.arrays(self.layer)
            out = mla_decode(
                q.view(H, -1),
                kv,
                self.kv_norm.weight,
                self.kv_norm.eps,
                rope.pairs[start],
                c_cache,
                pe_cache,
                start,
                self.wk_b,
                self.wv_b,
                self.softmax_scale,
                ex,
            )
            return linear(out.view(B, T, H * self.v_dim), self.wo, ex)
        q = q.view(B, T, H, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = rope.apply(q_pe, start)  # (B, T, H, rope)

        kv = linear(x, self.wkv_a, ex)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        cache.write(self.layer, start, self.kv_norm(c_kv), rope.apply(k_pe, start))
        end = start + T
        c_all, pe_all = cache.read(self.layer, end)  # (B, S, C), (B, S, R)

        if absorb if absorb is not None else T == 1:
            out = self._absorbed(q_nope, q_pe, c_all, pe_all, start)
        else:
            out = self._naive(q_nope, q_pe, c_all, pe_all, start)
        return linear(out.reshape(B, T, H * self.v_dim), self.wo, ex)

    def _fuses(self, x: torch.Tensor, cache: KVCache) -> bool:
        """Whether a decode step runs as one ``quant.cpu.attention.mla_decode`` call: per-head
        weights the CPU kernels stream, float32 activations, norm weight and cache on the CPU."""
        f32 = torch.float32
        if self._fused is None:
            ok = self.wk_b is not None and self.kv_norm.weight.dtype == f32
            if ok:
                from localseek.quant.cpu.attention import supported

                ok = supported(self.wk_b, self.wv_b, self.nope_dim, self.kv_lora_rank)
            self._fused = ok
        return (
            self._fused
            and x.dtype == f32
            and x.device.type == "cpu"
            and cache.kv.dtype == f32
            and cache.kv.device.type == "cpu"
        )

    def _causal_mask(self, T: int, S: int, start: int, device: torch.device) -> torch.Tensor:
        # query i (position start+i) sees keys 0 .. start+i
        q_pos = torch.arange(start, start + T, device=device)[:, None]
        return torch.arange(S, device=device)[None, :] <= q_pos  # (T, S)

    def _naive(self, q_nope, q_pe, c_all, pe_all, start):
        B, T, H, _ = q_nope.shape
        S = c_all.shape[1]
        kv = linear(c_all, self.wkv_b, self.exact).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, pe_all[:, :, None, :].expand(B, S, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        mask = None if start == 0 else self._causal_mask(T, S, start, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),  # (B, H, T|S, d)
            attn_mask=mask,
            is_causal=start == 0 and T > 1,
            scale=self.softmax_scale,
        )
        return out.transpose(1, 2)  # (B, T, H, v)

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, H, nope) through W_UK: (B, H, T, C)."""
        if self.wk_b is not None:
            return grouped_linear(q_nope, self.wk_b, self.exact).transpose(1, 2)
        w_uk, _ = self.absorbed_weights(q_nope.dtype)
        # batched matmuls rather than einsum: at one token, einsum's dispatch was ~5% of decode
        return q_nope.transpose(1, 2) @ w_uk

    def _absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat (B, H, T, C) through W_UV: (B, T, H, v)."""
        if self.wv_b is not None:
            return grouped_linear(o_lat.transpose(1, 2), self.wv_b, self.exact)
        _, w_uv_t = self.absorbed_weights(o_lat.dtype)
        return (o_lat @ w_uv_t).transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, c_all, pe_all, start):
        B, T, H, _ = q_nope.shape
        S = c_all.shape[1]
        # heads and query positions flattened into one batch of rows against the one latent
        # cache per sequence: a matmul that broadcast the cache over the heads copied it per head
        q_lat = self._absorb_query(q_nope).reshape(B, H * T, self.kv_lora_rank)
        q_rot = q_pe.transpose(1, 2).reshape(B, H * T, self.rope_dim)
        scores = torch.bmm(q_lat, c_all.transpose(1, 2))  # (B, H * T, S)
        scores = scores.baddbmm_(q_rot, pe_all.transpose(1, 2))
        scores = scores.float() * self.softmax_scale
        if T > 1:
            mask = self._causal_mask(T, S, start, scores.device)
            scores = scores.view(B, H, T, S).masked_fill(~mask, float("-inf")).view(B, H * T, S)
        probs = scores.softmax(dim=-1).to(c_all.dtype)
        o_lat = torch.bmm(probs, c_all).view(B, H, T, self.kv_lora_rank)
        return self._absorb_output(o_lat)  # (B, T, H, v)
