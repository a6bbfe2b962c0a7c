"""Runners: one per backend (torch, onnxruntime, openvino, tensorrt), behind one surface.

Backends are imported lazily: importing this package needs none of them.
"""

from __future__ import annotations

from pathlib import Path

from starlift.core.errors import UsageError

from .base import ModelMeta, Runner

# backend -> (module, class, needs an ONNX artifact)
BACKENDS = {
    "torch": ("starlift.runtimes.torch_runner", "TorchRunner", False),
    "onnxruntime": ("starlift.runtimes.onnxruntime_runner", "OnnxRuntimeRunner", True),
    "openvino": ("starlift.runtimes.openvino_runner", "OpenVinoRunner", True),
    "tensorrt": ("starlift.runtimes.tensorrt_runner", "TensorRTRunner", True),
}


def runner_class(backend: str) -> type[Runner]:
    import importlib

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    module, cls, _ = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)


def create_runner(backend: str, path: str | Path, **options) -> Runner:
    """A runner for an artifact folder (ONNX backends) or a checkpoint folder (torch)."""
    cls = runner_class(backend)
    if BACKENDS[backend][2]:
        return cls(Path(path) / "model.onnx", **options)
    return cls(path, **options)


__all__ = ["BACKENDS", "ModelMeta", "Runner", "create_runner", "runner_class"]
