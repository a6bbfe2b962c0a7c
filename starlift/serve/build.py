"""Load an artifact and build the ASGI app over it: what ``starlift serve`` runs under uvicorn and
what every replica of ``starlift serve --ray`` runs under Ray Serve (one app, two hosts).

``ServeOptions`` is plain data (picklable, so Ray can ship it to the replicas); ``build_app``
verifies the artifact (hashes, and the signature when trusted keys are given) before loading a
byte of the model, loads it, warms the engine up and returns the app with its ``close``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A server shares its cores with its own HTTP threads (and, on a small machine, with clients and
# neighbours): ONNX Runtime's intra-op threads then must not busy-wait between kernels. With
# spinning, a step's parallel loops wait for a thread the OS has given to someone else, and every
# other thread burns its core meanwhile. Measured on 2 cores (docs/performance/serve.md): no
# difference on a quiet machine, 1.3-1.7x the throughput with other jobs running.
SERVE_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


@dataclass
class ServeOptions:
    artifact: str
    backend: str = "onnxruntime"
    max_concurrency: int = 8
    max_queue: int = 64
    prefill_chunk: int | None = None
    prefill_budget: int | None = None
    threads: int | None = None
    session_config: dict[str, str] | None = None  # ONNX Runtime session config entries, over SERVE_SESSION_CONFIG
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None  # the template's text (read where the command runs)
    public_key: str | None = None  # a public-key file or a folder of them, on the host that builds the app
    verify: bool = True

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(str(self.artifact).rstrip("/")).name


@dataclass
class BuiltApp:
    app: Any
    close: Any
    task: str
    backend: str


def build_app(options: ServeOptions) -> BuiltApp:
    """Verify, load and warm up ``options.artifact``; the FastAPI app over it (generation or
    classification, by the artifact's task)."""
    import starlift
    from starlift.api import artifact_task, is_artifact
    from starlift.core.artifact import read_manifest

    from .app import chat_template_of, create_app, create_classify_app

    o = options
    task = artifact_task(Path(o.artifact)) if is_artifact(o.artifact) else "text-generation"
    runner_options = runner_options_of(o, task)
    if task != "text-generation":  # a classification artifact: /v1/classify
        pipe = starlift.pipeline(task, o.artifact, backend=o.backend, verify_artifact=o.verify,
                                 public_key=o.public_key, **runner_options)
        try:
            app = create_classify_app(pipe, model_name=o.model_name, api_key=o.api_key, max_queue=o.max_queue)
            pipe("def main():\n    pass\n")  # warm-up
        except BaseException:
            pipe.classifier.close()
            raise
        return BuiltApp(app, pipe.classifier.close, task, o.backend)
    engine_options = {"max_batch": o.max_concurrency, "max_queue": o.max_queue, **runner_options}
    if o.prefill_chunk:
        engine_options["prefill_chunk"] = o.prefill_chunk
    if o.prefill_budget:
        engine_options["prefill_budget"] = o.prefill_budget
    gen = starlift.load(o.artifact, backend=o.backend, verify_artifact=o.verify, public_key=o.public_key,
                        **engine_options)
    try:
        template = o.chat_template if o.chat_template is not None else \
            chat_template_of(gen.source) if gen.source else None
        precision = read_manifest(Path(o.artifact)).get("precision") if is_artifact(o.artifact) else None
        app = create_app(gen, model_name=o.model_name, api_key=o.api_key, chat_template=template,
                         precision=precision)
        warm_up(gen)
    except BaseException:
        gen.close()
        raise
    return BuiltApp(app, gen.close, task, gen.backend)


def runner_options_of(options: ServeOptions, task: str = "text-generation") -> dict[str, Any]:
    """The runner's options for a served artifact: threads, and for ONNX Runtime's generation runner
    the session config (``SERVE_SESSION_CONFIG`` under the user's entries)."""
    from starlift.core.errors import UsageError

    o = options
    runner_options: dict[str, Any] = {"threads": o.threads} if o.threads else {}
    if task != "text-generation":
        if o.session_config:
            raise UsageError("--session-config applies to text-generation artifacts only")
    elif o.backend == "onnxruntime":
        runner_options["session_config"] = {**SERVE_SESSION_CONFIG, **(o.session_config or {})}
    return runner_options


def warm_up(gen) -> None:
    """One short request through every path a first caller takes (prefill, decode, sampling)."""
    from starlift.engine import SamplingParams

    prompt = gen.tokenizer.encode("def main():\n") if gen.tokenizer else [1, 2, 3]
    for params in (SamplingParams(max_new_tokens=4, ignore_eos=True),
                   SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9, seed=0, ignore_eos=True)):
        gen.engine.submit(prompt, params).wait(timeout=300)
