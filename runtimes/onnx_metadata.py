"""Reading a decoder's shapes from an ONNX file and the artifact around it (no backend needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from starlift.core.artifact import shares_kv_buffer
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


def has_group_query_attention(model_path: Path) -> bool:
    """Whether the graph runs attention in GroupQueryAttention, which can update a shared KV
    buffer in place. An artifact's manifest says so (the core install has no ``onnx`` to read the
    graph with, and needs none); a bare ONNX file is read with ``onnx`` when it is installed (the
    graph only, no weights) and otherwise taken as a concat graph, which is always correct, only
    slower for a GQA graph."""
    shared = shares_kv_buffer(model_path)
    if shared is not None:
        return shared
    try:
        import onnx
    except ImportError:
        return False
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(n.op_type == "GroupQueryAttention" for n in all_nodes(graph))


def all_nodes(graph):
    """Every node of an ONNX graph, those of its If branches included (the ort flavour runs each
    layer's attention inside an If: the prompt fast path, export/gqa.py)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from all_nodes(sub)
