"""`python -m mateconv.serve`: the server's command line."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

import uvicorn

from mateconv.chat import ChatError
from mateconv.config import add_decode_flags
from mateconv.flags import ArgumentParser
from mateconv.serve.app import create_app

API_KEY_ENV = "MATECONV_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mateconv.serve",
                            description="OpenAI-compatible chat completions server over a saved model.")
    parser.add_argument("--model_path", default="out/sft/final", help="save_pretrained directory")
    parser.add_argument("--served_model_name", nargs="+", default=None, metavar="NAME",
                        help="the names clients may pass as 'model', the first listed in /v1/models (default: "
                        "--model_path as given, and 'mateconv')")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max_concurrent", type=int, default=1, help="generations running at once")
    limits.add_argument("--max_queued", type=int, default=16, help="requests that may wait; more get 429")
    limits.add_argument("--max_request_bytes", type=int, default=1_000_000, help="larger bodies get 413")
    limits.add_argument("--default_max_tokens", type=int, default=256, help="when a request sets no max_tokens")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV, ""),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; empty: no key)")
    add_decode_flags(parser)
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Binds the address and lets it go, before the model loads: a port in use is then one line at once rather than
    uvicorn's log lines after the load."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as error:
            raise SystemExit(f"serve: cannot listen on {host}:{port}: {error.strerror}") from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_concurrent < 1 or args.max_queued < 0 or args.max_request_bytes < 1 or args.default_max_tokens < 1:
        raise SystemExit("serve: max_concurrent, max_request_bytes and default_max_tokens must be >= 1, "
                         "max_queued >= 0")
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"serve: --port must be in 0-65535, got {args.port}")
    if not args.api_key and not is_loopback(args.host):
        print(f"serve: WARNING: listening on {args.host} without an API key: anyone who can reach port {args.port} "
              f"can use the model (set --api_key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
    check_address(args.host, args.port)
    try:
        app = create_app(args.model_path, args.served_model_name, args.device, args.dtype, args.max_concurrent,
                         args.max_queued, args.max_request_bytes, args.default_max_tokens, args.api_key, args.compile)
    except ChatError as error:
        raise SystemExit(f"serve: {error}") from None
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
