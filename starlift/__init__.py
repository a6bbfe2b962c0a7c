"""starlift: StarCoder2 from its reference PyTorch form to validated, packaged ONNX artifacts.

Stages are subpackages: ``starlift.model`` <- ``starlift.export`` <- ``starlift.quantize``;
``starlift.runtimes`` never imports ``export``. Heavy libraries load lazily.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArtifactError,
    CheckpointError,
    ConfigError,
    ParityError,
    StarliftError,
    UsageError,
)

__all__ = ["ArtifactError", "CheckpointError", "ConfigError", "ParityError", "StarliftError", "UsageError",
           "__version__"]
