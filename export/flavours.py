"""The two graph flavours.

``portable``: standard ONNX ops only (TensorRT, OpenVINO, any runtime) after onnxscript's
optimizer (constant folding, CSE, dead code).

``ort``: the portable graph rewritten for ONNX Runtime: GroupQueryAttention with the sliding
window (gqa.py), onnxscript's ORT fusions (SkipLayerNormalization, FastGelu, ...), then
RotaryEmbedding (rotary.py). The decoder contract (names, shapes,
concat-grow KV cache) is unchanged, so every runner that drives the portable graph drives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlift.core.artifact import LOGITS_TO_KEEP
from starlift.core.errors import StarliftError

if TYPE_CHECKING:  # the exporting process imports this module without the graph libraries
    import onnx_ir as ir

FLAVOURS = ("portable", "ort")

# Ops a portable graph must not contain: control flow (TensorRT cannot convert If; If is slow
# in ORT) and anything outside the default domain.
FORBIDDEN_PORTABLE_OPS = {"If", "Loop", "Scan"}


def optimize_portable(model: ir.Model) -> ir.Model:
    import logging

    import onnxscript.optimizer

    # it warns that it leaves logits_to_keep alone (a graph input with a default), as it should
    logging.getLogger("onnx_ir.passes.common.initializer_deduplication").setLevel(logging.ERROR)
    onnxscript.optimizer.optimize(model)
    return model


def check_portable(model: ir.Model) -> None:
    bad = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph
                  if n.domain not in ("", "ai.onnx") or n.op_type in FORBIDDEN_PORTABLE_OPS})
    if bad:
        raise ValueError(f"the portable graph contains non-portable ops: {', '.join(bad)}")


def to_ort(model: ir.Model, config) -> tuple[ir.Model, dict[str, int]]:
    """GroupQueryAttention (our rule, see gqa.py), onnxscript's ORT fusions, then RotaryEmbedding
    (our rule, see rotary.py; after the optimizer so that its constant folding does not write
    the angle caches into the file), then each attention's fast path for prompts without padding
    (gqa.py); returns the model and the non-zero fusion counts."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from .gqa import add_prompt_fast_path, fuse_group_query_attention
    from .rotary import fuse_rotary_embedding

    gqa = fuse_group_query_attention(model, config)
    model, counts = optimize_for_ort(model)
    # optimize_for_ort turns every initializer that is also an input into a constant: give
    # logits_to_keep its place among the inputs back (see trace.add_logits_to_keep)
    keep = model.graph.initializers.get(LOGITS_TO_KEEP)
    if keep is not None and keep not in model.graph.inputs:
        model.graph.inputs.append(keep)
    counts["group_query_attention"] = gqa
    # onnxscript counts its own RoPE matches, which do not survive to the saved graph here:
    # report what the graph holds
    counts["rotary_embedding"] = fuse_rotary_embedding(model, config)
    check_fully_fused(model, config.num_hidden_layers)
    # last: the rules above match GroupQueryAttention and its inputs in the main graph
    counts["attention_fast_path"] = add_prompt_fast_path(model, config)
    return model, {k: v for k, v in counts.items() if v}


def check_fully_fused(model: ir.Model, layers: int) -> None:
    """Every layer's attention in one GroupQueryAttention and its q and k in RotaryEmbedding, or
    an error: the manifest promises a shared in-place KV buffer for the whole graph, and a layer
    left unfused would concatenate into a buffer that does not grow (wrong logits, no error)."""
    ops = [n.op_type for n in model.graph.all_nodes()]
    gqa, rope = ops.count("GroupQueryAttention"), ops.count("RotaryEmbedding")
    if gqa != layers or rope != 2 * layers:
        raise StarliftError(
            f"the ort flavour fused {gqa} GroupQueryAttention and {rope} RotaryEmbedding nodes for {layers} layers "
            f"(expected {layers} and {2 * layers}): the graph is only partly fused and would get a KV buffer it "
            "cannot use; export with --flavour portable, and report this with the checkpoint's config.json")
