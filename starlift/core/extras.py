"""Optional dependencies and the extra that installs each.

The core install (``pip install starlift``) runs artifacts on ONNX Runtime: numpy, tokenizers,
onnxruntime. Everything else comes with an extra; a feature that needs one fails with an error
naming it instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util

from .errors import UsageError

# importable top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "torch": "export", "safetensors": "export", "onnxscript": "export",
    "onnx": "quantize", "onnx_ir": "quantize", "ml_dtypes": "quantize", "tqdm": "quantize",
    "openvino": "openvino",
    "onnxruntime_genai": "genai",
    "psutil": "bench", "matplotlib": "bench", "transformers": "bench",
    "cryptography": "sign",
    "ray": "ray",
}


# extras that bring others with them (pyproject.toml: export = ["starlift[quantize]", ...])
INCLUDES = {"export": {"quantize"}, "bench": {"export", "quantize"}, "ray": {"serve"}}


class MissingExtraError(UsageError):
    """A feature whose library is not installed; the message names the extra to install."""


def extra_for(module: str | None) -> str | None:
    """The extra that installs ``module`` (a dotted name is looked up by its top level)."""
    return EXTRA_OF.get((module or "").split(".")[0])


def install_hint(extra: str) -> str:
    return f"pip install 'starlift[{extra}]'"


def missing(*modules: str) -> list[str]:
    """The modules of ``modules`` that cannot be imported (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(*modules: str, purpose: str) -> None:
    """Raise MissingExtraError naming the extra when any of ``modules`` is not installed."""
    absent = missing(*modules)
    if absent:
        extras = {extra_for(m) or m for m in absent}
        extras = sorted(e for e in extras if not any(e in INCLUDES.get(other, ()) for other in extras))
        raise MissingExtraError(f"{purpose} needs {', '.join(absent)}, which this install lacks: "
                                + " and ".join(install_hint(e) for e in extras))


def error_for_missing_module(error: ModuleNotFoundError, purpose: str) -> MissingExtraError | None:
    """A MissingExtraError for an ImportError of an optional library, None for anything else."""
    extra = extra_for(error.name)
    if extra is None:
        return None
    top = error.name.split(".")[0]
    if importlib.util.find_spec(top) is not None:  # installed, but a version without that module
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = f"{top} {version(top.replace('_', '-'))}"
        except PackageNotFoundError:
            installed = top
        return MissingExtraError(f"{purpose} needs {error.name}, which the installed {installed} lacks: "
                                 f"pip install -U 'starlift[{extra}]'")
    return MissingExtraError(f"{purpose} needs {top}, which this install lacks: {install_hint(extra)}")
