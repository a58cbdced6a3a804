"""One model serving requests one at a time, in order, from a bounded queue.

A worker thread runs the generations; a request is a ``Ticket`` that the HTTP side submits and
hears back from through a callback (each piece of text as it is final, then the end). The KV
cache of the last sequence stays in one ``Session``: the next request computes only what is
not the longest common prefix with it, so a conversation's next turn prefills only itself.

A ticket can be cancelled at any time (its client went away): a waiting one is dropped, a
running one stops before its next token.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from localseek.errors import LocalseekError
from localseek.server.output import MARKERS, ChatOutput, StopStrings, ToolCall
from localseek.server.protocol import Job, RequestError, Usage
from localseek.session import Session
from localseek.tokenizer import StreamDecoder

if TYPE_CHECKING:
    import torch

    from localseek.engine import Generation, GenerationStats, Model

log = logging.getLogger(__name__)


@dataclass
class Piece:
    """Text that is final: reasoning and content (either may be empty)."""

    reasoning: str = ""
    content: str = ""


@dataclass
class Finished:
    """The end of a generation: the whole answer, why it stopped and what it used.

    finish_reason: "stop", "length" or "tool_calls"; None when it did not finish (``error``
    says why: cancelled, the server shutting down, the model failing).
    """

    finish_reason: str | None
    usage: Usage
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None


Event = Piece | Finished


class Ticket:
    """A job in the queue, with the callback that hears its events (from the worker thread)."""

    def __init__(self, job: Job, emit: Callable[[Event], None]) -> None:
        self.job = job
        self.emit = emit
        self.cancelled = threading.Event()
        self.done = False

    def cancel(self) -> None:
        """Stop it: dropped if still waiting, stopped before its next token if running."""
        self.cancelled.set()


class QueueFull(RequestError):
    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {waiting} requests are waiting for the model; retry in "
            f"{retry_after} s.",
            code="queue_full",
            status=503,
            kind="server_error",
        )
        self.retry_after = retry_after


class Metrics:
    """Counters for ``/metrics`` (Prometheus text format), updated from both threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.last_prefill_tps = 0.0
        self.last_decode_tps = 0.0

    def count(self, endpoint: str, outcome: str) -> None:
        """One request to ``endpoint`` ended so: ok, cancelled, error, invalid, rejected."""
        with self._lock:
            self.requests[endpoint, outcome] += 1

    def add(self, stats: GenerationStats) -> None:
        with self._lock:
            self.prompt_tokens += stats.prompt_tokens
            self.cached_tokens += stats.reused_tokens
            self.generated_tokens += stats.generated_tokens
            self.prefill_seconds += stats.prefill_seconds
            self.decode_seconds += stats.decode_seconds
            if stats.prefill_seconds:
                self.last_prefill_tps = stats.prefill_tokens_per_second
            if stats.decode_seconds:
                self.last_decode_tps = stats.decode_tokens_per_second

    def render(self, waiting: int, running: int, model: Model) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP localseek_{name} {help}")
            out.append(f"# TYPE localseek_{name} {kind}")
            for labels, value in samples:  # whole numbers exactly, others as Python writes them
                shown = int(value) if float(value).is_integer() else float(value)
                out.append(f"localseek_{name}{labels} {shown}")

        with self._lock:
            requests = [
                (f'{{endpoint="{e}",outcome="{o}"}}', n)
                for (e, o), n in sorted(self.requests.items())
            ]
            totals = [
                ("prompt_tokens_total", "counter", "Prompt tokens of generations.",
                 self.prompt_tokens),
                ("cached_prompt_tokens_total", "counter",
                 "Prompt tokens reused from the KV cache, not computed again.", self.cached_tokens),
                ("generated_tokens_total", "counter", "Tokens generated.", self.generated_tokens),
                ("prefill_seconds_total", "counter", "Seconds spent in prefill.",
                 self.prefill_seconds),
                ("decode_seconds_total", "counter", "Seconds spent in decode steps.",
                 self.decode_seconds),
                ("prefill_tokens_per_second", "gauge", "Prefill speed of the last request.",
                 self.last_prefill_tps),
                ("decode_tokens_per_second", "gauge", "Decode speed of the last request.",
                 self.last_decode_tps),
            ]  # fmt: skip
        metric("requests_total", "counter", "Requests answered, by endpoint and outcome.", requests)
        for name, kind, text, value in totals:
            metric(name, kind, text, [("", value)])
        metric("queue_depth", "gauge", "Requests waiting for the model.", [("", waiting)])
        metric("requests_running", "gauge", "Requests being generated (0 or 1).", [("", running)])
        offload = model.offload_stats
        if offload is not None:  # the tiered expert store's figures since load
            rates = [
                ('{tier="gpu"}', offload.expert_cache_hit_rate),
                ('{tier="ram"}', offload.ram_hit_rate),
            ]
            metric(
                "expert_hit_rate",
                "gauge",
                "Share of expert uses the GPU cache served (gpu), and of its misses RAM served "
                "(ram).",
                [(tier, r) for tier, r in rates if r is not None],
            )
            offload_totals = [
                ("expert_lookups_total", "Routed-expert uses.", offload.lookups),
                ("expert_disk_bytes_total", "Bytes of experts read from disk.",
                 offload.disk_bytes + offload.prefetch_bytes),
                ("expert_stall_seconds_total", "Seconds waited for experts.",
                 offload.stall_seconds),
            ]  # fmt: skip
            for name, text, value in offload_totals:
                metric(name, "counter", text, [("", value)])
        return "\n".join(out) + "\n"


class Service:
    """The model behind the API: a FIFO of at most ``max_queue`` waiting requests, served one
    at a time by a worker thread, over one ``Session`` (the prompt cache).

    Args:
        model: a loaded model with a tokenizer.
        max_queue: requests that may wait while one runs; one more is refused (``QueueFull``).
        name: the model's name in responses and ``/v1/models``.
    """

    def __init__(self, model: Model, max_queue: int, name: str) -> None:
        if model.tokenizer is None:
            raise LocalseekError(f"{model.path}: no tokenizer, so there is no text to serve.")
        self.model = model
        self.tokenizer = model.tokenizer
        self.name = name
        self.max_queue = max_queue
        self.session = Session(model)
        self.metrics = Metrics()
        self.tool_support = self.tokenizer.tool_support()
        self.started = int(time.time())
        # special tokens the text leaves out (as `generate` does), but not DeepSeek's tags
        markers = {self.tokenizer.token_to_id(m) for m in MARKERS}
        self._hidden = {
            i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special
        } - markers
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: Ticket | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._seconds = 0.0  # a running mean of a generation's time, for Retry-After
        self._thread = threading.Thread(target=self._work, name="localseek-generate", daemon=True)
        self._thread.start()

    @property
    def closing(self) -> bool:
        """``stop`` has been called: the server is shutting down."""
        return self._closing

    # --- the queue -----------------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket (FIFO).

        Raises:
            QueueFull: ``max_queue`` tickets wait already.
            RequestError: the server is shutting down (503).
        """
        with self._cond:
            if self._closing:
                raise RequestError("the server is shutting down.", status=503, kind="server_error")
            waiting = len(self._waiting)
            # one may run: the worker may not have taken the first one out yet
            if waiting + (self._running is not None) > self.max_queue:
                raise QueueFull(waiting, max(1, math.ceil(self._seconds * (waiting + 1))))
            self._waiting.append(ticket)
            self._cond.notify()

    def depth(self) -> tuple[int, int]:
        """Requests waiting, and running (0 or 1)."""
        with self._cond:
            return len(self._waiting), int(self._running is not None)

    def stop(self) -> None:
        """Take no more requests; cancel what runs and waits (each hears that the server is
        shutting down). Returns at once (it may run in a signal handler)."""
        with self._cond:
            self._closing = True
            dropped = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel()
            self._cond.notify()
        for ticket in dropped:
            ticket.cancel()
            self._end(
                ticket,
                Finished(
                    None, Usage(len(ticket.job.prompt), 0, 0), error="the server is shutting down"
                ),
            )

    def close(self, timeout: float = 10.0) -> None:
        """``stop``, and wait for the worker to end (it stops before its next token)."""
        self.stop()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                ticket = self._running = self._waiting.popleft()
            try:
                if not ticket.cancelled.is_set():
                    t0 = time.perf_counter()
                    self._run(ticket)
                    self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - t0)
            except Exception as e:  # the worker must live on: the failure goes to its request
                log.exception("generation failed")
                self._end(
                    ticket,
                    Finished(
                        None, Usage(len(ticket.job.prompt), 0, 0), error=f"generation failed: {e}"
                    ),
                )
            finally:
                with self._cond:
                    self._running = None
                self._end(ticket, None)

    def _end(self, ticket: Ticket, event: Finished | None) -> None:
        """Send the ticket's last event, once (None: a cancelled one that never ran)."""
        if ticket.done:
            return
        ticket.done = True
        if event is None:
            event = Finished(None, Usage(len(ticket.job.prompt), 0, 0), error="cancelled")
        ticket.emit(event)

    # --- one generation ------------------------------------------------------------------

    def _run(self, ticket: Ticket) -> None:
        job, tok = ticket.job, self.tokenizer
        gen = self.session.generate(
            job.prompt, job.max_tokens, job.temperature, job.top_k, job.top_p, job.seed
        )
        if job.min_tokens:
            gen.sampler = _NoEndBefore(gen, self.model.eos_ids, job.min_tokens)
        decoder = StreamDecoder(tok, skip_special_tokens=False)
        stops = StopStrings(job.stop)
        split = ChatOutput(job.thinking, job.tools) if job.chat else None
        text: list[str] = []  # a completion's text (a chat answer's is split's)

        def emit(piece: str) -> None:
            piece = stops.push(piece)
            reasoning, content = split.push(piece) if split is not None else ("", piece)
            text.append(content)
            if reasoning or content:
                ticket.emit(Piece(reasoning, content))

        error, finished = None, False
        try:
            while not ticket.cancelled.is_set():
                token = next(gen, None)
                if token is None:
                    finished = True
                    break
                if token not in self._hidden:
                    emit(decoder.push(token))
                if stops.hit:
                    finished = True
                    break
            if not finished:
                error = "the server is shutting down" if self._closing else "cancelled"
        except LocalseekError as e:  # e.g. the disk tier could not read an expert
            error = str(e)
        self.metrics.add(gen.stats)
        usage = Usage(gen.stats.prompt_tokens, gen.stats.generated_tokens, gen.stats.reused_tokens)
        if error is not None:
            self._end(ticket, Finished(None, usage, error=error))
            return
        if not stops.hit:
            emit(decoder.flush())
            emit(stops.flush())
        calls: list[ToolCall] = []
        if split is not None:
            reasoning, content, calls = split.finish()
            if reasoning or content:
                ticket.emit(Piece(reasoning, content))
        if calls:
            reason = "tool_calls"
        elif stops.hit or gen.stop_reason == "eos":
            reason = "stop"
        else:
            reason = "length"  # max_tokens, or the context is full
        if split is None:
            self._end(ticket, Finished(reason, usage, "", "".join(text)))
        else:
            self._end(ticket, Finished(reason, usage, split.reasoning, split.content, calls))


class _NoEndBefore:
    """A sampler that cannot pick an end-of-sequence token before ``min_tokens``."""

    def __init__(self, gen: Generation, eos_ids: set[int], min_tokens: int) -> None:
        self.inner, self.gen = gen.sampler, gen
        self.eos, self.min_tokens = sorted(eos_ids), min_tokens

    def __call__(self, logits: torch.Tensor) -> int:
        if len(self.gen.tokens) < self.min_tokens and self.eos:
            logits = logits.clone()
            logits[self.eos] = float("-inf")
        return self.inner(logits)
