"""Which ONNX tensor holds which point of the reference model's residual stream.

Recorded at export time (``manifest.json`` -> ``tensor_map``) so that localization never guesses
from names. The points, in the order the residual stream passes them::

    layer -1  embedding   model.embed_tokens output                       (Gather)
    layer i   attention   x + self_attn(input_layernorm(x))               (Add, or SkipLayerNormalization output 3)
    layer i   mlp         x + mlp(post_attention_layernorm(x))            (Add, or SkipLayerNormalization output 3)
    layer L   head        model.norm output, then the logits              (LayerNormalization / SkipLayerNormalization output 0)

The exporter gives these values the names below while tracing (``starlift.model.taps``) and
checks after every graph pass that each one is still produced by a node; fused ops keep the
name on the output that carries the same value (ONNX Runtime's SkipLayerNormalization exposes
the residual sum as its fourth output), so fused graphs are compared at their ops' boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BLOCKS = ("embedding", "attention", "mlp", "head")
FORMAT = 1


@dataclass(frozen=True)
class Point:
    layer: int  # -1 for the embedding, num_layers for the head
    block: str  # one of BLOCKS
    tensor: str  # the ONNX value's name
    describes: str  # the reference module it stands for


def points(num_layers: int) -> list[Point]:
    """Every tap of a model with ``num_layers`` decoder layers, in residual-stream order."""
    out = [Point(-1, "embedding", "model.embed_tokens.output", "model.embed_tokens")]
    for i in range(num_layers):
        out.append(Point(i, "attention", f"model.layers.{i}.residual_after_attention",
                         f"model.layers.{i}: input + self_attn(input_layernorm(input))"))
        out.append(Point(i, "mlp", f"model.layers.{i}.residual_after_mlp",
                         f"model.layers.{i}: residual + mlp(post_attention_layernorm(residual))"))
    out.append(Point(num_layers, "head", "model.norm.output", "model.norm"))
    return out


def resolve(nodes, num_layers: int) -> dict[str, Any]:
    """The manifest's ``tensor_map`` for a graph, from its nodes' ``(op_type, output names)``.

    ``nodes``: iterable of ``(op_type, [output names])``. A tap no node produces any more (a pass
    removed it) is recorded with ``tensor: null`` and the reason, never replaced by a guess.
    """
    producers: dict[str, tuple[str, int]] = {}
    for op_type, outputs in nodes:
        for index, name in enumerate(outputs):
            if name:
                producers[name] = (op_type, index)
    entries = []
    for p in points(num_layers):
        entry: dict[str, Any] = {"layer": p.layer, "block": p.block, "tensor": p.tensor, "reference": p.describes}
        if p.tensor in producers:
            entry["op"], entry["output_index"] = producers[p.tensor]
        else:
            entry["tensor"] = None
            entry["missing"] = f"{p.tensor} is not produced by any node of the graph"
        entries.append(entry)
    entries.append({"layer": num_layers, "block": "head", "tensor": "logits", "reference": "lm_head",
                    "op": producers.get("logits", ("", 0))[0], "output_index": producers.get("logits", ("", 0))[1]})
    return {"format": FORMAT, "num_layers": num_layers, "tensors": entries}


def resolve_onnx(model_proto, num_layers: int) -> dict[str, Any]:
    """``resolve`` for an ``onnx.ModelProto`` (its main graph)."""
    return resolve(((n.op_type, list(n.output)) for n in model_proto.graph.node), num_layers)


def resolve_ir(model, num_layers: int) -> dict[str, Any]:
    """``resolve`` for an ``onnx_ir.Model``."""
    return resolve(((n.op_type, [v.name for v in n.outputs]) for n in model.graph), num_layers)


def read(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's tensor map, or None for artifacts exported before it existed."""
    tmap = manifest.get("tensor_map")
    if not isinstance(tmap, dict) or tmap.get("format") != FORMAT or not isinstance(tmap.get("tensors"), list):
        return None
    return tmap
