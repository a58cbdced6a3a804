"""The model-variant registry: one entry per architecture localseek runs.

An entry owns what differs between variants: how its config.json reads, its official
checkpoint layout's name table, the canonical tensors it needs, the network it builds, its
cache and how routed experts are computed. Code elsewhere asks ``cfg.variant`` instead of
testing ``model_type`` strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from localseek.errors import CheckpointError

Shapes = Iterator[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Variant:
    """One architecture.

    Attributes:
        model_type: the Hugging Face ``model_type`` ("deepseek_v3").
        architectures: the ``architectures`` entries naming it.
        parse_config: (config.json dict, source) -> its config dataclass.
        hf_names: the official safetensors layout, (name regex, canonical replacement).
        shapes: config -> canonical tensors with their shapes.
        optional_shapes: config -> tensors a file may hold besides those.
        network: (cfg, weights, experts, max_len, device, exact) -> the nn.Module.
        cache: (cfg, batch, max_len, device, dtype) -> its cache.
        cache_bytes_per_token: (cfg, dtype) -> bytes the cache grows by per token.
        experts: (cfg, layer -> [(w1, w2, w3)], exact) -> the routed-expert executor; None:
            the CPU expert executor (``offload.expert_executor``).
        v2_weight_rule: routed weights scaled only when not normalised (V2's modeling code).
        offload: the tiered expert store runs it.
    """

    model_type: str
    architectures: tuple[str, ...]
    parse_config: Callable[[dict[str, Any], str], Any]
    hf_names: list[tuple[re.Pattern[str], str]]
    shapes: Callable[[Any], Shapes]
    optional_shapes: Callable[[Any], dict[str, tuple[int, ...]]]
    network: Callable[..., torch.nn.Module]
    cache: Callable[..., Any]
    cache_bytes_per_token: Callable[[Any, torch.dtype], int]
    experts: Callable[[Any, dict, bool], Any] | None
    v2_weight_rule: bool = False
    offload: bool = True

    @cached_property
    def inverse_names(self) -> list[tuple[re.Pattern[str], str]]:
        """canonical regex -> official name with {} for the numbers (for messages)."""
        return [
            (
                re.compile(re.escape(repl).replace(r"\\1", r"(\d+)").replace(r"\\2", r"(\d+)")),
                pattern.pattern.replace("\\.", ".").replace(r"(\d+)", "{}"),
            )
            for pattern, repl in self.hf_names
        ]

    def canonical_name(self, name: str) -> str | None:
        for pattern, repl in self.hf_names:
            if pattern.fullmatch(name):
                return pattern.sub(repl, name)
        return None

    def hf_name_of(self, name: str) -> str | None:
        for pattern, hf in self.inverse_names:
            m = pattern.fullmatch(name)
            if m is not None:
                return hf.format(*m.groups())
        return None


def _mla(model_type: str, arch: str, v2_weight_rule: bool) -> Variant:
    from localseek.checkpoint.base import iter_mla_shapes, mla_optional_shapes
    from localseek.checkpoint.hf import HF_NAME_TABLE
    from localseek.config import ModelConfig
    from localseek.model.kv_cache import KVCache
    from localseek.model.transformer import Transformer

    return Variant(
        model_type=model_type,
        architectures=(arch,),
        parse_config=ModelConfig.from_hf_dict,
        hf_names=HF_NAME_TABLE,
        shapes=iter_mla_shapes,
        optional_shapes=mla_optional_shapes,
        network=Transformer,
        cache=KVCache,
        cache_bytes_per_token=KVCache.bytes_per_token,
        experts=None,
        v2_weight_rule=v2_weight_rule,
    )


def _v4() -> Variant:
    from localseek.checkpoint.deepseek_v4_names import OFFICIAL_NAME_TABLE, iter_v4_shapes
    from localseek.model.deepseek_v4.cache import V4Cache
    from localseek.model.deepseek_v4.config import V4Config
    from localseek.model.deepseek_v4.transformer import Transformer
    from localseek.model.moe import ReferenceExperts

    def experts(cfg: V4Config, weights: dict, exact: bool) -> ReferenceExperts:
        # per expert through linear() (FP4 experts from their MXFP4 blocks): the one-call CPU
        # MoE kernel has no SwiGLU clamp yet
        return ReferenceExperts(weights, cfg.swiglu_limit, exact)

    return Variant(
        model_type="deepseek_v4",
        architectures=("DeepseekV4ForCausalLM",),
        parse_config=V4Config.from_hf_dict,
        hf_names=OFFICIAL_NAME_TABLE,
        shapes=iter_v4_shapes,
        optional_shapes=lambda cfg: {},
        network=Transformer,
        cache=V4Cache,
        cache_bytes_per_token=V4Cache.bytes_per_token,
        experts=experts,
        offload=False,
    )


_BUILDERS: dict[str, Callable[[], Variant]] = {
    "deepseek_v2": lambda: _mla("deepseek_v2", "DeepseekV2ForCausalLM", True),
    "deepseek_v3": lambda: _mla("deepseek_v3", "DeepseekV3ForCausalLM", False),
    "deepseek_v4": _v4,
}
ARCHITECTURES = {
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV4ForCausalLM": "deepseek_v4",
}
_BUILT: dict[str, Variant] = {}


def variant(model_type: str) -> Variant:
    """The registry entry of a model type (built on first use: entries import their modules)."""
    got = _BUILT.get(model_type)
    if got is None:
        got = _BUILT[model_type] = _BUILDERS[model_type]()
    return got


def model_type_of(raw: dict[str, Any], source: str) -> str:
    """The variant a config.json dict names (by ``architectures``, else ``model_type``)."""
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if not archs and model_type in _BUILDERS:
        return model_type
    found = ", ".join(archs) if archs else f"model_type '{model_type}'"
    raise CheckpointError(
        f"{source}: architecture {found} is not supported (localseek runs "
        f"{', '.join(ARCHITECTURES)})."
    )


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> Any:
    """The config of whichever variant ``raw`` describes."""
    return variant(model_type_of(raw, source)).parse_config(raw, source)


def load_config(path: str | Path) -> Any:
    """Read a config.json and build its variant's config, bad input said in one sentence."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not a UTF-8 text file.") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object.")
    return config_from_hf_dict(raw, str(path))
