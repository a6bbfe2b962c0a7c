"""``starlift serve ARTIFACT``: an OpenAI-compatible HTTP server on the engine (``starlift[serve]``).

``--ray`` runs the same app as a Ray Serve deployment instead (``starlift.serve.ray_serve``).

Start-up: verify the artifact, load it, warm the engine up, bind, then print one line
``starlift serve: ready on http://HOST:PORT ...`` (so ``/health`` answers only once the model
is ready). SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish within
``--grace-period`` seconds, close the engine, exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from starlift.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact folder (or a checkpoint folder / bundled name with --backend torch)")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), openvino, tensorrt or torch")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed in the ready line)")
    p.add_argument("--max-concurrency", type=int, default=8,
                   help="requests generating at once (the engine's cache rows, max_batch)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; beyond that the answer is 429 with Retry-After")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens fed between two decode steps")
    p.add_argument("--prefill-budget", type=int, default=None,
                   help="prompt tokens fed between two decode steps over all requests, each at most --prefill-chunk "
                        "(default: --prefill-chunk, one request's chunk per step); larger: a burst of short prompts "
                        "is prefilled without decode steps between them")
    p.add_argument("--api-key", default=os.environ.get("STARLIFT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /infill (default: $STARLIFT_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the folder name)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file for /v1/chat/completions (default: the artifact's own, if any)")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads")
    p.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE",
                   help="an ONNX Runtime session config entry (repeatable; onnxruntime backend only; default: "
                        "session.intra_op.allow_spinning=0, the runtime's threads sleep between kernels instead of "
                        "busy-waiting: =1 restores spinning)")
    p.add_argument("--public-key", default=None,
                   help="refuse the artifact unless it is signed by this public key (KEY.pub) or one in this folder; "
                        "checked before the model is loaded (default: no signature required)")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's hash check (not recommended)")
    ray = p.add_argument_group("Ray Serve (starlift[ray]): the same app as a deployment, one engine per replica, "
                                    "reached through Ray Serve's HTTP proxy on --host/--port")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (see docs/guide/scale-out.md)")
    how_many = ray.add_mutually_exclusive_group()
    how_many.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
    how_many.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                          help="autoscale between MIN and MAX replicas on ongoing requests (target: "
                               "--max-concurrency per replica)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0,
                     help="CPUs Ray reserves per replica (fractions allowed, e.g. 0.5)")
    ray.add_argument("--address", default=None,
                     help="the Ray cluster to join (e.g. HEAD:6379 or auto; default: $RAY_ADDRESS, else a private "
                          "local Ray started for this command)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: warning)")


def _check(args: argparse.Namespace) -> None:
    for name in ("max_concurrency", "max_queue", "prefill_chunk", "prefill_budget", "port", "threads"):
        value = getattr(args, name)
        low = 0 if name in ("max_queue", "port") else 1
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.port > 65535:
        raise UsageError(f"--port must be a port number (0-65535), got {args.port}")
    if args.grace_period < 0:
        raise UsageError(f"--grace-period must be >= 0 seconds, got {args.grace_period}")
    args.session_config = session_config_of(args.session_config)
    if args.session_config and args.backend != "onnxruntime":
        raise UsageError(f"--session-config sets ONNX Runtime session options; the {args.backend} backend has none")
    if args.chat_template and not Path(args.chat_template).is_file():
        raise UsageError(f"--chat-template {args.chat_template}: no such file")
    if not args.ray:
        for flag in ("replicas", "autoscale", "address"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} needs --ray (it configures the Ray Serve deployment)")
        return
    if args.replicas is not None and args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if args.cpus_per_replica <= 0:
        raise UsageError(f"--cpus-per-replica must be > 0, got {args.cpus_per_replica}")
    if args.autoscale is not None:
        low, _, high = args.autoscale.partition(":")
        try:
            low, high = int(low), int(high)
        except ValueError:
            raise UsageError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {args.autoscale!r}") from None
        if low < 0 or high < 1 or low > high:
            raise UsageError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {args.autoscale!r}")
        args.autoscale = (low, high)


def session_config_of(entries: list[str] | dict) -> dict[str, str]:
    """``KEY=VALUE`` entries as a dict (a dict passes through)."""
    if isinstance(entries, dict):
        return entries
    config = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise UsageError(f"--session-config takes KEY=VALUE, got {entry!r}")
        config[key] = value
    return config


def _imports():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"starlift serve needs the serve extra ({e.name} is missing): "
                         "pip install 'starlift[serve]'") from None
    return uvicorn


def options_of(args: argparse.Namespace):
    """The command line as ``ServeOptions`` (the chat template read here, where the command runs)."""
    from starlift.serve.build import ServeOptions

    return ServeOptions(
        artifact=str(args.artifact), backend=args.backend, max_concurrency=args.max_concurrency,
        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
        threads=args.threads, session_config=args.session_config, api_key=args.api_key,
        served_model_name=args.served_model_name, public_key=args.public_key, verify=not args.no_verify,
        chat_template=Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None)


def main(args: argparse.Namespace) -> int:
    _check(args)
    if args.ray:
        from starlift.core.extras import require

        require("ray", purpose="starlift serve --ray")  # names starlift[ray], which brings the serve extra too
        _imports()
        from starlift.serve.ray_serve import serve_on_ray

        return serve_on_ray(args, options_of(args))
    uvicorn = _imports()
    from starlift.serve.build import build_app

    # Bind first, so a port in use fails before the model loads; listen only once ready.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot bind {args.host}:{args.port} ({e.strerror}); choose another --port") from None

    options = options_of(args)
    try:
        built = build_app(options)
    except BaseException:
        sock.close()
        raise
    name = options.model_name
    try:
        config = uvicorn.Config(built.app, log_level=args.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=args.grace_period, timeout_keep_alive=30)
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"starlift serve: ready on http://{shown}:{port} (model {name!r}, {built.task}, {built.backend}, "
              f"{args.max_concurrency} rows, queue {args.max_queue})", flush=True)
        # uvicorn handles SIGTERM/SIGINT itself (stop accepting, drain, return) and raises the
        # signal again once done: a no-op handler then lets us exit 0 instead of dying by it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        sock.listen(2048)
        server.run(sockets=[sock])
    finally:
        built.close()
        sock.close()
    print("starlift serve: stopped", file=sys.stderr, flush=True)
    return 0
