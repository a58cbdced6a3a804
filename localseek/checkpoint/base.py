"""The Checkpoint interface and ``open_checkpoint``, which picks the reader for a path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from localseek.config import ModelConfig
from localseek.errors import CheckpointError
from localseek.quant import Weight
from localseek.tokenizer import Tokenizer


@dataclass(frozen=True)
class FileTensor:
    """One tensor as the file stores it: its name there, storage type and bytes."""

    name: str
    storage_type: str
    nbytes: int
    routed_experts: bool  # a routed expert, or a stack of them


class Checkpoint(ABC):
    """A model on disk: its config, its tensors under canonical names, its tokenizer files."""

    path: Path
    config: ModelConfig

    @abstractmethod
    def names(self) -> list[str]:
        """Canonical names of the tensors the model uses (MTP layers left out)."""

    @abstractmethod
    def tensor(self, name: str, dtype: torch.dtype | None = None) -> Weight:
        """One tensor by canonical name, memory-mapped where the format allows it.

        dtype: float tensors are converted to it while reading (quantized ones stay as stored).
        """

    @abstractmethod
    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the file (quantized data plus scales)."""

    def tokenizer_dir(self) -> Path | None:
        """Folder holding tokenizer.json and tokenizer_config.json, if any."""
        return None

    def tokenizer(self) -> Tokenizer | None:
        """The checkpoint's tokenizer (by default from ``tokenizer_dir()``), or None."""
        folder = self.tokenizer_dir()
        return Tokenizer.from_dir(folder) if folder is not None else None

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release file handles."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check_complete(self) -> None:
        """Fail with one sentence if a tensor the model needs is absent or has a wrong shape,
        naming the tensor as the file names it."""
        have = set(self.names())
        # lazily: a corrupt layer or expert count stops at the first missing tensor
        for name, shape in iter_expected_shapes(self.config):
            if name not in have:
                raise CheckpointError(f"{self.path}: tensor '{self.describe(name)}' is missing.")
            got = tuple(self.shape(name))
            if got != shape:
                what = " per expert" if ".ffn.experts." in name else ""
                raise CheckpointError(
                    f"{self.path}: tensor '{self.describe(name)}' has shape {got}{what}, "
                    f"the config needs {shape}."
                )

    @abstractmethod
    def file_tensors(self) -> list[FileTensor]:
        """Every tensor the file holds, as it holds it (for ``inspect``)."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape of a tensor without reading it."""

    @abstractmethod
    def storage_type(self, name: str) -> str:
        """How the tensor is stored, in the file's own terms (e.g. "BF16", "F8_E4M3", "Q4_K")."""

    def describe(self, name: str) -> str:
        """The tensor's name in the file's own terms, for error messages."""
        return name


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the model needs, with its shape (out, in) for matrices."""
    return dict(iter_expected_shapes(cfg))


def iter_expected_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``expected_shapes`` one (name, shape) at a time, layer by layer (the variant's list)."""
    return cfg.variant.shapes(cfg)


def iter_mla_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The MLA family's (V2, V3) canonical tensors, layer by layer."""
    D = cfg.hidden_size
    yield "embed", (cfg.vocab_size, D)
    yield "norm", (D,)
    if not cfg.tie_word_embeddings:
        yield "head", (cfg.vocab_size, D)
    for i in range(cfg.num_hidden_layers):
        yield from _layer_shapes(cfg, i).items()
        if cfg.is_moe_layer(i):
            for e in range(cfg.n_routed_experts):
                shapes: dict[str, tuple[int, ...]] = {}
                _mlp(shapes, f"layers.{i}.ffn.experts.{e}.", D, cfg.moe_intermediate_size)
                yield from shapes.items()


def _layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Layer i's tensors other than its routed experts."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {}
    p = f"layers.{i}."
    shapes[p + "attn_norm"] = (D,)
    shapes[p + "ffn_norm"] = (D,)
    if cfg.q_lora_rank is None:
        shapes[p + "attn.wq"] = (H * cfg.qk_head_dim, D)
    else:
        shapes[p + "attn.wq_a"] = (cfg.q_lora_rank, D)
        shapes[p + "attn.q_norm"] = (cfg.q_lora_rank,)
        shapes[p + "attn.wq_b"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
    shapes[p + "attn.wkv_a"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
    shapes[p + "attn.kv_norm"] = (cfg.kv_lora_rank,)
    shapes[p + "attn.wkv_b"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    shapes[p + "attn.wo"] = (D, H * cfg.v_head_dim)
    if not cfg.is_moe_layer(i):
        _mlp(shapes, p + "ffn.", D, cfg.intermediate_size)
        return shapes
    shapes[p + "ffn.gate"] = (cfg.n_routed_experts, D)
    if cfg.topk_method == "noaux_tc":
        shapes[p + "ffn.gate_bias"] = (cfg.n_routed_experts,)
    if cfg.n_shared_experts:
        _mlp(shapes, p + "ffn.shared.", D, cfg.n_shared_experts * cfg.moe_intermediate_size)
    return shapes


def optional_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensors a checkpoint may hold besides ``expected_shapes`` (the variant's)."""
    return cfg.variant.optional_shapes(cfg)


def mla_optional_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensors a checkpoint may hold besides ``expected_shapes``: wkv_b split per
    head as llama.cpp's MLA files store it, ``wk_b`` = W_UK transposed (H * kv_lora_rank,
    nope) and ``wv_b`` = W_UV (H * v, kv_lora_rank), which the absorbed decode multiplies
    straight from the stored blocks."""
    H, r = cfg.num_attention_heads, cfg.kv_lora_rank
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.num_hidden_layers):
        shapes[f"layers.{i}.attn.wk_b"] = (H * r, cfg.qk_nope_head_dim)
        shapes[f"layers.{i}.attn.wv_b"] = (H * cfg.v_head_dim, r)
    return shapes


def _mlp(shapes: dict[str, tuple[int, ...]], prefix: str, dim: int, inter: int) -> None:
    shapes[prefix + "w1"] = (inter, dim)
    shapes[prefix + "w3"] = (inter, dim)
    shapes[prefix + "w2"] = (dim, inter)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face checkpoint folder (config.json + safetensors), a GGUF file (single
    or the first of a split set), or a folder holding one GGUF model."""
    from localseek.checkpoint.gguf import GGUFCheckpoint, gguf_in_folder
    from localseek.checkpoint.hf import HFCheckpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory.")
    if p.is_dir():
        if (p / "config.json").is_file():
            return HFCheckpoint(p)
        found = gguf_in_folder(p)
        if found is not None:
            return GGUFCheckpoint(found)
        raise CheckpointError(
            f"{p}: no config.json or .gguf file here, so this is not a model folder."
        )
    if p.suffix == ".gguf" or _has_gguf_magic(p):
        return GGUFCheckpoint(p)
    raise CheckpointError(
        f"{p}: not a model (expected a Hugging Face checkpoint folder or a .gguf file)."
    )


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
