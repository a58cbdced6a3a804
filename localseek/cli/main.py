"""`localseek COMMAND ...`: dispatches to one module per command and turns a LocalseekError into
one sentence on stderr and exit code 1."""

from __future__ import annotations

import argparse
import logging
import sys

from localseek import __version__
from localseek.cli import bench, chat, generate, inspect, perplexity, plan, profile, quantize
from localseek.errors import LocalseekError

COMMANDS = {
    "chat": chat,
    "generate": generate,
    "bench": bench,
    "inspect": inspect,
    "perplexity": perplexity,
    "quantize": quantize,
    "plan": plan,
    "profile": profile,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localseek",
        description="Run DeepSeek-V2/V3-class MoE models on one workstation.",
    )
    parser.add_argument("--version", action="version", version=f"localseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--verbose", action="store_true", help="log what happens to stderr")
        module.setup_arg_parser(p)
        p.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args) or 0
    except LocalseekError as e:
        print(f"localseek: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("localseek: interrupted", file=sys.stderr)
        return 130
