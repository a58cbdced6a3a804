"""The fast CPU path (int8 activations into every quantized matmul; bf16 tiles for prefill
batches on CPUs with bf16 matrix units) against exact=True.

    .venv/bin/localseek quantize localseek/data/demo models/demo-q4_0.gguf --type q4_0 --no-eval
    .venv/bin/python benchmarks/fast_vs_exact.py --model models/demo-q4_0.gguf [--int8-prefill]

``--int8-prefill`` keeps the int8 kernels for every batch, as on a CPU without bf16 units (it
tells ``quant.cpu.widen`` the CPU has none), to compare the two fast paths on one machine.

Scores held-out text in chunks with both modes and reports the KL divergence of the next-token
distributions (exact || fast, nats; mean and max over tokens) and top-1 agreement. JSON to
``benchmarks/results/fast_vs_exact-<model>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import localseek
from localseek.bench import machine_info

HELDOUT = Path(localseek.__file__).parent / "data" / "demo" / "heldout.txt"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--file", type=Path, default=HELDOUT, help="text to score")
    p.add_argument("--chars", type=int, default=6000, help="characters of the file to use")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--int8-prefill", action="store_true", help="no bf16 tiles (see above)")
    args = p.parse_args(argv)
    from localseek.quant.cpu import widen

    if args.int8_prefill:
        widen.BF16_UNITS = False  # what a CPU without bf16 units runs; a benchmark switch only
    prefill = "bf16 tiles" if widen.use_tiles(None, False, args.chunk) else "int8"
    exact = localseek.load(args.model, exact=True, ctx=args.chunk)
    fast = localseek.load(args.model, exact=False, ctx=args.chunk)
    ids = exact.tokenizer.encode(args.file.read_text(encoding="utf-8")[: args.chars])
    kls, agree, n = [], 0, 0
    for i in range(0, len(ids) - args.chunk + 1, args.chunk):
        chunk = ids[i : i + args.chunk]
        la, lb = log_softmax(exact.logits(chunk)), log_softmax(fast.logits(chunk))
        kls.append((np.exp(la) * (la - lb)).sum(-1))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        n += len(chunk)
    kl = np.concatenate(kls)
    now = datetime.now(timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python " + shlex.join(["benchmarks/fast_vs_exact.py", *(argv or sys.argv[1:])]),
        "model": Path(args.model).name,
        "tokens": n,
        "fast_prefill_products": prefill,
        "kl_mean_nats": float(kl.mean()),
        "kl_max_nats": float(kl.max()),
        "top1_agreement": agree / n,
        "machine": machine_info(),
    }
    out = (
        Path(__file__).parent
        / "results"
        / f"fast_vs_exact-{Path(args.model).stem}{'-int8' if args.int8_prefill else ''}"
        f"-{now:%Y-%m-%d}.json"
    )
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "tokens",
                    "fast_prefill_products",
                    "kl_mean_nats",
                    "kl_max_nats",
                    "top1_agreement",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
