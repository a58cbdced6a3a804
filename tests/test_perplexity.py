"""localseek perplexity against a direct computation with transformers on a tiny V3 model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import localseek
from localseek.errors import LocalseekError
from localseek.perplexity import perplexity, token_byte_lengths

TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers like 12, 345 and 6789 appear too; "
    "naïve café résumé, 深度求索 and emoji 😀 make multi-byte tokens. "
) * 6
CTX = 32
VOCAB = 320  # the 256 byte tokens, 4 special ones and some merges


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random V3 model saved by transformers, with a byte-level BPE of its vocabulary."""
    import models

    from localseek.demo import write_bpe_tokenizer

    path = tmp_path_factory.mktemp("ppl")
    ref = models.build("v3", path, seed=5, vocab_size=VOCAB)
    corpus = [TEXT[i : i + 80] for i in range(0, len(TEXT), 40)] * 3
    write_bpe_tokenizer(path, corpus, VOCAB)
    return path, ref


def token_bytes(piece: str) -> bytes:
    """GPT-2's byte-level alphabet read backwards: one character per byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + n for n in range(256 - len(printable))]
    byte_values = printable + sorted(set(range(256)) - set(printable))
    byte_of = dict(zip(map(chr, chars), byte_values, strict=True))
    return bytes(byte_of[c] for c in piece)


def reference(ref, ids: list[int], bos: int, ctx: int) -> tuple[float, int]:
    """Total NLL in nats over the second halves of the chunks, and the scored token ids count."""
    first = ctx // 2
    nll, scored = 0.0, []
    for c in range(len(ids) // ctx):
        chunk = list(ids[c * ctx : (c + 1) * ctx])
        targets = chunk[first + 1 :]
        chunk[0] = bos
        with torch.no_grad():
            logits = ref(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits[first:-1], dim=-1)
        nll -= float(logp[torch.arange(len(targets)), torch.tensor(targets)].sum())
        scored += targets
    return nll, scored


def test_matches_transformers(tiny):
    path, ref = tiny
    model = localseek.load(path, exact=True, ctx=CTX)
    tok = model.tokenizer
    ids = tok.encode(TEXT)
    calls = []
    got = perplexity(model, TEXT, ctx=CTX, progress=lambda d, t: calls.append((d, t)))
    nll, scored = reference(ref, ids, tok.bos_id, CTX)
    n_chunks = len(ids) // CTX
    assert got.chunks == n_chunks >= 3
    assert got.scored_tokens == len(scored) == n_chunks * (CTX - CTX // 2 - 1)
    assert calls == [(i + 1, n_chunks) for i in range(n_chunks)]
    assert math.isclose(got.perplexity, math.exp(nll / len(scored)), rel_tol=1e-4)
    nbytes = sum(len(token_bytes(tok.backend.id_to_token(t))) for t in scored)
    assert got.scored_bytes == nbytes
    assert math.isclose(got.bits_per_byte, nll / math.log(2) / got.scored_bytes, rel_tol=1e-4)


def test_token_bytes_add_up_to_the_text(tiny):
    model = localseek.load(tiny[0], exact=True, ctx=CTX)
    tok = model.tokenizer
    lengths = token_byte_lengths(tok)
    ids = tok.encode(TEXT, add_bos=False)
    assert sum(lengths[i] for i in ids) == len(TEXT.encode("utf-8"))
    assert lengths[tok.bos_id] == 0


def test_too_short_and_too_long_ctx(tiny):
    model = localseek.load(tiny[0], exact=True, ctx=CTX)
    with pytest.raises(LocalseekError, match="fewer than one chunk"):
        perplexity(model, "short text", ctx=CTX)
    with pytest.raises(LocalseekError, match="longer than the loaded model's context"):
        perplexity(model, TEXT, ctx=2 * CTX)


def test_cli_json_and_bad_file(tiny, tmp_path):
    path, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "localseek", "perplexity", "--model", str(path)]
    proc = subprocess.run(
        [*cmd, "--file", str(text), "--ctx", str(CTX), "--json", str(out), "--exact"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bits per byte" in proc.stdout
    row = json.loads(out.read_text())
    model = localseek.load(path, exact=True, ctx=CTX)
    direct = perplexity(model, TEXT, ctx=CTX)
    assert math.isclose(row["bits_per_byte"], direct.bits_per_byte, rel_tol=1e-6)
    assert row["chunks"] == direct.chunks

    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    proc = subprocess.run(
        [*cmd, "--file", str(tmp_path / "bad.txt")], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "bad.txt: not UTF-8 text" in proc.stderr
