"""Every weight format in one llama.cpp-made file: read from its stored bytes by the kernels
(never dequantized whole on the token path), with llama.cpp's logits on the same weights."""

from __future__ import annotations

import gguf
import gguf_util as gu
import models
import numpy as np
import pytest
import torch

import localseek
from localseek.checkpoint import open_checkpoint
from localseek.checkpoint.gguf import GGUFCheckpoint
from localseek.convert.gguf_writer import write_gguf
from localseek.quant import QTensor
from localseek.quant.formats import BY_GGML

IDS = [0, 5, 77, 130, 200, 9, 31, 250, 3, 100, 42, 7]
# llama-quantize --tensor-type for a Q4_K_M run, so that the file holds every ggml type the
# kernels take (rows of 256 everywhere: every type fits every matrix)
OVERRIDES = {
    r"^output\.": "Q6_K",
    r"^token_embd\.": "Q4_0",
    r"blk\.0\.attn_q_a\.": "IQ4_NL",
    r"blk\.0\.attn_q_b\.": "IQ4_XS",
    r"blk\.0\.attn_kv_a_mqa\.": "MXFP4",
    r"blk\.0\.attn_output\.": "BF16",
    r"blk\.0\.attn_v_b\.": "Q4_0",
    r"blk\.\d\.attn_k_b\.": "Q8_0",
    r"blk\.0\.ffn_gate\.": "Q4_1",
    r"blk\.0\.ffn_up\.": "Q5_0",
    r"blk\.0\.ffn_down\.": "Q2_K",
    r"blk\.1\.attn_q_a\.": "Q3_K",
    r"blk\.1\.attn_q_b\.": "Q5_K",
    r"blk\.1\.attn_kv_a_mqa\.": "F16",
    r"blk\.1\.attn_output\.": "Q6_K",
    r"blk\.1\.ffn_gate_exps\.": "Q2_K",
    r"blk\.1\.ffn_up_exps\.": "Q3_K",
    r"blk\.1\.ffn_down_exps\.": "Q5_K",
    r"blk\.1\.ffn_gate_shexp\.": "IQ4_XS",
    r"blk\.1\.ffn_up_shexp\.": "MXFP4",
    r"blk\.1\.ffn_down_shexp\.": "Q5_1",
}


@pytest.fixture(scope="module")
def every_type(tmp_path_factory: pytest.TempPathFactory):
    """(mixed GGUF, F32 GGUF of its dequantized weights): a 2-layer V3 model quantized by
    llama.cpp with OVERRIDES."""
    d = tmp_path_factory.mktemp("every_type")
    over = dict(
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=256,
        q_lora_rank=256,
        kv_lora_rank=256,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=64,
        num_hidden_layers=2,
    )
    models.build("v3", d / "hf", seed=11, vocab_size=gu.VOCAB, **over)
    gu.write_tokenizer(d / "hf")
    with open_checkpoint(d / "hf") as ckpt:
        f32 = write_gguf(ckpt, d / "f32.gguf", "f32")[0]
    mixed = d / "mixed.gguf"
    gu.llama_quantize(f32, mixed, 15, OVERRIDES)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    with GGUFCheckpoint(mixed) as ck:
        deq = write_gguf(ck, d / "deq.gguf", "f32")[0]
    return mixed, deq


def test_file_holds_every_kernel_type(every_type) -> None:
    reader = gguf.GGUFReader(every_type[0])
    types = {gguf.GGMLQuantizationType(t.tensor_type) for t in reader.tensors}
    assert set(BY_GGML) <= types, sorted(t.name for t in set(BY_GGML) - types)


def test_token_path_never_dequantizes_a_weight(every_type, monkeypatch) -> None:
    """A prefill and ten decode steps, in both modes, run every QTensor from its blocks:
    the whole-tensor dequantize is never called."""
    for exact in (True, False):
        model = localseek.load(every_type[0], exact=exact)
        calls = []

        def record(self, dtype=torch.float32, calls=calls):
            calls.append((self.qtype, self.shape))
            raise AssertionError(f"{self.qtype} {self.shape} dequantized on the token path")

        with monkeypatch.context() as m:
            m.setattr(QTensor, "dequantize", record)
            tokens = list(model.generate(IDS, 10))
        assert len(tokens) == 10 and not calls, calls


def test_every_type_matches_llama_cpp(every_type) -> None:
    """exact=True on the mixed file gives llama.cpp's logits on an F32 copy of the same
    dequantized weights, through the full forward and through the cache, and its greedy
    tokens; the fast mode stays near them at the typical position."""
    mixed, deq = every_type
    model = localseek.load(mixed, exact=True)
    ours = model.logits(IDS)
    theirs = gu.llama_logits(deq, IDS)
    scale = float(np.abs(theirs).max())
    assert float(np.abs(ours - theirs).max()) <= 1e-3 * scale
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
    cache = model.new_cache(max_len=len(IDS))
    model.forward(torch.tensor([IDS[:-3]]), 0, cache)
    for pos in range(len(IDS) - 3, len(IDS)):
        step = model.forward(torch.tensor([[IDS[pos]]]), pos, cache)[0, -1].numpy()
        assert float(np.abs(step - ours[pos]).max()) <= 1e-5 * scale
    greedy = list(model.generate(IDS, 8))
    assert greedy == gu.llama_greedy(deq, IDS, 8)
    # fast mode: int8 activations move the router's scores a little, and where two experts
    # nearly tie a position takes another one (here position 2: 1.5 against 0.05 elsewhere),
    # so the typical position is checked, not the worst
    fast = localseek.load(mixed).logits(IDS)
    assert float(np.median(np.abs(fast - theirs).max(-1))) <= 5e-2 * scale
