"""(In core because both export/ and quantize/ use it and neither may import the other.)

A written artifact's graph cut to its first N layers plus the final norm and the LM head.

Used to validate big models without a second copy of the weights: the cut graph is saved next
to the artifact's ``model.onnx`` and points into the *same* ``model.onnx.data`` (the bytes that
ship), so a session on it reads only the embedding, N layers and the head. ONNX Runtime's CPU
provider runs fp16 MatMuls through fp32 copies of their weights: on the whole graph that is
twice the fp16 artifact on top of it (measured: 3.13x the checkpoint for the 3b shape); on the
cut it is 2 x (embedding + N layers).

The cut, on any flavour (portable LayerNormalization, ort SkipLayerNormalization, fp32 Casts
in front of an fp16 norm)::

    layer N-1 ... -> [x, residual] -> norm(model.layers.N.input_layernorm) -> layer N ... -> final norm -> head
      becomes
    layer N-1 ... -> [x, residual] -> final norm(model.norm) -> head

i.e. the final norm reads what layer N's input norm (the graph's norm number 2N, in order) read,
all but its own scale and shift (the two are the same op with the same
kind of inputs), then every node, input and output that no longer reaches a graph output goes.
The graph is loaded without its weights (onnx_ir external tensors are read lazily).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlift.core.artifact import LOGITS_TO_KEEP_START

if TYPE_CHECKING:  # onnx_ir comes with the export/quantize extras, not the core install
    import onnx_ir as ir

NORMS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
         "SkipSimplifiedLayerNormalization")


def cut_layers(model: ir.Model, layers: int) -> ir.Model:
    """``model`` (in place) cut to its first ``layers`` decoder layers; returns it."""
    graph = model.graph
    total = sum(1 for v in graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith(".key"))
    # by position: the optimizer folds the norms' fp32 Casts into initializers with the exporter's
    # names, so the checkpoint's names are gone; every layer has two norms, then the final one
    norms = [n for n in graph if n.op_type in NORMS]
    if len(norms) != 2 * total + 1 or not 0 < layers < total:
        raise ValueError(f"cannot cut the graph after {layers} of {total} layers ({len(norms)} norm nodes)")
    final, cut = norms[-1], norms[2 * layers]
    if final.op_type != cut.op_type:
        raise ValueError(f"cannot cut: the final norm is {final.op_type}, layer {layers}'s input norm {cut.op_type}")
    # every input but the norm's own scale and shift: x (and for SkipLayerNormalization the
    # residual, and the bias of the layer before, fused in as its 5th input)
    own = (2, 3) if cut.op_type.startswith("Skip") else (1, 2)
    if len(final.inputs) < len(cut.inputs):
        final.resize_inputs(len(cut.inputs))
    # export/trace.py moves the logits_to_keep slice into the last layer, which the cut drops:
    # the final norm's new activations go through the same slice
    kept = next((n for n in graph if n.op_type == "Slice" and n.inputs[1] is not None
                 and n.inputs[1].producer() is not None
                 and n.inputs[1].producer().name == LOGITS_TO_KEEP_START), None)
    for i in range(len(cut.inputs)):
        if i not in own:
            final.replace_input_with(i, _kept(graph, kept, cut.inputs[i], final))
    keep = {f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    outputs = [v for v in graph.outputs if not v.name.startswith("present.") or v.name in keep]
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    _remove_dead(graph)
    return model


def _kept(graph: ir.Graph, kept: ir.Node | None, value: ir.Value | None, before: ir.Node) -> ir.Value | None:
    """``value`` through a copy of the ``kept`` slice when it is an activation, else as it is."""
    import onnx_ir as ir

    if kept is None or value is None or value.const_value is not None or value.is_initializer():
        return value
    node = ir.node("Slice", [value, *kept.inputs[1:]], name=f"{LOGITS_TO_KEEP_START}/cut/{value.name}")
    node.outputs[0].dtype = value.dtype
    graph.insert_before(before, node)
    return node.outputs[0]


def _remove_dead(graph: ir.Graph) -> None:
    live: set[int] = set()
    todo = [v.producer() for v in graph.outputs if v.producer() is not None]
    while todo:
        node = todo.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        for value in node.inputs:
            if value is not None and value.producer() is not None:
                todo.append(value.producer())
        for sub in node.attributes.values():  # subgraphs read outer values too (the ort flavour's attention Ifs)
            if sub.type.name == "GRAPH":
                for inner in sub.value.all_nodes():
                    todo.extend(v.producer() for v in inner.inputs if v is not None and v.producer() is not None)
    for node in reversed(list(graph)):
        if id(node) not in live:
            for sub in node.attributes.values():  # its branches' nodes read outer values: let go first
                if sub.type.name == "GRAPH":
                    for inner in sub.value.all_nodes():
                        for i in range(len(inner.inputs)):
                            inner.replace_input_with(i, None)
            graph.remove(node, safe=True)
    used = {id(v) for n in graph.all_nodes() for v in n.inputs if v is not None} | {id(v) for v in graph.outputs}
    inputs = [v for v in graph.inputs if id(v) in used or v.name in ("input_ids", "attention_mask", "position_ids")]
    graph.inputs.clear()
    graph.inputs.extend(inputs)
    for name in [n for n, v in graph.initializers.items() if id(v) not in used]:
        del graph.initializers[name]


def write_cut(model_path: str | Path, layers: int, out_path: str | Path) -> Path:
    """The graph at ``model_path`` cut to ``layers`` layers, saved at ``out_path``; no weight is read
    or written: it refers to the same external data file name, which must be beside ``out_path``
    (the artifact's own folder, or a link to the data file)."""
    import onnx_ir as ir

    model_path, out_path = Path(model_path), Path(out_path)
    model = ir.load(model_path)
    cut_layers(model, layers)
    ir.save(model, out_path)
    return out_path
