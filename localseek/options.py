"""Runtime settings, resolved and validated in one place (never module globals)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from localseek.errors import LocalseekError

if TYPE_CHECKING:  # torch loads only when a model does: `--help` and `plan` start fast
    import torch

log = logging.getLogger(__name__)

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
        import torch

        dev = _device(device)
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


def _device(device: str | torch.device) -> torch.device:
    """A device localseek can run on: the CPU, or a CUDA GPU that torch sees."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LocalseekError(f"device {device!r} is not a torch device (cpu, cuda).") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise LocalseekError(
            f"device {str(device)!r} is not available: localseek runs on cpu or cuda."
        )
    if not torch.cuda.is_available():
        raise LocalseekError(f"device {str(device)!r} was asked for, but torch sees no CUDA GPU.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LocalseekError(
            f"device {str(device)!r} was asked for, but torch sees "
            f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0 is the first)."
        )
    return dev


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

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


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), bounded by a cgroup
    CPU quota (containers). ``os.cpu_count()`` counts the machine's CPUs, not these."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup allows (cgroup v2 cpu.max, or v1's cfs quota), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as f:
            period_us = int(f.read())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def busy_cpus(interval: float = 0.05) -> float | None:
    """How many of this process's CPUs other work kept busy over the next ``interval`` seconds
    (this process sleeps meanwhile), from /proc/stat; None where that cannot be read."""

    def sample() -> dict[str, tuple[int, int]]:
        times = {}
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu":
                    ticks = [int(v) for v in fields[:8]]
                    idle = ticks[3] + ticks[4]  # idle + iowait
                    times[name] = (sum(ticks) - idle, sum(ticks))
        return times

    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        before = sample()
        time.sleep(interval)
        after = sample()
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0.0
    for name in mine & before.keys() & after.keys():
        total = after[name][1] - before[name][1]
        if total > 0:
            busy += (after[name][0] - before[name][0]) / total
    return busy


# a look at /proc/stat that finds this much of a CPU busy with other work means a busy machine
OTHER_WORK_CPUS = 0.5


def choose_openmp_wait_policy(
    environ: MutableMapping[str, str] = os.environ,
    busy: Callable[[], float | None] = busy_cpus,
) -> str:
    """How OpenMP threads (torch's and numba's libgomp) wait between parallel calls, set in
    ``environ`` before libgomp loads (it reads this once, when it loads). ``busy`` says how many
    CPUs other work keeps busy. Returns what was chosen, in words.

    Spinning (GOMP_SPINCOUNT=30000, about 0.3 ms) saves a wake-up per call on a quiet machine,
    but where another process keeps a core busy a spinning thread holds the core that the
    thread everyone waits for needs: decode of the demo model fell from ~150 to 8 tok/s with
    one busy process beside it. Sleeping waiters (OMP_WAIT_POLICY=PASSIVE) are woken ahead of
    such a process by the scheduler. So: spin only when no other work was seen on this
    process's CPUs in a 50 ms look; a choice already in the environment is kept.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return "kept from the environment"
    seen = busy()
    if seen is not None and seen < OTHER_WORK_CPUS:
        environ["GOMP_SPINCOUNT"] = "30000"
        return "spin: no other work seen"
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "passive: other work seen" if seen is not None else "passive: load unknown"


def set_threads(threads: int | None) -> int:
    """One thread setting for torch and numba, so the two never oversubscribe the cores.
    None means every usable core, more is capped to them. Returns the threads set.

    Not fewer where other work is seen: with sleeping waiters (the wait policy chosen then)
    every core did best or near it beside a busy process too (benchmarks/threads.py, demo
    model: 177 tok/s on 2 threads, 67 on 1), and a short look at the load is noisy."""
    import numba
    import torch

    usable = usable_cores()
    if threads is None:
        threads = usable
    elif threads > usable:
        log.info("%d threads capped to the %d usable cores", threads, usable)
        threads = usable
    # numba first: starting its OpenMP pool sets the process-wide OpenMP thread count, which
    # torch shares (torch asked for 1 thread ran on 2 when it was set before numba)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    return threads
