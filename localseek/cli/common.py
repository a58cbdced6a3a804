"""Arguments every model-running command shares, and loading with them."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from localseek.errors import LocalseekError
from localseek.options import usable_cores

if TYPE_CHECKING:  # these import torch: only a command that runs a model pays for it
    from rich.console import Console
    from rich.progress import Progress

    from localseek.engine import Generation, Model
    from localseek.session import Session

SEED_LIMIT = 2**64  # torch's generator takes seeds in [0, 2**64)


def undecodable(text: str, what: str, effect: str = "") -> str | None:
    """The sentence to say when text from the command line or stdin was not UTF-8 (Python hands
    such bytes over as lone surrogates); None when it was. ``effect`` (", so ...") says what
    was not done."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if "\udc80" <= bad <= "\udcff" else repr(bad)
        return (
            f"{what} is not UTF-8 ({byte} at character {e.start + 1}){effect}: convert it to "
            "UTF-8 (e.g. with iconv)"
        )
    return None


def utf8_text(text: str) -> str:
    """argparse type: text that is UTF-8 (the tokenizer takes nothing else)."""
    if (problem := undecodable(text, "the text")) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed torch's generator takes."""
    value = _number(text, int, "a whole number")
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float, "a number")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = _number(text, float, "a number")
    if not 0 < value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype (load, and `plan` without loading)."""
    p.add_argument(
        "--device", default="cpu", help="torch device of the GPU tier (cpu, cuda, cuda:N)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        help="GGUF file or Hugging Face checkpoint folder (default: the bundled demo model)",
    )
    add_device_args(p)
    add_threads_arg(p, "CPU threads")
    p.add_argument(
        "--ctx",
        type=positive_int,
        default=None,
        help="context length in tokens (default: the model's, at most 4096)",
    )
    p.add_argument(
        "--exact", action="store_true", help="float32 activations on exactly dequantised weights"
    )
    add_budget_args(p)


def add_sampling_args(
    p: argparse.ArgumentParser, max_new_tokens: int, n_help: str, temperature: float, top_p: float
) -> None:
    """-n and the sampler's flags, with the command's own defaults."""
    p.add_argument(
        "-n", "--max-new-tokens", type=non_negative_int, default=max_new_tokens, help=n_help
    )
    p.add_argument(
        "--temperature", type=non_negative_float, default=temperature, help="0 means greedy"
    )
    p.add_argument(
        "--top-k",
        type=non_negative_int,
        default=0,
        help="sample among the k most likely tokens only (0: no limit)",
    )
    p.add_argument(
        "--top-p",
        type=probability,
        default=top_p,
        help="sample among the most likely tokens whose probabilities add up to p (1: all)",
    )
    p.add_argument(
        "--seed",
        type=seed,
        default=None,
        help="seed of the sampler, for repeatable samples (default: a fresh one each run)",
    )


def add_threads_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--threads: more than the usable cores is capped to them (``threads_from_args``)."""
    p.add_argument(
        "--threads",
        "-t",
        type=positive_int,
        default=None,
        help=f"{what} (default: every core this process may use, here {usable_cores()})",
    )


def threads_from_args(args: argparse.Namespace) -> int | None:
    """``--threads``, capped to the usable cores with a one-line notice on stderr."""
    usable = usable_cores()
    if args.threads is not None and args.threads > usable:
        print(
            f"localseek: --threads {args.threads} is more than the {usable} cores this process "
            f"may use; using {usable}.",
            file=sys.stderr,
        )
        args.threads = usable
    return args.threads


def check_output_path(path: str, flag: str) -> Path:
    """Fail now, not after the work, when ``path`` cannot take the output file: it is a folder,
    or the folder it would go in cannot be made or written."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise LocalseekError(f"{flag} {path}: is a folder; give the name of a file to write.")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # write_atomically makes the missing folders
    if not parent.is_dir():
        raise LocalseekError(f"{flag} {path}: {parent} is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise LocalseekError(
            f"{flag} {path}: cannot write in {parent} ({e.strerror or e})."
        ) from None
    return out


def generate_from_args(
    model: Model, ids: list[int], args: argparse.Namespace, session: Session | None = None
) -> Generation:
    """model.generate with the flags of ``add_sampling_args`` (in ``session``'s cache if given)."""
    return model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        session=session,
    )


def counted_progress(console: Console, label: str = "{task.description}") -> Progress:
    """A transient bar of counted steps on ``console`` (off when it is not a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

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
    from localseek.demo import default_model
    from localseek.engine import load

    path = args.model or default_model(console)
    return load(
        path,
        device=args.device,
        dtype=args.dtype,
        threads=threads_from_args(args),
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise LocalseekError(f"{path}: cannot be written ({e.strerror or e}).") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LocalseekError(f"{path}: cannot be written ({e.strerror or e}).") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
