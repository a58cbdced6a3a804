"""`localseek serve`: the OpenAI-compatible HTTP API (localseek.server) on one loaded model.

This module parses the flags, loads the model, says where it listens and runs uvicorn; the
requests, the queue and the prompt cache are the library's. Ctrl-C or SIGTERM: the running
generation stops before its next token, waiting requests are told the server is shutting down,
and uvicorn closes the connections before the process ends.
"""

from __future__ import annotations

import argparse
import socket

from localseek.cli.common import add_model_args, load_from_args, non_negative_int
from localseek.errors import LocalseekError


def port(text: str) -> int:
    """argparse type: a TCP port (0: any free one, said at startup)."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {value}")
    return value


def setup_arg_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 for every interface: other machines can reach it)",
    )
    p.add_argument("--port", type=port, default=8080, help="TCP port (0: any free port)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request (default: no key)",
    )
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=8,
        help="requests that may wait while one is generated; one more gets 503 with Retry-After",
    )


def listen(host: str, number: int) -> socket.socket:
    """A bound socket, so that a taken port is one sentence before the server starts."""
    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LocalseekError(
            f"--host {host}: not an address this machine has ({e.strerror})."
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise LocalseekError(f"cannot listen on {host}:{number} ({e.strerror or e}).") from None
    sock.set_inheritable(True)
    return sock


def memory_lines(model) -> list[str]:
    """Where the model's bytes are: the plan's tiers when offloading, else what is held."""
    from localseek.model.kv_cache import KVCache
    from localseek.offload.plan import format_size

    kv = KVCache.bytes_per_token(model.config, model.options.dtype) * model.ctx
    if model.plan is None:
        return [
            f"memory: weights {format_size(model.weights_nbytes())} on "
            f"{model.options.device}, KV cache {format_size(kv)} ({model.ctx} tokens)"
        ]
    plan, tiers = model.plan, model.plan.tier_counts()
    return [
        f"memory plan: fixed part {format_size(plan.fixed_bytes)} on {model.options.device}, "
        f"KV cache {format_size(kv)} ({model.ctx} tokens)",
        f"routed experts: GPU cache {tiers['gpu']} ({format_size(plan.gpu_cache_bytes)}), "
        f"RAM {tiers['ram']} ({format_size(plan.ram_bytes)}), "
        f"disk {tiers['disk']} ({format_size(plan.disk_bytes)})",
    ]


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    sock = listen(args.host, args.port)  # before the load: a taken port fails at once
    try:
        import uvicorn

        from localseek.server.app import create_app
        from localseek.server.service import Service

        class Server(uvicorn.Server):
            """uvicorn's server; a shutdown signal also stops the generations, so that open
            streams end now instead of at their last token."""

            def __init__(self, config: uvicorn.Config, service: Service) -> None:
                super().__init__(config)
                self.service = service

            def handle_exit(self, sig, frame) -> None:
                self.service.stop()
                super().handle_exit(sig, frame)

        model = load_from_args(args, err)
        try:
            name = model.path.stem if model.path.is_file() else model.path.name
            service = Service(model, args.max_queue, name)
            app = create_app(service, args.api_key)
            server = Server(
                uvicorn.Config(
                    app,
                    log_config=None,  # our logging (main's --verbose), not uvicorn's
                    access_log=args.verbose,
                    timeout_graceful_shutdown=5,
                ),
                service,
            )
            host, number = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(
                f"localseek serve: {name} ({model.config.model_type}), context {model.ctx}",
                flush=True,
            )
            for line in memory_lines(model):
                print(line, flush=True)
            tools = {
                "template": "rendered by the chat template",
                "system": "described in the system prompt",
                None: "not supported",
            }
            print(
                f"tools: {tools[service.tool_support]}; queue: {args.max_queue} waiting at most"
                + ("; API key required" if args.api_key else ""),
                flush=True,
            )
            print(
                f"listening on http://{shown}:{number}/v1 (OpenAI-compatible; Ctrl-C stops)",
                flush=True,
            )
            try:
                server.run(sockets=[sock])
            finally:
                service.close()
        finally:
            model.close()
    finally:
        sock.close()
    return 0
