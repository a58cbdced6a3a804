"""What a checkpoint holds and what one decode step has to read, as plain data."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from localseek.checkpoint import Checkpoint, expected_shapes


def summarize(ckpt: Checkpoint) -> dict[str, Any]:
    """Architecture, dimensions, tensor types with counts and bytes, and bytes read per token.

    Types, tensor counts and sizes are the file's own (a GGUF expert stack is one tensor).
    Per token a decode step reads every non-expert tensor once (attention, norms, dense layers,
    routers, shared experts, lm_head; of the embedding only one row) and num_experts_per_tok
    routed experts in each MoE layer.

    Raises:
        CheckpointError: a tensor the model needs is missing or misshapen.
    """
    cfg = ckpt.config
    ckpt.check_complete()
    types: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    files = ckpt.file_tensors()
    for f in files:
        t = types[f.storage_type]
        t["tensors"] += 1
        t["bytes"] += f.nbytes
    fixed = expert_bytes = 0
    for name in expected_shapes(cfg):
        n = ckpt.nbytes(name)
        if ".ffn.experts." in name:
            expert_bytes += n
        elif name == "embed":
            fixed += n // cfg.vocab_size
        else:
            fixed += n
    routed_total = cfg.n_routed_experts * len(cfg.moe_layers)
    routed_per_token = (
        expert_bytes // routed_total * cfg.num_experts_per_tok * len(cfg.moe_layers)
        if routed_total
        else 0
    )
    schedule = getattr(cfg, "layer_schedule", None)  # V4: attention and MoE type per layer
    return {
        **({"layer_schedule": schedule} if schedule is not None else {}),
        "path": str(ckpt.path),
        "architecture": cfg.model_type,
        "config": cfg.to_dict(),
        "layers": cfg.num_hidden_layers,
        "dense_layers": cfg.num_hidden_layers - len(cfg.moe_layers),
        "moe_layers": len(cfg.moe_layers),
        "routed_experts_per_layer": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "shared_experts": cfg.n_shared_experts,
        "tensors": len(files),
        "tensor_types": dict(sorted(types.items())),
        "total_bytes": sum(f.nbytes for f in files),
        "routed_expert_bytes": sum(f.nbytes for f in files if f.routed_experts),
        "bytes_per_token": {
            "attention_and_shared": fixed,
            "routed_experts": routed_per_token,
            "total": fixed + routed_per_token,
        },
    }
