"""MoE execution across tiers: GPU expert cache, bounded RAM, disk.

For one layer: the experts its tokens chose are split into GPU-cache hits and misses. Hits are
computed on the GPU tier's device from its slots; misses are made resident in the layer's RAM
slots (a RAM hit, a prefetch already in flight, or a read now) and computed by the CPU kernel in
one call with slot ids in place of expert ids. When a layer's tokens need more experts than its
RAM slots hold (a long prefill), they go in rounds, one kernel call per round. Experts in use
are pinned, so they are never evicted. A policy may promote a miss into the GPU cache.

Once layer L's own reads are queued, the predictor names the experts of the next MoE layer and
the reader threads fetch those that are on disk, behind any read a forward waits for. Layer L+1
cancels its prefetches that are still queued for experts it did not choose; one it chose that
has not arrived is moved up and waited for (a stall), never used half-read.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from localseek.config import ModelConfig
from localseek.errors import LocalseekError
from localseek.offload.cache import make_policy
from localseek.offload.plan import Plan
from localseek.offload.predictor import NextLayerPredictor
from localseek.offload.stats import OffloadStats
from localseek.offload.store import ExpertSource, Readers, SlotPool, expert_bytes
from localseek.quant import linear
from localseek.quant.cpu.kernels import moe_swiglu

Progress = Callable[[int], None]


class TieredExperts:
    """Routed experts placed by a Plan, behind ``experts(layer, x, topk_ids, topk_weights)``.

    Args:
        cfg: the model's config.
        plan: slots per layer per tier and the experts each tier starts with.
        source: reads experts from the checkpoint files.
        device: the GPU tier's torch device (the CPU stands in for it without CUDA).
        policy: the GPU cache's policy, "lru", "lfu" or "static" (RAM uses LRU when static).
        prefetch: run the next-layer predictor and prefetch what it names.
        readers: disk reader threads.
        progress: called with the bytes of each expert read at load.
        exact: float32 activations in the CPU kernel; False lets it quantize them (fast mode).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        plan: Plan,
        source: ExpertSource,
        device: torch.device,
        policy: str = "lru",
        prefetch: bool = True,
        readers: int = 4,
        progress: Progress | None = None,
        exact: bool = True,
    ):
        self.cfg = cfg
        self.exact = exact
        self.plan = plan
        self.source = source
        self.device = device
        self.prefetch = prefetch
        self.stats = OffloadStats()
        self.readers = Readers(source, readers)
        self.predictor: NextLayerPredictor | None = None
        # layer -> (named, (rank, expert) of those neither tier held, for one token)
        self._predicted: dict[int, tuple[list[int], list[tuple[int, int]] | None]] = {}
        self.first_layer = cfg.moe_layers[0] if cfg.moe_layers else -1
        pin = device.type == "cuda"
        ram_policy = "lru" if policy == "static" else policy
        self.gpu: dict[int, SlotPool] = {}
        self.ram: dict[int, SlotPool] = {}
        self._bytes: dict[int, int] = {}
        cpu = torch.device("cpu")
        for lp in plan.layers:
            spec = source.specs[lp.layer]
            self._bytes[lp.layer] = expert_bytes(spec)
            self.gpu[lp.layer] = SlotPool(
                spec, lp.gpu_slots, device, make_policy(policy, lp.gpu_slots)
            )
            self.ram[lp.layer] = SlotPool(
                spec, lp.ram_slots, cpu, make_policy(ram_policy, lp.ram_slots), pin_memory=pin
            )
        self._kernel_views: dict[int, list] = {}
        self._fill(progress or (lambda n: None))

    # --- loading -----------------------------------------------------------------------------

    def _fill(self, advance: Progress) -> None:
        """Read each tier's starting experts (the plan's hottest first)."""
        for lp in self.plan.layers:
            gpu, ram = self.gpu[lp.layer], self.ram[lp.layer]
            for slot, e in enumerate(lp.gpu):
                self._read_into(gpu, lp.layer, e, slot)
                gpu.assign(slot, e)
                advance(self._bytes[lp.layer])
            futures = []
            for slot, e in enumerate(lp.ram):
                futures.append(self.readers.submit(lp.layer, e, ram, slot))
                ram.assign(slot, e)
            for fut in futures:
                fut.result()
                advance(self._bytes[lp.layer])

    def _read_into(self, pool: SlotPool, layer: int, expert: int, slot: int) -> None:
        if pool.device.type == "cpu":
            self.source.read(layer, expert, *pool.host_views(slot))
            return
        out = [np.empty(tuple(d.shape[1:]), dtype=np.uint8) for d in pool.data]
        scales = [np.zeros(tuple(s.shape[1:]), dtype=np.float32) for s in pool.scales]
        self.source.read(layer, expert, out, scales)
        for p in range(3):
            pool.data[p][slot].copy_(torch.from_numpy(out[p]))
            pool.scales[p][slot].copy_(torch.from_numpy(scales[p]))

    def attach_routers(self, routers: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Give the predictor each MoE layer's router (gate, bias); called once the network
        is built."""
        if self.prefetch and len(routers) > 1:
            self.predictor = NextLayerPredictor(self.cfg, routers)

    # --- accounting --------------------------------------------------------------------------

    def ram_nbytes(self) -> int:
        """Bytes of expert weights the RAM tier holds (its slot buffers)."""
        return sum(p.nbytes for p in self.ram.values())

    def gpu_cache_nbytes(self) -> int:
        return sum(p.nbytes for p in self.gpu.values())

    def close(self) -> None:
        self.readers.close()

    # --- one layer ---------------------------------------------------------------------------

    def __call__(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """y (N, hidden) = sum over each token's experts of weight * SwiGLU expert(x)."""
        ids = np.ascontiguousarray(topk_ids.detach().cpu().numpy(), dtype=np.int64)  # (N, K)
        wts = np.ascontiguousarray(topk_weights.detach().float().cpu().numpy())  # (N, K)
        st = self.stats
        if layer == self.first_layer:
            st.tokens += ids.shape[0]
        used = [int(e) for e in np.unique(ids)]
        self._score(layer, ids, used)
        gpu = self.gpu[layer]
        on_gpu = {e: gpu.slot_of[e] for e in used if e in gpu.slot_of}
        misses = [e for e in used if e not in on_gpu]
        st.lookups += len(used)
        st.gpu_hits += len(on_gpu)
        for s in on_gpu.values():
            gpu.pins[s] += 1
            gpu.policy.touch(s)
        y_gpu: list[torch.Tensor] = []

        def meanwhile() -> None:
            # once this layer's reads are queued: the next layer's prefetches go behind them,
            # and the GPU tier's share is computed while they are read
            self._predict_next(layer, x)
            if on_gpu:
                y_gpu.append(self._compute(gpu, x, ids, wts, on_gpu))

        try:
            if misses:
                y_cpu = self._misses(layer, x, ids, wts, misses, meanwhile)
                y = torch.from_numpy(y_cpu).to(device=x.device, dtype=x.dtype)
            else:
                meanwhile()
                y = torch.zeros_like(x)
            if y_gpu:
                y = y + y_gpu[0]
        finally:
            for s in on_gpu.values():
                gpu.pins[s] -= 1
        return y

    def _misses(
        self,
        layer: int,
        x: torch.Tensor,
        ids: np.ndarray,
        wts: np.ndarray,
        misses: list[int],
        meanwhile: Callable[[], None],
    ) -> np.ndarray:
        """The GPU cache's misses, from RAM slots, in as few rounds as the slots allow;
        ``meanwhile`` runs once the first round's reads are queued."""
        ram, gpu = self.ram[layer], self.gpu[layer]
        xs = np.ascontiguousarray(x.detach().float().cpu().numpy())  # (N, hidden), host once
        y = np.zeros(xs.shape, dtype=np.float32)
        remaining = list(misses)
        while remaining:
            batch = self._claim(layer, remaining)
            try:
                if meanwhile is not None:
                    meanwhile()
                    meanwhile = None
                for s in batch.values():
                    fut = ram.loading.get(s)
                    if fut is not None and not ram.ready(s):
                        t0 = time.perf_counter()
                        fut.result()
                        self.stats.stall_seconds += time.perf_counter() - t0
                        ram.ready(s)
                    ram.policy.touch(s)
                y += self._compute(ram, xs, ids, wts, batch)
                if gpu.slots and gpu.policy.admits_misses:
                    self._promote(gpu, ram, batch)
            finally:
                for s in batch.values():
                    ram.pins[s] -= 1
            remaining = [e for e in remaining if e not in batch]
        return y

    def _claim(self, layer: int, remaining: list[int]) -> dict[int, int]:
        """Pin RAM slots for as many of ``remaining`` as fit: those resident (a prefetch still
        queued is moved ahead of the other prefetches), then reads into slots given up."""
        st, ram = self.stats, self.ram[layer]
        batch: dict[int, int] = {}
        try:
            for e in remaining:
                s = ram.resident(e)
                if s is None:
                    continue
                if e in ram.prefetched:
                    ram.prefetched.discard(e)
                    st.prefetch_used += 1
                if ram.ready(s):
                    st.ram_hits += 1
                else:  # a prefetch not yet arrived: it is waited for, never used half-read
                    st.prefetch_late += 1
                    self.readers.hurry(ram.loading[s])
                batch[e] = s
                ram.pins[s] += 1
            for e in remaining:
                if e in batch:
                    continue
                s = ram.take_slot(protect=set(remaining))
                if s is None and not batch:  # every slot is pinned or being filled by a prefetch
                    s = self._reclaim(layer, set(remaining))
                if s is None:
                    break
                ram.assign(s, e, self.readers.submit(layer, e, ram, s))
                ram.pins[s] += 1
                batch[e] = s
                st.disk_loads += 1
                st.disk_bytes += self._bytes[layer]
        except BaseException:
            for s in batch.values():
                ram.pins[s] -= 1
            raise
        if not batch:
            raise LocalseekError(f"layer {layer}: no RAM slot is free for an expert.")
        return batch

    def _reclaim(self, layer: int, protect: set[int]) -> int | None:
        """A slot for a read the forward needs when every slot is pinned or loading: a queued
        prefetch gives its slot up, or the forward waits (a stall) for one to arrive."""
        ram = self.ram[layer]
        for s, fut in list(ram.loading.items()):
            if self._drop_prefetch(layer, s, fut):
                return ram.take_slot(protect)
        for s, fut in list(ram.loading.items()):
            t0 = time.perf_counter()
            fut.result()
            self.stats.stall_seconds += time.perf_counter() - t0
            ram.ready(s)
            got = ram.take_slot(protect)
            if got is not None:
                return got
        return None

    def _drop_prefetch(self, layer: int, slot: int, fut) -> bool:
        """Cancel a prefetch that has not started; its slot is free again."""
        ram = self.ram[layer]
        if not self.readers.cancel(fut):
            return False
        del ram.loading[slot]
        ram.evict(slot)
        ram.evictions -= 1  # it never held the expert
        st, nbytes = self.stats, self._bytes[layer]
        st.prefetch_cancelled += 1
        st.prefetch_loads -= 1
        st.prefetch_bytes -= nbytes
        st.disk_bytes -= nbytes
        return True

    def _promote(
        self, gpu: SlotPool, ram: SlotPool, batch: dict[int, int], protect: set[int] = frozenset()
    ) -> None:
        """Copy experts from their RAM slots into GPU slots the policy gives up."""
        for e, s in batch.items():
            if e in gpu.slot_of:
                continue
            g = gpu.take_slot(protect)
            if g is None:
                return
            # a blocking copy: the RAM slot may be refilled by a reader right after
            for p in range(3):
                gpu.data[p][g].copy_(ram.data[p][s])
                gpu.scales[p][g].copy_(ram.scales[p][s])
            gpu.assign(g, e)
            gpu.policy.touch(g)
            self.stats.promotions += 1

    # --- prediction --------------------------------------------------------------------------

    def _score(self, layer: int, ids: np.ndarray, used: list[int]) -> None:
        """Count how well ``layer``'s experts were predicted, and drop its prefetches that are
        still queued for experts it did not choose (their slots are free again)."""
        pred = self.predictor
        if pred is None:
            return
        named, absent = self._predicted.pop(layer, (None, None))
        if named is not None:
            if absent is not None:
                pred.score(layer, absent, used)
            hit = len(set(used) & set(named))
            counts = self.stats.predictor.setdefault(layer, [0, 0, 0])
            counts[0] += hit
            counts[1] += len(used)
            counts[2] += len(named)
        pred.observe(layer, ids)
        ram, keep = self.ram[layer], set(used)
        for s, fut in list(ram.loading.items()):
            if int(ram.expert[s]) not in keep:
                self._drop_prefetch(layer, s, fut)

    def _predict_next(self, layer: int, x: torch.Tensor) -> None:
        pred = self.predictor
        nxt = None if pred is None else pred.next_layer.get(layer)
        if nxt is not None:
            self.predict(nxt, x)

    def predict(self, layer: int, x: torch.Tensor) -> None:
        """Name the experts MoE ``layer`` will choose from a hidden state that comes before it
        (N, hidden) and start reading those neither tier holds; a no-op without the
        predictor. The engine calls it for the first MoE layer from the dense layer before."""
        if self.predictor is None:
            return
        xs = x.reshape(-1, x.shape[-1])  # (N, hidden)
        named = self.predictor.predict(layer, xs)
        gpu, ram = self.gpu[layer], self.ram[layer]
        absent = [
            (r, e) for r, e in enumerate(named) if e not in gpu.slot_of and e not in ram.slot_of
        ]
        if xs.shape[0] == 1:  # one token: read only ranks where such guesses pay
            read = [e for r, e in absent if self.predictor.worth_reading(layer, r)]
            self._predicted[layer] = (named, absent)
        else:  # several (a prefill): most experts are used, read all named
            read = [e for _, e in absent]
            self._predicted[layer] = (named, None)
        self._prefetch(layer, named, read)

    def _prefetch(self, layer: int, named: list[int], read: list[int] | None = None) -> None:
        """Keep the named experts of ``layer`` from eviction and start reading those of
        ``read`` (default: all named) that neither tier holds."""
        gpu, ram = self.gpu[layer], self.ram[layer]
        keep = set(named)
        gpu.predicted = ram.predicted = keep
        nbytes = self._bytes[layer]
        for e in named if read is None else read:
            if e in gpu.slot_of or e in ram.slot_of:
                continue
            s = ram.take_slot(protect=keep)
            if s is None:
                break
            ram.assign(s, e, self.readers.submit(layer, e, ram, s, urgent=False))
            ram.prefetched.add(e)
            self.stats.prefetch_loads += 1
            self.stats.prefetch_bytes += nbytes
            self.stats.disk_bytes += nbytes
        if not (gpu.slots and gpu.policy.admits_misses):
            return
        # RAM -> GPU ahead of need: the best named experts already in RAM
        for e in named[: self.cfg.num_experts_per_tok]:
            s = ram.slot_of.get(e)
            if e in gpu.slot_of or s is None or not ram.ready(s):
                continue
            self._promote(gpu, ram, {e: s}, protect=keep)
            self.stats.gpu_prefetches += 1

    # --- compute -----------------------------------------------------------------------------

    def _compute(
        self,
        pool: SlotPool,
        x: torch.Tensor | np.ndarray,
        ids: np.ndarray,
        wts: np.ndarray,
        slots: dict[int, int],
    ) -> torch.Tensor | np.ndarray:
        """Sum of weight * expert(x) over the assignments whose expert is in ``slots``."""
        lut = np.full(self.cfg.n_routed_experts, -1, dtype=np.int64)
        for e, s in slots.items():
            lut[e] = s
        slot_ids = lut[ids]  # (N, K)
        sel = slot_ids >= 0
        kernel = pool.device.type == "cpu" and all(p.kernel_format is not None for p in pool.spec)
        if kernel:
            xs = (
                x if isinstance(x, np.ndarray) else np.ascontiguousarray(x.detach().float().numpy())
            )
            views = self._views(pool)
            if sel.all():
                y = moe_swiglu(xs, slot_ids, wts, views[0], views[2], views[1], exact=self.exact)
            else:  # one row per chosen (token, expert) pair, summed back per token
                tok, k = np.nonzero(sel)
                part = moe_swiglu(
                    np.ascontiguousarray(xs[tok]),
                    np.ascontiguousarray(slot_ids[tok, k][:, None]),
                    np.ascontiguousarray(wts[tok, k][:, None]),
                    views[0],
                    views[2],
                    views[1],
                    exact=self.exact,
                )
                y = np.zeros_like(xs)
                np.add.at(y, tok, part)
            return y if isinstance(x, np.ndarray) else torch.from_numpy(y).to(x.dtype)
        return self._reference(pool, x, slot_ids, wts)

    def _reference(
        self, pool: SlotPool, x: torch.Tensor | np.ndarray, slot_ids: np.ndarray, wts: np.ndarray
    ) -> torch.Tensor | np.ndarray:
        """Expert by expert with ``linear()`` on the slot bytes: formats the CPU kernel does
        not run, and the GPU tier on a GPU."""
        host = isinstance(x, np.ndarray)
        xt = torch.from_numpy(x) if host else x  # (N, hidden)
        y = torch.zeros_like(xt)
        w = torch.from_numpy(wts).to(xt.device)
        for s in np.unique(slot_ids[slot_ids >= 0]).tolist():
            token, k = np.nonzero(slot_ids == s)
            w1, w2, w3 = (
                _as(spec.weight(pool.data[p][s], pool.scales[p][s]), xt.dtype)
                for p, spec in enumerate(pool.spec)
            )
            xe = xt[torch.from_numpy(token).to(xt.device)]
            out = linear(F.silu(linear(xe, w1)) * linear(xe, w3), w2)
            rows = torch.from_numpy(token).to(xt.device)
            y.index_add_(
                0, rows, out * w[rows, torch.from_numpy(k).to(xt.device), None].to(out.dtype)
            )
        return y.numpy() if host else y

    def _views(self, pool: SlotPool) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Kernel inputs of a host pool: (format, read-only bytes, scales) per projection.
        Read-only like a mapped GGUF stack, so the kernel compiles once."""
        key = id(pool)
        got = self._kernel_views.get(key)
        if got is None:
            got = []
            for p, spec in enumerate(pool.spec):
                data = pool.data[p].numpy().view()
                data.flags.writeable = False
                got.append((spec.kernel_format, data, pool.scales[p].numpy()))
            self._kernel_views[key] = got
        return got


def _as(w, dtype: torch.dtype):
    """Dense weights in the activations' dtype; quantized ones as they are."""
    return w.to(dtype) if isinstance(w, torch.Tensor) else w
