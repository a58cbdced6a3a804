"""Tokens-per-second benchmarks in llama-bench's conventions, as plain data.

A test is ``pp<P>`` (one prefill of P tokens on a fresh cache) or ``tg<N>`` (N single-token decode
steps after a one-token prompt; only the decode steps are timed). Token ids are fixed random ids
from the vocabulary, so tokenization is never timed and both engines see the same input. Each
engine gets one warm-up run per test that is not counted; with several engines the repeats
alternate between them, so a change in the machine's state (heat, other load) hits all alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil
import torch

from localseek.errors import LocalseekError


@dataclass(frozen=True)
class BenchTest:
    """One test: ``kind`` "pp" (prompt processing) or "tg" (text generation) of ``tokens``."""

    kind: str
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.tokens}"


def select_tests(n_prompt: int, n_gen: int) -> list[BenchTest]:
    """The tests of ``-p n_prompt -n n_gen``; a zero skips that test."""
    if n_prompt < 0 or n_gen < 0:
        raise LocalseekError(f"-p and -n must be >= 0, got -p {n_prompt} -n {n_gen}.")
    tests = [BenchTest("pp", n_prompt)] if n_prompt else []
    tests += [BenchTest("tg", n_gen)] if n_gen else []
    if not tests:
        raise LocalseekError("-p 0 and -n 0 leave no test to run.")
    return tests


def context_needed(tests: Sequence[BenchTest]) -> int:
    """Context length (tokens) that every test fits in: P for ppP, N + 1 for tgN."""
    return max(t.tokens + (1 if t.kind == "tg" else 0) for t in tests)


def random_tokens(vocab_size: int, n: int, seed: int) -> list[int]:
    """``n`` fixed pseudo-random token ids in [0, vocab_size)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, vocab_size, size=n)]


class Engine(Protocol):
    """What a benchmarked engine offers: seconds for one prefill and for decode steps."""

    name: str

    def prefill_seconds(self, tokens: list[int]) -> float:
        """Time one forward of ``tokens`` on an empty cache."""
        ...

    def decode_seconds(self, first: int, tokens: list[int]) -> float:
        """Prefill ``first`` untimed, then time one decode step per id in ``tokens``."""
        ...

    def close(self) -> None: ...


class LocalseekEngine:
    """localseek's Model driven through ``Model.forward`` on a fresh cache per run."""

    name = "localseek"

    def __init__(self, model: Any) -> None:
        self.model = model
        self._cuda = model.options.device.type == "cuda"

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def prefill_seconds(self, tokens: list[int]) -> float:
        cache = self.model.new_cache(max_len=len(tokens))
        batch = torch.tensor([tokens])  # (1, P)
        self._sync()
        t0 = time.perf_counter()
        self.model.forward(batch, 0, cache, last_only=True)
        self._sync()
        return time.perf_counter() - t0

    def decode_seconds(self, first: int, tokens: list[int]) -> float:
        m = self.model
        cache = m.new_cache(max_len=len(tokens) + 1)
        m.forward(torch.tensor([[first]]), 0, cache)
        steps = [torch.tensor([[t]]) for t in tokens]  # (1, 1) each
        self._sync()
        t0 = time.perf_counter()
        for pos, step in enumerate(steps, start=1):
            m.forward(step, pos, cache)
        self._sync()
        return time.perf_counter() - t0

    def close(self) -> None:
        pass


def llama_cpp_model(path: str | Path, repack: bool = True, **kw):
    """``llama_cpp.Llama(path, **kw)``; ``repack=False`` is llama.cpp's ``--no-repack`` (no CPU
    extra buffer types: no online weight repacking, no AMX). On AVX-512 / AMX builds of
    llama-cpp-python 0.3.36 the repacked Q8_0 tensors of deepseek2 files abort the process
    (GGML_ASSERT(*cur_backend_id != -1) at load) or crash in the first batch."""
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = repack
        return p

    capi.llama_model_default_params = params  # Llama() takes no argument for it
    try:
        return llama_cpp.Llama(str(path), **kw)
    finally:
        capi.llama_model_default_params = default


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python on the same GGUF, CPU only, with the same threads;
    ``repack``: its CPU weight repacking (on by default in llama.cpp, as users run it)."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, threads: int, n_ctx: int, repack: bool = True) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise LocalseekError(
                "--vs llama.cpp needs llama-cpp-python (pip install 'localseek[peer]')."
            ) from e
        try:
            self.llm = llama_cpp_model(
                path,
                repack,
                n_ctx=n_ctx,
                n_batch=2048,  # llama-bench's defaults
                n_ubatch=512,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise LocalseekError(f"{path}: llama.cpp could not load this file ({e}).") from e

    def prefill_seconds(self, tokens: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - t0

    def decode_seconds(self, first: int, tokens: list[int]) -> float:
        self.llm.reset()
        self.llm.eval([first])
        t0 = time.perf_counter()
        for t in tokens:
            self.llm.eval([t])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()


@dataclass
class BenchResult:
    """Tokens per second of one engine on one test, one sample per counted repeat."""

    engine: str
    test: BenchTest
    samples: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0

    @property
    def stddev(self) -> float:
        # sample standard deviation, as llama-bench reports it
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0


def run_tests(
    engines: Sequence[Engine],
    tests: Sequence[BenchTest],
    repeats: int,
    vocab_size: int,
    seed: int = 1234,
    on_run: Callable[[str, BenchTest, int], None] | None = None,
) -> list[BenchResult]:
    """Run every test on every engine: one warm-up each, then ``repeats`` counted runs that
    alternate between the engines. ``on_run(engine, test, repeat)`` is called before each run
    (repeat -1 is the warm-up). Returns one result per (test, engine), tests in order."""
    if repeats < 1:
        raise LocalseekError(f"-r must be at least 1, got {repeats}.")
    results: list[BenchResult] = []
    for i, test in enumerate(tests):
        ids = random_tokens(vocab_size, test.tokens + 1, seed + i)
        rows = [BenchResult(e.name, test) for e in engines]
        for repeat in range(-1, repeats):
            for engine, row in zip(engines, rows, strict=True):
                if on_run is not None:
                    on_run(engine.name, test, repeat)
                if test.kind == "pp":
                    seconds = engine.prefill_seconds(ids[: test.tokens])
                else:
                    seconds = engine.decode_seconds(ids[0], ids[1:])
                if repeat >= 0:
                    tps = test.tokens / seconds if seconds > 0 else float("inf")
                    row.samples.append(tps)
        results.extend(rows)
    return results


# The CPU features that pick a kernel path (a figure from a VNNI machine says little about AVX2).
KERNEL_FEATURES = {
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
}


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and kernel-relevant features, cores, RAM and (when torch sees one)
    the GPU."""
    cpu = platform.processor() or platform.machine()
    features: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    features = sorted(set(value.split()) & KERNEL_FEATURES)
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_features": features,
        "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rows_for_json(
    results: Sequence[BenchResult],
    model: str,
    threads: int,
    bytes_per_token: int | None,
    command: str,
) -> list[dict[str, Any]]:
    """One JSON-ready row per result, with the machine, date and command line.

    ``effective_gb_per_s`` (bytes of weights read per token x tokens/s) is given for tg tests
    only: a prefill reads the weights once per batch, not once per token.
    """
    machine = machine_info()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for r in results:
        gbps = None
        if bytes_per_token is not None and r.test.kind == "tg":
            gbps = bytes_per_token * r.mean / 1e9
        rows.append(
            {
                "engine": r.engine,
                "test": r.test.name,
                "n_prompt": r.test.tokens if r.test.kind == "pp" else 0,
                "n_gen": r.test.tokens if r.test.kind == "tg" else 0,
                "tokens_per_second": r.mean,
                "stddev": r.stddev,
                "samples": list(r.samples),
                "repeats": len(r.samples),
                "model": model,
                "threads": threads,
                "bytes_per_token": bytes_per_token,
                "effective_gb_per_s": gbps,
                "machine": machine,
                "date": date,
                "command": command,
            }
        )
    return rows


def ratios(results: Sequence[BenchResult], engine: str, peer: str) -> dict[str, float]:
    """``engine``'s mean tokens/s over ``peer``'s, per test name."""
    by = {(r.engine, r.test.name): r.mean for r in results}
    out = {}
    for (name, test), mean in by.items():
        if name == engine and (peer, test) in by and by[(peer, test)] > 0:
            out[test] = mean / by[(peer, test)]
    return out
