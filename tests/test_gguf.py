"""GGUF: our writer's files run in llama.cpp, our reader runs llama.cpp's files, and both agree
with each other and with transformers."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import gguf_util as gu
import models
import numpy as np
import pytest
import torch

import localseek
from localseek.checkpoint import open_checkpoint
from localseek.checkpoint.base import optional_shapes
from localseek.checkpoint.gguf import GGUFCheckpoint
from localseek.convert.gguf_writer import write_gguf
from localseek.errors import CheckpointError
from localseek.quant import QTensor
from localseek.quant.ggml import GGML_QTYPES

IDS = [0, 5, 77, 130, 200, 9, 31, 250, 3, 100, 42, 7]


def _close(a: np.ndarray, b: np.ndarray, rel: float = 1e-3) -> float:
    diff = float(np.abs(a - b).max())
    assert diff <= rel * float(np.abs(b).max()), f"max|diff| {diff} vs max|logit| {np.abs(b).max()}"
    return diff


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    out = {}
    for kind, over in [
        ("v3", {}),
        ("v2_lite", {}),
        ("v3_q", {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2}),
        # nope 32: attn_k_b rows are whole Q8_0 blocks, so the absorbed decode runs from them
        (
            "v2_lite_q",
            {
                "hidden_size": 256,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "qk_nope_head_dim": 32,
            },
        ),
    ]:
        path = tmp_path_factory.mktemp(kind)
        model = models.build(kind.removesuffix("_q"), path, seed=3, vocab_size=gu.VOCAB, **over)
        gu.write_tokenizer(path)
        out[kind] = (path, model)
    return out


@pytest.fixture(scope="module")
def f32_files(hf_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    files = {}
    for kind, (path, _) in hf_models.items():
        with open_checkpoint(path) as ckpt:
            files[kind] = write_gguf(ckpt, d / f"{kind}.gguf", "f32")[0]
    with open_checkpoint(hf_models["v2_lite"][0]) as ckpt:
        files["v2_lite_kv_b"] = write_gguf(ckpt, d / "v2_lite_kv_b.gguf", "f32", mla=False)[0]
    return files


@pytest.mark.parametrize("kind", ["v3", "v2_lite", "v2_lite_kv_b"])
def test_f32_gguf_matches_llama_cpp_and_transformers(kind, hf_models, f32_files) -> None:
    path = f32_files[kind]
    ref = models.reference_logits(hf_models[kind.removesuffix("_kv_b")][1], IDS)
    model = localseek.load(path, exact=True)
    ours = model.logits(IDS)
    theirs = gu.llama_logits(path, IDS)
    print(f"{kind}: localseek-llama.cpp {_close(ours, theirs):.2e}, -hf {_close(ours, ref):.2e}")
    ours_greedy = list(model.generate(IDS, 6))
    assert ours_greedy == gu.llama_greedy(path, IDS, len(ours_greedy))


def test_gguf_checkpoint_layout(f32_files, hf_models) -> None:
    with GGUFCheckpoint(f32_files["v3"]) as ck, open_checkpoint(hf_models["v3"][0]) as hf:
        assert ck.config.scoring_func == "sigmoid" and ck.config.topk_method == "noaux_tc"
        assert ck.config.rope_scaling is not None and ck.config.rope_scaling.mscale_all_dim == 1.0
        split = set(optional_shapes(ck.config))  # wkv_b per head as the file stores it
        assert sorted(set(ck.names()) - split) == sorted(hf.names())
        ck.check_complete()
        for name in ["layers.1.attn.wkv_b", "layers.2.ffn.experts.5.w2", "embed"]:
            assert torch.equal(ck.tensor(name), hf.tensor(name, torch.float32))
        # wk_b = W_UK transposed and wv_b = W_UV, per head, from the same wkv_b
        cfg = ck.config
        H, nope, v, r = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        wkv_b = hf.tensor("layers.1.attn.wkv_b", torch.float32).view(H, nope + v, r)
        wk_b, wv_b = ck.tensor("layers.1.attn.wk_b"), ck.tensor("layers.1.attn.wv_b")
        assert ck.shape("layers.1.attn.wk_b") == tuple(wk_b.shape) == (H * r, nope)
        assert torch.equal(wk_b.view(H, r, nope), wkv_b[:, :nope].transpose(1, 2))
        assert torch.equal(wv_b.view(H, v, r), wkv_b[:, nope:])
        # an expert is a view into the stack, not a copy
        stack = ck._tensors["blk.1.ffn_up_exps.weight"][1].data
        e3 = ck.tensor("layers.1.ffn.experts.3.w3")
        assert np.shares_memory(e3.numpy(), stack)
    with GGUFCheckpoint(f32_files["v2_lite"]) as ck:
        assert ck.config.q_lora_rank is None and ck.config.scoring_func == "softmax"
        assert ck.config.n_shared_experts == 2


@pytest.mark.parametrize("kind", ["v3_q", "v2_lite_q"])
@pytest.mark.parametrize("ftype,label", [(7, "q8_0"), (15, "q4_k_m"), (18, "q6_k")])
def test_llama_quantized_file(kind, ftype, label, f32_files, tmp_path) -> None:
    quant = tmp_path / f"{label}.gguf"
    gu.llama_quantize(f32_files[kind], quant, ftype)
    with GGUFCheckpoint(quant) as ck:
        types = {gguf.GGMLQuantizationType(t.tensor_type).name for _, t in ck._tensors.values()}
        expert = ck.tensor("layers.1.ffn.experts.2.w1")
        assert isinstance(expert, QTensor)
        stack = ck._tensors["blk.1.ffn_gate_exps.weight"][1].data
        assert np.shares_memory(expert.data.numpy(), stack)
        deq = write_gguf(ck, tmp_path / f"{label}-deq.gguf", "f32")[0]
    model = localseek.load(quant, exact=True)
    ours = model.logits(IDS)
    # decode through the latent cache: the absorbed path, which multiplies a quantized
    # attn_k_b / attn_v_b (Q8_0 here) straight from its blocks
    if label == "q8_0" and kind == "v2_lite_q":
        assert model.net.layers[0].attn.wk_b is not None
    cache = model.new_cache(max_len=len(IDS))
    model.forward(torch.tensor([IDS[:-3]]), 0, cache)
    for pos in range(len(IDS) - 3, len(IDS)):
        step = model.forward(torch.tensor([[IDS[pos]]]), pos, cache)[0, -1].numpy()
        _close(step, ours[pos], rel=1e-5)
    reference = gu.llama_logits(deq, IDS)
    same_weights = _close(ours, reference)
    assert np.array_equal(ours.argmax(-1), reference.argmax(-1))  # the same greedy tokens
    own_run = float(np.abs(ours - gu.llama_logits(quant, IDS)).max())
    print(
        f"{kind} {label} ({', '.join(sorted(types))}): "
        f"vs llama.cpp on dequantised F32 {same_weights:.2e}, "
        f"vs llama.cpp's own {label} run {own_run:.2e} (max|logit| {np.abs(ours).max():.2f})"
    )


@pytest.mark.parametrize("qtype", ["q8_0", "f16", "bf16"])
def test_written_types_read_back_exactly(qtype, hf_models, tmp_path) -> None:
    with open_checkpoint(hf_models["v3_q"][0]) as ckpt:
        path = write_gguf(ckpt, tmp_path / f"{qtype}.gguf", qtype)[0]
        want = ckpt.tensor("layers.1.ffn.experts.4.w3", torch.float32).numpy()
    gtype = gguf.GGMLQuantizationType[qtype.upper()]
    want = gguf.quants.dequantize(gguf.quants.quantize(want, gtype), gtype)
    with GGUFCheckpoint(path) as ck:
        got = ck.tensor("layers.1.ffn.experts.4.w3")
        got = got.dequantize() if isinstance(got, QTensor) else got.float()
        assert np.array_equal(got.numpy(), want)
    ours = localseek.load(path, exact=True).logits(IDS)
    # llama.cpp rounds activations for quantized/f16 matmuls: reported, not gated
    diff = float(np.abs(ours - gu.llama_logits(path, IDS)).max())
    print(
        f"written {qtype}: vs llama.cpp's own run {diff:.2e} (max|logit| {np.abs(ours).max():.2f})"
    )


@pytest.mark.parametrize("type_name", [t.name for t in GGML_QTYPES])
def test_ggml_dequantize_bit_exact_with_llama_cpp(type_name) -> None:
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((4, 512)) * rng.uniform(0.01, 10)).astype(np.float32)
    raw, expected = gu.ggml_roundtrip(type_name, values)
    qtype = gguf.GGMLQuantizationType[type_name]
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(4, -1)
    got = QTensor(GGML_QTYPES[qtype], (4, 512), data).dequantize(torch.float32).numpy()
    assert np.array_equal(got, expected)


def test_split_gguf(hf_models, f32_files, tmp_path) -> None:
    with open_checkpoint(hf_models["v3"][0]) as ckpt:
        paths = write_gguf(ckpt, tmp_path / "m.gguf", "f32", split_max_tensors=20)
    assert len(paths) > 1 and paths[0].name.endswith(f"-00001-of-{len(paths):05d}.gguf")
    whole = localseek.load(f32_files["v3"], exact=True).logits(IDS)
    assert np.array_equal(localseek.load(paths[0], exact=True).logits(IDS), whole)
    assert np.array_equal(localseek.load(tmp_path, exact=True).logits(IDS), whole)
    paths[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(paths[0])


def test_tokenizer_matches_llama_cpp(f32_files) -> None:
    lm = gu.llama(f32_files["v3"], vocab_only=True)
    with GGUFCheckpoint(f32_files["v3"]) as ck:
        tok = ck.tokenizer()
    assert tok is not None and tok.chat_template == gu.TEMPLATE
    assert tok.bos_id == 0 and tok.eos_id == 1
    for text in gu.SAMPLES:
        ours = tok.encode(text, add_bos=False)
        assert ours == lm.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ours) == text


def test_deepseek_llm_pre_tokenizer_matches_llama_cpp(f32_files, tmp_path) -> None:
    """DeepSeek-V2 / V2-Lite files (llama.cpp's converter writes pre-tokenizer 'deepseek-llm'
    for them) tokenize as llama.cpp does."""
    from localseek.checkpoint.gguf import tokenizer_from_gguf

    path = gu.vocab_copy(
        f32_files["v2_lite"], tmp_path / "v2.gguf", **{"tokenizer.ggml.pre": "deepseek-llm"}
    )
    reader = gguf.GGUFReader(path)
    tok = tokenizer_from_gguf(lambda k, d=None: _field(reader, k, d), str(path))
    lm = gu.llama(path, vocab_only=True)
    extra = ["déjà vu, naïve café ＡＢＣ 12345678 x\r\ny", "  two  spaces  ", "end   "]
    for text in gu.SAMPLES + extra:
        ours = tok.encode(text, add_bos=False)
        assert ours == lm.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ours) == text


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _bad_files(f32: Path, d: Path) -> dict[str, Path]:
    data = f32.read_bytes()
    files = {"magic": d / "magic.gguf", "truncated": d / "trunc.gguf", "unknown": d / "unk.gguf"}
    files["magic"].write_bytes(b"GGUX" + data[4:])
    files["truncated"].write_bytes(data[: len(data) - 4096])
    # set the type of the first tensor to a number no ggml type has
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    at += 4 + 8 * n_dims
    files["unknown"].write_bytes(data[:at] + struct.pack("<I", 99) + data[at + 4 :])
    w = gguf.GGUFWriter(d / "llama.gguf", "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files["llama"] = d / "llama.gguf"
    return files


@pytest.mark.parametrize(
    "case,words",
    [
        ("magic", "not a GGUF file"),
        ("truncated", "truncated"),
        ("unknown", "unknown quantization type"),
        ("llama", "architecture 'llama' is not supported"),
    ],
)
def test_bad_gguf_is_one_sentence(case, words, f32_files, tmp_path) -> None:
    path = _bad_files(f32_files["v2_lite"], tmp_path)[case]
    with pytest.raises(CheckpointError, match=words) as e:
        open_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and msg.count("\n") == 0
    run = subprocess.run(
        [sys.executable, "-m", "localseek", "generate", "--model", str(path), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("exact", [True, False])
def test_one_call_decode_attention_equals_torch_ops(exact, f32_files, tmp_path) -> None:
    """A decode step's attention as one numba call (quant.cpu.attention) gives what the torch ops
    of the absorbed path give: the same cache contents and the same logits."""
    quant = tmp_path / "q8_0.gguf"
    gu.llama_quantize(f32_files["v2_lite_q"], quant, 7)
    model = localseek.load(quant, exact=exact)
    attn = [block.attn for block in model.net.layers]
    n = len(IDS) - 4

    def decode(fused: bool | None):
        for a in attn:
            a._fused = fused  # None: found on use
        cache = model.new_cache(max_len=len(IDS))
        model.forward(torch.tensor([IDS[:n]]), 0, cache)
        steps = [
            model.forward(torch.tensor([[t]]), n + i, cache)[0, -1] for i, t in enumerate(IDS[n:])
        ]
        return torch.stack(steps).numpy(), cache

    fused, c_fused = decode(None)
    assert all(a._fused for a in attn)
    plain, c_plain = decode(False)
    _close(c_fused.kv.numpy(), c_plain.kv.numpy(), rel=1e-6)
    _close(c_fused.pe.numpy(), c_plain.pe.numpy(), rel=1e-6)
    # exact: float32 throughout; fast: o_lat's int8 rounding may flip where the sums differ
    _close(fused, plain, rel=1e-5 if exact else 1e-3)
    attn[0]._fused = None
    with pytest.raises(ValueError, match="outside a cache of 12 positions"):
        model.forward(torch.tensor([[IDS[0]]]), len(IDS), c_fused)


# --- damaged and incomplete files: one sentence in the file's own words ---------------------


@pytest.fixture(scope="module")
def demo_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from localseek.demo import BUNDLED

    with open_checkpoint(BUNDLED) as ckpt:
        return write_gguf(ckpt, tmp_path_factory.mktemp("demo_q8") / "demo.gguf", "q8_0")[0]


def _one_sentence(path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as e:
        localseek.load(path, exact=True)
    msg = str(e.value)
    assert msg.count("\n") == 0 and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _tensor_info_at(data: bytes, name: str) -> tuple[int, int]:
    """(offset of the type field, offset of the data-offset field) of a tensor's info."""
    at = data.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    return type_at, type_at + 4


def test_empty_and_truncated_header_are_named(demo_q8, tmp_path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    msg = _one_sentence(empty, "is empty")
    assert "magic" not in msg
    data = demo_q8.read_bytes()
    for cut in (3, 10, 100, 30000):  # header, counts, metadata, tokenizer array
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        msg = _one_sentence(path, "truncated")
        assert "out of bounds" not in msg and "dtype" not in msg


@pytest.mark.parametrize("new_type", ["F32", "Q4_K"])
def test_changed_tensor_type_is_caught(new_type, demo_q8, tmp_path) -> None:
    data = bytearray(demo_q8.read_bytes())
    type_at, _ = _tensor_info_at(data, "blk.1.ffn_gate_shexp.weight")  # Q8_0, rows of 256
    struct.pack_into("<I", data, type_at, int(gguf.GGMLQuantizationType[new_type]))
    path = tmp_path / "type.gguf"
    path.write_bytes(data)
    _one_sentence(path, "blk.1.ffn_gate_shexp.weight", "type, shape or offset is wrong")


def test_misaligned_and_overlapping_offsets_are_caught(demo_q8, tmp_path) -> None:
    data = demo_q8.read_bytes()
    reader = gguf.GGUFReader(demo_q8)
    offsets = {t.name: int(t.field.parts[5][0]) for t in reader.tensors}
    _, off_at = _tensor_info_at(data, "blk.1.attn_q_b.weight")
    for new, words in [
        (offsets["blk.1.attn_q_b.weight"] + 1, "misaligned"),
        (offsets["blk.1.attn_q_a.weight"], "type, shape or offset is wrong"),  # onto another
    ]:
        path = tmp_path / f"offset{new}.gguf"
        path.write_bytes(data[:off_at] + struct.pack("<Q", new) + data[off_at + 8 :])
        _one_sentence(path, "blk.1.attn_q_b.weight", words)


def test_missing_expert_count_names_the_key(demo_q8, tmp_path) -> None:
    path = gu.edited_copy(demo_q8, tmp_path / "m.gguf", remove_keys=("deepseek2.expert_count",))
    msg = _one_sentence(path, "metadata key 'deepseek2.expert_count' is missing")
    assert "tensor 'blk.1.ffn_up_exps.weight'" not in msg or "holds routed experts" in msg


def test_expert_count_stored_as_a_string_is_named(demo_q8, tmp_path) -> None:
    path = gu.edited_copy(
        demo_q8,
        tmp_path / "s.gguf",
        set_keys={"deepseek2.expert_count": (gguf.GGUFValueType.STRING, "16")},
    )
    _one_sentence(path, "metadata key 'deepseek2.expert_count' holds a string ('16')", "integer")


def test_missing_tensor_is_named_as_the_file_names_it(demo_q8, tmp_path) -> None:
    path = gu.edited_copy(
        demo_q8, tmp_path / "t.gguf", drop_tensors=("blk.1.attn_kv_a_mqa.weight",)
    )
    msg = _one_sentence(path, "tensor 'blk.1.attn_kv_a_mqa.weight' is missing")
    assert "layers.1" not in msg


def test_misshapen_tensor_is_named_as_the_file_names_it(demo_q8, tmp_path) -> None:
    name = "blk.2.attn_kv_a_norm.weight"  # (64,) F32: stored as (2, 32), the same bytes
    path = gu.edited_copy(demo_q8, tmp_path / "shape.gguf", reshape={name: (2, 32)})
    msg = _one_sentence(path, f"tensor '{name}' has shape (2, 32)", "the config needs (64,)")
    assert "layers.2" not in msg


def test_gguf_without_vocabulary_names_the_key(demo_q8, tmp_path) -> None:
    path = gu.edited_copy(demo_q8, tmp_path / "v.gguf", remove_keys=("tokenizer.ggml.tokens",))
    _one_sentence(path, "metadata key 'tokenizer.ggml.tokens' is missing")
    for argv in (
        ["generate", "--model", str(path), "--prompt", "hi"],
        ["quantize", str(path), str(tmp_path / "out.gguf"), "--type", "q8_0"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "localseek", *argv], capture_output=True, text=True, timeout=120
        )
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1, run.stderr
        assert str(path) in lines[0] and "'tokenizer.ggml.tokens' is missing" in lines[0]
    assert not (tmp_path / "out.gguf").exists()


def test_inspect_gguf_without_expert_count_is_one_sentence(demo_q8, tmp_path) -> None:
    path = gu.edited_copy(demo_q8, tmp_path / "m.gguf", remove_keys=("deepseek2.expert_count",))
    run = subprocess.run(
        [sys.executable, "-m", "localseek", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == (
        f"localseek: error: {path}: metadata key 'deepseek2.expert_count' is missing, but the "
        "file holds routed experts ('blk.1.ffn_gate_exps.weight')."
    )


@pytest.mark.parametrize("case", ["empty", "truncated", "missing", "misshapen"])
def test_damaged_safetensors_is_one_sentence(case, tmp_path) -> None:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from localseek.demo import BUNDLED

    folder = tmp_path / "hf"
    shutil.copytree(BUNDLED, folder)
    st = folder / "model.safetensors"
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    if case in ("empty", "truncated"):
        data = st.read_bytes()
        st.write_bytes(b"" if case == "empty" else data[: len(data) - 1000])
        words = "is empty" if case == "empty" else "truncated"
    else:
        state = load_file(str(st))
        if case == "missing":
            del state[name]
            words = f"tensor '{name}' is missing"
        else:
            state[name] = state[name].reshape(-1, 128).contiguous()
            words = f"tensor '{name}' has shape ({state[name].shape[0]}, 128)"
        save_file(state, str(st))
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 256
    msg = _one_sentence(folder, words)
    assert "layers.1.attn" not in msg
