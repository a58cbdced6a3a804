"""`localseek profile`: count which routed experts each layer picks over a file of prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from localseek.cli.common import (
    add_model_args,
    check_output_path,
    load_from_args,
    non_negative_int,
    write_atomically,
)
from localseek.errors import LocalseekError


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="where to write the statistics (JSON)")
    p.add_argument(
        "-n", "--max-new-tokens", type=non_negative_int, default=64, help="tokens per prompt"
    )


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from localseek.offload.plan import ExpertUsage
    from localseek.offload.stats import record_usage

    err = Console(stderr=True, highlight=False)
    out = check_output_path(args.out, "--out")
    src = Path(args.prompts)
    try:
        prompts = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise LocalseekError(f"{src}: cannot read the prompts ({e.__class__.__name__}).") from e
    if not prompts:
        raise LocalseekError(f"{src}: no prompts (one per line).")
    model = load_from_args(args, err)
    if model.tokenizer is None:
        raise LocalseekError(f"{model.path}: no tokenizer, so text prompts cannot be encoded.")
    usage = ExpertUsage()
    with record_usage(model, usage), Progress(console=err, transient=True) as bar:
        task = bar.add_task("profiling", total=len(prompts))
        for text in prompts:
            ids = model.tokenizer.encode(text)[: model.ctx - args.max_new_tokens]
            for _ in model.generate(ids, args.max_new_tokens):
                pass
            bar.advance(task)
    write_atomically(out, json.dumps(usage.to_dict(str(model.path))) + "\n")
    err.print(f"{usage.tokens} tokens over {len(prompts)} prompts -> {args.out}")
    return 0
