"""starlift: StarCoder2 from its reference PyTorch form to validated, packaged ONNX artifacts.

Stages are subpackages: ``starlift.model`` <- ``starlift.export`` <- ``starlift.quantize``;
``starlift.runtimes`` never imports ``export``. Heavy libraries load lazily.
"""

__version__ = "0.1.0"

from .core.errors import (  # noqa: E402
    ArtifactError,
    CheckpointError,
    ConfigError,
    ParityError,
    StarliftError,
    UsageError,
)


def load(path, backend="onnxruntime", **options):
    """A :class:`starlift.engine.generation.Generator` for an artifact or checkpoint (see ``starlift.api.load``)."""
    from .api import load as _load

    return _load(path, backend=backend, **options)


def pipeline(task, model, backend="onnxruntime", **options):
    """transformers-style ``pipeline("text-generation" | "text-classification" | "token-classification",
    model=PATH, backend=...)`` (see ``starlift.api.pipeline``)."""
    from .api import pipeline as _pipeline

    return _pipeline(task, model=model, backend=backend, **options)


__all__ = ["ArtifactError", "load", "pipeline", "CheckpointError", "ConfigError", "ParityError", "StarliftError", "UsageError",
           "__version__"]
