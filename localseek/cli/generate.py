"""`localseek generate`: one prompt in, streamed text out, then the speed line."""

from __future__ import annotations

import argparse

from localseek.cli.common import (
    add_model_args,
    add_sampling_args,
    generate_from_args,
    load_from_args,
    utf8_text,
)
from localseek.errors import LocalseekError


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, type=utf8_text, help="prompt text (UTF-8)")
    add_sampling_args(p, 128, "tokens to generate", temperature=0.0, top_p=1.0)
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the model's chat template as one user turn",
    )


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from localseek.tokenizer import StreamDecoder

    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    model = load_from_args(args, err)
    tok = model.tokenizer
    if tok is None:
        raise LocalseekError(f"{model.path}: no tokenizer.json, so text prompts cannot be encoded.")
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    gen = generate_from_args(model, ids, args)
    stream = StreamDecoder(tok)
    if not args.chat:  # a continuation follows its prompt; a chat answer stands alone
        out.print(args.prompt, end="", style="bold", markup=False)
    for token in gen:
        out.print(stream.push(token), end="", markup=False)
    out.print(stream.flush(), markup=False)
    s = gen.stats
    err.print(
        f"[dim]prefill {s.prompt_tokens} tokens at {s.prefill_tokens_per_second:.1f} tok/s, "
        f"decode {s.decode_tokens_per_second:.1f} tok/s over {s.generated_tokens} tokens "
        f"(stopped: {gen.stop_reason})[/dim]",
        soft_wrap=True,
    )
    if model.offload_stats is not None:
        err.print(f"[dim]{s.offload.summary()}[/dim]", soft_wrap=True)
    return 0
