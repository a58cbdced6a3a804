"""localseek against transformers' DeepseekV4ForCausalLM on tiny random models written in
DeepSeek's official layout (FP8 linear weights, FP4 experts), in float32.

300+ tokens with a window of 8, CSA entries every 4 tokens with 4 picked by a 16-head
indexer and HCA entries every 128: the window, the compression and the top-k all bite. The
prompts are drawn until every top-k (indexer and router) is clear of ties, where float32
round-off alone would flip a pick."""

from __future__ import annotations

import json

import models_v4
import numpy as np
import pytest
import torch

import localseek
from localseek.checkpoint import open_checkpoint
from localseek.errors import CheckpointError

# (compress ratio per layer, hash-routed layers, seed)
SCHEDULES = {
    "sliding": ([0, 0], 1, 0),
    "csa-hca": ([0, 4, 128, 4], 2, 1),
    "routed": ([4, 128], 0, 2),
}
N = 320


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _gaps(ref, ids):
    """The smallest relative gap at the k-th pick of every indexer and top-k router."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

    gaps = []

    def indexer_hook(module, args, out):
        q_pos = torch.arange(out.shape[1])
        complete = (q_pos + 1) // 4
        k = module_topk[0]
        for t in range(out.shape[1]):
            valid = out[0, t, : complete[t]]
            if valid.numel() > k:
                s = valid.sort(descending=True).values
                gaps.append(float((s[k - 1] - s[k]) / s.abs().max()))

    def router_hook(module, args, out):
        scores = module.score_fn(out[0]) + module.e_score_correction_bias
        s = scores.sort(dim=-1, descending=True).values
        k = module.top_k
        gaps.append(float(((s[:, k - 1] - s[:, k]) / s.abs().amax(-1)).min()))

    module_topk = [ref.config.index_topk]
    hooks = [
        mod.register_forward_hook(
            indexer_hook if isinstance(mod, m.DeepseekV4IndexerScorer) else router_hook
        )
        for mod in ref.modules()
        if isinstance(mod, (m.DeepseekV4IndexerScorer, m.DeepseekV4TopKRouter))
    ]
    try:
        logits = models_v4.reference_logits(ref, ids)
    finally:
        for h in hooks:
            h.remove()
    return (min(gaps) if gaps else 1.0), logits


def clear_prompt(ref, n=N, min_gap=1e-4):
    """A prompt whose top-k picks are clear of ties, and transformers' logits for it."""
    for seed in range(50):
        ids = [int(t) for t in np.random.RandomState(seed).randint(2, 160, size=n)]
        gap, logits = _gaps(ref, ids)
        if gap > min_gap:
            return ids, logits
    raise AssertionError("no prompt with clear top-k gaps in 50 draws")


@pytest.fixture(scope="module", params=list(SCHEDULES))
def v4_model(request, tmp_path_factory):
    ratios, n_hash, seed = SCHEDULES[request.param]
    path = tmp_path_factory.mktemp(f"v4-{request.param}")
    ref = models_v4.build(path, ratios, n_hash, seed)
    ids, ref_logits = clear_prompt(ref)
    return path, ref, ids, ref_logits, localseek.load(path, exact=True)


def test_logits_match_transformers(v4_model):
    _, _, ids, ref_logits, model = v4_model
    assert rel_err(model.logits(ids), ref_logits) <= 1e-4


def test_decode_through_caches_equals_full_forward(v4_model):
    """Prefill in uneven chunks (blocks left partly filled across calls), then one token at a
    time: the ring, the compressors' pending blocks and the indexer's keys carry over."""
    _, _, ids, _, model = v4_model
    ids = ids[:160]
    full = model.logits(ids)
    cache = model.new_cache(max_len=len(ids))
    parts, start = [], 0
    for size in (37, 6, 1, 3, 50):
        parts.append(model.forward(torch.tensor([ids[start : start + size]]), start, cache)[0])
        start += size
    while start < len(ids):
        parts.append(model.forward(torch.tensor([[ids[start]]]), start, cache)[0])
        start += 1
    stepped = torch.cat(parts).numpy()
    assert rel_err(stepped, full) <= 1e-5


def test_greedy_tokens_equal_a_greedy_loop_over_transformers(v4_model):
    _, ref, ids, _, model = v4_model
    prompt = ids[:280]
    got = list(model.generate(prompt, 32, temperature=0.0))
    want, seq = [], list(prompt)
    for _ in range(32):
        token = int(models_v4.reference_logits(ref, seq)[-1].argmax())
        if token in model.eos_ids:
            break
        want.append(token)
        seq.append(token)
    assert got == want


def test_fp4_experts_stay_mxfp4_blocks_with_the_stored_values(v4_model):
    path, ref, _, _, _ = v4_model
    with open_checkpoint(path) as ckpt:
        w1 = ckpt.tensor("layers.0.ffn.experts.3.w1")
        I = ckpt.config.moe_intermediate_size
    assert w1.qtype == "ggml_mxfp4" and w1.shape == (I, 64)
    want = ref.model.layers[0].mlp.experts.gate_up_proj[3, :I]
    assert torch.equal(w1.dequantize(torch.float32), want)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"layer_types": ["sliding_attention", "ring_attention"]},
            ["layer_types", "ring_attention"],
        ),
        ({"scoring_func": "relu"}, ["scoring_func", "relu"]),
        ({"compress_ratios": [0, 16, 0]}, ["compress_ratios", "16"]),
        ({"mlp_layer_types": ["moe", "dense"]}, ["mlp_layer_types", "dense"]),
    ],
)
def test_unknown_layer_type_scoring_or_rate_is_one_sentence(tmp_path, change, words):
    raw = models_v4.official_config([0, 4], 1, **change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        localseek.load(tmp_path)
    msg = str(e.value)
    assert all(w in msg for w in words) and msg.count(".") <= 2 and "\n" not in msg


def test_inspect_shows_the_layer_schedule(v4_model):
    from localseek.inspect import summarize

    path, ref, _, _, _ = v4_model
    with open_checkpoint(path) as ckpt:
        info = summarize(ckpt)
    short = {"sliding_attention": "SWA", "compressed_sparse_attention": "CSA/4"}
    short["heavily_compressed_attention"] = "HCA/128"
    types = zip(ref.config.layer_types, ref.config.mlp_layer_types, strict=True)
    want = [f"{short[a]} {m}" for a, m in types]
    assert info["architecture"] == "deepseek_v4" and info["layer_schedule"] == want
