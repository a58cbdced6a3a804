"""Hugging Face checkpoints: config.json plus one or many safetensors shards.

Tensors are opened through the safetensors library, which memory-maps each shard; a tensor is
only read when the model asks for it. FP8 weights (float8_e4m3fn with a ``weight_scale_inv``
per 128x128 block) are served as QTensors and dequantized exactly on use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from localseek.checkpoint.base import Checkpoint, FileTensor
from localseek.config import ModelConfig
from localseek.errors import CheckpointError
from localseek.model.variants import load_config
from localseek.quant import QTensor, Weight
from localseek.quant.formats import FORMATS
from localseek.quant.fp8 import FP8_BLOCK, FP8_QTYPE, fp8_scale_shape

MXFP4_QTYPE = "ggml_mxfp4"
MXFP4_BLOCK = FORMATS[MXFP4_QTYPE].block

_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_ATTN = {
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}

# Hugging Face name -> canonical name. One table; the model never sees these names.
HF_NAME_TABLE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"model\.embed_tokens\.weight", "embed"),
        (r"model\.norm\.weight", "norm"),
        (r"lm_head\.weight", "head"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm"),
        *[
            (rf"model\.layers\.(\d+)\.self_attn\.{hf}\.weight", rf"layers.\1.attn.{c}")
            for hf, c in _ATTN.items()
        ],
        *[
            (rf"model\.layers\.(\d+)\.mlp\.{hf}\.weight", rf"layers.\1.ffn.{c}")
            for hf, c in _MLP.items()
        ],
        (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"layers.\1.ffn.gate"),
        (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"layers.\1.ffn.gate_bias"),
        *[
            (
                rf"model\.layers\.(\d+)\.mlp\.shared_experts\.{hf}\.weight",
                rf"layers.\1.ffn.shared.{c}",
            )
            for hf, c in _MLP.items()
        ],
        *[
            (
                rf"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.{hf}\.weight",
                rf"layers.\1.ffn.experts.\2.{c}",
            )
            for hf, c in _MLP.items()
        ],
    ]
]
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")
# where a weight's block scales are: DeepSeek-V3's "<name>_scale_inv", V4's "<stem>.scale"
_SCALE_SUFFIX = "_scale_inv"
_V4_SCALE = ".scale"


class HFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self.path = path
        self.config: ModelConfig = load_config(path / "config.json")
        self.variant = self.config.variant
        self._check_quantization(self.config.extra.get("quantization_config"))
        self._files: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._buf: torch.Tensor | None = None  # reused by _read_converted
        self._where: dict[str, tuple[Path, str]] = {}  # canonical -> (shard, hf name)
        self._scales: dict[str, str] = {}  # hf weight name -> hf scale name
        try:
            self._index(self._shards())
        except BaseException:
            self.close()
            raise

    def _check_quantization(self, qc: Any) -> None:
        if not qc:
            return
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        block = qc.get("weight_block_size") if isinstance(qc, dict) else None
        fmt = qc.get("fmt", "e4m3") if isinstance(qc, dict) else None
        if method != "fp8" or fmt != "e4m3" or (block and list(block) != [FP8_BLOCK, FP8_BLOCK]):
            raise CheckpointError(
                f"{self.path / 'config.json'}: quantization_config {qc} is not supported "
                f"(localseek reads DeepSeek's fp8 e4m3 with {FP8_BLOCK}x{FP8_BLOCK} blocks)."
            )

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e}).") from e
            shards = sorted({self.path / f for f in weight_map.values()})
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {index.name} is missing.")
            return shards
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{self.path}: no .safetensors weights next to config.json.")
        return shards

    def _index(self, shards: list[Path]) -> None:
        n_layers = self.config.num_hidden_layers
        for shard in shards:
            self._files[shard] = _open_shard(shard)
            self._headers[shard] = _read_header(shard)
            f = self._files[shard]
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if hf_name.endswith(_SCALE_SUFFIX):
                    self._scales[hf_name[: -len(_SCALE_SUFFIX)]] = hf_name
                    continue
                if hf_name.endswith(_V4_SCALE):
                    self._scales[hf_name[: -len(_V4_SCALE)] + ".weight"] = hf_name
                    continue
                layer = _LAYER.match(hf_name)
                if layer and int(layer.group(1)) >= n_layers:
                    continue  # multi-token-prediction layers: not used for inference
                name = self.variant.canonical_name(hf_name)
                if name is not None:
                    self._where[name] = (shard, hf_name)
        experts = [hf for c, (_, hf) in self._where.items() if ".ffn.experts." in c]
        if experts and not self.config.n_routed_experts:
            raise CheckpointError(
                f"{self.path / 'config.json'}: key 'n_routed_experts' is missing or 0, but the "
                f"checkpoint holds routed experts ('{experts[0]}')."
            )

    def names(self) -> list[str]:
        return list(self._where)

    def describe(self, name: str) -> str:
        if name in self._where:
            return self._where[name][1]
        return self.variant.hf_name_of(name) or name

    def file_tensors(self) -> list[FileTensor]:
        return [
            FileTensor(name, entry["dtype"], end - begin, ".experts." in name)
            for _, entries in self._headers.values()
            for name, entry in entries.items()
            if name != "__metadata__"
            for begin, end in [entry["data_offsets"]]
        ]

    def _slice(self, hf_name: str, shard: Path) -> Any:
        return self._files[shard].get_slice(hf_name)

    def shape(self, name: str) -> tuple[int, ...]:
        shard, hf_name = self._where[name]
        s = self._slice(hf_name, shard)
        shape = tuple(s.get_shape())
        if s.get_dtype() in ("I8", "U8") and self._fp4_scale(hf_name, shape) is not None:
            return (shape[0], 2 * shape[1])  # FP4 packed two per byte
        return shape

    def _fp4_scale(self, hf_name: str, packed: tuple[int, ...]) -> Any | None:
        """The e8m0 scale slice of an FP4 weight stored as bytes, if it is one."""
        scale_name = self._scales.get(hf_name)
        if scale_name is None or len(packed) != 2:
            return None
        scale = self._scale_slice(scale_name)
        if tuple(scale.get_shape()) == (packed[0], 2 * packed[1] // MXFP4_BLOCK):
            return scale
        return None

    def storage_type(self, name: str) -> str:
        shard, hf_name = self._where[name]
        return self._slice(hf_name, shard).get_dtype()

    def nbytes(self, name: str) -> int:
        shard, hf_name = self._where[name]
        total = _slice_nbytes(self._slice(hf_name, shard))
        scale_name = self._scales.get(hf_name)
        if scale_name is not None:
            total += _slice_nbytes(self._scale_slice(scale_name))
        return total

    def _scale_slice(self, scale_name: str) -> Any:
        for f in self._files.values():
            if scale_name in f.keys():  # noqa: SIM118
                return f.get_slice(scale_name)
        raise CheckpointError(f"{self.path}: FP8 scale '{scale_name}' is missing.")

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> Weight:
        shard, hf_name = self._where[name]
        file_dtype = self._slice(hf_name, shard).get_dtype()
        if file_dtype == "F4" or (
            file_dtype in ("I8", "U8")
            and self.shape(name) != tuple(self._slice(hf_name, shard).get_shape())
        ):
            return self._fp4(hf_name, self._get(shard, hf_name))
        if file_dtype in _INT_DTYPES:  # tables (tid2eid): never converted
            return self._get(shard, hf_name)
        stored = _DTYPES.get(file_dtype)
        if stored is None:
            raise CheckpointError(
                f"{shard}: tensor '{hf_name}' has dtype "
                f"{self._slice(hf_name, shard).get_dtype()}; localseek reads "
                "F32, F16, BF16, F8_E4M3 and F4 (with an e8m0 scale per 32)."
            )
        if stored == torch.float8_e4m3fn:
            return self._fp8(hf_name, self._get(shard, hf_name))
        if dtype is None or dtype == stored:
            return self._get(shard, hf_name)  # zero-copy: backed by the memory map
        return self._read_converted(shard, hf_name, stored, dtype)

    def _get(self, shard: Path, hf_name: str) -> torch.Tensor:
        try:
            return self._files[shard].get_tensor(hf_name)
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: cannot read tensor '{hf_name}' ({_short(e)}).") from e

    def _read_converted(
        self, shard: Path, hf_name: str, stored: torch.dtype, dtype: torch.dtype
    ) -> torch.Tensor:
        # Read with plain reads into the converted tensor, a chunk at a time through one reused
        # buffer: mapped source pages would stay resident beside the copy, and a whole-tensor
        # temporary fragments the heap (both measured at ~1.4-1.8x the weights at peak).
        header_len, entries = self._headers[shard]
        entry = entries[hf_name]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        flat = out.view(-1)
        itemsize = torch.empty((), dtype=stored).element_size()
        if self._buf is None:
            self._buf = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
        view = memoryview(self._buf.numpy())
        with open(shard, "rb") as f:
            f.seek(8 + header_len + begin)
            done = 0
            while done < flat.numel():
                n = min(flat.numel() - done, _CHUNK_BYTES // itemsize)
                if f.readinto(view[: n * itemsize]) != n * itemsize:
                    raise CheckpointError(
                        f"{shard}: tensor '{hf_name}' runs past the end of the file."
                    )
                flat[done : done + n].copy_(self._buf[: n * itemsize].view(stored))
                done += n
        return out

    def _fp8(self, hf_name: str, data: torch.Tensor) -> QTensor:
        scale_name = self._scales.get(hf_name)
        if scale_name is None or data.dim() != 2:
            raise CheckpointError(
                f"{self.path}: FP8 tensor '{hf_name}' has no 2-D "
                f"'{hf_name}{_SCALE_SUFFIX}' block scale."
            )
        scale = self._scale_slice(scale_name)[:]
        want = fp8_scale_shape(tuple(data.shape))
        if tuple(scale.shape) != want:
            raise CheckpointError(
                f"{self.path}: '{scale_name}' has shape {tuple(scale.shape)}, "
                f"a {tuple(data.shape)} weight in {FP8_BLOCK}x{FP8_BLOCK} "
                f"blocks needs {want}."
            )
        return QTensor(FP8_QTYPE, tuple(data.shape), data, _scale_float(scale))

    def _fp4(self, hf_name: str, data: torch.Tensor) -> QTensor:
        """An FP4 e2m1 weight (two per byte, element 2i in the low nibble) with one e8m0
        exponent per 32, repacked losslessly into ggml's MXFP4 blocks, which the kernels run
        from: per 32 values the exponent byte, then 16 bytes holding values j and j + 16."""
        packed = data.view(torch.uint8)
        rows, half = packed.shape
        scale_name = self._scales.get(hf_name)
        want = (rows, 2 * half // MXFP4_BLOCK)
        scale = None if scale_name is None else self._scale_slice(scale_name)[:]
        if scale is None or tuple(scale.shape) != want:
            got = "none" if scale is None else tuple(scale.shape)
            raise CheckpointError(
                f"{self.path}: FP4 tensor '{hf_name}' needs a {want} e8m0 scale "
                f"('{hf_name[: -len('.weight')]}.scale'), found {got}."
            )
        return QTensor(MXFP4_QTYPE, (rows, 2 * half), mxfp4_blocks(packed, scale.view(torch.uint8)))

    def tokenizer_dir(self) -> Path | None:
        return self.path if (self.path / "tokenizer.json").is_file() else None

    def close(self) -> None:
        self._files.clear()
        self._headers.clear()
        self._buf = None


def _scale_float(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as float32: V3's are float32 already, V4's e8m0 (a power of two each)."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.to(torch.float32)


def mxfp4_blocks(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 (rows, cols / 2) FP4 codes + uint8 (rows, cols / 32) e8m0 exponents -> ggml MXFP4
    blocks uint8 (rows, cols / 32 * 17). The codes index the same table; bits only move."""
    rows, half = packed.shape
    n = 2 * half // MXFP4_BLOCK
    src = packed.reshape(rows, n, 16)
    vals = torch.stack((src & 0x0F, src >> 4), dim=-1).reshape(rows, n, 32)  # in order
    codes = vals[..., :16] | (vals[..., 16:] << 4)
    return torch.cat([scale.reshape(rows, n, 1), codes], dim=-1).reshape(rows, n * 17)


_CHUNK_BYTES = 4 << 20
_INT_DTYPES = ("I64", "I32", "I16", "U8", "I8")
_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}


def _open_shard(shard: Path) -> Any:
    """safe_open, with a damaged file said in one sentence: the library validates the header
    (JSON, dtypes, that the tensors tile the data exactly, sizes = shape x dtype), and the
    checks here only give its faults the file's words ("empty", "truncated")."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{shard}: cannot be read ({e.strerror or e}).") from e
    if size == 0:
        raise CheckpointError(f"{shard}: the file is empty (0 bytes), not a safetensors file.")
    if size < 8:
        raise CheckpointError(f"{shard}: truncated: the file ends inside the header length.")
    header_len = int.from_bytes(head, "little")
    if header_len > size - 8:
        raise CheckpointError(
            f"{shard}: truncated or corrupt: the header length says {header_len} bytes, the "
            f"file holds {size - 8} after it."
        )
    try:
        return safe_open(str(shard), framework="pt")
    except (SafetensorError, OSError) as e:
        end = _data_end(shard, header_len)
        if end is not None and 8 + header_len + end > size:
            raise CheckpointError(
                f"{shard}: truncated: its tensors need {8 + header_len + end} bytes, the file "
                f"has {size}."
            ) from e
        raise CheckpointError(f"{shard}: not a readable safetensors file ({_short(e)}).") from e


def _data_end(shard: Path, header_len: int) -> int | None:
    """The end of the last tensor's data as the header states it, or None if it says none."""
    try:
        _, entries = _read_header(shard)
        return max(int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _read_header(shard: Path) -> tuple[int, dict[str, Any]]:
    """The safetensors header (length, entries). Read by hand because the library does not
    expose the data offsets that chunked reads (``_read_converted``) need; safe_open has
    already validated it."""
    with open(shard, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return header_len, json.loads(f.read(header_len))


def _slice_nbytes(s: Any) -> int:
    n = 1
    for d in s.get_shape():
        n *= d
    if s.get_dtype() == "F4":
        return n // 2
    itemsize = {
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "F8_E4M3": 1,
        "F8_E8M0": 1,
        "F64": 8,
        "I64": 8,
        "I32": 4,
        "U8": 1,
        "I8": 1,
        "BOOL": 1,
    }.get(s.get_dtype(), 4)
    return n * itemsize


def _short(e: Exception) -> str:
    return str(e).strip().rstrip(".").split("\n")[0]
