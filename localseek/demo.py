"""The default model of the commands, and tiny models for the tests.

The default is the demo model that ships inside the package (localseek/data/demo): a small
DeepSeek-V3-architecture MoE trained on the CPU by tools/train_demo.py on Debian's fortune
cookies. ``build_tiny_model`` writes a tiny random V3 model (every code path, no meaningful
text) and ``write_bpe_tokenizer`` trains a DeepSeek-style byte-level BPE; the tests use both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from localseek.errors import LocalseekError

BUNDLED = Path(__file__).parent / "data" / "demo"

_TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
]
_CORPUS = """The old sailor said that the sea was calm and the wind was kind.
She walked along the river to the town, where the market was full of bread and fruit.
In the morning the children ran to the school, and the teacher read them a story.
A quick brown fox jumps over the lazy dog; numbers like 12, 345 and 6789 appear too.
def main(): return sum(x * x for x in range(10))
"""


def default_model(console=None) -> Path:
    """The bundled demo model's folder (``console`` is accepted for the commands' sake)."""
    if not (BUNDLED / "config.json").is_file():
        raise LocalseekError(
            f"the bundled demo model is missing from {BUNDLED} (a broken install?): pass "
            "--model PATH, or rebuild it with tools/train_demo.py."
        )
    return BUNDLED


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a random tiny V3 model in Hugging Face layout (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    cfg = _TINY_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        save_file(random_state(cfg, seed), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_bpe_tokenizer(tmp, _CORPUS.splitlines(), cfg["vocab_size"])
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def random_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) / cols**0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    def mlp(prefix: str, inter: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.gate_proj.weight": mat(inter, D),
            f"{prefix}.up_proj.weight": mat(inter, D),
            f"{prefix}.down_proj.weight": mat(D, inter),
        }

    sd = {
        "model.embed_tokens.weight": torch.randn(cfg["vocab_size"], D, generator=g),
        "model.norm.weight": norm(D),
        "lm_head.weight": mat(cfg["vocab_size"], D),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        sd.update(
            {
                f"{p}.input_layernorm.weight": norm(D),
                f"{p}.post_attention_layernorm.weight": norm(D),
                f"{a}.q_a_proj.weight": mat(cfg["q_lora_rank"], D),
                f"{a}.q_a_layernorm.weight": norm(cfg["q_lora_rank"]),
                f"{a}.q_b_proj.weight": mat(H * qk, cfg["q_lora_rank"]),
                f"{a}.kv_a_proj_with_mqa.weight": mat(
                    cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], D
                ),
                f"{a}.kv_a_layernorm.weight": norm(cfg["kv_lora_rank"]),
                f"{a}.kv_b_proj.weight": mat(
                    H * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]
                ),
                f"{a}.o_proj.weight": mat(D, H * cfg["v_head_dim"]),
            }
        )
        if i < cfg["first_k_dense_replace"]:
            sd.update(mlp(f"{p}.mlp", cfg["intermediate_size"]))
            continue
        E, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
        sd[f"{p}.mlp.gate.weight"] = mat(E, D)
        sd[f"{p}.mlp.gate.e_score_correction_bias"] = 0.05 * torch.randn(E, generator=g)
        sd.update(mlp(f"{p}.mlp.shared_experts", inter * cfg["n_shared_experts"]))
        for e in range(E):
            sd.update(mlp(f"{p}.mlp.experts.{e}", inter))
    return sd


def write_bpe_tokenizer(
    folder: Path,
    corpus: list[str],
    vocab_size: int,
    chat_template: str | None = None,
    tokenizer_config: dict | None = None,
) -> None:
    """Train a byte-level BPE with DeepSeek-V3's pre-tokenizer and DeepSeek's special tokens,
    and save tokenizer.json and tokenizer_config.json in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from localseek.checkpoint.gguf import deepseek3_pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = deepseek3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = tokenizer_config or {
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "add_bos_token": True,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
