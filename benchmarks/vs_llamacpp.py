"""localseek against llama.cpp (llama-cpp-python) on the same GGUF, same threads, one run.

    python tools/make_synthetic.py --arch v2-lite --layers 4 --out models/v2lite-4l.gguf
    python benchmarks/vs_llamacpp.py --model models/v2lite-4l.gguf --threads 2 -r 3

Tests pp128, pp512, tg64 and tg128 (llama-bench's conventions, see ``localseek.bench``); the
engines alternate on every repeat; medians, their ratio (localseek / llama.cpp), weight bytes
read per decoded token and the effective GB/s. Writes
``benchmarks/results/vs_llamacpp-<model>-<date>.json`` and prints a markdown table for
``benchmarks/README.md``.
"""

from __future__ import annotations

import localseek  # before torch: it sets the OpenMP wait policy libgomp reads when it loads

# isort: split
import argparse
import json
import os
import shlex
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

from localseek.bench import (
    BenchTest,
    LlamaCppEngine,
    LocalseekEngine,
    context_needed,
    machine_info,
    run_tests,
)
from localseek.checkpoint import open_checkpoint
from localseek.inspect import summarize

RESULTS = Path(__file__).parent / "results"
TESTS = [BenchTest("pp", 128), BenchTest("pp", 512), BenchTest("tg", 64), BenchTest("tg", 128)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a deepseek2 GGUF file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--tests", default="pp128,pp512,tg64,tg128", help="comma-separated test names")
    p.add_argument("--exact", action="store_true", help="localseek with float32 activations")
    p.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    wanted = args.tests.split(",")
    tests = [t for t in TESTS if t.name in wanted]
    ctx = context_needed(tests)
    with open_checkpoint(args.model) as ckpt:
        info = summarize(ckpt)
    bytes_per_token = info["bytes_per_token"]["total"]
    model = localseek.load(args.model, threads=args.threads, exact=args.exact, ctx=ctx)
    engines = [LocalseekEngine(model), LlamaCppEngine(args.model, args.threads, ctx)]

    def show(engine: str, test: BenchTest, repeat: int) -> None:
        label = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{args.repetitions}"
        print(f"  {test.name:6s} {engine:9s} {label}", file=sys.stderr, flush=True)

    try:
        results = run_tests(engines, tests, args.repetitions, model.config.vocab_size, on_run=show)
    finally:
        for e in engines:
            e.close()
    rows = []
    for test in tests:
        ours, peer = (r for r in results if r.test == test)
        med, peer_med = statistics.median(ours.samples), statistics.median(peer.samples)
        gbps = bytes_per_token * med / 1e9 if test.kind == "tg" else None
        peer_gbps = bytes_per_token * peer_med / 1e9 if test.kind == "tg" else None
        rows.append(
            {
                "test": test.name,
                "localseek_tps_median": med,
                "llamacpp_tps_median": peer_med,
                "ratio": med / peer_med,
                "localseek_samples": ours.samples,
                "llamacpp_samples": peer.samples,
                "localseek_effective_gb_per_s": gbps,
                "llamacpp_effective_gb_per_s": peer_gbps,
            }
        )
    now = datetime.now(timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": "python " + shlex.join(["benchmarks/vs_llamacpp.py", *(argv or sys.argv[1:])]),
        "model": Path(args.model).name,
        "model_bytes": Path(args.model).stat().st_size,
        "architecture": info.get("architecture"),
        "layers": model.config.num_hidden_layers,
        "threads": args.threads,
        "exact": args.exact,
        "bytes_per_token": bytes_per_token,
        "load_average": list(psutil.getloadavg()),
        "openmp_env": {
            k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ
        },
        "machine": machine_info(),
        "torch": torch.__version__,
        "results": rows,
    }
    out = args.out or RESULTS / f"vs_llamacpp-{Path(args.model).stem}-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("| test | localseek tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['test']} | {r['localseek_tps_median']:.2f} | {r['llamacpp_tps_median']:.2f} "
            f"| {r['ratio']:.2f} |"
        )
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
