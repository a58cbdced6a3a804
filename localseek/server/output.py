"""The model's text as the OpenAI API returns it: cut at stop strings, split into DeepSeek's
reasoning (``<think>…</think>``) and the answer, and its tool calls parsed, while it streams.

Each stage holds back only the end of the text that could still turn into a stop string or a
tag, so what it lets through is final: a stream shows the same text as a whole response.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
# the tags the decoder must keep although a tokenizer may mark them special
MARKERS = (
    THINK_OPEN,
    THINK_CLOSE,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_SEP,
)

# V3-0324 / R1: the call's type before the separator, the name and a fenced JSON after it
_FENCED = re.compile(r"\s*(?P<name>[^\n]+?)\s*\n```(?:json)?\s*\n(?P<args>.*?)\n?```\s*", re.S)


def held_back(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (but not all of it)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class StopStrings:
    """Cuts streamed text before the first of the stop strings."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.hit = False  # a stop string was found: nothing more passes
        self._held = ""

    def push(self, text: str) -> str:
        """The text that is final now (possibly empty)."""
        if self.hit or not self.stops:
            return "" if self.hit else text
        text = self._held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self._held = True, ""
            return text[: min(found)]
        keep = max(held_back(text, s) for s in self.stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, at the end of the text."""
        text, self._held = self._held, ""
        return text


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it (OpenAI's arguments are a string too)


def parse_tool_calls(text: str) -> tuple[list[ToolCall], str]:
    """The complete tool calls in ``text`` (what follows ``TOOL_CALLS_BEGIN``), in either of
    DeepSeek's forms, and the text after them that is no call.

    V3.1: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>``; V3-0324 and R1:
    ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>``.
    A call cut off before its end tag is not returned.
    """
    calls: list[ToolCall] = []
    at = 0
    while True:
        start = text.find(TOOL_CALL_BEGIN, at)
        if start < 0 or text[at:start].strip():
            break
        end = text.find(TOOL_CALL_END, start)
        if end < 0:
            break
        head, sep, rest = text[start + len(TOOL_CALL_BEGIN) : end].partition(TOOL_SEP)
        if not sep:
            break
        fenced = _FENCED.fullmatch(rest)
        if fenced is not None and "\n" not in head.strip():
            calls.append(ToolCall(fenced["name"], fenced["args"].strip()))
        else:
            calls.append(ToolCall(head.strip(), rest.strip()))
        at = end + len(TOOL_CALL_END)
    rest = text[at:]
    rest = rest.split(TOOL_CALLS_END, 1)[1] if TOOL_CALLS_END in rest else rest
    return calls, rest.strip()


class ChatOutput:
    """Splits a chat answer into reasoning, content and tool calls as its text arrives.

    Args:
        thinking: the prompt opened the reasoning block (R1-style templates end with
            ``<think>``); else an answer that starts with ``<think>`` opens it.
        tools: look for tool calls (the request offered tools).
    """

    def __init__(self, thinking: bool = False, tools: bool = False) -> None:
        self.mode = "reasoning" if thinking else "start"
        self.tools = tools
        self.reasoning = ""
        self.content = ""
        self._held = ""
        self._tool_text: str | None = None  # after TOOL_CALLS_BEGIN

    def push(self, text: str) -> tuple[str, str]:
        """The reasoning and the content that are final now."""
        text = self._held + text
        self._held = ""
        reasoning = content = ""
        while text:
            if self._tool_text is not None:
                self._tool_text += text
                break
            if self.mode == "start":
                lead = text.lstrip()
                if not lead or (len(lead) < len(THINK_OPEN) and THINK_OPEN.startswith(lead)):
                    self._held = text
                    break
                if lead.startswith(THINK_OPEN):
                    self.mode, text = "reasoning", lead[len(THINK_OPEN) :]
                else:
                    self.mode = "content"
                continue
            if self.mode == "reasoning":
                cut = text.find(THINK_CLOSE)
                if cut >= 0:
                    reasoning += text[:cut]
                    self.mode, text = "content", text[cut + len(THINK_CLOSE) :]
                    continue
                keep = held_back(text, THINK_CLOSE)
                reasoning += text[: len(text) - keep]
                self._held = text[len(text) - keep :]
                break
            cut = text.find(TOOL_CALLS_BEGIN) if self.tools else -1
            if cut >= 0:
                content += text[:cut]
                self._tool_text = ""
                text = text[cut + len(TOOL_CALLS_BEGIN) :]
                continue
            keep = held_back(text, TOOL_CALLS_BEGIN) if self.tools else 0
            content += text[: len(text) - keep]
            self._held = text[len(text) - keep :]
            break
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """At the end of the answer: the reasoning and content still held back, and the tool
        calls (text after the calls, or a block with no complete call, is content)."""
        reasoning = content = ""
        held, self._held = self._held, ""
        if self.mode == "reasoning":
            reasoning = held
        else:
            content = held
        calls: list[ToolCall] = []
        if self._tool_text is not None:
            calls, rest = parse_tool_calls(self._tool_text)
            content += rest if calls else TOOL_CALLS_BEGIN + self._tool_text
            self._tool_text = None
        self.reasoning += reasoning
        self.content += content
        return reasoning, content, calls
