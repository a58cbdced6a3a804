"""A GGUF file's layout, checked the way llama.cpp's loader (gguf.cpp) checks it.

Hand-written on purpose, before gguf-py's ``GGUFReader`` reads the file: the reader takes every
length and count at its word (a header cut short ends in numpy's own errors such as "index 0 is
out of bounds", an absurd array count loops for a long time) and never compares a tensor's
type, offset and size with the data section or with its neighbours. This walk reads the same
structure with each size checked against the file before it is used, so every fault is one
sentence naming the file, the key or tensor, and the problem; the reader then parses a file
whose structure is known to be sound.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from localseek.errors import CheckpointError
from localseek.quant.formats import BY_GGML, DENSE_GGML, ggml_names

DEFAULT_ALIGNMENT = 32  # llama.cpp's GGUF_DEFAULT_ALIGNMENT
MAX_DIMS = 4  # GGML_MAX_DIMS
VERSIONS = (2, 3)
_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}
# types localseek reads (the format registry's GGML entries and the float types)
READABLE = frozenset(DENSE_GGML) | frozenset(BY_GGML)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file describes it; ``start`` is absolute (data section + offset)."""

    name: str
    qtype: GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    start: int
    nbytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What the walk found: value types per key, tensors, and where the data section starts."""

    version: int
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]]  # key -> (type, item)
    strings: dict[str, str]  # the keys holding one string, with it
    tensors: list[TensorInfo]
    alignment: int
    data_start: int
    size: int


_Info = tuple[str, GGMLQuantizationType, tuple[int, ...], int]  # name, type, dims, offset


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.data_start = 0

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}.")

    def take(self, n: int, what: str) -> int:
        """Advance over n bytes of ``what``; where they would pass the end: truncated."""
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated: the file ends inside {what} (byte {self.pos} of {self.size}, "
                f"{n} more needed)"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def text(self, what: str) -> str:
        """A GGUF string (u64 length, UTF-8 bytes)."""
        n = self.u64(f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text (byte {start})") from None


def read_layout(path: Path) -> GGUFLayout:
    """Walk a GGUF file's header, metadata and tensor infos with every size checked.

    Raises:
        CheckpointError: one sentence naming the file and the first fault found.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise CheckpointError(f"{path}: the file is empty (0 bytes), not a GGUF model.")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(_Cursor(buf, path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}).") from e


def _walk(c: _Cursor) -> GGUFLayout:
    magic = bytes(c.buf[:4])
    if magic != b"GGUF":
        if len(magic) < 4 and b"GGUF".startswith(magic):
            c.take(4, "the header")
        raise c.fail(f"not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    c.pos = 4
    version = c.u32("the header")
    if version & 0xFFFF == 0 and version:
        raise c.fail("a big-endian GGUF file, which localseek does not read")
    if version not in VERSIONS:
        raise c.fail(f"GGUF version {version} is not supported (versions 2 and 3 are)")
    n_tensors = c.u64("the header")
    n_kv = c.u64("the header")
    # the smallest key/value takes 13 bytes, the smallest tensor info 24
    if n_kv * 13 + n_tensors * 24 > c.size - c.pos:
        raise c.fail(
            f"the header counts {n_tensors} tensors and {n_kv} metadata keys, more than a "
            f"{c.size}-byte file holds (truncated or corrupt)"
        )
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
    strings: dict[str, str] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = c.text(f"the name of metadata key {i}")
        if key in value_types:
            raise c.fail(f"metadata key '{key}' appears twice")
        vtype = _value_type(c, c.u32(f"the type of metadata key '{key}'"), key)
        item = None
        if vtype == GGUFValueType.ARRAY:
            item = _value_type(c, c.u32(f"the item type of metadata key '{key}'"), key)
            if item == GGUFValueType.ARRAY:
                raise c.fail(
                    f"metadata key '{key}' is an array of arrays, which GGUF readers reject"
                )
            count = c.u64(f"the length of metadata key '{key}'")
            _skip_values(c, item, count, key)
        elif key == "general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = c.u32(f"the value of metadata key '{key}'")
        elif vtype == GGUFValueType.STRING:
            strings[key] = c.text(f"the value of metadata key '{key}'")
        else:
            _skip_values(c, vtype, 1, key)
        value_types[key] = (vtype, item)
    if "general.alignment" in value_types:
        vtype = value_types["general.alignment"][0]
        if vtype != GGUFValueType.UINT32:
            raise c.fail(f"metadata key 'general.alignment' holds {vtype.name}, it must be UINT32")
        if alignment == 0 or alignment & (alignment - 1):
            raise c.fail(f"general.alignment {alignment} is not a power of two")
    infos = [_tensor_info(c, i, alignment) for i in range(n_tensors)]
    data_start = -(-c.pos // alignment) * alignment
    tensors = [_placed(c, info, data_start) for info in infos]
    c.data_start = data_start
    _check_overlaps(c, tensors, alignment)
    return GGUFLayout(version, value_types, strings, tensors, alignment, data_start, c.size)


def _value_type(c: _Cursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise c.fail(f"metadata key '{key}' has unknown value type {raw}") from None


def _skip_values(c: _Cursor, vtype: GGUFValueType, count: int, key: str) -> None:
    what = f"the value of metadata key '{key}'"
    if vtype == GGUFValueType.STRING:
        if count * 8 > c.size - c.pos:
            c.take(count * 8, what)
        for _ in range(count):
            c.text(what)
        return
    c.take(_SCALAR_BYTES[vtype] * count, what)


def _tensor_info(
    c: _Cursor, i: int, alignment: int
) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
    name = c.text(f"the name of tensor {i}")
    what = f"the description of tensor '{name}'"
    n_dims = c.u32(what)
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)")
    dims = tuple(c.u64(what) for _ in range(n_dims))
    n = 1
    for d in dims:
        n *= d
    if min(dims) == 0 or n >= 1 << 62:
        raise c.fail(f"tensor '{name}' has an impossible shape {list(dims)}")
    raw = c.u32(what)
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        raise c.fail(f"tensor '{name}' has an unknown quantization type {raw}") from None
    if qtype not in READABLE:
        raise c.fail(
            f"tensor '{name}' has quantization type {qtype.name}, which localseek does not read "
            f"({ggml_names()})"
        )
    block, _ = GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise c.fail(
            f"tensor '{name}' has rows of {dims[0]} values, not a whole number of "
            f"{qtype.name} blocks of {block}"
        )
    offset = c.u64(what)
    if offset % alignment:
        raise c.fail(
            f"tensor '{name}' starts at data offset {offset}, not a multiple of the alignment "
            f"{alignment} (misaligned)"
        )
    return name, qtype, dims, offset


def _placed(
    c: _Cursor, info: tuple[str, GGMLQuantizationType, tuple[int, ...], int], data_start: int
) -> TensorInfo:
    name, qtype, dims, offset = info
    # the file's geometry is ggml's own table (gguf-py's, which the format registry is built
    # from; the registry's F16/BF16 entries are the kernels' 32-value unit, not a file block)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in dims:
        n *= d
    nbytes = n // block * block_bytes
    start = data_start + offset
    if start + nbytes > c.size:
        raise c.fail(
            f"tensor '{name}' ({qtype.name}, {nbytes} bytes from byte {start}) runs past the end "
            f"of the {c.size}-byte file (truncated, or its type or shape is wrong)"
        )
    return TensorInfo(name, qtype, dims, start, nbytes)


def _check_overlaps(c: _Cursor, tensors: list[TensorInfo], alignment: int) -> None:
    """As gguf.cpp requires: names are unique and each tensor starts where the one before it
    ends, padded to the alignment, so a wrong type, shape or offset shows as a gap or an
    overlap; the data section ends with the last tensor's padding."""
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise c.fail(f"tensor '{t.name}' appears twice")
        seen.add(t.name)
    if not tensors:
        return
    expected, before = c.data_start, "the data section starts"
    for t in tensors:
        if t.start != expected:
            raise c.fail(
                f"tensor '{t.name}' starts at byte {t.start}, but {before} at byte {expected} "
                "(a tensor's type, shape or offset is wrong)"
            )
        expected = -(-(t.start + t.nbytes) // alignment) * alignment
        before = f"tensor '{t.name}' (padded) ends"
    end = tensors[-1].start + tensors[-1].nbytes
    if not end <= c.size <= expected:
        raise c.fail(
            f"the file has {c.size - end} bytes after its last tensor '{tensors[-1].name}' "
            "(a tensor's type or shape is wrong, or bytes were appended)"
        )
