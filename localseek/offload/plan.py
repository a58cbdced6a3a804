"""Placement under budgets: which tensor and which routed expert sits in which tier, with bytes.

The GPU tier holds what every token needs (attention and norms of every layer, routers, shared
experts, dense layers, embeddings and lm_head, the latent KV cache for the context, scratch); the
GPU bytes left over become expert-cache slots. The RAM tier holds routed experts up to ``ram``
(hottest first when usage statistics exist); the rest stays on disk. A plan is plain data: it
is printed, saved as JSON, compared in tests; the engine only executes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from localseek.config import ModelConfig
from localseek.errors import LocalseekError

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.w[123]$")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
PREFILL_CHUNK = 512  # tokens whose activations the scratch estimate covers


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``24GiB``, ``512MiB``, ``1.5GB``, ``1e9``-free plain bytes or an int."""
    if isinstance(text, bool):
        raise LocalseekError(f"{what} must be a size such as 24GiB, got {text!r}.")
    if isinstance(text, int):
        if text < 0:
            raise LocalseekError(f"{what} must not be negative, got {text}.")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise LocalseekError(
            f"{what} {text!r} is not a size (write e.g. 24GiB, 512MiB, 1.5GB or plain bytes)."
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Bytes in binary units with two decimals (B without decimals)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


# --- expert usage statistics -----------------------------------------------------------------

STATS_FORMAT = "localseek-expert-stats"


@dataclass
class ExpertUsage:
    """How often each routed expert was chosen: layer -> counts (n_routed_experts,)."""

    counts: dict[int, np.ndarray] = field(default_factory=dict)
    tokens: int = 0

    def add(self, layer: int, topk_ids: np.ndarray, n_experts: int) -> None:
        got = self.counts.setdefault(layer, np.zeros(n_experts, dtype=np.int64))
        got += np.bincount(topk_ids.reshape(-1), minlength=n_experts)

    def hottest(self, layer: int, n_experts: int) -> list[int]:
        """Expert ids of ``layer`` from most to least used (ids break ties)."""
        c = self.counts.get(layer)
        if c is None:
            return list(range(n_experts))
        return [int(e) for e in np.lexsort((np.arange(n_experts), -c))]

    def to_dict(self, model: str = "") -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": 1,
            "model": model,
            "tokens": self.tokens,
            "layers": {str(k): v.tolist() for k, v in sorted(self.counts.items())},
        }

    def save(self, path: str | Path, model: str = "") -> None:
        Path(path).write_text(json.dumps(self.to_dict(model)) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, cfg: ModelConfig | None = None) -> ExpertUsage:
        """Read a ``localseek profile`` file, checked against ``cfg`` when given."""
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise LocalseekError(f"{p}: no such expert statistics file.") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LocalseekError(f"{p}: not a JSON expert statistics file.") from e
        if not isinstance(raw, dict) or raw.get("format") != STATS_FORMAT:
            raise LocalseekError(f"{p}: not a localseek expert statistics file (no format key).")
        usage = cls(tokens=int(raw.get("tokens", 0)))
        layers = raw.get("layers")
        if not isinstance(layers, dict):
            raise LocalseekError(f"{p}: 'layers' must map layer numbers to expert counts.")
        for key, counts in layers.items():
            try:
                layer = int(key)
                arr = np.asarray(counts, dtype=np.int64)
            except (TypeError, ValueError) as e:
                raise LocalseekError(f"{p}: layer {key!r} has no list of integer counts.") from e
            if arr.ndim != 1 or (arr < 0).any():
                raise LocalseekError(f"{p}: layer {key} must hold non-negative counts.")
            if cfg is not None:
                if layer not in cfg.moe_layers:
                    raise LocalseekError(f"{p}: layer {layer} is not a MoE layer of this model.")
                if len(arr) != cfg.n_routed_experts:
                    raise LocalseekError(
                        f"{p}: layer {layer} has {len(arr)} counts, the model has "
                        f"{cfg.n_routed_experts} routed experts."
                    )
            usage.counts[layer] = arr
        return usage


# --- the plan --------------------------------------------------------------------------------


@dataclass
class LayerPlacement:
    """One MoE layer's routed experts: bytes of one expert, slots per tier and the experts each
    tier starts with (the caches change what they hold as the run goes)."""

    layer: int
    expert_bytes: int
    gpu_slots: int
    ram_slots: int
    gpu: list[int]
    ram: list[int]
    disk: list[int]


@dataclass
class Plan:
    """Where everything lives. ``fixed`` groups the GPU tier's always-resident bytes.

    ``gpu_mem`` None: no GPU expert cache unless ``ram`` is None too (then nothing is
    budgeted). ``ram`` None: every expert not in the GPU cache is held in RAM.
    """

    gpu_mem: int | None
    ram: int | None
    ctx: int
    fixed: dict[str, int]
    tensors: dict[str, int]  # every non-expert tensor on the GPU tier, bytes
    layers: list[LayerPlacement]
    stats_used: bool = False

    @property
    def fixed_bytes(self) -> int:
        return sum(self.fixed.values())

    @property
    def gpu_cache_bytes(self) -> int:
        return sum(lp.gpu_slots * lp.expert_bytes for lp in self.layers)

    @property
    def ram_bytes(self) -> int:
        return sum(lp.ram_slots * lp.expert_bytes for lp in self.layers)

    @property
    def disk_bytes(self) -> int:
        return sum(len(lp.disk) * lp.expert_bytes for lp in self.layers)

    @property
    def expert_bytes(self) -> int:
        return sum(
            (len(lp.gpu) + len(lp.ram) + len(lp.disk)) * lp.expert_bytes for lp in self.layers
        )

    def tier_counts(self) -> dict[str, int]:
        return {
            "gpu": sum(len(lp.gpu) for lp in self.layers),
            "ram": sum(len(lp.ram) for lp in self.layers),
            "disk": sum(len(lp.disk) for lp in self.layers),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_mem": self.gpu_mem,
            "ram": self.ram,
            "ctx": self.ctx,
            "stats_used": self.stats_used,
            "fixed": dict(self.fixed),
            "fixed_bytes": self.fixed_bytes,
            "gpu_cache_bytes": self.gpu_cache_bytes,
            "ram_bytes": self.ram_bytes,
            "disk_bytes": self.disk_bytes,
            "experts": self.tier_counts(),
            "tensors": {name: {"tier": "gpu", "bytes": b} for name, b in self.tensors.items()},
            "layers": [vars(lp).copy() for lp in self.layers],
        }


def _group(name: str) -> str:
    """The fixed-part group a non-expert tensor belongs to."""
    if name in ("embed", "head"):
        return "embeddings and lm_head"
    if name == "norm" or name.endswith("_norm"):
        return "norms"
    if ".attn." in name:
        return "attention (MLA)"
    if ".ffn.gate" in name:
        return "routers"
    if ".ffn.shared." in name:
        return "shared experts"
    return "dense MLP layers"


def scratch_bytes(cfg: ModelConfig, ctx: int, itemsize: int) -> int:
    """Estimated activations of one prefill chunk of up to 512 tokens: float32 logits,
    attention scores against the whole context, and the widest hidden activations."""
    T = min(ctx, PREFILL_CHUNK)
    logits = T * cfg.vocab_size * 4
    scores = cfg.num_attention_heads * T * ctx * 4
    wide = max(
        cfg.intermediate_size,
        cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
        cfg.moe_intermediate_size * max(cfg.num_experts_per_tok, 1),
    )
    acts = T * (4 * cfg.hidden_size + 3 * wide) * itemsize
    return logits + scores + acts


def make_plan(
    cfg: ModelConfig,
    tensor_bytes: dict[str, int],
    gpu_mem: int | None,
    ram: int | None,
    ctx: int,
    kv_bytes: int,
    scratch: int,
    usage: ExpertUsage | None = None,
    source: str = "the model",
) -> Plan:
    """Place a model under budgets.

    Args:
        cfg: the model's config.
        tensor_bytes: canonical tensor name -> bytes it occupies once loaded (routed experts:
            ``layers.L.ffn.experts.E.w1`` etc., summed per expert).
        gpu_mem: bytes of the GPU tier (weights, KV cache, scratch, expert cache); None: no
            GPU expert cache.
        ram: bytes of routed-expert weights the RAM tier may hold; None: unbounded.
        ctx: context length the KV cache is sized for; kv_bytes its bytes; scratch activations.
        usage: per-layer expert counts; the hottest experts are placed first.
        source: how error messages name the model.
    Raises:
        LocalseekError: the fixed part does not fit ``gpu_mem``, or ``ram`` cannot hold one
            expert per MoE layer.
    """
    fixed_tensors: dict[str, int] = {}
    per_expert: dict[int, int] = {}
    for name, b in tensor_bytes.items():
        m = _EXPERT.match(name)
        if m is None:
            fixed_tensors[name] = b
        elif int(m.group(2)) == 0:
            per_expert[int(m.group(1))] = per_expert.get(int(m.group(1)), 0) + b
    fixed: dict[str, int] = {}
    for name, b in fixed_tensors.items():
        g = _group(name)
        fixed[g] = fixed.get(g, 0) + b
    fixed["KV cache"] = kv_bytes
    fixed["scratch"] = scratch
    fixed_total = sum(fixed.values())
    if gpu_mem is not None and fixed_total > gpu_mem:
        raise LocalseekError(
            f"{source}: --gpu-mem {format_size(gpu_mem)} cannot hold the fixed part "
            f"({format_size(fixed_total)}: attention, norms, routers, shared and dense layers, "
            f"embeddings, KV cache for {ctx} tokens and scratch); it is "
            f"{format_size(fixed_total - gpu_mem)} short."
        )
    layers = cfg.moe_layers
    E = cfg.n_routed_experts
    sizes = [per_expert.get(layer, 0) for layer in layers]
    if gpu_mem is None:
        gpu_slots = [0] * len(layers)
    else:
        gpu_slots = _spread(gpu_mem - fixed_total, sizes, [E] * len(layers))
    if ram is None:
        ram_slots = [E - g for g in gpu_slots]
    else:
        # a layer whose experts are not all in the GPU cache needs a RAM slot to compute one
        need = [b if g < E else 0 for g, b in zip(gpu_slots, sizes, strict=True)]
        if sum(need) > ram:
            raise LocalseekError(
                f"{source}: --ram {format_size(ram)} cannot hold one routed expert per MoE "
                f"layer ({format_size(sum(need))} needed); it is "
                f"{format_size(sum(need) - ram)} short."
            )
        ram_slots = _spread(ram, sizes, [E - g for g in gpu_slots])
        ram_slots = [max(r, 1 if g < E else 0) for r, g in zip(ram_slots, gpu_slots, strict=True)]
    placements = []
    for layer, b, g, r in zip(layers, sizes, gpu_slots, ram_slots, strict=True):
        order = usage.hottest(layer, E) if usage is not None else list(range(E))
        placements.append(
            LayerPlacement(layer, b, g, r, order[:g], sorted(order[g : g + r]), order[g + r :])
        )
        placements[-1].gpu = sorted(placements[-1].gpu)
        placements[-1].disk = sorted(placements[-1].disk)
    return Plan(gpu_mem, ram, ctx, fixed, fixed_tensors, placements, usage is not None)


def _spread(budget: int, sizes: list[int], caps: list[int]) -> list[int]:
    """Slots per layer: the same number in every layer as far as the budget goes, then one
    more in layers from the first while bytes are left; never over a layer's cap."""
    n = [0] * len(sizes)
    if not sizes or budget <= 0:
        return n
    total = sum(sizes)
    even = budget // total if total else 0
    n = [min(even, c) for c in caps]
    left = budget - sum(k * b for k, b in zip(n, sizes, strict=True))
    grew = True
    while grew:
        grew = False
        for i, (b, c) in enumerate(zip(sizes, caps, strict=True)):
            if n[i] < c and 0 < b <= left:
                n[i] += 1
                left -= b
                grew = True
    return n


def config_tensor_bytes(
    cfg: ModelConfig, expert_bits: float = 4.5, other_bits: float = 8.5
) -> dict[str, int]:
    """Tensor bytes of a model known only by its config, Q4_K_M-like: routed experts at
    ``expert_bits`` per weight (4.5: Q4_K), everything else at ``other_bits`` (8.5: Q8_0)."""
    from localseek.checkpoint import expected_shapes

    out = {}
    for name, shape in expected_shapes(cfg).items():
        bits = expert_bits if _EXPERT.match(name) else other_bits
        out[name] = int(np.prod(shape) * bits / 8)
    return out
