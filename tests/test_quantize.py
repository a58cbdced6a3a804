"""`localseek quantize`: our quantizers write llama.cpp's bytes, the files run in llama.cpp and
localseek alike, FP8 output reads back through the HF path, and bad input leaves DST alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_util as gu
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from procs import default_signals
from safetensors.torch import save_file

import localseek
from localseek.checkpoint import expected_shapes, open_checkpoint
from localseek.checkpoint.gguf import GGUFCheckpoint
from localseek.cli.main import main as cli
from localseek.convert.gguf_writer import write_gguf
from localseek.convert.quantize import hf_name
from localseek.demo import _TINY_CONFIG, random_state
from localseek.quant import dense
from localseek.quant.codecs import quantize

IDS = [0, 5, 77, 130, 200, 9, 31, 250, 3, 100, 42, 7]
# rows of 256 values everywhere a K-quant needs them (hidden, expert and dense MLP widths)
CONFIG = {
    **_TINY_CONFIG,
    "vocab_size": gu.VOCAB,
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 2,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
}


def _close(a: np.ndarray, b: np.ndarray, rel: float = 1e-3) -> float:
    diff = float(np.abs(a - b).max())
    assert diff <= rel * float(np.abs(b).max()), f"max|diff| {diff} vs max|logit| {np.abs(b).max()}"
    return diff


def write_source(path: Path, cfg: dict, seed: int = 3, dtype=torch.float32) -> Path:
    path.mkdir(parents=True)
    state = {k: v.to(dtype) for k, v in random_state(cfg, seed).items()}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    gu.write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("quant") / "src", CONFIG)


@pytest.fixture(scope="module")
def f32_gguf(source: Path) -> Path:
    with open_checkpoint(source) as ckpt:
        return write_gguf(ckpt, source.parent / "f32.gguf", "f32")[0]


def _quantize(*args: str) -> int:
    return cli(["quantize", *args, "--no-eval"])


def _tensors(path: Path) -> dict[str, tuple[GGMLQuantizationType, bytes]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (GGMLQuantizationType(t.tensor_type), t.data.tobytes()) for t in reader.tensors}


# --- the quantizers against ggml's own -------------------------------------------------------


def _hard_rows() -> np.ndarray:
    """Rows that exercise every branch: zeros, constants, one sign, outliers, tiny values."""
    rng = np.random.default_rng(0)
    rows = [
        rng.standard_normal(512) * rng.uniform(0.01, 10),
        np.zeros(512),
        np.full(512, 0.37),
        np.abs(rng.standard_normal(512)),
        -np.abs(rng.standard_normal(512)) * 3,
        rng.standard_t(2, 512),  # heavy tails
        rng.standard_normal(512) * 1e-6,  # float16 subnormal scales
        np.where(rng.random(512) < 0.9, 0.0, rng.standard_normal(512)),  # sparse
        np.round(rng.standard_normal(512) * 4) / 4,  # values on a grid: rounding ties
    ]
    rows += list(rng.standard_normal((23, 512)) * rng.uniform(0.001, 100, (23, 1)))
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q8_0", "Q4_0"])
def test_quantizers_write_ggml_bytes(type_name) -> None:
    values = _hard_rows()
    theirs, _ = gu.ggml_roundtrip(type_name, values)
    ours = quantize(values, GGMLQuantizationType[type_name])
    assert ours.tobytes() == theirs


# llama-cpp-python's log callback trips over a token piece cut mid-UTF-8 while quantizing
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "qtype,keep,ftype,compared",
    [
        ("q4_k", "q4_k", 15, GGMLQuantizationType.Q4_K),
        ("q8_0", "q8_0", 7, GGMLQuantizationType.Q8_0),
    ],
)
def test_same_bytes_as_llama_model_quantize(
    qtype, keep, ftype, compared, source, f32_gguf, tmp_path
):
    theirs_path = tmp_path / "llama.gguf"
    gu.llama_quantize(f32_gguf, theirs_path, ftype)
    assert _quantize(str(source), str(tmp_path / "ours.gguf"), "--type", qtype, "--keep", keep) == 0
    ours, theirs = _tensors(tmp_path / "ours.gguf"), _tensors(theirs_path)
    both = [n for n in ours if ours[n][0] == compared and theirs[n][0] == compared]
    assert any("_exps" in n for n in both) and len(both) >= 6, both
    for name in both:
        assert ours[name][1] == theirs[name][1], name
    print(f"{qtype}: {len(both)} {compared.name} tensors byte-identical with llama.cpp's")


# --- quantized files run in llama.cpp and localseek ------------------------------------------


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0"])
def test_quantized_file_matches_llama_cpp(qtype, source, tmp_path) -> None:
    out = tmp_path / f"{qtype}.gguf"
    assert _quantize(str(source), str(out), "--type", qtype) == 0
    with GGUFCheckpoint(out) as ck:
        types = {GGMLQuantizationType(t.tensor_type).name for _, t in ck._tensors.values()}
        assert ("Q4_K" if qtype == "q4_k" else "Q8_0") in types
        deq = write_gguf(ck, tmp_path / "deq.gguf", "f32")[0]  # the same values, as F32
    model = localseek.load(out, exact=True)
    reference = gu.llama_logits(deq, IDS)
    diff = _close(model.logits(IDS), reference)
    greedy = list(model.generate(IDS, 6))
    assert greedy == gu.llama_greedy(deq, IDS, len(greedy))
    assert len(gu.llama_greedy(out, IDS, 4)) == 4  # llama.cpp runs our file itself
    print(f"{qtype} ({', '.join(sorted(types))}): vs llama.cpp on dequantised F32 {diff:.2e}")


def test_fp8_reads_back_and_matches_transformers(source, tmp_path) -> None:
    from transformers import DeepseekV3ForCausalLM

    out = tmp_path / "fp8"
    assert _quantize(str(source), str(out), "--type", "fp8") == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    state = {}
    with open_checkpoint(out) as ck:
        assert ck.storage_type("layers.1.ffn.experts.3.w2") == "F8_E4M3"
        assert ck.storage_type("layers.0.attn.wq_a") == "F8_E4M3"
        for name in expected_shapes(ck.config):
            state[hf_name(name)] = dense(ck.tensor(name, torch.float32), torch.float32)
    save_file(state, str(ref_dir / "model.safetensors"))
    (ref_dir / "config.json").write_text((source / "config.json").read_text())
    ref = DeepseekV3ForCausalLM.from_pretrained(ref_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0].numpy()
    got = localseek.load(out, exact=True).logits(IDS)
    _close(got, want, rel=1e-4)


# --- bad input ------------------------------------------------------------------------------


def _run(capsys, *args: str) -> tuple[int, str]:
    """The CLI in-process (a subprocess per case costs seconds of imports): (exit code, stderr)."""
    capsys.readouterr()
    code = cli(["quantize", *args, "--no-eval"])
    return code, capsys.readouterr().err


def _one_sentence(result: tuple[int, str], *needles: str) -> None:
    code, err = result
    assert code != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_type_and_existing_dst(source, tmp_path, capsys) -> None:
    dst = tmp_path / "out.gguf"
    _one_sentence(_run(capsys, str(source), str(dst), "--type", "q3_x"), "q3_x")
    assert not dst.exists()
    dst.write_bytes(b"keep me")
    _one_sentence(_run(capsys, str(source), str(dst), "--type", "q8_0"), str(dst), "--force")
    assert dst.read_bytes() == b"keep me"


def test_source_failing_midway_leaves_dst_untouched(tmp_path, capsys) -> None:
    cfg = {**CONFIG, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32}
    src = write_source(tmp_path / "src", cfg)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(
            data[: len(data) // 2] if f.suffix == ".safetensors" else data
        )
    # a readable file whose last layer's tensor has a dtype no reader takes: fails mid-write
    late = tmp_path / "late"
    late.mkdir()
    state = {k: v for k, v in random_state(cfg, 1).items()}
    state["model.layers.1.mlp.experts.7.down_proj.weight"] = state[
        "model.layers.1.mlp.experts.7.down_proj.weight"
    ].to(torch.float64)
    save_file(state, str(late / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (late / f).write_bytes((src / f).read_bytes())
    out = tmp_path / "out"
    (out / "m-fp8").mkdir(parents=True)
    (out / "m-fp8" / "old").write_text("the previous model")
    (out / "m.gguf").write_text("the previous model")
    for bad in (truncated, late):
        for qtype, name in (("q4_0", "m.gguf"), ("fp8", "m-fp8")):
            _one_sentence(
                _run(capsys, str(bad), str(out / name), "--type", qtype, "--force"), str(bad)
            )
            assert (out / "m.gguf").read_text() == "the previous model"
            assert [p.name for p in (out / "m-fp8").iterdir()] == ["old"]
            assert sorted(p.name for p in out.iterdir()) == ["m-fp8", "m.gguf"]  # no temp files


# --- memory ----------------------------------------------------------------------------------

PROBE = r"""
import json, sys
from localseek.convert.quantize import quantize_model

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

rss0 = rss()
quantize_model(sys.argv[1], sys.argv[2], sys.argv[3], evaluate=False)
print(json.dumps({"rss0": rss0, "peak": peak_rss()}))
"""


def test_quantize_streams_tensor_by_tensor(tmp_path) -> None:
    cfg = {
        **_TINY_CONFIG,
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "kv_lora_rank": 256,
        "q_lora_rank": 384,
    }
    src = write_source(tmp_path / "src", cfg, dtype=torch.bfloat16)
    size = (src / "model.safetensors").stat().st_size
    largest = max(int(np.prod(s)) for s in expected_shapes_of(cfg)) * 4  # float32 bytes
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(src), str(tmp_path / "q.gguf"), "q8_0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "NUMBA_NUM_THREADS": "2"},
    )
    m = json.loads(out.stdout)
    growth = m["peak"] - m["rss0"]
    print(
        f"{size / 2**20:.0f} MiB BF16 source: peak RSS growth {growth / 2**20:.0f} MiB, "
        f"largest tensor {largest / 2**20:.0f} MiB as float32"
    )
    # holding the model would take 2x its BF16 bytes as float32; streaming holds ~one tensor
    assert growth < 0.5 * size + largest, growth / 2**20


def expected_shapes_of(cfg: dict) -> list[tuple[int, ...]]:
    from localseek.config import ModelConfig

    return list(expected_shapes(ModelConfig.from_hf_dict(cfg)).values())


# --- signals ----------------------------------------------------------------------------------

# the CLI in a real process, its writing held after the first tensor so that a signal lands
# mid-run, with the temporary file or folder beside DST
SLOW_QUANTIZE = r"""
import sys, time
import localseek.convert.quantize as convert

real = convert.quantize_model

def held(*args, progress=None, **kw):
    def step(n, total):
        progress(n, total)
        print("writing", flush=True)
        time.sleep(120)
    return real(*args, progress=step, **kw)

convert.quantize_model = held
from localseek.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("qtype, name", [("q4_0", "m.gguf"), ("fp8", "m-fp8")])
@pytest.mark.parametrize(
    "signum, said",
    [
        (signal.SIGTERM, "localseek: stopped by SIGTERM"),
        (signal.SIGHUP, "localseek: stopped by SIGHUP"),
        (signal.SIGINT, "localseek: interrupted"),
    ],
)
def test_signal_mid_run_removes_the_temporary_output(source, tmp_path, qtype, name, signum, said):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_QUANTIZE, "quantize", str(source), str(out / name)]
        + ["--type", qtype, "--no-eval"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )
    assert proc.stdout.readline() == "writing\n", proc.communicate(timeout=60)[1]
    hidden = [p.name for p in out.iterdir()]
    assert len(hidden) == 1 and hidden[0].startswith(f".{name}."), hidden  # mid-run
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert err == said + "\n"
    assert list(out.iterdir()) == []


def test_help_lists_the_library_types() -> None:
    from localseek.cli.quantize import KEEP_TYPE_NAMES, TYPE_NAMES
    from localseek.convert.quantize import KEEP_TYPES, TYPES

    assert (TYPE_NAMES, KEEP_TYPE_NAMES) == (TYPES, KEEP_TYPES)
