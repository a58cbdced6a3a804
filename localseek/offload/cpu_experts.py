"""CPU expert executor: a whole MoE layer's routed experts in one numba call.

Each projection (w1, w3, w2) of a layer is held as one (E, rows, row_bytes) array of stored
bytes. A GGUF file already keeps the experts of a layer stacked, and its per-expert QTensors are
consecutive views of that stack: the stack is used as it is, without a copy. Experts that come
apart (HF FP8 shards) are stacked once at load, and the per-expert QTensors are rebound to views
of the stack so the weights are held once.
"""

from __future__ import annotations

import numpy as np
import torch

from localseek.model.moe import ReferenceExperts
from localseek.quant import QTensor, Weight
from localseek.quant.cpu.kernels import KERNEL_FORMATS, block_size, moe_swiglu, raw_bytes

Projection = tuple[int, np.ndarray, np.ndarray]  # format code, bytes (E, rows, rb), scales
ExpertWeights = dict[int, list[tuple[Weight, Weight, Weight]]]


def _stacked_bytes(datas: list[np.ndarray]) -> np.ndarray | None:
    """The experts' bytes as one (E, rows, row_bytes) array over their own memory, if they sit
    back to back in it; None otherwise."""
    d0 = datas[0]
    step = d0.nbytes
    start = d0.__array_interface__["data"][0]
    for e, d in enumerate(datas):
        if not d.flags.c_contiguous or d.shape != d0.shape:
            return None
        if d.__array_interface__["data"][0] != start + e * step:
            return None
    shape = (len(datas), *d0.shape)
    return np.lib.stride_tricks.as_strided(d0, shape, (step, *d0.strides), writeable=False)


def _projection(ws: list[Weight]) -> tuple[Projection, list[QTensor]] | None:
    """One projection of all experts as kernel input, with per-expert QTensors over it."""
    if not all(isinstance(w, QTensor) and w.device.type == "cpu" for w in ws):
        return None
    qts: list[QTensor] = ws  # type: ignore[assignment]
    first = qts[0]
    fmt = KERNEL_FORMATS.get(first.qtype)
    if fmt is None or len(first.shape) != 2 or first.shape[1] % block_size(fmt):
        return None
    if any(q.qtype != first.qtype or tuple(q.shape) != tuple(first.shape) for q in qts):
        return None
    datas = [raw_bytes(q.data) for q in qts]
    stack = _stacked_bytes(datas)
    views = qts
    if stack is None:  # stack once; the experts become views of the stack
        stack = np.stack(datas)
        tensors = torch.from_numpy(stack)
        stack.flags.writeable = False  # read-only like a mapped file: one kernel signature
        if first.data.dtype == torch.float8_e4m3fn:
            tensors = tensors.view(torch.float8_e4m3fn)
        views = [QTensor(q.qtype, q.shape, tensors[e], q.scale) for e, q in enumerate(qts)]
    if first.scale is None:
        scales = np.zeros((len(qts), 1, 1), dtype=np.float32)
    else:
        scales = np.stack([q.scale.float().numpy() for q in qts])  # (E, row_blocks, col_blocks)
    return (fmt, stack, scales), views


class CPUExperts:
    """Routed experts computed on the CPU by the fused numba kernel, one call per layer.

    Layers whose experts the kernels cannot run (dense weights, another quant type, weights on
    a GPU) go to ``ReferenceExperts``.

    Args:
        weights: layer -> [(w1, w2, w3) per expert]; entries of stacked layers are rebound to
            views of the stack.
        exact: float32 activations; False lets the kernels quantize them to int8 per 32 for
            integer dot products (GGML formats), about 0.5% relative error per projection.
    """

    def __init__(self, weights: ExpertWeights, exact: bool = True):
        self.weights = weights
        self.exact = exact
        self.stacks: dict[int, tuple[Projection, Projection, Projection]] = {}
        for layer, experts in weights.items():
            projs = []
            for p in range(3):  # w1, w2, w3
                got = _projection([ex[p] for ex in experts])
                if got is None:
                    break
                projs.append(got)
            if len(projs) < 3:
                continue
            (p1, v1), (p2, v2), (p3, v3) = projs
            weights[layer] = list(zip(v1, v2, v3, strict=True))
            self.stacks[layer] = (p1, p2, p3)
        self.reference = ReferenceExperts(weights)

    def __call__(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """y (N, hidden) = sum over each token's experts of weight * SwiGLU expert(x)."""
        stack = self.stacks.get(layer)
        if stack is None or x.device.type != "cpu":
            return self.reference(layer, x, topk_ids, topk_weights)
        w1, w2, w3 = stack
        xs = np.ascontiguousarray(x.detach().float().numpy())  # (N, hidden)
        ids = np.ascontiguousarray(topk_ids.detach().cpu().numpy(), dtype=np.int64)  # (N, K)
        wts = np.ascontiguousarray(topk_weights.detach().float().cpu().numpy())  # (N, K)
        y = moe_swiglu(xs, ids, wts, w1, w3, w2, exact=self.exact)
        return torch.from_numpy(y).to(x.dtype)


def expert_executor(weights: ExpertWeights, exact: bool = True) -> CPUExperts | ReferenceExperts:
    """CPUExperts when the kernels can run at least one layer's experts, else the reference."""
    executor = CPUExperts(weights, exact)
    return executor if executor.stacks else ReferenceExperts(weights)
