"""`localseek perplexity`: perplexity and bits per byte of a text file, llama-perplexity style."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from localseek.cli.common import (
    add_model_args,
    check_output_path,
    counted_progress,
    load_from_args,
    write_atomically,
)
from localseek.errors import LocalseekError

DEFAULT_CTX = 512


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)  # its --ctx is also the chunk length here (default 512)
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    p.add_argument("--json", metavar="F", help="also write the result as a JSON object to F")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from localseek.perplexity import perplexity

    if args.json:
        check_output_path(args.json, "--json")
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LocalseekError(f"{path}: no such file.") from None
    except UnicodeDecodeError as e:
        raise LocalseekError(f"{path}: not UTF-8 text (byte {e.start}).") from None
    except OSError as e:
        raise LocalseekError(f"{path}: cannot be read ({e.strerror}).") from None
    if args.ctx is None:
        args.ctx = DEFAULT_CTX
    model = load_from_args(args, err)
    progress = counted_progress(err, "perplexity")
    with progress:
        task = progress.add_task("chunks", total=None)
        result = perplexity(
            model,
            text,
            ctx=args.ctx,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    out.print(
        f"{path.name}: perplexity {result.perplexity:.4f}, "
        f"{result.bits_per_byte:.4f} bits per byte "
        f"({result.chunks} chunks of {result.ctx} tokens, {result.scored_tokens} tokens "
        f"and {result.scored_bytes} bytes scored)"
    )
    if args.json:
        row = {"model": str(model.path), "file": str(path), **result.to_dict()}
        write_atomically(Path(args.json), json.dumps(row, indent=2) + "\n")
        err.print(f"[dim]wrote {args.json}[/dim]")
    return 0
