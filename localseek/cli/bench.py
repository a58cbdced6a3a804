"""`localseek bench`: tokens per second in llama-bench's conventions (pp512, tg128, mean ± sd),
optionally against llama.cpp on the same GGUF in the same run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from localseek.cli.common import (
    add_model_args,
    check_output_path,
    counted_progress,
    load_from_args,
    non_negative_int,
    positive_int,
    write_atomically,
)
from localseek.errors import LocalseekError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from localseek.bench import BenchResult, BenchTest, Engine

PEERS = ("llama.cpp",)


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "-p", "--n-prompt", type=non_negative_int, default=512, help="prompt tokens (0: no pp test)"
    )
    p.add_argument(
        "-n", "--n-gen", type=non_negative_int, default=128, help="generated tokens (0: no tg test)"
    )
    p.add_argument(
        "-r", "--repetitions", type=positive_int, default=5, help="counted runs per test"
    )
    p.add_argument("--vs", choices=PEERS, help="also run this engine on the same GGUF file")
    p.add_argument(
        "--no-repack",
        action="store_true",
        help="with --vs llama.cpp: without its CPU weight repacking (llama.cpp's --no-repack)",
    )
    p.add_argument("--json", metavar="F", help="write the results as a JSON list of rows to F")


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from localseek.bench import (
        LlamaCppEngine,
        LocalseekEngine,
        context_needed,
        rows_for_json,
        select_tests,
    )
    from localseek.checkpoint import open_checkpoint
    from localseek.checkpoint.gguf import GGUFCheckpoint
    from localseek.demo import default_model
    from localseek.inspect import summarize

    if args.json:
        check_output_path(args.json, "--json")
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    tests = select_tests(args.n_prompt, args.n_gen)
    if args.repetitions < 1:
        raise LocalseekError(f"-r must be at least 1, got {args.repetitions}.")
    need = context_needed(tests)
    if args.ctx is None:
        args.ctx = need
    elif args.ctx < need:
        raise LocalseekError(f"--ctx {args.ctx} is too small for these tests (they need {need}).")
    if args.model is None:
        args.model = str(default_model(err))
    with open_checkpoint(args.model) as ckpt:
        info = summarize(ckpt)
        if args.vs and not isinstance(ckpt, GGUFCheckpoint):
            raise LocalseekError(
                f"{ckpt.path}: --vs {args.vs} runs on a GGUF file and this model is not one "
                "(convert it with the GGUF writer first)."
            )
    model = load_from_args(args, err)
    threads = args.threads or torch.get_num_threads()
    engines: list[Engine] = [LocalseekEngine(model)]
    if args.vs == "llama.cpp":
        engines.append(LlamaCppEngine(model.path, threads, args.ctx, repack=not args.no_repack))
    try:
        results = _run_with_progress(engines, tests, args.repetitions, model.config.vocab_size, err)
    finally:
        for e in engines:
            e.close()
    per_token = info["bytes_per_token"]["total"]
    out.print(_table(results, model.path.name, threads, per_token, args.vs))
    if model.offload_stats is not None:
        err.print(f"[dim]offload, all runs: {model.offload_stats.summary()}[/dim]", soft_wrap=True)
    if args.json:
        command = shlex.join(["localseek", *sys.argv[1:]])
        rows = rows_for_json(results, str(model.path), threads, per_token, command)
        if model.offload_stats is not None:  # the store's figures over all localseek runs
            for row in rows:
                if row["engine"] == "localseek":
                    row["offload"] = model.offload_stats.to_dict()
        for row in rows:  # how the OpenMP threads waited (chosen when localseek was imported)
            row["openmp"] = {
                k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ
            }
        write_atomically(Path(args.json), json.dumps(rows, indent=2) + "\n")
        err.print(f"[dim]wrote {len(rows)} rows to {args.json}[/dim]")
    return 0


def _run_with_progress(
    engines: list[Engine], tests: list[BenchTest], repeats: int, vocab: int, err: Console
) -> list[BenchResult]:
    from localseek.bench import run_tests

    progress = counted_progress(err)
    runs_per_test = (repeats + 1) * len(engines)
    with progress:
        task = progress.add_task("bench", total=runs_per_test * len(tests))

        started = 0

        def on_run(engine: str, test: BenchTest, repeat: int) -> None:
            nonlocal started
            what = "warm-up" if repeat < 0 else f"run {repeat + 1}/{repeats}"
            progress.update(task, completed=started, description=f"{test.name} {engine} {what}")
            started += 1

        results = run_tests(engines, tests, repeats, vocab, on_run=on_run)
        progress.update(task, completed=runs_per_test * len(tests))
    return results


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _table(
    results: list[BenchResult], model: str, threads: int, per_token: int, peer: str | None
) -> Table:
    from rich import box
    from rich.table import Table

    from localseek.bench import ratios

    table = Table(title=f"{model}, {threads} threads", box=box.SIMPLE_HEAD)
    table.add_column("engine", no_wrap=True)
    table.add_column("test", no_wrap=True)
    table.add_column("t/s", justify="right", no_wrap=True)
    table.add_column("effective GB/s", justify="right", no_wrap=True)
    if peer:
        table.add_column(f"vs {peer}", justify="right", no_wrap=True)
    ratio = ratios(results, "localseek", peer) if peer else {}
    for r in results:
        gbps = f"{per_token * r.mean / 1e9:.2f}" if r.test.kind == "tg" else "-"
        row = [
            r.engine,
            r.test.name,
            f"{r.mean:.2f} ± {r.stddev:.2f}",
            gbps,
        ]
        if peer:
            show = r.engine == "localseek" and r.test.name in ratio
            row.append(f"{ratio[r.test.name]:.2f}x" if show else "")
        table.add_row(*row)
    table.caption = (
        f"weights read per token: {_size(per_token)}; effective GB/s = that x t/s "
        "(tg only: a prefill reads the weights once per batch)"
    )
    return table
