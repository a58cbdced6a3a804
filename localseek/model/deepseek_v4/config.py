"""V4Config: every number DeepSeek-V4 needs, from its config.json as DeepSeek ships it.

DeepSeek's files state the attention schedule as ``compress_ratios`` (one per layer: 0 sliding
window only, 4 CSA, 128 HCA) and the hash-routed prefix as ``num_hash_layers``; transformers
writes ``layer_types`` / ``mlp_layer_types`` / ``compress_rates`` instead. Both are read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from localseek.config import YarnScaling, check_positive, first_id, yarn_from_hf
from localseek.errors import CheckpointError

SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE, MOE = "hash_moe", "moe"
RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: CSA, 128: HCA}  # DeepSeek's compress_ratios
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


@dataclass(frozen=True)
class V4Config:
    """DeepSeek-V4, grouped as in DeepSeek's ``ModelArgs``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # moe (every layer: hash-routed or top-k routed, one shared expert)
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float
    mlp_layer_types: tuple[str, ...]
    # attention: MQA over one shared key/value head
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: tuple[str, ...]
    compress_rates: dict[str, int]
    # lightning indexer (CSA layers)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    # rope: plain for sliding layers, compress_rope_theta (+ YaRN) for CSA / HCA layers
    rope_theta: float
    compress_rope_theta: float
    rope_scaling: YarnScaling | None
    # mHC hyper-connections
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    model_type = "deepseek_v4"

    @property
    def variant(self):
        """This model's entry in the variant registry (``localseek.model.variants``)."""
        from localseek.model.variants import variant

        return variant(self.model_type)

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return 0 <= layer < self.num_hidden_layers

    def is_hash_layer(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == HASH_MOE

    def compress_rate(self, layer: int) -> int:
        """Source tokens per compressed entry in ``layer`` (0: sliding window only)."""
        return self.compress_rates.get(self.layer_types[layer], 0)

    @property
    def layer_schedule(self) -> list[str]:
        """One short label per layer, e.g. 'CSA/4 moe' (for ``inspect``)."""
        short = {SLIDING: "SWA", CSA: "CSA", HCA: "HCA"}
        out = []
        for i, t in enumerate(self.layer_types):
            rate = f"/{self.compress_rate(i)}" if t != SLIDING else ""
            out.append(f"{short[t]}{rate} {self.mlp_layer_types[i]}")
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> V4Config:
        """Build from a DeepSeek-V4 config dict (DeepSeek's or transformers' keys)."""

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise CheckpointError(f"{source}: missing required key '{key}'.")
            return raw[key]

        def get(key: str, default: Any) -> Any:
            value = raw.get(key)
            return default if value is None else value

        n = int(need("num_hidden_layers"))
        head_dim = int(get("head_dim", 512))
        rope_dim = raw.get("qk_rope_head_dim")
        if rope_dim is None and raw.get("partial_rotary_factor") is not None:
            rope_dim = int(head_dim * float(raw["partial_rotary_factor"]))
        rates = _compress_rates(raw, source)
        cfg = cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            num_hidden_layers=n,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            n_routed_experts=int(need("n_routed_experts")),
            n_shared_experts=int(get("n_shared_experts", 1)),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            scoring_func=str(get("scoring_func", "sqrtsoftplus")),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            swiglu_limit=float(get("swiglu_limit", 0.0)),
            mlp_layer_types=_mlp_layer_types(raw, n, source),
            num_attention_heads=int(need("num_attention_heads")),
            head_dim=head_dim,
            qk_rope_head_dim=int(rope_dim if rope_dim is not None else 64),
            q_lora_rank=int(need("q_lora_rank")),
            o_groups=int(need("o_groups")),
            o_lora_rank=int(need("o_lora_rank")),
            sliding_window=int(need("sliding_window")),
            layer_types=_layer_types(raw, n, source),
            compress_rates=rates,
            index_n_heads=int(get("index_n_heads", 0)),
            index_head_dim=int(get("index_head_dim", 0)),
            index_topk=int(get("index_topk", 0)),
            rope_theta=float(_main_rope_theta(raw)),
            compress_rope_theta=float(get("compress_rope_theta", 160000.0)),
            rope_scaling=_compress_yarn(raw, source),
            hc_mult=int(get("hc_mult", 4)),
            hc_sinkhorn_iters=int(get("hc_sinkhorn_iters", 20)),
            hc_eps=float(get("hc_eps", 1e-6)),
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
                "head_dim",
                "q_lora_rank",
                "o_groups",
                "o_lora_rank",
                "sliding_window",
                "moe_intermediate_size",
                "n_routed_experts",
                "hc_mult",
                "hc_sinkhorn_iters",
            ),
            source,
        )
        if self.scoring_func not in SCORING_FUNCS:
            bad(
                f"key 'scoring_func' has value '{self.scoring_func}', which localseek does not "
                f"know ({', '.join(SCORING_FUNCS)})"
            )
        if not 0 < self.qk_rope_head_dim <= self.head_dim or self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even and at most head_dim, got {self.qk_rope_head_dim}")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            bad(f"num_attention_heads * head_dim is not divisible by o_groups {self.o_groups}")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok must be between 1 and n_routed_experts")
        if CSA in self.layer_types:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if getattr(self, name) <= 0:
                    bad(f"{name} must be positive for a model with CSA layers")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad("index_head_dim must be at least qk_rope_head_dim")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["model_type"] = self.model_type
        return d


def _layer_types(raw: dict[str, Any], n: int, source: str) -> tuple[str, ...]:
    types = raw.get("layer_types")
    if types is not None:
        key = "layer_types"
        for i, t in enumerate(types):
            if t not in LAYER_TYPES:
                raise CheckpointError(
                    f"{source}: key '{key}' has value '{t}' (layer {i}), a layer type localseek "
                    f"does not know ({', '.join(LAYER_TYPES)})."
                )
    else:
        ratios = raw.get("compress_ratios")
        if ratios is None:
            raise CheckpointError(f"{source}: missing required key 'compress_ratios'.")
        types = []
        for i, r in enumerate(ratios[:n]):
            if r not in RATIO_TO_LAYER_TYPE:
                known = ", ".join(map(str, RATIO_TO_LAYER_TYPE))
                raise CheckpointError(
                    f"{source}: key 'compress_ratios' has value {r} (layer {i}), a compress rate "
                    f"localseek does not know ({known})."
                )
            types.append(RATIO_TO_LAYER_TYPE[r])
        key = "compress_ratios"
    if len(types) < n:  # DeepSeek's list may go on for the MTP layers; never shorter
        raise CheckpointError(
            f"{source}: key '{key}' has {len(types)} entries for {n} layers (num_hidden_layers)."
        )
    return tuple(types[:n])


def _compress_rates(raw: dict[str, Any], source: str) -> dict[str, int]:
    rates = {CSA: 4, HCA: 128}
    given = raw.get("compress_rates")
    if isinstance(given, dict):
        for t, r in given.items():
            if t not in (CSA, HCA):
                raise CheckpointError(
                    f"{source}: key 'compress_rates' names layer type '{t}', which localseek "
                    f"does not know ({CSA}, {HCA})."
                )
            if not isinstance(r, int) or r <= 0:
                raise CheckpointError(
                    f"{source}: key 'compress_rates' has value {r!r} for '{t}', not a positive "
                    f"whole number of tokens."
                )
            rates[t] = r
    return rates


def _mlp_layer_types(raw: dict[str, Any], n: int, source: str) -> tuple[str, ...]:
    types = raw.get("mlp_layer_types")
    if types is None:
        n_hash = int(raw.get("num_hash_layers", 0) or 0)
        return tuple([HASH_MOE] * min(n, n_hash) + [MOE] * max(0, n - n_hash))
    for i, t in enumerate(types):
        if t not in (HASH_MOE, MOE):
            raise CheckpointError(
                f"{source}: key 'mlp_layer_types' has value '{t}' (layer {i}), an MLP type "
                f"localseek does not know ({HASH_MOE}, {MOE})."
            )
    if len(types) < n:
        raise CheckpointError(
            f"{source}: key 'mlp_layer_types' has {len(types)} entries for {n} layers."
        )
    return tuple(types[:n])


def _main_rope_theta(raw: dict[str, Any]) -> float:
    if raw.get("rope_theta") is not None:
        return raw["rope_theta"]
    main = (raw.get("rope_parameters") or {}).get("main")
    return main.get("rope_theta", 10000.0) if isinstance(main, dict) else 10000.0


def _compress_yarn(raw: dict[str, Any], source: str) -> YarnScaling | None:
    """YaRN of the compressed layers' rope. DeepSeek's files state it as ``rope_scaling``;
    transformers' as ``rope_parameters["compress"]``. Its attention factor is 1 unless stated
    (transformers' rule for V4: the softmax scale stays head_dim ** -0.5)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("compress"), dict):
        sub = {"rope_parameters": params["compress"], **_orig(raw)}
    else:
        sub = {k: v for k, v in raw.items() if k in ("rope_scaling", "max_position_embeddings")}
        if isinstance(params, dict):
            sub["rope_parameters"] = {k: v for k, v in params.items() if not isinstance(v, dict)}
    yarn = yarn_from_hf(sub, source)
    if yarn is not None and yarn.attention_factor is None:
        yarn = dataclasses.replace(yarn, attention_factor=1.0)
    return yarn


def _orig(raw: dict[str, Any]) -> dict[str, Any]:
    return {"max_position_embeddings": raw.get("max_position_embeddings", 4096)}
