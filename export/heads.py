"""Classification heads: the traced decoder graph without its KV cache, and its export-time check.

A head model has the causal LM's forward signature, so ``trace()`` and both flavours run on it
unchanged (the ort flavour's GroupQueryAttention and RotaryEmbedding rules match the same body).
A classifier runs each text once, so the graph then loses its cache and its positions::

    past_key_values.{i}.key/value (inputs)  ->  ConstantOfShape([batch, kv_heads, 0, head_dim])
    position_ids (input)                    ->  Max(CumSum(attention_mask, axis=1) - 1, 0)
    present.{i}.key/value (outputs)         ->  dropped

leaving ``input_ids``, ``attention_mask`` [batch, seq] -> ``logits`` [batch, labels] (sequence) or
[batch, seq, labels] (token). Positions follow the mask exactly as the reference model's
``default_position_ids`` does, so a left-padded row gives what the same row gives alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from starlift.core.artifact import past_names, present_names

if TYPE_CHECKING:  # torch and onnx_ir only where used: the exporting process validates without them
    import onnx_ir as ir
    import torch

HEAD_INPUTS = ("input_ids", "attention_mask")


def drop_cache(model: ir.Model, num_layers: int) -> None:
    """Remove the KV cache inputs/outputs and the position input (see the module docstring)."""
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    first_past = inputs[past_names(num_layers)[0]]
    kv_heads, head_dim = first_past.shape[1], first_past.shape[3]

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    prefix = "/model/no_cache"
    batch = ir.node("Shape", [ids], attributes={"start": 0, "end": 1}, name=f"{prefix}/Batch")
    rest = const(f"{prefix}/kv_dims", np.array([kv_heads, 0, head_dim], np.int64))
    shape = ir.node("Concat", [batch.outputs[0], rest], attributes={"axis": 0}, name=f"{prefix}/Shape")
    empty = ir.node("ConstantOfShape", [shape.outputs[0]], name=f"{prefix}/EmptyPast",
                    attributes={"value": ir.tensor(np.zeros(1, first_past.dtype.numpy()))})
    empty.outputs[0].name = f"{prefix}/empty_past"
    empty.outputs[0].dtype = first_past.dtype
    empty.outputs[0].shape = ir.Shape([first_past.shape[0], kv_heads, 0, head_dim])
    axis = const(f"{prefix}/axis", np.array(1, np.int64))
    one = const(f"{prefix}/one", np.array(1, np.int64))
    zero = const(f"{prefix}/zero", np.array(0, np.int64))
    cumsum = ir.node("CumSum", [mask, axis], name=f"{prefix}/CumSum")
    minus = ir.node("Sub", [cumsum.outputs[0], one], name=f"{prefix}/Sub")
    positions = ir.node("Max", [minus.outputs[0], zero], name=f"{prefix}/Positions")
    positions.outputs[0].name = f"{prefix}/position_ids"
    positions.outputs[0].dtype = ir.DataType.INT64
    positions.outputs[0].shape = ir.Shape(inputs["position_ids"].shape)
    graph.insert_before(graph.node(0), [batch, shape, empty, cumsum, minus, positions])

    replaced = {**{name: empty.outputs[0] for name in past_names(num_layers)}, "position_ids": positions.outputs[0]}
    for name, new in replaced.items():
        old = inputs[name]
        old.replace_all_uses_with(new)
        graph.inputs.remove(old)
    presents = set(present_names(num_layers))
    for value in [v for v in graph.outputs if v.name in presents]:
        graph.outputs.remove(value)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    ir.passes.common.RemoveUnusedOpsetsPass()(model)


# ---- export-time validation ------------------------------------------------------------------

@dataclass
class HeadCase:
    ids: np.ndarray  # (B, T): a full row, a left-padded row, a right-padded row
    mask: np.ndarray


def make_case(vocab: int, pad_token_id: int | None, length: int = 24, pad: int = 7, seed: int = 1234) -> HeadCase:
    """Three rows (full, left-padded, right-padded); without a pad token, rows cannot be told
    apart from padding, so all three are full."""
    rng = np.random.default_rng(seed)
    low = min(38, vocab - 1)
    ids = rng.integers(low, vocab, size=(3, length)).astype(np.int64)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = low if pad_token_id != low else low + 1
    mask = np.ones_like(ids)
    if pad_token_id is not None:
        fill = pad_token_id
        ids[1, :pad], mask[1, :pad] = fill, 0
        ids[2, -pad:], mask[2, -pad:] = fill, 0
    return HeadCase(ids, mask)


def reference_outputs(model: torch.nn.Module, case: HeadCase) -> np.ndarray:
    """The torch head on the case, a row at a time when the model refuses batches (no pad token)."""
    rows = [slice(0, len(case.ids))] if model.config.pad_token_id is not None else \
        [slice(i, i + 1) for i in range(len(case.ids))]
    import torch

    with torch.no_grad():
        out = [model(torch.from_numpy(case.ids[r]), torch.from_numpy(case.mask[r]))[0].numpy() for r in rows]
    return np.concatenate(out, axis=0)


def onnx_outputs(model_path: str, case: HeadCase, providers=None) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_prepacking", "1")  # see validate.onnx_logits
    opts.enable_cpu_mem_arena = False
    session = ort.InferenceSession(model_path, opts, providers=providers or ["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": case.ids, "attention_mask": case.mask})[0].astype(np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray, case: HeadCase, tolerance: float) -> dict:
    """Max/mean error over the outputs that mean something (real tokens for token heads)."""
    if reference.shape != candidate.shape:
        return {"max_abs_error": float("inf"), "mean_abs_error": float("inf"), "finite": False,
                "tolerance": tolerance, "passed": False,
                "error": f"output shape {candidate.shape} != reference {reference.shape}"}
    err = np.abs(reference - candidate)
    real = candidate
    if reference.ndim == 3:
        keep = case.mask.astype(bool)
        err, real = err[keep], candidate[keep]
    max_err = float(err.max())
    finite = bool(np.isfinite(real).all())
    return {"max_abs_error": max_err, "mean_abs_error": float(err.mean()), "finite": finite,
            "tolerance": tolerance, "passed": bool(finite and max_err <= tolerance)}
