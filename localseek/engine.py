"""Builds the model from a checkpoint and runs it: full forward, prefill, decode, generate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from localseek import hugepages
from localseek.checkpoint import Checkpoint, expected_shapes, open_checkpoint
from localseek.checkpoint.base import optional_shapes
from localseek.config import ModelConfig
from localseek.errors import LocalseekError
from localseek.model.kv_cache import KVCache
from localseek.model.moe import ReferenceExperts
from localseek.model.transformer import Transformer
from localseek.offload import CPUExperts, expert_executor
from localseek.offload.plan import ExpertUsage, Plan, format_size, make_plan, scratch_bytes
from localseek.offload.stats import OffloadStats
from localseek.offload.store import ExpertSource, expert_bytes
from localseek.offload.tiered import TieredExperts
from localseek.options import DEFAULT_CTX, RuntimeOptions, set_threads
from localseek.quant import QTensor, Weight
from localseek.quant.linear import from_blocks
from localseek.sampling import Sampler, SamplingParams
from localseek.session import Session
from localseek.tokenizer import Tokenizer

_EXPERT = "ffn.experts."


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    threads: int | None = None,
    exact: bool = False,
    **options,
) -> Model:
    """Load a DeepSeek-V2/V3 model.

    Args:
        path: a Hugging Face checkpoint folder or a GGUF file.
        device: torch device of the GPU tier ("cpu" or "cuda").
        dtype: activation and dense-weight dtype; None means float32 on CPU, bfloat16 on CUDA.
        threads: CPU threads for torch and numba (None leaves the defaults).
        exact: float32 activations on exactly dequantised weights (the conformance mode).
        **options: ctx (context length in tokens), progress (show a loading bar); offload:
            gpu_mem and ram (budgets, bytes or "24GiB"), stats (a `localseek profile` file),
            policy ("lru", "lfu", "static"), prefetch (bool), readers (disk reader threads),
            disk_io ("auto": O_DIRECT for files larger than RAM, else "plain"; "uncached":
            plain, dropped from the page cache after reading; "direct").
    Returns:
        A ready Model.
    """
    opts = RuntimeOptions.resolve(device, dtype, threads, exact, **options)
    set_threads(opts.threads)
    checkpoint = open_checkpoint(path)
    try:
        model = Model(checkpoint, opts)
    except BaseException:
        checkpoint.close()
        raise
    if not model.holds_checkpoint:  # the disk tier may read experts through it
        checkpoint.close()
    return model


def plan_placement(
    ckpt: Checkpoint,
    gpu_mem: int | None,
    ram: int | None,
    ctx: int,
    dtype: torch.dtype = torch.float32,
    stats: str | Path | None = None,
    disk_io: str = "auto",
    device: torch.device | str = "cpu",
) -> tuple[Plan, ExpertSource]:
    """The placement of ``ckpt`` under the budgets (see ``offload.plan.make_plan``), and the
    expert source it was sized from (the caller closes it).

    Raises:
        LocalseekError: a budget cannot hold what it must, in one sentence.
    """
    cfg = ckpt.config
    fixed = {n: s for n, s in expected_shapes(cfg).items() if _EXPERT not in n}
    fixed.update(_split_wkv_b(ckpt, torch.device(device)))
    source = ExpertSource(ckpt, cfg.moe_layers, dtype, disk_io)
    try:
        sizes = {n: _kept_nbytes(ckpt, n, s, dtype) for n, s in fixed.items()}
        for layer, spec in source.specs.items():  # an expert's bytes as its slots hold them
            sizes[f"layers.{layer}.{_EXPERT}0.w1"] = expert_bytes(spec)
        usage = ExpertUsage.load(stats, cfg) if stats else None
        itemsize = torch.empty((), dtype=dtype).element_size()
        kv = cfg.variant.cache_bytes_per_token(cfg, dtype) * ctx
        scratch = scratch_bytes(cfg, ctx, itemsize)
        plan = make_plan(cfg, sizes, gpu_mem, ram, ctx, kv, scratch, usage, str(ckpt.path))
    except BaseException:
        source.close()
        raise
    return plan, source


def _split_wkv_b(ckpt: Checkpoint, device: torch.device) -> dict[str, tuple[int, ...]]:
    """The per-head split of wkv_b the file stores (``optional_shapes``), where it is used: on
    the CPU, whose kernels multiply it from its blocks, and only in a format they run and with
    the shapes the config implies (else the decode reads the dense wkv_b, as before)."""
    if device.type != "cpu":
        return {}
    have = set(ckpt.names())
    split = {n: s for n, s in optional_shapes(ckpt.config).items() if n in have}
    # ckpt.tensor without a dtype is a view of the file's bytes: cheap to look at
    usable = all(
        tuple(ckpt.shape(n)) == s and from_blocks(ckpt.tensor(n)) for n, s in split.items()
    )
    return split if usable else {}


def _kept_nbytes(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a tensor occupies once loaded: quantized weights stay as stored, the rest is dense."""
    numel = int(np.prod(shape))
    stored = ckpt.nbytes(name)
    if name != "embed" and stored < 2 * numel:  # under 16 bits a weight: kept quantized
        return stored
    return numel * torch.empty((), dtype=dtype).element_size()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    # prompt tokens whose keys came from a session's cache: not computed again
    reused_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # the tiered expert store's figures for this generation (all zero without offload)
    offload: OffloadStats = field(default_factory=OffloadStats)

    @property
    def expert_cache_hit_rate(self) -> float | None:
        """Share of expert uses the GPU expert cache served; None without offload."""
        return self.offload.expert_cache_hit_rate

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens the prefill computed (the rest came from the cache)."""
        return self.prompt_tokens - self.reused_tokens

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes from prefill; the rest are decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


class Model:
    """A loaded model: ``config``, ``tokenizer``, ``logits()`` and ``generate()``."""

    def __init__(self, checkpoint: Checkpoint, options: RuntimeOptions):
        self.options = options
        self.config: ModelConfig = checkpoint.config
        self.path = checkpoint.path
        cfg = self.config
        checkpoint.check_complete()
        self.ctx = options.ctx or min(cfg.max_position_embeddings, DEFAULT_CTX)
        if self.ctx > cfg.max_position_embeddings:
            raise LocalseekError(
                f"ctx {self.ctx} exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings})."
            )
        self.tokenizer: Tokenizer | None = checkpoint.tokenizer()
        self.plan: Plan | None = None
        self.holds_checkpoint = False
        if options.offload:
            if not cfg.variant.offload:
                raise LocalseekError(
                    f"{checkpoint.path}: offload (--gpu-mem / --ram) does not run "
                    f"{cfg.model_type} models yet; load it without them."
                )
            self._load_tiered(checkpoint)
            return
        weights = self._load_weights(checkpoint)
        experts: dict[int, list[tuple[Weight, Weight, Weight]]] = {}
        for layer in cfg.moe_layers:
            p = f"layers.{layer}.{_EXPERT}"
            experts[layer] = [
                (weights.pop(f"{p}{e}.w1"), weights.pop(f"{p}{e}.w2"), weights.pop(f"{p}{e}.w3"))
                for e in range(cfg.n_routed_experts)
            ]
        # quantized experts on the CPU run in the numba kernels; dense ones stay on the reference
        if cfg.variant.experts is None:
            self.experts = expert_executor(experts, exact=options.exact)
        else:
            self.experts = cfg.variant.experts(cfg, experts, options.exact)
        self.net = cfg.variant.network(
            cfg, weights, self.experts, self.ctx, options.device, options.exact
        )
        self.net.eval()

    def _load_tiered(self, ckpt: Checkpoint) -> None:
        """Fixed weights on the GPU tier, routed experts in the tiered store, per the plan."""
        cfg, opts = self.config, self.options
        shapes = expected_shapes(cfg)
        fixed = {n: s for n, s in shapes.items() if _EXPERT not in n}
        plan, source = plan_placement(
            ckpt,
            opts.gpu_mem,
            opts.ram,
            self.ctx,
            opts.dtype,
            opts.stats,
            opts.disk_io,
            opts.device,
        )
        try:
            host = plan.ram_bytes
            if opts.device.type == "cpu":
                host += plan.fixed_bytes + plan.gpu_cache_bytes
            available = psutil.virtual_memory().available
            if host > available:
                raise LocalseekError(
                    f"{ckpt.path}: the plan needs {format_size(host)} of RAM "
                    f"but only {format_size(available)} is available."
                )
            self.plan = plan
            weights = self._load_weights(ckpt, fixed, check=False)
            self.holds_checkpoint = source.needs_checkpoint
            with _progress(
                opts.progress, plan.gpu_cache_bytes + plan.ram_bytes, "loading experts"
            ) as advance:
                self.experts = TieredExperts(
                    cfg,
                    plan,
                    source,
                    opts.device,
                    opts.policy,
                    opts.prefetch,
                    opts.readers,
                    advance,
                    exact=opts.exact,
                )
        except BaseException:
            source.close()
            raise
        self.net = Transformer(cfg, weights, self.experts, self.ctx, opts.device, opts.exact)
        self.net.eval()
        routers = {}
        for layer in cfg.moe_layers:
            moe = self.net.layers[layer].ffn
            routers[layer] = (moe.gate, moe.bias)
        self.experts.attach_routers(routers)
        first = cfg.moe_layers[0] if cfg.moe_layers else 0
        if first > 0:  # the first MoE layer's experts, predicted from the dense layer before it
            experts = self.experts
            self.net.layers[first - 1].ffn.register_forward_pre_hook(
                lambda _module, args: experts.predict(first, args[0])
            )

    @property
    def offload_stats(self) -> OffloadStats | None:
        """The tiered store's counters since load (None without offload)."""
        return self.experts.stats if isinstance(self.experts, TieredExperts) else None

    def close(self) -> None:
        """Stop the disk readers and close the files the expert store reads."""
        if isinstance(self.experts, TieredExperts):
            self.experts.close()

    def _load_weights(
        self, ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]] | None = None, check: bool = True
    ) -> dict[str, Weight]:
        opts = self.options
        shapes = expected_shapes(self.config) if shapes is None else shapes
        shapes = {**shapes, **_split_wkv_b(ckpt, opts.device)}
        need = sum(_kept_nbytes(ckpt, n, s, opts.dtype) for n, s in shapes.items())
        need += self.config.variant.cache_bytes_per_token(self.config, opts.dtype) * self.ctx
        available = psutil.virtual_memory().available
        if check and opts.device.type == "cpu" and need > available:
            raise LocalseekError(
                f"{ckpt.path}: the model needs {need / 2**30:.2f} GiB of RAM "
                f"but only {available / 2**30:.2f} GiB is available."
            )
        weights: dict[str, Weight] = {}
        total = sum(ckpt.nbytes(n) for n in shapes)
        with _progress(opts.progress, total, f"loading {ckpt.path.name}") as advance:
            for name in shapes:
                weights[name] = self._place(name, ckpt.tensor(name, opts.dtype))
                advance(ckpt.nbytes(name))
        if opts.device.type == "cpu" and hugepages.available():
            # decode reads these bytes every token: 2 MiB pages, not the file's 4 KiB ones
            spans = hugepages.file_backed(weights)
            nbytes = hugepages.copy_nbytes(spans)
            with _progress(opts.progress, nbytes, "reading weights into memory") as advance:
                weights = hugepages.into_huge_pages(weights, spans, advance)
        return weights

    def _place(self, name: str, t: Weight) -> Weight:
        opts = self.options
        if isinstance(t, QTensor):
            if name == "embed":  # gathered by row, never multiplied: keep it dense
                return t.dequantize(opts.dtype).to(opts.device)
            return t.to(opts.device)
        if not t.is_floating_point():  # tables (V4's tid2eid)
            return t.to(opts.device)
        return t.to(device=opts.device, dtype=opts.dtype)

    # --- running -----------------------------------------------------------------------------

    def _check_ids(self, token_ids: list[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise LocalseekError("the prompt is empty: give at least one token.")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise LocalseekError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})."
            )
        if len(ids) > self.ctx:
            raise LocalseekError(
                f"the prompt has {len(ids)} tokens but the context holds "
                f"{self.ctx} (raise --ctx, up to "
                f"{self.config.max_position_embeddings})."
            )
        return ids

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return self.config.variant.cache(
            self.config, batch, max_len or self.ctx, self.options.device, self.options.dtype
        )

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start: int,
        cache: KVCache,
        last_only: bool = False,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) float32 for tokens (B, T) at positions start.. into ``cache``."""
        return self.net(tokens.to(self.options.device), start, cache, last_only, absorb)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """One full forward of one sequence, no cache kept: float32 (T, vocab)."""
        ids = self._check_ids(token_ids)
        cache = self.new_cache(max_len=len(ids))
        out = self.forward(torch.tensor([ids]), 0, cache)
        return out[0].cpu().numpy()

    def generate(
        self,
        token_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        session: Session | None = None,
    ) -> Generation:
        """Token ids as they are produced (an iterator; its ``stats`` time prefill and decode).

        session: keep the KV cache there and reuse what it holds for the prompt's longest
            common prefix (see ``localseek.session``); None: a cache for this generation only.
        """
        ids = self._check_ids(token_ids)
        if max_new_tokens < 0:
            raise LocalseekError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        return Generation(self, ids, max_new_tokens, sampler, session)

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.config.eos_token_id} if self.config.eos_token_id is not None else set()
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    def weights_nbytes(self) -> int:
        """Bytes of weights held (dense plus quantized)."""
        seen: set[int] = set()
        total = 0
        if isinstance(self.experts, TieredExperts):
            total += self.experts.ram_nbytes() + self.experts.gpu_cache_nbytes()
        for w in _all_weights(self.net, self.experts):
            key = id(w)
            if key not in seen:
                seen.add(key)
                total += w.nbytes if isinstance(w, QTensor) else w.numel() * w.element_size()
        return total


def _all_weights(
    net: Transformer, experts: ReferenceExperts | CPUExperts | TieredExperts
) -> Iterator[Weight]:
    for module in net.modules():
        for v in vars(module).values():
            if isinstance(v, (torch.Tensor, QTensor)):
                yield v
    if isinstance(experts, TieredExperts):
        return
    for layer in experts.weights.values():
        for triple in layer:
            yield from triple


class Generation(Iterator[int]):
    """Prefill on the first ``next()``, then one decode step per token; stops at EOS (not
    yielded), at ``max_new_tokens`` or when the context is full. The cache is the session's
    when one is given (it keeps the prompt and the tokens fed back), else its own."""

    def __init__(
        self,
        model: Model,
        prompt: list[int],
        max_new_tokens: int,
        sampler: Sampler,
        session: Session | None = None,
    ):
        self.model = model
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.tokens: list[int] = []
        self._session = session
        self._started = False
        self._done = max_new_tokens == 0
        self.stop_reason = "length" if self._done else ""
        self._offload0 = None if model.offload_stats is None else model.offload_stats.snapshot()

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        m = self.model
        t0 = time.perf_counter()
        if self._session is None:
            self._session = Session(m)
        if not self._started:
            logits, self.stats.reused_tokens = self._session.prefill(self.prompt, self)
            self._started = True
        else:
            logits = self._session.decode(self.tokens[-1], self)
        token = self.sampler(logits)
        elapsed = time.perf_counter() - t0
        if self._offload0 is not None:
            self.stats.offload = m.offload_stats - self._offload0
        if self.tokens:
            self.stats.decode_seconds += elapsed
        else:
            self.stats.prefill_seconds += elapsed
        if token in m.eos_ids:
            self._finish("eos")
            raise StopIteration
        self.tokens.append(token)
        self.stats.generated_tokens += 1
        if len(self.tokens) >= self.max_new_tokens:
            self._finish("length")
        elif len(self._session.tokens) >= m.ctx:
            self._finish("context")
        return token

    def _finish(self, reason: str) -> None:
        self._done = True
        self.stop_reason = reason
        self._session = None  # a session of its own is freed; a caller's keeps the cache


class _progress:
    """A rich progress bar over bytes when enabled; a no-op otherwise."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()
