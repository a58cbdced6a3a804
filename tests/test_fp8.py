"""The official DeepSeek FP8 layout: float8_e4m3fn weights with one weight_scale_inv per
128x128 block, at dimensions that are not multiples of 128 (partial edge blocks)."""

import json

import models
import numpy as np
import torch
from safetensors.torch import save_file

import localseek

FP8_MAX = 448.0


def quantize_fp8_blocks(w: torch.Tensor, block: int = 128):
    rows, cols = w.shape
    scale = torch.empty(-(-rows // block), -(-cols // block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / s).to(
                torch.float8_e4m3fn
            )
    return q, scale


def test_fp8_checkpoint_matches_transformers_on_dequantised_weights(tmp_path):
    models.build(
        "v3",
        tmp_path / "src",
        seed=4,
        hidden_size=160,
        moe_intermediate_size=72,
        intermediate_size=200,
        q_lora_rank=136,
        kv_lora_rank=40,
    )
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    src = load_file(str(tmp_path / "src" / "model.safetensors"))  # per-expert layout
    fp8_state, dequantized, fp8_count = {}, {}, 0
    for name, p in src.items():
        if (
            p.dim() == 2
            and "embed" not in name
            and "lm_head" not in name
            and not name.endswith("mlp.gate.weight")
        ):
            q, scale = quantize_fp8_blocks(p.float())
            fp8_state[name], fp8_state[name + "_scale_inv"] = q, scale
            full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
            dequantized[name] = q.float() * full[: p.shape[0], : p.shape[1]]
            fp8_count += 1
        else:
            fp8_state[name] = dequantized[name] = p
    assert fp8_count > 10
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    # the reference: transformers holding exactly the values the FP8 file encodes
    save_file(dequantized, str(tmp_path / "src" / "model.safetensors"))
    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "src").eval()
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(fp8_state, str(out / "model.safetensors"))
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (out / "config.json").write_text(json.dumps(cfg))

    model = localseek.load(out, exact=True)  # fast mode rounds prefill to bf16 on AMX CPUs
    ids = [int(t) for t in np.random.RandomState(1).randint(2, 160, size=30)]
    want = models.reference_logits(ref, ids)
    got = model.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # weights are kept as FP8 (one byte each plus scales), not widened at load
    assert model.weights_nbytes() < sum(t.numel() * 4 for t in src.values()) / 2
