"""GPU-tier kernels: y = x @ W.T for a cached expert weight on any torch device, straight from
its stored blocks, never holding a dequantised copy of the whole matrix.

A weight is dequantised ``tile_rows`` output rows at a time (at most ``TILE_BYTES`` of float32)
into one reusable buffer with torch ops, and each tile is multiplied as it is made; the decoders'
temporaries are a small multiple of the tile. The decoders follow ``gguf.quants`` op for op
(Q8_0, Q4_0, Q4_K) and ``fp8.dequantize_fp8_block`` (FP8 e4m3, 128x128 float32 block scales),
so a tile holds exactly what ``QTensor.dequantize`` gives. Formats: ``GPU_FORMATS``; ``data``
as in ``QTensor``: GGML raw bytes uint8 (rows, row_bytes), FP8 e4m3fn (rows, cols) (uint8 bytes
accepted).

FP8 with bfloat16/float16 activations on CUDA capability >= 8.9 goes through
``torch._scaled_mm`` instead (``fp8_scaled_mm``): activations are quantised to e4m3 per token,
so the result carries that error. float32 activations (``exact=True``) take the exact path.

Batched experts, for the GPU expert cache (one layer's cached experts as slot stacks)::

    gpu_moe(x, slot_ids, weights, w1, w3, w2) -> y
        x:          (N, hidden) activations, on the stacks' device
        slot_ids:   int64 (N, K): each token's experts as slots of the stacks; -1 where an
                    expert is not cached here (the caller computes that share elsewhere)
        weights:    (N, K) routing weights
        w1, w3, w2: ExpertStack of gate, up, down: ``data`` uint8 (S, rows, row_bytes) stored
                    bytes (FP8: the e4m3 bytes, row_bytes = cols), ``scale`` float32
                    (S, row_blocks, col_blocks) for FP8, else None
        y:          (N, hidden) in x.dtype, sum over k with slot_ids[n, k] >= 0 of
                    weights[n, k] * W2[s] (silu(W1[s] x[n]) * W3[s] x[n]), s = slot_ids[n, k]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from localseek.quant.formats import FORMATS
from localseek.quant.fp8 import FP8_BLOCK, FP8_QTYPE
from localseek.quant.tensor import QTensor

# float32 bytes of one dequantised tile: a few hundred rows of a V3 expert, few kernel launches
TILE_BYTES = 16 << 20
FP8_MAX = 448.0  # largest finite e4m3fn
# elements per block, bytes per block
GGML_BLOCKS = {t: (f.block, f.block_bytes) for t, f in FORMATS.items() if f.gpu and f.ggml}
GPU_FORMATS = tuple(t for t, f in FORMATS.items() if f.gpu)


def supports(w: QTensor) -> bool:
    """Whether the tiled kernels run this weight: a 2-D weight in one of ``GPU_FORMATS``."""
    if w.qtype not in GPU_FORMATS or len(w.shape) != 2:
        return False
    rows, cols = w.shape
    if w.qtype == FP8_QTYPE:
        return w.scale is not None and tuple(w.data.shape) == (rows, cols)
    block, size = GGML_BLOCKS[w.qtype]
    return cols % block == 0 and tuple(w.data.shape) == (rows, cols // block * size)


def tile_rows(rows: int, cols: int, tile_bytes: int = TILE_BYTES) -> int:
    """Output rows dequantised at once: as many as fit in ``tile_bytes`` of float32, at least 1."""
    return max(1, min(rows, tile_bytes // (4 * cols)))


# --- decoding rows ---------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """float32 (n, 1) from little-endian half bytes (n, 2)."""
    return b.contiguous().view(torch.float16).float()


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:  # (n, 34) -> (n, 32)
    torch.mul(blocks[:, 2:].view(torch.int8).float(), _f16(blocks[:, :2]), out=out)


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:  # (n, 18) -> (n, 32)
    qs = blocks[:, 2:]
    q = torch.cat([qs & 15, qs >> 4], dim=1).float() - 8  # low nibbles: 0..15, high: 16..31
    torch.mul(_f16(blocks[:, :2]), q, out=out)


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:  # (n, 144) -> (n, 256)
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    s = blocks[:, 4:16]  # 0..3 low scale bits, 4..7 low min bits, 8..11 high nibbles
    lo, mi, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=1).float()  # (n, 8)
    m = torch.cat([mi & 63, (hi >> 4) | ((mi >> 2) & 48)], dim=1).float()  # (n, 8)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, 8, 32).float()  # (n, 8 sub-blocks, 32)
    dq = (d * sc).view(n, 8, 1)
    dm = (dmin * m).view(n, 8, 1)
    torch.sub(dq * q, dm, out=out.view(n, 8, 32))


_DECODERS = {"ggml_q8_0": _q8_0, "ggml_q4_0": _q4_0, "ggml_q4_k": _q4_k}


def _fp8(data: torch.Tensor) -> torch.Tensor:
    return data.view(torch.float8_e4m3fn) if data.dtype == torch.uint8 else data


def dequantize_rows(w: QTensor, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0..r1 of ``w`` as float32 (r1 - r0, cols), written into ``out`` when given."""
    rows, cols = w.shape
    assert 0 <= r0 <= r1 <= rows, f"rows {r0}..{r1} outside 0..{rows}"
    if out is None:
        out = torch.empty(r1 - r0, cols, dtype=torch.float32, device=w.device)
    if w.qtype == FP8_QTYPE:
        assert w.scale is not None
        block_row = torch.arange(r0, r1, device=w.device) // FP8_BLOCK
        s = w.scale.float()[block_row].repeat_interleave(FP8_BLOCK, 1)[:, :cols]  # (n, cols)
        torch.mul(_fp8(w.data[r0:r1]).float(), s, out=out)
    else:
        block, size = GGML_BLOCKS[w.qtype]
        blocks = w.data[r0:r1].reshape(-1, size)  # (n * cols / block, size)
        _DECODERS[w.qtype](blocks, out.view(-1, block))
    return out


# --- one matrix ------------------------------------------------------------------------------


def _scaled_mm_ok(x: torch.Tensor, w: QTensor) -> bool:
    rows, cols = w.shape
    return (
        w.qtype == FP8_QTYPE
        and x.device.type == "cuda"
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
        and rows % 16 == 0
        and cols % 16 == 0
    )


def fp8_scaled_mm(x: torch.Tensor, w: QTensor) -> torch.Tensor:
    """y = x @ w.T for an FP8 block weight through ``torch._scaled_mm``, (T, in) -> (T, out).

    Per 128-row block of W, its block scales are folded into x (each 128 columns times that
    block's scale), which is then quantised to e4m3 with one scale per token; the product is
    bfloat16. Rows and columns must be multiples of 16.
    """
    rows, cols = w.shape
    assert w.scale is not None
    data, scale, xf = _fp8(w.data), w.scale.float(), x.float()
    y = torch.empty(x.shape[0], rows, dtype=torch.bfloat16, device=x.device)
    for b in range(scale.shape[0]):
        r0, r1 = b * FP8_BLOCK, min(rows, (b + 1) * FP8_BLOCK)
        xs = xf * scale[b].repeat_interleave(FP8_BLOCK)[:cols]  # (T, cols)
        sx = xs.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # (T, 1)
        xq = (xs / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        ones = torch.ones(1, r1 - r0, device=x.device)
        y[:, r0:r1] = torch._scaled_mm(
            xq, data[r0:r1].t(), scale_a=sx, scale_b=ones, out_dtype=torch.bfloat16
        )
    return y.to(x.dtype)


def qmatmul(x: torch.Tensor, w: QTensor, tile_bytes: int = TILE_BYTES) -> torch.Tensor:
    """y = x @ w.T for a weight in ``GPU_FORMATS`` on x's device, (..., in) -> (..., out).

    The weight is dequantised ``tile_rows(out, in, tile_bytes)`` rows at a time into one
    buffer; FP8 takes ``fp8_scaled_mm`` where the device and activation dtype allow it.
    """
    rows, cols = w.shape
    x2 = x.reshape(-1, cols)  # (T, in)
    if _scaled_mm_ok(x2, w):
        y = fp8_scaled_mm(x2, w)
    else:
        n = tile_rows(rows, cols, tile_bytes)
        buf = torch.empty(n, cols, dtype=torch.float32, device=x.device)
        y = x2.new_empty(x2.shape[0], rows)  # (T, out)
        for r0 in range(0, rows, n):
            r1 = min(rows, r0 + n)
            tile = dequantize_rows(w, r0, r1, out=buf[: r1 - r0])
            y[:, r0:r1] = F.linear(x2, tile.to(x.dtype))
    return y.view(*x.shape[:-1], rows)


# --- one layer's cached experts --------------------------------------------------------------


@dataclass
class ExpertStack:
    """One projection of a layer's cached experts, slot by slot.

    Attributes:
        qtype: the format tag (one of ``GPU_FORMATS``).
        shape: one expert's logical (rows, cols).
        data: uint8 (S, rows, row_bytes) stored bytes (FP8: e4m3 bytes, row_bytes = cols).
        scale: float32 (S, row_blocks, col_blocks) FP8 block scales, else None.
    """

    qtype: str
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None

    def expert(self, s: int) -> QTensor:
        """Slot ``s`` as a QTensor viewing the stack."""
        data = self.data[s]
        if self.qtype == FP8_QTYPE:
            data = _fp8(data)
        return QTensor(self.qtype, self.shape, data, None if self.scale is None else self.scale[s])


def gpu_moe(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    w1: ExpertStack,
    w3: ExpertStack,
    w2: ExpertStack,
    tile_bytes: int = TILE_BYTES,
) -> torch.Tensor:
    """Routed SwiGLU experts over the cached slots; see the module docstring for the shapes.

    Runs only slots that got tokens; assignments with slot -1 contribute nothing.
    """
    y = torch.zeros_like(x)  # (N, hidden)
    counts = torch.bincount(slot_ids[slot_ids >= 0], minlength=w1.data.shape[0]).tolist()
    for s, n in enumerate(counts):
        if n == 0:
            continue
        token, k = torch.where(slot_ids == s)
        xe = x[token]  # (n, hidden)
        h = F.silu(qmatmul(xe, w1.expert(s), tile_bytes)) * qmatmul(xe, w3.expert(s), tile_bytes)
        out = qmatmul(h, w2.expert(s), tile_bytes)  # (n, hidden)
        y.index_add_(0, token, out * weights[token, k, None].to(out.dtype))
    return y
