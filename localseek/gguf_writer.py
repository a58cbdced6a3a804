"""Write any localseek Checkpoint as a llama.cpp ``deepseek2`` GGUF file.

The layout is what current ``convert_hf_to_gguf.py`` writes and llama.cpp's deepseek2 loader
reads: stacked routed experts (``ffn_{gate,up,down}_exps``), ``wkv_b`` split per head into
``attn_k_b`` / ``attn_v_b`` with ``attention.key_length_mla`` / ``value_length_mla`` (or, with
``mla=False``, the legacy unsplit ``attn_kv_b``), ``expert_gating_func`` always written, and the
tokenizer as ``tokenizer.ggml.*`` (gpt2 BPE, pre-tokenizer "deepseek-v3").

The output appears atomically: shards are written into a temporary folder beside ``dst`` and
moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    TokenType,
)
from gguf.quants import quantize

from localseek.checkpoint.base import Checkpoint, expected_shapes
from localseek.checkpoint.gguf_names import (
    ARCH,
    ATTN_K_B,
    ATTN_V_B,
    CANONICAL_TO_GGUF,
    EXPERT_STACK_OF,
    GATING_SIGMOID,
    GATING_SOFTMAX,
    canonical_expert,
)
from localseek.config import ModelConfig
from localseek.errors import LocalseekError
from localseek.quant import dense
from localseek.tokenizer import Tokenizer

QTYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}
_KEEP_F32 = ("ffn_gate_inp.weight", "exp_probs_b.bias")  # router: tiny and precision-critical


def write_gguf(
    checkpoint: Checkpoint,
    dst: str | Path,
    qtype: str = "f32",
    mla: bool = True,
    split_max_tensors: int = 0,
) -> list[Path]:
    """Write ``checkpoint`` as a llama.cpp deepseek2 GGUF.

    Args:
        checkpoint: any localseek checkpoint (its tensors are read dequantized to float32).
        dst: output path ending in ``.gguf``; with splitting, the shards are named
            ``NAME-00001-of-0000N.gguf`` beside it.
        qtype: "f32", "f16", "bf16" or "q8_0" for matrices (norms and the router stay F32;
            rows that do not fill whole Q8_0 blocks fall back to F16).
        mla: write ``attn_k_b``/``attn_v_b`` (current llama.cpp layout); False writes ``attn_kv_b``.
        split_max_tensors: at most this many tensors per shard (0: one file).
    Returns:
        The paths written.
    """
    if qtype not in QTYPES:
        raise LocalseekError(f"GGUF type '{qtype}' is not supported (one of {', '.join(QTYPES)}).")
    dst = Path(dst)
    cfg = checkpoint.config
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        writer = GGUFWriter(tmp_dir / dst.name, ARCH, split_max_tensors=split_max_tensors)
        _write_config(writer, cfg, mla)
        tok = checkpoint.tokenizer()
        if tok is None:
            raise LocalseekError(
                f"{checkpoint.path}: no tokenizer, and llama.cpp needs one in the GGUF file."
            )
        _write_tokenizer(writer, tok, cfg.vocab_size)
        for name, array in _gguf_tensors(checkpoint, mla):
            _add_tensor(writer, name, array, QTYPES[qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        written = []
        for f in sorted(tmp_dir.iterdir()):
            os.replace(f, dst.parent / f.name)
            written.append(dst.parent / f.name)
        return written
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_config(w: GGUFWriter, cfg: ModelConfig, mla: bool) -> None:
    H = cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(1 if mla else H)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # 0: no q compression (V2-Lite)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if mla:
        # MLA runs as MQA over the latent: keys are [c_kv, k_pe], values c_kv.
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:
        w.add_key_length(cfg.qk_head_dim)
        w.add_value_length(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    ys = cfg.rope_scaling
    if ys is not None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(ys.factor)
        w.add_rope_scaling_orig_ctx_len(ys.original_max_position_embeddings)
        # convert_hf_to_gguf's convention; llama.cpp divides the 0.1 back out.
        w.add_rope_scaling_yarn_log_mul(0.1 * (ys.mscale_all_dim or 0.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    # llama.cpp normalises, then scales; V2's rule is "scale only when not normalising".
    v2_norm = cfg.model_type == "deepseek_v2" and cfg.norm_topk_prob
    w.add_expert_weights_scale(1.0 if v2_norm else cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    gating = GATING_SIGMOID if cfg.scoring_func == "sigmoid" else GATING_SOFTMAX
    w.add_expert_gating_func(ExpertGatingFuncType(gating))
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_vocab_size(cfg.vocab_size)


def _write_tokenizer(w: GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    state = json.loads(tok.backend.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise LocalseekError(
            f"{tok.source}: the tokenizer is {model.get('type')}, the GGUF writer handles BPE."
        )
    tokens: list[str | None] = [None] * vocab_size
    types = [TokenType.UNUSED] * vocab_size
    for piece, idx in model["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = piece, TokenType.NORMAL
    for added in state.get("added_tokens", []):
        idx = added["id"]
        if idx < vocab_size:
            tokens[idx] = added["content"]
            types[idx] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(names)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)
    if tok.chat_template is not None:
        w.add_chat_template(tok.chat_template)


def _f32(ckpt: Checkpoint, name: str) -> np.ndarray:
    return dense(ckpt.tensor(name, torch.float32), torch.float32).contiguous().numpy()


def _gguf_tensors(ckpt: Checkpoint, mla: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in numpy order) for every tensor of the model."""
    cfg = ckpt.config
    H, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for name in expected_shapes(cfg):
        expert = canonical_expert(name)
        if expert is not None:
            layer, e, proj = expert
            if e == 0:  # one stack per layer and projection: (E, out, in)
                prefix = f"layers.{layer}.ffn.experts."
                stack = np.stack(
                    [_f32(ckpt, f"{prefix}{j}.{proj}") for j in range(cfg.n_routed_experts)]
                )
                yield EXPERT_STACK_OF[proj].format(i=layer), stack
            continue
        if name.endswith(".attn.wkv_b") and mla:
            i = int(name.split(".")[1])
            heads = _f32(ckpt, name).reshape(H, nope + v, cfg.kv_lora_rank)
            # W_UK transposed per head: (H, kv_lora_rank, nope); W_UV: (H, v, kv_lora_rank)
            yield ATTN_K_B.format(i=i), np.ascontiguousarray(heads[:, :nope].transpose(0, 2, 1))
            yield ATTN_V_B.format(i=i), np.ascontiguousarray(heads[:, nope:])
            continue
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            template = name.replace(f"layers.{i}.", "layers.{i}.", 1)
            yield CANONICAL_TO_GGUF[template].format(i=i), _f32(ckpt, name)
        else:
            yield CANONICAL_TO_GGUF[name], _f32(ckpt, name)


def _add_tensor(w: GGUFWriter, name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> None:
    if array.ndim == 1 or name.endswith(_KEEP_F32) or qtype == GGMLQuantizationType.F32:
        w.add_tensor(name, array.astype(np.float32))
        return
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype == GGMLQuantizationType.F16 or array.shape[-1] % block:
        w.add_tensor(name, array.astype(np.float16))
        return
    w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
