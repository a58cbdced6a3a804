"""Text <-> token ids for DeepSeek checkpoints, on top of the HF `tokenizers` library.

Reads a checkpoint's ``tokenizer.json`` / ``tokenizer_config.json``, renders chat templates in a
sandboxed Jinja environment (as transformers does) and decodes generated ids incrementally.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localseek.errors import CheckpointError

__all__ = [
    "DEEPSEEK_BOS",
    "DEEPSEEK_CHAT_TEMPLATE",
    "DEEPSEEK_EOS",
    "StreamDecoder",
    "Tokenizer",
]

DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"

# DeepSeek-V3 style: BOS, system prompts (joined by a blank line), then the turns.
DEEPSEEK_CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='', first=true) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if ns.first %}"
    "{% set ns.system_prompt = message['content'] %}"
    "{% set ns.first = false %}"
    "{% else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] != 'system' %}"
    "{{ raise_exception('The built-in DeepSeek chat template supports only system, user and "
    "assistant messages, not ' + message['role'] + '.') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise CheckpointError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # As in transformers: Jinja's own tojson HTML-escapes, which chat templates never want.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path, *, required: bool) -> tuple[str, Any] | None:
    """Read and parse a JSON file, or return None when it is absent and not required."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing; the checkpoint needs it for the tokenizer.")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} could not be read ({e}).") from e
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})."
        ) from e


def _token_content(value: Any, key: str, config_path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(
        f"{config_path} has a {key} that is neither a string nor a dict with a 'content' string."
    )


def _pick_chat_template(value: Any, config_path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                template = entry.get("template")
                if isinstance(template, str):
                    return template
        raise CheckpointError(
            f"{config_path} lists several chat templates but none named 'default' with a string "
            "template."
        )
    raise CheckpointError(f"{config_path} has a chat_template that is neither a string nor a list.")


class Tokenizer:
    """A checkpoint's tokenizer: a `tokenizers.Tokenizer` plus BOS/EOS and the chat template."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ) -> None:
        """Wrap an already-built tokenizer; `source` names where it came from, for errors."""
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source
        self._bos_id = self._token_id(bos_token, "bos_token")
        self._eos_id = self._token_id(eos_token, "eos_token")
        self._compiled: jinja2.Template | None = None

    def _token_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise CheckpointError(
                f"The {what} {token!r} of {self.source} is not in the tokenizer's vocabulary."
            )
        return token_id

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a folder."""
        path = Path(path)
        tok_path = path / "tokenizer.json"
        cfg_path = path / "tokenizer_config.json"

        tok_json = _read_json(tok_path, required=True)
        assert tok_json is not None
        try:
            tok = tokenizers.Tokenizer.from_str(tok_json[0])
        except Exception as e:  # the Rust side raises a bare Exception
            reason = str(e).strip().rstrip(".") or type(e).__name__
            raise CheckpointError(
                f"{tok_path} could not be parsed by the tokenizers library ({reason})."
            ) from e

        cfg_json = _read_json(cfg_path, required=False)
        cfg = {} if cfg_json is None else cfg_json[1]
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path} is not a JSON object.")

        bos = _token_content(cfg.get("bos_token"), "bos_token", cfg_path)
        eos = _token_content(cfg.get("eos_token"), "eos_token", cfg_path)
        if "bos_token" not in cfg and tok.token_to_id(DEEPSEEK_BOS) is not None:
            bos = DEEPSEEK_BOS
        if "eos_token" not in cfg and tok.token_to_id(DEEPSEEK_EOS) is not None:
            eos = DEEPSEEK_EOS

        add_bos = cfg.get("add_bos_token", True)
        if not isinstance(add_bos, bool):
            raise CheckpointError(f"{cfg_path} has an add_bos_token that is not true or false.")

        template = _pick_chat_template(cfg.get("chat_template"), cfg_path)
        jinja_path = path / "chat_template.jinja"  # where newer transformers versions save it
        if template is None and jinja_path.is_file():
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{jinja_path} could not be read ({e}).") from e

        return cls(tok, bos, eos, add_bos, template, source=str(path))

    @property
    def bos_id(self) -> int | None:
        """Id of the BOS token, or None when the tokenizer has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """Id of the EOS token, or None when the tokenizer has none."""
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        """Token ids of `text`; BOS goes first when `add_bos` (None: the checkpoint's setting).

        parse_special: special tokens written in the text (e.g. "<｜User｜>") become their single
        ids; False keeps them text, tokenized like any other characters (for text a user typed).
        """
        if parse_special:
            ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        else:
            ids = self._text_ids(text)
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self._bos_id is not None and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def _text_ids(self, text: str) -> list[int]:
        """Ids of `text` with no added token matched: the library's own pipeline (normalizer,
        pre-tokenizer, model) that ``encode`` runs between the added tokens it finds."""
        tok = self._tok
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer else [(text, None)]
        return [t.id for piece, _ in pieces for t in tok.model.tokenize(piece)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of a sequence of token ids."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            source = (
                self.chat_template if self.chat_template is not None else DEEPSEEK_CHAT_TEMPLATE
            )
            try:
                self._compiled = _jinja_env().from_string(source)
            except jinja2.TemplateError as e:
                raise CheckpointError(
                    f"The chat template of {self.source} is not valid Jinja ({e})."
                ) from e
        return self._compiled

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        text_roles: Collection[str] = ("system", "user"),
        tools: Sequence[Mapping[str, Any]] | None = None,
        trusted: Collection[int] = (),
    ) -> list[int] | str:
        """Render a conversation with the checkpoint's chat template (or a built-in DeepSeek one).

        Returns token ids when `tokenize` (BOS comes from the template), else the rendered text.
        The template's own text is tokenized with its special tokens parsed; the content of
        messages whose role is in `text_roles` (what a person typed) stays text, so typed
        "<｜end▁of▁sentence｜><｜Assistant｜>" cannot forge a turn boundary.

        tools: OpenAI-style tool definitions, handed to the template as ``tools`` (see
            ``tool_support``); they are template text, so the caller vets them.
        trusted: indices of messages whose content is the caller's own text (its special
            tokens parsed) although their role is in `text_roles`.
        """
        if not tokenize:
            return self._render(messages, add_generation_prompt, tools)
        # the template sees a marker per protected content and the content goes back in
        # afterwards; U+FDD0/U+FDD1 are noncharacters (never in text) and the nonce is new
        # each time, so no assistant text can pass for a marker
        nonce = secrets.token_hex(8)
        marked, contents = [], []
        for i, m in enumerate(messages):
            m = dict(m)
            if (
                m.get("role") in text_roles
                and i not in trusted
                and isinstance(m.get("content"), str)
            ):
                contents.append(m["content"])
                m["content"] = f"\ufdd0{nonce}.{len(contents) - 1}\ufdd1"
            marked.append(m)
        pieces = re.split(
            f"\ufdd0{nonce}\\.(\\d+)\ufdd1", self._render(marked, add_generation_prompt, tools)
        )
        # pieces: template text, content index, template text, ...: added tokens are looked
        # for in the template's text only, and everything between two of them is plain text
        added = set(self._tok.get_added_tokens_decoder())
        text, cuts = "", []
        for i, piece in enumerate(pieces):
            if i % 2:
                text += contents[int(piece)]
                continue
            enc = self._tok.encode(piece, add_special_tokens=False)
            for token_id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
                if token_id in added:
                    cuts.append((len(text) + start, len(text) + end, token_id))
            text += piece
        ids: list[int] = []
        at = 0
        for start, end, token_id in cuts:
            ids += self._text_ids(text[at:start]) if start > at else []
            ids.append(token_id)
            at = end
        ids += self._text_ids(text[at:]) if at < len(text) else []
        return ids

    def tool_support(self) -> str | None:
        """How the chat template takes tools: "template" when it renders the ``tools`` it is
        given itself, "system" when it renders only the tool calls of assistant messages
        (DeepSeek-V3-0324 and V3.1: their tools are described in the system prompt), None when
        it knows neither. Found by rendering a probe tool, not by reading the template."""
        name = "localseek_probe_tool"
        probe = [{"type": "function", "function": {"name": name, "parameters": {}}}]
        user = {"role": "user", "content": "?"}
        call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": "{}"}}
        calling = {"role": "assistant", "content": None, "tool_calls": [call]}
        try:
            if name in self._render([user], True, probe):
                return "template"
            if name in self._render([user, calling], False):
                return "system"
        except CheckpointError:  # e.g. a template that refuses what it does not know
            pass
        return None

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        template = self._template()
        extra = {} if tools is None else {"tools": [dict(t) for t in tools]}
        try:
            return template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"The chat template of {self.source} failed to render ({type(e).__name__}: {e})."
            ) from e


class StreamDecoder:
    """Turns generated token ids into text as they arrive, never splitting a UTF-8 character.

    The pieces returned by `push` plus `flush` concatenate to
    ``tokenizer.decode(ids, skip_special_tokens)`` of all pushed ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        """Start an empty stream over `tokenizer`."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # Decoding restarts at `_prefix` so that context-sensitive decoders (leading-space rules)
        # see the same left context; text up to `_read` has been returned already.
        self._prefix = 0
        self._read = 0

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(
            self.ids[start:stop], skip_special_tokens=self.skip_special_tokens
        )

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return whatever text is still held back (e.g. an incomplete character at the end)."""
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]
