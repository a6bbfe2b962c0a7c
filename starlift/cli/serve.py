"""``starlift serve ARTIFACT``: an OpenAI-compatible HTTP server on the engine (``starlift[serve]``).

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
    p.add_argument("--public-key", default=None,
                   help="refuse the artifact unless it is signed by this public key (KEY.pub) or one in this folder; "
                        "checked before the model is loaded (default: no signature required)")
    p.add_argument("--no-verify", action="store_true", help="skip the artifact's hash check (not recommended)")
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
    if args.chat_template and not Path(args.chat_template).is_file():
        raise UsageError(f"--chat-template {args.chat_template}: no such file")


def _imports():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UsageError(f"starlift serve needs the serve extra ({e.name} is missing): "
                         "pip install 'starlift[serve]'") from None
    return uvicorn


def main(args: argparse.Namespace) -> int:
    _check(args)
    uvicorn = _imports()
    import starlift
    from starlift.api import artifact_task, is_artifact
    from starlift.core.artifact import read_manifest
    from starlift.serve import chat_template_of, create_app, create_classify_app

    # Bind first, so a port in use fails before the model loads; listen only once ready.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot bind {args.host}:{args.port} ({e.strerror}); choose another --port") from None

    name = args.served_model_name or Path(str(args.artifact).rstrip("/")).name
    runner_options = {"threads": args.threads} if args.threads else {}
    task = artifact_task(Path(args.artifact)) if is_artifact(args.artifact) else "text-generation"
    if task != "text-generation":  # a classification artifact: /v1/classify
        gen = starlift.pipeline(task, args.artifact, backend=args.backend, verify_artifact=not args.no_verify,
                                public_key=args.public_key, **runner_options)
        app = create_classify_app(gen, model_name=name, api_key=args.api_key, max_queue=args.max_queue)
        close, backend = gen.classifier.close, args.backend
        gen("def main():\n    pass\n")  # warm-up
    else:
        options = {"max_batch": args.max_concurrency, "max_queue": args.max_queue, **runner_options}
        if args.prefill_chunk:
            options["prefill_chunk"] = args.prefill_chunk
        if args.prefill_budget:
            options["prefill_budget"] = args.prefill_budget
        gen = starlift.load(args.artifact, backend=args.backend, verify_artifact=not args.no_verify,
                            public_key=args.public_key, **options)
        close, backend = gen.close, gen.backend
    try:
        if task == "text-generation":
            template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else \
                chat_template_of(gen.source) if gen.source else None
            precision = read_manifest(Path(args.artifact)).get("precision") if is_artifact(args.artifact) else None
            app = create_app(gen, model_name=name, api_key=args.api_key, chat_template=template, precision=precision)
            _warm_up(gen)
        config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=args.grace_period, timeout_keep_alive=30)
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"starlift serve: ready on http://{shown}:{port} (model {name!r}, {task}, {backend}, "
              f"{args.max_concurrency} rows, queue {args.max_queue})", flush=True)
        # uvicorn handles SIGTERM/SIGINT itself (stop accepting, drain, return) and raises the
        # signal again once done: a no-op handler then lets us exit 0 instead of dying by it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        sock.listen(2048)
        server.run(sockets=[sock])
    finally:
        close()
        sock.close()
    print("starlift serve: stopped", file=sys.stderr, flush=True)
    return 0


def _warm_up(gen) -> None:
    """One short request through every path a first caller takes (prefill, decode, sampling)."""
    from starlift.engine import SamplingParams

    prompt = gen.tokenizer.encode("def main():\n") if gen.tokenizer else [1, 2, 3]
    for params in (SamplingParams(max_new_tokens=4, ignore_eos=True),
                   SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=0, ignore_eos=True)):
        gen.engine.submit(prompt, params).wait(timeout=300)
