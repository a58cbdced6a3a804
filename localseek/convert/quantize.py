"""`localseek quantize`: convert a checkpoint to a quantized GGUF or to DeepSeek's FP8 layout.

GGUF output follows a Q4_K_M-like recipe: routed experts (nearly all of a DeepSeek model's
bytes) at the chosen type; attention, shared experts, dense MLPs, embeddings and lm_head at
``keep``; norms and the router in F32. A tensor whose rows are not a whole number of blocks
falls back to Q8_0, then F16.

FP8 output is the official DeepSeek-V3 safetensors layout: every linear weight inside the
layers (attention, dense MLP, shared and routed experts) as float8_e4m3fn with a float32
``weight_scale_inv`` per 128x128 block; embeddings, lm_head, norms and the router in BF16 (the
router bias in F32); config.json with ``quantization_config``; the tokenizer files beside it.

Both stream tensor by tensor into a temporary file or folder beside the destination, renamed
into place only when complete. A quality report compares the written values with the source:
relative RMSE per tensor class, and optionally the KL divergence of next-token distributions.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from localseek.checkpoint import Checkpoint, expected_shapes, open_checkpoint
from localseek.checkpoint.gguf_names import canonical_expert
from localseek.checkpoint.hf import HF_NAME_TABLE
from localseek.convert.gguf_writer import GGUFTensor, fits, write_gguf
from localseek.errors import LocalseekError
from localseek.options import set_threads
from localseek.quant import dense
from localseek.quant.codecs import WRITABLE, quantize_fp8_block
from localseek.quant.fp8 import FP8_BLOCK

TYPES = ("q4_k", "q4_0", "q8_0", "fp8")
KEEP_TYPES = ("q8_0", "q4_k", "q4_0", "bf16", "f16", "f32")
_FILE_TYPE = {
    "q4_k": LlamaFileType.MOSTLY_Q4_K_M,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
CLASSES = ("attention", "experts", "shared", "dense", "embed/lm_head")
_CLASS_OF = {"embed": "embed/lm_head", "head": "embed/lm_head"}
_RMSE_ROWS = 64  # rows per piece the RMSE is measured on (evenly spaced)
EVAL_TOKENS = 64


@dataclass
class QuantizeReport:
    """What a conversion wrote and how close it is to the source."""

    dst: Path
    source_bytes: int
    output_bytes: int
    seconds: float
    types: dict[str, int] = field(default_factory=dict)  # output type -> tensors
    rel_rmse: dict[str, float] = field(default_factory=dict)  # tensor class -> relative RMSE
    kl: float | None = None  # mean KL(source || output) of next-token distributions, nats
    top1: float | None = None  # share of positions where both pick the same next token
    eval_note: str | None = None  # why the KL evaluation did not run


class _Errors:
    """Squared error and squared reference summed per tensor class."""

    def __init__(self) -> None:
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    def add(self, cls: str, ref: np.ndarray, got: np.ndarray) -> None:
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        self.err[cls] = self.err.get(cls, 0.0) + float(((got64 - ref64) ** 2).sum())
        self.ref[cls] = self.ref.get(cls, 0.0) + float((ref64**2).sum())

    def relative(self) -> dict[str, float]:
        return {
            c: math.sqrt(self.err[c] / self.ref[c]) if self.ref[c] else 0.0
            for c in CLASSES
            if c in self.err
        }


def _sample_rows(n_rows: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, _RMSE_ROWS)).astype(np.int64))


def quantize_model(
    src: str | Path,
    dst: str | Path,
    qtype: str = "q4_k",
    keep: str = "q8_0",
    threads: int | None = None,
    force: bool = False,
    evaluate: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> QuantizeReport:
    """Convert the checkpoint at ``src`` and write it to ``dst``.

    Args:
        src: Hugging Face folder (BF16/F16/F32/FP8) or GGUF file localseek reads.
        dst: a .gguf file, or for ``qtype="fp8"`` a folder.
        qtype: routed-expert type: "q4_k", "q4_0", "q8_0" or "fp8".
        keep: type of attention, shared experts, dense MLPs, embeddings and lm_head (GGUF only).
        threads: CPU threads for numba and torch (None: their defaults).
        force: replace an existing ``dst``.
        evaluate: also load source and output (exact mode) and measure next-token KL.
        progress: called with (source bytes just converted, total source bytes).
    Returns:
        The quality report.
    """
    if qtype not in TYPES:
        raise LocalseekError(f"unknown quantization type '{qtype}' (one of {', '.join(TYPES)}).")
    if keep not in KEEP_TYPES:
        raise LocalseekError(f"unknown --keep type '{keep}' (one of {', '.join(KEEP_TYPES)}).")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and not force:
        raise LocalseekError(f"{dst} already exists (use --force to replace it).")
    if not dst.parent.is_dir():
        raise LocalseekError(f"{dst.parent}: the output folder does not exist.")
    if dst.resolve() == src.resolve():
        raise LocalseekError(f"{dst}: the output would overwrite the source.")
    if threads is not None and threads < 1:
        raise LocalseekError(f"--threads must be at least 1, got {threads}.")
    set_threads(threads)
    start = time.perf_counter()
    errors = _Errors()
    with open_checkpoint(src) as ckpt:
        ckpt.check_complete()
        total = sum(ckpt.nbytes(n) for n in expected_shapes(ckpt.config))

        def advance(n: int) -> None:
            _drop_mapped_pages(ckpt)
            if progress is not None:
                progress(n, total)

        try:
            if qtype == "fp8":
                types = _write_fp8(ckpt, dst, errors, advance)
            else:
                types = _write_quant_gguf(ckpt, dst, qtype, keep, errors, advance)
        except OSError as e:
            raise LocalseekError(f"{dst}: writing failed ({e.strerror or e}).") from e
    out_bytes = sum(f.stat().st_size for f in dst.iterdir()) if dst.is_dir() else dst.stat().st_size
    report = QuantizeReport(
        dst, total, out_bytes, time.perf_counter() - start, types, errors.relative()
    )
    if evaluate:
        _evaluate(src, dst, report)
    return report


def _drop_mapped_pages(ckpt: Checkpoint) -> None:
    """Unmap the source pages read so far from this process (they stay in the page cache).

    A GGUF source is memory-mapped; every page read would otherwise count in RSS until the
    whole file is resident. Nothing writes to the mapping, so dropping pages loses nothing."""
    for reader in getattr(ckpt, "_readers", ()):
        mapping = getattr(reader.data, "_mmap", None)
        if isinstance(mapping, mmap.mmap):
            mapping.madvise(mmap.MADV_DONTNEED)


# --- GGUF -------------------------------------------------------------------------------------


def gguf_recipe(qtype: str, keep: str) -> Callable[[GGUFTensor], GGMLQuantizationType]:
    """The Q4_K_M-like recipe: routed experts at ``qtype``, other matrices at ``keep``."""
    expert_t, keep_t = WRITABLE[qtype], WRITABLE[keep]

    def choose(t: GGUFTensor) -> GGMLQuantizationType:
        if t.kind in ("norm", "router"):
            return GGMLQuantizationType.F32
        want = expert_t if t.kind == "experts" else keep_t
        for candidate in (want, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16):
            if fits(candidate, t.shape):
                return candidate
        return GGMLQuantizationType.F16  # unreachable: F16 fits every row

    return choose


def _write_quant_gguf(
    ckpt: Checkpoint,
    dst: Path,
    qtype: str,
    keep: str,
    errors: _Errors,
    advance: Callable[[int], None],
) -> dict[str, int]:
    types: dict[str, int] = {}
    seen: set[str] = set()

    def on_part(t: GGUFTensor, values: np.ndarray, encoded: np.ndarray) -> None:
        if t.name not in seen:
            seen.add(t.name)
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        if t.kind in ("norm", "router"):
            return
        rows = values.reshape(-1, values.shape[-1])
        pick = _sample_rows(rows.shape[0])
        enc_rows = encoded.reshape(rows.shape[0], -1)[pick]
        if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            got = enc_rows.astype(np.float32)
        else:
            got = dequantize(np.ascontiguousarray(enc_rows).view(np.uint8), t.qtype)
        errors.add(_CLASS_OF.get(t.kind, t.kind), rows[pick], got)

    write_gguf(
        ckpt,
        dst,
        gguf_recipe(qtype, keep),
        on_part=on_part,
        progress=advance,
        file_type=_FILE_TYPE[qtype],
    )
    return types


# --- FP8 safetensors --------------------------------------------------------------------------

_SHARD_BYTES = 4 << 30
_ST_DTYPE = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}


def hf_name(canonical: str) -> str:
    """The Hugging Face name of a canonical tensor name (inverse of checkpoint.hf's table)."""
    for pattern, repl in HF_NAME_TABLE:
        # the table maps HF regex -> canonical template; invert by matching the template
        template = re.escape(repl).replace(r"\\1", r"(\d+)").replace(r"\\2", r"(\d+)")
        m = re.fullmatch(template, canonical)
        if m is None:
            continue
        hf = pattern.pattern.replace("\\.", ".")
        for g in m.groups():
            hf = hf.replace(r"(\d+)", g, 1)
        return hf
    raise LocalseekError(f"no Hugging Face name for tensor '{canonical}'.")


@dataclass
class _STEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()


def fp8_kind(name: str, ndim: int) -> str | None:
    """Class of a canonical tensor written as FP8, or None when it stays BF16/F32."""
    if ndim != 2 or not name.startswith("layers.") or name.endswith(".ffn.gate"):
        return None
    if canonical_expert(name) is not None:
        return "experts"
    if ".ffn.shared." in name:
        return "shared"
    return "dense" if ".ffn." in name else "attention"


def _fp8_plan(ckpt: Checkpoint) -> list[tuple[str, _STEntry, _STEntry | None]]:
    """(canonical name, weight entry, scale entry) for every tensor, in model order."""
    plan = []
    for name, shape in expected_shapes(ckpt.config).items():
        hf = hf_name(name)
        if fp8_kind(name, len(shape)) is not None:
            rows, cols = shape
            scale_shape = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
            plan.append(
                (
                    name,
                    _STEntry(hf, torch.float8_e4m3fn, shape),
                    _STEntry(hf + "_scale_inv", torch.float32, scale_shape),
                )
            )
        else:
            dtype = torch.float32 if name.endswith("gate_bias") else torch.bfloat16
            plan.append((name, _STEntry(hf, dtype, shape), None))
    return plan


def _shards(plan: list[tuple[str, _STEntry, _STEntry | None]]) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, w, s) in enumerate(plan):
        n = w.nbytes + (s.nbytes if s is not None else 0)
        if shards[-1] and size + n > _SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _st_header(entries: list[_STEntry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _ST_DTYPE[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_fp8(
    ckpt: Checkpoint, dst: Path, errors: _Errors, advance: Callable[[int], None]
) -> dict[str, int]:
    plan = _fp8_plan(ckpt)
    shards = _shards(plan)
    types: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        for k, idx in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            entries = [e for i in idx for e in plan[i][1:] if e is not None]
            with open(tmp / fname, "wb") as f:
                f.write(_st_header(entries))
                for i in idx:
                    name, w_entry, s_entry = plan[i]
                    for t in _fp8_tensors(ckpt, name, w_entry, s_entry, errors):
                        f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
                    types[_ST_DTYPE[w_entry.dtype]] = types.get(_ST_DTYPE[w_entry.dtype], 0) + 1
                    advance(ckpt.nbytes(name))
            for e in entries:
                weight_map[e.name] = fname
        if len(shards) > 1:
            total = sum(e.nbytes for _, w, s in plan for e in (w, s) if e is not None)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_hf_config(ckpt, tmp)
        _write_hf_tokenizer(ckpt, tmp)
        _replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return types


def _fp8_tensors(
    ckpt: Checkpoint, name: str, w_entry: _STEntry, s_entry: _STEntry | None, errors: _Errors
) -> Iterator[torch.Tensor]:
    values = dense(ckpt.tensor(name, torch.float32), torch.float32)
    if s_entry is None:
        out = values.to(w_entry.dtype)
        if name in ("embed", "head"):
            errors.add(_CLASS_OF[name], values.numpy(), out.float().numpy())
        yield out
        return
    q, scale = quantize_fp8_block(values)
    kind = fp8_kind(name, 2)
    assert kind is not None
    pick = torch.from_numpy(_sample_rows(values.shape[0]))
    full = scale.repeat_interleave(FP8_BLOCK, 0)[pick].repeat_interleave(FP8_BLOCK, 1)
    got = q[pick].float() * full[:, : values.shape[1]]
    errors.add(kind, values[pick].numpy(), got.numpy())
    yield q
    yield scale


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Move the finished folder ``tmp`` to ``dst``, replacing what is there only now."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.replace(dst, old / "x")
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old / "x", dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_hf_config(ckpt: Checkpoint, folder: Path) -> None:
    source = ckpt.path / "config.json" if ckpt.path.is_dir() else None
    if source is not None and source.is_file():
        raw = json.loads(source.read_text(encoding="utf-8"))
    else:
        raw = _config_from_model(ckpt)
    raw["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    raw["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def _config_from_model(ckpt: Checkpoint) -> dict:
    """An HF config.json for a source without one (a GGUF file)."""
    cfg = ckpt.config
    raw = cfg.to_dict()
    raw["architectures"] = list(cfg.variant.architectures)
    raw["num_key_value_heads"] = cfg.num_attention_heads
    ys = raw.pop("rope_scaling", None)
    if ys is not None:
        raw["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **ys}
    return {k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}


def _write_hf_tokenizer(ckpt: Checkpoint, folder: Path) -> None:
    src = ckpt.tokenizer_dir()
    if src is not None:
        for fname in (
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
            "special_tokens_map.json",
        ):
            if (src / fname).is_file():
                shutil.copy2(src / fname, folder / fname)
        return
    tok = ckpt.tokenizer()
    if tok is None:
        return
    tok.backend.save(str(folder / "tokenizer.json"))
    config = {"add_bos_token": tok.add_bos, "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# --- evaluation -------------------------------------------------------------------------------


def _evaluate(src: Path, dst: Path, report: QuantizeReport) -> None:
    """KL(source || output) of next-token distributions on a fixed token sample."""
    from localseek.engine import load

    try:
        ref_model = load(src, exact=True, ctx=EVAL_TOKENS)
        vocab = ref_model.config.vocab_size
        ids = [int(t) for t in np.random.default_rng(0).integers(0, vocab, EVAL_TOKENS)]
        ref = ref_model.logits(ids).astype(np.float64)
        del ref_model
        got = load(dst, exact=True, ctx=EVAL_TOKENS).logits(ids).astype(np.float64)
    except LocalseekError as e:
        report.eval_note = f"skipped ({e})"
        return
    log_p = ref - _logsumexp(ref)
    log_q = got - _logsumexp(got)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # (tokens,)
    report.kl = float(kl.mean())
    report.top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
