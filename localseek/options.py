"""Runtime settings, resolved and validated in one place (never module globals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from localseek.errors import LocalseekError

# keyword options `localseek.load` accepts besides its named arguments, with their defaults
KNOWN_OPTIONS: dict[str, Any] = {
    "ctx": None,  # context length in tokens; default min(max_position_embeddings, 4096)
    "progress": False,  # show a rich progress bar while loading
    # offload (any of gpu_mem / ram set turns on the tiered expert store)
    "gpu_mem": None,  # bytes (or "24GiB") of the GPU tier: weights, KV cache, scratch, expert cache
    "ram": None,  # bytes (or "200GiB") of routed-expert weights held in RAM; the rest on disk
    "stats": None,  # expert usage statistics file from `localseek profile` (hottest placed first)
    "policy": "lru",  # GPU expert-cache policy: lru, lfu (with decay) or static (hot set)
    "prefetch": True,  # predict the next layer's experts and read them ahead
    "readers": 4,  # disk reader threads
    "disk_io": "auto",  # O_DIRECT for files larger than RAM, else plain; or plain/uncached/direct
}
DEFAULT_CTX = 4096


@dataclass(frozen=True)
class RuntimeOptions:
    device: torch.device
    dtype: torch.dtype
    threads: int | None
    exact: bool
    ctx: int | None
    progress: bool
    gpu_mem: int | None = None
    ram: int | None = None
    stats: str | None = None
    policy: str = "lru"
    prefetch: bool = True
    readers: int = 4
    disk_io: str = "auto"

    @property
    def offload(self) -> bool:
        """Whether routed experts go to the tiered store (a GPU or RAM budget was given)."""
        return self.gpu_mem is not None or self.ram is not None

    @classmethod
    def resolve(
        cls,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        threads: int | None = None,
        exact: bool = False,
        **options: Any,
    ) -> RuntimeOptions:
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise LocalseekError(
                f"unknown option {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(KNOWN_OPTIONS)})."
            )
        merged = {**KNOWN_OPTIONS, **options}
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise LocalseekError(f"device {device!r} is not a torch device.") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise LocalseekError("device 'cuda' was asked for, but torch sees no CUDA GPU.")
        if dtype is None:
            dt = torch.float32 if dev.type == "cpu" or exact else torch.bfloat16
        else:
            dt = _dtype(dtype)
        if exact and dt != torch.float32:
            raise LocalseekError(
                "exact=True promises float32 activations; drop dtype or use float32."
            )
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise LocalseekError(f"threads must be a positive integer, got {threads!r}.")
        ctx = merged["ctx"]
        if ctx is not None and (not isinstance(ctx, int) or ctx < 1):
            raise LocalseekError(f"ctx must be a positive number of tokens, got {ctx!r}.")
        from localseek.offload.cache import POLICIES
        from localseek.offload.plan import parse_size

        sizes = {
            k: None if merged[k] is None else parse_size(merged[k], k) for k in ("gpu_mem", "ram")
        }
        if merged["policy"] not in POLICIES:
            raise LocalseekError(
                f"policy {merged['policy']!r} is not a cache policy ({', '.join(POLICIES)})."
            )
        readers = merged["readers"]
        if not isinstance(readers, int) or readers < 1:
            raise LocalseekError(f"readers must be a positive integer, got {readers!r}.")
        from localseek.offload.store import DISK_IO

        if merged["disk_io"] not in DISK_IO:
            raise LocalseekError(
                f"disk_io {merged['disk_io']!r} is not a way to read ({', '.join(DISK_IO)})."
            )
        return cls(
            dev,
            dt,
            threads,
            bool(exact),
            ctx,
            bool(merged["progress"]),
            sizes["gpu_mem"],
            sizes["ram"],
            None if merged["stats"] is None else str(merged["stats"]),
            merged["policy"],
            bool(merged["prefetch"]),
            readers,
            merged["disk_io"],
        )


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        dt = {
            "float32": torch.float32,
            "f32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "f16": torch.float16,
        }.get(dtype)
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise LocalseekError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16).")
    return dt


def set_threads(threads: int | None) -> None:
    """One thread setting for torch and numba, so the two never oversubscribe the cores."""
    if threads is None:
        return
    import numba

    # numba first: starting its OpenMP pool sets the process-wide OpenMP thread count, which
    # torch shares (torch asked for 1 thread ran on 2 when it was set before numba)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
