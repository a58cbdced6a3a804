"""QTensor: a weight kept in its stored form (type tag, logical shape, raw data, scales).

Model code never branches on the type: it hands weights to ``quant.linear`` or asks for
``dequantize()``. Formats register a dequantizer under their type tag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Dequantizer = Callable[["QTensor", torch.dtype], torch.Tensor]
_FORMATS: dict[str, Dequantizer] = {}


def register_format(qtype: str) -> Callable[[Dequantizer], Dequantizer]:
    """Register the dequantizer of a storage format under its type tag."""

    def wrap(fn: Dequantizer) -> Dequantizer:
        if qtype in _FORMATS:
            raise ValueError(f"format {qtype!r} registered twice")
        _FORMATS[qtype] = fn
        return fn

    return wrap


@dataclass
class QTensor:
    """A weight in a stored format.

    Attributes:
        qtype: format tag, e.g. "fp8_e4m3_b128".
        shape: logical shape, (out_features, in_features) for a matrix.
        data: the stored values (raw blocks or a narrow dtype), on the tensor's device.
        scale: per-block scales where the format keeps them apart from ``data``.
    """

    qtype: str
    shape: tuple[int, ...]
    data: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense tensor of ``dtype`` with the logical shape."""
        try:
            fn = _FORMATS[self.qtype]
        except KeyError:
            raise ValueError(f"no dequantizer for format {self.qtype!r}") from None
        return fn(self, dtype)

    def to(self, device: torch.device | str) -> QTensor:
        scale = None if self.scale is None else self.scale.to(device)
        return QTensor(self.qtype, self.shape, self.data.to(device), scale)


Weight = torch.Tensor | QTensor


def weight_nbytes(w: Weight) -> int:
    if isinstance(w, QTensor):
        return w.nbytes
    return w.numel() * w.element_size()
