"""The public entry points: ``load`` (any artifact or checkpoint, any backend), ``load_classifier`` and
``pipeline`` (text generation, text and token classification)."""

from __future__ import annotations

import json
from pathlib import Path

from starlift.core.artifact import MANIFEST, verify
from starlift.core.errors import UsageError
from starlift.engine.generation import Generator
from starlift.model.folders import resolve_checkpoint
from starlift.model.tokenizer import Tokenizer
from starlift.runtimes import BACKENDS, create_runner


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _eos(folder: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if eos is not None:
                return int(eos)
    return None


def artifact_task(folder: Path) -> str:
    """The task an artifact or checkpoint folder serves (its manifest, else its config.json)."""
    from starlift.core.artifact import read_manifest

    if is_artifact(folder):
        return read_manifest(folder).get("task", "text-generation")
    from starlift.model.config import Starcoder2Config

    return Starcoder2Config.from_hf(folder).task


ENGINE_OPTIONS = ("max_batch", "max_queue", "prefill_chunk", "prefill_budget")



def _model_folder(path, backend: str, needs_artifact: bool, verify_artifact, public_key) -> Path:
    """The folder a runner loads: an artifact, verified (and signature-checked with a key) before
    any byte of the model is read, or a checkpoint for the backends that run one."""
    if is_artifact(path):
        folder = Path(path)
        if backend == "torch":
            raise UsageError(f"{folder} is an ONNX artifact; the torch backend runs a checkpoint folder "
                             "(the one the artifact was exported from)")
        if verify_artifact not in (True, False, "full"):
            raise UsageError(f"verify_artifact must be True, False or 'full', got {verify_artifact!r}")
        if public_key is not None or verify_artifact:
            verify(folder, check_onnx=False, public_key=public_key, fast=verify_artifact is True)
        return folder
    if public_key is not None:
        raise UsageError(f"{path} is not a starlift artifact (no manifest.json), so it carries no signature to "
                         "check against the public key; export it and sign the artifact")
    folder = resolve_checkpoint(path)  # first: a path that is neither gets the checkpoint loader's error
    if needs_artifact:
        raise UsageError(f"{path} is a checkpoint, not an exported artifact; the {backend} backend needs one: "
                         f"run `starlift export {path} OUT` and load OUT, or use backend='torch'")
    return folder

def load(path: str | Path, backend: str = "onnxruntime", *, verify_artifact: bool | str = True,
         public_key: str | Path | None = None, **options) -> Generator:
    """A Generator for an artifact folder (ONNX backends) or a checkpoint folder / bundled name /
    Hub id in the local Hugging Face cache (torch).

    Artifacts are checked against their manifest first. The first load hashes every file; later
    loads trust a size/mtime/ctime/inode stamp of the files as they were when last hashed intact
    and hash again as soon as any file changed (see ``starlift.core.artifact.verify``).
    ``verify_artifact="full"`` hashes every byte anyway, ``False`` skips the check: a corrupted
    weight file then runs without any error. ``public_key`` (a trusted signer's public key file,
    or a folder of them) also requires a valid signature over the manifest, checked before any
    byte of the model is read. ``max_batch``, ``max_queue``, ``prefill_chunk`` and ``prefill_budget`` go to the engine
    (see docs/guide/engine.md); the other ``options`` go to the runner (e.g. ``threads``,
    ``providers``, ``precision``).
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    folder = _model_folder(path, backend, BACKENDS[backend][2], verify_artifact, public_key)
    task = artifact_task(folder)
    if task != "text-generation":
        raise UsageError(f"{path} is a {task} model, not a text generator: use starlift.pipeline({task!r}, "
                         f"model={str(path)!r}) or `starlift classify`")
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    engine_options = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
    runner = create_runner(backend, folder, **options)
    return Generator(runner, tokenizer, _eos(folder), source=folder, **engine_options)


class TextGenerationPipeline:
    """transformers-style: ``pipe(text)`` -> ``[{"generated_text": text + completion}]``."""

    def __init__(self, generator: Generator):
        self.generator = generator

    def __call__(self, text, return_full_text: bool = True, **kwargs):
        if isinstance(text, str):
            completion = self.generator.generate(text, **kwargs)
            return [{"generated_text": (text if return_full_text else "") + completion}]
        if isinstance(text, (list, tuple)):
            completions = self.generator.generate(list(text), **kwargs)
            return [[{"generated_text": (t if return_full_text else "") + c}] for t, c in
                    zip(text, completions, strict=True)]
        raise UsageError("the pipeline takes a str or a list of str")


# transformers' task names and aliases -> the task starlift runs
TASKS = {"text-generation": "text-generation", "text-classification": "text-classification",
         "sentiment-analysis": "text-classification", "token-classification": "token-classification",
         "ner": "token-classification"}
# keyword arguments a classification pipeline takes at creation (the rest go to the runner)
_PIPELINE_KWARGS = {"text-classification": ("top_k", "function_to_apply", "truncation"),
                    "token-classification": ("aggregation_strategy", "ignore_labels", "truncation")}


def load_classifier(path: str | Path, backend: str = "onnxruntime", *, verify_artifact: bool | str = True,
                    public_key: str | Path | None = None, batch_size: int = 8, **options):
    """A :class:`starlift.engine.classification.Classifier` for a classification artifact (ONNX
    backends) or checkpoint (``backend="torch"``), verified and signature-checked as ``load`` does;
    ``options`` go to the runner."""
    from starlift.engine.classification import Classifier
    from starlift.runtimes.classifiers import CLASSIFIER_BACKENDS, create_classifier

    if backend not in CLASSIFIER_BACKENDS:
        raise UsageError(f"backend {backend!r} has no classifier runner; classifier backends: "
                         f"{', '.join(CLASSIFIER_BACKENDS)}")
    folder = _model_folder(path, backend, CLASSIFIER_BACKENDS[backend][1], verify_artifact, public_key)
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    return Classifier(create_classifier(backend, folder, **options), tokenizer, batch_size=batch_size)


def pipeline(task: str, model: str | Path, backend: str = "onnxruntime", **options):
    """transformers-style pipelines: ``text-generation``, ``text-classification`` (alias
    ``sentiment-analysis``) and ``token-classification`` (alias ``ner``)."""
    if task not in TASKS:
        raise UsageError(f"unsupported task {task!r}; starlift pipelines do {', '.join(TASKS)}")
    task = TASKS[task]
    if task == "text-generation":
        return TextGenerationPipeline(load(model, backend=backend, **options))
    from starlift.engine.classification import TextClassificationPipeline, TokenClassificationPipeline

    found = artifact_task(Path(model) if is_artifact(model) else resolve_checkpoint(model))
    if found != task:
        raise UsageError(f"{model} is a {found} model, but the {task!r} pipeline was asked for; use "
                         f"starlift.pipeline({found!r}, model=...)")
    kwargs = {k: options.pop(k) for k in _PIPELINE_KWARGS[task] if k in options}
    classifier = load_classifier(model, backend=backend, **options)
    cls = TextClassificationPipeline if task == "text-classification" else TokenClassificationPipeline
    return cls(classifier, **kwargs)
