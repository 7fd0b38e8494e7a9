"""`twotower serve`: the OpenAI-compatible server and its playground (see serve/app.py for the routes)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..decode.engine import MODES
from ..workload import Limits, OptionError, Options, parse_options
from .options import CLIError, add_engine_step_option, add_model_option, load_model

API_KEY_ENV = "TWOTOWER_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API and a live playground (batched, streaming)",
        description=(
            "POST /v1/completions and /v1/chat/completions (stream or not), GET /v1/models, /health, "
            "/metrics (Prometheus), and the playground at GET /. Concurrent requests are decoded together; "
            "decoding settings go in the body as mode (diffusion, ar, speculative), block_size, steps_per_block, "
            "draft_steps (speculative), confidence_threshold, anchor (and top_k). "
            "The options below set the defaults of a request."
        ),
    )
    add_model_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)",
    )
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default: 32)")
    add_engine_step_option(g)
    g.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting beyond the batch; then 429 (default: 64)"
    )
    g.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts get a 400 (default: 2048)")
    g.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted (default: 1024)")
    g = p.add_argument_group("request defaults")
    g.add_argument("--mode", choices=MODES, default="diffusion")
    g.add_argument("--max-tokens", type=int, default=16, help="when a request gives none (default: 16, as OpenAI)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--steps-per-block", type=int, default=16)
    g.add_argument(
        "--draft-steps",
        type=int,
        default=Options.draft_steps,
        help=f"speculative: denoiser steps per drafted block (default: {Options.draft_steps})",
    )
    g.add_argument("--threshold", type=float, default=0.9, help="confidence threshold gamma (default: 0.9)")
    g.add_argument(
        "--anchor",
        action="store_true",
        help="diffusion requests default to anchored blocks (each block's first token from the context tower)",
    )
    g.add_argument(
        "--eos-aware-commit",
        action="store_true",
        help="diffusion requests default to EOS-aware commits (positions after a committed EOS leave the ranking)",
    )
    p.add_argument("--log-requests", action="store_true", help="log one line per HTTP request (uvicorn's access log)")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="with compiled engine steps, do not compile them at every batch width before the first request "
        "(the warm-up decodes the default options at widths 1, 2, 4, ... up to --max-batch-size)",
    )
    p.set_defaults(func=cmd_serve)


def _server_modules():
    """The ASGI stack, or one clear error when the `serve` extra is not installed."""
    try:
        from ..serve import app, server
    except ImportError as err:
        raise CLIError(
            f"twotower serve needs the serve extra ({err.name} is missing): pip install 'twotower[serve]'"
        ) from None
    return app, server


def server_config(args: argparse.Namespace):
    ServerConfig = _server_modules()[0].ServerConfig

    for name in ("max_batch_size", "max_prompt_tokens", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0:
        raise CLIError("--max-queue must be >= 0")
    if not 0 <= args.port < 65536:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit)
    given = dict(
        mode=args.mode,
        max_tokens=args.max_tokens,
        block_size=args.block_size,
        steps_per_block=args.steps_per_block,
        draft_steps=args.draft_steps,
        confidence_threshold=args.threshold,
        anchor=args.anchor,
        eos_aware_commit=args.eos_aware_commit,
    )
    try:
        defaults = parse_options(given, Options(), limits=limits)
    except OptionError as err:
        raise CLIError(f"bad default: {err}") from None
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        engine_step=args.engine_step,
        warmup=not args.no_warmup,
        limits=limits,
        defaults=defaults,
        log_requests=args.log_requests,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    make_server = _server_modules()[1].make_server
    config = server_config(args)
    warning = exposure_warning(config.host, config.api_key)
    if warning is not None:
        print(warning, file=sys.stderr)
    loaded = load_model(args)
    try:
        server = make_server(loaded, config)
    except OSError as err:
        raise CLIError(f"cannot listen on {config.host}:{config.port}: {err.strerror or err}") from None
    except ValueError as err:  # e.g. a chat template that does not compile
        raise CLIError(f"{loaded.path}: {err}") from None
    print(f"serving {loaded.name} on {server.url}", flush=True)  # the load test waits for this line
    print(f"playground: {server.url}/", flush=True)
    state = server.state
    warming = " (compiling every batch width first; requests wait until it is done)" if state.worker.warmup else ""
    print(f"engine steps: {state.engine_step}{warming}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        server.close()
    return 0


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to say when the server is reachable from other machines with no key."""
    if api_key is not None or _is_loopback(host):
        return None
    return (
        f"warning: serving on {host} without an API key: anyone who can reach it can use it "
        f"(set --api-key or ${API_KEY_ENV})"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
