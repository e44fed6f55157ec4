"""`latentrt serve DIR`: an HTTP server over one pipeline (see latentrt.runtime.serve).

Ctrl-C or SIGTERM stops accepting requests, lets those in flight finish (up to --drain-timeout) and
exits 0; a second Ctrl-C stops at once (exit 130). A --host other than loopback is warned about; --api-key (or LATENTRT_API_KEY) makes every
route but /health require ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from typing import Any

from latentrt.choices import Backend, values

API_KEY_ENV = "LATENTRT_API_KEY"


def port_number(text: str) -> int:
    """An argparse type: a TCP port 0-65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0 picks a free one)")
    return port


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="engine folder (latentrt build) or ONNX export (latentrt export)")
    parser.add_argument("--backend", choices=values(Backend), default=None,
                        help="default: the folder's own backend")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--refiner", default=None, help="SDXL refiner engine folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=port_number, default=8080, help="TCP port (default 8080; 0: any free one)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; prefer the "
                                          "environment variable, command lines are visible to other users)")
    limits = parser.add_argument_group("limits (defaults: latentrt.runtime.serve.ServerLimits)")
    limits.add_argument("--max-body-mb", type=positive_int, help="largest request body in MiB (32)")
    limits.add_argument("--max-prompt-chars", type=positive_int, help="longest prompt in characters (2000)")
    limits.add_argument("--max-image-pixels", type=positive_int, help="largest init image / mask in pixels (4096^2)")
    limits.add_argument("--max-queue", type=positive_int,
                        help="requests that may wait behind the running one; more get 503 + Retry-After (8)")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="on Ctrl-C / SIGTERM, seconds to let requests in flight finish (default 300)")
    parser.add_argument("--expose-paths", action="store_true",
                        help="keep local paths (engine folder, checkpoint) in responses and PNG metadata")


def limits_from_args(args: argparse.Namespace, api_key: str | None) -> Any:
    """ServerLimits with the defaults, overridden by the options given."""
    from .serve import ServerLimits

    given = {"max_body_bytes": args.max_body_mb << 20 if args.max_body_mb is not None else None,
             "max_prompt_chars": args.max_prompt_chars, "max_image_pixels": args.max_image_pixels,
             "max_queue": args.max_queue}
    return ServerLimits(**{k: v for k, v in given.items() if v is not None}, api_key=api_key,
                        expose_paths=args.expose_paths)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """InvalidRequest when host:port cannot be listened on (busy port, unknown address), before loading engines."""
    from latentrt.errors import InvalidRequest

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidRequest(f"cannot listen on --host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            probe.bind(address)
        except OSError as e:
            why = "the port is in use" if e.errno in (98, 48) else e.strerror or str(e)
            raise InvalidRequest(f"cannot listen on {host}:{port}: {why}; pick another --port (0 picks a free "
                                 "one)") from None


def run(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline
    from .serve import serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host):
        print(f"latentrt serve: warning: listening on {args.host}, reachable from other machines"
              f"{'' if api_key else ' by anyone (set ' + API_KEY_ENV + ' to require a key)'}; "
              "the server speaks plain HTTP", file=sys.stderr, flush=True)
    check_address(args.host, args.port)
    limits = limits_from_args(args, api_key)
    pipeline = load_pipeline(args.folder, backend=args.backend, device=args.device, refiner=args.refiner)
    try:
        server = serve(pipeline, args.host, args.port, limits)
    except BaseException:
        pipeline.close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second Ctrl-C: stop without waiting
            raise KeyboardInterrupt
        stop.set()
        print(f"latentrt serve: {signal.Signals(signum).name}: finishing {server.pending} request(s) in flight, "
              "then stopping", file=sys.stderr, flush=True)
        server.begin_drain()
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"serving {pipeline.engines.spec.title} ({pipeline.engines.backend}) on {server.url} "
          f"- GET /health, POST /generate{' (API key required)' if api_key else ''}; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.begin_drain()
        server.server_close()  # no new connections; handler threads of admitted requests keep running
        drained = server.wait_idle(args.drain_timeout)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if drained:
            pipeline.close()
    if not drained:
        print(f"latentrt serve: error: requests still running after --drain-timeout {args.drain_timeout:g} s; "
              "stopped without waiting for them", file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0
