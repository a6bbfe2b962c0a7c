"""Trace the reference model to an ONNX graph (onnx_ir) with the decoder contract's names.

Why the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) and not TorchScript: it
keeps parameter names on the initializers, gives named symbolic dims (batch, seq, past), and
its output is an ``onnx_ir`` model that onnxscript's optimizer and ORT fusions work on
directly, without a serialize/parse round trip of the weights. Its known trap (a batch of 1 in
the example specializes the batch dim, see PEERS.md) is avoided by tracing with batch 2.

Weights are never copied while tracing: initializers wrap the model's own tensors (views into
the checkpoint's memory map), and the transposes the exporter puts in front of every weight
are replaced by lazily computed initializers that are materialized one at a time at save time.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import torch
from torch import nn

from starlift.core import tensor_map
from starlift.core.artifact import LOGITS_TO_KEEP, LOGITS_TO_KEEP_START, past_names, present_names
from starlift.model import Starcoder2
from starlift.model.taps import residual_stream

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


class _FlatDecoder(nn.Module):
    """The decoder contract as flat tensors: (ids, mask, positions, *past) -> (logits, *present),
    followed by the residual-stream taps, which only name values the graph computes anyway
    (``trace`` drops them from the outputs again)."""

    def __init__(self, model: Starcoder2):
        super().__init__()
        self.m = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.layers)]
        with residual_stream(self.m) as taps:
            logits, present = self.m(input_ids, attention_mask, position_ids, past)
        return (logits, *[t for kv in present for t in kv], *taps)


def trace(model: Starcoder2, opset: int = 18, weights: dict[str, ir.TensorProtocol] | None = None) -> ir.Model:
    """The model as an ONNX graph with dynamic batch, sequence and past length; no If/Loop.

    ``weights`` (checkpoint name -> tensor, e.g. ``build.checkpoint_tensors``): initializers of
    those names, dtypes and shapes take them in place of the model's parameters (the same values,
    read from the checkpoint file when the graph is saved)."""
    c = model.config
    dtype = next(model.parameters()).dtype
    batch, seq, past = 2, 3, 4  # batch 2: a batch of 1 would be specialized by torch.export
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.zeros(batch, c.num_key_value_heads, past, c.head_dim, dtype=dtype)
          for _ in range(2 * c.num_hidden_layers)]
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    taps = [point.tensor for point in tensor_map.points(c.num_hidden_layers)]
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, [{0: b, 2: p} for _ in kv])
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _FlatDecoder(model), (ids, mask, pos, kv), dynamo=True, optimize=False, verbose=False,
            opset_version=opset, dynamic_shapes=dynamic,
            input_names=[*INPUT_NAMES, *past_names(c.num_hidden_layers)],
            output_names=["logits", *present_names(c.num_hidden_layers), *taps],
        )
    graph_model = program.model
    _drop_taps_from_outputs(graph_model, taps)
    # The exporter keeps a stack trace per node in metadata: most of the graph's bytes.
    ir.passes.common.ClearMetadataAndDocStringPass()(graph_model)
    _strip_wrapper_prefix(graph_model)
    if weights:  # how many bytes now come from the file (not serialized: ir.Model.meta)
        graph_model.meta["starlift.file_weight_bytes"] = _use_weights(graph_model, weights)
    _fold_weight_transposes(graph_model)
    _name_dims(graph_model)
    if c.task == "text-generation":  # a classifier's head reads every position (or picks its own)
        add_logits_to_keep(graph_model)
    return graph_model


def add_logits_to_keep(model: ir.Model) -> None:
    """An int64 scalar input ``logits_to_keep`` (default 0 = every position) that slices the
    final norm's output before the LM head, so a prefill multiplies only the positions it reads::

        LayerNorm(model.norm) -> h [B, T, H] -> LM head -> logits [B, T, V]
      becomes
        logits_to_keep -> Neg -> Reshape[1] -> start        (N=0: start 0, all positions)
        h -> Slice(start, end=INT64_MAX, axis 1) -> [B, min(N, T), H] -> LM head -> logits [B, kept, V]

    The input is also an initializer holding 0: ONNX lets an initializer give a graph input its
    default, so callers that do not feed it (onnxruntime-genai, optimum-style loops, the parity
    gate) get every position as before. TensorRT's parser reads such an input as a constant weight
    (it keeps every position there); ONNX Runtime and OpenVINO take it as a feedable input. The
    torch model cannot trace it (a slice whose start is a tensor value makes the output's shape
    data-dependent for torch.export), so the Slice is added here; the reference model's own
    ``logits_to_keep`` does the same slice in torch.
    """
    graph = model.graph
    def source(value: ir.Value | None) -> str | None:
        # fp16/bf16 exports run the norm in fp32: its weight arrives through a Cast
        while value is not None and value.producer() is not None and value.producer().op_type == "Cast":
            value = value.producer().inputs[0]
        return None if value is None else value.name

    norm = next((n for n in graph if n.op_type == "LayerNormalization" and len(n.inputs) > 1
                 and source(n.inputs[1]) == "model.norm.weight"), None)
    if norm is None:
        raise ValueError("the traced graph has no final LayerNormalization (model.norm.weight): cannot find the LM head")
    hidden = norm.outputs[0]
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)
    prefix = "/model/logits_to_keep"
    one = ir.Value(name=f"{prefix}/shape", const_value=ir.tensor(np.array([1], np.int64)))
    end = ir.Value(name=f"{prefix}/end", const_value=ir.tensor(np.array([np.iinfo(np.int64).max], np.int64)))
    axis = ir.Value(name=f"{prefix}/axis", const_value=ir.tensor(np.array([1], np.int64)))
    for value in (one, end, axis):
        graph.register_initializer(value)
    neg = ir.node("Neg", [keep], name=f"{prefix}/Neg")
    start = ir.node("Reshape", [neg.outputs[0], one], name=LOGITS_TO_KEEP_START)
    sliced = ir.node("Slice", [hidden, start.outputs[0], end, axis], name=f"{prefix}/Slice")
    users = [(user, index) for user, index in hidden.uses() if user is not sliced]
    # the start first: the slices hoist_kept_positions puts into the last layer read it
    graph.insert_before(next(iter(graph)), [neg, start])
    graph.insert_after(norm, [sliced])
    out = sliced.outputs[0]
    out.name, out.dtype = "hidden_kept", hidden.dtype
    if hidden.shape is not None:
        out.shape = ir.Shape([hidden.shape[0], ir.SymbolicDim("kept"), *hidden.shape[2:]])
    for user, index in users:
        user.replace_input_with(index, out)
    logits = next(v for v in graph.outputs if v.name == "logits")
    if logits.shape is not None:
        logits.shape = ir.Shape([logits.shape[0], ir.SymbolicDim("kept"), *logits.shape[2:]])
    hoist_kept_positions(model, sliced)


# Ops that compute each position from that position alone (the last axis is the feature axis):
# a slice along the sequence axis commutes with them. MatMul only with a 2-D weight.
ROW_WISE = frozenset({"LayerNormalization", "Add", "Sub", "Mul", "Div", "Pow", "Tanh", "Erf", "Sqrt", "Gelu",
                      "Relu", "Sigmoid", "Cast", "MatMul"})


def hoist_kept_positions(model: ir.Model, sliced: ir.Node) -> int:
    """Move the ``logits_to_keep`` slice up through the last layer, as far as row-wise ops go.

    The final norm, the last layer's MLP, its output projection and both residual adds then run on
    the kept positions only; the layer's norm, its q/k/v projections and attention still run on
    every position (the KV cache needs every key and value). With one kept position that is 7% less
    matmul work for a 113M-shaped prompt (5.3 of 6.3 MFLOP per token in the last of 12 layers).
    ``logits_to_keep = 0`` keeps every position, so the values (the tensor map's taps of the last
    layer included) are what they were. A value is sliced in place of its producer's output only
    when every use of it is this slice, so nothing another consumer reads changes. Returns how many
    nodes now run on the kept positions. (Hand-written: no onnxscript rewriter rule moves a Slice.)
    """
    graph = model.graph
    start, end, axis = sliced.inputs[1], sliced.inputs[2], sliced.inputs[3]

    def ours(node: ir.Node) -> bool:
        return node.op_type == "Slice" and list(node.inputs[1:4]) == [start, end, axis]

    def constant(value: ir.Value) -> bool:
        producer = value.producer()
        return value.const_value is not None or value.is_initializer() or (
            producer is not None and producer.op_type == "Constant")

    def rank(value: ir.Value) -> int | None:
        if value.shape is not None:
            return len(value.shape)
        tensor = value.const_value
        if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
            attribute = value.producer().attributes.get("value")
            tensor = attribute.value if attribute is not None else None
        return None if tensor is None else len(tensor.shape)

    def positional(value: ir.Value | None) -> bool:
        # an activation: [batch, positions, features] (the traced values may carry no shape; a
        # known one must agree), anything constant broadcasts over the positions
        return value is not None and not constant(value) and (value.shape is None or len(value.shape) == 3)

    moved, changed = 0, True
    while changed:
        changed = False
        for node in [n for n in graph if ours(n)]:
            x = node.inputs[0]
            producer = x.producer()
            uses = [user for user, _ in x.uses()]
            if (producer is None or producer.op_type not in ROW_WISE or len(producer.outputs) != 1
                    or x.is_graph_output() or not positional(x) or not all(ours(u) for u in uses)):
                continue
            if producer.op_type == "LayerNormalization" and producer.attributes.get_int("axis", -1) not in (-1, 2):
                continue
            along = [i for i, v in enumerate(producer.inputs) if positional(v)]
            others = [v for i, v in enumerate(producer.inputs) if i not in along and v is not None]
            if not along:
                continue
            if producer.op_type in ("MatMul", "LayerNormalization") and along != [0]:
                continue
            if producer.op_type == "MatMul" and rank(others[0]) != 2:
                continue
            if producer.op_type not in ("MatMul", "LayerNormalization") and any(
                    rank(v) is None or rank(v) > 1 for v in others):  # must broadcast over positions
                continue
            for i in along:
                inner = producer.inputs[i]
                cut = ir.node("Slice", [inner, start, end, axis], name=f"{producer.name or 'node'}/kept_{i}")
                if inner.dtype is not None:
                    cut.outputs[0].dtype = inner.dtype
                if inner.shape is not None:
                    cut.outputs[0].shape = ir.Shape([inner.shape[0], ir.SymbolicDim("kept"), inner.shape[2]])
                graph.insert_before(producer, cut)
                producer.replace_input_with(i, cut.outputs[0])
            if x.shape is not None:
                x.shape = ir.Shape([x.shape[0], ir.SymbolicDim("kept"), x.shape[2]])
            for user in uses:  # x is the kept positions now: the slices after it go
                out = user.outputs[0]
                name = out.name if out.name == "hidden_kept" else None
                out.replace_all_uses_with(x, replace_graph_outputs=True)
                graph.remove(user, safe=True)
                if name and not x.name:
                    x.name = name
            moved += 1
            changed = True
            break  # the slices just removed were in this pass's list
    return moved


def _drop_taps_from_outputs(model: ir.Model, taps: list[str]) -> None:
    """The taps stay in the graph as named intermediate values (the map localization reads,
    ``starlift.core.tensor_map``), not as outputs: the contract's outputs are unchanged."""
    outputs = model.graph.outputs
    for value in [v for v in outputs if v.name in taps]:
        outputs.remove(value)


def _strip_wrapper_prefix(model: ir.Model) -> None:
    """``m.model.layers.0...`` -> ``model.layers.0...``: the checkpoint's own tensor names."""
    for name in list(model.graph.initializers):
        value = model.graph.initializers[name]
        if name.startswith("m."):
            del model.graph.initializers[name]
            value.name = name[2:]
            model.graph.register_initializer(value)


def _use_weights(model: ir.Model, weights: dict[str, ir.TensorProtocol]) -> int:
    """Point the initializers named like a checkpoint tensor at ``weights[name]`` (same dtype and
    shape only: a weight converted at load stays the model's); returns the bytes re-pointed."""
    moved = 0
    for name, value in model.graph.initializers.items():
        tensor = weights.get(name)
        if (tensor is not None and value.const_value is not None and tensor.dtype == value.const_value.dtype
                and tuple(tensor.shape) == tuple(value.const_value.shape)):
            value.const_value = tensor
            moved += tensor.nbytes
    return moved


def _lazy_transpose(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    """W.T computed when the tensor is written, so that no transposed copy lives in memory."""
    rows, cols = tensor.shape

    def compute() -> ir.Tensor:
        if isinstance(tensor, ir.ExternalTensor):  # a weight read from the checkpoint file, then dropped
            from .build import read_external

            return ir.Tensor(np.ascontiguousarray(read_external(tensor).T))
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, torch.Tensor):
            data = raw.detach().t().contiguous()
            if data.dtype == torch.bfloat16:
                import ml_dtypes

                return ir.Tensor(data.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
            return ir.Tensor(data.numpy())
        return ir.Tensor(np.ascontiguousarray(tensor.numpy().T))

    return ir.LazyTensor(compute, dtype=tensor.dtype, shape=ir.Shape([cols, rows]))


def _fold_weight_transposes(model: ir.Model) -> None:
    """Rewrite the exporter's weight transposes; store the tied embedding once.

    Linear layers, where the weight has no other use::

        W[out,in] -> Transpose -> MatMul(x, .)      becomes      MatMul(x, W.T[in,out])

    The tied LM head, where the embedding matrix also feeds the token Gather, keeps a single
    [vocab, hidden] initializer and multiplies by its transpose inside Gemm (transB=1)::

        E -> Gather(E, ids)                          E -> Gather(E, ids)
        E -> Transpose -> MatMul(h, .)   becomes     h -> Reshape[-1,H] -> Gemm(., E, transB=1)
                                                        -> Reshape[B,T,V]

    (onnxscript's constant folding would materialize a second, transposed copy of E.)
    """
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or not source.is_initializer() or source.const_value is None:
            continue
        if len(source.shape) != 2 or list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        out = node.outputs[0]
        other_uses = [u for u, _ in source.uses() if u is not node]
        if not other_uses:
            new = ir.Value(name=f"{source.name}.T", const_value=_lazy_transpose(source.const_value),
                           shape=ir.Shape([source.shape[1], source.shape[0]]), type=source.type)
            graph.register_initializer(new)
            out.replace_all_uses_with(new)
            graph.remove(node, safe=True)
            del graph.initializers[source.name]
            source.const_value = None  # the lazy tensor holds the weight now, and only it
        else:
            _tied_head_to_gemm(graph, node, source, out)


def _tied_head_to_gemm(graph: ir.Graph, transpose: ir.Node, weight: ir.Value, transposed: ir.Value) -> None:
    hidden = weight.shape[1]
    for user, _ in list(transposed.uses()):
        if user.op_type != "MatMul" or user.inputs[1] is not transposed:
            raise ValueError(f"unexpected use of the tied embedding's transpose: {user.op_type}")
        x = user.inputs[0]
        prefix = "/model/lm_head"
        flat_shape = ir.Value(name=f"{prefix}/flat_shape", const_value=ir.tensor(np.array([-1, hidden], np.int64)))
        graph.register_initializer(flat_shape)
        shape_x = ir.node("Shape", [x], name=f"{prefix}/Shape", attributes={"end": -1})
        vocab = ir.Value(name=f"{prefix}/vocab", const_value=ir.tensor(np.array([weight.shape[0]], np.int64)))
        graph.register_initializer(vocab)
        out_shape = ir.node("Concat", [shape_x.outputs[0], vocab], name=f"{prefix}/OutShape", attributes={"axis": 0})
        flat = ir.node("Reshape", [x, flat_shape], name=f"{prefix}/Flatten")
        gemm = ir.node("Gemm", [flat.outputs[0], weight], name=f"{prefix}/Gemm", attributes={"transB": 1})
        result = user.outputs[0]
        unflat = ir.node("Reshape", [gemm.outputs[0], out_shape.outputs[0]], name=f"{prefix}/Unflatten")
        graph.insert_before(user, [shape_x, out_shape, flat, gemm, unflat])
        unflat.outputs[0].dtype = result.dtype
        unflat.outputs[0].shape = result.shape
        name = result.name
        result.replace_all_uses_with(unflat.outputs[0], replace_graph_outputs=True)
        graph.remove(user, safe=True)
        unflat.outputs[0].name = name
    graph.remove(transpose, safe=True)


def _name_dims(model: ir.Model) -> None:
    """Readable symbolic dims on the outputs (``past + seq`` -> ``total``)."""
    for value in model.graph.outputs:
        if value.shape is None:
            continue
        dims = [("total" if isinstance(d, ir.SymbolicDim) and d.value and "+" in d.value else d) for d in value.shape]
        value.shape = ir.Shape(dims)
