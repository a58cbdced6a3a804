"""DeepSeek-V4's official checkpoint layout (what DeepSeek ships and llama.cpp's converter
reads): its tensor names -> canonical names, and the canonical tensors with their shapes.

Canonical names keep DeepSeek's own words, as for V2/V3:

    embed, norm, head, hc_head.{fn, base, scale}
    layers.{i}.hc_attn.{fn, base, scale}, layers.{i}.hc_ffn.{...}   mHC mixing
    layers.{i}.attn_norm, layers.{i}.ffn_norm
    layers.{i}.attn.{wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, sink}
    layers.{i}.attn.compressor.{wkv, wgate, ape, norm}                CSA / HCA layers
    layers.{i}.attn.indexer.{wq_b, weights_proj}                      CSA layers
    layers.{i}.attn.indexer.compressor.{wkv, wgate, ape, norm}
    layers.{i}.ffn.gate, .gate_bias (top-k layers), .tid2eid (hash layers)
    layers.{i}.ffn.shared.{w1, w2, w3}, layers.{i}.ffn.experts.{e}.{w1, w2, w3}

FP8 linear weights and FP4 experts carry their scales as ``<name>.scale`` beside
``<name>.weight``; the MTP layers (``mtp.*``) are not mapped, so they are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from localseek.model.deepseek_v4.config import CSA, HCA, V4Config

_L = r"layers\.(\d+)\."
_ATTN = ("wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "wo_a", "wo_b")
_COMPRESSOR = ("wkv", "wgate", "norm")

OFFICIAL_NAME_TABLE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"embed\.weight", "embed"),
        (r"head\.weight", "head"),
        (r"norm\.weight", "norm"),
        *[(rf"hc_head_{k}", f"hc_head.{k}") for k in ("fn", "base", "scale")],
        *[
            (rf"{_L}hc_{site}_{k}", rf"layers.\1.hc_{site}.{k}")
            for site in ("attn", "ffn")
            for k in ("fn", "base", "scale")
        ],
        (rf"{_L}attn_norm\.weight", r"layers.\1.attn_norm"),
        (rf"{_L}ffn_norm\.weight", r"layers.\1.ffn_norm"),
        (rf"{_L}attn\.attn_sink", r"layers.\1.attn.sink"),
        *[(rf"{_L}attn\.{k}\.weight", rf"layers.\1.attn.{k}") for k in _ATTN],
        *[
            (rf"{_L}attn\.{sub}compressor\.{k}\.weight", rf"layers.\1.attn.{sub}compressor.{k}")
            for sub in ("", "indexer.")
            for k in _COMPRESSOR
        ],
        *[
            (rf"{_L}attn\.{sub}compressor\.ape", rf"layers.\1.attn.{sub}compressor.ape")
            for sub in ("", "indexer.")
        ],
        *[
            (rf"{_L}attn\.indexer\.{k}\.weight", rf"layers.\1.attn.indexer.{k}")
            for k in ("wq_b", "weights_proj")
        ],
        (rf"{_L}ffn\.gate\.weight", r"layers.\1.ffn.gate"),
        (rf"{_L}ffn\.gate\.bias", r"layers.\1.ffn.gate_bias"),
        (rf"{_L}ffn\.gate\.tid2eid", r"layers.\1.ffn.tid2eid"),
        *[
            (rf"{_L}ffn\.shared_experts\.{k}\.weight", rf"layers.\1.ffn.shared.{k}")
            for k in ("w1", "w2", "w3")
        ],
        *[
            (rf"{_L}ffn\.experts\.(\d+)\.{k}\.weight", rf"layers.\1.ffn.experts.\2.{k}")
            for k in ("w1", "w2", "w3")
        ],
    ]
]


def iter_v4_shapes(cfg: V4Config) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every canonical tensor V4 needs with its shape ((out, in) for matrices), layer by layer."""
    D, V, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    yield "embed", (V, D)
    yield "norm", (D,)
    if not cfg.tie_word_embeddings:
        yield "head", (V, D)
    yield "hc_head.fn", (hc, hc * D)
    yield "hc_head.base", (hc,)
    yield "hc_head.scale", (1,)
    H, Dh, G, R = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    I, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        mix = (2 + hc) * hc
        for site in ("hc_attn", "hc_ffn"):
            yield f"{p}{site}.fn", (mix, hc * D)
            yield f"{p}{site}.base", (mix,)
            yield f"{p}{site}.scale", (3,)
        yield p + "attn_norm", (D,)
        yield p + "ffn_norm", (D,)
        a = p + "attn."
        yield a + "wq_a", (cfg.q_lora_rank, D)
        yield a + "q_norm", (cfg.q_lora_rank,)
        yield a + "wq_b", (H * Dh, cfg.q_lora_rank)
        yield a + "wkv", (Dh, D)
        yield a + "kv_norm", (Dh,)
        yield a + "wo_a", (G * R, H * Dh // G)
        yield a + "wo_b", (D, G * R)
        yield a + "sink", (H,)
        kind = cfg.layer_types[i]
        if kind in (CSA, HCA):
            yield from _compressor(a + "compressor.", cfg.compress_rate(i), Dh, kind == CSA, D)
        if kind == CSA:
            Hi, Di = cfg.index_n_heads, cfg.index_head_dim
            yield a + "indexer.wq_b", (Hi * Di, cfg.q_lora_rank)
            yield a + "indexer.weights_proj", (Hi, D)
            yield from _compressor(a + "indexer.compressor.", cfg.compress_rate(i), Di, True, D)
        f = p + "ffn."
        yield f + "gate", (E, D)
        if cfg.is_hash_layer(i):
            yield f + "tid2eid", (V, cfg.num_experts_per_tok)
        else:
            yield f + "gate_bias", (E,)
        shared = cfg.n_shared_experts * I
        yield from _mlp(f + "shared.", D, shared)
        for e in range(E):
            yield from _mlp(f"{f}experts.{e}.", D, I)


def _compressor(p: str, rate: int, dim: int, overlap: bool, D: int):
    width = 2 * dim if overlap else dim
    yield p + "wkv", (width, D)
    yield p + "wgate", (width, D)
    yield p + "ape", (rate, width)
    yield p + "norm", (dim,)


def _mlp(p: str, D: int, inter: int):
    yield p + "w1", (inter, D)
    yield p + "w2", (D, inter)
    yield p + "w3", (inter, D)
