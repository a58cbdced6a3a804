"""Arguments every model-running command shares, and loading with them."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from localseek.demo import default_model
from localseek.engine import Generation, Model, load
from localseek.errors import LocalseekError


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
    add_budget_args(p)


def add_sampling_args(
    p: argparse.ArgumentParser, max_new_tokens: int, n_help: str, temperature: float, top_p: float
) -> None:
    """-n and the sampler's flags, with the command's own defaults."""
    p.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens, help=n_help)
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=top_p)
    p.add_argument("--seed", type=int, default=None)


def generate_from_args(model: Model, ids: list[int], args: argparse.Namespace) -> Generation:
    """model.generate with the flags of ``add_sampling_args``."""
    return model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def counted_progress(console: Console, label: str = "{task.description}") -> Progress:
    """A transient bar of counted steps on ``console`` (off when it is not a terminal)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """The offload flags: budgets per tier, usage statistics, cache policy, prefetch."""
    p.add_argument(
        "--gpu-mem",
        default=None,
        help="bytes of the GPU tier: weights, KV cache, scratch and the expert cache "
        "(e.g. 24GiB); the rest of the experts go to RAM and disk",
    )
    p.add_argument(
        "--ram", default=None, help="bytes of routed-expert weights held in RAM (e.g. 200GiB)"
    )
    p.add_argument(
        "--stats", default=None, help="expert usage file from `localseek profile`: hottest first"
    )
    p.add_argument(
        "--policy", default="lru", choices=["lru", "lfu", "static"], help="GPU expert cache policy"
    )
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="do not predict and read ahead the next layer's experts",
    )
    p.add_argument(
        "--disk-io",
        default="auto",
        choices=["auto", "plain", "uncached", "direct"],
        help="how experts are read from disk: O_DIRECT (direct) for files larger than RAM and "
        "plain reads otherwise (auto), or plain reads dropped from the page cache (uncached)",
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
        **budget_options(args),
    )


def budget_options(args: argparse.Namespace) -> dict:
    """The offload options of ``load()`` from the flags (none when no budget is given)."""
    if args.gpu_mem is None and args.ram is None:
        if args.stats is not None:
            raise LocalseekError("--stats places experts under a budget: add --gpu-mem or --ram.")
        return {}
    return {
        "gpu_mem": args.gpu_mem,
        "ram": args.ram,
        "stats": args.stats,
        "policy": args.policy,
        "prefetch": not args.no_prefetch,
        "disk_io": args.disk_io,
    }


def write_atomically(path: Path, text: str) -> None:
    """Write a text file (a report) so that a half-written one never takes the place of a good
    one: a temporary file beside it, renamed when complete, with the usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
