"""Stall time with the expert-usage predictor on and off, on a model larger than its RAM budget.

    .venv/bin/python benchmarks/disk_stall.py --model BIG.gguf [--ram 512MiB] [-n 32]
        [--pairs 4] [--disk-io uncached] [--readers 4] [--io-reps 3]

1. Disk reads: one expert at a time from random places in the file, plain reads (then dropped
   from the page cache) against O_DIRECT, alternating, with 1 and ``--readers`` threads.
2. Generation: greedy decoding of ``-n`` tokens from one fixed prompt under ``--ram``, the
   predictor on and off alternating (on, off, on, off, ...) so that both see the same load on
   a shared machine. Before each load the whole file is dropped from the page cache
   (POSIX_FADV_DONTNEED), and ``--disk-io uncached`` drops every range the store reads right
   after reading it, so expert reads come from the disk as they would for a model larger than
   RAM, not from a page cache that holds the whole file. Decode and prefill are reported apart.

Writes benchmarks/results/disk_stall-DATE.json: machine, command, date, load averages, and per
run tokens/s, stall seconds, disk MiB/token, prefetched bytes, late and cancelled prefetches,
predictor recall and precision.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

import localseek
from localseek.checkpoint import open_checkpoint
from localseek.offload.store import ExpertSource

PROMPT = "The old sailor said that the sea"


def drop_file(path: str) -> None:
    """Ask the kernel to forget the file's cached pages (those not mapped by a process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def io_compare(path: str, reps: int, threads: list[int], experts: int = 48) -> list[dict]:
    """MiB/s of reading whole experts through the store's reader, uncached vs direct."""
    rows = []
    with open_checkpoint(path) as ck:
        cfg = ck.config
        sources = {
            m: ExpertSource(ck, cfg.moe_layers, torch.float32, m) for m in ("uncached", "direct")
        }
        spec = sources["uncached"].specs[cfg.moe_layers[0]]
        rng = np.random.default_rng(0)
        for rep in range(reps):
            for n_threads in threads:
                for mode, source in sources.items():
                    picks = [
                        (int(rng.choice(cfg.moe_layers)), int(rng.integers(cfg.n_routed_experts)))
                        for _ in range(experts)
                    ]
                    drop_file(path)
                    nbytes = [0] * n_threads

                    def work(i: int, src=source, picks=picks, nbytes=nbytes, step=n_threads):
                        out = [np.empty((p.shape[0], p.row_bytes), np.uint8) for p in spec]
                        scales = [np.zeros(p.scale_shape, np.float32) for p in spec]
                        for layer, e in picks[i::step]:
                            nbytes[i] += src.read(layer, e, out, scales)

                    t0 = time.perf_counter()
                    ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    dt = time.perf_counter() - t0
                    rows.append(
                        {
                            "rep": rep,
                            "disk_io": mode,
                            "threads": n_threads,
                            "experts": experts,
                            "seconds": dt,
                            "mib_per_s": sum(nbytes) / dt / 2**20,
                        }
                    )
                    print(f"io {mode:8} threads={n_threads} {rows[-1]['mib_per_s']:6.0f} MiB/s")
        for source in sources.values():
            source.close()
    return rows


def _figures(s, seconds: float, tokens: int) -> dict:
    d = {k: v for k, v in s.to_dict().items() if k != "predictor_per_layer"}
    d.update(
        seconds=seconds,
        tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else None,
        disk_mib_per_token=s.disk_bytes / tokens / 2**20 if tokens else None,
        prefetch_mib=s.prefetch_bytes / 2**20,
        stall_share=s.stall_seconds / seconds if seconds else None,
    )
    return d


def generate_run(
    path: str,
    ram: str,
    n: int,
    prefetch: bool,
    disk_io: str,
    readers: int,
    min_precision: float | None = None,
) -> dict:
    drop_file(path)
    load0 = os.getloadavg()
    model = localseek.load(
        path, ram=ram, prefetch=prefetch, disk_io=disk_io, readers=readers, ctx=256
    )
    if prefetch and min_precision is not None:
        model.experts.predictor.min_precision = min_precision
    try:
        ids = model.tokenizer.encode(PROMPT) if model.tokenizer is not None else list(range(2, 10))
        gen = model.generate(ids, n)
        s0 = model.offload_stats.snapshot()
        t0 = time.perf_counter()
        tokens = [next(gen)]  # the prefill
        t1 = time.perf_counter()
        s1 = model.offload_stats.snapshot()
        tokens += list(gen)
        t2 = time.perf_counter()
        s2 = model.offload_stats.snapshot()
    finally:
        model.close()
    row = {
        "prefetch": prefetch,
        "tokens_out": tokens,
        "prompt_tokens": len(ids),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "prefill": _figures(s1 - s0, t1 - t0, len(ids)),
        "decode": _figures(s2 - s1, t2 - t1, len(tokens) - 1),
    }
    del model, gen
    gc.collect()
    return row


def summarize(runs: list[dict]) -> dict:
    out = {}
    for prefetch in (True, False):
        rows = [r["decode"] for r in runs if r["prefetch"] == prefetch]
        key = "on" if prefetch else "off"
        out[key] = {}
        for name in (
            "stall_seconds",
            "tokens_per_second",
            "disk_mib_per_token",
            "prefetch_mib",
            "predictor_recall",
            "predictor_precision",
            "prefetch_precision",
            "prefetch_late",
            "prefetch_cancelled",
            "ram_hit_rate",
        ):
            vals = [r[name] for r in rows if r[name] is not None]
            out[key][name] = (
                {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                if vals
                else None
            )
    on, off = out["on"], out["off"]
    out["on_over_off"] = {
        k: on[k]["median"] / off[k]["median"]
        for k in ("stall_seconds", "tokens_per_second", "disk_mib_per_token")
        if on[k] and off[k] and off[k]["median"]
    }
    # pairwise: the run on right before/after each run off, under the same load
    pairs = list(zip(runs[0::2], runs[1::2], strict=False))
    out["pairs_on_stalls_less"] = sum(
        a["decode"]["stall_seconds"] < b["decode"]["stall_seconds"] for a, b in pairs
    )
    out["pairs"] = len(pairs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a GGUF whose experts exceed --ram")
    ap.add_argument("--ram", default="512MiB")
    ap.add_argument("-n", type=int, default=32, help="tokens to generate per run")
    ap.add_argument("--pairs", type=int, default=4, help="on/off pairs, alternating")
    ap.add_argument(
        "--disk-io", default="uncached", choices=["auto", "plain", "uncached", "direct"]
    )
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument(
        "--min-precision", type=float, default=None, help="the predictor's (default: its own)"
    )
    ap.add_argument("--io-reps", type=int, default=3, help="0 skips the read comparison")
    ap.add_argument("--tag", default="", help="added to the output file name")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    result: dict = {
        "benchmark": "disk_stall",
        "model": args.model,
        "model_bytes": os.path.getsize(args.model),
        "ram": args.ram,
        "new_tokens": args.n,
        "disk_io": args.disk_io,
        "readers": args.readers,
        "min_precision": args.min_precision,
        "page_cache": (
            "the whole file is dropped with POSIX_FADV_DONTNEED before each load; with disk_io "
            "uncached each expert range is dropped right after it is read, direct bypasses the "
            "cache (vm.drop_caches was not used: it would empty the cache of the whole machine)"
        ),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": psutil.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total,
            "loadavg_start": os.getloadavg(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "localseek": localseek.__file__,
    }
    if args.io_reps:
        result["io"] = io_compare(args.model, args.io_reps, sorted({1, args.readers}))
        by = {}
        for r in result["io"]:
            by.setdefault((r["disk_io"], r["threads"]), []).append(r["mib_per_s"])
        result["io_median_mib_per_s"] = {
            f"{m} x{t}": statistics.median(v) for (m, t), v in sorted(by.items())
        }
    if args.pairs == 0:  # the read comparison only
        return _write(result, args)
    print("warm-up run (compiles the kernels; not counted)", flush=True)
    generate_run(args.model, args.ram, 4, True, args.disk_io, args.readers)
    runs = []
    for i in range(2 * args.pairs):
        prefetch = i % 2 == 0
        row = generate_run(
            args.model, args.ram, args.n, prefetch, args.disk_io, args.readers, args.min_precision
        )
        d = row["decode"]
        print(
            f"prefetch {'on ' if prefetch else 'off'} {d['tokens_per_second']:.2f} tok/s, "
            f"stall {d['stall_seconds']:.3f} s, disk {d['disk_mib_per_token']:.1f} MiB/token, "
            f"prefetched {d['prefetch_mib']:.0f} MiB, recall {d['predictor_recall']}, "
            f"precision {d['predictor_precision']}, prefetches used {d['prefetch_precision']}, "
            f"load {row['loadavg_before'][0]:.2f}",
            flush=True,
        )
        runs.append(row)
    result["runs"] = runs
    result["greedy_tokens_identical"] = len({tuple(r["tokens_out"]) for r in runs}) == 1
    result["summary"] = summarize(runs)
    print(json.dumps(result["summary"], indent=1))
    return _write(result, args)


def _write(result: dict, args: argparse.Namespace) -> int:
    result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = out / f"disk_stall{tag}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
