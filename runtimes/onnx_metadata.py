"""Reading a decoder's shapes from an ONNX file and the artifact around it (no backend needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from starlift.core.errors import StarliftError

from .base import ModelMeta, kv_inputs_from_names

ONNX_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def artifact_context(model_path: Path) -> int | None:
    """The context length from the artifact's config.json, when there is one."""
    config = Path(model_path).parent / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("max_position_embeddings")
    return None


def meta_from_io(inputs: dict[str, tuple], outputs: dict[str, tuple], kv_type: str, model_path: Path) -> ModelMeta:
    for required in ("input_ids", "attention_mask", "position_ids"):
        if required not in inputs:
            raise StarliftError(f"{model_path} has no {required!r} input: not a decoder with the starlift contract")
    if "logits" not in outputs:
        raise StarliftError(f"{model_path} has no 'logits' output")
    layers, kv_heads, head_dim = kv_inputs_from_names(inputs)
    vocab = outputs["logits"][-1]
    if not isinstance(vocab, int):
        raise StarliftError(f"{model_path}: the logits' last dim is {vocab!r}, expected a static vocabulary size")
    np_type = ONNX_TO_NUMPY.get(kv_type)
    if np_type is None:
        raise StarliftError(f"{model_path}: KV cache type {kv_type} is not supported by this runner")
    return ModelMeta(layers, kv_heads, head_dim, vocab, np.dtype(np_type), artifact_context(model_path))
