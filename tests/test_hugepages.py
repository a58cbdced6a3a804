"""Weights move from the file mapping into anonymous (huge-page) memory: same bytes, same
layout, the same logits, and nothing of the model left in a file mapping."""

from __future__ import annotations

import sys

import gguf_util as gu
import models
import numpy as np
import pytest
import torch

import localseek
import localseek.engine
from localseek import hugepages
from localseek.checkpoint import open_checkpoint
from localseek.convert.gguf_writer import write_gguf
from localseek.engine import _all_weights
from localseek.quant import QTensor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mappings")


def test_file_backed_weights_move_and_keep_their_layout(tmp_path) -> None:
    raw = np.random.default_rng(0).integers(0, 256, 3 * 64 * 68 + 3 * 4096, dtype=np.uint8)
    (tmp_path / "w.bin").write_bytes(raw.tobytes())
    mapped = np.memmap(tmp_path / "w.bin", mode="c")
    stack = torch.from_numpy(mapped[: 3 * 64 * 68]).view(3, 64, 68)  # 3 experts, back to back
    weights = {f"e{e}": QTensor("ggml_q8_0", (64, 64), stack[e]) for e in range(3)}
    weights["norm"] = torch.from_numpy(mapped[-400:]).view(torch.float32)  # pages away: a run
    weights["made"] = torch.randn(10)  # the loader's own memory: stays where it is
    spans = hugepages.file_backed(weights)
    assert set(spans) == {"e0", "e1", "e2", "norm"}
    assert hugepages.copy_nbytes(spans) == 3 * 64 * 68 + 400
    moved = hugepages.into_huge_pages(weights, spans)
    assert not hugepages.file_backed(moved)
    assert moved["made"] is weights["made"]
    for e in range(3):
        assert torch.equal(moved[f"e{e}"].data, weights[f"e{e}"].data)
        assert moved[f"e{e}"].shape == (64, 64) and moved[f"e{e}"].qtype == "ggml_q8_0"
        # still one stack: each expert right after the one before
        step = moved[f"e{e}"].data.data_ptr() - moved["e0"].data.data_ptr()
        assert step == e * 64 * 68
    assert torch.equal(moved["norm"], weights["norm"])


def test_a_gguf_model_leaves_the_file_mapping_with_the_same_logits(tmp_path, monkeypatch):
    path = tmp_path / "hf"
    over = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256)
    models.build("v3", path, seed=5, vocab_size=gu.VOCAB, num_hidden_layers=2, **over)
    gu.write_tokenizer(path)
    with open_checkpoint(path) as ckpt:
        gguf = write_gguf(ckpt, tmp_path / "q8_0.gguf", "q8_0")[0]
    ids = [1, 5, 9, 200, 3]
    model = localseek.load(gguf, exact=False)
    held = {str(i): w for i, w in enumerate(_all_weights(model.net, model.experts))}
    # with huge pages on, none of the weights is read through the file any more
    assert bool(hugepages.file_backed(held)) != hugepages.available()
    monkeypatch.setattr(hugepages, "available", lambda: False)
    mapped = localseek.load(gguf, exact=False)
    held = {str(i): w for i, w in enumerate(_all_weights(mapped.net, mapped.experts))}
    assert hugepages.file_backed(held)  # the quantized weights, straight from the file
    assert np.array_equal(model.logits(ids), mapped.logits(ids))
