"""ModelConfig from Hugging Face config.json dictionaries."""

import pytest

from localseek.config import ModelConfig, yarn_get_mscale
from localseek.errors import CheckpointError

V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "some_future_key": {"ignored": True},
}


def test_deepseek_v3_config():
    cfg = ModelConfig.from_hf_dict(V3)
    assert cfg.model_type == "deepseek_v3" and cfg.scoring_func == "sigmoid"
    assert cfg.kv_cache_dim == 576 and cfg.qk_head_dim == 192
    assert cfg.moe_layers == list(range(3, 61))
    assert cfg.rope_scaling.factor == 40 and cfg.rope_scaling.rope_attention_factor == 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * yarn_get_mscale(40, 1.0) ** 2)


def test_rope_parameters_spelling_equals_rope_scaling():
    newer = {k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")}
    newer["rope_parameters"] = {**V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000}
    del newer["rope_parameters"]["type"]
    assert ModelConfig.from_hf_dict(newer) == ModelConfig.from_hf_dict(V3)


def test_v2_lite_defaults_softmax_and_no_q_lora():
    raw = {
        **V3,
        "architectures": ["DeepseekV2ForCausalLM"],
        "q_lora_rank": None,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "norm_topk_prob": False,
        "rope_scaling": None,
        "n_shared_experts": 2,
    }
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg.scoring_func == "softmax" and cfg.q_lora_rank is None and cfg.rope_scaling is None


def test_missing_required_key_is_named():
    raw = {k: v for k, v in V3.items() if k != "kv_lora_rank"}
    with pytest.raises(CheckpointError, match="missing required key 'kv_lora_rank'"):
        ModelConfig.from_hf_dict(raw)


def test_unsupported_architecture_is_named():
    with pytest.raises(CheckpointError, match="LlamaForCausalLM is not supported"):
        ModelConfig.from_hf_dict({**V3, "architectures": ["LlamaForCausalLM"]})
