"""Tiny random DeepSeek-V4 models built with transformers (the reference), written in DeepSeek's
official checkpoint layout: FP8 e4m3 linear weights with e8m0 128x128 scales, FP4 e2m1
experts with an e8m0 scale per 32. The reference model's weights are set to those stored
values, so both sides compute with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8_NAMES = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "shared.w1", "shared.w2", "shared.w3")


def official_config(ratios: list[int], n_hash: int, **over) -> dict:
    """config.json as DeepSeek ships it: compress_ratios, num_hash_layers, rope_scaling."""
    raw = dict(
        architectures=["DeepseekV4ForCausalLM"],
        model_type="deepseek_v4",
        vocab_size=160,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=len(ratios),
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        scoring_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        swiglu_limit=2.0,
        num_hash_layers=n_hash,
        compress_ratios=list(ratios) + [0],  # DeepSeek lists the MTP layer too
        compress_rope_theta=40000.0,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        max_position_embeddings=512,
        sliding_window=8,
        index_n_heads=16,
        index_head_dim=16,
        index_topk=4,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=1,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
            "scale_fmt": "ue8m0",
        },
    )
    raw.update(over)
    return raw


def reference_config(raw: dict):
    from transformers import DeepseekV4Config

    keys = set(DeepseekV4Config.__dataclass_fields__) | {
        "compress_ratios",
        "num_hash_layers",
        "qk_rope_head_dim",
    }
    kw = {k: v for k, v in raw.items() if k in keys and k not in ("quantization_config",)}
    kw["rope_parameters"] = {**raw["rope_scaling"], "rope_type": "yarn"}
    kw.pop("rope_scaling", None)
    kw["compress_ratios"] = raw["compress_ratios"][: raw["num_hidden_layers"]]
    return DeepseekV4Config(**kw)


def randomize(model: torch.nn.Module, vocab: int, top_k: int, n_experts: int, seed: int) -> None:
    """Unit-scale activations, random norms, sinks, biases, mHC parameters and hash table."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith(".base") or name.endswith("hc_base"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("position_bias"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
            elif name.endswith("tid2eid"):
                table = torch.stack(
                    [torch.randperm(n_experts, generator=g)[:top_k] for _ in range(vocab)]
                )
                b.copy_(table)


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and e8m0 scale per 128x128 block (a power of two: amax <= 448)."""
    rows, cols = w.shape
    nr, nc = -(-rows // 128), -(-cols // 128)
    pad = torch.zeros(nr * 128, nc * 128)
    pad[:rows, :cols] = w
    amax = pad.view(nr, 128, nc, 128).abs().amax(dim=(1, 3)).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 448.0))
    scale = torch.exp2(exp)
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    q = (w / full).to(torch.float8_e4m3fn)
    e8m0 = (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return q, e8m0


def fp8_dequant(q: torch.Tensor, e8m0: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    scale = e8m0.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return q.float() * scale


def fp4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP4 e2m1 codes two per byte (element 2i low), e8m0 scale per 32, and the values."""
    rows, cols = w.shape
    blocks = w.view(rows, cols // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 6.0))
    x = blocks / torch.exp2(exp)
    idx = (x.abs().unsqueeze(-1) - E2M1).abs().argmin(dim=-1)  # nearest magnitude
    codes = (idx | ((x < 0) & (idx > 0)).long() << 3).to(torch.uint8).view(rows, cols)
    values = (E2M1[idx] * torch.where(x < 0, -1.0, 1.0) * torch.exp2(exp)).view(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.float4_e2m1fn_x2)
    e8m0 = (exp.view(rows, -1) + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return packed, e8m0, values


def build(path: Path, layer_types: list[int], n_hash: int, seed: int = 0, **over):
    """Write a random tiny V4 in the official layout to ``path``; return the reference model
    (float32) holding the same stored values."""
    from safetensors.torch import save_file
    from transformers import DeepseekV4ForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    from localseek.checkpoint.deepseek_v4_names import iter_v4_shapes
    from localseek.model.deepseek_v4.config import V4Config
    from localseek.model.variants import variant

    raw = official_config(layer_types, n_hash, **over)
    torch.manual_seed(seed)
    ref_cfg = reference_config(raw)
    model = DeepseekV4ForCausalLM(ref_cfg).float()
    randomize(model, raw["vocab_size"], raw["num_experts_per_tok"], raw["n_routed_experts"], seed)
    model.eval()
    sd = model.state_dict()
    renamings = [
        t for t in get_checkpoint_conversion_mapping("deepseek_v4") if isinstance(t, WeightRenaming)
    ]

    def reference_key(official: str) -> str:
        # the official -> transformers table transformers loads DeepSeek's files with
        for t in renamings:
            official, _ = t.rename_source_key(official)
        return official if official in sd else "model." + official

    cfg = V4Config.from_hf_dict(raw)
    v4 = variant("deepseek_v4")
    out: dict[str, torch.Tensor] = {}
    I = cfg.moe_intermediate_size
    with torch.no_grad():
        for name, _shape in iter_v4_shapes(cfg):
            official = v4.hf_name_of(name)
            assert official is not None, name
            if ".ffn.experts." in name:
                layer, e, w = int(name.split(".")[1]), int(name.split(".")[4]), name[-2:]
                experts = model.model.layers[layer].mlp.experts
                stack = experts.down_proj if w == "w2" else experts.gate_up_proj
                rows = {"w1": slice(0, I), "w3": slice(I, 2 * I), "w2": slice(None)}[w]
                packed, scale, values = fp4_blocks(stack[e, rows].float())
                stack[e, rows] = values
                out[official] = packed
                out[official[: -len(".weight")] + ".scale"] = scale
                continue
            key = reference_key(official)
            assert key in sd, (official, key)
            t = sd[key]
            if (
                name.split(".attn.")[-1] in FP8_NAMES
                or name.split(".ffn.")[-1] in FP8_NAMES
                or (name.endswith("indexer.wq_b"))
            ):
                q, scale = fp8_blocks(t.float())
                t.copy_(fp8_dequant(q, scale))
                out[official] = q
                out[official[: -len(".weight")] + ".scale"] = scale
            elif name.endswith("tid2eid"):
                out[official] = t.to(torch.int32).contiguous()
            else:
                out[official] = t.to(torch.float32).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    return model


def reference_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
