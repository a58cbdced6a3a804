"""The HTTP side of ``localseek serve``: FastAPI routes over a ``Service``.

Only HTTP lives here: reading bodies under a size limit, the API key, turning the service's
events into JSON or server-sent events, and noticing a client that went away (its ticket is
cancelled: a stream's when Starlette cancels the response, a whole response's by polling).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from localseek import __version__
from localseek.server import protocol
from localseek.server.protocol import RequestError, Response, error_body
from localseek.server.service import Finished, Piece, QueueFull, Service, Ticket

MIN_BODY_LIMIT = 1 << 20  # bytes; more for a longer context (see body_limit)


def body_limit(ctx: int) -> int:
    """The largest request body taken: 1 MiB, or 32 bytes per token of context if more (JSON
    text escapes can take 6 bytes a character, and a token is several characters)."""
    return max(MIN_BODY_LIMIT, 32 * ctx)


class ApiKey:
    """ASGI middleware: a request without ``Authorization: Bearer KEY`` gets 401."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "a valid API key is needed: send 'Authorization: Bearer KEY'."
                response = JSONResponse(
                    error_body(message, code="invalid_api_key"),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` runs however the response ends: finished, or the
    client gone (even before the first event, when the generator never started)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()


def create_app(
    service: Service, api_key: str | None = None, max_body: int | None = None
) -> FastAPI:
    """The ASGI app: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
    ``/health`` and ``/metrics``; with ``api_key`` every route wants ``Bearer api_key``."""
    app = FastAPI(
        title="localseek", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    limit = max_body or body_limit(service.model.ctx)

    if api_key:
        app.add_middleware(ApiKey, key=api_key)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, QueueFull) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}."
        return JSONResponse(error_body(message, code=code), status_code=e.status_code)

    async def read_body(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise _too_large(limit)
        return protocol.parse_json(bytes(raw))

    async def complete(request: Request, endpoint: str, parsed: protocol.Request):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: Piece | Finished) -> None:  # from the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is down
                loop.call_soon_threadsafe(queue.put_nowait, event)

        ticket = Ticket(parsed.job, emit)
        try:
            service.submit(ticket)
        except QueueFull:
            service.metrics.count(endpoint, "rejected")
            raise
        response = Response(service.name, parsed.job.chat)
        if parsed.stream:
            return EventStream(stream(endpoint, ticket, queue, response, parsed), ticket.cancel)
        return await whole(request, endpoint, ticket, queue, response)

    async def whole(request, endpoint, ticket, queue, response) -> JSONResponse:
        getter = None
        try:
            while True:  # only the end matters; the client is looked at twice a second
                getter = getter or asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=0.5)
                if not done:
                    if await request.is_disconnected():
                        service.metrics.count(endpoint, "cancelled")
                        return JSONResponse({}, status_code=499)
                    continue
                event, getter = getter.result(), None
                if isinstance(event, Finished):
                    break
        finally:
            ticket.cancel()  # nothing when it has finished
            if getter is not None:
                getter.cancel()
        if event.error is not None:
            service.metrics.count(endpoint, "error")
            body = error_body(event.error, kind="server_error", code=_code())
            # 503: shutting down; 500: the model failed
            return JSONResponse(body, status_code=503 if service.closing else 500)
        service.metrics.count(endpoint, "ok")
        body = response.whole(
            event.reasoning, event.content, event.tool_calls, event.finish_reason, event.usage
        )
        return JSONResponse(body)

    async def stream(endpoint, ticket, queue, response, parsed) -> AsyncIterator[str]:
        usage = parsed.include_usage
        outcome = "cancelled"
        try:
            if response.chat:
                yield _sse(
                    response.chunk({"role": "assistant", "content": ""}, include_usage=usage)
                )
            while True:
                event = await queue.get()
                if isinstance(event, Piece):
                    if event.reasoning:
                        delta = {"reasoning_content": event.reasoning}
                        yield _sse(response.chunk(delta, include_usage=usage))
                    if event.content:
                        yield _sse(response.chunk({"content": event.content}, include_usage=usage))
                    continue
                if event.error is not None:
                    outcome = "error"
                    yield _sse(error_body(event.error, kind="server_error", code=_code()))
                    break
                if event.tool_calls:
                    calls = protocol.tool_calls(event.tool_calls)
                    delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                    yield _sse(response.chunk(delta, include_usage=usage))
                yield _sse(response.chunk({}, event.finish_reason, include_usage=usage))
                if usage:
                    yield _sse(response.chunk(None, usage=event.usage, include_usage=True))
                outcome = "ok"
                break
            yield "data: [DONE]\n\n"
        finally:
            ticket.cancel()  # the client went away mid-stream: stop before the next token
            service.metrics.count(endpoint, outcome)

    def _code() -> str:
        return "server_shutting_down" if service.closing else "generation_failed"

    async def parse(request: Request, endpoint: str, parse_body, *extra):
        """The request's body through ``parse_body`` (a protocol function), counted if refused."""
        try:
            body = await read_body(request)
            tok, ctx = service.tokenizer, service.model.ctx
            return await run_in_threadpool(parse_body, body, tok, ctx, service.name, *extra)
        except RequestError:
            service.metrics.count(endpoint, "invalid")
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = await parse(request, "chat", protocol.chat_request, service.tool_support)
        return await complete(request, "chat", parsed)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = await parse(request, "completions", protocol.completion_request)
        return await complete(request, "completions", parsed)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {
            "id": service.name,
            "object": "model",
            "created": service.started,
            "owned_by": "localseek",
            "context_length": service.model.ctx,
        }
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        waiting, running = service.depth()
        return {"status": "ok", "model": service.name, "waiting": waiting, "running": running}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        waiting, running = service.depth()
        text = service.metrics.render(waiting, running, service.model)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


def _too_large(limit: int) -> RequestError:
    return RequestError(
        f"the request body is larger than the {limit} bytes this server takes.",
        code="request_too_large",
    )


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
