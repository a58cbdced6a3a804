"""`localseek COMMAND ...`: dispatches to one module per command and turns a LocalseekError into
one sentence on stderr and exit code 1.

A command's module (``localseek.cli.<name>``: ``setup_arg_parser(p)`` and ``main(args)``) is
imported only when that command runs or shows its help, and keeps torch and numba out of its
top-level imports, so that `--help` answers at once (torch alone takes seconds to import).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from localseek import __version__
from localseek.errors import LocalseekError

# name -> the one line `localseek --help` shows for it
COMMANDS = {
    "chat": "chat with a model in the terminal",
    "generate": "generate text from one prompt",
    "bench": "measure prompt processing and generation speed in tokens per second",
    "inspect": "show a checkpoint's architecture, tensor types and bytes read per token",
    "perplexity": "perplexity and bits per byte of a text file (chunked, second half of each "
    "chunk scored)",
    "quantize": "quantize a checkpoint to GGUF (q4_k, q4_0, q8_0) or DeepSeek's FP8 layout",
    "plan": "show where weights and experts go under GPU and RAM budgets",
    "profile": "record per-layer expert usage over prompts, for `plan --stats` and the cache",
    "serve": "serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming)",
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with each flag's default shown, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        shown = not unset and action.option_strings
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a bad command line said in one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help).\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are set up (all of them when it is "*")."""
    parser = ArgumentParser(
        prog="localseek",
        description="Run DeepSeek-V2/V3-class MoE models on one workstation.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"localseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        if command in (name, "*"):
            p.add_argument("--verbose", action="store_true", help="log what happens to stderr")
            module = importlib.import_module(f"localseek.cli.{name}")
            module.setup_arg_parser(p)
            p.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the first word that is not an option names the command (the top level takes no values)
    command = next((a for a in argv if not a.startswith("-")), None)
    with termination_unwinds():
        try:
            args = build_parser(command).parse_args(argv)
            logging.basicConfig(
                level=logging.INFO if args.verbose else logging.WARNING,
                format="%(levelname)s %(name)s: %(message)s",
            )
            return args.run(args) or 0
        except LocalseekError as e:
            print(f"localseek: error: {e}", file=sys.stderr)
            return 1
        except Terminated as e:
            print(f"localseek: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:  # also while torch imports
            print("localseek: interrupted", file=sys.stderr)
            return 130


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. It unwinds through the same ``finally`` clean-ups as Ctrl-C's
    KeyboardInterrupt (temporary files beside an output), but is not one: chat's "Ctrl-C stops
    the answer, not the session" must not keep a terminated process alive."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def termination_unwinds() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``Terminated`` in the main thread instead of
    ending the process on the spot. A signal the parent set to be ignored (nohup) stays so."""
    signums = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) is signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_terminated(signum: int, frame: object) -> None:
    # once: a second signal must not cut short the clean-up the first one started
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)
