"""CPU expert kernels: GB/s of weight bytes read, beside the machine's memory read bandwidth and
beside torch (dequantize + matmul), for DeepSeek-V3 and V2-Lite expert shapes.

    .venv/bin/python benchmarks/kernels.py [--threads 2] [--repeats 5] [--out FILE]

Each timing cycles through a pool of different weights of at least ``--pool-mib`` (default 4x
the last-level cache), so the bytes come from memory as they do at decode, not from cache.
The memory read bandwidth is a numba ``prange`` reduction over 1 GiB with the same threads.
Timings are best-of-``--repeats``; other processes on the machine lower them (the load
average is recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np
import psutil
import torch
import torch.nn.functional as F
from numba import njit, prange

from localseek.options import set_threads
from localseek.quant import QTensor
from localseek.quant.cpu import widen
from localseek.quant.cpu.kernels import qmatmul
from localseek.quant.formats import FORMATS as REGISTRY
from localseek.quant.formats import random_blocks
from localseek.quant.fp8 import FP8_QTYPE, fp8_scale_shape

SHAPES = {  # (out, in) of one expert's projections
    "v3.gate_up": (2048, 7168),
    "v3.down": (7168, 2048),
    "v2_lite.gate_up": (1408, 2048),
    "v2_lite.down": (2048, 1408),
}
FORMATS = {t: (None if f.ggml is None else (f.block, f.block_bytes)) for t, f in REGISTRY.items()}
BATCHES = (1, 4, 32)


def random_weight(qtype: str, shape: tuple[int, int], rng: np.random.Generator) -> QTensor:
    """Random stored bytes with finite scales (timing does not depend on the values)."""
    rows, cols = shape
    if qtype == FP8_QTYPE:
        raw = rng.integers(0, 0x70, (rows, cols), dtype=np.uint8)
        scale = rng.uniform(0.01, 1, fp8_scale_shape(shape)).astype(np.float32)
        data = torch.from_numpy(raw).view(torch.float8_e4m3fn)
        return QTensor(qtype, shape, data, torch.from_numpy(scale))
    return QTensor(qtype, shape, torch.from_numpy(random_blocks(qtype, rows, cols, rng)))


def best_of(fn, repeats: int) -> float:
    fn()  # warm up (and compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@njit(parallel=True, cache=True)
def _read_all(a: np.ndarray) -> np.ndarray:
    """XOR of every uint64 of each row of ``a``: touches every byte once."""
    out = np.zeros(a.shape[0], dtype=np.uint64)
    for r in prange(a.shape[0]):
        acc = np.uint64(0)
        for i in range(a.shape[1]):
            acc ^= a[r, i]
        out[r] = acc
    return out


def pool_times(pool: list, fn, repeats: int) -> tuple[float, float]:
    """(best mean seconds per item over ``repeats`` passes, best single item's seconds).

    The pool is larger than the caches, so every item is read from memory. On a busy machine
    the single best item shows what the kernel does when it gets its cores."""
    for item in pool[:2]:
        fn(item)  # warm up (and compile)
    best_pass = best_item = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in pool:
            t0 = time.perf_counter()
            fn(item)
            best_item = min(best_item, time.perf_counter() - t0)
        best_pass = min(best_pass, (time.perf_counter() - start) / len(pool))
    return best_pass, best_item


def memory_bandwidth(repeats: int) -> tuple[float, float]:
    """Read bandwidth in GB/s with numba's current threads over 1 GiB: (best pass over all of
    it, best single 64 MiB slice), as ``pool_times``."""
    a = np.ones((1 << 14, 8192), dtype=np.uint64)  # (16384, 8192) uint64 = 1 GiB
    slices = [a[i : i + 1024] for i in range(0, a.shape[0], 1024)]  # 16 x 64 MiB
    per_pass, per_slice = pool_times(slices, _read_all, repeats)
    return slices[0].nbytes / per_pass / 1e9, slices[0].nbytes / per_slice / 1e9


def last_level_cache() -> int:
    """Bytes of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 32 << 20


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "last_level_cache_bytes": last_level_cache(),
        "torch": torch.__version__,
        "numba": numba.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pool-mib", type=int, default=None)
    ap.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--formats", nargs="*", choices=list(FORMATS), default=list(FORMATS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    pool_bytes = (args.pool_mib << 20) if args.pool_mib else 4 * last_level_cache()
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    bandwidth, best_bandwidth = memory_bandwidth(args.repeats)
    print(
        f"memory read bandwidth: {bandwidth:.1f} GB/s, best 64 MiB slice {best_bandwidth:.1f} "
        f"GB/s ({args.threads} threads)"
    )
    results = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for qtype in args.formats:
            layout = FORMATS[qtype]
            if layout is not None and shape[1] % layout[0]:
                print(
                    f"{shape_name:16} {qtype:14} skipped: {shape[1]} columns are not whole blocks"
                )
                continue
            first = random_weight(qtype, shape, rng)
            pool = [first] + [
                random_weight(qtype, shape, rng) for _ in range(pool_bytes // first.nbytes)
            ]
            for T in BATCHES:
                x = torch.randn(T, shape[1])

                row = {
                    "shape": shape_name,
                    "out_in": list(shape),
                    "format": qtype,
                    "batch": T,
                    "weight_bytes": first.nbytes,
                    "pool_weights": len(pool),
                }
                modes = {"exact": True} if qtype == FP8_QTYPE else {"exact": True, "fast": False}
                line = f"{shape_name:16} {qtype:14} T={T:<3}"
                for mode, exact in modes.items():

                    def call(w, x=x, exact=exact) -> None:
                        qmatmul(x, w.qtype, w.data, w.scale, exact)

                    sec, best_call = pool_times(pool, call, args.repeats)
                    gb_s = first.nbytes / sec / 1e9
                    best_gb_s = first.nbytes / best_call / 1e9
                    row[f"{mode}_s"] = sec
                    row[f"{mode}_gb_s"] = gb_s
                    row[f"{mode}_fraction_of_bandwidth"] = gb_s / bandwidth
                    row[f"{mode}_best_call_gb_s"] = best_gb_s
                    row[f"{mode}_best_call_fraction"] = best_gb_s / best_bandwidth
                    line += (
                        f"  {mode} {gb_s:5.2f} GB/s ({gb_s / bandwidth:4.0%}, best call "
                        f"{best_gb_s / best_bandwidth:4.0%})"
                    )
                torch_s = best_of(lambda w=first, x=x: F.linear(x, w.dequantize()), 1)
                row["torch_dequant_matmul_s"] = torch_s
                row["torch_gb_s"] = first.nbytes / torch_s / 1e9
                results.append(row)
                print(f"{line}  torch {row['torch_gb_s']:5.2f} GB/s", flush=True)
            del pool, first
    bandwidth_after = memory_bandwidth(args.repeats)[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or Path(__file__).parent / "results" / f"kernels-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "numba_threading_layer": numba.threading_layer(),
        "env": {
            k: os.environ[k]
            for k in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY")
            if k in os.environ
        },
        "machine": machine(),
        "fast_tiles_from_tokens": widen.MIN_TOKENS if widen.BF16_UNITS else None,
        "memory_read_gb_s": bandwidth,
        "memory_read_best_slice_gb_s": best_bandwidth,
        "memory_read_gb_s_after": bandwidth_after,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "pool_bytes": pool_bytes,
        "note": (
            "exact: float32 activations; fast: activations quantized to int8 per 32 (GGML "
            "formats; FP8 has only the float path), or bf16 tiles where "
            f"fast_tiles_from_tokens is not null (a CPU with bf16 units: {widen.BF16_UNITS}). "
            "Fractions are of memory_read_gb_s taken "
            "at the start of this run; other jobs shared the machine when the load average "
            "exceeds the thread count. *_best_call_*: the fastest single call of the pool "
            "against the fastest single 64 MiB slice of the bandwidth test (what the kernel "
            "does when it gets its cores)."
        ),
        "headline_v3_q4_k_batch1": {
            r["shape"]: {
                "exact": r["exact_fraction_of_bandwidth"],
                "fast": r["fast_fraction_of_bandwidth"],
                "exact_best_call": r["exact_best_call_fraction"],
                "fast_best_call": r["fast_best_call_fraction"],
            }
            for r in results
            if r["shape"].startswith("v3.") and r["format"] == "ggml_q4_k" and r["batch"] == 1
        },
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
