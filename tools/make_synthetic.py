"""Shape-faithful random DeepSeek models for speed work: real per-layer dimensions, fewer layers.

    python tools/make_synthetic.py --arch v2-lite --layers 4 --out models/v2lite-4l-q4km.gguf
    python tools/make_synthetic.py --arch v3 --layers 5 --out models/v3-5l-q4km.gguf
    python tools/make_synthetic.py --arch v2-lite --layers 4 --format fp8 --out models/v2lite-4l-fp8

The GGUF recipe is Q4_K_M-like: routed experts Q4_K (Q4_0, the same 4.5 bits per weight, where
a row is not a multiple of Q4_K's 256: V2-Lite's down projection has 1408; llama.cpp falls back
to Q5_0 there, which the CPU kernels do not run yet), every other matrix (attention, shared
experts, dense MLPs, embeddings, lm_head) Q8_0, norms and routers F32. ``--format fp8`` writes
a Hugging Face folder in DeepSeek's official FP8 layout instead (float8_e4m3fn matrices in the
layers with 128x128 ``weight_scale_inv`` blocks; embeddings, lm_head, norms and routers BF16,
the router bias F32), in safetensors shards of at most 2 GiB with an index.

The quantized blocks are drawn directly (random codes with scales chosen so that every weight
matrix has standard deviation 1/sqrt(fan_in)) instead of quantizing random floats: a V3 layer's
experts are 11 G weights, which no quantizer here would finish in useful time, and the speed of
a kernel does not depend on where its codes came from. Everything is written tensor by tensor
(the largest piece held at once is one tensor), deterministically from ``--seed``, into a
temporary file renamed when complete. The values are noise: these models measure speed only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from localseek.checkpoint.base import expected_shapes
from localseek.checkpoint.gguf_names import (
    ARCH,
    ATTN_K_B,
    ATTN_V_B,
    CANONICAL_TO_GGUF,
    EXPERT_STACK_OF,
)
from localseek.config import ModelConfig
from localseek.convert.gguf_writer import write_config, write_tokenizer_metadata
from localseek.demo import write_bpe_tokenizer
from localseek.quant.fp8 import FP8_BLOCK
from localseek.tokenizer import Tokenizer

Q4_K, Q4_0, Q8_0 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q8_0
F32 = GGMLQuantizationType.F32

# The real models' config.json values (DeepSeek-V2-Lite and DeepSeek-V3), layers set by --layers.
ARCHS: dict[str, dict] = {
    "v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_attention_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
    "v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_attention_heads": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    },
}
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speed is measured in tokens per second, and bytes read per token decide it.",
    "def main():\n    return sum(x * x for x in range(10))",
] * 4


def synthetic_config(arch: str, layers: int) -> dict:
    """The HF config dict of ``arch`` with ``layers`` layers (at least one MoE layer)."""
    cfg = dict(ARCHS[arch])
    if layers <= cfg["first_k_dense_replace"]:
        raise SystemExit(
            f"--layers {layers}: {arch} has {cfg['first_k_dense_replace']} dense layers first; "
            "ask for more so that some layers are MoE."
        )
    cfg["num_hidden_layers"] = layers
    return cfg


# --- random quantized blocks ------------------------------------------------------------------


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def random_q4_k(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) of Q4_K blocks whose weights have std ~ 1/sqrt(cols).

    Every sub-block scale is 32 and every min 32 with dmin = 7.5 d, so w = 32 d (q - 7.5), zero
    mean; the 6-bit scale/min packing is the same byte pattern in every block.
    """
    nb = cols // 256
    d = (1.0 / np.sqrt(cols) / (32 * 4.61)) * (1.0 + 0.1 * rng.standard_normal((rows, nb)))
    out = np.empty((rows, nb, 144), dtype=np.uint8)
    out[:, :, 0:2] = _f16_bytes(d.astype(np.float32))
    out[:, :, 2:4] = _f16_bytes((7.5 * d).astype(np.float32))
    # 6-bit scales/mins 0..3 sit in the low bits of bytes 0..3 / 4..7; those of 4..7 keep their
    # low nibbles in bytes 8..11 (0 for 32) and their top two bits in bits 6-7 of bytes 0..7
    out[:, :, 4:12] = 32 | ((32 >> 4) << 6)
    out[:, :, 12:16] = 0
    out[:, :, 16:] = rng.integers(0, 256, size=(rows, nb, 128), dtype=np.uint8)
    return out.reshape(rows, nb * 144)


def random_q4_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) of Q4_0 blocks whose weights have std ~ 1/sqrt(cols) (and, as
    Q4_0 is d (q - 8), a mean of -0.11 std)."""
    nb = cols // 32
    d = (1.0 / np.sqrt(cols) / 4.61) * (1.0 + 0.1 * rng.standard_normal((rows, nb)))
    out = np.empty((rows, nb, 18), dtype=np.uint8)
    out[:, :, 0:2] = _f16_bytes(d.astype(np.float32))
    out[:, :, 2:] = rng.integers(0, 256, size=(rows, nb, 16), dtype=np.uint8)
    return out.reshape(rows, nb * 18)


def random_q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) of Q8_0 blocks whose weights have std ~ 1/sqrt(cols)."""
    nb = cols // 32
    d = (1.0 / np.sqrt(cols) / 73.3) * (1.0 + 0.1 * rng.standard_normal((rows, nb)))
    out = np.empty((rows, nb, 34), dtype=np.uint8)
    out[:, :, 0:2] = _f16_bytes(d.astype(np.float32))
    out[:, :, 2:] = rng.integers(-127, 128, size=(rows, nb, 32), dtype=np.int8).view(np.uint8)
    return out.reshape(rows, nb * 34)


# --- the tensors ------------------------------------------------------------------------------

Maker = Callable[[np.random.Generator], np.ndarray]


def _matrix(
    qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> tuple[GGMLQuantizationType, Maker]:
    *lead, rows, cols = shape
    make_rows = {Q4_K: random_q4_k, Q4_0: random_q4_0, Q8_0: random_q8_0}[qtype]

    def make(rng: np.random.Generator) -> np.ndarray:
        n = int(np.prod(lead, dtype=np.int64)) if lead else 1
        return make_rows(rng, n * rows, cols).reshape(*lead, rows, -1)

    return qtype, make


def _vector(shape: tuple[int, ...], mean: float, std: float) -> tuple[GGMLQuantizationType, Maker]:
    def make(rng: np.random.Generator) -> np.ndarray:
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    return F32, make


def gguf_tensors(
    cfg: ModelConfig,
) -> Iterator[tuple[str, tuple[int, ...], GGMLQuantizationType, Maker]]:
    """(GGUF name, logical numpy shape, type, maker) in file order."""
    H, nope, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for name, shape in expected_shapes(cfg).items():
        if ".ffn.experts." in name:
            layer, e, proj = name.split(".")[1], int(name.split(".")[4]), name.split(".")[5]
            if e == 0:  # one (E, out, in) stack per layer and projection
                stack = (cfg.n_routed_experts, *shape)
                qtype = Q4_K if shape[1] % 256 == 0 else Q4_0
                yield EXPERT_STACK_OF[proj].format(i=layer), stack, *_matrix(qtype, stack)
            continue
        if name.endswith(".attn.wkv_b"):  # split per head, as current llama.cpp files are
            i = name.split(".")[1]
            yield ATTN_K_B.format(i=i), (H, r, nope), *_matrix(Q8_0, (H, r, nope))
            yield ATTN_V_B.format(i=i), (H, v, r), *_matrix(Q8_0, (H, v, r))
            continue
        if name.startswith("layers."):
            i = name.split(".")[1]
            gguf_name = CANONICAL_TO_GGUF[name.replace(f"layers.{i}.", "layers.{i}.", 1)].format(
                i=i
            )
        else:
            gguf_name = CANONICAL_TO_GGUF[name]
        if name.endswith("gate_bias"):
            yield gguf_name, shape, *_vector(shape, 0.0, 0.01)
        elif len(shape) == 1:
            yield gguf_name, shape, *_vector(shape, 1.0, 0.05)
        elif name.endswith("ffn.gate"):  # router: F32, as every converter keeps it
            yield gguf_name, shape, *_vector(shape, 0.0, 1.0 / np.sqrt(shape[1]))
        elif shape[-1] % 32:
            raise SystemExit(f"{name}: rows of {shape[-1]} do not fill Q8_0 blocks")
        else:
            yield gguf_name, shape, *_matrix(Q8_0, shape)


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def write_synthetic_gguf(arch: str, layers: int, out: Path, seed: int = 0) -> Path:
    """Write the shape-faithful random model as one GGUF file; returns its path."""
    raw = synthetic_config(arch, layers)
    cfg = ModelConfig.from_hf_dict(raw, source=f"synthetic {arch}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tok_dir:
        write_bpe_tokenizer(Path(tok_dir), _CORPUS, 400)
        tok = Tokenizer.from_dir(Path(tok_dir))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = GGUFWriter(tmp, ARCH)
        w.add_name(f"localseek synthetic {arch} {layers} layers (random weights)")
        write_config(w, cfg, mla=True)
        write_tokenizer_metadata(w, tok, cfg.vocab_size)
        plan = list(gguf_tensors(cfg))
        for name, shape, qtype, _ in plan:
            w.add_tensor_info(
                name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        total = sum(_nbytes(shape, qtype) for _, shape, qtype, _ in plan)
        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress("[progress.description]{task.description}", *columns) as bar:
            task = bar.add_task(f"writing {out.name}", total=total)
            for *_, make in plan:
                data = make(rng)
                w.write_tensor_data(data)
                bar.advance(task, data.nbytes)
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


FP8_SHARD_BYTES = 2 << 30


def _fp8_tensors(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """(canonical name, shape, written as FP8) in model order."""
    from localseek.convert.quantize import fp8_kind

    for name, shape in expected_shapes(cfg).items():
        yield name, shape, fp8_kind(name, len(shape)) is not None


def _fp8_pair(gen: torch.Generator, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of std ~1 and float32 block scales 1/sqrt(cols): weights of std 1/sqrt(fan_in)."""
    codes = torch.randn(rows, cols, generator=gen).clamp_(-448, 448).to(torch.float8_e4m3fn)
    blocks = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    jitter = 1.0 + 0.1 * torch.randn(blocks, generator=gen)
    return codes, (jitter / cols**0.5).float()


def write_synthetic_fp8(arch: str, layers: int, out: Path, seed: int = 0) -> Path:
    """Write the shape-faithful random model as an FP8 Hugging Face folder; returns it."""
    from safetensors.torch import save_file

    from localseek.convert.quantize import hf_name

    raw = synthetic_config(arch, layers)
    cfg = ModelConfig.from_hf_dict(raw, source=f"synthetic {arch}")
    raw["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    raw["torch_dtype"] = "bfloat16"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    gen = torch.Generator().manual_seed(seed)
    plan = list(_fp8_tensors(cfg))
    total = sum(int(np.prod(s)) * (1 if fp8 else 2) for _, s, fp8 in plan)
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard.clear()

    try:
        write_bpe_tokenizer(tmp, _CORPUS, 400)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress("[progress.description]{task.description}", *columns) as bar:
            task = bar.add_task(f"writing {out.name}", total=total)
            held = 0
            for name, shape, fp8 in plan:
                hf = hf_name(name)
                if fp8:
                    codes, scale = _fp8_pair(gen, *shape)
                    shard[hf], shard[hf + "_scale_inv"] = codes, scale
                    n = codes.numel()
                elif name.endswith("gate_bias"):
                    shard[hf] = 0.01 * torch.randn(shape, generator=gen)
                    n = 2 * shard[hf].numel()
                elif len(shape) == 1:
                    shard[hf] = (1.0 + 0.05 * torch.randn(shape, generator=gen)).bfloat16()
                    n = 2 * shard[hf].numel()
                else:  # embeddings, lm_head, routers
                    shard[hf] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).bfloat16()
                    n = 2 * shard[hf].numel()
                held += n
                bar.advance(task, n)
                if held >= FP8_SHARD_BYTES:
                    flush()
                    held = 0
            if shard:
                flush()
        n = len(files)
        weight_map = {}
        for i, (name, keys) in enumerate(files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (tmp / name).rename(tmp / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp makes 0700
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="v2-lite")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("gguf", "fp8"), default="gguf")
    p.add_argument("--out", type=Path, required=True, help="output .gguf file or FP8 folder")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"{args.out} exists; pass --force to replace it.", file=sys.stderr)
        return 1
    if args.format == "fp8":
        path = write_synthetic_fp8(args.arch, args.layers, args.out, args.seed)
        size = sum(f.stat().st_size for f in path.iterdir())
    else:
        path = write_synthetic_gguf(args.arch, args.layers, args.out, args.seed)
        size = path.stat().st_size
    print(f"wrote {path} ({size / 2**30:.2f} GiB, {args.arch}, {args.layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
