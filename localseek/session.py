"""A conversation's KV cache kept between requests, so that the next request computes only what
is new: the cache is reused for the longest common token prefix with what it already holds.

MLA's cache holds, per position, the latent ``c_kv`` and the rotated ``k_pe`` of that position's
token given the tokens before it; so the first ``n`` positions stay valid for any sequence that
starts with the same ``n`` tokens. Truncating to a common prefix is only forgetting the positions
after it (the next forward overwrites them; attention reads positions up to its own end only).

Chat and the OpenAI-compatible server both hold one ``Session`` per conversation and hand it the
whole conversation's tokens each turn; ``fit_chat`` drops the oldest turns when those do not fit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from localseek.errors import LocalseekError
from localseek.model.kv_cache import KVCache
from localseek.tokenizer import Tokenizer

if TYPE_CHECKING:
    from localseek.engine import Generation, Model


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Session:
    """One sequence's KV cache and the tokens whose keys it holds, kept between generations.

    One generation at a time: starting another one moves the cache to the new prompt, and the
    one it replaced fails on its next step (its positions are gone) instead of continuing from
    another conversation's keys. Steps from two threads at once are refused the same way; a
    server keeps one session per conversation and runs one step of the model at a time.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self.tokens: list[int] = []  # position i of the cache holds tokens[i]
        self._cache: KVCache | None = None
        self._owner: object | None = None  # the generation whose tokens the cache holds
        self._busy = threading.Lock()

    @property
    def cache(self) -> KVCache:
        """The KV cache, allocated for the model's whole context on first use."""
        if self._cache is None:
            self._cache = self.model.new_cache()
        return self._cache

    def reset(self) -> None:
        """Forget what the cache holds (it stays allocated)."""
        self.tokens.clear()

    def generate(
        self,
        token_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generation:
        """``Model.generate`` over this session's cache: the prompt's longest common prefix
        with the cached tokens is not computed again (``stats.reused_tokens`` says how many)."""
        return self.model.generate(
            token_ids, max_new_tokens, temperature, top_k, top_p, seed, session=self
        )

    def prefill(
        self, token_ids: Sequence[int], owner: object | None = None
    ) -> tuple[torch.Tensor, int]:
        """Bring the cache to ``token_ids``, computing only what is not cached already.

        Args:
            owner: the generation that will decode after this; ``decode`` with another owner
                fails from now on.
        Returns:
            The logits (vocab,) float32 after the last token, and how many leading tokens came
            from the cache (at most all but the last: its logits are needed).
        """
        ids = list(token_ids)
        with self._step():
            self._owner = owner
            n = min(common_prefix(self.tokens, ids), len(ids) - 1)
            n = self.cache.keep(n)  # a V4 cache keeps all it holds or nothing
            del self.tokens[n:]  # before the forward: interrupted, the cache still holds tokens
            logits = self.model.forward(torch.tensor([ids[n:]]), n, self.cache, last_only=True)
            self.tokens.extend(ids[n:])
        return logits[0, -1], n

    def decode(self, token: int, owner: object | None = None) -> torch.Tensor:
        """Feed one token at the next position; its logits (vocab,) float32.

        Raises:
            LocalseekError: another generation has prefilled this session since ``owner``'s.
        """
        with self._step():
            if owner is not self._owner:
                raise LocalseekError(
                    "this generation's session has started another generation since, which "
                    "replaced its tokens in the cache; a session runs one generation at a time "
                    "(use one Session per conversation)."
                )
            logits = self.model.forward(torch.tensor([[token]]), len(self.tokens), self.cache)
            self.tokens.append(int(token))
        return logits[0, -1]

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise LocalseekError(
                "this session is running a step of another generation in another thread; a "
                "session runs one generation at a time (use one Session per conversation)."
            )
        try:
            yield
        finally:
            self._busy.release()


def fit_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], limit: int
) -> tuple[list[int], int]:
    """The chat template's tokens of ``messages``, dropping the oldest turns until they fit.

    A turn is a user message and what follows it up to the next user message. System messages
    and the last turn are never dropped.

    Args:
        tokenizer: renders and tokenizes the conversation.
        messages: the conversation, the new user message last.
        limit: the most tokens the prompt may have.
    Returns:
        The prompt's token ids and how many messages were dropped from the front of the turns.
    Raises:
        LocalseekError: the system prompt and the last turn alone take more than ``limit``.
    """
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    dropped = 0
    while True:
        ids = tokenizer.apply_chat_template(system + turns[dropped:])
        if len(ids) <= limit:
            return ids, dropped
        users = [i for i, m in enumerate(turns) if m.get("role") == "user" and i > dropped]
        if not users:
            what = "the system prompt and this message take" if system else "this message takes"
            raise LocalseekError(
                f"{what} {len(ids)} tokens, more than the {limit} the context leaves for a prompt."
            )
        dropped = users[0]
