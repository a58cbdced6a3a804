"""The expert store: where one routed expert's bytes come from (disk) and fixed slots that
hold experts in a tier (RAM or the GPU device).

An expert is three projections (w1 gate, w2 down, w3 up), each kept as its stored bytes
(rows, row_bytes) plus FP8 block scales where the format has them. A tier holds one layer's
experts in preallocated (slots, rows, row_bytes) arrays, so the CPU kernel runs on a RAM pool
exactly as on a whole GGUF stack, with slot ids in place of expert ids.
"""

from __future__ import annotations

import heapq
import itertools
import mmap
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from localseek import hugepages
from localseek.checkpoint import Checkpoint
from localseek.errors import LocalseekError
from localseek.offload.cache import CachePolicy, LFUDecay
from localseek.quant import QTensor, Weight
from localseek.quant.cpu.kernels import KERNEL_FORMATS, block_size, raw_bytes
from localseek.quant.fp8 import FP8_QTYPE

PROJECTIONS = ("w1", "w2", "w3")
# how the disk tier reads: plain preadv (the OS page cache keeps what was read), plain preadv
# then POSIX_FADV_DONTNEED on the range (nothing stays cached: the disk is read each time, as
# for a model larger than RAM), O_DIRECT through aligned bounce buffers, or auto: O_DIRECT when
# the files are larger than RAM (the page cache cannot hold them, and from the disk O_DIRECT
# measured faster than plain reads here: benchmarks/results/disk_stall-io-2026-12-02.json),
# plain otherwise (a plain read of cached pages is a memory copy) or where O_DIRECT is refused
DISK_IO = ("auto", "plain", "uncached", "direct")
_ALIGN = 4096  # O_DIRECT offset, length and buffer alignment
_DENSE = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@dataclass(frozen=True)
class ProjectionSpec:
    """How one projection of every expert of a layer is stored."""

    kind: str  # a QTensor format tag, or "torch.float32" etc. for dense weights
    shape: tuple[int, int]  # logical (out, in)
    row_bytes: int
    scale_shape: tuple[int, int]  # FP8 block scales per expert; (1, 1) placeholder otherwise

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    @property
    def has_scale(self) -> bool:
        return self.kind == FP8_QTYPE

    @property
    def kernel_format(self) -> int | None:
        """The CPU kernel's format code, or None when the kernel cannot run it."""
        fmt = KERNEL_FORMATS.get(self.kind)
        if fmt is None or self.shape[1] % block_size(fmt):
            return None
        return fmt

    def weight(self, data: torch.Tensor, scale: torch.Tensor) -> Weight:
        """The expert's weight over its slot bytes (rows, row_bytes), no copy."""
        if self.kind in _DENSE:
            return data.view(_DENSE[self.kind]).view(self.shape)
        if self.has_scale:
            return QTensor(self.kind, self.shape, data.view(torch.float8_e4m3fn), scale)
        return QTensor(self.kind, self.shape, data)

    @classmethod
    def of(cls, w: Weight) -> ProjectionSpec:
        if isinstance(w, QTensor):
            raw = raw_bytes(w.data)
            scale = (1, 1) if w.scale is None else tuple(w.scale.shape)
            return cls(w.qtype, tuple(w.shape), raw.shape[-1], scale)  # type: ignore[arg-type]
        rows, cols = w.shape
        return cls(str(w.dtype), (rows, cols), cols * w.element_size(), (1, 1))


LayerSpec = tuple[ProjectionSpec, ProjectionSpec, ProjectionSpec]  # w1, w2, w3


def expert_bytes(spec: LayerSpec) -> int:
    """Bytes one expert occupies in a slot (weights, and scales or their 4-byte placeholder)."""
    scales = sum(4 * p.scale_shape[0] * p.scale_shape[1] for p in spec)
    return sum(p.nbytes for p in spec) + scales


class ExpertSource:
    """Reads one expert's bytes from the checkpoint files.

    GGUF files keep each layer's experts as one stack at a known offset: expert ``e`` of a
    projection is ``nbytes`` at ``offset + e * nbytes``, read with ``os.preadv`` straight into
    the slot. Other checkpoints are read through the checkpoint (a safetensors read), which
    then stays open for the model's lifetime.
    """

    def __init__(
        self, ckpt: Checkpoint, layers: list[int], dtype: torch.dtype, disk_io: str = "auto"
    ):
        if disk_io not in DISK_IO:
            raise LocalseekError(f"disk_io {disk_io!r} is not one of {', '.join(DISK_IO)}.")
        self.ckpt = ckpt
        self.dtype = dtype
        self.disk_io = disk_io
        self._bounce = threading.local()  # per reader thread: an aligned buffer for O_DIRECT
        self.specs: dict[int, LayerSpec] = {}
        self._ranges: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, proj) -> fd, offset
        self._fds: dict[Path, int] = {}
        where: dict[tuple[int, int], tuple[Path, int]] = {}
        file_range = getattr(ckpt, "expert_file_range", None)
        for layer in layers:
            specs = []
            for p, proj in enumerate(PROJECTIONS):
                name = f"layers.{layer}.ffn.experts.0.{proj}"
                w = ckpt.tensor(name, None)
                got = file_range(name) if file_range is not None else None
                if got is not None and not (isinstance(w, QTensor) and w.scale is not None):
                    path, offset, nbytes = got
                    spec = ProjectionSpec.of(w)
                    if nbytes != spec.nbytes:
                        raise LocalseekError(f"{path}: expert {name} is not {spec.nbytes} bytes.")
                    where[(layer, p)] = (Path(path), offset)
                else:  # read through the checkpoint, converted as the dense weights are
                    w = ckpt.tensor(name, dtype)
                    spec = ProjectionSpec.of(w)
                specs.append(spec)
            self.specs[layer] = tuple(specs)  # type: ignore[assignment]
        paths = sorted({path for path, _ in where.values()})
        if disk_io == "auto":
            larger = sum(os.path.getsize(p) for p in paths) > _ram_bytes()
            self.disk_io = "direct" if larger and all(_direct_ok(p) for p in paths) else "plain"
        for key, (path, offset) in where.items():
            if path not in self._fds:
                self._fds[path] = self._open(path)
            self._ranges[key] = (self._fds[path], offset)

    @property
    def needs_checkpoint(self) -> bool:
        n_proj = sum(1 for _ in self.specs) * len(PROJECTIONS)
        return len(self._ranges) < n_proj

    def read(self, layer: int, expert: int, out: list[np.ndarray], scales: list[np.ndarray]) -> int:
        """Fill ``out`` (w1, w2, w3 as uint8 (rows, row_bytes)) and FP8 ``scales``; returns
        the bytes read."""
        total = 0
        for p, proj in enumerate(PROJECTIONS):
            spec = self.specs[layer][p]
            dst = out[p].reshape(-1)
            where = self._ranges.get((layer, p))
            if where is not None:
                fd, base = where
                offset = base + expert * spec.nbytes
                if self.disk_io == "direct":
                    self._read_direct(fd, offset, dst, layer, expert)
                else:
                    _read_fully(fd, offset, memoryview(dst), self._truncated(layer, expert))
                    if self.disk_io == "uncached":
                        os.posix_fadvise(fd, offset, spec.nbytes, os.POSIX_FADV_DONTNEED)
            else:
                w = self.ckpt.tensor(f"layers.{layer}.ffn.experts.{expert}.{proj}", self.dtype)
                if isinstance(w, QTensor):
                    dst[:] = raw_bytes(w.data).reshape(-1)
                    if w.scale is not None:
                        scales[p][...] = w.scale.float().numpy()
                else:
                    dst[:] = w.contiguous().view(torch.uint8).reshape(-1).numpy()
            total += spec.nbytes
        return total

    def _open(self, path: Path) -> int:
        if self.disk_io != "direct":
            return os.open(path, os.O_RDONLY)
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            raise LocalseekError(
                f"{path}: cannot be opened for O_DIRECT reads ({e.strerror})."
            ) from None

    def _truncated(self, layer: int, expert: int) -> str:
        return (
            f"{self.ckpt.path}: expert {expert} of layer {layer} could not be read "
            "(file truncated?)."
        )

    def _read_direct(self, fd: int, offset: int, dst: np.ndarray, layer: int, expert: int) -> None:
        """O_DIRECT wants aligned offsets, lengths and buffers: read the aligned pages around
        the range into this thread's bounce buffer, then copy the range out."""
        start = offset // _ALIGN * _ALIGN
        length = -(-(offset + dst.nbytes - start) // _ALIGN) * _ALIGN
        buf = getattr(self._bounce, "buf", None)
        if buf is None or len(buf) < length:
            if buf is not None:
                buf.close()
            buf = self._bounce.buf = mmap.mmap(-1, length)  # page-aligned anonymous memory
        view = memoryview(buf)[:length]
        # the last pages may lie past the end of the file: a short read is fine beyond the range
        _read_fully(
            fd, start, view, self._truncated(layer, expert), need=offset + dst.nbytes - start
        )
        lo = offset - start
        dst[:] = np.frombuffer(buf, dtype=np.uint8, count=dst.nbytes, offset=lo)
        view.release()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _ram_bytes() -> int:
    import psutil

    return psutil.virtual_memory().total


def _direct_ok(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def _read_fully(fd: int, offset: int, buf: memoryview, error: str, need: int | None = None) -> None:
    """preadv until ``need`` bytes (all of ``buf`` by default) are in ``buf``."""
    need = len(buf) if need is None else need
    done = 0
    while done < need:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise LocalseekError(error)
        done += n


class SlotPool:
    """Fixed slots holding experts of one layer in one tier.

    ``data[p]`` is (slots, rows, row_bytes) uint8 on ``device`` (pinned host memory for the
    RAM tier when CUDA exists), ``scales[p]`` (slots, *scale_shape) float32. A slot is free,
    loading (a future), or holds an expert; pinned slots (experts in use) are never evicted.
    """

    def __init__(
        self,
        spec: LayerSpec,
        slots: int,
        device: torch.device,
        policy: CachePolicy,
        pin_memory: bool = False,
    ):
        self.spec = spec
        self.slots = slots
        self.device = device
        self.policy = policy
        # host slots that the CPU kernels read every token sit in huge pages, as the weights do
        huge = device.type == "cpu" and not pin_memory and hugepages.available()
        self.data = [
            hugepages.empty((slots, p.shape[0], p.row_bytes))
            if huge
            else torch.empty(
                (slots, p.shape[0], p.row_bytes),
                dtype=torch.uint8,
                device=device,
                pin_memory=pin_memory,
            )
            for p in spec
        ]
        self.scales = [
            torch.zeros((slots, *p.scale_shape), dtype=torch.float32, device=device) for p in spec
        ]
        self.expert = np.full(slots, -1, dtype=np.int64)  # expert id per slot
        self.slot_of: dict[int, int] = {}
        self.loading: dict[int, Future] = {}  # slot -> read in flight
        self.pins = np.zeros(slots, dtype=np.int64)
        self.predicted: set[int] = set()  # experts the predictor expects next (kept if possible)
        self.prefetched: set[int] = set()  # experts read ahead and not used yet
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data + self.scales)

    def host_views(self, slot: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [d[slot].numpy() for d in self.data], [s[slot].numpy() for s in self.scales]

    def resident(self, expert: int) -> int | None:
        """The slot holding ``expert`` (possibly still loading), or None."""
        return self.slot_of.get(expert)

    def ready(self, slot: int) -> bool:
        fut = self.loading.get(slot)
        if fut is None:
            return True
        if fut.done():
            del self.loading[slot]
            fut.result()  # a reader error surfaces here
            return True
        return False

    def take_slot(self, protect: set[int] = frozenset()) -> int | None:  # type: ignore[assignment]
        """A free slot, or one freed by evicting the policy's victim among experts neither
        pinned, loading nor in ``protect``; None when every slot is held."""
        free = np.flatnonzero(self.expert < 0)
        if len(free):
            return int(free[0])
        cands = [
            s
            for s in range(self.slots)
            if self.pins[s] == 0 and s not in self.loading and int(self.expert[s]) not in protect
        ]
        keep = [s for s in cands if int(self.expert[s]) not in self.predicted]
        slot = self.policy.victim(keep or cands)
        if slot is None:
            return None
        self.evict(slot)
        return slot

    def evict(self, slot: int) -> None:
        if self.pins[slot]:
            raise AssertionError(f"slot {slot} holds expert {self.expert[slot]} in use")
        del self.slot_of[int(self.expert[slot])]
        self.prefetched.discard(int(self.expert[slot]))
        self.expert[slot] = -1
        self.evictions += 1

    def assign(self, slot: int, expert: int, future: Future | None = None) -> None:
        self.expert[slot] = expert
        self.slot_of[expert] = slot
        if future is not None:
            self.loading[slot] = future
        if isinstance(self.policy, LFUDecay):
            self.policy.reset(slot)


@dataclass(order=True)
class _Read:
    priority: int
    seq: int
    args: tuple = field(compare=False)
    future: Future = field(compare=False)
    taken: bool = field(default=False, compare=False)


class Readers:
    """Reader threads filling slots from an ExpertSource, most urgent first.

    A read the forward is about to wait for (``urgent``) goes before every prefetch still
    queued, and a queued prefetch that becomes needed is moved up with ``hurry``; prefetches
    go in the order they were asked for (best guess first). A queued read can be cancelled.
    Counts the bytes read.
    """

    def __init__(self, source: ExpertSource, threads: int = 4):
        self.source = source
        self.lock = threading.Lock()
        self.bytes_read = 0
        self._queue: list[_Read] = []
        self._reads: dict[Future, _Read] = {}
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"expert-reader-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self, layer: int, expert: int, pool: SlotPool, slot: int, urgent: bool = True
    ) -> Future:
        """Queue a read of ``expert`` of ``layer`` into ``pool``'s ``slot``."""
        read = _Read(0 if urgent else 1, next(self._seq), (layer, expert, pool, slot), Future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the expert readers are closed")
            self._reads[read.future] = read
            heapq.heappush(self._queue, read)
            self._wake.notify()
        return read.future

    def hurry(self, future: Future) -> None:
        """Move a queued read ahead of every prefetch (a no-op once it has started)."""
        with self._wake:
            read = self._reads.get(future)
            if read is None or read.taken or read.priority == 0:
                return
            read.priority = 0
            heapq.heapify(self._queue)

    def cancel(self, future: Future) -> bool:
        """Drop a read that has not started; False when it is running or done."""
        with self._wake:
            read = self._reads.get(future)
            if read is None or read.taken:
                return False
            self._queue.remove(read)
            heapq.heapify(self._queue)
            del self._reads[future]
        future.cancel()
        return True

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                read = heapq.heappop(self._queue)
                read.taken = True
                del self._reads[read.future]
            if not read.future.set_running_or_notify_cancel():
                continue
            try:
                read.future.set_result(self._read(*read.args))
            except BaseException as e:
                read.future.set_exception(e)

    def _read(self, layer: int, expert: int, pool: SlotPool, slot: int) -> int:
        out, scales = pool.host_views(slot)
        n = self.source.read(layer, expert, out, scales)
        with self.lock:
            self.bytes_read += n
        return n

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for t in self._threads:
            t.join()
        self.source.close()
