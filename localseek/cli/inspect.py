"""`localseek inspect PATH [--json]`: what a model file holds and what decoding reads."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="Hugging Face checkpoint folder or GGUF file")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def main(args: argparse.Namespace) -> int:
    from localseek.checkpoint import open_checkpoint  # torch: not for --help
    from localseek.inspect import summarize

    with open_checkpoint(args.path) as ckpt:
        info = summarize(ckpt)
    console = Console(highlight=False)
    if args.json:
        console.print_json(json.dumps(info))
        return 0
    cfg = info["config"]
    arch = Table(title=f"{info['path']}", show_header=False)
    rows = _v4_rows(info, cfg) if "layer_schedule" in info else _mla_rows(info, cfg)
    rows += [
        ("vocab", cfg["vocab_size"]),
        ("tensors", info["tensors"]),
        ("total size", _size(info["total_bytes"])),
    ]
    for k, v in rows:
        arch.add_row(k, str(v))
    console.print(arch)
    types = Table(title="tensor types")
    types.add_column("type")
    types.add_column("tensors", justify="right")
    types.add_column("bytes", justify="right")
    for name, t in info["tensor_types"].items():
        types.add_row(name, str(t["tensors"]), _size(t["bytes"]))
    console.print(types)
    per = info["bytes_per_token"]
    reads = Table(title="bytes read per decoded token")
    reads.add_column("part")
    reads.add_column("bytes", justify="right")
    reads.add_row("attention, dense, shared, router, lm_head", _size(per["attention_and_shared"]))
    reads.add_row("routed experts", _size(per["routed_experts"]))
    reads.add_row("total", _size(per["total"]), style="bold")
    console.print(reads)
    return 0


def _mla_rows(info: dict, cfg: dict) -> list[tuple[str, object]]:
    return [
        ("architecture", info["architecture"]),
        ("layers", f"{info['layers']} ({info['dense_layers']} dense, {info['moe_layers']} MoE)"),
        ("hidden size", cfg["hidden_size"]),
        ("attention heads", cfg["num_attention_heads"]),
        ("q_lora_rank / kv_lora_rank", f"{cfg['q_lora_rank']} / {cfg['kv_lora_rank']}"),
        (
            "qk nope / rope / v head dims",
            f"{cfg['qk_nope_head_dim']} / {cfg['qk_rope_head_dim']} / {cfg['v_head_dim']}",
        ),
        (
            "routed experts",
            f"{info['routed_experts_per_layer']} per layer, {info['experts_per_token']} per token",
        ),
        ("shared experts", info["shared_experts"]),
        (
            "routing",
            f"{cfg['scoring_func']}, {cfg['n_group']} groups keep {cfg['topk_group']}, "
            f"scale {cfg['routed_scaling_factor']}",
        ),
    ]


def _v4_rows(info: dict, cfg: dict) -> list[tuple[str, object]]:
    """DeepSeek-V4: attention and MoE type per layer, and what the attention is made of."""
    return [
        ("architecture", info["architecture"]),
        ("layers", info["layers"]),
        *[(f"  layer {i}", kind) for i, kind in enumerate(info["layer_schedule"])],
        ("hidden size / hc streams", f"{cfg['hidden_size']} / {cfg['hc_mult']}"),
        (
            "attention",
            f"{cfg['num_attention_heads']} heads x {cfg['head_dim']} (rope "
            f"{cfg['qk_rope_head_dim']}), window {cfg['sliding_window']}, q_lora "
            f"{cfg['q_lora_rank']}, {cfg['o_groups']} output groups x {cfg['o_lora_rank']}",
        ),
        (
            "indexer",
            f"{cfg['index_n_heads']} heads x {cfg['index_head_dim']}, top {cfg['index_topk']}",
        ),
        (
            "routed experts",
            f"{info['routed_experts_per_layer']} per layer, {info['experts_per_token']} per token",
        ),
        ("shared experts", info["shared_experts"]),
        ("routing", f"{cfg['scoring_func']}, scale {cfg['routed_scaling_factor']}"),
    ]
