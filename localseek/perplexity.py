"""Perplexity and bits per byte of a text, the way llama.cpp's ``llama-perplexity`` measures it.

The text is tokenized once (with BOS when the tokenizer adds one) and cut into chunks of ``ctx``
tokens; the last partial chunk is dropped. Each chunk runs from an empty cache with its first
token replaced by BOS, and only the second half is scored: the logits at positions
``ctx // 2 .. ctx - 2`` predict the tokens at ``ctx // 2 + 1 .. ctx - 1``, so every scored
token sees at least ``ctx // 2`` tokens of context.

Bits per byte divides the total negative log-likelihood of the scored tokens, in bits, by the
UTF-8 bytes those tokens stand for, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from localseek.engine import Model
from localseek.errors import LocalseekError
from localseek.tokenizer import Tokenizer

__all__ = ["PerplexityResult", "perplexity", "token_byte_lengths"]


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll_bits: float  # total over the scored tokens
    scored_tokens: int
    scored_bytes: int
    chunks: int
    ctx: int
    text_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for; 0 for special (added) tokens.

    Byte-level BPE token strings map one character to one byte, so their length is exact;
    a token outside that alphabet is measured by decoding it alone.
    """
    from tokenizers import pre_tokenizers

    backend = tok.backend
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = set(backend.get_added_tokens_decoder())
    lengths = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        piece = backend.id_to_token(i)
        if i in special or piece is None:
            lengths.append(0)
        elif all(c in alphabet for c in piece):
            lengths.append(len(piece))
        else:
            lengths.append(len(backend.decode([i]).encode("utf-8")))
    return lengths


def perplexity(
    model: Model,
    text: str,
    ctx: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of ``text`` under ``model``.

    Args:
        model: a loaded model with a tokenizer; its context must hold ``ctx`` tokens.
        text: the text to score.
        ctx: chunk length in tokens (at least 4).
        progress: called as ``progress(done_chunks, total_chunks)`` after each chunk.
    Returns:
        A PerplexityResult.
    """
    tok = model.tokenizer
    if tok is None:
        raise LocalseekError(f"{model.path}: no tokenizer, so a text cannot be scored.")
    if ctx < 4:
        raise LocalseekError(f"ctx must be at least 4 tokens, got {ctx}.")
    if ctx > model.ctx:
        raise LocalseekError(
            f"ctx {ctx} is longer than the loaded model's context ({model.ctx}); load it with "
            f"a context of at least {ctx} tokens."
        )
    tokens = tok.encode(text)
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise LocalseekError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}: give a longer "
            f"text or a smaller ctx."
        )
    byte_len = torch.tensor(token_byte_lengths(tok) + [0] * model.config.vocab_size)
    bos = tok.bos_id if tok.add_bos else None
    first = ctx // 2
    nll_nats = 0.0
    scored_tokens = scored_bytes = 0
    for c in range(n_chunks):
        chunk = torch.tensor(tokens[c * ctx : (c + 1) * ctx])  # (ctx,)
        targets = chunk[first + 1 :]  # (ctx - first - 1,)
        if bos is not None:
            chunk[0] = bos
        logits = model.forward(chunk[None], 0, model.new_cache(max_len=ctx))[0]  # (ctx, V)
        logprobs = torch.log_softmax(logits[first:-1].double(), dim=-1)
        nll_nats -= float(logprobs.gather(1, targets[:, None]).sum())
        scored_tokens += len(targets)
        scored_bytes += int(byte_len[targets].sum())
        if progress is not None:
            progress(c + 1, n_chunks)
    nll_bits = nll_nats / math.log(2)
    return PerplexityResult(
        perplexity=math.exp(nll_nats / scored_tokens),
        bits_per_byte=nll_bits / scored_bytes if scored_bytes else float("nan"),
        nll_bits=nll_bits,
        scored_tokens=scored_tokens,
        scored_bytes=scored_bytes,
        chunks=n_chunks,
        ctx=ctx,
        text_tokens=len(tokens),
    )
