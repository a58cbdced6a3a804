"""OpenAI's API in and out: request bodies checked field by field into a ``Job`` description,
and responses, stream chunks and errors built in OpenAI's schema.

A bad request is a ``RequestError`` that names the field (``messages[1].content``), the way
OpenAI's own errors do; fields the server does not know are ignored, as OpenAI's clients send
many. What is known but not supported (``n`` > 1, ``logprobs``, penalties) is refused, not
ignored, so that a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from localseek.errors import LocalseekError
from localseek.server.output import (
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
    ToolCall,
)
from localseek.tokenizer import Tokenizer

SEED_LIMIT = 2**64  # torch's generator takes seeds in [0, 2**64)
MAX_STOP = 4  # OpenAI's limit on stop strings
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(LocalseekError):
    """A request the server refuses: HTTP ``status`` with an OpenAI error body."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = (
            message,
            param,
            code,
            status,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.code, self.kind)


def error_body(
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Job:
    """One generation a request asks for, whichever endpoint it came through."""

    prompt: list[int]
    max_tokens: int  # at most; the context may end it first
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_tokens: int = 0  # the end-of-sequence token is not sampled before this many
    stop: list[str] = field(default_factory=list)
    chat: bool = True  # split reasoning and tool calls out of the text
    thinking: bool = False  # the prompt opened the reasoning block
    tools: bool = False


@dataclass
class Request:
    """A checked request: the job, and how the answer goes back."""

    job: Job
    model: str
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno}, column {e.colno})" if hasattr(e, "msg") else ""
        raise RequestError(
            f"the request body is not valid JSON{where}.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.", code="invalid_json")
    return body


# --- fields ---------------------------------------------------------------------------------


def _number(body: Mapping, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)}.", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low:g}, {high:g}], got {value}.", name)
    return float(value)


def _integer(
    body: Mapping, name: str, default: int | None, low: int, high: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}.", name)
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise RequestError(f"{name} must be {bound}, got {value}.", name)
    return value


def _boolean(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)}.", name)
    return value


def _stop(body: Mapping) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings.", "stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}.", "stop")
    return [s for s in stops if s]


def _unsupported(body: Mapping) -> None:
    """Refuse the known fields whose meaning the server cannot deliver."""
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {n}.", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise RequestError(f"{name} is not supported: leave it out or send 0.", name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("logprobs are not supported.", "logprobs")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported.", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(
            'response_format is not supported, other than {"type": "text"}.',
            "response_format",
        )


def _sampling(body: Mapping, room: int, what: str) -> dict[str, Any]:
    """The sampling fields shared by both endpoints; ``room``: the tokens the context leaves."""
    _unsupported(body)
    names = [n for n in ("max_completion_tokens", "max_tokens") if body.get(n) is not None]
    limit = _integer(body, names[0], None, 1) if names else None
    max_tokens = room if limit is None else min(limit, room)
    min_tokens = _integer(body, "min_tokens", 0, 0)
    if min_tokens > max_tokens:
        raise RequestError(
            f"min_tokens ({min_tokens}) is more than the {max_tokens} tokens this request may "
            f"generate ({what}).",
            "min_tokens",
        )
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("stream_options must be an object.", "stream_options")
    if options and not stream:
        raise RequestError("stream_options is only allowed with stream: true.", "stream_options")
    return {
        "job": {
            "max_tokens": max_tokens,
            "min_tokens": min_tokens,
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _top_p(body),
            "top_k": _integer(body, "top_k", 0, 0),
            "seed": _integer(body, "seed", None, 0, SEED_LIMIT),
            "stop": _stop(body),
        },
        "stream": stream,
        "include_usage": _boolean(options or {}, "include_usage"),
    }


def _top_p(body: Mapping) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be in (0, 1], got 0.", "top_p")
    return top_p


def _model(body: Mapping, default: str) -> str:
    value = body.get("model", default)
    if not isinstance(value, str):
        raise RequestError("model must be a string.", "model")
    return value or default


def _too_long(n: int, ctx: int, param: str) -> RequestError:
    return RequestError(
        f"the prompt has {n} tokens but the context holds {ctx} (with at least one to "
        "generate): shorten it, or restart the server with a larger --ctx.",
        param,
        "context_length_exceeded",
    )


# --- chat -----------------------------------------------------------------------------------


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(
                    f'{param}[{i}] must be a text part ({{"type": "text", "text": ...}}); '
                    "this server reads text only.",
                    f"{param}[{i}]",
                )
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{param}[{i}].text must be a string.", f"{param}[{i}].text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{param} must be a string or a list of text parts.", param)


def _messages(body: Mapping) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of messages.", "messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{at} must be an object.", at)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"{at}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}.",
                f"{at}.role",
            )
        message: dict[str, Any] = {"role": "system" if role == "developer" else role}
        calls = m.get("tool_calls") if role == "assistant" else None
        if m.get("content") is None and (calls or role == "assistant"):
            message["content"] = None if calls else ""
        else:
            message["content"] = _content(m.get("content"), f"{at}.content")
        if calls:
            message["tool_calls"] = _history_calls(calls, f"{at}.tool_calls")
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _history_calls(calls: Any, at: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, as the templates read them."""
    if not isinstance(calls, list):
        raise RequestError(f"{at} must be a list.", at)
    out = []
    for i, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise RequestError(f"{at}[{i}].function.name must be a string.", f"{at}[{i}]")
        args = f.get("arguments", "{}")
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call_id = c.get("id") if isinstance(c.get("id"), str) else f"call_{i}"
        out.append(
            {"id": call_id, "type": "function", "function": {"name": f["name"], "arguments": args}}
        )
    return out


def _tools(body: Mapping) -> list[dict[str, Any]]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return []
    if choice not in (None, "auto"):
        raise RequestError(
            'tool_choice must be "auto" or "none" (the model decides when to call).',
            "tool_choice",
        )
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of tools.", "tools")
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise RequestError(f"tools[{i}] must be a function tool.", f"tools[{i}]")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise RequestError(f"tools[{i}].function.name must be a string.", f"tools[{i}]")
        params = f.get("parameters", {})
        if not isinstance(params, dict):
            raise RequestError(
                f"tools[{i}].function.parameters must be a JSON schema object.",
                f"tools[{i}].function.parameters",
            )
        desc = f.get("description", "")
        out.append(
            {
                "type": "function",
                "function": {"name": f["name"], "description": desc, "parameters": params},
            }
        )
    return out


def _no_special_tokens(value: Any, param: str, tok: Tokenizer) -> None:
    """Text the template renders as its own (tool definitions, earlier calls) must not hold
    special tokens: they would be parsed there and could forge a turn boundary."""
    text = json.dumps(value, ensure_ascii=False)
    for token in tok.backend.get_added_tokens_decoder().values():
        if token.special and token.content in text:
            raise RequestError(f"{param} contains the special token {token.content}.", param)


def tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """DeepSeek-V3.1's system-prompt description of tools, for templates that do not render
    ``tools`` themselves (as its model card writes it)."""
    lines = ["## Tools", "You have access to the following tools:", ""]
    for t in tools:
        f = t["function"]
        lines += [
            f"### {f['name']}",
            f"Description: {f.get('description', '')}",
            "",
            f"Parameters: {json.dumps(f.get('parameters', {}), ensure_ascii=False)}",
            "",
        ]
    lines += [
        "IMPORTANT: ALWAYS adhere to this exact format for tool use:",
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments"
        f"{TOOL_CALL_END}{{{{additional_tool_calls}}}}{TOOL_CALLS_END}",
        "",
        "Where:",
        "- `tool_call_name` must be an exact match to one of the available tools",
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's "
        "Parameters Schema",
        "- For multiple tool calls, chain them directly without separators or spaces",
    ]
    return "\n".join(lines)


def chat_request(
    body: Mapping, tok: Tokenizer, ctx: int, model: str, tool_support: str | None
) -> Request:
    """A checked ``/v1/chat/completions`` body.

    Args:
        tok: renders the conversation with the chat template; every message's content is
            tokenized as text (no special tokens parsed), whoever wrote it.
        ctx: the context length; the prompt must leave room for one token.
        model: the served model's name (the default of ``model``).
        tool_support: ``Tokenizer.tool_support()``; None refuses requests with tools.
    """
    messages = _messages(body)
    tools = _tools(body)
    trusted: set[int] = set()
    if tools:
        if tool_support is None:
            raise RequestError(
                "this model's chat template has no tool calls, so tools cannot be used.", "tools"
            )
        _no_special_tokens(tools, "tools", tok)
        if tool_support == "system":  # described in a system message of ours, first
            messages = [{"role": "system", "content": tool_prompt(tools)}, *messages]
            trusted.add(0)
    for i, m in enumerate(messages):
        if "tool_calls" in m:
            _no_special_tokens(m["tool_calls"], f"messages[{i}].tool_calls", tok)
    try:
        ids = tok.apply_chat_template(
            messages,
            text_roles=("system", "user", "assistant", "tool"),
            tools=tools if tools and tool_support == "template" else None,
            trusted=trusted,
        )
    except LocalseekError as e:  # the template refused the conversation (a role it lacks)
        raise RequestError(str(e), "messages") from None
    if len(ids) >= ctx:
        raise _too_long(len(ids), ctx, "messages")
    fields = _sampling(body, ctx - len(ids), "the context left after the prompt")
    # R1-style templates open the reasoning block in the prompt itself
    thinking = tok.decode(ids[-8:]).rstrip().endswith("<think>")
    job = Job(ids, chat=True, thinking=thinking, tools=bool(tools), **fields["job"])
    return Request(job, _model(body, model), fields["stream"], fields["include_usage"])


def completion_request(body: Mapping, tok: Tokenizer, ctx: int, model: str) -> Request:
    """A checked ``/v1/completions`` body: one prompt string, tokenized as text (BOS first
    where the tokenizer adds one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string (one prompt per request).", "prompt")
    for name in ("suffix", "echo", "best_of"):
        if body.get(name) not in (None, False, 1, ""):
            raise RequestError(f"{name} is not supported.", name)
    ids = tok.encode(prompt, parse_special=False)
    if len(ids) >= ctx:
        raise _too_long(len(ids), ctx, "prompt")
    fields = _sampling(body, ctx - len(ids), "the context left after the prompt")
    job = Job(ids, chat=False, **fields["job"])
    return Request(job, _model(body, model), fields["stream"], fields["include_usage"])


# --- responses ------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class Response:
    """The id, timestamp and model of one response, and its objects in OpenAI's schema."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(
        self,
        reasoning: str,
        content: str,
        calls: list[ToolCall],
        finish_reason: str,
        usage: Usage,
    ) -> dict[str, Any]:
        """The non-streamed response."""
        if not self.chat:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("text_completion"), "choices": [choice], "usage": usage.to_dict()}
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "refusal": None,
        }
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = tool_calls(calls)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage.to_dict()}

    def chunk(
        self,
        delta: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        include_usage: bool = False,
    ) -> dict[str, Any]:
        """One stream chunk; ``delta`` None is the usage chunk (no choices)."""
        if delta is None:
            out: dict[str, Any] = {"choices": []}
        elif self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {"choices": [choice]}
        else:
            choice = {
                "index": 0,
                "text": delta.get("content", ""),
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            out = {"choices": [choice]}
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        if include_usage:  # as OpenAI: null in every chunk but the last
            out["usage"] = usage.to_dict() if usage is not None else None
        return {**head, **out}


def tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` of a message (each with a fresh id)."""
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]
