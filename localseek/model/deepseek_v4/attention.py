"""DeepSeek-V4 attention (paper section 2.3): multi-query attention over one shared key/value
head of ``head_dim`` numbers, in every layer over a sliding window of raw tokens, and per the
layer's type also over compressed entries:

- CSA (compressed sparse attention): every ``compress_rate`` (4) tokens become one entry, from
  overlapping windows of 2 x 4 tokens; a lightning indexer picks the ``index_topk`` entries
  each query attends to;
- HCA (heavily compressed attention): every 128 tokens become one entry, attended densely.

Queries come through a low-rank path (``wq_a``, its RMSNorm, ``wq_b``) and an unweighted
per-head RMSNorm; RoPE rotates the last ``qk_rope_head_dim`` numbers of each head. Since the
value is the rotated key, the output's rope part is rotated back by the query's angle. A
learned sink per head takes part in the softmax; the output goes through a grouped low-rank
projection (``wo_a`` per group of heads, then ``wo_b``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localseek.model.deepseek_v4.cache import CompressorState, LayerCache
from localseek.model.deepseek_v4.config import CSA, SLIDING, V4Config
from localseek.model.norm import RMSNorm
from localseek.model.rope import RotaryEmbedding
from localseek.quant import Weight, linear
from localseek.quant.linear import grouped_linear


def rotate_tail(x: torch.Tensor, rope: RotaryEmbedding, pos: torch.Tensor, dim: int, conj=False):
    """x (B, T, ..., D) with its last ``dim`` numbers rotated for positions ``pos`` (T,)."""
    return torch.cat([x[..., :-dim], rope.apply_at(x[..., -dim:], pos, conj)], dim=-1)


class Compressor(nn.Module):
    """Turns every block of ``rate`` tokens into one entry: a softmax-gated sum of the tokens'
    projected kv (gate logits plus a learned bias per slot, ``ape``), RMSNorm, RoPE at the
    block's first position. With ``overlap`` (CSA) each token projects twice, and entry w mixes
    block w's second half with block w-1's first half (2 x rate slots)."""

    def __init__(
        self,
        w: dict[str, Weight],
        rate: int,
        dim: int,
        overlap: bool,
        rope: RotaryEmbedding,
        rope_dim: int,
        eps: float,
        exact: bool,
    ):
        super().__init__()
        self.wkv, self.wgate = w["wkv"], w["wgate"]
        self.ape = w["ape"].float()  # (rate, width)
        self.norm = RMSNorm(w["norm"], eps)
        self.rate, self.dim, self.overlap = rate, dim, overlap
        self.rope, self.rope_dim, self.exact = rope, rope_dim, exact

    def forward(self, x: torch.Tensor, start: int, state: CompressorState) -> None:
        """Project x (B, T, D) at positions start.. and write the entries of the blocks it
        completes into ``state``; the rest waits there for the next tokens."""
        B, T, _ = x.shape
        r = self.rate
        pos = torch.arange(start, start + T, device=x.device)
        kv = linear(x, self.wkv, self.exact)  # (B, T, width)
        gate = linear(x, self.wgate, self.exact).float() + self.ape[pos % r]
        p = state.pending
        kv = torch.cat([state.pending_kv[:, :p], kv], dim=1)
        gate = torch.cat([state.pending_gate[:, :p], gate], dim=1)
        first = start - p  # a block boundary
        n = kv.shape[1] // r
        rest = kv.shape[1] - n * r
        state.pending_kv[:, :rest] = kv[:, n * r :]
        state.pending_gate[:, :rest] = gate[:, n * r :]
        state.pending = rest
        if n == 0:
            return
        ck = kv[:, : n * r].view(B, n, r, -1)  # (B, n, rate, width)
        cg = gate[:, : n * r].view(B, n, r, -1)
        if self.overlap:
            d = self.dim
            slots_kv = ck.new_zeros(B, n, 2 * r, d)
            slots_gate = cg.new_full((B, n, 2 * r, d), float("-inf"))
            slots_kv[:, :, r:], slots_gate[:, :, r:] = ck[..., d:], cg[..., d:]
            slots_kv[:, 1:, :r], slots_gate[:, 1:, :r] = ck[:, :-1, :, :d], cg[:, :-1, :, :d]
            if state.prior_kv is not None:
                slots_kv[:, 0, :r], slots_gate[:, 0, :r] = state.prior_kv, state.prior_gate
            state.prior_kv, state.prior_gate = ck[:, -1, :, :d].clone(), cg[:, -1, :, :d].clone()
        else:
            slots_kv, slots_gate = ck, cg
        mixed = (slots_kv * slots_gate.softmax(dim=2).to(kv.dtype)).sum(dim=2)  # (B, n, dim)
        entries = self.norm(mixed)
        entry_pos = first + torch.arange(n, device=x.device) * r
        entries = rotate_tail(entries, self.rope, entry_pos, self.rope_dim)
        state.entries[:, state.count : state.count + n] = entries
        state.count += n


class Indexer(nn.Module):
    """The lightning indexer: its own compressor (``index_head_dim``), ``index_n_heads``
    query heads from the query's low-rank latent, and per entry the score
    sum_h w_h(x) * relu(q_h . k) / sqrt(index_head_dim); each query keeps the top
    ``index_topk`` entries of those complete before it."""

    def __init__(self, cfg: V4Config, w: dict[str, Weight], rope: RotaryEmbedding, exact: bool):
        super().__init__()
        sub = {k[len("compressor.") :]: v for k, v in w.items() if k.startswith("compressor.")}
        self.rate = cfg.compress_rates[CSA]
        self.compressor = Compressor(
            sub,
            self.rate,
            cfg.index_head_dim,
            True,
            rope,
            cfg.qk_rope_head_dim,
            cfg.rms_norm_eps,
            exact,
        )
        self.wq_b, self.weights_proj = w["wq_b"], w["weights_proj"]
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.topk = cfg.index_topk
        self.rope, self.rope_dim, self.exact = rope, cfg.qk_rope_head_dim, exact

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, start: int, state: CompressorState
    ) -> torch.Tensor:
        """Indices (B, T, k) of the entries each query attends to, -1 where it has fewer."""
        B, T, _ = x.shape
        self.compressor(x, start, state)
        keys = state.entries[:, : state.count]  # (B, N, index_head_dim)
        pos = torch.arange(start, start + T, device=x.device)
        q = linear(q_latent, self.wq_b, self.exact).view(B, T, self.n_heads, self.head_dim)
        q = rotate_tail(q, self.rope, pos, self.rope_dim)
        scores = torch.matmul(q.float(), keys.float().transpose(1, 2).unsqueeze(1))  # (B,T,H,N)
        scores = F.relu(scores) * self.head_dim**-0.5
        weights = linear(x, self.weights_proj, self.exact).float() * self.n_heads**-0.5
        index = (scores * weights.unsqueeze(-1)).sum(dim=2)  # (B, T, N)
        N = keys.shape[1]
        complete = (pos + 1) // self.rate  # entries whose tokens all precede each query
        future = torch.arange(N, device=x.device)[None, :] >= complete[:, None]  # (T, N)
        index = index.masked_fill(future, float("-inf"))
        top = index.topk(min(self.topk, N), dim=-1).indices
        return torch.where(top >= complete[:, None], -1, top)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: V4Config,
        layer: int,
        w: dict[str, Weight],
        rope: RotaryEmbedding,
        exact: bool = True,
    ):
        """rope: the plain one for sliding layers, the compressed branches' one otherwise."""
        super().__init__()
        self.kind = cfg.layer_types[layer]
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.rope_dim, self.window = cfg.qk_rope_head_dim, cfg.sliding_window
        self.o_groups, self.eps, self.exact = cfg.o_groups, cfg.rms_norm_eps, exact
        self.rope = rope
        self.wq_a, self.q_norm, self.wq_b = w["wq_a"], RMSNorm(w["q_norm"], self.eps), w["wq_b"]
        self.wkv, self.kv_norm = w["wkv"], RMSNorm(w["kv_norm"], self.eps)
        self.wo_a, self.wo_b = w["wo_a"], w["wo_b"]
        self.sink = w["sink"].float()  # (H,)
        self.rate = cfg.compress_rate(layer)
        self.compressor = self.indexer = None
        if self.kind != SLIDING:
            sub = {k[11:]: v for k, v in w.items() if k.startswith("compressor.")}
            self.compressor = Compressor(
                sub,
                self.rate,
                cfg.head_dim,
                self.kind == CSA,
                rope,
                self.rope_dim,
                self.eps,
                exact,
            )
        if self.kind == CSA:
            sub = {k[8:]: v for k, v in w.items() if k.startswith("indexer.")}
            self.indexer = Indexer(cfg, sub, rope, exact)

    def forward(self, x: torch.Tensor, start: int, cache: LayerCache) -> torch.Tensor:
        B, T, _ = x.shape
        H, Dh, r = self.n_heads, self.head_dim, self.rope_dim
        pos = torch.arange(start, start + T, device=x.device)
        q_latent = self.q_norm(linear(x, self.wq_a, self.exact))  # (B, T, q_lora_rank)
        q = linear(q_latent, self.wq_b, self.exact).view(B, T, H, Dh)
        q = F.rms_norm(q.float(), (Dh,), eps=self.eps).to(x.dtype)  # per head, unweighted
        q = rotate_tail(q, self.rope, pos, r)
        kv = rotate_tail(self.kv_norm(linear(x, self.wkv, self.exact)), self.rope, pos, r)

        keys, bias = self._window(kv, start, cache)  # (B, S, Dh), (T, S)
        bias = bias.expand(B, T, -1)
        if self.compressor is not None:
            entries, entry_bias = self._compressed(x, q_latent, start, cache)
            keys = torch.cat([keys, entries], dim=1)
            bias = torch.cat([bias, entry_bias], dim=-1)

        scores = torch.einsum("bthd,bsd->bhts", q, keys) * Dh**-0.5 + bias[:, None]
        sink = self.sink.view(1, H, 1, 1).expand(B, H, T, 1).to(scores.dtype)
        logits = torch.cat([scores, sink], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = logits.softmax(dim=-1)[..., :-1]
        out = torch.einsum("bhts,bsd->bthd", probs, keys)  # (B, T, H, Dh)
        out = rotate_tail(out, self.rope, pos, r, conj=True)  # undo the value's rotation
        grouped = out.reshape(B, T, self.o_groups, -1)  # (B, T, G, H * Dh / G)
        low = grouped_linear(grouped, self.wo_a, self.exact).flatten(2)  # (B, T, G * R)
        return linear(low, self.wo_b, self.exact)

    def _window(
        self, kv: torch.Tensor, start: int, cache: LayerCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys of the window (the ring's last positions, then the new ones) and the
        additive mask: query q sees key p for q - window < p <= q."""
        W, T = self.window, kv.shape[1]
        held = min(start, W - 1)
        old = torch.arange(start - held, start, device=kv.device)
        keys = torch.cat([cache.window[:, old % W], kv], dim=1)
        key_pos = torch.arange(start - held, start + T, device=kv.device)
        pos = key_pos[held:]
        seen = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - W)
        keep = min(W, keys.shape[1])  # the ring keeps the last W keys
        cache.window[:, key_pos[-keep:] % W] = keys[:, -keep:]
        return keys, torch.zeros(seen.shape, dtype=kv.dtype, device=kv.device).masked_fill(
            ~seen, float("-inf")
        )

    def _compressed(
        self, x: torch.Tensor, q_latent: torch.Tensor, start: int, cache: LayerCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed entries so far (B, N, Dh) and their mask (B, T, N): entries complete
        before the query, and in CSA only those the indexer picked."""
        B, T, _ = x.shape
        state = cache.compressor
        self.compressor(x, start, state)
        entries = state.entries[:, : state.count]
        N = entries.shape[1]
        pos = torch.arange(start, start + T, device=x.device)
        if self.indexer is None:
            seen = torch.arange(N, device=x.device)[None, :] < ((pos + 1) // self.rate)[:, None]
            seen = seen.expand(B, T, N)
        else:
            top = self.indexer(x, q_latent, start, cache.indexer)  # (B, T, k)
            seen = torch.zeros(B, T, N + 1, dtype=torch.bool, device=x.device)
            seen.scatter_(-1, torch.where(top < 0, N, top), True)
            seen = seen[..., :N]
        bias = torch.zeros(seen.shape, dtype=x.dtype, device=x.device)
        return entries, bias.masked_fill(~seen, float("-inf"))
