"""localseek against llama.cpp (llama-cpp-python) on the same GGUF, same threads, one run.

    python tools/make_synthetic.py --arch v2-lite --layers 4 --out models/v2lite-4l.gguf
    python benchmarks/vs_llamacpp.py --model models/v2lite-4l.gguf --threads 2 -r 3
    python tools/make_llamacpp_models.py --shape v2l
    python benchmarks/vs_llamacpp.py --shape v2l --types q4_k_m,q6_k,q8_0 -r 3

Tests pp128, pp512, tg64 and tg128 (llama-bench's conventions, see ``localseek.bench``); the
engines alternate on every repeat; medians, their ratio (localseek / llama.cpp), weight bytes
read per decoded token and the effective GB/s. Writes
``benchmarks/results/vs_llamacpp-<model>-<date>.json`` (with a -b, -c... suffix rather than
replace an earlier one) and prints a markdown table for ``benchmarks/README.md``.

Several files (``--types`` of one ``--shape``, as ``tools/make_llamacpp_models.py`` names them,
or a ``--models`` list) run one after another, each with all its tests; every file gets its JSON,
with its tensor type mix, and one table has a row per file and the ratio of each test. A file
that either engine cannot load gets a row that says why, and the others still run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from make_llamacpp_models import SHAPES, model_path, type_mix  # noqa: E402

from localseek.bench import (
    BenchTest,
    LlamaCppEngine,
    LocalseekEngine,
    context_needed,
    machine_info,
    run_tests,
)
from localseek.checkpoint import open_checkpoint
from localseek.errors import LocalseekError
from localseek.inspect import summarize

RESULTS = Path(__file__).parent / "results"
TESTS = [BenchTest("pp", 128), BenchTest("pp", 512), BenchTest("tg", 64), BenchTest("tg", 128)]


def bench_file(path: Path, args: argparse.Namespace, command: str) -> dict:
    """Both engines on one file, alternating; returns the JSON report."""
    tests = [t for t in TESTS if t.name in args.tests.split(",")]
    ctx = context_needed(tests)
    with open_checkpoint(path) as ckpt:
        info = summarize(ckpt)
    bytes_per_token = info["bytes_per_token"]["total"]
    model = localseek.load(path, threads=args.threads, exact=args.exact, ctx=ctx)
    engines: list = [LocalseekEngine(model)]

    def show(engine: str, test: BenchTest, repeat: int) -> None:
        label = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{args.repetitions}"
        print(f"  {test.name:6s} {engine:9s} {label}", file=sys.stderr, flush=True)

    try:
        engines.append(LlamaCppEngine(path, args.threads, ctx, repack=not args.no_repack))
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
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": path.name,
        "model_bytes": path.stat().st_size,
        "tensor_types": type_mix(path),
        "architecture": info.get("architecture"),
        "layers": model.config.num_hidden_layers,
        "threads": args.threads,
        "exact": args.exact,
        "llama_cpp_repack": not args.no_repack,
        "bytes_per_token": bytes_per_token,
        "load_average": list(psutil.getloadavg()),
        "openmp_env": {
            k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ
        },
        "machine": machine_info(),
        "torch": torch.__version__,
        "results": rows,
    }


def results_path(model: Path) -> Path:
    """benchmarks/results/vs_llamacpp-<model>-<date>[-b, -c, ...].json, never an existing one."""
    stem = f"vs_llamacpp-{model.stem}-{datetime.now(timezone.utc):%Y-%m-%d}"
    out = RESULTS / f"{stem}.json"
    for suffix in "bcdefghijklmnopqrstuvwxyz":
        if not out.exists():
            break
        out = RESULTS / f"{stem}-{suffix}.json"
    return out


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def mix_cell(mix: dict[str, dict[str, int]]) -> str:
    """``Q4_K 54%, Q8_0 26%, ...``: the share of the file's tensor bytes in each type (>= 1%)."""
    total = sum(v["bytes"] for v in mix.values())
    return ", ".join(
        f"{k} {100 * v['bytes'] / total:.0f}%" for k, v in mix.items() if v["bytes"] >= total / 100
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="a deepseek2 GGUF file")
    which.add_argument("--models", help="comma-separated GGUF files, run one after another")
    which.add_argument("--types", help="comma-separated file types of --shape, e.g. q4_k_m,q6_k")
    p.add_argument("--shape", choices=sorted(SHAPES), default="v2l", help="with --types")
    p.add_argument("--layers", type=int, default=4, help="with --types")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--tests", default="pp128,pp512,tg64,tg128", help="comma-separated test names")
    p.add_argument("--exact", action="store_true", help="localseek with float32 activations")
    p.add_argument(
        "--no-repack",
        action="store_true",
        help="llama.cpp without its CPU weight repacking (its --no-repack: where that crashes)",
    )
    p.add_argument(
        "--out", type=Path, help="JSON path, with --model (default: benchmarks/results/...)"
    )
    args = p.parse_args(argv)
    command = "python " + shlex.join(["benchmarks/vs_llamacpp.py", *(argv or sys.argv[1:])])
    if args.model:
        report = bench_file(args.model, args, command)
        write(report, args.out or results_path(args.model))
        print("| test | localseek tok/s | llama.cpp tok/s | ratio |\n|---|---|---|---|")
        for r in report["results"]:
            print(
                f"| {r['test']} | {r['localseek_tps_median']:.2f} | {r['llamacpp_tps_median']:.2f} "
                f"| {r['ratio']:.2f} |"
            )
        return 0
    if args.out:
        p.error("--out goes with --model; several files each get their own JSON")
    if args.types:
        paths = [model_path(args.shape, args.layers, t.strip()) for t in args.types.split(",")]
    else:
        paths = [Path(m.strip()) for m in args.models.split(",")]
    missing = [str(m) for m in paths if not m.is_file()]
    if missing:
        print(
            f"no such file: {', '.join(missing)} (make them with tools/make_llamacpp_models.py).",
            file=sys.stderr,
        )
        return 1
    tests = [t.name for t in TESTS if t.name in args.tests.split(",")]
    table = [
        f"| file | type mix (bytes) | {' | '.join(tests)} |",
        "|---|---|" + "---|" * len(tests),
    ]
    notes: list[str] = []
    for path in paths:
        print(f"{path.name}:", file=sys.stderr, flush=True)
        mix = mix_cell(type_mix(path))
        try:
            report = bench_file(path, args, command)
        except LocalseekError as e:
            print(f"  {e}", file=sys.stderr)
            table.append(f"| {path.name} | {mix} | {' | '.join(['-'] * len(tests))} |")
            notes.append(f"{path.name} not run: {e}")
            continue
        write(report, results_path(path))
        ratios = {r["test"]: f"{r['ratio']:.2f}" for r in report["results"]}
        table.append(f"| {path.name} | {mix} | {' | '.join(ratios[t] for t in tests)} |")
    print("ratios localseek / llama.cpp (tok/s medians), one run per file")
    print("\n".join(table))
    if notes:
        print("\n" + "\n".join(notes))
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
