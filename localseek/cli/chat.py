"""`localseek chat`: a multi-turn conversation in the terminal through the model's chat template.

Rendering lives in ui.ChatUI; this module is the loop: read a turn, run a command or answer it.
Ctrl-C during an answer stops that answer; what it wrote so far stays in the conversation (the
user saw it, so the next turn builds on it), and the session goes on. The KV cache stays between
turns (a ``localseek.session.Session``): each turn computes only what is new. When the
conversation outgrows the context, its oldest turns are dropped (the system prompt stays).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from localseek.cli.common import (
    add_model_args,
    add_sampling_args,
    generate_from_args,
    load_from_args,
)
from localseek.cli.common import undecodable as common_undecodable
from localseek.cli.ui import ChatUI, SpeedLine, gib
from localseek.errors import LocalseekError

if TYPE_CHECKING:  # these import torch: `localseek chat --help` does without them
    from localseek.engine import GenerationStats, Model
    from localseek.offload.stats import OffloadStats


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, 2048, "most tokens in one answer", temperature=0.6, top_p=0.95)


@dataclass
class Conversation:
    """The system prompt and the turns so far, as chat-template messages."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        out += self.turns
        if user is not None:
            out.append({"role": "user", "content": user})
        return out


@dataclass
class SessionStats:
    """The last answer's timings and the session's totals."""

    answers: int = 0
    last: GenerationStats | None = None
    total: GenerationStats | None = None

    def add(self, stats: GenerationStats) -> None:
        self.answers += 1
        self.last = stats
        if self.total is None:
            self.total = type(stats)()
        for f in fields(stats):
            setattr(self.total, f.name, getattr(self.total, f.name) + getattr(stats, f.name))

    def rows(self) -> list[tuple[str, str, str]]:
        from localseek.engine import GenerationStats

        last, total = self.last or GenerationStats(), self.total or GenerationStats()
        return [
            ("answers", "", str(self.answers)),
            ("prompt tokens", str(last.prompt_tokens), str(total.prompt_tokens)),
            ("reused from the cache", str(last.reused_tokens), str(total.reused_tokens)),
            ("prefilled tokens", str(last.prefilled_tokens), str(total.prefilled_tokens)),
            ("generated tokens", str(last.generated_tokens), str(total.generated_tokens)),
            ("prefill seconds", f"{last.prefill_seconds:.2f}", f"{total.prefill_seconds:.2f}"),
            ("decode seconds", f"{last.decode_seconds:.2f}", f"{total.decode_seconds:.2f}"),
            (
                "prefill tok/s",
                f"{last.prefill_tokens_per_second:.1f}",
                f"{total.prefill_tokens_per_second:.1f}",
            ),
            (
                "decode tok/s",
                f"{last.decode_tokens_per_second:.1f}",
                f"{_session_decode_rate(total, self.answers):.1f}",
            ),
            *_offload_rows(last.offload, total.offload),
        ]


def _offload_rows(last: OffloadStats, total: OffloadStats) -> list[tuple[str, str, str]]:
    """The tiered expert store's figures; none when the model runs without offload."""
    if not total.lookups:
        return []

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    return [
        (
            "GPU expert-cache hits",
            pct(last.expert_cache_hit_rate),
            pct(total.expert_cache_hit_rate),
        ),
        ("RAM hits", pct(last.ram_hit_rate), pct(total.ram_hit_rate)),
        (
            "disk MiB/token",
            f"{last.disk_bytes_per_token / 2**20:.2f}",
            f"{total.disk_bytes_per_token / 2**20:.2f}",
        ),
        ("stalled seconds", f"{last.stall_seconds:.2f}", f"{total.stall_seconds:.2f}"),
        ("predictor recall", pct(last.recall()), pct(total.recall())),
    ]


def _session_decode_rate(total: GenerationStats, answers: int) -> float:
    # each answer's first token comes from its prefill, so it is no decode step
    steps = max(total.generated_tokens - answers, 0)
    return steps / total.decode_seconds if total.decode_seconds else 0.0


def memory_in_use(model: Model) -> tuple[int, int | None]:
    """Bytes of this process's resident memory, and of torch's CUDA allocations when on CUDA."""
    import psutil
    import torch

    ram = psutil.Process().memory_info().rss
    gpu = None
    if model.options.device.type == "cuda":
        gpu = torch.cuda.memory_allocated(model.options.device)
    return ram, gpu


class Chat:
    """One chat session: a model, a conversation and its statistics, shown through a ChatUI."""

    def __init__(self, model: Model, args: argparse.Namespace, ui: ChatUI) -> None:
        if model.tokenizer is None:
            raise LocalseekError(f"{model.path}: no tokenizer, so there is no way to chat.")
        self.model = model
        self.tokenizer = model.tokenizer
        self.args = args
        self.ui = ui
        if args.system is not None and (problem := undecodable(args.system, "--system")):
            raise LocalseekError(problem)
        self.conversation = Conversation(system=args.system)
        self.stats = SessionStats()
        from localseek.session import Session

        self.session = Session(model)  # the KV cache, kept from turn to turn
        self.turns = 0
        self.failed = 0

    def run(self) -> int:
        """Read turns until /exit or the end of input; returns the exit code."""
        ram, gpu = memory_in_use(self.model)
        memory = f"RAM {gib(ram)}" + (f", GPU {gib(gpu)}" if gpu is not None else "")
        device = str(self.model.options.device)
        if self.model.plan is not None:  # where the routed experts live
            tiers = self.model.plan.tier_counts()
            device += f" · experts: GPU {tiers['gpu']}, RAM {tiers['ram']}, disk {tiers['disk']}"
        self.ui.header(self.model.path.name, self.model.config.model_type, device, memory)
        while (line := self.ui.read_turn()) is not None:
            if not line:
                continue
            self.turns += 1
            if (problem := undecodable(line)) is not None:
                self.fail(problem)
            elif line.startswith("/"):
                if not self.command(line):
                    break
            elif not self.answer(line):
                self.failed += 1
        if self.failed and not self.ui.interactive:  # a script learns that something went wrong
            s = "" if self.turns == 1 else "s"
            self.ui.error(f"{self.failed} of {self.turns} line{s} of input failed.")
            return 1
        return 0

    def fail(self, message: str) -> None:
        self.failed += 1
        self.ui.error(message)

    def command(self, line: str) -> bool:
        """Run one slash command; False means leave."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.ui.help()
        elif name == "/reset":
            self.conversation.turns.clear()
            self.ui.note("conversation cleared")
        elif name == "/stats":
            if self.stats.answers:
                self.ui.stats(self.stats.rows())
            else:
                self.ui.note("no answer yet")
        elif name == "/system":
            self.conversation = Conversation(system=rest.strip() or None)
            said = "set" if rest.strip() else "cleared"
            self.ui.note(f"system prompt {said}; conversation cleared")
        else:
            self.fail(f"unknown command {name}: /help lists them")
        return True

    def prompt_limit(self) -> int:
        """The most tokens a prompt may take: the context less room for an answer (up to a
        quarter of the context; older turns are dropped to keep it)."""
        ctx = self.model.ctx
        return ctx - max(1, min(self.args.max_new_tokens, ctx // 4))

    def answer(self, user: str) -> bool:
        """Answer one user turn, streaming; Ctrl-C stops the answer, not the session. False
        when the turn failed (said in one sentence)."""
        from localseek.session import fit_chat
        from localseek.tokenizer import StreamDecoder

        tok, args = self.tokenizer, self.args
        try:
            ids, dropped = fit_chat(tok, self.conversation.messages(user), self.prompt_limit())
        except LocalseekError as e:
            hint = ", or shorten the system prompt with /system" if self.conversation.system else ""
            self.ui.error(f"{str(e).rstrip('.')}: raise --ctx{hint}.")
            return False
        if dropped:
            gone, self.conversation.turns = (
                self.conversation.turns[:dropped],
                self.conversation.turns[dropped:],
            )
            n = sum(m["role"] == "user" for m in gone)
            self.ui.note(
                f"(the context is full: dropped the oldest {n} turn{'s' if n > 1 else ''}; "
                "the system prompt stays)"
            )
        try:
            prompt = tok.apply_chat_template(self.conversation.messages(user), tokenize=False)
            gen = generate_from_args(self.session.model, ids, args, session=self.session)
        except LocalseekError as e:
            self.ui.error(f"{e} (/reset starts over)")
            return False
        # R1-style templates open the reasoning block in the prompt itself
        self.ui.begin_answer(thinking=prompt.rstrip().endswith("<think>"))
        stream = StreamDecoder(tok)
        failure = None
        with typed_text_hidden(self.ui.interactive):
            try:
                for token in gen:
                    self.ui.stream(stream.push(token))
                self.ui.stream(stream.flush())
                stop_reason = gen.stop_reason
            except KeyboardInterrupt:
                stop_reason = "interrupted"
            except LocalseekError as e:  # e.g. the disk tier could not read an expert
                stop_reason, failure = "error", e
        self.ui.end_answer(stop_reason)
        if failure is not None:
            self.ui.error(f"{failure} (the answer stopped there)")
        reply = tok.decode(stream.ids, skip_special_tokens=True)
        if reply or stop_reason != "interrupted":
            self.conversation.turns.append({"role": "user", "content": user})
            self.conversation.turns.append({"role": "assistant", "content": reply})
        self.stats.add(gen.stats)
        if failure is not None:
            return False
        ram, gpu = memory_in_use(self.model)
        self.ui.speed(
            SpeedLine(
                gen.stats.prefill_tokens_per_second,
                gen.stats.decode_tokens_per_second,
                ram,
                gpu,
                # set by the offload layer's statistics once it exists
                getattr(gen.stats, "expert_cache_hit_rate", None),
                stopped_at_limit=stop_reason == "length",
            )
        )
        return True


def undecodable(text: str, what: str = "that line") -> str | None:
    """``common.undecodable`` for chat's input: its bytes arrive as lone surrogates (see
    ``main``), and such a line is not sent."""
    problem = common_undecodable(text, what, ", so nothing was sent to the model")
    return None if problem is None else problem + "."


@contextmanager
def typed_text_hidden(enabled: bool) -> Iterator[None]:
    """While an answer streams to the terminal, keys typed are not echoed into it: they wait
    in the terminal's input queue and show at the next prompt. Ctrl-C still interrupts."""
    if not enabled:
        yield
        return
    try:
        import termios
    except ImportError:  # not on Windows
        yield
        return
    try:
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # stdin is no terminal
        yield
        return
    quiet = list(old)
    quiet[3] &= ~termios.ECHO  # lflag; ICANON and ISIG stay: a line waits, Ctrl-C still works
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def main(args: argparse.Namespace) -> int:
    # bytes that are not UTF-8 arrive as lone surrogates instead of a UnicodeDecodeError out of
    # readline (or a TypeError out of the tokenizer): the loop names them in one sentence
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    with ChatUI() as ui:
        model = load_from_args(args, ui.err)
        return Chat(model, args, ui).run()
