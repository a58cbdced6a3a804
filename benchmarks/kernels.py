"""CPU expert kernels: GB/s of weight bytes read, beside the machine's memory read bandwidth and
beside torch (dequantize + matmul), for DeepSeek-V3 and V2-Lite expert shapes.

    .venv/bin/python benchmarks/kernels.py [--threads 2] [--repeats 5] [--out FILE]
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

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from localseek.options import set_threads
from localseek.quant import QTensor
from localseek.quant.cpu_kernels import qmatmul
from localseek.quant.fp8 import FP8_QTYPE, fp8_scale_shape

SHAPES = {  # (out, in) of one expert's projections
    "v3.gate_up": (2048, 7168),
    "v3.down": (7168, 2048),
    "v2_lite.gate_up": (1408, 2048),
    "v2_lite.down": (2048, 1408),
}
FORMATS = {"ggml_q8_0": (32, 34), "ggml_q4_0": (32, 18), "ggml_q4_k": (256, 144), FP8_QTYPE: None}
BATCHES = (1, 4, 32)


def random_weight(qtype: str, shape: tuple[int, int], rng: np.random.Generator) -> QTensor:
    """Random stored bytes with finite scales (timing does not depend on the values)."""
    rows, cols = shape
    if qtype == FP8_QTYPE:
        raw = rng.integers(0, 0x70, (rows, cols), dtype=np.uint8)
        scale = rng.uniform(0.01, 1, fp8_scale_shape(shape)).astype(np.float32)
        data = torch.from_numpy(raw).view(torch.float8_e4m3fn)
        return QTensor(qtype, shape, data, torch.from_numpy(scale))
    block, size = FORMATS[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    n_f16 = 2 if qtype == "ggml_q4_k" else 1
    raw[..., : 2 * n_f16] = (
        rng.uniform(0, 0.05, (rows, cols // block, n_f16)).astype("f2").view(np.uint8)
    )
    return QTensor(qtype, shape, torch.from_numpy(raw.reshape(rows, -1)))


def best_of(fn, repeats: int) -> float:
    fn()  # warm up (and compile)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(repeats: int) -> float:
    """Read bandwidth in GB/s: numpy sum over a 1 GiB float32 array, best of ``repeats``."""
    a = np.ones(1 << 28, dtype=np.float32)
    return a.nbytes / best_of(a.sum, repeats) / 1e9


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
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    bandwidth = memory_bandwidth(args.repeats)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s (numpy sum, 1 GiB)")
    results = []
    for shape_name, shape in SHAPES.items():
        for qtype, layout in FORMATS.items():
            if layout is not None and shape[1] % layout[0]:
                print(
                    f"{shape_name:16} {qtype:14} skipped: {shape[1]} columns are not whole blocks"
                )
                continue
            w = random_weight(qtype, shape, rng)
            for T in BATCHES:
                x = torch.randn(T, shape[1])
                ours = best_of(lambda: qmatmul(x, w.qtype, w.data, w.scale), args.repeats)  # noqa: B023
                torch_s = best_of(lambda: F.linear(x, w.dequantize()), max(1, args.repeats // 2))  # noqa: B023
                row = {
                    "shape": shape_name,
                    "out_in": list(shape),
                    "format": qtype,
                    "batch": T,
                    "weight_bytes": w.nbytes,
                    "kernel_s": ours,
                    "kernel_gb_s": w.nbytes / ours / 1e9,
                    "torch_dequant_matmul_s": torch_s,
                    "torch_gb_s": w.nbytes / torch_s / 1e9,
                    "fraction_of_bandwidth": w.nbytes / ours / 1e9 / bandwidth,
                }
                results.append(row)
                print(
                    f"{shape_name:16} {qtype:14} T={T:<3} kernel {ours * 1e3:8.2f} ms "
                    f"{row['kernel_gb_s']:6.2f} GB/s ({row['fraction_of_bandwidth']:.0%} of bw)  "
                    f"torch {torch_s * 1e3:8.2f} ms {row['torch_gb_s']:6.2f} GB/s"
                )
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or Path(__file__).parent / "results" / f"kernels-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "machine": machine(),
        "memory_read_gb_s": bandwidth,
        "note": "exact mode (float32 activations); other jobs may share the machine",
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
