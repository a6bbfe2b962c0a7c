"""``starlift serve ARTIFACT --ray``: the app of ``starlift serve`` as a Ray Serve deployment
(``starlift[ray]``), one engine per replica, reached through Ray Serve's HTTP proxy.

Every replica builds the very app ``starlift serve`` runs (``starlift.serve.build.build_app``):
it verifies the artifact's manifest hashes (and its signature against the trusted keys the
command was given, shipped to the replica as key bytes) before it loads a byte of the model, and
raises instead of serving when it cannot. Ray Serve then marks the deployment failed after a
bounded number of attempts and the command exits 1 with the replica's reason.

Each answer carries ``X-Starlift-Replica`` (the Ray Serve replica id) and
``X-Starlift-Replica-Pid`` (its process), so that one can see which replica served a request.
Ray is imported only here; the rest of starlift never needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import tempfile
import threading
from dataclasses import fields, replace
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from starlift.core.errors import ArtifactError, StarliftError, UsageError

from .build import ServeOptions, build_app

# The replica's refusal, marked so the command can pick its reason out of Ray's deploy error.
REFUSED = "starlift replica refused to serve:"
REFUSED_RE = re.compile(re.escape(REFUSED) + r" (.+)")
DEPLOYMENT = "starlift"


class _ReplicaHeaders:
    """Pure ASGI middleware: which replica (and process) answered, on every response."""

    def __init__(self, app, replica: str):
        self.app = app
        self.headers = [(b"x-starlift-replica", replica.encode()), (b"x-starlift-replica-pid", str(os.getpid()).encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class StarliftReplica:
    """One replica: the artifact verified and loaded, the engine warmed up, then the app."""

    async def __init__(self, options: ServeOptions, keys: dict[str, bytes] | None = None):
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._keys_dir = None
        self.built = None
        where = f"replica {self.replica} on {socket.gethostname()} (pid {os.getpid()})"
        try:
            if keys:  # the operator's trusted keys, written where this replica can read them
                self._keys_dir = tempfile.TemporaryDirectory(prefix="starlift-keys-")
                for name, data in keys.items():
                    (Path(self._keys_dir.name) / Path(name).name).write_bytes(data)
                options = replace(options, public_key=self._keys_dir.name)
            if not Path(options.artifact).exists() and options.backend != "torch":
                raise ArtifactError(f"{options.artifact} does not exist on this node; put the artifact at the same "
                                    "path on every node (shared storage or a copy per node, see "
                                    "docs/guide/scale-out.md)")
            # the load runs in a thread: the replica's event loop keeps answering Ray's health checks
            self.built = await asyncio.to_thread(build_app, options)
        except StarliftError as e:
            self._cleanup()
            # a RuntimeError with the reason on one marked line: Ray Serve reports the constructor's
            # error in the deployment's status, where `starlift serve --ray` finds it
            raise RuntimeError(f"{REFUSED} {where}: {e}") from None
        self.built.app.add_middleware(_ReplicaHeaders, replica=self.replica)

    def __serve_build_asgi_app__(self):
        return self.built.app

    def _cleanup(self) -> None:
        if self.built is not None:
            self.built.close()
            self.built = None
        if self._keys_dir is not None:
            self._keys_dir.cleanup()
            self._keys_dir = None

    def __del__(self):
        self._cleanup()


def app_builder(args: dict):
    """The deployment for Ray Serve's own tooling: ``serve run starlift.serve.ray_serve:app_builder
    artifact=/models/nano [public_key=/keys/build.key.pub] [max_concurrency=8] ...`` or the
    ``import_path`` of a Serve config file (KubeRay's ``RayService``, docs/guide/scale-out.md).
    ``args`` are ``ServeOptions`` fields (values may be strings, as Serve's command line gives
    them); replicas, CPUs and autoscaling come from the config's ``deployments: - name: starlift``."""
    names = {f.name for f in fields(ServeOptions)}
    unknown = sorted(set(args) - names)
    if unknown or "artifact" not in args:
        raise UsageError(f"app_builder takes {', '.join(sorted(names))} (artifact required); got {sorted(args)}")
    values = dict(args)
    for name in ("max_concurrency", "max_queue", "prefill_chunk", "prefill_budget", "threads"):
        if values.get(name) is not None:
            values[name] = int(values[name])
    if isinstance(values.get("verify"), str):
        values["verify"] = values["verify"].lower() not in ("0", "false", "no")
    keys = key_files(values.pop("public_key", None))
    return StarliftReplica.bind(ServeOptions(**values), keys)


def key_files(public_key: str | None) -> dict[str, bytes] | None:
    """The trusted keys ``--public-key`` names, read (and checked) where the command runs."""
    if public_key is None:
        return None
    from starlift.core.signing import PUBLIC_SUFFIXES, trusted_keys

    trusted_keys(public_key)  # a wrong path or a private key fails here, before any replica starts
    path = Path(public_key)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in PUBLIC_SUFFIXES)
    return {p.name: p.read_bytes() for p in files}


def deployment_options(args: argparse.Namespace) -> dict:
    """Ray Serve's options for the deployment from the command line."""
    # a replica takes as many requests as its engine has rows plus its queue; beyond that the
    # proxy holds them (Ray Serve's back-pressure) instead of the engine answering 429
    opts = {"ray_actor_options": {"num_cpus": args.cpus_per_replica},
            "max_ongoing_requests": args.max_concurrency + args.max_queue,
            "graceful_shutdown_timeout_s": args.grace_period,
            "health_check_period_s": 5.0}
    if args.autoscale is not None:
        low, high = args.autoscale
        opts["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                      # scale up once the engines' rows are busy on average
                                      "target_ongoing_requests": args.max_concurrency}
        target = max(low, 1)
    else:
        target = args.replicas or 1
        opts["num_replicas"] = target
    # a refusal (missing or tampered artifact, wrong key) is the same on every try: fail after one
    # constructor error per replica on average instead of Ray's 3 per replica
    opts["max_constructor_retry_count"] = target
    return opts


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _status_text(name: str) -> str:
    """Ray Serve's status messages of the application ``name`` (a failed replica's traceback)."""
    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return ""
    if app is None:
        return ""
    return "\n".join([app.message or "", *(d.message or "" for d in app.deployments.values())])


def _reason(error: BaseException, details: str = "") -> str:
    """The replica's own reason from Ray Serve's deploy error (or status), else its first lines."""
    text = f"{details}\n{error}"
    if m := REFUSED_RE.search(text):
        return m.group(1).strip()
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return " / ".join(lines[:3])[:600] if lines else type(error).__name__


def serve_on_ray(args: argparse.Namespace, options: ServeOptions) -> int:
    """Deploy, print the ready line, serve until SIGTERM/Ctrl-C, then delete the deployment."""
    import sys

    keys = key_files(options.public_key)
    if Path(options.artifact).exists():  # replicas have another working directory
        options = replace(options, artifact=str(Path(options.artifact).expanduser().absolute()))
    options = replace(options, public_key=None)  # the replicas get the keys themselves
    address = args.address or os.environ.get("RAY_ADDRESS")
    port = args.port or _free_port(args.host)
    init = {"address": address, "log_to_driver": False, "configure_logging": False}
    if not address:  # a private single-machine Ray for this command (never someone else's)
        init.update(address="local", include_dashboard=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Ray's progress lines, not ours
    try:
        ray.init(**init)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot join the Ray cluster at {address}: {_reason(e)}; start one with `ray start --head` "
                         "or check --address") from None
    name = options.model_name
    stop = threading.Event()
    deployed = False
    try:
        serve.start(http_options={"host": args.host, "port": port})
        running = serve.status().applications
        if name in running:  # serve.run would replace it, and our exit would delete it
            raise UsageError(f"an application named {name!r} already runs on this Ray cluster; choose another "
                             "--served-model-name or stop it first (`serve shutdown` stops every application)")
        app = StarliftReplica.options(**deployment_options(args)).bind(options, keys)
        deployed = True
        try:
            serve.run(app, name=name, route_prefix="/")
        except RayServeException as e:  # refused by the controller (e.g. the route "/" is taken)
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise UsageError(f"Ray Serve refused the deployment: {last[0].split('RayServeException: ')[-1]}") from None
        except RuntimeError as e:
            raise ArtifactError(f"the Ray Serve deployment {name!r} failed: {_reason(e, _status_text(name))}") from None
        n = f"{args.autoscale[0]}-{args.autoscale[1]} replicas (autoscaling)" if args.autoscale else \
            f"{args.replicas or 1} replica{'s' if (args.replicas or 1) > 1 else ''}"
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"starlift serve: ready on http://{shown}:{port} (model {name!r}, Ray Serve, {n} x "
              f"{args.cpus_per_replica:g} CPU, {args.max_concurrency} rows and queue {args.max_queue} each)",
              flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        if deployed:
            try:
                serve.delete(name)  # replicas drain their requests within --grace-period
                if not serve.status().applications:
                    serve.shutdown()
            except Exception as e:  # noqa: BLE001 - the cluster may be gone already; say so, do not mask
                print(f"starlift serve: could not remove the deployment {name!r}: {e}", file=sys.stderr)
        ray.shutdown()
    print("starlift serve: stopped", file=sys.stderr, flush=True)
    return 0
