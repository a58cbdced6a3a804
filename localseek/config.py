"""ModelConfig: every number the DeepSeek-V2/V3 architecture needs, from one place.

Built from a Hugging Face ``config.json`` here; the GGUF reader builds the same dataclass from
``deepseek2.*`` metadata. Field names follow the Hugging Face config, which follows the papers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from localseek.errors import CheckpointError


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension as DeepSeek configures it (``rope_scaling`` with type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # Set only when a file states it (HF's attention_factor).
    attention_factor: float | None = None

    @property
    def rope_attention_factor(self) -> float:
        """Factor on cos/sin by transformers' rule (1 when mscale == mscale_all_dim, as in V3)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_get_mscale(self.factor)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not scaling)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The DeepSeek-V2/V3 architecture, grouped as in DeepSeek's ``ModelArgs``."""

    model_type: str  # "deepseek_v2" or "deepseek_v3"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # dense MLP
    intermediate_size: int
    # moe
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str  # "softmax" or "sigmoid"
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    # mla
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # rope / yarn
    rope_theta: float
    rope_scaling: YarnScaling | None
    # multi-token prediction layers stored after the main ones; inference skips them
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def variant(self):
        """This model's entry in the variant registry (``localseek.model.variants``)."""
        from localseek.model.variants import variant

        return variant(self.model_type)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Numbers the latent KV cache stores per token per layer."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        """Attention softmax scale: 1/sqrt(qk_head_dim), times YaRN's mscale squared."""
        scale = self.qk_head_dim**-0.5
        ys = self.rope_scaling
        if ys is not None and ys.mscale_all_dim:
            m = yarn_get_mscale(ys.factor, ys.mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config dict; unknown keys are ignored."""
        from localseek.model.variants import model_type_of

        model_type = model_type_of(raw, source)
        if model_type not in ("deepseek_v2", "deepseek_v3"):
            raise CheckpointError(
                f"{source}: {model_type} is not an MLA model (ModelConfig is V2/V3's config)."
            )
        v3 = model_type == "deepseek_v3"

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise CheckpointError(f"{source}: missing required key '{key}'.")
            return raw[key]

        def get(key: str, default: Any) -> Any:
            value = raw.get(key)
            return default if value is None else value

        # transformers' defaults for a key that is absent differ by model type.
        scoring_default = "sigmoid" if v3 else "softmax"
        topk_method_default = "noaux_tc" if v3 else "greedy"
        q_lora = raw.get("q_lora_rank")
        n_layers = int(need("num_hidden_layers"))
        cfg = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            num_hidden_layers=n_layers,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(get("moe_intermediate_size", 0)),
            n_routed_experts=int(get("n_routed_experts", 0)),
            n_shared_experts=int(get("n_shared_experts", 0)),
            num_experts_per_tok=int(get("num_experts_per_tok", 0)),
            n_group=int(get("n_group", 1)),
            topk_group=int(get("topk_group", 1)),
            topk_method=str(get("topk_method", topk_method_default)),
            scoring_func=str(get("scoring_func", scoring_default)),
            norm_topk_prob=bool(get("norm_topk_prob", v3)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=int(get("first_k_dense_replace", 0)),
            moe_layer_freq=int(get("moe_layer_freq", 1)),
            num_attention_heads=int(need("num_attention_heads")),
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
            rope_theta=float(_rope_field(raw, "rope_theta", 10000.0)),
            rope_scaling=yarn_from_hf(raw, source),
            num_nextn_predict_layers=int(get("num_nextn_predict_layers", 0)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=first_id(raw.get("eos_token_id")),
            extra={"quantization_config": raw.get("quantization_config")},
        )
        cfg.validate(source)
        return cfg

    def validate(self, source: str) -> None:
        """Reject numbers the model cannot run with, naming the first one that is wrong."""

        def bad(msg: str) -> None:
            raise CheckpointError(f"{source}: {msg}.")

        check_positive(
            self,
            (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "v_head_dim",
            ),
            source,
        )
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            bad(f"scoring_func '{self.scoring_func}' is not supported (softmax or sigmoid)")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok must be between 1 and n_routed_experts")
            if self.n_routed_experts % self.n_group:
                bad(
                    f"n_routed_experts {self.n_routed_experts} is not divisible by "
                    f"n_group {self.n_group}"
                )
            if not 0 < self.topk_group <= self.n_group:
                bad(f"topk_group must be between 1 and n_group, got {self.topk_group}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size must be positive for a MoE model")
            if self.moe_layer_freq <= 0:
                bad("moe_layer_freq must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def check_positive(cfg: Any, names: tuple[str, ...], source: str) -> None:
    """One sentence naming the first field of ``names`` on ``cfg`` that is not positive."""
    for name in names:
        if getattr(cfg, name) <= 0:
            raise CheckpointError(f"{source}: {name} must be positive, got {getattr(cfg, name)}.")


def first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _rope_params(raw: dict[str, Any]) -> dict[str, Any] | None:
    # Newer transformers write `rope_parameters` (holding rope_theta too); older `rope_scaling`.
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        return params
    scaling = raw.get("rope_scaling")
    return scaling if isinstance(scaling, dict) else None


def _rope_field(raw: dict[str, Any], key: str, default: Any) -> Any:
    if raw.get(key) is not None:
        return raw[key]
    params = _rope_params(raw)
    if params and params.get(key) is not None:
        return params[key]
    return default


def yarn_from_hf(raw: dict[str, Any], source: str) -> YarnScaling | None:
    params = _rope_params(raw)
    if not params:
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope scaling type '{kind}' is not supported (yarn).")
    try:
        factor = float(params["factor"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: yarn rope scaling needs a numeric 'factor'.") from e
    original = params.get("original_max_position_embeddings")
    if original is None:
        original = raw.get("max_position_embeddings", 4096)
    attention_factor = params.get("attention_factor")
    return YarnScaling(
        factor=factor,
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=_optional_float(params.get("mscale")),
        mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
        attention_factor=None if attention_factor is None else float(attention_factor),
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
