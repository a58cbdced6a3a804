"""Benchmark models made the way users get them: a Hugging Face checkpoint, llama.cpp's converter,
llama.cpp's quantizer.

    python tools/make_llamacpp_models.py --shape v2l               # models/v2l-4-<type>.gguf
    python tools/make_llamacpp_models.py --shape v3 --types q4_k_m,q8_0

1. A Hugging Face source folder (config.json, BF16 safetensors shards, tokenizer) of
   DeepseekV2ForCausalLM (``v2l``: DeepSeek-V2-Lite's layer shapes) or DeepseekV3ForCausalLM
   (``v3``: DeepSeek-V3's layer shapes, 32 routed experts in 8 groups) with ``--layers`` layers,
   the first dense. Random weights of standard deviation 1/sqrt(fan_in), norms 1, written tensor
   by tensor from ``--seed``.
2. ``convert_hf_to_gguf.py --outtype bf16`` from the llama.cpp tree vendored in the
   llama-cpp-python sdist of the installed version (``pip download``-ed once into
   models/.llama.cpp/ unless ``--llama-cpp`` names a tree), so that converter and quantizer agree.
3. ``llama_model_quantize`` (llama-cpp-python) to each ``--types`` entry, named like
   ``LLAMA_FTYPE_MOSTLY_<TYPE>`` (``bf16`` keeps the converter's output), without an imatrix.
4. The tensor type mix of every file (count and bytes per ggml type).

Tokenizers: ``deepseek-llm`` (the default for v2l, DeepSeek-V2's real one) is rebuilt from the
vocabulary llama.cpp ships for its tokenizer tests and checked against those tests, so the
converter recognises it unaided. ``deepseek-v3`` (the default for v3) is a small byte-level BPE
with DeepSeek-V3's pre-tokenizer; DeepSeek-V3's own vocabulary is not available offline, so the
converter's pre-tokenizer check (a hash of one encoding, known only for the real vocabularies)
is told the name. Either way the converter pads the vocabulary to ``vocab_size`` (102400 or
129280), which the embeddings keep. Outputs are written under temporary names and renamed when
complete; existing files are kept unless ``--force``. The source folder and the BF16 GGUF are
deleted at the end unless ``--keep-source``. The values are noise: these models measure speed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_TYPES = "q4_k_m,q3_k_m,q2_k,q5_k_m,q6_k,q8_0,iq4_xs,mxfp4_moe"
SHARD_BYTES = 4 << 30
console = Console(stderr=True)

_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
}
# The real config.json values (DeepSeek-V2-Lite; DeepSeek-V3 with 32 routed experts), less layers.
SHAPES: dict[str, dict] = {
    "v2l": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
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
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "torch_dtype": "bfloat16",
    },
    "v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_routed_experts": 32,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    },
}
TOKENIZERS = {"v2l": "deepseek-llm", "v3": "deepseek-v3"}
# Rough bits per weight of each output, for the disk check only (default: Q8_0's).
BITS_PER_WEIGHT = {
    "bf16": 16.0,
    "q8_0": 8.5,
    "q6_k": 6.6,
    "q5_k_m": 5.7,
    "q4_k_m": 4.9,
    "mxfp4_moe": 4.9,
    "iq4_xs": 4.6,
    "q3_k_m": 4.0,
    "q2_k": 3.4,
}


def model_path(shape: str, layers: int, qtype: str, models: Path = MODELS) -> Path:
    """Where this tool writes the ``qtype`` file of ``shape`` with ``layers`` layers."""
    return models / f"{shape}-{layers}-{qtype}.gguf"


def hf_config(shape: str, layers: int) -> dict:
    """The config.json of ``shape`` with ``layers`` layers (at least one MoE layer)."""
    cfg = dict(SHAPES[shape], num_hidden_layers=layers)
    if layers <= cfg["first_k_dense_replace"]:
        raise SystemExit(f"--layers {layers}: {shape} needs more than one layer to have a MoE one.")
    return cfg


# --- the Hugging Face source ------------------------------------------------------------------


def hf_tensors(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every tensor, in model order."""
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r, q_lora = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (H,)
        if q_lora:
            yield p + "self_attn.q_a_proj.weight", (q_lora, H)
            yield p + "self_attn.q_a_layernorm.weight", (q_lora,)
            yield p + "self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora)
        else:
            yield p + "self_attn.q_proj.weight", (heads * (nope + rope), H)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (r + rope, H)
        yield p + "self_attn.kv_a_layernorm.weight", (r,)
        yield p + "self_attn.kv_b_proj.weight", (heads * (nope + v), r)
        yield p + "self_attn.o_proj.weight", (H, heads * v)
        yield p + "post_attention_layernorm.weight", (H,)
        if i < cfg["first_k_dense_replace"]:
            mlps = [("mlp.", cfg["intermediate_size"])]
        else:
            yield p + "mlp.gate.weight", (cfg["n_routed_experts"], H)
            if cfg["topk_method"] == "noaux_tc":
                yield p + "mlp.gate.e_score_correction_bias", (cfg["n_routed_experts"],)
            moe = cfg["moe_intermediate_size"]
            mlps = [(f"mlp.experts.{e}.", moe) for e in range(cfg["n_routed_experts"])]
            mlps.append(("mlp.shared_experts.", moe * cfg["n_shared_experts"]))
        for m, inter in mlps:
            yield p + m + "gate_proj.weight", (inter, H)
            yield p + m + "up_proj.weight", (inter, H)
            yield p + m + "down_proj.weight", (H, inter)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (cfg["vocab_size"], H)


def _dtype(name: str) -> str:
    return "F32" if name.endswith("e_score_correction_bias") else "BF16"  # as DeepSeek ships it


def _nbytes(name: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * (4 if _dtype(name) == "F32" else 2)


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("e_score_correction_bias"):
        return 0.01 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) / shape[1] ** 0.5).bfloat16()


def write_hf_source(cfg: dict, folder: Path, tokenizer: str, llama_cpp: Path, seed: int) -> None:
    """Write config.json, tokenizer files and safetensors shards (at most 4 GiB) into ``folder``.

    Each shard's header is written first and its tensors after it one at a time, so no more
    than one tensor is in memory.
    """
    plan = list(hf_tensors(cfg))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    held = 0
    for name, shape in plan:
        if held and held + _nbytes(name, shape) > SHARD_BYTES:
            shards.append([])
            held = 0
        shards[-1].append((name, shape))
        held += _nbytes(name, shape)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer == "deepseek-llm":
        write_deepseek_llm_tokenizer(tmp, llama_cpp)
    else:
        write_trained_tokenizer(tmp)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns, console=console) as bar:
        task = bar.add_task(f"writing {folder.name}", total=sum(_nbytes(*t) for t in plan))
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape in shard:
                n = _nbytes(name, shape)
                header[name] = {"dtype": _dtype(name), "shape": list(shape)}
                header[name]["data_offsets"] = [offset, offset + n]
                offset += n
                weight_map[name] = file
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(tmp / file, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                for name, shape in shard:
                    data = _random(name, shape, gen).contiguous().view(torch.uint8).numpy()
                    f.write(memoryview(data))
                    bar.advance(task, data.nbytes)
    index = {"metadata": {"total_size": sum(_nbytes(*t) for t in plan)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# --- tokenizers -------------------------------------------------------------------------------

DEEPSEEK_LLM_VOCAB = "models/ggml-vocab-deepseek-llm.gguf"


def _deepseek_llm_pre_regexes(llama_cpp: Path) -> list[str]:
    """The deepseek-llm pre-tokenizer splits, read from llama.cpp's llama-vocab.cpp (its regexes
    are DeepSeek's own; reading them keeps their characters exact)."""
    src = (llama_cpp / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    start = src.index("case LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM:")
    block = src[start : src.index("break;", start)]
    return [
        r.replace("\\\\", "\\").replace("\\r", "\r").replace("\\n", "\n")
        for r in re.findall(r'^\s*"(.*)",\s*$', block, re.M)
    ]


def write_deepseek_llm_tokenizer(folder: Path, llama_cpp: Path) -> None:
    """DeepSeek-V2's tokenizer (deepseek-llm: 100000 BPE tokens, BOS 100000, EOS 100001) as
    tokenizer.json, rebuilt from the vocabulary llama.cpp ships and checked against llama.cpp's
    own tokenizer tests for it."""
    import tokenizers
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

    vocab_file = llama_cpp / DEEPSEEK_LLM_VOCAB
    reader = GGUFReader(vocab_file)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == 1}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    splits = [
        pre_tokenizers.Split(Regex(r), behavior="isolated")
        for r in _deepseek_llm_pre_regexes(llama_cpp)
    ]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    tok.decoder = decoders.ByteLevel()
    bos, eos = tokens[100000], tokens[100001]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (bos, eos)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 100000)]
    )
    cases = Path(f"{vocab_file}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = Path(f"{vocab_file}.out").read_text(encoding="utf-8").split("\n")
    for text, ids in zip(cases, expected, strict=False):
        if tok.encode(text, add_special_tokens=False).ids != [int(x) for x in ids.split()]:
            raise SystemExit(
                f"{vocab_file}: the rebuilt tokenizer fails llama.cpp's test {text!r}."
            )
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 16384,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speed is measured in tokens per second, and bytes read per token decide it.",
    "def main():\n    return sum(x * x for x in range(10))",
] * 4


def write_trained_tokenizer(folder: Path) -> None:
    """A 400-token byte-level BPE with DeepSeek-V3's pre-tokenizer and special tokens."""
    from localseek.demo import SPECIAL_TOKENS, write_bpe_tokenizer

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "add_bos_token": True,
    }
    write_bpe_tokenizer(folder, _CORPUS, 400, tokenizer_config=config)


# --- llama.cpp's converter and quantizer ------------------------------------------------------


def llama_cpp_tree(models: Path) -> Path:
    """The llama.cpp source vendored in the sdist of the installed llama-cpp-python."""
    import llama_cpp

    version = llama_cpp.__version__
    root = models / ".llama.cpp" / f"llama_cpp_python-{version}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    down = models / ".llama.cpp"
    down.mkdir(parents=True, exist_ok=True)
    console.print(f"downloading the llama-cpp-python {version} sdist for llama.cpp's converter")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        + [f"llama-cpp-python=={version}", "-d", str(down)],
        check=True,
    )
    with tarfile.open(down / f"llama_cpp_python-{version}.tar.gz") as tar:
        tar.extractall(down, filter="data")
    return tree


# Runs the converter after telling its pre-tokenizer check a name for a vocabulary it has no
# hash for (argv: script, name, converter arguments...).
_CONVERT_NAMING_PRE = """
import runpy, sys
from pathlib import Path
script, pre = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
from conversion.base import TextModel
detect = TextModel.get_vocab_base_pre
def named(self, tokenizer):
    try:
        return detect(self, tokenizer)
    except NotImplementedError:
        print(f"make_llamacpp_models: pre-tokenizer not recognised, named {pre!r}", flush=True)
        return pre
TextModel.get_vocab_base_pre = named
sys.argv = [str(script), *sys.argv[3:]]
runpy.run_path(str(script), run_name="__main__")
"""


def convert(source: Path, out: Path, llama_cpp: Path, tokenizer: str) -> None:
    """``convert_hf_to_gguf.py --outtype bf16`` from ``source`` into ``out``."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    tmp = out.with_name(f".{out.name}.tmp")
    args = [str(source), "--outtype", "bf16", "--outfile", str(tmp)]
    if tokenizer == "deepseek-llm":  # a vocabulary the converter knows: run it as it comes
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-c", _CONVERT_NAMING_PRE, str(script), tokenizer, *args]
    console.print(f"[bold]converting[/] {source.name} -> {out.name} (llama.cpp's converter)")
    try:
        done = subprocess.run(cmd, cwd=llama_cpp)
        if done.returncode:
            raise SystemExit(f"convert_hf_to_gguf.py failed on {source} (exit {done.returncode}).")
        cfg = json.loads((source / "config.json").read_text())
        if not cfg["q_lora_rank"] and cfg["num_hidden_layers"] not in (26, 27):
            _add_q_lora_rank_0(tmp, out)
        else:
            tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _add_q_lora_rank_0(src: Path, out: Path) -> None:
    """Copy ``src`` to ``out`` adding ``deepseek2.attention.q_lora_rank = 0``.

    llama.cpp tells DeepSeek-V2-Lite (no q_lora) from DeepSeek-V2 by its 26 or 27 layers and
    otherwise requires the key, which the converter leaves out when q_lora_rank is null; 0 makes
    it create the unfactored attn_q it has.
    """
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    console.print(f"adding deepseek2.attention.q_lora_rank = 0 ({out.name} is not 26/27 layers)")
    tmp = out.with_name(f".{out.name}.meta.tmp")
    try:
        reader = gguf.GGUFReader(src)
        writer = gguf.GGUFWriter(tmp, arch="deepseek2", endianess=reader.endianess)
        if (align := reader.get_field(gguf.Keys.General.ALIGNMENT)) is not None:
            writer.data_alignment = align.contents()
        key = {"deepseek2.attention.q_lora_rank": MetadataDetails(gguf.GGUFValueType.UINT32, 0)}
        copy_with_new_metadata(reader, writer, key, [])
        del reader
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)


def quantize(src: Path, out: Path, qtype: str, threads: int) -> list[str]:
    """``llama_model_quantize`` of ``src`` into ``out`` at ``qtype``; returns its warnings."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    log: list[str] = []
    tmp = out.with_name(f".{out.name}.tmp")
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress("[progress.description]{task.description}", *columns, console=console) as bar:
        task = bar.add_task(f"quantizing {out.name}", total=None)

        @llama_cpp.llama_log_callback
        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", "replace")
            log.append(line)
            if m := re.match(r"\[\s*(\d+)/\s*(\d+)\]", line):
                bar.update(task, completed=int(m[1]), total=int(m[2]))

        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params)
            )
            if rc == 0:
                tmp.replace(out)
        finally:
            from llama_cpp._logger import llama_log_callback

            llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
            tmp.unlink(missing_ok=True)
    text = "".join(log)
    if rc != 0:
        why = [ln for ln in text.splitlines() if "fail" in ln or "error" in ln.lower()]
        raise RuntimeError(why[-1].strip() if why else f"llama_model_quantize returned {rc}")
    warnings = {
        re.sub(r"\s+", " ", ln.strip())
        for ln in text.splitlines()
        if "fallback" in ln or "imatrix" in ln.lower() or "importance" in ln
    }
    return sorted(warnings)


# --- what a file holds ------------------------------------------------------------------------


def type_mix(path: Path) -> dict[str, dict[str, int]]:
    """{ggml type name: {"tensors": count, "bytes": bytes}} of a GGUF file, largest first."""
    from gguf import GGUFReader

    mix: dict[str, dict[str, int]] = {}
    for t in GGUFReader(path).tensors:
        entry = mix.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += int(t.n_bytes)
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]["bytes"]))


def roles(path: Path) -> dict[str, dict[str, int]]:
    """{ggml type name: {tensor role (its name less ``blk.N.``): how many tensors}}."""
    from gguf import GGUFReader

    found: dict[str, dict[str, int]] = {}
    for t in GGUFReader(path).tensors:
        role = re.sub(r"^blk\.\d+\.", "", t.name).removesuffix(".weight")
        by_role = found.setdefault(t.tensor_type.name, {})
        by_role[role] = by_role.get(role, 0) + 1
    return found


def show(path: Path) -> None:
    """Print the type mix of one file: per type its tensors, MiB and which tensors they are."""
    from rich.table import Table

    mix, where = type_mix(path), roles(path)
    total: dict[str, int] = {}
    for by_role in where.values():
        for role, n in by_role.items():
            total[role] = total.get(role, 0) + n
    table = Table(title=f"{path.name}: {path.stat().st_size / 2**30:.2f} GiB", title_justify="left")
    for column in ("type", "tensors", "MiB", "which (n of all where split)"):
        table.add_column(column, justify="right" if column in ("tensors", "MiB") else "left")
    for qtype, v in mix.items():
        which = ", ".join(
            role if n == total[role] else f"{role} ({n}/{total[role]})"
            for role, n in sorted(where[qtype].items())
        )
        table.add_row(qtype, str(v["tensors"]), f"{v['bytes'] / 2**20:.1f}", which)
    console.print(table)


# --- the whole job ----------------------------------------------------------------------------


def _check_room(cfg: dict, need_source: bool, quant_types: list[str], models: Path) -> None:
    """Refuse in one sentence when disk or memory cannot hold the job."""
    plan = list(hf_tensors(cfg))
    weights = sum(math.prod(s) for _, s in plan)
    source = 2 * weights if need_source else 0
    quants = sum(weights * BITS_PER_WEIGHT.get(t, 8.5) / 8 for t in quant_types)
    disk = max(source + 2 * weights, 2 * weights + quants) + (1 << 30)
    free = shutil.disk_usage(models).free
    if disk > free:
        raise SystemExit(
            f"{models} has {free / 2**30:.1f} GiB free and this job needs about "
            f"{disk / 2**30:.1f} GiB; free some or ask for fewer --types."
        )
    largest = max(math.prod(s) for _, s in plan) * 4  # the quantizer holds tensors in float32
    memory = 3 * largest + (2 << 30)
    available = psutil.virtual_memory().available
    if memory > available:
        raise SystemExit(
            f"this job needs about {memory / 2**30:.1f} GiB of free memory and "
            f"{available / 2**30:.1f} GiB is available."
        )


def make(
    shape: str,
    layers: int,
    types: list[str],
    *,
    models: Path = MODELS,
    tokenizer: str | None = None,
    llama_cpp: Path | None = None,
    threads: int | None = None,
    seed: int = 0,
    force: bool = False,
    keep_source: bool = False,
) -> list[Path]:
    """Make the ``types`` files of ``shape``; returns their paths (existing ones included)."""
    import llama_cpp as llama

    for t in types:
        if t != "bf16" and not hasattr(llama, f"LLAMA_FTYPE_MOSTLY_{t.upper()}"):
            raise SystemExit(f"--types {t}: llama.cpp has no LLAMA_FTYPE_MOSTLY_{t.upper()}.")
    tokenizer = tokenizer or TOKENIZERS[shape]
    threads = threads or os.cpu_count() or 1
    cfg = hf_config(shape, layers)
    models.mkdir(parents=True, exist_ok=True)
    outs = {t: model_path(shape, layers, t, models) for t in types}
    todo = [t for t, p in outs.items() if force or not p.exists()]
    if not todo:
        for p in outs.values():
            show(p)
        return list(outs.values())
    source = models / f"{shape}-{layers}-hf"
    bf16 = model_path(shape, layers, "bf16", models)
    need_source = not bf16.exists() and not source.exists()
    _check_room(cfg, need_source, [t for t in todo if t != "bf16"], models)
    tree = llama_cpp or llama_cpp_tree(models)
    t0 = time.perf_counter()
    if not bf16.exists() or (force and "bf16" in todo):
        if not source.exists() or force:
            write_hf_source(cfg, source, tokenizer, tree, seed)
            console.print(f"source written in {time.perf_counter() - t0:.0f} s")
        t1 = time.perf_counter()
        convert(source, bf16, tree, tokenizer)
        console.print(f"converted in {time.perf_counter() - t1:.0f} s")
    if not keep_source:
        shutil.rmtree(source, ignore_errors=True)
    refused: dict[str, str] = {}
    for t in todo:
        if t == "bf16":
            continue
        t1 = time.perf_counter()
        try:
            warnings = quantize(bf16, outs[t], t, threads)
        except RuntimeError as e:
            refused[t] = str(e)
            console.print(f"[red]{t}: llama.cpp refused: {e}[/]")
            continue
        console.print(f"{outs[t].name}: {time.perf_counter() - t1:.0f} s")
        for w in warnings:
            console.print(f"    [dim]{w}[/]")
    if not keep_source and "bf16" not in types:
        bf16.unlink(missing_ok=True)
    console.print(f"done in {time.perf_counter() - t0:.0f} s")
    made = [p for t, p in outs.items() if t not in refused and p.exists()]
    for p in made:
        show(p)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2l")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated llama.cpp file types")
    p.add_argument(
        "--tokenizer", choices=("deepseek-llm", "deepseek-v3"), help="default: per shape"
    )
    p.add_argument("--models", type=Path, default=MODELS, help="output folder")
    p.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (default: the sdist's)")
    p.add_argument("--threads", type=int, help="quantizer threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="remake files that exist")
    p.add_argument("--keep-source", action="store_true", help="keep the HF folder and BF16 GGUF")
    p.add_argument("--show", action="store_true", help="only print the type mix of existing files")
    args = p.parse_args(argv)
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if args.show:
        for t in types:
            if (path := model_path(args.shape, args.layers, t, args.models)).exists():
                show(path)
        return 0
    made = make(
        args.shape,
        args.layers,
        types,
        models=args.models,
        tokenizer=args.tokenizer,
        llama_cpp=args.llama_cpp,
        threads=args.threads,
        seed=args.seed,
        force=args.force,
        keep_source=args.keep_source,
    )
    return 0 if len(made) == len(types) else 1


if __name__ == "__main__":
    sys.exit(main())
