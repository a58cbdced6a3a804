"""Damaged model files: every mutant of a small GGUF and a small safetensors checkpoint (both
made from the demo model) either loads and gives the original's logits exactly, or ends in one
sentence naming the file (a LocalseekError), never another exception and never other logits.

Mutations: truncation at every section boundary (header, metadata, tensor infos, data), byte
flips in the header, the metadata's structure and names, and the tensor infos, and edits of a
tensor's type, offset and shape. The bytes of a value (a float's mantissa, a weight) are not
flipped: no format carries a checksum, so no reader could tell such a file from a real one.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest

import localseek
from localseek.checkpoint import open_checkpoint
from localseek.convert.gguf_writer import write_gguf
from localseek.demo import BUNDLED
from localseek.errors import LocalseekError

IDS = [0, 17, 300, 1500, 9]
T = gguf.GGMLQuantizationType


def _outcome(path: Path, name_in_message: Path, reference: np.ndarray) -> str:
    # name_in_message: the file (or the checkpoint folder) a message must name
    """ "same" (loaded, identical logits) or "error" (one sentence naming the file)."""
    try:
        model = localseek.load(path, exact=True)
        logits = model.logits(IDS)
    except LocalseekError as e:
        msg = str(e)
        assert "\n" not in msg and str(name_in_message) in msg, msg
        return "error"
    assert np.array_equal(logits, reference), "a damaged file gave other logits"
    return "same"


# A mutant: (label, length to cut the file to or None, [(offset, new bytes)])
Edit = tuple[str, int | None, list[tuple[int, bytes]]]


def _run(path: Path, original: bytes, edit: Edit, reference: np.ndarray, name: Path) -> str:
    """Apply one edit to the file in place, load it, and restore the file."""
    label, cut, patches = edit
    with open(path, "r+b") as f:
        if cut is not None:
            f.truncate(cut)
        for at, new in patches:
            f.seek(at)
            f.write(new)
    try:
        return _outcome(name, name, reference)
    except AssertionError as e:
        raise AssertionError(f"{label}: {e}") from None
    finally:
        with open(path, "r+b") as f:
            start = cut if cut is not None else 0
            for at, new in patches:
                f.seek(at)
                f.write(original[at : at + len(new)])
            if cut is not None:
                f.seek(start)
                f.write(original[start:])


def _flip(label: str, data: bytes, at: int, mask: int) -> Edit:
    return label, None, [(at, bytes([data[at] ^ mask]))]


def _put(label: str, *puts: tuple[int, str, int]) -> Edit:
    return label, None, [(at, struct.pack(fmt, value)) for at, fmt, value in puts]


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("fuzz_gguf") / "demo.gguf"
    with open_checkpoint(BUNDLED) as ckpt:
        write_gguf(ckpt, path, "q8_0")
    return path, localseek.load(path, exact=True).logits(IDS)


def _gguf_mutants(path: Path) -> list[Edit]:
    """(label, bytes) of each mutant; positions from gguf-py's reading of the good file."""
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    out: list[Edit] = [("unchanged", None, [])]
    fields = [f for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    infos = [t.field for t in reader.tensors]
    info_end = infos[-1].offset + sum(int(p.nbytes) for p in infos[-1].parts)
    # truncation at every section boundary, and just inside each section
    cuts = {0, 3, 4, 8, 16, 23, 24, info_end, reader.data_offset, reader.data_offset + 1}
    cuts |= {f.offset for f in fields} | {f.offset + 5 for f in fields}
    cuts |= {f.offset for f in infos} | {f.offset + 9 for f in infos[::7]}
    cuts |= {int(t.data_offset) for t in reader.tensors} | {len(data) - 1}
    out += [(f"cut at {c}", c, []) for c in sorted(cuts)]
    # header: magic, version, tensor count, key count
    out += [_flip(f"header byte {i} ^ {m:#x}", data, i, m) for i in range(24) for m in (1, 0x80)]
    # metadata: key length, first and last character of the name, value type, and for strings
    # and arrays their length / item type / count
    for f in fields:
        at, key_len = f.offset, int(f.parts[0][0])
        label = f"key {f.name}"
        out.append(_flip(f"{label}: length ^ 1", data, at, 1))
        out.append(_flip(f"{label}: length high bit", data, at + 7, 0x80))
        out.append(_flip(f"{label}: first character ^ 1", data, at + 8, 1))
        out.append(_flip(f"{label}: last character ^ 2", data, at + 7 + key_len, 2))
        vt = at + 8 + key_len
        # ^ 1 turns UINT32 into INT32, the same value: loads, so only on a few keys
        for m in (1, 2, 8) if f is fields[1] or f.types[0] != gguf.GGUFValueType.UINT32 else (2, 8):
            out.append(_flip(f"{label}: value type ^ {m}", data, vt, m))
        if f.types[0] in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            n_at = vt + 4 if f.types[0] == gguf.GGUFValueType.STRING else vt + 8
            out.append(_flip(f"{label}: length/count ^ 1", data, n_at, 1))
            out.append(_flip(f"{label}: length/count high byte", data, n_at + 7, 0x40))
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            out.append(_flip(f"{label}: item type ^ 1", data, vt + 4, 1))
    # tensor infos: name, dimensions, type, offset; of every kind of tensor (layer 1's, layer
    # 0's dense MLP, the global ones) and of the last (its end is the file's)
    offsets = sorted({int(t.field.parts[5][0]) for t in reader.tensors})
    for t in reader.tensors:
        first = t.name.startswith(("blk.0.ffn_", "blk.1.", "t", "o"))
        if t is not reader.tensors[-1] and not first:
            continue
        at = t.field.offset
        name_len, n_dims = int(t.field.parts[0][0]), int(t.field.parts[2][0])
        dims_at = at + 8 + name_len + 4
        type_at = dims_at + 8 * n_dims
        off_at = type_at + 4
        offset = int(t.field.parts[5][0])
        label = f"tensor {t.name}"
        out.append(_flip(f"{label}: name length ^ 1", data, at, 1))
        out.append(_flip(f"{label}: name character ^ 1", data, at + 8 + name_len // 2, 1))
        out.append(_flip(f"{label}: layer digit ^ 1", data, at + 8 + 4, 1))
        out.append(_flip(f"{label}: n_dims ^ 1", data, at + 8 + name_len, 1))
        out.append(_flip(f"{label}: n_dims ^ 4", data, at + 8 + name_len, 4))
        for d in range(n_dims):
            out.append(_flip(f"{label}: dim {d} ^ 1", data, dims_at + 8 * d, 1))
            out.append(_flip(f"{label}: dim {d} ^ 0x40", data, dims_at + 8 * d, 0x40))
        if n_dims >= 2:  # the same element count in another shape
            d0, d1 = (int(x) for x in t.shape[:2])
            out.append(_put(f"{label}: dims swapped", (dims_at, "<Q", d1), (dims_at + 8, "<Q", d0)))
        for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_K, T.Q4_0, T.Q6_K, T.I8, 99):
            if qtype != t.tensor_type:
                name = getattr(qtype, "name", qtype)
                out.append(_put(f"{label}: type {name}", (type_at, "<I", int(qtype))))
        neighbour = offsets[(offsets.index(offset) + 1) % len(offsets)]
        for new in (offset + 1, offset + 32, offset - 32, neighbour, offset | 1 << 40):
            if new >= 0:
                out.append(_put(f"{label}: offset {new}", (off_at, "<Q", new)))
    return out


def test_fuzz_gguf(demo_gguf, tmp_path) -> None:
    good, reference = demo_gguf
    path = tmp_path / "mutant.gguf"
    shutil.copy(good, path)
    original = good.read_bytes()
    results = {edit[0]: _run(path, original, edit, reference, path) for edit in _gguf_mutants(good)}
    outcomes = Counter(results.values())
    print(dict(outcomes))
    assert results["unchanged"] == "same" and outcomes["error"] > 1000


@pytest.fixture(scope="module")
def demo_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("fuzz_hf") / "demo"
    shutil.copytree(BUNDLED, folder)
    return folder, localseek.load(folder, exact=True).logits(IDS)


def _safetensors_mutants(path: Path, rng: np.random.Generator) -> list[Edit]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n]
    out: list[Edit] = [("unchanged", None, [])]
    cuts = {0, 4, 7, 8, 9, 8 + n // 2, 7 + n, 8 + n, 9 + n, (8 + n + len(data)) // 2}
    cuts |= {len(data) - 1}
    out += [(f"cut at {c}", c, []) for c in sorted(cuts)]
    out += [_flip(f"length byte {i} ^ {m:#x}", data, i, m) for i in range(8) for m in (1, 0x80)]
    # the JSON header: every structural character, digit and dtype, and a sample of the rest
    special = [i for i, b in enumerate(header) if chr(b) in '{}[]:,"0123456789']
    picks = sorted(set(rng.choice(special, 120, replace=False)) | set(rng.choice(n, 60)))
    for i in picks:
        for m in (1, 0x10):
            out.append(_flip(f"header byte {8 + i} ({chr(header[i])!r}) ^ {m:#x}", data, 8 + i, m))
    return out


def test_fuzz_safetensors(demo_hf) -> None:
    folder, reference = demo_hf
    path = folder / "model.safetensors"
    original = path.read_bytes()
    edits = _safetensors_mutants(path, np.random.default_rng(0))
    results = {edit[0]: _run(path, original, edit, reference, folder) for edit in edits}
    outcomes = Counter(results.values())
    print(dict(outcomes))
    assert results["unchanged"] == "same" and outcomes["error"] > 300


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_damaged_file_is_one_line_and_exit_1(kind, demo_gguf, demo_hf, tmp_path) -> None:
    if kind == "gguf":
        path = tmp_path / "cut.gguf"
        path.write_bytes(demo_gguf[0].read_bytes()[:100])
        words = "truncated"
    else:
        path = tmp_path / "hf"
        shutil.copytree(demo_hf[0], path)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
        words = "truncated"
    run = subprocess.run(
        [sys.executable, "-m", "localseek", "generate", "--model", str(path), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith("localseek: error: ") and str(path) in lines[0]
    assert words in lines[0]
