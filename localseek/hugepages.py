"""Weights moved out of a file mapping into anonymous memory backed by transparent huge pages.

Decode reads every active weight byte once per token. Mapped from the file, those bytes sit in
4 KiB page-cache pages: a 500 MB step touches some 120 thousand pages, each a TLB miss and a
page walk, and the walks push out of the caches what the rest of the step keeps there. In 2 MiB
pages the same bytes decoded about 7% faster on the 4-layer V2-Lite-shaped file (paired runs in
one process, see the README's performance section).

Only bytes that lie in a file mapping move (the GGUF tensors as gguf-py maps them); tensors
the loader made itself (dequantized, converted) are already anonymous memory. Tensors that sit
side by side in the file stay side by side, so a layer's experts remain one stack. Each chunk's
file pages are released once copied, so resident memory grows by the copy, not twice.

Linux only; elsewhere, or where transparent huge pages are off, the weights stay mapped.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from localseek.quant import QTensor, Weight

_CHUNK = 64 << 20  # bytes copied before their file pages are released
_PAGE = mmap.PAGESIZE
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether anonymous memory can be backed by transparent huge pages here (``madvise`` or
    ``always`` mode on Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP.read_text()
    except OSError:
        return False


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files, sorted."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return sorted(out)


def _in(mappings: list[tuple[int, int]], lo: int, hi: int) -> bool:
    i = bisect.bisect_right(mappings, (lo, float("inf"))) - 1
    return i >= 0 and mappings[i][0] <= lo and hi <= mappings[i][1]


def _storage(w: Weight) -> torch.Tensor:
    return w.data if isinstance(w, QTensor) else w


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _anonymous(nbytes: int) -> np.ndarray:
    """uint8 (nbytes,) over a fresh private anonymous mapping advised for huge pages (zeros);
    the array keeps the mapping alive."""
    arena = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # no huge pages in this kernel: plain anonymous memory
        arena.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(arena, dtype=np.uint8, count=nbytes)


def empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 CPU tensor of ``shape`` in memory advised for huge pages (the RAM tier's expert
    slots, which the kernels read like the weights)."""
    return torch.from_numpy(_anonymous(int(np.prod(shape)))).view(shape)


def file_backed(weights: dict[str, Weight]) -> dict[str, tuple[int, int]]:
    """name -> (start, end) address of each CPU weight whose bytes a file mapping holds."""
    files = _file_mappings()
    spans = {}
    for name, w in weights.items():
        t = _storage(w)
        if t.device.type == "cpu" and t.is_contiguous() and t.numel():
            lo, hi = _span(t)
            if _in(files, lo, hi):
                spans[name] = (lo, hi)
    return spans


def _runs(spans: dict[str, tuple[int, int]]) -> list[list[int]]:
    """The bytes to copy as runs: spans that touch or lie within a page of each other merge
    (the bytes between two such spans are in the pages that hold them, so they are mapped)."""
    runs: list[list[int]] = []
    for lo, hi in sorted(set(spans.values())):
        if runs and lo <= runs[-1][1] + _PAGE:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    return runs


def copy_nbytes(spans: dict[str, tuple[int, int]]) -> int:
    """Bytes ``into_huge_pages`` copies for these spans."""
    return sum(hi - lo for lo, hi in _runs(spans))


def into_huge_pages(
    weights: dict[str, Weight],
    spans: dict[str, tuple[int, int]],
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Weight]:
    """``weights`` with those named in ``spans`` (from ``file_backed``) copied into one
    anonymous mapping advised for transparent huge pages; the others as they were.

    advance: called with the bytes of each chunk copied (a progress bar).
    """
    if not spans:
        return weights
    runs = _runs(spans)
    offsets, size = [], 0
    for lo, hi in runs:  # each run keeps its alignment to 64 bytes
        size = -(-size // 64) * 64 + lo % 64
        offsets.append(size)
        size += hi - lo
    memory = _anonymous(size)
    base = memory.ctypes.data
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for (lo, hi), off in zip(runs, offsets, strict=True):
        for a in range(lo, hi, _CHUNK):
            b = min(hi, a + _CHUNK)
            ctypes.memmove(base + off + (a - lo), a, b - a)
            # the copied file pages leave this process (the page cache keeps them)
            p0, p1 = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE
            if p1 > p0:
                libc.madvise(p0, p1 - p0, mmap.MADV_DONTNEED)
            advance(b - a)
    flat = torch.from_numpy(memory)
    starts = [lo for lo, _ in runs]
    out = dict(weights)
    for name, (lo, hi) in spans.items():
        i = bisect.bisect_right(starts, lo) - 1
        at = offsets[i] + lo - starts[i]
        w = weights[name]
        t = _storage(w)
        copy = flat[at : at + hi - lo].view(t.dtype).view(t.shape)
        out[name] = QTensor(w.qtype, w.shape, copy, w.scale) if isinstance(w, QTensor) else copy
    return out
