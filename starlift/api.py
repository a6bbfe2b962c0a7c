"""The public entry points: ``load`` (any artifact or checkpoint, any backend) and ``pipeline``."""

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
    byte of the model is read. ``options`` go to the runner (e.g. ``threads``, ``providers``,
    ``precision``).
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if is_artifact(path):
        folder = Path(path)
        if backend == "torch":
            raise UsageError(f"{folder} is an ONNX artifact; the torch backend runs a checkpoint folder "
                             "(the one the artifact was exported from)")
        if verify_artifact not in (True, False, "full"):
            raise UsageError(f"verify_artifact must be True, False or 'full', got {verify_artifact!r}")
        if public_key is not None or verify_artifact:
            verify(folder, check_onnx=False, public_key=public_key, fast=verify_artifact is True)
    else:
        if public_key is not None:
            raise UsageError(f"{path} is not a starlift artifact (no manifest.json), so it carries no signature to "
                             "check against the public key; export it and sign the artifact")
        folder = resolve_checkpoint(path)
        if BACKENDS[backend][2]:
            raise UsageError(f"{path} is a checkpoint, not an exported artifact; the {backend} backend needs one: "
                             f"run `starlift export {path} OUT` and load OUT, or use backend='torch'")
    tokenizer = Tokenizer.from_file(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    runner = create_runner(backend, folder, **options)
    return Generator(runner, tokenizer, _eos(folder), source=folder)


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


def pipeline(task: str, model: str | Path, backend: str = "onnxruntime", **options) -> TextGenerationPipeline:
    if task != "text-generation":
        raise UsageError(f"unsupported task {task!r}; starlift pipelines do 'text-generation'")
    return TextGenerationPipeline(load(model, backend=backend, **options))
