"""Serve a trained model over HTTP: an OpenAI-compatible API with batched decoding, and a chat page.

    pip install -e ".[serve]"
    python serve.py --model out/sft                  # http://127.0.0.1:8000 (chat page at /)
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"messages": [{"role": "user", "content": "请以《浣溪沙》为词牌写一首词"}]}'
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

from minillm.cli import (
    BAD_INPUT,
    CliError,
    add_inference_flags,
    add_model_flags,
    default_context,
    load_trained,
    report,
)
from minillm.cli.speculation import add_speculation_flags, check_speculation_flags, load_speculation
from minillm.device import inference_dtype, resolve_device

PROG = "serve.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health) and a chat page at /. Concurrent requests share decode steps "
                    "(continuous batching). Needs the serve extra: pip install -e \".[serve]\".")
    add_model_flags(p, default="out/sft")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server to the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MINILLM_API_KEY if set, "
                        "else no key; the environment keeps the key out of the process list). An empty key is "
                        "refused rather than taken as no key")
    p.add_argument("--allowed_host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable). By default the server "
                        "answers only its own address (and localhost on loopback), so that a web page elsewhere "
                        "cannot reach it by DNS rebinding; bound to 0.0.0.0 or :: it answers any Host unless "
                        "names are given here")
    p.add_argument("--model_name", default=None,
                   help="the model id clients send and /v1/models lists (default: the --model directory's name)")
    p.add_argument("--max_batch", type=int, default=16,
                   help="sequences decoded together per step; 1 serves one request at a time (default: %(default)s)")
    p.add_argument("--max_waiting", type=int, default=256,
                   help="sequences allowed to wait for a slot; beyond it requests get 429 with Retry-After; one request may ask for at most this many (prompts x n) "
                        "(default: %(default)s)")
    p.add_argument("--prefill_chunk", type=int, default=256,
                   help="prompt tokens read per scheduler step, at most: a longer prompt is read in chunks between "
                        "decode steps, so running streams do not stall for its whole prefill; 0 reads every prompt "
                        "whole (default: %(default)s)")
    p.add_argument("--batch_invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="a request gets the same tokens alone as beside others: where the CPU's matrix products give "
                        "a row other bits for other row counts (MKL on Intel CPUs), every decode step feeds all "
                        "--max_batch slots, and a lone request pays for them (2.06x slower at 16 on a 2-core Xeon); "
                        "--no-batch_invariant feeds the active slots only (default: %(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt and answer together; the KV cache holds max_batch of them "
                        "(default: the context the model was trained on, as train_*.py record it; else its "
                        "max_position_embeddings)")
    p.add_argument("--header_timeout", type=float, default=10.0,
                   help="seconds a client may take to send a request's line and headers; slower ones are "
                        "disconnected (default: %(default)s)")
    p.add_argument("--body_timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's body; slower ones get 408 (default: "
                        "%(default)s)")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    add_inference_flags(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores minus one, left to the HTTP side; on a 2-core "
                        "machine this measured 1.1x the throughput of using both, bench/RESULTS.md)")
    p.add_argument("--compile", action="store_true",
                   help="run each block's feed-forward through torch.compile (the first requests wait for the "
                        "compilation; on the 2-core CPU of bench/RESULTS.md it measured no faster)")
    add_speculation_flags(p)  # used while a request runs alone; beside others it decodes in the batch
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Reject flag values that make no sense, before anything is loaded."""
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    for flag, lo in (("max_batch", 1), ("max_waiting", 1), ("max_body_bytes", 1), ("port", 0), ("prefill_chunk", 0)):
        if getattr(args, flag) < lo:
            raise CliError(f"--{flag} must be >= {lo}, got {getattr(args, flag)}")
    for flag in ("header_timeout", "body_timeout"):
        if not 0 < getattr(args, flag) < float("inf"):
            raise CliError(f"--{flag} must be a number of seconds > 0, got {getattr(args, flag)}")
    if args.port > 65535:
        raise CliError(f"--port must be <= 65535, got {args.port}")
    check_speculation_flags(args)
    source = "--api_key"
    if args.api_key is None and "MINILLM_API_KEY" in os.environ:
        args.api_key, source = os.environ["MINILLM_API_KEY"], "MINILLM_API_KEY"
    if args.api_key is not None and not args.api_key.strip():
        # Fail closed: an empty key (often a variable that failed to expand) must not turn authentication off.
        raise CliError(f"{source} is set but empty: refusing to start a server without authentication; give a "
                       "key, or unset MINILLM_API_KEY and leave out --api_key to serve without one")
    if args.api_key is not None and any(c.isspace() or not c.isprintable() for c in args.api_key):
        raise CliError(f"{source} holds whitespace or control characters, which an Authorization header cannot "
                       "carry")


def run_server(app, sock: socket.socket, on_exit=lambda: None, header_timeout: float = 10.0) -> None:
    """Serve `app` on the already bound `sock` until SIGINT/SIGTERM; `on_exit` runs first on the signal."""
    import uvicorn

    from minillm.infer.server import header_deadline_protocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            on_exit()  # ends every sequence now: open streams send their last event instead of generating on
            super().handle_exit(sig, frame)

    host, port = sock.getsockname()[:2]
    # Connections still open a second after the signal (a client that stopped reading) are closed.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1,
                            http=header_deadline_protocol(header_timeout))
    Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input gives one message on stderr and exit status 1, no traceback."""
    args = parse_args(argv)
    try:
        check_flags(args)
        try:
            import uvicorn  # noqa: F401  (the serve extra, checked before the model loads)

            from minillm.infer.server import ServerConfig, allowed_hosts, create_app, host_name
        except ImportError as e:
            raise CliError(f"the server needs the serve extra ({e.name} is missing): "
                           "pip install -e \".[serve]\"") from None
        for name in args.allowed_host:  # parsed as the Host check parses headers: one name, an optional port
            if not host_name(name):
                raise CliError(f"--allowed_host {name!r} is not a host name (letters, digits, '.', '-', '_', or an "
                               "IPv6 address in brackets, with an optional :port)")
        from minillm.infer.serving import Scheduler

        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
        if not Path(args.model).is_dir():
            raise CliError(f"model directory {args.model} does not exist; train one (train_pretrain.py, then "
                           "train_sft.py writes out/sft) or pass --model DIR")
        device = resolve_device(args.device)
        model, tokenizer, _ = load_trained(args, device, inference_dtype(args.dtype, device))
        context = args.context or default_context(model.config)[0]
        if args.compile:
            for block in model.layers:
                block.mlp.compile(dynamic=True)
        note = lambda message: print(message, file=sys.stderr)  # noqa: E731
        speculation = load_speculation(args, model, tokenizer, context, device, note)
        try:
            scheduler = Scheduler(model, args.max_batch, context, args.max_waiting, args.prefill_chunk, speculation,
                                  rows_independent=None if args.batch_invariant else True)
        except ValueError as e:  # the context's range, checked in one place
            raise CliError(f"--{e}") from None
        name = args.model_name or Path(args.model).resolve().name
        app = create_app(scheduler, tokenizer, ServerConfig(name, args.api_key, args.max_body_bytes,
                                                            allowed_hosts(args.host, args.allowed_host),
                                                            args.body_timeout))
    except BAD_INPUT as e:
        return report(PROG, e)
    try:  # bind before saying "serving": a port in use or an unknown host is one line and status 1
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:
        return report(PROG, CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"))
    port = sock.getsockname()[1]
    padded = "" if scheduler.rows_independent else ", every step feeds all slots (--batch_invariant)"
    print(f"serving {name} ({model.num_parameters() / 1e6:.1f}M parameters, {device}, context {context}, "
          f"max_batch {args.max_batch}{padded}) on http://{args.host}:{port}/ (chat page), API at /v1",
          file=sys.stderr, flush=True)
    if args.api_key is None and not (args.host == "localhost" or args.host == "::1" or args.host.startswith("127.")):
        print(f"warning: no API key: anyone who reaches {args.host}:{port} can use this server (set "
              "MINILLM_API_KEY)", file=sys.stderr, flush=True)
    try:
        with sock:
            run_server(app, sock, on_exit=scheduler.stop, header_timeout=args.header_timeout)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
