"""Write any localseek Checkpoint as a llama.cpp ``deepseek2`` GGUF file, tensor by tensor.

The layout is what current ``convert_hf_to_gguf.py`` writes and llama.cpp's deepseek2 loader
reads: stacked routed experts (``ffn_{gate,up,down}_exps``), ``wkv_b`` split per head into
``attn_k_b`` / ``attn_v_b`` with ``attention.key_length_mla`` / ``value_length_mla`` (or, with
``mla=False``, the legacy unsplit ``attn_kv_b``), ``expert_gating_func`` always written, and the
tokenizer as ``tokenizer.ggml.*`` (gpt2 BPE, pre-tokenizer "deepseek-v3").

Writing streams: every tensor's name, shape and type are planned from the checkpoint's shapes
first (so the header and tensor infos go out before any data), then each tensor is read,
encoded and written in parts (one routed expert at a time for the stacks), so memory stays near
one source tensor. The output appears atomically: shards are written into a temporary folder
beside ``dst`` and moved into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    TokenType,
)

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
from localseek.quant.codecs import WRITABLE, encoded_nbytes, quantize
from localseek.tokenizer import Tokenizer

QTYPES = WRITABLE  # f32, f16, bf16, q8_0, q4_0, q4_k
_ROUTER = ("ffn_gate_inp.weight", "exp_probs_b.bias")  # tiny and precision-critical: F32


@dataclass
class GGUFTensor:
    """One tensor of the output file, planned before any data is read.

    Attributes:
        name: GGUF tensor name.
        shape: numpy-order shape (rows last), e.g. (n_expert, out, in) for an expert stack.
        kind: "experts", "attention", "shared", "dense", "embed", "head", "norm" or "router".
        parts: yields (float32 array, source bytes) pieces whose concatenation in C order is
            the tensor; each piece's last axis is a whole row.
        qtype: the type it is written in (set by the recipe).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    parts: Callable[[], Iterator[tuple[np.ndarray, int]]]
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32

    @property
    def nbytes(self) -> int:
        return encoded_nbytes(self.qtype, self.shape)


Recipe = Callable[[GGUFTensor], GGMLQuantizationType]
PartHook = Callable[[GGUFTensor, np.ndarray, np.ndarray], None]


def fits(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """Whether rows of ``shape`` are a whole number of ``qtype`` blocks."""
    return shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0


def simple_recipe(qtype: GGMLQuantizationType) -> Recipe:
    """Matrices at ``qtype`` (F16 where a row does not fill whole blocks); norms and router F32."""

    def choose(t: GGUFTensor) -> GGMLQuantizationType:
        if t.kind in ("norm", "router") or qtype == GGMLQuantizationType.F32:
            return GGMLQuantizationType.F32
        return qtype if fits(qtype, t.shape) else GGMLQuantizationType.F16

    return choose


def write_gguf(
    checkpoint: Checkpoint,
    dst: str | Path,
    qtype: str | Recipe = "f32",
    mla: bool = True,
    split_max_tensors: int = 0,
    on_part: PartHook | None = None,
    progress: Callable[[int], None] | None = None,
    file_type: int | None = None,
) -> list[Path]:
    """Write ``checkpoint`` as a llama.cpp deepseek2 GGUF, streaming tensor by tensor.

    Args:
        checkpoint: any localseek checkpoint (its tensors are read dequantized to float32).
        dst: output path ending in ``.gguf``; with splitting, the shards are named
            ``NAME-00001-of-0000N.gguf`` beside it.
        qtype: "f32", "f16", "bf16", "q8_0", "q4_0" or "q4_k" for matrices (norms and the
            router stay F32; rows that do not fill whole blocks fall back to F16), or a recipe
            that picks each tensor's type.
        mla: write ``attn_k_b``/``attn_v_b`` (current llama.cpp layout); False writes ``attn_kv_b``.
        split_max_tensors: at most this many tensors per shard (0: one file).
        on_part: called with (tensor, float32 source piece, encoded piece) as each is written.
        progress: called with the source bytes of each piece once it is written.
        file_type: ``general.file_type`` to record (llama.cpp's LLAMA_FTYPE_*), if any.
    Returns:
        The paths written.
    """
    if isinstance(qtype, str):
        if qtype not in QTYPES:
            raise LocalseekError(
                f"GGUF type '{qtype}' is not supported (one of {', '.join(QTYPES)})."
            )
        recipe = simple_recipe(QTYPES[qtype])
    else:
        recipe = qtype
    dst = Path(dst)
    cfg = checkpoint.config
    tok = checkpoint.tokenizer()
    if tok is None:
        raise LocalseekError(
            f"{checkpoint.path}: no tokenizer, and llama.cpp needs one in the GGUF file."
        )
    plan = gguf_tensors(checkpoint, mla)
    for t in plan:
        t.qtype = recipe(t)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    writer = GGUFWriter(tmp_dir / dst.name, ARCH, split_max_tensors=split_max_tensors)
    try:
        write_config(writer, cfg, mla)
        write_tokenizer_metadata(writer, tok, cfg.vocab_size)
        if any(t.qtype not in _DENSE for t in plan):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        if file_type is not None:
            writer.add_file_type(file_type)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        by_name = {t.name: t for t in plan}
        assert writer.fout is not None
        for fout, infos in zip(writer.fout, writer.tensors, strict=True):
            writer.write_padding(fout, fout.tell())
            for name in infos:
                _write_data(fout, by_name[name], on_part, progress)
                writer.write_padding(fout, by_name[name].nbytes)
        writer.close()
        written = []
        for f in sorted(tmp_dir.iterdir()):
            os.replace(f, dst.parent / f.name)
            written.append(dst.parent / f.name)
        return written
    finally:
        writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)


_DENSE = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def _write_data(
    fout: BinaryIO, t: GGUFTensor, on_part: PartHook | None, progress: Callable[[int], None] | None
) -> None:
    written = 0
    for values, src_bytes in t.parts():
        encoded = quantize(values, t.qtype)
        encoded.tofile(fout)
        written += encoded.nbytes
        if on_part is not None:
            on_part(t, values, encoded)
        if progress is not None:
            progress(src_bytes)
    if written != t.nbytes:  # a source tensor whose size disagrees with its planned shape
        raise LocalseekError(f"tensor {t.name} produced {written} bytes, expected {t.nbytes}.")


def write_config(w: GGUFWriter, cfg: ModelConfig, mla: bool) -> None:
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
    v2_norm = cfg.variant.v2_weight_rule and cfg.norm_topk_prob
    w.add_expert_weights_scale(1.0 if v2_norm else cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    gating = GATING_SIGMOID if cfg.scoring_func == "sigmoid" else GATING_SOFTMAX
    w.add_expert_gating_func(ExpertGatingFuncType(gating))
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_vocab_size(cfg.vocab_size)


def write_tokenizer_metadata(w: GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
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


def _kind(gguf_name: str, ndim: int) -> str:
    if gguf_name.endswith(_ROUTER):
        return "router"
    if ndim == 1:
        return "norm"
    if gguf_name.startswith("token_embd"):
        return "embed"
    if gguf_name.startswith("output"):
        return "head"
    if "_exps" in gguf_name:
        return "experts"
    if "_shexp" in gguf_name:
        return "shared"
    if ".ffn_" in gguf_name:
        return "dense"
    return "attention"


def gguf_tensors(ckpt: Checkpoint, mla: bool = True) -> list[GGUFTensor]:
    """Every tensor of the model as the GGUF file holds it, planned from shapes alone."""
    cfg = ckpt.config
    H, nope, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    plan: list[GGUFTensor] = []

    def whole(name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None, half=0):
        def parts() -> Iterator[tuple[np.ndarray, int]]:
            values = _f32(ckpt, name)
            n = ckpt.nbytes(name)  # wkv_b is read twice (k_b, v_b): count half each time
            n = n if not half else (n // 2 if half == 1 else n - n // 2)
            yield (values if transform is None else transform(values)), n

        return parts

    def add(gguf_name: str, shape: tuple[int, ...], parts) -> None:
        plan.append(GGUFTensor(gguf_name, tuple(shape), _kind(gguf_name, len(shape)), parts))

    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
        expert = canonical_expert(name)
        if expert is not None:
            layer, e, proj = expert
            if e == 0:  # one stack per layer and projection: (E, out, in), one expert a part
                prefix = f"layers.{layer}.ffn.experts."
                names = [f"{prefix}{j}.{proj}" for j in range(cfg.n_routed_experts)]

                def stack(names=names) -> Iterator[tuple[np.ndarray, int]]:
                    for n in names:
                        yield _f32(ckpt, n), ckpt.nbytes(n)

                add(EXPERT_STACK_OF[proj].format(i=layer), (len(names), *shape), stack)
            continue
        if name.endswith(".attn.wkv_b") and mla:
            i = int(name.split(".")[1])
            # W_UK transposed per head: (H, kv_lora_rank, nope); W_UV: (H, v, kv_lora_rank)
            k_b = whole(
                name, lambda w: w.reshape(H, nope + v, r)[:, :nope].transpose(0, 2, 1).copy(), 1
            )
            v_b = whole(name, lambda w: w.reshape(H, nope + v, r)[:, nope:].copy(), 2)
            add(ATTN_K_B.format(i=i), (H, r, nope), k_b)
            add(ATTN_V_B.format(i=i), (H, v, r), v_b)
            continue
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            template = name.replace(f"layers.{i}.", "layers.{i}.", 1)
            add(CANONICAL_TO_GGUF[template].format(i=i), shape, whole(name))
        else:
            add(CANONICAL_TO_GGUF[name], shape, whole(name))
    return plan
