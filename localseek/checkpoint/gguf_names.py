"""The one table between llama.cpp's ``deepseek2`` GGUF names and localseek's canonical names.

The reader and the writer both use it, so a name can only ever be spelled in one place.
Three GGUF layouts need more than a rename and are handled by the reader/writer themselves:

- routed experts are stacked: ``blk.N.ffn_{gate,up,down}_exps.weight`` holds every expert's
  ``w1``/``w3``/``w2``, ggml shape {in, out, n_expert} (numpy (n_expert, out, in));
- MLA files (those with ``attention.key_length_mla``) split ``wkv_b`` per head into
  ``attn_k_b`` {nope, kv_lora_rank, H} (W_UK transposed) and ``attn_v_b`` {kv_lora_rank, v, H};
  older files keep the unsplit ``attn_kv_b``;
- the router bias is ``exp_probs_b.bias``.
"""

from __future__ import annotations

import re

ARCH = "deepseek2"

# GGUF name template -> canonical name template; "{i}" is the layer.
GGUF_TO_CANONICAL: dict[str, str] = {
    "token_embd.weight": "embed",
    "output_norm.weight": "norm",
    "output.weight": "head",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq",
    "blk.{i}.attn_q_a.weight": "layers.{i}.attn.wq_a",
    "blk.{i}.attn_q_a_norm.weight": "layers.{i}.attn.q_norm",
    "blk.{i}.attn_q_b.weight": "layers.{i}.attn.wq_b",
    "blk.{i}.attn_kv_a_mqa.weight": "layers.{i}.attn.wkv_a",
    "blk.{i}.attn_kv_a_norm.weight": "layers.{i}.attn.kv_norm",
    "blk.{i}.attn_kv_b.weight": "layers.{i}.attn.wkv_b",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo",
    "blk.{i}.ffn_gate.weight": "layers.{i}.ffn.w1",
    "blk.{i}.ffn_up.weight": "layers.{i}.ffn.w3",
    "blk.{i}.ffn_down.weight": "layers.{i}.ffn.w2",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.ffn.gate",
    "blk.{i}.exp_probs_b.bias": "layers.{i}.ffn.gate_bias",
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.ffn.shared.w1",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.ffn.shared.w3",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.ffn.shared.w2",
}
CANONICAL_TO_GGUF = {v: k for k, v in GGUF_TO_CANONICAL.items()}

# Stacked routed experts: GGUF template -> canonical projection of each expert.
EXPERT_STACKS: dict[str, str] = {
    "blk.{i}.ffn_gate_exps.weight": "w1",
    "blk.{i}.ffn_up_exps.weight": "w3",
    "blk.{i}.ffn_down_exps.weight": "w2",
}
EXPERT_STACK_OF = {v: k for k, v in EXPERT_STACKS.items()}

# MLA split of wkv_b (current convert_hf_to_gguf output).
ATTN_K_B = "blk.{i}.attn_k_b.weight"
ATTN_V_B = "blk.{i}.attn_v_b.weight"

_LAYER = re.compile(r"blk\.(\d+)\.")
_CANON_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])")


def template_of(gguf_name: str) -> tuple[str, int | None]:
    """A GGUF tensor name as (template, layer): "blk.3.ffn_up.weight" -> ("blk.{i}...", 3)."""
    m = _LAYER.match(gguf_name)
    if m is None:
        return gguf_name, None
    return "blk.{i}." + gguf_name[m.end() :], int(m.group(1))


def canonical_expert(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, projection) of a canonical routed-expert name, else None."""
    m = _CANON_EXPERT.fullmatch(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


class Keys:
    """Metadata keys of the deepseek2 architecture (``{arch}`` prefix filled in)."""

    ARCHITECTURE = "general.architecture"
    ALIGNMENT = "general.alignment"
    BLOCK_COUNT = f"{ARCH}.block_count"
    CONTEXT_LENGTH = f"{ARCH}.context_length"
    EMBEDDING_LENGTH = f"{ARCH}.embedding_length"
    FEED_FORWARD_LENGTH = f"{ARCH}.feed_forward_length"
    HEAD_COUNT = f"{ARCH}.attention.head_count"
    HEAD_COUNT_KV = f"{ARCH}.attention.head_count_kv"
    Q_LORA_RANK = f"{ARCH}.attention.q_lora_rank"
    KV_LORA_RANK = f"{ARCH}.attention.kv_lora_rank"
    KEY_LENGTH = f"{ARCH}.attention.key_length"
    VALUE_LENGTH = f"{ARCH}.attention.value_length"
    KEY_LENGTH_MLA = f"{ARCH}.attention.key_length_mla"
    VALUE_LENGTH_MLA = f"{ARCH}.attention.value_length_mla"
    RMS_EPS = f"{ARCH}.attention.layer_norm_rms_epsilon"
    ROPE_DIM = f"{ARCH}.rope.dimension_count"
    ROPE_FREQ_BASE = f"{ARCH}.rope.freq_base"
    ROPE_SCALING_TYPE = f"{ARCH}.rope.scaling.type"
    ROPE_SCALING_FACTOR = f"{ARCH}.rope.scaling.factor"
    ROPE_SCALING_ORIG_CTX = f"{ARCH}.rope.scaling.original_context_length"
    ROPE_SCALING_YARN_LOG_MUL = f"{ARCH}.rope.scaling.yarn_log_multiplier"
    ROPE_SCALING_BETA_FAST = f"{ARCH}.rope.scaling.yarn_beta_fast"
    ROPE_SCALING_BETA_SLOW = f"{ARCH}.rope.scaling.yarn_beta_slow"
    LEADING_DENSE = f"{ARCH}.leading_dense_block_count"
    EXPERT_FF_LENGTH = f"{ARCH}.expert_feed_forward_length"
    EXPERT_COUNT = f"{ARCH}.expert_count"
    EXPERT_SHARED_COUNT = f"{ARCH}.expert_shared_count"
    EXPERT_USED_COUNT = f"{ARCH}.expert_used_count"
    EXPERT_WEIGHTS_SCALE = f"{ARCH}.expert_weights_scale"
    EXPERT_WEIGHTS_NORM = f"{ARCH}.expert_weights_norm"
    EXPERT_GATING_FUNC = f"{ARCH}.expert_gating_func"
    EXPERT_GROUP_COUNT = f"{ARCH}.expert_group_count"
    EXPERT_GROUP_USED_COUNT = f"{ARCH}.expert_group_used_count"
    NEXTN_PREDICT_LAYERS = f"{ARCH}.nextn_predict_layers"
    VOCAB_SIZE = f"{ARCH}.vocab_size"
    SPLIT_COUNT = "split.count"
    SPLIT_NO = "split.no"
    TOK_MODEL = "tokenizer.ggml.model"
    TOK_PRE = "tokenizer.ggml.pre"
    TOK_TOKENS = "tokenizer.ggml.tokens"
    TOK_TYPES = "tokenizer.ggml.token_type"
    TOK_MERGES = "tokenizer.ggml.merges"
    TOK_BOS = "tokenizer.ggml.bos_token_id"
    TOK_EOS = "tokenizer.ggml.eos_token_id"
    TOK_ADD_BOS = "tokenizer.ggml.add_bos_token"
    CHAT_TEMPLATE = "tokenizer.chat_template"


GATING_SOFTMAX = 1
GATING_SIGMOID = 2


# The kind of value each key must hold: "int" (any GGUF integer type), "float" (FLOAT32 or
# FLOAT64), "bool", "str", or an array of "str"/"int". A key holding something else is named.
KEY_KINDS: dict[str, str] = {
    Keys.ARCHITECTURE: "str",
    Keys.ALIGNMENT: "int",
    **{
        k: "int"
        for k in (
            Keys.BLOCK_COUNT,
            Keys.CONTEXT_LENGTH,
            Keys.EMBEDDING_LENGTH,
            Keys.FEED_FORWARD_LENGTH,
            Keys.HEAD_COUNT,
            Keys.HEAD_COUNT_KV,
            Keys.Q_LORA_RANK,
            Keys.KV_LORA_RANK,
            Keys.KEY_LENGTH,
            Keys.VALUE_LENGTH,
            Keys.KEY_LENGTH_MLA,
            Keys.VALUE_LENGTH_MLA,
            Keys.ROPE_DIM,
            Keys.ROPE_SCALING_ORIG_CTX,
            Keys.LEADING_DENSE,
            Keys.EXPERT_FF_LENGTH,
            Keys.EXPERT_COUNT,
            Keys.EXPERT_SHARED_COUNT,
            Keys.EXPERT_USED_COUNT,
            Keys.EXPERT_GATING_FUNC,
            Keys.EXPERT_GROUP_COUNT,
            Keys.EXPERT_GROUP_USED_COUNT,
            Keys.NEXTN_PREDICT_LAYERS,
            Keys.VOCAB_SIZE,
            Keys.SPLIT_COUNT,
            Keys.SPLIT_NO,
            Keys.TOK_BOS,
            Keys.TOK_EOS,
        )
    },
    **{
        k: "float"
        for k in (
            Keys.RMS_EPS,
            Keys.ROPE_FREQ_BASE,
            Keys.ROPE_SCALING_FACTOR,
            Keys.ROPE_SCALING_YARN_LOG_MUL,
            Keys.ROPE_SCALING_BETA_FAST,
            Keys.ROPE_SCALING_BETA_SLOW,
            Keys.EXPERT_WEIGHTS_SCALE,
        )
    },
    Keys.EXPERT_WEIGHTS_NORM: "bool",
    Keys.TOK_ADD_BOS: "bool",
    Keys.ROPE_SCALING_TYPE: "str",
    Keys.TOK_MODEL: "str",
    Keys.TOK_PRE: "str",
    Keys.CHAT_TEMPLATE: "str",
    Keys.TOK_TOKENS: "str[]",
    Keys.TOK_MERGES: "str[]",
    Keys.TOK_TYPES: "int[]",
}
