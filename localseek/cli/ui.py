"""All terminal rendering of `localseek chat`, so that the chat loop in chat.py reads as logic.

``ChatUI`` has two faces: interactive (stdin is a terminal: a header, a coloured prompt with line
editing, dimmed reasoning, a speed line after each answer) and plain (stdin is piped: one line in
is one user turn, the answer text goes to stdout and nothing else does).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class ThinkSplitter:
    """Splits streamed text into (piece, thinking) parts at ``<think>`` / ``</think>`` tags, which
    may arrive split across pieces; a possible tag start is held back until it is decided."""

    def __init__(self, thinking: bool = False) -> None:
        self.thinking = thinking
        self._held = ""

    def push(self, text: str) -> list[tuple[str, bool]]:
        """Parts of ``text`` that are decided, each with whether it is reasoning."""
        text = self._held + text
        self._held = ""
        parts: list[tuple[str, bool]] = []
        while text:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            at = text.find(tag)
            if at >= 0:
                parts.append((text[:at], self.thinking))
                text = text[at + len(tag) :]
                self.thinking = not self.thinking
                continue
            keep = _tag_prefix_len(text, tag)
            parts.append((text[: len(text) - keep], self.thinking))
            self._held = text[len(text) - keep :]
            break
        return [(p, t) for p, t in parts if p]

    def flush(self) -> list[tuple[str, bool]]:
        """Whatever is held back, as text."""
        held, self._held = self._held, ""
        return [(held, self.thinking)] if held else []


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class SpeedLine:
    """The figures of the line shown after each answer. Optional ones are shown when known, so
    the offload layer's figures (GPU expert-cache hit rate) slot in without a layout change."""

    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    ram_bytes: int
    gpu_bytes: int | None = None
    expert_cache_hit_rate: float | None = None
    stopped_at_limit: bool = False

    def render(self) -> str:
        """The line's text, figures joined by " · "."""
        parts = [
            f"prefill {self.prefill_tokens_per_second:.1f} tok/s",
            f"decode {self.decode_tokens_per_second:.1f} tok/s",
            f"RAM {gib(self.ram_bytes)}",
        ]
        if self.gpu_bytes is not None:
            parts.append(f"GPU {gib(self.gpu_bytes)}")
        if self.expert_cache_hit_rate is not None:
            parts.append(f"expert cache hits {self.expert_cache_hit_rate:.0%}")
        if self.stopped_at_limit:
            parts.append("stopped at --max-new-tokens")
        return " · ".join(parts)


def gib(n: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / 2**30:.2f} GiB"


HELP_TEXT = [
    ("/help", "show this list"),
    ("/reset", "forget the conversation (the system prompt stays)"),
    ("/stats", "speed of the last answer and totals of this session"),
    ("/system TEXT", "set the system prompt and start over (/system alone clears it)"),
    ("/exit", "leave (Ctrl-D too)"),
    ("Ctrl-C", "stop the answer being written; what it wrote so far stays in the conversation"),
]


class ChatUI:
    """Context manager for a chat session's terminal: reading turns and showing answers."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self._prompt = ">>> "
        self._think = ThinkSplitter()
        self._at_line_start = True

    def __enter__(self) -> ChatUI:
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())

                # \001 \002 tell readline that the colour codes take no columns
                self._prompt = "\001\x1b[1;32m\002>>> \001\x1b[0m\002"
            except ImportError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.interactive and not self._at_line_start:
            self.out.print()

    # --- around the conversation --------------------------------------------------------------

    def header(self, name: str, architecture: str, device: str, memory: str) -> None:
        """The model's name, architecture, device and memory in use (terminal only)."""
        if not self.interactive:
            return
        self.out.print(
            f"[bold]{name}[/bold]  [dim]{architecture} · {device} · {memory} in use[/dim]"
        )
        self.out.print("[dim]/help for commands, Ctrl-C stops an answer, Ctrl-D leaves[/dim]")

    def read_turn(self) -> str | None:
        """The next line the user typed (stripped), "" after Ctrl-C at the prompt, None at the
        end of input."""
        if not self.interactive:
            line = sys.stdin.readline()
            return None if line == "" else line.strip()
        try:
            return input(self._prompt).strip()
        except EOFError:
            self.out.print()
            return None
        except KeyboardInterrupt:
            self.out.print("\n[dim](/exit or Ctrl-D to leave)[/dim]")
            return ""

    def help(self) -> None:
        """The list of commands."""
        table = Table(show_header=False, box=None, padding=(0, 2))
        for command, what in HELP_TEXT:
            table.add_row(f"[bold]{command}[/bold]", what)
        self.out.print(table)

    def note(self, text: str) -> None:
        """A short remark from the program (not the model)."""
        if self.interactive:
            self.out.print(f"[dim]{escape(text)}[/dim]")
        else:
            self.err.print(text, markup=False)

    def error(self, text: str) -> None:
        """A problem with one turn or command; the session goes on."""
        if self.interactive:
            self.err.print(f"[red]{escape(text)}[/red]")
        else:
            self.err.print(text, markup=False)

    # --- one answer ---------------------------------------------------------------------------

    def begin_answer(self, thinking: bool) -> None:
        """Start an answer; ``thinking`` when the prompt already opened a ``<think>`` block."""
        self._think = ThinkSplitter(thinking)

    def stream(self, text: str) -> None:
        """Show the next piece of the answer; reasoning is dimmed on a terminal."""
        for piece, thinking in self._think.push(text):
            self._write(piece, thinking)

    def end_answer(self, stop_reason: str) -> None:
        """Finish the answer's line; say why it stopped when that is not the natural end."""
        for piece, thinking in self._think.flush():
            self._write(piece, thinking)
        if not self._at_line_start:
            self._write("\n", False)
        if stop_reason == "interrupted":
            self.note("[interrupted]")
        elif stop_reason == "context":
            self.note(
                "(the context is full: the next turn drops the oldest turns; "
                "raise --ctx to keep more)"
            )

    def _write(self, text: str, thinking: bool) -> None:
        if self.out.is_terminal:
            # model output is untrusted: no escape sequences or bells reach the terminal
            text = _CONTROL.sub("\ufffd", text)
        if self.interactive:
            self.out.print(text, end="", style="dim italic" if thinking else None, markup=False)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        self._at_line_start = text.endswith("\n")

    def speed(self, line: SpeedLine) -> None:
        """The one dim line after an answer (terminal only)."""
        if self.interactive:
            self.out.print(line.render(), style="dim", markup=False)

    def stats(self, rows: list[tuple[str, str, str]]) -> None:
        """/stats: rows of (figure, last answer, session)."""
        table = Table(box=None, padding=(0, 2))
        table.add_column("")
        table.add_column("last answer", justify="right")
        table.add_column("session", justify="right")
        for row in rows:
            table.add_row(*row)
        self.out.print(table)
