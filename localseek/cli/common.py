"""Arguments every model-running command shares, and loading with them."""

from __future__ import annotations

import argparse

from localseek.demo import default_model
from localseek.engine import Model, load


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        help="GGUF file or Hugging Face checkpoint folder (default: the bundled demo model)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the GPU tier (cpu, cuda)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens")
    p.add_argument(
        "--exact", action="store_true", help="float32 activations on exactly dequantised weights"
    )


def load_from_args(args: argparse.Namespace, console) -> Model:
    path = args.model or default_model(console)
    return load(
        path,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        exact=args.exact,
        ctx=args.ctx,
        progress=console.is_terminal,
    )
