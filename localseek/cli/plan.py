"""`localseek plan`: where every tensor and routed expert goes under --gpu-mem and --ram."""

from __future__ import annotations

import argparse
import json

from localseek.cli.common import add_device_args, positive_int
from localseek.options import DEFAULT_CTX


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        help="GGUF file or Hugging Face checkpoint folder (default: the bundled demo model)",
    )
    p.add_argument("--gpu-mem", default=None, help="bytes of the GPU tier (e.g. 24GiB)")
    p.add_argument("--ram", default=None, help="bytes of routed experts held in RAM (e.g. 200GiB)")
    p.add_argument(
        "--ctx",
        type=positive_int,
        default=None,
        help=f"context length the KV cache holds (default: the model's, at most {DEFAULT_CTX})",
    )
    p.add_argument("--stats", default=None, help="expert usage file from `localseek profile`")
    add_device_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from localseek.checkpoint import open_checkpoint
    from localseek.demo import default_model
    from localseek.engine import plan_placement
    from localseek.offload.plan import format_size, parse_size
    from localseek.options import RuntimeOptions

    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    opts = RuntimeOptions.resolve(args.device, args.dtype, ctx=args.ctx)
    gpu_mem = None if args.gpu_mem is None else parse_size(args.gpu_mem, "--gpu-mem")
    ram = None if args.ram is None else parse_size(args.ram, "--ram")
    path = args.model or default_model(err)
    with open_checkpoint(path) as ckpt:
        cfg = ckpt.config
        ctx = args.ctx or min(cfg.max_position_embeddings, DEFAULT_CTX)
        plan, source = plan_placement(
            ckpt, gpu_mem, ram, ctx, opts.dtype, args.stats, device=opts.device
        )
        source.close()
    if args.json:
        out.print_json(json.dumps({"model": str(ckpt.path), **plan.to_dict()}))
        return 0
    budget = Table(title=f"{ckpt.path.name}: GPU tier, fixed part")
    budget.add_column("part")
    budget.add_column("bytes", justify="right")
    for name, b in plan.fixed.items():
        budget.add_row(name, format_size(b))
    budget.add_row("fixed part", format_size(plan.fixed_bytes), style="bold")
    out.print(budget)
    tiers = Table(title="routed experts")
    tiers.add_column("tier")
    tiers.add_column("experts", justify="right")
    tiers.add_column("bytes", justify="right")
    tiers.add_column("budget", justify="right")
    counts = plan.tier_counts()
    gpu_left = "-" if gpu_mem is None else format_size(gpu_mem - plan.fixed_bytes)
    tiers.add_row("GPU cache", str(counts["gpu"]), format_size(plan.gpu_cache_bytes), gpu_left)
    tiers.add_row(
        "RAM",
        str(counts["ram"]),
        format_size(plan.ram_bytes),
        "-" if ram is None else format_size(ram),
    )
    tiers.add_row("disk", str(counts["disk"]), format_size(plan.disk_bytes), "-")
    tiers.add_row(
        "total", str(sum(counts.values())), format_size(plan.expert_bytes), "", style="bold"
    )
    out.print(tiers)
    if plan.layers:
        g = sorted({lp.gpu_slots for lp in plan.layers})
        r = sorted({lp.ram_slots for lp in plan.layers})
        sizes = sorted({lp.expert_bytes for lp in plan.layers})
        out.print(
            f"per MoE layer: {_span(g)} GPU slots and {_span(r)} RAM slots, "
            f"{_span([format_size(b) for b in sizes])} per expert"
            + (" (hottest experts first, from --stats)" if plan.stats_used else "")
        )
    return 0


def _span(values: list) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
