"""Helpers for the GGUF tests: tiny models with a tokenizer, llama.cpp runs, quantization."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from localseek.bench import llama_cpp_model
from localseek.demo import write_bpe_tokenizer

VOCAB = 320
TEMPLATE = "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 22 333 4444 55555 3.14159 -17 1e10 2024-06-01",
    "def add(a, b):\n    return a + b  # comment\n\tif x != y: pass",
    "spaces:   three,     five,\n\n\ttab and newline  \n",
    "深度求索是一家人工智能公司。你好，世界！ひらがな カタカナ",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 done",
    "<｜User｜>hi there<｜Assistant｜>",
]


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on a small corpus with the DeepSeek-V3 pre-tokenizer."""
    corpus = SAMPLES * 3 + [f"word{i} the and of to in {i * 37}" for i in range(200)]
    write_bpe_tokenizer(folder, corpus, VOCAB, chat_template=TEMPLATE)


def llama(path: Path, **kw):
    # without llama.cpp's CPU weight repacking: on AVX-512 / AMX builds it aborts the whole test
    # run on these files (see llama_cpp_model); the reference is llama.cpp's plain CPU path.
    # F32 KV cache: llama.cpp's default F16 cache alone costs ~1e-3 relative
    return llama_cpp_model(
        path, False, logits_all=True, n_ctx=64, n_threads=2, verbose=False, type_k=0, type_v=0, **kw
    )


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    lm = llama(path)
    try:
        lm.eval(ids)
        return np.array(lm.scores[: len(ids)], dtype=np.float32)
    finally:
        lm.close()


def llama_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    lm = llama(path)
    try:
        out: list[int] = []
        lm.eval(ids)
        for _ in range(n):
            tok = int(np.argmax(lm.scores[lm.n_tokens - 1]))
            out.append(tok)
            lm.eval([tok])
        return out
    finally:
        lm.close()


def llama_quantize(src: Path, dst: Path, ftype: int, overrides: dict[str, str] | None = None):
    """llama.cpp's quantizer with recipe ``ftype``; ``overrides`` maps tensor-name regexes to
    ggml type names (llama-quantize's --tensor-type)."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if overrides:
        Override = llama_cpp.llama_model_tensor_override
        table = (Override * (len(overrides) + 1))()  # the last one, all zero, ends the list
        for i, (pattern, type_name) in enumerate(overrides.items()):
            table[i].pattern = pattern.encode()
            table[i].type = int(gguf.GGMLQuantizationType[type_name])
        params.tt_overrides = table
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"


def ggml_roundtrip(type_name: str, values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """llama.cpp's own quantize (ggml_quantize_chunk) and dequantize_row_* of (rows, cols)."""
    from pathlib import Path as _P

    import gguf
    import llama_cpp

    lib = ctypes.CDLL(str(_P(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    qtype = gguf.GGMLQuantizationType[type_name]
    rows, cols = values.shape
    src = np.ascontiguousarray(values, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    dst = np.zeros(rows * cols // block * size, dtype=np.uint8)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    n = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, cols, None)
    assert n == dst.nbytes
    deq = np.zeros(rows * cols, dtype=np.float32)
    name = {"F16": "ggml_fp16_to_fp32_row", "BF16": "ggml_bf16_to_fp32_row"}.get(type_name)
    fn = getattr(lib, name or "dequantize_row_" + type_name.lower().replace("_k", "_K"))
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(dst.ctypes.data, deq.ctypes.data, rows * cols)
    return dst.tobytes(), deq.reshape(rows, cols)


def vocab_copy(src: Path, dst: Path, **changes) -> Path:
    """A tensorless copy of a GGUF's metadata (what llama.cpp's vocab_only load reads), with
    ``changes`` (key: value) to string fields applied."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, changes.get(name, field.contents()), vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def edited_copy(
    src: Path,
    dst: Path,
    set_keys: dict | None = None,
    remove_keys: tuple[str, ...] = (),
    drop_tensors: tuple[str, ...] = (),
    reshape: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """A copy of a GGUF with metadata keys set ({key: (GGUFValueType, value)}) or removed,
    tensors left out or given another (numpy-order) shape of the same size, through gguf-py's
    own gguf_new_metadata copier."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    reshape = reshape or {}
    reader.tensors = [
        t._replace(data=t.data.reshape(reshape[t.name])) if t.name in reshape else t
        for t in reader.tensors
        if t.name not in drop_tensors
    ]
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    new = {k: MetadataDetails(t, v) for k, (t, v) in (set_keys or {}).items()}
    copy_with_new_metadata(reader, writer, new, list(remove_keys))
    return dst
