"""llama.cpp GGUF files of the ``deepseek2`` architecture, single or split into shards.

Files are memory-mapped through gguf-py's ``GGUFReader``; a tensor is read only when the model
asks for it. Block-quantized tensors are served as QTensors over the mapped bytes (see
``quant/ggml.py``); a routed expert is a view of its rows in the layer's expert stack, never a
copy of the stack. Names go through the one table in ``gguf_names.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, TokenType
from gguf.gguf_reader import ReaderTensor

from localseek.checkpoint.base import Checkpoint, FileTensor, expected_shapes, optional_shapes
from localseek.checkpoint.gguf_layout import GGUFLayout, read_layout
from localseek.checkpoint.gguf_names import (
    ARCH,
    ATTN_K_B,
    ATTN_V_B,
    CANONICAL_TO_GGUF,
    EXPERT_STACK_OF,
    EXPERT_STACKS,
    GATING_SIGMOID,
    GATING_SOFTMAX,
    GGUF_TO_CANONICAL,
    KEY_KINDS,
    Keys,
    canonical_expert,
    template_of,
)
from localseek.config import ModelConfig, YarnScaling
from localseek.errors import CheckpointError
from localseek.quant import QTensor, Weight
from localseek.quant.ggml import ggml_qtensor
from localseek.tokenizer import Tokenizer

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM pre-tokenizer (DeepSeek-V2 / V2-Lite and
# DeepSeek-LLM's tokenizer.json splits, each isolated, then byte-level mapping)
DEEPSEEK_LLM_PRE_REGEXES = [
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",  # noqa: E501
    "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-\ud7ff]+",
    "\\p{N}+",
]

# tensors the model runs as dense torch tensors whatever their type in the file (norms, router)
_DENSE_ONLY = re.compile(r"(norm|\.ffn\.gate|\.ffn\.gate_bias)$")
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM pre-tokenizer, as in DeepSeek-V3's tokenizer.json.
DEEPSEEK3_PRE_REGEXES = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]


def gguf_in_folder(folder: Path) -> Path | None:
    """The GGUF model in a folder: its only .gguf file, or the first shard of one split set."""
    files = sorted(folder.glob("*.gguf"))
    firsts = [f for f in files if (m := _SPLIT.match(f.name)) and int(m["no"]) == 1]
    singles = [f for f in files if not _SPLIT.match(f.name)]
    found = firsts + singles
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise CheckpointError(f"{folder}: holds several GGUF models ({names}); name one.")
    return found[0] if found else None


def _shard_paths(path: Path) -> list[Path]:
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    paths = [
        path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: shard {p.name} of the split GGUF {path.name} is missing.")
    return paths


def _open_reader(path: Path) -> GGUFReader:
    layout = read_layout(path)  # every size checked against the file first
    _check_metadata(path, layout)
    try:
        # "c": copy-on-write mapping, so torch gets writable arrays without copying the file
        return GGUFReader(path, "c")
    except Exception as e:  # the layout is sound, so this is a fault the walk does not know
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {_short(e)})."
        ) from e


def _short(e: BaseException) -> str:
    return str(e).strip().rstrip(".").split("\n")[0]


def _value(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


_INTS = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
_FLOATS = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
_WANTED = {
    "int": "an integer",
    "float": "a float",
    "bool": "true or false",
    "str": "a string",
    "str[]": "an array of strings",
    "int[]": "an array of integers",
}
_KNOWN_KEYS = frozenset(v for k, v in vars(Keys).items() if k.isupper())


def _kind_ok(kind: str, vtype: GGUFValueType, item: GGUFValueType | None) -> bool:
    if kind.endswith("[]"):
        return vtype == GGUFValueType.ARRAY and _kind_ok(kind[:-2], item, None)
    return {
        "int": vtype in _INTS,
        "float": vtype in _FLOATS,  # as llama.cpp: a float's bits read as an integer are not
        "bool": vtype == GGUFValueType.BOOL,
        "str": vtype == GGUFValueType.STRING,
    }[kind]


def _held(vtype: GGUFValueType, item: GGUFValueType | None) -> str:
    if vtype == GGUFValueType.ARRAY:
        return f"an array of {item.name if item is not None else 'nothing'}"
    return "a string" if vtype == GGUFValueType.STRING else f"a {vtype.name}"


def _check_metadata(path: Path, layout: GGUFLayout) -> None:
    """Each known key holds the kind of value it must; an unknown key one character away from
    a known key that is missing is a corrupt name, not a key from a newer writer."""
    for key, (vtype, item) in layout.value_types.items():
        kind = KEY_KINDS.get(key)
        if kind is not None and not _kind_ok(kind, vtype, item):
            held = _held(vtype, item)
            if key in layout.strings:
                held += f" ({layout.strings[key][:40]!r})"
            raise CheckpointError(
                f"{path}: metadata key '{key}' holds {held}; it must be {_WANTED[kind]}."
            )
        if kind is None and key not in _KNOWN_KEYS:
            for known in _KNOWN_KEYS - layout.value_types.keys():
                if (
                    len(known) == len(key)
                    and sum(a != b for a, b in zip(known, key, strict=True)) == 1
                ):
                    raise CheckpointError(
                        f"{path}: metadata key '{key}' is unknown and one character off "
                        f"'{known}', which is missing (a corrupt file?)."
                    )


class GGUFCheckpoint(Checkpoint):
    """A ``deepseek2`` GGUF file (or the first of a split set) as a Checkpoint."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._shards = _shard_paths(self.path)
        self._readers = [_open_reader(p) for p in self._shards]
        self._meta = self._readers[0]
        self._check_split()
        self._tensors: dict[str, tuple[Path, ReaderTensor]] = {}
        for shard, reader in zip(self._shards, self._readers, strict=True):
            for t in reader.tensors:
                if t.name in self._tensors:
                    raise CheckpointError(
                        f"{shard}: tensor '{t.name}' is also in {self._tensors[t.name][0].name}."
                    )
                self._tensors[t.name] = (shard, t)
        self.config = self._config()
        self._where: dict[str, str] = {}  # canonical -> GGUF name (experts: the stack)
        self._index()
        self._check_tensors_used()

    # --- metadata ----------------------------------------------------------------------------

    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value of the (first) file, or ``default``."""
        value = _value(self._meta, key)
        return default if value is None else value

    def _need(self, key: str) -> Any:
        value = _value(self._meta, key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key '{key}' is missing.")
        return value

    def _check_split(self) -> None:
        count = int(self.meta(Keys.SPLIT_COUNT, 1))
        if count != len(self._shards):
            raise CheckpointError(
                f"{self.path}: says split.count {count} but {len(self._shards)} file(s) were found."
            )
        for i, reader in enumerate(self._readers):
            no = _value(reader, Keys.SPLIT_NO)
            if count > 1 and (no is None or int(no) != i):
                raise CheckpointError(f"{self._shards[i]}: split.no is {no}, expected {i}.")

    def _config(self) -> ModelConfig:
        arch = self.meta(Keys.ARCHITECTURE)
        if arch != ARCH:
            raise CheckpointError(
                f"{self.path}: GGUF architecture '{arch}' is not supported "
                f"(localseek runs '{ARCH}': DeepSeek-V2/V3)."
            )
        n_layers = int(self._need(Keys.BLOCK_COUNT))
        layers = {layer for n in self._tensors if (layer := template_of(n)[1]) is not None}
        if n_layers > len(layers):
            raise CheckpointError(
                f"{self.path}: metadata key '{Keys.BLOCK_COUNT}' is {n_layers}, but the file "
                f"holds tensors of {len(layers)} layers."
            )
        n_experts = self._expert_count()
        n_heads = int(self._need(Keys.HEAD_COUNT))
        kv_lora = int(self._need(Keys.KV_LORA_RANK))
        rope_dim = int(self._need(Keys.ROPE_DIM))
        # MLA files state the per-head sizes; older files have them as key/value_length.
        k_len = self.meta(Keys.KEY_LENGTH_MLA) or self._need(Keys.KEY_LENGTH)
        v_len = self.meta(Keys.VALUE_LENGTH_MLA) or self._need(Keys.VALUE_LENGTH)
        gating = int(self.meta(Keys.EXPERT_GATING_FUNC, 0)) or GATING_SOFTMAX  # llama.cpp's rule
        if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise CheckpointError(f"{self.path}: expert_gating_func {gating} is not supported.")
        has_bias = any(n.endswith("exp_probs_b.bias") for n in self._tensors)
        n_group = int(self.meta(Keys.EXPERT_GROUP_COUNT, 1)) or 1
        norm = bool(self.meta(Keys.EXPERT_WEIGHTS_NORM, False))

        def moe(key: str) -> Any:  # keys llama.cpp requires of a deepseek2 file with experts
            return self._need(key) if n_experts else self.meta(key, 0)

        scale = float(moe(Keys.EXPERT_WEIGHTS_SCALE) or 1.0)
        # llama.cpp normalises then scales: V3's rule. V2's differs only when both are on.
        v3_rule = gating == GATING_SIGMOID or has_bias or (norm and scale != 1.0)
        vocab = self.meta(Keys.VOCAB_SIZE)
        if vocab is None:  # older files: the vocabulary's length
            vocab = len(self.meta(Keys.TOK_TOKENS) or []) or self._need(Keys.VOCAB_SIZE)
        q_lora = int(self.meta(Keys.Q_LORA_RANK, 0))
        yarn = None
        if self.meta(Keys.ROPE_SCALING_TYPE) == "yarn":
            # stored as 0.1 * mscale_all_dim; undone in float32 as llama.cpp does
            raw = np.float32(self.meta(Keys.ROPE_SCALING_YARN_LOG_MUL, 0.0))
            log_mul = float(raw / np.float32(0.1))
            yarn = YarnScaling(
                factor=float(self._need(Keys.ROPE_SCALING_FACTOR)),
                original_max_position_embeddings=int(self._need(Keys.ROPE_SCALING_ORIG_CTX)),
                beta_fast=float(self.meta(Keys.ROPE_SCALING_BETA_FAST, 32.0)),
                beta_slow=float(self.meta(Keys.ROPE_SCALING_BETA_SLOW, 1.0)),
                # llama.cpp assumes mscale == mscale_all_dim (as every DeepSeek config has it)
                mscale=log_mul or None,
                mscale_all_dim=log_mul or None,
            )
        elif self.meta(Keys.ROPE_SCALING_TYPE) not in (None, "none"):
            kind = self.meta(Keys.ROPE_SCALING_TYPE)
            raise CheckpointError(f"{self.path}: rope scaling type '{kind}' is not supported.")
        cfg = ModelConfig(
            model_type="deepseek_v3" if v3_rule else "deepseek_v2",
            vocab_size=int(vocab),
            hidden_size=int(self._need(Keys.EMBEDDING_LENGTH)),
            num_hidden_layers=n_layers,
            rms_norm_eps=float(self._need(Keys.RMS_EPS)),
            max_position_embeddings=int(self._need(Keys.CONTEXT_LENGTH)),
            tie_word_embeddings="output.weight" not in self._tensors,
            intermediate_size=int(self._need(Keys.FEED_FORWARD_LENGTH)),
            moe_intermediate_size=int(moe(Keys.EXPERT_FF_LENGTH)),
            n_routed_experts=n_experts,
            n_shared_experts=int(moe(Keys.EXPERT_SHARED_COUNT)),
            num_experts_per_tok=int(moe(Keys.EXPERT_USED_COUNT)),
            n_group=n_group,
            topk_group=int(self.meta(Keys.EXPERT_GROUP_USED_COUNT, 1)) or 1,
            topk_method="noaux_tc"
            if has_bias
            else ("greedy" if n_group == 1 else "group_limited_greedy"),
            scoring_func="sigmoid" if gating == GATING_SIGMOID else "softmax",
            norm_topk_prob=norm,
            routed_scaling_factor=scale,
            first_k_dense_replace=int(moe(Keys.LEADING_DENSE)),
            moe_layer_freq=1,
            num_attention_heads=n_heads,
            q_lora_rank=q_lora or None,
            kv_lora_rank=kv_lora,
            qk_nope_head_dim=int(k_len) - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=int(v_len),
            rope_theta=float(self.meta(Keys.ROPE_FREQ_BASE, 10000.0)),
            rope_scaling=yarn,
            bos_token_id=self.meta(Keys.TOK_BOS),
            eos_token_id=self.meta(Keys.TOK_EOS),
        )
        cfg.validate(str(self.path))
        return cfg

    def _expert_count(self) -> int:
        """deepseek2.expert_count, which a file with expert stacks must state and match."""
        stacks = [n for n in self._tensors if template_of(n)[0] in EXPERT_STACKS]
        if not stacks:
            return int(self.meta(Keys.EXPERT_COUNT, 0))
        count = self.meta(Keys.EXPERT_COUNT)
        if count is None:
            raise CheckpointError(
                f"{self.path}: metadata key '{Keys.EXPERT_COUNT}' is missing, but the file "
                f"holds routed experts ('{stacks[0]}')."
            )
        for name in stacks:
            dims = self._tensors[name][1].shape  # ggml order {in, out, n_expert}
            if len(dims) != 3 or int(dims[2]) != int(count):
                held = f"{int(dims[2])} experts" if len(dims) == 3 else f"{len(dims)} dimensions"
                raise CheckpointError(
                    f"{self.path}: metadata key '{Keys.EXPERT_COUNT}' is {count}, but tensor "
                    f"'{name}' holds {held}."
                )
        return int(count)

    # --- tensors -----------------------------------------------------------------------------

    def _index(self) -> None:
        cfg = self.config
        for gguf_name in self._tensors:
            template, layer = template_of(gguf_name)
            if layer is not None and layer >= cfg.num_hidden_layers:
                continue  # multi-token-prediction layers: not used for inference
            if template in GGUF_TO_CANONICAL:
                self._where[GGUF_TO_CANONICAL[template].format(i=layer)] = gguf_name
            elif template in EXPERT_STACKS:
                proj = EXPERT_STACKS[template]
                for e in range(cfg.n_routed_experts):
                    self._where[f"layers.{layer}.ffn.experts.{e}.{proj}"] = gguf_name
            elif template == ATTN_K_B and ATTN_V_B.format(i=layer) in self._tensors:
                self._where.setdefault(f"layers.{layer}.attn.wkv_b", gguf_name)
                v_b = ATTN_V_B.format(i=layer)
                if len(self._tensors[gguf_name][1].shape) == len(self._tensors[v_b][1].shape) == 3:
                    self._where[f"layers.{layer}.attn.wk_b"] = gguf_name
                    self._where[f"layers.{layer}.attn.wv_b"] = v_b

    def _check_tensors_used(self) -> None:
        """Every tensor of the file is one the model runs, as llama.cpp's loader requires
        ("wrong number of tensors"): a renamed or stray tensor is a corrupt file, and a known
        tensor the metadata does not call for means a key is missing or wrong."""
        cfg = self.config
        last = cfg.num_hidden_layers + int(self.meta(Keys.NEXTN_PREDICT_LAYERS, 0))
        used = set(self._where.values())
        used |= {n.replace("_k_b", "_v_b") for n in used if n.endswith("attn_k_b.weight")}
        wanted = expected_shapes(cfg).keys() | optional_shapes(cfg).keys()
        why = {n: c for c, n in self._where.items() if c in wanted}
        for name in self._tensors:
            layer = template_of(name)[1]
            if layer is not None and layer >= cfg.num_hidden_layers:
                if layer >= last:
                    raise CheckpointError(
                        f"{self.path}: tensor '{name}' is in layer {layer}, but "
                        f"'{Keys.BLOCK_COUNT}' is {cfg.num_hidden_layers}."
                    )
                continue  # multi-token-prediction layers: not used for inference
            if name not in used:
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' is not a tensor of the {ARCH} architecture "
                    "(a corrupt name?)."
                )
            if name not in why and not name.endswith("attn_v_b.weight"):
                if name.endswith("attn_q_a.weight") and cfg.q_lora_rank is None:
                    raise CheckpointError(
                        f"{self.path}: metadata key '{Keys.Q_LORA_RANK}' is missing or 0, but "
                        f"the file holds '{name}'."
                    )
                raise CheckpointError(
                    f"{self.path}: tensor '{name}' is not used by a model with this file's "
                    "metadata (a metadata key is missing or wrong)."
                )

    def names(self) -> list[str]:
        return list(self._where)

    def describe(self, name: str) -> str:
        if name in self._where:
            return self._where[name]
        expert = canonical_expert(name)
        if expert is not None:
            return EXPERT_STACK_OF[expert[2]].format(i=expert[0])
        m = re.fullmatch(r"layers\.(\d+)\.(.*)", name)
        template, layer = ("layers.{i}." + m[2], int(m[1])) if m else (name, None)
        if template == "layers.{i}.attn.wkv_b" and self.meta(Keys.KEY_LENGTH_MLA) is not None:
            return ATTN_K_B.format(i=layer)  # MLA files split wkv_b into attn_k_b / attn_v_b
        if template in CANONICAL_TO_GGUF:
            return CANONICAL_TO_GGUF[template].format(i=layer)
        return name

    def file_tensors(self) -> list[FileTensor]:
        return [
            FileTensor(
                name, t.tensor_type.name, int(t.n_bytes), template_of(name)[0] in EXPERT_STACKS
            )
            for name, (_, t) in self._tensors.items()
        ]

    def shape(self, name: str) -> tuple[int, ...]:
        gguf_name = self._where[name]
        t = self._tensors[gguf_name][1]
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        if canonical_expert(name) is not None:
            return shape[1:]
        if name.endswith((".wk_b", ".wv_b")):  # (H, rows, cols) stacked per head
            return (shape[0] * shape[1], shape[2])
        if gguf_name.endswith("attn_k_b.weight"):
            cfg = self.config
            H = cfg.num_attention_heads
            return (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        return shape

    def storage_type(self, name: str) -> str:
        return self._tensors[self._where[name]][1].tensor_type.name

    def nbytes(self, name: str) -> int:
        gguf_name = self._where[name]
        t = self._tensors[gguf_name][1]
        if canonical_expert(name) is not None:
            return int(t.n_bytes) // self.config.n_routed_experts
        if gguf_name.endswith("attn_k_b.weight") and name.endswith(".wkv_b"):
            return int(t.n_bytes) + int(self._tensors[gguf_name.replace("_k_b", "_v_b")][1].n_bytes)
        return int(t.n_bytes)

    def expert_file_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, nbytes) of one routed expert's projection inside its stack (expert
        ``e`` of the stack starts at ``offset + e * nbytes``); None for other tensors."""
        if canonical_expert(name) is None:
            return None
        shard, t = self._tensors[self._where[name]]
        return shard, int(t.data_offset), int(t.n_bytes) // self.config.n_routed_experts

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> Weight:
        gguf_name = self._where[name]
        if name.endswith((".wk_b", ".wv_b")):
            return self._heads_stacked(gguf_name, self.shape(name), dtype)
        if gguf_name.endswith("attn_k_b.weight"):
            return self._wkv_b(gguf_name, dtype)
        expert = canonical_expert(name)
        w = self._read(gguf_name, None if expert is None else expert[1])
        if isinstance(w, QTensor) and _DENSE_ONLY.search(name):
            return w.dequantize(dtype or torch.float32)  # small, and the model runs it dense
        if isinstance(w, torch.Tensor) and dtype is not None and w.dtype != dtype:
            return w.to(dtype)
        return w

    def _read(self, gguf_name: str, expert: int | None = None) -> Weight:
        """The tensor (or one expert's slice of a stack) over the mapped bytes, no copy."""
        _, t = self._tensors[gguf_name]
        qtype = GGMLQuantizationType(t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        data = t.data if expert is None else t.data[expert]
        if expert is not None:
            shape = shape[1:]
        half = qtype in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
        if half and len(shape) == 2 and shape[1] % 32 == 0:  # a matrix the kernels stream
            raw = torch.from_numpy(data).view(torch.uint8).view(shape[0], -1)
            return ggml_qtensor(qtype, shape, raw)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return torch.from_numpy(data).view(shape)
        raw = torch.from_numpy(data)  # uint8 (..., row_bytes)
        if qtype == GGMLQuantizationType.BF16:
            return raw.view(torch.bfloat16).view(shape)
        return ggml_qtensor(qtype, shape, raw.view(-1, raw.shape[-1]))

    def _heads_stacked(
        self, gguf_name: str, shape: tuple[int, int], dtype: torch.dtype | None
    ) -> Weight:
        """attn_k_b / attn_v_b (H, rows, cols) as one (H * rows, cols) matrix, as stored."""
        w = self._read(gguf_name)
        if isinstance(w, QTensor):
            return QTensor(w.qtype, shape, w.data, w.scale)
        w = w.reshape(shape)
        return w if dtype is None else w.to(dtype)

    def _wkv_b(self, k_b_name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Rebuild the canonical wkv_b (H * (nope + v), kv_lora_rank) from attn_k_b/attn_v_b."""
        cfg = self.config
        H, nope, v, r = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        k_b = _dense(self._read(k_b_name)).view(H, r, nope)
        v_b = _dense(self._read(k_b_name.replace("_k_b", "_v_b"))).view(H, v, r)
        heads = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # (H, nope + v, r)
        return heads.reshape(H * (nope + v), r).to(dtype or torch.float32)

    # --- tokenizer ---------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer | None:
        return tokenizer_from_gguf(self.meta, str(self.path))

    def close(self) -> None:
        self._tensors.clear()
        self._readers.clear()


def _dense(w: Weight) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QTensor) else w.to(torch.float32)


def deepseek3_pre_tokenizer(regexes: list[str] = DEEPSEEK3_PRE_REGEXES) -> Any:
    """A DeepSeek pre-tokenizer: isolating regex splits (V3's three by default; V2's
    ``DEEPSEEK_LLM_PRE_REGEXES``), then byte-level mapping."""
    from tokenizers import Regex, pre_tokenizers

    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def tokenizer_from_gguf(meta: Any, source: str) -> Tokenizer | None:
    """Build the Tokenizer a GGUF file describes (``tokenizer.ggml.*``), or None without one.

    Args:
        meta: ``meta(key, default)`` returning metadata values.
        source: the file, for error messages.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    kind = meta(Keys.TOK_MODEL)
    if kind is None or kind == "none":
        return None
    if kind != "gpt2":
        raise CheckpointError(f"{source}: tokenizer model '{kind}' is not supported (gpt2 BPE).")
    pre = meta(Keys.TOK_PRE, "default")
    if pre not in ("deepseek-v3", "deepseek-llm", "default", "gpt2"):
        raise CheckpointError(
            f"{source}: pre-tokenizer '{pre}' is not supported (deepseek-v3, deepseek-llm or gpt2)."
        )
    tokens = meta(Keys.TOK_TOKENS)
    if tokens is None:
        raise CheckpointError(
            f"{source}: metadata key '{Keys.TOK_TOKENS}' is missing, so the {kind} tokenizer "
            "the file names has no vocabulary."
        )
    tokens = list(tokens)
    types = list(meta(Keys.TOK_TYPES, [TokenType.NORMAL] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta(Keys.TOK_MERGES, [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    if pre == "deepseek-v3":
        tok.pre_tokenizer = deepseek3_pre_tokenizer()
    elif pre == "deepseek-llm":
        tok.pre_tokenizer = deepseek3_pre_tokenizer(DEEPSEEK_LLM_PRE_REGEXES)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = [
        tokenizers.AddedToken(t, special=ty == TokenType.CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ]
    tok.add_tokens(special)

    def token(key: str) -> str | None:
        idx = meta(key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    return Tokenizer(
        tok,
        bos_token=token(Keys.TOK_BOS),
        eos_token=token(Keys.TOK_EOS),
        add_bos=bool(meta(Keys.TOK_ADD_BOS, True)),
        chat_template=meta(Keys.CHAT_TEMPLATE),
        source=source,
    )
