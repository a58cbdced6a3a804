"""`localseek quantize SRC DST --type q4_k|q4_0|q8_0|fp8`: convert a checkpoint, then report
how close the result is to the source."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from localseek.cli.common import add_threads_arg, threads_from_args

if TYPE_CHECKING:
    from rich.console import Console

    from localseek.convert.quantize import QuantizeReport

# convert.quantize's TYPES and KEEP_TYPES, written out so that `--help` does not import torch
# (tests/test_quantize.py checks that the two agree)
TYPE_NAMES = ("q4_k", "q4_0", "q8_0", "fp8")
KEEP_TYPE_NAMES = ("q8_0", "q4_k", "q4_0", "bf16", "f16", "f32")


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face checkpoint folder or GGUF file")
    p.add_argument("dst", help="output .gguf file (a folder for --type fp8)")
    # checked by the library, so that an unknown type is one sentence like every other error
    p.add_argument(
        "--type",
        dest="qtype",
        default="q4_k",
        help=f"type of the routed experts: {' | '.join(TYPE_NAMES)}",
    )
    p.add_argument(
        "--keep",
        default="q8_0",
        help=f"type of attention, shared experts, dense MLPs, embeddings, lm_head "
        f"({' | '.join(KEEP_TYPE_NAMES)}; GGUF only)",
    )
    add_threads_arg(p, "quantizer threads")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument(
        "--no-eval", action="store_true", help="skip the next-token KL check (loads both models)"
    )


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from localseek.convert.quantize import quantize_model

    console = Console(highlight=False, stderr=True)
    bar = Progress(
        TextColumn("quantizing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task("quantize", total=None)

    def advance(n: int, total: int) -> None:
        bar.update(task, advance=n, total=total)

    with bar:
        report = quantize_model(
            args.src,
            args.dst,
            qtype=args.qtype,
            keep=args.keep,
            threads=threads_from_args(args),
            force=args.force,
            evaluate=not args.no_eval,
            progress=advance,
        )
    render_report(Console(highlight=False), report)
    return 0


def render_report(console: Console, r: QuantizeReport) -> None:
    """The quality report: sizes, types, relative RMSE per class, next-token KL."""
    from rich.table import Table

    rate = r.source_bytes / r.seconds / 2**20 if r.seconds else 0.0
    console.print(
        f"wrote {r.dst}: {r.output_bytes / 2**20:.1f} MiB from {r.source_bytes / 2**20:.1f} MiB "
        f"in {r.seconds:.1f} s ({rate:.1f} MiB/s)"
    )
    console.print("tensor types: " + ", ".join(f"{t} x{n}" for t, n in sorted(r.types.items())))
    table = Table(title="written weights vs source")
    table.add_column("tensor class")
    table.add_column("relative RMSE", justify="right")
    for cls, value in r.rel_rmse.items():
        table.add_row(cls, f"{value:.4%}")
    console.print(table)
    if r.kl is not None:
        console.print(
            f"next-token KL(source || output) {r.kl:.3e} nats, "
            f"top-1 agreement {r.top1:.1%} (exact mode, fixed token sample)"
        )
    elif r.eval_note:
        console.print(f"next-token KL: {r.eval_note}")
